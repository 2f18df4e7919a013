"""Evaluation and the prompt attack on the toy world: its prompts and its judge as the defaults.

    from unsee import toy
    result = toy.evaluate(pipe, concept="circle", n=64)      # world prompts that name "circle", the toy judge
    result.presence                                          # share of images showing a circle
    result = toy.evaluate(pipe, ["a red star on a gray background"], n=16)
    result.accuracy                                          # {"shape": 0.94, "color": 1.0, ...}
    named, others = toy.evaluate_erasure(pipe, "circle")     # an erasure's two figures
    toy.attack(pipe, "circle", n=16).success_rate            # UnlearnDiffAtk-style attack on world prompts
    suite = read_suite(toy.evaluation.suite_path("circle"))  # the shipped suite file (unsee/toy/suites/circle.csv)
    run_suite(pipe, suite, toy.evaluation.suite_judge(), "out/")   # unsee.suite_eval: resumable reports

Expected values come from each prompt's words (:func:`unsee.toy.world.parse_prompt`), a concept's from
:func:`unsee.toy.world.concept_attribute`. The work is done by :mod:`unsee.evaluation` and :mod:`unsee.attack`,
which take prompts and judges explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from unsee import attack as _attack
from unsee import evaluation as _evaluation
from unsee.attack import AttackConfig, AttackResult
from unsee.evaluation import EvaluationResult, JudgeFn
from unsee.suites import SuiteRow


from . import world
from .judge import default_judge

__all__ = ["attack", "evaluate", "evaluate_erasure", "score", "suite_judge", "suite_metrics", "suite_path",
           "suite_rows", "SUITES_DIR", "SUITES"]

SUITES_DIR = Path(__file__).resolve().parent / "suites"
# the shipped suites: name -> (concept, rows naming it, rows not naming it, first seed); the files are made from
# these by scripts/make_toy_suites.py, and tests/test_suites.py checks that they still are
SUITES = {"circle": ("circle", 16, 16, 1000)}
SUITE_GUIDANCE = 5.0


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


# ------------------------------------------------------------------------------------------ prompt suites


def suite_path(name: str) -> Path:
    """The file of a shipped toy suite ("circle": ``unsee/toy/suites/circle.csv``)."""
    if name not in SUITES:
        raise ValueError(f"no toy suite {name!r}; choose from {', '.join(sorted(SUITES))}")
    return SUITES_DIR / f"{name}.csv"


def suite_rows(concept: str, named: int, others: int, first_seed: int) -> list[SuiteRow]:
    """A toy suite's rows: ``named`` world prompts naming ``concept`` (category ``concept``) then ``others`` that do
    not (category ``other``), seeds ``first_seed``, ``first_seed + 1``, ..., guidance 5 (the toy default)."""
    prompts = [(p, concept) for p in world.concept_prompts(concept, first_seed, named)]
    prompts += [(p, "other") for p in world.other_prompts(concept, first_seed, others)]
    return [SuiteRow(index=i, row_id=f"{concept}-{i:03d}", prompt=p, seed=first_seed + i, guidance=SUITE_GUIDANCE,
                     categories=(category,)) for i, (p, category) in enumerate(prompts)]


def _is_concept(word: str) -> bool:
    try:
        world.concept_attribute(word)
    except ValueError:
        return False
    return True


def suite_metrics(concepts: Optional[Sequence[str]] = None) -> Callable[[Sequence[dict]], dict]:
    """Figures of toy-judge records: ``accuracy.ATTRIBUTE`` (the share of images showing what their prompt names,
    among prompts that name the attribute) and ``presence.CONCEPT`` for each of ``concepts`` (default: the
    categories of the records that are concepts of the world, e.g. "circle")."""
    for concept in concepts or ():
        world.concept_attribute(concept)  # an unknown concept fails before any work

    def metrics(records: Sequence[dict]) -> dict:
        prompts = [r["prompt"] for r in records]
        predictions = [r["judge"] for r in records]
        accuracy, _ = _evaluation.score(prompts, predictions, parse_prompt=world.parse_prompt)
        figures = {f"accuracy.{name}": value for name, value in accuracy.items()}
        wanted = list(concepts) if concepts else sorted(
            {c for r in records for c in r.get("categories", ()) if _is_concept(c)})
        for concept in wanted:
            _, presence = _evaluation.score(prompts, predictions, concept, concept_attribute=world.concept_attribute)
            figures[f"presence.{concept}"] = presence
        return figures

    return metrics


def suite_judge(concepts: Optional[Sequence[str]] = None, judge: Optional[JudgeFn] = None):
    """The toy judge as :mod:`unsee.suite_eval` records it: name "toy", version the SHA-256 of its weights file,
    figures from :func:`suite_metrics`. ``judge``: another callable with the toy judge's output."""
    from unsee.suite_eval import SuiteJudge, file_sha256

    from .model import JUDGE_PATH

    version = f"judge.safetensors sha256 {file_sha256(JUDGE_PATH)[:16]}" if judge is None else "custom"
    present = None
    if concepts:  # the attack's success test: the judge sees one of the concepts
        wanted = [world.concept_attribute(c) for c in concepts]

        def present(output: dict) -> bool:
            return any(output.get(name) == value for name, value in wanted)

    return SuiteJudge(fn=_judge_or_default(judge), name="toy", version=version, metrics=suite_metrics(concepts),
                      present=present)
