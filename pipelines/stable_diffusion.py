"""unsee's Stable Diffusion 1.x/2.x pipelines: diffusers' pipelines plus guidance methods and erasure adapters.

Without unsee-specific arguments each is its diffusers pipeline and gives the same images for the same seed.
``pipe(prompt, guidance=[CFGpp(0.6), PAG(3.0)], ...)`` adds guidance methods; ``pipe.load_erasure(path)``
applies erasure adapters. :class:`StableDiffusionGuided` holds what every SD 1.x/2.x pipeline class shares
(text-to-image here; img2img, inpainting and ControlNet in ``unsee.pipelines.variants``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from diffusers import StableDiffusionPipeline

from unsee.pipelines.erasure import ErasureAdapterMixin
from unsee.pipelines.common import ErasureCallMixin, keep_dtype_from_pipe
from unsee.pipelines.encoding import empty_embeddings, encode_text
from unsee.pipelines.guided import GuidanceMixin


class StableDiffusionGuided(ErasureCallMixin, GuidanceMixin, ErasureAdapterMixin):
    """``guidance=[...]`` and ``load_erasure`` / ``unload_erasure`` for a diffusers SD 1.x/2.x pipeline class (the
    branch texts are encoded with the pipeline's own ``encode_prompt``)."""

    def encode_prompt(self, *args: Any, **kwargs: Any):
        with _text_model_alias(self.text_encoder):
            return super().encode_prompt(*args, **kwargs)

    def _unsee_encode(self, texts: list[str], device, num_images_per_prompt: int,
                      clip_skip: Optional[int] = None) -> tuple[torch.Tensor, None]:
        return encode_text(self, texts, device, num_images_per_prompt, clip_skip)

    def _unsee_empty_embeddings(self, rows: int, device, clip_skip: Optional[int] = None) -> tuple[torch.Tensor, None]:
        # diffusers' own unconditional rows for a call without a negative prompt (clip_skip does not apply to them)
        return empty_embeddings(self, rows, device)


class UnseeStableDiffusionPipeline(StableDiffusionGuided, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with ``guidance=[...]`` and ``load_erasure`` / ``unload_erasure``."""

    from_pipe = keep_dtype_from_pipe(StableDiffusionPipeline)


@contextlib.contextmanager
def _text_model_alias(encoder: Any):
    """diffusers' SD ``encode_prompt`` reads ``text_encoder.text_model.final_layer_norm`` under ``clip_skip``;
    transformers 5 dropped the ``text_model`` wrapper of ``CLIPTextModel`` (its layers sit on the model itself),
    so ``clip_skip`` raised AttributeError. For the call, ``text_model`` names the model itself (a plain
    attribute, not a registered submodule: state dicts and module walks are unchanged)."""
    if encoder is None or hasattr(encoder, "text_model") or not hasattr(encoder, "final_layer_norm"):
        yield
        return
    object.__setattr__(encoder, "text_model", encoder)
    try:
        yield
    finally:
        object.__delattr__(encoder, "text_model")
