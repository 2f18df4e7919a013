"""The trainer contract: config validation, checkpoints and resume, NaN handling, scripted jobs, the CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from PIL import Image

from unsee.adapters import load_adapter
from unsee.cli import main
from unsee.erasure import (
    ConfigError,
    ESDConfig,
    ESDTrainer,
    SalUnConfig,
    TrainingError,
    esd_parameters,
    load_checkpoint,
    make_trainer,
)
from unsee.jobs import plan_jobs, run_jobs
from unsee.testing import tiny_sd_pipeline



# ------------------------------------------------------------------------------ invalid configs


@pytest.mark.parametrize("make, message", [
    (lambda: ESDConfig(concept="circle", variant="esd-q"), "unknown ESD variant"),
    (lambda: ESDConfig(concept="circle", lr=0), "lr"),
    (lambda: ESDConfig(concept="circle", lr=-1e-5), "lr"),
    (lambda: ESDConfig(concept="circle", lr=float("nan")), "lr"),
    (lambda: ESDConfig(concept=""), "concept"),
    (lambda: ESDConfig(concept="   "), "concept"),
    (lambda: ESDConfig(concept="circle", steps=0), "steps"),
    (lambda: ESDConfig(concept="circle", kind="full"), "kind"),
    (lambda: ESDConfig(concept="circle", eta=float("inf")), "eta"),
    (lambda: SalUnConfig(concept="", num_forget=2), "concept"),
    (lambda: SalUnConfig(concept="circle", lr=0), "lr"),
    (lambda: make_trainer("esd-q", concept="circle"), "unknown method"),
    (lambda: make_trainer("salun", concept="circle", eta=1.0), "no setting 'eta'"),
])
def test_invalid_config_is_a_clear_error(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
    assert issubclass(ConfigError, ValueError)


class _Untouchable:
    """A stand-in pipeline that fails the test if anything reads from it."""

    def __getattr__(self, name):
        raise AssertionError(f"the trainer touched pipe.{name} before validating its config")


def test_invalid_config_fails_before_any_work():
    trainer = ESDTrainer(ESDConfig(concept="circle"))
    trainer.config.lr = 0.0  # changed after construction: train() validates again before anything else
    with pytest.raises(ConfigError, match="lr"):
        trainer.train(_Untouchable())
    trainer.config.lr, trainer.config.variant = 1e-5, "esd-z"
    with pytest.raises(ConfigError, match="variant"):
        trainer.train(_Untouchable())


def test_job_plans_are_validated_before_loading_anything(tmp_path):
    with pytest.raises(ConfigError, match="esd-u has no setting 'etaa'"):
        plan_jobs({"method": "esd-u", "concept": "circle", "etaa": 1})
    with pytest.raises(ConfigError, match="unknown setting 'etaa'"):
        plan_jobs({"etaa": 1, "jobs": [{"method": "esd-u", "concept": "circle"}]})
    with pytest.raises(ConfigError, match="applies to none of the jobs"):
        plan_jobs({"eta": 1, "jobs": [{"method": "salun", "concept": "circle"}]})
    with pytest.raises(ConfigError, match="salun has no setting 'erase_from'"):
        plan_jobs({"jobs": [{"method": "salun", "concept": "circle", "erase_from": "red"}]})
    with pytest.raises(ConfigError, match="two jobs write"):
        plan_jobs({"method": ["esd-u", "esd-x"], "concept": "circle", "out": str(tmp_path / "a.safetensors")})
    with pytest.raises(ConfigError, match="job 2 .*lr"):
        plan_jobs({"jobs": [{"method": "esd-u", "concept": "circle"}, {"method": "esd-x", "concept": "red", "lr": -1}]})
    jobs, report = plan_jobs({"method": ["esd-u", "salun"], "concept": ["circle", "red"], "eta": 2, "lr": "1e-4",
                              "out_dir": str(tmp_path)})
    assert [(j.method, j.config.concept) for j in jobs] == [
        ("esd-u", "circle"), ("salun", "circle"), ("esd-u", "red"), ("salun", "red")]
    assert jobs[0].config.eta == 2 and all(j.config.lr == 1e-4 for j in jobs)  # YAML-style "1e-4" is a number
    assert report == tmp_path / "erase-report.json"
    assert list(tmp_path.iterdir()) == []


def test_job_presets_toy_for_the_toy_model_paper_otherwise_and_flags_win(tmp_path):
    from unsee.toy.presets import TOY_PRESETS

    (toy_job,), _ = plan_jobs({"method": "esd-u", "concept": "circle", "out_dir": str(tmp_path)})
    assert toy_job.config.steps == TOY_PRESETS["esd-u"]["steps"] and toy_job.config.lr == TOY_PRESETS["esd-u"]["lr"]
    (hub_job,), _ = plan_jobs({"method": "esd-u", "concept": "circle", "model": "some/model"})
    assert (hub_job.config.steps, hub_job.config.lr) == (ESDConfig.steps, ESDConfig.lr)  # the paper's values
    (paper_job,), _ = plan_jobs({"method": "esd-u", "concept": "circle", "preset": "paper"})
    assert paper_job.config.steps == ESDConfig.steps
    (mixed,), _ = plan_jobs({"method": "salun", "concept": "circle", "steps": 7})
    assert mixed.config.steps == 7 and mixed.config.num_forget == TOY_PRESETS["salun"]["num_forget"]
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        plan_jobs({"method": "esd-u", "concept": "circle", "preset": "fast"})


def test_toy_preset_puts_esd_in_the_worlds_context(tmp_path):
    from unsee.toy import world
    from unsee.toy.presets import preset_settings

    settings = preset_settings("toy", "esd-x", concept="striped")
    assert len(settings["erase_from"]) == 16 and len(settings["preserve"]) == 10
    assert all(world.parse_prompt(p).get("style") == "striped" for p in settings["erase_from"])
    assert all(world.parse_prompt(p).get("style") == "solid" for p in settings["preserve"])
    assert "erase_from" not in preset_settings("toy", "esd-x", concept="a cat")  # not a world concept
    assert "erase_from" not in preset_settings("toy", "salun", concept="circle")
    assert "erase_from" not in preset_settings("paper", "esd-x", concept="circle")
    # a job's own erase_from wins over the preset's; the preset's prompt list adds nothing to the file name
    assert preset_settings("toy", "esd-x", concept="red")["lr"] != settings["lr"]  # by attribute
    assert "erase_from" not in preset_settings("toy", "esd-x", concept="red")
    esd_u = preset_settings("toy", "esd-u", concept="circle")  # ESD-u: every world concept in context
    assert all(world.parse_prompt(p).get("shape") == "circle" for p in esd_u["erase_from"])
    assert all(world.parse_prompt(p).get("shape") not in (None, "circle") for p in esd_u["preserve"])
    assert "erase_from" not in preset_settings("toy", "esd-u", concept="a cat")
    for method, count in (("spm", 16), ("advunlearn", 48)):  # in context, nothing preserved (AdvUnlearn retains)
        in_context = preset_settings("toy", method, concept="circle")
        assert len(in_context["erase_from"]) == count and "preserve" not in in_context
        assert all(world.parse_prompt(p).get("shape") == "circle" for p in in_context["erase_from"])
        assert "erase_from" not in preset_settings("toy", method, concept="a cat")
    # a style needs SPM's and ESD-u's stronger erase targets; shapes keep the preset's
    spm_style, spm_shape = (preset_settings("toy", "spm", concept=c)["guidance"] for c in ("striped", "circle"))
    assert spm_style > spm_shape == preset_settings("toy", "spm")["guidance"]
    esd_style, esd_shape = (preset_settings("toy", "esd-u", concept=c)["eta"] for c in ("striped", "circle"))
    assert esd_style > esd_shape == preset_settings("toy", "esd-u")["eta"]
    (job,), _ = plan_jobs({"method": "esd-x", "concept": "striped", "out_dir": str(tmp_path)})
    assert job.config.erase_from == tuple(settings["erase_from"]) and job.config.lr == settings["lr"]
    assert job.out.name == "esd-x-striped.safetensors"
    (own,), _ = plan_jobs({"method": "esd-x", "concept": "striped", "erase_from": "star", "lr": 1e-3,
                           "out_dir": str(tmp_path)})
    assert (own.config.erase_from, own.config.lr) == ("star", 1e-3)
    assert own.out.name == "esd-x-striped-from-star.safetensors"


# ------------------------------------------------------------------------------ NaN and checkpoints

FAST = dict(concept="circle", variant="esd-x", lr=1e-2, ddim_steps=3, checkpoint_every=2)


class _NaNAtStep5(ESDTrainer):
    def training_step(self, step):
        loss = super().training_step(step)
        return loss * float("nan") if step == 4 else loss


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    pipe = tiny_sd_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(TrainingError, match=r"loss became nan at step 5 of 8.*checkpoint"):
        _NaNAtStep5(ESDConfig(steps=8, **FAST)).train(pipe, checkpoint_dir=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())  # weights restored
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["step"] == 4 and len(checkpoint["losses"]) == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["trained"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # the kept checkpoint resumes
    adapter = ESDTrainer(ESDConfig(steps=6, **FAST)).train(pipe, checkpoint_dir=tmp_path, resume=True)
    assert adapter.training["resumed_from_step"] == 4 and len(adapter.training["losses"]) == 6


def test_nan_weights_are_never_checkpointed(tmp_path):
    pipe = tiny_sd_pipeline()
    name = next(iter(esd_parameters(pipe.unet, "esd-x")))

    def poison(event):
        if event.phase == "train" and event.step == 4:  # right before the step-4 checkpoint
            dict(pipe.unet.named_parameters())[name].data[0] = float("nan")

    with pytest.raises(TrainingError, match="trained weights became nan"):
        ESDTrainer(ESDConfig(steps=8, **FAST)).train(pipe, progress=poison, checkpoint_dir=tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint["step"] == 2 and all(torch.isfinite(t).all() for t in checkpoint["trained"].values())
    assert torch.isfinite(dict(pipe.unet.named_parameters())[name]).all()


def test_resume_refuses_a_checkpoint_with_other_settings(tmp_path):
    pipe = tiny_sd_pipeline()
    ESDTrainer(ESDConfig(steps=2, **FAST)).train(pipe, checkpoint_dir=tmp_path)
    # eta changes what the checkpoint's weights were trained towards (lr may change: tests/test_trainer_defects.py)
    with pytest.raises(ConfigError, match="other settings.*eta"):
        ESDTrainer(ESDConfig(steps=4, eta=2.0, **FAST)).train(pipe, checkpoint_dir=tmp_path, resume=True)


_KILLED_RUN = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from unsee.jobs import run_jobs
    folder, out, checkpoints = sys.argv[1:4]
    def slow(job, event):  # leaves time to kill the run between checkpoints
        if event.phase == "train":
            time.sleep(0.5)
    run_jobs({"model": folder, "method": "esd-x", "concept": "circle", "steps": 8, "ddim_steps": 3, "lr": 1e-2,
              "checkpoint_every": 2, "out": out, "checkpoint_dir": checkpoints, "grid": 0}, progress=slow)
""")


def _job(folder, out, checkpoints, resume=False):
    return {"model": str(folder), "method": "esd-x", "concept": "circle", "steps": 8, "ddim_steps": 3, "lr": 1e-2,
            "checkpoint_every": 2, "out": str(out), "checkpoint_dir": str(checkpoints), "resume": resume, "grid": 0}


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tiny_sd_folder, tmp_path):
    out, checkpoints = tmp_path / "esd.safetensors", tmp_path / "ckpt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tiny_sd_folder), str(out), str(checkpoints)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (checkpoints / "checkpoint.pt").exists():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            assert not out.exists()
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no partial adapter
    step = load_checkpoint(checkpoints)["step"]
    assert 2 <= step < 8

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed run: thread count changes float reductions, not the method
    try:
        resumed = run_jobs(_job(tiny_sd_folder, out, checkpoints, resume=True))
        run_jobs(_job(tiny_sd_folder, tmp_path / "straight.safetensors", tmp_path / "ckpt2"))
    finally:
        torch.set_num_threads(threads)
    assert resumed["jobs"][0]["resumed_from_step"] == step
    a, b = load_adapter(out), load_adapter(tmp_path / "straight.safetensors")
    assert set(a.tensors) == set(b.tensors)
    assert all(torch.allclose(a.tensors[k], b.tensors[k], rtol=0, atol=1e-6) for k in a.tensors)
    assert a.training["losses"] == pytest.approx(b.training["losses"], rel=1e-6)


# ------------------------------------------------------------------------------ CLI and scripted jobs


def test_cli_erase_writes_adapter_and_report(tiny_sd_folder, tmp_path):
    out = tmp_path / "adapters" / "circle.safetensors"
    code = main(["erase", "--method", "esd-x", "--concept", "circle", "--model", str(tiny_sd_folder), "--steps", "2",
                 "--lr", "1e-3", "--eta", "2", "--set", "ddim_steps=3", "--out", str(out), "--device", "cpu",
                 "--grid", "2"])
    assert code == 0
    adapter = load_adapter(out)
    assert adapter.method == "esd-x" and adapter.hyperparameters["eta"] == 2.0
    report = json.loads(out.with_suffix(".json").read_text())
    (job,) = report["jobs"]
    assert job["status"] == "done" and job["settings"]["steps"] == 2 and job["settings"]["ddim_steps"] == 3
    assert len(job["losses"]) == 2 and job["seconds"] > 0 and job["out"] == str(out)
    # the before/after grid: one column per prompt, before on top, after below
    assert Image.open(out.with_suffix(".grid.png")).size == (2 * 32, 2 * 32)
    assert job["grid"] == str(out.with_suffix(".grid.png"))
    # and nothing else: the default checkpoint folder is removed after success
    assert sorted(p.name for p in out.parent.iterdir()) == ["circle.README.md", "circle.grid.png", "circle.json",
                                                           "circle.safetensors"]
    assert job["card"] == str(out.parent / "circle.README.md")


@pytest.mark.parametrize("flags, message", [
    (["--method", "esd-q", "--concept", "circle"], "unknown method"),
    (["--method", "esd-u", "--concept", "circle", "--lr", "0"], "lr"),
    (["--method", "esd-u", "--concept", ""], "concept"),
    (["--method", "esd-u"], "--concept"),
    (["--method", "salun", "--concept", "circle", "--eta", "2"], "no setting 'eta'"),
    (["--method", "esd-u", "--concept", "circle", "--kind", "full"], "kind"),
    (["--method", "esd-u", "--concept", "circle", "--out", "x.pt"], ".safetensors"),
    (["--method", "esd-u", "--concept", "circle", "--set", "nonsense"], "KEY=VALUE"),
    (["--config", "jobs.yaml", "--method", "esd-u"], "put --method there"),
])
def test_cli_erase_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.yaml").write_text("method: esd-u\nconcept: circle\n")
    assert main(["erase", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml"]


def test_cli_erase_config_file_runs_every_job(tiny_sd_folder, tmp_path):
    config = tmp_path / "jobs.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {tiny_sd_folder}
        out_dir: {tmp_path / "out"}
        steps: 1
        lr: 1e-3
        grid: 0
        jobs:
          - method: esd-x
            concept: circle
            ddim_steps: 2
          - method: salun
            concept: circle
            relabel_prompts: [a square]
            retain_prompts: [a red heart]
            num_forget: 2
            num_retain: 2
            batch_size: 1
            generation_steps: 2
    """))
    assert main(["erase", "--config", str(config)]) == 0
    report = json.loads((tmp_path / "out" / "erase-report.json").read_text())
    assert [(j["method"], j["status"]) for j in report["jobs"]] == [("esd-x", "done"), ("salun", "done")]
    assert load_adapter(tmp_path / "out" / "esd-x-circle.safetensors").method == "esd-x"
    assert load_adapter(tmp_path / "out" / "salun-circle.safetensors").method == "salun"
    assert (tmp_path / "out" / "salun-circle.mask.safetensors").is_file()
    assert report["jobs"][1]["mask"].endswith("salun-circle.mask.safetensors")
    assert all(math.isfinite(j["loss_last"]) for j in report["jobs"])
