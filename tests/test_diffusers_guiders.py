"""diffusers guiders both ways (unsee.guidance.diffusers_guiders), checked against diffusers' Modular SDXL pipeline.

(a) unsee methods as guiders in a Modular SDXL pipeline built from tiny random-weight components give the latents
unsee's own SDXL pipeline gives with the method; (b) diffusers' guiders in unsee's ``guidance=[...]`` give the
latents the same guider gives in the Modular pipeline, and compose with unsee's methods. The modular loop runs
the branches one after the other, unsee batches them: the two agree to ~1e-5, not bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)
from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance,
                               PerturbedAttentionGuidance, SkipLayerGuidance, SmoothedEnergyGuidance,
                               TangentialClassifierFreeGuidance)
from diffusers.hooks import LayerSkipConfig
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

from unsee.guidance import (CFG, FDG, NAG, NASA, PAG, CFGpp, CFGppGuider, DiffusersGuider, FDGGuider, GuidanceError,
                            NegativeSteer, as_diffusers_guider, equivalent_cfg_scale)
from unsee.guidance.diffusers_guiders import cfgpp_scale
from unsee.testing import tiny_sdxl_components, tiny_sdxl_pipeline, tiny_sd_pipeline

PROMPT, NEGATIVE, STEPS = "a red circle", "blue", 4
TOLERANCE = 1e-4  # sequential (modular) vs batched (unsee) branches; measured ~1e-5
SCHEDULERS = {
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
    "euler_a": lambda config: EulerAncestralDiscreteScheduler.from_config(config),
    "ddim": lambda config: DDIMScheduler.from_config(config, clip_sample=False),
}


def modular(scheduler: str = "euler"):
    components = tiny_sdxl_components()
    components["scheduler"] = SCHEDULERS[scheduler](components["scheduler"].config)
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(**{k: v for k, v in components.items() if v is not None})
    return pipe


def modular_latents(pipe, guider, negative: str = NEGATIVE) -> torch.Tensor:
    pipe.update_components(guider=guider)
    return pipe(prompt=PROMPT, negative_prompt=negative, num_inference_steps=STEPS, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output="latents")


def unsee_latents(guidance, scheduler: str = "euler", negative: str = NEGATIVE, pipe=None) -> torch.Tensor:
    if pipe is None:
        pipe = tiny_sdxl_pipeline()
        pipe.scheduler = SCHEDULERS[scheduler](pipe.scheduler.config)
    return pipe(PROMPT, negative_prompt=negative, num_inference_steps=STEPS, height=32, width=32, guidance=guidance,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------ (a) unsee -> diffusers
def test_fdg_as_a_guider_in_modular_sdxl_equals_unsee_fdg():
    pipe = modular()
    guider = as_diffusers_guider(FDG((10.0, 5.0)))
    assert isinstance(guider, FDGGuider)
    got = modular_latents(pipe, guider)
    want = unsee_latents([FDG((10.0, 5.0))])
    assert diff(got, want) < TOLERANCE
    assert diff(got, unsee_latents([CFG(5.0)])) > 100 * TOLERANCE  # it is not plain CFG


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "ddim"])
def test_cfgpp_as_a_time_varying_cfg_guider_equals_unsee_cfgpp(scheduler):
    pipe = modular(scheduler)
    guider = as_diffusers_guider(CFGpp(0.6), scheduler=pipe.scheduler)
    assert isinstance(guider, CFGppGuider)
    got = modular_latents(pipe, guider)
    want = unsee_latents([CFGpp(0.6)], scheduler)
    assert diff(got, want) < TOLERANCE, diff(got, want)


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_cfgpp_guider_scale_is_the_equivalent_cfg_scale(scheduler):
    sched = SCHEDULERS[scheduler](tiny_sdxl_components()["scheduler"].config)
    sched.set_timesteps(10)
    for i, t in enumerate(sched.timesteps):
        if scheduler == "euler":
            sched._step_index = i
        assert cfgpp_scale(sched, 0.6, t) == pytest.approx(equivalent_cfg_scale(sched, 0.6, i), rel=1e-6)


def test_cfg_is_diffusers_cfg_and_the_others_are_refused_with_a_reason():
    guider = as_diffusers_guider(CFG(4.0))
    assert type(guider) is ClassifierFreeGuidance and guider.guidance_scale == 4.0
    for method, reason in [(PAG(3.0), "PerturbedAttentionGuidance"), (NASA(0.3), "cross-attention"),
                           (NAG(3.0), "negative prompt"), (NegativeSteer(start_step=1), "unconditional branch")]:
        with pytest.raises(GuidanceError, match=reason):
            as_diffusers_guider(method)
    with pytest.raises(GuidanceError, match="scheduler=pipe.scheduler"):
        as_diffusers_guider(CFGpp(0.6))
    config = tiny_sdxl_components()["scheduler"].config
    with pytest.raises(GuidanceError, match="DPMSolverMultistepScheduler"):
        as_diffusers_guider(CFGpp(0.6), scheduler=DPMSolverMultistepScheduler.from_config(config))
    with pytest.raises(GuidanceError, match="clip_sample=False"):
        CFGppGuider(0.6, scheduler=DDIMScheduler.from_config(config, clip_sample=True))
    assert "scheduler" not in CFGppGuider(0.6).config


# ------------------------------------------------------------------------------------------------ (b) diffusers -> unsee
GUIDERS = {
    "cfg": lambda: ClassifierFreeGuidance(guidance_scale=5.0),
    "apg": lambda: AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5,
                                             adaptive_projected_guidance_rescale=2.0, eta=0.5),
    "cfg_zero_star": lambda: ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1),
    "tangential": lambda: TangentialClassifierFreeGuidance(guidance_scale=5.0),
    "cfg_window": lambda: ClassifierFreeGuidance(guidance_scale=5.0, start=0.25, stop=0.75),
}


@pytest.mark.parametrize("name", list(GUIDERS))
def test_diffusers_guiders_in_unsee_equal_the_modular_pipeline(name):
    guider = GUIDERS[name]()
    got = unsee_latents([guider])
    want = modular_latents(modular(), GUIDERS[name]())
    assert diff(got, want) < TOLERANCE, diff(got, want)
    assert diff(got, unsee_latents([guider])) == 0.0  # per-call state (APG's momentum) does not leak


def test_diffusers_cfg_guider_is_unsee_cfg_and_composes_like_it():
    pipe = tiny_sd_pipeline()

    def run(guidance, negative=NEGATIVE):
        return pipe(PROMPT, negative_prompt=negative, num_inference_steps=STEPS, height=32, width=32,
                    guidance=guidance, generator=torch.Generator().manual_seed(0), output_type="latent").images

    cfg = ClassifierFreeGuidance(guidance_scale=5.0)
    assert diff(run(cfg), run([CFG(5.0)])) == 0.0  # one guider on its own, not in a list
    for extra in ([PAG(2.0)], [NASA(0.3)], [NAG(3.0)], [NegativeSteer(start_step=2)], [PAG(2.0), NAG(3.0)]):
        assert diff(run([cfg] + extra), run([CFG(5.0)] + extra)) == 0.0, extra
    apg = AdaptiveProjectedGuidance(guidance_scale=5.0)
    assert diff(run([apg, NegativeSteer(start_step=0)]), run([apg])) == 0.0  # from step 0: diffusers' negative
    assert diff(run([apg, PAG(2.0)]), run([apg])) > 1e-3


def test_layer_skip_guiders_are_refused_before_work():
    pipe = tiny_sdxl_pipeline()
    config = LayerSkipConfig(indices=[0], fqn="mid_block.attentions.0.transformer_blocks", skip_attention=False,
                             skip_attention_scores=True, skip_ff=False)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    for guider in (SkipLayerGuidance(skip_layer_config=config), SmoothedEnergyGuidance(seg_guidance_config=SmoothedEnergyGuidanceConfig(
                       indices=[0], fqn="mid_block.attentions.0.transformer_blocks")),
                   PerturbedAttentionGuidance(perturbed_guidance_config=config)):
        with pytest.raises(GuidanceError, match=r"unsee\.guidance\.PAG"):
            unsee_latents([guider], pipe=pipe)
    with pytest.raises(GuidanceError, match="each decide how"):
        unsee_latents([ClassifierFreeGuidance(guidance_scale=5.0), CFGpp(0.6)], pipe=pipe)
    assert not calls


def test_cfgpp_guider_in_unsee_takes_the_pipelines_scheduler():
    got = unsee_latents([CFGppGuider(0.6)], "ddim")
    want = unsee_latents([CFGpp(0.6)], "ddim")
    assert diff(got, want) < 1e-5
    assert DiffusersGuider(CFGppGuider(0.6)).describe() == "CFGppGuider"
