"""Named starting settings for the erasure trainers.

- ``paper``: each config dataclass's own defaults, i.e. the paper's values, made for SD 1.x at 512 px.
- ``toy``: settings for the embedded toy model (64 px, a 2.5M-parameter UNet) that train in 1-2 minutes
  on a 2-core CPU. The paper's learning rates are tuned for SD's 860M-parameter UNet; the toy preset trains
  fewer steps at higher rates. Provisional: measured on an interim toy model (erasing "red", 32 images per
  figure: ESD-x-strict 100% -> 19% presence with -2 points of colour accuracy elsewhere, ESD-x 100% -> 0-6%
  with -12, SPM 97% -> 3% with -12, SalUn 100% -> 22% with -9); to be re-tuned on the shipped weights against
  the bars of ``benchmarks/erasure_efficacy.py``.

``unsee erase`` and job files use ``toy`` when the model is ``"toy"`` and ``paper`` otherwise, unless
``preset`` is given. Explicit settings always win over the preset's.
"""

from __future__ import annotations

from typing import Any, Optional

from .base import ConfigError

__all__ = ["PRESETS", "TOY_PRESETS", "preset_settings"]

_TOY_ESD = {"steps": 200, "lr": 1e-4, "ddim_steps": 25}

TOY_PRESETS: dict[str, dict[str, Any]] = {
    "esd-u": dict(_TOY_ESD),
    "esd-x": dict(_TOY_ESD),
    "esd-all": dict(_TOY_ESD),
    "esd-x-strict": dict(_TOY_ESD),
    "spm": {"steps": 200, "lr": 4e-3, "ddim_steps": 25, "la_strength": 100.0},
    "salun": {"steps": 150, "lr": 5e-5, "num_forget": 128, "num_retain": 128, "generation_steps": 25},
    "advunlearn": {"steps": 150, "lr": 1e-4, "ddim_steps": 25, "warmup": 30, "attack_steps": 10},
    "ant": {"steps": 200, "lr": 1e-4, "ddim_steps": 25, "before_step": 4, "saliency_iterations": 2},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"paper": {}, "toy": TOY_PRESETS}


def preset_settings(preset: Optional[str], method: str, model: str = "toy") -> dict[str, Any]:
    """The settings ``preset`` gives ``method`` (None: ``toy`` for the toy model, else ``paper``)."""
    if preset is None:
        preset = "toy" if model == "toy" else "paper"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[preset].get(method, {}))
