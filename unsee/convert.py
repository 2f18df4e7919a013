"""Export an SD 1.x/2.x pipeline as one checkpoint file in the original (LDM) layout.

This is the layout that A1111, ComfyUI and diffusers' ``from_single_file`` read: UNet keys under
``model.diffusion_model.``, VAE keys under ``first_stage_model.``, the CLIP text encoder under
``cond_stage_model.transformer.``. Use it to take an erased model (adapter fused) to other tools.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file

from .files import atomic_write

_RESNET_RENAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _replace_prefix(name: str, prefixes: dict[str, str]) -> str:
    for old in sorted(prefixes, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return prefixes[old] + name[len(old):]
    return name


def _unet_prefixes(config) -> dict[str, str]:
    blocks, per_block = len(config.block_out_channels), config.layers_per_block
    prefixes = {
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for i in range(blocks):
        for j in range(per_block):
            index = (per_block + 1) * i + j + 1
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
        if i < blocks - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(per_block + 1) * (i + 1)}.0.op"
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(per_block + 1):
            index = (per_block + 1) * i + j
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
        if i < blocks - 1:
            upsampler = f"output_blocks.{(per_block + 1) * i + per_block}.{2 if has_attention else 1}.conv"
            prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = upsampler
    return prefixes


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(unet.config)
    out = {}
    for name, tensor in unet.state_dict().items():
        ldm = _replace_prefix(name, prefixes)
        if ".resnets." in name or name.startswith("mid_block.resnets"):
            module, leaf = name.rsplit(".", 2)[-2:]
            if module in _RESNET_RENAMES:
                ldm = ldm[: -len(f"{module}.{leaf}")] + f"{_RESNET_RENAMES[module]}.{leaf}"
        out["model.diffusion_model." + ldm] = tensor
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    prefixes = {"mid_block.resnets.0": "mid.block_1", "mid_block.attentions.0": "mid.attn_1",
                "mid_block.resnets.1": "mid.block_2", "conv_norm_out": "norm_out"}
    for i in range(blocks):
        for j in range(vae.config.layers_per_block + 1):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"down.{i}.block.{j}"
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"up.{blocks - 1 - i}.block.{j}"
        prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"down.{i}.downsample.conv"
        prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = f"up.{blocks - 1 - i}.upsample.conv"
    out = {}
    for name, tensor in vae.state_dict().items():
        part, _, rest = name.partition(".")
        if part in ("encoder", "decoder"):
            rest = _replace_prefix(rest, prefixes).replace("conv_shortcut", "nin_shortcut")
            if ".attn_1." in rest:
                module, leaf = rest.split(".attn_1.")[1].rsplit(".", 1)
                rest = rest.split(".attn_1.")[0] + ".attn_1." + _VAE_ATTENTION_RENAMES.get(module, module) + "." + leaf
                if tensor.ndim == 2:  # LDM stores the attention projections as 1x1 convolutions
                    tensor = tensor[:, :, None, None]
            name = f"{part}.{rest}"
        out["first_stage_model." + name] = tensor
    return out


def save_single_file(pipe, path: Union[str, os.PathLike]) -> Path:
    """Write an SD 1.x/2.x pipeline's UNet, VAE and text encoder as one LDM-layout ``.safetensors`` file.

    The write is atomic (temp file + rename). Load it back with
    ``unsee.load_pipeline(path, config=<a diffusers folder of the same architecture>)``.
    """
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise NotImplementedError("single-file export covers SD 1.x/2.x; for SDXL use save_pretrained")
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    for name, tensor in pipe.text_encoder.state_dict().items():
        # transformers 5 drops the "text_model." level from CLIPTextModel's names; the LDM layout has it
        name = name if name.startswith("text_model.") else "text_model." + name
        state["cond_stage_model.transformer." + name] = tensor
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return path
