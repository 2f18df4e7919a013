"""Evaluation: generate images from a prompt set and score them with a judge.

    from unsee.evaluation import evaluate
    result = evaluate(pipe, prompts, judge, parse_prompt=expected_values, concept="cat",
                      concept_attribute=lambda c: ("object", c))
    result.presence                            # share of images in which the judge sees the concept
    result.accuracy                            # per attribute: share of images that show what their prompt names

Nothing here knows a prompt set or a judge: the caller gives both. A judge is any callable that takes a list of
PIL images and returns, per image, a dict of attribute -> value (a CLIP zero-shot classifier, a detector, the toy
model's classifier). ``parse_prompt`` reads from a prompt the attribute values it asks for (the expected values);
``concept_attribute`` maps a concept to the (attribute, value) pair the judge reports for it. The toy world's prompt
sets, prompt parser and judge are the defaults of :mod:`unsee.toy.evaluation` (``unsee.toy.evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image

from .suite_eval import check_outputs, generate_rows
from .suites import SuiteRow

JudgeFn = Callable[[list[Image.Image]], list[dict[str, str]]]
PromptParser = Callable[[str], dict[str, str]]  # prompt -> the attribute values it names
ConceptAttribute = Callable[[str], tuple[str, str]]  # concept -> (attribute, value) as the judge reports it


@dataclass
class EvaluationResult:
    """What ``evaluate`` measured.

    accuracy: per attribute, the share of images whose judged value equals the value their prompt
        names (only images whose prompt names that attribute count).
    presence: the share of all images in which the judge sees ``concept`` (None without a concept).
    """

    n: int
    accuracy: dict[str, float]
    presence: Optional[float]
    concept: Optional[str]
    prompts: list[str] = field(repr=False)
    predictions: list[dict[str, str]] = field(repr=False)
    images: list[Image.Image] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "accuracy": {k: round(v, 4) for k, v in self.accuracy.items()}}
        if self.concept is not None:
            out["concept"] = self.concept
            out["presence"] = round(self.presence, 4)
        return out


def _batches(pipe, prompts: Sequence[str], seed: int, batch_size: int, num_inference_steps: Optional[int],
             guidance_scale: Optional[float], pipe_kwargs: dict) -> Iterator[tuple[list[str], list[Image.Image]]]:
    """(prompts, images) batch by batch, all batches drawing from one generator seeded ``seed``: the prompts as the
    rows of a suite without seeds, made by :func:`unsee.suite_eval.generate_rows` (what ``unsee eval --suite`` uses)."""
    rows = [SuiteRow(index=i, row_id=str(i), prompt=p) for i, p in enumerate(prompts)]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for batch, images in generate_rows(pipe, rows, guidance_scale=guidance_scale, steps=num_inference_steps,
                                       batch_size=batch_size, generator=generator, **pipe_kwargs):
        yield [row.prompt for row in batch], images


def generate_images(pipe, prompts: Sequence[str], seed: int = 0, batch_size: int = 8,
                    num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                    **pipe_kwargs: Any) -> list[Image.Image]:
    """One image per prompt, in batches of ``batch_size``, all drawing from one generator seeded ``seed``
    (reproducible for a seed and batch size). A ``negative_prompt`` text applies to every prompt; a list gives one
    per prompt. ``num_inference_steps`` and ``guidance_scale``: the pipeline's defaults when not given."""
    return [image for _, images in _batches(pipe, prompts, seed, batch_size, num_inference_steps, guidance_scale,
                                            pipe_kwargs) for image in images]


def score(
    prompts: Sequence[str],
    predictions: Sequence[dict[str, str]],
    concept: Optional[str] = None,
    parse_prompt: Optional[PromptParser] = None,
    concept_attribute: Optional[ConceptAttribute] = None,
) -> tuple[dict[str, float], Optional[float]]:
    """Per-attribute accuracy and the concept's presence rate for judged images.

    Accuracy compares, per attribute, what ``parse_prompt`` reads from each prompt with what the judge saw (only
    images whose prompt names the attribute count; no ``parse_prompt``: no accuracy). Presence is the share of
    images in which the judge reports ``concept_attribute(concept)`` (None without a concept).
    """
    hits: dict[str, list[bool]] = {}
    if parse_prompt is not None:
        for prompt, judged in zip(prompts, predictions):
            for name, expected in parse_prompt(prompt).items():
                if name in judged:
                    hits.setdefault(name, []).append(judged[name] == expected)
    accuracy = {name: sum(v) / len(v) for name, v in sorted(hits.items())}
    presence = None
    if concept is not None:
        name, value = _concept_attribute(concept, concept_attribute)
        presence = sum(judged.get(name) == value for judged in predictions) / max(1, len(predictions))
    return accuracy, presence


def _concept_attribute(concept: str, concept_attribute: Optional[ConceptAttribute]) -> tuple[str, str]:
    if concept_attribute is None:
        raise ValueError(f"a concept ({concept!r}) needs concept_attribute: the (attribute, value) the judge reports "
                         "for it")
    return concept_attribute(concept)


def evaluate(
    pipe,
    prompts: Union[str, Sequence[str]],
    judge: JudgeFn,
    *,
    n: Optional[int] = None,
    seed: int = 0,
    concept: Optional[str] = None,
    parse_prompt: Optional[PromptParser] = None,
    concept_attribute: Optional[ConceptAttribute] = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 8,
    keep_images: bool = False,
    **pipe_kwargs: Any,
) -> EvaluationResult:
    """Generate ``n`` images from ``prompts`` and score them with ``judge``.

    Args:
        pipe: any text-to-image pipeline (unsee's or diffusers').
        prompts: a prompt or list of prompts, cycled to ``n`` images.
        judge: callable(list of PIL images) -> list of {attribute: value}, called once per batch of
            ``batch_size`` images, as they are made.
        n: number of images (None: one per prompt); seed: generation seed (results are reproducible for a seed).
        concept: a concept whose presence rate is reported; needs ``concept_attribute``.
        parse_prompt: callable(prompt) -> {attribute: expected value}; None measures no accuracy.
        concept_attribute: callable(concept) -> (attribute, value); it may raise ``ValueError`` for an unknown
            concept, before anything is generated.
        **pipe_kwargs: passed to the pipeline call (e.g. ``negative_prompt``, ``guidance=[...]``).
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not prompt_list or any(not isinstance(p, str) or not p.strip() for p in prompt_list):
        raise ValueError("prompts must be non-empty strings")
    n = len(prompt_list) if n is None else n
    prompt_list = [prompt_list[i % len(prompt_list)] for i in range(n)]
    if concept is not None:
        _concept_attribute(concept, concept_attribute)  # fail on an unknown concept before generating anything
    images: list[Image.Image] = []
    predictions: list[dict[str, str]] = []
    for batch, made in _batches(pipe, prompt_list, seed, batch_size, num_inference_steps, guidance_scale, pipe_kwargs):
        predictions.extend(check_outputs(judge(made), made))
        if keep_images:
            images.extend(made)
    accuracy, presence = score(prompt_list, predictions, concept, parse_prompt, concept_attribute)
    return EvaluationResult(n=n, accuracy=accuracy, presence=presence, concept=concept, prompts=prompt_list,
                            predictions=predictions, images=images)
