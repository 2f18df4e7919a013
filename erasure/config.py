"""The settings every erasure trainer shares (:class:`TrainerConfig`) and the helpers for their prompt settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence, Union

from unsee.adapters import fill_concept, names_concept

from .errors import ConfigError
from .fields import (DEVICE, DTYPE, TEXT, check_settings, check_size, choice, declared_kind, integer, number, prompt_list,
                     setting)

__all__ = ["TrainerConfig", "MIXED_PRECISION", "MAX_CONCEPTS", "CONCEPTS", "fill_concept", "erase_from_prompts",
           "names_concept", "erased_concepts", "check_concept_list", "contexts_by_concept", "for_concept",
           "ConceptsInContext", "TrajectoryReuse"]

#: the most concepts one run erases
MAX_CONCEPTS = 1024
#: the ``concepts`` setting of the methods that erase several concepts in one run (each step draws one of them)
CONCEPTS = prompt_list(allow_empty=True, as_tuple=True)

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainerConfig:
    """Settings every erasure trainer shares. Subclasses add their method's fields and paper defaults.

    Each field is declared with its kind (:func:`unsee.erasure.fields.setting`) and checked on construction and
    by :meth:`validate`; a subclass overrides :meth:`validate` only for checks across fields.

    Args:
        concept: the concept to erase, as a prompt ("circle", "Van Gogh", "nudity").
        steps: optimisation steps.
        lr: Adam learning rate (> 0).
        seed: seeds the generators every random draw comes from (draw 0's, which setup also uses, is seeded with
            it; see ``draws_per_step``).
        checkpoint_every: write a checkpoint every N steps when ``train`` gets a ``checkpoint_dir``
            (0: only when training ends).
        device: ``"cpu"`` forces the CPU; None lets ``accelerate`` pick (its process's GPU when there is one).
        dtype: train in this precision: ``"float32"``, ``"float16"`` or ``"bfloat16"``, spelled as the CLI's
            ``--dtype`` (``"bf16"``, ``"fp16"``...), as torch names it (``"torch.bfloat16"``) or as a ``torch.dtype``;
            stored as ``"bfloat16"`` etc. None keeps the pipeline's. The pipeline is trained on converted copies
            and handed back in its own precision, bit for bit. Low-precision Adam is what the official ESD rewrite
            does; prefer ``mixed_precision`` on GPUs.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` autocast through ``accelerate`` (weights stay as they are).
        draws_per_step: independent draws of the method's step (its x_t, timestep, prompt, batch of ``batch_size``
            where the method has one...) whose losses one optimisation step averages: the global batch of
            data-parallel training, in units of the method's own step. None: one per process. With N processes
            each computes ``draws_per_step / N`` of them (it must be a multiple of N); one process with
            ``draws_per_step=N`` trains the adapter N processes train.
    """

    concept: str = setting("", TEXT, says="a non-empty text such as 'circle'")
    steps: int = setting(1000, integer(1, limits=(1, 100_000)))
    lr: float = setting(1e-5, number(positive=True), label="learning rate", says="a positive number such as 1e-5")
    seed: int = setting(0, integer(0, limits=(0, 2**32 - 1)))
    checkpoint_every: int = setting(100, integer(0, limits=(0, 100_000)),
                                    says="a non-negative integer (0: only at the end)")
    device: Optional[str] = setting(None, DEVICE)
    dtype: Optional[str] = setting(None, DTYPE)
    mixed_precision: str = setting("no", choice(MIXED_PRECISION))
    draws_per_step: Optional[int] = setting(
        None, integer(1, none=True, limits=(1, 1024)),
        says="a positive integer (the draws averaged per step; a multiple of the number of processes) or None "
             "(one per process)")

    method: ClassVar[str] = "base"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def erased(self) -> list[str]:
        """Every erased concept: ``concept``, then the ``concepts`` setting where a method has one."""
        return erased_concepts(self)

    @property
    def text_kv_only(self) -> Optional[bool]:
        """Whether the adapter this config trains changes the UNet's cross-attention keys and values
        (``attn2.to_k``, ``attn2.to_v``) and nothing else, all that MACE's fusion refits (:mod:`unsee.fuse`): True,
        False, or None where only the trained adapter tells (the default)."""
        return None

    #: whether the adapter this config trains changes the text encoders alone (AdvUnlearn's), all that the
    #: ``distill`` fusion fits (:mod:`unsee.erasure.distill`)
    text_encoder_only: ClassVar[bool] = False

    def validate(self) -> None:
        """Raise :class:`~unsee.erasure.ConfigError` naming the first invalid field (each field is checked with its
        declared kind, in declaration order) or a per-concept setting given as a list whose length is not the
        number of erased concepts. Subclasses extend it with checks across fields."""
        check_settings(self)
        erased = self.erased
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and declared_kind(type(self), f.name).per_concept and len(value) != len(erased):
                entries = f"{len(value)} entr{'y' if len(value) == 1 else 'ies'}"
                raise ConfigError(f"{f.name} has {entries} for {len(erased)} erased concept"
                                  f"{'' if len(erased) == 1 else 's'}; give one value, or one per concept (concept "
                                  f"first, then concepts)")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (stored in the adapter and the report)."""
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass
class TrajectoryReuse:
    """The setting of the methods whose steps sample x_t with a DDIM run from fresh noise (ESD, SPM, ANT and
    AdvUnlearn): how many training steps one such run serves.

    Args:
        trajectory_reuse: training steps that one sampled DDIM trajectory serves (1, the papers' recipe: a new run
            every step). With r > 1, every r-th step of a draw makes the draws of the next r steps (the prompts the
            run is conditioned on, fresh noise, and each step's random stop, as the method draws them) and runs
            DDIM once, through the deepest of the r stops, keeping the latents at each; the r steps then train at
            their own stops of that one run, with its prompts. Sampling is most of an ESD step's time on the
            toy model (``benchmarks/esd_profile.py``); r = 4 trained ESD, SPM and ANT there 1.6-2.1x faster
            (``benchmarks/trajectory_reuse.py``). The cost: the steps of one run see correlated x_t and, where the
            model being trained samples, x_t from its weights of up to r - 1 steps before; on the toy model
            ESD-x and AdvUnlearn lost efficacy at r = 4 (``docs/erasure.md``). The method's per-step draws outside the run (SPM's anchors, AdvUnlearn's
            attack) stay per step. Like every setting but ``RESUMABLE_CHANGES``, it must match on resume; the
            trajectory being served is kept in checkpoints, so a resumed run equals an uninterrupted one.
    """

    trajectory_reuse: int = setting(1, integer(1, limits=(1, 1000)),
                                    says="a positive integer (training steps one sampled DDIM trajectory serves; "
                                         "1: a new trajectory every step)")


def erase_from_prompts(value: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """An ``erase_from`` setting as a tuple of prompts (empty: erase the concept wherever it is named)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def erased_concepts(config: Any) -> list[str]:
    """Every concept a config erases: ``concept``, then its ``concepts`` setting when it has one."""
    return [config.concept, *getattr(config, "concepts", ())]


def check_concept_list(concepts: Sequence[str]) -> None:
    """Refuse more than :data:`MAX_CONCEPTS` concepts, or one named twice (case-insensitive)."""
    check_size("concepts", len(concepts), (1, MAX_CONCEPTS))
    lowered = [c.strip().lower() for c in concepts]
    repeated = next((c for i, c in enumerate(concepts) if lowered[i] in lowered[:i]), None)
    if repeated is not None:
        raise ConfigError(f"concept {repeated!r} is erased twice; name each concept once")


def check_preserve_names_none(preserve: Sequence[str], erased: Sequence[str]) -> None:
    """Refuse a preserved prompt that names an erased concept (:func:`names_concept`): keeping it would undo the
    erasure."""
    for prompt in preserve:
        named = next((c for c in erased if names_concept(prompt, c)), None)
        if named is not None:
            raise ConfigError(f"preserve prompt {prompt!r} names the erased concept {named!r}; remove it from "
                              f"preserve")


def contexts_by_concept(concepts: Sequence[str], erase_from: Union[str, Sequence[str], None]) -> list[tuple[str, ...]]:
    """The ``erase_from`` prompts of each of several erased concepts: every prompt goes to the first concept it names
    (:func:`names_concept`); a concept that none names is erased bare. One concept takes every prompt, whatever it
    names ("hat" from "cowboy"); with several, a prompt that names none of them is refused."""
    prompts = erase_from_prompts(erase_from)
    if len(concepts) == 1:
        return [prompts]
    found: list[list[str]] = [[] for _ in concepts]
    for prompt in prompts:
        index = next((i for i, concept in enumerate(concepts) if names_concept(prompt, concept)), None)
        if index is None:
            raise ConfigError(f"erase_from prompt {prompt!r} names none of the erased concepts "
                              f"({', '.join(repr(c) for c in concepts)}); with several concepts each erase_from prompt "
                              f"must name the concept it erases in context")
        found[index].append(prompt)
    return [tuple(p) for p in found]


def for_concept(value: Any, index: int) -> Any:
    """The value of a per-concept setting (:func:`~unsee.erasure.fields.per_concept`) for erased concept ``index``:
    its entry there when it is a list, else the value itself."""
    return value[index] if isinstance(value, tuple) else value


class ConceptsInContext:
    """Mixin for the configs of methods that erase several concepts (``concepts``) and erase in context
    (``erase_from``): the concepts are checked as a list, and each ``erase_from`` prompt must name one of them."""

    def validate(self) -> None:
        super().validate()  # type: ignore[misc]
        check_concept_list(self.erased)  # type: ignore[attr-defined]
        contexts_by_concept(self.erased, self.erase_from)  # type: ignore[attr-defined]
