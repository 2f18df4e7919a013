"""What a guided call does with the rest of diffusers' call: negative prompts, callbacks, clip_skip, per-call state.

Regression tests for issue 22, items 1-6 (each failed on ed834d2).
"""

import gc
import weakref

import pytest
import torch
from diffusers import StableDiffusionPAGPipeline

from conftest import seeded
from unsee.guidance import CFG, FDG, NASA, PAG, CFGpp, GuidanceError, NegativeSteer
from unsee.pipelines.guided import GuidedStep
from unsee.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

K = dict(num_inference_steps=4, output_type="pt")
PROMPT = "a red circle"
BUILDERS = pytest.mark.parametrize("build", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])


def run(pipe, **kwargs):
    return pipe(PROMPT, generator=seeded(0), **K, **kwargs).images


# ---------------------------------------------------------------- item 1: the negative prompt acts with every method
@BUILDERS
def test_cfg_object_equals_guidance_scale_with_a_negative_prompt(build):
    pipe = build()
    ours = run(pipe, negative_prompt="blue", guidance=[CFG(5.0)])
    assert torch.equal(ours, run(pipe, negative_prompt="blue", guidance_scale=5.0))
    assert (ours - run(pipe, guidance=[CFG(5.0)])).abs().max() > 1e-3, "the negative prompt changes the image"


@BUILDERS
@pytest.mark.parametrize("method", [CFGpp(0.6), FDG(), PAG(3.0)], ids=["cfgpp", "fdg", "pag"])
def test_a_negative_prompt_fills_the_unconditional_branch_with_every_method(build, method):
    pipe = build()
    with_negative = run(pipe, negative_prompt="blue", guidance_scale=5.0, guidance=[method])
    without = run(pipe, guidance_scale=5.0, guidance=[method])
    assert (with_negative - without).abs().max() > 1e-3


def test_pag_with_a_negative_prompt_equals_diffusers_pag_pipeline():
    ours = run(tiny_sd_pipeline(), negative_prompt="blue", guidance_scale=5.0, guidance=[PAG(3.0)])
    theirs = tiny_sd_pipeline(StableDiffusionPAGPipeline)(PROMPT, negative_prompt="blue", generator=seeded(0),
                                                          guidance_scale=5.0, pag_scale=3.0, **K).images
    assert (ours - theirs).abs().max() <= 1e-4


def test_nasa_without_negative_steering_keeps_the_empty_prompt_in_the_unconditional_branch(tiny_sd):
    # NASA(0) changes nothing in attention: what is left is CFG with the empty prompt, not with the negative
    ours = run(tiny_sd, negative_prompt="blue", guidance_scale=5.0, guidance=[NASA(0.0)])
    assert torch.equal(ours, run(tiny_sd, guidance_scale=5.0))


# ---------------------------------------------------------------- item 2: callbacks see the call's settings
def _seen_in_callback(pipe, **kwargs):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((pipeline.guidance_scale, pipeline.do_classifier_free_guidance))
        return tensors

    pipe(PROMPT, generator=seeded(0), callback_on_step_end=callback, **K, **kwargs)
    return set(seen)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(guidance=[CFG(5.0)]), (5.0, True)),
    (dict(guidance_scale=7.0, guidance=[PAG(3.0)]), (7.0, True)),
    (dict(guidance_scale=1.0, guidance=[CFGpp(0.6)]), (1.0, True)),
    (dict(guidance_scale=1.0, guidance=[PAG(3.0)]), (1.0, False)),
    (dict(guidance_scale=1.0, negative_prompt="blue", guidance=[NASA(0.3)]), (1.0, False)),
], ids=["cfg", "pag-with-cfg", "cfgpp", "pag-alone", "nasa-alone"])
def test_callbacks_see_the_guidance_scale_in_effect(tiny_sd, kwargs, expected):
    assert _seen_in_callback(tiny_sd, **kwargs) == {expected}
    assert "_unsee_step" not in vars(tiny_sd)
    assert _seen_in_callback(tiny_sd, guidance_scale=3.0) == {(3.0, True)}, "a plain call afterwards is diffusers'"


def test_non_finite_guidance_scale_is_refused_before_work(tiny_sd):
    with pytest.raises(GuidanceError, match="guidance_scale must be a finite number"):
        run(tiny_sd, guidance_scale=float("nan"), guidance=[CFGpp(0.6)])


# ---------------------------------------------------------------- items 3 and 6: nothing outlives the call; diagnostics
def test_a_guided_call_leaves_nothing_on_the_pipeline(tiny_sd, monkeypatch):
    run(tiny_sd, guidance_scale=5.0)  # diffusers' own per-call attributes exist from here on
    before = set(vars(tiny_sd))
    states = []
    original = GuidedStep.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        states.append(weakref.ref(self))

    monkeypatch.setattr(GuidedStep, "__init__", remember)
    output = tiny_sd(PROMPT, negative_prompt="circle", guidance_scale=5.0, generator=seeded(0), **K,
                     guidance=[PAG(3.0), NASA(0.3), NegativeSteer(mode="adaptive")])
    assert set(vars(tiny_sd)) == before
    del output
    gc.collect()
    assert len(states) == 1 and states[0]() is None, "the call's state (embeddings, NASA's key/value cache) is freed"


def test_the_guidance_report_counts_one_unet_call_per_step(tiny_sd):
    output = tiny_sd(PROMPT, negative_prompt="blue", guidance_scale=5.0, generator=seeded(0), **K,
                     guidance=[PAG(3.0), NASA(0.3)])
    report = output.guidance_report
    assert report.unet_calls == report.steps == K["num_inference_steps"]
    assert report.negative_start_steps is None and report.dng_posterior is None


# ---------------------------------------------------------------- item 4: clip_skip
@BUILDERS
def test_negative_steering_rows_are_diffusers_rows_under_clip_skip(build):
    pipe = build()
    never = run(pipe, negative_prompt="blue", guidance_scale=5.0, clip_skip=1,
                guidance=[NegativeSteer(start_step=K["num_inference_steps"])])
    assert (never - run(pipe, guidance_scale=5.0, clip_skip=1)).abs().max() <= 1e-6
    first = run(pipe, negative_prompt="blue", guidance_scale=5.0, clip_skip=1, guidance=[NegativeSteer(start_step=0)])
    assert torch.equal(first, run(pipe, negative_prompt="blue", guidance_scale=5.0, clip_skip=1))


@BUILDERS
def test_nasa_encodes_its_negative_as_the_prompt_is_encoded(build):
    pipe = build()
    captured = []
    encode = pipe._unsee_encode

    def spy(texts, device, num_images_per_prompt, clip_skip=None):
        embeds = encode(texts, device, num_images_per_prompt, clip_skip)
        captured.append(embeds[0])
        return embeds

    pipe._unsee_encode = spy
    skipped = run(pipe, negative_prompt="blue", guidance_scale=5.0, clip_skip=1, guidance=[NASA(0.5)])
    def encoded(**kwargs):
        return pipe.encode_prompt(prompt="blue", device=pipe.device, num_images_per_prompt=1,
                                  do_classifier_free_guidance=False, **kwargs)[0]

    assert torch.equal(captured[-1], encoded(clip_skip=1))
    assert not torch.equal(captured[-1], encoded()), "clip_skip matters here"
    assert (skipped - run(pipe, negative_prompt="blue", guidance_scale=5.0, guidance=[NASA(0.5)])).abs().max() > 1e-4


# ---------------------------------------------------------------- item 5: a start is a step or a fraction, by name
@pytest.mark.parametrize("value", [1, 1.0, 0.2])
def test_the_ambiguous_start_is_refused(value):
    with pytest.raises(GuidanceError, match="ambiguous: pass start_fraction=.*or start_step="):
        NegativeSteer(value)
    with pytest.raises(GuidanceError, match="ambiguous"):
        NegativeSteer(start=value)


def test_start_step_and_start_fraction_name_the_same_step(tiny_sd):
    def steer(**start):
        return run(tiny_sd, negative_prompt="blue", guidance_scale=5.0, guidance=[NegativeSteer(**start)])

    assert torch.equal(steer(start_step=1), steer(start_fraction=0.25))  # 0.25 of 4 steps is step 1
    assert not torch.equal(steer(start_step=1), steer(start_fraction=1.0)), "step 1 is not 'never'"
    assert NegativeSteer(start_step=1).first_step(4) == 1 and NegativeSteer(start_fraction=1.0).first_step(4) == 4
