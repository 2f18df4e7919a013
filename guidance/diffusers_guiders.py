"""diffusers guiders, both ways.

**unsee methods as diffusers guiders** (``diffusers.guiders.BaseGuidance`` subclasses, for diffusers' Modular
pipelines: ``pipe.update_components(guider=as_diffusers_guider(FDG((10, 5))))``). A guider sees one step's
conditional and unconditional predictions and the step's index, count and timestep -- nothing else: no latents,
no attention, no other text than the two inputs the loop pairs up. So a method is a guider when it is a
combination of the two predictions:

- ``CFG(scale)`` -> diffusers' own ``ClassifierFreeGuidance(guidance_scale=scale)``;
- ``FDG(scales)`` -> :class:`FDGGuider` (unsee's pyramid: any latent size, unit band scales);
- ``CFGpp(lam)`` -> :class:`CFGppGuider`: one deterministic CFG++ step is one CFG step with the time-varying scale
  ``omega_t = lam * sigma_t / (sigma_t - c_t)`` (``../shared/specs/guidance-2.md`` section 2.3), so the guider
  holds the scheduler and returns ``u + omega_t (c - u)``; the scheduler's own step does the rest. DDIM (eta 0, no
  x0 clipping), Euler and Euler ancestral; not DPM++ 2M (a multistep update has no per-step CFG equivalent).

The others cannot (:data:`NOT_GUIDERS` says why, and :func:`as_diffusers_guider` raises it): PAG perturbs
self-attention in an extra pass (diffusers has its own ``PerturbedAttentionGuidance``, whose window never
includes step 0); NASA and NAG change attention inside the conditional pass with the negative prompt's keys and
values; ``NegativeSteer`` puts the empty prompt in the unconditional branch before its start (fixed), detects the
start with an attention probe (adaptive), or needs the latents, the noise schedule and a branch of its own (DNG).

**diffusers guiders in unsee's** ``guidance=[...]``: a guider instance is wrapped in :class:`DiffusersGuider` (by
``unsee.guidance.composition.plan``), a combining method whose run calls the guider's ``forward`` on the executor's
conditional and unconditional predictions after ``set_state(step, num_steps, timestep)``; so CFG, APG, CFG-Zero*,
Tangential CFG, FDG, MAG, ... compose with unsee's PAG, NASA, NAG and NegativeSteer. Each call works on a fresh
copy of the guider (``guider.new()``): per-call state such as APG's momentum never leaks between calls. Guiders
that need a third, layer-skipped pass (SLG, SEG, diffusers' PAG, LTX2) are refused: unsee runs every branch of a
step in one batched UNet call, and its own ``PAG`` is the perturbed-attention method.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance, ClassifierFreeGuidance
from diffusers.guiders.guider_utils import GuiderOutput, rescale_noise_cfg
from diffusers.guiders.guider_utils import logger as guider_logger

from .base import Contract, Guidance, GuidanceError, MethodRun, Step, check_range
from .cfg import CFG
from .cfgpp import CFGpp
from .fdg import FDG

TWO_PREDICTIONS = ["pred_cond", "pred_uncond"]

# unsee method -> why it is not a diffusers guider
NOT_GUIDERS = {
    "PAG": "it perturbs self-attention in an extra pass; use diffusers' PerturbedAttentionGuidance with a "
           "LayerSkipConfig (its window starts after step 0, so results differ at the first step)",
    "NASA": "it subtracts the negative prompt inside cross-attention of the conditional pass; a guider only combines "
            "the predictions and never sees the negative prompt's keys and values",
    "NAG": "it extrapolates attention outputs away from the negative prompt inside the conditional pass; a guider only "
           "combines the predictions and never sees the negative prompt's keys and values",
    "NegativeSteer": "it changes what the unconditional branch holds during the call (the empty prompt before its "
                     "start; adaptive: a start found by an attention probe; dng: a branch of its own, the latents and "
                     "the noise schedule); a guider gets only the loop's (prompt, negative) input pairs and the "
                     "predictions",
}


class _TwoBranchGuider(BaseGuidance):
    """A guider combining the conditional and unconditional predictions (the batches diffusers' CFG has)."""

    _input_predictions = TWO_PREDICTIONS

    def _active(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is not None:
            return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)
        return True

    def prepare_inputs(self, data: dict) -> list:
        return [self._prepare_batch(data, i, name) for i, name in zip(range(self.num_conditions), TWO_PREDICTIONS)]

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        return [self._prepare_batch_from_block_state(input_fields, data, i, name)
                for i, name in zip(range(self.num_conditions), TWO_PREDICTIONS)]

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self._active() else 1

    def _combine(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None) -> GuiderOutput:
        pred = pred_cond if pred_uncond is None or not self._active() else self._combine(pred_cond, pred_uncond)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


class FDGGuider(_TwoBranchGuider):
    """unsee's :class:`~unsee.guidance.fdg.FDG` as a diffusers guider (scales highest frequency first)."""

    @register_to_config
    def __init__(self, guidance_scales=(10.0, 5.0), parallel_weights=None, guidance_rescale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        self.method = FDG(tuple(guidance_scales), None if parallel_weights is None else tuple(parallel_weights))
        self.method.validate()
        self.guidance_rescale = guidance_rescale

    def _combine(self, pred_cond, pred_uncond):
        return self.method.combine(pred_cond, pred_uncond)


CFGPP_SCHEDULERS = (DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)


def check_cfgpp_scheduler(scheduler) -> None:
    """Refuse schedulers whose step is not first order and single step (no per-step CFG equivalent)."""
    name = type(scheduler).__name__
    if type(scheduler) not in CFGPP_SCHEDULERS:
        raise GuidanceError(f"CFG++ as a CFG scale needs DDIMScheduler (eta=0), EulerDiscreteScheduler or "
                            f"EulerAncestralDiscreteScheduler; got {name} (use unsee's own pipelines for DPM++ 2M)")
    if getattr(scheduler.config, "thresholding", False):
        raise GuidanceError("CFG++ as a CFG scale does not support dynamic thresholding; set thresholding=False")
    if isinstance(scheduler, DDIMScheduler) and scheduler.config.clip_sample:
        raise GuidanceError("CFG++ as a CFG scale needs DDIMScheduler(clip_sample=False): clipping x0 breaks the "
                            "equivalence")


def cfgpp_scale(scheduler, lam: float, timestep) -> float:
    """omega_t = lam * sigma_t / (sigma_t - c_t) for the step the scheduler is at (DDIM: at ``timestep``)."""
    if isinstance(scheduler, DDIMScheduler):
        t = int(timestep)
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        a_t = scheduler.alphas_cumprod[t].double()
        a_prev = (scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod).double()
        sigma, c = ((1 - a_t) / a_t).sqrt(), ((1 - a_prev) / a_prev).sqrt()
    else:
        i = scheduler.step_index
        if i is None:
            i = scheduler.index_for_timestep(timestep)
        sigma, c = scheduler.sigmas[i].double(), scheduler.sigmas[i + 1].double()
        if isinstance(scheduler, EulerAncestralDiscreteScheduler):
            sigma_up = (c**2 * (sigma**2 - c**2) / sigma**2) ** 0.5
            c = (c**2 - sigma_up**2) ** 0.5
    return float(lam * sigma / (sigma - c))


class CFGppGuider(_TwoBranchGuider):
    """CFG++ (lambda in [0, 1]) as a time-varying CFG scale read from ``scheduler`` at each step.

    ``scheduler`` must be the pipeline's own (the guider reads its step index and noise levels); it is not saved
    in the guider's config. In unsee's ``guidance=[...]`` a guider without one takes the pipeline's.
    """

    ignore_for_config = ["scheduler"]

    @register_to_config
    def __init__(self, lam: float = 0.6, guidance_rescale: float = 0.0, start: float = 0.0, stop: float = 1.0,
                 enabled: bool = True, scheduler=None):
        super().__init__(start, stop, enabled)
        check_range("CFGppGuider", "lam", lam, 0.0, 1.0)
        self.lam = lam
        self.guidance_rescale = guidance_rescale
        self.scheduler = None
        if scheduler is not None:
            self.set_scheduler(scheduler)

    def set_scheduler(self, scheduler) -> None:
        check_cfgpp_scheduler(scheduler)
        self.scheduler = scheduler

    def new(self, **kwargs):
        kwargs.setdefault("scheduler", self.scheduler)
        return super().new(**kwargs)

    @property
    def guidance_scale(self) -> Optional[float]:
        """The CFG scale of the current step (None before the first)."""
        if self.scheduler is None or self._timestep is None:
            return None
        return cfgpp_scale(self.scheduler, self.lam, self._timestep)

    def _combine(self, pred_cond, pred_uncond):
        if self.scheduler is None:
            raise GuidanceError("CFGppGuider needs the pipeline's scheduler: CFGppGuider(lam, scheduler=pipe.scheduler)")
        return pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)


def as_diffusers_guider(method: Guidance, scheduler=None) -> BaseGuidance:
    """The diffusers guider that does what ``method`` does, for a Modular pipeline's ``guider`` component.

    ``scheduler``: the pipeline's scheduler (CFGpp needs it). Raises GuidanceError for a method that is not a guider.
    """
    if isinstance(method, DiffusersGuider):
        return method.guider.new()
    if not isinstance(method, Guidance):
        raise GuidanceError(f"as_diffusers_guider takes an unsee guidance method, got {method!r}")
    method.validate()
    if isinstance(method, CFG):
        return ClassifierFreeGuidance(guidance_scale=method.scale)
    if isinstance(method, FDG):
        return FDGGuider(guidance_scales=method.scales, parallel_weights=method.parallel_weights)
    if isinstance(method, CFGpp):
        if scheduler is None:
            raise GuidanceError("CFGpp as a diffusers guider needs the pipeline's scheduler: "
                                "as_diffusers_guider(CFGpp(lam), scheduler=pipe.scheduler)")
        return CFGppGuider(lam=method.lam, scheduler=scheduler)
    name = type(method).__name__
    reason = NOT_GUIDERS.get(name, "it does more than combine the conditional and unconditional predictions")
    raise GuidanceError(f"{name} cannot be a diffusers guider: {reason}")


# ---------------------------------------------------------------------------------------------- guiders in unsee
def is_diffusers_guider(value: Any) -> bool:
    return isinstance(value, BaseGuidance)


@dataclass(eq=False)
class DiffusersGuider(Guidance):
    """A diffusers guider (``BaseGuidance`` instance) as unsee's combination of cond and uncond.

    ``guidance=[APG(...)]`` wraps it for you. Only guiders of the two predictions (cond, uncond) are accepted.
    """

    guider: Any = None
    contract: ClassVar[Contract] = Contract(combines=True, branches=("uncond",))

    def validate(self) -> None:
        guider = self.guider
        if not isinstance(guider, BaseGuidance):
            raise GuidanceError(f"DiffusersGuider takes a diffusers guider (BaseGuidance), got {guider!r}")
        name = type(guider).__name__
        predictions = list(guider._input_predictions or [])
        if predictions != TWO_PREDICTIONS:
            extra = ", ".join(p for p in predictions if p not in TWO_PREDICTIONS)
            raise GuidanceError(f"{name} needs extra denoiser passes ({extra}) that unsee's one batched UNet call does "
                                f"not run; unsee takes guiders of cond and uncond only: for perturbed attention use "
                                f"unsee.guidance.PAG(scale, layers)")

    @property
    def needs_uncond(self) -> bool:
        guider = self.guider
        if not getattr(guider, "_enabled", True):
            return False
        scale = getattr(guider, "guidance_scale", None)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return True
        off = 0.0 if getattr(guider, "use_original_formulation", False) else 1.0
        return not math.isclose(scale, off) or getattr(guider, "zero_init_steps", 0) > 0

    def prepare(self, call) -> "DiffusersGuiderRun":
        level = guider_logger.level
        guider_logger.setLevel(logging.ERROR)  # the copy would repeat BaseGuidance's "experimental" warning per call
        try:
            guider = self.guider.new()  # per-call state (APG's momentum buffer) lives in the copy
        finally:
            guider_logger.setLevel(level)
        if isinstance(guider, CFGppGuider) and guider.scheduler is None:
            guider.set_scheduler(call.scheduler)
        elif isinstance(guider, CFGppGuider):
            check_cfgpp_scheduler(guider.scheduler)
        scale = getattr(guider, "guidance_scale", None)
        if isinstance(scale, (int, float)):
            call.kwargs["guidance_scale"] = scale  # the CFG scale in effect, as callbacks read it
        return DiffusersGuiderRun(guider, self.needs_uncond)

    def describe(self) -> str:
        scale = getattr(self.guider, "guidance_scale", None)
        return type(self.guider).__name__ + (f" {scale:g}" if isinstance(scale, (int, float)) else "")


class DiffusersGuiderRun(MethodRun):
    """Calls the guider as diffusers' denoise loop does: ``set_state``, ``prepare_inputs``, then ``forward``."""

    def __init__(self, guider: BaseGuidance, needs_uncond: bool) -> None:
        self.guider = guider
        self.needs_uncond = needs_uncond

    def combine(self, predictions: dict, step: Step) -> torch.Tensor:
        guider = self.guider
        guider.set_state(step=step.index, num_inference_steps=step.num_steps, timestep=step.timestep)
        guider.prepare_inputs({})  # what the loop does each step (APG starts its momentum at step 0)
        cond, uncond = predictions["cond"], predictions.get("uncond")
        if guider.num_conditions == 1 or uncond is None:
            return guider.forward(pred_cond=cond).pred
        return guider.forward(pred_cond=cond, pred_uncond=uncond).pred
