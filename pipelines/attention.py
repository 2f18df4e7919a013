"""unsee's attention processor: plain fused attention plus the attention edits of a guided call.

The processor computes attention as diffusers' ``AttnProcessor2_0`` does, with the fused kernel behind diffusers'
attention dispatch (``dispatch_attention_fn``: the backend chosen with ``set_attention_backend`` or the
``attention_backend`` context, SDPA by default, which gives the same numbers as ``AttnProcessor2_0``), and xformers'
memory-efficient attention on CUDA when xformers is installed and works. On top of that it applies the
:class:`~unsee.guidance.base.AttentionEdit` objects of its module, each one feature of one method for one call
(PAG's identity rows, NASA's and NAG's attention-space negative, the adaptive start's probe), to the batch rows
each asks for. The edits live in the method files; the processor knows none of them by name. With no edits it is
plain attention. Installing processors is scoped to a call (:func:`installed_processors`) and restores the
previous processors afterwards.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Iterator, Optional, Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from unsee.guidance.base import AttentionEdit, layer_matches  # noqa: F401  (layer_matches: re-exported)

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
    """softmax(QK^T/sqrt(d))V for (batch, tokens, heads, dim) tensors through diffusers' attention dispatch.

    xformers on CUDA when it works; otherwise diffusers' active backend (``native``, i.e. SDPA, unless the user
    chose another with ``set_attention_backend`` or ``attention_backend``). The native backend runs the same SDPA
    call as diffusers' ``AttnProcessor2_0`` on the same strides, so results are bit-identical to it on the CPU.
    """
    backend = "xformers" if query.is_cuda and xformers_works() else None
    return dispatch_attention_fn(query, key, value, attn_mask=mask, backend=backend)


class GuidedAttnProcessor:
    """Fused attention for one module, with the attention edits of the current call for that module."""

    def __init__(self, name: str, edits: Sequence[AttentionEdit] = ()) -> None:
        self.name = name
        self.edits = tuple(edits)

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

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        # rows with the identity attention map (each token attends only to itself) output V: they need no queries
        # or keys, and the other rows' attention is computed without them (self-attention only)
        identity = next((e.rows for e in self.edits if e.identity and e.rows is not None), None)
        if encoder_hidden_states is not None:
            identity = None
        attending = hidden_states if identity is None else _without_rows(hidden_states, identity)
        query = attn.to_q(attending)
        key = attn.to_k(attending if identity is not None else context)
        value = attn.to_v(context)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        q = query.view(query.shape[0], -1, heads, head_dim)
        k = key.view(key.shape[0], -1, heads, head_dim)
        v = value.view(value.shape[0], -1, heads, head_dim)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if identity is None:
            out = fused_attention(q, k, v, attention_mask)
        else:
            mask = None if attention_mask is None else _without_rows(attention_mask, identity)
            attended = fused_attention(q, k, _without_rows(v, identity), mask)
            out = torch.cat([attended[: identity.start], v[identity], attended[identity.start:]])
        for edit in self.edits:
            if edit.rows is not None and not edit.identity:
                out = edit.edit_output(attn, self.name, q, k, v, out, fused_attention)

        hidden_states = out.reshape(out.shape[0], -1, heads * head_dim)
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
def installed_processors(unet, edits: Sequence[AttentionEdit] = (),
                         modules: Optional[Iterable[str]] = None) -> Iterator[dict[str, GuidedAttnProcessor]]:
    """Install unsee's processor, with ``edits``, on the attention modules the edits name (every module when
    ``modules`` is None and there are no edits; else the edits' modules plus ``modules``) for the ``with`` block.

    Other modules keep their processors, so a method touching a few layers costs nothing elsewhere. The previous
    processors (diffusers' defaults, xformers', LoRA-aware ones...) are restored on exit, also when the block
    raises. Only the named modules are touched (no walk over the whole UNet).
    """
    every = attention_modules(unet)
    wanted: Optional[set] = None
    if edits or modules is not None:
        wanted = set(modules or ()).union(*(edit.modules for edit in edits))
    names = [name for name in every if wanted is None or name in wanted]
    previous = {name: every[name].get_processor() for name in names}
    ours = {name: GuidedAttnProcessor(name, [e for e in edits if name in e.modules]) for name in names}
    try:
        for name, processor in ours.items():
            every[name].set_processor(processor)
        yield {f"{name}.processor": processor for name, processor in ours.items()}
    finally:
        for name, processor in previous.items():
            every[name].set_processor(processor)


def attention_module_names(unet, cross: Optional[bool] = None) -> list[str]:
    """Names of the UNet's attention modules; ``cross=True`` for cross-attention, False for self-attention
    (diffusers' ``Attention.is_cross_attention``; by name, attn2, for modules without it)."""
    modules = attention_modules(unet)
    if cross is None:
        return list(modules)
    return [name for name, module in modules.items()
            if bool(getattr(module, "is_cross_attention", name.endswith("attn2"))) == cross]
