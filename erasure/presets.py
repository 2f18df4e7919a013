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
  ESD-u (the paper's code's parameter rule: not ``conv_out``, not the time embedding) is erased in context
  too, for every concept of the world (``TOY_IN_CONTEXT``: 16 prompts naming it, 10 naming siblings,
  preserved), at lr 1e-4 and eta 4. Tuning runs ("circle"): bare word, lr 1e-4 eta 2, with ``conv_out`` and
  the time embedding trained (the 2025 rewrite's rule): 19% / 75%, every black and white background turned
  gray; lr 5e-5 eta 2: 72% / 99%; with the paper's rule, in context: lr 1e-4 eta 2 34% / 96%, plus preserve
  at lr 2e-4 28% / 92%, at lr 3e-4 (30 preserve prompts, weight 3) 75% / 71%; lr 1e-4 eta 4 with preserve
  0% / 97% (the preset). ESD-all keeps the gentle lr 5e-5, eta 2 (lr 1e-4: 6% presence, background right in
  53% of other prompts).
  SalUn's preset (world prompts as forget and retain sets) erased circle 0% / 100%, red 0% / 98%,
  striped 9% / 99% in tuning.
  SPM ("circle"): lr 4e-3 guidance 1: 75% / 100%; lr 1e-2: 97% / 96%; lr 4e-3 guidance 2: 38% / 100%;
  guidance 4: 12% / 98% (the preset); the same with the paper's anchoring strength 1000: 100% / 100%;
  guidance 6 for 300 steps: 25% / 99%. Rank-1 SPMs trained on the bare word varied from run to run on this
  model (25% at evaluation seed 1234 and 69% at seed 5, 16 images each). In context (``TOY_IN_CONTEXT``: 16
  world prompts naming the concept in ``erase_from``), the preset's settings: 0% / 100% at training seeds 0,
  1 and 2 (the circle's colour kept in 100%, 91% and 75% of its prompts); guidance 2: 100% (nothing erased).
  ANT ("circle"): the paper's full-UNet mask at lr 1e-4: 100% / 100%; at lr 1e-3 (eta 2, 20 DDIM steps):
  41% with the background right in 31% of other prompts (gray again); the mask over cross-attention weights
  only (``parameters="esd-x"``) at lr 5e-4: 91%; at lr 1e-3: 66%; before_step 1, lr 2e-3: 78%; the mask keeps
  7% of the candidates at ``mask_fraction`` 0.5 (intersected over 15 augmentations: 3 words x 5 seeds); at
  0.9, before_step 2, lr 1e-3: 6% / 99%, background kept in 100% of the concept's prompts (the preset).
  AdvUnlearn ("circle"; text encoder): the bare word, 150 steps: lr 1e-4: 56% / 100%; lr 5e-4: 62%; lr 3e-4
  eta 2: 38% / 100%; lr 5e-4 eta 3: 75% / 99%. In context (``TOY_IN_CONTEXT``), 150 steps: lr 3e-4 eta 2: 56%;
  lr 1e-4: 100%; lr 1e-3: 25% / 91% (shapes elsewhere drift); without the attack (warmup 150): 56%; 250 steps
  at lr 3e-4, eta 4: 9% / 100% (training seed 1: 22% / 97%), attack success on 16 prompts 19% (13% without
  the attack); the inner attack at lr 1e-2 (the toy's token embeddings are ~0.02 per element, so 10 steps at
  the paper's 1e-3 barely move the prefix): 3% / 95%, attack success 6% (all of it without the attack; the
  previous preset; a second run of it gave 6% / 85%); with 5 prefix tokens: 6% / 93%, attack success 13%; with
  48 prompts in ``erase_from``: 0% / 91% (squares turn to triangles), attack success 6%; the same at eta 6:
  0% / 95%, attack success 0% (the preset). On "striped" with the paper's 30 inner attack steps: 0% / 97%,
  attack success 6% (1 of 16), as with 10; with ``attack_init="latest"``: 0% / 100%, attack success 6% again; with
  5 adversarial prefix tokens in training, as many as the evaluator's attack uses: 3% / 97%, 400 s, attack
  success 6% (1 of 16) again; at eta 8 for 350 steps: 3% / 100%, 516 s, attack success 0% (0 of 16;
  ``TOY_BY_ATTRIBUTE``).
  Style concepts ("striped", 32 images): with the circle presets ESD-u leaves 61%, SPM 72%, ANT 100%
  (``benchmarks/erasure_methods.py``). SPM at guidance 8: 6% / 99% (``TOY_BY_ATTRIBUTE``). ESD-u in context: lr 2.5e-4:
  72% / 100%; lr 3.5e-4: 16% / 99%; lr 4e-4: 16% / 96%; lr 4.5e-4: 3% / 88% (shapes drift; with preserve weight
  3: 0% / 97%); lr 5e-4: 0% / 89%; lr 1e-3 eta 3: 0% / 76%; lr 3.5e-4 eta 6: 0% / 98% (``TOY_BY_ATTRIBUTE``). ANT
  leaves the style in every setting tried: at lr 3e-3 100%; before_step 1, lr 3e-3, eta 4: 100% (shapes elsewhere
  drift); the full-UNet mask: 100% / 41%; in context (``erase_from``, 16 prompts): lr 1e-3 100%, every
  cross-attention weight (``mask_fraction`` 1) 100%, at lr 2e-3 eta 3 100% with 7 of 32 "solid" prompts turned
  striped; without the enhance term (``enhance_weight`` 0, no longer ANT) lr 2e-3: 34% (7 "solid" prompts
  striped), lr 4e-3: 34% / 39%; enhance 0.25, before_step 1: 84%. With the in-context enhance target on the
  concept's direction only (``eps*(c_from) + eta (eps*(c) - eps*(""))``, the next one; the runs above enhanced the
  whole prompt), lr 2e-3 eta 3: 100% (mask 0.9), 97% (every cross-attention weight). Ablations at lr 2e-3, eta 3,
  every cross-attention weight, in context: enhance weight 1 and no unconditional terms 97%; no enhance term,
  before_step 1: 12% / 93% (unconditional terms 0.5), 0% / 89% (none) -- ESD-x in all but name. ANT's early
  enhance term is what keeps the style. The in-context targets now put ``c_from`` less the concept's direction where
  the paper has ``eps*("")`` (so eta 1 keeps ``c_from`` early and erases with ``c_from - 2 (eps*(c) - eps*(""))``;
  the runs above used ``c_from +- eta (...)``); 16 prompts, lr 2e-3, every cross-attention weight: eta 1 91% (0 early
  weight: 34% / 92%); eta 2 94% (0 early weight: 19% / 97%); eta 3 100%; the LoRA (rank 4, lr 2e-3) at eta 1
  and 2: 100% (100% elsewhere too: it hardly moved); the full-UNet mask (0.5) at lr 5e-4 eta 1 and lr 1e-3 eta 2:
  100%. Every UNet weight trained (mask 1): eta 1 lr 2e-4 100% / 98%, lr 5e-4 100% / 74% (the style wrong in
  62% of other prompts), eta 2 lr 5e-4 100% / 78%; every weight but cross-attention (ESD-u's rule, which can
  tell the timesteps apart): eta 1 lr 3.5e-4 100% / 98%, eta 3 100% / 97%, eta 1 lr 1e-3 88% / 61%. Every
  cross-attention weight, lr 2e-3, eta 3, by the early terms' weight ``enhance_weight``: 0: 0% / 97%; 0.1: 44% /
  90%; 0.3: 84% / 96%; 1: 100%; and at eta 1 keeping the first step only (before_step 1, t = 951, nearly pure
  noise): 100% / 92%. Even the plain keep of the early steps holds the stripes. With the official single-concept
  script's order (``keep_phase="late"``: the last 2 of 20 steps kept, the 18 before them erased), in context, lr
  2e-3, every cross-attention weight: eta 1 56% / 90% (the style wrong in 31% of other prompts), eta 2 19% / 96%,
  eta 3 3% / 100% (``TOY_BY_ATTRIBUTE``, ``TOY_IN_CONTEXT_BY_ATTRIBUTE``); the bare word at the circle preset 88% / 99%. The stripes are
  not set in the steps ANT keeps: on the original model, 25 DDIM steps from "a striped <color> <shape>" switched
  to "a solid ..." after k steps give stripes in 0% (k = 3), 3% (4), 28% (6), 59% (10) of 32 images
  (``benchmarks/style_onset.py``).
  The benchmarks' figures are in ``BENCHMARKS.md`` (``benchmarks/erasure_efficacy.py``,
  ``benchmarks/erasure_methods.py``).

``unsee erase`` and job files use ``toy`` when the model is ``"toy"`` and ``paper`` otherwise, unless
``preset`` is given. Explicit settings always win over the preset's.

Prompts from the shapes world go only to the embedded toy model. The ``toy`` preset adds them (ESD's, SPM's,
AdvUnlearn's and ANT's in-context ``erase_from`` and ``preserve`` lists, and ``toy_world=True``, with which
SalUn, ANT and AdvUnlearn draw the prompt sets they are not given from the world) only when ``model`` is the
toy model (:func:`is_toy_model_name`) and the concept is one of the world's; with any other model it gives its
numbers alone. A trainer with ``toy_world=True`` refuses a pipeline that is not the toy model
(:func:`is_toy_pipeline`), so a job handed another pipeline fails before any work instead of training it on
toy prompts. Without ``toy_world`` the trainers use their documented templates for real models
("a photo of {concept}", the COCO retain set) or the user's own lists.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Optional, Union

from .base import ConfigError

__all__ = ["PRESETS", "TOY_BY_ATTRIBUTE", "TOY_IN_CONTEXT_BY_ATTRIBUTE", "TOY_PRESETS", "TOY_WORLD_METHODS",
           "WORLD_PROMPT_KEYS", "is_toy_model_name", "is_toy_pipeline", "preset_settings", "toy_esd_context"]

# methods whose configs have ``toy_world`` (prompt sets drawn from the shapes world when not given)
TOY_WORLD_METHODS = ("salun", "ant", "advunlearn")
_PROMPT_KEYS = ("erase_from", "preserve")
WORLD_PROMPT_KEYS = _PROMPT_KEYS + ("toy_world",)  # what the toy preset adds for the toy model only

_TOY_ESD_X = {"steps": 200, "lr": 5e-4, "eta": 2.0, "ddim_steps": 25}
_TOY_ESD_ALL = {"steps": 200, "lr": 5e-5, "eta": 2.0, "ddim_steps": 25}
_ESD_X_METHODS = ("esd-x", "esd-x-strict")  # tuned per attribute (TOY_ESD_BY_ATTRIBUTE)
# On the toy model, for a concept of the world, these methods erase it in context (see above): how many world
# prompts naming it go to erase_from, and how many naming its siblings to preserve (0: none)
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
}

# Other methods on the toy model, by the attribute of the concept (a style is a texture, not a layout: it needs a
# stronger erase target); applied over TOY_PRESETS
TOY_BY_ATTRIBUTE: dict[str, dict[str, dict[str, Any]]] = {
    "esd-u": {"style": {"lr": 3.5e-4, "eta": 6.0}},
    "spm": {"style": {"guidance": 8.0}},
    # the official single-concept script's phase order: the last steps are kept (see erasure/ant.py)
    "ant": {"style": {"keep_phase": "late", "lr": 2e-3, "eta": 3.0, "mask_fraction": 1.0}},
    "advunlearn": {"style": {"eta": 8.0, "steps": 350}},
}
# Methods erased in context for one attribute only: {method: {attribute: TOY_IN_CONTEXT-style counts}}
TOY_IN_CONTEXT_BY_ATTRIBUTE: dict[str, dict[str, dict[str, int]]] = {
    "ant": {"style": {"erase_from": 16, "preserve": 0}},
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
    attribute = _world_attribute(concept)
    if attribute is None:
        return {}
    table = TOY_ESD_BY_ATTRIBUTE[attribute]
    return {"lr": table["lr"], "eta": table["eta"],
            **_context_prompts(concept, erase_from=table["erase_from"], preserve=table["preserve"])}


def _world_attribute(concept: str) -> Optional[str]:
    """The attribute a concept of the shapes world belongs to (None for other concepts)."""
    from unsee import world

    try:
        return world.concept_attribute(concept)[0]
    except ValueError:
        return None


def _context_prompts(concept: str, erase_from: int, preserve: int) -> dict[str, Any]:
    """``erase_from``: that many world prompts naming the concept; ``preserve``: that many naming its siblings."""
    from unsee import world

    settings: dict[str, Any] = {}
    if erase_from:
        settings["erase_from"] = world.concept_prompts(concept, 0, erase_from)
    if preserve:
        settings["preserve"] = world.other_prompts(concept, 0, preserve)
    return settings


PRESETS: dict[str, dict[str, dict[str, Any]]] = {"paper": {}, "toy": TOY_PRESETS}


def is_toy_model_name(model: Union[str, os.PathLike, None]) -> bool:
    """Whether a model setting names the embedded toy model: ``"toy"`` or the path of its folder."""
    if model is None:
        return False
    if str(model) == "toy":
        return True
    from unsee.toy import TOY_MODEL_DIR

    try:
        return Path(model).expanduser().resolve() == TOY_MODEL_DIR.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def _toy_vocabulary() -> Optional[tuple]:
    """The shipped toy tokenizer's vocabulary (token -> id, sorted), or None when the toy model is not installed."""
    from unsee.toy import TOY_MODEL_DIR

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
    from unsee.toy import UNET_CONFIG

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
                    concept: Optional[str] = None) -> dict[str, Any]:
    """The settings ``preset`` gives ``method`` (None: ``toy`` for the toy model, else ``paper``).

    With the ``toy`` preset, the toy model (``model``: ``"toy"`` or its folder; :func:`is_toy_model_name`) and a
    ``concept`` of the shapes world, also the world's prompts: those ESD, SPM, AdvUnlearn and ANT erase it from in
    context (and ESD's preserved prompts), and ``toy_world=True`` for SalUn, ANT and AdvUnlearn (their prompt
    sets drawn from the world). For any other model the ``toy`` preset gives its numbers only: a model that is not
    the toy never gets toy-world prompts.
    """
    toy_model = is_toy_model_name(model)
    if preset is None:
        preset = "toy" if toy_model else "paper"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = dict(PRESETS[preset].get(method, {}))
    if preset == "toy" and method in _ESD_X_METHODS and isinstance(concept, str):
        settings.update(toy_esd_context(concept))
    attribute = _world_attribute(concept) if isinstance(concept, str) else None
    if preset == "toy" and attribute is not None:
        settings.update(TOY_BY_ATTRIBUTE.get(method, {}).get(attribute, {}))
        context = TOY_IN_CONTEXT.get(method) or TOY_IN_CONTEXT_BY_ATTRIBUTE.get(method, {}).get(attribute)
        if context:
            settings.update(_context_prompts(concept, **context))
        if method in TOY_WORLD_METHODS:
            settings["toy_world"] = True
    if not toy_model:  # the world's prompts are for the toy model only
        for key in WORLD_PROMPT_KEYS:
            settings.pop(key, None)
    return settings
