#!/usr/bin/env python
"""When does the toy model set a style? A probe for trajectory-split erasure (ANT keeps the first steps).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/style_onset.py [--concept striped] [--n 32]

For each k: 25 DDIM steps (CFG 5) from the same noise, the first k with prompts that name the style
("a striped green triangle"), the rest with the same prompts naming its sibling ("a solid green triangle").
Prints the share of images in which the judge sees the style: where it rises is where the style is set.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DDIMScheduler

import unsee
from unsee.erasure.base import ddim_sample, encode_prompts
from unsee.toy import world
from unsee.toy.judge import Judge

STEPS, CFG = 25, 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="striped", help="a style of the shapes world")
    parser.add_argument("--n", type=int, default=32, help="images per k")
    args = parser.parse_args()
    attribute, value = world.concept_attribute(args.concept)
    if attribute != "style":
        parser.error(f"--concept must be a style of the shapes world ({', '.join(world.STYLES)}), got {args.concept!r}")
    sibling = next(v for v in world.STYLES if v != value)

    pipe = unsee.load_pipeline("toy")
    judge = Judge.load()
    named = world.concept_prompts(value, 1234, args.n)
    swapped = [p.replace(value, sibling) for p in named]
    size = pipe.unet.config.sample_size
    height = width = size * pipe.vae_scale_factor
    cond_named, cond_swapped, cond_empty = (encode_prompts(pipe, prompts, height, width)
                                            for prompts in (named, swapped, [""] * args.n))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    noise = torch.randn(args.n, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    print(f"first k of {STEPS} steps with {named[0]!r}, the rest with {swapped[0]!r}; share judged {value}:")
    for k in (0, 1, 2, 3, 4, 6, 10, STEPS):
        x = noise * scheduler.init_noise_sigma
        if k:
            x = ddim_sample(pipe.unet, scheduler, x, cond_named, cond_empty, CFG, stop_at=k)
        if k < STEPS:
            x = ddim_sample(pipe.unet, scheduler, x, cond_swapped, cond_empty, CFG, start_at=k)
        with torch.no_grad():
            images = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        share = sum(p[attribute] == value for p in judge.predict(images)) / args.n
        print(f"k = {k:2d}: {share:.1%}")


if __name__ == "__main__":
    main()
