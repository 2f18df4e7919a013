"""Exporting erasure adapters to the LoRA formats other tools read: ``unsee export`` and :func:`export_adapter`.

Formats (key conventions in :mod:`unsee.lora_formats`):

- ``kohya``: one ``.safetensors`` file with ``lora_unet_`` / ``lora_te_`` (SD 1.x/2.x) or ``lora_te1_`` /
  ``lora_te2_`` (SDXL) keys and each module's true ``.alpha``, for AUTOMATIC1111/Forge and ComfyUI; diffusers'
  ``load_lora_weights`` reads it too, and so does unsee's ``load_erasure``. The header keeps unsee's description
  (method, concepts, fingerprint, ...) next to kohya's ``ss_network_*`` entries.
- ``diffusers``: what ``pipe.save_lora_weights`` writes (``unet.`` / ``text_encoder.`` peft keys, the LoRA config
  with alpha under ``lora_adapter_metadata``), plus unsee's metadata: an unsee ``lora`` adapter file.
- ``peft``: a folder with one sub-folder per component, each what ``PeftModel.save_pretrained`` writes
  (``adapter_model.safetensors`` with ``base_model.model.`` keys, ``adapter_config.json``), for
  ``peft.PeftModel.from_pretrained(pipe.unet, folder / "unet")``.

The model with an adapter merged, as one single-file checkpoint (``unsee export --format checkpoint --model M``),
is :func:`unsee.convert.export_checkpoint`: it needs a pipeline, which this layer knows nothing of.

LoRA adapters export losslessly (the same tensors, renamed). A ``delta`` adapter becomes a LoRA only by
approximation: ``rank=R`` fits one by truncated SVD per tensor (:func:`unsee.lora_formats.extract_lora`), and the
relative Frobenius error of every tensor and overall is returned, printed by the command line and written into the
output's header (``training["lora_extraction"]``; kohya files also under ``unsee_lora_extraction``).

Inputs: an :class:`~unsee.adapters.Adapter`, an unsee adapter file, a kohya LoRA file, or a plain diffusers LoRA
file (``save_lora_weights`` output without unsee's metadata: method ``"unknown"``, alpha from its header, else the
rank as diffusers assumes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import safetensors.torch

from . import lora_formats
from .adapters import (
    COMPONENTS,
    LORA_METADATA_KEY,
    UNKNOWN,
    Adapter,
    AdapterError,
    _check_alpha,
    _header_metadata,
    _safe_open,
    load_adapter,
    save_adapter,
    validate_adapter,
)
from .files import atomic_write

__all__ = ["FORMATS", "ExportResult", "export_adapter", "read_adapter_for_export"]

FORMATS = ("kohya", "diffusers", "peft")
MAX_RANK = 1024


@dataclass
class ExportResult:
    """What :func:`export_adapter` wrote: ``path`` (a file, or the folder for ``peft``), ``format``, the LoRA's
    ``rank``/``alpha``, the number of LoRA modules, and for a delta turned into a LoRA the fit
    (``extraction``: relative errors per tensor and overall, dropped tensors)."""

    path: Path
    format: str
    rank: int
    alpha: float
    modules: int
    extraction: Optional[lora_formats.LoraExtraction] = None

    def lines(self) -> list[str]:
        """The report the command line prints."""
        out = []
        if self.extraction is not None:
            for key, error in sorted(self.extraction.errors.items()):
                note = " (dropped: not a Linear/Conv weight)" if key in self.extraction.dropped else ""
                out.append(f"  {key}: relative error {error:.3g}{note}")
            out.append(f"LoRA rank {self.rank} from a delta: overall relative Frobenius error "
                       f"{self.extraction.overall:.3g} over {len(self.extraction.errors)} tensor(s)")
        out.append(f"wrote {self.path} ({self.format}, {self.modules} LoRA module(s), rank {self.rank}, "
                   f"alpha {self.alpha:g})")
        return out


def _read_plain_diffusers(path: Path) -> Adapter:
    """A LoRA file as ``save_lora_weights`` writes it, without unsee's metadata."""
    handle = _safe_open(path)
    with handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    bad = [k for k in tensors if k.split(".", 1)[0] not in COMPONENTS or not k.endswith((".lora_A.weight",
                                                                                          ".lora_B.weight"))]
    if bad:
        raise AdapterError(f"{path}: key {bad[0][:60]!r} is not a diffusers/peft LoRA key of unet / text_encoder / "
                           "text_encoder_2; unsee cannot read this file.")
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise AdapterError(f"{path}: its modules have ranks {sorted(ranks)}; unsee reads one-rank LoRAs only.")
    rank = ranks.pop()
    alpha = float(rank)
    if LORA_METADATA_KEY in metadata:
        try:
            config = json.loads(metadata[LORA_METADATA_KEY])
            alphas = {float(v) for k, v in config.items() if k.endswith(".lora_alpha")}
        except (ValueError, TypeError, AttributeError):
            raise AdapterError(f"{path}: header entry {LORA_METADATA_KEY!r} is not valid JSON.") from None
        if len(alphas) > 1:
            raise AdapterError(f"{path}: its components have different alphas {sorted(alphas)}; unsee reads one.")
        alpha = alphas.pop() if alphas else alpha
    adapter = Adapter(kind="lora", method=UNKNOWN, concepts=[], tensors=tensors, rank=rank, alpha=alpha)
    adapter.fingerprint = {c: UNKNOWN for c in adapter.components}
    validate_adapter(adapter)
    _check_alpha(alpha, rank)
    return adapter


def read_adapter_for_export(path: Union[str, os.PathLike]) -> Adapter:
    """An adapter file of any format :func:`export_adapter` takes (unsee, kohya, plain diffusers LoRA)."""
    path = Path(path)
    try:
        return load_adapter(path)
    except AdapterError as error:
        if "plain diffusers LoRA" not in str(error):
            raise
    return _read_plain_diffusers(path)


def _lora_of(adapter: Adapter, rank: Optional[int], drop_other: bool
             ) -> tuple[Adapter, Optional[lora_formats.LoraExtraction]]:
    if adapter.is_lora:
        if rank is not None:
            raise AdapterError("--rank (rank=) fits a LoRA to a delta adapter; this adapter is a LoRA already, and "
                               "exports as it is: leave --rank out.")
        return adapter, None
    if rank is None:
        raise AdapterError(f"a {adapter.kind!r} adapter holds full-weight deltas, not LoRA factors: pass --rank R "
                           "(rank=R) to fit a rank-R LoRA by truncated SVD (the export reports how close it is).")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"the LoRA rank must be a whole number from 1 to {MAX_RANK}, got {rank!r}.")
    try:
        fit = lora_formats.extract_lora(adapter.tensors, rank, drop_other=drop_other)
    except lora_formats.LoraFormatError as error:
        raise AdapterError(str(error)) from None
    lora = dataclasses.replace(
        adapter, kind="text_encoder" if adapter.kind == "text_encoder" else "lora", tensors=fit.tensors,
        rank=fit.rank, alpha=fit.alpha, training={**adapter.training, "lora_extraction": fit.summary()},
    )
    lora.fingerprint = {c: adapter.fingerprint[c] for c in lora.components}
    validate_adapter(lora)
    return lora, fit


def _write_kohya(adapter: Adapter, out: Path, sdxl: Optional[bool],
                 fit: Optional[lora_formats.LoraExtraction]) -> None:
    rank = adapter.rank if adapter.rank is not None else int(next(
        t.shape[0] for k, t in adapter.tensors.items() if k.endswith(".lora_A.weight")))
    alpha = adapter.alpha if adapter.alpha is not None else float(rank)
    tensors = lora_formats.to_kohya(adapter.tensors, rank, alpha, sdxl=sdxl)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {k: v for k, v in _header_metadata(adapter).items()
                if k not in ("unsee_format", LORA_METADATA_KEY)}  # not an unsee-format file: kohya keys
    metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                     "ss_network_alpha": f"{alpha:g}", "unsee_kind": adapter.kind})
    if fit is not None:
        metadata["unsee_lora_extraction"] = json.dumps(fit.summary(), sort_keys=True)
    atomic_write(out, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def _write_peft(adapter: Adapter, out: Path) -> None:
    from peft import LoraConfig

    rank = adapter.rank if adapter.rank is not None else int(next(
        t.shape[0] for k, t in adapter.tensors.items() if k.endswith(".lora_A.weight")))
    alpha = adapter.alpha if adapter.alpha is not None else float(rank)
    for component, tensors in lora_formats.to_peft(adapter.tensors).items():
        targets = sorted(k[len(lora_formats.PEFT_PREFIX):-len(".lora_A.weight")] for k in tensors
                         if k.endswith(".lora_A.weight"))
        config = LoraConfig(r=int(rank), lora_alpha=alpha, target_modules=targets)
        folder = out / component
        folder.mkdir(parents=True, exist_ok=True)
        data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        atomic_write(folder / "adapter_model.safetensors",
                     lambda tmp, data=data: safetensors.torch.save_file(data, tmp, metadata={"format": "pt"}))
        text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=lambda v: sorted(v)
                          if isinstance(v, (set, frozenset)) else str(v))
        atomic_write(folder / "adapter_config.json", lambda tmp, text=text: Path(tmp).write_text(text))


def export_adapter(adapter: Union[Adapter, str, os.PathLike], format: str, out: Union[str, os.PathLike], *,
                   rank: Optional[int] = None, drop_other: bool = False, overwrite: bool = False,
                   sdxl: Optional[bool] = None) -> ExportResult:
    """Write ``adapter`` (an :class:`~unsee.adapters.Adapter` or a file) as a ``kohya``, ``diffusers`` or ``peft``
    LoRA at ``out`` (a ``.safetensors`` file; a folder for ``peft``); returns an :class:`ExportResult`.

    A LoRA adapter is exported losslessly. A ``delta`` adapter needs ``rank``: a LoRA is fitted by truncated SVD
    and the result reports (and the file records) its relative error; tensors that are not Linear/Conv weights
    are refused unless ``drop_other=True``. ``sdxl`` picks the kohya text-encoder prefix (``lora_te1_`` vs
    ``lora_te_``; None: guessed from the adapter). An existing ``out`` is replaced only with ``overwrite=True``.
    Raises :class:`~unsee.adapters.AdapterError`."""
    if format == "checkpoint":
        raise AdapterError("the checkpoint format merges the adapter into a base model: use "
                           "unsee.convert.export_checkpoint(adapter, pipe, out) or unsee export --format checkpoint "
                           "--model MODEL.")
    if format not in FORMATS:
        raise AdapterError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out)
    if format == "peft":
        if out.exists() and not out.is_dir():
            raise AdapterError(f"{out} is a file; the peft format writes a folder: give a folder path.")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise AdapterError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace its files.")
    else:
        if out.suffix != ".safetensors":
            raise AdapterError(f"the {format} format writes a .safetensors file; got {out.name!r}.")
        if out.is_dir():
            raise AdapterError(f"{out} is a folder; give the output file's path.")
        if out.exists() and not overwrite:
            raise AdapterError(f"{out} exists; pass --overwrite (overwrite=True) to replace it.")
    if not isinstance(adapter, Adapter):
        source = Path(adapter)
        if out.resolve() == source.resolve():
            raise AdapterError(f"{out} is the adapter being exported; write the export to another path.")
        adapter = read_adapter_for_export(source)
    else:
        validate_adapter(adapter)
    lora, fit = _lora_of(adapter, rank, drop_other)
    rank_out = lora.rank if lora.rank is not None else int(next(
        t.shape[0] for k, t in lora.tensors.items() if k.endswith(".lora_A.weight")))
    alpha_out = lora.alpha if lora.alpha is not None else float(rank_out)
    lora = dataclasses.replace(lora, rank=rank_out, alpha=alpha_out)
    if format == "kohya":
        _write_kohya(lora, out, sdxl, fit)
    elif format == "diffusers":
        save_adapter(lora, out)
    else:
        _write_peft(lora, out)
    modules = sum(1 for k in lora.tensors if k.endswith(".lora_A.weight"))
    return ExportResult(path=out, format=format, rank=rank_out, alpha=alpha_out, modules=modules, extraction=fit)
