#!/usr/bin/env python
"""Where an ESD training iteration spends its time, with and without trajectory reuse; writes its BENCHMARKS.md
section.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/esd_profile.py [--reuse 4] [--iterations 24] [--sd15-iterations 12]

ESD-x on "circle", fp32, batch 1, through unsee's ``ESDTrainer``, on two models: the embedded toy model with the
toy preset's settings (25 DDIM steps) and SD 1.5's UNet architecture with random weights at 128 px with 4 DDIM
steps (``benchmarks/esd_speed_memory.py --model sd15``'s pipeline). Each iteration is split into:

- sampling: the DDIM run that makes x_t (under no_grad, with the model being trained; ``ddim_latents``);
- teacher: the frozen model's predictions for the target (one batched call, weights swapped in);
- student forward: the rest of the step's loss (the trained model's prediction and the MSE);
- backward + optimizer: the rest of the iteration (backward pass, Adam step, bookkeeping).

The first iterations (as many as one trajectory serves) are a warm-up; the timed ones cover whole trajectories,
so that a reused run's mean counts its sampling iterations in their share. Means per iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, write_section  # noqa: E402
from esd_speed_memory import DDIM_STEPS, build_pipe  # noqa: E402

import unsee.erasure.esd as esd_module  # noqa: E402
from unsee.erasure import ESDConfig, ESDTrainer  # noqa: E402
from unsee.toy.presets import preset_settings  # noqa: E402

PHASES = ("sampling", "teacher", "student forward", "backward + optimizer")


class ProfiledESD(ESDTrainer):
    """ESDTrainer that times its phases per iteration (see the module docstring)."""

    def __init__(self, config: ESDConfig) -> None:
        super().__init__(config)
        self.records: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self.sampler_calls = 0

    @contextlib.contextmanager
    def frozen_teacher(self):
        started = time.perf_counter()
        with super().frozen_teacher() as unet:
            yield unet
        self.current["teacher"] = self.current.get("teacher", 0.0) + time.perf_counter() - started

    def training_step(self, step: int) -> torch.Tensor:
        self.current = {"start": time.perf_counter()}
        original = esd_module.ddim_latents

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current["sampling"] = self.current.get("sampling", 0.0) + time.perf_counter() - started
                self.current["ddim_unet_calls"] = max(kwargs.get("stops") or args[6])
                self.sampler_calls += 1

        esd_module.ddim_latents = timed
        try:
            loss = super().training_step(step)
        finally:
            esd_module.ddim_latents = original
        self.current["step"] = time.perf_counter() - self.current["start"]
        return loss

    def report(self, phase, step, total, loss=None, message="") -> None:
        if phase == "train":
            now = time.perf_counter()
            c = self.current
            sampling, teacher = c.get("sampling", 0.0), c.get("teacher", 0.0)
            self.records.append({"total": now - c["start"], "sampling": sampling, "teacher": teacher,
                                 "student forward": c["step"] - sampling - teacher,
                                 "backward + optimizer": now - c["start"] - c["step"],
                                 "ddim_unet_calls": c.get("ddim_unet_calls", 0)})
        super().report(phase, step, total, loss, message)


def profile(model: str, reuse: int, iterations: int) -> dict:
    torch.manual_seed(0)
    if model == "toy":
        import unsee

        pipe = unsee.load_pipeline("toy")
        settings = preset_settings("toy", "esd-x", concept="circle")
        settings.pop("steps", None)
    else:
        pipe, settings = build_pipe("sd15")
        settings = {**settings, "lr": 1e-5, "ddim_steps": DDIM_STEPS["sd15"]}  # the speed benchmark's 4
    pipe.set_progress_bar_config(disable=True)
    warmup = reuse
    timed = max(1, (iterations - warmup) // reuse) * reuse
    config = ESDConfig(concept="circle", variant="esd-x", steps=warmup + timed, trajectory_reuse=reuse, device="cpu",
                       **settings)
    trainer = ProfiledESD(config)
    trainer.train(pipe)
    records = trainer.records[warmup:]
    mean = {key: sum(r[key] for r in records) / len(records) for key in ("total", *PHASES, "ddim_unet_calls")}
    return {"model": model, "reuse": reuse, "iterations": len(records), "ddim_steps": config.ddim_steps,
            "sampler_calls": trainer.sampler_calls, **mean}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reuse", type=int, default=4, help="the trajectory_reuse compared with 1")
    parser.add_argument("--iterations", type=int, default=24, help="iterations per toy run (warm-up included)")
    parser.add_argument("--sd15-iterations", type=int, default=12, help="iterations per sd15 run (warm-up included)")
    parser.add_argument("--models", default="toy,sd15")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for reuse in (1, args.reuse):
            row = profile(model, reuse, args.iterations if model == "toy" else args.sd15_iterations)
            rows.append(row)
            print(row, flush=True)

    lines = ["| model | trajectory_reuse | iteration | " + " | ".join(PHASES) + " | DDIM UNet calls per iteration |",
             "|---|---|---|" + "---|" * len(PHASES) + "---|"]
    for r in rows:
        share = " | ".join(f"{r[p]:.3f} s ({r[p] / r['total']:.0%})" for p in PHASES)
        lines.append(f"| {r['model']} | {r['reuse']} | {r['total']:.3f} s | {share} | {r['ddim_unet_calls']:.2f} |")
    speedups = []
    for model in dict.fromkeys(r["model"] for r in rows):
        one, many = [next(r for r in rows if r["model"] == model and r["reuse"] == k) for k in (1, args.reuse)]
        speedups.append(f"{model}: {one['total'] / many['total']:.2f}× with reuse {args.reuse}")
    steps = {r["model"]: r["ddim_steps"] for r in rows}
    body = f"""## Where an ESD iteration spends its time (`benchmarks/esd_profile.py`)

Hardware: {hardware()}.

ESD-x on "circle", fp32, batch 1, unsee's `ESDTrainer`: `toy` is the embedded model with the toy preset's settings
({steps.get('toy', 25)} DDIM steps), `sd15` SD 1.5's UNet architecture with random weights ({steps.get('sd15', 4)} DDIM steps, 128
px, the pipeline of `benchmarks/esd_speed_memory.py --model sd15`). Mean time per iteration over whole trajectories after a
warm-up ({', '.join(f"{r['model']} reuse {r['reuse']}: {r['iterations']}" for r in rows)} iterations). Sampling: the DDIM
run that makes x_t (no_grad, the model being trained, both CFG branches in one call); teacher: the frozen model's
batched predictions for the target; student forward: the trained model's prediction and the loss; backward +
optimizer: the rest of the iteration. DDIM UNet calls: the batched (conditional + unconditional) calls of the DDIM
runs, per iteration; a reused trajectory runs to the deepest stop of the steps it serves.

{chr(10).join(lines)}

Iteration speed-up from trajectory reuse: {'; '.join(speedups)}.
"""
    if not args.no_write:
        write_section("esd-profile", body)
    print(body)


if __name__ == "__main__":
    main()
