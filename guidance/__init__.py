"""Guidance variants for unsee's pipelines: ``pipe(prompt, guidance=[CFGpp(0.6), PAG(3.0), NASA(0.3)])``.

One file per method (its config, contract, per-call run and attention edits); ``base`` holds the step contract,
``composition`` the rules for combining methods, ``registry`` the methods' user-facing options (CLI flags, demo
controls, PNG keys). The names below load on first use, so ``unsee.guidance.registry`` imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    "CFG": "cfg", "CFGpp": "cfgpp", "equivalent_cfg_scale": "cfgpp", "FDG": "fdg", "NAG": "nag", "NASA": "nasa",
    "NegativeSteer": "negative", "PAG": "pag", "Guidance": "base", "GuidanceError": "base", "Contract": "base",
    "validate_combination": "composition", "as_diffusers_guider": "diffusers_guiders",
    "DiffusersGuider": "diffusers_guiders", "FDGGuider": "diffusers_guiders", "CFGppGuider": "diffusers_guiders",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
