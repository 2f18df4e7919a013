"""The pipeline as it was handed to a trainer: every tensor, flag, gradient and attention processor, to put back."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

__all__ = ["PipelineSnapshot", "pipeline_modules"]


def pipeline_modules(pipe: Any) -> list[nn.Module]:
    """The ``nn.Module`` components of a pipeline (UNet, text encoders, VAE...), each once."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = {name: getattr(pipe, name, None) for name in
                      ("unet", "text_encoder", "text_encoder_2", "vae", "image_encoder", "safety_checker")}
    modules: list[nn.Module] = []
    for module in components.values():
        if isinstance(module, nn.Module) and not any(module is m for m in modules):
            modules.append(module)
    return modules


_NOTHING = object()


class PipelineSnapshot:
    """Every tensor of a pipeline's modules as handed in, to put back after training.

    References, not copies: training moves or converts tensors into new ones (:meth:`move` keeps the caller's
    tensors it replaces) and trains copies of the trained tensors (:meth:`~unsee.erasure.Trainer.train`), so the
    caller's tensors are never written to and go back exactly as they were (also their dtype and device), with
    their ``requires_grad`` flags and gradients, the modules' own ``forward`` (mixed precision wraps it), and
    the UNet's attention processors.
    """

    def __init__(self, pipe: Any) -> None:
        self.modules = pipeline_modules(pipe)
        self.params: dict[int, tuple[nn.Parameter, bool, Optional[torch.Tensor]]] = {}
        self.moved: dict[int, torch.Tensor] = {}  # the caller's data of the parameters :meth:`move` replaced
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        for module in self.modules:
            for param in module.parameters():
                self.params.setdefault(id(param), (param, param.requires_grad, param.grad))
            for sub in module.modules():
                for name, buffer in sub._buffers.items():
                    if buffer is not None:
                        self.buffers.append((sub, name, buffer))
        unet = getattr(pipe, "unet", None)
        self.unet = unet
        self.processors = dict(unet.attn_processors) if hasattr(unet, "attn_processors") else None
        # accelerate's mixed precision wraps ``forward`` in the instance; unwrapping leaves a bound method there
        self.forwards = [(module, module.__dict__.get("forward", _NOTHING)) for module in self.modules]

    @torch.no_grad()
    def move(self, device: torch.device, dtype: Optional[torch.dtype]) -> None:
        """Every tensor on ``device`` (and floating-point ones in ``dtype``), as new tensors where they change."""
        for key, (param, _, _) in self.params.items():
            data = param.data
            moved = data.to(device=device, dtype=dtype if dtype is not None and data.is_floating_point() else None)
            if moved is not data:
                if param.grad is not None and (param.grad.dtype != moved.dtype or param.grad.device != moved.device):
                    param.grad = None  # the caller's gradient comes back with the restore
                self.moved[key] = data
                param.data = moved
        for sub, name, buffer in self.buffers:
            moved = buffer.to(device=device, dtype=dtype if dtype is not None and buffer.is_floating_point() else None)
            if moved is not buffer:
                sub._buffers[name] = moved

    @torch.no_grad()
    def restore(self) -> None:
        for key, (param, requires_grad, grad) in self.params.items():
            if key in self.moved:
                param.data = self.moved[key]
            param.requires_grad_(requires_grad)
            param.grad = grad
        for sub, name, buffer in self.buffers:
            if sub._buffers.get(name) is not buffer:
                sub._buffers[name] = buffer
        for module, forward in self.forwards:
            if forward is _NOTHING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
        if self.processors is not None:
            now = self.unet.attn_processors
            if set(now) != set(self.processors) or any(now[k] is not v for k, v in self.processors.items()):
                self.unet.set_attn_processor(dict(self.processors))
