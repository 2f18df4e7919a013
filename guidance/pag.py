"""Perturbed-Attention Guidance (Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance", ECCV 2024, arXiv 2403.17377).

A third branch runs the conditional prediction with the self-attention map of chosen layers
replaced by the identity (the layer outputs ``to_out(to_v(h))``), and guidance pushes away from it:

    with CFG:    eps = eps_u + w (eps_c - eps_u) + s_t (eps_c - eps_p)
    without CFG: eps = eps_c + s_t (eps_c - eps_p)
    s_t = max(0, s - adaptive_scale * (1000 - t))

Defaults follow diffusers' PAG pipelines for SD/SDXL (scale 3.0, adaptive scale 0, layers "mid":
every self-attention in the mid block). Layer names match whole dotted path components, so
"down_blocks.1" never selects "down_blocks.10"; ``re:<regex>`` selects by full regular-expression match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Guidance, GuidanceError, check_range


@dataclass
class PAG(Guidance):
    """Perturbed-attention guidance: ``scale`` s, ``adaptive_scale`` s_a, ``layers`` (self-attention modules)."""

    scale: float = 3.0
    adaptive_scale: float = 0.0
    layers: tuple[str, ...] = field(default=("mid",))
    kind = "extra"

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = (self.layers,)
        self.layers = tuple(self.layers)

    def validate(self) -> None:
        check_range("PAG", "scale", self.scale, 0.0)
        check_range("PAG", "adaptive_scale", self.adaptive_scale, 0.0)
        if not self.layers:
            raise GuidanceError("PAG.layers must name at least one self-attention layer, e.g. ('mid',)")

    def scale_at(self, timestep: float) -> float:
        return max(0.0, self.scale - self.adaptive_scale * (1000.0 - float(timestep)))

    def term(self, cond: torch.Tensor, perturbed: torch.Tensor, timestep: float) -> torch.Tensor:
        return self.scale_at(timestep) * (cond - perturbed)
