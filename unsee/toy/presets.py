"""Named starting settings for the erasure trainers, and the shapes world's prompt sets for the toy model.

- ``paper``: each config dataclass's own defaults, i.e. the paper's values, made for SD 1.x at 512 px.
- ``toy``: settings for the embedded toy model (64 px, a 2.5M-parameter UNet) that train in 1-2 minutes on a
  2-core CPU: fewer steps at higher learning rates than the papers' (:data:`TOY_PRESETS`), adjusted by the attribute
  the concept belongs to (shape, colour, background, style: :data:`TOY_ESD_BY_ATTRIBUTE`,
  :data:`TOY_ESD_X_STRICT_BY_ATTRIBUTE`, :data:`TOY_BY_ATTRIBUTE`). How these values were chosen, with the
  figures of every run tried: ``docs/toy-presets.md``.

``unsee erase`` and job files use ``toy`` when the model is ``"toy"`` and ``paper`` otherwise, unless ``preset`` is
given; the user's own settings always win over the preset's (:func:`preset_settings` merges them).

Prompts from the shapes world go only to the embedded toy model. For a concept of the world, on the toy model
(:func:`is_toy_model_name`), the ``toy`` preset adds them:

- in-context prompt lists: ``erase_from`` (world prompts naming the concept) and ``preserve`` (prompts naming its
  siblings) for ESD, SPM, AdvUnlearn and ANT (:data:`TOY_IN_CONTEXT`, :data:`TOY_IN_CONTEXT_BY_ATTRIBUTE`,
  :func:`toy_esd_context`);
- the prompt sets SalUn, ANT and AdvUnlearn train on (:func:`world_prompt_sets`), computed from the job's final
  settings (its seed and set sizes): SalUn's forget, relabel and retain prompts, ANT's saliency augmentations, and
  AdvUnlearn's retain prompts. A list the user gives is kept.

With any other model the ``toy`` preset gives its numbers alone, and the trainers use their documented templates
for real models ("a photo of {concept}", the COCO retain set) or the user's own lists. The job runner
(``unsee.jobs``) refuses to train a job planned with world prompts on a pipeline that is not the toy model
(:func:`is_toy_pipeline`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from unsee.adapters import fill_concept
from unsee.erasure import METHODS, ConfigError
from unsee.erasure.config import names_concept
from unsee.erasure.registry import coerce

from . import world

__all__ = ["PRESETS", "TOY_BY_ATTRIBUTE", "TOY_CLOSED_FORM_PRESERVE", "TOY_CLOSED_FORM_TEMPLATES",
           "TOY_CLOSED_FORM_UNNAMED", "TOY_ESD_BY_ATTRIBUTE", "TOY_ESD_X_STRICT_BY_ATTRIBUTE",
           "TOY_IN_CONTEXT_BY_ATTRIBUTE", "TOY_MACE_PRESERVE", "TOY_MACE_PROMPTS", "TOY_PRESETS",
           "TOY_WORLD_METHODS", "WORLD_PROMPT_KEYS", "closed_form_guides", "fuse_settings", "is_toy_model_name",
           "is_toy_pipeline", "preset_settings", "relabel_prompt", "toy_esd_context", "world_prompt_sets"]

# methods whose prompt sets the toy preset draws from the shapes world (:func:`world_prompt_sets`)
TOY_WORLD_METHODS = ("salun", "ant", "advunlearn", "uce", "rece")
# the closed-form methods' preserve set on the toy model: "" and this many prompts naming the concept's siblings
TOY_CLOSED_FORM_PRESERVE = 16
# and this many world prompts (shape, colour, background) naming none of the erased concepts
TOY_CLOSED_FORM_UNNAMED = 32
# their templates on the toy model: the concept alone and after the article, as world prompts begin ("a striped red
# circle ..."); RECE's epochs brought circles back (53%) with these until they held the erased columns (hold_erased)
TOY_CLOSED_FORM_TEMPLATES = ("{concept}", "a {concept}")
# MACE's fusion on the toy model (``unsee fuse --method mace``): this many world prompts naming each fused concept
# are refitted too, and "" and this many naming none of them are preserved (docs/toy-presets.md, MACE)
TOY_MACE_PROMPTS = 16
TOY_MACE_PRESERVE = 48
_PROMPT_KEYS = ("erase_from", "preserve", "guide", "templates")
_SET_KEYS = ("forget_prompts", "relabel_prompts", "retain_prompts", "saliency_prompts")
WORLD_PROMPT_KEYS = _PROMPT_KEYS + _SET_KEYS  # what the toy preset adds for the toy model only
ADVUNLEARN_RETAIN_PROMPTS = 64  # world prompts in AdvUnlearn's retain set on the toy model
# the largest values the trainers' configs accept for the settings the prompt sets are drawn with (a larger one is
# left to the config to refuse, before any prompt is drawn)
_LIMITS = {"seed": 2**32 - 1, "num_forget": 10_000, "num_retain": 10_000}

_TOY_ESD_X = {"steps": 200, "lr": 5e-4, "eta": 2.0, "ddim_steps": 25}
_TOY_ESD_ALL = {"steps": 200, "lr": 5e-5, "eta": 2.0, "ddim_steps": 25}
# tuned per attribute (TOY_ESD_BY_ATTRIBUTE, TOY_ESD_X_STRICT_BY_ATTRIBUTE)
_ESD_X_METHODS = ("esd-x", "esd-x-strict")
# On the toy model, for a concept of the world, these methods erase it in context (docs/toy-presets.md): how many
# world prompts naming it go to erase_from, and how many naming its siblings to preserve (0: none)
TOY_IN_CONTEXT: dict[str, dict[str, int]] = {
    "esd-u": {"erase_from": 16, "preserve": 10},
    "spm": {"erase_from": 16, "preserve": 0},
    "advunlearn": {"erase_from": 48, "preserve": 0},
}

TOY_PRESETS: dict[str, dict[str, Any]] = {
    "esd-x": dict(_TOY_ESD_X),
    "esd-x-strict": dict(_TOY_ESD_X),
    "esd-u": {"steps": 200, "lr": 1e-4, "eta": 4.0, "ddim_steps": 25},  # and TOY_IN_CONTEXT
    "esd-all": dict(_TOY_ESD_ALL),
    "spm": {"steps": 200, "lr": 4e-3, "guidance": 4.0, "ddim_steps": 25, "la_strength": 100.0},
    "salun": {"steps": 150, "lr": 5e-5, "num_forget": 128, "num_retain": 128, "generation_steps": 25},
    "advunlearn": {"steps": 250, "lr": 3e-4, "eta": 6.0, "ddim_steps": 25, "warmup": 30, "attack_steps": 10,
                   "attack_lr": 1e-2},
    "ant": {"steps": 200, "lr": 1e-3, "eta": 2.0, "ddim_steps": 20, "before_step": 2, "saliency_iterations": 2,
            "parameters": "esd-x", "mask_fraction": 0.9},
    # closed form (no training steps; RECE's steps are its epochs); the guide and the preserve set come from
    # world_prompt_sets
    # closed form: every token from the concept's on (the paper's s_e 1, λ 0.5), guided to the next value of the
    # concept's attribute (closed_form_guides), keeping "" + the siblings + prompts naming none (world_prompt_sets,
    # with the templates); RECE's epochs hold the UCE edit's columns (four concepts came back without)
    "uce": {"steps": 1, "tokens": "rest"},
    "rece": {"steps": 1, "tokens": "rest", "hold_erased": True},
}

# SPM erasing several concepts in one run on the toy model: Latent Anchoring at the one-concept weight (100) holds
# the run back (circle and red left in every image with four concepts); at 10, with each concept's own guidance,
# circle, star, red and striped all go below 4% at 2-3 points of accuracy elsewhere (docs/erasure-notes.md). Tuned
# without preserved prompts: a colour's (TOY_IN_CONTEXT_BY_ATTRIBUTE) are left out of such a run.
TOY_SPM_SEVERAL: dict[str, Any] = {"la_strength": 10.0, "preserve": ()}
# ESD-x erasing several concepts in one run on the toy model: every concept in context (this many world prompts
# naming it) with this many naming its siblings preserved, at one learning rate and eta for all, whatever the first
# concept. With each concept's own single-run settings (shapes and colours bare, the first concept's rates) circle,
# star, red and striped in one run lost 6-8 points elsewhere and left striped in 19-25% of its images; with these,
# at most 6.2% each and nothing lost (docs/toy-presets.md, ESD-x)
TOY_ESD_X_SEVERAL: dict[str, Any] = {"erase_from": 16, "preserve": 10, "lr": 5e-4, "eta": 3.0}

# Other methods on the toy model, by the attribute of the concept (a style is a texture, not a layout: it needs a
# stronger erase target); applied over TOY_PRESETS
TOY_BY_ATTRIBUTE: dict[str, dict[str, dict[str, Any]]] = {
    "esd-u": {"style": {"lr": 3.5e-4, "eta": 6.0}},
    "spm": {"style": {"guidance": 8.0}},
    # the official single-concept script's phase order: the last steps are kept (see erasure/ant.py)
    "ant": {"style": {"keep_phase": "late", "lr": 2e-3, "eta": 3.0, "mask_fraction": 1.0}},
    "advunlearn": {"style": {"eta": 8.0, "steps": 350}},
}
# In-context counts for one attribute, over TOY_IN_CONTEXT: {method: {attribute: TOY_IN_CONTEXT-style counts}}.
# SPM erasing a colour drew the other colours along (5.2 points lost elsewhere for "red"); anchoring 10 prompts of
# the other colours keeps them (docs/erasure-notes.md, SPM)
TOY_IN_CONTEXT_BY_ATTRIBUTE: dict[str, dict[str, dict[str, int]]] = {
    "ant": {"style": {"erase_from": 16, "preserve": 0}},
    "spm": {"color": {"erase_from": 16, "preserve": 10}},
}

# ESD on the toy model, by the attribute the concept belongs to: learning rate, eta, and how many world prompts
# go to erase_from (naming the concept) and to preserve (naming its siblings); 0 = none
TOY_ESD_BY_ATTRIBUTE: dict[str, dict[str, Any]] = {
    "shape": {"lr": 5e-4, "eta": 2.0, "erase_from": 0, "preserve": 0},
    "background": {"lr": 5e-4, "eta": 2.0, "erase_from": 0, "preserve": 0},
    "color": {"lr": 2e-4, "eta": 1.0, "erase_from": 0, "preserve": 0},
    "style": {"lr": 2e-3, "eta": 3.0, "erase_from": 16, "preserve": 10},
}
# ESD-x-strict (keys and values only) over TOY_ESD_BY_ATTRIBUTE, chosen for MACE's fusion: at ESD-x's rates the
# four-concept fusion (circle, star, red, striped) left circle and striped in 15.6% of images, at these 3.1% and
# nothing lost elsewhere; at ESD-x's colour rates (lr 2e-4, eta 1) the red adapter erased red at training seed 0
# and nothing at seed 1 (docs/toy-presets.md, MACE)
TOY_ESD_X_STRICT_BY_ATTRIBUTE: dict[str, dict[str, Any]] = {
    "shape": {"lr": 1e-3},
    "color": {"lr": 4e-4, "eta": 2.0},
    "style": {"lr": 4e-3},
}


def _esd_table(method: str, attribute: str) -> dict[str, Any]:
    """ESD-x's (or ESD-x-strict's) toy settings for a concept of ``attribute``."""
    strict = TOY_ESD_X_STRICT_BY_ATTRIBUTE.get(attribute, {}) if method == "esd-x-strict" else {}
    return {**TOY_ESD_BY_ATTRIBUTE[attribute], **strict}


def toy_esd_context(concept: str, method: str = "esd-x") -> dict[str, Any]:
    """ESD-x's (or ESD-x-strict's) settings for a concept of the shapes world by its attribute ({} for other
    concepts)."""
    attribute = _world_attribute(concept)
    if attribute is None:
        return {}
    table = _esd_table(method, attribute)
    return {"lr": table["lr"], "eta": table["eta"],
            **_context_prompts(concept, erase_from=table["erase_from"], preserve=table["preserve"])}


def _world_attribute(concept: str) -> Optional[str]:
    """The attribute a concept of the shapes world belongs to (None for other concepts)."""
    try:
        return world.concept_attribute(concept)[0]
    except ValueError:
        return None


def _in_context(method: str, attribute: str) -> Optional[dict[str, int]]:
    """How many world prompts ``method`` erases a concept of ``attribute`` from and preserves (None: neither)."""
    context = {**TOY_IN_CONTEXT.get(method, {}), **TOY_IN_CONTEXT_BY_ATTRIBUTE.get(method, {}).get(attribute, {})}
    return context or None


def _context_prompts(concept: str, erase_from: int, preserve: int) -> dict[str, Any]:
    """``erase_from``: that many world prompts naming the concept; ``preserve``: that many naming its siblings."""
    settings: dict[str, Any] = {}
    if erase_from:
        settings["erase_from"] = world.concept_prompts(concept, 0, erase_from)
    if preserve:
        settings["preserve"] = world.other_prompts(concept, 0, preserve)
    return settings


PRESETS: dict[str, dict[str, dict[str, Any]]] = {"paper": {}, "toy": TOY_PRESETS}


def _more_contexts(method: str, concepts: list[str], merged: Mapping[str, Any]) -> dict[str, Any]:
    """The in-context prompts of a run that erases several concepts (ESD, SPM): each concept's world prompts, as
    one concept's run would get them (ESD-x: as :data:`TOY_ESD_X_SEVERAL` gives them to every concept), together;
    preserved prompts that name any erased concept left out."""
    several = {key: TOY_ESD_X_SEVERAL[key] for key in ("erase_from", "preserve")} if method == "esd-x" else None
    if several:  # the first concept's prompts come from the loop too, each prompt once
        prompts: dict[str, list[str]] = {"erase_from": [], "preserve": []}
        start = 0
    else:
        first = merged.get("erase_from")
        first = [first] if isinstance(first, str) else list(first or [])
        prompts = {"erase_from": [p for p in first if _first_named(p, concepts) == 0],
                   "preserve": list(merged.get("preserve") or [])}
        start = 1
    for index, concept in enumerate(concepts[start:], start):
        attribute = _world_attribute(concept)
        if attribute is None:
            continue
        if several:
            context = several
        elif method in _ESD_X_METHODS:
            table = _esd_table(method, attribute)
            context = {"erase_from": table["erase_from"], "preserve": table["preserve"]}
        else:
            context = _in_context(method, attribute)
        for key, values in _context_prompts(concept, **(context or {"erase_from": 0, "preserve": 0})).items():
            # a prompt that names an earlier concept too would train that one (the trainer's rule): left out
            values = [p for p in values if key != "erase_from" or _first_named(p, concepts) == index]
            if several:
                values = list(dict.fromkeys(values))
            prompts[key] += [p for p in values if p not in prompts[key]]
    prompts["preserve"] = [p for p in prompts["preserve"] if not any(_names(p, c) for c in concepts)]
    return {key: values for key, values in prompts.items() if values or key in merged}


def _several_concepts(method: str, concepts: list[str], merged: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of a run that erases several concepts: ESD-x's learning rate and eta (:data:`TOY_ESD_X_SEVERAL`);
    SPM's :data:`TOY_SPM_SEVERAL` and each concept's own guidance (its attribute's, as one concept's run gets it; a
    concept outside the world takes the first's)."""
    if method == "esd-x":
        return {"lr": TOY_ESD_X_SEVERAL["lr"], "eta": TOY_ESD_X_SEVERAL["eta"]}
    if method != "spm":
        return {}
    first = merged.get("guidance", TOY_PRESETS["spm"]["guidance"])

    def guidance(concept: str) -> float:
        attribute = _world_attribute(concept)
        if attribute is None:
            return first
        return TOY_BY_ATTRIBUTE["spm"].get(attribute, {}).get("guidance", TOY_PRESETS["spm"]["guidance"])

    return {**TOY_SPM_SEVERAL, "guidance": [first] + [guidance(c) for c in concepts[1:]]}


def _first_named(prompt: str, concepts: list[str]) -> Optional[int]:
    """The index of the first of ``concepts`` that ``prompt`` names, as the trainers assign erase_from prompts."""
    return next((i for i, concept in enumerate(concepts) if names_concept(prompt, concept)), None)


def is_toy_model_name(model: Union[str, os.PathLike, None]) -> bool:
    """Whether a model setting names the embedded toy model: ``"toy"`` or the path of its folder."""
    if model is None:
        return False
    if str(model) == "toy":
        return True
    from .model import TOY_MODEL_DIR

    try:
        return Path(model).expanduser().resolve() == TOY_MODEL_DIR.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def _toy_vocabulary() -> Optional[tuple]:
    """The shipped toy tokenizer's vocabulary (token -> id, sorted), or None when the toy model is not installed."""
    from .model import TOY_MODEL_DIR

    folder = TOY_MODEL_DIR / "tokenizer"
    if not folder.is_dir():
        return None
    from transformers import CLIPTokenizer

    try:
        return tuple(sorted(CLIPTokenizer.from_pretrained(str(folder)).get_vocab().items()))
    except (OSError, ValueError):
        return None


def _same(a: Any, b: Any) -> bool:
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)
    return norm(a) == norm(b)


def is_toy_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` is the embedded toy model (or a fine-tune of it): its UNet has the toy's architecture
    (``unsee.toy.UNET_CONFIG``) and its tokenizer the shipped toy tokenizer's vocabulary, the world's words as
    single tokens. Structural signals only: never the concept, the prompts or the pipeline's name."""
    from .model import UNET_CONFIG

    unet_config = getattr(getattr(pipe, "unet", None), "config", None)
    tokenizer = getattr(pipe, "tokenizer", None)
    if unet_config is None or tokenizer is None or getattr(pipe, "text_encoder_2", None) is not None:
        return False
    if not all(_same(unet_config.get(key), value) for key, value in UNET_CONFIG.items()):
        return False
    vocabulary = _toy_vocabulary()
    get_vocab = getattr(tokenizer, "get_vocab", None)
    return vocabulary is not None and callable(get_vocab) and tuple(sorted(get_vocab().items())) == vocabulary


def preset_settings(preset: Optional[str], method: str, model: Union[str, os.PathLike] = "toy",
                    concept: Optional[str] = None, settings: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The settings ``method`` trains with: what ``preset`` gives it (None: ``toy`` for the toy model, else
    ``paper``), with the user's own ``settings`` (config fields) over them.

    With the ``toy`` preset, the toy model (``model``: ``"toy"`` or its folder; :func:`is_toy_model_name`) and a
    ``concept`` of the shapes world, also the world's prompts: those ESD, SPM, AdvUnlearn and ANT erase it from in
    context (and ESD's preserved prompts), and the prompt sets of SalUn, ANT and AdvUnlearn
    (:func:`world_prompt_sets`, computed from the merged settings: the user's seed and set sizes count, and a list
    the user gives is kept). For any other model the ``toy`` preset gives its numbers only: a model that is not the
    toy never gets toy-world prompts.
    """
    toy_model = is_toy_model_name(model)
    if preset is None:
        preset = "toy" if toy_model else "paper"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    merged = dict(PRESETS[preset].get(method, {}))
    if preset == "toy" and method in _ESD_X_METHODS and isinstance(concept, str):
        merged.update(toy_esd_context(concept, method))
    attribute = _world_attribute(concept) if isinstance(concept, str) else None
    if preset == "toy" and attribute is not None:
        merged.update(TOY_BY_ATTRIBUTE.get(method, {}).get(attribute, {}))
        context = _in_context(method, attribute)
        if context:
            merged.update(_context_prompts(concept, **context))
    more = (settings or {}).get("concepts")
    if preset == "toy" and isinstance(concept, str) and more and _prompt_list(more) and method not in TOY_WORLD_METHODS:
        merged.update(_more_contexts(method, [concept, *more], merged))
        merged.update(_several_concepts(method, [concept, *more], merged))
    if not toy_model:  # the world's prompts are for the toy model only
        for key in WORLD_PROMPT_KEYS:
            merged.pop(key, None)
    merged.update(settings or {})
    if preset == "toy" and toy_model and attribute is not None and method in TOY_WORLD_METHODS:
        merged.update(world_prompt_sets(method, concept, merged))
    return merged


def relabel_prompt(prompt: str, concept: str) -> str:
    """A world prompt with ``concept`` replaced by the next value of its attribute ("circle" -> "square"): what
    SalUn's relabelled images are taken for on the toy model."""
    attribute, value = world.concept_attribute(concept)
    values = [v for v in world.ATTRIBUTE_VALUES[attribute] if v != world.NO_SHAPE]
    named = world.parse_prompt(prompt)
    if named.get(attribute) != value:
        raise ConfigError(f"cannot relabel {prompt!r}: it does not name {concept!r}; pass relabel_prompts")
    named[attribute] = values[(values.index(value) + 1) % len(values)]
    return world.prompt_for(**named)


def _setting(method: str, settings: Mapping[str, Any], name: str, low: int) -> Optional[int]:
    """A whole-number setting as the config will hold it (the config's default when not set), or None when the
    value is not one the config accepts (the config then reports it)."""
    if name in settings:
        value = coerce(name, settings[name], int)
    else:
        value = next(f.default for f in dataclasses.fields(METHODS[method].config) if f.name == name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _LIMITS[name]:
        return None
    return value


def _prompt_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)


def world_prompt_sets(method: str, concept: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The prompt sets the shapes world gives ``method`` for ``concept``, for those ``settings`` lack (None counts as
    not given); ``settings`` are the job's final ones (their ``seed``, ``num_forget`` and ``num_retain`` count).

    - SalUn: ``forget_prompts``: ``num_forget`` world prompts naming the concept (seed ``seed``);
      ``relabel_prompts``: each forget prompt with the concept replaced by the next value of its attribute
      (:func:`relabel_prompt`); ``retain_prompts``: ``num_retain`` prompts naming the attribute's other values
      (seed ``seed + 1``);
    - ANT: ``saliency_prompts``: the concept and its synonyms in the world ("circle", "ball", "disc");
    - AdvUnlearn: ``retain_prompts``: 64 world prompts that do not name the concept (seed ``seed``);
    - UCE and RECE: ``preserve``: ``""`` and :data:`TOY_CLOSED_FORM_PRESERVE` prompts naming the concept's siblings
      (seed ``seed``), leaving out those that name any concept of the job (``concept`` and ``concepts``), and up
      to :data:`TOY_CLOSED_FORM_UNNAMED` prompts naming none of them (seed ``seed + 1``); ``templates``:
      :data:`TOY_CLOSED_FORM_TEMPLATES` (the concept alone and "a {concept}");
      ``guide``: what each erased concept becomes, :func:`closed_form_guides` ("circle" -> "square"). The
      empty-prompt guide cannot erase a shape on the toy model: prompts with the shape word removed ("a red on a
      gray background") still draw circles in 31% of images (docs/erasure-notes.md).

    Other methods get nothing. Raises :class:`~unsee.erasure.ConfigError` for a concept outside the world, or a
    forget prompt of the user's that does not name the concept (it cannot be relabelled).
    """
    if method not in TOY_WORLD_METHODS:
        return {}
    try:
        _, value = world.concept_attribute(concept)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    given = (lambda key: settings.get(key) is not None)
    sets: dict[str, Any] = {}
    if method == "salun":
        seed = _setting(method, settings, "seed", 0)
        forget = None
        if given("forget_prompts"):
            if _prompt_list(settings["forget_prompts"]):
                forget = fill_concept(settings["forget_prompts"], concept)  # as the config fills it
        else:
            num_forget = _setting(method, settings, "num_forget", 1)
            if seed is not None and num_forget is not None:
                forget = sets["forget_prompts"] = world.concept_prompts(concept, seed, num_forget)
        if not given("relabel_prompts") and forget is not None:
            sets["relabel_prompts"] = [relabel_prompt(p, concept) for p in forget]
        num_retain = _setting(method, settings, "num_retain", 1)
        if not given("retain_prompts") and seed is not None and num_retain is not None:
            sets["retain_prompts"] = world.other_prompts(concept, seed + 1, num_retain)
    elif method == "ant":
        if not given("saliency_prompts"):
            sets["saliency_prompts"] = [concept] + [word for word in world.SYNONYMS.get(value, (value,))
                                                    if word != concept.strip().lower()]
    elif method == "advunlearn":
        seed = _setting(method, settings, "seed", 0)
        if not given("retain_prompts") and seed is not None:
            sets["retain_prompts"] = tuple(world.other_prompts(concept, seed, ADVUNLEARN_RETAIN_PROMPTS))
    elif method in ("uce", "rece"):
        seed = _setting(method, settings, "seed", 0)
        if not given("preserve") and seed is not None:
            more = settings.get("concepts") or ()
            erased = [concept, *(more if _prompt_list(more) else ())]
            siblings = world.other_prompts(concept, seed, TOY_CLOSED_FORM_PRESERVE)
            sets["preserve"] = [""] + [p for p in siblings if not any(_names(p, c) for c in erased)]
            unnamed = world.attribute_prompts(seed + 1, 8 * TOY_CLOSED_FORM_UNNAMED)
            sets["preserve"] += [p for p in unnamed
                                 if not any(_names(p, c) for c in erased)][:TOY_CLOSED_FORM_UNNAMED]
        if not given("templates"):
            sets["templates"] = list(TOY_CLOSED_FORM_TEMPLATES)
        if not given("guide"):
            more = settings.get("concepts") or ()
            guides = closed_form_guides([concept, *(more if _prompt_list(more) else ())])
            sets["guide"] = guides[0] if len(guides) == 1 else guides
    return sets


def fuse_settings(concepts: list[str], seed: int = 0) -> dict[str, Any]:
    """MACE's fusion (``unsee.fuse_adapters(method="mace")``) on the toy model: ``prompts``, each concept of the
    world with :data:`TOY_MACE_PROMPTS` world prompts naming it (seed ``seed``; a concept outside the world gets
    none), and ``preserve``, ``""`` and :data:`TOY_MACE_PRESERVE` world prompts naming none of ``concepts``."""
    prompts = {}
    for concept in concepts:
        try:
            world.concept_attribute(concept)
        except ValueError:
            continue
        prompts[concept] = world.concept_prompts(concept, seed, TOY_MACE_PROMPTS)
    unnamed = [p for p in world.attribute_prompts(seed, 8 * TOY_MACE_PRESERVE)
               if not any(_names(p, c) for c in concepts)]
    return {"prompts": prompts, "preserve": [""] + unnamed[:TOY_MACE_PRESERVE]}


def closed_form_guides(concepts: list[str]) -> list[str]:
    """The guide of each erased concept for UCE and RECE on the toy model: the next value of its attribute in the
    world that is not erased too ("circle" -> "square", "red" -> "orange", "striped" -> "solid"; "circle" with
    "square" -> "triangle"), or ``""`` (the empty prompt) for a concept outside the world or an attribute with
    every value erased."""
    erased = set()
    for concept in concepts:
        try:
            erased.add(world.concept_attribute(concept))
        except ValueError:
            pass
    guides = []
    for concept in concepts:
        try:
            attribute, value = world.concept_attribute(concept)
        except ValueError:
            guides.append("")
            continue
        values = [v for v in world.ATTRIBUTE_VALUES[attribute] if v != world.NO_SHAPE]
        start = values.index(value)
        following = [values[(start + i) % len(values)] for i in range(1, len(values))]
        guides.append(next((v for v in following if (attribute, v) not in erased), ""))
    return guides


def _names(prompt: str, concept: str) -> bool:
    """Whether a world prompt names ``concept`` (the value it stands for, or its words)."""
    try:
        attribute, value = world.concept_attribute(concept)
    except ValueError:
        return concept.strip().lower() in prompt.lower()
    return world.parse_prompt(prompt).get(attribute) == value
