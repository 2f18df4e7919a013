"""ANT on the tiny pipeline: the trajectory-split loss, the augmentation-enhanced saliency mask, LoRA output."""

import pytest
import torch

from unsee.erasure import ANTConfig, ANTTrainer, ConfigError, ant_lora_modules
from unsee.erasure.ant import augmentation_prompts
from unsee.erasure.saliency import top_fraction_mask
from unsee.testing import train_on_tiny_pipeline

TINY = dict(ddim_steps=4, before_step=2, saliency_iterations=1, saliency_seeds=[0], saliency_prompts=["circle"])


def _train(steps=1, **settings):
    trainer = ANTTrainer(ANTConfig(concept="circle", steps=steps, **{**TINY, **settings}))
    pipe, adapter, originals, final = train_on_tiny_pipeline(trainer)
    return pipe, trainer, adapter, originals, final


def test_top_fraction_keeps_the_largest_magnitudes():
    grad = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.0]])
    kept = top_fraction_mask(grad, 0.5)
    assert kept.tolist() == [[False, True, True], [True, False, False]]  # |g| 5, 2, 0.3: the official code keeps the others
    assert not top_fraction_mask(None, 0.5).any()


def test_initial_loss_is_the_erase_term_alone():
    # at the original weights the student is the teacher: the enhance term (eta = 1) and the unconditional terms
    # are exactly 0, and the erase term is (1 + eta)^2 * mean((eps(c) - eps(""))^2) on the same trajectory
    losses = {}
    for eta, enhance in [(1.0, 1.0), (1.0, 0.0), (2.0, 0.0)]:
        _, _, adapter, _, _ = _train(kind="lora", eta=eta, enhance_weight=enhance, uncond_weight=0.7)
        losses[eta, enhance] = adapter.training["loss_first"]
    assert losses[1.0, 1.0] > 0
    assert losses[1.0, 1.0] == pytest.approx(losses[1.0, 0.0], rel=1e-6)
    assert losses[2.0, 0.0] == pytest.approx(losses[1.0, 0.0] * 9 / 4, rel=1e-5)


def test_in_context_targets_reduce_to_the_papers_when_the_prompt_is_the_concept():
    # in context, eps*("") gives way to c_from less the concept's direction; with c_from = the concept itself that
    # is eps*("") again, so the loss is the bare concept's, term for term
    for eta in (1.0, 2.5):
        _, _, bare, _, _ = _train(kind="lora", eta=eta)
        _, _, own, _, _ = _train(kind="lora", eta=eta, erase_from=["circle"])
        assert own.training["loss_first"] == pytest.approx(bare.training["loss_first"], rel=1e-5)
        assert list(own.training["erase_from"]) == ["circle"]


def test_in_context_early_target_at_eta_1_keeps_the_drawn_prompt():
    # at eta 1 the early target is c_from's own frozen prediction, which the student matches at the original
    # weights: the enhance term adds nothing to the first loss; at eta 2 it does
    froms = ["a red circle", "a blue circle"]
    first = {}
    for eta in (1.0, 2.0):
        for enhance in (0.0, 1.0):
            _, _, adapter, _, _ = _train(kind="lora", eta=eta, enhance_weight=enhance, erase_from=froms)
            first[eta, enhance] = adapter.training["loss_first"]
    assert first[1.0, 0.0] > 0
    assert first[1.0, 1.0] == pytest.approx(first[1.0, 0.0], rel=1e-6)
    assert first[2.0, 1.0] > first[2.0, 0.0] * (1 + 1e-4)


@pytest.mark.parametrize("phase", ["early", "late"])
def test_keep_phase_picks_the_end_of_the_trajectory_that_is_kept(phase):
    # the paper keeps the first before_step steps; the official single-concept script the last ones
    _, trainer, _, _, _ = _train(kind="lora", keep_phase=phase, ddim_steps=6, before_step=2)
    timesteps = [int(t) for t in trainer.scheduler.timesteps]
    kept = timesteps[:2] if phase == "early" else timesteps[-2:]
    generator = torch.Generator().manual_seed(0)
    plus, minus = set(), set()
    for _ in range(16):
        _, t_plus, _, t_minus = trainer.sample_pair(trainer.prompts.concept, generator)
        plus.add(int(t_plus))
        minus.add(int(t_minus))
    assert plus == set(kept)
    assert minus == set(timesteps) - set(kept)


def test_single_augmentation_mask_keeps_half_of_each_tensor_and_the_rest_stays_bit_identical():
    pipe, trainer, adapter, originals, seen = _train(steps=3, lr=1e-2)
    with_grad = 0
    for name, mask in trainer.mask.items():
        if mask.any():
            with_grad += 1
            assert int(mask.sum()) == int(0.5 * mask.numel()), name  # per tensor, as the paper's mask
            key = f"unet.{name}"
            assert key in adapter.tensors and not adapter.tensors[key][~mask].any()
        assert torch.equal(seen[name][~mask], originals[name][~mask]), name
    assert with_grad > 0.5 * len(trainer.mask)
    assert any(not torch.equal(seen[n], originals[n]) for n in trainer.mask)
    assert all(torch.equal(p, originals[n]) for n, p in pipe.unet.named_parameters())  # the pipeline is handed back
    pipe.load_erasure(adapter)
    pipe.unload_erasure()


def test_mask_is_the_intersection_over_augmentations():
    _, one, _, _, _ = _train(steps=1)
    _, many, _, _, _ = _train(steps=1, saliency_seeds=[0, 1], saliency_prompts=["circle", "ball"])
    kept_one = sum(int(m.sum()) for m in one.mask.values())
    kept_many = sum(int(m.sum()) for m in many.mask.values())
    assert 0 < kept_many < kept_one
    for name, mask in many.mask.items():
        assert not (mask & ~one.mask[name]).any()  # every augmentation's mask contains the intersection


def test_lora_adapter_covers_the_blocks_and_loads_back():
    pipe, _, adapter, originals, _ = _train(steps=2, kind="lora", rank=2, lr=1e-2)
    modules = ant_lora_modules(pipe.unet)
    assert modules and all(m.split(".")[0] in ("down_blocks", "mid_block", "up_blocks") for m in modules)
    assert adapter.kind == "lora"
    assert all(torch.equal(p, originals[n]) for n, p in pipe.unet.named_parameters())
    generator = torch.Generator().manual_seed(0)
    before = pipe("a circle", num_inference_steps=2, generator=generator, output_type="np").images
    pipe.load_erasure(adapter)
    after = pipe("a circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.unload_erasure()
    assert not (before == after).all()


def test_augmentation_prompts_default_to_the_concept_and_its_synonyms():
    # the toy world's synonyms only as the toy preset's saliency_prompts (for the toy model); the concept alone otherwise
    from unsee.toy.presets import preset_settings

    toy = preset_settings("toy", "ant", model="toy", concept="circle")
    assert augmentation_prompts(ANTConfig(concept="circle", saliency_prompts=toy["saliency_prompts"])) == [
        "circle", "ball", "disc"]
    assert augmentation_prompts(ANTConfig(concept="circle")) == ["circle"]
    assert augmentation_prompts(ANTConfig(concept="Van Gogh")) == ["Van Gogh"]
    assert augmentation_prompts(ANTConfig(concept="circle", saliency_prompts=["a"])) == ["a"]
    assert augmentation_prompts(ANTConfig(concept="dog", saliency_prompts=["a {concept}", "{concept}"])) == [
        "a dog", "dog"]


@pytest.mark.parametrize("settings, field", [
    (dict(before_step=0), "before_step"), (dict(before_step=50), "before_step"), (dict(kind="full"), "kind"),
    (dict(mask_fraction=0), "mask_fraction"), (dict(saliency_seeds=[]), "saliency_seeds"),
    (dict(saliency_prompts="circle"), "saliency_prompts"), (dict(eta=-1), "eta"), (dict(parameters="x"), "parameters"),
    (dict(erase_from=["a circle", ""]), "erase_from"), (dict(keep_phase="middle"), "keep_phase"),
])
def test_invalid_config_fails_before_any_work(settings, field):
    with pytest.raises(ConfigError, match=field):
        ANTConfig(concept="circle", **settings)


def test_jobs_keep_the_mask_next_to_masked_adapters_only(tmp_path):
    from unsee.jobs import plan_jobs

    jobs, _ = plan_jobs({"out_dir": str(tmp_path), "jobs": [
        {"method": ["ant", "salun"], "concept": "circle"},
        {"method": ["ant", "esd-u"], "concept": "red", "kind": "lora"}]})
    paths = {(job.method, job.config.concept): job.mask_path for job in jobs}
    assert paths[("ant", "circle")] == tmp_path / "ant-circle.mask.safetensors"
    assert paths[("salun", "circle")] == tmp_path / "salun-circle.mask.safetensors"
    assert paths[("ant", "red")] is None and paths[("esd-u", "red")] is None  # LoRA adapters have no mask
