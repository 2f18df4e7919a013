"""The guidance step contract shared by every method.

A denoising step has four phases; each method owns, in its own file, the phases it touches:

1. **branches**: which predictions the step needs: conditional, unconditional/negative, perturbed (PAG);
2. **model edits**: attention edits it installs for the call (PAG's identity rows, NASA's and NAG's
   attention-space negative, the adaptive start's attention probe), each a small :class:`AttentionEdit`
   applied to the batch rows of the branches that ask for it;
3. **combine**: CFG / CFG++ / FDG produce the guided prediction from cond and uncond (exactly one per call),
   PAG and DNG add a term, negative steering decides what the unconditional branch holds and from which step;
4. **step**: the stock ``scheduler.step``, unless a method replaces it (CFG++: denoise with the guided
   prediction, renoise with the unconditional one).

A method is a config dataclass with its paper's defaults and ``validate()``. It declares what it does in a
:class:`Contract` (read by :func:`unsee.guidance.composition.validate_combination`, by the README's composition
table and by the executor), and ``prepare(call)`` returns a :class:`MethodRun`: the method's part of one pipeline
call, holding all per-call state, whose hooks the generic executor (``unsee.pipelines.guided``) calls. The shape
follows diffusers' ``BaseGuidance`` (a guider owns its branches, ``prepare_models``/``cleanup_models`` hooks,
a pure ``forward``); the config objects themselves never change during a call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch


class GuidanceError(ValueError):
    """An invalid guidance method or combination; raised before any denoising work."""


@dataclass(frozen=True)
class Contract:
    """What a method does to a denoising step, declared on its class.

    combines: it replaces CFG's combination of the conditional and unconditional predictions (one per call;
        without one, ``CFG(guidance_scale)`` combines).
    adds_term: it adds a term to the combined prediction.
    edits_attention: it changes attention inside the denoiser.
    attention_negative: it uses the negative prompt inside attention (one per call). The unconditional branch
        then holds the empty prompt, unless a method ``sets_unconditional``.
    sets_unconditional: it decides what the unconditional branch holds, and from which step.
    needs_negative: the call needs ``negative_prompt``.
    needs_cfg: it needs the unconditional branch (a combination whose scale is not 1).
    replaces_step: it replaces the scheduler's step (one per call).
    branches: the denoiser branches it adds to the conditional (and unconditional) ones.
    conditions: field name -> when it applies, for fields that hold only in some modes (README table).
    """

    combines: bool = False
    adds_term: bool = False
    edits_attention: bool = False
    attention_negative: bool = False
    sets_unconditional: bool = False
    needs_negative: bool = False
    needs_cfg: bool = False
    replaces_step: bool = False
    branches: tuple[str, ...] = ()
    conditions: dict = field(default_factory=dict)


@dataclass
class Guidance:
    """Base class of the guidance methods: a config dataclass that declares a :class:`Contract`."""

    contract: ClassVar[Contract] = Contract()

    def validate(self) -> None:
        """Raise GuidanceError if a field is out of range."""

    def prepare(self, call: "CallContext") -> "MethodRun":
        """The method's part of one pipeline call (all per-call state lives there). Raise GuidanceError for what
        this pipeline cannot do; called for every method before any denoising work."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short label, e.g. "PAG 3"."""
        return type(self).__name__


# ---------------------------------------------------------------------------------------------- one call, one step
class CallContext:
    """What a method may read (and set) about the pipeline call it is prepared for; implemented by the executor.

    pipe, unet, scheduler: the pipeline and its components. kwargs: diffusers' call arguments (a method may
    change what it owns, e.g. the CFG scale in effect). prompts / negatives: the texts (None when embeddings were
    given), one per prompt. images_per_prompt, rows (prompts x images_per_prompt), clip_skip.
    """

    pipe: Any
    unet: Any
    scheduler: Any
    kwargs: dict
    prompts: Optional[list[str]]
    negatives: Optional[list[str]]
    images_per_prompt: int
    rows: int
    clip_skip: Optional[int]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(embeddings, pooled or None) of ``texts`` as the pipeline encodes the prompt, ``rows`` rows."""
        raise NotImplementedError

    def empty_embeddings(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What diffusers puts in the unconditional rows of a call without a negative prompt."""
        raise NotImplementedError

    def token_mask(self) -> torch.Tensor:
        """(rows, tokens) mask of the prompt's tokens that the negative prompt also contains (all if none)."""
        raise NotImplementedError

    def attention_modules(self, cross: bool) -> list[str]:
        """Names of the denoiser's cross- (True) or self-attention (False) modules."""
        raise NotImplementedError


@dataclass
class Step:
    """One denoiser call as the methods see it.

    index: 0-based step; num_steps: steps the call runs (img2img and inpainting start part way down the schedule:
    the steps from there); timestep: the denoiser's timestep; batch: images per branch; sample: the sample diffusers
    passed (with its CFG rows; a 9-channel inpainting UNet's carries the mask and masked image after the latents);
    cond_sample: the latent channels of its conditional rows;
    layout: branch name -> its rows in the batched denoiser call; dtype: the text embeddings' dtype.
    """

    index: int
    num_steps: int
    timestep: Any
    batch: int
    sample: torch.Tensor
    cond_sample: torch.Tensor
    layout: dict
    dtype: torch.dtype

    def rows(self, *branches: str) -> Optional[slice]:
        """The contiguous rows of the named branches present in this call (None if none is)."""
        present = [self.layout[b] for b in branches if b in self.layout]
        if not present:
            return None
        start, stop = min(s.start for s in present), max(s.stop for s in present)
        if sum(s.stop - s.start for s in present) != stop - start:
            raise AssertionError(f"branches {branches} are not contiguous in {self.layout}")
        return slice(start, stop)


@dataclass
class Branch:
    """A denoiser branch a method adds: ``name`` holds a copy of diffusers' ``source`` rows ("cond" or "uncond").

    late_join: attention modules before whose first top-level block the branch computes exactly what its source
    computes (PAG's perturbed rows); the executor then lets it join the batch only there. At most one per step.
    """

    name: str
    source: str
    late_join: frozenset = frozenset()


@dataclass
class BranchInputs:
    """A branch's denoiser inputs: sample rows, text embeddings and SDXL's added conditions."""

    sample: torch.Tensor
    embeds: torch.Tensor
    added: dict


@dataclass
class GuidanceReport:
    """What one guided call did; returned as ``output.guidance_report`` (with ``return_dict=True``).

    unet_calls: denoiser calls in the call (one per step: every branch of a step runs in one batched call).
    steps: denoising steps taken.
    negative_start_steps: ``NegativeSteer(mode="adaptive")``: per image, the step from which the negative prompt
        acted (None: it never did); None in other modes.
    dng_posterior: ``NegativeSteer(mode="dng")``: per step, the posterior P(negative | x_t) of each image used in
        that step's weight; None in other modes.
    """

    unet_calls: int = 0
    steps: int = 0
    negative_start_steps: Optional[list] = None
    dng_posterior: Optional[list] = None


class MethodRun:
    """A method's part of one pipeline call. The executor calls, for every step, in this order:
    ``branches`` -> ``branch_inputs`` (per branch) -> ``before_denoiser`` -> one batched denoiser call ->
    ``combine`` (the combining method only) -> ``add_term`` (each) -> ``after_denoiser`` (each); and
    ``scheduler_step`` in place of ``scheduler.step`` for the method whose contract replaces the step.
    """

    needs_uncond: bool = False  # the unconditional branch must run (diffusers' CFG rows)
    attention_edits: Sequence["AttentionEdit"] = ()  # installed for the call
    late_join: frozenset = frozenset()  # attention modules of a late-joining branch this method may add

    def branches(self, step: Step) -> Sequence[Branch]:
        return ()

    def branch_inputs(self, step: Step, name: str, inputs: BranchInputs) -> BranchInputs:
        """The inputs of branch ``name``: return ``inputs`` itself when the method leaves them as they are (a new
        object tells the executor that the branch differs from its source rows, e.g. for its ControlNet residuals)."""
        return inputs

    def before_denoiser(self, step: Step) -> None:
        """Set this step's rows on the attention edits, observe the sample, ..."""

    def combine(self, predictions: dict, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def add_term(self, guided: torch.Tensor, predictions: dict, step: Step) -> torch.Tensor:
        return guided

    def after_denoiser(self, predictions: dict, step: Step) -> None:
        pass

    def scheduler_step(self, scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                       predictions: dict, generator: Optional[torch.Generator]) -> torch.Tensor:
        raise NotImplementedError

    def report(self, report: GuidanceReport) -> None:
        """Write what the call did into the report (after each step)."""


# ---------------------------------------------------------------------------------------------- attention edits
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionEdit:
    """One feature's change to some attention modules, for one pipeline call.

    ``modules``: the module names it applies to; ``rows``: the batch rows it applies to in the current denoiser
    call (a slice, set by its method before each call; None: off for this call). Tensors are laid out
    (batch, tokens, heads, head_dim), as diffusers' attention dispatch takes them. A processor composes the
    edits of a module: ``identity`` edits give their rows the identity attention map (their output is V), then
    each edit's ``edit_output`` sees the attention output before ``to_out``.
    """

    modules: frozenset = frozenset()
    rows: Optional[slice] = None
    identity: bool = False

    def edit_output(self, attn, name: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    out: torch.Tensor, attend: Attend) -> torch.Tensor:
        return out


class NegativeAttention(AttentionEdit):
    """Shared by the attention-space negatives (NASA, NAG): the same queries attend to the negative prompt.

    ``negative``: the negative prompt's embeddings, one row per image; ``negative_output`` gives
    Z- = softmax(Q K-^T / sqrt(d)) V- for the steered rows, with K-, V- projected once per (module, rows) and
    reused for the rest of the call (the negative and the projections do not change within a call).
    """

    def __init__(self, modules: frozenset, negative: torch.Tensor) -> None:
        self.modules = modules
        self.negative = negative
        self.keys_values: dict = {}

    def negative_output(self, attn, name: str, query: torch.Tensor, attend: Attend) -> torch.Tensor:
        rows = query.shape[0]
        cached = (name, rows)
        if cached not in self.keys_values:
            repeats = -(-rows // self.negative.shape[0])
            negative = self.negative.to(query.dtype).repeat(repeats, 1, 1)[:rows]
            if attn.norm_cross:
                negative = attn.norm_encoder_hidden_states(negative)
            heads = attn.heads
            key, value = attn.to_k(negative), attn.to_v(negative)
            key = key.view(rows, -1, heads, key.shape[-1] // heads)
            value = value.view(rows, -1, heads, value.shape[-1] // heads)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            self.keys_values[cached] = (key, value)
        key, value = self.keys_values[cached]
        return attend(query, key, value)


# ---------------------------------------------------------------------------------------------- shared helpers
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


def select_layers(owner: str, call: CallContext, patterns: Optional[tuple[str, ...]], cross: bool) -> frozenset:
    """The call's cross- or self-attention modules that ``patterns`` select (all for None); refuses an empty pick."""
    names = call.attention_modules(cross)
    selected = names if patterns is None else [n for n in names if layer_matches(n, patterns)]
    if not selected:
        kind = "cross-attention" if cross else "self-attention"
        raise GuidanceError(f"{owner}.layers {patterns} match no {kind} layer of this UNet; names look like {names[:3]}")
    return frozenset(selected)


def check_range(owner: str, name: str, value: float, low: float, high: float = float("inf")) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        bound = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
        raise GuidanceError(f"{owner}.{name} must be {bound}, got {value}")


def normalize_layers(layers: Any) -> Optional[tuple[str, ...]]:
    """A layer selection as a tuple (a single string is one pattern); None stays None."""
    if layers is None:
        return None
    return (layers,) if isinstance(layers, str) else tuple(layers)


VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what ``vp_denoised`` can turn into an x0 estimate


def vp_denoised(prediction_type: str, output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    """x0 estimate from a model output at a variance-preserving sample ``x = alpha * x0 + sigma * eps``."""
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output
    if prediction_type == "sample":
        return output
    raise GuidanceError(f"unsupported prediction_type {prediction_type!r}: expected one of {VP_PREDICTION_TYPES}")
