"""Which modules and parameters a trainer trains: Linear/Conv2d modules picked by a rule, their parameters, and a
LoRA on them. Each method states its own rule in its file (:func:`~unsee.erasure.esd_modules`, ...); the walk is
here, once: modules are found with ``isinstance``, never by class name, in ``named_modules`` order."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from torch import nn

__all__ = ["linear_modules", "module_parameters", "lora_config"]


def linear_modules(root: nn.Module, keep: Optional[Callable[[str], bool]] = None,
                   inside: Optional[type] = None) -> list[str]:
    """Names of the ``nn.Linear`` and ``nn.Conv2d`` modules of ``root`` for which ``keep(name)`` holds (all when
    None), only those within a module of the type ``inside`` when given; in ``named_modules`` order."""
    within: list[str] = []
    names = []
    for name, module in root.named_modules():
        if inside is not None and isinstance(module, inside):
            within.append(name + ".")
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if inside is not None and not any(name.startswith(prefix) for prefix in within):
            continue
        if keep is None or keep(name):
            names.append(name)
    return names


def module_parameters(root: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """The parameters (weights and biases) of the modules ``names`` of ``root``: full name -> parameter."""
    modules = dict(root.named_modules())
    params = {}
    for name in names:
        for leaf, param in modules[name].named_parameters(recurse=False):
            params[f"{name}.{leaf}"] = param
    return params


def lora_config(rank: int, alpha: Optional[float], modules: Sequence[str], init: Any = "gaussian") -> Any:
    """A peft ``LoraConfig`` of rank ``rank`` on ``modules`` (alpha None: equal to the rank, i.e. scaling 1); up
    weights start at zero, so the adapter starts as the identity, down weights from ``init`` (``"gaussian"``, or
    ``True``: peft's Kaiming-uniform default)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=init,
                      target_modules=list(modules))
