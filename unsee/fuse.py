"""Fusing adapters: several erasure adapters of one base model become one adapter file.

    fused = unsee.fuse_adapters(["esd-x-circle.safetensors", "esd-x-star.safetensors"])
    fused.save("esd-x-circle-star.safetensors")

or ``unsee fuse a.safetensors b.safetensors --out ab.safetensors``.

``stack`` (the default): the fused adapter changes the weights exactly as loading the sources together (each at
scale 1) does.

- ``delta`` + ``delta``: the deltas are summed (keys that only one adapter has are kept as they are).
- ``lora`` + ``lora``: the factors are concatenated along the rank, module by module. With scaling ``s_i =
  alpha_i / r_i`` of source i, the fused adapter has rank ``R = sum r_i``, alpha ``R`` (scaling 1), ``lora_A`` the
  sources' A stacked (rows) and ``lora_B`` their ``s_i * B_i`` side by side (columns), so that ``B @ A = sum_i s_i
  B_i @ A_i``: exact for any ranks and alphas. A module that a source does not touch gets zero rows and columns
  for that source (an unsee LoRA has one rank for every module). The file loads through peft like any unsee LoRA.
- ``text_encoder`` adapters (AdvUnlearn) sum the same way: deltas are summed, LoRAs concatenated; the result is a
  ``text_encoder`` adapter.
- mixed kinds: a LoRA source (``lora``, or a ``text_encoder`` LoRA) is turned into the exact weight delta it stands
  for, ``s * B @ A`` (Conv2d LoRAs reshaped to the kernel's shape), and everything is summed as deltas; the result
  is a ``delta`` adapter (``text_encoder`` when every source touches only the text encoders). Such a file holds
  full-shape tensors for every module the LoRAs touched, so it can be much larger than its LoRA sources.

The sources must be adapters of one base model: for every component two of them touch, their architecture
fingerprints must be equal (a kohya file made elsewhere has the fingerprint "unknown", which matches any; then the
shapes of the tensors they share must agree). Anything else raises :class:`~unsee.adapters.AdapterError` naming the
two sources.

The fused adapter's ``concepts`` are the sources' in order (each once); its ``method`` is the sources' method when
they share one (so an SPM fusion keeps Facilitated Transport, whose one strength then covers every fused concept:
the largest over them), else ``"fused"``; ``hyperparameters`` hold ``fuse`` (the fusion) and ``sources`` (each
source's method, concepts, kind, rank, alpha, hyperparameters and file name); ``training`` holds each source's
training summary without its per-step losses. Tensors are stored in float32 (float64 when a source is float64).

The second fusion is ``mace``, MACE's closed-form fusion (Lu et al., CVPR 2024, stage 3), for adapters of the
cross-attention key and value projections (``attn2.to_k``, ``attn2.to_v``: the layers that read the text). Per
layer, with W₀ the original weight, W_i = W₀ + ΔW_i the weight with source i applied, C_i the text embeddings of
the prompts source i erases (columns; every token position of each prompt) and P those of prompts to keep:

    W = argmin  Σ_i ‖W C_i − W_i C_i‖² + λ‖W − W₀‖² + s‖W P − W₀ P‖²
    ΔW = W − W₀ = Σ_i ΔW_i C_i C_iᵀ M⁻¹,    M = λ I + Σ_i C_i C_iᵀ + s P Pᵀ

so each concept keeps what its own adapter does to it, instead of the sum of every adapter's change (stacking), and
the fused edit is a LoRA of rank Σ_i (columns of C_i): B_l = [ΔW_i,l C_i]_i, A = [C_i]ᵀ M⁻¹ (one A for every layer;
stored as a ``delta`` adapter when that rank would reach the embedding width). The prompts of source i
(:func:`erased_prompts`): its concepts alone, its ``templates`` filled with them (UCE, RECE), the in-context
``erase_from`` prompts it was trained on (ESD, SPM), and any ``prompts=`` given for its concepts. Unlike MACE's
one-concept prompts, such a prompt may name the concepts of several sources ("a striped red circle"); its columns
then go to a block of their own whose target is those sources' changes summed (``ΔW_i + ΔW_j`` in place of
``ΔW_i``), so that no source's refit undoes another's erasure. λ = ``lamb`` (0.5) and s = ``preserve_scale`` (1.0)
with the preserved prompts ``[""]`` by default: MACE itself runs with λ 0 and s 1e-4 over cached sums of thousands
of COCO prompts, which unsee does not ship; without such a prior, λ > 0 keeps M invertible, and a preserve set of
ordinary prompts is what keeps the refit from spreading to them (``docs/erasure.md``).
The embeddings come from a callable ``embed(texts) -> (n, L, d)`` (``unsee fuse --method mace --model M`` uses the
model's text encoders, as UCE does), so this module stays free of pipelines.

The third fusion is ``distill``, for adapters of the text encoder (AdvUnlearn's): the sources' prompts are split
as for MACE (each source's alone, and those naming several sources' concepts, whose target is those sources
together), and a new text-encoder delta is trained so that the encoder gives each block's prompts the embeddings
its sources give them, and the preserved prompts the original ones (:mod:`unsee.erasure.distill`). The training
is a callable ``distill(sources, blocks, preserve) -> tensors`` (``unsee fuse --method distill --model M``:
:class:`unsee.erasure.distill.TextEncoderDistiller` on the model's pipeline), for the same reason as ``embed``.

This module is the adapter format's layer: it reads files and builds adapters, and knows no pipeline or erasure
method.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .adapters import (LORA_A, LORA_B, UNKNOWN, Adapter, AdapterError, TEXT_ENCODERS, fill_concept, load_adapter,
                       names_concept, short_repr, validate_adapter)

__all__ = ["FUSE_METHODS", "MACE_MODULES", "erased_prompts", "fuse_adapters", "mace_fuse", "lora_to_delta"]

#: the fusions :func:`fuse_adapters` knows
FUSE_METHODS = ("stack", "mace", "distill")
#: the modules MACE's fusion refits (their weights' names end so): the cross-attention keys and values
MACE_MODULES = (".attn2.to_k.weight", ".attn2.to_v.weight")

Source = Union[str, os.PathLike, Adapter]


def _canonical(key: str) -> str:
    """A tensor key with CLIP's optional ``text_model.`` level removed (both transformers layouts name one tensor)."""
    component, _, rest = key.partition(".")
    return f"{component}.{rest.removeprefix('text_model.')}"


def _read(sources: Sequence[Source]) -> tuple[list[Adapter], list[str]]:
    adapters, names = [], []
    seen: dict[str, int] = {}
    for number, source in enumerate(sources, 1):
        if isinstance(source, Adapter):
            validate_adapter(source)
            adapters.append(source)
            names.append(f"adapter {number} ({source.method} {', '.join(source.concepts) or '?'})")
            continue
        if not isinstance(source, (str, os.PathLike)):
            raise AdapterError(f"fuse_adapters takes adapter files or unsee Adapters, got {type(source).__name__}.")
        path = Path(source).expanduser()
        key = str(path.resolve())
        if key in seen:
            raise AdapterError(f"{path} is given twice; fusing it with itself would apply it twice, give each "
                               f"adapter once.")
        seen[key] = number
        adapters.append(load_adapter(path))
        names.append(str(path))
    return adapters, names


def _check_fingerprints(adapters: list[Adapter], names: list[str]) -> dict[str, str]:
    """The fused fingerprint; AdapterError when two sources were made for different models."""
    fused: dict[str, tuple[str, int]] = {}
    for i, adapter in enumerate(adapters):
        for component in adapter.components:
            value = adapter.fingerprint.get(component, UNKNOWN)
            if value == UNKNOWN:
                fused.setdefault(component, (UNKNOWN, i))
                continue
            known, where = fused.get(component, (UNKNOWN, i))
            if known != UNKNOWN and known != value:
                raise AdapterError(
                    f"{names[where]} and {names[i]} are adapters of different base models (their {component} "
                    f"fingerprints are {known} and {value}); fuse only adapters trained on the same model.")
            fused[component] = (value, i)
    return {component: value for component, (value, _) in fused.items()}


def lora_to_delta(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The exact weight deltas a LoRA adapter stands for: ``<component>.<module>.weight`` -> ``s * B @ A`` (Conv2d
    LoRAs reshaped to the kernel's shape, ``s`` the adapter's ``alpha / rank``), in float32 or float64."""
    if not adapter.is_lora:
        raise AdapterError(f"lora_to_delta takes a LoRA adapter, got a {adapter.kind!r} adapter with delta tensors.")
    scaling = adapter.scaling
    deltas = {}
    for key, a in adapter.tensors.items():
        if not key.endswith(LORA_A):
            continue
        module = key[: -len(LORA_A)]
        b = adapter.tensors[module + LORA_B]
        dtype = _dtype([a, b])
        product = b.to(dtype).flatten(1) @ a.to(dtype).flatten(1)
        shape = (b.shape[0], *a.shape[1:])
        deltas[module + ".weight"] = (product * scaling).reshape(shape)
    return deltas


def _dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _sum_deltas(parts: list[tuple[int, dict[str, torch.Tensor]]], names: list[str]) -> dict[str, torch.Tensor]:
    dtype = _dtype([t for _, tensors in parts for t in tensors.values()])
    total: dict[str, torch.Tensor] = {}
    spelling: dict[str, str] = {}
    owner: dict[str, int] = {}
    for i, tensors in parts:
        for key, tensor in tensors.items():
            canonical = _canonical(key)
            if canonical not in total:
                spelling[canonical], owner[canonical] = key, i
                total[canonical] = tensor.to(dtype).clone()
                continue
            if tuple(total[canonical].shape) != tuple(tensor.shape):
                raise AdapterError(
                    f"{names[owner[canonical]]} and {names[i]} disagree on the shape of {short_repr(key)} "
                    f"({tuple(total[canonical].shape)} vs {tuple(tensor.shape)}); they are adapters of different "
                    f"models.")
            total[canonical] += tensor.to(dtype)
    return {spelling[c]: t for c, t in total.items()}


def _concat_loras(adapters: list[Adapter], names: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """LoRA factors side by side: (tensors, fused rank); each source's scaling folded into its B."""
    dtype = _dtype([t for adapter in adapters for t in adapter.tensors.values()])
    ranks = [int(next(t for k, t in a.tensors.items() if k.endswith(LORA_A)).shape[0]) for a in adapters]
    modules: dict[str, str] = {}  # canonical module -> the key spelling used
    shapes: dict[str, tuple[tuple, tuple, int]] = {}  # canonical module -> (A shape, B shape, the source it is from)
    for i, adapter in enumerate(adapters):
        for key, a in adapter.tensors.items():
            if not key.endswith(LORA_A):
                continue
            module = key[: -len(LORA_A)]
            canonical = _canonical(module)
            b = adapter.tensors[module + LORA_B]
            # the shapes without the rank: A [r, in, (kh, kw)], B [out, r, (1, 1)]
            a_shape, b_shape = (tuple(a.shape[1:]), (b.shape[0], *b.shape[2:]))
            if canonical in shapes:
                known_a, known_b, where = shapes[canonical]
                if (known_a, known_b) != (a_shape, b_shape):
                    raise AdapterError(
                        f"{names[where]} and {names[i]} disagree on the shape of the LoRA module {short_repr(module)}; "
                        f"they are adapters of different models.")
            else:
                modules[canonical], shapes[canonical] = module, (a_shape, b_shape, i)
    fused = {}
    for canonical, module in modules.items():
        a_shape, b_shape, _ = shapes[canonical]
        downs, ups = [], []
        for adapter, rank in zip(adapters, ranks):
            found = next((k[: -len(LORA_A)] for k in adapter.tensors
                          if k.endswith(LORA_A) and _canonical(k[: -len(LORA_A)]) == canonical), None)
            if found is None:  # this source leaves the module alone: zero rows and columns
                downs.append(torch.zeros((rank, *a_shape), dtype=dtype))
                ups.append(torch.zeros((b_shape[0], rank, *b_shape[1:]), dtype=dtype))
            else:
                downs.append(adapter.tensors[found + LORA_A].to(dtype))
                ups.append(adapter.tensors[found + LORA_B].to(dtype) * adapter.scaling)
        fused[module + LORA_A] = torch.cat(downs, dim=0).contiguous()
        fused[module + LORA_B] = torch.cat(ups, dim=1).contiguous()
    return fused, sum(ranks)


def _metadata(adapters: list[Adapter], names: list[str], sources: Sequence[Source], method: str,
              converted: bool) -> tuple[str, list[str], dict, dict]:
    methods = {adapter.method for adapter in adapters}
    fused_method = methods.pop() if len(methods) == 1 else "fused"
    concepts: list[str] = []
    for adapter in adapters:
        concepts += [c for c in adapter.concepts if c not in concepts]
    described = []
    for adapter, name, source in zip(adapters, names, sources):
        entry = {"method": adapter.method, "concepts": list(adapter.concepts), "kind": adapter.kind,
                 "hyperparameters": adapter.hyperparameters}
        if adapter.is_lora:
            entry.update(rank=adapter.rank, alpha=adapter.alpha)
        if not isinstance(source, Adapter):
            entry["file"] = Path(name).name
        described.append(entry)
    hyperparameters: dict[str, Any] = {"fuse": method, "sources": described}
    if converted:
        hyperparameters["lora_converted_to_delta"] = True
    transport = [a.hyperparameters.get("facilitated_transport") for a in adapters]
    if fused_method != "fused" and all(t is True for t in transport):
        hyperparameters["facilitated_transport"] = True
    training = {"fused": len(adapters),
                "sources": [{k: v for k, v in a.training.items() if k != "losses"} for a in adapters]}
    return fused_method, concepts, hyperparameters, training


def fuse_adapters(adapters: Sequence[Source], method: str = "stack", *, embed: Optional[Callable] = None,
                  preserve: Sequence[str] = ("",), lamb: float = 0.5, preserve_scale: float = 1.0,
                  prompts: Optional[Mapping[str, Sequence[str]]] = None,
                  distill: Optional[Callable] = None) -> Adapter:
    """One adapter that erases what every one of ``adapters`` erases (files or :class:`~unsee.adapters.Adapter`
    objects of one base model); see the module docstring for how each kind is fused.

    ``method="mace"`` needs ``embed``: a callable taking a list of texts and returning their token embeddings as the
    UNet's cross-attention reads them, (n, L, d) (``functools.partial(unsee.erasure.uce.embed, pipe)``); it refits
    with each source's concepts, keeping ``preserve`` (prompts, ``""`` the empty one) with weight ``preserve_scale``
    and the original weights with weight ``lamb`` (:func:`mace_fuse`). Each source is refitted on its
    :func:`erased_prompts` and on ``prompts[c]`` for each of its concepts c (prompts naming c in context); a prompt
    that names the concepts of several sources is refitted to what those sources do together. ``stack`` takes none
    of these.

    ``method="distill"`` needs ``distill``: a callable ``(sources, blocks, preserve) -> tensors`` that trains the
    fused text-encoder delta (``unsee.erasure.distill.TextEncoderDistiller(pipe)``); ``blocks`` are (source
    indices, prompts) split as for MACE from the same prompts, and ``preserve`` is kept (``lamb`` and
    ``preserve_scale`` are MACE's alone). Every source must change only the text encoders.

    Raises :class:`~unsee.adapters.AdapterError` for fewer than two adapters, a file given twice, an unreadable
    file, adapters of different base models, an unknown ``method``, (``mace``) sources that are not
    cross-attention key/value adapters, or (``distill``) sources that change the UNet.
    """
    if method not in FUSE_METHODS:
        raise AdapterError(f"unknown fuse method {short_repr(method)}; choose one of {', '.join(FUSE_METHODS)}.")
    if isinstance(adapters, (str, os.PathLike, Adapter)) or len(adapters) < 2:
        raise AdapterError("fuse_adapters needs at least two adapters; give a list of adapter files or Adapters.")
    if (method == "mace") != (embed is not None):
        raise AdapterError("method 'mace' needs embed= (a text encoder: texts -> (n, L, d) embeddings), and the "
                           "others take none; pass embed=functools.partial(unsee.erasure.uce.embed, pipe) with 'mace'.")
    if (method == "distill") != (distill is not None):
        raise AdapterError("method 'distill' needs distill= (the training: unsee.erasure.distill.TextEncoderDistiller"
                           "(pipe)), and the others take none.")
    sources = list(adapters)
    loaded, names = _read(sources)
    fingerprint = _check_fingerprints(loaded, names)
    if method == "distill":
        unet = next((name for adapter, name in zip(loaded, names)
                     if any(component not in TEXT_ENCODERS for component in adapter.components)), None)
        if unet is not None:
            raise AdapterError(f"{unet} changes the UNet; method 'distill' fuses text-encoder adapters (AdvUnlearn's): "
                               f"fuse UNet adapters with 'stack', or 'mace' for cross-attention key/value adapters.")
    if method in ("mace", "distill"):
        label = {"mace": "MACE", "distill": "distillation"}[method]
        preserve = list(preserve)
        if not preserve or not all(isinstance(p, str) for p in preserve):
            raise AdapterError(f"{label} needs a non-empty list of prompts to preserve ('' is the empty prompt).")
        prompts = dict(prompts or {})
        bad = next((c for c, texts in prompts.items()
                    if isinstance(texts, str) or not all(isinstance(t, str) and t.strip() for t in texts)), None)
        if bad is not None:
            raise AdapterError(f"prompts[{short_repr(bad)}] must be a list of non-empty prompts naming the concept.")
        for adapter, name in zip(loaded, names):
            if not adapter.concepts:
                raise AdapterError(f"{name} names no concept; {label} fits each adapter on its concepts' prompts.")
        erased = [c for adapter in loaded for c in adapter.concepts]
        stray = next((c for c in prompts if c not in erased), None)
        if stray is not None:
            raise AdapterError(f"prompts are given for {short_repr(stray)}, which none of the adapters erases; give "
                               f"them for the adapters' concepts ({', '.join(erased)}).")
        own, shared = _refit_prompts(loaded, prompts)
    if method == "distill":
        blocks = [((i,), texts) for i, texts in enumerate(own) if texts] + list(shared.items())
        tensors = distill(loaded, blocks, preserve)
        fused_method, concepts, hyperparameters, training = _metadata(loaded, names, sources, method, False)
        hyperparameters.pop("facilitated_transport", None)
        hyperparameters.update(preserve=preserve, refit_prompts=own,
                               refit_together=[{"sources": list(k), "prompts": v} for k, v in shared.items()],
                               distill=dict(getattr(distill, "settings", {})))
        fused = Adapter(kind="text_encoder", method=fused_method, concepts=concepts, tensors=tensors,
                        fingerprint=fingerprint, hyperparameters=hyperparameters, training=training)
        validate_adapter(fused)
        return fused
    if method == "mace":
        keep = _columns(embed(preserve))
        columns = [_columns(embed(texts)) if texts else keep[:, :0] for texts in own]
        blocks = [(_columns(embed(texts)), together) for together, texts in shared.items()]
        fused = mace_fuse(loaded, columns, keep, lamb=lamb, preserve_scale=preserve_scale,
                          names=names, together=blocks)
        fused.fingerprint = fingerprint
        fused.hyperparameters.update(preserve=preserve, refit_prompts=own,
                                     refit_together=[{"sources": list(k), "prompts": v} for k, v in shared.items()])
        validate_adapter(fused)
        return fused
    text_only = all(component in TEXT_ENCODERS for adapter in loaded for component in adapter.components)
    rank: Optional[int] = None
    converted = False
    if all(adapter.is_lora for adapter in loaded):
        tensors, rank = _concat_loras(loaded, names)
        kinds = {adapter.kind for adapter in loaded}
        kind = "text_encoder" if kinds == {"text_encoder"} else "lora"
    else:
        converted = any(adapter.is_lora for adapter in loaded)
        parts = [(i, lora_to_delta(a) if a.is_lora else dict(a.tensors)) for i, a in enumerate(loaded)]
        tensors = _sum_deltas(parts, names)
        kind = "text_encoder" if text_only and all(a.kind == "text_encoder" for a in loaded) else "delta"
    fused_method, concepts, hyperparameters, training = _metadata(loaded, names, sources, method, converted)
    fused = Adapter(kind=kind, method=fused_method, concepts=concepts, tensors=tensors, fingerprint=fingerprint,
                    hyperparameters=hyperparameters, training=training, rank=rank,
                    alpha=float(rank) if rank is not None else None)
    validate_adapter(fused)
    return fused


# ----------------------------------------------------------------------------------------------
# MACE
# ----------------------------------------------------------------------------------------------


def _strings(value: Any) -> list[str]:
    """The strings in a hyperparameter: a string, or (nested) lists of them; anything else gives none."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _strings(item)]
    return []


def erased_prompts(adapter: Adapter) -> list[str]:
    """The prompts an adapter was made to act on, whose embeddings MACE refits it on: its concepts, its
    ``templates`` hyperparameter filled with each concept (UCE, RECE), and its ``erase_from`` prompts (the
    in-context prompts ESD and SPM trained on), each once, in that order."""
    concepts = list(adapter.concepts)
    templates = _strings(adapter.hyperparameters.get("templates"))
    prompts = concepts + [prompt for template in templates for concept in concepts
                          for prompt in fill_concept([template], concept)]
    prompts += _strings(adapter.hyperparameters.get("erase_from"))
    return list(dict.fromkeys(prompts))


def _refit_prompts(adapters: Sequence[Adapter], prompts: Mapping[str, Sequence[str]]
                   ) -> tuple[list[list[str]], dict[tuple[int, ...], list[str]]]:
    """The prompts the sources are refitted on (each source's :func:`erased_prompts`, then ``prompts[c]`` of its
    concepts), split by the sources a prompt belongs to (those that list it, and those whose concepts it names):
    per source the prompts that are its alone, and (sorted source indices) -> the prompts of those sources
    together. Each prompt once, in the order first listed."""
    owners: dict[str, set[int]] = {}
    for i, adapter in enumerate(adapters):
        for text in erased_prompts(adapter) + [t for c in adapter.concepts for t in prompts.get(c, ())]:
            owners.setdefault(text, set()).add(i)
    own: list[list[str]] = [[] for _ in adapters]
    shared: dict[tuple[int, ...], list[str]] = {}
    for text, listed in owners.items():
        together = tuple(j for j, other in enumerate(adapters)
                         if j in listed or any(names_concept(text, c) for c in other.concepts))
        (own[together[0]] if len(together) == 1 else shared.setdefault(together, [])).append(text)
    return own, shared


def _columns(embeddings: torch.Tensor) -> torch.Tensor:
    """(n, L, d) token embeddings as (d, n * L) float64 columns."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3:
        raise AdapterError("embed must return a (texts, tokens, width) tensor of token embeddings.")
    return embeddings.detach().to("cpu", torch.float64).reshape(-1, embeddings.shape[-1]).T


def mace_fuse(adapters: Sequence[Adapter], embeddings: Sequence[torch.Tensor], preserve: torch.Tensor,
              lamb: float = 0.5, preserve_scale: float = 1.0, names: Optional[Sequence[str]] = None,
              together: Sequence[tuple[torch.Tensor, Sequence[int]]] = ()) -> Adapter:
    """MACE's closed-form fusion (see the module docstring) of cross-attention key/value ``adapters``, given for
    each the (d, k_i) columns of its concepts' embeddings, and the (d, m) columns of the preserved prompts.
    ``together``: more (d, k_b) column blocks, each with the indices of the sources whose summed change it is
    refitted to (the embeddings of prompts naming several sources' concepts).

    The result is a ``lora`` adapter of rank Σ k_i + Σ k_b and alpha = rank (a ``delta`` adapter when that reaches
    d), with the sources' concepts. Raises :class:`~unsee.adapters.AdapterError` for a source that touches another
    module (or another component than the UNet), embeddings whose width is not the layers' input width, a block
    naming a source that does not exist, or λ <= 0 with s < 0.
    """
    names = list(names) if names is not None else [f"adapter {i + 1}" for i in range(len(adapters))]
    if len(embeddings) != len(adapters):
        raise AdapterError(f"mace_fuse takes one embedding matrix per adapter: {len(adapters)} adapters, "
                           f"{len(embeddings)} matrices.")
    if not (lamb >= 0 and preserve_scale >= 0 and (lamb > 0 or preserve_scale > 0)):
        raise AdapterError(f"MACE needs lamb >= 0 and preserve_scale >= 0, not both 0 (got lamb={lamb:g}, "
                           f"preserve_scale={preserve_scale:g}).")
    deltas = []
    for adapter, name in zip(adapters, names):
        tensors = lora_to_delta(adapter) if adapter.is_lora else dict(adapter.tensors)
        other = next((k for k in tensors if not (k.startswith("unet.") and k.endswith(MACE_MODULES))), None)
        if other is not None:
            raise AdapterError(f"{name} changes {short_repr(other)}; MACE fuses adapters of the UNet's cross-attention "
                               f"keys and values (attn2.to_k, attn2.to_v) only: use --method stack for it.")
        deltas.append({k: t.to(torch.float64) for k, t in tensors.items()})
    for _, sources in together:
        if not sources or any(not 0 <= j < len(adapters) for j in sources):
            raise AdapterError(f"mace_fuse: a block of shared columns names sources {list(sources)}, but there are "
                               f"{len(adapters)} adapters.")
    # each block of columns and the sources whose summed change it keeps
    blocks = [(c.to(torch.float64), (i,)) for i, c in enumerate(embeddings)]
    blocks += [(c.to(torch.float64), tuple(sources)) for c, sources in together]
    columns = [c for c, _ in blocks]
    width = columns[0].shape[0]
    for delta, name in zip(deltas, names):
        bad = next((k for k, t in delta.items() if t.shape[1] != width), None)
        if bad is not None:
            raise AdapterError(f"{name}: {short_repr(bad)} reads {delta[bad].shape[1]} features, but the text "
                               f"embeddings have {width}; embed with the model the adapters were trained on.")
    keep = preserve.to(torch.float64)
    m = lamb * torch.eye(width, dtype=torch.float64) + preserve_scale * keep @ keep.T
    for c in columns:
        m = m + c @ c.T
    stacked = torch.cat(columns, dim=1)  # (d, K)
    down = torch.linalg.solve(m, stacked).T  # Cᵀ M⁻¹ (M is symmetric)
    keys = sorted({k for delta in deltas for k in delta})
    up = {}
    for key in keys:
        out = next(delta[key].shape[0] for delta in deltas if key in delta)
        up[key] = torch.cat([sum((deltas[j][key] @ c for j in sources if key in deltas[j]),
                                 torch.zeros((out, c.shape[1]), dtype=torch.float64)) for c, sources in blocks], dim=1)
    rank = stacked.shape[1]
    if rank < width:
        tensors = {}
        for key in keys:
            module = key[: -len(".weight")]
            tensors[module + LORA_A] = down.float().contiguous()
            tensors[module + LORA_B] = up[key].float().contiguous()
        kind, fused_rank, alpha = "lora", rank, float(rank)
    else:
        tensors = {key: (up[key] @ down).float().contiguous() for key in keys}
        kind, fused_rank, alpha = "delta", None, None
    method, concepts, hyperparameters, training = _metadata(list(adapters), names, list(adapters), "mace",
                                                            converted=False)
    for source, name in zip(hyperparameters["sources"], names):
        if not name.startswith("adapter "):
            source["file"] = Path(name).name
    hyperparameters.update(lamb=lamb, preserve_scale=preserve_scale, columns=[c.shape[1] for c in columns])
    hyperparameters.pop("facilitated_transport", None)
    fused = Adapter(kind=kind, method=method, concepts=concepts, tensors=tensors,
                    fingerprint={"unet": next((a.fingerprint.get("unet") for a in adapters
                                               if a.fingerprint.get("unet") not in (None, UNKNOWN)), UNKNOWN)},
                    hyperparameters=hyperparameters, training=training, rank=fused_rank, alpha=alpha)
    validate_adapter(fused)
    return fused
