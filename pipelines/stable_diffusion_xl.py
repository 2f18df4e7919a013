"""unsee's Stable Diffusion XL pipeline: diffusers' pipeline plus guidance methods and erasure adapters.

Without unsee-specific arguments it is diffusers' ``StableDiffusionXLPipeline`` and gives the same
images for the same seed.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import StableDiffusionXLPipeline

from unsee.adapters import ErasureAdapterMixin
from unsee.pipelines.common import keep_dtype_from_pipe
from unsee.pipelines.guided import GuidanceMixin


class UnseeStableDiffusionXLPipeline(GuidanceMixin, ErasureAdapterMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with ``guidance=[...]`` and ``load_erasure`` / ``unload_erasure``."""

    from_pipe = keep_dtype_from_pipe(StableDiffusionXLPipeline)

    def _unsee_encode(self, texts: list[str], device, num_images_per_prompt: int,
                      clip_skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.encode_prompt(texts, device=device, num_images_per_prompt=num_images_per_prompt,
                                                  do_classifier_free_guidance=False, clip_skip=clip_skip)
        return embeds, pooled

    def _unsee_empty_embeddings(self, rows: int, device, clip_skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        # the same embeddings diffusers uses for the unconditional branch when negative_prompt is None
        embeds, pooled = self._unsee_encode([""] * rows, device, 1)
        if self.config.force_zeros_for_empty_prompt:
            return torch.zeros_like(embeds), torch.zeros_like(pooled)
        return embeds, pooled
