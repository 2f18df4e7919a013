"""LoRA key conventions and LoRA extraction: pure functions on state dicts, no pipeline, no file.

Three spellings of the same LoRA on a Stable Diffusion 1.x/2.x or SDXL model:

- **diffusers/peft** (unsee's own ``lora`` adapters, what ``pipe.save_lora_weights`` writes):
  ``<component>.<module path>.lora_A.weight`` ([r, in] or [r, in, kh, kw]) and ``.lora_B.weight``
  ([out, r] or [out, r, 1, 1]), one rank and one alpha per component in the header (``lora_adapter_metadata``).
- **kohya** (kohya-ss sd-scripts, AUTOMATIC1111/Forge, ComfyUI; diffusers' ``load_lora_weights`` reads it too):
  ``lora_unet_<module path with "_" for ".">.lora_down.weight`` (= lora_A), ``.lora_up.weight`` (= lora_B) and
  ``.alpha`` (a scalar tensor per module). Text encoders: ``lora_te_`` for the single CLIP of SD 1.x/2.x,
  ``lora_te1_`` / ``lora_te2_`` for SDXL's two; their paths keep CLIP's ``text_model_`` level.
  The delta a module adds is ``(alpha / rank) * up @ down`` with its own alpha and rank.
- **peft** (``PeftModel.save_pretrained``): per component, ``base_model.model.<module path>.lora_A.weight`` /
  ``.lora_B.weight`` plus an ``adapter_config.json``.

diffusers' ``convert_state_dict_to_kohya`` writes ``alpha = rank`` for every module, which is wrong for a LoRA
trained with ``alpha != rank`` (its weights then act ``rank / alpha`` times too strong or weak); :func:`to_kohya`
writes the adapter's true alpha.

A kohya module name loses the dots of its path. :func:`kohya_module_path` puts them back from a list of the
model's own module paths when one is given, else by the compound words of diffusers' and transformers' module
names (``down_blocks``, ``to_q``, ``self_attn``, ...); kohya files that use the original (SGM) UNet's block names
(``input_blocks``, ``middle_block``, ``output_blocks``) are recognised and refused (:func:`foreign_format`).

:func:`extract_lora` turns full-weight deltas into a LoRA by truncated SVD, with the relative approximation error
per tensor (``sqrt(sum_{i>r} s_i^2) / ||dW||_F``, exact for the truncated SVD) and overall.

Errors are :class:`LoraFormatError` (a ``ValueError``); unsee's adapter layer turns them into ``AdapterError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch

__all__ = [
    "LoraFormatError",
    "KOHYA_PREFIXES",
    "is_kohya_key",
    "to_kohya",
    "from_kohya",
    "kohya_module_name",
    "kohya_module_path",
    "to_peft",
    "foreign_format",
    "is_lora_able",
    "relative_error",
    "LoraExtraction",
    "extract_lora",
]

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
KOHYA_DOWN = ".lora_down.weight"
KOHYA_UP = ".lora_up.weight"
KOHYA_ALPHA = ".alpha"
PEFT_PREFIX = "base_model.model."

#: every kohya prefix unsee knows, longest first (component it means, or None for one unsee cannot apply)
KOHYA_PREFIXES: dict[str, Optional[str]] = {
    "lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": None,
    "lora_te_": "text_encoder",
}
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks", "time_embed_")
# SDXL's added-conditioning MLP: diffusers' kohya reader maps only the original (SGM) name of it, which is also what
# kohya-ss writes for SDXL, so these two modules are written (and read) in that spelling
_SGM_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_LYCORIS_PARTS = ("hada_w1", "hada_w2", "lokr_w1", "lokr_w2", "lora_mid", "dora_scale", ".diff", ".diff_b",
                  ".on_input", "oft_blocks")

# compound words of diffusers' UNet and transformers' CLIP module paths, the longest tried first
_COMPOUNDS = {
    3: {"time_emb_proj", "conv_norm_out", "final_layer_norm", "add_k_proj", "add_v_proj", "add_q_proj",
        "to_add_out", "encoder_hid_proj"},
    2: {"down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
        "to_out", "conv_in", "conv_out", "conv_shortcut", "time_embedding", "linear_1", "linear_2", "add_embedding",
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection", "class_embedding",
        "cond_proj", "token_embedding", "position_embedding", "time_proj", "add_time_proj"},
}
# modules whose 2-d weight is a lookup table, not a Linear layer: no LoRA
_EMBEDDING_LEAVES = ("token_embedding", "position_embedding", "embed_tokens", "embed_positions", "class_embedding")


class LoraFormatError(ValueError):
    """A state dict that cannot be converted; the message says why and what to do."""


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_kohya_key(key: str) -> bool:
    return isinstance(key, str) and key.startswith(tuple(KOHYA_PREFIXES))


def _kohya_prefix(key: str) -> Optional[str]:
    return next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)


# ----------------------------------------------------------------------------------------------
# Module names
# ----------------------------------------------------------------------------------------------


def _kohya_path(component: str, path: str) -> str:
    """The module path as kohya spells it: CLIP's ``text_model.`` level present (A1111/ComfyUI expect it)."""
    if component != "unet" and not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path
    return path


def kohya_module_name(component: str, path: str, sdxl: bool = False) -> str:
    """``("unet", "down_blocks.0.attentions.0.proj_in")`` -> ``"lora_unet_down_blocks_0_attentions_0_proj_in"``."""
    if component == "unet":
        prefix = "lora_unet_"
    elif component == "text_encoder":
        prefix = "lora_te1_" if sdxl else "lora_te_"
    elif component == "text_encoder_2":
        prefix = "lora_te2_"
    else:
        raise LoraFormatError(f"kohya files have no prefix for component {_short(component)}.")
    if component == "unet":
        path = _SGM_NAMES.get(path, path)
    return prefix + _kohya_path(component, path).replace(".", "_")


def kohya_module_path(flat: str, known: Optional[Iterable[str]] = None) -> str:
    """Dotted module path of a kohya module name without its prefix (``down_blocks_0_..._to_q``).

    ``known``: the model's module paths; a path whose underscored spelling is ``flat`` wins (with or without CLIP's
    ``text_model.`` level). Otherwise the dots go back between the words of diffusers' and transformers' module
    names (``to_out_0`` -> ``to_out.0``)."""
    for path, sgm in _SGM_NAMES.items():
        if flat == sgm.replace(".", "_"):
            return path
    if known is not None:
        table = {}
        for path in known:
            table.setdefault(path.replace(".", "_"), path)
            if path.startswith("text_model."):
                table.setdefault(path[len("text_model."):].replace(".", "_"), path)
            else:  # CLIPTextModel without the text_model level (transformers >= 5): kohya spells it anyway
                table.setdefault("text_model_" + path.replace(".", "_"), path)
        if flat in table:
            return table[flat]
    tokens = flat.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for size in (3, 2):
            word = "_".join(tokens[i:i + size])
            if len(tokens) - i >= size and word in _COMPOUNDS[size]:
                parts.append(word)
                i += size
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def _is_sdxl(tensors: Mapping[str, torch.Tensor]) -> bool:
    """An SDXL adapter: it touches the second text encoder, or its UNet's cross-attention reads 2048 features."""
    if any(k.startswith("text_encoder_2.") for k in tensors):
        return True
    return any(k.startswith("unet.") and (".attn2.to_k" in k or ".attn2.to_v" in k) and k.endswith(LORA_A)
               and t.shape[-1] == 2048 for k, t in tensors.items())


# ----------------------------------------------------------------------------------------------
# diffusers/peft <-> kohya
# ----------------------------------------------------------------------------------------------


def to_kohya(tensors: Mapping[str, torch.Tensor], rank: int, alpha: float,
             sdxl: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA tensors (component-prefixed keys) -> kohya keys, each module with the true ``alpha``.

    ``sdxl`` chooses ``lora_te1_`` over ``lora_te_`` for ``text_encoder``; None: SDXL when the adapter touches
    ``text_encoder_2`` or its UNet's cross-attention reads 2048 features."""
    if sdxl is None:
        sdxl = _is_sdxl(tensors)
    if not isinstance(rank, int) or rank < 1 or not math.isfinite(float(alpha)) or float(alpha) == 0:
        raise LoraFormatError(f"a LoRA needs a rank >= 1 and a finite non-zero alpha, got {rank!r} / {alpha!r}.")
    out: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        if key.endswith(LORA_B):
            continue
        if not key.endswith(LORA_A):
            raise LoraFormatError(f"{_short(key)} is not a diffusers/peft LoRA key ('...{LORA_A}' / '...{LORA_B}').")
        component, path = key[: -len(LORA_A)].split(".", 1)
        key_b = key[: -len(LORA_A)] + LORA_B
        if key_b not in tensors:
            raise LoraFormatError(f"LoRA module {_short(key[: -len(LORA_A)])} has lora_A but no lora_B.")
        name = kohya_module_name(component, path, sdxl=sdxl)
        out[name + KOHYA_DOWN] = tensors[key]
        out[name + KOHYA_UP] = tensors[key_b]
        out[name + KOHYA_ALPHA] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def from_kohya(state_dict: Mapping[str, torch.Tensor],
               known: Optional[Mapping[str, Iterable[str]]] = None) -> tuple[dict[str, torch.Tensor], int, float]:
    """kohya LoRA tensors -> (diffusers/peft tensors with component-prefixed keys, rank, alpha).

    ``known``: component -> the model's module paths, to put the dots of module names back exactly (see
    :func:`kohya_module_path`). A module without ``.alpha`` has alpha = its rank (kohya's rule). unsee LoRAs have one
    rank and one alpha: modules of smaller rank are padded with zero rows/columns (no change in what they add), and
    when the modules' scalings ``alpha / rank`` differ, each module's scaling is folded into its ``lora_up`` and the
    result has ``alpha = rank`` (what each module adds is the same up to float rounding). Works on meta tensors (a
    file's header) as on real ones."""
    problem = foreign_format(state_dict.keys())
    if problem is not None and problem[0] != "kohya":
        raise LoraFormatError(f"{problem[1]}")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, dot, part = key.partition(".")
        if not dot or part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise LoraFormatError(
                f"kohya key {_short(key)} is not '<module>.lora_down.weight', '.lora_up.weight' or '.alpha'; unsee "
                "reads plain kohya LoRAs only (LoCon/LoHa/LoKr/DoRA variants: load them with pipe.load_lora_weights)."
            )
        modules.setdefault(name, {})[part] = tensor
    if not modules:
        raise LoraFormatError("the kohya state dict is empty.")
    entries = []
    for name, parts in sorted(modules.items()):
        prefix = _kohya_prefix(name)
        component = KOHYA_PREFIXES.get(prefix) if prefix else None
        if component is None:
            raise LoraFormatError(
                f"kohya module {_short(name)} is for a component unsee does not handle (prefix {prefix or 'unknown'}); "
                "unsee reads lora_unet_, lora_te_, lora_te1_ and lora_te2_ modules."
            )
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            missing = "lora_down.weight" if down is None else "lora_up.weight"
            raise LoraFormatError(f"kohya module {_short(name)} has no {missing}; the file is incomplete.")
        if down.ndim not in (2, 4) or up.ndim not in (2, 4) or down.shape[0] != up.shape[1] or down.shape[0] < 1:
            raise LoraFormatError(
                f"kohya module {_short(name)}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} are not "
                "LoRA factors of one rank."
            )
        rank = int(down.shape[0])
        alpha_tensor = parts.get("alpha")
        if alpha_tensor is None:
            alpha = float(rank)
        else:
            if alpha_tensor.numel() != 1:
                raise LoraFormatError(f"kohya module {_short(name)}: alpha has {alpha_tensor.numel()} values, not one.")
            if alpha_tensor.device.type == "meta":
                alpha = None  # known once the data is read
            else:
                alpha = float(alpha_tensor.reshape(()).item())
                if not math.isfinite(alpha) or alpha == 0:
                    raise LoraFormatError(f"kohya module {_short(name)}: alpha {alpha!r} is not a finite non-zero number.")
        path = kohya_module_path(name[len(prefix):], None if known is None else known.get(component))
        entries.append((f"{component}.{path}", down, up, rank, alpha))

    max_rank = max(e[3] for e in entries)
    alphas = [e[4] for e in entries]
    if any(a is None for a in alphas):  # header only: shapes are what matter
        scalings = None
        alpha_out = float(max_rank)
    else:
        scalings = [a / r for _, _, _, r, a in entries]
        same = all(s == scalings[0] for s in scalings)
        alpha_out = scalings[0] * max_rank if same else float(max_rank)
        if same:
            scalings = None
    out: dict[str, torch.Tensor] = {}
    for index, (module, down, up, rank, _) in enumerate(entries):
        if scalings is not None:
            up = up * scalings[index]  # the output scaling is 1 (alpha = rank)
        if rank < max_rank:
            pad = max_rank - rank
            down = torch.cat([down, down.new_zeros((pad, *down.shape[1:]))], dim=0)
            up = torch.cat([up, up.new_zeros((up.shape[0], pad, *up.shape[2:]))], dim=1)
        if module + LORA_A in out:
            raise LoraFormatError(f"two kohya modules map to {_short(module)}; the file spells a module twice.")
        out[module + LORA_A], out[module + LORA_B] = down, up
    return out, max_rank, alpha_out


def to_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers/peft LoRA tensors -> component -> ``PeftModel.save_pretrained``'s keys (``base_model.model.`` ...)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, rest = key.split(".", 1)
        out.setdefault(component, {})[PEFT_PREFIX + rest] = tensor
    return out


def foreign_format(keys: Iterable[str], metadata: Optional[Mapping[str, str]] = None) -> Optional[tuple[str, str]]:
    """What a state dict that is not an unsee adapter looks like: ``(format, one-line description)`` or None.

    Formats: ``"kohya"`` (plain kohya LoRA, convertible), ``"kohya-sgm"`` (kohya keys with the original UNet's block
    names), ``"lycoris"`` (LoHa/LoKr/LoCon-with-extras/DoRA), ``"diffusers"`` (diffusers/peft LoRA keys without
    unsee's metadata), ``"peft"`` (``base_model.model.`` keys), ``"checkpoint"`` (a full model)."""
    keys = [k for k in keys if isinstance(k, str)]
    if not keys:
        return None
    if any(is_kohya_key(k) for k in keys):
        if any(any(part in k for part in _LYCORIS_PARTS) for k in keys):
            return ("lycoris", "it is a LyCORIS/DoRA LoRA (kohya keys with LoHa/LoKr/DoRA factors), which unsee cannot "
                               "convert; load it with pipe.load_lora_weights(path)")
        if any(k.startswith("lora_unet_") and any(b in k for b in _SGM_BLOCKS) for k in keys):
            return ("kohya-sgm", "it is a kohya LoRA with the original (SGM) UNet's block names (input_blocks, "
                                 "output_blocks), which unsee cannot convert; load it with pipe.load_lora_weights(path) "
                                 "(diffusers maps SGM names)")
        return ("kohya", "it is a kohya/A1111-format LoRA")
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return ("peft", "it is a PEFT adapter (keys 'base_model.model...'); load it into its component with "
                        "peft.PeftModel.from_pretrained")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.", "cond_stage_model."))
           for k in keys):
        return ("checkpoint", "it is a full model checkpoint, not an adapter; load it with "
                              "unsee.load_pipeline(path)")
    if any(k.endswith((LORA_A, LORA_B, ".lora.down.weight", ".lora_linear_layer.down.weight")) for k in keys):
        return ("diffusers", "it looks like a plain diffusers LoRA")
    return None


# ----------------------------------------------------------------------------------------------
# LoRA from full-weight deltas
# ----------------------------------------------------------------------------------------------


def is_lora_able(key: str, tensor: torch.Tensor) -> bool:
    """Whether a delta key names the weight of a Linear (2-d) or Conv2d (4-d) layer, which LoRA factors can hold
    (not a bias, a norm's scale or an embedding table)."""
    if not key.endswith(".weight") or tensor.ndim not in (2, 4):
        return False
    leaf = key[: -len(".weight")].rpartition(".")[2]
    return leaf not in _EMBEDDING_LEAVES


def relative_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation: ``sqrt(sum_{i>r} s_i^2) / sqrt(sum s_i^2)``
    (0 for a zero matrix)."""
    s = singular_values.double()
    total = float((s * s).sum())
    if total == 0.0:
        return 0.0
    tail = float((s[rank:] * s[rank:]).sum())
    return math.sqrt(tail / total)


@dataclass
class LoraExtraction:
    """A LoRA fitted to full-weight deltas: its tensors (component-prefixed diffusers/peft keys), ``rank`` and
    ``alpha`` (= rank: scaling 1), the relative Frobenius error of each delta tensor (1.0 for a dropped one),
    ``overall`` (over all deltas, dropped ones included: ``||dW - BA||_F / ||dW||_F`` with everything
    concatenated) and the dropped keys."""

    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    errors: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "overall_relative_error": self.overall,
                "relative_errors": dict(sorted(self.errors.items())), "dropped": list(self.dropped)}


def extract_lora(deltas: Mapping[str, torch.Tensor], rank: int, drop_other: bool = False) -> LoraExtraction:
    """Fit a rank-``rank`` LoRA to each full-weight delta by truncated SVD (in float64).

    Per tensor: ``dW`` (conv weights flattened to ``(out, in*kh*kw)``) = ``U S V^T``; ``B = U_r sqrt(S_r)``,
    ``A = sqrt(S_r) V_r^T``, ``alpha = rank`` (scaling 1); a tensor with fewer than ``rank`` singular values gets
    zero rows/columns (exact). Deltas that are not Linear/Conv weights (biases, norms, embeddings) cannot be
    LoRA factors: they raise :class:`LoraFormatError` unless ``drop_other`` leaves them out."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraFormatError(f"the LoRA rank must be a whole number >= 1, got {_short(rank)}.")
    other = sorted(k for k, t in deltas.items() if not is_lora_able(k, t))
    if other and not drop_other:
        shown = ", ".join(k if len(k) <= 50 else "..." + k[-47:] for k in other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise LoraFormatError(
            f"{len(other)} delta tensor(s) are not Linear/Conv weights and cannot be LoRA factors ({shown}); pass "
            "--drop-other (drop_other=True) to leave them out of the LoRA (the export then reports their loss)."
        )
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    tail_total, norm_total = 0.0, 0.0
    for key in sorted(deltas):
        delta = deltas[key]
        norm2 = float(delta.detach().double().pow(2).sum())
        norm_total += norm2
        if key in other:
            errors[key] = 1.0 if norm2 > 0 else 0.0
            tail_total += norm2
            continue
        matrix = delta.detach().to("cpu", torch.float64).flatten(1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        b = u[:, :k] * root
        a = root[:, None] * vh[:k]
        if k < rank:
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
            a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
        errors[key] = relative_error(s, rank)
        tail_total += float((s[k:] ** 2).sum())
        module = key[: -len(".weight")]
        if delta.ndim == 4:
            a = a.reshape(rank, *delta.shape[1:])
            b = b.reshape(delta.shape[0], rank, 1, 1)
        tensors[module + LORA_A] = a.to(delta.dtype).contiguous()
        tensors[module + LORA_B] = b.to(delta.dtype).contiguous()
    if not tensors:
        raise LoraFormatError("none of the delta tensors is a Linear/Conv weight; there is nothing to make a LoRA of.")
    overall = math.sqrt(tail_total / norm_total) if norm_total > 0 else 0.0
    return LoraExtraction(tensors=tensors, rank=rank, alpha=float(rank), errors=errors, overall=overall,
                          dropped=other)
