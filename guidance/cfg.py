"""Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, arXiv 2207.12598).

    eps = eps_u + scale * (eps_c - eps_u)

``CFG(scale)`` is what the pipelines do by default with ``guidance_scale``; pass it explicitly to
combine with other methods, e.g. ``guidance=[CFG(5.0), PAG(3.0)]``. Scale 1 is off: the unconditional
branch does not run (diffusers' convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Contract, Guidance, MethodRun, Step, check_range


@dataclass
class CFG(Guidance):
    """Classifier-free guidance with a single scale (diffusers' ``guidance_scale`` convention: 1 = off)."""

    scale: float = 7.5
    contract: ClassVar[Contract] = Contract(combines=True, branches=("uncond",), conditions={"branches": "scale != 1"})

    def validate(self) -> None:
        check_range("CFG", "scale", self.scale, 0.0)

    @property
    def needs_uncond(self) -> bool:
        return self.scale != 1.0

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return uncond + self.scale * (cond - uncond)

    def prepare(self, call) -> "CFGRun":
        call.kwargs["guidance_scale"] = self.scale  # the CFG scale in effect, as callbacks read it
        return CFGRun(self)

    def describe(self) -> str:
        return f"CFG {self.scale:g}"


class CFGRun(MethodRun):
    """Combines cond and uncond with one scale; the conditional prediction alone when the scale is 1."""

    def __init__(self, method: CFG) -> None:
        self.method = method
        self.needs_uncond = method.needs_uncond

    def combine(self, predictions: dict, step: Step) -> torch.Tensor:
        if "uncond" not in predictions:
            return predictions["cond"]
        return self.method.combine(predictions["cond"], predictions["uncond"])
