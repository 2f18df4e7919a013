"""Evaluation and the prompt attack on the toy world: its prompts and its judge as the defaults.

    from unsee import toy
    result = toy.evaluate(pipe, concept="circle", n=64)      # world prompts that name "circle", the toy judge
    result.presence                                          # share of images showing a circle
    result = toy.evaluate(pipe, ["a red star on a gray background"], n=16)
    result.accuracy                                          # {"shape": 0.94, "color": 1.0, ...}
    named, others = toy.evaluate_erasure(pipe, "circle")     # an erasure's two figures
    toy.attack(pipe, "circle", n=16).success_rate            # UnlearnDiffAtk-style attack on world prompts

Expected values come from each prompt's words (:func:`unsee.toy.world.parse_prompt`), a concept's from
:func:`unsee.toy.world.concept_attribute`. The work is done by :mod:`unsee.evaluation` and :mod:`unsee.attack`,
which take prompts and judges explicitly.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from unsee import attack as _attack
from unsee import evaluation as _evaluation
from unsee.attack import AttackConfig, AttackResult
from unsee.evaluation import EvaluationResult, JudgeFn

from . import world
from .judge import default_judge

__all__ = ["attack", "evaluate", "evaluate_erasure", "score"]


def _judge_or_default(judge: Optional[JudgeFn]) -> JudgeFn:
    """``judge``, or the toy judge, loaded when it is first called (after the inputs are checked and the images made)."""
    if judge is not None:
        return judge
    loaded: list[JudgeFn] = []

    def toy_judge(images: list) -> list[dict[str, str]]:
        if not loaded:
            loaded.append(default_judge())
        return loaded[0](images)

    return toy_judge


def score(prompts: Sequence[str], predictions: Sequence[dict[str, str]],
          concept: Optional[str] = None) -> tuple[dict[str, float], Optional[float]]:
    """:func:`unsee.evaluation.score` with the world's prompt parser and concepts."""
    return _evaluation.score(prompts, predictions, concept, parse_prompt=world.parse_prompt,
                             concept_attribute=world.concept_attribute)


def evaluate(
    pipe,
    prompts: Union[str, Sequence[str], None] = None,
    concept: Optional[str] = None,
    judge: Optional[JudgeFn] = None,
    n: int = 32,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 8,
    keep_images: bool = False,
    **pipe_kwargs: Any,
) -> EvaluationResult:
    """Generate ``n`` images and score them with ``judge`` (:func:`unsee.evaluation.evaluate`, toy defaults).

    Args:
        pipe: any text-to-image pipeline (unsee's or diffusers').
        prompts: a prompt or list of prompts, cycled to ``n`` images; if None, ``concept`` must be given and the
            prompts are the world's prompts that name it.
        concept: a concept word of the world ("circle", "red", "striped"); its presence rate is reported.
        judge: callable(list of PIL images) -> list of {attribute: value}; default: the toy judge.
        n: number of images; seed: generation seed (results are reproducible for a seed).
        **pipe_kwargs: passed to the pipeline call (e.g. ``negative_prompt``, ``guidance=[...]``).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if prompts is None:
        if concept is None:
            raise ValueError("pass prompts, a concept, or both")
        prompts = world.concept_prompts(concept, seed=seed, n=n)
    return _evaluation.evaluate(
        pipe, prompts, _judge_or_default(judge), n=n, seed=seed, concept=concept, parse_prompt=world.parse_prompt,
        concept_attribute=world.concept_attribute, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, batch_size=batch_size, keep_images=keep_images, **pipe_kwargs)


def evaluate_erasure(pipe, concept: str, n: int = 32, seed: int = 0, judge: Optional[JudgeFn] = None,
                     **kwargs: Any) -> tuple[EvaluationResult, EvaluationResult]:
    """The two figures of an erasure: ``n`` images from world prompts that name ``concept`` (read its
    ``presence``) and ``n`` from prompts that do not (read their ``accuracy``). ``kwargs`` go to :func:`evaluate`."""
    named = evaluate(pipe, world.concept_prompts(concept, seed, n), concept=concept, judge=judge, n=n, seed=seed,
                     **kwargs)
    others = evaluate(pipe, world.other_prompts(concept, seed, n), concept=concept, judge=judge, n=n, seed=seed,
                      **kwargs)
    return named, others


def attack(pipe: Any, concept: str, prompts: Optional[Sequence[str]] = None, n: int = 16,
           config: Optional[AttackConfig] = None, judge: Optional[JudgeFn] = None,
           progress: Optional[Callable[[int, int], None]] = None) -> AttackResult:
    """:func:`unsee.attack.attack` on the toy world: ``prompts`` defaults to ``n`` world prompts naming ``concept``
    (seed ``config.seed``), ``judge`` to the toy judge."""
    config = config or AttackConfig()
    world.concept_attribute(concept)  # an unknown concept fails before any work
    prompts = list(prompts) if prompts is not None else world.concept_prompts(concept, config.seed, n)
    return _attack.attack(pipe, concept, prompts, _judge_or_default(judge), world.concept_attribute, config=config,
                          progress=progress)
