"""unsee's img2img, inpainting (4- and 9-channel) and ControlNet pipelines for SD and SDXL, and ``unsee.guided``.

Without ``guidance=`` each is its diffusers pipeline bit for bit; with PAG it equals diffusers' own PAG pipeline for
that task; methods count their steps on the steps the call runs (img2img starts part way down the schedule); each
guidance branch gets the ControlNet residuals of its own rows. Tiny random components, a few steps, 32 px.
"""

import diffusers
import pytest
import torch
from diffusers import (ControlNetModel, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionControlNetPipeline,
                       StableDiffusionImg2ImgPipeline, StableDiffusionUpscalePipeline, StableDiffusionXLControlNetPipeline,
                       UNet2DConditionModel)

import unsee
from conftest import seeded
from unsee.guidance import CFG, PAG, CFGpp, NegativeSteer
from unsee.pipelines import GUIDED_CLASSES, UnseeStableDiffusionImg2ImgPipeline, UnsupportedPipelineError
from unsee.pipelines.stable_diffusion import _text_model_alias
from unsee.testing import _wrap, tiny_sd_components, tiny_sdxl_components

PROMPT = "a red circle"
STEPS, STRENGTH = 4, 0.75  # img2img and inpainting run int(4 * 0.75) = 3 of the 4 steps


def tiny_controlnet(unet) -> ControlNetModel:
    """A ControlNet copied from the UNet, its zero convolutions made random so that the residuals matter."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return controlnet


def build(pipeline_class: type, sdxl: bool = False, channels: int = 4, controlnet: bool = False):
    """A tiny diffusers pipeline of ``pipeline_class`` (a 9-channel UNet for ``channels=9``)."""
    components = (tiny_sdxl_components if sdxl else tiny_sd_components)()
    if controlnet:
        components["controlnet"] = tiny_controlnet(components["unet"])
    if channels == 9:
        torch.manual_seed(7)
        components["unet"] = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9})
    return _wrap(components, pipeline_class)


def task_inputs(pipeline_class: type) -> dict:
    """The image arguments of the pipeline's task: init image, mask, control image."""
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 32, 32, generator=generator)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    name = pipeline_class.__name__
    inputs = dict(num_inference_steps=STEPS, output_type="pt")
    if "Inpaint" in name:
        inputs.update(image=image, mask_image=mask, strength=STRENGTH)
    elif "Img2Img" in name:
        inputs.update(image=image, strength=STRENGTH)
    if "ControlNet" in name:
        inputs["control_image" if "image" in inputs else "image"] = image.flip(-1)
    return inputs


# (diffusers class, diffusers' PAG class for the same task or None, SDXL, UNet input channels, ControlNet)
CASES = {
    "sd-img2img": ("StableDiffusionImg2ImgPipeline", "StableDiffusionPAGImg2ImgPipeline", False, 4, False),
    "sd-inpaint-4ch": ("StableDiffusionInpaintPipeline", "StableDiffusionPAGInpaintPipeline", False, 4, False),
    "sd-inpaint-9ch": ("StableDiffusionInpaintPipeline", "StableDiffusionPAGInpaintPipeline", False, 9, False),
    "sd-controlnet": ("StableDiffusionControlNetPipeline", "StableDiffusionControlNetPAGPipeline", False, 4, True),
    "sd-controlnet-img2img": ("StableDiffusionControlNetImg2ImgPipeline", None, False, 4, True),
    "sd-controlnet-inpaint-9ch": ("StableDiffusionControlNetInpaintPipeline",
                                  "StableDiffusionControlNetPAGInpaintPipeline", False, 9, True),
    "sdxl-img2img": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPAGImg2ImgPipeline", True, 4, False),
    "sdxl-inpaint-4ch": ("StableDiffusionXLInpaintPipeline", "StableDiffusionXLPAGInpaintPipeline", True, 4, False),
    "sdxl-inpaint-9ch": ("StableDiffusionXLInpaintPipeline", "StableDiffusionXLPAGInpaintPipeline", True, 9, False),
    "sdxl-controlnet": ("StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetPAGPipeline", True, 4, True),
    "sdxl-controlnet-img2img": ("StableDiffusionXLControlNetImg2ImgPipeline",
                                "StableDiffusionXLControlNetPAGImg2ImgPipeline", True, 4, True),
    "sdxl-controlnet-inpaint": ("StableDiffusionXLControlNetInpaintPipeline", None, True, 4, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_guided_pipeline_is_diffusers_without_guidance_and_diffusers_pag_with_pag(case):
    name, pag_name, sdxl, channels, controlnet = CASES[case]
    theirs = build(getattr(diffusers, name), sdxl, channels, controlnet)
    ours = unsee.guided(theirs)
    assert type(ours) is GUIDED_CLASSES[type(theirs)] and ours.unet is theirs.unet
    images = 2 if channels == 9 else 1  # the 9-channel extras are per image: re-rowed for every branch
    call = dict(task_inputs(type(theirs)), negative_prompt="blue", guidance_scale=5.0, num_images_per_prompt=images)
    plain = theirs(PROMPT, generator=seeded(0), **call).images
    assert torch.equal(ours(PROMPT, generator=seeded(0), **call).images, plain)

    output = ours(PROMPT, generator=seeded(0), guidance=[PAG(3.0)], **call)
    steps = int(STEPS * STRENGTH) if "strength" in call else STEPS
    assert output.guidance_report.unet_calls == output.guidance_report.steps == steps
    assert (output.images - plain).abs().max() > 1e-3, "PAG changes the result"
    if pag_name is not None:
        reference = build(getattr(diffusers, pag_name), sdxl, channels, controlnet)
        expected = reference(PROMPT, generator=seeded(0), pag_scale=3.0, **call).images
        assert (output.images - expected).abs().max() <= 1e-5


def test_pag_without_cfg_on_a_9_channel_inpainting_unet_equals_diffusers():
    ours = unsee.guided(build(diffusers.StableDiffusionInpaintPipeline, channels=9))
    call = dict(task_inputs(diffusers.StableDiffusionInpaintPipeline), guidance_scale=1.0, num_images_per_prompt=2)
    output = ours(PROMPT, generator=seeded(0), guidance=[PAG(3.0)], **call).images
    reference = build(diffusers.StableDiffusionPAGInpaintPipeline, channels=9)
    assert (output - reference(PROMPT, generator=seeded(0), pag_scale=3.0, **call).images).abs().max() <= 1e-5


# ---------------------------------------------------------------- img2img: the steps actually run
def test_img2img_negative_start_counts_the_steps_the_call_runs():
    pipe = unsee.guided(build(StableDiffusionImg2ImgPipeline))
    call = dict(task_inputs(StableDiffusionImg2ImgPipeline), num_inference_steps=8, strength=0.5, guidance_scale=5.0,
                negative_prompt="blue")

    def steer(**start):
        return pipe(PROMPT, generator=seeded(0), guidance=[NegativeSteer(**start)], **call)

    half = steer(start_fraction=0.5)
    assert half.guidance_report.steps == half.guidance_report.unet_calls == 4  # strength 0.5 of 8 steps
    assert torch.equal(half.images, steer(start_step=2).images), "half of the 4 steps run is step 2"
    assert not torch.equal(half.images, steer(start_step=4).images), "not half of the 8-step schedule"
    never = steer(start_fraction=1.0).images
    no_negative = pipe(PROMPT, generator=seeded(0), **{**call, "negative_prompt": None}).images
    assert (never - no_negative).abs().max() <= 1e-6


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler])
def test_img2img_cfgpp_lambda_zero_is_unconditional_sampling_from_the_truncated_schedule(scheduler_class):
    pipe = unsee.guided(build(StableDiffusionImg2ImgPipeline))
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    call = task_inputs(StableDiffusionImg2ImgPipeline)
    output = pipe(PROMPT, generator=seeded(0), guidance=[CFGpp(0.0)], **call)
    assert output.guidance_report.steps == int(STEPS * STRENGTH)
    empty, _ = pipe._unsee_empty_embeddings(1, "cpu")
    reference = pipe(prompt_embeds=empty, guidance_scale=1.0, generator=seeded(0), **call).images
    assert (output.images - reference).abs().max() <= 1e-5
    guided = pipe(PROMPT, generator=seeded(0), guidance=[CFGpp(0.6)], **call).images
    assert torch.isfinite(guided).all() and (guided - reference).abs().max() > 1e-3


# ---------------------------------------------------------------- ControlNet residuals per branch
def unet_inputs(pipe) -> list:
    """The keyword arguments of every UNet forward the executor makes (the batched call), recorded."""
    seen, forward = [], pipe.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return forward(*args, **kwargs)

    pipe.unet.forward = spy  # the guidance hook wraps whatever forward it finds
    return seen


@pytest.mark.parametrize("guess_mode", [False, True], ids=["residuals", "guess-mode"])
def test_each_branch_gets_the_controlnet_residuals_of_its_own_rows(guess_mode):
    pipe = unsee.guided(build(StableDiffusionControlNetPipeline, controlnet=True))
    seen = unet_inputs(pipe)
    pipe(PROMPT, negative_prompt="blue", generator=seeded(0), guidance_scale=5.0, guess_mode=guess_mode,
         guidance=[PAG(3.0), NegativeSteer(mode="dng")], **task_inputs(StableDiffusionControlNetPipeline))
    down, mid = seen[0]["down_block_additional_residuals"], seen[0]["mid_block_additional_residual"]
    residuals = [*down, mid]
    # rows: uncond (empty prompt), negative (DNG's branch: the negative prompt), cond, perturbed (PAG: a copy of cond);
    # the perturbed rows join at the mid block, so the down blocks' skip connections have the first three only
    assert all(r.shape[0] == 3 for r in down) and mid.shape[0] == 4
    assert torch.equal(mid[3], mid[2]), "perturbed rows take the conditional residuals"
    if guess_mode:
        assert all(not r[:2].any() for r in residuals), "guess mode: zeros for the unconditional-derived branches"
    else:
        assert not torch.equal(residuals[-1][0], residuals[-1][1]), "uncond and negative from their own prompts"


@pytest.mark.parametrize("where", ["mid", "down", "up"])
@pytest.mark.parametrize("pipeline_class, sdxl", [(StableDiffusionControlNetPipeline, False),
                                                  (StableDiffusionXLControlNetPipeline, True)], ids=["sd", "sdxl"])
def test_pag_joins_late_under_controlnet_with_the_full_batch_result(pipeline_class, sdxl, where, monkeypatch):
    pipe = unsee.guided(build(pipeline_class, sdxl=sdxl, controlnet=True))
    down = pipe.unet.down_blocks
    # PAG on the mid block, on the first down block with attention, or on the first up block with attention
    first_down = next(i for i, block in enumerate(down) if hasattr(block, "attentions"))
    first_up = next(i for i, block in enumerate(pipe.unet.up_blocks) if hasattr(block, "attentions"))
    layer = {"mid": "mid", "down": f"down_blocks.{first_down}", "up": f"up_blocks.{first_up}"}[where]
    call = dict(task_inputs(pipeline_class), negative_prompt="blue", guidance_scale=5.0,
                guidance=[PAG(3.0, layers=(layer,))])
    seen = unet_inputs(pipe)
    joined = pipe(PROMPT, generator=seeded(0), **call).images
    # rows: uncond and cond until the join, then the perturbed copy of cond too; the skip connections made before the
    # join (conv_in's output, then each earlier down block's resnets and downsampler) meet the first two only
    made_before = 1 + sum(len(block.resnets) + len(block.downsamplers or []) for block in down[:first_down])
    rows = [r.shape[0] for r in seen[0]["down_block_additional_residuals"]]
    assert rows == [2 if where != "down" or i < made_before else 3 for i in range(len(rows))]
    assert seen[0]["mid_block_additional_residual"].shape[0] == (2 if where == "up" else 3)
    monkeypatch.setattr("unsee.pipelines.guided.LateJoin", lambda unet, layers: None)
    full = pipe(PROMPT, generator=seeded(0), **call).images
    assert (joined - full).abs().max() <= 1e-5


@pytest.mark.parametrize("pipeline_class, sdxl", [(StableDiffusionControlNetPipeline, False),
                                                  (StableDiffusionXLControlNetPipeline, True)], ids=["sd", "sdxl"])
def test_delayed_negative_gives_the_controlnet_the_empty_prompt_until_it_starts(pipeline_class, sdxl):
    theirs = build(pipeline_class, sdxl=sdxl, controlnet=True)
    call = dict(task_inputs(pipeline_class), guidance_scale=5.0)
    never = unsee.guided(theirs)(PROMPT, negative_prompt="blue", generator=seeded(0),
                                 guidance=[NegativeSteer(start_fraction=1.0)], **call).images
    assert (never - theirs(PROMPT, generator=seeded(0), **call).images).abs().max() <= 1e-5


# ---------------------------------------------------------------- unsee.guided
def test_guided_shares_components_and_keeps_a_unsee_pipeline():
    theirs = build(StableDiffusionImg2ImgPipeline)
    ours = unsee.guided(theirs)
    assert type(ours) is UnseeStableDiffusionImg2ImgPipeline
    assert all(ours.components[k] is v for k, v in theirs.components.items())
    assert unsee.guided(ours) is ours


def test_guided_refuses_other_pipelines_by_name():
    class FluxPipeline:  # any object whose class unsee has no counterpart for
        pass

    for pipe in (object.__new__(StableDiffusionUpscalePipeline), FluxPipeline()):
        with pytest.raises(UnsupportedPipelineError, match=f"does not support {type(pipe).__name__}; it supports "
                                                           f"StableDiffusionPipeline, StableDiffusionImg2ImgPipeline"):
            unsee.guided(pipe)


def test_every_counterpart_is_its_diffusers_class_plus_guidance():
    for theirs, ours in GUIDED_CLASSES.items():
        assert issubclass(ours, theirs) and ours.__name__ == "Unsee" + theirs.__name__
        assert getattr(unsee.pipelines, ours.__name__) is ours


def test_inpainting_pag_keeps_diffusers_call_semantics():
    # clip_skip, several images per prompt and the step callback, as diffusers' PAG inpainting has them (its
    # guidance_rescale raises in diffusers 0.42.1: checked against plain CFG below)
    seen = {"ours": [], "theirs": []}

    def recorder(key):
        def callback(pipe, i, t, tensors):
            seen[key].append((i, int(t), pipe.guidance_scale, pipe.do_classifier_free_guidance))
            return tensors
        return callback

    call = dict(task_inputs(diffusers.StableDiffusionInpaintPipeline), guidance_scale=5.0, clip_skip=1,
                num_images_per_prompt=2)
    ours = unsee.guided(build(diffusers.StableDiffusionInpaintPipeline))(
        PROMPT, generator=seeded(0), guidance=[PAG(3.0)], callback_on_step_end=recorder("ours"), **call).images
    reference = build(diffusers.StableDiffusionPAGInpaintPipeline)
    with _text_model_alias(reference.text_encoder):  # diffusers' clip_skip under transformers 5 (see the alias)
        theirs = reference(PROMPT, generator=seeded(0), pag_scale=3.0, callback_on_step_end=recorder("theirs"),
                           **call).images
    assert ours.shape[0] == 2 and (ours - theirs).abs().max() <= 1e-5
    assert seen["ours"] == [(i, t, 5.0, True) for i, t, _, _ in seen["theirs"]] and len(seen["ours"]) == 3



def test_guidance_rescale_applies_to_the_guided_prediction_as_in_diffusers():
    theirs = build(diffusers.StableDiffusionXLImg2ImgPipeline, sdxl=True)
    call = dict(task_inputs(diffusers.StableDiffusionXLImg2ImgPipeline), guidance_scale=5.0, guidance_rescale=0.7)
    expected = theirs(PROMPT, negative_prompt="blue", generator=seeded(0), **call).images
    ours = unsee.guided(theirs)(PROMPT, negative_prompt="blue", generator=seeded(0), guidance=[CFG(5.0)], **call).images
    assert (ours - expected).abs().max() <= 1e-6


def test_multi_controlnet_pag_equals_diffusers_and_a_delayed_negative_reaches_each_controlnet():
    components = tiny_sd_components()
    controlnets = [tiny_controlnet(components["unet"]), tiny_controlnet(components["unet"])]
    theirs = _wrap({**components, "controlnet": controlnets}, StableDiffusionControlNetPipeline)
    image = task_inputs(StableDiffusionControlNetPipeline)["image"]
    call = dict(num_inference_steps=STEPS, output_type="pt", guidance_scale=5.0, image=[image, image.flip(-2)],
                controlnet_conditioning_scale=[1.0, 0.5])
    ours = unsee.guided(theirs)
    pag = ours(PROMPT, negative_prompt="blue", generator=seeded(0), guidance=[PAG(3.0)], **call).images
    reference = _wrap({**components, "controlnet": controlnets}, diffusers.StableDiffusionControlNetPAGPipeline)
    expected = reference(PROMPT, negative_prompt="blue", generator=seeded(0), pag_scale=3.0, **call).images
    assert (pag - expected).abs().max() <= 1e-5
    never = ours(PROMPT, negative_prompt="blue", generator=seeded(0), guidance=[NegativeSteer(start_fraction=1.0)],
                 **call).images
    assert (never - theirs(PROMPT, generator=seeded(0), **call).images).abs().max() <= 1e-5


def test_dng_and_pag_run_on_a_9_channel_inpainting_unet():
    # DNG's Bayes update reads the latent channels of the sample, not the mask and masked image after them
    pipe = unsee.guided(build(diffusers.StableDiffusionInpaintPipeline, channels=9))
    output = pipe(PROMPT, negative_prompt="blue", generator=seeded(0), guidance_scale=5.0,
                  guidance=[PAG(3.0), NegativeSteer(mode="dng")], **task_inputs(diffusers.StableDiffusionInpaintPipeline))
    report = output.guidance_report
    assert report.unet_calls == report.steps == len(report.dng_posterior) == int(STEPS * STRENGTH)
    assert torch.isfinite(output.images).all()
