"""Regression tests of issue 22, items 11-15: files and the command line.

Bad input must end with exit status 2 and one line naming the problem and the fix, before any model is loaded
or any file written; outputs are never replaced or deleted unless the user asked for it; atomic writes leave no
temporary behind.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import unsee.loading
from unsee.cli import main
from unsee.files import atomic_write

TOY_ADAPTER = Path(__file__).resolve().parents[1] / "weights" / "examples" / "esd-x-circle.safetensors"


def run_cli(argv, capsys):
    """(exit status, stderr) of ``unsee ARGV`` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model: bad input must be refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(unsee.loading, "load_pipeline", refuse)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder with a file, garbage checkpoints and nothing else."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xffgarbage, not a safetensors file" * 4)
    (tmp_path / "garbage.ckpt").write_bytes(b"garbage, not a checkpoint" * 4)
    return tmp_path


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_one_line_error(code, err, *phrases):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("unsee")
    for phrase in phrases:
        assert phrase in err, err


# ------------------------------------------------------------------------------------------- item 13


GEN = ["generate", "--prompt", "a red circle", "--out", "o"]
ERASE = ["erase", "--method", "esd-u", "--concept", "circle"]
ATTACK = ["attack", "--adapter", str(TOY_ADAPTER), "--concept", "circle"]

BAD_INPUTS = [  # (argv, phrases the one-line error must hold)
    (GEN + ["--steps", "1000000000000"], ["--steps", "1 to 1000"]),
    (GEN + ["--steps", "abc"], ["--steps", "whole number"]),
    (GEN + ["--num-images", "1000000000"], ["--num-images", "1 to 64"]),
    (GEN + ["--seed", "18446744073709551616"], ["--seed", "0 to 4294967295"]),
    (GEN + ["--width", "7", "--height", "64"], ["--width", "multiple of 8"]),
    (GEN + ["--device", "bogus"], ["--device", "not a device", "cpu"]),
    (GEN + ["--model", "garbage.safetensors"], ["garbage.safetensors", "not a safetensors file", "pass"]),
    (GEN + ["--model", "garbage.ckpt"], ["garbage.ckpt", "not a PyTorch checkpoint", "pass"]),
    (GEN[:-1] + ["/proc/x"], ["/proc", "cannot write", "choose another path"]),
    (GEN[:-1] + ["afile"], ["afile", "is a file", "give a folder"]),
    (GEN + ["--adapter", "missing.safetensors"], ["missing.safetensors", "no such file"]),
    (GEN + ["--config", "afile"], ["--config", "not a folder"]),
    (ERASE + ["--rank", "1000000000"], ["--rank", "1 to 1024"]),
    (ERASE + ["--steps", "1000000000000"], ["--steps", "1 to 100000"]),
    (ERASE + ["--set", "ddim_steps=100000000"], ["ddim_steps", "1 to 1000"]),
    (ERASE + ["--set", "seed=18446744073709551616"], ["seed", "0 to 4294967295"]),
    (ERASE + ["--set", "ddim_steps=" + "9" * 5000], ["ddim_steps"]),
    (ERASE + ["--checkpoint-dir", "afile"], ["afile", "is a file", "give a folder"]),
    (ERASE + ["--device", "bogus"], ["--device", "not a device"]),
    (ERASE + ["--model", "garbage.safetensors"], ["garbage.safetensors", "not a safetensors file"]),
    (ERASE + ["--out", "/proc/x.safetensors"], ["/proc", "cannot write"]),
    (ERASE + ["--lr", "nan"], ["--lr", "finite"]),
    (ATTACK + ["--prefix-tokens", "100"], ["--prefix-tokens", "1 to 16"]),
    (ATTACK + ["--seed", "-1"], ["--seed", "0 to 4294967295"]),
    (ATTACK + ["--report", "nodir/r.json"], ["nodir", "does not exist", "create it first"]),
    (["eval", "--concept", "circle", "--json", "nodir/x.json"], ["nodir", "does not exist", "create it first"]),
    (["demo", "--port", "99999"], ["--port", "1 to 65535"]),
    (["demo", "--workdir", "afile"], ["--workdir", "is a file", "give a folder"]),
]


@pytest.mark.parametrize("argv, phrases", BAD_INPUTS, ids=[" ".join(a[-2:])[:40] for a, _ in BAD_INPUTS])
def test_bad_cli_input_exits_2_with_one_line_before_any_work(argv, phrases, workdir, no_model, capsys):
    before = listing(workdir)
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, *phrases)
    assert listing(workdir) == before  # nothing written


def test_device_without_cuda_is_refused(workdir, no_model, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (GEN + ["--device", "cuda"], ERASE + ["--device", "cuda:0"]):
        code, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, "not available on this machine", "--device cpu")
    assert listing(workdir) == ["afile", "garbage.ckpt", "garbage.safetensors"]


def test_unreadable_checkpoint_that_passes_the_first_bytes_check_is_one_line(workdir, capsys):
    """A file that starts like a pickle but is not a checkpoint gets to diffusers' loader: still one line."""
    (workdir / "fake.ckpt").write_bytes(b"\x80\x02garbage that is no pickle at all")
    code, err = run_cli(GEN + ["--model", "fake.ckpt"], capsys)
    assert_one_line_error(code, err, "cannot load the model fake.ckpt", "pass")
    assert "garbage" not in err  # the file's contents are not echoed
    code, err = run_cli(ERASE + ["--model", "fake.ckpt", "--out", "e.safetensors"], capsys)
    assert_one_line_error(code, err, "cannot load the model fake.ckpt")
    assert not (workdir / "o").exists() and not (workdir / "e.safetensors").exists()


def test_bad_input_in_a_subprocess_prints_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "unsee.cli", "generate", "--prompt", "x", "--out", str(tmp_path / "o"),
                          "--steps", "1000000000000"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--steps" in lines[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- item 14


@pytest.mark.parametrize("flags", [
    ["--guidance-scale", "nan"], ["--guidance-scale", "inf"], ["--guidance-scale", "1e308"], ["--guidance-scale", "-1"],
    ["--pag", "1e308"], ["--pag", "nan"], ["--fdg", "1e308,1"], ["--fdg", "10,nan"], ["--cfgpp", "nan"],
    ["--nasa", "1e308", "--negative", "square"], ["--adapter", f"{TOY_ADAPTER}:nan"],
    ["--adapter", f"{TOY_ADAPTER}:1e308"],
], ids=lambda flags: " ".join(flags[:2])[-30:])
def test_non_finite_or_absurd_guidance_is_refused(flags, workdir, no_model, capsys):
    code, err = run_cli(GEN + flags, capsys)
    assert_one_line_error(code, err, "finite" if "--adapter" not in flags else "scale")
    assert not (workdir / "o").exists()


def test_width_without_height_is_honoured_and_recorded(tiny_sd_folder, tmp_path):
    out = tmp_path / "wide"
    assert main(["generate", "--model", str(tiny_sd_folder), "--prompt", "a red circle", "--width", "64", "--steps", "1",
                 "--out", str(out), "--device", "cpu"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    (entry,) = settings["images"]
    assert Image.open(out / entry["file"]).size == (64, 32)  # the width asked for, the model's own height
    assert (settings["width"], settings["height"]) == (64, 32)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------- item 15


@pytest.mark.parametrize("argv, phrases", [
    (ERASE + ["--grid", "1000000000"], ["--grid", "0 to 16"]),
    (["eval", "--concept", "circle", "--n", "1000000000"], ["--n", "1 to 10000"]),
    (ATTACK + ["--attack-steps", "1000000000000"], ["--attack-steps", "1 to 1000"]),
    (ATTACK + ["--n", "1000000000"], ["--n", "1 to 1000"]),
    (GEN + ["--width", "100000", "--height", "64"], ["--width", "8 to 4096"]),
    (GEN + ["--width", "4096", "--height", "4096", "--num-images", "2"], ["pixels", "lower --num-images"]),
    (["erase", "--method", "salun", "--concept", "circle", "--set", "num_forget=1000000000"], ["num_forget", "1 to 10000"]),
], ids=["grid", "eval-n", "attack-steps", "attack-n", "width", "pixels", "num-forget"])
def test_absurd_work_is_refused_with_the_documented_limit(argv, phrases, workdir, no_model, capsys):
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, *phrases)
    assert listing(workdir) == ["afile", "garbage.ckpt", "garbage.safetensors"]


@pytest.mark.parametrize("command, limits", [
    ("generate", ["1 to 1000", "1 to 64", "8 to 4096", "pixels", "0 to 4294967295"]),
    ("eval", ["1 to 10000", "GiB"]),
    ("erase", ["1 to 100000", "1 to 1024", "0 to 16", "--overwrite", "--resume"]),
    ("attack", ["1 to 1000", "1 to 16"]),
    ("demo", ["1 to 65535"]),
])
def test_limits_are_documented_in_help(command, limits, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for limit in limits:
        assert limit in text, limit


# ------------------------------------------------------------------------------------------- item 11


def _erase(model, out, *extra):
    return ["erase", "--method", "esd-x", "--concept", "circle", "--model", str(model), "--steps", "2", "--lr", "1e-3",
            "--set", "ddim_steps=2", "--grid", "1", "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.parametrize("existing", ["important.json", "important.grid.png", "important.safetensors",
                                      "important.README.md"])
def test_erase_refuses_to_replace_an_existing_output(existing, tmp_path, no_model, capsys):
    (tmp_path / existing).write_bytes(b"the user's own file")
    code, err = run_cli(_erase("toy", tmp_path / "important.safetensors"), capsys)
    assert_one_line_error(code, err, existing, "--overwrite")
    assert listing(tmp_path) == [existing] and (tmp_path / existing).read_bytes() == b"the user's own file"


def test_erase_never_deletes_a_checkpoint_folder_it_did_not_make(tmp_path, no_model, capsys):
    folder = tmp_path / "important.ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code, err = run_cli(_erase("toy", tmp_path / "important.safetensors"), capsys)
    assert_one_line_error(code, err, "important.ckpt", "--resume")
    assert listing(tmp_path) == ["important.ckpt", "important.ckpt/notes.txt"]


def test_erase_fails_before_training_when_the_checkpoint_path_is_a_file(tmp_path, no_model, capsys):
    (tmp_path / "important.ckpt").write_text("a file, not a folder")
    code, err = run_cli(_erase("toy", tmp_path / "important.safetensors"), capsys)
    assert_one_line_error(code, err, "important.ckpt", "is a file")
    assert listing(tmp_path) == ["important.ckpt"]
    # the same from a jobs file, which the command-line check does not see
    config = tmp_path / "jobs.yaml"
    config.write_text(f"method: esd-x\nconcept: circle\nout: {tmp_path / 'x.safetensors'}\n"
                      f"checkpoint_dir: {tmp_path / 'important.ckpt'}\n")
    code, err = run_cli(["erase", "--config", config], capsys)
    assert_one_line_error(code, err, "important.ckpt", "is a file")
    assert listing(tmp_path) == ["important.ckpt", "jobs.yaml"]


def test_erase_overwrite_and_resume_replace_only_what_was_named(tiny_sd_folder, tmp_path, capsys):
    out = tmp_path / "important.safetensors"
    for name in ("important.json", "important.grid.png", "important.safetensors"):
        (tmp_path / name).write_bytes(b"old")
    folder = tmp_path / "important.ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code, err = run_cli(_erase(tiny_sd_folder, out, "--overwrite", "--resume"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "important.json").read_text())["jobs"][0]["status"] == "done"
    assert Image.open(tmp_path / "important.grid.png").size == (32, 64)
    # the checkpoint this run wrote is gone; the user's file in the folder is not
    assert listing(tmp_path) == ["important.README.md", "important.ckpt", "important.ckpt/notes.txt",
                                 "important.grid.png", "important.json", "important.safetensors"]
    assert (folder / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------- item 12


def _write_like_safetensors(tmp: str, fail: BaseException = None) -> None:
    """A writer that, as safetensors' does, writes a temporary of its own beside the path it is given first."""
    sibling = Path(tmp).with_name(".tmpWRITER")
    sibling.write_bytes(b"x" * 1000)
    if fail is not None:
        raise fail
    os.replace(sibling, tmp)


@pytest.mark.parametrize("fail", [None, OSError("disk full (simulated)"), KeyboardInterrupt()],
                         ids=["success", "error", "interrupt"])
def test_atomic_write_leaves_no_temporary(fail, tmp_path):
    target = tmp_path / "important.safetensors"
    if fail is None:
        atomic_write(target, _write_like_safetensors)
        assert listing(tmp_path) == ["important.safetensors"]
    else:
        with pytest.raises(type(fail)):
            atomic_write(target, lambda tmp: _write_like_safetensors(tmp, fail))
        assert listing(tmp_path) == []


_KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from unsee.files import atomic_write

    def write_then_die(tmp):
        Path(tmp).with_name(".tmpWRITER").write_bytes(b"x" * 100000)  # the writer's own temporary, full size
        Path(tmp).write_bytes(b"y" * 100000)
        os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(Path(sys.argv[1]), write_then_die)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_a_later_write_removes_what_a_killed_write_left(tmp_path):
    target = tmp_path / "important.safetensors"
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(target)], capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert not target.exists() and listing(tmp_path)  # the killed write left its temporaries
    (tmp_path / "mine.tmp").write_text("a user's file that merely ends in .tmp")
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert listing(tmp_path) == ["important.safetensors", "mine.tmp"]
    assert target.read_bytes() == b"new"


def test_resume_may_replace_only_the_report_of_the_run_it_resumes(tmp_path):
    from unsee.erasure import ConfigError
    from unsee.jobs import plan_jobs

    out, report = tmp_path / "important.safetensors", tmp_path / "important.json"
    job = {"method": "esd-x", "concept": "circle", "out": str(out), "grid": 0}
    report.write_text(json.dumps({"unsee_version": "0.1.0", "jobs": [{"status": "failed"}]}))  # a run that failed
    with pytest.raises(ConfigError, match="important.json exists.*--overwrite"):
        plan_jobs(job)
    (planned,), _ = plan_jobs({**job, "resume": True})
    assert planned.resume
    report.write_text(json.dumps({"unsee_version": "0.1.0", "jobs": [{"status": "done"}]}))  # a finished run
    with pytest.raises(ConfigError, match="important.json exists"):
        plan_jobs({**job, "resume": True})
    (planned,), _ = plan_jobs({**job, "overwrite": True})
    assert planned.overwrite


def test_overwrite_goes_with_a_jobs_file(tmp_path, no_model, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"old")
    config = tmp_path / "jobs.yaml"
    config.write_text(f"method: esd-x\nconcept: circle\nout: {tmp_path / 'x.safetensors'}\ngrid: 0\n")
    code, err = run_cli(["erase", "--config", config], capsys)
    assert_one_line_error(code, err, "x.safetensors exists", "--overwrite")
    with pytest.raises(AssertionError, match="a model was loaded"):  # accepted: it goes on to load the model
        main(["erase", "--config", str(config), "--overwrite"])
    assert (tmp_path / "x.safetensors").read_bytes() == b"old"
