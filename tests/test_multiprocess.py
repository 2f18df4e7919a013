"""Data-parallel training (issue 22 item 24) and accelerate's per-process state.

The launched tests start 2 CPU processes with torchrun (gloo), on free ports, with timeouts. N processes train the
adapter one process trains with ``draws_per_step=N`` (the same global batch): each draw has its own random stream
whichever process computes it, and DDP averages the gradients. On the CPU with one thread per process the two agree
bit for bit (halving is exact in float); the tests allow ``TOLERANCE`` for the order of float sums.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unsee.cli import main as cli
from unsee.erasure import ConfigError, ESDConfig, load_checkpoint, make_trainer
from unsee.testing import tiny_sd_pipeline

TOLERANCE = 1e-6  # max |difference| of adapter tensors, 2 processes against 1 with the same global batch
HERE = Path(__file__).parent
LAUNCH_TIMEOUT = 150  # seconds; a launch takes about 8 s on 2 cores


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ...`` in a subprocess: one thread per process, offline, a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def _one_thread(function, *args):
    """Run in this process with one thread, as each launched process runs (the same float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(threads)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _erase_args(model: Path, out: Path, *more: str) -> list[str]:
    return ["erase", "--model", str(model), "--method", "esd-x", "--concept", "circle", "--lr", "1e-3",
            "--set", "ddim_steps=2", "--grid", "0", "--out", str(out), *more]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ------------------------------------------------------------------------ 2 processes through the CLI


@pytest.mark.timeout(240)
def test_two_processes_train_the_adapter_of_one_process_with_the_same_global_batch(tmp_path, tiny_sd_folder,
                                                                                    capsys, accelerate_state):
    two = tmp_path / "two"
    run = _torchrun(["-m", "unsee.cli", *_erase_args(tiny_sd_folder, two / "adapter.safetensors", "--steps", "3",
                                                     "--device", "cpu", "--grid", "1")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    # only the main process writes and prints: one adapter, report and grid, no checkpoint or temporary left
    assert run.stdout.count(": wrote ") == 1 and run.stdout.count("report: ") == 1, run.stdout
    assert _files(two) == {"adapter.safetensors", "adapter.json", "adapter.grid.png", "adapter.README.md"}
    report = json.loads((two / "adapter.json").read_text())
    assert [job["status"] for job in report["jobs"]] == ["done"]

    one = tmp_path / "one" / "adapter.safetensors"
    assert _one_thread(cli, _erase_args(tiny_sd_folder, one, "--steps", "3", "--device", "cpu",
                                        "--set", "draws_per_step=2")) == 0
    capsys.readouterr()
    from unsee.adapters import Adapter

    trained_two, trained_one = Adapter.load(two / "adapter.safetensors"), Adapter.load(one)
    assert trained_two.training["num_processes"] == 2 and trained_two.training["draws_per_step"] == 2
    assert trained_one.training["num_processes"] == 1 and trained_one.training["draws_per_step"] == 2
    assert _max_difference(load_file(two / "adapter.safetensors"), load_file(one)) <= TOLERANCE
    assert trained_two.training["losses"] == pytest.approx(trained_one.training["losses"], rel=1e-5)


@pytest.mark.timeout(240)
def test_two_processes_checkpoint_and_resume_to_the_adapter_of_a_straight_run(tmp_path, tiny_sd_folder, capsys,
                                                                              accelerate_state):
    # no --device on a machine without a GPU: the two processes find the CPU (gloo) themselves
    device = ["--device", "cpu"] if torch.cuda.is_available() else []
    folder = tmp_path / "ckpt"
    first = _torchrun(["-m", "unsee.cli", *_erase_args(tiny_sd_folder, tmp_path / "half.safetensors", "--steps", "2",
                                                       "--checkpoint-dir", str(folder), "--checkpoint-every", "1",
                                                       *device)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = load_checkpoint(folder)
    assert checkpoint["step"] == 2 and len(checkpoint["rng"]["generators"]) == 2  # one stream per draw
    assert _files(folder) == {"checkpoint.pt"}  # written by the main process, no temporaries

    resumed = _torchrun(["-m", "unsee.cli", *_erase_args(tiny_sd_folder, tmp_path / "resumed.safetensors", "--steps",
                                                         "4", "--checkpoint-dir", str(folder), "--resume", *device)],
                        tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming from") == 1 and resumed.stdout.count(": wrote ") == 1

    straight = tmp_path / "straight.safetensors"
    assert _one_thread(cli, _erase_args(tiny_sd_folder, straight, "--steps", "4", "--device", "cpu",
                                        "--set", "draws_per_step=2")) == 0
    capsys.readouterr()
    from unsee.adapters import Adapter

    adapter = Adapter.load(tmp_path / "resumed.safetensors")
    assert adapter.training["resumed_from_step"] == 2 and adapter.training["num_processes"] == 2
    assert len(adapter.training["losses"]) == 4
    assert _max_difference(load_file(tmp_path / "resumed.safetensors"), load_file(straight)) <= TOLERANCE


@pytest.mark.timeout(240)
def test_every_method_trains_the_same_adapter_on_two_processes_as_on_one(tmp_path, accelerate_state):
    """DDP with each method: UNet and text-encoder training, full weights, LoRA, masks, AdvUnlearn's carried prefix."""
    helper = HERE / "multiprocess_train.py"
    run = _torchrun([str(helper), str(tmp_path / "two.pt")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("multiprocess_train", helper)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    one = _one_thread(module.train_all, 2)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for method in module.METHODS:
        assert two["_training"][method]["num_processes"] == 2, method
        assert _max_difference(two[method], one[method]) <= TOLERANCE, method
        # accelerate calls a process's CPU "cpu:<rank>": training there must not copy the pipeline in each process
        assert two["_copied"][method] == 0 and one["_copied"][method] == 0, method


# ------------------------------------------------------------------------ launches that would not train as asked


def test_accelerate_launch_cpu_with_several_processes_is_refused_before_training(tmp_path, tiny_sd_folder,
                                                                                 monkeypatch, capsys):
    # what `accelerate launch --cpu --num_processes 2` gives its one process: MASTER_ADDR and no rank
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    out = tmp_path / "out" / "adapter.safetensors"
    assert cli(_erase_args(tiny_sd_folder, out, "--steps", "2")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "torchrun --nproc_per_node N -m unsee.cli erase" in error
    assert not out.parent.exists()


# ------------------------------------------------------------------------ draws per step in one process


FAST = dict(concept="circle", ddim_steps=2, lr=1e-3, device="cpu")


def test_two_draws_resume_bit_for_bit_and_a_checkpoint_keeps_its_number_of_draws(tmp_path, accelerate_state):
    reference = make_trainer("esd-x", steps=4, draws_per_step=2, **FAST).train(tiny_sd_pipeline())
    assert reference.training["draws_per_step"] == 2
    pipe = tiny_sd_pipeline()
    make_trainer("esd-x", steps=2, draws_per_step=2, checkpoint_every=1, **FAST).train(pipe, checkpoint_dir=tmp_path)
    assert len(load_checkpoint(tmp_path)["rng"]["generators"]) == 2
    with pytest.raises(ConfigError, match=r"written with 2 draw\(s\) per step.*--set draws_per_step=2"):
        make_trainer("esd-x", steps=4, **FAST).train(pipe, checkpoint_dir=tmp_path, resume=True)
    resumed = make_trainer("esd-x", steps=4, draws_per_step=2, **FAST).train(pipe, checkpoint_dir=tmp_path, resume=True)
    assert resumed.training["resumed_from_step"] == 2
    assert resumed.tensors.keys() == reference.tensors.keys()
    assert all(torch.equal(resumed.tensors[k], reference.tensors[k]) for k in reference.tensors)
    # two draws average two independent samples: not the one-draw run
    single = make_trainer("esd-x", steps=4, **FAST).train(tiny_sd_pipeline())
    assert single.training["draws_per_step"] == 1
    assert not all(torch.equal(single.tensors[k], reference.tensors[k]) for k in reference.tensors)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_draws_per_step_is_validated(bad):
    with pytest.raises(ConfigError, match="draws_per_step must be a positive integer"):
        ESDConfig(concept="circle", draws_per_step=bad)
    assert make_trainer("esd-x", concept="circle", draws_per_step=3).config.draws_per_step == 3
    assert make_trainer("esd-x", concept="circle", draws_per_step="3").config.draws_per_step == 3  # --set's text


# ------------------------------------------------------------------------ accelerate's state in one process


def test_trainers_with_different_mixed_precision_follow_one_another_in_a_process(accelerate_state):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    Accelerator(cpu=True, mixed_precision="fp16")  # the caller's own accelerator, set up first
    settings = dict(concept="circle", steps=1, ddim_steps=2, lr=1e-3, device="cpu")
    for precision in ("no", "bf16", "no"):
        adapter = make_trainer("esd-x", mixed_precision=precision, **settings).train(tiny_sd_pipeline())
        assert adapter.hyperparameters["mixed_precision"] == precision and adapter.training["losses"]
    assert AcceleratorState().mixed_precision == "fp16"  # and the caller's setting is as it was
