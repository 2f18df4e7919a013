"""unsee: concept erasure and guidance variants for Hugging Face diffusers pipelines.

    import unsee
    pipe = unsee.load_pipeline("toy")              # or a hub id, a local folder, a single file
    pipe.load_erasure("circle.safetensors")         # an erasure adapter
    image = pipe("a red circle on a gray background").images[0]
    guided = unsee.guided(diffusers_pipe)           # any SD/SDXL pipeline (img2img, inpaint, ControlNet) + guidance=
    unsee.toy.evaluate(pipe, concept="circle")     # the toy world's prompts, scored by its judge

``unsee.toy`` (the shapes world, the embedded model's files, its judge and presets) loads on first use too.

Heavy modules (torch, diffusers) load on first use of the names below, so ``unsee --help`` is fast.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# In a source checkout the subpackages are sibling folders of this one (pyproject.toml maps them into the
# namespace with setuptools' package-dir); an installed unsee has them inside this folder.
_CHECKOUT_FOLDERS = {"guidance": "guidance", "pipelines": "pipelines", "erasure": "erasure", "apps": "apps",
                     "weights": "weights"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``unsee.guidance`` & co. in the sibling folders of a source checkout's ``unsee/``.

    Python started in the root of a checkout imports ``unsee`` from the source folder ``unsee/`` (the current
    folder comes first on ``sys.path``), even when unsee is installed; without this finder its subpackages
    would be missing. The subpackages then come from the same checkout as ``unsee`` itself."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        package, _, name = fullname.partition(".")
        if package != __name__ or name not in _CHECKOUT_FOLDERS:
            return None
        folder = self.root / _CHECKOUT_FOLDERS[name]
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _install_checkout_finder() -> None:
    here = Path(__file__).resolve().parent
    root = here.parent
    if (here / "guidance").is_dir() or not (root / "pyproject.toml").is_file():
        return  # an installed unsee (or an unexpected layout): nothing to map
    if not all((root / folder / "__init__.py").is_file() for folder in _CHECKOUT_FOLDERS.values()):
        return
    if not any(isinstance(finder, _CheckoutFinder) and finder.root == root for finder in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder(root))


_install_checkout_finder()

# public name -> module that defines it
_EXPORTS = {
    "load_pipeline": "unsee.loading",
    "ModelLoadError": "unsee.loading",
    "Adapter": "unsee.adapters",
    "AdapterError": "unsee.adapters",
    "load_adapter": "unsee.adapters",
    "save_adapter": "unsee.adapters",
    "export_adapter": "unsee.adapter_export",
    "fuse_adapters": "unsee.fuse",
    "save_single_file": "unsee.convert",
    "export_checkpoint": "unsee.convert",
    "evaluate": "unsee.evaluation",
    "EvaluationResult": "unsee.evaluation",
    "read_suite": "unsee.suites",
    "run_suite": "unsee.suite_eval",
    "UnseeStableDiffusionPipeline": "unsee.pipelines",
    "UnseeStableDiffusionXLPipeline": "unsee.pipelines",
    "guided": "unsee.pipelines.variants",
    "UnsupportedPipelineError": "unsee.pipelines.variants",
}

_SUBPACKAGES = ("toy",)  # reachable as unsee.toy without importing it first

__all__ = ["__version__", *_EXPORTS, *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'unsee' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
