"""Applying erasure adapters to a pipeline: ``load_erasure``, ``set_erasure_scale``, ``unload_erasure``.

:class:`ErasureAdapterMixin` gives unsee's pipelines these methods. How an adapter is applied depends on its
kind (the file format is :mod:`unsee.adapters`):

- ``lora``: through diffusers' LoRA loader and peft, as a named LoRA adapter next to the user's own. It
  coexists with ``load_lora_weights``, ``set_adapters``, ``fuse_lora``/``unfuse_lora``, ``delete_adapters``,
  ``disable_lora``/``enable_lora`` and ``unload_lora_weights`` (rules below). Its scale is peft's per-layer scale,
  so changing it (or SPM's per-prompt strength) recomputes no weight.
- ``delta`` and ``text_encoder``: merged into the weights exactly. Every touched parameter is recomputed from an
  exact copy of its original as ``W_orig + sum_i scale_i * delta_i`` (in float32, float64 for float64 weights),
  and unloading the last adapter that touches it copies the original back, bit for bit.

Rules for erasure LoRAs among the user's LoRAs (diffusers' own behaviour otherwise):

- they stay active at their erasure scale: ``set_adapters(["style"])`` activates ``style`` *and* every erasure
  LoRA (diffusers would deactivate the others); naming an erasure adapter there with a number sets its erasure
  scale, as ``set_erasure_scale`` does. ``load_lora_weights`` (which makes the new LoRA the only active one in
  diffusers) leaves them active too. To switch an erasure off: ``set_erasure_scale(name, 0)`` or
  ``unload_erasure(name)``. ``disable_lora()`` switches off every LoRA, erasure LoRAs included, as in diffusers;
  so does a call's ``cross_attention_kwargs={"scale": s}``, which scales every active LoRA.
- they are never fused: ``fuse_lora()`` without ``adapter_names`` fuses the user's active LoRAs only, and naming
  an erasure adapter in ``adapter_names`` raises :class:`~unsee.adapters.AdapterError`. An unfused erasure LoRA
  still acts on layers where the user fused another LoRA (peft alone would skip every unfused adapter of a layer
  that holds a fused one; a forward hook adds it back). So scales, per-prompt strength and unloading keep working.
- ``delete_adapters`` naming an erasure adapter unloads it (``unload_erasure``); ``unload_lora_weights()`` removes
  the user's LoRAs and keeps the erasure LoRAs.

Delta adapters and weights changed by someone else: when a weight an erasure delta touches is no longer what
unsee last wrote (the user fused a LoRA into it, say), the change is kept: from then on the weight is
``W_orig + change + sum_i scale_i * delta_i``, and unloading leaves ``W_orig + change`` (not the bare original,
which would silently drop the fused LoRA). Bit-for-bit restoring holds where nobody else changed the weight.

Per-prompt scaling (SPM's Facilitated Transport) is registered by the method that needs it:
``register_prompt_scale("spm", fn)`` with ``fn(pipe, prompts, concepts) -> float``; a method not registered yet is
looked up among the ``unsee.prompt_scales`` entry points (an installed unsee declares SPM's), so
``pipe.load_erasure("spm.safetensors")`` needs no import of :mod:`unsee.erasure`.

The state lives on the pipeline instance. Pipelines made with ``from_pipe`` share modules but not this state:
unload from the pipeline you loaded into.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from unsee.adapters import (
    FLOAT32_MAX,
    LORA_A,
    LORA_B,
    Adapter,
    AdapterError,
    AdapterTarget,
    match_adapter,
    open_adapter_file,
    short_repr,
    validate_adapter,
)

__all__ = ["ErasureAdapterMixin", "PROMPT_SCALE_GROUP", "prompt_scale", "register_prompt_scale"]


# ----------------------------------------------------------------------------------------------
# Per-prompt scales, registered by the methods that need them
# ----------------------------------------------------------------------------------------------

#: entry-point group where installed packages declare per-prompt scale functions, one per method name
PROMPT_SCALE_GROUP = "unsee.prompt_scales"

PromptScale = Callable[[Any, list, list], float]
_PROMPT_SCALES: dict[str, PromptScale] = {}


def register_prompt_scale(method: str, fn: PromptScale) -> None:
    """Register ``fn(pipe, prompts, concepts) -> float`` as the per-prompt strength of ``method``'s adapters.

    An adapter asks for it with ``hyperparameters["facilitated_transport"] = True`` (or
    ``load_erasure(..., facilitated_transport=True)``); on every pipeline call its scale is multiplied by
    ``fn(pipe, prompts of the call, the adapter's concepts)`` (a number in [0, 1]) for the call.
    """
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    if not callable(fn):
        raise TypeError(f"the prompt scale of {method!r} must be callable, got {type(fn).__name__}")
    _PROMPT_SCALES[method] = fn


def prompt_scale(method: str) -> Optional[PromptScale]:
    """The per-prompt scale function registered for ``method``, else the one an installed package declares under
    the :data:`PROMPT_SCALE_GROUP` entry points (loaded and registered), else None."""
    fn = _PROMPT_SCALES.get(method)
    if fn is not None:
        return fn
    for entry in importlib.metadata.entry_points(group=PROMPT_SCALE_GROUP):
        if entry.name != method:
            continue
        try:
            loaded = entry.load()
        except Exception as error:
            raise AdapterError(
                f"the per-prompt scale of method {method!r} (entry point {entry.value!r}) cannot be loaded: "
                f"{type(error).__name__}: {short_repr(str(error))}."
            ) from error
        if not callable(loaded):
            raise AdapterError(f"entry point {entry.value!r} for method {method!r} is not callable.")
        return _PROMPT_SCALES.setdefault(method, loaded)
    return None


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


@dataclass
class _Term:
    """One merged adapter's contribution to one parameter: a full delta, or LoRA factors and their scaling."""

    delta: Optional[torch.Tensor] = None
    lora_a: Optional[torch.Tensor] = None
    lora_b: Optional[torch.Tensor] = None
    scaling: float = 1.0

    def on(self, device: torch.device, copy: bool) -> "_Term":
        """The term with its tensors on ``device`` (private copies with ``copy``)."""
        if self.delta is not None:
            return _Term(delta=self.delta.detach().to(device, copy=copy))
        return _Term(lora_a=self.lora_a.detach().to(device, copy=copy),
                     lora_b=self.lora_b.detach().to(device, copy=copy), scaling=self.scaling)

    def value(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self.delta is not None:
            return self.delta.to(device=device, dtype=dtype)
        a = self.lora_a.to(device=device, dtype=dtype).flatten(1)
        b = self.lora_b.to(device=device, dtype=dtype).flatten(1)
        return (b @ a).reshape(shape) * self.scaling


# a parameter's slot: (component, parameter name without peft's base_layer level)
Slot = tuple[str, str]
# what was added to a parameter at its last write: (scale, term) pairs
Written = tuple[tuple[float, _Term], ...]


@dataclass
class _Touched:
    """A parameter some merged adapter changes: an exact copy of its original value, and what unsee added to it
    at the last write (to tell whether someone else changed the weight since)."""

    param: nn.Parameter
    original: torch.Tensor
    written: Written = ()


@dataclass
class _Active:
    """A loaded erasure adapter. Merged ones (delta, text_encoder) have ``terms``; LoRAs applied through peft
    have ``components`` (where the peft adapter of that name lives) and ``created`` (the modules peft wrapped
    for it, unwrapped again when it goes)."""

    scale: float
    concepts: list[str] = field(default_factory=list)
    transport: Optional[PromptScale] = None  # per-prompt strength (SPM's Facilitated Transport)
    factor: float = 1.0  # the current call's per-prompt strength
    terms: dict[Slot, _Term] = field(default_factory=dict)
    peft: bool = False
    components: list[str] = field(default_factory=list)
    created: dict[str, set[str]] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)
    layers: Optional[list[nn.Module]] = None  # the peft layers holding this LoRA, found once (per-call scale changes)

    @property
    def effective(self) -> float:
        return self.scale * self.factor


@dataclass
class _ErasureState:
    active: dict[str, _Active] = field(default_factory=dict)
    touched: dict[Slot, _Touched] = field(default_factory=dict)


def _check_scale(scale: Any) -> float:
    """A finite scale within float32's range (weights are merged in float32 or float64)."""
    if isinstance(scale, bool) or not (
        isinstance(scale, numbers.Real) or (isinstance(scale, torch.Tensor) and scale.numel() == 1)
    ):
        raise AdapterError(f"scale must be a number, got {short_repr(scale)}.")
    try:
        value = float(scale)
    except (OverflowError, TypeError, ValueError, RuntimeError):
        raise AdapterError(
            f"scale {short_repr(scale)} is too large to be a float; erasure scales are about 0 to 2."
        ) from None
    if not math.isfinite(value):
        raise AdapterError(f"scale must be finite, got {value}.")
    if abs(value) > FLOAT32_MAX:
        raise AdapterError(
            f"scale {value:g} is beyond float32's range (about {FLOAT32_MAX:.3g}) and would overflow the weights; "
            "erasure scales are about 0 to 2."
        )
    return value


# ----------------------------------------------------------------------------------------------
# peft helpers
# ----------------------------------------------------------------------------------------------


def _tuner_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def _lora_params(layer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in layer.named_parameters() if not n.startswith("base_layer.")]


def _set_active(layer: nn.Module, names: list[str], frozen: Iterable[str] = ()) -> None:
    """Set a peft layer's active adapters without changing any ``requires_grad`` flag (peft's ``set_adapter``
    makes active adapters trainable); the adapters in ``frozen`` get ``requires_grad=False``."""
    if list(layer.active_adapters) != list(names):
        flags = [(p, p.requires_grad) for _, p in _lora_params(layer)]
        layer.set_adapter(list(names))
        for p, flag in flags:
            p.requires_grad_(flag)
    for name in frozen:
        for factors in (layer.lora_A, layer.lora_B):
            if name in factors:
                factors[name].requires_grad_(False)


def _add_unmerged_lora(name: str, layer: nn.Module, inputs: tuple, output: Any) -> Any:
    """Forward hook on a peft LoRA layer holding erasure LoRA ``name``: when the layer holds a fused (merged)
    adapter, peft runs only the base layer and skips every unfused adapter; add ``name``'s output back."""
    if layer.disable_adapters or not layer.merged or name in layer.merged_adapters:
        return None
    if name not in layer.active_adapters or name not in layer.lora_A or not inputs:
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    x = layer._cast_input_dtype(inputs[0], lora_a.weight.dtype)
    extra = lora_b(lora_a(layer.lora_dropout[name](x))) * layer.scaling[name]
    return (output + extra).to(output.dtype)


def _unwrap(model: nn.Module, path: str) -> None:
    """Put a peft layer's base layer back in its place."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = getattr(parent, child)
    setattr(parent, child, layer.get_base_layer())


def _forget_peft_config(model: nn.Module) -> None:
    """A model that holds no peft layer any more gets back the plain state diffusers/transformers start from."""
    if any(True for _ in _tuner_layers(model)):
        return
    if not getattr(model, "peft_config", None):
        model.__dict__.pop("peft_config", None)
        if "_hf_peft_config_loaded" in model.__dict__:
            if hasattr(type(model), "_hf_peft_config_loaded"):
                del model.__dict__["_hf_peft_config_loaded"]
            else:
                model._hf_peft_config_loaded = False


# ----------------------------------------------------------------------------------------------
# The mixin
# ----------------------------------------------------------------------------------------------


class ErasureAdapterMixin:
    """Adds erasure adapters to a diffusers pipeline (SD 1.x/2.x and SDXL) with a diffusers LoRA loader.

    ``load_erasure`` validates an adapter against this pipeline before anything changes, then applies it
    atomically; ``set_erasure_scale`` changes one adapter's strength; ``unload_erasure`` removes one or all;
    ``active_erasures`` lists them. ``lora`` adapters are peft LoRA adapters next to the user's own; ``delta`` and
    ``text_encoder`` adapters are merged exactly and restored bit for bit (the module docstring has the rules).
    """

    # -- state -------------------------------------------------------------------------------

    def _erasure_state(self) -> _ErasureState:
        state = self.__dict__.get("_unsee_erasures")
        if state is None:
            state = _ErasureState()
            self.__dict__["_unsee_erasures"] = state
        return state

    @property
    def active_erasures(self) -> dict[str, float]:
        """Loaded erasure adapters, name -> scale, in loading order."""
        return {name: entry.scale for name, entry in self._erasure_state().active.items()}

    # -- public API --------------------------------------------------------------------------

    def load_erasure(
        self,
        adapter: Union[str, os.PathLike, Adapter],
        scale: float = 1.0,
        adapter_name: Optional[str] = None,
        facilitated_transport: Optional[bool] = None,
    ) -> str:
        """Apply an erasure adapter (a file path or an :class:`~unsee.adapters.Adapter`) with ``scale``; returns
        its name.

        ``facilitated_transport``: scale the adapter, on every pipeline call, by how much the prompts relate
        to its erased concepts (SPM's Facilitated Transport; the function is registered by the method, see
        :func:`register_prompt_scale`). None: as the adapter asks (SPM adapters trained with
        ``facilitated_transport=True``; no others).

        The name defaults to the file's stem (or ``<method>-<concepts>`` for an in-memory adapter) and must
        not be in use (by another erasure adapter, or for a ``lora`` adapter by any LoRA adapter of the pipeline).
        Everything is validated against this pipeline before anything changes: the components exist, their
        architecture fingerprints match, every key names an existing parameter (delta, same shape) or
        Linear/Conv2d module (LoRA, consistent A/B shapes), and the scale is finite and within float32's range.
        A file's header is checked this way before any of its tensor data is read. A kohya/A1111 LoRA file is read
        as a ``lora`` adapter (module names resolved against this pipeline, alpha per module kept; method "unknown"
        unless unsee exported it). A sum of merged adapters that
        would turn a finite weight into inf/NaN is refused too. Raises :class:`~unsee.adapters.AdapterError` and
        leaves the pipeline untouched when anything is wrong.
        """
        state = self._erasure_state()
        scale = _check_scale(scale)
        if isinstance(adapter, Adapter):
            validate_adapter(adapter)
            default_name = re.sub(r"[^\w.+-]+", "_", "-".join([adapter.method, *adapter.concepts])).strip("_")
        elif isinstance(adapter, (str, os.PathLike)):
            default_name = Path(adapter).stem
        else:
            raise AdapterError(f"load_erasure takes a file path or an unsee Adapter, got {type(adapter).__name__}.")
        name = default_name if adapter_name is None else adapter_name
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter_name must be a non-empty string, got {short_repr(name)}.")
        if name in state.active:
            raise AdapterError(
                f"an erasure adapter named {short_repr(name)} is already loaded; pass another adapter_name or "
                f"unload_erasure({short_repr(name)}) first."
            )

        owned = not isinstance(adapter, Adapter)
        with contextlib.ExitStack() as stack:
            # a file: its header is checked against this pipeline before any tensor data is read
            opened = stack.enter_context(open_adapter_file(adapter, pipe=self)) if owned else None
            header = opened.header if opened is not None else adapter
            targets = match_adapter(self, header)
            through_peft = header.kind == "lora"
            if through_peft:
                self._check_peft_name(name)
            if facilitated_transport is None:
                facilitated_transport = bool(header.hyperparameters.get("facilitated_transport", False))
            transport = self._transport_function(header.method) if facilitated_transport else None
            if opened is not None:
                adapter = opened.read()
        entry = _Active(scale=scale, concepts=list(adapter.concepts), transport=transport)
        if through_peft:
            self._load_peft(name, adapter, targets, entry)
        else:
            self._load_merged(name, adapter, targets, entry, copy=not owned)
        return name

    def set_erasure_scale(self, adapter_name: str, scale: float) -> None:
        """Change the scale of a loaded erasure adapter (0 switches it off, 1 is full strength)."""
        entry = self._get_active(adapter_name)
        scale = _check_scale(scale)
        previous = entry.scale
        entry.scale = scale
        try:
            self._apply(entry)
        except BaseException:
            entry.scale = previous
            self._apply(entry)
            raise

    def unload_erasure(self, adapter_name: Optional[str] = None) -> None:
        """Remove one erasure adapter (by name) or all of them (``None``).

        Merged parameters no adapter touches any more get their exact original values back (plus what someone
        else changed in them meanwhile, see the module docstring); LoRA adapters leave peft as they found it
        (modules peft wrapped only for them are unwrapped).
        """
        state = self._erasure_state()
        names = list(state.active) if adapter_name is None else [adapter_name]
        for name in names:
            self._get_active(name)
        merged = [n for n in names if not state.active[n].peft]
        if merged:
            before = dict(state.active)
            keys: set[Slot] = set()
            for name in merged:
                keys.update(state.active.pop(name).terms)
            try:
                self._recompute(keys)
            except BaseException:  # what the others add would overflow without this one: keep it loaded
                state.active.clear()
                state.active.update(before)
                self._recompute(keys)
                raise
            self._forget_unused(keys)
        for name in names:
            if name in state.active:
                self._unload_peft(name, state.active.pop(name))

    # -- per-call behaviour --------------------------------------------------------------------

    @contextlib.contextmanager
    def _erasure_transport(self, prompt: Any) -> Iterator[None]:
        """For one pipeline call: erasure LoRAs active at their scales (whatever was switched meanwhile, e.g. with
        a model's own ``set_adapters``), and adapters with a per-prompt scale (SPM's Facilitated Transport) at
        ``scale * strength(prompt)`` (text or a list of texts; None, i.e. ``prompt_embeds`` only, leaves them at
        full strength). LoRAs change their peft scale only; merged adapters are recomputed for the call."""
        state = self._erasure_state()
        self._activate_erasure_loras()
        transported = [entry for entry in state.active.values() if entry.transport is not None and entry.scale != 0.0]
        if not transported or prompt is None:
            yield
            return
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # every strength is computed with the adapters as they are, before any changes
        factors = [(entry, _check_scale(entry.transport(self, prompts, list(entry.concepts)))) for entry in transported]
        try:
            for entry, factor in factors:
                entry.factor = factor
            self._apply(*transported)
            yield
        finally:
            for entry, _ in factors:
                entry.factor = 1.0
            self._apply(*transported)

    # -- diffusers' LoRA API, erasure LoRAs kept in place --------------------------------------

    def load_lora_weights(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``load_lora_weights``; loaded erasure LoRAs stay active (diffusers activates only the new
        LoRA)."""
        result = super().load_lora_weights(*args, **kwargs)
        self._activate_erasure_loras()
        return result

    def set_adapters(self, adapter_names: Union[list[str], str], adapter_weights: Any = None) -> Any:
        """diffusers' ``set_adapters``, with every erasure LoRA kept active at its erasure scale.

        An erasure adapter named in ``adapter_names`` takes its weight there (one number) as its new erasure scale;
        the others are added with their current scales. Delta erasure adapters are not LoRA adapters: change them
        with ``set_erasure_scale``.
        """
        state = self._erasure_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        lists = self.get_list_adapters() if state.active else {}
        peft_names = {n for adapters in lists.values() for n in adapters}
        merged_named = [n for n in names if n in state.active and not state.active[n].peft and n not in peft_names]
        if merged_named:
            raise AdapterError(
                f"erasure adapter {short_repr(merged_named[0])} is merged into the weights, not a LoRA adapter; change "
                f"its strength with set_erasure_scale({short_repr(merged_named[0])}, scale)."
            )
        ours = [n for n, entry in state.active.items() if entry.peft]
        if not ours:
            return super().set_adapters(adapter_names, adapter_weights)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            return super().set_adapters(adapter_names, adapter_weights)  # diffusers' own error
        weights = list(weights)
        new_scales = {}
        for i, (name, weight) in enumerate(zip(names, weights)):
            if name not in ours:
                continue
            if isinstance(weight, dict):
                raise AdapterError(
                    f"erasure adapter {short_repr(name)} takes one number in set_adapters (its erasure scale), not "
                    "per-component or per-block weights."
                )
            new_scales[name] = weights[i] = _check_scale(1.0 if weight is None else weight)
        missing = [n for n in ours if n not in names]
        result = super().set_adapters(names + missing, weights + [state.active[n].effective for n in missing])
        for name, value in new_scales.items():
            state.active[name].scale = value
        self._activate_erasure_loras()
        return result

    def fuse_lora(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``fuse_lora`` for the user's LoRAs: without ``adapter_names`` it fuses the active LoRAs that
        are not erasure adapters; naming an erasure adapter raises AdapterError (erasure LoRAs stay unfused, so
        that their scale, per-prompt strength and unloading keep working)."""
        ours = self._peft_erasure_names()
        if not ours:
            return super().fuse_lora(*args, **kwargs)
        parent = super().fuse_lora
        bound = inspect.signature(parent).bind(*args, **kwargs)
        names = bound.arguments.get("adapter_names")
        if names is None:
            names = [n for n in self._active_lora_names() if n not in ours]
        else:
            names = [names] if isinstance(names, str) else list(names)
            fused = [n for n in names if n in ours]
            if fused:
                raise AdapterError(
                    f"erasure adapter {short_repr(fused[0])} is not fused: erasure adapters stay unfused so that their "
                    "scale and per-prompt strength keep working and unload_erasure restores the weights; leave it out "
                    "of adapter_names (it still acts on every call)."
                )
        bound.arguments["adapter_names"] = names
        result = parent(*bound.args, **bound.kwargs)
        self._activate_erasure_loras()  # fuse_lora(lora_scale=...) multiplies every active adapter's scale
        return result

    def delete_adapters(self, adapter_names: Union[list[str], str]) -> Any:
        """diffusers' ``delete_adapters``; an erasure adapter named there is unloaded (``unload_erasure``)."""
        state = self._erasure_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        ours = [n for n in names if n in state.active]
        others = [n for n in names if n not in state.active]
        for name in ours:
            self.unload_erasure(name)
        if others or not ours:
            return super().delete_adapters(others)
        return None

    def unload_lora_weights(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``unload_lora_weights`` for the user's LoRAs: they are removed (fused ones stay in the
        weights, as in diffusers), erasure LoRAs stay loaded (``unload_erasure`` removes them)."""
        ours = self._peft_erasure_names()
        if not ours:
            return super().unload_lora_weights(*args, **kwargs)
        users = sorted({n for adapters in self.get_list_adapters().values() for n in adapters} - set(ours))
        if users:
            super().delete_adapters(users)
        for component in self._lora_components():
            model = getattr(self, component)
            for path, layer in list(_tuner_layers(model)):
                if not layer._all_available_adapter_names():
                    _unwrap(model, path)
            _forget_peft_config(model)
        self._activate_erasure_loras()
        return None

    # -- internals: loading -----------------------------------------------------------------

    def _get_active(self, adapter_name: Any) -> _Active:
        active = self._erasure_state().active
        if adapter_name not in active:
            raise AdapterError(
                f"no erasure adapter named {adapter_name!r} is loaded (loaded: {', '.join(active) or 'none'})."
            )
        return active[adapter_name]

    def _transport_function(self, method: str) -> PromptScale:
        fn = prompt_scale(method)
        if fn is None:
            raise AdapterError(
                f"the adapter asks for a per-prompt scale (facilitated transport), but no function is registered for "
                f"method {method!r}: import the package that provides it (for SPM: import unsee.erasure; an installed "
                "unsee finds it by itself), or pass facilitated_transport=False."
            )
        return fn

    def _lora_components(self) -> list[str]:
        return [c for c in getattr(self, "_lora_loadable_modules", ()) if isinstance(getattr(self, c, None), nn.Module)]

    def _peft_erasure_names(self) -> list[str]:
        return [name for name, entry in self._erasure_state().active.items() if entry.peft]

    def _active_lora_names(self) -> list[str]:
        names: dict[str, None] = {}
        for component in self._lora_components():
            for _, layer in _tuner_layers(getattr(self, component)):
                names.update(dict.fromkeys(n for n in layer.active_adapters if n in layer.lora_A))
        return list(names)

    def _check_peft_name(self, name: str) -> None:
        for component in self._lora_components():
            if name in (getattr(getattr(self, component), "peft_config", None) or {}):
                raise AdapterError(
                    f"this pipeline's {component} already has a LoRA adapter named {short_repr(name)}; pass another "
                    "adapter_name to load_erasure."
                )
        if not hasattr(self, "load_lora_into_unet"):
            raise AdapterError(
                f"{type(self).__name__} has no diffusers LoRA loader; LoRA erasure adapters need one "
                "(a StableDiffusion / StableDiffusionXL pipeline)."
            )

    def _load_merged(self, name: str, adapter: Adapter, targets: list[AdapterTarget], entry: _Active,
                     copy: bool) -> None:
        state = self._erasure_state()
        scaling = adapter.scaling
        terms: dict[Slot, tuple[nn.Parameter, _Term]] = {}
        for target in targets:
            param = dict(getattr(self, target.component).named_parameters())[target.parameter]
            if adapter.is_lora:
                term = _Term(lora_a=adapter.tensors[target.keys[0]], lora_b=adapter.tensors[target.keys[1]],
                             scaling=scaling)
            else:
                term = _Term(delta=adapter.tensors[target.keys[0]])
            # private copies next to the weight they change (later edits to an in-memory Adapter cannot leak in,
            # and recomputing needs no transfers); tensors just read from a file are ours already
            terms[(target.component, target.name)] = (param, term.on(param.device, copy=copy))
        entry.terms = {slot: term for slot, (_, term) in terms.items()}
        try:
            with torch.no_grad():
                for slot, (param, _) in terms.items():
                    if slot not in state.touched:
                        state.touched[slot] = _Touched(param=param, original=param.detach().clone())
                state.active[name] = entry
                self._recompute(terms.keys())
        except BaseException:
            state.active.pop(name, None)
            self._recompute(terms.keys())
            self._forget_unused(terms.keys())
            raise

    def _load_peft(self, name: str, adapter: Adapter, targets: list[AdapterTarget], entry: _Active) -> None:
        """Load a LoRA adapter through diffusers' LoRA loaders under ``name``; on any failure, leave peft as it was.

        diffusers' ``load_lora_weights`` takes LoRA metadata (alpha) only from a file's header, never with a state
        dict; the two loaders it calls, ``load_lora_into_unet`` and ``load_lora_into_text_encoder``, take it as
        ``metadata=``. The keys and target modules are the module paths found in this pipeline, so the file's
        spelling of CLIP's ``text_model.`` level does not matter.
        """
        rank = adapter.rank if adapter.rank is not None else int(adapter.tensors[targets[0].keys[0]].shape[0])
        alpha = adapter.alpha if adapter.alpha is not None else rank
        state_dict, metadata = {}, {}
        for target in targets:
            state_dict[f"{target.component}.{target.module}{LORA_A}"] = adapter.tensors[target.keys[0]]
            state_dict[f"{target.component}.{target.module}{LORA_B}"] = adapter.tensors[target.keys[1]]
        components = adapter.components
        for component in components:
            config = {
                "r": int(rank), "lora_alpha": float(alpha), "rank_pattern": {}, "alpha_pattern": {},
                "use_dora": False, "lora_bias": False, "bias": "none",
                "target_modules": sorted(t.module for t in targets if t.component == component),
            }
            metadata.update({f"{component}.{k}": v for k, v in config.items()})

        before = {c: {path: (layer, list(layer.active_adapters), layer.disable_adapters, list(layer.merged_adapters))
                      for path, layer in _tuner_layers(getattr(self, c))} for c in components}
        # peft freezes every base weight of a model it injects into; the user's flags stay as they were
        flags = [(p, p.requires_grad) for c in components for p in getattr(self, c).parameters()]
        entry.peft, entry.components = True, list(components)
        state = self._erasure_state()
        try:
            for component in components:
                if component == "unet":
                    self.load_lora_into_unet(state_dict, network_alphas=None, unet=self.unet, adapter_name=name,
                                             metadata=metadata, _pipeline=self)
                else:
                    self.load_lora_into_text_encoder(state_dict, network_alphas=None,
                                                     text_encoder=getattr(self, component), prefix=component,
                                                     lora_scale=1.0, adapter_name=name, _pipeline=self,
                                                     metadata=metadata)
            for component in components:
                model, previous = getattr(self, component), before[component]
                default = next(iter(previous.values()), (None, [], False, []))
                created = entry.created.setdefault(component, set())
                for path, layer in _tuner_layers(model):
                    old = previous.get(path)
                    if old is None or old[0] is not layer:
                        created.add(path)
                        active, disabled = list(default[1]), default[2]
                        if disabled:
                            layer.enable_adapters(False)
                    else:
                        active = list(old[1])
                        # peft unmerges every fused LoRA of a model it adds an adapter to: fuse them again
                        refuse = [n for n in old[3] if n in layer.lora_A and n not in layer.merged_adapters]
                        if refuse:
                            layer.merge(adapter_names=refuse)
                    if name in layer.lora_A:
                        active.append(name)
                        entry.hooks.append(layer.register_forward_hook(functools.partial(_add_unmerged_lora, name)))
                    _set_active(layer, active, frozen=[name])
            state.active[name] = entry
            self._apply(entry)
        except BaseException:
            state.active.pop(name, None)
            self._unload_peft(name, entry, before=before)
            raise
        finally:
            for param, flag in flags:
                param.requires_grad_(flag)

    # -- internals: applying scales ---------------------------------------------------------------

    def _activate_erasure_loras(self) -> None:
        """Every erasure LoRA active on its layers at its current scale; other adapters' state untouched."""
        for name, entry in self._erasure_state().active.items():
            if entry.peft:
                self._set_peft_scale(name, entry)

    def _set_peft_scale(self, name: str, entry: _Active) -> None:
        value = entry.effective
        if entry.layers is None:
            entry.layers = [layer for component in entry.components
                            for _, layer in _tuner_layers(getattr(self, component)) if name in layer.lora_A]
        for layer in entry.layers:
            if name in layer.lora_A:  # not if deleted since through diffusers' delete_adapters
                active = layer.active_adapters
                if name not in active:
                    _set_active(layer, [*active, name])
                # diffusers' set_adapters makes active adapters trainable: erasure LoRAs stay frozen
                if any(p.requires_grad for f in (layer.lora_A, layer.lora_B) for p in f[name].parameters()):
                    _set_active(layer, layer.active_adapters, frozen=[name])
                layer.set_scale(name, value)

    def _apply(self, *entries: _Active) -> None:
        """Make the weights / peft scales follow the entries' current (effective) scales."""
        state = self._erasure_state()
        keys: set[Slot] = set()
        for entry in entries:
            if entry.peft:
                name = next(n for n, e in state.active.items() if e is entry)
                self._set_peft_scale(name, entry)
            else:
                keys.update(entry.terms)
        if keys:
            self._recompute(keys)

    def _recompute(self, keys: Iterable[Slot]) -> None:
        """Write ``W_orig + sum(scale * delta)`` into each parameter in ``keys`` from the saved originals.

        A parameter no active adapter changes gets its original copied back. A weight that is no longer what the
        last write left (someone fused a LoRA into it, say) keeps that change: it is folded into the saved
        original first. A sum that would turn a finite weight into inf/NaN (in the parameter's dtype) raises
        AdapterError before that parameter is written; callers roll back the parameters already written, so the
        model is left as it was.
        """
        state = self._erasure_state()
        with torch.no_grad():
            for key in list(keys):
                touched = state.touched.get(key)
                if touched is None:
                    continue
                param = touched.param
                compute = torch.float64 if param.dtype == torch.float64 else torch.float32
                last = self._value(touched, touched.written, compute)
                changed = _differs(param.data, last)
                if changed is not None:  # changed by someone else since our last write: keep the change
                    change = param.data.to(compute) - last.to(compute)
                    folded = (touched.original.to(compute) + change).to(param.dtype)
                    touched.original = torch.where(changed, folded, touched.original)
                    touched.written = ()
                contributions = tuple((entry.effective, entry.terms[key]) for entry in state.active.values()
                                      if key in entry.terms and entry.effective != 0.0)
                value = self._value(touched, contributions, compute)
                finite = torch.isfinite(value)
                if not bool(finite.all()):  # only weights that were finite count (a broken model stays broken)
                    was_finite = torch.isfinite(touched.original).to(finite.device)
                    if bool((was_finite & ~finite).any()):
                        scales = ", ".join(f"{short_repr(name)} at scale {entry.effective:g}"
                                           for name, entry in state.active.items()
                                           if key in entry.terms and entry.effective != 0.0)
                        raise AdapterError(
                            f"erasure adapters {scales} would overflow {key[0]}.{key[1]} ({param.dtype}) to inf/NaN; "
                            "the weights are left as they were. Use a smaller scale (or an adapter with a smaller "
                            "lora_alpha)."
                        )
                param.data.copy_(value)
                touched.written = contributions

    @staticmethod
    def _value(touched: _Touched, contributions: Written, compute: torch.dtype) -> torch.Tensor:
        """``original + sum(scale * term)`` in the parameter's dtype (the original itself when nothing is added)."""
        param = touched.param
        if not contributions:
            return touched.original.to(param.device)
        value = touched.original.to(device=param.device, dtype=compute, copy=True)
        for scale, term in contributions:
            value.add_(term.value(param.shape, param.device, compute), alpha=scale)
        return value.to(param.dtype)

    def _forget_unused(self, keys: Iterable[Slot]) -> None:
        """Drop the saved originals of parameters in ``keys`` that no loaded adapter changes any more."""
        state = self._erasure_state()
        for key in list(keys):
            if key in state.touched and not any(key in entry.terms for entry in state.active.values()):
                del state.touched[key]

    # -- internals: unloading LoRAs ---------------------------------------------------------------

    def _unload_peft(self, name: str, entry: _Active, before: Optional[dict] = None) -> None:
        """Remove erasure LoRA ``name`` from peft: its layers deleted, every other adapter's activation as it was
        (``before``: the snapshot taken before loading, for a rollback), and the peft wrappers it leaves without any
        adapter unwrapped (their base modules put back)."""
        for handle in entry.hooks:
            handle.remove()
        entry.hooks.clear()
        for component in entry.components:
            model = getattr(self, component)
            keep, held = {}, set()
            for path, layer in _tuner_layers(model):
                if name in layer.lora_A:
                    held.add(path)
                old = (before or {}).get(component, {}).get(path)
                if old is not None and old[0] is layer:
                    keep[path] = (layer, old[1], old[3])
                else:
                    keep[path] = (layer, [n for n in layer.active_adapters if n != name], [])
            if name in (getattr(model, "peft_config", None) or {}) or any(
                    name in layer.lora_A for layer, _, _ in keep.values()):
                from diffusers import ModelMixin
                from diffusers.utils.peft_utils import delete_adapter_layers

                with _quiet_peft():
                    if isinstance(model, ModelMixin):
                        model.delete_adapters([name])
                    else:  # a transformers text encoder
                        delete_adapter_layers(model, name)
            created = entry.created.get(component, set())
            if before is not None:  # a rollback: every layer the failed load made is new
                created = created | {p for p in keep if p not in before.get(component, {})
                                     or before[component][p][0] is not keep[p][0]}
            for path, (layer, active, merged) in keep.items():
                if (path in created or path in held) and not layer._all_available_adapter_names():
                    _unwrap(model, path)  # a wrapper left empty by this adapter goes (a user's empty one stays)
                    continue
                _set_active(layer, [n for n in active if n != name])
                refuse = [n for n in merged if n in layer.lora_A and n not in layer.merged_adapters]
                if refuse:  # a rollback after peft unmerged the user's fused LoRAs
                    layer.merge(adapter_names=refuse)
            _forget_peft_config(model)


def _differs(current: torch.Tensor, expected: torch.Tensor) -> Optional[torch.Tensor]:
    """Where ``current`` is not ``expected`` (NaN equal to NaN), or None when they are equal everywhere."""
    if torch.equal(current, expected):
        return None
    differs = current != expected
    differs &= ~(torch.isnan(current) & torch.isnan(expected)) if current.is_floating_point() else differs
    return differs if bool(differs.any()) else None


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft warns when deleting the active adapter of a layer; the activation is set right afterwards."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*was active which is now deleted.*")
        yield
