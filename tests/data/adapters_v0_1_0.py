"""The adapter reader of unsee 0.1.0 (unsee/adapters.py at commit c58c3e5, before the format and its application
were split), kept as test data: tests/test_adapter_lora_interop.py checks that files written now load with it.

Only the reading half is kept (the adapter object, its validation, the header checks and load_adapter); the
fingerprints, saving, trainer helpers and ErasureAdapterMixin are left out. Not part of the package; do not edit
except to drop more of what the reader does not use.
"""

# flake8: noqa
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
        if pipe is not None:  # (checking against a pipeline is left out of this copy)
            raise NotImplementedError("pipe=")
        return opened.read()


