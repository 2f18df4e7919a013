"""NASA, Negative-Away Steer Attention (Nguyen et al., "SNOOPI: Supercharged One-step Diffusion Distillation
with Proper Guidance", arXiv 2412.02687; ICCV 2025).

Negative prompting without a second UNet pass: in each selected cross-attention layer, the same
image queries attend to the positive and to the negative prompt, and the output before ``to_out`` is

    Z = Z+ - alpha * Z-,   Z+ = softmax(Q K+^T / sqrt(d)) V+,   Z- = softmax(Q K-^T / sqrt(d)) V-

(applied before ``to_out``, which is affine: subtracting after it would scale its bias by 1 - alpha).
The paper tunes alpha per model (0.04 for SD 1.5 distillations, 0.3 for SD 2.1, up to 0.8 for
PixArt-alpha); there is no single default, ours is 0.3. Layers: every cross-attention layer unless
``layers`` names some (same matching rules as PAG). alpha = 0 is exactly the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import Guidance, check_range


@dataclass
class NASA(Guidance):
    """Negative-away steer attention with strength ``alpha`` on cross-attention ``layers`` (None: all)."""

    alpha: float = 0.3
    layers: Optional[tuple[str, ...]] = None
    kind = "attention"

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = (self.layers,)
        if self.layers is not None:
            self.layers = tuple(self.layers)

    def validate(self) -> None:
        check_range("NASA", "alpha", self.alpha, 0.0)
