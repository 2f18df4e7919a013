#!/usr/bin/env python
"""What an SPM adapter's per-prompt strength (Facilitated Transport) costs per pipeline call; writes its section.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/spm_call_cost.py [--unet model|sd15] [--steps 4] [--repeats 5]

Side by side in one process, interleaved: the pipeline with no adapter, with an SPM adapter whose strength follows
the prompt (the default for SPM), and with the same adapter at a fixed strength (``facilitated_transport=False``);
plus the time of the per-call strength change alone (entering and leaving the call's context). The SPM adapter is a
rank-1 LoRA on every Linear/Conv2d of the UNet's transformer blocks with random factors (timings depend on the shapes,
not the values). ``--unet sd15`` swaps in a random-weight UNet of SD 1.5's architecture. Two prompts alternate, one
naming the concept, so the strength changes on every call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, write_section  # noqa: E402

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402

import unsee  # noqa: E402
from unsee.adapters import save_adapter  # noqa: E402
from unsee.erasure import spm_modules  # noqa: E402
from unsee.erasure.adapter_builders import lora_adapter_from_peft  # noqa: E402

PROMPTS = ("a red circle on a gray background", "a blue square on a white background")


def build(unet_kind: str):
    pipe = unsee.load_pipeline("toy")
    if unet_kind == "sd15":
        from diffusers import UNet2DConditionModel

        from unsee.testing import SD15_UNET_CONFIG

        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, "sample_size": 32, "in_channels": pipe.unet.config.in_channels,
                                       "out_channels": pipe.unet.config.out_channels,
                                       "cross_attention_dim": pipe.text_encoder.config.hidden_size})
        pipe = type(pipe)(**{**pipe.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def spm_file(pipe, folder: Path) -> Path:
    """A rank-1 SPM adapter with random factors for this pipeline's UNet, saved; the UNet is left as it was."""
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=1, lora_alpha=1, target_modules=spm_modules(pipe.unet), init_lora_weights=False),
                          adapter_name="bench")
    adapter = lora_adapter_from_peft(pipe.unet, method="spm", concepts=["circle"], adapter_name="bench",
                                     hyperparameters={"facilitated_transport": True})
    pipe.unet.delete_adapters("bench")
    path = folder / "spm.safetensors"
    save_adapter(adapter, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", choices=("model", "sd15"), default="model")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    pipes = {name: build(args.unet) for name in ("no adapter", "SPM, per-prompt strength", "SPM, fixed strength")}
    with tempfile.TemporaryDirectory() as folder:
        path = spm_file(pipes["no adapter"], Path(folder))
        pipes["SPM, per-prompt strength"].load_erasure(path)
        pipes["SPM, fixed strength"].load_erasure(path, facilitated_transport=False)

    def call(pipe, prompt: str) -> None:
        pipe(prompt, num_inference_steps=args.steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
             output_type="latent")

    times: dict[str, list[float]] = {name: [] for name in pipes}
    for name, pipe in pipes.items():  # warm-up
        call(pipe, PROMPTS[0])
    for i in range(args.repeats):
        for name, pipe in pipes.items():
            for prompt in PROMPTS:
                start = time.perf_counter()
                call(pipe, prompt)
                times[name].append(time.perf_counter() - start)
    transported = pipes["SPM, per-prompt strength"]
    start, n = time.perf_counter(), 2 * args.repeats
    for i in range(n):
        with transported._erasure_transport(PROMPTS[i % 2]):
            pass
    switch_ms = (time.perf_counter() - start) / n * 1000

    base = statistics.median(times["no adapter"])
    rows = ["| pipeline | median s per call | vs no adapter |", "|---|---|---|"]
    for name, values in times.items():
        median = statistics.median(values)
        rows.append(f"| {name} | {median:.3f} | {median / base:.3f}x |")
    model = ("the toy model" if args.unet == "model" else
             "the toy model with a random-weight UNet of SD 1.5's architecture (860M parameters, 32x32 latents)")
    section = "spm-call-cost" + ("-sd15" if args.unet == "sd15" else "")
    body = f"""## SPM's per-prompt strength, cost per call: {model} (`benchmarks/spm_call_cost.py{' --unet sd15' if args.unet == 'sd15' else ''}`)

Hardware: {hardware()}. {args.steps} DDIM steps, CFG 5, latents out, {args.repeats} x 2 calls per row (two prompts
alternating, one naming the erased concept), interleaved in one process. The erasure LoRA runs through peft's LoRA
layers; the per-prompt strength is a change of their scale, {switch_ms:.1f} ms per call (entering and leaving the
call).

{chr(10).join(rows)}
"""
    if not args.no_write:
        write_section(section, body)
    print(body)


if __name__ == "__main__":
    main()
