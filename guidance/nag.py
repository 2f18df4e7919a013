"""NAG, Normalized Attention Guidance (Chen, Bai, Zhang, Xu, "Normalized Attention Guidance: Universal Negative
Guidance for Diffusion Models", arXiv 2505.21179).

Negative prompting in attention space, without a second UNet pass, and stable where NASA's plain subtraction
drifts (few-step and DiT models). In each selected cross-attention layer the same image queries attend to the
positive and to the negative prompt (Z+ and Z-, before ``to_out``); then, per token,

    Z~ = Z+ + phi (Z+ - Z-)                       extrapolate away from the negative
    r  = ||Z~||_1 / ||Z+||_1                      (L1 norm over the token's features, all heads together)
    Z^ = Z~ * min(r, tau) / r                     cap the feature norm at tau times the positive's
    Z  = alpha Z^ + (1 - alpha) Z+                blend back towards the positive

**Scale convention.** ``scale`` is the code convention of every public implementation (official SDXL/Flux
pipelines, ComfyUI-NAG, ComfyUI core): Z~ = scale Z+ - (scale - 1) Z-, i.e. scale = phi + 1, so ``scale=1`` is
off (the layer output equals plain attention exactly). Defaults: scale 5 (ComfyUI-NAG and the official Flux
README), tau 2.5 and alpha 0.5 (the official SDXL pipeline). ``end`` limits NAG to the start of sampling as the
official pipelines' ``nag_end`` does: NAG acts while t >= floor((1 - end) * (T - 1)) (T: the scheduler's training
timesteps, 1000), so ``end=1`` is every step and ``end=0.25`` the noisiest quarter of the schedule, where the
paper reports most of the gain. Layers: every cross-attention layer unless ``layers`` names some (PAG's matching
rules), as the official UNet version (all ``attn2``).

**The negative prompt and CFG.** The official SDXL pipeline takes a separate ``nag_negative_prompt`` beside CFG's
``negative_prompt``. Here, as with NASA, the call's ``negative_prompt`` is NAG's negative, and CFG's unconditional
branch holds the empty prompt; add ``NegativeSteer(start_step=0)`` to have the negative in both places (CFG's
unconditional branch from the first step and NAG's attention). NAG steers the rows that hold the prompt: the
conditional branch and PAG's perturbed branch; CFG's unconditional rows are untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .base import Contract, Guidance, MethodRun, NegativeAttention, Step, check_range, normalize_layers, select_layers
from .nasa import encode_negative


@dataclass
class NAG(Guidance):
    """Normalized attention guidance: ``scale`` (phi + 1; 1 = off), ``tau``, ``alpha``, ``end``, ``layers``."""

    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.5
    end: float = 1.0
    layers: Optional[tuple[str, ...]] = None
    contract: ClassVar[Contract] = Contract(edits_attention=True, attention_negative=True, needs_negative=True)

    def __post_init__(self) -> None:
        self.layers = normalize_layers(self.layers)

    def validate(self) -> None:
        check_range("NAG", "scale", self.scale, 1.0)
        check_range("NAG", "tau", self.tau, 1.0)
        check_range("NAG", "alpha", self.alpha, 0.0, 1.0)
        check_range("NAG", "end", self.end, 0.0, 1.0)

    def prepare(self, call) -> "NAGRun":
        modules = select_layers("NAG", call, self.layers, cross=True)
        last = call.scheduler.config.get("num_train_timesteps", 1000) - 1
        return NAGRun(self, NAGAttention(modules, encode_negative("NAG", call), self), math.floor((1 - self.end) * last))

    def describe(self) -> str:
        return f"NAG {self.scale:g}"


def nag_guide(positive: torch.Tensor, negative: torch.Tensor, scale: float, tau: float, alpha: float,
              dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """NAG on attention outputs: per token (L1 norms over ``dims``), extrapolate, cap the norm ratio at tau, blend."""
    dtype = positive.dtype
    positive_f, negative_f = positive.float(), negative.float()
    guided = positive_f * scale - negative_f * (scale - 1)
    norm_positive = positive_f.abs().sum(dim=dims, keepdim=True)
    norm_guided = guided.abs().sum(dim=dims, keepdim=True)
    ratio = norm_guided / norm_positive  # inf where the positive is zero, nan where both are: capped below
    capped = guided * (tau * norm_positive / (norm_guided + 1e-7))
    guided = torch.where(ratio.isnan() | (ratio > tau), capped, guided)
    return (alpha * guided + (1 - alpha) * positive_f).to(dtype)


class NAGAttention(NegativeAttention):
    """Replaces the steered rows' attention output by NAG's, before ``to_out``."""

    def __init__(self, modules: frozenset, negative: torch.Tensor, method: NAG) -> None:
        super().__init__(modules, negative)
        self.method = method

    def edit_output(self, attn, name, query, key, value, out, attend):
        rows = self.rows
        steered = query[rows]  # before PAG's perturbed rows join the batch, only the conditional rows are here
        negative = self.negative_output(attn, name, steered, attend)
        m = self.method
        guided = nag_guide(out[rows], negative, m.scale, m.tau, m.alpha, dims=(-2, -1))  # (rows, tokens, heads, dim)
        if steered.shape[0] == out.shape[0]:
            return guided
        out = out.clone()
        out[rows] = guided
        return out


class NAGRun(MethodRun):
    """Steers the rows that hold the prompt while the timestep is inside NAG's window."""

    def __init__(self, method: NAG, edit: NAGAttention, first_timestep: int) -> None:
        self.method = method
        self.edit = edit
        self.attention_edits = (edit,)
        self.first_timestep = first_timestep

    def before_denoiser(self, step: Step) -> None:
        active = self.method.scale != 1.0 and float(step.timestep) >= self.first_timestep
        self.edit.rows = step.rows("cond", "perturbed") if active else None
