"""Prompt embeddings as a Stable Diffusion (1.x/2.x) or SDXL pipeline conditions on them.

One place for what differs between the two: the call of the pipeline's own ``encode_prompt`` (SDXL adds pooled
embeddings) and the unconditional rows of classifier-free guidance without a negative prompt, which SDXL
pipelines with ``force_zeros_for_empty_prompt`` (the base model's setting) make zeros instead of encoding ``""``.
unsee's pipelines (guidance branches) and erasure trainers (the concept's and the empty prompt's conditioning)
both use it; it works on any diffusers SD or SDXL pipeline.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

__all__ = ["is_sdxl", "encode_text", "empty_embeddings"]


def is_sdxl(pipe: Any) -> bool:
    """Whether the pipeline's UNet is SDXL's (conditioned on pooled text embeddings and time ids)."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def encode_text(pipe: Any, texts: Sequence[str], device: Any, num_images_per_prompt: int = 1,
                clip_skip: Optional[int] = None, empty_unconditional: bool = False
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(embeddings, pooled embeddings or None) of each text, in one batch, as the pipeline's ``encode_prompt``
    computes its conditional rows (``num_images_per_prompt`` rows each).

    ``empty_unconditional``: the rows of ``""`` are the unconditional rows of a call without a negative prompt
    instead: zeros on SDXL pipelines with ``force_zeros_for_empty_prompt``, the encoded ``""`` otherwise.
    """
    texts = list(texts)
    if not is_sdxl(pipe):
        embeds, _ = pipe.encode_prompt(texts, device, num_images_per_prompt, False, clip_skip=clip_skip)
        return embeds, None
    embeds, _, pooled, _ = pipe.encode_prompt(texts, device=device, num_images_per_prompt=num_images_per_prompt,
                                              do_classifier_free_guidance=False, clip_skip=clip_skip)
    if empty_unconditional and pipe.config.get("force_zeros_for_empty_prompt", False):
        empty = torch.tensor([not text for text in texts], device=embeds.device)
        empty = empty.repeat_interleave(num_images_per_prompt)
        embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    return embeds, pooled


def empty_embeddings(pipe: Any, rows: int, device: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``rows`` unconditional rows for a call without a negative prompt, as diffusers computes them: zeros on SDXL
    pipelines with ``force_zeros_for_empty_prompt``, else ``""`` encoded (without ``clip_skip``, which diffusers
    applies to the conditional rows only)."""
    return encode_text(pipe, [""] * rows, device, empty_unconditional=True)
