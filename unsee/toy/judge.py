"""The judge: a small CNN that reads shape, colour, background and style from a 64x64 image.

It is trained on renders of the shapes world (clean and passed through the toy model's VAE) by
``scripts/train_toy.py`` and shipped as ``weights/judge.safetensors``. :mod:`unsee.toy.evaluation` uses it
(:func:`default_judge`) to score what the toy model generates; any other callable with the same output can replace it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .world import ATTRIBUTE_VALUES, ATTRIBUTES, IMAGE_SIZE

ImageBatch = Union[torch.Tensor, np.ndarray, Sequence[Image.Image]]


class Judge(nn.Module):
    """Four classification heads on a shared convolutional trunk.

    ``forward`` takes images in [-1, 1] of shape (B, 3, 64, 64) and returns a dict of logits per
    attribute; :meth:`predict` takes PIL images, uint8 arrays or tensors and returns class names.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.SiLU())

        self.trunk = nn.Sequential(
            block(3, w, 2), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, len(ATTRIBUTE_VALUES[name])) for name in ATTRIBUTES})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: ImageBatch, batch_size: int = 256) -> list[dict[str, str]]:
        """Class names per image, e.g. ``[{"shape": "circle", "color": "red", ...}, ...]``."""
        tensor = to_judge_input(images)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        results: list[dict[str, str]] = []
        for start in range(0, len(tensor), batch_size):
            logits = self(tensor[start : start + batch_size].to(device))
            indices = {name: out.argmax(-1).tolist() for name, out in logits.items()}
            for i in range(len(indices["shape"])):
                results.append({name: ATTRIBUTE_VALUES[name][indices[name][i]] for name in ATTRIBUTES})
        self.train(was_training)
        return results

    def save(self, path: Union[str, Path]) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"unsee_judge": json.dumps({"width": self.heads["shape"].in_features // 4})})

    @classmethod
    def load(cls, path: Optional[Union[str, Path]] = None) -> "Judge":
        """Load the judge shipped in ``weights/`` (or one saved at ``path``)."""
        from .model import JUDGE_PATH

        path = Path(path or JUDGE_PATH)
        if not path.is_file():
            raise FileNotFoundError(f"no judge weights at {path}; train them with scripts/train_toy.py --stage judge")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            config = json.loads((f.metadata() or {}).get("unsee_judge", "{}"))
        judge = cls(**config)
        judge.load_state_dict(load_file(str(path)))
        return judge.eval()


def default_judge() -> Callable[[ImageBatch], list[dict[str, str]]]:
    """The shipped judge's ``predict``: images -> [{"shape": ..., "color": ..., "background": ..., "style": ...}]."""
    return Judge.load().predict


def to_judge_input(images: ImageBatch) -> torch.Tensor:
    """Convert PIL images, uint8 HWC arrays or [-1, 1] / [0, 1] tensors to a (B, 3, 64, 64) tensor in [-1, 1].

    Tensors are taken as [-1, 1] when they have negative values and as [0, 1] otherwise (the
    diffusers ``output_type="pt"`` convention).
    """
    if isinstance(images, torch.Tensor):
        tensor = images.float()
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.min() >= 0:
            tensor = tensor * 2 - 1
    else:
        if isinstance(images, np.ndarray):
            array = images if images.ndim == 4 else images[None]
        else:
            array = np.stack([np.asarray(im.convert("RGB")) for im in images])
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 127.5 - 1
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()
    if tensor.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        tensor = nn.functional.interpolate(tensor, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return tensor
