"""Building :class:`~unsee.adapters.Adapter` objects from what a trainer holds at the end of training.

Two shapes of result, one helper each:

- :func:`delta_adapter_from_weights`: the original and trained values of a parameter subset (ESD, SalUn,
  AdvUnlearn's text encoder) become ``delta`` (or ``text_encoder``) tensors, ``trained - original``;
- :func:`lora_adapter_from_peft`: a component carrying peft LoRA layers (SPM, ANT, LoRA variants) becomes a
  ``lora`` (or ``text_encoder``) adapter with the peft config's rank and alpha.

Both record the component's architecture fingerprint and validate the result with the file format's own
checks (:func:`unsee.adapters.validate_adapter`), so an adapter that leaves a trainer can be saved.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from unsee.adapters import (
    COMPONENTS,
    TEXT_ENCODERS,
    Adapter,
    AdapterError,
    component_fingerprint,
    fingerprint as pipeline_fingerprint,
    validate_adapter,
)

__all__ = ["delta_adapter_from_weights", "lora_adapter_from_peft"]


def _resolve_fingerprint(component: str, model: Any, fingerprint: Any) -> dict[str, str]:
    """``{component: fingerprint}`` from an explicit value (a string or a dict), else from ``model``."""
    if fingerprint is not None:
        if isinstance(fingerprint, str):
            return {component: fingerprint}
        if isinstance(fingerprint, dict) and isinstance(fingerprint.get(component), str):
            return {component: fingerprint[component]}
        raise AdapterError(f"fingerprint= must be a string or a dict with an entry for {component!r}.")
    if model is None:
        raise AdapterError(
            "pass model= (the pipeline or the trained component) or fingerprint= to record the architecture."
        )
    if isinstance(model, nn.Module):
        return {component: component_fingerprint(model)}
    return pipeline_fingerprint(model, [component])


def _check_component(component: Any) -> None:
    if component not in COMPONENTS:
        raise AdapterError(f"component must be one of {', '.join(COMPONENTS)}, got {component!r}.")


def delta_adapter_from_weights(
    original: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    component: str = "unet",
    *,
    method: str,
    concepts: Iterable[str] = (),
    model: Any = None,
    fingerprint: Optional[Union[str, dict[str, str]]] = None,
    hyperparameters: Optional[dict] = None,
    training: Optional[dict] = None,
    kind: Optional[str] = None,
    drop_unchanged: bool = True,
) -> Adapter:
    """Build a delta adapter from the original and trained values of a parameter subset.

    ``original`` and ``trained`` map parameter names of ``component`` (no prefix) to tensors with the same
    keys and shapes; the adapter stores ``trained - original`` (float32) under ``<component>.<name>``.
    Parameters that did not change are left out when ``drop_unchanged``. The architecture fingerprint comes
    from ``model`` (the pipeline or the component module) or ``fingerprint``. ``kind`` defaults to
    ``"text_encoder"`` for a text-encoder component and ``"delta"`` otherwise.
    """
    _check_component(component)
    if set(original) != set(trained):
        diff = sorted(set(original) ^ set(trained))
        raise AdapterError(f"original and trained weights name different parameters (e.g. {diff[0]!r}).")
    tensors = {}
    for name in sorted(original):
        before, after = original[name], trained[name]
        if before.shape != after.shape:
            raise AdapterError(
                f"parameter {name!r}: original shape {tuple(before.shape)} != trained {tuple(after.shape)}."
            )
        delta = after.detach().to("cpu", torch.float32) - before.detach().to("cpu", torch.float32)
        if drop_unchanged and not bool(delta.any()):
            continue
        tensors[f"{component}.{name}"] = delta
    if kind is None:
        kind = "text_encoder" if component in TEXT_ENCODERS else "delta"
    adapter = Adapter(
        kind=kind, method=method, concepts=list(concepts), tensors=tensors,
        fingerprint=_resolve_fingerprint(component, model, fingerprint),
        hyperparameters=dict(hyperparameters or {}), training=dict(training or {}),
    )
    validate_adapter(adapter)
    return adapter


def lora_adapter_from_peft(
    model: nn.Module,
    component: str = "unet",
    *,
    method: str,
    concepts: Iterable[str] = (),
    adapter_name: str = "default",
    fingerprint: Optional[Union[str, dict[str, str]]] = None,
    hyperparameters: Optional[dict] = None,
    training: Optional[dict] = None,
    kind: Optional[str] = None,
) -> Adapter:
    """Build a LoRA adapter from a component with peft LoRA layers (``unet.add_adapter(LoraConfig(...))``).

    Rank and alpha come from the peft config (per-module rank/alpha patterns are not supported). The
    fingerprint is computed from ``model`` itself (peft's layers do not change it) unless given.
    ``kind`` defaults to ``"text_encoder"`` for a text-encoder component and ``"lora"`` otherwise.
    """
    from peft import get_peft_model_state_dict

    _check_component(component)
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise AdapterError(f"the model has no peft adapter named {adapter_name!r} (has: {sorted(configs) or 'none'}).")
    config = configs[adapter_name]
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise AdapterError("per-module LoRA ranks/alphas (rank_pattern/alpha_pattern) are not supported.")
    if getattr(config, "use_dora", False) or getattr(config, "use_rslora", False):
        raise AdapterError("DoRA / rsLoRA adapters are not supported; use plain LoRA.")
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors = {f"{component}.{k}": v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}
    if kind is None:
        kind = "text_encoder" if component in TEXT_ENCODERS else "lora"
    adapter = Adapter(
        kind=kind, method=method, concepts=list(concepts), tensors=tensors,
        fingerprint=_resolve_fingerprint(component, model, fingerprint),
        hyperparameters=dict(hyperparameters or {}), training=dict(training or {}),
        rank=int(config.r), alpha=float(config.lora_alpha),
    )
    validate_adapter(adapter)
    return adapter
