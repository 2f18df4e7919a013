#!/usr/bin/env python
"""Guidance speed on a GPU: SD 1.5- and SDXL-shaped pipelines at 512 and 1024 px in fp16, SDPA and xformers.

    python benchmarks/gpu_speed.py --out gpu_speed.md          # on a CUDA machine (random weights, no download)
    python benchmarks/gpu_speed.py --section-from gpu_speed.md  # here: put that file into BENCHMARKS.md
    python benchmarks/gpu_speed.py --smoke                      # tiny shapes on the CPU: checks the script runs

The pipelines are built in code with random weights of the real architectures (timings depend on the shapes
only): SD 1.5's UNet (860M) with a CLIP-L-sized text encoder, SDXL's UNet (2.6B) with CLIP-L- and bigG-sized
text encoders; a 4-level VAE that only sets the latent size (no decode). For every shape, size and attention
backend, the settings of ``guidance_speed.py`` (unsee against diffusers doing the same work) run interleaved
over ``--repeats`` repeats, with ``torch.cuda.synchronize()`` around each run. The SDPA pass uses diffusers'
default ``AttnProcessor2_0`` and unsee's processors with xformers off; the xformers pass calls
``enable_xformers_memory_efficient_attention()`` and lets unsee's processors pick xformers (skipped, and said
so, when xformers does not run on the device).

On the lent GPU machine nothing can be downloaded: diffusers and xformers travel as wheels. Here, once:
``scripts/gpu_wheels.sh`` (fills ``.whl/``, git-ignored); then, with the device tool, ``carry=[".whl"]``:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . &&
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_speed.py --out $OUT/gpu_speed.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, StableDiffusionPAGPipeline, StableDiffusionPipeline, StableDiffusionXLPAGPipeline,
    StableDiffusionXLPipeline, UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, write_section  # noqa: E402
from guidance_speed import COMPARED, interleaved_times, median_ratio, speed_settings  # noqa: E402

from unsee.toy import model as toy  # noqa: E402
from unsee.pipelines import UnseeStableDiffusionPipeline, UnseeStableDiffusionXLPipeline  # noqa: E402
from unsee.pipelines import attention as unsee_attention  # noqa: E402
from unsee.testing import SD15_UNET_CONFIG, SDXL_UNET_CONFIG, tiny_tokenizer  # noqa: E402

SECTION = "guidance-speed-gpu"
# (hidden size, layers, heads) of the text encoders: CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's
CLIP_L, CLIP_BIG_G = (768, 12, 12), (1280, 32, 20)
# the smoke run's stand-ins: same kinds of block, a few channels
SMOKE_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
SMOKE_SD15 = dict(SMOKE_UNET, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=8)
SMOKE_SDXL = dict(SMOKE_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                  attention_head_dim=(4, 8), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=32)


def latent_size_vae() -> AutoencoderKL:
    """A 4-level VAE of a few channels: it gives the pipelines SD's latent scale factor of 8 and is never run."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                         block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4)


def shaped_pipelines(shape: str, device: str, dtype: torch.dtype, smoke: bool = False) -> tuple[Any, Any, Any]:
    """(unsee's pipeline, diffusers' pipeline, diffusers' PAG pipeline) on one set of random-weight components."""
    tokenizer = tiny_tokenizer()
    scheduler = DDIMScheduler(**{**toy.SCHEDULER_CONFIG, "prediction_type": "epsilon"})

    def text_encoder(cls: type, size: tuple[int, int, int]) -> Any:
        hidden, layers, heads = (16, 2, 2) if smoke else size
        return cls(toy.text_encoder_config(tokenizer, hidden_size=hidden, layers=layers, heads=heads))

    torch.manual_seed(0)
    with torch.device(device):  # random initialisation on the GPU: seconds, not minutes, for 2.6B parameters
        if shape == "sd15":
            unet = UNet2DConditionModel(**(SMOKE_SD15 if smoke else SD15_UNET_CONFIG))
            components = dict(text_encoder=text_encoder(CLIPTextModel, CLIP_L), tokenizer=tokenizer,
                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            classes = (UnseeStableDiffusionPipeline, StableDiffusionPipeline, StableDiffusionPAGPipeline)
        else:
            unet = UNet2DConditionModel(**(SMOKE_SDXL if smoke else SDXL_UNET_CONFIG))
            components = dict(text_encoder=text_encoder(CLIPTextModel, CLIP_L),
                              text_encoder_2=text_encoder(CLIPTextModelWithProjection, CLIP_BIG_G),
                              tokenizer=tokenizer, tokenizer_2=tiny_tokenizer())
            classes = (UnseeStableDiffusionXLPipeline, StableDiffusionXLPipeline, StableDiffusionXLPAGPipeline)
        components.update(unet=unet, vae=latent_size_vae(), scheduler=scheduler)
    ours_class, plain_class, pag_class = classes
    ours = ours_class(**components)
    if dtype != torch.float32:
        ours.to(dtype=dtype)  # the components are shared: this casts them for all three pipelines
    pipes = (ours, plain_class(**components), pag_class(**components, pag_applied_layers="mid"))
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def set_attention(pipes: tuple[Any, ...], backend: str) -> bool:
    """Switch diffusers' processors and unsee's fused attention to ``backend``; False when it cannot run here."""
    if backend == "sdpa":
        unsee_attention._XFORMERS_WORKS = False
        pipes[0].unet.set_attn_processor(AttnProcessor2_0())  # diffusers' default
        return True
    unsee_attention._XFORMERS_WORKS = None  # detect again
    if not unsee_attention.xformers_works():
        return False
    pipes[0].enable_xformers_memory_efficient_attention()  # the three pipelines share their components
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="sd15,sdxl")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--attention", default="sdpa,xformers")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the section's markdown to this file")
    parser.add_argument("--section-from", type=Path, help="only put this file (an --out of a GPU run) into BENCHMARKS.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, on the CPU: checks the script runs")
    args = parser.parse_args()
    if args.section_from is not None:
        write_section(SECTION, args.section_from.read_text())
        return
    if args.smoke:
        device, dtype, sizes = "cpu", torch.float32, [64]
        args.steps, args.repeats = 2, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_speed.py needs a CUDA device (use --smoke to check the script on the CPU)")
        device, dtype, sizes = "cuda", torch.float16, [int(s) for s in args.sizes.split(",")]
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    ratio_rows, step_rows, skipped, names = [], [], [], []
    for shape in args.shapes.split(","):
        pipes = shaped_pipelines(shape, device, dtype, smoke=args.smoke)
        for backend in args.attention.split(","):
            if not set_attention(pipes, backend):
                skipped.append(f"{shape}: {backend} does not run on this device")
                continue
            for size in sizes:
                settings = speed_settings(*pipes, batch=args.batch, num_inference_steps=args.steps,
                                          height=size, width=size)
                times = interleaved_times(settings, args.repeats, args.steps, synchronize)
                names = list(times)
                ratios = " | ".join(f"{median_ratio(times, ours, base):.3f}" for _, ours, base, _ in COMPARED)
                ratio_rows.append(f"| {shape} | {size} | {backend} | {ratios} |")
                step_rows.append(f"| {shape} | {size} | {backend} | " + " | ".join(
                    f"{1000 * statistics.median(times[name]):.1f}" for name in names) + " |")
                print(ratio_rows[-1], flush=True)
        del pipes
        if device == "cuda":
            torch.cuda.empty_cache()

    bars = " | ".join(bar for *_, bar in COMPARED)
    labels = " | ".join(label for label, *_ in COMPARED)
    body = f"""## Guidance speed on a GPU (`benchmarks/gpu_speed.py`)

Hardware: {hardware()}. Random-weight pipelines of SD 1.5's and SDXL's architectures, {str(dtype).replace('torch.', '')},
batch {args.batch}, {args.steps} DDIM steps, no VAE decode; {args.repeats} interleaved repeats per setting; each
figure is the median over repeats of the per-repeat ratio (ms per step in the second table).

| UNet | px | attention | {labels} |
|---|---|---|{'---|' * len(COMPARED)}
| bar | | | {bars} |
{chr(10).join(ratio_rows)}

| UNet | px | attention | {" | ".join(names)} |
|---|---|---|{'---|' * len(names)}
{chr(10).join(step_rows)}
{"".join(chr(10) + "Skipped: " + s + "." for s in skipped)}
"""
    if args.out is not None:
        args.out.write_text(body)
    print(body)


if __name__ == "__main__":
    main()
