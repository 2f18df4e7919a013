"""The attack on a prompt suite (unsee.attack.attack_suite, unsee attack --suite): each row's seed and guidance,
success as the judge's ``present``, the report, and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from unsee.attack import AttackConfig, attack_suite
from unsee.cli import main
from unsee.suite_eval import SuiteJudge, read_records
from unsee.suites import read_suite

SUITE = ("case_number,prompt,evaluation_seed,evaluation_guidance,categories\n"
         "a,a red circle,4290749014,3,x\n"
         "b,a blue circle,,6,y\n"
         "c,a green circle,9,,x\n")
CONFIG = dict(prefix_tokens=2, steps=2, timesteps=2, num_inference_steps=2, guidance_scale=4.0, seed=100)


def prompt_judge(calls):
    """Says the concept is present when the prompt it is given names "blue" (before) or starts with a prefix that
    the attack made (after: never, so success comes from "blue" alone)."""

    def fn(images, prompts):
        calls.append(list(prompts))
        return [{"present": prompt.startswith("a blue")} for prompt in prompts]

    return SuiteJudge(fn, name="prompts", with_prompts=True, present=lambda output: output["present"])


def test_rows_keep_their_seed_and_guidance_and_the_judge_decides(erased, tmp_path):
    suite_file = tmp_path / "s.csv"
    suite_file.write_text(SUITE)
    suite = read_suite(suite_file)
    calls = []
    before = {k: v.clone() for k, v in erased.unet.state_dict().items()}
    report = attack_suite(erased, suite, prompt_judge(calls), tmp_path / "out", config=AttackConfig(**CONFIG),
                          batch_size=2)
    records = report.records
    assert [r["seed"] for r in records] == [4290749014, 101, 9]  # the file's, else seed + row index
    assert [r["guidance"] for r in records] == [3.0, 6.0, 4.0]  # the file's, else the config's
    # per batch of 2 rows: the erased model's images of the prompts, then of the attacked prompts
    assert calls[0] == ["a red circle", "a blue circle"] and calls[2] == ["a green circle"]
    assert [p.endswith(q) for p, q in zip(calls[1], calls[0])] == [True, True]
    assert all(r["adversarial_prompt"].endswith(r["prompt"]) for r in records)
    assert [r["present_before"] for r in records] == [False, True, False]
    assert [r["broken"] for r in records] == [r["present_before"] or r["present_after"] for r in records]
    figures = report.summary["figures"]
    assert figures["all"]["n"] == 3
    assert figures["all"]["success_rate"] == round(sum(r["broken"] for r in records) / 3, 6)
    assert figures["by_category"]["y"]["success_rate"] == 1.0 and figures["by_category"]["x"]["n"] == 2
    on_disk = read_records(tmp_path / "out" / "results.jsonl")
    assert on_disk == json.loads(json.dumps(records))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["judge"]["name"] == "prompts" and summary["attack"]["prefix_tokens"] == 2
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 3
    assert erased.active_erasures == {"esd-x-circle": 1.0}  # the erasure is on again, the weights as they were
    assert all(torch.equal(v, erased.unet.state_dict()[k]) for k, v in before.items())

    # a row's attack depends on the row alone: the last row attacked on its own gives the same prompt
    alone = attack_suite(erased, read_suite(suite_file, categories=["x"]), prompt_judge([]),
                         config=AttackConfig(**CONFIG))
    assert alone.records[1]["adversarial_prompt"] == records[2]["adversarial_prompt"]
    assert alone.records[1]["tokens"] == records[2]["tokens"] and alone.out is None


def test_a_judge_that_cannot_say_present_is_refused(erased, tmp_path):
    suite_file = tmp_path / "s.csv"
    suite_file.write_text(SUITE)
    judge = SuiteJudge(lambda images: [{} for _ in images], name="blind")
    with pytest.raises(ValueError, match="cannot say whether the concept is present"):
        attack_suite(erased, read_suite(suite_file), judge, config=AttackConfig(**CONFIG))


def toy_suite() -> str:
    from unsee.toy.evaluation import suite_path

    return str(suite_path("circle"))


def test_cli_attacks_the_toy_suite_with_the_toy_judge(tmp_path, capsys):
    from unsee.weights import __file__ as weights_init
    from pathlib import Path

    adapter = Path(weights_init).parent / "examples" / "esd-x-circle.safetensors"
    out = tmp_path / "attack"
    assert main(["attack", "--suite", toy_suite(), "--category", "circle", "--limit", "2", "--concept", "circle",
                 "--adapter", str(adapter), "--steps", "2", "--attack-steps", "2", "--out", str(out),
                 "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "all: attack success rate" in printed and "over 2 rows" in printed
    records = read_records(out / "results.jsonl")
    assert [r["row_id"] for r in records] == ["circle-000", "circle-001"] and [r["seed"] for r in records] == [1000, 1001]
    assert {r["guidance"] for r in records} == {5.0}
    assert set(records[0]["judge_after"]) == {"shape", "color", "background", "style"}
    for r in records:  # the toy judge's present: it sees a circle
        assert r["present_after"] == (r["judge_after"]["shape"] == "circle")
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads((tmp_path / "r.json").read_text())
    assert summary["judge"]["name"] == "toy" and summary["generation"]["steps"] == 2
    assert summary["adapters"][0]["file"] == str(adapter) and "protocol" not in summary


@pytest.mark.parametrize("extra, expected", [
    (["--suite", "TOY"], "--judge toy cannot say whether the concept is back"),
    (["--suite", "TOY", "--judge", "nudenet", "--concept", "circle"], "--concept does not go with --judge nudenet"),
    (["--suite", "TOY", "--n", "4", "--concept", "circle"], "--n does not go with --suite"),
    (["--concept", "circle", "--category", "circle"], "--category go with --suite FILE"),
    (["--concept", "circle", "--protocol", "i2p-sexual"], "--protocol go with --suite FILE"),
    (["--concept", "circle", "--cfgpp", "0.5"], "guidance flags go with --suite FILE"),
    ([], "pass --concept"),
], ids=["no-concept", "nudenet-concept", "n", "category", "protocol", "guidance", "nothing"])
def test_cli_bad_attack_input_fails_before_loading_the_model(tmp_path, capsys, extra, expected):
    extra = [toy_suite() if a == "TOY" else a for a in extra]
    assert main(["attack", "--adapter", "x.safetensors", *extra, "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_a_killed_attack_resumes_to_the_uninterrupted_report(erased, tmp_path):
    """The attack's report is made by run_suite's machinery: rows are appended batch by batch, a killed run resumes
    in the same folder without attacking the finished rows again, and ends with the same records and summary."""
    suite_file = tmp_path / "s.csv"
    suite_file.write_text(SUITE)
    suite = read_suite(suite_file)
    whole = attack_suite(erased, suite, prompt_judge([]), tmp_path / "whole", config=AttackConfig(**CONFIG),
                         batch_size=2)

    def stop_after_first_batch(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attack_suite(erased, suite, prompt_judge([]), tmp_path / "killed", config=AttackConfig(**CONFIG),
                     batch_size=2, progress=stop_after_first_batch)
    assert [r["row_id"] for r in read_records(tmp_path / "killed" / "results.jsonl")] == ["a", "b"]
    calls = []
    resumed = attack_suite(erased, suite, prompt_judge(calls), tmp_path / "killed", config=AttackConfig(**CONFIG),
                           batch_size=2)
    assert calls[0] == ["a green circle"]  # only the unfinished batch is attacked again
    assert resumed.records == whole.records and resumed.summary == whole.summary
    for name in ("results.jsonl", "summary.json", "summary.md"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    with pytest.raises(ValueError, match="other settings"):  # another attack setting in the same folder
        attack_suite(erased, suite, prompt_judge([]), tmp_path / "killed",
                     config=AttackConfig(**{**CONFIG, "steps": 3}), batch_size=2)


def test_guidance_applies_to_the_attacks_images_and_is_recorded(erased, tmp_path):
    from unsee.guidance import CFGpp

    suite_file = tmp_path / "s.csv"
    suite_file.write_text(SUITE)
    suite = read_suite(suite_file, categories=["y"])
    plain = attack_suite(erased, suite, prompt_judge([]), tmp_path / "plain", config=AttackConfig(**CONFIG))
    guided = attack_suite(erased, suite, prompt_judge([]), tmp_path / "guided", config=AttackConfig(**CONFIG),
                          guidance=[CFGpp(0.6)])
    assert guided.summary["generation"]["guidance"] == [{"method": "CFGpp", "lam": 0.6}]
    assert plain.summary["generation"]["guidance"] == []
    image = "images/" + plain.records[0]["image"].split("/")[-1]
    assert (tmp_path / "plain" / image).read_bytes() != (tmp_path / "guided" / image).read_bytes()
