"""unsee: concept erasure and guidance variants for Hugging Face diffusers pipelines.

    import unsee
    pipe = unsee.load_pipeline("toy")              # or a hub id, a local folder, a single file
    pipe.load_erasure("circle.safetensors")         # an erasure adapter
    image = pipe("a red circle on a gray background").images[0]

Heavy modules (torch, diffusers) load on first use of the names below, so ``unsee --help`` is fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_pipeline": "unsee.loading",
    "ModelLoadError": "unsee.loading",
    "Adapter": "unsee.adapters",
    "AdapterError": "unsee.adapters",
    "load_adapter": "unsee.adapters",
    "save_adapter": "unsee.adapters",
    "save_single_file": "unsee.convert",
    "evaluate": "unsee.evaluation",
    "EvaluationResult": "unsee.evaluation",
    "UnseeStableDiffusionPipeline": "unsee.pipelines",
    "UnseeStableDiffusionXLPipeline": "unsee.pipelines",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unsee' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
