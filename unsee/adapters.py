"""The erasure adapter file format: what an adapter is, how it is checked, written and read.

An erasure trainer produces an :class:`Adapter`: a small set of tensors plus a description of what they are.
On disk it is one safetensors file whose header metadata (all strings) holds

=========================  ==========================================================
``format``                 ``"pt"`` (what safetensors/diffusers write)
``unsee_format``           format version, ``"1"`` (see :data:`FORMAT_VERSION`)
``kind``                   ``"lora"``, ``"delta"`` or ``"text_encoder"``
``method``                 the erasure method, e.g. ``"esd-u"``
``concepts``               JSON list of the erased concepts
``fingerprint``            JSON dict component -> architecture fingerprint
``hyperparameters``        JSON dict
``training``               JSON dict (training summary: steps, loss, time, ...)
``lora_adapter_metadata``  LoRA adapters only: diffusers' own LoRA config key (JSON dict
                           ``"<component>.r"``, ``"<component>.lora_alpha"``,
                           ``"<component>.target_modules"``, ...), so that plain
                           ``pipe.load_lora_weights(path)`` honours alpha
=========================  ==========================================================

Tensor keys start with the component they touch (``unet.``, ``text_encoder.``, ``text_encoder_2.``):

- ``delta``: ``unet.<parameter name>`` -> (trained - original), the parameter's exact shape;
  applying with scale ``s`` gives ``W = W_orig + s * delta``.
- ``lora``: ``unet.<module path>.lora_A.weight`` ([r, in] or [r, in, kh, kw]) and
  ``.lora_B.weight`` ([out, r] or [out, r, 1, 1]); the delta is ``(alpha / r) * B @ A``. These are
  diffusers/peft key names, so the file also loads with ``pipe.load_lora_weights``.
- ``text_encoder``: a delta or a LoRA (told apart by the key names) that touches only the text
  encoders (AdvUnlearn's product).

``docs/adapter-format.md`` is the full description, with the rule for when the format version changes.

This module is the format only: it knows no pipeline class and no erasure method. Applying adapters to a
pipeline (``pipe.load_erasure``) is :mod:`unsee.pipelines.erasure`; building them from a trainer's weights is
:mod:`unsee.erasure.adapter_builders`. :func:`match_adapter` checks an adapter against any object whose
``unet``/``text_encoder``/``text_encoder_2`` attributes are modules (a pipeline) without changing anything.

Reading a file checks its header first (names, shapes, dtypes, metadata; against a pipeline too when one is
given) and reads tensor data only when the header is sound. The safetensors layout itself (header length, JSON,
dtypes, offsets, a file that is too short) is checked by ``safetensors.safe_open``; this module adds what
safe_open does not check (unsee's metadata, key names, JSON depth, hostile values) and turns every failure into
an :class:`AdapterError` whose message never quotes the file's bytes (only shortened key names and header values
of an actual safetensors file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import safetensors
import safetensors.torch
import torch
from torch import nn

from . import lora_formats
from .files import atomic_write

__all__ = [
    "AdapterError",
    "Adapter",
    "AdapterFile",
    "AdapterTarget",
    "FORMAT_VERSION",
    "KINDS",
    "COMPONENTS",
    "fingerprint",
    "component_fingerprint",
    "match_adapter",
    "names_concept",
    "CONCEPT_SLOT",
    "fill_concept",
    "template_without_concept",
    "open_adapter_file",
    "save_adapter",
    "load_adapter",
    "validate_adapter",
]

# The version written into every file. It changes only when a reader of the previous version would misread a
# file of the new one (docs/adapter-format.md, "Versions"); new optional metadata keys do not change it.
FORMAT_VERSION = "1"
SUPPORTED_FORMATS = ("1",)
KINDS = ("lora", "delta", "text_encoder")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# diffusers stores the LoRA config under this header key (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
LORA_METADATA_KEY = "lora_adapter_metadata"
REQUIRED_METADATA = ("unsee_format", "kind", "method", "concepts", "fingerprint", "hyperparameters", "training")

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"

# a fingerprint that is not known (a kohya file made elsewhere): the adapter is matched by module names and shapes
UNKNOWN = "unknown"
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# JSON in the header deeper than this is refused (unsee writes flat dicts and lists; deep nesting only
# serves to exhaust the parser's or a later consumer's recursion limit)
_MAX_JSON_DEPTH = 64
_SHOWN_CHARS = 60


class AdapterError(ValueError):
    """An adapter file or object that cannot be read or applied; the message says why and what to do."""


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def names_concept(prompt: str, concept: str) -> bool:
    """Whether ``prompt`` names ``concept``: its words contain the concept's words in a row (case-insensitive). The
    one rule for it: the trainers give each in-context prompt to the concept it names, and MACE's fusion refits a
    prompt naming several adapters' concepts to their changes summed."""
    words, named = _words(prompt), _words(concept)
    return bool(named) and any(words[i:i + len(named)] == named for i in range(len(words) - len(named) + 1))


CONCEPT_SLOT = "{concept}"  # where a prompt template puts the concept


def fill_concept(prompts: Iterable[str], concept: str) -> list[str]:
    """Prompt templates with ``{concept}`` replaced by the concept ("a photo of {concept}" -> "a photo of Van Gogh");
    prompts without the placeholder are kept as they are."""
    return [p.replace(CONCEPT_SLOT, concept) for p in prompts]


def template_without_concept(templates: Iterable[str], label: str = "template") -> Optional[str]:
    """The one-line error for the first of ``templates`` that has no ``{concept}`` (``label`` names the setting in
    it), or None when every one has it: UCE's ``templates`` and ``unsee fuse --template`` check with it."""
    bare = next((t for t in templates if CONCEPT_SLOT not in t), None)
    if bare is None:
        return None
    return f"{label} {bare!r} has no {CONCEPT_SLOT}; write where the concept goes, e.g. 'a photo of {CONCEPT_SLOT}'"


def short_repr(value: Any) -> str:
    """``repr`` of a value read from a file or given by a caller, cut short: error messages stay one short line."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


_shown = short_repr


def _as_float(value: Any) -> Optional[float]:
    """``float(value)``, or None when it cannot be represented (an integer beyond float's range, ...)."""
    try:
        return float(value)
    except (OverflowError, TypeError, ValueError, RuntimeError):
        return None


def _is_kohya_key(key: str) -> bool:
    return lora_formats.is_kohya_key(key)


_KOHYA_HINT = (
    "it is a kohya/A1111-format LoRA (keys 'lora_unet_...'/'lora_te_...'); an Adapter holds diffusers/peft keys: "
    "convert the tensors with unsee.lora_formats.from_kohya, or load the file itself with pipe.load_erasure(path)."
)


def _convert_hint(path: Any) -> str:
    return f"convert it with: unsee export {path} --format diffusers --out NEW.safetensors"


# ----------------------------------------------------------------------------------------------
# The adapter object
# ----------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """An erasure adapter: tensors plus what they mean.

    Attributes:
        kind: ``"lora"``, ``"delta"`` or ``"text_encoder"`` (a delta or LoRA on the text encoders only).
        method: the erasure method that made it, e.g. ``"esd-u"``.
        concepts: the erased concept(s).
        tensors: component-prefixed keys (``unet.…``, ``text_encoder.…``) -> tensors (see the module doc).
        fingerprint: component -> architecture fingerprint (:func:`fingerprint`) for every component the
            tensors touch.
        hyperparameters: the trainer's configuration (JSON-serialisable).
        training: training summary (JSON-serialisable).
        rank: LoRA rank (LoRA adapters only; inferred from the tensors when ``None``).
        alpha: LoRA alpha (LoRA adapters only; defaults to the rank, i.e. scaling 1).
    """

    kind: str
    method: str
    concepts: list[str]
    tensors: dict[str, torch.Tensor]
    fingerprint: dict[str, str] = field(default_factory=dict)
    hyperparameters: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    rank: Optional[int] = None
    alpha: Optional[float] = None

    @property
    def components(self) -> list[str]:
        """The components the tensors touch, in pipeline order (subset of unet, text_encoder, text_encoder_2)."""
        touched = {key.split(".", 1)[0] for key in self.tensors}
        return [name for name in COMPONENTS if name in touched]

    @property
    def is_lora(self) -> bool:
        """True when the tensors are LoRA factors (``lora_A``/``lora_B``) rather than full-shape deltas."""
        if self.kind == "lora":
            return True
        if self.kind == "delta":
            return False
        return bool(self.tensors) and all(_is_lora_key(key) for key in self.tensors)

    @property
    def scaling(self) -> float:
        """LoRA scaling ``alpha / rank`` (1.0 for deltas)."""
        if not self.is_lora:
            return 1.0
        rank = self.rank if self.rank is not None else _infer_rank(self.tensors)
        alpha = self.alpha if self.alpha is not None else rank
        return float(alpha) / float(rank)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the adapter atomically to ``path`` (see :func:`save_adapter`)."""
        return save_adapter(self, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Adapter":
        """Read and validate an adapter file (see :func:`load_adapter`)."""
        return load_adapter(path)

    def push_to_hub(self, repo_id: str, **options: Any) -> Any:
        """Upload the adapter and a model card (``README.md``) to the Hub model repository ``repo_id``, created
        when missing; returns the commit info. Options (``file_name``, ``card``, ``base_model``, ``license``,
        ``figures``, ``extra_files``, ``private``, ``token``, ...): see :func:`unsee.hub.push_adapter`."""
        from .hub import HubError, push_adapter

        try:
            return push_adapter(self, repo_id, **options)
        except HubError as error:
            raise AdapterError(str(error)) from None

    def __repr__(self) -> str:  # tensors would flood the console
        extra = f", rank={self.rank}, alpha={self.alpha}" if self.is_lora else ""
        return (
            f"Adapter(kind={self.kind!r}, method={self.method!r}, concepts={self.concepts!r}, "
            f"components={self.components}, tensors={len(self.tensors)}{extra})"
        )


def _is_lora_key(key: str) -> bool:
    return key.endswith(LORA_A) or key.endswith(LORA_B)


def _infer_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(LORA_A) and t.ndim >= 1}
    if len(ranks) != 1:
        raise AdapterError(
            f"cannot tell the LoRA rank: lora_A tensors have ranks {sorted(ranks) or 'none'}; "
            "unsee LoRA adapters use one rank for every module."
        )
    return int(ranks.pop())


def validate_adapter(adapter: Adapter, header_only: bool = False) -> None:
    """Check an adapter's structure and values (no pipeline needed). Raises AdapterError.

    ``header_only``: the tensors are meta tensors standing for a file's header entries (names, shapes and
    dtypes, no data); the value checks are left to the reading. Otherwise meta tensors are refused.
    """
    if not isinstance(adapter, Adapter):
        raise AdapterError(f"expected an unsee Adapter, got {type(adapter).__name__}.")
    if adapter.kind not in KINDS:
        raise AdapterError(f"unknown adapter kind {adapter.kind!r}; expected one of {', '.join(KINDS)}.")
    if not isinstance(adapter.method, str) or not adapter.method:
        raise AdapterError("the adapter has no method name; set Adapter.method (e.g. 'esd-u').")
    if not isinstance(adapter.concepts, (list, tuple)) or not all(isinstance(c, str) for c in adapter.concepts):
        raise AdapterError(f"Adapter.concepts must be a list of strings, got {_shown(adapter.concepts)}.")
    for name, value in (("hyperparameters", adapter.hyperparameters), ("training", adapter.training)):
        if not isinstance(value, dict):
            raise AdapterError(f"Adapter.{name} must be a dict, got {type(value).__name__}.")
    if not isinstance(adapter.tensors, dict) or not adapter.tensors:
        raise AdapterError("the adapter holds no tensors; there is nothing to apply.")

    kohya = next((k for k in adapter.tensors if isinstance(k, str) and _is_kohya_key(k)), None)
    if kohya is not None:
        raise AdapterError(f"tensor key {_shown(kohya)} is not an unsee adapter key: {_KOHYA_HINT}")
    for key, tensor in adapter.tensors.items():
        if not isinstance(key, str) or "." not in key:
            raise AdapterError(f"tensor key {_shown(key)} does not start with a component prefix such as 'unet.'.")
        component = key.split(".", 1)[0]
        if component not in COMPONENTS:
            raise AdapterError(
                f"tensor key {_shown(key)} starts with {_shown(component)}; keys must start with one of "
                f"{', '.join(c + '.' for c in COMPONENTS)}."
            )
        if adapter.kind == "text_encoder" and component not in TEXT_ENCODERS:
            raise AdapterError(
                f"a 'text_encoder' adapter may only touch the text encoders, but it has key {_shown(key)}; "
                "save UNet changes as kind 'delta' or 'lora'."
            )
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"tensor {_shown(key)} is a {type(tensor).__name__}, not a torch.Tensor.")
        if not tensor.is_floating_point():
            raise AdapterError(
                f"tensor {_shown(key)} has dtype {tensor.dtype}; adapter tensors must be floating point."
            )
        if tensor.device.type == "meta":
            if not header_only:
                raise AdapterError(
                    f"tensor {_shown(key)} is on the meta device (it has no values); load its data first."
                )
        elif not _all_finite(tensor):
            raise AdapterError(
                f"tensor {_shown(key)} contains NaN or inf values; the adapter is corrupt (training diverged?) "
                "and must not be applied."
            )

    lora_keys = [k for k in adapter.tensors if _is_lora_key(k)]
    if adapter.kind == "delta" and lora_keys:
        raise AdapterError(
            f"a 'delta' adapter has LoRA keys (e.g. {_shown(lora_keys[0])}); save it as kind 'lora' instead."
        )
    if adapter.is_lora:
        _validate_lora_tensors(adapter)
    elif adapter.kind == "text_encoder" and lora_keys:
        other = next(k for k in adapter.tensors if not _is_lora_key(k))
        raise AdapterError(
            f"a 'text_encoder' adapter mixes LoRA keys ({_shown(lora_keys[0])}) with delta keys ({_shown(other)}); "
            "use one representation per adapter."
        )

    if not isinstance(adapter.fingerprint, dict):
        raise AdapterError(f"Adapter.fingerprint must be a dict, got {type(adapter.fingerprint).__name__}.")
    missing = [c for c in adapter.components if not isinstance(adapter.fingerprint.get(c), str)]
    if missing:
        raise AdapterError(
            f"the adapter has no architecture fingerprint for {', '.join(missing)}; build it with "
            "unsee.adapters.fingerprint(pipe) (or pass model=/fingerprint= to the helper that made it)."
        )


def _validate_lora_tensors(adapter: Adapter) -> None:
    bad = [k for k in adapter.tensors if not _is_lora_key(k)]
    if bad:
        raise AdapterError(
            f"LoRA key {_shown(bad[0])} is not a diffusers/peft LoRA name; expected '<component>.<module path>"
            f"{LORA_A}' / '{LORA_B}' (kohya/A1111 files are not unsee adapters)."
        )
    modules = {k[: -len(LORA_A)] for k in adapter.tensors if k.endswith(LORA_A)}
    modules_b = {k[: -len(LORA_B)] for k in adapter.tensors if k.endswith(LORA_B)}
    unpaired = sorted(modules ^ modules_b)
    if unpaired:
        which = "lora_B" if unpaired[0] in modules else "lora_A"
        raise AdapterError(
            f"LoRA module {_shown(unpaired[0])} has no {which} tensor; every module needs both A and B."
        )
    rank = adapter.rank
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise AdapterError(f"LoRA rank must be a positive integer, got {_shown(rank)}.")
    for module in sorted(modules):
        a = adapter.tensors[module + LORA_A]
        b = adapter.tensors[module + LORA_B]
        if a.ndim not in (2, 4) or b.ndim != a.ndim:
            raise AdapterError(
                f"LoRA module {_shown(module)}: lora_A has shape {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected [r, in] and [out, r] (Linear) or [r, in, kh, kw] and [out, r, 1, 1] (Conv2d)."
            )
        if a.ndim == 4 and tuple(b.shape[2:]) != (1, 1):
            raise AdapterError(
                f"LoRA module {_shown(module)}: conv lora_B must be [out, r, 1, 1], got {tuple(b.shape)}."
            )
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"LoRA module {_shown(module)}: rank mismatch, lora_A has {a.shape[0]} rows but lora_B has "
                f"{b.shape[1]} columns."
            )
        if rank is None:
            rank = int(a.shape[0])
        elif a.shape[0] != rank:
            raise AdapterError(
                f"LoRA module {_shown(module)} has rank {a.shape[0]}, but the adapter's rank is {_shown(rank)}; "
                "unsee LoRA adapters use one rank for every module."
            )
    if adapter.alpha is not None:
        _check_alpha(adapter.alpha, rank)


def _check_alpha(alpha: Any, rank: Optional[int]) -> float:
    """LoRA alpha as a float: finite, non-zero, and with a scaling ``alpha / rank`` that float32 can hold."""
    value = None if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) else _as_float(alpha)
    if value is None or not math.isfinite(value) or value == 0:
        raise AdapterError(f"LoRA alpha must be a finite non-zero number, got {_shown(alpha)}.")
    if rank and abs(value / rank) > FLOAT32_MAX:
        raise AdapterError(
            f"LoRA alpha {value:g} with rank {rank} scales the weights by {value / rank:g}, beyond float32's range "
            f"(about {FLOAT32_MAX:.3g}): applying it would overflow every weight it touches. Re-export the adapter "
            "with its real alpha (usually the rank or a small multiple of it)."
        )
    return value


def _all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.numel():
        return True
    tensor = tensor.detach()
    try:
        return bool(torch.isfinite(tensor).all())
    except (RuntimeError, NotImplementedError):  # dtypes without a native isfinite kernel (float8 on some builds)
        return bool(torch.isfinite(tensor.float()).all())


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------


def _canonical_name(name: str) -> Optional[str]:
    """Parameter name as the architecture sees it: peft wrappers and the CLIP ``text_model.`` level removed.

    Returns None for LoRA parameters injected by peft (they are not part of the architecture).
    """
    if ".lora_" in name or name.startswith("lora_") or ".lora_magnitude_vector" in name:
        return None
    name = name.replace(".base_layer.", ".")
    if name.startswith("text_model."):  # transformers < 5 nests CLIPTextModel one level deeper
        name = name[len("text_model."):]
    return name


def component_fingerprint(module: nn.Module) -> str:
    """Architecture fingerprint of one module: sha256 over its sorted (parameter name, shape) list.

    Depends on names and shapes only, never on values or dtype, so a fine-tuned or half-precision
    copy of the same architecture has the same fingerprint. LoRA layers injected by peft are ignored.
    """
    entries = []
    for name, param in module.named_parameters():
        canonical = _canonical_name(name)
        if canonical is not None:
            entries.append((canonical, list(param.shape)))
    entries.sort()
    digest = hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode("utf-8")).hexdigest()
    return digest[:16]


def fingerprint(pipe_or_module: Any, components: Optional[Union[str, Iterable[str]]] = None) -> dict[str, str]:
    """Architecture fingerprints, component name -> short hash (see :func:`component_fingerprint`).

    For a pipeline, ``components`` defaults to those of unet / text_encoder / text_encoder_2 it has;
    naming a component it lacks raises AdapterError. For a bare ``nn.Module`` the result has one entry,
    named by ``components`` (a string or a one-element list) or ``"module"``.
    """
    if isinstance(components, str):
        components = [components]
    if isinstance(pipe_or_module, nn.Module):
        names = list(components) if components is not None else ["module"]
        if len(names) != 1:
            raise AdapterError(f"a single module has one fingerprint; got component names {names}.")
        return {names[0]: component_fingerprint(pipe_or_module)}
    if components is None:
        components = [c for c in COMPONENTS if isinstance(getattr(pipe_or_module, c, None), nn.Module)]
    result = {}
    for name in components:
        module = getattr(pipe_or_module, name, None)
        if not isinstance(module, nn.Module):
            raise AdapterError(f"the pipeline has no component {name!r} to fingerprint.")
        result[name] = component_fingerprint(module)
    return result


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise AdapterError(f"adapter {what} cannot be stored as JSON: {error}.") from error


def _lora_metadata(adapter: Adapter) -> dict[str, Any]:
    """diffusers' LoRA config for the header: ``<component>.<LoraConfig field>`` -> value."""
    rank = adapter.rank if adapter.rank is not None else _infer_rank(adapter.tensors)
    alpha = adapter.alpha if adapter.alpha is not None else rank
    packed: dict[str, Any] = {}
    for component in adapter.components:
        prefix = component + "."
        # peft matches target names as suffixes of module paths; without CLIP's optional "text_model." level
        # they match text encoders of either transformers layout (diffusers strips it from keys as needed).
        targets = sorted({k[len(prefix): -len(LORA_A)].removeprefix("text_model.") for k in adapter.tensors
                          if k.startswith(prefix) and k.endswith(LORA_A)})
        config = {
            "r": int(rank), "lora_alpha": alpha, "target_modules": targets, "rank_pattern": {},
            "alpha_pattern": {}, "use_dora": False, "lora_bias": False, "bias": "none",
        }
        packed.update({f"{component}.{k}": v for k, v in config.items()})
    return packed


def _header_metadata(adapter: Adapter) -> dict[str, str]:
    metadata = {
        "format": "pt",
        "unsee_format": FORMAT_VERSION,
        "kind": adapter.kind,
        "method": adapter.method,
        "concepts": _dumps(list(adapter.concepts), "concepts"),
        "fingerprint": _dumps({c: adapter.fingerprint[c] for c in adapter.components}, "fingerprint"),
        "hyperparameters": _dumps(adapter.hyperparameters, "hyperparameters"),
        "training": _dumps(adapter.training, "training summary"),
    }
    if adapter.is_lora:
        metadata[LORA_METADATA_KEY] = json.dumps(_lora_metadata(adapter), indent=2, sort_keys=True)
    return metadata


def save_adapter(adapter: Adapter, path: Union[str, os.PathLike]) -> Path:
    """Validate ``adapter`` and write it to ``path`` atomically; returns the path.

    The file is written to a temporary file in the same folder, flushed and fsynced, then renamed
    over ``path`` with ``os.replace``: a crash or an error never leaves a partial file at ``path``,
    and the temporary file is removed on error. Tensors are stored contiguous, on the CPU.
    """
    validate_adapter(adapter)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"adapter files end in .safetensors; got {path.name!r}.")
    if path.is_dir():
        raise AdapterError(f"{path} is a folder; give the adapter file's path.")
    metadata = _header_metadata(adapter)
    # clone() gives every tensor its own storage (safetensors refuses shared memory).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sorted(adapter.tensors.items())}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


# safetensors dtype names -> torch dtypes (the floating ones are the ones an adapter may hold)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

# the first bytes of what torch.save writes: a zip archive (torch >= 1.6) or a bare pickle
_PICKLE_STARTS = (b"PK\x03\x04", b"\x80")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _looks_pickled(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4).startswith(_PICKLE_STARTS)
    except OSError:
        return False


def _safe_open(path: Path) -> Any:
    """``safetensors.safe_open``: it reads and checks the header (length, JSON, dtypes, shapes, offsets against the
    file's size) and no tensor data. Its errors become AdapterErrors that say which of those failed without quoting
    safetensors' text, which may quote the file (a path that leads to another kind of file, a symlink to a system
    file say, must not reveal its contents)."""
    try:
        if not path.exists():
            raise AdapterError(f"adapter file {path} does not exist.")
        if not path.is_file():
            raise AdapterError(f"{path} is not a file; give the path of an adapter .safetensors file.")
        return safetensors.safe_open(str(path), framework="pt", device="cpu")
    except AdapterError:
        raise
    except OSError as error:
        raise AdapterError(f"cannot read adapter file {path}: {error.strerror or type(error).__name__}.") from None
    except Exception as error:  # SafetensorError
        text = str(error)
    size = _size(path)
    if "too small" in text:
        raise AdapterError(f"{path} is not a safetensors file: it is only {size} bytes long.")
    if "too large" in text or "header length" in text:
        if _looks_pickled(path):
            raise AdapterError(
                f"{path} is not a safetensors file: it looks like a pickled torch checkpoint (torch.save). "
                "unsee never unpickles files; re-export the adapter with unsee (save_adapter)."
            )
        raise AdapterError(
            f"{path} is not a safetensors file: it does not start with a safetensors header (it is another kind "
            "of file, or truncated). Give the path of an adapter .safetensors file."
        )
    if "JSON" in text:
        raise AdapterError(
            f"{path} is not a valid safetensors file: its header is not JSON in the safetensors layout "
            "(malformed, nested too deeply or with out-of-range numbers). Re-export or re-download the adapter."
        )
    raise AdapterError(
        f"{path} is truncated or corrupt: its header's tensor table (shapes, dtypes, offsets) does not match "
        f"the file's {size} bytes. Re-export or re-download the adapter."
    )


def _json_depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _parse_json(metadata: Mapping[str, str], key: str, expected: type, path: Path) -> Any:
    """Parse one JSON header entry; every failure (RecursionError, over-long integers, ...) is an AdapterError."""
    problem = None
    try:
        value = json.loads(metadata[key])
    except RecursionError:
        problem = "nested too deeply"
    except json.JSONDecodeError as error:
        problem = f"{error.msg} at character {error.pos}"
    except (TypeError, ValueError, OverflowError):  # e.g. an integer with more digits than Python converts
        problem = "a number is too long"
    if problem is None and _json_depth_exceeds(value, _MAX_JSON_DEPTH):
        problem = f"nested more than {_MAX_JSON_DEPTH} levels deep"
    if problem is not None:
        raise AdapterError(f"{path}: header entry {key!r} is not valid JSON ({problem}); the file is corrupt.")
    if not isinstance(value, expected):
        raise AdapterError(
            f"{path}: header entry {key!r} must be a JSON {expected.__name__}, got {type(value).__name__}."
        )
    return value


def _rank_alpha_from_metadata(metadata: Mapping[str, str], adapter_components: list[str], path: Path) -> tuple:
    if LORA_METADATA_KEY not in metadata:
        raise AdapterError(
            f"{path}: LoRA adapter without the '{LORA_METADATA_KEY}' header entry (rank/alpha); the file is incomplete."
        )
    lora_meta = _parse_json(metadata, LORA_METADATA_KEY, dict, path)
    ranks, alphas = set(), set()
    for component in adapter_components:
        r, a = lora_meta.get(f"{component}.r"), lora_meta.get(f"{component}.lora_alpha")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterError(f"{path}: '{LORA_METADATA_KEY}' has no valid '{component}.r' (got {_shown(r)}).")
        alpha = None if isinstance(a, bool) or not isinstance(a, (int, float)) else _as_float(a)
        if alpha is None:
            raise AdapterError(
                f"{path}: '{LORA_METADATA_KEY}' has no valid '{component}.lora_alpha' (got {_shown(a)})."
            )
        if lora_meta.get(f"{component}.rank_pattern") or lora_meta.get(f"{component}.alpha_pattern"):
            raise AdapterError(f"{path}: per-module LoRA ranks/alphas (rank_pattern/alpha_pattern) are not supported.")
        ranks.add(r)
        alphas.add(alpha)
    if len(ranks) != 1 or len(alphas) != 1:
        raise AdapterError(
            f"{path}: components disagree on LoRA rank/alpha ({_shown(sorted(ranks))}, {_shown(sorted(alphas))})."
        )
    return ranks.pop(), alphas.pop()


def _header_tensors(path: Path, handle: Any, keys: list[str]) -> dict[str, torch.Tensor]:
    """Meta tensors standing for the file's tensors (names, shapes, dtypes); non-float dtypes refused."""
    tensors = {}
    for key in keys:
        entry = handle.get_slice(key)
        dtype = _DTYPES.get(entry.get_dtype())
        # kohya alphas are scalars, integer in files diffusers' convert_state_dict_to_kohya wrote
        alpha = key.endswith(".alpha") and dtype is not None and dtype != torch.bool
        if dtype is None or not (dtype.is_floating_point or alpha):
            raise AdapterError(
                f"{path}: tensor {_shown(key)} has dtype {entry.get_dtype() if dtype is None else dtype}; adapter "
                "tensors must be floating point (F32, F16, BF16 or F64)."
            )
        tensors[key] = torch.empty(tuple(entry.get_shape()), dtype=dtype, device="meta")
    return tensors


def _optional_json(metadata: Mapping[str, str], key: str, expected: type, default: Any, path: Path) -> Any:
    if key not in metadata:
        return default
    try:
        return _parse_json(metadata, key, expected, path)
    except AdapterError:
        return default


def _kohya_adapter(path: Path, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor],
                   known: Optional[Mapping[str, list[str]]]) -> Adapter:
    """A kohya LoRA as an unsee ``lora`` adapter: keys converted (:func:`unsee.lora_formats.from_kohya`); method,
    concepts and fingerprints from the header where unsee wrote them (``unsee export``), else ``"unknown"`` (matched
    against a pipeline by module names and shapes)."""
    try:
        converted, rank, alpha = lora_formats.from_kohya(tensors, known)
    except lora_formats.LoraFormatError as error:
        raise AdapterError(f"{path}: {error}") from None
    method = metadata.get("method")
    fingerprints = _optional_json(metadata, "fingerprint", dict, {}, path)
    adapter = Adapter(
        kind="lora", method=method if isinstance(method, str) and method else UNKNOWN,
        concepts=[c for c in _optional_json(metadata, "concepts", list, [], path) if isinstance(c, str)],
        tensors=converted, hyperparameters=_optional_json(metadata, "hyperparameters", dict, {}, path),
        training=_optional_json(metadata, "training", dict, {}, path), rank=rank, alpha=alpha,
    )
    adapter.fingerprint = {c: fingerprints[c] if isinstance(fingerprints.get(c), str) else UNKNOWN
                           for c in adapter.components}
    try:
        validate_adapter(adapter, header_only=any(t.device.type == "meta" for t in converted.values()))
        _check_alpha(alpha, rank)
    except AdapterError as error:
        raise AdapterError(f"{path}: {error}") from None
    return adapter


def _header_adapter(path: Path, handle: Any, known: Optional[Mapping[str, list[str]]] = None) -> Adapter:
    """The adapter a file's header describes, its tensors meta tensors (names, shapes, dtypes; no data), validated.

    A kohya LoRA is converted (``known``: component -> module paths of the pipeline it is for, to resolve its module
    names exactly); a file in another format unsee cannot read is refused naming the format and the conversion."""
    metadata = handle.metadata() or {}
    keys = list(handle.keys())
    foreign = lora_formats.foreign_format(keys, metadata)
    if foreign is not None and foreign[0] == "kohya":
        return _kohya_adapter(path, metadata, _header_tensors(path, handle, keys), known)
    if foreign is not None and foreign[0] in ("lycoris", "kohya-sgm", "peft", "checkpoint"):
        raise AdapterError(f"{path} is not an unsee adapter: {foreign[1]}.")
    if "unsee_format" not in metadata:
        hint = (f" It looks like a plain diffusers LoRA: load it with pipe.load_lora_weights(path), or "
                f"{_convert_hint(path)}."
                if LORA_METADATA_KEY in metadata or any("lora" in k for k in keys) else "")
        raise AdapterError(f"{path} is a safetensors file without unsee adapter metadata (no 'unsee_format').{hint}")
    if metadata["unsee_format"] not in SUPPORTED_FORMATS:
        raise AdapterError(
            f"{path} uses unsee adapter format {_shown(metadata['unsee_format'])}; this unsee reads format(s) "
            f"{', '.join(SUPPORTED_FORMATS)}. Upgrade unsee."
        )
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise AdapterError(f"{path}: the header lacks {', '.join(missing)}; the adapter file is incomplete.")
    kind = metadata["kind"]
    if kind not in KINDS:
        raise AdapterError(f"{path}: unknown adapter kind {_shown(kind)}; expected one of {', '.join(KINDS)}.")
    concepts = _parse_json(metadata, "concepts", list, path)
    fingerprints = _parse_json(metadata, "fingerprint", dict, path)
    if not all(isinstance(v, str) for v in fingerprints.values()):
        raise AdapterError(f"{path}: header entry 'fingerprint' must map component names to strings.")
    hyperparameters = _parse_json(metadata, "hyperparameters", dict, path)
    training = _parse_json(metadata, "training", dict, path)

    tensors = {}
    for key in keys:
        entry = handle.get_slice(key)
        dtype = _DTYPES.get(entry.get_dtype())
        if dtype is None:
            raise AdapterError(
                f"{path}: tensor {_shown(key)} has dtype {entry.get_dtype()}; adapter tensors must be floating point "
                "(F32, F16, BF16 or F64)."
            )
        tensors[key] = torch.empty(tuple(entry.get_shape()), dtype=dtype, device="meta")
    adapter = Adapter(
        kind=kind, method=metadata["method"], concepts=concepts, tensors=tensors, fingerprint=fingerprints,
        hyperparameters=hyperparameters, training=training,
    )
    try:
        validate_adapter(adapter, header_only=True)
    except AdapterError as error:
        raise AdapterError(f"{path}: {error}") from None
    if adapter.is_lora:
        rank, alpha = _rank_alpha_from_metadata(metadata, adapter.components, path)
        tensor_rank = _infer_rank(adapter.tensors)
        if rank != tensor_rank:
            raise AdapterError(
                f"{path}: the header's LoRA rank is {_shown(rank)} but the lora_A/lora_B tensors have rank "
                f"{tensor_rank}; the file is inconsistent."
            )
        try:
            alpha = _check_alpha(alpha, rank)
        except AdapterError as error:
            raise AdapterError(f"{path}: {error}") from None
        adapter.rank, adapter.alpha = rank, alpha
    return adapter


@dataclass
class AdapterFile:
    """An adapter file with its header read and validated, its tensor data not read yet (see
    :func:`open_adapter_file`)."""

    path: Path
    handle: Any  # safetensors.safe_open
    header: Adapter  # tensors are meta tensors: names, shapes and dtypes, no data
    kohya: bool = False  # a kohya file: its tensors are converted as they are read
    known: Optional[Mapping[str, list[str]]] = None

    def read(self) -> Adapter:
        """Read the tensors (one at a time, each checked finite as it arrives) into a full :class:`Adapter`."""
        if self.kohya:
            raw = self._read_raw({k: None for k in self.handle.keys()})
            adapter = _kohya_adapter(self.path, self.handle.metadata() or {}, raw, self.known)
            return dataclasses.replace(adapter, fingerprint=dict(self.header.fingerprint))
        return dataclasses.replace(self.header, tensors=self._read_raw(self.header.tensors))

    def _read_raw(self, specs: Mapping[str, Optional[torch.Tensor]]) -> dict[str, torch.Tensor]:
        tensors = {}
        for key, spec in specs.items():
            try:
                tensor = self.handle.get_tensor(key)
            except Exception:  # safetensors' own message may quote the file, so it is not shown
                raise AdapterError(f"{self.path}: tensor {_shown(key)} cannot be read; the file is corrupt.") from None
            if spec is not None and (tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape)):
                raise AdapterError(f"{self.path}: tensor {_shown(key)} does not match its header; the file is corrupt.")
            if not _all_finite(tensor):
                raise AdapterError(
                    f"{self.path}: tensor {_shown(key)} contains NaN or inf values; the adapter is corrupt (training "
                    "diverged?) and must not be applied."
                )
            tensors[key] = tensor
        return tensors


def module_paths(pipe: Any) -> dict[str, list[str]]:
    """component -> paths of its Linear/Conv2d modules (without peft's ``base_layer`` level), for the components of
    ``pipe`` an adapter can touch; used to read kohya module names exactly."""
    paths = {}
    for component in COMPONENTS:
        module = getattr(pipe, component, None)
        if isinstance(module, nn.Module):
            paths[component] = sorted({_unwrapped(name) for name, m in module.named_modules()
                                       if isinstance(m, (nn.Linear, nn.Conv2d)) and ".lora_" not in f".{name}"})
    return paths


@contextlib.contextmanager
def open_adapter_file(path: Union[str, os.PathLike], pipe: Any = None) -> Iterator[AdapterFile]:
    """Open an adapter file and validate its header, reading no tensor data; raises :class:`AdapterError`.

    ``with open_adapter_file(path) as opened:`` gives ``opened.header`` (the adapter with meta tensors) to check
    further, e.g. with :func:`match_adapter`, before ``opened.read()`` reads the tensors. A kohya LoRA file is read
    as a ``lora`` adapter (its module names resolved against ``pipe``'s modules when given).
    """
    path = Path(path)
    handle = _safe_open(path)
    with handle:
        known = module_paths(pipe) if pipe is not None else None
        header = _header_adapter(path, handle, known)
        kohya = any(_is_kohya_key(k) for k in handle.keys())
        yield AdapterFile(path=path, handle=handle, header=header, kohya=kohya, known=known)


def load_adapter(path: Union[str, os.PathLike], *, pipe: Any = None) -> Adapter:
    """Read an adapter file and validate it; every problem raises :class:`AdapterError`.

    The header is checked before any tensor data is read: the file exists and is a complete safetensors
    file (not a renamed pickle, not truncated); the header carries unsee's metadata in a supported
    ``unsee_format``, with valid JSON where JSON is expected; the kind is known; key names follow the kind's
    convention; every tensor is floating point; LoRA A/B pairs are complete with one rank matching the
    header and an alpha whose scaling float32 can hold. With ``pipe``, the header is also checked against
    that pipeline (:func:`match_adapter`: components, fingerprints, parameter names and shapes) before reading,
    as ``pipe.load_erasure(path)`` does. Then the tensors are read on the CPU, each checked finite.
    Error messages never quote the file's contents beyond (shortened) key names and header values.
    """
    with open_adapter_file(path, pipe=pipe) as opened:
        if pipe is not None:
            match_adapter(pipe, opened.header)
        return opened.read()


# ----------------------------------------------------------------------------------------------
# Matching an adapter against a pipeline's modules
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterTarget:
    """One parameter an adapter changes, found in a pipeline.

    ``parameter`` is its name in ``component`` as the module is now (``conv_in.base_layer.weight`` when peft
    wraps ``conv_in``); ``name`` is the same without peft's ``.base_layer`` level, so it stays the same whether or
    not a LoRA wraps the module. ``keys`` are the adapter keys that change it: the delta key, or the LoRA's
    ``lora_A`` and ``lora_B`` keys (then ``module`` is the LoRA's module path, without ``.base_layer``).
    """

    component: str
    parameter: str
    name: str
    keys: tuple[str, ...]
    module: Optional[str] = None


def _name_candidates(name: str) -> list[str]:
    """Spellings of a parameter/module path to try: as given, without/with CLIP's ``text_model.`` level."""
    candidates = [name]
    if name.startswith("text_model."):
        candidates.append(name[len("text_model."):])
    else:
        candidates.append("text_model." + name)
    return candidates


def _find_parameter(params: Mapping[str, nn.Parameter], name: str) -> Optional[str]:
    for candidate in _name_candidates(name):
        if candidate in params:
            return candidate
        head, _, leaf = candidate.rpartition(".")
        wrapped = f"{head}.base_layer.{leaf}" if head else f"base_layer.{leaf}"  # module wrapped by peft
        if wrapped in params:
            return wrapped
    return None


def _find_module(modules: Mapping[str, nn.Module], path: str) -> Optional[tuple[str, nn.Module]]:
    for candidate in _name_candidates(path):
        module = modules.get(candidate)
        if module is not None:
            base = getattr(module, "base_layer", None)  # a peft LoRA wrapper: its base layer holds the weight
            if isinstance(base, nn.Module):
                return candidate + ".base_layer", base
            return candidate, module
    return None


def _unwrapped(name: str) -> str:
    """A parameter or module path without peft's ``base_layer`` level."""
    return name.replace(".base_layer.", ".").removesuffix(".base_layer").removeprefix("base_layer.")


def match_adapter(pipe: Any, adapter: Adapter) -> list[AdapterTarget]:
    """Check that ``adapter`` fits ``pipe`` and list the parameters it changes; changes nothing.

    ``pipe`` is anything whose ``unet`` / ``text_encoder`` / ``text_encoder_2`` attributes are the modules (a
    diffusers pipeline). Checked: every component the adapter touches exists and has the adapter's architecture
    fingerprint; every delta key names a floating-point parameter of the same shape; every LoRA module is an
    ``nn.Linear`` or ``nn.Conv2d`` whose weight fits the A/B shapes; no parameter is changed twice; no parameter
    is on the meta device. Needs only the tensors' shapes, so a file's header (meta tensors) is checked before its
    data is read. Raises :class:`AdapterError`.
    """
    targets: list[AdapterTarget] = []
    seen: dict[tuple[str, str], str] = {}
    for component in adapter.components:
        module = getattr(pipe, component, None)
        if not isinstance(module, nn.Module):
            raise AdapterError(
                f"the adapter changes {component!r}, but this {type(pipe).__name__} has no {component}; "
                "it was made for another kind of pipeline."
            )
        expected, actual = adapter.fingerprint.get(component), component_fingerprint(module)
        if expected != actual and expected != UNKNOWN:  # unknown (a kohya file): module names and shapes decide
            raise AdapterError(
                f"adapter was trained for another architecture: {component} fingerprint {expected} does not match "
                f"this pipeline's {actual}. Use an adapter trained on this model family "
                f"({type(module).__name__} with the same layer sizes)."
            )

    params_by_component = {c: dict(getattr(pipe, c).named_parameters()) for c in adapter.components}

    def add(component: str, name: str, key: str, keys: tuple[str, ...], shape: Optional[torch.Size] = None,
            module: Optional[str] = None) -> None:
        params = params_by_component[component]
        resolved = _find_parameter(params, name)
        if resolved is None:
            raise AdapterError(
                f"adapter key {_shown(key)}: this pipeline's {component} has no parameter {_shown(name)}; the adapter "
                "does not belong to this model."
            )
        param = params[resolved]
        if shape is not None and tuple(shape) != tuple(param.shape):
            raise AdapterError(
                f"adapter key {_shown(key)} has shape {tuple(shape)}, but {component}.{resolved} has shape "
                f"{tuple(param.shape)}."
            )
        if not param.is_floating_point():
            raise AdapterError(f"{component}.{resolved} is not a floating-point parameter; it cannot take a delta.")
        if param.device.type == "meta":
            raise AdapterError(
                f"{component}.{resolved} is on the meta device (offloaded); load the adapter before offloading."
            )
        slot = (component, _unwrapped(resolved))
        if slot in seen:
            raise AdapterError(
                f"adapter keys {_shown(key)} and {_shown(seen[slot])} both change {component}.{resolved}."
            )
        seen[slot] = key
        targets.append(AdapterTarget(component=component, parameter=resolved, name=slot[1], keys=keys, module=module))

    if adapter.is_lora:
        modules_by_component = {c: dict(getattr(pipe, c).named_modules()) for c in adapter.components}
        for key in sorted(adapter.tensors):
            if not key.endswith(LORA_A):
                continue
            component, path = key.split(".", 1)
            path = path[: -len(LORA_A)]
            found = _find_module(modules_by_component[component], path)
            if found is None:
                raise AdapterError(
                    f"LoRA module {_shown(component + '.' + path)} does not exist in this pipeline's {component}."
                )
            module_name, target = found
            key_b = key[: -len(LORA_A)] + LORA_B
            a, b = adapter.tensors[key], adapter.tensors[key_b]
            if isinstance(target, nn.Linear):
                want_a, want_b = (a.shape[0], target.in_features), (target.out_features, a.shape[0])
            elif isinstance(target, nn.Conv2d):
                w = target.weight
                want_a, want_b = (a.shape[0], *w.shape[1:]), (w.shape[0], a.shape[0], 1, 1)
            else:
                raise AdapterError(
                    f"LoRA module {_shown(component + '.' + path)} is a {type(target).__name__}; unsee LoRA adapters "
                    "target nn.Linear and nn.Conv2d modules only."
                )
            if tuple(a.shape) != tuple(want_a) or tuple(b.shape) != tuple(want_b):
                raise AdapterError(
                    f"LoRA module {_shown(component + '.' + path)}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                    f"do not fit a {type(target).__name__} with weight {tuple(target.weight.shape)} (expected "
                    f"{tuple(want_a)} / {tuple(want_b)})."
                )
            add(component, module_name + ".weight", key, (key, key_b), module=_unwrapped(module_name))
    else:
        for key in sorted(adapter.tensors):
            component, name = key.split(".", 1)
            add(component, name, key, (key,), shape=adapter.tensors[key].shape)
    return targets
