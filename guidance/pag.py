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
from typing import ClassVar

import torch

from .base import AttentionEdit, Branch, Contract, Guidance, GuidanceError, MethodRun, Step, check_range, select_layers


@dataclass
class PAG(Guidance):
    """Perturbed-attention guidance: ``scale`` s, ``adaptive_scale`` s_a, ``layers`` (self-attention modules)."""

    scale: float = 3.0
    adaptive_scale: float = 0.0
    layers: tuple[str, ...] = field(default=("mid",))
    contract: ClassVar[Contract] = Contract(adds_term=True, edits_attention=True, branches=("perturbed",))

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

    def prepare(self, call) -> "PAGRun":
        return PAGRun(self, select_layers("PAG", call, self.layers, cross=False))

    def describe(self) -> str:
        return f"PAG {self.scale:g}"


class IdentityAttention(AttentionEdit):
    """PAG's perturbation: the selected self-attention layers give their rows the identity attention map, so the
    layer outputs ``to_out(to_v(h))`` for them."""

    identity = True

    def __init__(self, modules: frozenset) -> None:
        self.modules = modules


class PAGRun(MethodRun):
    """Adds the perturbed branch while s_t > 0; it joins the batch at the first perturbed layer's block, since up to
    there it repeats the conditional rows' computation."""

    def __init__(self, method: PAG, modules: frozenset) -> None:
        self.method = method
        self.edit = IdentityAttention(modules)
        self.attention_edits = (self.edit,)
        self.late_join = modules

    def branches(self, step: Step):
        if self.method.scale_at(step.timestep) > 0:
            return (Branch("perturbed", source="cond", late_join=self.late_join),)
        return ()

    def before_denoiser(self, step: Step) -> None:
        self.edit.rows = step.layout.get("perturbed")

    def add_term(self, guided: torch.Tensor, predictions: dict, step: Step) -> torch.Tensor:
        if "perturbed" not in predictions:
            return guided
        return guided + self.method.term(predictions["cond"], predictions["perturbed"], step.timestep)
