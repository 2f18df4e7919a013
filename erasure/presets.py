"""Named starting settings for the erasure trainers.

- ``paper``: each config dataclass's own defaults, i.e. the paper's values, made for SD 1.x at 512 px.
- ``toy``: settings for the embedded toy model (64 px, a 2.5M-parameter UNet) that train in 1-2 minutes
  on a 2-core CPU. The paper's learning rates are tuned for SD's 860M-parameter UNet; the toy preset trains
  fewer steps at higher rates. For ESD-x (and ESD-x-strict) the learning rate and eta depend on the attribute the
  concept belongs to (``TOY_ESD_BY_ATTRIBUTE``, :func:`toy_esd_context`), and the style attribute is erased in
  context: ``erase_from`` = 16 world prompts that name it ("a striped green triangle", ...) and ``preserve`` =
  10 that name its sibling ("a solid red circle", ...). Tuning runs on the shipped toy model (ESD-x, 200 steps,
  32 images per figure, presence / mean judge accuracy on other prompts): "circle" lr 5e-4 eta 2: 9% / 99%;
  the same with 10 preserve prompts 0% / 96%; lr 2e-3 eta 3 in context 0% / 90%. "striped": the bare word at
  lr 5e-4 100% / 99%, lr 1e-3 eta 2 78% / 96%, in context lr 2e-3 eta 3 6% / 93%, plus preserve 9% / 100%.
  "red": lr 2e-4 0% / 93% (every "orange" prompt turns yellow); every setting tried trades one for the other:
  preserve prompts at lr 2e-4 62% / 96%, at lr 3e-4 (weight 2) 34% / 96%, at lr 5e-4 eta 2 0% / 89%.
  ESD-u and ESD-all train every UNet weight outside (or also inside) cross-attention: on the toy model they
  either miss the concept or damage everything ("circle", lr 1e-4: 80% presence with the background right in
  58% of other prompts; lr 5e-5 eta 2: 72% / 99%); their preset is the gentle one, use ESD-x or SalUn here.
  SalUn's preset (world prompts as forget and retain sets) erased circle 0% / 100%, red 0% / 98%,
  striped 9% / 99% in tuning. The benchmark's figures are in ``BENCHMARKS.md`` (``benchmarks/erasure_efficacy.py``).

``unsee erase`` and job files use ``toy`` when the model is ``"toy"`` and ``paper`` otherwise, unless
``preset`` is given. Explicit settings always win over the preset's.
"""

from __future__ import annotations

from typing import Any, Optional

from .base import ConfigError

__all__ = ["PRESETS", "TOY_PRESETS", "preset_settings", "toy_esd_context"]

_TOY_ESD_X = {"steps": 200, "lr": 5e-4, "eta": 2.0, "ddim_steps": 25}
_TOY_ESD_U = {"steps": 200, "lr": 5e-5, "eta": 2.0, "ddim_steps": 25}
_ESD_X_METHODS = ("esd-x", "esd-x-strict")  # tuned per attribute (TOY_ESD_BY_ATTRIBUTE)

TOY_PRESETS: dict[str, dict[str, Any]] = {
    "esd-x": dict(_TOY_ESD_X),
    "esd-x-strict": dict(_TOY_ESD_X),
    "esd-u": dict(_TOY_ESD_U),
    "esd-all": dict(_TOY_ESD_U),
    "spm": {"steps": 200, "lr": 4e-3, "ddim_steps": 25, "la_strength": 100.0},
    "salun": {"steps": 150, "lr": 5e-5, "num_forget": 128, "num_retain": 128, "generation_steps": 25},
    "advunlearn": {"steps": 150, "lr": 1e-4, "ddim_steps": 25, "warmup": 30, "attack_steps": 10},
    "ant": {"steps": 200, "lr": 1e-4, "ddim_steps": 25, "before_step": 4, "saliency_iterations": 2},
}

# ESD on the toy model, by the attribute the concept belongs to: learning rate, eta, and how many world prompts
# go to erase_from (naming the concept) and to preserve (naming its siblings); 0 = none
TOY_ESD_BY_ATTRIBUTE: dict[str, dict[str, Any]] = {
    "shape": {"lr": 5e-4, "eta": 2.0, "erase_from": 0, "preserve": 0},
    "background": {"lr": 5e-4, "eta": 2.0, "erase_from": 0, "preserve": 0},
    "color": {"lr": 2e-4, "eta": 1.0, "erase_from": 0, "preserve": 0},
    "style": {"lr": 2e-3, "eta": 3.0, "erase_from": 16, "preserve": 10},
}


def toy_esd_context(concept: str) -> dict[str, Any]:
    """ESD settings for a concept of the shapes world by its attribute ({} for other concepts)."""
    from unsee import world

    try:
        attribute, _ = world.concept_attribute(concept)
    except ValueError:
        return {}
    table = TOY_ESD_BY_ATTRIBUTE[attribute]
    settings = {"lr": table["lr"], "eta": table["eta"]}
    if table["erase_from"]:
        settings["erase_from"] = world.concept_prompts(concept, 0, table["erase_from"])
    if table["preserve"]:
        settings["preserve"] = world.other_prompts(concept, 0, table["preserve"])
    return settings


PRESETS: dict[str, dict[str, dict[str, Any]]] = {"paper": {}, "toy": TOY_PRESETS}


def preset_settings(preset: Optional[str], method: str, model: str = "toy",
                    concept: Optional[str] = None) -> dict[str, Any]:
    """The settings ``preset`` gives ``method`` (None: ``toy`` for the toy model, else ``paper``); with the
    ``toy`` preset, an ESD variant and a ``concept`` of the shapes world, also its context prompts."""
    if preset is None:
        preset = "toy" if model == "toy" else "paper"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = dict(PRESETS[preset].get(method, {}))
    if preset == "toy" and method in _ESD_X_METHODS and isinstance(concept, str):
        settings.update(toy_esd_context(concept))
    return settings
