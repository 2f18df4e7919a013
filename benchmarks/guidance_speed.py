#!/usr/bin/env python
"""Per-step time of the guidance methods against diffusers for the same work, in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/guidance_speed.py [--steps 20] [--repeats 7]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/guidance_speed.py --unet sd15 --batch 1 --steps 3 --repeats 7

Times whole denoising loops (``output_type="latent"``, no VAE decode) on the toy model, batch 8,
interleaving the settings (in reverse order every other repeat). A ratio is the median over repeats of the
ratio within one repeat (the two runs it compares are seconds apart, so the machine's load drifts out of it);
the ratio of the fastest repeats is shown beside it. Ratios:
- plain CFG through unsee's pipeline (``guidance=[CFG(5)]``) / diffusers' StableDiffusionPipeline;
- PAG / diffusers' StableDiffusionPAGPipeline (same layers "mid", same scale);
- CFG++, FDG and delayed negative steering / a CFG step;
- NASA (one pass) / CFG with a negative prompt (two passes), and beside it diffusers' plain one-pass call (no
  CFG) against the same two-pass call: the floor under NASA's ratio, which no one-pass method can go below;
- a noise gauge: two of diffusers' settings that do the same work (CFG with the empty negative and with a
  negative prompt); its distance from 1 is what noise alone does to a ratio in that run.
Writes the "guidance-speed" section of BENCHMARKS.md. ``--unet sd15`` swaps in a random-weight UNet of SD 1.5's
architecture (860M parameters, 32x32 latents, the toy text encoder's 128-wide conditioning): there the UNet's
arithmetic dominates a step, as on a GPU at full size, where on the toy model per-call overheads do; it writes
the "guidance-speed-sd15" section.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, write_section  # noqa: E402

import unsee  # noqa: E402
from unsee.guidance import CFG, FDG, NASA, PAG, CFGpp, NegativeSteer  # noqa: E402


# (label, our setting, diffusers' setting doing the same work, bar)
COMPARED = [
    ("plain CFG: unsee / diffusers", "unsee CFG", "diffusers CFG", "≤ 1.02"),
    ("PAG: unsee / diffusers' PAG pipeline", "unsee PAG", "diffusers PAG", "≤ 1.0"),
    ("CFG++ / CFG", "unsee CFG++", "diffusers CFG", "≤ 1.03"),
    ("FDG / CFG", "unsee FDG", "diffusers CFG", "≤ 1.03"),
    ("negative steering / CFG", "unsee negative from 20%", "diffusers CFG", "≤ 1.03"),
    ("NASA / CFG with negative", "unsee NASA (no CFG)", "diffusers CFG + negative", "≤ 0.6"),
    # no bar: the least any one-pass method can cost, which NASA's ratio cannot go below
    ("one UNet pass (no CFG) / CFG with negative", "diffusers one pass (no CFG)", "diffusers CFG + negative", "floor"),
    ("NASA / one UNet pass (no CFG): what NASA adds", "unsee NASA (no CFG)", "diffusers one pass (no CFG)", "—"),
    # the same work twice (a negative prompt costs what the empty one does): how far this run's noise alone moves a ratio
    ("noise gauge: diffusers CFG + negative / diffusers CFG (same work)", "diffusers CFG + negative", "diffusers CFG",
     "1.0"),
]


def speed_settings(ours, plain, pag, batch: int, num_inference_steps: int, **call: Any) -> dict[str, Callable]:
    """Each setting as a function of a generator: unsee's pipeline ``ours`` and diffusers' ``plain`` and ``pag``
    (built on the same components) doing the same work; ``call`` adds arguments (height, width...) to every call."""
    prompts = ["a red circle on a gray background"] * batch
    negatives = ["circle"] * batch  # diffusers wants a list negative with a list prompt
    common = dict(num_inference_steps=num_inference_steps, output_type="latent", **call)
    return {
        "diffusers CFG": lambda g: plain(prompts, guidance_scale=5.0, generator=g, **common),
        "unsee CFG": lambda g: ours(prompts, guidance=[CFG(5.0)], generator=g, **common),
        "diffusers PAG": lambda g: pag(prompts, guidance_scale=5.0, pag_scale=3.0, generator=g, **common),
        "unsee PAG": lambda g: ours(prompts, guidance=[CFG(5.0), PAG(3.0)], generator=g, **common),
        "unsee CFG++": lambda g: ours(prompts, guidance=[CFGpp(0.6)], generator=g, **common),
        "unsee FDG": lambda g: ours(prompts, guidance=[FDG((10.0, 5.0))], generator=g, **common),
        "unsee negative from 20%": lambda g: ours(prompts, negative_prompt=negatives,
                                                  guidance=[CFG(5.0), NegativeSteer(start_fraction=0.2)], generator=g, **common),
        "diffusers CFG + negative": lambda g: plain(prompts, negative_prompt=negatives, guidance_scale=5.0,
                                                    generator=g, **common),
        "unsee NASA (no CFG)": lambda g: ours(prompts, negative_prompt=negatives, guidance_scale=1.0,
                                              guidance=[NASA(0.3)], generator=g, **common),
        "diffusers one pass (no CFG)": lambda g: plain(prompts, guidance_scale=1.0, generator=g, **common),
    }


def interleaved_times(settings: dict[str, Callable], repeats: int, steps: int,
                      synchronize: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per step of each setting in each repeat, after one warm-up run each; the settings run interleaved,
    in reverse order every other repeat. ``synchronize`` waits for queued device work (CUDA) before a clock read."""
    times: dict[str, list[float]] = {name: [] for name in settings}
    for fn in settings.values():
        fn(torch.Generator().manual_seed(0))
    for repeat in range(repeats):
        order = list(settings.items())
        for name, fn in order if repeat % 2 == 0 else reversed(order):
            synchronize()
            t0 = time.perf_counter()
            fn(torch.Generator().manual_seed(repeat))
            synchronize()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def median_ratio(times: dict[str, list[float]], ours: str, base: str) -> float:
    """Median over repeats of the ratio of two settings' times within one repeat."""
    return statistics.median(a / b for a, b in zip(times[ours], times[base]))


def ratio_table(times: dict[str, list[float]]) -> str:
    """Rows of the ratio table: median of the per-repeat ratios, ratio of the fastest repeats, bar."""
    return "\n".join(
        f"| {label} | {median_ratio(times, ours_name, base):.3f} "
        f"| {min(times[ours_name]) / min(times[base]):.3f} | {bar} |"
        for label, ours_name, base, bar in COMPARED if ours_name in times and base in times
    )


def per_step_table(times: dict[str, list[float]]) -> str:
    """Rows of the per-setting table: median ms per step, min - max over repeats."""
    return "\n".join(f"| {name} | {1000 * statistics.median(v):.1f} | {1000 * min(v):.1f} – {1000 * max(v):.1f} |"
                     for name, v in times.items())


def noise_text(times: dict[str, list[float]]) -> str:
    """What this run's numbers say about its noise: the widest spread of one setting over its repeats, and the noise
    gauge's distance from 1."""
    spreads = {name: (max(v) - min(v)) / statistics.median(v) for name, v in times.items() if v}
    widest = max(spreads, key=spreads.get)
    text = (f"One setting's time varies from repeat to repeat (min – max column), by up to {spreads[widest]:.0%} of its "
            f"median in this run ({widest}); pairing the runs of one repeat cancels the slow drift of the load, not the "
            "jitter of single runs.")
    gauge = next(((ours, base) for label, ours, base, _ in COMPARED if label.startswith("noise gauge")), None)
    if gauge is not None and gauge[0] in times and gauge[1] in times:
        value = median_ratio(times, *gauge)
        text += (f" The noise gauge (two settings doing the same work) is {value:.3f}, {abs(value - 1):.1%} from 1: "
                 "ratios closer to each other than that are within this run's noise.")
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="toy", help="timings depend on the architecture only, not on the weights")
    parser.add_argument("--model-label", default="the toy model")
    parser.add_argument("--unet", choices=("model", "sd15"), default="model",
                        help="sd15: a random-weight UNet of SD 1.5's architecture in place of the model's")
    args = parser.parse_args()
    ours = unsee.load_pipeline(args.model)
    section, title = "guidance-speed", "Guidance speed"
    if args.unet == "sd15":
        from diffusers import UNet2DConditionModel

        from unsee.testing import SD15_UNET_CONFIG

        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, "sample_size": 32, "in_channels": ours.unet.config.in_channels,
                                       "out_channels": ours.unet.config.out_channels,
                                       "cross_attention_dim": ours.text_encoder.config.hidden_size})
        ours = type(ours)(**{**ours.components, "unet": unet})
        section, title = "guidance-speed-sd15", "Guidance speed, SD 1.5-shaped UNet"
        args.model_label = ("SD 1.5's UNet architecture with random weights (860M parameters, 32x32 latents, "
                            "cross-attention over the toy text encoder's 128-wide states)")
    plain = StableDiffusionPipeline(**ours.components)
    pag = StableDiffusionPAGPipeline(**ours.components, pag_applied_layers="mid")
    for pipe in (ours, plain, pag):
        pipe.set_progress_bar_config(disable=True)
    settings = speed_settings(ours, plain, pag, batch=args.batch, num_inference_steps=args.steps)
    times = interleaved_times(settings, args.repeats, args.steps)
    table, per_step = ratio_table(times), per_step_table(times)
    body = f"""## {title} (`benchmarks/guidance_speed.py{' --unet sd15' if args.unet == 'sd15' else ''}`)

Hardware: {hardware()}. Model: {args.model_label}, batch {args.batch}, {args.steps} DDIM steps, no VAE decode; {args.repeats}
interleaved repeats per setting, all in one run.

| ratio of per-step times | median of per-repeat ratios | fastest / fastest | bar |
|---|---|---|---|
{table}

{noise_text(times)}

| setting | ms per step (median) | min – max over repeats |
|---|---|---|
{per_step}
"""
    write_section(section, body)
    print(body)


if __name__ == "__main__":
    main()
