"""Erasure adapter files (``.safetensors``) and applying them to a pipeline.

An erasure trainer produces an :class:`Adapter`: a small set of tensors plus a description of
what they are. On disk it is one safetensors file whose header metadata (all strings) holds

=========================  ==========================================================
``format``                 ``"pt"`` (what safetensors/diffusers write)
``unsee_format``           format version, ``"1"``
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

Tensor keys start with the component they touch (``unet.``, ``text_encoder.``,
``text_encoder_2.``):

- ``delta``: ``unet.<parameter name>`` -> (trained - original), the parameter's exact shape;
  applying with scale ``s`` gives ``W = W_orig + s * delta``.
- ``lora``: ``unet.<module path>.lora_A.weight`` ([r, in] or [r, in, kh, kw]) and
  ``.lora_B.weight`` ([out, r] or [out, r, 1, 1]); the delta is ``(alpha / r) * B @ A``. These are
  diffusers/peft key names, so the file also loads with ``pipe.load_lora_weights``.
- ``text_encoder``: a delta or a LoRA (told apart by the key names) that touches only the text
  encoders (AdvUnlearn's product).

Reading a file checks its header first (names, shapes, dtypes, metadata; against the pipeline too in
``load_erasure``) and reads tensor data only when the header is sound. Error messages never quote a file's
bytes (only shortened key names and header values of an actual safetensors file).

Pipelines that mix in :class:`ErasureAdapterMixin` get ``load_erasure``, ``set_erasure_scale``,
``unload_erasure`` and ``active_erasures``. Several adapters can be active at once; every touched
parameter is recomputed from an exact copy of its original as ``W_orig + sum_i scale_i * delta_i``,
and unloading copies the originals back, so the weights return bit for bit.
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
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import safetensors
import safetensors.torch
import torch
from torch import nn

from .files import atomic_write

__all__ = [
    "AdapterError",
    "Adapter",
    "FORMAT_VERSION",
    "KINDS",
    "COMPONENTS",
    "fingerprint",
    "component_fingerprint",
    "save_adapter",
    "load_adapter",
    "delta_adapter_from_weights",
    "lora_adapter_from_peft",
    "ErasureAdapterMixin",
]

FORMAT_VERSION = "1"
SUPPORTED_FORMATS = ("1",)
KINDS = ("lora", "delta", "text_encoder")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# diffusers stores the LoRA config under this header key (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
LORA_METADATA_KEY = "lora_adapter_metadata"
REQUIRED_METADATA = ("unsee_format", "kind", "method", "concepts", "fingerprint", "hyperparameters", "training")

_LORA_A = ".lora_A.weight"
_LORA_B = ".lora_B.weight"

# kohya-ss / AUTOMATIC1111 LoRA key prefixes ("lora_unet_down_blocks_0_..." "lora_te1_text_model_...")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# JSON in the header deeper than this is refused (unsee writes flat dicts and lists; deep nesting only
# serves to exhaust the parser's or a later consumer's recursion limit)
_MAX_JSON_DEPTH = 64
_SHOWN_CHARS = 60


class AdapterError(ValueError):
    """An adapter file or object that cannot be read or applied; the message says why and what to do."""


def _shown(value: Any) -> str:
    """``repr`` of a value read from a file or given by a caller, cut short: error messages stay one short line."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _as_float(value: Any) -> Optional[float]:
    """``float(value)``, or None when it cannot be represented (an integer beyond float's range, ...)."""
    try:
        return float(value)
    except (OverflowError, TypeError, ValueError, RuntimeError):
        return None


def _is_kohya_key(key: str) -> bool:
    return key.startswith(_KOHYA_PREFIXES)


_KOHYA_HINT = (
    "it is a kohya/A1111-format LoRA (keys 'lora_unet_...'/'lora_te_...'), which unsee's loader does not read yet; "
    "diffusers reads kohya files: load it with pipe.load_lora_weights(path)."
)


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

    def __repr__(self) -> str:  # tensors would flood the console
        extra = f", rank={self.rank}, alpha={self.alpha}" if self.is_lora else ""
        return (
            f"Adapter(kind={self.kind!r}, method={self.method!r}, concepts={self.concepts!r}, "
            f"components={self.components}, tensors={len(self.tensors)}{extra})"
        )


def _is_lora_key(key: str) -> bool:
    return key.endswith(_LORA_A) or key.endswith(_LORA_B)


def _infer_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(_LORA_A) and t.ndim >= 1}
    if len(ranks) != 1:
        raise AdapterError(
            f"cannot tell the LoRA rank: lora_A tensors have ranks {sorted(ranks) or 'none'}; "
            "unsee LoRA adapters use one rank for every module."
        )
    return int(ranks.pop())


def _validate_adapter(adapter: Adapter, header_only: bool = False) -> None:
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
            f"{_LORA_A}' / '{_LORA_B}' (kohya/A1111 files are not unsee adapters)."
        )
    modules = {k[: -len(_LORA_A)] for k in adapter.tensors if k.endswith(_LORA_A)}
    modules_b = {k[: -len(_LORA_B)] for k in adapter.tensors if k.endswith(_LORA_B)}
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
        a = adapter.tensors[module + _LORA_A]
        b = adapter.tensors[module + _LORA_B]
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
    if rank and abs(value / rank) > _FLOAT32_MAX:
        raise AdapterError(
            f"LoRA alpha {value:g} with rank {rank} scales the weights by {value / rank:g}, beyond float32's range "
            f"(about {_FLOAT32_MAX:.3g}): applying it would overflow every weight it touches. Re-export the adapter "
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
        targets = sorted({k[len(prefix): -len(_LORA_A)].removeprefix("text_model.") for k in adapter.tensors
                          if k.startswith(prefix) and k.endswith(_LORA_A)})
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
    _validate_adapter(adapter)
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


# safetensors refuses headers longer than this (safetensors' MAX_HEADER_SIZE)
_MAX_HEADER_BYTES = 100_000_000

# safetensors dtype names -> torch dtypes (the floating ones are the ones an adapter may hold)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


def _check_file(path: Path) -> int:
    """Checks safetensors does not make, or makes with messages that echo the file's bytes.

    Nothing read from the file appears in a message: a path that leads to another kind of file
    (a symlink to a system file, say) must not reveal its contents.
    """
    try:
        if not path.exists():
            raise AdapterError(f"adapter file {path} does not exist.")
        if not path.is_file():
            raise AdapterError(f"{path} is not a file; give the path of an adapter .safetensors file.")
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as error:
        raise AdapterError(f"cannot read adapter file {path}: {error.strerror or type(error).__name__}.") from None
    if len(head) < 8:
        raise AdapterError(f"{path} is not a safetensors file: it is only {size} bytes long.")
    (header_len,) = struct.unpack("<Q", head)
    if header_len == 0 or header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            raise AdapterError(
                f"{path} is not a safetensors file: it looks like a pickled torch checkpoint (torch.save). "
                "unsee never unpickles files; re-export the adapter with unsee (save_adapter)."
            )
        raise AdapterError(
            f"{path} is not a safetensors file: it does not start with a safetensors header (it is another kind "
            "of file, or truncated). Give the path of an adapter .safetensors file."
        )
    return size


def _open_safetensors(path: Path, size: int) -> Any:
    """``safetensors.safe_open`` (parses and checks the header, reads no tensor data), with our messages."""
    try:
        return safetensors.safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # SafetensorError; its text may quote the header, so it is not shown
        text = str(error)
        if "JSON" in text or "too large" in text or "too small" in text:
            raise AdapterError(
                f"{path} is not a valid safetensors file: its header is not JSON in the safetensors layout "
                "(malformed, nested too deeply or with out-of-range numbers). Re-export or re-download the adapter."
            ) from None
        raise AdapterError(
            f"{path} is truncated or corrupt: its header's tensor table (shapes, dtypes, offsets) does not match "
            f"the file's {size} bytes. Re-export or re-download the adapter."
        ) from None


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


def _header_adapter(path: Path, handle: Any) -> Adapter:
    """The adapter a file's header describes, its tensors meta tensors (names, shapes, dtypes; no data), validated."""
    metadata = handle.metadata() or {}
    keys = list(handle.keys())
    if any(_is_kohya_key(k) for k in keys):
        raise AdapterError(f"{path} is not an unsee adapter: {_KOHYA_HINT}")
    if "unsee_format" not in metadata:
        hint = (" It looks like a plain diffusers LoRA: load it with pipe.load_lora_weights(path)."
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
        _validate_adapter(adapter, header_only=True)
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
class _OpenAdapterFile:
    """An adapter file with its header read and validated, its tensor data not read yet."""

    path: Path
    handle: Any  # safetensors.safe_open
    header: Adapter  # meta tensors

    def read(self) -> Adapter:
        """Read the tensors (one at a time, each checked finite as it arrives) into a full :class:`Adapter`."""
        tensors = {}
        for key, spec in self.header.tensors.items():
            try:
                tensor = self.handle.get_tensor(key)
            except Exception:  # safetensors' own message may quote the file, so it is not shown
                raise AdapterError(f"{self.path}: tensor {_shown(key)} cannot be read; the file is corrupt.") from None
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
                raise AdapterError(f"{self.path}: tensor {_shown(key)} does not match its header; the file is corrupt.")
            if not _all_finite(tensor):
                raise AdapterError(
                    f"{self.path}: tensor {_shown(key)} contains NaN or inf values; the adapter is corrupt (training "
                    "diverged?) and must not be applied."
                )
            tensors[key] = tensor
        return dataclasses.replace(self.header, tensors=tensors)


@contextlib.contextmanager
def _open_adapter_file(path: Union[str, os.PathLike]) -> Iterator[_OpenAdapterFile]:
    """Open an adapter file and validate its header, reading no tensor data; raises AdapterError."""
    path = Path(path)
    handle = _open_safetensors(path, _check_file(path))
    with handle:
        yield _OpenAdapterFile(path=path, handle=handle, header=_header_adapter(path, handle))


def load_adapter(path: Union[str, os.PathLike], *, pipe: Any = None) -> Adapter:
    """Read an adapter file and validate it; every problem raises :class:`AdapterError`.

    The header is checked before any tensor data is read: the file exists and is a complete safetensors
    file (not a renamed pickle, not truncated); the header carries unsee's metadata in a supported
    ``unsee_format``, with valid JSON where JSON is expected; the kind is known; key names follow the kind's
    convention; every tensor is floating point; LoRA A/B pairs are complete with one rank matching the
    header and an alpha whose scaling float32 can hold. With ``pipe``, the header is also checked against
    that pipeline (components, fingerprints, parameter names and shapes) before reading, as
    ``pipe.load_erasure(path)`` does. Then the tensors are read on the CPU, each checked finite.
    Error messages never quote the file's contents beyond (shortened) key names and header values.
    """
    with _open_adapter_file(path) as opened:
        if pipe is not None:
            _plan_erasure(pipe, opened.header)
        return opened.read()


# ----------------------------------------------------------------------------------------------
# Helpers for trainers
# ----------------------------------------------------------------------------------------------


def _resolve_fingerprint(component: str, model: Any, fingerprint_: Any) -> dict[str, str]:
    if fingerprint_ is not None:
        if isinstance(fingerprint_, str):
            return {component: fingerprint_}
        if isinstance(fingerprint_, dict) and isinstance(fingerprint_.get(component), str):
            return {component: fingerprint_[component]}
        raise AdapterError(f"fingerprint= must be a string or a dict with an entry for {component!r}.")
    if model is None:
        raise AdapterError(
            "pass model= (the pipeline or the trained component) or fingerprint= to record the architecture."
        )
    if isinstance(model, nn.Module):
        return {component: component_fingerprint(model)}
    return fingerprint(model, [component])


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
    if component not in COMPONENTS:
        raise AdapterError(f"component must be one of {', '.join(COMPONENTS)}, got {component!r}.")
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
    _validate_adapter(adapter)
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

    if component not in COMPONENTS:
        raise AdapterError(f"component must be one of {', '.join(COMPONENTS)}, got {component!r}.")
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
    _validate_adapter(adapter)
    return adapter


# ----------------------------------------------------------------------------------------------
# Applying adapters to a pipeline
# ----------------------------------------------------------------------------------------------


@dataclass
class _Touched:
    """A parameter some active adapter changes, with an exact copy of its original value."""

    param: nn.Parameter
    original: torch.Tensor


@dataclass
class _Term:
    """One adapter's contribution to one parameter: a full delta, or LoRA factors and their scaling."""

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


@dataclass
class _Active:
    scale: float
    terms: dict[tuple[str, str], _Term]
    concepts: list[str] = field(default_factory=list)
    transport: bool = False  # SPM's Facilitated Transport: scale by the prompt's relation to the concepts


@dataclass
class _ErasureState:
    active: dict[str, _Active] = field(default_factory=dict)
    touched: dict[tuple[str, str], _Touched] = field(default_factory=dict)


def _check_scale(scale: Any) -> float:
    """A finite scale within float32's range (weights are merged in float32 or float64)."""
    if isinstance(scale, bool) or not (
        isinstance(scale, numbers.Real) or (isinstance(scale, torch.Tensor) and scale.numel() == 1)
    ):
        raise AdapterError(f"scale must be a number, got {_shown(scale)}.")
    value = _as_float(scale)
    if value is None:
        raise AdapterError(f"scale {_shown(scale)} is too large to be a float; erasure scales are about 0 to 2.")
    if not math.isfinite(value):
        raise AdapterError(f"scale must be finite, got {value}.")
    if abs(value) > _FLOAT32_MAX:
        raise AdapterError(
            f"scale {value:g} is beyond float32's range (about {_FLOAT32_MAX:.3g}) and would overflow the weights; "
            "erasure scales are about 0 to 2."
        )
    return value


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


def _plan_erasure(pipe: Any, adapter: Adapter) -> dict[tuple[str, str], tuple[nn.Parameter, _Term]]:
    """Validate ``adapter`` against ``pipe`` and map each touched parameter to its term. Changes nothing.

    Needs only the tensors' shapes: a file's header (meta tensors) is checked before its data is read.
    """
    plan: dict[tuple[str, str], tuple[nn.Parameter, _Term]] = {}
    for component in adapter.components:
        module = getattr(pipe, component, None)
        if not isinstance(module, nn.Module):
            raise AdapterError(
                f"the adapter changes {component!r}, but this {type(pipe).__name__} has no {component}; "
                "it was made for another kind of pipeline."
            )
        expected, actual = adapter.fingerprint.get(component), component_fingerprint(module)
        if expected != actual:
            raise AdapterError(
                f"adapter was trained for another architecture: {component} fingerprint {expected} does not match "
                f"this pipeline's {actual}. Use an adapter trained on this model family "
                f"({type(module).__name__} with the same layer sizes)."
            )

    params_by_component = {c: dict(getattr(pipe, c).named_parameters()) for c in adapter.components}
    if adapter.is_lora:
        scaling = adapter.scaling
        modules_by_component = {c: dict(getattr(pipe, c).named_modules()) for c in adapter.components}
        for key in sorted(adapter.tensors):
            if not key.endswith(_LORA_A):
                continue
            component, path = key.split(".", 1)
            path = path[: -len(_LORA_A)]
            found = _find_module(modules_by_component[component], path)
            if found is None:
                raise AdapterError(
                    f"LoRA module {_shown(component + '.' + path)} does not exist in this pipeline's {component}."
                )
            module_name, target = found
            a = adapter.tensors[key]
            b = adapter.tensors[key[: -len(_LORA_A)] + _LORA_B]
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
            _add_to_plan(plan, component, module_name + ".weight", params_by_component[component],
                         _Term(lora_a=a, lora_b=b, scaling=scaling), key)
    else:
        for key in sorted(adapter.tensors):
            component, name = key.split(".", 1)
            delta = adapter.tensors[key]
            _add_to_plan(plan, component, name, params_by_component[component], _Term(delta=delta), key,
                         shape=delta.shape)
    return plan


def _add_to_plan(plan: dict, component: str, name: str, params: Mapping[str, nn.Parameter], term: _Term,
                 key: str, shape: Optional[torch.Size] = None) -> None:
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
    slot = (component, resolved)
    if slot in plan:
        raise AdapterError(f"adapter keys {_shown(key)} and another both change {component}.{resolved}.")
    plan[slot] = (param, term)


class ErasureAdapterMixin:
    """Adds erasure adapters to a diffusers pipeline (SD 1.x/2.x and SDXL).

    ``load_erasure`` validates an adapter against this pipeline before touching any weight, then
    applies it atomically; ``set_erasure_scale`` changes one adapter's strength; ``unload_erasure``
    removes one or all. Every touched parameter is recomputed from an exact copy of its original as
    ``W_orig + sum_i scale_i * delta_i``, so nothing drifts, and after unloading every adapter the
    weights are bit-for-bit what they were. Only the originals of touched parameters are kept.

    The state lives on the pipeline instance. Pipelines made with ``from_pipe`` share modules but not
    this state: unload from the pipeline you loaded into.
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
        """Apply an erasure adapter (a file path or an :class:`Adapter`) with ``scale``; returns its name.

        ``facilitated_transport``: scale the adapter, on every pipeline call, by how much the prompts relate
        to its erased concepts (SPM's Facilitated Transport, :func:`unsee.erasure.spm.transport_strength`).
        None: as the adapter asks (SPM adapters trained with ``facilitated_transport=True``; no others).

        The name defaults to the file's stem (or ``<method>-<concepts>`` for an in-memory adapter) and must
        not be in use. Everything is validated against this pipeline before any weight changes: the
        components exist, their architecture fingerprints match, every key names an existing parameter
        (delta, same shape) or Linear/Conv2d module (LoRA, consistent A/B shapes), and the scale is finite
        and within float32's range. A file's header is checked this way before any of its tensor data is
        read. A sum of adapters that would turn a finite weight into inf/NaN is refused too. Raises
        :class:`AdapterError` and leaves the weights untouched when anything is wrong.
        """
        state = self._erasure_state()
        scale = _check_scale(scale)
        if isinstance(adapter, Adapter):
            _validate_adapter(adapter)
            default_name = re.sub(r"[^\w.+-]+", "_", "-".join([adapter.method, *adapter.concepts])).strip("_")
        elif isinstance(adapter, (str, os.PathLike)):
            default_name = Path(adapter).stem
        else:
            raise AdapterError(f"load_erasure takes a file path or an unsee Adapter, got {type(adapter).__name__}.")
        name = default_name if adapter_name is None else adapter_name
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter_name must be a non-empty string, got {_shown(name)}.")
        if name in state.active:
            raise AdapterError(
                f"an erasure adapter named {_shown(name)} is already loaded; pass another adapter_name or "
                f"unload_erasure({_shown(name)}) first."
            )
        owned = not isinstance(adapter, Adapter)
        if owned:  # a file: its header is checked against this pipeline before any tensor data is read
            with _open_adapter_file(adapter) as opened:
                _plan_erasure(self, opened.header)
                adapter = opened.read()
        # private copies next to the weight they change (later edits to an in-memory Adapter cannot leak in, and
        # recomputing needs no transfers); tensors just read from a file are ours already
        terms = {slot: (param, term.on(param.device, copy=not owned))
                 for slot, (param, term) in _plan_erasure(self, adapter).items()}

        new_keys = []
        try:
            with torch.no_grad():
                for key, (param, _) in terms.items():
                    if key not in state.touched:
                        state.touched[key] = _Touched(param=param, original=param.detach().clone())
                        new_keys.append(key)
                if facilitated_transport is None:
                    facilitated_transport = bool(adapter.hyperparameters.get("facilitated_transport", False))
                state.active[name] = _Active(scale=scale, terms={k: term for k, (_, term) in terms.items()},
                                             concepts=list(adapter.concepts), transport=bool(facilitated_transport))
                self._recompute(terms.keys())
        except BaseException:
            state.active.pop(name, None)
            self._recompute(terms.keys())
            self._forget_unused(terms.keys())
            raise
        return name

    def set_erasure_scale(self, adapter_name: str, scale: float) -> None:
        """Change the scale of a loaded erasure adapter (0 switches it off, 1 is full strength)."""
        entry = self._get_active(adapter_name)
        scale = _check_scale(scale)
        previous = entry.scale
        entry.scale = scale
        try:
            self._recompute(entry.terms.keys())
        except BaseException:
            entry.scale = previous
            self._recompute(entry.terms.keys())
            raise

    def unload_erasure(self, adapter_name: Optional[str] = None) -> None:
        """Remove one erasure adapter (by name) or all of them (``None``).

        Parameters no adapter touches any more get their exact original values copied back.
        """
        state = self._erasure_state()
        names = list(state.active) if adapter_name is None else [adapter_name]
        for name in names:
            self._get_active(name)
        before = dict(state.active)
        keys = set()
        for name in names:
            keys.update(state.active.pop(name).terms)
        try:
            self._recompute(keys)
        except BaseException:  # what the others add would overflow without this one: keep it loaded
            state.active.clear()
            state.active.update(before)
            self._recompute(keys)
            raise
        self._forget_unused(keys)

    @contextlib.contextmanager
    def _erasure_transport(self, prompt: Any) -> Iterator[None]:
        """For one pipeline call: adapters with Facilitated Transport (SPM) scaled by their strength for
        ``prompt`` (text or a list of texts; None, i.e. ``prompt_embeds`` only, leaves them at full strength)."""
        state = self._erasure_state()
        transported = [entry for entry in state.active.values() if entry.transport and entry.scale != 0.0]
        if not transported or prompt is None:
            yield
            return
        from unsee.erasure.spm import transport_strength

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        saved = [(entry, entry.scale) for entry in transported]
        keys: set = set()
        try:
            for entry, scale in saved:
                entry.scale = scale * transport_strength(self, prompts, entry.concepts)
                keys.update(entry.terms)
            self._recompute(keys)
            yield
        finally:
            for entry, scale in saved:
                entry.scale = scale
            self._recompute(keys)

    # -- internals ---------------------------------------------------------------------------

    def _get_active(self, adapter_name: Any) -> _Active:
        active = self._erasure_state().active
        if adapter_name not in active:
            raise AdapterError(
                f"no erasure adapter named {adapter_name!r} is loaded (loaded: {', '.join(active) or 'none'})."
            )
        return active[adapter_name]

    def _recompute(self, keys: Iterable[tuple[str, str]]) -> None:
        """Write ``W_orig + sum(scale * delta)`` into each parameter in ``keys`` from the saved originals.

        A parameter no active adapter changes gets its original copied back. A sum that would turn a finite
        weight into inf/NaN (in the parameter's dtype) raises AdapterError before that parameter is written;
        callers roll back the parameters already written, so the model is left as it was.
        """
        state = self._erasure_state()
        with torch.no_grad():
            for key in list(keys):
                touched = state.touched.get(key)
                if touched is None:
                    continue
                param = touched.param
                contributions = [(entry.scale, entry.terms[key]) for entry in state.active.values()
                                 if key in entry.terms and entry.scale != 0.0]
                if not contributions:
                    param.data.copy_(touched.original)
                    continue
                compute = torch.float64 if param.dtype == torch.float64 else torch.float32
                value = touched.original.to(device=param.device, dtype=compute, copy=True)
                for scale, term in contributions:
                    value.add_(term.value(param.shape, param.device, compute), alpha=scale)
                value = value.to(param.dtype)
                finite = torch.isfinite(value)
                if not bool(finite.all()):  # only weights that were finite count (a broken model stays broken)
                    was_finite = torch.isfinite(touched.original).to(finite.device)
                    if bool((was_finite & ~finite).any()):
                        scales = ", ".join(f"{_shown(name)} at scale {entry.scale:g}"
                                           for name, entry in state.active.items()
                                           if key in entry.terms and entry.scale != 0.0)
                        raise AdapterError(
                            f"erasure adapters {scales} would overflow {key[0]}.{key[1]} ({param.dtype}) to inf/NaN; "
                            "the weights are left as they were. Use a smaller scale (or an adapter with a smaller "
                            "lora_alpha)."
                        )
                param.data.copy_(value)

    def _forget_unused(self, keys: Iterable[tuple[str, str]]) -> None:
        """Drop the saved originals of parameters in ``keys`` that no loaded adapter changes any more."""
        state = self._erasure_state()
        for key in list(keys):
            if key in state.touched and not any(key in entry.terms for entry in state.active.values()):
                del state.touched[key]
