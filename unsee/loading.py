"""Loading a pipeline: the embedded toy model, a hub id, a local diffusers folder or a single file.

``load_pipeline`` returns unsee's pipeline subclass for the architecture it finds
(``UnseeStableDiffusionPipeline`` for SD 1.x/2.x, ``UnseeStableDiffusionXLPipeline`` for SDXL).
Everything except ``"toy"`` goes through diffusers' own loaders, so hub ids, local folders and
single-file checkpoints behave as they do in diffusers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .toy.model import TOY_MODEL_DIR

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_SDXL_CLASS_MARKERS = ("StableDiffusionXL",)
# A key only SDXL's original (LDM/SGM) checkpoints have: the second text encoder.
_SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to pass instead."""


def model_load_failure(model: str, error: BaseException) -> str:
    """One line for a local model that diffusers could not read (a file's contents are never shown)."""
    if Path(model).expanduser().is_dir():
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    else:
        detail = type(error).__name__
    return (f"cannot load the model {model} ({detail}); pass a Stable Diffusion checkpoint (with --config DIR "
            "offline), a diffusers folder, a hub id or 'toy'")


def _pipeline_class(is_sdxl: bool) -> type:
    from unsee.pipelines import UnseeStableDiffusionPipeline, UnseeStableDiffusionXLPipeline

    return UnseeStableDiffusionXLPipeline if is_sdxl else UnseeStableDiffusionPipeline


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _class_for_index(index: dict, source: str) -> type:
    """unsee's pipeline class for a diffusers ``model_index.json``; refuses other architectures."""
    class_name = index.get("_class_name", "").removeprefix("Unsee")  # folders saved from our own subclasses
    is_sd = class_name.startswith("StableDiffusion") and not any(m in class_name for m in ("3", "Cascade", "Upscale"))
    if not is_sd or "unet" not in index:
        raise ModelLoadError(
            f"{source} is a {class_name or 'non-diffusers'} model; unsee supports Stable Diffusion 1.x/2.x and SDXL"
        )
    return _pipeline_class(any(m in class_name for m in _SDXL_CLASS_MARKERS) or "text_encoder_2" in index)


def _single_file_is_sdxl(path: Path) -> bool:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return any(key.startswith(_SDXL_SINGLE_FILE_KEY) for key in f.keys())
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return any(key.startswith(_SDXL_SINGLE_FILE_KEY) for key in state)


def load_pipeline(
    model: Union[str, os.PathLike] = "toy",
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    config: Optional[Union[str, os.PathLike]] = None,
    **kwargs,
):
    """Load a text-to-image pipeline as unsee's subclass for its architecture.

    Args:
        model: ``"toy"`` (the embedded shapes-world model), a hub id (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``),
            a local diffusers folder (with ``model_index.json``), or a single-file checkpoint
            (``.safetensors``/``.ckpt`` in the original SD layout).
        dtype: e.g. ``torch.float16``; None keeps the stored precision (float32 for the toy model).
        device: where to put the pipeline (``"cuda"``, ``"cpu"``...); None leaves it on the CPU.
        config: for a single-file checkpoint, a local diffusers folder (or cached hub id) of the same
            architecture to take the component configs from. Needed offline.
        **kwargs: passed on to diffusers' ``from_pretrained`` / ``from_single_file``.

    Raises:
        ModelLoadError: the model is missing or cannot be reached; the message says what to pass instead.
    """
    name = str(model)
    path = Path(name).expanduser()
    if name == "toy":
        if not (TOY_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                f"the embedded toy model is missing from {TOY_MODEL_DIR}; reinstall unsee, or rebuild it with "
                "`python scripts/train_toy.py`, or pass another model (a hub id, a local diffusers folder or a single file)"
            )
        path = TOY_MODEL_DIR
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(
                    f"{path} is a folder but not a diffusers pipeline (no model_index.json); pass a folder written by "
                    "`save_pretrained`, a single-file checkpoint, or a hub id"
                )
            index = json.loads((path / "model_index.json").read_text())
            pipe = _class_for_index(index, str(path)).from_pretrained(str(path), **kwargs)
        elif path.is_file():
            if path.suffix not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(f"{path} is not a checkpoint: expected one of {', '.join(SINGLE_FILE_SUFFIXES)}")
            cls = _pipeline_class(_single_file_is_sdxl(path))
            if config is not None:
                kwargs["config"] = str(config)
            elif _offline():
                raise ModelLoadError(
                    f"loading the single file {path} offline needs the component configs: pass config=<a local "
                    "diffusers folder of the same architecture> (CLI: --config DIR), or unset HF_HUB_OFFLINE"
                )
            pipe = cls.from_single_file(str(path), **kwargs)
        elif name.startswith((".", "/", "~")) or name.endswith(SINGLE_FILE_SUFFIXES):
            raise ModelLoadError(f"no file or folder at {path}; check the path, or pass a hub id or 'toy'")
        else:
            pipe = _load_from_hub(name, **kwargs)
    except ModelLoadError:
        raise
    except OSError as error:
        hint = " (HF_HUB_OFFLINE is set: only models already in the local cache can be loaded)" if _offline() else ""
        raise ModelLoadError(
            f"could not load {name!r}{hint}: {error}. Pass a local diffusers folder, a single-file checkpoint with "
            "config=<local folder>, or 'toy' for the embedded model"
        ) from error
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _load_from_hub(repo_id: str, **kwargs):
    from diffusers import DiffusionPipeline

    hub_options = {k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir", "local_files_only")}
    index = DiffusionPipeline.load_config(repo_id, **hub_options)
    return _class_for_index(index, repo_id).from_pretrained(repo_id, **kwargs)


def device_problem(text: str) -> Optional[str]:
    """Why ``text`` is not a device this machine has (a phrase: "'cuda' ..."), or None."""
    shown = repr(text if len(text) <= 40 else text[:40] + "...")  # the user's text, quoted and cut
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return f"{shown} is not a device; use cpu, cuda, cuda:N or mps"
    kind = device.type
    if kind == "cpu":
        return None
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        available = bool(backend is not None and backend.is_available())
        count = 1 if available else 0
    else:
        module = getattr(torch, kind, None)
        if kind == "meta" or module is None or not callable(getattr(module, "is_available", None)):
            return f"{shown} cannot run a pipeline; use cpu, cuda, cuda:N or mps"
        available = bool(module.is_available())
        count = int(module.device_count()) if available and hasattr(module, "device_count") else 0
    if not available:
        return f"{shown} is not available on this machine (no {kind} device); use --device cpu"
    if device.index is not None and device.index >= count:
        return f"{shown} does not exist: this machine has {count} {kind} device(s), {kind}:0 to {kind}:{count - 1}"
    return None
