"""Evaluation: generate from prompts and score the images with a judge.

    result = unsee.evaluate(pipe, concept="circle", n=64)      # prompts that name "circle"
    result.presence                                            # share of images showing a circle
    result = unsee.evaluate(pipe, ["a red star on a gray background"], n=16)
    result.accuracy                                            # {"shape": 0.94, "color": 1.0, ...}

On the toy world the judge is the shipped classifier; for a real model pass any callable that
takes a list of PIL images and returns, per image, a dict of attribute -> value (for example a
CLIP zero-shot classifier or a detector). Expected values come from ``parse_prompt``, which by
default reads the shapes world's words from each prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from PIL import Image

from . import world

JudgeFn = Callable[[list[Image.Image]], list[dict[str, str]]]


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


def default_judge() -> JudgeFn:
    from .judge import Judge

    return Judge.load().predict


def generate_images(pipe, prompts: Sequence[str], seed: int = 0, batch_size: int = 8, **pipe_kwargs: Any) -> list[Image.Image]:
    """One image per prompt, in batches, from one seeded generator (reproducible for a seed).

    A ``negative_prompt`` text applies to every prompt; a list gives one per prompt."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    negative = pipe_kwargs.pop("negative_prompt", None)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        if negative is not None:  # diffusers wants one negative per prompt when prompts are a list
            pipe_kwargs["negative_prompt"] = [negative] * len(batch) if isinstance(negative, str) else \
                list(negative[start : start + batch_size])
        images.extend(pipe(batch, generator=generator, output_type="pil", **pipe_kwargs).images)
    return images


def score(
    prompts: Sequence[str],
    predictions: Sequence[dict[str, str]],
    concept: Optional[str] = None,
    parse_prompt: Callable[[str], dict[str, str]] = world.parse_prompt,
    concept_attribute: Callable[[str], tuple[str, str]] = world.concept_attribute,
) -> tuple[dict[str, float], Optional[float]]:
    """Per-attribute accuracy and the concept's presence rate for judged images."""
    hits: dict[str, list[bool]] = {}
    for prompt, judged in zip(prompts, predictions):
        for name, expected in parse_prompt(prompt).items():
            if name in judged:
                hits.setdefault(name, []).append(judged[name] == expected)
    accuracy = {name: sum(v) / len(v) for name, v in sorted(hits.items())}
    presence = None
    if concept is not None:
        name, value = concept_attribute(concept)
        presence = sum(judged.get(name) == value for judged in predictions) / max(1, len(predictions))
    return accuracy, presence


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
    """Generate ``n`` images and score them with ``judge``.

    Args:
        pipe: any text-to-image pipeline (unsee's or diffusers').
        prompts: a prompt or list of prompts, cycled to ``n`` images; if None, ``concept`` must be
            given and the prompts are the world's prompts that name it.
        concept: a concept word ("circle", "red", "striped"); its presence rate is reported.
        judge: callable(list of PIL images) -> list of {attribute: value}; default: the toy judge.
        n: number of images; seed: generation seed (results are reproducible for a seed).
        **pipe_kwargs: passed to the pipeline call (e.g. ``negative_prompt``, ``guidance=[...]``).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if prompts is None:
        if concept is None:
            raise ValueError("pass prompts, a concept, or both")
        prompt_list = world.concept_prompts(concept, seed=seed, n=n)
    else:
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_list or any(not p.strip() for p in prompt_list):
            raise ValueError("prompts must be non-empty strings")
        prompt_list = [prompt_list[i % len(prompt_list)] for i in range(n)]
    if concept is not None:
        world.concept_attribute(concept)  # fail on an unknown concept before generating anything
    judge = judge or default_judge()
    images = generate_images(pipe, prompt_list, seed=seed, batch_size=batch_size,
                             num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **pipe_kwargs)
    predictions = judge(images)
    accuracy, presence = score(prompt_list, predictions, concept)
    return EvaluationResult(n=n, accuracy=accuracy, presence=presence, concept=concept, prompts=prompt_list,
                            predictions=list(predictions), images=images if keep_images else [])


def evaluate_erasure(pipe, concept: str, n: int = 32, seed: int = 0, judge: Optional[JudgeFn] = None,
                     **kwargs: Any) -> tuple[EvaluationResult, EvaluationResult]:
    """The two figures of an erasure: ``n`` images from world prompts that name ``concept`` (read its
    ``presence``) and ``n`` from prompts that do not (read their ``accuracy``). ``kwargs`` go to :func:`evaluate`."""
    named = evaluate(pipe, world.concept_prompts(concept, seed, n), concept=concept, judge=judge, n=n, seed=seed,
                     **kwargs)
    others = evaluate(pipe, world.other_prompts(concept, seed, n), concept=concept, judge=judge, n=n, seed=seed,
                      **kwargs)
    return named, others
