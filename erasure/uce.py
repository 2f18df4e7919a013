"""UCE: Unified Concept Editing in Diffusion Models (Gandikota, Orgad, Belinkov, Materzyńska, Bau; WACV 2024).

arXiv 2308.14761, https://unified.baulab.info. No training: every cross-attention key and value projection of the
UNet (``attn2.to_k``, ``attn2.to_v``: the only layers that read the text) gets the closed-form edit

    W_new = argmin_W  λ‖W − W_old‖² + s_e Σ_i ‖W c_i − W_old g_i‖² + s_p Σ_j ‖W p_j − W_old p_j‖²
          = (λ W_old + s_e Σ_i W_old g_i c_iᵀ + s_p Σ_j W_old p_j p_jᵀ) · M⁻¹,
    M     = λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j p_j p_jᵀ

with ``c_i`` the erased concepts' text embeddings, ``g_i`` the guide's ("" by default: the concept's keys and values
become the empty prompt's; ``guide="square"`` turns "circle" into "square"), ``p_j`` the preserved prompts'
embeddings, λ = ``lamb``, s_e = ``erase_scale``, s_p = ``preserve_scale``. The preserve terms cancel in the change:

    ΔW = W_new − W_old = s_e · W_old (G − C) · Cᵀ M⁻¹          (C, G: the erase and guide columns side by side)

so the edit has rank at most the number of erase columns k, and the adapter is exactly a ``lora`` adapter of
rank k and alpha k (scaling 1): ``lora_B = s_e W_old (G − C)`` per layer and ``lora_A = Cᵀ M⁻¹`` (one matrix for
every layer: M depends on the embeddings only). Several concepts are one solve with all their columns stacked
(``concept`` and ``concepts``); solving them one after another would compound and drift. M and A are computed in
float64 (a d×d solve, d = 768 on SD 1.x, 2048 on SDXL), B in float64 from the weights, the adapter stored in
float32; the whole method takes well under a second beyond encoding the prompts.

Which embeddings (``tokens``):

- ``"last"`` (default; the current official code): one column per concept, the text encoder's output at the
  concept's last token (the prompt is the concept alone, e.g. "circle"), guided to the guide's last token (for ""
  the start token, which every prompt shares); k = number of concepts;
- ``"rest"`` (the 2023 code): the concept's last token and every token after it to the end of the padding (the
  end-of-text and padding outputs carry the concept too, the text encoder being causal), each guided to the guide's
  token at the same offset; k = number of concepts × (sequence length − tokens before the last).

``templates`` (prompts with ``{concept}``; default the concept alone) erase the concept in context: each template
filled with each concept gives columns at the concept's last token (and after it, with ``rest``), guided to the
template filled with the guide at the guide's last token (for "" the token before it). Preserved prompts always
give every token position (start, words, end, padding): all of what the UNet reads for them is kept. The default
preserve set is ``[""]`` (the empty prompt: the unconditional branch of guidance).

Why ``last`` stays the default and the toy preset uses ``rest``: on SD's CLIP the concept's last token is what the
official code erases; the toy model's small text encoder gives every token nearly the same embedding (cosine 0.999
between "circle" and "square"), the concept shows mostly in the end-of-text and padding positions, and erasing the
last token alone left circles in every image. The toy preset also guides each concept to another value of its
attribute ("circle" -> "square"): the toy model draws a circle for 31% of prompts with no shape word, so guiding to
"" cannot take the presence below that. The runs: ``docs/erasure-notes.md``.

On SDXL the UNet reads both text encoders' outputs side by side (768 + 1280 = 2048 columns per token); the edit
works on that concatenation, as ``pipe.encode_prompt`` gives it. SDXL also conditions on CLIP-G's pooled
embedding (the time embedding's ``add_embedding``), which UCE leaves as it is.

Deliberate choices and differences from the official code:

- the adapter is a LoRA (exact: the factorisation above) instead of a file of edited weights;
- the guide and the preserved prompts are encoded as the text encoders give them ("" too: not the zeros that SDXL's
  ``force_zeros_for_empty_prompt`` puts in the unconditional branch);
- the preserve set may not contain an erased concept and may not be empty (both would undo the edit, or leave
  nothing to keep); a concept that the tokenizer splits into several tokens gets a warning naming them (``last``
  then edits the embedding of its last token, which has seen the others).

UCE has no optimisation: ``steps`` is 1 (the solve), and ``lr``, ``checkpoint_every``, ``draws_per_step``, ``dtype``
and ``mixed_precision`` have no effect (the solve always runs in float64). ``train(pipe)`` keeps the rest of the
trainer contract: the pipeline is read, never changed; progress events (``setup`` while encoding, ``train`` after
the solve); deterministic (no random numbers); a non-finite result raises :class:`TrainingError`. A
``checkpoint_dir`` is accepted and nothing is written there (there is nothing to resume; ``resume=True`` solves
again and gives the same adapter).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from torch import nn

from unsee.adapters import (CONCEPT_SLOT, Adapter, AdapterError, component_fingerprint, template_without_concept,
                            validate_adapter)
from unsee.pipelines.encoding import encode_text

from .config import TrainerConfig, check_concept_list, check_preserve_names_none, for_concept, names_concept
from .errors import ConfigError, TrainingError
from .fields import Kind, choice, is_int, number, per_concept, prompt_list, setting
from .registry import register_method
from .selectors import linear_modules
from .trainer import ProgressCallback, Trainer

__all__ = ["UCEConfig", "UCETrainer", "UCEEdit", "cross_attention_kv", "closed_form", "names_concept"]

TOKENS = ("last", "rest")


#: the guide: one text for every erased concept ("" is the empty prompt), or a list with one per concept
GUIDE = per_concept(Kind("a text ('' for the empty prompt)", lambda v: isinstance(v, str)))
#: ``steps`` of a closed-form method: the one solve
ONE_SOLVE = Kind("1 (UCE is one closed-form solve; it has no training steps)", lambda v: is_int(v) and v == 1)


@dataclass
class UCEConfig(TrainerConfig):
    """UCE settings; defaults from the paper's current official code (Gandikota et al., WACV 2024).

    Args:
        concept: the (first) concept to erase.
        concepts: more concepts erased in the same solve (``unsee erase --concept a --concept b``); default none.
        guide: what the concepts become: ``""`` (the empty prompt; the official default for objects), another
            concept ("square"), or a list with one guide per erased concept.
        preserve: prompts whose keys and values are kept (every token); default ``[""]``. Must not be empty and
            must not name an erased concept.
        lamb: λ, the weight of staying close to the original weights (0.5).
        erase_scale: s_e, the weight of the erase terms (1.0).
        preserve_scale: s_p, the weight of the preserve terms (1.0).
        tokens: which token embeddings are erased: ``"last"`` (the concept's last token) or ``"rest"`` (from it to
            the end of the padding); see the module docstring.
        templates: the prompts the concepts are erased in, each with ``{concept}`` (default: the concept alone,
            ``["{concept}"]``; the official ``--expand_prompts`` adds "a photo of {concept}" and four more).
        steps: 1 (one closed-form solve).
    """

    concepts: tuple[str, ...] = setting((), prompt_list(allow_empty=True, as_tuple=True),
                                        says="a list of non-empty concepts (erased with concept in one solve)")
    guide: Union[str, tuple[str, ...]] = setting("", GUIDE)
    preserve: tuple[str, ...] = setting(("",), prompt_list(allow_blank=True, as_tuple=True),
                                        says="a non-empty list of prompts ('' is the empty prompt; the default is "
                                             "[''])")
    lamb: float = setting(0.5, number(positive=True), label="regulariser λ")
    erase_scale: float = setting(1.0, number(positive=True))
    preserve_scale: float = setting(1.0, number(low=0))
    tokens: str = setting("last", choice(TOKENS))
    templates: tuple[str, ...] = setting(("{concept}",), prompt_list(as_tuple=True),
                                         says="a non-empty list of prompts that contain {concept}")
    steps: int = setting(1, ONE_SOLVE)

    method: ClassVar[str] = "uce"
    text_kv_only: ClassVar[bool] = True  # the solve edits the cross-attention keys and values alone

    @property
    def guides(self) -> list[str]:
        """One guide per erased concept."""
        return [for_concept(self.guide, i) for i in range(len(self.erased))]

    def validate(self) -> None:
        super().validate()
        erased = self.erased
        check_concept_list(erased)
        problem = template_without_concept(self.templates)
        if problem is not None:
            raise ConfigError(problem)
        for guide in self.guides:
            named = next((c for c in erased if names_concept(guide, c)), None)
            if named is not None:
                raise ConfigError(f"guide {guide!r} names the erased concept {named!r}; guide to another concept or "
                                  f"to '' (the empty prompt)")
        check_preserve_names_none(self.preserve, erased)


# ----------------------------------------------------------------------------------------------
# The layers and the solve
# ----------------------------------------------------------------------------------------------


def cross_attention_kv(unet: nn.Module) -> list[str]:
    """Names of the key and value projections of every cross-attention module of the UNet (``to_k``, ``to_v`` of
    the attention modules with ``is_cross_attention``), in ``named_modules`` order."""
    wanted = set()
    for name, module in unet.named_modules():
        if getattr(module, "is_cross_attention", False) is True:
            wanted.update({f"{name}.to_k", f"{name}.to_v"})
    return linear_modules(unet, keep=lambda name: name in wanted)


def closed_form(weight: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor,
                lamb: float, erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """The dense UCE solution W_new for one layer (reference for tests; the trainer uses the factorised form).

    ``weight``: (out, d); ``erase``, ``guide``: (d, k) columns; ``preserve``: (d, m) columns. Computed in float64."""
    w, c, g, p = (t.double() for t in (weight, erase, guide, preserve))
    eye = torch.eye(w.shape[1], dtype=torch.float64, device=w.device)
    left = lamb * w + erase_scale * (w @ g) @ c.T + preserve_scale * (w @ p) @ p.T
    right = lamb * eye + erase_scale * c @ c.T + preserve_scale * p @ p.T
    return torch.linalg.solve(right, left.T).T  # right is symmetric: left @ right^-1


@dataclass
class UCEEdit:
    """One closed-form edit of every layer: ΔW_l = B_l @ A (``down``: A, (k, d); ``up``: name -> B_l, (out, k))."""

    down: torch.Tensor
    up: dict[str, torch.Tensor]


def solve_edit(weights: dict[str, torch.Tensor], erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor,
               lamb: float, erase_scale: float, preserve_scale: float) -> UCEEdit:
    """The factorised UCE edit of each layer in ``weights`` (float64 tensors): A = Cᵀ M⁻¹, B_l = s_e W_l (G − C)."""
    c, g, p = erase.double(), guide.double(), preserve.double()
    d = c.shape[0]
    m = lamb * torch.eye(d, dtype=torch.float64, device=c.device) + erase_scale * c @ c.T + preserve_scale * p @ p.T
    down = torch.linalg.solve(m, c).T  # M is symmetric: (M⁻¹ C)ᵀ = Cᵀ M⁻¹
    up = {name: erase_scale * w @ (g - c) for name, w in weights.items()}
    return UCEEdit(down, up)


# ----------------------------------------------------------------------------------------------
# Text embeddings
# ----------------------------------------------------------------------------------------------


def _tokenizer(pipe: Any) -> Any:
    return pipe.tokenizer if getattr(pipe, "tokenizer", None) is not None else pipe.tokenizer_2


def last_token_index(pipe: Any, text: str) -> int:
    """The position of ``text``'s last token in its encoding (0, the start token, for ""), as the official code
    finds it: the number of its tokens, truncated to what the sequence holds."""
    tokenizer = _tokenizer(pipe)
    length = tokenizer.model_max_length
    ids = tokenizer(text, truncation=True, max_length=length).input_ids
    return max(0, len(ids) - 2)


def split_tokens(pipe: Any, text: str) -> list[str]:
    """The tokens ``text`` is split into (without the end-of-word marks)."""
    return [t.replace("</w>", "") for t in _tokenizer(pipe).tokenize(text)]


@torch.no_grad()
def embed(pipe: Any, texts: Sequence[str]) -> torch.Tensor:
    """The token embeddings the UNet's cross-attention reads for each text, (n, L, d), float64 (SDXL: both
    encoders' outputs side by side; "" encoded as the text encoders give it)."""
    encoder = pipe.text_encoder if getattr(pipe, "text_encoder", None) is not None else pipe.text_encoder_2
    embeds, _ = encode_text(pipe, list(texts), encoder.device)
    return embeds.double()


class UCETrainer(Trainer):
    """Computes a UCE adapter. ``UCETrainer(UCEConfig(concept="circle")).train(pipe)``."""

    config_class: ClassVar[type] = UCEConfig
    config: UCEConfig
    #: the edited modules' names (set by :meth:`train`)
    modules: list[str] = []

    @property
    def output_kind(self) -> str:
        return "lora"

    def select_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        """The edited weights: every cross-attention key and value projection's."""
        modules = dict(unet.named_modules())
        return {f"{name}.weight": modules[name].weight for name in cross_attention_kv(unet)}

    # -- the columns ----------------------------------------------------------------------------

    def warn_split_concepts(self, pipe: Any) -> dict[str, list[str]]:
        """Warn for each erased concept that the tokenizer splits into several tokens; returns them."""
        split = {}
        for concept in self.config.erased:
            tokens = split_tokens(pipe, concept)
            if len(tokens) > 1:
                split[concept] = tokens
                where = "its last token" if self.config.tokens == "last" else "the tokens from its last one on"
                warnings.warn(f"{self.method}: {concept!r} is not one token of the tokenizer; it splits into "
                              f"{', '.join(repr(t) for t in tokens)}, and the edit erases {where}", stacklevel=3)
        return split

    def erase_prompts(self) -> list[tuple[str, int, str, int]]:
        """(prompt, position, guide prompt, guide position) for each template and erased concept: the template
        filled with the concept and with its guide, and the positions of the concept's and the guide's last token
        there (for the guide "" the token before it: the start token for the bare concept)."""
        rows = []
        for template in self.config.templates:
            before, _, after = template.partition(CONCEPT_SLOT)
            for concept, guide in zip(self.config.erased, self.config.guides):
                rows.append((before + concept + after, (before + concept).strip(),
                             before + guide + after, (before + guide).strip()))
        return [(p, last_token_index(self.pipe, a), g, last_token_index(self.pipe, b)) for p, a, g, b in rows]

    def erase_columns(self, pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, G): the erase columns and their guides' (d, k), for the ``tokens`` and ``templates`` settings."""
        rows = self.erase_prompts()
        embeds = embed(pipe, [r[0] for r in rows] + [r[2] for r in rows])
        n, length = len(rows), embeds.shape[1]
        erase, guide = [], []
        for i, (_, a, _, b) in enumerate(rows):
            count = 1 if self.config.tokens == "last" else length - max(a, b)
            erase.append(embeds[i, a:a + count])
            guide.append(embeds[n + i, b:b + count])
        return torch.cat(erase).T, torch.cat(guide).T

    def preserve_columns(self, pipe: Any) -> torch.Tensor:
        """Every token embedding of every preserved prompt, (d, m)."""
        embeds = embed(pipe, list(self.config.preserve))
        return embeds.reshape(-1, embeds.shape[-1]).T

    # -- the run --------------------------------------------------------------------------------

    def train(self, pipe: Any, progress: Optional[ProgressCallback] = None,
              checkpoint_dir: Any = None, resume: bool = False) -> Adapter:
        """Solve the edit on ``pipe`` and return it as a ``lora`` adapter; the pipeline is only read.

        ``checkpoint_dir`` is accepted for the trainer contract and left untouched (a solve has nothing to resume);
        ``resume=True`` needs it, as for every trainer, and solves again.
        """
        config = self.config
        config.validate()
        if not isinstance(getattr(pipe, "unet", None), nn.Module):
            raise TrainingError(f"{type(pipe).__name__} has no UNet; {self.method} needs an SD 1.x/2.x or SDXL pipeline")
        if getattr(pipe.unet, "peft_config", None):
            raise TrainingError("the UNet already has LoRA adapters; unload them (pipe.unload_lora_weights()) first")
        if resume and checkpoint_dir is None:
            raise ConfigError("resume=True needs the checkpoint_dir to resume from")
        self._progress = progress
        self.pipe, self.unet = pipe, pipe.unet
        started = time.perf_counter()
        params = self.select_parameters(pipe.unet)
        if not params:
            raise TrainingError(f"{self.method}: this UNet has no cross-attention layers to edit")
        self.modules = [name[: -len(".weight")] for name in params]
        device = torch.device(config.device) if config.device else next(iter(params.values())).device
        if device.type == "cpu":
            device = torch.device("cpu")
        self.device = device
        split = self.warn_split_concepts(pipe)
        self.report("setup", 0, 1, message="encoding prompts")
        original = {name: p.detach().to(device, torch.float64) for name, p in params.items()}
        erase, guide = (t.to(device) for t in self.erase_columns(pipe))
        preserve = self.preserve_columns(pipe).to(device)
        self.report("setup", 1, 1, message="encoding prompts")
        self.losses = []
        edits = self.solve(pipe, original, erase, guide, preserve)
        summary = {
            "steps": config.steps,
            "losses": list(self.losses),
            "loss_first": self.residual_before,
            "loss_last": self.losses[-1] if self.losses else None,
            "seconds": round(time.perf_counter() - started, 3),
            "resumed_from_step": None,
            "device": str(device),
            "num_processes": 1,
            "draws_per_step": 1,
            "trained_tensors": len(params),
            "trained_parameters": sum(p.numel() for p in params.values()),
            "modules": len(self.modules),
            "rank": int(sum(edit.down.shape[0] for edit in edits)),
            "tokens": config.tokens,
            "concepts": config.erased,
            **({"split_concepts": split} if split else {}),
            **self.training_summary(),
        }
        return self.make_lora(pipe, edits, summary)

    def solve(self, pipe: Any, original: dict[str, torch.Tensor], erase: torch.Tensor, guide: torch.Tensor,
              preserve: torch.Tensor) -> list[UCEEdit]:
        """The edits, in order (UCE: one); records :attr:`losses` (see :meth:`residual`) and reports progress."""
        config = self.config
        self.residual_before = self.residual(original, original, erase, guide)
        edit = solve_edit(original, erase, guide, preserve, config.lamb, config.erase_scale, config.preserve_scale)
        edited = {name: w + edit.up[name] @ edit.down for name, w in original.items()}
        self.check_finite(edited)
        self.losses.append(self.residual(edited, original, erase, guide))
        self.report("train", 1, 1, self.losses[-1])
        return [edit]

    @staticmethod
    def residual(weights: dict[str, torch.Tensor], original: dict[str, torch.Tensor], erase: torch.Tensor,
                 guide: torch.Tensor) -> float:
        """How far the erased columns still are from their guides' outputs, over every edited layer:
        Σ‖W C − W_old G‖² / Σ‖W_old C − W_old G‖² (1 before the edit, 0 for an exact erasure). The training
        summary's ``losses``."""
        num = sum(float(((w @ erase - original[n] @ guide) ** 2).sum()) for n, w in weights.items())
        den = sum(float(((original[n] @ (erase - guide)) ** 2).sum()) for n in weights)
        return num / den if den > 0 else 0.0

    def check_finite(self, weights: dict[str, torch.Tensor]) -> None:
        if not all(bool(torch.isfinite(w).all()) for w in weights.values()):
            raise TrainingError(f"{self.method}: the closed-form solve gave non-finite weights; raise lamb (the "
                                f"regulariser, now {self.config.lamb:g}) or lower erase_scale")

    def make_lora(self, pipe: Any, edits: Sequence[UCEEdit], summary: dict) -> Adapter:
        """The edits as one ``lora`` adapter: their factors side by side (rank = their columns), alpha = rank."""
        down = torch.cat([edit.down for edit in edits])
        tensors = {}
        for name in self.modules:
            up = torch.cat([edit.up[f"{name}.weight"] for edit in edits], dim=1)
            tensors[f"unet.{name}.lora_A.weight"] = down.to("cpu", torch.float32).contiguous()
            tensors[f"unet.{name}.lora_B.weight"] = up.to("cpu", torch.float32).contiguous()
        rank = down.shape[0]
        adapter = Adapter(kind="lora", method=self.method, concepts=self.config.erased, tensors=tensors,
                          fingerprint={"unet": component_fingerprint(pipe.unet)},
                          hyperparameters=self.config.to_dict(), training=summary, rank=int(rank), alpha=float(rank))
        try:
            validate_adapter(adapter)
        except AdapterError as error:
            raise TrainingError(f"{self.method} produced no usable adapter: {error}") from error
        return adapter

    def training_summary(self) -> dict:
        return {"guide": list(self.config.guides), "preserve_prompts": len(self.config.preserve)}

    _progress: Optional[ProgressCallback] = None
    residual_before: Optional[float] = None


register_method("uce", summary="UCE: closed-form edit of the cross-attention keys and values, seconds, several "
                               "concepts in one solve")(UCETrainer)
