"""unsee's Stable Diffusion XL pipelines: diffusers' pipelines plus guidance methods and erasure adapters.

Without unsee-specific arguments each is its diffusers pipeline and gives the same images for the same seed.
:class:`StableDiffusionXLGuided` holds what every SDXL pipeline class shares (text-to-image here; img2img,
inpainting and ControlNet in ``unsee.pipelines.variants``).
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import StableDiffusionXLPipeline

from unsee.pipelines.erasure import ErasureAdapterMixin
from unsee.pipelines.common import ErasureCallMixin, keep_dtype_from_pipe
from unsee.pipelines.encoding import empty_embeddings, encode_text
from unsee.pipelines.guided import GuidanceMixin


class StableDiffusionXLGuided(ErasureCallMixin, GuidanceMixin, ErasureAdapterMixin):
    """``guidance=[...]`` and ``load_erasure`` / ``unload_erasure`` for a diffusers SDXL pipeline class (the branch
    texts are encoded with the pipeline's own ``encode_prompt``, pooled embeddings included)."""

    def _unsee_encode(self, texts: list[str], device, num_images_per_prompt: int,
                      clip_skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_text(self, texts, device, num_images_per_prompt, clip_skip)

    def _unsee_empty_embeddings(self, rows: int, device, clip_skip: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        # diffusers' own unconditional rows for a call without a negative prompt (zeros when the model says so;
        # clip_skip does not apply to them)
        return empty_embeddings(self, rows, device)


class UnseeStableDiffusionXLPipeline(StableDiffusionXLGuided, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with ``guidance=[...]`` and ``load_erasure`` / ``unload_erasure``."""

    from_pipe = keep_dtype_from_pipe(StableDiffusionXLPipeline)
