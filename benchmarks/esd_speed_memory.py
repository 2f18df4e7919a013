#!/usr/bin/env python
"""ESD training: unsee's trainer against a straightforward reference loop; writes its BENCHMARKS.md section.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/esd_speed_memory.py [--model toy|sd15] [--variant esd-x]
        [--iterations 12] [--trajectory-reuse 4] [--sample-with trained|frozen] [--ddim-steps N] [--rounds 1]

The reference is the loop of the official ESD code, written plainly: a second, frozen fp32 copy of the UNet
as the teacher; the teacher's two predictions and the student's as three separate forward passes; the
student UNet left with ``requires_grad`` on every parameter and only the trained ones handed to Adam (so
backward also computes, and keeps, gradients for the frozen weights, as the official scripts do). Both loops
sample x_t the same way (DDIM with CFG, batched, with the model being trained, under no_grad) from the same
seeds, and train the same parameters with the same loss.

Each loop runs in its own process (``--rounds N``: each N times, the order reversed every other round; a loop's
time is then the median over rounds and a speed ratio the median of the ratios within each round). Reported per loop: the median time of an iteration (after a warm-up) and
the peak resident memory of the process while training, counted from before the model is loaded (model
weights, teacher copy, optimizer state, gradients and activations). ``--model sd15`` uses SD 1.5's UNet
architecture (randomly initialised: no download) at 128 px with 4 DDIM steps so that an iteration takes
seconds on a CPU; ``--model toy`` the embedded model with the paper's 50 DDIM steps. ``--ddim-steps N`` sets
another number of DDIM steps (``--model sd15 --ddim-steps 50``: the paper's, at about a minute an iteration).

``--trajectory-reuse K`` adds a third loop, unsee's trainer with ``trajectory_reuse=K`` (one DDIM trajectory serves K
consecutive iterations), and then times every loop as the mean over the same whole trajectories of K iterations
after a warm-up of K (a reused run's iterations differ: one in K samples), instead of the median.

``--sample-with frozen`` samples x_t with the original model in every loop (ESD's ``sample_with="frozen"``, the
official 2025 rewrite's choice): the reference with its frozen copy, unsee's trainer with the original weights
swapped in. With trajectory reuse, unsee's trainer then takes the teacher's predictions at a run's stops from the
run itself (only the deepest stop of a run asks the teacher); the reference asks its teacher every iteration, as the
official code does. The section is written under its own name (``esd-speed-sd15-frozen``); so is a ``--variant``
other than esd-x (``esd-speed-toy-esd-u``) and a ``--ddim-steps`` other than the model's (``esd-speed-sd15-ddim50``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, write_section  # noqa: E402

DDIM_STEPS = {"toy": 50, "sd15": 4}  # each model's DDIM steps unless --ddim-steps says otherwise


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def build_pipe(model: str):
    import unsee

    if model == "toy":
        return unsee.load_pipeline("toy"), {"resolution": None}
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from unsee import UnseeStableDiffusionPipeline
    from unsee.testing import SD15_UNET_CONFIG, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
        num_attention_heads=8, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = UnseeStableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                        unet=UNet2DConditionModel(**SD15_UNET_CONFIG), scheduler=scheduler,
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe, {"resolution": 128}


def worker(loop: str, model: str, variant: str, iterations: int, reuse: int, window: int,
           sample_with: str, ddim_steps: int) -> dict:
    torch.manual_seed(0)
    base_rss = _status("VmRSS")
    pipe, settings = build_pipe(model)
    pipe.set_progress_bar_config(disable=True)
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    from unsee.erasure import ESDConfig, ESDTrainer

    config = ESDConfig(concept="circle", variant=variant, steps=iterations, lr=1e-5, trajectory_reuse=reuse,
                       sample_with=sample_with, ddim_steps=ddim_steps, **settings)
    stamps: list[float] = []
    if loop == "ours":
        def progress(event) -> None:
            if event.phase == "train":
                stamps.append(time.perf_counter())

        ESDTrainer(config).train(pipe, progress=progress)
    else:
        reference_loop(pipe, config, stamps)
    if loop != "ours":
        stamps = stamps[1:]  # the reference stamps its start too: stamps[i] is now the end of iteration i, as ours
    times = [b - a for a, b in zip(stamps, stamps[1:])]  # times[i] is iteration i + 1's: the first is a warm-up
    if window > 1:  # iterations window .. (whole trajectories of ``window``)
        start = window - 1
        times = times[start:start + (len(times) - start) // window * window]
    return {"loop": loop, "iteration_s": statistics.mean(times) if window > 1 else statistics.median(times),
            "iterations": len(times), "peak_bytes": _status("VmHWM") - base_rss}


def reference_loop(pipe, config, stamps: list[float]) -> None:
    """The official code's ESD loop, written plainly (see the module docstring)."""
    from diffusers import DDIMScheduler

    from unsee.erasure import esd_parameters
    from unsee.erasure.base import ddim_sample, encode_prompts, predict

    generator = torch.Generator().manual_seed(config.seed)
    student = pipe.unet
    student.train()
    student.requires_grad_(True)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(list(esd_parameters(student, config.variant).values()), lr=config.lr)
    height = width = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    cond = encode_prompts(pipe, [config.concept], height, width)
    empty = encode_prompts(pipe, [""], height, width)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.ddim_steps)
    shape = (1, student.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    stamps.append(time.perf_counter())
    for _ in range(config.steps):
        k = int(torch.randint(0, config.ddim_steps, (1,), generator=generator))
        noise = torch.randn(shape, generator=generator)
        with torch.no_grad():
            sampler = teacher if config.sample_with == "frozen" else student
            x_t = ddim_sample(sampler, scheduler, noise, cond, empty, config.start_guidance, stop_at=k)
            t = scheduler.timesteps[k]
            eps_empty = predict(teacher, x_t, t, empty)
            eps_concept = predict(teacher, x_t, t, cond)
        eps_student = predict(student, x_t, t, cond)
        target = eps_empty - config.eta * (eps_concept - eps_empty)
        loss = torch.nn.functional.mse_loss(eps_student, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("toy", "sd15"), default="sd15")
    parser.add_argument("--variant", default="esd-x")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--trajectory-reuse", type=int, default=1,
                        help="also time unsee's trainer with this trajectory_reuse (1: only the default)")
    parser.add_argument("--sample-with", choices=("trained", "frozen"), default="trained",
                        help="the model every loop samples x_t with (ESD's sample_with)")
    parser.add_argument("--ddim-steps", type=int, default=None,
                        help="DDIM steps of the sampled trajectories (default: the model's, toy 50, sd15 4)")
    parser.add_argument("--worker", choices=("ours", "reference"), default=None)
    parser.add_argument("--reuse", type=int, default=1, help=argparse.SUPPRESS)  # a worker's trajectory_reuse
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every loop this many times, alternating the order; ratios are the median of the "
                             "rounds' ratios")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    window = args.trajectory_reuse
    steps = args.ddim_steps or DDIM_STEPS[args.model]
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.variant, args.iterations, args.reuse, window,
                                args.sample_with, steps)))
        return
    loops = [("reference", 1), ("ours", 1)] + ([("ours", window)] if window > 1 else [])
    rounds: list[dict] = []
    for number in range(args.rounds):  # every round runs each loop once, in reverse order every other round
        results = {}
        for loop, reuse in (loops if number % 2 == 0 else loops[::-1]):
            out = subprocess.run([sys.executable, __file__, "--worker", loop, "--model", args.model, "--variant",
                                  args.variant, "--iterations", str(args.iterations), "--reuse", str(reuse),
                                  "--trajectory-reuse", str(window), "--sample-with", args.sample_with,
                                  "--ddim-steps", str(steps)],
                                 check=True, capture_output=True, text=True).stdout
            results[loop, reuse] = json.loads(out.strip().splitlines()[-1])
            print(number, loop, reuse, results[loop, reuse], flush=True)
        rounds.append(results)
    # a loop's figures: the median over rounds of its time, its largest peak; a speed ratio: the median over rounds
    # of the ratio within one round (runs minutes apart, so a drift of the machine's speed moves both)
    times = {key: statistics.median(r[key]["iteration_s"] for r in rounds) for key in loops}
    peaks = {key: max(r[key]["peak_bytes"] for r in rounds) for key in loops}
    speed = {key: statistics.median(r["reference", 1]["iteration_s"] / r[key]["iteration_s"] for r in rounds)
             for key in loops}
    each = {key: " (rounds: " + ", ".join(f"{r['reference', 1]['iteration_s'] / r[key]['iteration_s']:.2f}×"
                                          for r in rounds) + ")" if len(rounds) > 1 else "" for key in loops}
    ref_key = ("reference", 1)
    mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
    names = {("ours", 1): "unsee `ESDTrainer`",
             ("ours", window): f"unsee `ESDTrainer`, `trajectory_reuse={window}` (one DDIM trajectory per {window} iterations)"}
    rows = [f"| reference (two UNet copies, three separate passes, gradients for every weight) "
            f"| {times[ref_key]:.2f} s | {mb(peaks[ref_key])} | | |"]
    for key in loops[1:]:
        rows.append(f"| {names[key]} | {times[key]:.2f} s | {mb(peaks[key])} "
                    f"| **{speed[key]:.2f}× faster**{each[key]} | **{peaks[key] / peaks[ref_key]:.2f}×** |")
    results = rounds[0]
    timing = (f"{results['ours', 1]['iterations']} timed iterations each (median)" if window == 1 else
              f"the mean of {results['ours', 1]['iterations']} timed iterations each ({window} warm-up iterations "
              f"first; whole trajectories of the reused run)")
    frozen = args.sample_with == "frozen"
    own_steps = steps != DDIM_STEPS[args.model]
    other_variant = args.variant != "esd-x"
    flags = ((f" --variant {args.variant}" if other_variant else "") + f" --iterations {args.iterations}"
             + (f" --trajectory-reuse {window}" if window > 1 else "")
             + (" --sample-with frozen" if frozen else "") + (f" --ddim-steps {steps}" if own_steps else "")
             + (f" --rounds {args.rounds}" if args.rounds > 1 else ""))
    if args.rounds > 1:
        timing += f"; {args.rounds} rounds, the loops' order reversed every other round"
    sampler = ("x_t sampled with the original model in every loop (`sample_with=\"frozen\"`)" if frozen else
               "x_t sampled with the model being trained in every loop (the paper)")
    body = f"""## ESD training speed and memory (`benchmarks/esd_speed_memory.py --model {args.model}{flags}`)

Hardware: {hardware()}.

{args.variant}, fp32, batch 1, {sampler}, {timing}, model `{args.model}`
({'SD 1.5 UNet architecture, random weights, 128 px' if args.model == 'sd15' else 'the embedded toy model, 64 px'}, {steps} DDIM steps).
Peak memory: the process's peak resident memory while training, above what it used before loading the model.
Ratios against the reference loop; bars: ≥ 1.3× faster, ≤ 0.6× the memory.

| loop | iteration | peak memory | speed against the reference | memory against the reference |
|---|---|---|---|---|
{chr(10).join(rows)}
"""
    if not args.no_write:
        write_section(f"esd-speed-{args.model}" + (f"-{args.variant}" if other_variant else "")
                      + ("-frozen" if frozen else "") + (f"-ddim{steps}" if own_steps else ""), body)
    print(body)


if __name__ == "__main__":
    main()
