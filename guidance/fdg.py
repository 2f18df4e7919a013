"""Frequency-Decoupled Guidance (Sadat, Vontobel, Salehi, Weber, "Guidance in the Frequency Domain Enables
High-Fidelity Sampling at Low CFG Scales", arXiv 2506.19713).

The conditional and unconditional predictions are split into Laplacian-pyramid bands and each band
gets its own CFG scale; high frequencies can take a strong scale (detail, prompt adherence) while the
low band keeps a weak one (colour and diversity stay close to low-scale CFG):

    P_l(x): band l of x's Laplacian pyramid (l = 0 finest; the last is the low-pass residual)
    delta_l = P_l(c) - P_l(u), optionally delta_l = eta_l * delta_l_parallel + delta_l_orthogonal (relative to P_l(c))
    eps = inverse_pyramid( P_l(u) + w_l * delta_l )

Defaults follow diffusers' ``FrequencyDecoupledGuidance``: scales (10, 5), highest frequency first, so
two levels; no parallel-component down-weighting. The pyramid is written in torch (no kornia) and
works for any latent size -- including sizes that are not powers of two (SDXL 1152x896 -> 144x112):
each level is upsampled back to the exact size of the level above, so nothing is padded and the
output has the input's shape; a band with scale 1.0 is just that band's conditional part (both
cases break diffusers' guider). On even sizes the pyramid is kornia's (5x5 binomial blur with
reflected borders, bilinear resizing), so results equal diffusers' guider where it works.
All scales equal to w gives exactly CFG(w).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import Contract, Guidance, GuidanceError, MethodRun, Step, check_range

_KERNEL_1D = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor) -> torch.Tensor:
    """5x5 binomial (Gaussian) blur with reflected borders (replicated on sides shorter than 3)."""
    channels = x.shape[1]
    kernel = (_KERNEL_1D[:, None] * _KERNEL_1D[None, :]).to(x.device, x.dtype).expand(channels, 1, 5, 5)
    mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode=mode), kernel, groups=channels)


def _down(x: torch.Tensor) -> torch.Tensor:
    """Blur, then resize to half the size (rounded down): kornia's ``pyrdown``."""
    return F.interpolate(_blur(x), size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False)


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize to ``size``, then blur: kornia's ``pyrup`` when ``size`` is twice the input's."""
    return _blur(F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False))


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Bands of a (B, C, H, W) tensor, finest first; the last entry is the low-pass residual.

    ``reconstruct(laplacian_pyramid(x, L))`` gives back ``x`` (up to float rounding) for any H, W.
    """
    bands = []
    current = x
    for _ in range(levels - 1):
        if min(current.shape[-2:]) < 2:
            break
        smaller = _down(current)
        bands.append(current - _up(smaller, current.shape[-2:]))
        current = smaller
    bands.append(current)
    return bands


def reconstruct(bands: Sequence[torch.Tensor]) -> torch.Tensor:
    x = bands[-1]
    for band in reversed(bands[:-1]):
        x = _up(x, band.shape[-2:]) + band
    return x


def _project(delta: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``delta`` into its parts parallel and orthogonal to ``reference`` (per sample, in float64)."""
    d, r = delta.double().flatten(1), reference.double().flatten(1)
    r_unit = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    parallel = (d * r_unit).sum(dim=1, keepdim=True) * r_unit
    return parallel.view_as(delta).to(delta.dtype), (d - parallel).view_as(delta).to(delta.dtype)


@dataclass
class FDG(Guidance):
    """Frequency-decoupled guidance: one CFG scale per pyramid band, highest frequency first."""

    scales: tuple[float, ...] = (10.0, 5.0)
    parallel_weights: Optional[tuple[float, ...]] = None
    contract: ClassVar[Contract] = Contract(combines=True, branches=("uncond",))

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if self.parallel_weights is not None:
            self.parallel_weights = tuple(float(w) for w in self.parallel_weights)

    @property
    def levels(self) -> int:
        return len(self.scales)

    def validate(self) -> None:
        if not self.scales:
            raise GuidanceError("FDG.scales needs one scale per band, e.g. (10.0, 5.0)")
        for scale in self.scales:
            check_range("FDG", "scales", scale, 0.0)
        if self.parallel_weights is not None:
            if len(self.parallel_weights) != len(self.scales):
                raise GuidanceError(f"FDG.parallel_weights needs {len(self.scales)} values (one per band), got {len(self.parallel_weights)}")
            for weight in self.parallel_weights:
                check_range("FDG", "parallel_weights", weight, 0.0, 1.0)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        cond_bands = laplacian_pyramid(cond, self.levels)
        uncond_bands = laplacian_pyramid(uncond, self.levels)
        if len(cond_bands) < self.levels:
            raise GuidanceError(f"FDG with {self.levels} levels needs latents of at least {2 ** (self.levels - 1)} pixels a side")
        guided = []
        for level, (c, u) in enumerate(zip(cond_bands, uncond_bands)):
            delta = c - u
            if self.parallel_weights is not None:
                parallel, orthogonal = _project(delta, c)
                delta = self.parallel_weights[level] * parallel + orthogonal
            guided.append(u + self.scales[level] * delta)
        return reconstruct(guided)

    def prepare(self, call) -> "FDGRun":
        return FDGRun(self)

    def describe(self) -> str:
        return "FDG " + ",".join(f"{s:g}" for s in self.scales)


class FDGRun(MethodRun):
    """Combines cond and uncond band by band."""

    needs_uncond = True

    def __init__(self, method: FDG) -> None:
        self.method = method

    def combine(self, predictions: dict, step: Step) -> torch.Tensor:
        return self.method.combine(predictions["cond"], predictions["uncond"])
