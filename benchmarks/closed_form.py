#!/usr/bin/env python
"""The closed-form methods (UCE, RECE) on the embedded toy model; writes its BENCHMARKS.md section.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/closed_form.py [--n 64] [--attack-n 16] [--no-write]

For UCE and RECE on "circle", with the toy preset: the wall time of ``unsee erase --method M --concept circle
--grid 0`` in a fresh process (Python start, imports, loading the model, the solve, writing the adapter), the
concept's presence on ``n`` prompts that name it and the judge's accuracy on ``n`` prompts that do not (before and
after), the attack success rate of ``unsee attack`` (UnlearnDiffAtk-style, ``attack-n`` prompts, as
``benchmarks/erasure_methods.py``), the adapter's size. Then circle, star, red and striped erased in one solve: each
concept's presence on its own prompts and the accuracy on prompts that name none of them. Bars (issue 25): UCE on
circle: presence <= 10%, accuracy down <= 3 points, under 10 s including loading; four at once: each <= 15%,
accuracy down <= 5 points.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, hardware, write_section  # noqa: E402
from erasure_efficacy import EVAL_SEED, figures  # noqa: E402

import unsee  # noqa: E402
from unsee.adapters import load_adapter  # noqa: E402
from unsee.attack import AttackConfig  # noqa: E402
from unsee.toy import world  # noqa: E402
from unsee.toy.evaluation import attack, evaluate  # noqa: E402
from unsee.toy.judge import Judge  # noqa: E402
from unsee.toy.presets import preset_settings  # noqa: E402

METHODS = ("uce", "rece")
FOUR = ("circle", "star", "red", "striped")


def timed_cli_erase(method: str, concepts: tuple[str, ...], out: Path) -> float:
    """Seconds of ``unsee erase`` in a fresh process, loading included."""
    command = [sys.executable, "-m", "unsee.cli", "erase", "--method", method, "--out", str(out), "--grid", "0"]
    for concept in concepts:
        command += ["--concept", concept]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def unnamed_prompts(concepts: tuple[str, ...], n: int) -> list[str]:
    """``n`` world prompts (shape, colour, background) that name none of ``concepts``."""
    wanted = [world.concept_attribute(c) for c in concepts]
    prompts, seed = [], EVAL_SEED
    while len(prompts) < n:
        for prompt in world.attribute_prompts(seed, 4 * n):
            named = world.parse_prompt(prompt)
            if not any(named.get(a) == v for a, v in wanted) and len(prompts) < n:
                prompts.append(prompt)
        seed += 1
    return prompts


def mean(accuracy: dict) -> float:
    return sum(accuracy.values()) / len(accuracy)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64, help="images per prompt set")
    parser.add_argument("--attack-n", type=int, default=16, help="prompts attacked per row")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    pipe = unsee.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    judge = Judge.load().predict
    rows, settings = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        before = figures(pipe, "circle", args.n, judge)
        for method in METHODS:
            path = Path(tmp) / f"{method}-circle.safetensors"
            seconds = timed_cli_erase(method, ("circle",), path)
            adapter = load_adapter(path)
            settings[method] = {k: v for k, v in preset_settings("toy", method, concept="circle").items()
                                if k != "preserve"}
            name = pipe.load_erasure(path)
            after = figures(pipe, "circle", args.n, judge)
            attacked = attack(pipe, "circle", n=args.attack_n, config=AttackConfig(seed=EVAL_SEED), judge=judge)
            pipe.unload_erasure(name)
            rows.append({"method": method, "seconds": seconds, "solve_seconds": adapter.training["seconds"],
                         "before": before, "after": after, "attack_success": attacked.success_rate,
                         "attack_presence_before": attacked.presence_before, "rank": adapter.rank,
                         "adapter_bytes": path.stat().st_size,
                         "weight_bytes": sum(t.numel() * t.element_size() for t in adapter.tensors.values())})
            print(json.dumps(rows[-1], default=float), flush=True)

        others = unnamed_prompts(FOUR, args.n)
        base_four = evaluate(pipe, others, judge=judge, n=args.n, seed=EVAL_SEED)
        base_presence = {c: evaluate(pipe, concept=c, judge=judge, n=args.n, seed=EVAL_SEED).presence for c in FOUR}
        four = []
        for method in METHODS:
            path = Path(tmp) / f"{method}-four.safetensors"
            seconds = timed_cli_erase(method, FOUR, path)
            adapter = load_adapter(path)
            name = pipe.load_erasure(path)
            presence = {c: evaluate(pipe, concept=c, judge=judge, n=args.n, seed=EVAL_SEED).presence for c in FOUR}
            kept = evaluate(pipe, others, judge=judge, n=args.n, seed=EVAL_SEED)
            pipe.unload_erasure(name)
            four.append({"method": method, "seconds": seconds, "presence": presence, "accuracy": mean(kept.accuracy),
                         "rank": adapter.rank, "adapter_bytes": path.stat().st_size})
            print(json.dumps(four[-1], default=float), flush=True)

    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    yes = (lambda flag: "yes" if flag else "**no**")  # noqa: E731
    lines = ["| method | presence before → after | accuracy on other prompts before → after (change) "
             "| attack success rate (without the attack) | time incl. loading (solve) | adapter: rank, file "
             "(weights / UNet's) | bars: presence ≤ 10%, drop ≤ 3 pts, < 10 s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = 100 * (r["before"]["mean_accuracy"] - r["after"]["mean_accuracy"])
        met = r["after"]["presence"] <= 0.10 and drop <= 3 and r["seconds"] < 10
        lines.append(
            f"| {r['method']} | {r['before']['presence']:.1%} → {r['after']['presence']:.1%} "
            f"| {r['before']['mean_accuracy']:.1%} → {r['after']['mean_accuracy']:.1%} ({-drop:+.1f} pts) "
            f"| {r['attack_success']:.1%} ({r['attack_presence_before']:.1%}) "
            f"| {r['seconds']:.1f} s ({r['solve_seconds']:.2f} s) "
            f"| {r['rank']}, {r['adapter_bytes'] / 2**20:.2f} MB ({r['weight_bytes'] / unet_bytes:.2%}) | {yes(met)} |")
    base_accuracy = mean(base_four.accuracy)
    four_lines = ["| method | " + " | ".join(f"{c} presence" for c in FOUR)
                  + " | accuracy on prompts naming none (change) | time incl. loading | rank | bars: each ≤ 15%, "
                  "drop ≤ 5 pts |", "|---" * (len(FOUR) + 5) + "|"]
    four_lines.append("| (original model) | " + " | ".join(f"{base_presence[c]:.1%}" for c in FOUR)
                      + f" | {base_accuracy:.1%} | | | |")
    for r in four:
        drop = 100 * (base_accuracy - r["accuracy"])
        met = all(p <= 0.15 for p in r["presence"].values()) and drop <= 5
        four_lines.append(f"| {r['method']} | " + " | ".join(f"{r['presence'][c]:.1%}" for c in FOUR)
                          + f" | {r['accuracy']:.1%} ({-drop:+.1f} pts) | {r['seconds']:.1f} s | {r['rank']} "
                          f"| {yes(met)} |")
    shown = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in s.items()) for m, s in settings.items())
    body = f"""## Closed-form erasure: UCE and RECE on the toy model (`benchmarks/closed_form.py`)

Hardware: {hardware()}.

Time: `unsee erase --method M --concept ... --grid 0` in a fresh process, from its start to the adapter written
(Python start, imports, loading the toy model, encoding the prompts, the solve); in brackets the solve's own time
from the adapter's training record. Presence: share of {args.n} images, from prompts that name the concept, in
which the judge sees it. Accuracy: the judge's mean per-attribute accuracy on {args.n} prompts that do not name it.
Attack success rate: `unsee attack` on {args.attack_n} prompts naming the concept (as in the erasure-methods
section). 25 DDIM steps, CFG 5, evaluation seed {EVAL_SEED}. Settings, the toy preset (`unsee/toy/presets.py`;
preserve: "" and up to 16 world prompts naming the concept's siblings and up to 32 naming none of the erased
concepts; guide: the next value of each erased concept's attribute, `closed_form_guides`: circle → square,
star → cross, red → orange, striped → solid): {shown}.

{chr(10).join(lines)}

Four concepts erased in one solve (`unsee erase --method M --concept circle --concept star --concept red --concept
striped`): each concept's presence on {args.n} prompts that name it, and the accuracy on {args.n} prompts (shape,
colour, background) that name none of them.

{chr(10).join(four_lines)}
"""
    if not args.no_write:
        write_section("closed-form", body)
    print(body)


if __name__ == "__main__":
    main()
