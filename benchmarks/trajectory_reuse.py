#!/usr/bin/env python
"""Time to erase with and without trajectory reuse on the toy model; writes its BENCHMARKS.md section.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trajectory_reuse.py [--reuse 2,4] [--n 64] [--concept circle]
        [--methods esd-x,esd-u,spm,ant,advunlearn] [--log rows.jsonl]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trajectory_reuse.py --sample-with frozen --methods esd-x,esd-u --reuse 4

For each method that samples x_t with a DDIM run (ESD-x, ESD-u, SPM, ANT, AdvUnlearn), train on the concept with
the toy preset (``unsee.toy.preset_settings("toy", ...)``) with ``trajectory_reuse=1`` (the preset: a new DDIM
trajectory every step) and, right after, with each value of ``--reuse`` (one trajectory serves that many consecutive
steps); time each training (setup included: ANT's saliency mask) and measure, with the adapter
loaded, the concept's presence on ``n`` prompts that name it and the judge's accuracy on ``n`` prompts that do not
(25 DDIM steps, CFG 5, evaluation seed 1234, as ``benchmarks/erasure_methods.py``). Bars (issue 25): presence <= 10%,
accuracy elsewhere at most 3 points below the original model's. ``--log`` keeps finished rows (JSON lines) so that an
interrupted run picks up where it stopped.

``--sample-with frozen`` (ESD only) trains every row with ``sample_with="frozen"`` (x_t sampled by the original model,
whose predictions then also serve as the teacher's at the stops the run steps on from; ``docs/erasure.md``) and
writes its own section, so both samplers' rows stand side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, write_section  # noqa: E402
from erasure_efficacy import EVAL_SEED, erase_and_measure, figures  # noqa: E402

import unsee  # noqa: E402
from unsee.toy.judge import Judge  # noqa: E402

METHODS = ("esd-x", "esd-u", "spm", "ant", "advunlearn")
PRESENCE_BAR, DROP_BAR = 0.10, 3.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reuse", default="2,4", help="comma-separated trajectory_reuse values compared with 1")
    parser.add_argument("--n", type=int, default=64, help="images per prompt set")
    parser.add_argument("--concept", default="circle", help="a concept of the toy world")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--log", type=Path, default=None, help="finished rows (JSON lines); logged rows are not rerun")
    parser.add_argument("--sample-with", choices=("trained", "frozen"), default="trained",
                        help="ESD's sampler of x_t (frozen: its own section)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    values = [int(v) for v in args.reuse.split(",")]
    frozen = args.sample_with == "frozen"
    if frozen and not all(m.startswith("esd") for m in args.methods.split(",")):
        parser.error("--sample-with frozen is an ESD setting: give --methods esd-x,esd-u")
    pipe = unsee.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    judge = Judge.load().predict
    done = [json.loads(line) for line in args.log.read_text().splitlines()] if args.log and args.log.exists() else []

    def logged(method: str, reuse: int):
        return next((r for r in done if (r["concept"], r["method"], r["n"], r["reuse"], r.get("sample_with", "trained"))
                     == (args.concept, method, args.n, reuse, args.sample_with)), None)

    before = next((r["before"] for r in done if (r["concept"], r["n"]) == (args.concept, args.n)), None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for reuse in (1, *values):
                row = logged(method, reuse)
                if row is None:
                    before = before or figures(pipe, args.concept, args.n, judge)
                    row, _ = erase_and_measure(pipe, args.concept, method, args.n, judge, Path(tmp),
                                               {"trajectory_reuse": reuse,
                                                **({"sample_with": "frozen"} if frozen else {})})
                    row.update(reuse=reuse, n=args.n, before=before, sample_with=args.sample_with)
                    print(json.dumps(row, default=float), flush=True)
                    if args.log:
                        with open(args.log, "a") as log:
                            log.write(json.dumps(row, default=float) + "\n")
                rows.append(row)

    def drop(r: dict) -> float:
        return 100 * (r["before"]["mean_accuracy"] - r["after"]["mean_accuracy"])

    def cost(r: dict, one: dict) -> float:
        """Training time as the speed-up compares it: CPU time where both rows have it, else wall-clock time."""
        return r["cpu_seconds"] if "cpu_seconds" in r and "cpu_seconds" in one else r["seconds"]

    lines = ["| method | trajectory_reuse | time to erase (CPU time) | speed-up | presence "
             "| accuracy on other prompts (change) | bars (presence ≤ 10%, drop ≤ 3 pts) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        one = next(x for x in rows if x["method"] == r["method"] and x["reuse"] == 1)
        met = r["after"]["presence"] <= PRESENCE_BAR and drop(r) <= DROP_BAR
        speedup = "" if r["reuse"] == 1 else f"{cost(one, r) / cost(r, one):.2f}×"
        cpu = f" ({r['cpu_seconds']:.0f} s)" if "cpu_seconds" in r else ""
        lines.append(f"| {r['method']} | {r['reuse']} | {r['seconds']:.0f} s{cpu} | {speedup} "
                     f"| {r['before']['presence']:.1%} → {r['after']['presence']:.1%} "
                     f"| {r['after']['mean_accuracy']:.1%} ({-drop(r):+.1f} pts) | {'yes' if met else '**no**'} |")
    settings = "; ".join(f"{r['method']}: steps={r['settings'].get('steps')}, ddim_steps={r['settings'].get('ddim_steps')}"
                         for r in rows if r["reuse"] == 1)
    shown = ", ".join(f"`trajectory_reuse={v}`" for v in values)
    command = f"--reuse {args.reuse}" + (f" --sample-with frozen --methods {args.methods}" if frozen else "")
    sampler = (" Every row samples x_t with the original model (`sample_with=\"frozen\"`), whose predictions at the stops "
               "the run steps on from serve as the teacher's there (not in context: `erase_from` asks the teacher)."
               if frozen else "")
    body = f"""## Trajectory reuse: time to erase on the toy model (`benchmarks/trajectory_reuse.py {command}`)

Hardware: {hardware()}.

Each method trained on "{args.concept}" with the toy preset ({settings}): with `trajectory_reuse=1` (a new DDIM
trajectory for x_t every step, the papers' recipe), then with {shown} (one trajectory serves that many consecutive
steps, each at its own random stop of it). Speed-up: against the `trajectory_reuse=1` row, in the process's CPU
time (one thread: less disturbed than wall-clock time by other work on the machine) where the rows record it. Time to erase: the whole `train` call (ANT's
saliency mask included). Presence: share of {args.n} images, from prompts that name the concept, in which the judge
sees it (before → after); accuracy: the judge's mean per-attribute accuracy on {args.n} prompts that do not name it,
and its change against the original model. 25 DDIM steps, CFG 5, evaluation seed {EVAL_SEED}.{sampler}

{chr(10).join(lines)}
"""
    if not args.no_write:
        write_section("trajectory-reuse-frozen" if frozen else "trajectory-reuse", body)
    print(body)


if __name__ == "__main__":
    main()
