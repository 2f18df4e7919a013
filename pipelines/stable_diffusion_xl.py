"""unsee's Stable Diffusion XL pipeline: diffusers' pipeline plus guidance methods and erasure adapters.

Without unsee-specific arguments it is diffusers' ``StableDiffusionXLPipeline`` and gives the same
images for the same seed.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import StableDiffusionXLPipeline

from unsee.adapters import ErasureAdapterMixin
from unsee.pipelines.common import ErasureCallMixin, keep_dtype_from_pipe
from unsee.pipelines.guided import GuidanceMixin


class UnseeStableDiffusionXLPipeline(ErasureCallMixin, GuidanceMixin, ErasureAdapterMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with ``guidance=[...]`` and ``load_erasure`` / ``unload_erasure``."""

    from_pipe = keep_dtype_from_pipe(StableDiffusionXLPipeline)

    def _unsee_encode(self, texts: list[str], device, num_images_per_prompt: int,
                      clip_skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.encode_prompt(texts, device=device, num_images_per_prompt=num_images_per_prompt,
                                                  do_classifier_free_guidance=False, clip_skip=clip_skip)
        return embeds, pooled

    def _unsee_empty_embeddings(self, rows: int, device, clip_skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        # diffusers' own unconditional rows for a call without a negative prompt (zeros when the model says so)
        _, empty, _, empty_pooled = self.encode_prompt([""] * rows, device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True, clip_skip=clip_skip)
        return empty, empty_pooled
