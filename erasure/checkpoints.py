"""Trainer checkpoints: the file (``checkpoint.pt``, written atomically) and which settings may change on resume.

A checkpoint holds the trained tensors (float32 masters of half-precision ones), the optimizer's state, every draw's
random state, the losses so far, the method's own data (:meth:`~unsee.erasure.Trainer.extra_state`) and the
config's settings. A run resumes from it only with the same settings, except :data:`RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from unsee.files import atomic_write

from .errors import ConfigError, TrainingError

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "RESUMABLE_CHANGES", "save_checkpoint", "load_checkpoint",
           "check_resumable", "check_draw_count", "changed_settings"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
#: config fields that may differ between a checkpoint and the run that resumes it: they change how the run goes
#: on, not what the checkpoint holds (the same tensors of the same method, with the same data and targets)
RESUMABLE_CHANGES = ("steps", "lr", "checkpoint_every", "device", "dtype", "mixed_precision")
#: config fields compared apart: ``draws_per_step`` None means one draw per process, so what must match is the
#: number of draws it comes to (a 2-process checkpoint resumes on 1 process with ``draws_per_step=2``)
_COMPARED_APART = ("draws_per_step",)


def save_checkpoint(state: dict, folder: Path) -> Path:
    """Write ``state`` as the checkpoint of ``folder``, atomically (a killed write leaves the last one)."""
    return atomic_write(folder / CHECKPOINT_NAME, lambda tmp: torch.save(state, tmp))


def load_checkpoint(checkpoint_dir: Union[str, os.PathLike]) -> Optional[dict]:
    """The checkpoint in ``checkpoint_dir`` (a dict; see ``Trainer``), or None when there is none."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a checkpoint is written atomically, so this is not a partial write
        raise TrainingError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not an unsee trainer checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _settings_pair(checkpoint: dict, config: Any) -> tuple[dict, dict]:
    """(the checkpoint's settings, the config's), fields the checkpoint predates taken at their defaults, those
    compared apart (:data:`_COMPARED_APART`) left out."""
    saved, mine = dict(checkpoint.get("config") or {}), config.to_dict()
    if saved.get("toy_world") is False:  # an earlier version's setting, off: the prompts were the config's
        del saved["toy_world"]
    for f in dataclasses.fields(config):
        if f.name not in saved and f.default is not dataclasses.MISSING:
            saved[f.name] = f.default
    for name in _COMPARED_APART:
        saved.pop(name, None)
        mine.pop(name, None)
    return saved, mine


def check_resumable(checkpoint: dict, config: Any, folder: Path) -> None:
    """Raise :class:`ConfigError` unless ``config`` may resume ``checkpoint`` (the checkpoint of ``folder``)."""
    if (checkpoint.get("config") or {}).get("toy_world"):
        raise ConfigError(f"the checkpoint in {folder} drew its prompts from the toy world (toy_world, a setting of "
                          "earlier versions), which cannot resume with prompt lists; start a fresh run in another "
                          "checkpoint folder")
    saved, mine = _settings_pair(checkpoint, config)
    diff = sorted(k for k in set(saved) | set(mine) if k not in RESUMABLE_CHANGES and saved.get(k) != mine.get(k))
    if diff:
        detail = ", ".join(f"{k}={saved.get(k)!r} there, {mine.get(k)!r} here" for k in diff[:4])
        raise ConfigError(f"the checkpoint in {folder} was written with other settings ({detail}); resume with "
                          f"the same settings (only {', '.join(RESUMABLE_CHANGES)} may change) or use another "
                          "checkpoint folder")
    if checkpoint["step"] > config.steps:
        raise ConfigError(f"the checkpoint in {folder} is at step {checkpoint['step']}, past steps="
                          f"{config.steps}; raise steps or start a fresh run")


def check_draw_count(checkpoint: dict, total: int, folder: Path) -> None:
    """Raise :class:`ConfigError` unless the checkpoint was written with ``total`` draws per step."""
    written = len(checkpoint["rng"]["generators"])
    if written != total:
        raise ConfigError(f"the checkpoint in {folder} was written with {written} draw(s) per step and this run "
                          f"makes {total}; resume with draws_per_step={written} (--set draws_per_step={written}) "
                          f"on a number of processes that divides it")


def changed_settings(checkpoint: dict, config: Any) -> dict[str, dict[str, Any]]:
    """The resumable settings this run changes: name -> {"checkpoint": value there, "now": value here}."""
    saved, mine = _settings_pair(checkpoint, config)
    return {k: {"checkpoint": saved.get(k), "now": mine.get(k)} for k in RESUMABLE_CHANGES
            if k != "steps" and saved.get(k) != mine.get(k)}
