"""Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, arXiv 2207.12598).

    eps = eps_u + scale * (eps_c - eps_u)

``CFG(scale)`` is what the pipelines do by default with ``guidance_scale``; pass it explicitly to
combine with other methods, e.g. ``guidance=[CFG(5.0), PAG(3.0)]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Guidance, check_range


@dataclass
class CFG(Guidance):
    """Classifier-free guidance with a single scale (diffusers' ``guidance_scale`` convention: 1 = off)."""

    scale: float = 7.5
    kind = "combine"

    def validate(self) -> None:
        check_range("CFG", "scale", self.scale, 0.0)

    @property
    def needs_uncond(self) -> bool:
        return self.scale != 1.0

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return uncond + self.scale * (cond - uncond)
