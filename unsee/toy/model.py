"""The embedded toy model: component configs, its tokenizer, and where its weights live.

The toy model is a standard diffusers Stable Diffusion folder (``weights/toy``), trained from
scratch on the shapes world (:mod:`unsee.toy.world`) by ``scripts/train_toy.py``. Everything that
works on SD 1.5 works on it; it is small enough to sample on a CPU in about two seconds.

Components:
- ``AutoencoderKL`` with a 4x downsampling: 64x64 RGB <-> 4x16x16 latents;
- ``UNet2DConditionModel`` with cross-attention at the 8x8 and 4x4 levels and the mid block;
- ``CLIPTextModel`` (3 layers, width 128) and a ``CLIPTokenizer`` whose BPE vocabulary gives every
  word of the world its own token, plus the 512 byte-level symbols so any text can be encoded;
- ``DDIMScheduler`` with SD's scaled-linear betas and v-prediction (as SD 2.x): at high noise the UNet must
  predict the clean image, so the layout the prompt asks for is learned early in training.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Iterable

from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTokenizer

WEIGHTS_DIR = Path(str(importlib.resources.files("unsee.weights"))).resolve()  # weights/ ships as package data
TOY_MODEL_DIR = WEIGHTS_DIR / "toy"
JUDGE_PATH = WEIGHTS_DIR / "judge.safetensors"
EXAMPLE_ADAPTERS_DIR = WEIGHTS_DIR / "examples"  # adapters for the toy model (weights/examples/examples.yaml)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 32  # world prompts are under 16 tokens; room left for prefix tokens (attacks, AdvUnlearn)


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that turn each of ``words`` into one symbol, learned deterministically.

    Classic BPE on the word list (each word counted once): merge the most frequent adjacent pair,
    ties broken by the pair's text, until every word is a single symbol. (The ``tokenizers`` trainer
    breaks ties by hash order, so its merges, and the ids of the partial words, differed from one
    process to the next.)
    """
    spelled = [list(word[:-1]) + [word[-1] + "</w>"] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in spelled:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for symbols in spelled:
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
                i += 1


def build_tokenizer(words: Iterable[str], max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory, offline, in which each of ``words`` is one token.

    The vocabulary is the 256 byte-level symbols, the same with the end-of-word marker ``</w>``,
    the merged tokens learned from ``words`` (in merge order) and the two special tokens; prompts are
    padded to ``max_length`` tokens (the toy model's 32; SD's 77 for the tiny test pipelines). Any text
    can be encoded (unknown words fall back to characters) and decodes back to its lower-cased form.
    The same words always give the same tokenizer.
    """
    words = sorted({w.lower() for w in words})
    if not all(w.isascii() and w.isalpha() for w in words):  # CLIP's pre-tokenizer splits digits and punctuation off
        raise ValueError(f"build_tokenizer takes words of ASCII letters only, got {words}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_merges(words)
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN, model_max_length=max_length,
    )
    for word in words:
        if len(tokenizer(word, add_special_tokens=False).input_ids) != 1:
            raise RuntimeError(f"build_tokenizer: {word!r} does not encode to one token")
    return tokenizer


def text_encoder_config(tokenizer: CLIPTokenizer, hidden_size: int = 128, layers: int = 3, heads: int = 4) -> CLIPTextConfig:
    """A CLIPTextConfig sized for ``tokenizer`` with its special-token ids filled in."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden_size,
    )


UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 48, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16,  # 4 heads per attention layer
)

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
)


def fine_tune(pipe: Any, steps: int = 100, lr: float = 1e-4, batch_size: int = 16, seed: int = 0,
              **fixed: str) -> list[float]:
    """Fine-tune ``pipe.unet`` in place on fresh renders of the shapes world, with the toy model's own objective.

    A stand-in for the community fine-tunes of a base model that adapters are expected to carry over to:
    keyword arguments fix attributes of every training scene (``style="striped"``: a fine-tune on striped
    shapes only), so the fine-tuned model departs from its base in a measurable way. AdamW, constant ``lr``,
    the text encoder and VAE frozen. Returns the loss of every step.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from . import world

    if not isinstance(steps, int) or steps < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive integers, got {steps!r} and {batch_size!r}")
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device, dtype = unet.device, unet.dtype
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    losses = []
    for _ in range(steps):
        scenes = [world.sample_scene(rng, **fixed) for _ in range(batch_size)]
        pixels = torch.from_numpy(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2)
        ids = pipe.tokenizer([world.caption(s, rng) for s in scenes], padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            pixels = pixels.to(device, vae.dtype) / 127.5 - 1
            latents = vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor
            embeds = pipe.text_encoder(ids.to(device))[0].to(dtype)
        latents = latents.to(dtype)
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        loss = F.mse_loss(unet(noisy, t, embeds).sample.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    unet.zero_grad(set_to_none=True)
    return losses
