#!/usr/bin/env python
"""Erasure efficacy on the embedded toy model; writes its BENCHMARKS.md section and a before/after grid.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/erasure_efficacy.py [--n 64] [--only circle]

For each (concept, method) row: train with the toy preset (``unsee.toy.preset_settings("toy", ...)``), time it, then
measure with the judge, before and after, (a) the concept's presence on ``n`` prompts that name it and
(b) the judge's accuracy on ``n`` prompts that do not name it (25 DDIM steps, CFG 5, fixed seeds).
Bars (issue 7): presence after <= 10% (from >= 90%), accuracy drop <= 5 points, <= 3 minutes per erasure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, hardware, write_section  # noqa: E402

import unsee  # noqa: E402
from unsee.erasure import make_trainer  # noqa: E402
from unsee.jobs import before_after_grid  # noqa: E402
from unsee.toy import world  # noqa: E402
from unsee.toy.evaluation import evaluate_erasure  # noqa: E402
from unsee.toy.judge import Judge  # noqa: E402
from unsee.toy.presets import preset_settings  # noqa: E402

ROWS = [("circle", "esd-x"), ("circle", "salun"), ("red", "esd-x"), ("red", "salun"), ("striped", "esd-x"), ("striped", "salun")]
EVAL_SEED = 1234  # other than the training seed, so evaluation prompts and noise are fresh


def world_prompts_text(prompts) -> str:
    """A list of world prompts in a settings line: how many there are."""
    return f"{len(prompts)} world prompt{'' if len(prompts) == 1 else 's'}"


def figures(pipe, concept: str, n: int, judge) -> dict:
    named, others = evaluate_erasure(pipe, concept, n=n, seed=EVAL_SEED, judge=judge)
    accuracy = others.accuracy
    own, _ = world.concept_attribute(concept)
    return {"presence": named.presence, "accuracy": accuracy, "mean_accuracy": sum(accuracy.values()) / len(accuracy),
            "named_accuracy": {k: v for k, v in named.accuracy.items() if k != own}}


def erase_and_measure(pipe, concept: str, method: str, n: int, judge, workdir: Path,
                      overrides: Optional[dict] = None) -> tuple[dict, object]:
    """Train ``method`` on ``concept`` with the toy preset (``overrides``: config fields over it), time it, save the
    adapter under ``workdir``, measure with it loaded (``after``: presence, accuracy on other prompts, and
    ``named_accuracy``: the attributes the concept does not own, judged on the prompts that name it). Returns the
    row and the adapter."""
    settings = preset_settings("toy", method, concept=concept, settings=overrides)
    trainer = make_trainer(method, concept=concept, **settings)
    started, cpu_started = time.perf_counter(), time.process_time()
    adapter = trainer.train(pipe)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    suffix = "".join(f"-{k}-{v}" for k, v in sorted((overrides or {}).items()))
    path = workdir / f"{method}-{concept}{suffix}.safetensors"
    adapter.save(path)
    name = pipe.load_erasure(path)
    after = figures(pipe, concept, n, judge)
    pipe.unload_erasure(name)
    row = {"concept": concept, "method": method, "seconds": seconds, "cpu_seconds": cpu_seconds, "after": after,
           "adapter_bytes": path.stat().st_size, "path": str(path), "settings": settings}
    return row, adapter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64, help="images per prompt set")
    parser.add_argument("--only", default=None, help="run only the rows of this concept")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    pipe = unsee.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    judge = Judge.load().predict

    rows = [r for r in ROWS if args.only in (None, r[0])]
    baseline = {concept: figures(pipe, concept, args.n, judge) for concept in dict.fromkeys(c for c, _ in rows)}
    results, grids = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for concept, method in rows:
            row, adapter = erase_and_measure(pipe, concept, method, args.n, judge, Path(tmp))
            results.append({**row, "before": baseline[concept]})
            grids.append(np.asarray(before_after_grid(pipe, adapter, world.concept_prompts(concept, EVAL_SEED, 8))))
            print(json.dumps(results[-1], default=float), flush=True)

    ok = lambda flag: "yes" if flag else "**no**"  # noqa: E731
    lines = ["| concept | method | presence before → after | accuracy on other prompts before → after (change) "
             "| training time | adapter | bars met |", "|---|---|---|---|---|---|---|"]
    for r in results:
        before, after = r["before"], r["after"]
        drop = 100 * (before["mean_accuracy"] - after["mean_accuracy"])
        met = (after["presence"] <= 0.10 and before["presence"] >= 0.90 and drop <= 5 and r["seconds"] <= 180)
        lines.append(
            f"| {r['concept']} | {r['method']} | {before['presence']:.1%} → {after['presence']:.1%} "
            f"| {before['mean_accuracy']:.1%} → {after['mean_accuracy']:.1%} ({-drop:+.1f} pts) "
            f"| {r['seconds']:.0f} s | {r['adapter_bytes'] / 2**20:.2f} MB | {ok(met)} |")
    def shown(value):
        return world_prompts_text(value) if isinstance(value, (list, tuple)) else value

    settings = "; ".join(f"{r['method']} {r['concept']}: " + ", ".join(f"{k}={shown(v)}" for k, v in r["settings"].items())
                         for r in results)
    grid_path = ROOT / "benchmarks" / "erasure_before_after.png"
    grid = Image.fromarray(np.concatenate(grids, axis=0))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(grid_path)
    body = f"""## Erasure efficacy on the toy model (`benchmarks/erasure_efficacy.py`)

Hardware: {hardware()}.

Presence: share of {args.n} images, from prompts that name the concept, in which the judge sees it.
Accuracy: the judge's mean per-attribute accuracy on {args.n} prompts that do not name the concept.
25 DDIM steps, CFG 5, evaluation seed {EVAL_SEED}. Bars: presence ≤ 10% (from ≥ 90%), accuracy drop ≤ 5 points,
training ≤ 3 minutes. Settings: the toy preset (`unsee erase --preset toy`, the default on the toy model;
`erase_from`: prompts that name the concept, `preserve`: prompts that name its siblings, the other prompt lists:
SalUn's, ANT's and AdvUnlearn's prompt sets; see `unsee/toy/presets.py`): {settings}.

{chr(10).join(lines)}

Before (top) and after (bottom) each erasure, same seeds; one pair of rows per table row, in order.

![erasure before/after](benchmarks/erasure_before_after.png)
"""
    if not args.no_write:
        write_section("erasure", body)
    print(body)


if __name__ == "__main__":
    main()
