"""Tiny random-weight pipelines for tests and benchmarks, built in code and offline.

``tiny_sd_components()``, ``tiny_sd2_components()`` and ``tiny_sdxl_components()`` return the components of an
SD 1.x-, an SD 2.x- and an SDXL-shaped pipeline with a few thousand parameters each; the tokenizers are built in
memory (no hub). ``tiny_sd_pipeline()`` / ``tiny_sd2_pipeline()`` / ``tiny_sdxl_pipeline()`` wrap them in unsee's
pipeline classes (or any other pipeline class passed as ``pipeline_class``).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .toy import model as toy
from .toy import world

# SD 1.5's UNet architecture (860M parameters): build it on the meta device to inspect its layers, or with
# random weights for benchmarks that need realistic sizes without a download.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)

# SDXL's UNet architecture (2.6B parameters), likewise: cross-attention over both text encoders' states (768 + 1280)
# and the added text-time conditioning (pooled 1280 + 6 time ids x 256).
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
)

# Words the tiny tokenizer knows as whole tokens (anything else still encodes, letter by letter).
TINY_WORDS = world.vocabulary() + ["cat", "dog", "photo", "painting", "style", "van", "gogh", "nudity", "car"]


def tiny_tokenizer():
    return toy.build_tokenizer(TINY_WORDS, max_length=77)  # SD 1.x/2.x and SDXL pad to 77 tokens


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    )


def _tiny_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**toy.SCHEDULER_CONFIG)


def tiny_sd_components(seed: int = 0) -> dict[str, Any]:
    """Components of a tiny SD 1.x-shaped pipeline (32x32 images, 16x16 latents)."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(toy.text_encoder_config(tokenizer, hidden_size=16, layers=2, heads=2))
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_tiny_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def tiny_sd2_components(seed: int = 0) -> dict[str, Any]:
    """Components of a tiny SD 2.x-shaped pipeline: an OpenCLIP-style text encoder (``hidden_act="gelu"``, the
    projection size set) and linear projections in the UNet's transformers, as SD 2 has."""
    components = tiny_sd_components(seed)
    torch.manual_seed(seed)
    components["unet"] = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )
    torch.manual_seed(seed + 2)
    config = toy.text_encoder_config(components["tokenizer"], hidden_size=24, layers=3, heads=2)
    config.hidden_act, config.projection_dim = "gelu", 16
    components["text_encoder"] = CLIPTextModel(config)
    return components


def tiny_sdxl_components(seed: int = 0, text_encoder_2_size: int = 16) -> dict[str, Any]:
    """Components of a tiny SDXL-shaped pipeline: two text encoders, text-time added conditioning.
    ``text_encoder_2_size``: the second encoder's width (and projection); SDXL's two encoders differ in width
    (768, 1280), which single-file loaders rely on to tell them apart."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + text_encoder_2_size,
        cross_attention_dim=16 + text_encoder_2_size, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(toy.text_encoder_config(tokenizer, hidden_size=16, layers=2, heads=2))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        toy.text_encoder_config(tokenizer, hidden_size=text_encoder_2_size, layers=2, heads=2))
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(), scheduler=_tiny_scheduler(), image_encoder=None, feature_extractor=None,
    )


def _wrap(components: dict[str, Any], pipeline_class: type):
    accepted = set(inspect.signature(pipeline_class.__init__).parameters)
    pipe = pipeline_class(**{k: v for k, v in components.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(pipeline_class: Optional[type] = None, seed: int = 0):
    """A tiny SD 1.x-shaped pipeline (unsee's subclass unless ``pipeline_class`` is given)."""
    from unsee.pipelines import UnseeStableDiffusionPipeline

    return _wrap(tiny_sd_components(seed), pipeline_class or UnseeStableDiffusionPipeline)


def tiny_sd2_pipeline(pipeline_class: Optional[type] = None, seed: int = 0):
    """A tiny SD 2.x-shaped pipeline (unsee's subclass unless ``pipeline_class`` is given)."""
    from unsee.pipelines import UnseeStableDiffusionPipeline

    return _wrap(tiny_sd2_components(seed), pipeline_class or UnseeStableDiffusionPipeline)


def tiny_sdxl_pipeline(pipeline_class: Optional[type] = None, seed: int = 0, text_encoder_2_size: int = 16):
    """A tiny SDXL-shaped pipeline (unsee's subclass unless ``pipeline_class`` is given)."""
    from unsee.pipelines import UnseeStableDiffusionXLPipeline

    return _wrap(tiny_sdxl_components(seed, text_encoder_2_size), pipeline_class or UnseeStableDiffusionXLPipeline)


def train_on_tiny_pipeline(trainer: Any) -> tuple[Any, Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train an erasure ``trainer`` on a fresh tiny SD pipeline. Returns the pipeline, the adapter, and the UNet's
    parameters before training and at its last step (the trainer restores the pipeline's own weights when it ends)."""
    pipe = tiny_sd_pipeline()
    originals = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    final: dict[str, torch.Tensor] = {}

    def progress(event: Any) -> None:
        if event.phase == "train" and event.step == event.total:
            final.update({n: p.detach().clone() for n, p in pipe.unet.named_parameters()})

    adapter = trainer.train(pipe, progress=progress)
    return pipe, adapter, originals, final
