"""The toy world: a procedural shapes world, the small text-to-image model trained on it, and its judge.

    from unsee import toy
    pipe = unsee.load_pipeline("toy")                        # the embedded model (weights/toy)
    named, others = toy.evaluate_erasure(pipe, "circle")     # world prompts, scored by the toy judge
    toy.world.concept_prompts("circle", seed=0, n=4)         # "a red circle on a gray background", ...

Modules:

- :mod:`unsee.toy.world`: the renderer, its captions and prompts, and prompt <-> attribute parsing;
- :mod:`unsee.toy.model`: the embedded model's component configs, its tokenizer builder and where its weights live
  (``TOY_MODEL_DIR``, ``JUDGE_PATH``, ``EXAMPLE_ADAPTERS_DIR``), and :func:`fine_tune`;
- :mod:`unsee.toy.judge`: the judge classifier that reads shape, colour, background and style from an image;
- :mod:`unsee.toy.presets`: the erasure trainers' starting settings (``toy`` and ``paper``) and the world's prompt
  sets the ``toy`` preset gives the trainers on the toy model;
- :mod:`unsee.toy.evaluation`: evaluation and the prompt attack with the world's prompts and the toy judge as
  defaults (the core's :mod:`unsee.evaluation` and :mod:`unsee.attack` take them explicitly).

The core (``unsee.erasure``, ``unsee.guidance``, ``unsee.pipelines``, the adapter format, evaluation) never imports
this package; the command line, the demo, the job runner, the benchmarks and the tests use it as their default.
Names load on first use, so ``from unsee.toy import world`` does not load torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    **{name: "unsee.toy.model" for name in (
        "WEIGHTS_DIR", "TOY_MODEL_DIR", "JUDGE_PATH", "EXAMPLE_ADAPTERS_DIR", "BOS_TOKEN", "EOS_TOKEN", "MAX_LENGTH",
        "UNET_CONFIG", "VAE_CONFIG", "SCHEDULER_CONFIG", "build_tokenizer", "text_encoder_config", "fine_tune")},
    "Judge": "unsee.toy.judge",
    "default_judge": "unsee.toy.judge",
    "to_judge_input": "unsee.toy.judge",
    **{name: "unsee.toy.presets" for name in (
        "PRESETS", "TOY_PRESETS", "is_toy_model_name", "is_toy_pipeline", "preset_settings", "world_prompt_sets")},
    **{name: "unsee.toy.evaluation" for name in ("evaluate", "evaluate_erasure", "attack", "score")},
}
_SUBMODULES = ("world", "model", "judge", "presets", "evaluation")

__all__ = [*_SUBMODULES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"unsee.toy.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unsee.toy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
