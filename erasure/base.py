"""The erasure trainer contract, shared by every method (ESD, SalUn, ...).

A method is one file with two small classes and one registration line:

- a config dataclass, a subclass of :class:`TrainerConfig`, with its paper's defaults. Each field is declared
  with the kind of value it holds (:func:`unsee.erasure.fields.setting`), so it is validated on construction: a
  bad value raises :class:`ConfigError` with a message that names the field and the fix, before any model is
  touched (optionally ``text_kv_only``: whether its adapters change only the cross-attention keys and values,
  so ``--fuse mace`` can refuse the others before training);
- a :class:`Trainer` subclass that says which UNet parameters it trains (:meth:`Trainer.select_parameters`),
  what it prepares before the first step (:meth:`Trainer.setup`) and what one step's loss is
  (:meth:`Trainer.training_step`), decorated with ``@register_method("name", summary=...)``
  (:mod:`unsee.erasure.registry`): the CLI, the demo and job files know it by that name from then on.

The shared parts are written once: conditioning and the concept in context (:mod:`~unsee.erasure.conditioning`),
UNet calls, sampling and the ESD-style target (:mod:`~unsee.erasure.sampling`), module selection
(:mod:`~unsee.erasure.selectors`), saliency masks (:mod:`~unsee.erasure.saliency`). The base class
(:mod:`~unsee.erasure.trainer`) owns everything else, identically for every method:

- ``train(pipe, progress=None, checkpoint_dir=None, resume=False) -> Adapter``;
- a progress callback receiving :class:`Progress` events (tqdm on the CLI, ``gr.Progress`` in the app);
- a checkpoint every ``checkpoint_every`` steps (trained tensors, optimizer state, RNG states, step,
  losses) written atomically (temporary file + ``os.replace``); ``resume=True`` continues from it and
  gives bit for bit the result of an uninterrupted run. Settings that do not change what the checkpoint
  means may differ on resume (:data:`RESUMABLE_CHANGES`: ``steps``, ``lr``, ``checkpoint_every``, ``device``,
  ``dtype``, ``mixed_precision``): the run goes on with the new values (a lower ``lr`` after a NaN, say) and
  the adapter's ``training["resumed_with"]`` records what changed;
- a NaN/inf loss stops training with :class:`TrainingError` before the bad step is applied; the
  last good checkpoint is kept (a checkpoint is never written from non-finite weights);
- determinism: every random draw comes from a ``torch.Generator`` seeded from ``config.seed`` (one per draw of
  ``draws_per_step``; with one draw, the one generator seeded with ``config.seed``);
- the frozen teacher is the same UNet with the original values of the trained tensors swapped in
  (:meth:`Trainer.frozen_teacher`), or with the LoRA adapter disabled; never a second UNet;
- data parallel through ``accelerate`` (launch: ``torchrun --nproc_per_node N -m unsee.cli erase ...``, or
  ``accelerate launch --multi_gpu --num_processes N -m unsee.cli erase ...``): one optimisation step averages the
  loss over ``draws_per_step`` independent draws of the method's step (:meth:`Trainer.training_step`; None: one
  per process). Draw ``j`` has its own random stream (draw 0: the run's generator, seeded with ``seed``, which
  also serves :meth:`Trainer.setup` on every process; draw ``j > 0``: a generator seeded from ``(seed, j)``), so a
  draw is the same whichever process computes it. With N processes each computes ``draws_per_step / N`` of them
  (a block of consecutive draws) and DDP averages the gradients: N processes give the adapter of one process with
  ``draws_per_step=N``, up to the order of float sums. One process with one draw is exactly the single-process
  trainer of earlier versions. Only the main process writes (checkpoints; ``run_jobs`` writes adapters, reports
  and grids there); several processes on a machine without a GPU train on the CPU with gloo;
- accelerate keeps one state per process: ``train`` sets it up for its own device and ``mixed_precision`` and
  puts back what it found when it ends, so trainers with different settings run one after another in a process;
- the pipeline is handed back exactly as it came (also after an error): every parameter and buffer of
  every component is the same tensor object with the same values, dtype and device (``dtype``/``device``
  train on converted copies; the caller's tensors are put back, never converted back), with the same
  ``requires_grad`` flags and gradients, the same attention processors and no LoRA layers left behind.
  The result is an :class:`~unsee.adapters.Adapter` to save or load;
- prompts: a trainer uses the prompt lists of its config, or documented templates ("a photo of {concept}", the
  COCO retain set...); it knows no prompt world (the toy model's preset passes its world's prompts as lists);
- the loss: taken on what the UNet outputs (noise, or v for v-prediction models such as the toy model and
  SD 2.x-v) unless the method offers ``loss_space="epsilon"`` (ESD, SalUn; see :func:`epsilon_from_output`).
"""

from __future__ import annotations

from .checkpoints import CHECKPOINT_NAME, RESUMABLE_CHANGES, load_checkpoint
from .conditioning import Conditioning, encode_prompts
from .config import TrainerConfig, fill_concept
from .errors import ConfigError, TrainingError
from .fields import DTYPES, canonical_dtype
from .processes import check_draws, launch_problem, launched_processes, on_main_process, process_rank, process_state
from .sampling import ddim_sample, denoising_target, epsilon_from_output, predict
from .trainer import Progress, ProgressCallback, Trainer

__all__ = [
    "ConfigError",
    "TrainingError",
    "Progress",
    "ProgressCallback",
    "TrainerConfig",
    "Trainer",
    "Conditioning",
    "CHECKPOINT_NAME",
    "load_checkpoint",
    "canonical_dtype",
    "epsilon_from_output",
    "RESUMABLE_CHANGES",
    # the pieces the job runner, the CLI, the attack and the benchmarks use
    "DTYPES",
    "check_draws",
    "ddim_sample",
    "denoising_target",
    "encode_prompts",
    "fill_concept",
    "launch_problem",
    "launched_processes",
    "on_main_process",
    "predict",
    "process_rank",
    "process_state",
]
