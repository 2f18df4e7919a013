"""Text conditioning for the trainers (SD 1.x/2.x and SDXL): encoded prompts, and the concept in context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

from unsee.pipelines.encoding import encode_text, is_sdxl

from .config import contexts_by_concept, erase_from_prompts

__all__ = ["Conditioning", "ConceptConditioning", "encode_prompts", "encode_concept", "encode_concepts", "is_sdxl"]


@dataclass
class Conditioning:
    """Text conditioning for a batch: token embeddings, plus SDXL's pooled embeddings and time ids."""

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def rows(self, index: Union[torch.Tensor, Sequence[int], slice]) -> "Conditioning":
        pick = (lambda t: None if t is None else t[index])
        return Conditioning(self.embeds[index], pick(self.pooled), pick(self.time_ids))

    def repeat(self, n: int) -> "Conditioning":
        rep = (lambda t: None if t is None else t.repeat_interleave(n, dim=0))
        return Conditioning(rep(self.embeds), rep(self.pooled), rep(self.time_ids))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        cat = (lambda ts: None if ts[0] is None else torch.cat(ts))
        return Conditioning(cat([p.embeds for p in parts]), cat([p.pooled for p in parts]),
                            cat([p.time_ids for p in parts]))

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str], height: int, width: int) -> Conditioning:
    """Conditioning for each prompt, as the pipeline computes it (one batch); ``""`` gives the unconditional
    embedding the pipeline uses for classifier-free guidance (zeros on SDXL with ``force_zeros_for_empty_prompt``)."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    prompts = list(prompts)
    embeds, pooled = encode_text(pipe, prompts, device, empty_unconditional=True)
    if pooled is None:
        return Conditioning(embeds.to(dtype))
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
    return Conditioning(embeds.to(dtype), pooled.to(dtype), time_ids.repeat(len(prompts), 1))


def encode_each(pipe: Any, prompts: Sequence[str], height: int, width: int) -> list[Conditioning]:
    """:func:`encode_prompts` (one batch), split into one conditioning per prompt ([] for no prompts)."""
    if not prompts:
        return []
    encoded = encode_prompts(pipe, prompts, height, width)
    return [encoded.rows([i]) for i in range(len(prompts))]


@dataclass
class ConceptConditioning:
    """The conditioning of erasing a concept, in context or not (the ``erase_from`` setting of ESD, SPM, ANT and
    AdvUnlearn): the concept ``c``, the empty prompt, and one entry per ``erase_from`` prompt ``c_from``.

    Without ``erase_from`` the student sees the concept itself; with it, each step draws one ``c_from`` (a prompt
    that names the concept, "a red circle on black"), and the method's target keeps the rest of that prompt: its
    anchor is ``c_from``'s own frozen prediction instead of the empty prompt's.
    """

    concept: Conditioning
    empty: Conditioning
    contexts: list[Conditioning]
    #: the prompts the student sees: the ``erase_from`` prompts, or the concept alone
    student_prompts: list[str]

    def draw(self, draw_index: Callable[[int], int]) -> tuple[int, Conditioning]:
        """(index in :attr:`student_prompts`, conditioning) of this step's student prompt: a ``c_from`` drawn with
        ``draw_index`` (a trainer's :meth:`~unsee.erasure.Trainer.draw_index`), or the concept (0; nothing drawn)."""
        if not self.contexts:
            return 0, self.concept
        j = draw_index(len(self.contexts))
        return j, self.contexts[j]

    def student(self, index: int) -> Conditioning:
        """The conditioning of :attr:`student_prompts` ``[index]`` (an index :meth:`draw` gave): a ``c_from``, or the
        concept itself (the same object) without ``erase_from``."""
        return self.contexts[index] if self.contexts else self.concept


def encode_concept(pipe: Any, concept: str, erase_from: Union[str, Sequence[str], None], height: int,
                   width: int) -> ConceptConditioning:
    """:class:`ConceptConditioning` for ``concept`` and an ``erase_from`` setting, encoded in one batch
    (rows: ``c``, ``""``, then each ``c_from``)."""
    froms = list(erase_from_prompts(erase_from))
    conditioning = encode_prompts(pipe, [concept, ""] + froms, height, width)
    return ConceptConditioning(concept=conditioning.rows([0]), empty=conditioning.rows([1]),
                               contexts=[conditioning.rows([2 + i]) for i in range(len(froms))],
                               student_prompts=froms or [concept])


def encode_concepts(pipe: Any, concepts: Sequence[str], erase_from: Union[str, Sequence[str], None], height: int,
                    width: int) -> list[ConceptConditioning]:
    """:class:`ConceptConditioning` for each of several erased concepts (one concept: exactly
    :func:`encode_concept`); the ``erase_from`` prompts go to the concept they name
    (:func:`~unsee.erasure.config.contexts_by_concept`)."""
    if len(concepts) == 1:
        return [encode_concept(pipe, concepts[0], erase_from, height, width)]
    return [encode_concept(pipe, concept, contexts or None, height, width)
            for concept, contexts in zip(concepts, contexts_by_concept(concepts, erase_from))]
