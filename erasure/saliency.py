"""Saliency-masked training (SalUn, ANT): a gradient mask chosen before the first step restricts full-weight training
to the weights that matter most for the concept, and the mask itself, stored compactly.

The mask is kept as one bit per weight (``numpy.packbits``): in checkpoints, and next to the adapter
(:func:`save_mask` / :func:`load_mask`; a job writes it as the ``mask`` artifact, ``<adapter>.mask.safetensors``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional, Union

import numpy as np
import safetensors.torch
import torch
from torch import nn

from unsee.files import atomic_write

from .config import TrainerConfig
from .esd import ESD_VARIANTS, esd_parameters
from .fields import choice
from .trainer import Trainer

__all__ = ["SaliencyMaskedTrainer", "PARAMETERS", "top_fraction_mask", "pack_mask", "unpack_mask", "save_mask",
           "load_mask"]

#: the kind of a saliency-masked config's ``parameters`` field: the weights the mask ranks, all of the UNet's
#: ("full", the papers) or those an ESD variant trains
PARAMETERS = choice(("full", *ESD_VARIANTS))


def top_fraction_mask(scores: Optional[torch.Tensor], fraction: float) -> torch.Tensor:
    """Bool mask (shaped like ``scores``) of exactly ``floor(fraction * n)`` entries with the largest magnitude,
    ties broken by ``topk``; all False when ``scores`` is None (a tensor that got no gradient)."""
    if scores is None:
        return torch.zeros((), dtype=torch.bool)
    flat = scores.detach().abs().float().flatten()
    keep = int(math.floor(fraction * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep:
        chosen[torch.topk(flat, keep, sorted=False).indices] = True
    return chosen.reshape(scores.shape)


# ----------------------------------------------------------------------------------------------
# Compact masks: one bit per weight
# ----------------------------------------------------------------------------------------------


def pack_mask(mask: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{"bits": name -> uint8 tensor (numpy.packbits of the flattened mask), "shapes": name -> shape}``."""
    bits, shapes = {}, {}
    for name, tensor in mask.items():
        flat = tensor.detach().to("cpu", torch.bool).flatten().numpy()
        bits[name] = torch.from_numpy(np.packbits(flat))
        shapes[name] = list(tensor.shape)
    return {"bits": bits, "shapes": shapes}


def unpack_mask(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The boolean mask tensors back from :func:`pack_mask`'s output."""
    mask = {}
    for name, bits in packed["bits"].items():
        shape = list(packed["shapes"][name])
        count = math.prod(shape)
        flat = np.unpackbits(bits.numpy().astype(np.uint8), count=count).astype(bool)
        mask[name] = torch.from_numpy(flat).reshape(shape)
    return mask


def save_mask(mask: dict[str, torch.Tensor], path: Union[str, os.PathLike], metadata: Optional[dict] = None) -> Path:
    """Write a saliency mask as packed bits to a ``.safetensors`` file, atomically."""
    path = Path(path)
    packed = pack_mask(mask)
    header = {"format": "pt", "unsee_mask": "1", "shapes": json.dumps(packed["shapes"], sort_keys=True),
              "info": json.dumps(metadata or {}, sort_keys=True)}
    tensors = {k: v.contiguous() for k, v in packed["bits"].items()}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header))


def load_mask(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a mask written by :func:`save_mask`: parameter name -> bool tensor."""
    with safetensors.safe_open(str(path), "pt") as handle:
        header = handle.metadata() or {}
        if header.get("unsee_mask") != "1":
            raise ValueError(f"{path} is not an unsee saliency mask file")
        bits = {k: handle.get_tensor(k) for k in handle.keys()}
    return unpack_mask({"bits": bits, "shapes": json.loads(header["shapes"])})


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class SaliencyMaskedTrainer(Trainer):
    """A trainer whose full-weight training is restricted by a saliency mask its ``setup`` computes (SalUn, ANT).

    The config has a ``parameters`` field (:data:`PARAMETERS`: ``"full"`` or an ESD variant), the candidates the
    mask ranks, and a ``mask_fraction``. Only tensors with at least one salient entry are trained (and copied); the
    base class's :meth:`~unsee.erasure.Trainer.adjust_gradients` applies ``mask`` to every step's gradients, so the
    entries outside it stay bit-identical. A full-weight run (``kind`` ``"delta"``) writes the mask as the artifact
    ``"mask"``.
    """

    drop_unchanged: ClassVar[bool] = True  # tensors the mask does not touch are left out of the adapter

    def candidates(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the saliency mask ranks."""
        if self.config.parameters == "full":
            return dict(unet.named_parameters())
        return esd_parameters(unet, self.config.parameters)

    def select_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.candidates(unet).items() if bool(self.mask[n].any())}

    @contextlib.contextmanager
    def candidate_gradients(self) -> Iterator[dict[str, nn.Parameter]]:
        """The UNet's candidates with gradients on and cleared, for the mask's gradient pass; off and cleared
        again afterwards (also after an error), so the pipeline is left as it was."""
        candidates = self.candidates(self.unet)
        for param in candidates.values():
            param.requires_grad_(True)
            param.grad = None
        try:
            yield candidates
        finally:
            for param in candidates.values():
                param.requires_grad_(False)
                param.grad = None

    @classmethod
    def artifact_names(cls, config: TrainerConfig) -> tuple[str, ...]:
        return ("mask",) if getattr(config, "kind", "delta") == "delta" else ()

    def write_artifact(self, name: str, path: Path, adapter_file: str) -> None:
        if name != "mask" or name not in self.artifact_names(self.config) or self.mask is None:
            super().write_artifact(name, path, adapter_file)
        save_mask(self.mask, path, metadata={"adapter": adapter_file, "mask_fraction": self.config.mask_fraction})
