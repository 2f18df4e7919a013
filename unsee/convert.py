"""Export an SD 1.x, SD 2.x or SDXL pipeline as one checkpoint file in the original (LDM/SGM) layout.

This is the layout that A1111, ComfyUI and diffusers' ``from_single_file`` read: UNet keys under
``model.diffusion_model.`` (SDXL's ``add_embedding`` as ``label_emb``), VAE keys under ``first_stage_model.``, and
the text encoders as the original checkpoints store them:

- SD 1.x (OpenAI CLIP, ``hidden_act="quick_gelu"``): ``cond_stage_model.transformer.text_model.*`` (HF names);
- SD 2.x (OpenCLIP, ``hidden_act="gelu"``): ``cond_stage_model.model.*`` in OpenCLIP's names
  (``transformer.resblocks.N.attn.in_proj_weight`` with q/k/v fused, ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``,
  ``token_embedding``, ``positional_embedding``, ``ln_final``). diffusers keeps 23 of OpenCLIP-H's 24 blocks (SD 2
  reads the penultimate one); the blocks it has are written, the 24th, which it never had, is not;
- SDXL: CLIP-L as ``conditioner.embedders.0.transformer.text_model.*``, OpenCLIP-G (``text_encoder_2``) as
  ``conditioner.embedders.1.model.*`` in OpenCLIP's names, ``text_projection`` transposed as OpenCLIP stores it.

Use it to take an erased model to other tools: :func:`export_checkpoint` (``unsee export ADAPTER --format
checkpoint --model MODEL``) writes a pipeline with an adapter merged. Loading the file back with diffusers'
``from_single_file`` gives the same weights bit for bit.
"""

from __future__ import annotations

import os
import re
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
    for name, tensor in merged_state_dict(unet).items():
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
    for name, tensor in merged_state_dict(vae).items():
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


_OPEN_CLIP_RENAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                      "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def _clip_state(text_encoder) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights by their HF names with the ``text_model.`` level (transformers 5 drops it
    from ``CLIPTextModel``), active LoRAs merged."""
    state = merged_state_dict(text_encoder)
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in state.items()}


def clip_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text-encoder weights (``text_model.*``, ``text_projection.weight``) in OpenCLIP's names, q/k/v fused
    into ``attn.in_proj_weight``/``in_proj_bias`` (q, k, v stacked in that order) and the projection transposed."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name == "text_projection.weight":
            out["text_projection"] = tensor.t().contiguous()
            continue
        rest = name[len("text_model."):] if name.startswith("text_model.") else name
        if rest in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[rest]] = tensor
            continue
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
        if match is None:
            raise ValueError(f"text encoder weight {name!r} has no place in the OpenCLIP layout")
        index, module, leaf = match.groups()
        block = f"transformer.resblocks.{index}."
        projection = re.fullmatch(r"self_attn\.([qkv])_proj", module)
        if projection is not None:
            fused.setdefault(f"{block}attn.in_proj_{leaf}", {})[projection.group(1)] = tensor
        elif module in _OPEN_CLIP_RENAMES:
            out[f"{block}{_OPEN_CLIP_RENAMES[module]}.{leaf}"] = tensor
        else:
            raise ValueError(f"text encoder weight {name!r} has no place in the OpenCLIP layout")
    for name, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{name}: the text encoder lacks {sorted({'q', 'k', 'v'} - set(parts))} projection(s)")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every peft LoRA layer replaced by its base layer's names and weights, the layer's
    active, unfused LoRA adapters added at their current scales (what the layer computes). Without peft layers
    this is the plain state dict. DoRA and LoRA-bias adapters are refused (fuse them first)."""
    state = model.state_dict()
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return state
    layers = {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    if not layers:
        return state
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if getattr(layer, "disable_adapters", False):
            continue
        prefix = f"{name}." if name else ""
        merged = set(getattr(layer, "merged_adapters", []))
        for adapter in layer.active_adapters:
            if adapter in merged or adapter not in getattr(layer, "lora_A", {}):
                continue
            if getattr(layer, "use_dora", {}).get(adapter) or getattr(layer, "lora_bias", {}).get(adapter):
                raise NotImplementedError(f"LoRA adapter {adapter!r} on {name} is a DoRA / LoRA-bias adapter; fuse "
                                          "it first (pipe.fuse_lora()), then save")
            delta = layer.get_delta_weight(adapter)
            key = prefix + "weight"
            deltas[key] = deltas[key] + delta if key in deltas else delta
    out: dict[str, torch.Tensor] = {}
    owners = sorted(layers, key=len, reverse=True)
    for key, tensor in state.items():
        owner = next((n for n in owners if not n or key.startswith(n + ".")), None)
        if owner is None:
            out[key] = tensor
            continue
        prefix = f"{owner}." if owner else ""
        rest = key[len(prefix):]
        if not rest.startswith("base_layer."):
            continue  # the LoRA factors themselves
        out[prefix + rest[len("base_layer."):]] = tensor
    for key, delta in deltas.items():
        out[key] = out[key] + delta.to(device=out[key].device, dtype=out[key].dtype)
    return out


def checkpoint_layout(pipe) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"``: the single-file layout :func:`save_single_file` writes for ``pipe``. SDXL
    has two text encoders; SD 2.x's text encoder is OpenCLIP's (``hidden_act="gelu"``), SD 1.x's OpenAI CLIP's."""
    for name in ("unet", "vae", "text_encoder"):
        if getattr(pipe, name, None) is None:
            if name == "text_encoder" and getattr(pipe, "text_encoder_2", None) is not None:
                raise NotImplementedError("single-file export covers SD 1.x/2.x and SDXL base pipelines; this one has "
                                          "no text_encoder (an SDXL refiner?): use save_pretrained")
            raise ValueError(f"the pipeline has no {name}; a single-file checkpoint needs unet, vae and text_encoder")
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if getattr(pipe.text_encoder.config, "hidden_act", None) == "gelu" else "sd1"


def single_file_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_single_file` writes, by their single-file names (not copied, not moved)."""
    layout = checkpoint_layout(pipe)
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    text = _clip_state(pipe.text_encoder)
    if layout == "sd1":
        state.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    elif layout == "sd2":
        text.pop("text_projection.weight", None)  # a CLIPTextModel has none; SD 2 never reads one
        state.update({"cond_stage_model.model." + k: v for k, v in clip_to_open_clip(text).items()})
    else:
        state.update({"conditioner.embedders.0.transformer." + k: v for k, v in text.items()})
        text_2 = _clip_state(pipe.text_encoder_2)
        if "text_projection.weight" not in text_2:
            raise ValueError("SDXL's text_encoder_2 has no text_projection (expected a CLIPTextModelWithProjection)")
        state.update({"conditioner.embedders.1.model." + k: v for k, v in clip_to_open_clip(text_2).items()})
    return state


def save_single_file(pipe, path: Union[str, os.PathLike]) -> Path:
    """Write an SD 1.x, SD 2.x or SDXL pipeline's UNet, VAE and text encoder(s) as one ``.safetensors`` file in
    the original layout (see the module docstring); returns the path.

    Active LoRA adapters (erasure LoRAs and your own, at their current scales) are merged into the weights written;
    merged ``delta`` erasure adapters are in the weights already. A per-prompt strength (SPM's facilitated
    transport) cannot be stored in weights: the adapter is written at its plain scale. The write is atomic (temp
    file + rename). Load it back with ``unsee.load_pipeline(path, config=<a diffusers folder of the same
    architecture>)`` or diffusers' ``from_single_file(path, config=...)``.
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in single_file_state_dict(pipe).items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return path


def export_checkpoint(adapter, pipe, out: Union[str, os.PathLike], *, scale: float = 1.0,
                      overwrite: bool = False) -> Path:
    """Write ``pipe`` with ``adapter`` (an unsee or kohya adapter file, or an :class:`~unsee.adapters.Adapter`)
    applied at ``scale`` as one single-file checkpoint (:func:`save_single_file`); returns the path.

    The adapter goes through ``pipe.load_erasure`` (so it is validated against the pipeline first) and is unloaded
    afterwards: ``pipe`` is left as it was. An existing ``out`` is replaced only with ``overwrite=True``. Raises
    :class:`~unsee.adapters.AdapterError` for what cannot be written."""
    from .adapters import AdapterError

    out = Path(out)
    if out.suffix != ".safetensors":
        raise AdapterError(f"a checkpoint is written as a .safetensors file; got {out.name!r}.")
    if out.is_dir():
        raise AdapterError(f"{out} is a folder; give the output file's path.")
    if out.exists() and not overwrite:
        raise AdapterError(f"{out} exists; pass --overwrite (overwrite=True) to replace it.")
    if isinstance(adapter, (str, os.PathLike)) and out.exists() and out.resolve() == Path(adapter).resolve():
        raise AdapterError(f"{out} is the adapter being exported; write the checkpoint to another path.")
    if not hasattr(pipe, "load_erasure"):
        raise AdapterError(f"the pipeline is a {type(pipe).__name__}, not an unsee pipeline: load it with "
                           "unsee.load_pipeline, or wrap it with UnseeStableDiffusionPipeline.from_pipe(pipe).")
    try:
        checkpoint_layout(pipe)  # a pipeline that cannot be written is refused before the adapter is applied
    except (NotImplementedError, ValueError) as error:
        raise AdapterError(str(error)) from None
    name = pipe.load_erasure(adapter, scale=scale)
    try:
        return save_single_file(pipe, out)
    finally:
        pipe.unload_erasure(name)
