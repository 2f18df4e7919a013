"""Evaluation over a prompt suite (unsee.suite_eval, unsee eval --suite): per-row seeds and guidance, the report's
files, resuming a killed run, identical numbers on a re-run, judges from a user's file, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unsee.cli import main
from unsee.suite_eval import (EvaluationSettingsError, SuiteJudge, default_metrics, load_judge, read_records,
                              run_suite, summarize, weights_sha256)
from unsee.suites import read_suite

SUITE = ("case_number,prompt,evaluation_seed,evaluation_guidance,categories\n"
         "r0,a red star,4290749014,5,bright\n"
         "r1,a blue star,,3,dark\n"
         "r2,\"a green\nstar\",7,,bright\n"
         "r3,a red circle,11,5,dark\n"
         "r4,a blue circle,,5,bright\n"
         "r5,a gray square,13,2,dark\n"
         "r6,a red heart,14,5,bright\n")
STEPS = 2


class Stop(Exception):
    pass


def pixel_judge(images):
    """A deterministic judge of the pixels: their mean, and whether it is above the middle grey."""
    out = []
    for image in images:
        mean = float(np.asarray(image, dtype=np.float64).mean())
        out.append({"mean": round(mean, 6), "bright": mean > 127.5, "tone": "light" if mean > 127.5 else "dark"})
    return out


def counted(judge):
    seen = []

    def fn(images):
        seen.append(len(images))
        return judge(images)

    return fn, seen


@pytest.fixture
def suite(tmp_path):
    path = tmp_path / "suite.csv"
    path.write_text(SUITE)
    return read_suite(path)


def run(pipe, suite, out, judge=pixel_judge, **kwargs):
    kwargs.setdefault("batch_size", 3)
    return run_suite(pipe, suite, SuiteJudge(judge, name="pixels", version="1", thresholds={"bright": 127.5}), out,
                     model="tiny", num_inference_steps=STEPS, seed=100, guidance_scale=4.0, **kwargs)


def test_each_row_is_made_from_its_own_seed_and_guidance(tiny_sd, suite, tmp_path):
    report = run(tiny_sd, suite, tmp_path / "out")
    records = report.records
    assert [r["seed"] for r in records] == [4290749014, 101, 7, 11, 104, 13, 14]  # none given: seed + row index
    assert [r["guidance"] for r in records] == [5.0, 3.0, 4.0, 5.0, 5.0, 2.0, 5.0]  # none given: guidance_scale
    assert records[2]["prompt"] == "a green\nstar"
    for i in (0, 1, 2, 5):  # the image is the one a lone call with the row's seed and guidance makes
        record = records[i]
        alone = tiny_sd(record["prompt"], num_inference_steps=STEPS, guidance_scale=record["guidance"],
                        generator=torch.Generator().manual_seed(record["seed"]), output_type="np").images[0]
        saved = np.asarray(Image.open(tmp_path / "out" / record["image"]), dtype=np.float64) / 255
        assert np.abs(saved - alone).max() <= 1 / 255 + 1e-6, record["row_id"]


def test_the_report_records_what_made_the_numbers(tiny_sd, suite, tmp_path):
    adapter = tmp_path / "fake-adapter.safetensors"
    adapter.write_bytes(b"not loaded here, only hashed")
    out = tmp_path / "out"
    report = run(tiny_sd, suite, out, adapters=[(str(adapter), 0.5)])
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[0])["row_id"] == "r0"
    assert set(json.loads(lines[0])) >= {"row_id", "prompt", "seed", "guidance", "judge", "image", "categories"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary == report.summary and summary["complete"] and summary["done"] == 7
    assert summary["judge"] == {"name": "pixels", "version": "1", "thresholds": {"bright": 127.5}}
    assert summary["model"] == {"name": "tiny", "weights_sha256": weights_sha256(tiny_sd)}
    assert summary["adapters"][0]["scale"] == 0.5 and len(summary["adapters"][0]["sha256"]) == 64
    assert summary["suite"]["sha256"] == suite.sha256 and summary["suite"]["rows"] == 7
    assert summary["generation"]["steps"] == STEPS and summary["generation"]["seed"] == 100
    assert summary["seeds"] == {"from_suite": 5, "default": 2}
    assert summary["unsee_version"]
    figures = summary["figures"]
    judged = [r["judge"] for r in report.records]
    assert figures["all"]["n"] == 7
    assert figures["all"]["bright"] == pytest.approx(sum(j["bright"] for j in judged) / 7, abs=1e-6)
    assert set(figures["by_category"]) == {"bright", "dark"} and figures["by_category"]["bright"]["n"] == 4
    markdown = (out / "summary.md").read_text()
    assert "| rows | n | bright | mean | tone=" in markdown and "| bright | 4 |" in markdown
    assert "pixels 1" in markdown and "fake-adapter.safetensors" in markdown
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == (7 * 32, 32 + 12)
    assert json.loads((out / "run.json").read_text())["judge"]["name"] == "pixels"


@pytest.mark.parametrize("kill_after", [2, 3, 4], ids=["in-the-first-batch", "at-a-batch-end", "in-the-second-batch"])
def test_a_killed_run_resumes_to_the_numbers_of_a_straight_run(tiny_sd, suite, tmp_path, kill_after):
    straight = run(tiny_sd, suite, tmp_path / "straight")

    written = []

    def stop(record):
        written.append(record["row_id"])
        if len(written) == kill_after:
            raise Stop

    out = tmp_path / "killed"
    with pytest.raises(Stop):
        run(tiny_sd, suite, out, callback=stop)
    assert len(read_records(out / "results.jsonl")) == kill_after
    with open(out / "results.jsonl", "a") as handle:  # a run killed while writing its next line
        handle.write('{"row_id": "r')
    judge, seen = counted(pixel_judge)
    resumed = run(tiny_sd, suite, out, judge=judge)
    assert resumed.resumed == kill_after and resumed.made == 7 - kill_after
    # finished batches are not made again; the batch the kill cut is made again whole (same batch, same numbers)
    first_open_batch = kill_after // 3 * 3
    assert sum(seen) == 7 - first_open_batch
    assert resumed.records == straight.records
    assert resumed.summary["figures"] == straight.summary["figures"]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(line) for line in lines)  # the torn line is gone
    assert sorted(lines) == sorted((tmp_path / "straight" / "results.jsonl").read_text().splitlines())
    again = run(tiny_sd, suite, out, judge=judge)  # a finished run: nothing to make
    assert again.made == 0 and sum(seen) == 7 - first_open_batch


def test_a_rerun_gives_identical_files(tiny_sd, suite, tmp_path):
    run(tiny_sd, suite, tmp_path / "a")
    run(tiny_sd, suite, tmp_path / "b")
    for name in ("results.jsonl", "summary.json", "summary.md", "run.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_other_settings_in_the_same_folder_are_refused(tiny_sd, suite, tmp_path):
    out = tmp_path / "out"
    run(tiny_sd, suite, out, batch_size=7)
    with pytest.raises(EvaluationSettingsError, match=r"other settings \(they differ in: generation\)"):
        run(tiny_sd, suite, out, batch_size=2)
    other = SuiteJudge(pixel_judge, name="pixels", version="2")
    with pytest.raises(EvaluationSettingsError, match="differ in: judge"):
        run_suite(tiny_sd, suite, other, out, model="tiny", num_inference_steps=STEPS, seed=100, guidance_scale=4.0,
                  batch_size=7)


def test_results_file_with_a_bad_line_inside_is_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"row_id": "a", "index": 0}\nnot json\n{"row_id": "b", "index": 1}\n')
    with pytest.raises(EvaluationSettingsError, match="line 2: not a result record"):
        read_records(path)
    path.write_text('{"row_id": "a", "index": 0}\n{"row_id": "b"')
    assert [r["row_id"] for r in read_records(path, repair=True)] == ["a"]
    assert path.read_text() == '{"row_id": "a", "index": 0}\n'


def test_default_metrics_and_summaries():
    records = [{"index": 1, "categories": ["x"], "judge": {"ok": True, "score": 0.5, "label": "cat", "box": [1]}},
               {"index": 0, "categories": ["x", "y"], "judge": {"ok": False, "score": 1.0, "label": "dog", "box": []}},
               {"index": 2, "categories": [], "judge": {"ok": True, "score": 0.0, "label": "cat", "box": []}}]
    assert default_metrics(records) == {"ok": pytest.approx(2 / 3), "score": 0.5, "label=cat": pytest.approx(2 / 3),
                                        "label=dog": pytest.approx(1 / 3)}
    summary = summarize(records)
    assert summary == summarize(list(reversed(records)))
    assert summary["by_category"]["y"] == {"n": 1, "ok": 0.0, "score": 1.0, "label=dog": 1.0}


def test_judges_from_a_users_file(tmp_path):
    path = tmp_path / "my_judge.py"
    path.write_text("def judge(images):\n    return [{'ok': True} for _ in images]\n"
                    "judge.name = 'mine'\njudge.version = '3.4'\njudge.thresholds = {'score': 0.6}\n"
                    "def plain(images):\n    return [{} for _ in images]\n")
    judge = load_judge(f"{path}:judge")
    assert (judge.name, judge.version, dict(judge.thresholds)) == ("mine", "3.4", {"score": 0.6})
    plain = load_judge(f"{path}:plain")
    assert plain.name == f"{path}:plain" and plain.version.startswith("sha256 ")
    assert load_judge("json:dumps").name == "json:dumps"
    for spec, message in ((f"{path}:missing", "has no function missing"), ("no_such_module_x:f", "cannot import"),
                          (str(tmp_path / "nope.py") + ":f", "no file"), ("justaname", "expected toy")):
        with pytest.raises(ValueError, match=message):
            load_judge(spec)


def test_a_judge_with_the_wrong_output_stops_the_run(tiny_sd, suite, tmp_path):
    with pytest.raises(TypeError, match="one output per image"):
        run(tiny_sd, suite, tmp_path / "a", judge=lambda images: [{}])
    with pytest.raises(TypeError, match="not JSON"):
        run(tiny_sd, suite, tmp_path / "b", judge=lambda images: [{"x": object()} for _ in images])


# ------------------------------------------------------------------------------------------ command line


def toy_suite() -> str:
    from unsee.toy.evaluation import suite_path

    return str(suite_path("circle"))


def test_cli_runs_the_toy_suite_and_resumes(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["eval", "--suite", toy_suite(), "--category", "circle", "--limit", "3", "--steps", "2", "--batch-size",
            "2", "--out", str(out), "--json", str(tmp_path / "figures.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "all: n 3, accuracy.background" in printed and "presence.circle" in printed
    records = read_records(out / "results.jsonl")
    assert [r["row_id"] for r in records] == ["circle-000", "circle-001", "circle-002"]
    assert [r["seed"] for r in records] == [1000, 1001, 1002] and {r["guidance"] for r in records} == {5.0}
    assert set(records[0]["judge"]) == {"shape", "color", "background", "style"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "figures.json").read_text())
    assert summary["judge"]["name"] == "toy" and "sha256" in summary["judge"]["version"]
    assert summary["suite"]["categories"] == ["circle"] and summary["suite"]["rows"] == 3
    assert set(summary["figures"]["all"]) == {"n", "accuracy.background", "accuracy.color", "accuracy.shape",
                                              "presence.circle"}
    assert (out / "contact_sheet.png").is_file() and len(list((out / "images").glob("*.png"))) == 3
    assert main(args) == 0  # again: everything is done
    assert "resumed: 3 row(s) were done, 0 made now" in capsys.readouterr().out
    assert main(args[:-4] + ["--steps", "3", "--out", str(out)]) == 2  # other settings in the same folder
    assert "differ in: generation" in capsys.readouterr().err


def test_cli_with_a_judge_from_a_file(tmp_path, capsys):
    judge = tmp_path / "judge.py"
    judge.write_text("def judge(images):\n    return [{'dark': sum(im.convert('L').getdata()) < 128 * 64 * 64}"
                     " for im in images]\n")
    suite = tmp_path / "prompts.txt"
    suite.write_text("a red circle\na blue star\n")
    out = tmp_path / "out"
    assert main(["eval", "--suite", str(suite), "--judge", f"{judge}:judge", "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["suite"]["format"] == "lines" and summary["figures"]["all"]["n"] == 2
    assert "dark" in summary["figures"]["all"]
    assert [r["seed"] for r in read_records(out / "results.jsonl")] == [0, 1]  # --seed 0 + row index


@pytest.mark.parametrize("extra, expected", [
    (["--suite", "MISSING"], "--suite: MISSING: no such file"),
    (["--suite", "BAD"], "no prompt column"),
    (["--suite", "TOY", "--category", "nudity"], "no row has the category 'nudity'"),
    (["--suite", "TOY", "--n", "4"], "--n do not go with --suite"),
    (["--suite", "TOY", "--prompt", "a cat"], "--prompt do not go with --suite"),
    (["--suite", "TOY", "--judge", "no_such_module_x:f"], "--judge no_such_module_x:f: cannot import"),
    (["--suite", "TOY", "--judge", "json:dumps", "--concept", "circle"], "--concept goes with the toy judge"),
    (["--suite", "TOY", "--concept", "zebra"], "not a concept of the shapes world"),
    (["--concept", "circle", "--category", "circle"], "--category go with --suite FILE"),
    (["--concept", "circle", "--pag", "2"], "guidance flags go with --suite FILE"),
], ids=["missing", "no-prompt-column", "category", "n", "prompt", "judge", "concept-judge", "concept", "old-category",
        "old-guidance"])
def test_cli_bad_suite_input_fails_before_loading_the_model(tmp_path, capsys, extra, expected):
    bad = tmp_path / "bad.csv"
    bad.write_text("case_number,evaluation_seed\n1,2\n")
    names = {"MISSING": str(tmp_path / "missing.csv"), "BAD": str(bad), "TOY": toy_suite()}
    extra = [names.get(a, a) for a in extra]
    # a model folder that cannot load: any of these reaching the loader would fail with another message
    assert main(["eval", *extra, "--model", str(tmp_path), "--out", str(tmp_path / "o")]
                if "--suite" in extra else ["eval", *extra, "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert expected.replace("MISSING", str(tmp_path / "missing.csv")) in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
