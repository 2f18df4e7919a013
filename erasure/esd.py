"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzyńska, Fiotto-Kaufman, Bau; ICCV 2023).

arXiv 2303.07345, https://erasing.baulab.info. The UNet is fine-tuned so that, for the concept ``c``,
it predicts what the frozen original model predicts when guided *away* from ``c``:

    L = MSE( eps_theta(x_t, c, t),  eps*(x_t, a, t) - eta * (eps*(x_t, c, t) - eps*(x_t, "", t)) )

with ``eps*`` the frozen original model (no gradients), ``eta`` the negative guidance and ``a`` the anchor:
``""`` in the paper (its Eq. 3), so at step 0 the loss is ``(1 + eta)^2 * mean((eps*(c) - eps*(""))^2)``.
``anchor="concept"`` uses ``a = c`` as the official diffusers rewrite does (loss ``eta^2 * ...`` at step 0,
zero for ``eta = 0``); that rewrite's ``negative_guidance=2`` is the paper's ``eta = 1``.
``erase_from`` erases an attribute from one concept ("hat" from "cowboy"): the student and the anchor
see ``c_from``, the guidance direction is the erased concept's. A list of ``erase_from`` prompts draws one
per step: erasing "striped" from many prompts that contain it ("a striped green triangle", ...) reaches the
concept in context, where a small text encoder's embedding of the bare word alone does not.

``x_t`` is sampled as in the paper: a DDIM run (``ddim_steps`` steps, classifier-free guidance
``start_guidance``, prompt ``c`` or ``c_from``) from fresh noise *with the model being trained*, stopped
at a random step ``k``; the UNet is then queried at that step's timestep. ``sample_with="frozen"``
samples with the original model instead (the official 2025 rewrite).

Variants (which parameters are trained; Linear and Conv2d modules found with ``isinstance``, names as in
diffusers' ``UNet2DConditionModel``; the official rewrite's rules, except ``esd-u``, which keeps the paper's
code's rule (``noxattn``: the rewrite also trains ``conv_out`` and the time embedding, and on the toy model that
turns every black background gray: presence 34% with the background right in 91% of other prompts under the
paper's rule, against 34% / 56% with those layers trained, ``circle``, lr 1e-4, eta 2, in context)):

=================  ============================================================================
``esd-x``          every Linear/Conv2d inside a cross-attention module (``attn2``): for styles
``esd-u``          every Linear/Conv2d outside the cross-attention modules except the output conv
                   (``conv_out``) and the time embedding: for objects, nudity
``esd-all``        every Linear/Conv2d
``esd-x-strict``   only ``attn2.to_k`` and ``attn2.to_v``
=================  ============================================================================

On SDXL UNets ``esd-u`` and ``esd-all`` additionally keep only modules inside the down/mid/up blocks
whose names do not contain ``emb`` (the official SDXL script's rule; it calls them experimental).
Norm layers are never trained. ``kind="lora"`` trains a LoRA of rank ``rank`` on the same modules
instead of the full weights (teacher: the adapter disabled).

The loss space (v-prediction models). The paper writes the loss on noise predictions (epsilon). On a
v-prediction model (the toy model, SD 2.x-v) the default, ``loss_space="output"``, takes it on the UNet's raw
v outputs: student and target are v predictions, the target built from the teacher's v outputs by the same
formula. With ``alpha_t^2 = alphas_cumprod[t]``, ``sigma_t^2 = 1 - alpha_t^2`` and ``v = alpha_t eps - sigma_t x0``,
every prediction here is at the same ``x_t``, where ``eps = alpha_t v + sigma_t x_t``; the target's coefficients
sum to one, so it maps the same way, and the v-space squared error is ``1 / alpha_t^2 = 1 + 1/SNR(t)`` times the
epsilon-space one: equal at low noise, larger with the noise (on SD's scaled-linear schedule, the toy model's:
1.12x at t = 100, 3.6x at t = 500, 18x at t = 750, 215x at t = 999). The target is the same either way; what
changes is how much each sampled timestep weighs in the gradient: the v loss leans on the noisiest steps, the
early, layout-setting part of the trajectory, far more than the paper's loss, and its values are larger (compare
losses across models only in the same space). ``loss_space="epsilon"`` converts the predictions to noise
predictions first (:func:`~unsee.erasure.base.epsilon_from_output`) and takes the paper's loss; on
epsilon-prediction models (SD 1.x, SDXL) the two are identical. The default keeps the figures measured on the toy
model (``BENCHMARKS.md``).

Deliberate differences from the official code (each documented in the config):
the query timestep is exactly the noise level the sampler stopped at (the CompVis code draws a timestep
1-2 steps off); the paper's defaults (eta 1, lr 1e-5, 1000 iterations, fp32) rather than the rewrite's;
the teacher is the same UNet with the original weights swapped in, not a second copy; its three (or two)
predictions are one batched UNet call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from .base import (
    LOSS_SPACES,
    OUTPUT_KINDS,
    ConfigError,
    Conditioning,
    Trainer,
    TrainerConfig,
    _is_int,
    _is_number,
    _is_prompt_list,
    checked_erase_from,
    ddim_sample,
    encode_prompts,
    erase_from_prompts,
    gaussian_lora_config,
    mse,
    predict,
)

__all__ = ["ESD_VARIANTS", "ESDConfig", "ESDTrainer", "esd_modules", "esd_parameters"]

ESD_VARIANTS = ("esd-x", "esd-u", "esd-all", "esd-x-strict")
ANCHORS = ("unconditional", "concept")
SAMPLERS = ("trained", "frozen")


@dataclass
class ESDConfig(TrainerConfig):
    """ESD settings; defaults from the paper (Gandikota et al., ICCV 2023) and its original code.

    Args:
        variant: ``esd-x``, ``esd-u``, ``esd-all`` or ``esd-x-strict`` (see the module docstring). The paper
            uses ESD-x for artistic styles and ESD-u for objects and nudity.
        erase_from: erase ``concept`` only from this concept ("hat" from "cowboy"), or from each of a list of
            prompts (one drawn per step); None: everywhere.
        eta: negative guidance (paper: 1.0).
        anchor: ``"unconditional"`` (the paper) or ``"concept"`` (the official diffusers rewrite; with it
            ``eta`` = paper eta + 1). With ``erase_from`` the anchor is always ``c_from``.
        steps: iterations (paper code: 1000). lr: Adam learning rate (paper code: 1e-5).
        start_guidance: CFG scale of the DDIM run that samples x_t (3).
        ddim_steps: DDIM steps of that run (50); it stops after a uniformly random number of them.
        sample_with: ``"trained"`` (the paper: the model being fine-tuned) or ``"frozen"`` (the original model).
        batch_size: x_t samples per step (1).
        resolution: image size of the sampled x_t (None: the pipeline's default, 512 for SD 1.x).
        kind: ``"delta"`` (full-weight deltas of the trained tensors) or ``"lora"``.
        rank, lora_alpha: LoRA rank and alpha (alpha None: equal to the rank, i.e. scaling 1).
        preserve: prompts whose predictions are kept (not in the paper; empty by default): every step draws one,
            p, samples its own x_t' (same DDIM run and stop as x_t) and adds ``preserve_weight`` times
            MSE(eps_theta(x_t', p, t), eps*(x_t', p, t)). Erasing "red" from a small model drags its neighbour
            "orange" along; preserving orange prompts keeps it. The term is 0 at the first step.
        preserve_weight: weight of that term (1.0).
        loss_space: ``"output"`` (the UNet's raw output: v on v-prediction models such as the toy model and
            SD 2.x-v) or ``"epsilon"`` (noise predictions, the paper's loss); see the module docstring.
            Identical on epsilon-prediction models.
    """

    variant: str = "esd-u"
    erase_from: Union[str, tuple[str, ...], None] = None
    eta: float = 1.0
    anchor: str = "unconditional"
    steps: int = 1000
    lr: float = 1e-5
    start_guidance: float = 3.0
    ddim_steps: int = 50
    sample_with: str = "trained"
    batch_size: int = 1
    resolution: Optional[int] = None
    kind: str = "delta"
    rank: int = 4
    lora_alpha: Optional[float] = None
    preserve: tuple[str, ...] = ()
    preserve_weight: float = 1.0
    loss_space: str = "output"

    @property
    def method(self) -> str:  # type: ignore[override]
        return self.variant

    @property
    def erase_from_prompts(self) -> tuple[str, ...]:
        """``erase_from`` as a tuple of prompts (empty: erase everywhere)."""
        return erase_from_prompts(self.erase_from)

    def validate(self) -> None:
        if self.variant not in ESD_VARIANTS:
            raise ConfigError(f"unknown ESD variant {self.variant!r}; choose one of {', '.join(ESD_VARIANTS)}")
        super().validate()
        self.erase_from = checked_erase_from(self.erase_from)
        if not _is_number(self.eta):
            raise ConfigError(f"eta (negative guidance) must be a finite number, got {self.eta!r}")
        if self.anchor not in ANCHORS:
            raise ConfigError(f"anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")
        if not _is_number(self.start_guidance) or self.start_guidance < 0:
            raise ConfigError(f"start_guidance must be a number >= 0, got {self.start_guidance!r}")
        if not _is_int(self.ddim_steps) or self.ddim_steps < 1:
            raise ConfigError(f"ddim_steps must be a positive integer, got {self.ddim_steps!r}")
        if self.sample_with not in SAMPLERS:
            raise ConfigError(f"sample_with must be one of {', '.join(SAMPLERS)}, got {self.sample_with!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.resolution is not None and (not _is_int(self.resolution) or self.resolution < 8):
            raise ConfigError(f"resolution must be an integer >= 8 or None, got {self.resolution!r}")
        if self.kind not in OUTPUT_KINDS:
            raise ConfigError(f"kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.kind!r}")
        if not _is_int(self.rank) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.lora_alpha is not None and (not _is_number(self.lora_alpha) or self.lora_alpha == 0):
            raise ConfigError(f"lora_alpha must be a non-zero number or None, got {self.lora_alpha!r}")
        if not _is_prompt_list(self.preserve, allow_empty=True):
            raise ConfigError(f"preserve must be a list of non-empty prompts, got {self.preserve!r}")
        self.preserve = tuple(self.preserve)
        if not _is_number(self.preserve_weight) or self.preserve_weight < 0:
            raise ConfigError(f"preserve_weight must be a number >= 0, got {self.preserve_weight!r}")
        if self.loss_space not in LOSS_SPACES:
            raise ConfigError(f"loss_space must be one of {', '.join(LOSS_SPACES)}, got {self.loss_space!r}")


def esd_modules(unet: nn.Module, variant: str) -> list[str]:
    """Names of the Linear/Conv2d modules an ESD variant trains, in ``named_modules`` order."""
    if variant not in ESD_VARIANTS:
        raise ConfigError(f"unknown ESD variant {variant!r}; choose one of {', '.join(ESD_VARIANTS)}")
    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if variant == "esd-x":
            keep = "attn2" in name
        elif variant == "esd-x-strict":
            keep = "attn2.to_k" in name or "attn2.to_v" in name
        elif variant == "esd-u":  # the paper's code: neither the output conv nor the time embedding
            keep = "attn2" not in name and not name.startswith(("conv_out", "time_embedding"))
        else:  # esd-all
            keep = True
        if sdxl and variant in ("esd-u", "esd-all"):
            keep = keep and "block" in name and "emb" not in name
        if keep:
            names.append(name)
    return names


def esd_parameters(unet: nn.Module, variant: str) -> dict[str, nn.Parameter]:
    """The parameters (weights and biases) of :func:`esd_modules`, full name -> parameter."""
    modules = dict(unet.named_modules())
    params = {}
    for name in esd_modules(unet, variant):
        for leaf, param in modules[name].named_parameters(recurse=False):
            params[f"{name}.{leaf}"] = param
    return params


class ESDTrainer(Trainer):
    """Trains an ESD adapter. ``ESDTrainer(ESDConfig(concept="circle", variant="esd-u")).train(pipe)``."""

    config_class: ClassVar[type] = ESDConfig
    config: ESDConfig

    def select_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        return esd_parameters(unet, self.config.variant)

    def lora_config(self, unet: nn.Module) -> Any:
        return gaussian_lora_config(self.config.rank, self.config.lora_alpha, esd_modules(unet, self.config.variant))

    def setup(self, pipe: Any, state: Optional[dict] = None) -> None:
        config = self.config
        height, width = self.image_size(pipe)
        self.latent_shape = (config.batch_size, *self.latent_size(pipe))
        # rows: the erased concept c, the empty prompt, then each c_from when erasing from other prompts
        froms = config.erase_from_prompts
        conditioning = encode_prompts(pipe, [config.concept, ""] + list(froms), height, width)
        self.cond_erase = conditioning.rows([0])
        self.cond_empty = conditioning.rows([1])
        self.cond_from = [conditioning.rows([2 + i]) for i in range(len(froms))]
        kept = encode_prompts(pipe, config.preserve, height, width) if config.preserve else None
        self.cond_preserve = [kept.rows([i]) for i in range(len(config.preserve))] if kept is not None else []
        self.scheduler = self.ddim_scheduler(config.ddim_steps)

    def sample_xt(self, cond_student: Conditioning, cond_keep: Optional[Conditioning] = None
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Draw (x_t, x_keep, t): fresh noise denoised for a random number k of the DDIM steps, t = timesteps[k];
        x_t from the student's prompt, x_keep (None without ``cond_keep``) from the preserved prompt, in one run."""
        k = int(self.randint(0, self.config.ddim_steps))
        batch = self.latent_shape[0]
        rows = [cond_student] + ([cond_keep] if cond_keep is not None else [])
        noise = self.randn(batch * len(rows), *self.latent_shape[1:]) * self.scheduler.init_noise_sigma
        sampler = self.frozen_teacher() if self.config.sample_with == "frozen" else contextlib.nullcontext(self.unet)
        with sampler as unet:
            x = ddim_sample(unet, self.scheduler, noise, Conditioning.cat([c.repeat(batch) for c in rows]),
                            self.cond_empty.repeat(len(noise)), self.config.start_guidance, stop_at=k)
        return x[:batch], (x[batch:] if cond_keep is not None else None), self.scheduler.timesteps[k]

    def loss(self, x_t: torch.Tensor, t: torch.Tensor, cond_student: Optional[Conditioning] = None,
             x_keep: Optional[torch.Tensor] = None, cond_keep: Optional[Conditioning] = None) -> torch.Tensor:
        """The ESD loss at (x_t, t): student on c (or ``cond_student``, a c_from) against the negatively guided
        teacher; with ``x_keep``, plus ``preserve_weight`` times the student's error on the preserved prompt."""
        config = self.config
        n = x_t.shape[0]
        erasing_from = cond_student is not None and cond_student is not self.cond_erase
        student_cond = cond_student if erasing_from else self.cond_erase
        rows = Conditioning.cat([self.cond_erase, self.cond_empty] + ([student_cond] if erasing_from else []))
        teacher_x, teacher_cond = x_t.repeat(len(rows), 1, 1, 1), rows.repeat(n)
        student_x, student_cond = x_t, student_cond.repeat(n)
        if x_keep is not None:  # the preserved prompt's rows ride along in both batched calls
            teacher_x, student_x = torch.cat([teacher_x, x_keep]), torch.cat([student_x, x_keep])
            teacher_cond = Conditioning.cat([teacher_cond, cond_keep.repeat(n)])
            student_cond = Conditioning.cat([student_cond, cond_keep.repeat(n)])
        with torch.no_grad(), self.frozen_teacher() as teacher:
            # one batched call: rows [c, "", (c_from)] at x_t, then the preserved prompt at x_keep
            # in the loss space: the raw outputs, or the noise predictions they stand for
            out = self.loss_view(predict(teacher, teacher_x, t, teacher_cond), teacher_x, t, self.scheduler)
            outs = out[: n * len(rows)].chunk(len(rows))
            eps_c, eps_empty = outs[0], outs[1]
            if erasing_from:
                anchor = outs[2]
            else:
                anchor = eps_empty if config.anchor == "unconditional" else eps_c
            target = anchor - config.eta * (eps_c - eps_empty)
            kept = out[n * len(rows):]
        student = self.loss_view(predict(self.model, student_x, t, student_cond), student_x, t, self.scheduler)
        loss = mse(student[:n], target)
        if x_keep is not None:
            loss = loss + config.preserve_weight * mse(student[n:], kept)
        return loss

    def training_step(self, step: int) -> torch.Tensor:
        cond_student = self.draw(self.cond_from) if self.cond_from else self.cond_erase
        cond_keep = self.draw(self.cond_preserve) if self.cond_preserve else None
        x_t, x_keep, t = self.sample_xt(cond_student, cond_keep)
        return self.loss(x_t, t, cond_student, x_keep, cond_keep)

    def training_summary(self) -> dict:
        return {"variant": self.config.variant, "erase_from": self.config.erase_from}

