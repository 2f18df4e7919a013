#!/usr/bin/env python
"""Does a delayed negative prompt remove what it names and keep the layout? (Ban et al., arXiv 2406.02965)

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/delayed_negative.py [--seeds 64] [--pairs 3] [--out FILE]

Writes the "delayed-negative" section of BENCHMARKS.md (with ``--out``: that file instead).

Ban et al. report that a negative prompt acts only after the positive prompt has formed the content, and that
starting the negative late removes an unwanted thing while the layout, fixed early, stays. On the toy model the
negative names a value of an attribute the positive prompt leaves open: the fill style ("a circle on a gray
background", negative "striped") or the colour (negative: the colour the model draws most often for that
prompt, so that there is something to remove). For each seed the same initial noise is sampled with

- no negative (CFG with the empty prompt), the reference;
- ``NegativeSteer(mode="fixed", start_fraction=f)`` for several starts (start 0 is diffusers' negative prompt);
- ``NegativeSteer(mode="adaptive")`` (start detected per image) and ``NegativeSteer(mode="dng")`` (at its defaults,
  and at λ 10, a strength the guidance benchmark also uses);

and scored with the toy judge (is the attribute gone?) and against the same seed's image without the negative:
silhouette IoU (foreground = pixels far from the image's border colour, see :func:`foreground_mask`) and mean
absolute pixel difference. 25 DDIM steps, CFG 5 (as the other guidance benchmarks).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, hardware, write_section  # noqa: E402

import unsee  # noqa: E402
from unsee.guidance import NegativeSteer  # noqa: E402
from unsee.toy import world  # noqa: E402
from unsee.toy.judge import Judge  # noqa: E402

SECTION = "delayed-negative"
STEPS = 25
CFG_SCALE = 5.0
MASK_THRESHOLD = 40.0  # a pixel is shape when its RGB distance from the background colour exceeds this (0-255 units);
# the closest pair the world draws, a green stripe shade on black, is 63 apart, purple on gray 100
BORDER = 2  # width of the frame the background colour is read from; no shape reaches it (see world.SIZE_RANGE)

# (positive prompt, negative): the negative names a value of an attribute the positive leaves open. The colours
# are the ones the model draws most often for their prompt without a negative (judged at seeds 1000-1031).
PAIRS = {
    "style": [("a circle on a gray background", "striped"),
              ("a square on a white background", "striped"),
              ("a heart on a black background", "striped")],
    "color": [("a circle on a gray background", "blue"),
              ("a star on a black background", "orange"),
              ("a heart on a black background", "purple")],
}
START_FRACTIONS = (0.0, 0.1, 0.2, 0.4, 0.6)


# ------------------------------------------------------------------------------------------ layout measures


def foreground_mask(images: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """(N, H, W) bool silhouettes: pixels whose colour is more than ``threshold`` (RGB distance, 0-255 units) from
    the image's background colour, the median of the ``BORDER``-pixel frame (which shapes never reach), with
    enclosed holes filled (a stripe or a patch close to the background inside a shape is still the shape)."""
    images = np.asarray(images, dtype=np.float32)
    frame = np.ones(images.shape[1:3], dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    background = np.median(images[:, frame], axis=1)[:, None, None, :]
    shape = np.linalg.norm(images - background, axis=-1) > threshold
    # the background is what the frame reaches through non-shape pixels (4-neighbour flood fill); the rest is shape
    outside = frame & ~shape
    while True:
        grown = outside.copy()
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown[:, :, 1:] |= outside[:, :, :-1]
        grown[:, :, :-1] |= outside[:, :, 1:]
        grown &= ~shape
        if (grown == outside).all():
            return ~outside
        outside = grown


def silhouette_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image pair: intersection over union of the two foreground masks (1.0 when both are empty)."""
    mask_a, mask_b = foreground_mask(a), foreground_mask(b)
    inter = (mask_a & mask_b).sum((1, 2))
    union = (mask_a | mask_b).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def pixel_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image pair: mean absolute difference over pixels and channels, in 0-255 units."""
    return np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean((1, 2, 3))


def mask_check(n: int = 256, seed: int = 0) -> float:
    """Mean IoU of :func:`foreground_mask` on ground-truth renders against the pixels the shape covers at all
    (those that differ from the render of the empty scene): how well the mask reads a silhouette."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, shape=world.SHAPES[i % len(world.SHAPES)]) for i in range(n)]
    renders = np.stack([world.render(s) for s in scenes])
    empty = np.stack([world.render(world.Scene(world.NO_SHAPE, s.color, s.background, s.style, s.cx, s.cy, s.size,
                                               s.angle)) for s in scenes])
    truth = (renders != empty).any(-1)
    mask = foreground_mask(renders)
    return float(((mask & truth).sum((1, 2)) / (mask | truth).sum((1, 2))).mean())


# ------------------------------------------------------------------------------------------ generation


def seed_latents(pipe, seeds: Sequence[int]) -> torch.Tensor:
    """One initial noise per seed, drawn from its own generator: an image depends only on its seed."""
    config = pipe.unet.config
    shape = (1, config.in_channels, config.sample_size, config.sample_size)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def generate(pipe, prompt: str, latents: torch.Tensor, negative: Optional[str] = None,
             steer: Optional[NegativeSteer] = None, batch_size: int = 32) -> tuple[np.ndarray, list]:
    """uint8 images (N, H, W, 3) of ``prompt`` from ``latents``, and the adaptive start steps (None per image
    outside ``adaptive`` mode)."""
    images, starts = [], []
    for first in range(0, len(latents), batch_size):
        batch = latents[first : first + batch_size]
        kwargs = dict(guidance_scale=CFG_SCALE, num_inference_steps=STEPS, latents=batch.clone(), output_type="np")
        if negative is not None:
            kwargs["negative_prompt"] = [negative] * len(batch)
        if steer is not None:
            kwargs["guidance"] = [steer]
        out = pipe([prompt] * len(batch), **kwargs)
        images.append(np.round(out.images * 255).astype(np.uint8))
        report = getattr(out, "guidance_report", None)
        steps = getattr(report, "negative_start_steps", None) if report is not None else None
        starts.extend(steps if steps is not None else [None] * len(batch))
    return np.concatenate(images), starts


def settings() -> list[tuple[str, Optional[NegativeSteer]]]:
    """(row name, steering) in table order; the first is the reference without a negative."""
    rows: list[tuple[str, Optional[NegativeSteer]]] = [("no negative", None)]
    for fraction in START_FRACTIONS:
        steer = NegativeSteer(mode="fixed", start_fraction=fraction)
        note = ", diffusers' negative prompt" if fraction == 0 else ""
        rows.append((f"fixed, {fraction:.0%} (step {steer.first_step(STEPS)}{note})", steer))
    rows.append(("adaptive", NegativeSteer(mode="adaptive")))
    dng = NegativeSteer(mode="dng")
    rows.append((f"DNG (defaults: λ {dng.dng_scale:g}, prior {dng.dng_prior:g})", dng))
    rows.append(("DNG, λ 10", NegativeSteer(mode="dng", dng_scale=10.0)))
    return rows


# ------------------------------------------------------------------------------------------ measurement


@dataclass
class Row:
    """One setting, one attribute: per image (all pairs and seeds, in order) what the judge and the masks say."""

    name: str
    pair: np.ndarray  # index of the (prompt, negative) pair
    has: np.ndarray  # the judge reads the negative's value
    shape_right: np.ndarray  # the judge reads the prompt's shape
    iou: np.ndarray  # silhouette IoU against the same seed's image without the negative
    distance: np.ndarray  # mean pixel difference against it
    starts: list  # adaptive start steps (None elsewhere)

    def only(self, keep: np.ndarray) -> "Row":
        """The images where ``keep`` holds."""
        return Row(self.name, self.pair[keep], self.has[keep], self.shape_right[keep], self.iou[keep],
                   self.distance[keep], [s for s, k in zip(self.starts, keep) if k])


def measure(pipe, judge: Judge, attribute: str, pairs: Sequence[tuple[str, str]],
            seeds: Sequence[int]) -> tuple[list[Row], list[np.ndarray]]:
    """The rows of one attribute's table, and per setting a strip of the first pair's first 8 images."""
    latents = seed_latents(pipe, seeds)
    per_setting: dict[str, dict[str, list]] = {}
    strips = []
    for index, (prompt, negative) in enumerate(pairs):
        shape = world.parse_prompt(prompt)["shape"]
        reference = None
        for name, steer in settings():
            images, starts = generate(pipe, prompt, latents, negative if steer is not None else None, steer)
            if reference is None:
                reference = images
            if index == 0:
                strips.append(np.concatenate(list(images[:8]), axis=1))
            judged = judge.predict(images)
            slot = per_setting.setdefault(name, {k: [] for k in ("pair", "has", "shape", "iou", "distance", "starts")})
            slot["pair"] += [index] * len(images)
            slot["has"] += [j[attribute] == negative for j in judged]
            slot["shape"] += [j["shape"] == shape for j in judged]
            slot["iou"].append(silhouette_iou(images, reference))
            slot["distance"].append(pixel_distance(images, reference))
            slot["starts"] += starts
    rows = [Row(name, np.array(s["pair"]), np.array(s["has"]), np.array(s["shape"]), np.concatenate(s["iou"]),
                np.concatenate(s["distance"]), s["starts"]) for name, s in per_setting.items()]
    return rows, strips


def unrelated_iou(pipe, pairs: Sequence[tuple[str, str]], seeds: Sequence[int]) -> float:
    """Silhouette IoU between different seeds' images of the same prompt, without a negative: what IoU says about
    two independent layouts (seed i against seed i-1)."""
    latents = seed_latents(pipe, seeds)
    values = []
    for prompt, _ in pairs:
        images, _ = generate(pipe, prompt, latents)
        values.append(silhouette_iou(images, np.roll(images, 1, axis=0)))
    return float(np.concatenate(values).mean())


# ------------------------------------------------------------------------------------------ statistics


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error."""
    values = np.asarray(values, dtype=np.float64)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def share(mask: np.ndarray, where: np.ndarray) -> str:
    """``"12/40 (30%)"``: how many of the ``where`` images ``mask`` holds for."""
    hits, total = int((mask & where).sum()), int(where.sum())
    return f"{hits}/{total} ({hits / total:.0%})" if total else "0/0"


def removal_ratio(row: Row, start0: Row, had: np.ndarray, resamples: int = 2000) -> tuple[float, float, float]:
    """How often ``row`` removes the attribute relative to start 0, among the images that had it without a negative,
    with a 95% bootstrap interval (images resampled, paired across the two settings)."""
    removed, removed0 = ~row.has[had], ~start0.has[had]
    if removed0.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(0)
    draws = rng.integers(len(removed), size=(resamples, len(removed)))
    ratios = removed[draws].sum(1) / np.maximum(removed0[draws].sum(1), 1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return removed.sum() / removed0.sum(), float(low), float(high)


@dataclass
class Verdict:
    """A delayed setting against start 0 on some images."""

    name: str
    ratio: tuple[float, float, float]  # removal relative to start 0, 95% interval
    iou: tuple[float, float]  # paired IoU difference from start 0, standard error
    distance: tuple[float, float]  # paired distance difference, standard error

    @property
    def closer(self) -> bool:
        """Layout measurably closer than start 0: IoU up and distance down, each by more than two standard errors."""
        return self.iou[0] > 2 * self.iou[1] and -self.distance[0] > 2 * self.distance[1]

    @property
    def passes(self) -> bool:
        """The bar: closer, and removing at least 80% as often as start 0."""
        return self.closer and self.ratio[0] >= 0.8


def verdicts(rows: list[Row]) -> list[Verdict]:
    """Every setting after the reference (row 0) and start 0 (row 1), against start 0."""
    had, start0 = rows[0].has, rows[1]
    return [Verdict(row.name, removal_ratio(row, start0, had), mean_se(row.iou - start0.iou),
                    mean_se(row.distance - start0.distance)) for row in rows[2:]]


def table_lines(rows: list[Row]) -> list[str]:
    """The attribute's table: one line per setting."""
    had = rows[0].has
    lines = []
    for index, row in enumerate(rows):
        iou, iou_se = mean_se(row.iou)
        dist, dist_se = mean_se(row.distance)
        paired = " | | "  # three empty cells
        if index >= 2:
            v = verdicts([rows[0], rows[1], row])[0]
            paired = (f"{v.ratio[0]:.2f} ({v.ratio[1]:.2f}–{v.ratio[2]:.2f}) | {v.iou[0]:+.3f} ± {v.iou[1]:.3f} | "
                      f"{v.distance[0]:+.1f} ± {v.distance[1]:.1f}")
        lines.append(f"| {row.name} | {(~row.has).mean():.0%} | {share(~row.has, had)} | {share(row.has, ~had)} | "
                     f"{row.shape_right.mean():.0%} | {iou:.3f} ± {iou_se:.3f} | {dist:.1f} ± {dist_se:.1f} | "
                     f"{paired} |")
    return lines


def bar_text(found: list[Verdict]) -> str:
    passing = [v for v in found if v.passes]
    if not passing:
        return "does not hold: no delayed start is measurably closer and removes at least 80% as often as start 0"
    return "holds: " + "; ".join(f"{v.name} (removal {v.ratio[0]:.2f} of start 0's, 95% interval {v.ratio[1]:.2f}–"
                                 f"{v.ratio[2]:.2f}; IoU {v.iou[0]:+.3f}, distance {v.distance[0]:+.1f})"
                                 for v in passing)


def pair_lines(rows: list[Row], pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Per (prompt, negative) pair and setting: removed of those that had it, and the mean IoU."""
    header = " | ".join(f'"{p}" − "{n}"' for p, n in pairs)
    lines = [f"| negative starts | {header} |", "|---|" + "---|" * len(pairs)]
    for row in rows[1:]:
        cells = []
        for index in range(len(pairs)):
            mine, had = row.only(row.pair == index), rows[0].has[rows[0].pair == index]
            cells.append(f"{share(~mine.has, had)} · IoU {mine.iou.mean():.3f}")
        lines.append(f"| {row.name} | {' | '.join(cells)} |")
    per_pair = []
    for index, (prompt, negative) in enumerate(pairs):
        keep = rows[0].pair == index
        passing = [v.name for v in verdicts([row.only(keep) for row in rows]) if v.passes]
        per_pair.append(f'"{prompt}" − "{negative}": {", ".join(passing) if passing else "none"}')
    lines += ["", "Per pair, the settings that pass the bar: " + "; ".join(per_pair) + "."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=64, help="seeds per (prompt, negative) pair")
    parser.add_argument("--pairs", type=int, default=3, help="(prompt, negative) pairs per attribute")
    parser.add_argument("--out", type=Path, help="write the section's markdown to this file, not BENCHMARKS.md")
    args = parser.parse_args()
    pipe = unsee.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    judge = Judge.load()
    seeds = list(range(args.seeds))

    grid_path = args.out.with_suffix(".png") if args.out is not None else ROOT / "benchmarks" / "delayed_negative.png"
    tables, strips = [], []
    for attribute, pairs in PAIRS.items():
        pairs = pairs[: args.pairs]
        rows, examples = measure(pipe, judge, attribute, pairs, seeds)
        strips += examples
        lines, bar = table_lines(rows), bar_text(verdicts(rows))
        adaptive = [s for row in rows if row.name == "adaptive" for s in row.starts if s is not None]
        chance = unrelated_iou(pipe, pairs, seeds)
        listed = "; ".join(f'"{p}" − "{n}"' for p, n in pairs)
        word = "striped" if attribute == "style" else "the colour"
        tables.append(f"""### Negative names the {"fill style" if attribute == "style" else "colour"}

Pairs (prompt − negative): {listed}. {len(pairs) * len(seeds)} images per row.

| negative starts | without {word} | removed (of the images with it without a negative) | appeared (of those without) | shape right | silhouette IoU vs no negative | pixel distance vs no negative | removal relative to start 0 (95% interval) | IoU − start 0's | distance − start 0's |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

Per pair (removed, of the images with it without a negative · mean silhouette IoU vs no negative):

{chr(10).join(pair_lines(rows, pairs))}

Adaptive starts (0-based step from which the negative acts): {min(adaptive)}–{max(adaptive)}, median
{int(np.median(adaptive))}. Silhouette IoU between two different seeds' images of the same prompt without a negative
(unrelated layouts): {chance:.3f}.

Bar (a delayed start keeps the layout closer than start 0, by more than two standard errors in both IoU and
distance, and removes at least 80% as often), all pairs together: **{bar}**.
""")

    body = f"""## Delayed negative prompt on the toy model (`benchmarks/delayed_negative.py`)

Hardware: {hardware()}. {STEPS} DDIM steps, CFG {CFG_SCALE:g}, {len(seeds)} seeds per (prompt, negative) pair; the
same seed's initial noise in every row. The negative names an attribute the prompt leaves open; "removed" counts
the images whose image without a negative the judge reads with the attribute and whose image with it does not.
IoU and distance: mean ± standard error over images, against the same seed's image without a negative; the last
three columns compare with start 0 seed by seed (removal: ratio of the removal counts, bootstrap interval; IoU and
distance: paired difference, mean ± standard error). Silhouettes: pixels more than {MASK_THRESHOLD:g} (RGB
distance, 0–255) from the colour of the image's border, holes filled; on ground-truth renders this mask matches
the pixels the shape covers with IoU {mask_check():.3f}.

{chr(10).join(tables)}
Rows of `{grid_path.name}`: the {len(settings())} settings above in order (seeds 0–{min(8, len(seeds)) - 1}), for
the first style pair, then for the first colour pair.

![delayed negative grid]({grid_path.relative_to(ROOT) if args.out is None else grid_path.name})
"""
    Image.fromarray(np.concatenate(strips, axis=0)).save(grid_path)
    if args.out is not None:
        args.out.write_text(body)
    else:
        write_section(SECTION, body)
    print(body)


if __name__ == "__main__":
    main()
