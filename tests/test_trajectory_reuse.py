"""Trajectory reuse (issue 25 item 5): one sampled DDIM trajectory serves ``trajectory_reuse`` consecutive steps of
ESD, SPM, ANT and AdvUnlearn. The default (1) is the trainers' behaviour before the setting existed, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from unsee.erasure import ConfigError, ESDConfig, ESDTrainer, load_checkpoint, make_trainer
from unsee.erasure.base import encode_prompts
from unsee.erasure.sampling import ddim_latents, ddim_sample
from unsee.testing import tiny_sd_pipeline

#: method -> small settings that exercise its draws (prompts in context, preserved prompts, retain prompts)
METHODS = {
    "esd-x": dict(ddim_steps=4, erase_from=["a red circle", "circle on black"], preserve=["a square", "a red heart"]),
    "spm": dict(ddim_steps=4, anchors=2),
    "ant": dict(ddim_steps=5, before_step=2, saliency_iterations=1, saliency_seeds=[0]),
    "advunlearn": dict(ddim_steps=3, retain_prompts=["a red heart", "a blue square"], retain_batch=2, warmup=1,
                       attack_steps=2),
}
#: the losses of the first 2 steps (lr 1e-3, seed 0) with the code before trajectory_reuse existed, on the tiny
#: weights of tests/test_mass_erasure.py's PINNED_WEIGHTS_SUM
BEFORE = {
    "esd-x": [0.00015643981168977916, 0.0002124608145095408],
    "spm": [0.0007221026462502778, 0.0013222498819231987],
    "ant": [0.0005895077483728528, 0.06711640954017639],
    "advunlearn": [0.0008515312219969928, 0.0006073645781725645],
}
PINNED_WEIGHTS_SUM = 1549.6240573654438
#: each method's module (where its ddim_latents is looked up) and its DDIM runs per trajectory
SAMPLER = {"esd-x": ("esd", 1), "spm": ("spm", 1), "ant": ("ant", 1), "advunlearn": ("advunlearn", 2)}


def _train(method: str, pipe=None, _train=None, **settings):
    """Train ``method`` 3 steps on the tiny pipeline (``_train``: keyword arguments of ``train``)."""
    merged = {**METHODS[method], "concept": "circle", "steps": 3, "lr": 1e-3, "device": "cpu", **settings}
    return make_trainer(method, **merged).train(pipe if pipe is not None else tiny_sd_pipeline(), **(_train or {}))


def _same(a, b) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_default_is_the_run_without_the_setting_and_the_run_before_it(method):
    pipe = tiny_sd_pipeline()  # handed back as it came: both runs train on it
    without = _train(method, pipe, steps=2)
    explicit = _train(method, pipe, steps=2, trajectory_reuse=1)
    assert _same(without, explicit) and without.training["losses"] == explicit.training["losses"]
    assert without.hyperparameters["trajectory_reuse"] == 1
    weights_sum = sum(float(t.double().sum()) for m in (pipe.unet, pipe.text_encoder, pipe.vae)
                      for t in m.state_dict().values())
    if weights_sum == pytest.approx(PINNED_WEIGHTS_SUM, rel=1e-9):  # other library releases build other weights
        # the pins were taken with 1 thread; 2 threads sum in another order (advunlearn: 1.4e-5 relative, the same
        # with the code before the setting existed)
        assert without.training["losses"] == pytest.approx(BEFORE[method], rel=1e-4)


@pytest.mark.parametrize("method, reuse", [("esd-x", 2), ("esd-x", 3), ("spm", 2), ("ant", 3), ("advunlearn", 2)])
def test_reuse_k_samples_one_trajectory_per_k_steps(method, reuse, monkeypatch):
    import importlib

    module_name, runs = SAMPLER[method]
    module = importlib.import_module(f"unsee.erasure.{module_name}")
    stops = []

    def counting(*args, **kwargs):
        stops.append(list(args[6]))
        return ddim_latents(*args, **kwargs)

    monkeypatch.setattr(module, "ddim_latents", counting)
    steps = 4
    settings = {"kind": "lora"} if method == "ant" else {}  # no saliency mask: its runs are not training steps
    adapter = _train(method, steps=steps, trajectory_reuse=reuse, **settings)
    assert len(adapter.training["losses"]) == steps
    assert len(stops) == math.ceil(steps / reuse) * runs
    stops_per_step = 2 if method == "ant" else 1  # ANT trains at a pair of stops (x+ and x-)
    assert all(len(s) == reuse * stops_per_step for s in stops)  # every trajectory holds a stop per step it serves
    assert adapter.hyperparameters["trajectory_reuse"] == reuse


def test_the_steps_of_a_trajectory_share_its_prompts_and_concept_cycles_go_by_trajectory():
    seen = []

    def record(trainer):
        original = trainer.loss

        def loss(x_t, t, cond_student=None, x_keep=None, cond_keep=None, **kwargs):
            seen.append((trainer.prompts.concept.embeds.sum().item(), cond_student.embeds.sum().item(),
                         cond_keep.embeds.sum().item()))
            return original(x_t, t, cond_student, x_keep, cond_keep, **kwargs)

        trainer.loss = loss
        return trainer

    trainer = record(make_trainer("esd-x", concept="circle", concepts=["star"], steps=4, lr=1e-3, device="cpu",
                                  trajectory_reuse=2, **METHODS["esd-x"]))
    adapter = trainer.train(tiny_sd_pipeline())
    assert seen[0] == seen[1] and seen[2] == seen[3]  # the two steps of a trajectory: the same prompts
    assert adapter.training["concept_draws"] == {"circle": 2, "star": 2}  # balanced over the trajectories
    assert len({s[0] for s in seen}) == 2


@pytest.mark.parametrize("method, settings", [
    ("esd-x", {"draws_per_step": 2}),
    ("advunlearn", {"attack_init": "latest"}),  # a carried draw state besides the trajectory
])
def test_a_resumed_run_equals_an_uninterrupted_one(method, settings, tmp_path):
    straight = _train(method, steps=4, trajectory_reuse=3, **settings)
    pipe = tiny_sd_pipeline()
    _train(method, pipe, steps=2, trajectory_reuse=3, checkpoint_every=1, _train={"checkpoint_dir": tmp_path},
           **settings)  # stops inside the first trajectory (steps 0-2)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["step"] == 2 and len(checkpoint["trajectories"]) == len(checkpoint["rng"]["generators"])
    resumed = _train(method, pipe, steps=4, trajectory_reuse=3, _train={"checkpoint_dir": tmp_path, "resume": True},
                     **settings)
    assert resumed.training["resumed_from_step"] == 2
    assert resumed.training["losses"] == straight.training["losses"] and _same(resumed, straight)


def test_checkpoints_hold_trajectories_only_with_reuse_and_the_value_must_match_on_resume(tmp_path):
    _train("esd-x", steps=1, checkpoint_every=1, _train={"checkpoint_dir": tmp_path / "one"})
    assert "trajectories" not in load_checkpoint(tmp_path / "one")
    _train("esd-x", steps=1, trajectory_reuse=2, _train={"checkpoint_dir": tmp_path / "two"})
    with pytest.raises(ConfigError, match=r"trajectory_reuse=2 there, 1 here"):
        _train("esd-x", steps=2, _train={"checkpoint_dir": tmp_path / "two", "resume": True})


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "two", None])
def test_a_bad_value_is_refused_naming_the_field(bad):
    with pytest.raises(ConfigError, match=r"^trajectory_reuse must be a positive integer") as error:
        ESDConfig(concept="circle", trajectory_reuse=bad)
    assert len(str(error.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="trajectory_reuse must be from 1 to 1000, got 1001"):
        make_trainer("spm", concept="circle", trajectory_reuse=1001)
    assert make_trainer("ant", concept="circle", trajectory_reuse="4").config.trajectory_reuse == 4  # --set's text
    with pytest.raises(ConfigError, match="salun has no setting 'trajectory_reuse'"):
        make_trainer("salun", concept="circle", trajectory_reuse=2)


class _CountingESD(ESDTrainer):
    """ESD counting its teacher calls; ``cache=False`` forgets the teacher's predictions kept in each trajectory."""

    cache = True

    def frozen_predictions(self, *args, **kwargs):
        self.teacher_calls = getattr(self, "teacher_calls", 0) + 1
        return super().frozen_predictions(*args, **kwargs)

    def trajectory(self, step, sample):
        trajectory, place = super().trajectory(step, sample)
        self.served = getattr(self, "served", []) + [(trajectory.number, trajectory.stops[place][0],
                                                       max(s[0] for s in trajectory.stops))]
        if not self.cache:
            trajectory.frozen.clear()
        return trajectory, place


def _counting(cache: bool, steps: int = 8, **settings) -> tuple:
    trainer = _CountingESD(ESDConfig(concept="circle", variant="esd-x", steps=steps, lr=1e-3, device="cpu",
                                     ddim_steps=4, trajectory_reuse=4, **settings))
    trainer.cache = cache
    return trainer, trainer.train(tiny_sd_pipeline())


def _assert_kept_as_asked_one_stop_at_a_time(trainer, preserve, erase_from=False):
    """Each stop's kept teacher predictions are those a call for that stop alone gives, to rounding."""
    trajectory = next(iter(trainer._trajectories.values()))
    assert trajectory.frozen.keys() == {s[0] for s in trajectory.stops}
    student = trainer.prompts.student(trajectory.draws["student"]) if erase_from else trainer.prompts.concept
    for k, kept in trajectory.frozen.items():
        x, batch = trajectory.latents[k], 1
        fresh = trainer.frozen_predictions(x[:batch], trainer.scheduler.timesteps[k], student,
                                           x[batch:] if preserve else None,
                                           trainer.cond_preserve[trajectory.draws["keep"]] if preserve else None)
        assert fresh.keys() == kept.keys()
        for name, value in fresh.items():
            assert (value is None) == (kept[name] is None)
            if value is not None:
                assert torch.allclose(value, kept[name], rtol=1e-5, atol=1e-6), (k, name)


@pytest.mark.parametrize("preserve", [(), ("a square", "a red heart")])
def test_a_run_asks_the_teacher_once_for_all_its_stops(preserve):
    trainer, adapter = _counting(True, preserve=preserve)
    again, recomputed = _counting(False, preserve=preserve)
    assert trainer.served == again.served and len(trainer.served) == 8
    # 8 steps at 4 per run: 2 runs, one teacher call each, whatever stops they drew
    assert trainer.teacher_calls == len({number for number, _, _ in trainer.served}) == 2
    assert again.teacher_calls == 8
    # the teacher's weights never change: the kept predictions are the ones it gives again, bit for bit
    assert adapter.training["losses"] == recomputed.training["losses"] and _same(adapter, recomputed)
    # several stops in one batch: what one call per stop gives, to rounding
    _assert_kept_as_asked_one_stop_at_a_time(trainer, preserve)


@pytest.mark.parametrize("preserve", [(), ("a square", "a red heart")])
def test_a_frozen_sampler_serves_as_the_teacher_at_the_stops_it_steps_on_from(preserve):
    trainer, adapter = _counting(True, sample_with="frozen", preserve=preserve)
    again, recomputed = _counting(False, sample_with="frozen", preserve=preserve)
    assert trainer.served == again.served
    # only the deepest stop of each run asks the teacher (the run never predicted there)
    assert trainer.teacher_calls == len({number for number, _, _ in trainer.served}) < again.teacher_calls == 8
    # the sampler's batch is not the teacher's, so the predictions agree to rounding, not bit for bit
    assert adapter.training["losses"] == pytest.approx(recomputed.training["losses"], rel=1e-5)
    # the run's own predictions (every stop but the deepest) and the teacher's (the deepest) cover every stop
    _assert_kept_as_asked_one_stop_at_a_time(trainer, preserve)


def test_in_context_the_frozen_sampler_leaves_the_teacher_to_the_teacher():
    trainer, _ = _counting(True, steps=4, sample_with="frozen", erase_from=["a red circle", "circle on black"])
    # the run sampled from c_from, not from the concept: every stop's predictions come from the teacher, in one call
    assert len({k for _, k, _ in trainer.served}) > 1 and trainer.teacher_calls == 1
    _assert_kept_as_asked_one_stop_at_a_time(trainer, (), erase_from=True)


def test_one_run_keeps_the_latents_ddim_sample_stops_at():
    from diffusers import DDIMScheduler

    pipe = tiny_sd_pipeline()
    cond = encode_prompts(pipe, ["circle", ""], 32, 32)
    c, empty = cond.rows([0]), cond.rows([1])
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(5)
    size = pipe.unet.config.sample_size
    noise = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    kept = ddim_latents(pipe.unet, scheduler, noise, c, empty, 3.0, [3, 0, 2, 3, 5])
    assert sorted(kept) == [0, 2, 3, 5]
    for k, x in kept.items():
        assert torch.equal(x, ddim_sample(pipe.unet, scheduler, noise, c, empty, 3.0, stop_at=k))
    assert torch.equal(kept[5], ddim_sample(pipe.unet, scheduler, noise, c, empty, 3.0))
    tail = ddim_latents(pipe.unet, scheduler, kept[2], c, empty, 3.0, [4], start_at=2)[4]
    assert torch.equal(tail, ddim_sample(pipe.unet, scheduler, kept[2], c, empty, 3.0, stop_at=4, start_at=2))
    with pytest.raises(ValueError, match="not DDIM step indices"):
        ddim_latents(pipe.unet, scheduler, noise, c, empty, 3.0, [6])
