"""unsee's attention processors: one family for every attention module of a UNet.

Each processor computes attention with a fused kernel: xformers' memory-efficient attention on
CUDA when xformers is installed and works, PyTorch's ``scaled_dot_product_attention`` otherwise
(SDPA picks flash / memory-efficient kernels on GPUs by itself). On top of that, for the batch
rows that ask for it:

- **PAG** (perturbed-attention guidance): in the selected self-attention layers, the attention map
  is replaced by the identity, so the layer's output is ``to_out(to_v(h))``;
- **NASA** (negative-away steer attention): in the selected cross-attention layers, the output
  before ``to_out`` is ``Z+ - alpha * Z-``, where ``Z-`` attends to the negative prompt's keys and
  values with the same queries.

Which rows and layers are affected lives in a shared :class:`AttentionControl` that the guided
pipeline call fills in; with no control set, the processors compute plain attention and give
the same result as diffusers' ``AttnProcessor2_0``. Installing them is scoped to a call
(:func:`installed_processors`) and restores the previous processors afterwards.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

_XFORMERS_WORKS: Optional[bool] = None


def xformers_works() -> bool:
    """True when xformers is installed and its memory-efficient attention runs on this CUDA device."""
    global _XFORMERS_WORKS
    if _XFORMERS_WORKS is None:
        _XFORMERS_WORKS = False
        if torch.cuda.is_available():
            try:
                import xformers.ops

                q = torch.randn(1, 2, 1, 40, device="cuda", dtype=torch.float16)
                xformers.ops.memory_efficient_attention(q, q, q)
                _XFORMERS_WORKS = True
            except Exception:  # not installed, built for another torch/CUDA, or no kernel for this GPU
                _XFORMERS_WORKS = False
    return _XFORMERS_WORKS


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(QK^T/sqrt(d))V for (batch, heads, tokens, dim) tensors: xformers on CUDA if it works, else SDPA."""
    if query.is_cuda and xformers_works():
        import xformers.ops

        # xformers takes (batch, tokens, heads, dim)
        out = xformers.ops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=mask
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)


def layer_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether attention module ``name`` is selected by one of ``patterns``.

    A pattern selects a module when it equals a whole dotted prefix of the module's path ("mid_block",
    "down_blocks.1", "up_blocks.0.attentions.1") -- so "down_blocks.1" never matches "down_blocks.10" --
    or when it is a regular expression in the form ``re:<pattern>`` that ``re.fullmatch``es the path.
    The alias "mid" means "mid_block".
    """
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
            continue
        prefix = "mid_block" if pattern == "mid" else pattern.rstrip(".")
        if name == prefix or name.startswith(prefix + "."):
            return True
    return False


@dataclass
class AttentionControl:
    """What the processors do beyond plain attention in the current UNet call.

    pag_rows / nasa_rows: batch rows (a slice of the batch the UNet sees) that get the treatment.
    pag_layers / nasa_layers: names of the selected attention modules.
    nasa_negative: the negative prompt's text embeddings, one row per NASA row the batch can hold (the conditional
        rows, and PAG's perturbed rows when PAG is on); a layer that sees fewer NASA rows (before the perturbed rows
        join the batch, or at a step where PAG's scale is 0) uses the first ones.
    nasa_keys_values: each NASA layer's keys and values of ``nasa_negative`` by (layer, rows), computed at the
        first step and reused: the negative prompt and the projections do not change within a call.
    attention_probe: if set, a (module names, token indices, rows) request whose cross-attention
        maps are recorded into ``probed_maps`` (used by adaptive negative steering).
    """

    pag_rows: Optional[slice] = None
    pag_layers: frozenset = frozenset()
    nasa_rows: Optional[slice] = None
    nasa_layers: frozenset = frozenset()
    nasa_alpha: float = 0.0
    nasa_negative: Optional[torch.Tensor] = None
    nasa_keys_values: dict = field(default_factory=dict)
    probe_layers: frozenset = frozenset()
    probe_rows: Optional[slice] = None
    probed_maps: list = field(default_factory=list)


class UnseeAttnProcessor:
    """Fused attention with per-row PAG identity attention and NASA negative-away steering."""

    def __init__(self, name: str, control: Optional[AttentionControl] = None) -> None:
        self.name = name
        self.control = control

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        control = self.control
        pag_rows = control.pag_rows if control is not None and not is_cross and self.name in control.pag_layers else None
        # PAG rows get the identity attention map (each token attends only to itself), so their output is V:
        # they need no queries or keys, and the other rows' attention is computed without them
        attending = hidden_states if pag_rows is None else _without_rows(hidden_states, pag_rows)
        query = attn.to_q(attending)
        key = attn.to_k(attending if pag_rows is not None else context)
        value = attn.to_v(context)

        heads = attn.heads
        head_dim = key.shape[-1] // heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2)

        q, k, v = split(query), split(key), split(value)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if pag_rows is None:
            out = fused_attention(q, k, v, attention_mask)
        else:
            mask = None if attention_mask is None else _without_rows(attention_mask, pag_rows)
            attended = fused_attention(q, k, _without_rows(v, pag_rows), mask)
            start = pag_rows.start
            out = torch.cat([attended[:start], v[pag_rows], attended[start:]])

        if control is not None:
            if is_cross and control.nasa_rows is not None and self.name in control.nasa_layers and control.nasa_alpha:
                rows = control.nasa_rows
                steered = q[rows]  # before PAG's perturbed rows join the batch, only the conditional rows are here
                cached = (self.name, steered.shape[0])
                if cached not in control.nasa_keys_values:
                    negative = control.nasa_negative[: steered.shape[0]]
                    if attn.norm_cross:
                        negative = attn.norm_encoder_hidden_states(negative)
                    neg_k, neg_v = split(attn.to_k(negative)), split(attn.to_v(negative))
                    if attn.norm_k is not None:
                        neg_k = attn.norm_k(neg_k)
                    control.nasa_keys_values[cached] = (neg_k, neg_v)
                neg_k, neg_v = control.nasa_keys_values[cached]
                neg_out = fused_attention(steered, neg_k, neg_v)
                if steered.shape[0] == out.shape[0]:  # every row is steered (NASA without CFG or PAG)
                    out = out - control.nasa_alpha * neg_out
                else:
                    out = out.clone()
                    out[rows] = out[rows] - control.nasa_alpha * neg_out
            if is_cross and control.probe_rows is not None and self.name in control.probe_layers:
                rows = control.probe_rows
                scores = (q[rows] @ k[rows].transpose(-1, -2)) * attn.scale
                control.probed_maps.append(scores.softmax(-1).mean(1).detach())  # (rows, pixels, tokens)

        hidden_states = out.transpose(1, 2).reshape(out.shape[0], -1, heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _without_rows(tensor: torch.Tensor, rows: slice) -> torch.Tensor:
    """``tensor`` less the batch rows ``rows`` (a contiguous slice)."""
    if rows.start == 0:
        return tensor[rows.stop:]
    if rows.stop >= tensor.shape[0]:
        return tensor[: rows.start]
    return torch.cat([tensor[: rows.start], tensor[rows.stop:]])


# UNet -> {attention module name: module}. Walking a UNet's modules takes milliseconds (about 6 ms for SDXL's), which
# a guided call would otherwise pay several times over; the attention modules of a UNet do not change (LoRA layers
# and fused projections are swapped in below them).
_ATTENTION_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def attention_modules(unet) -> dict[str, torch.nn.Module]:
    """The UNet's attention modules by name, in ``unet.attn_processors``' order (computed once per UNet)."""
    modules = _ATTENTION_MODULES.get(unet)
    if modules is None:
        modules = {name: module for name, module in unet.named_modules() if hasattr(module, "get_processor")}
        _ATTENTION_MODULES[unet] = modules
    return modules


@contextlib.contextmanager
def installed_processors(unet, control: Optional[AttentionControl] = None,
                         modules: Optional[Iterable[str]] = None) -> Iterator[dict[str, UnseeAttnProcessor]]:
    """Install unsee's processors on the attention modules named in ``modules`` (all if None) for the ``with`` block.

    Other modules keep their processors, so a method touching a few layers costs nothing elsewhere.
    The previous processors (diffusers' defaults, xformers', LoRA-aware ones...) are restored on exit,
    also when the block raises. Only the named modules are touched (no walk over the whole UNet).
    """
    every = attention_modules(unet)
    wanted = None if modules is None else set(modules)
    names = [name for name in every if wanted is None or name in wanted]
    previous = {name: every[name].get_processor() for name in names}
    ours = {name: UnseeAttnProcessor(name, control) for name in names}
    try:
        for name, processor in ours.items():
            every[name].set_processor(processor)
        yield {f"{name}.processor": processor for name, processor in ours.items()}
    finally:
        for name, processor in previous.items():
            every[name].set_processor(processor)


def attention_module_names(unet, cross: Optional[bool] = None) -> list[str]:
    """Names of the UNet's attention modules; ``cross=True`` for cross-attention (attn2), False for self."""
    names = list(attention_modules(unet))
    if cross is None:
        return names
    return [n for n in names if n.endswith("attn2") == cross]
