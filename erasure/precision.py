"""Float32 master copies of trained tensors that live in half precision.

A trainer's ``dtype`` (``float16``/``bfloat16``) puts the whole pipeline, trained tensors included, in half
precision. Adam cannot run on such tensors directly:

- in float16, the second moment of a small gradient, ``(1 - beta2) * g**2``, underflows to 0 (below 6e-8) and
  Adam's ``eps`` of 1e-8 rounds to 0, so the first update divides 0 by 0 and the loss turns NaN at step 2;
- in bfloat16 (8 bits of mantissa), an update smaller than about 1/256 of a weight rounds away, so training at
  the papers' learning rates (1e-5) leaves most weights where they were.

``MasterWeights`` keeps a float32 copy of each half-precision trained tensor: the optimizer steps the copies
with the (upcast) gradients, and the model's tensors take the rounded result after every step. The forward and
backward passes stay in the model's precision; only the optimizer's arithmetic and state are float32 (mixed
precision training's "master weights", e.g. Micikevicius et al., "Mixed Precision Training", ICLR 2018).
Float32 tensors are handed to the optimizer as they are.
"""

from __future__ import annotations

from typing import Mapping

import torch

HALF = (torch.float16, torch.bfloat16)


class MasterWeights:
    """Float32 masters for the half-precision tensors among ``params`` (trained tensors by name)."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        self.params = dict(params)
        self.masters: dict[str, torch.nn.Parameter] = {
            name: torch.nn.Parameter(param.detach().float().clone())
            for name, param in self.params.items() if param.dtype in HALF
        }

    def optimized(self) -> list[torch.nn.Parameter]:
        """The tensors to hand the optimizer: the float32 master where there is one, else the tensor itself."""
        return [self.masters.get(name, param) for name, param in self.params.items()]

    def pull_gradients(self) -> None:
        """Give each master its tensor's gradient, in float32 (call after backward, before ``optimizer.step``)."""
        for name, master in self.masters.items():
            grad = self.params[name].grad
            master.grad = None if grad is None else grad.detach().float()

    def push(self) -> None:
        """Round the masters into the model's tensors (call after ``optimizer.step``)."""
        with torch.no_grad():
            for name, master in self.masters.items():
                self.params[name].copy_(master)

    def values(self) -> dict[str, torch.Tensor]:
        """Each trained tensor's full-precision value: its master where it has one (what a checkpoint keeps)."""
        return {name: self.masters.get(name, param).detach() for name, param in self.params.items()}

    def load(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set the trained tensors and their masters from ``values`` (a checkpoint's), each in its own dtype."""
        with torch.no_grad():
            for name, param in self.params.items():
                value = values[name]
                param.copy_(value.to(param.device, param.dtype))
                if name in self.masters:
                    self.masters[name].copy_(value.to(param.device, torch.float32))
