"""The embedded toy model and its judge (weights/). Marked `toy`: these load the real weights."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import unsee
from unsee import toy
from unsee.toy import world
from unsee.toy.judge import Judge
from unsee.toy.model import JUDGE_PATH, TOY_MODEL_DIR

# The shipped weights are built by scripts/train_toy.py (issue 3); until they are in weights/, these tests
# cannot run. They switch on by themselves once weights/toy and weights/judge.safetensors exist.
pytestmark = [
    pytest.mark.toy,
    pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").is_file() or not JUDGE_PATH.is_file(),
                       reason="the toy model is not shipped yet: build it with scripts/train_toy.py"),
]


@pytest.fixture(scope="module")
def toy_pipe():
    pipe = unsee.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


def test_toy_model_loads_offline_with_plain_diffusers():
    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    size_mb = sum(p.stat().st_size for p in TOY_MODEL_DIR.rglob("*") if p.is_file()) / 2**20
    assert size_mb + JUDGE_PATH.stat().st_size / 2**20 <= 20


def test_load_pipeline_toy_is_our_sd_subclass(toy_pipe):
    assert type(toy_pipe) is unsee.UnseeStableDiffusionPipeline
    image = toy_pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_judge_is_at_least_99_percent_accurate_on_fresh_renders(judge):
    rng = np.random.default_rng(12345)  # not a seed used in training
    scenes = [world.sample_scene(rng) for _ in range(600)]
    predictions = judge.predict(np.stack([world.render(s) for s in scenes]))
    for name in world.ATTRIBUTES:
        pairs = [(getattr(s, name), p[name]) for s, p in zip(scenes, predictions)
                 if s.shape != world.NO_SHAPE or name in ("shape", "background")]
        accuracy = sum(a == b for a, b in pairs) / len(pairs)
        assert accuracy >= 0.99, (name, accuracy)


def test_quick_quality_check(toy_pipe, judge):
    """32 samples, 25 DDIM steps, CFG 5: thresholds a little under the 90% bar of BENCHMARKS.md."""
    prompts = world.attribute_prompts(seed=2024, n=32)
    result = toy.evaluate(toy_pipe, prompts, judge=judge.predict, n=32, seed=0)
    for name in ("shape", "color", "background"):
        assert result.accuracy[name] >= 0.8, result.accuracy


def test_example_adapters_load_erase_their_concept_and_the_demo_lists_them(toy_pipe, judge, tmp_path):
    from unsee.adapters import load_adapter
    from unsee.apps.demo import DemoApp
    from unsee.toy.model import EXAMPLE_ADAPTERS_DIR

    files = sorted(EXAMPLE_ADAPTERS_DIR.glob("*.safetensors"))
    assert [f.name for f in files] == ["esd-x-circle.safetensors", "esd-x-red.safetensors", "esd-x-striped.safetensors",
                                    "spm-circle.safetensors"]
    for path in files[:3]:  # the ESD-x ones; the SPM has its own test below
        (concept,) = load_adapter(path).concepts
        before = toy.evaluate(toy_pipe, concept=concept, n=16, seed=5, judge=judge.predict)
        name = toy_pipe.load_erasure(path)
        after = toy.evaluate(toy_pipe, concept=concept, n=16, seed=5, judge=judge.predict)
        toy_pipe.unload_erasure(name)
        assert before.presence >= 0.9 and after.presence <= 0.3, (concept, before.presence, after.presence)
    app = DemoApp(pipe=toy_pipe, model="toy", workdir=tmp_path)
    assert {f"example-{f.name}" for f in files} <= set(app.adapter_names())


def test_an_spm_trained_on_the_toy_model_erases_on_a_fine_tune_of_it_without_retraining(toy_pipe, judge):
    """Issue 5: SPM transfer. The shipped SPM (trained on the toy model) on a fine-tune that draws stripes."""
    from unsee.toy.model import EXAMPLE_ADAPTERS_DIR, fine_tune

    variant = unsee.load_pipeline("toy")  # a copy of its own: the fine-tune changes its UNet in place
    variant.set_progress_bar_config(disable=True)
    style_open = world.attribute_prompts(seed=7, n=16)  # shape, colour and background named, style left open

    def striped_share() -> float:
        images = unsee.evaluation.generate_images(variant, style_open, seed=3, num_inference_steps=25,
                                                  guidance_scale=5.0)
        return float(np.mean([p["style"] == "striped" for p in judge.predict(images)]))

    striped_before = striped_share()
    base = {k: v.clone() for k, v in variant.unet.state_dict().items()}
    losses = fine_tune(variant, steps=40, lr=2e-4, batch_size=8, seed=0, style="striped")
    assert len(losses) == 40 and all(np.isfinite(losses))
    changed = sum((v - base[k]).norm() ** 2 for k, v in variant.unet.state_dict().items()) ** 0.5
    assert changed / sum(v.norm() ** 2 for v in base.values()) ** 0.5 > 1e-3
    assert striped_share() >= striped_before + 0.25  # the fine-tune departs from its base

    spm = EXAMPLE_ADAPTERS_DIR / "spm-circle.safetensors"

    def presence(pipe, erased: bool) -> float:
        name = pipe.load_erasure(spm) if erased else None
        try:
            return toy.evaluate(pipe, concept="circle", n=16, seed=1234, judge=judge.predict).presence
        finally:
            if name:
                pipe.unload_erasure(name)

    before, after = presence(variant, erased=False), presence(variant, erased=True)
    on_its_own_model = presence(toy_pipe, erased=True)
    # it erases on the fine-tune as on the model it was trained on: to the bar of at most 15% presence
    # (measured: 0% on both, at evaluation seeds 1234 and 5)
    assert before >= 0.9 and on_its_own_model <= 0.15, (before, on_its_own_model)
    assert after <= 0.15, (after, on_its_own_model)
