#!/usr/bin/env python
"""NAG versus NASA on the embedded toy model: how much of a negative's attribute each removes, and at what cost.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/nag_vs_nasa.py [--n 64] [--seed 0]

Writes the "nag-vs-nasa" section of BENCHMARKS.md. Two negatives, each on prompts that name it (the hard case, as
guidance_efficacy's NASA rows: the attribute is asked for by the prompt and must be pushed out by the negative):
- "red" on "a red <shape> on a <background> background";
- "striped" on "a striped <colour> <shape> on a <background> background";
shapes, colours and backgrounds cycle over the n prompts. Settings: 4 and 25 DDIM steps, guidance_scale 1 (no CFG:
one UNet pass per step) and 5 (CFG with the empty prompt as unconditional branch). Rows: no negative; diffusers'
negative prompt (CFG's unconditional branch, so CFG 5 only: at guidance_scale 1 it does nothing); NASA at its
default alpha 0.3 and at 0.6; NAG at its defaults (scale 5, tau 2.5, alpha 0.5), at scale 10, and at scale 10 with
the cap and blend loosened (tau 5, alpha 1: the scale alone barely matters once the norm cap binds). The same prompts
and seed in every row of a (negative, steps) block, so rows differ only by the guidance.

Figures per row (toy judge):
- removed: share of images in which the judge does not read the negative's attribute value;
- the prompt's other attributes: share right (shape, background; and colour for "striped");
- recognisable: the judge reads a shape (not "none") with probability >= 0.9;
- clean corners: the four 6x6 corners within 24 levels of the named background's colour (no shape reaches them,
  so a change there is damage the judge, trained on clean renders, can miss).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, write_section  # noqa: E402

import unsee  # noqa: E402
from unsee.evaluation import generate_images  # noqa: E402
from unsee.guidance import NAG, NASA  # noqa: E402
from unsee.toy import world  # noqa: E402
from unsee.toy.judge import Judge, to_judge_input  # noqa: E402


def prompts_for(negative: str, n: int) -> list[str]:
    prompts = []
    for i in range(n):
        shape, background = world.SHAPES[i % 6], world.BACKGROUNDS[(i // 6) % 3]
        if negative == "red":
            prompts.append(world.prompt_for(shape=shape, color="red", background=background))
        else:  # colour shifted by one every six prompts: the 36 shape-colour pairs in 36 prompts
            color = world.COLORS[(i + i // 6) % 6]
            prompts.append(world.prompt_for(shape=shape, color=color, background=background, style="striped"))
    return prompts


def clean_corners(images, backgrounds: list[str], tolerance: int = 24) -> np.ndarray:
    arrays = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    corners = np.concatenate([arrays[:, :6, :6], arrays[:, :6, -6:], arrays[:, -6:, :6], arrays[:, -6:, -6:]], axis=1)
    expected = np.array([world.BACKGROUND_RGB[b] for b in backgrounds], dtype=np.float32)[:, None, None, :]
    return np.abs(corners - expected).max(axis=(1, 2, 3)) <= tolerance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 25])
    parser.add_argument("--no-write", action="store_true", help="print the section without writing BENCHMARKS.md")
    args = parser.parse_args()
    n, seed = args.n, args.seed
    pipe = unsee.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    judge = Judge.load().eval()
    none = world.ATTRIBUTE_VALUES["shape"].index(world.NO_SHAPE)

    methods = [
        ("no negative", None, lambda: None),
        ("negative prompt (CFG only)", "cfg", lambda: None),
        ("NASA α=0.3 (default)", "attn", lambda: [NASA(0.3)]),
        ("NASA α=0.6", "attn", lambda: [NASA(0.6)]),
        ("NAG scale 5 (default)", "attn", lambda: [NAG()]),
        ("NAG scale 10", "attn", lambda: [NAG(10.0)]),
        ("NAG scale 10, τ=5, α=1", "attn", lambda: [NAG(10.0, tau=5.0, alpha=1.0)]),
    ]
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    references = []
    for negative in ("red", "striped"):
        parsed = [world.parse_prompt(p) for p in prompts_for(negative, n)]
        renders = [world.render(world.sample_scene(rng, **p)) for p in parsed]
        references.append(clean_corners(renders, [p["background"] for p in parsed]))
    reference_corners = float(np.concatenate(references).mean())
    tables = {}
    for negative, attribute in (("red", "color"), ("striped", "style")):
        prompts = prompts_for(negative, n)
        parsed = [world.parse_prompt(p) for p in prompts]
        others = [a for a in ("shape", "color", "background") if a != attribute]
        rows = []
        for steps in args.steps:
            for cfg in (1.0, 5.0):
                for name, kind, guidance in methods:
                    if kind == "cfg" and cfg == 1.0:
                        continue  # diffusers' negative prompt lives in CFG's unconditional branch
                    kwargs = dict(guidance_scale=cfg)
                    if kind is not None:
                        kwargs["negative_prompt"] = negative
                    if kind == "attn":
                        kwargs["guidance"] = guidance()
                    t0 = time.perf_counter()
                    images = generate_images(pipe, prompts, seed=seed, num_inference_steps=steps, **kwargs)
                    seconds = time.perf_counter() - t0
                    with torch.no_grad():
                        logits = judge(to_judge_input(images))
                    judged = {a: [world.ATTRIBUTE_VALUES[a][i] for i in logits[a].argmax(-1).tolist()] for a in world.ATTRIBUTES}
                    removed = np.mean([v != negative for v in judged[attribute]])
                    right = {a: np.mean([j == p[a] for j, p in zip(judged[a], parsed)]) for a in others}
                    conf, index = logits["shape"].softmax(-1).max(-1)
                    recognisable = float(((conf >= 0.9) & (index != none)).float().mean())
                    corners = clean_corners(images, [p["background"] for p in parsed]).mean()
                    rows.append(f"| {steps} | {cfg:g} | {name} | {removed:.1%} | "
                                + " | ".join(f"{right[a]:.1%}" for a in others)
                                + f" | {recognisable:.1%} | {corners:.1%} | {seconds / n:.3f} |")
                    print(negative, rows[-1], flush=True)
        header = ("| steps | CFG | setting | removed | " + " | ".join(f"{a} right" for a in others)
                  + " | recognisable | clean corners | s / image |")
        tables[negative] = "\n".join([header, "|" + "---|" * (header.count("|") - 1), *rows])
    total = time.perf_counter() - start

    body = f"""## NAG versus NASA on the toy model (`benchmarks/nag_vs_nasa.py`)

Hardware: {hardware()}. {n} samples per row, seed {seed} (same prompts and starting noise in every
row of a table), DDIM at {" and ".join(map(str, args.steps))} steps; whole run {total / 60:.1f} min.

Both negatives are named by the prompt, so the negative has to push out what the prompt asks for. CFG 1 is one UNet
pass per step (the few-step, distilled-model regime NASA and NAG target); at CFG 5 the unconditional branch holds the
empty prompt for NASA and NAG, and the negative for "negative prompt (CFG only)", which at CFG 1 would do nothing
and is left out. NASA: Z = Z⁺ − αZ⁻ in every cross-attention layer. NAG: Z̃ = sZ⁺ − (s−1)Z⁻, L1 norm ratio capped
at τ = 2.5 (5 in the last row), blended back with α = 0.5 (1 in the last row: no blend). "removed": the judge does
not read the negative's value; "right": the prompt's other attributes as the judge reads them; "recognisable": the
judge reads a shape with probability ≥ 0.9; "clean corners": the four corners keep the named background's colour
(within 24 levels; ground-truth renders of the same prompts: {reference_corners:.0%}, so the model's own rate, with
no negative, is the baseline to compare against).

Negative "red" on "a red <shape> on a <background> background":

{tables["red"]}

Negative "striped" on "a striped <colour> <shape> on a <background> background":

{tables["striped"]}
"""
    if not args.no_write:
        write_section("nag-vs-nasa", body)
    print(body)


if __name__ == "__main__":
    main()
