"""unsee eval --suite on several processes (issue 27 item 4): batches shared round the processes, each appending to
its own results.rank{R}.jsonl, merged by the main process into the results.jsonl one process writes, byte for byte;
resuming from the parts of a killed run with any number of processes.

The launched test starts 2 CPU processes with torchrun (gloo) on a free port with a timeout, as
tests/test_multiprocess.py does; the one-process reference runs here with one thread, as each launched process does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_multiprocess import _one_thread, _torchrun

from unsee.cli import main
from unsee.suite_eval import EvaluationSettingsError, SuiteJudge, read_records, run_suite
from unsee.suites import read_suite

FILES = ("results.jsonl", "run.json", "summary.json", "summary.md", "contact_sheet.png")
SUITE = "".join(f"a {c} {s}\n" for c, s in [("red", "circle"), ("blue", "star"), ("green", "square"),
                                            ("red", "heart"), ("gray", "circle"), ("blue", "heart"),
                                            ("green", "star")])


def toy_suite() -> str:
    from unsee.toy.evaluation import suite_path

    return str(suite_path("circle"))


def _eval_args(out: Path) -> list[str]:
    # 6 rows in batches of 2: process 0 makes batches 0 and 2, process 1 batch 1
    return ["eval", "--suite", toy_suite(), "--limit", "6", "--steps", "2", "--batch-size", "2", "--out", str(out)]


def _launch(args: list[str], cwd: Path):
    """torchrun with 2 processes; launched again once when another program took the free port first."""
    run = _torchrun(args, cwd)
    if run.returncode != 0 and "address already in use" in run.stderr.lower():
        run = _torchrun(args, cwd)
    return run


def _same_reports(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    images = sorted(p.name for p in (a / "images").iterdir())
    assert images == sorted(p.name for p in (b / "images").iterdir()) and images
    for name in images:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes(), name


@pytest.mark.timeout(240)
def test_two_processes_write_the_report_of_one_process(tmp_path, capsys, accelerate_state):
    device = ["--device", "cpu"] if torch.cuda.is_available() else []  # a CPU box: the processes find gloo
    two = tmp_path / "two"
    run = _launch(["-m", "unsee.cli", *_eval_args(two), *device], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("report: ") == 1 and run.stdout.count("all: n 6") == 1, run.stdout  # the main prints
    assert "rows made by each of the 2 processes: 4, 2" in run.stdout  # batches 0 and 2, batch 1
    assert not list(two.glob("results.rank*.jsonl"))  # merged, then removed
    assert not [p for p in two.rglob(".*")], "a temporary was left"

    one = tmp_path / "one"
    assert _one_thread(main, _eval_args(one)) == 0
    capsys.readouterr()
    _same_reports(one, two)
    assert [r["row_id"] for r in read_records(two / "results.jsonl")] == [f"circle-{i:03d}" for i in range(6)]


@pytest.mark.timeout(240)
def test_two_processes_resume_a_killed_run_to_the_report_of_one_process(tmp_path, capsys, accelerate_state):
    one = tmp_path / "one"
    assert _one_thread(main, _eval_args(one)) == 0
    capsys.readouterr()
    lines = (one / "results.jsonl").read_text().splitlines(keepends=True)
    # killed: a one-process run had written rows 0-1 (batch 0), a two-process run then row 2 (batch 1, process 1)
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(one / "run.json", killed / "run.json")
    (killed / "images").mkdir()
    for record in read_records(one / "results.jsonl")[:3]:
        shutil.copy(one / record["image"], killed / record["image"])
    (killed / "results.jsonl").write_text("".join(lines[:2]))
    (killed / "results.rank1.jsonl").write_text(lines[2] + lines[3][:10])  # and was writing row 3
    device = ["--device", "cpu"] if torch.cuda.is_available() else []
    run = _launch(["-m", "unsee.cli", *_eval_args(killed), *device], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed: 3 row(s) were done, 3 made now" in run.stdout, run.stdout  # rows 3 (batch 1), 4 and 5
    assert "rows made by each of the 2 processes: 2, 1" in run.stdout  # batch 2 (rows 4, 5); batch 1 again, row 3
    assert not list(killed.glob("results.rank*.jsonl"))
    for name in FILES:
        assert (killed / name).read_bytes() == (one / name).read_bytes(), name


def pixel_judge(images):
    return [{"mean": round(sum(image.convert("L").getdata()) / image.size[0] / image.size[1], 4)} for image in images]


def test_a_killed_sharded_run_resumes_from_its_parts_on_one_process(tiny_sd, tmp_path):
    path = tmp_path / "suite.txt"
    path.write_text(SUITE)
    suite = read_suite(path)
    seen = []

    def judge(images):
        seen.append(len(images))
        return pixel_judge(images)

    def run(out):
        return run_suite(tiny_sd, suite, SuiteJudge(judge, name="pixels", version="1"), out, num_inference_steps=2,
                         batch_size=3, seed=5)

    straight = tmp_path / "straight"
    reference = run(straight)
    assert reference.made == 7
    lines = (straight / "results.jsonl").read_text().splitlines(keepends=True)
    # a 2-process run killed part-way: process 0 finished batch 0 (rows 0-2) and one row of batch 2 (row 6);
    # process 1 one row of batch 1 (row 3) and was writing the next
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    (killed / "results.jsonl").unlink()
    (killed / "summary.json").unlink()
    (killed / "results.rank0.jsonl").write_text("".join(lines[0:3] + lines[6:7]))
    (killed / "results.rank1.jsonl").write_text(lines[3] + lines[4][:25])
    seen.clear()
    resumed = run(killed)
    assert resumed.resumed == 5 and resumed.made == 2 and resumed.made_here == 2 and resumed.made_by_process == [2]
    assert seen == [3]  # only batch 1 is made again (whole); batch 2's one row (6) was done
    assert not list(killed.glob("results.rank*.jsonl"))
    assert resumed.records == reference.records
    for name in ("results.jsonl", "summary.json", "summary.md"):
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name


def test_launched_processes_without_a_process_group_are_refused(tiny_sd, tmp_path, monkeypatch):
    path = tmp_path / "suite.txt"
    path.write_text(SUITE)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(EvaluationSettingsError, match="no process group is set up"):
        run_suite(tiny_sd, read_suite(path), SuiteJudge(pixel_judge, name="p"), tmp_path / "out",
                  num_inference_steps=2)
    assert not (tmp_path / "out").exists()


def test_accelerate_launch_cpu_with_several_processes_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu --num_processes 2` gives
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert main(_eval_args(tmp_path / "out") + ["--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "torchrun --nproc_per_node N -m unsee.cli eval" in error
    assert not (tmp_path / "out").exists()


def test_a_one_process_run_writes_results_in_suite_order(tiny_sd, tmp_path):
    """The merge keeps a one-process run's file as it was written (already in order), and run.json and the
    summary say nothing about how many processes made the rows."""
    path = tmp_path / "suite.txt"
    path.write_text(SUITE)
    report = run_suite(tiny_sd, read_suite(path), SuiteJudge(pixel_judge, name="p"), tmp_path / "out",
                       num_inference_steps=2, batch_size=4)
    assert [r["index"] for r in read_records(tmp_path / "out" / "results.jsonl")] == list(range(7))
    assert report.made == report.made_here == 7
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert not [key for key in json.dumps(run, sort_keys=True).split('"') if "process" in key and "/" not in key]


@pytest.mark.timeout(240)
def test_two_processes_attack_a_suite_as_one_process_does(tmp_path, capsys, accelerate_state):
    """unsee attack --suite shares its batches the same way (run_suite's machinery): 2 processes, 4 rows in batches
    of 2, give the report one process gives."""
    from unsee.weights import __file__ as weights_init

    adapter = str(Path(weights_init).parent / "examples" / "esd-x-circle.safetensors")

    def args(out: Path) -> list[str]:
        return ["attack", "--suite", toy_suite(), "--category", "circle", "--limit", "4", "--concept", "circle",
                "--adapter", adapter, "--steps", "2", "--attack-steps", "2", "--batch-size", "2", "--out", str(out)]

    device = ["--device", "cpu"] if torch.cuda.is_available() else []
    two = tmp_path / "two"
    run = _launch(["-m", "unsee.cli", *args(two), *device], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("all: attack success rate") == 1, run.stdout  # the main process prints
    assert "rows made by each of the 2 processes: 2, 2" in run.stdout, run.stdout
    assert not list(two.glob("results.rank*.jsonl"))
    one = tmp_path / "one"
    assert _one_thread(main, args(one)) == 0
    capsys.readouterr()
    _same_reports(one, two)
