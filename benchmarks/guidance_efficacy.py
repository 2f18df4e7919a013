#!/usr/bin/env python
"""Efficacy of the guidance methods on the embedded toy model, measured with the judge.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/guidance_efficacy.py [--n 64]

Writes the "guidance" section of BENCHMARKS.md and benchmarks/guidance_grid.png. Figures:
- prompt accuracy (shape, colour, background) on prompts naming all three, 25 DDIM steps;
- saturation: mean HSV saturation of the generated images and the share of colour channels
  clipped at 0 or 255 (colour blow-out), against the same figures for ground-truth renders;
- unconditional samples: "recognisable" = the judge reads a shape (not "none") with probability >= 0.9;
- delayed negative: "a red circle on a gray background" with negative "circle", as a negative prompt
  from several starts and as Dynamic Negative Guidance from several starts, beside the conditional
  prediction alone (what a negative prompt leaves of the circle) and NASA at alpha 2;
- NASA: "a red <shape>" prompts with negative "red", few-step sampling without CFG.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, hardware, write_section  # noqa: E402

import unsee  # noqa: E402
from unsee.evaluation import generate_images  # noqa: E402
from unsee.guidance import CFG, FDG, NASA, PAG, CFGpp, NegativeSteer  # noqa: E402
from unsee.toy import world  # noqa: E402
from unsee.toy.evaluation import score  # noqa: E402
from unsee.toy.judge import Judge, to_judge_input  # noqa: E402


def saturation(images) -> tuple[float, float]:
    arrays = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    high, low = arrays.max(-1), arrays.min(-1)
    sat = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    clipped = ((arrays <= 0.0) | (arrays >= 1.0)).mean()
    return float(sat.mean()), float(clipped)


def gray_corners(images, tolerance: int = 24) -> np.ndarray:
    """Per image: are its four 6x6 corners still the world's gray? No shape reaches them (radius <= 23 px,
    centre within 6 px of the middle), so a change there is damage to the background, which the judge,
    trained on clean renders only, can miss."""
    arrays = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    corners = np.concatenate([arrays[:, :6, :6], arrays[:, :6, -6:], arrays[:, -6:, :6], arrays[:, -6:, -6:]], axis=1)
    return np.abs(corners - np.float32(world.BACKGROUND_RGB["gray"])).max(axis=(1, 2, 3)) <= tolerance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n, seed = args.n, args.seed
    pipe = unsee.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    judge = Judge.load()
    prompts = world.attribute_prompts(seed=77, n=n)
    rng = np.random.default_rng(77)
    reference = [world.render(world.sample_scene(rng, **world.parse_prompt(p))) for p in prompts]
    ref_sat, ref_clip = saturation(reference)

    rows = []
    configs = [
        ("CFG 2", dict(guidance_scale=2.0)),
        ("CFG 5", dict(guidance_scale=5.0)),
        ("CFG 12", dict(guidance_scale=12.0)),
        ("CFG++ λ=0.6", dict(guidance=[CFGpp(0.6)])),
        ("FDG (12, 2)", dict(guidance=[FDG((12.0, 2.0))])),
        ("FDG (2, 12), bands reversed", dict(guidance=[FDG((2.0, 12.0))])),
        ("CFG 5 + PAG 3", dict(guidance=[CFG(5.0), PAG(3.0)])),
    ]
    grid = []
    for name, kwargs in configs:
        t0 = time.perf_counter()
        images = generate_images(pipe, prompts, seed=seed, num_inference_steps=25, **kwargs)
        seconds = time.perf_counter() - t0
        accuracy, _ = score(prompts, judge.predict(images))
        sat, clip = saturation(images)
        rows.append(f"| {name} | {accuracy['shape']:.1%} | {accuracy['color']:.1%} | {accuracy['background']:.1%} | "
                    f"{sat:.3f} | {clip:.2%} | {seconds / n:.2f} |")
        grid.append(np.concatenate([np.asarray(im) for im in images[:8]], axis=1))
    quality = "\n".join(rows)

    def recognisable(images) -> float:
        with torch.no_grad():
            probs = judge(to_judge_input(images))["shape"].softmax(-1)
        conf, index = probs.max(-1)
        none = world.ATTRIBUTE_VALUES["shape"].index(world.NO_SHAPE)
        return float(((conf >= 0.9) & (index != none)).float().mean())

    uncond = {}
    for name, kwargs in [("no guidance", dict(guidance_scale=1.0)), ("PAG 3", dict(guidance_scale=1.0, guidance=[PAG(3.0)])),
                         ("PAG 5", dict(guidance_scale=1.0, guidance=[PAG(5.0)]))]:
        uncond[name] = recognisable(generate_images(pipe, [""] * n, seed=seed + 1, num_inference_steps=25, **kwargs))

    target = "a red circle on a gray background"
    negative_rows = []
    cfg5 = dict(guidance_scale=5.0, negative_prompt="circle")
    settings = [("no negative", dict(guidance_scale=5.0)),
                # what a negative prompt leaves of the circle, named by both prompts: no guidance, weight 1
                ("conditional prediction alone (no CFG)", dict(guidance_scale=1.0)),
                ("negative from step 0", cfg5),
                ("negative from 20%", dict(cfg5, guidance=[NegativeSteer(start_fraction=0.2)])),
                ("negative from 40%", dict(cfg5, guidance=[NegativeSteer(start_fraction=0.4)])),
                ("adaptive start", dict(cfg5, guidance=[NegativeSteer(mode="adaptive")]))]
    for scale in (3.0, 10.0):
        settings += [(f"DNG λ={scale:g} from {start:.0%}", dict(cfg5, guidance=[NegativeSteer(start_fraction=start, mode="dng", dng_scale=scale)]))
                     for start in (0.0, 0.1, 0.2)]
    settings.append(("NASA α=2, no CFG", dict(guidance_scale=1.0, negative_prompt="circle", guidance=[NASA(2.0)])))
    measured = {}  # per setting: no circle, gray background (judge), gray corners (pixels)
    shapes_drawn = {}  # what the judge reads in place of the circle, per setting
    for name, kwargs in settings:
        images = generate_images(pipe, [target] * n, seed=seed + 2, num_inference_steps=25, **kwargs)
        judged = judge.predict(images)
        no_circle = np.array([j["shape"] != "circle" for j in judged])
        gray = np.array([j["background"] == "gray" for j in judged])
        corners = gray_corners(images)
        measured[name] = {"no_circle": no_circle.mean(), "gray": gray.mean(), "corners": corners.mean()}
        shapes_drawn[name] = sorted({j["shape"] for j in judged} - {"circle"})
        negative_rows.append(f"| {name} | {no_circle.mean():.1%} | {gray.mean():.1%} | {corners.mean():.1%} | "
                             f"{(no_circle & corners).mean():.1%} |")
        grid.append(np.concatenate([np.asarray(im) for im in images[:8]], axis=1))
    adaptive = pipe(target, negative_prompt="circle", guidance_scale=5.0, num_inference_steps=25, num_images_per_prompt=8,
                    generator=torch.Generator().manual_seed(seed + 2), output_type="latent",
                    guidance=[NegativeSteer(mode="adaptive")])
    started = [step for step in adaptive.guidance_report.negative_start_steps if step is not None]

    def spread(names: list[str], key: str, scale: float = 1.0, offset: float = 0.0, digits: int = 1) -> str:
        """The range of one figure over some rows: "26.6%–51.6%" (one value: "0.0%")."""
        values = sorted(offset + scale * measured[n][key] for n in names)
        low, high = f"{values[0]:.{digits}%}", f"{values[-1]:.{digits}%}"
        return low if low == high else f"{low}–{high}"

    negative_prompt_rows = [name for name, _ in settings if name.startswith("negative from") or name == "adaptive start"]
    dng_rows = [name for name, _ in settings if name.startswith("DNG")]
    nasa_row = "NASA α=2, no CFG"

    red_prompts = [world.prompt_for(shape=world.SHAPES[i % 6], color="red") for i in range(n)]
    nasa_rows = []
    for steps in (1, 2, 4):
        for name, kwargs in [("no negative", dict(guidance_scale=1.0)),
                             ("NASA α=0.3", dict(guidance_scale=1.0, negative_prompt="red", guidance=[NASA(0.3)])),
                             ("NASA α=0.6", dict(guidance_scale=1.0, negative_prompt="red", guidance=[NASA(0.6)]))]:
            calls = []
            handle = pipe.unet.register_forward_pre_hook(lambda module, a: calls.append(1))
            images = generate_images(pipe, red_prompts, seed=seed + 3, num_inference_steps=steps, **kwargs)
            handle.remove()
            judged = judge.predict(images)
            red = sum(j["color"] == "red" for j in judged) / n
            shape_ok = sum(j["shape"] == p["shape"] for j, p in zip(judged, map(world.parse_prompt, red_prompts))) / n
            nasa_rows.append(f"| {steps} | {name} | {red:.1%} | {shape_ok:.1%} | {len(calls) / steps / ((n + 7) // 8):.0f} |")

    from PIL import Image

    picture = Image.fromarray(np.concatenate(grid, axis=0))
    picture.resize((picture.width * 2, picture.height * 2), Image.NEAREST).save(ROOT / "benchmarks" / "guidance_grid.png")
    body = f"""## Guidance efficacy on the toy model (`benchmarks/guidance_efficacy.py`)

Hardware: {hardware()}. {n} samples per row, 25 DDIM steps, seed {seed}.

Prompt accuracy and saturation (prompts naming shape, colour and background). Ground-truth renders of
the same prompts: mean saturation {ref_sat:.3f}, clipped channels {ref_clip:.2%}.

| guidance | shape | colour | background | mean saturation | clipped channels | s / image |
|---|---|---|---|---|---|---|
{quality}

FDG (12, 2) puts the strong scale on the fine band (the paper's order); (2, 12) reverses the bands.

Unconditional samples (empty prompt, no CFG): share the judge recognises (a shape, probability ≥ 0.9):
{', '.join(f'{k} {v:.1%}' for k, v in uncond.items())}.

Delayed negative prompt: "{target}" with negative "circle".

| negative | no circle (judge) | gray background (judge) | gray corners (pixels) | no circle and gray corners |
|---|---|---|---|---|
{chr(10).join(negative_rows)}

The adaptive rule started the negative at steps {min(started)}–{max(started)} of 25 (0-based; one batch of 8 images).
A negative prompt in diffusers' sense replaces the unconditional prediction, so the circle, named by both prompts,
keeps the weight of unguided conditional sampling (the "conditional prediction alone" row: no circle in
{spread(["conditional prediction alone (no CFG)"], "no_circle")}). With a negative prompt from step 0, a later start
or the adaptive start, the judge finds no circle in {spread(negative_prompt_rows, "no_circle")} of the images.
Dynamic Negative Guidance subtracts the negative's direction instead: no circle in {spread(dng_rows, "no_circle")},
the corner pixels damaged in {spread(dng_rows, "corners", -1.0, 1.0, 0)} of the images, while the judge reads a gray
background in {spread(dng_rows, "gray")}. NASA at α=2 (the negative inside cross-attention, at a strength its paper
does not use): no circle in {spread([nasa_row], "no_circle")}, gray corners in {spread([nasa_row], "corners")}; in
place of the circle the judge reads: {", ".join(shapes_drawn[nasa_row]) or "nothing else"}.

NASA on "a red <shape>" prompts with negative "red", no CFG (one UNet pass per step):

| steps | setting | red | shape right | UNet calls per step and batch |
|---|---|---|---|---|
{chr(10).join(nasa_rows)}

Rows of `benchmarks/guidance_grid.png` (8 samples each): the seven quality settings above, then the {len(settings)} negative-prompt settings.

![guidance grid](benchmarks/guidance_grid.png)
"""
    write_section("guidance", body)
    print(body)


if __name__ == "__main__":
    main()
