"""unsee's Stable Diffusion 1.x/2.x pipeline: diffusers' pipeline plus guidance methods and erasure adapters.

Without unsee-specific arguments it is diffusers' ``StableDiffusionPipeline`` and gives the same
images for the same seed. ``pipe(prompt, guidance=[CFGpp(0.6), PAG(3.0)], ...)`` adds guidance
methods; ``pipe.load_erasure(path)`` applies erasure adapters.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import StableDiffusionPipeline

from unsee.adapters import ErasureAdapterMixin
from unsee.pipelines.common import keep_dtype_from_pipe
from unsee.pipelines.guided import GuidanceMixin


class UnseeStableDiffusionPipeline(GuidanceMixin, ErasureAdapterMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with ``guidance=[...]`` and ``load_erasure`` / ``unload_erasure``."""

    from_pipe = keep_dtype_from_pipe(StableDiffusionPipeline)

    def _unsee_encode(self, texts: list[str], device, num_images_per_prompt: int,
                      clip_skip: Optional[int] = None) -> tuple[torch.Tensor, None]:
        embeds, _ = self.encode_prompt(texts, device, num_images_per_prompt, False, clip_skip=clip_skip)
        return embeds, None

    def _unsee_empty_embeddings(self, rows: int, device, clip_skip: Optional[int] = None) -> tuple[torch.Tensor, None]:
        # the same embeddings diffusers uses for the unconditional branch when negative_prompt is None
        return self._unsee_encode([""] * rows, device, 1)
