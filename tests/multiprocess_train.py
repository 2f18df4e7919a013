"""Test helper: train every erasure method a few steps on the tiny SD pipeline, save the adapters' tensors.

    torchrun --nproc_per_node 2 tests/multiprocess_train.py OUT.pt            # data parallel: a draw per process
    python tests/multiprocess_train.py OUT.pt --draws-per-step 2              # one process, the same global batch

Only the main process writes ``OUT.pt``: {method: {tensor name: tensor}, "_training": {method: training metadata},
"_copied": {method: how many VAE tensors training copied (it should copy none on the CPU)}}.
``tests/test_multiprocess.py`` compares the two.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

#: method -> settings: every method, each at its smallest (a few DDIM steps, tiny data sets), full weights and LoRA;
#: ESD-u and AdvUnlearn with trajectory_reuse (each draw keeps its own trajectory, whichever process computes it)
METHODS = {
    "esd-x": dict(ddim_steps=2),
    "esd-u": dict(ddim_steps=2, kind="lora", trajectory_reuse=2),
    "spm": dict(ddim_steps=2),
    "salun": dict(num_forget=2, num_retain=2, generation_steps=2, batch_size=2, relabel_prompts=["a red heart"],
                  retain_prompts=["a blue square"]),
    "ant": dict(ddim_steps=3, before_step=1, saliency_iterations=1),
    "advunlearn": dict(ddim_steps=2, retain_prompts=["a red heart"], retain_batch=1, warmup=1, attack_steps=1,
                       attack_init="latest", trajectory_reuse=2),
}


def train_all(draws_per_step: Optional[int] = None, steps: int = 2) -> dict:
    from unsee.erasure import make_trainer
    from unsee.testing import tiny_sd_pipeline

    tensors, training, copied = {}, {}, {}
    draws = {} if draws_per_step is None else {"draws_per_step": draws_per_step}  # None: one draw per process
    for method, settings in METHODS.items():
        pipe = tiny_sd_pipeline()
        where = {name: p.data_ptr() for name, p in pipe.vae.named_parameters()}  # a component no method trains
        moved = set()

        def progress(event, pipe=pipe, where=where, moved=moved) -> None:
            if event.phase == "train":
                moved.update(name for name, p in pipe.vae.named_parameters() if p.data_ptr() != where[name])

        adapter = make_trainer(method, concept="circle", steps=steps, lr=1e-3, device="cpu", **draws,
                               **settings).train(pipe, progress=progress)
        tensors[method] = {name: tensor.clone() for name, tensor in adapter.tensors.items()}
        training[method] = adapter.training
        copied[method] = len(moved)  # tensors copied for training on the CPU, where they already are: none
    return {**tensors, "_training": training, "_copied": copied}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--draws-per-step", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    result = train_all(args.draws_per_step, args.steps)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
