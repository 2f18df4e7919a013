"""NASA, Negative-Away Steer Attention (Nguyen et al., "SNOOPI: Supercharged One-step Diffusion Distillation
with Proper Guidance", arXiv 2412.02687; ICCV 2025).

Negative prompting without a second UNet pass: in each selected cross-attention layer, the same
image queries attend to the positive and to the negative prompt, and the output before ``to_out`` is

    Z = Z+ - alpha * Z-,   Z+ = softmax(Q K+^T / sqrt(d)) V+,   Z- = softmax(Q K-^T / sqrt(d)) V-

(applied before ``to_out``, which is affine: subtracting after it would scale its bias by 1 - alpha).
The paper tunes alpha per model (0.04 for SD 1.5 distillations, 0.3 for SD 2.1, up to 0.8 for
PixArt-alpha); there is no single default, ours is 0.3. Layers: every cross-attention layer unless
``layers`` names some (same matching rules as PAG). alpha = 0 is exactly the baseline.

The steered rows are those that hold the prompt: the conditional branch and PAG's perturbed branch. The negative
prompt acts here instead of in CFG's unconditional branch, which holds the empty prompt, unless a method that sets
the unconditional branch (``NegativeSteer``) is given too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .base import Contract, Guidance, GuidanceError, MethodRun, NegativeAttention, Step, check_range, normalize_layers, \
    select_layers


@dataclass
class NASA(Guidance):
    """Negative-away steer attention with strength ``alpha`` on cross-attention ``layers`` (None: all)."""

    alpha: float = 0.3
    layers: Optional[tuple[str, ...]] = None
    contract: ClassVar[Contract] = Contract(edits_attention=True, attention_negative=True, needs_negative=True)

    def __post_init__(self) -> None:
        self.layers = normalize_layers(self.layers)

    def validate(self) -> None:
        check_range("NASA", "alpha", self.alpha, 0.0)

    def prepare(self, call) -> "NASARun":
        modules = select_layers("NASA", call, self.layers, cross=True)
        negative = encode_negative("NASA", call)
        return NASARun(self, NASAAttention(modules, negative, self.alpha))

    def describe(self) -> str:
        return f"NASA α={self.alpha:g}"


def encode_negative(owner: str, call) -> torch.Tensor:
    """The call's negative prompt encoded as the prompt is (it stands beside the prompt in cross-attention)."""
    if call.negatives is None:
        raise GuidanceError(f"{owner} needs negative_prompt as text (negative_prompt_embeds are not supported)")
    return call.encode(call.negatives)[0]


class NASAAttention(NegativeAttention):
    """Z = Z+ - alpha * Z- on the steered rows, before ``to_out``."""

    def __init__(self, modules: frozenset, negative: torch.Tensor, alpha: float) -> None:
        super().__init__(modules, negative)
        self.alpha = alpha

    def edit_output(self, attn, name, query, key, value, out, attend):
        steered = query[self.rows]  # before PAG's perturbed rows join the batch, only the conditional rows are here
        negative = self.negative_output(attn, name, steered, attend)
        if steered.shape[0] == out.shape[0]:  # every row is steered (NASA without CFG or PAG)
            return out - self.alpha * negative
        out = out.clone()
        out[self.rows] = out[self.rows] - self.alpha * negative
        return out


class NASARun(MethodRun):
    """Steers the rows that hold the prompt (conditional, perturbed) at every step."""

    def __init__(self, method: NASA, edit: NASAAttention) -> None:
        self.method = method
        self.edit = edit
        self.attention_edits = (edit,)

    def before_denoiser(self, step: Step) -> None:
        self.edit.rows = step.rows("cond", "perturbed") if self.method.alpha > 0 else None
