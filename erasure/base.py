"""The erasure trainer contract, shared by every method (ESD, SalUn, ...).

A method is two small classes:

- a config dataclass, a subclass of :class:`TrainerConfig`, with its paper's defaults. It is
  validated on construction (``__post_init__``): a bad value raises :class:`ConfigError` with a
  message that names the field and the fix, before any model is touched;
- a :class:`Trainer` subclass that says which UNet parameters it trains (:meth:`Trainer.select_parameters`),
  what it prepares before the first step (:meth:`Trainer.setup`) and what one step's loss is
  (:meth:`Trainer.training_step`).

The base class owns everything else, identically for every method:

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
- prompts: a trainer uses the prompt lists of its config, or documented templates for real models
  ("a photo of {concept}", the COCO retain set...); toy-world prompts only with ``toy_world=True`` (set by
  the ``toy`` preset for the embedded toy model), which :meth:`Trainer.train` refuses on any other model;
- the loss: taken on what the UNet outputs (noise, or v for v-prediction models such as the toy model and
  SD 2.x-v) unless the method offers ``loss_space="epsilon"`` (ESD, SalUn; see :func:`epsilon_from_output`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from unsee.adapters import Adapter, AdapterError, delta_adapter_from_weights, lora_adapter_from_peft
from unsee.files import atomic_write

from .precision import MasterWeights

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
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# every spelling a trainer config accepts for ``dtype`` (the CLI's --dtype choices and torch's names), lower case
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float": "float32",
                 "float16": "float16", "fp16": "float16", "half": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}
MIXED_PRECISION = ("no", "fp16", "bf16")
OUTPUT_KINDS = ("delta", "lora")
LOSS_SPACES = ("output", "epsilon")
#: config fields that may differ between a checkpoint and the run that resumes it: they change how the run goes
#: on, not what the checkpoint holds (the same tensors of the same method, with the same data and targets)
RESUMABLE_CHANGES = ("steps", "lr", "checkpoint_every", "device", "dtype", "mixed_precision")
#: config fields compared apart on resume: ``draws_per_step`` None means one draw per process, so what must match is
#: the number of draws it comes to (a 2-process checkpoint resumes on 1 process with ``draws_per_step=2``)
_COMPARED_APART = ("draws_per_step",)
#: launchers' environment variables that give the number of processes started
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


class ConfigError(ValueError):
    """An invalid trainer configuration; raised before any work, the message names the field and the fix."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable pipeline or checkpoint); the message says why."""


@dataclass(frozen=True)
class Progress:
    """A progress event. ``phase`` is ``"setup"`` (data generation, saliency mask...) or ``"train"``."""

    phase: str
    step: int
    total: int
    loss: Optional[float] = None
    message: str = ""


ProgressCallback = Callable[[Progress], None]


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def canonical_dtype(value: Any) -> Optional[str]:
    """A dtype setting as ``"float32"``, ``"float16"`` or ``"bfloat16"`` (None stays None).

    Accepts what the CLI's ``--dtype`` accepts (``fp32``, ``fp16``, ``bf16``, ``float16``...), torch's names as
    text (``"torch.bfloat16"``, ``"half"``) and ``torch.dtype`` objects; anything else raises :class:`ConfigError`.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for name, dtype in DTYPES.items():
            if value == dtype:
                return name
    elif isinstance(value, str):
        key = value.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key in DTYPE_ALIASES:
            return DTYPE_ALIASES[key]
    raise ConfigError(f"dtype must be float32, float16 or bfloat16 (also fp32, fp16, bf16, torch.bfloat16...) or "
                      f"None, got {value!r}")


def fill_concept(prompts: Sequence[str], concept: str) -> list[str]:
    """Prompt templates with ``{concept}`` replaced by the concept ("a photo of {concept}" -> "a photo of Van Gogh");
    prompts without the placeholder are kept as they are."""
    return [p.replace("{concept}", concept) for p in prompts]


def _is_prompt_list(value: Any, allow_empty: bool = False) -> bool:
    """A list or tuple (not a text) of non-empty prompts; empty only with ``allow_empty``."""
    return (isinstance(value, (list, tuple)) and (allow_empty or len(value) > 0)
            and all(isinstance(p, str) and p.strip() for p in value))


def checked_erase_from(value: Any) -> Union[str, tuple[str, ...], None]:
    """An ``erase_from`` setting checked and normalised: None, one prompt, or a tuple of prompts."""
    text = isinstance(value, str) and bool(value.strip())
    if not (value is None or text or _is_prompt_list(value)):
        raise ConfigError(f"erase_from must be a non-empty text, a non-empty list of them, or None, got {value!r}")
    return tuple(value) if isinstance(value, list) else value


def erase_from_prompts(value: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """An ``erase_from`` setting as a tuple of prompts (empty: erase the concept wherever it is named)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass
class TrainerConfig:
    """Settings every erasure trainer shares. Subclasses add their method's fields and paper defaults.

    Args:
        concept: the concept to erase, as a prompt ("circle", "Van Gogh", "nudity").
        steps: optimisation steps.
        lr: Adam learning rate (> 0).
        seed: seeds the generators every random draw comes from (draw 0's, which setup also uses, is seeded with
            it; see ``draws_per_step``).
        checkpoint_every: write a checkpoint every N steps when ``train`` gets a ``checkpoint_dir``
            (0: only when training ends).
        device: ``"cpu"`` forces the CPU; None lets ``accelerate`` pick (its process's GPU when there is one).
        dtype: train in this precision: ``"float32"``, ``"float16"`` or ``"bfloat16"``, spelled as the CLI's
            ``--dtype`` (``"bf16"``, ``"fp16"``...), as torch names it (``"torch.bfloat16"``) or as a ``torch.dtype``;
            stored as ``"bfloat16"`` etc. None keeps the pipeline's. The pipeline is trained on converted copies
            and handed back in its own precision, bit for bit. Low-precision Adam is what the official ESD rewrite
            does; prefer ``mixed_precision`` on GPUs.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` autocast through ``accelerate`` (weights stay as they are).
        draws_per_step: independent draws of the method's step (its x_t, timestep, prompt, batch of ``batch_size``
            where the method has one...) whose losses one optimisation step averages: the global batch of
            data-parallel training, in units of the method's own step. None: one per process. With N processes
            each computes ``draws_per_step / N`` of them (it must be a multiple of N); one process with
            ``draws_per_step=N`` trains the adapter N processes train.
    """

    concept: str = ""
    steps: int = 1000
    lr: float = 1e-5
    seed: int = 0
    checkpoint_every: int = 100
    device: Optional[str] = None
    dtype: Optional[str] = None
    mixed_precision: str = "no"
    draws_per_step: Optional[int] = None

    method: ClassVar[str] = "base"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field. Subclasses extend it."""
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise ConfigError(f"concept must be a non-empty text such as 'circle', got {self.concept!r}")
        if not _is_int(self.steps) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if not _is_number(self.lr) or self.lr <= 0:
            raise ConfigError(f"lr (learning rate) must be a positive number such as 1e-5, got {self.lr!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be a non-negative integer (0: only at the end), got "
                              f"{self.checkpoint_every!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:1', ... or None, got {self.device!r}") from None
        self.dtype = canonical_dtype(self.dtype)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.draws_per_step is not None and (not _is_int(self.draws_per_step) or self.draws_per_step < 1):
            raise ConfigError(f"draws_per_step must be a positive integer (the draws averaged per step; a multiple of "
                              f"the number of processes) or None (one per process), got {self.draws_per_step!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (stored in the adapter and the report)."""
        return {"method": self.method, **dataclasses.asdict(self)}


# ----------------------------------------------------------------------------------------------
# Text conditioning and UNet calls (SD 1.x/2.x and SDXL)
# ----------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Text conditioning for a batch: token embeddings, plus SDXL's pooled embeddings and time ids."""

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def rows(self, index: Union[torch.Tensor, Sequence[int], slice]) -> "Conditioning":
        pick = (lambda t: None if t is None else t[index])
        return Conditioning(self.embeds[index], pick(self.pooled), pick(self.time_ids))

    def repeat(self, n: int) -> "Conditioning":
        rep = (lambda t: None if t is None else t.repeat_interleave(n, dim=0))
        return Conditioning(rep(self.embeds), rep(self.pooled), rep(self.time_ids))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        cat = (lambda ts: None if ts[0] is None else torch.cat(ts))
        return Conditioning(cat([p.embeds for p in parts]), cat([p.pooled for p in parts]),
                            cat([p.time_ids for p in parts]))

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


def is_sdxl(pipe: Any) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str], height: int, width: int) -> Conditioning:
    """Conditioning for each prompt, as the pipeline computes it; ``""`` gives the unconditional embedding
    the pipeline uses for classifier-free guidance (zeros on SDXL with ``force_zeros_for_empty_prompt``)."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    prompts = list(prompts)
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if pipe.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([not p for p in prompts], device=device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
        return Conditioning(embeds.to(dtype), pooled.to(dtype), time_ids.repeat(len(prompts), 1))
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return Conditioning(embeds.to(dtype))


def predict(unet: nn.Module, x: torch.Tensor, t: Union[int, torch.Tensor], cond: Conditioning) -> torch.Tensor:
    """One UNet call: the model output (noise, or v for v-prediction models) for each row of ``x``."""
    if len(cond) != x.shape[0]:
        cond = cond.repeat(x.shape[0] // len(cond))
    return unet(x, t, **cond.unet_kwargs(), return_dict=False)[0]


@torch.no_grad()
def ddim_sample(unet: nn.Module, scheduler: Any, x: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                guidance_scale: float, stop_at: Optional[int] = None, start_at: int = 0) -> torch.Tensor:
    """Deterministic DDIM sampling with classifier-free guidance from the noise ``x``.

    ``scheduler`` is a ``DDIMScheduler`` whose ``set_timesteps`` was called. Runs steps ``start_at`` to
    ``stop_at`` (the end when None): the result is at the noise level of ``scheduler.timesteps[stop_at]`` (the
    clean latents when ``stop_at`` is None); ``x`` must be at the level of ``scheduler.timesteps[start_at]``.
    The conditional and unconditional predictions share one UNet call.
    """
    steps = len(scheduler.timesteps) if stop_at is None else stop_at
    both = Conditioning.cat([cond, uncond])
    for t in scheduler.timesteps[start_at:steps]:
        out = predict(unet, torch.cat([x, x]), t, both)
        out_c, out_u = out.chunk(2)
        guided = out_u + guidance_scale * (out_c - out_u)
        x = scheduler.step(guided, t, x).prev_sample
    return x


def denoising_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for ``add_noise(x0, noise, t)`` under the scheduler's parametrisation."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise TrainingError(f"unsupported prediction_type {kind!r}")


def epsilon_from_output(scheduler: Any, output: torch.Tensor, x_t: torch.Tensor,
                        t: Union[int, torch.Tensor]) -> torch.Tensor:
    """The noise prediction that a UNet output at ``(x_t, t)`` stands for, under the scheduler's parametrisation.

    With ``alpha_t = sqrt(alphas_cumprod[t])`` and ``sigma_t = sqrt(1 - alphas_cumprod[t])``, so that
    ``x_t = alpha_t x0 + sigma_t eps``: ``epsilon`` outputs are returned as they are; ``v_prediction`` outputs
    (``v = alpha_t eps - sigma_t x0``) give ``eps = alpha_t v + sigma_t x_t``; ``sample`` outputs give
    ``eps = (x_t - alpha_t x0) / sigma_t``. ``t`` is one timestep or one per row; the result is float32 (or the
    output's dtype for ``epsilon``).

    For two outputs at the same ``x_t`` and ``t``, ``eps_a - eps_b = alpha_t (v_a - v_b)``: an MSE between v
    outputs is ``1 / alpha_t^2 = 1 + 1 / SNR(t)`` times the MSE between the noise predictions they stand for.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    if kind not in ("v_prediction", "sample"):
        raise TrainingError(f"unsupported prediction_type {kind!r}")
    alphas_cumprod = scheduler.alphas_cumprod.to(device=output.device, dtype=torch.float32)
    steps = torch.as_tensor(t, device=output.device).long().reshape(-1)
    shape = (-1,) + (1,) * (output.ndim - 1)
    alpha = alphas_cumprod[steps].sqrt().reshape(shape)
    sigma = (1 - alphas_cumprod[steps]).sqrt().reshape(shape)
    if kind == "v_prediction":
        return alpha * output.float() + sigma * x_t.float()
    return (x_t.float() - alpha * output.float()) / sigma


def gaussian_lora_config(rank: int, lora_alpha: Optional[float], modules: Sequence[str]) -> Any:
    """A peft ``LoraConfig`` on ``modules`` with Gaussian-initialised down weights (the adapter starts as the
    identity: up is zero); ``lora_alpha`` None means alpha = rank (scaling 1)."""
    from peft import LoraConfig

    alpha = lora_alpha if lora_alpha is not None else rank
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(modules))


# ----------------------------------------------------------------------------------------------
# The pipeline as it was handed in
# ----------------------------------------------------------------------------------------------


def pipeline_modules(pipe: Any) -> list[nn.Module]:
    """The ``nn.Module`` components of a pipeline (UNet, text encoders, VAE...), each once."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = {name: getattr(pipe, name, None) for name in
                      ("unet", "text_encoder", "text_encoder_2", "vae", "image_encoder", "safety_checker")}
    modules: list[nn.Module] = []
    for module in components.values():
        if isinstance(module, nn.Module) and not any(module is m for m in modules):
            modules.append(module)
    return modules


_NOTHING = object()


class _PipelineSnapshot:
    """Every tensor of a pipeline's modules as handed in, to put back after training.

    References, not copies: training moves or converts tensors into new ones (:meth:`move` keeps the caller's
    tensors it replaces) and trains copies of the trained tensors (:meth:`Trainer._attach_trainable`), so the
    caller's tensors are never written to and go back exactly as they were (also their dtype and device), with
    their ``requires_grad`` flags and gradients, the modules' own ``forward`` (mixed precision wraps it), and
    the UNet's attention processors.
    """

    def __init__(self, pipe: Any) -> None:
        self.modules = pipeline_modules(pipe)
        self.params: dict[int, tuple[nn.Parameter, bool, Optional[torch.Tensor]]] = {}
        self.moved: dict[int, torch.Tensor] = {}  # the caller's data of the parameters :meth:`move` replaced
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        for module in self.modules:
            for param in module.parameters():
                self.params.setdefault(id(param), (param, param.requires_grad, param.grad))
            for sub in module.modules():
                for name, buffer in sub._buffers.items():
                    if buffer is not None:
                        self.buffers.append((sub, name, buffer))
        unet = getattr(pipe, "unet", None)
        self.unet = unet
        self.processors = dict(unet.attn_processors) if hasattr(unet, "attn_processors") else None
        # accelerate's mixed precision wraps ``forward`` in the instance; unwrapping leaves a bound method there
        self.forwards = [(module, module.__dict__.get("forward", _NOTHING)) for module in self.modules]

    @torch.no_grad()
    def move(self, device: torch.device, dtype: Optional[torch.dtype]) -> None:
        """Every tensor on ``device`` (and floating-point ones in ``dtype``), as new tensors where they change."""
        for key, (param, _, _) in self.params.items():
            data = param.data
            moved = data.to(device=device, dtype=dtype if dtype is not None and data.is_floating_point() else None)
            if moved is not data:
                if param.grad is not None and (param.grad.dtype != moved.dtype or param.grad.device != moved.device):
                    param.grad = None  # the caller's gradient comes back with the restore
                self.moved[key] = data
                param.data = moved
        for sub, name, buffer in self.buffers:
            moved = buffer.to(device=device, dtype=dtype if dtype is not None and buffer.is_floating_point() else None)
            if moved is not buffer:
                sub._buffers[name] = moved

    @torch.no_grad()
    def restore(self) -> None:
        for key, (param, requires_grad, grad) in self.params.items():
            if key in self.moved:
                param.data = self.moved[key]
            param.requires_grad_(requires_grad)
            param.grad = grad
        for sub, name, buffer in self.buffers:
            if sub._buffers.get(name) is not buffer:
                sub._buffers[name] = buffer
        for module, forward in self.forwards:
            if forward is _NOTHING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
        if self.processors is not None:
            now = self.unet.attn_processors
            if set(now) != set(self.processors) or any(now[k] is not v for k, v in self.processors.items()):
                self.unet.set_attn_processor(dict(self.processors))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(checkpoint_dir: Union[str, os.PathLike]) -> Optional[dict]:
    """The checkpoint in ``checkpoint_dir`` (a dict; see ``Trainer``), or None when there is none."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a checkpoint is written atomically, so this is not a partial write
        raise TrainingError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not an unsee trainer checkpoint (format {CHECKPOINT_FORMAT})")
    return state


# ----------------------------------------------------------------------------------------------
# Processes (data parallel through accelerate)
# ----------------------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_int(names: Sequence[str]) -> Optional[int]:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def launched_processes() -> int:
    """How many processes the launcher (torchrun, ``accelerate launch``, mpirun) started: 1 without one."""
    return max(1, _env_int(_WORLD_SIZE_VARIABLES) or 1)


def process_rank() -> int:
    """This process's rank as its launcher set it (0 without one); rank 0 is the main process, the one that writes."""
    return _env_int(_RANK_VARIABLES) or 0


def launch_problem() -> Optional[str]:
    """Why this launch cannot train as the user asked (one line naming the fix), or None.

    ``accelerate launch --cpu --num_processes N`` starts one process whatever N is (accelerate's simple launcher:
    it sets ``MASTER_ADDR`` for N > 1 and no rank); that process would train alone.
    """
    ranked = any(os.environ.get(name) for name in (*_RANK_VARIABLES, "LOCAL_RANK"))
    if _env_flag("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR") and not ranked:
        return ("accelerate launch --cpu starts one process whatever --num_processes says; start N CPU processes with "
                "torchrun --nproc_per_node N -m unsee.cli erase ... (or accelerate launch --multi_gpu --num_processes "
                "N -m unsee.cli erase ... --device cpu)")
    return None


def _wants_cpu(device: Optional[str]) -> bool:
    return _env_flag("ACCELERATE_USE_CPU") or (device is not None and torch.device(device).type == "cpu")


def process_state(device: Optional[str] = None) -> Any:
    """accelerate's ``PartialState`` for training on ``device`` (``"cpu"``, or None for the processes' GPUs), with
    the process group of a multi-process launch set up. Several processes on a machine where accelerate finds no
    GPU backend train on the CPU with gloo (accelerate would make each a world of its own). Raises
    :class:`ConfigError` for a launch that would not train as asked (:func:`launch_problem`), or a device other
    than the one the processes already use."""
    from accelerate.state import PartialState

    problem = launch_problem()
    if problem is not None:
        raise ConfigError(problem)
    cpu = _wants_cpu(device)
    if PartialState._shared_state:
        state = PartialState()
        wanted = "cpu" if cpu else (torch.device(device).type if device is not None else state.device.type)
        if state.num_processes > 1 and state.device.type != wanted:
            raise ConfigError(f"these {state.num_processes} processes train on {state.device.type}; every job of a "
                              f"multi-process run trains on the same device, and this one asks for {device!r}")
        return state
    state = PartialState(cpu=cpu)
    if launched_processes() > 1 and state.num_processes == 1 and not cpu:
        PartialState._reset_state()  # nothing distributed was set up: no GPU backend here, so gloo on the CPU
        state = PartialState(cpu=True)
    if state.num_processes != launched_processes():
        raise ConfigError(f"the launcher started {launched_processes()} processes and accelerate set up "
                          f"{state.num_processes}; launch with torchrun --nproc_per_node N -m unsee.cli erase ...")
    return state


@contextlib.contextmanager
def _accelerator_session(config: TrainerConfig) -> Iterator[Any]:
    """An ``Accelerator`` for one training run; accelerate's process-wide state is put back as it was found.

    accelerate keeps one state per process and refuses another ``mixed_precision`` (or the CPU after a GPU) once
    it is set; a run sets up its own, so trainers with different settings can follow one another (and an
    ``Accelerator`` of the caller's keeps its settings). The process group of a multi-process launch stays.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    saved_partial, saved_state = dict(PartialState._shared_state), dict(AcceleratorState._shared_state)
    AcceleratorState._shared_state.clear()
    if saved_partial.get("num_processes", 1) == 1:
        PartialState._shared_state.clear()
    try:
        state = process_state(config.device)
        yield Accelerator(cpu=state.device.type == "cpu", mixed_precision=config.mixed_precision,
                          device_placement=False)
    finally:
        AcceleratorState._shared_state.clear()
        AcceleratorState._shared_state.update(saved_state)
        if PartialState._shared_state.get("num_processes", 1) == 1:
            PartialState._shared_state.clear()
            PartialState._shared_state.update(saved_partial)


def check_draws(draws_per_step: Optional[int], processes: int) -> None:
    """Raise :class:`ConfigError` when ``draws_per_step`` does not split over ``processes`` processes."""
    if draws_per_step is not None and draws_per_step % processes:
        raise ConfigError(f"draws_per_step={draws_per_step} does not split over {processes} processes; give a multiple "
                          f"of {processes} (--set draws_per_step=...) or leave it unset (one draw per process)")


def draw_seed(seed: int, draw: int) -> int:
    """The seed of draw ``draw``'s generator (see ``draws_per_step``): ``seed`` itself for draw 0, else a 63-bit hash
    of both (no two (seed, draw) pairs share a stream, unlike ``seed + draw``)."""
    if draw == 0:
        return seed
    digest = hashlib.sha256(f"unsee-draw:{seed}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def on_main_process(work: Callable[[], Any], what: str) -> None:
    """Run ``work`` on the main process only; with several processes, each raises when it failed there.

    The error is the main process's own there, and elsewhere a :class:`ConfigError` (when it was one) or a
    :class:`TrainingError` with its message, so that every process ends the same way instead of waiting for a
    process that is gone. Every process must call it at the same point (it is a collective).
    """
    from accelerate.state import PartialState

    state = PartialState() if PartialState._shared_state else None
    main = state is None or state.is_main_process
    failure: Optional[BaseException] = None
    if main:
        try:
            work()
        except Exception as error:
            failure = error
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [None if failure is None else (isinstance(failure, ConfigError), str(failure))]
        broadcast_object_list(shared, from_process=0)
        if not main and shared[0] is not None:
            config_error, message = shared[0]
            raise (ConfigError if config_error else TrainingError)(
                message if config_error else f"the main process failed {what}: {message}")
    if failure is not None:
        raise failure


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Base class of the erasure trainers; see the module docstring for the contract.

    Subclasses set ``config_class`` and implement :meth:`select_parameters`, :meth:`setup` and
    :meth:`training_step`; they may override :meth:`adjust_gradients` (e.g. SalUn's mask),
    :meth:`extra_state` / :meth:`load_extra_state` (method data kept in checkpoints) and
    :meth:`training_summary`.

    While :meth:`train` runs, these attributes are set: ``pipe``, ``unet`` (the bare UNet), ``trained_module``
    (the component named by ``trained_component``: the UNet, or the text encoder for AdvUnlearn), ``model``
    (it as prepared by ``accelerate``: call it for predictions that need gradients), ``accelerator``,
    ``device``, ``generator`` (the CPU generator of the draw being computed, see ``draws_per_step``: every random
    number of a step comes from it, directly or through :meth:`randn` and :meth:`randint`) and ``params`` (name ->
    trained parameter). A method that carries values from one step to the next names them in :attr:`draw_state`.
    """

    config_class: ClassVar[type] = TrainerConfig
    #: a gradient mask (trained tensor name -> bool tensor) applied by :meth:`adjust_gradients`; None: none
    mask: Optional[dict[str, torch.Tensor]] = None
    #: leave tensors the training did not change out of a delta adapter
    drop_unchanged: ClassVar[bool] = False
    #: the pipeline component whose weights are trained ("unet", or "text_encoder" for AdvUnlearn)
    trained_component: ClassVar[str] = "unet"
    #: attributes that :meth:`training_step` carries from one step to the next (AdvUnlearn's latest adversarial
    #: prefix): each draw of ``draws_per_step`` keeps its own, as it keeps its own generator, and checkpoints hold
    #: every draw's
    draw_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: TrainerConfig) -> None:
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()  # fields may have been changed since construction
        self.config = config
        self.params: dict[str, nn.Parameter] = {}
        self.losses: list[float] = []
        self._originals: dict[str, torch.Tensor] = {}
        self._lora = False
        self._device_mask: dict[str, torch.Tensor] = {}

    # -- what a method defines ---------------------------------------------------------------

    @property
    def method(self) -> str:
        """The method name stored in the adapter, e.g. ``"esd-u"``."""
        return self.config.method

    @property
    def output_kind(self) -> str:
        return getattr(self.config, "kind", "delta")

    def select_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters of the trained component (the UNet unless ``trained_component`` says otherwise) to
        train (full-weight training), name -> parameter, in a stable order."""
        raise NotImplementedError

    def lora_config(self, unet: nn.Module) -> Any:
        """A peft ``LoraConfig`` for LoRA output (only methods with ``kind="lora"`` need it)."""
        raise ConfigError(f"{self.method} cannot train a LoRA adapter; use kind='delta'")

    def setup(self, pipe: Any, state: Optional[dict] = None) -> None:
        """Work before the first step, with the original weights: encode prompts, generate data, masks...

        ``state`` is what :meth:`extra_state` returned when the checkpoint being resumed was written (None
        on a fresh run): restore from it instead of recomputing.
        """

    def training_step(self, step: int) -> torch.Tensor:
        """The loss of one optimisation step (a scalar with gradients on the trained parameters)."""
        raise NotImplementedError

    def adjust_gradients(self) -> None:
        """Called after the backward pass, before the optimizer step. By default: when the method set ``mask``
        (name -> bool tensor, SalUn and ANT), each trained tensor's gradient is multiplied by its mask; with
        zero gradients Adam's moments and updates stay zero, so the entries outside the mask stay bit-identical."""
        if self.mask is None:
            return
        for name, param in self.params.items():
            if param.grad is None:
                continue
            if name not in self._device_mask:
                self._device_mask[name] = self.mask[name].to(param.device, param.grad.dtype)
            param.grad.mul_(self._device_mask[name])

    def extra_state(self) -> dict:
        """Method data to keep in checkpoints (tensors, numbers, strings, lists, dicts only)."""
        return {}

    def training_summary(self) -> dict:
        """Method-specific entries for the adapter's ``training`` metadata."""
        return {}

    # -- helpers for methods -----------------------------------------------------------------

    def report(self, phase: str, step: int, total: int, loss: Optional[float] = None, message: str = "") -> None:
        if self._progress is not None:
            self._progress(Progress(phase, step, total, loss, message))

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal noise from the run's generator (drawn on the CPU: the same on every device)."""
        return torch.randn(shape, generator=self.generator).to(self.device, self.unet.dtype)

    def randint(self, low: int, high: int, size: Sequence[int] = ()) -> torch.Tensor:
        """Integers in ``[low, high)`` from the run's generator."""
        return torch.randint(low, high, tuple(size), generator=self.generator)

    def draw_index(self, n: int) -> int:
        """A random index in ``[0, n)`` (no random number is drawn when ``n`` is 1)."""
        return 0 if n == 1 else int(self.randint(0, n))

    def draw(self, choices: Sequence[Conditioning]) -> Conditioning:
        """One of ``choices`` at random (no random number is drawn when there is only one)."""
        return choices[self.draw_index(len(choices))]

    @contextlib.contextmanager
    def frozen_teacher(self) -> Iterator[nn.Module]:
        """The frozen original model, in place: the trained tensors' original values are swapped in (or the
        LoRA adapter is disabled) for the duration of the block; yields the bare UNet. Use under no_grad."""
        unet = self.unet
        if self._lora:
            unet.disable_adapters()
            try:
                yield unet
            finally:
                unet.enable_adapters()
            return
        current = {}
        for name, param in self.params.items():
            current[name] = param.data
            param.data = self._originals[name]
        try:
            yield unet
        finally:
            for name, param in self.params.items():
                param.data = current[name]

    def loss_view(self, output: torch.Tensor, x_t: torch.Tensor, t: Union[int, torch.Tensor],
                  scheduler: Any) -> torch.Tensor:
        """A UNet output as the loss compares it: as it is (``loss_space="output"``, the default), or the noise
        prediction it stands for (``loss_space="epsilon"``, :func:`epsilon_from_output`), for methods that have
        the setting."""
        if getattr(self.config, "loss_space", "output") == "epsilon":
            return epsilon_from_output(scheduler, output, x_t, t)
        return output

    def default_resolution(self, pipe: Any) -> tuple[int, int]:
        """The pipeline's default image size (height, width)."""
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return size, size

    def image_size(self, pipe: Any) -> tuple[int, int]:
        """Image (height, width): ``config.resolution`` or the pipeline's default, checked against the VAE's factor."""
        height, width = self.default_resolution(pipe)
        resolution = getattr(self.config, "resolution", None)
        if resolution is not None:
            height = width = resolution
        if height % pipe.vae_scale_factor:
            raise ConfigError(f"resolution {height} is not a multiple of the VAE's scale factor {pipe.vae_scale_factor}")
        return height, width

    def latent_size(self, pipe: Any) -> tuple[int, int, int]:
        """(channels, height, width) of the UNet's latents for :meth:`image_size`."""
        height, width = self.image_size(pipe)
        factor = pipe.vae_scale_factor
        return pipe.unet.config.in_channels, height // factor, width // factor

    def ddim_scheduler(self, steps: int) -> Any:
        """A fresh ``DDIMScheduler`` with the pipeline's noise schedule, set to ``steps`` steps on the run's device."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    # -- the training loop -------------------------------------------------------------------

    def train(
        self,
        pipe: Any,
        progress: Optional[ProgressCallback] = None,
        checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
        resume: bool = False,
    ) -> Adapter:
        """Train on ``pipe`` and return the adapter; the pipeline is handed back exactly as it came.

        Every parameter and buffer of the pipeline's components comes back as the same tensor with the same
        values, dtype and device (``config.dtype`` and the training device apply to copies), with its
        ``requires_grad`` flag and gradient; the UNet's attention processors are the same objects; no LoRA
        layers are left. This holds after an error too.

        Args:
            pipe: an SD 1.x/2.x or SDXL pipeline (``unsee.load_pipeline`` or a diffusers pipeline).
            progress: called with a :class:`Progress` event during setup and after every step.
            checkpoint_dir: folder for ``checkpoint.pt`` (written every ``config.checkpoint_every`` steps and at
                the end); None: no checkpoints.
            resume: continue from the checkpoint in ``checkpoint_dir`` when there is one. Its settings must
                match this config except those in :data:`RESUMABLE_CHANGES` (``steps``, ``lr``,
                ``checkpoint_every``, ``device``, ``dtype``, ``mixed_precision``), which take this config's
                values from the resumed step on (Adam keeps its moments; its learning rate becomes ``lr``).

        Raises:
            ConfigError: invalid settings, a checkpoint written with other settings (or another number of draws
                per step), a launch that would not train as asked (``accelerate launch --cpu --num_processes N``
                starts one process), ``draws_per_step`` that does not split over the processes, or ``toy_world=True``
                (toy-world prompts) on a pipeline that is not the embedded toy model.
            TrainingError: a non-finite loss (the last good checkpoint is kept), or an unusable pipeline.
        """
        from accelerate.utils import gather_object

        config = self.config
        config.validate()
        if not isinstance(getattr(pipe, "unet", None), nn.Module):
            raise TrainingError(f"{type(pipe).__name__} has no UNet; erasure trainers need an SD 1.x/2.x or SDXL pipeline")
        if getattr(pipe.unet, "peft_config", None):
            raise TrainingError("the UNet already has LoRA adapters; unload them (pipe.unload_lora_weights()) first")
        if getattr(config, "toy_world", False):
            from .presets import is_toy_pipeline

            if not is_toy_pipeline(pipe):
                raise ConfigError(
                    f"{self.method}: toy_world=True draws prompts from the toy shapes world, and this pipeline is "
                    "not the embedded toy model; give the prompt lists (or leave them to the templates for real "
                    "models) with toy_world=False, e.g. preset 'paper'")
        if resume and checkpoint_dir is None:
            raise ConfigError("resume=True needs the checkpoint_dir to resume from")
        checkpoint = load_checkpoint(checkpoint_dir) if (resume and checkpoint_dir is not None) else None
        if checkpoint is not None:
            self._check_checkpoint(checkpoint, Path(checkpoint_dir))

        with _accelerator_session(config) as accelerator:
            return self._train(pipe, accelerator, progress, checkpoint, checkpoint_dir, gather_object)

    def _train(self, pipe: Any, accelerator: Any, progress: Optional[ProgressCallback], checkpoint: Optional[dict],
               checkpoint_dir: Optional[Union[str, os.PathLike]], gather_object: Callable) -> Adapter:
        config = self.config
        # one process may train on any device it is told; several use accelerate's per-process device
        device = torch.device(config.device) if config.device and accelerator.num_processes == 1 else accelerator.device
        if device.type == "cpu":  # accelerate names a process's CPU "cpu:<rank>": moving there would copy every tensor
            device = torch.device("cpu")
        self.accelerator, self.device, self._progress = accelerator, device, progress
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._elapsed_before = 0.0
        trained = getattr(pipe, self.trained_component, None)
        if not isinstance(trained, nn.Module):
            raise TrainingError(f"{self.method} trains the pipeline's {self.trained_component}, and "
                                f"{type(pipe).__name__} has none")
        draws = self._plan_draws(accelerator.num_processes, accelerator.process_index)
        if checkpoint is not None:
            self._check_draws(checkpoint, len(draws) * accelerator.num_processes, Path(checkpoint_dir))
        self._resume_changes = self._changed_settings(checkpoint) if checkpoint is not None else {}
        snapshot = _PipelineSnapshot(pipe)  # what goes back to the caller, whatever happens below
        self.pipe, self.unet = pipe, pipe.unet
        self.trained_module = trained
        # setup draws from the run's generator on every process alike (the same data, anchors, masks everywhere);
        # draw 0 goes on with it, the other draws have generators of their own (see the module docstring)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.losses = []
        self._device_mask = {}
        self.params, self._originals, self._lora = {}, {}, False  # nothing of an earlier run is restored
        started = time.perf_counter()
        was_training = {module: module.training for module in {self.unet, trained}}
        model = None
        try:
            snapshot.move(device, DTYPES[config.dtype] if config.dtype is not None else None)
            for module in snapshot.modules:
                module.requires_grad_(False)
            for module in was_training:
                module.eval()  # no dropout: the teacher and the student see the same function
            self.setup(pipe, checkpoint.get("extra") if checkpoint is not None else None)
            self._share_mask()
            self._draw_generators = {j: self.generator if j == 0 else torch.Generator().manual_seed(
                draw_seed(config.seed, j)) for j in draws}
            self._draw_values = {j: {name: getattr(self, name, None) for name in self.draw_state} for j in draws}
            self._attach_trainable()
            self._masters = MasterWeights(self.params)  # Adam steps float32 copies of half-precision tensors
            optimizer = torch.optim.Adam(self._masters.optimized(), lr=config.lr, weight_decay=0.0)
            model, optimizer = accelerator.prepare(trained, optimizer)
            self.model = model
            start = 0
            if checkpoint is not None:
                start = self._restore(checkpoint, optimizer)

            for step in range(start, config.steps):
                optimizer.zero_grad(set_to_none=True)
                losses = []
                for number, j in enumerate(draws):
                    # gradients are averaged across processes once, at the backward pass of the last draw here
                    last = number == len(draws) - 1
                    with (contextlib.nullcontext() if last else accelerator.no_sync(model)), self._draw(j):
                        loss = self.training_step(step)
                        losses.append(loss.detach().float())
                        accelerator.backward(loss if len(draws) == 1 else loss / len(draws))
                mean = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
                value = float(accelerator.reduce(mean, reduction="mean"))
                if not math.isfinite(value):
                    raise TrainingError(self._nonfinite_message(value, step))
                self.adjust_gradients()
                self._masters.pull_gradients()
                optimizer.step()
                self._masters.push()
                self.losses.append(value)
                self.report("train", step + 1, config.steps, value)
                every = config.checkpoint_every
                if self._checkpoint_dir is not None and (step + 1 == config.steps or (every and (step + 1) % every == 0)):
                    self._save_checkpoint(step + 1, optimizer, started, gather_object)

            if not all(bool(torch.isfinite(p.detach()).all()) for p in self.params.values()):
                raise TrainingError(self._nonfinite_message(float("nan"), config.steps - 1, what="the trained weights"))
            summary = {
                "steps": config.steps,
                "losses": self.losses,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None,
                "seconds": round(time.perf_counter() - started + self._elapsed_before, 3),
                "resumed_from_step": start if checkpoint is not None else None,
                **({"resumed_with": self._resume_changes} if self._resume_changes else {}),
                "device": str(device),
                "num_processes": accelerator.num_processes,
                "draws_per_step": len(draws) * accelerator.num_processes,
                "trained_tensors": len(self.params),
                "trained_parameters": sum(p.numel() for p in self.params.values()),
                **self.training_summary(),
            }
            return self._make_adapter(summary)
        finally:
            if model is not None:
                accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            try:
                self._restore_pipeline()
            finally:
                snapshot.restore()  # the caller's own tensors, flags, gradients and processors
                for module, mode in was_training.items():
                    module.train(mode)
                accelerator.free_memory()
                self.model = None

    # -- internals ---------------------------------------------------------------------------

    _progress: Optional[ProgressCallback] = None
    _checkpoint_dir: Optional[Path] = None
    _elapsed_before: float = 0.0
    _resume_changes: dict = {}

    def _attach_trainable(self) -> None:
        """Choose the trained tensors: LoRA layers added with peft, or a subset of the UNet's own parameters."""
        if self.output_kind == "lora":
            # peft draws the down weights from the global generator: seed it from the config for this call only,
            # so a LoRA trainer is deterministic for its seed whatever ran before it
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(self.config.seed)
                self.unet.add_adapter(self.lora_config(self.unet))
            self._lora = True
            self.params = {n: p for n, p in self.unet.named_parameters() if ".lora_" in n}
            for param in self.params.values():  # peft creates them in the UNet's dtype; train in it as well
                param.requires_grad_(True)
            self._originals = {}
        else:
            self._lora = False
            self.params = self.select_parameters(self.trained_module)
            # the trained subset's original tensors stay as they are (the teacher and the restore use them);
            # training writes to copies
            self._originals = {}
            with torch.no_grad():
                for name, param in self.params.items():
                    self._originals[name] = param.data
                    param.data = param.data.clone()
            for param in self.params.values():
                param.requires_grad_(True)
        if not self.params:
            raise TrainingError(f"{self.method} selects no parameters of this UNet; check the variant")

    def _restore_pipeline(self) -> None:
        """Take the trained tensors out (their originals back in, the LoRA layers removed); the caller's
        tensors, flags and gradients come back with the snapshot ``train`` took."""
        with torch.no_grad():
            if self._lora:
                self.unet.unload_lora()  # removes the peft layers: the base weights were never touched
                self._lora = False
            for name, param in self.params.items():
                if name in self._originals:
                    param.data = self._originals[name]  # the original tensor itself

    def _make_adapter(self, summary: dict) -> Adapter:
        common = dict(method=self.method, concepts=[self.config.concept], hyperparameters=self.config.to_dict(),
                      training=summary)
        try:
            if self._lora:
                return lora_adapter_from_peft(self.unet, "unet", **common)
            trained = {n: p.detach() for n, p in self.params.items()}
            return delta_adapter_from_weights(self._originals, trained, self.trained_component, model=self.trained_module,
                                              drop_unchanged=self.drop_unchanged, **common)
        except AdapterError as error:
            raise TrainingError(f"training produced no usable adapter: {error}") from error

    def _nonfinite_message(self, value: float, step: int, what: str = "the loss") -> str:
        lower = f"{self.config.lr / 10:.3g}"
        precision = "" if self.config.dtype in (None, "float32") else " or dtype float32 (--dtype float32)"
        if self._checkpoint_dir is not None and (self._checkpoint_dir / CHECKPOINT_NAME).exists():
            # RESUMABLE_CHANGES allows lr and dtype to change on resume, so this advice works as written
            advice = (f"the last good checkpoint in {self._checkpoint_dir} is kept; resume from it with a lower "
                      f"learning rate: the same settings with lr={lower} and resume=True (unsee erase: the same "
                      f"command with --resume --lr {lower}){precision}")
        else:
            advice = f"no checkpoint was written; start again with a lower learning rate (lr={lower}){precision}"
        return (f"{self.method}: {what} became {value} at step {step + 1} of {self.config.steps}; training stopped "
                f"before applying it ({advice})")

    def _settings_pair(self, checkpoint: dict) -> tuple[dict, dict]:
        """(the checkpoint's settings, this config's), fields the checkpoint predates taken at their defaults, those
        compared apart (:data:`_COMPARED_APART`) left out."""
        saved, mine = dict(checkpoint.get("config") or {}), self.config.to_dict()
        for f in dataclasses.fields(self.config):
            if f.name not in saved and f.default is not dataclasses.MISSING:
                # before toy_world, the world's prompts were drawn exactly where the toy preset now sets it
                saved[f.name] = mine[f.name] if f.name == "toy_world" else f.default
        for name in _COMPARED_APART:
            saved.pop(name, None)
            mine.pop(name, None)
        return saved, mine

    # -- draws and processes --------------------------------------------------------------------

    def _plan_draws(self, processes: int, index: int) -> list[int]:
        """The draws (of ``draws_per_step``) this process computes: a block of consecutive ones."""
        check_draws(self.config.draws_per_step, processes)
        each = (self.config.draws_per_step or processes) // processes
        return list(range(index * each, (index + 1) * each))

    def _check_draws(self, checkpoint: dict, total: int, folder: Path) -> None:
        written = len(checkpoint["rng"]["generators"])
        if written != total:
            raise ConfigError(f"the checkpoint in {folder} was written with {written} draw(s) per step and this run "
                              f"makes {total}; resume with draws_per_step={written} (--set draws_per_step={written}) "
                              f"on a number of processes that divides it")

    @contextlib.contextmanager
    def _draw(self, draw: int) -> Iterator[None]:
        """:meth:`training_step` runs for draw ``draw``: its generator and its :attr:`draw_state` are in place."""
        self.generator = self._draw_generators[draw]
        values = self._draw_values[draw]
        for name in self.draw_state:
            setattr(self, name, values[name])
        try:
            yield
        finally:
            for name in self.draw_state:
                values[name] = getattr(self, name, None)

    def _share_mask(self) -> None:
        """With several processes, every one takes the main process's gradient mask (computed by each alike; on GPUs
        a last-bit difference could move an entry across the threshold, and the processes would drift apart)."""
        if self.mask is None or self.accelerator.num_processes == 1:
            return
        for name in sorted(self.mask):
            shared = self.mask[name].to(self.device, torch.uint8)
            torch.distributed.broadcast(shared, src=0)
            self.mask[name] = shared.to("cpu").bool()

    def _changed_settings(self, checkpoint: dict) -> dict[str, dict[str, Any]]:
        """The resumable settings this run changes: name -> {"checkpoint": value there, "now": value here}."""
        saved, mine = self._settings_pair(checkpoint)
        return {k: {"checkpoint": saved.get(k), "now": mine.get(k)} for k in RESUMABLE_CHANGES
                if k != "steps" and saved.get(k) != mine.get(k)}

    def _check_checkpoint(self, checkpoint: dict, folder: Path) -> None:
        saved, mine = self._settings_pair(checkpoint)
        diff = sorted(k for k in set(saved) | set(mine)
                      if k not in RESUMABLE_CHANGES and saved.get(k) != mine.get(k))
        if diff:
            detail = ", ".join(f"{k}={saved.get(k)!r} there, {mine.get(k)!r} here" for k in diff[:4])
            raise ConfigError(f"the checkpoint in {folder} was written with other settings ({detail}); resume with "
                              f"the same settings (only {', '.join(RESUMABLE_CHANGES)} may change) or use another "
                              "checkpoint folder")
        if checkpoint["step"] > self.config.steps:
            raise ConfigError(f"the checkpoint in {folder} is at step {checkpoint['step']}, past steps="
                              f"{self.config.steps}; raise steps or start a fresh run")

    def _save_checkpoint(self, step: int, optimizer: Any, started: float, gather_object: Callable) -> None:
        """Every process calls it (it gathers the draws' states); the main process writes the file."""
        # never write non-finite weights over a good checkpoint (the weights are the same in every process)
        if not all(bool(torch.isfinite(p.detach()).all()) for p in self.params.values()):
            raise TrainingError(self._nonfinite_message(float("nan"), step - 1, what="the trained weights"))
        # every draw's generator and carried state, in draw order (each process holds a block of consecutive draws)
        draws = sorted(gather_object([(j, self._draw_generators[j].get_state(), self._draw_values[j])
                                      for j in self._draw_generators]), key=lambda item: item[0])

        def write() -> None:
            state = {
                "format": CHECKPOINT_FORMAT,
                "method": self.method,
                "config": self.config.to_dict(),
                "step": step,
                "trained": {n: t.to("cpu", copy=True) for n, t in self._masters.values().items()},
                "optimizer": optimizer.state_dict(),
                "rng": {
                    "generators": [generator for _, generator, _ in draws],
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "python": random.getstate(),
                },
                **({"draw_state": [values for _, _, values in draws]} if self.draw_state else {}),
                "losses": list(self.losses),
                "elapsed": time.perf_counter() - started + self._elapsed_before,
                "extra": self.extra_state(),
            }
            _atomic_torch_save(state, self._checkpoint_dir / CHECKPOINT_NAME)

        on_main_process(write, "writing the checkpoint")
        self.accelerator.wait_for_everyone()  # every process: a barrier on the main process alone desynchronises them

    def _restore(self, checkpoint: dict, optimizer: Any) -> int:
        trained = checkpoint["trained"]
        if set(trained) != set(self.params):
            raise TrainingError("the checkpoint trains other tensors than this run; it belongs to another model or variant")
        self._masters.load(trained)
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group in optimizer.param_groups:  # the learning rate is this run's (it may change on resume)
            group["lr"] = self.config.lr
        rng = checkpoint["rng"]
        generators = rng["generators"]  # one per draw (checked against this run's draws before setup)
        carried = checkpoint.get("draw_state") or []
        for j, generator in self._draw_generators.items():
            generator.set_state(generators[j])
            if j < len(carried):
                self._draw_values[j].update({k: v for k, v in carried[j].items() if k in self.draw_state})
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        python_state = rng["python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        self.losses = list(checkpoint["losses"])
        self._elapsed_before = float(checkpoint.get("elapsed", 0.0))
        return int(checkpoint["step"])


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, in float32."""
    return F.mse_loss(prediction.float(), target.float())
