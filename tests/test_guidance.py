"""Invariants of the guidance methods (../shared/specs/guidance.md) on the tiny SD- and SDXL-shaped pipelines."""

import pytest
import torch
from diffusers import (
    DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler, PNDMScheduler, StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline,
)

from conftest import seeded
from unsee.guidance import CFG, FDG, NASA, PAG, CFGpp, GuidanceError, NegativeSteer, equivalent_cfg_scale
from unsee.guidance.cfgpp import CFGppState, cfgpp_step
from unsee.guidance.fdg import laplacian_pyramid, reconstruct
from unsee.guidance.negative import DNGState
from unsee.pipelines.attention import layer_matches
from unsee.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

K = dict(num_inference_steps=4, output_type="pt")
PROMPT = "a red circle"
BUILDERS = pytest.mark.parametrize("build", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])


def run(pipe, **kwargs):
    return pipe(PROMPT, generator=seeded(0), **K, **kwargs).images


def unet_call_counter(pipe):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@BUILDERS
def test_cfg_object_equals_guidance_scale(build):
    pipe = build()
    assert torch.equal(run(pipe, guidance=[CFG(5.0)]), run(pipe, guidance_scale=5.0))


@BUILDERS
def test_pag_scale_zero_is_plain_cfg(build):
    pipe = build()
    before = dict(pipe.unet.attn_processors)
    assert torch.equal(run(pipe, guidance_scale=5.0, guidance=[PAG(0.0)]), run(pipe, guidance_scale=5.0))
    assert dict(pipe.unet.attn_processors) == before, "processors restored after the call"


@pytest.mark.parametrize("build, reference", [(tiny_sd_pipeline, StableDiffusionPAGPipeline),
                                              (tiny_sdxl_pipeline, StableDiffusionXLPAGPipeline)], ids=["sd", "sdxl"])
@pytest.mark.parametrize("cfg_scale", [5.0, 1.0])
def test_pag_equals_diffusers_pag_pipelines(build, reference, cfg_scale):
    ours = run(build(), guidance_scale=cfg_scale, guidance=[PAG(3.0, layers=("mid",))])
    theirs = build(reference)(PROMPT, generator=seeded(0), guidance_scale=cfg_scale, pag_scale=3.0, **K).images
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - run(build(), guidance_scale=cfg_scale)).abs().max() > 1e-3, "PAG changes the result"


def test_pag_runs_one_batched_unet_call_per_step(tiny_sd):
    calls = unet_call_counter(tiny_sd)
    run(tiny_sd, guidance_scale=5.0, guidance=[PAG(3.0)])
    assert len(calls) == K["num_inference_steps"]


def test_pag_rows_skip_queries_and_keys_in_the_perturbed_layers(tiny_sd):
    # identity attention needs only V for the perturbed rows, as in diffusers' PAG processor
    seen = {}
    attn = tiny_sd.unet.mid_block.attentions[0].transformer_blocks[0].attn1

    def recorder(name):
        def hook(module, args):
            seen.setdefault(name, args[0].shape[0])  # rows of the first call
        return hook

    for name in ("to_q", "to_k", "to_v"):
        getattr(attn, name).register_forward_pre_hook(recorder(name))
    run(tiny_sd, guidance_scale=5.0, guidance=[PAG(3.0, layers=("mid",))])
    assert seen == {"to_q": 2, "to_k": 2, "to_v": 3}, "CFG rows attend; the perturbed row only projects V"


@pytest.mark.parametrize("cfg_scale, rows", [(5.0, 2), (1.0, 1)])
def test_pag_rows_join_the_batch_at_the_first_perturbed_block(tiny_sd, cfg_scale, rows):
    # until the mid block the perturbed row would repeat the conditional row's work
    seen = {}

    def recorder(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, (args[0] if args else kwargs["hidden_states"]).shape[0])  # rows of the first call
        return hook

    for name, block in (("down", tiny_sd.unet.down_blocks[0]), ("mid", tiny_sd.unet.mid_block.resnets[0]),
                        ("up", tiny_sd.unet.up_blocks[-1])):
        block.register_forward_pre_hook(recorder(name), with_kwargs=True)
    run(tiny_sd, guidance_scale=cfg_scale, guidance=[PAG(3.0, layers=("mid",))])
    assert seen == {"down": rows, "mid": rows + 1, "up": rows + 1}


@pytest.mark.parametrize("guidance, negative", [
    ([PAG(3.0, layers=("up_blocks.1",))], None),
    ([PAG(3.0, layers=("mid",)), NASA(0.3)], "blue"),
    ([PAG(3.0, layers=("down_blocks.0",)), NASA(0.3), NegativeSteer(start_fraction=0.25)], "blue"),
    ([PAG(3.0, layers=("mid",)), NegativeSteer(mode="dng", dng_scale=2.0)], "blue"),
])
def test_late_joining_perturbed_rows_give_the_full_batch_result(tiny_sd, monkeypatch, guidance, negative):
    joined = run(tiny_sd, guidance_scale=5.0, negative_prompt=negative, guidance=guidance)
    monkeypatch.setattr("unsee.pipelines.guided.LateJoin", lambda unet, layers: None)
    full = run(tiny_sd, guidance_scale=5.0, negative_prompt=negative, guidance=guidance)
    assert (joined - full).abs().max() <= 1e-5


def test_pag_on_up_block_layers_equals_diffusers():
    ours = run(tiny_sd_pipeline(), guidance_scale=5.0, guidance=[PAG(3.0, layers=("up_blocks.1",))])
    theirs = tiny_sd_pipeline(StableDiffusionPAGPipeline)
    theirs.set_pag_applied_layers(["up_blocks.1"])
    reference = theirs(PROMPT, generator=seeded(0), guidance_scale=5.0, pag_scale=3.0, **K).images
    assert (ours - reference).abs().max() <= 1e-4


def test_pag_layer_names_match_whole_components():
    assert layer_matches("down_blocks.1.attentions.0.transformer_blocks.0.attn1", ("down_blocks.1",))
    assert not layer_matches("down_blocks.10.attentions.0.transformer_blocks.0.attn1", ("down_blocks.1",))
    assert not layer_matches("up_blocks.0.attentions.1.transformer_blocks.10.attn1", ("transformer_blocks.1",))
    assert layer_matches("mid_block.attentions.0.transformer_blocks.0.attn1", ("mid",))
    assert layer_matches("up_blocks.1.attentions.2.transformer_blocks.0.attn1", (r"re:up_blocks\.1\..*attn1",))


def test_pag_with_unknown_layers_fails_before_work(tiny_sd):
    calls = unet_call_counter(tiny_sd)
    with pytest.raises(GuidanceError, match="match no self-attention layer"):
        run(tiny_sd, guidance=[PAG(3.0, layers=("down_blocks.7",))])
    assert not calls


@BUILDERS
def test_fdg_with_equal_scales_is_cfg(build):
    pipe = build()
    assert (run(pipe, guidance=[FDG((5.0, 5.0))]) - run(pipe, guidance_scale=5.0)).abs().max() <= 1e-5
    assert (run(pipe, guidance=[FDG((10.0, 5.0))]) - run(pipe, guidance_scale=5.0)).abs().max() > 1e-3


@pytest.mark.parametrize("scales, parallel", [((10.0, 5.0), None), ((7.0, 3.0, 2.0), None), ((10.0, 5.0), (0.5, 1.0))])
def test_fdg_equals_diffusers_guider_math(scales, parallel):
    from diffusers.guiders import FrequencyDecoupledGuidance

    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
    guider = FrequencyDecoupledGuidance(guidance_scales=list(scales), parallel_weights=list(parallel) if parallel else None)
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(500))
    expected = guider.forward(cond, uncond).pred
    assert (FDG(scales, parallel_weights=parallel).combine(cond, uncond) - expected).abs().max() <= 1e-5


def test_fdg_handles_unit_band_scales_and_odd_latent_sizes():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 144, 112)  # SDXL 1152x896
    assert (reconstruct(laplacian_pyramid(x, 3)) - x).abs().max() <= 1e-5
    cond, uncond = x, torch.randn_like(x)
    out = FDG((7.5, 1.0)).combine(cond, uncond)  # a band with scale 1.0 crashes diffusers' guider
    assert out.shape == x.shape
    assert (FDG((1.0, 1.0)).combine(cond, uncond) - cond).abs().max() <= 1e-5, "all scales 1 gives the conditional"


@BUILDERS
def test_cfgpp_lambda_zero_is_unconditional_sampling(build):
    pipe = build()
    ours = run(pipe, guidance=[CFGpp(0.0)])
    uncond_embeds, uncond_pooled = pipe._unsee_empty_embeddings(1, "cpu")
    extra = {"pooled_prompt_embeds": uncond_pooled} if uncond_pooled is not None else {}
    reference = pipe(prompt_embeds=uncond_embeds, guidance_scale=1.0, generator=seeded(0), **K, **extra).images
    assert (ours - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler])
def test_one_cfgpp_step_equals_one_cfg_step_at_omega(scheduler_class):
    scheduler = scheduler_class.from_config(tiny_sd_pipeline().scheduler.config)
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    sample, cond, uncond = torch.randn(3, 1, 4, 8, 8)
    for index in (0, 4, 9):
        t = scheduler.timesteps[index]
        lam = 0.6
        omega = equivalent_cfg_scale(scheduler, lam, index)
        scheduler._step_index = index  # Euler steps from its step index; DDIM ignores it
        plus = cfgpp_step(scheduler, uncond + lam * (cond - uncond), uncond, t, sample, CFGppState())
        scheduler._step_index = index
        plain = scheduler.step(uncond + omega * (cond - uncond), t, sample).prev_sample
        assert (plus - plain).abs().max() <= 1e-4 * max(1.0, plain.abs().max().item()), index


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                                             DPMSolverMultistepScheduler])
def test_cfgpp_runs_on_supported_schedulers(scheduler_class, tiny_sd):
    tiny_sd.scheduler = scheduler_class.from_config(tiny_sd.scheduler.config)
    image = run(tiny_sd, guidance=[CFGpp(0.6)])
    assert torch.isfinite(image).all() and image.std() > 0


def test_cfgpp_refuses_other_schedulers_before_work(tiny_sd):
    tiny_sd.scheduler = PNDMScheduler.from_config(tiny_sd.scheduler.config)
    calls = unet_call_counter(tiny_sd)
    with pytest.raises(GuidanceError, match="CFG\\+\\+ supports DDIM"):
        run(tiny_sd, guidance=[CFGpp(0.6)])
    assert not calls
    assert "step" not in vars(tiny_sd.scheduler), "scheduler left untouched"


@BUILDERS
def test_negative_steer_from_step_zero_is_diffusers_negative_prompt(build):
    pipe = build()
    ours = run(pipe, negative_prompt="blue", guidance_scale=5.0, guidance=[NegativeSteer(start_step=0)])
    assert torch.equal(ours, run(pipe, negative_prompt="blue", guidance_scale=5.0))


@BUILDERS
def test_negative_steer_after_the_last_step_is_cfg_with_empty_negative(build):
    pipe = build()
    ours = run(pipe, negative_prompt="blue", guidance_scale=5.0, guidance=[NegativeSteer(start_fraction=1.0)])
    assert (ours - run(pipe, guidance_scale=5.0)).abs().max() <= 1e-6
    middle = run(pipe, negative_prompt="blue", guidance_scale=5.0, guidance=[NegativeSteer(start_fraction=0.5)])
    assert (middle - ours).abs().max() > 1e-4


def test_adaptive_negative_start_is_detected_per_image(tiny_sd):
    output = tiny_sd("a red circle", negative_prompt="circle", guidance_scale=5.0, num_images_per_prompt=2,
                     generator=seeded(0), guidance=[NegativeSteer(mode="adaptive", max_start=0.5)], num_inference_steps=6,
                     output_type="pt")
    starts = output.guidance_report.negative_start_steps  # detected after step k, the negative acts from k + 1
    assert len(starts) == 2 and all(s is not None and 2 <= s <= 4 for s in starts)


def test_dng_keeps_its_posterior_in_bounds(tiny_sd):
    steer = NegativeSteer(mode="dng", dng_scale=2.0)
    output = tiny_sd(PROMPT, generator=seeded(0), **K, negative_prompt="circle", guidance_scale=5.0, guidance=[steer])
    posterior = torch.tensor(output.guidance_report.dng_posterior)
    assert torch.isfinite(output.images).all()
    assert posterior.shape == (K["num_inference_steps"], 1)
    assert ((posterior >= steer.dng_p_min) & (posterior <= steer.dng_p_max)).all()
    assert posterior[0, 0] == steer.dng_prior and (posterior[1:] != steer.dng_prior).any(), "p_t is updated per step"
    zero = run(tiny_sd, negative_prompt="circle", guidance_scale=5.0, guidance=[NegativeSteer(mode="dng", dng_scale=0.0)])
    assert (zero - run(tiny_sd, guidance_scale=5.0)).abs().max() <= 1e-5, "DNG with scale 0 is plain CFG"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dng_posterior_means_are_the_ddpm_posterior_means(prediction_type):
    # DDIM with eta=1 and zero noise steps to the DDPM posterior mean; its variance is the posterior variance
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    t, prev_t = scheduler.timesteps[3], scheduler.timesteps[4]
    generator = seeded(0)
    x, out_neg, out_u = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    state = DNGState(NegativeSteer(mode="dng"), rows=2)
    state.predict(x, out_neg, out_u, prediction_type, scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev_t])
    mu_neg, mu_u, variance = state.pending
    for output, mean in ((out_neg, mu_neg), (out_u, mu_u)):
        expected = scheduler.step(output, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        assert (mean.float() - expected).abs().max() <= 1e-5
    assert abs(float(variance) - float(scheduler._get_variance(t, prev_t))) <= 1e-7


def test_dng_refuses_schedulers_without_a_noise_schedule(tiny_sd):
    tiny_sd.scheduler = FlowMatchEulerDiscreteScheduler()
    calls = unet_call_counter(tiny_sd)
    with pytest.raises(GuidanceError, match="needs a scheduler with alphas_cumprod"):
        run(tiny_sd, negative_prompt="circle", guidance_scale=5.0, guidance=[NegativeSteer(mode="dng")])
    assert not calls


def test_delayed_dng_acts_from_its_start_only(tiny_sd):
    def dng(**kwargs):
        return run(tiny_sd, negative_prompt="circle", guidance_scale=5.0,
                   guidance=[NegativeSteer(mode="dng", dng_scale=50.0, dng_temperature=0.0, **kwargs)])

    from_first = dng()
    assert torch.equal(from_first, dng(start_step=0)), "DNG starts at step 0 by default, as in its paper"
    never = dng(start_fraction=1.0)
    assert (never - run(tiny_sd, guidance_scale=5.0)).abs().max() <= 1e-5, "a DNG term that never starts is plain CFG"
    middle = dng(start_step=K["num_inference_steps"] // 2)
    assert (middle - from_first).abs().max() > 1e-3 and (middle - never).abs().max() > 1e-3


@BUILDERS
def test_nasa_alpha_zero_is_the_baseline_and_uses_one_pass(build):
    pipe = build()
    calls = unet_call_counter(pipe)
    baseline = run(pipe, guidance_scale=1.0)
    assert torch.equal(run(pipe, negative_prompt="blue", guidance_scale=1.0, guidance=[NASA(0.0)]), baseline)
    calls.clear()
    steered = run(pipe, negative_prompt="blue", guidance_scale=1.0, guidance=[NASA(0.5)])
    assert len(calls) == K["num_inference_steps"]
    assert (steered - baseline).abs().max() > 1e-3


class ReferenceNASAProcessor:
    """NASA written out for a test: to_out(Z+ - alpha * Z-), Z- attending to the negative with the same queries."""

    def __init__(self, negative: torch.Tensor, alpha: float) -> None:
        self.negative, self.alpha = negative, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        heads = attn.heads

        def split(t):
            return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

        def attend(context):
            scores = split(attn.to_q(hidden_states)) @ split(attn.to_k(context)).transpose(-1, -2) * attn.scale
            return scores.softmax(-1) @ split(attn.to_v(context))

        z = attend(encoder_hidden_states) - self.alpha * attend(self.negative)
        return attn.to_out[0](z.transpose(1, 2).flatten(2))


def test_nasa_processor_matches_the_formula_at_every_step(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from unsee.guidance.nasa import NASAAttention
    from unsee.pipelines.attention import attention_module_names, installed_processors

    unet = tiny_sd.unet
    cross = attention_module_names(unet, cross=True)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    prompt = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    negative = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    edit = NASAAttention(frozenset(cross), negative, alpha=0.7)
    edit.rows = slice(0, 2)
    with torch.no_grad(), installed_processors(unet, [edit]):
        # one edit for two steps: the second reuses the negative's keys and values computed at the first
        ours = [unet(sample, t, prompt).sample for t in (900, 100)]
    unet.set_attn_processor({f"{name}.processor": ReferenceNASAProcessor(negative, 0.7) if name in cross
                             else AttnProcessor2_0() for name in attention_module_names(unet)})
    with torch.no_grad():
        reference = [unet(sample, t, prompt).sample for t in (900, 100)]
    for step, (a, b) in enumerate(zip(ours, reference)):
        assert (a - b).abs().max() <= 1e-5, f"step {step}"
    assert (ours[0] - ours[1]).abs().max() > 1e-3, "the steps differ"


def test_methods_compose_in_one_call(tiny_sd):
    calls = unet_call_counter(tiny_sd)
    image = run(tiny_sd, negative_prompt="blue", guidance=[CFGpp(0.6), PAG(3.0), NASA(0.3), NegativeSteer(start_fraction=0.25)])
    assert torch.isfinite(image).all() and len(calls) == K["num_inference_steps"]


@pytest.mark.parametrize("guidance, message", [
    ([CFGpp(0.6), FDG()], "use one of them"),
    ([PAG(3.0), PAG(2.0)], "given twice"),
    ([NASA(0.3)], "need a negative prompt"),
    ([CFGpp(1.5)], "CFGpp.lam must be in"),
    ([NegativeSteer(mode="later")], "mode must be one of"),
    ([NegativeSteer(start_fraction=0.3, mode="adaptive")], "detects the start per image"),
    ([NegativeSteer(start_fraction=0.3, start_step=2)], "not both"),
    ([NegativeSteer(start_fraction=2)], "start_fraction must be in"),
    ([NegativeSteer(start_step=1.0)], "whole step index"),
    ([FDG((10.0, 5.0), parallel_weights=(1.0,))], "needs 2 values"),
    (["cfg++"], "unsee.guidance objects"),
])
def test_invalid_combinations_fail_before_work(tiny_sd, guidance, message):
    calls = unet_call_counter(tiny_sd)
    with pytest.raises(GuidanceError, match=message):
        run(tiny_sd, guidance=guidance)
    assert not calls


def test_processors_work_with_lora_adapters_loaded(tiny_sd):
    from peft import LoraConfig

    from unsee.pipelines.attention import installed_processors

    plain = run(tiny_sd, guidance_scale=5.0)
    torch.manual_seed(0)
    tiny_sd.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                        init_lora_weights=False))
    with_lora = run(tiny_sd, guidance_scale=5.0)
    assert (with_lora - plain).abs().max() > 1e-3, "the LoRA is active"
    with installed_processors(tiny_sd.unet):
        ours = run(tiny_sd, guidance_scale=5.0)
    assert (ours - with_lora).abs().max() <= 1e-6
    guided = run(tiny_sd, guidance_scale=5.0, guidance=[PAG(3.0), NASA(0.2)], negative_prompt="blue")
    assert torch.isfinite(guided).all() and (guided - with_lora).abs().max() > 1e-3
