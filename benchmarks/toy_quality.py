#!/usr/bin/env python
"""Quality and speed of the embedded toy model, measured with the judge; writes its BENCHMARKS.md section.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/toy_quality.py [--n 240]

- prompt accuracy: 25 DDIM steps, CFG 5, n prompts naming shape, colour and background (fixed seed);
- unconditional coverage: n samples from the empty prompt without guidance, share of each shape;
- sampling time: 25 steps with CFG, batch 8, median of 5 calls after a warm-up;
- training time: from weights/toy/training_report.json;
- a grid of samples per prompt: benchmarks/toy_samples.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, hardware, write_section  # noqa: E402

import unsee  # noqa: E402
from unsee.evaluation import generate_images  # noqa: E402
from unsee.toy import evaluate, world  # noqa: E402
from unsee.toy.judge import Judge  # noqa: E402
from unsee.toy.model import TOY_MODEL_DIR  # noqa: E402

GRID_PROMPTS = [
    "a red circle on a gray background", "a blue square on a white background", "a green triangle on a black background",
    "a striped yellow star on a gray background", "a purple cross on a white background",
    "an orange heart on a black background", "a striped blue ball", "an empty gray background",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = unsee.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    judge = Judge.load()

    prompts = world.attribute_prompts(seed=2025, n=args.n)
    t0 = time.perf_counter()
    result = evaluate(pipe, prompts, judge=judge.predict, n=args.n, seed=args.seed)
    eval_seconds = time.perf_counter() - t0

    uncond = generate_images(pipe, [""] * args.n, seed=args.seed + 1, num_inference_steps=25, guidance_scale=1.0)
    shapes = Counter(p["shape"] for p in judge.predict(uncond))
    coverage = {s: shapes.get(s, 0) / args.n for s in world.SHAPES + (world.NO_SHAPE,)}

    batch = GRID_PROMPTS[:8]
    generator = torch.Generator().manual_seed(0)
    pipe(batch, num_inference_steps=25, guidance_scale=5.0, generator=generator)  # warm-up
    timings = []
    for _ in range(5):
        t0 = time.perf_counter()
        pipe(batch, num_inference_steps=25, guidance_scale=5.0, generator=generator)
        timings.append(time.perf_counter() - t0)
    sampling = statistics.median(timings)

    rows = []
    for prompt in GRID_PROMPTS:
        images = generate_images(pipe, [prompt] * 8, seed=args.seed, num_inference_steps=25, guidance_scale=5.0)
        rows.append(np.concatenate([np.asarray(im) for im in images], axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(ROOT / "benchmarks" / "toy_samples.png")

    report = json.loads((TOY_MODEL_DIR / "training_report.json").read_text())
    stages = report["seconds_per_stage"]
    size_mb = sum(p.stat().st_size for p in TOY_MODEL_DIR.rglob("*") if p.is_file()) / 2**20
    acc = result.accuracy
    ok = lambda flag: "yes" if flag else "**no**"  # noqa: E731
    body = f"""## Toy model quality and speed (`benchmarks/toy_quality.py`)

Hardware: {hardware()}.

| figure | value | bar | met |
|---|---|---|---|
| shape matches the prompt ({args.n} samples, 25 DDIM steps, CFG 5) | {acc['shape']:.1%} | ≥ 90% | {ok(acc['shape'] >= 0.9)} |
| colour matches the prompt | {acc['color']:.1%} | ≥ 90% | {ok(acc['color'] >= 0.9)} |
| background matches the prompt | {acc['background']:.1%} | ≥ 90% | {ok(acc['background'] >= 0.9)} |
| rarest shape among {args.n} unconditional samples (no guidance) | {min(coverage[s] for s in world.SHAPES):.1%} | ≥ 5% | {ok(min(coverage[s] for s in world.SHAPES) >= 0.05)} |
| sampling time, 25 steps with CFG, batch 8 (median of 5) | {sampling:.2f} s | < 3 s | {ok(sampling < 3)} |
| training time (data {stages.get('data', 0):.0f} s, VAE {stages.get('vae', 0):.0f} s, UNet + text encoder {stages.get('unet', 0):.0f} s, judge {stages.get('judge', 0):.0f} s) | {report['total_minutes']:.1f} min | ≤ 90 min | {ok(report['total_minutes'] <= 90)} |
| weights in `weights/toy` | {size_mb:.1f} MB | ≤ 20 MB (with judge) | {ok(size_mb <= 20)} |

Unconditional shape frequencies: {', '.join(f'{s} {v:.1%}' for s, v in coverage.items())}.
Evaluating {args.n} prompts took {eval_seconds:.0f} s.

Samples, 8 per prompt (25 DDIM steps, CFG 5, seed {args.seed}); rows: {'; '.join(GRID_PROMPTS)}.

![toy samples](benchmarks/toy_samples.png)
"""
    write_section("toy", body)
    print(body)


if __name__ == "__main__":
    main()
