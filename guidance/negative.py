"""Negative-prompt steering: when the negative prompt acts, and how strongly.

Three modes of ``NegativeSteer``:

- ``"fixed"``: delayed negative prompt (Ban et al., "Understanding the Impact of Negative Prompts: When
  and How Do They Take Effect?", arXiv 2406.02965). A negative prompt only acts after the positive
  prompt has formed the content it names; applied from step 0 it can even create that content. So
  the unconditional branch holds the empty prompt until the start step and the negative prompt from
  then on. The start is given either as ``start_fraction`` (a fraction of the steps, rounded to the
  nearest step, ties to the even one as Python's round: 0.1 of 25 steps is step 2) or as ``start_step`` (a
  0-based step index), never both; the paper reports the critical step around 10-25% of the steps, our
  default is ``start_fraction=0.2``.
- ``"adaptive"``: the start is detected per image from the positive prompt's cross-attention maps.
  The paper's exact rule is not public; **our rule**: take the cross-attention map of the positive
  prompt's tokens that the negative prompt also contains (all positive tokens if none), averaged over
  heads and cross-attention layers and normalised to a distribution over pixels; the negative starts
  at the first step k >= 1 at which that map changed by less than ``threshold`` in L1 distance since
  step k-1 (the content has formed), and at ``max_start`` (fraction) at the latest.
- ``"dng"``: Dynamic Negative Guidance (Koulischer et al., ICLR 2025, arXiv 2410.14398). A third
  branch predicts the negative; the guided prediction is ``eps - lambda_t (eps_neg - eps_u)`` with
  ``lambda_t = dng_scale * p_t / (1 - p_t)``, where p_t estimates P(negative | x_t), updated every
  step by Bayes' rule from the DDPM posterior means of the two branches:
  ``p <- clip(p * exp((-T (|x - mu_neg|^2 - |x - mu_u|^2) + offset) / (2 sigma^2)), p_min, p_max)``.
  The means come from each branch's x0 estimate under the scheduler's ``prediction_type`` (epsilon,
  v or sample) and the step's pair of alphas; sigma^2 is the DDPM posterior variance. The paper samples
  with DDPM, where x_{t-1} is drawn from exactly these Gaussians; with a deterministic sampler (DDIM)
  the same update serves as an approximation.
  Defaults are the official code's (scale 1, prior 0.2, T 1, offset 0, p in [1e-6, 0.99]).
  ``start_fraction``/``start_step`` delay the DNG term as Ban et al. delay a negative prompt: it is added
  from the start step on (default step 0, as in the DNG paper), while p_t is tracked from the first step.

With neither ``start_fraction`` nor ``start_step`` the mode's default applies: a fraction of 0.2 for
``fixed``, step 0 for ``dng``; ``adaptive`` detects the start itself and refuses an explicit one (bound it
with ``max_start``). The old single ``start`` argument (an int meant a step, a float a fraction, so ``1``
and ``1.0`` meant "from step 1" and "never") is refused with a message naming the two arguments.

Negative steering from step 0 equals diffusers' negative prompt; from after the last step it equals
CFG with an empty negative.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F

from .base import (VP_PREDICTION_TYPES, AttentionEdit, Branch, BranchInputs, Contract, Guidance, GuidanceError,
                   GuidanceReport, MethodRun, Step, check_range, vp_denoised)

MODES = ("fixed", "adaptive", "dng")
# (start_fraction, start_step) when neither is given: Ban et al.'s ~10-25% of the steps; DNG from the first step
DEFAULT_START = {"fixed": (0.2, None), "dng": (None, 0)}


@dataclass
class NegativeSteer(Guidance):
    """When and how the negative prompt acts; see the module docstring for the three modes."""

    start: InitVar[Any] = None  # refused: ambiguous between a step and a fraction (see the module docstring)
    mode: str = "fixed"
    start_fraction: Optional[float] = None
    start_step: Optional[int] = None
    threshold: float = 0.15
    max_start: float = 0.5
    dng_scale: float = 1.0
    dng_prior: float = 0.2
    dng_temperature: float = 1.0
    dng_offset: float = 0.0
    dng_p_min: float = 1e-6
    dng_p_max: float = 0.99
    contract: ClassVar[Contract] = Contract(
        adds_term=True, edits_attention=True, sets_unconditional=True, needs_negative=True, needs_cfg=True,
        branches=("uncond", "negative"),
        conditions={"adds_term": "dng mode", "edits_attention": "adaptive mode (a probe)", "branches": "negative: dng mode"})

    def __post_init__(self, start: Any) -> None:
        if start is not None:
            raise GuidanceError(f"NegativeSteer(start={start!r}) is ambiguous: pass start_fraction= (a fraction of "
                                f"the steps, e.g. 0.2) or start_step= (a step index, e.g. 5)")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise GuidanceError(f"NegativeSteer.mode must be one of {MODES}, got {self.mode!r}")
        if self.start_fraction is not None and self.start_step is not None:
            raise GuidanceError("NegativeSteer takes start_fraction or start_step, not both")
        if self.mode == "adaptive" and (self.start_fraction is not None or self.start_step is not None):
            raise GuidanceError("NegativeSteer(mode='adaptive') detects the start per image; leave start_fraction and "
                                "start_step unset and bound the detected step with max_start")
        if self.start_fraction is not None:
            if isinstance(self.start_fraction, bool) or not isinstance(self.start_fraction, (int, float)):
                raise GuidanceError(f"NegativeSteer.start_fraction must be a number in [0, 1], got {self.start_fraction!r}")
            check_range("NegativeSteer", "start_fraction", self.start_fraction, 0.0, 1.0)
        if self.start_step is not None:
            if isinstance(self.start_step, bool) or not isinstance(self.start_step, int):
                raise GuidanceError(f"NegativeSteer.start_step must be a whole step index >= 0, got {self.start_step!r}")
            check_range("NegativeSteer", "start_step", self.start_step, 0)
        check_range("NegativeSteer", "threshold", self.threshold, 0.0, 2.0)
        check_range("NegativeSteer", "max_start", self.max_start, 0.0, 1.0)
        check_range("NegativeSteer", "dng_scale", self.dng_scale, 0.0)
        check_range("NegativeSteer", "dng_prior", self.dng_prior, self.dng_p_min, self.dng_p_max)
        if not 0 < self.dng_p_min < self.dng_p_max < 1:
            raise GuidanceError("NegativeSteer needs 0 < dng_p_min < dng_p_max < 1")

    @property
    def resolved_start(self) -> tuple[Optional[float], Optional[int]]:
        """(start_fraction, start_step) as given, or the mode's default when neither is (both None in ``adaptive``)."""
        if self.start_fraction is not None or self.start_step is not None:
            return self.start_fraction, self.start_step
        return DEFAULT_START.get(self.mode, (None, None))

    def describe_start(self) -> str:
        """The start in words, e.g. "from 30% of the steps", "from step 5", "detected per image"."""
        fraction, step = self.resolved_start
        if step is not None:
            return f"from step {step}"
        if fraction is not None:
            return f"from {fraction:.0%} of the steps"
        return "detected per image"

    def first_step(self, num_steps: int) -> int:
        """The first step (0-based) at which the negative acts in ``fixed`` and ``dng`` modes."""
        fraction, step = self.resolved_start
        if step is not None:
            return step
        return int(round(fraction * num_steps))

    def prepare(self, call) -> "NegativeSteerRun":
        if self.mode == "dng":
            check_dng_scheduler(call.scheduler)
        probe = token_mask = None
        if self.mode == "adaptive":
            if call.prompts is None or call.negatives is None:
                raise GuidanceError("adaptive NegativeSteer needs prompt and negative_prompt as text")
            token_mask = call.token_mask()
            probe = AttentionProbe(frozenset(call.attention_modules(cross=True)))
        # the empty prompt, encoded as diffusers encodes the unconditional rows of a call without a negative prompt
        return NegativeSteerRun(self, call.empty_embeddings(), call.scheduler, token_mask, probe)

    def describe(self) -> str:
        return f"negative {self.mode} {self.describe_start()}"


class AdaptiveStart:
    """Per-row detector of the step at which the positive prompt's content has formed (``adaptive`` mode)."""

    def __init__(self, rows: int, threshold: float, max_step: int) -> None:
        self.threshold = threshold
        self.max_step = max_step
        self.previous: Optional[torch.Tensor] = None
        self.started = torch.zeros(rows, dtype=torch.bool)
        self.start_steps: list[Optional[int]] = [None] * rows

    @staticmethod
    def token_map(maps: list[torch.Tensor], token_mask: torch.Tensor, size: int = 16) -> torch.Tensor:
        """Average the probed (rows, pixels, tokens) maps of the selected tokens into one distribution per row."""
        pooled = []
        for attention in maps:
            rows, pixels, _ = attention.shape
            side = int(round(pixels**0.5))
            if side * side != pixels:
                continue
            weights = (attention.float() * token_mask[:, None, :].float()).sum(-1)
            grid = weights.view(rows, 1, side, side)
            pooled.append(F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).flatten(1))
        combined = torch.stack(pooled).mean(0)
        return combined / combined.sum(-1, keepdim=True).clamp_min(1e-12)

    def update(self, step: int, current: torch.Tensor) -> torch.Tensor:
        """Feed this step's maps (before the negative starts); returns which rows use the negative from now on."""
        if self.previous is not None:
            change = (current - self.previous).abs().sum(-1)
            newly = (~self.started) & ((change < self.threshold) | (step >= self.max_step))
            for row in torch.nonzero(newly).flatten().tolist():
                self.start_steps[row] = step
            self.started |= newly
        self.previous = current
        return self.started.clone()


class DNGState:
    """Posterior estimate p_t = P(negative | x_t) of Dynamic Negative Guidance, one value per row."""

    def __init__(self, steer: NegativeSteer, rows: int) -> None:
        self.steer = steer
        self.p = torch.full((rows,), steer.dng_prior, dtype=torch.float64)
        self.pending: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def weight(self) -> torch.Tensor:
        """lambda_t per row."""
        return self.steer.dng_scale * self.p / (1 - self.p)

    def observe(self, sample: torch.Tensor) -> None:
        """Bayes update with the sample the last step produced (VP form, as the UNet sees it)."""
        if self.pending is None:
            return
        mu_neg, mu_u, variance = self.pending
        x = sample.double().flatten(1)
        distance = ((x - mu_neg.flatten(1)) ** 2).sum(1) - ((x - mu_u.flatten(1)) ** 2).sum(1)
        exponent = (-self.steer.dng_temperature * distance + self.steer.dng_offset) / (2 * variance)
        self.p = (self.p * torch.exp(exponent.clamp(max=50.0).cpu())).clamp(self.steer.dng_p_min, self.steer.dng_p_max)
        self.pending = None

    def predict(self, sample: torch.Tensor, output_neg: torch.Tensor, output_u: torch.Tensor, prediction_type: str,
                alpha_t: torch.Tensor, alpha_prev: torch.Tensor) -> None:
        """DDPM posterior means of x_{t-1} under the negative and unconditional model outputs."""
        x = sample.double()
        a_t, a_prev = alpha_t.double(), alpha_prev.double()
        step_alpha = a_t / a_prev
        beta = 1 - step_alpha
        variance = (beta * (1 - a_prev) / (1 - a_t)).clamp_min(1e-20)
        coef_x0 = a_prev.sqrt() * beta / (1 - a_t)
        coef_xt = step_alpha.sqrt() * (1 - a_prev) / (1 - a_t)

        def mean(output: torch.Tensor) -> torch.Tensor:
            x0 = vp_denoised(prediction_type, output.double(), x, a_t.sqrt(), (1 - a_t).sqrt())
            return coef_x0 * x0 + coef_xt * x

        self.pending = (mean(output_neg), mean(output_u), variance)


def check_dng_scheduler(scheduler) -> None:
    """DNG's Bayes update needs a discrete variance-preserving scheduler and a known model parametrisation."""
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise GuidanceError(f"NegativeSteer(mode='dng') needs a scheduler with alphas_cumprod (DDPM, DDIM, Euler, DPM++); "
                            f"the pipeline has {type(scheduler).__name__}")
    prediction = scheduler.config.prediction_type
    if prediction not in VP_PREDICTION_TYPES:
        raise GuidanceError(f"NegativeSteer(mode='dng') needs an epsilon, v- or sample-prediction model, this one "
                            f"predicts {prediction!r}")


class AttentionProbe(AttentionEdit):
    """Records the cross-attention maps of its rows, averaged over heads: (rows, pixels, tokens) per module."""

    def __init__(self, modules: frozenset) -> None:
        self.modules = modules
        self.maps: list = []

    def edit_output(self, attn, name, query, key, value, out, attend):
        rows = self.rows
        scores = (query[rows].transpose(1, 2) @ key[rows].transpose(1, 2).transpose(-1, -2)) * attn.scale
        self.maps.append(scores.softmax(-1).mean(1).detach())
        return out


class NegativeSteerRun(MethodRun):
    """What the unconditional branch holds at each step (the empty prompt or the negative, per image), DNG's branch
    and term, and the adaptive start's detection."""

    needs_uncond = True

    def __init__(self, method: NegativeSteer, empty: tuple, scheduler, token_mask: Optional[torch.Tensor],
                 probe: Optional[AttentionProbe]) -> None:
        self.method = method
        self.empty = empty  # (embeds, pooled or None) of the empty prompt, one row per image
        self.scheduler = scheduler
        self.token_mask = token_mask
        self.probe = probe
        self.attention_edits = (probe,) if probe is not None else ()
        self.negative_active: Optional[torch.Tensor] = None  # adaptive: per image, has the negative started
        self.adaptive: Optional[AdaptiveStart] = None
        self.dng: Optional[DNGState] = None
        self.posterior: Optional[list] = None

    # ------------------------------------------------------------ what the unconditional branch holds
    def _negative_rows_active(self, step: Step) -> torch.Tensor:
        """Per image: does the unconditional branch hold the negative prompt (True) or the empty prompt?"""
        mode = self.method.mode
        if mode == "fixed":
            return torch.full((step.batch,), step.index >= self.method.first_step(step.num_steps), dtype=torch.bool)
        if mode == "adaptive":
            if self.negative_active is None:
                self.negative_active = torch.zeros(step.batch, dtype=torch.bool)
            return self.negative_active
        return torch.zeros(step.batch, dtype=torch.bool)  # dng: the negative has its own branch

    def branches(self, step: Step):
        return (Branch("negative", source="uncond"),) if self.method.mode == "dng" else ()

    def branch_inputs(self, step: Step, name: str, inputs: BranchInputs) -> BranchInputs:
        if name != "uncond":
            return inputs
        embeds, added = inputs.embeds, dict(inputs.added)
        active = self._negative_rows_active(step).to(embeds.device)
        if bool(active.all()):
            return inputs
        empty_embeds, empty_pooled = self.empty
        embeds = torch.where(active[:, None, None], embeds, empty_embeds.to(embeds.dtype))
        if empty_pooled is not None and "text_embeds" in added:
            added["text_embeds"] = torch.where(active[:, None], added["text_embeds"], empty_pooled.to(embeds.dtype))
        return BranchInputs(inputs.sample, embeds, added)

    # ------------------------------------------------------------ around the denoiser call
    def _probing(self) -> bool:
        return self.probe is not None and (self.negative_active is None or not bool(self.negative_active.all()))

    def before_denoiser(self, step: Step) -> None:
        if self.probe is not None:
            self.probe.rows = step.layout["cond"] if self._probing() else None
            self.probe.maps = []
        if self.dng is not None:
            self.dng.observe(step.cond_sample)

    def add_term(self, guided: torch.Tensor, predictions: dict, step: Step) -> torch.Tensor:
        if "negative" not in predictions:
            return guided
        if self.dng is None:
            self.dng = DNGState(self.method, step.batch)
            self.posterior = []
        self.posterior.append(self.dng.p.tolist())
        if step.index >= self.method.first_step(step.num_steps):  # delayed DNG: p_t is tracked from the first step
            weight = self.dng.weight().to(guided.device, guided.dtype).view(-1, *([1] * (guided.ndim - 1)))
            guided = guided - weight * (predictions["negative"] - predictions["uncond"])
        return guided

    def after_denoiser(self, predictions: dict, step: Step) -> None:
        if "negative" in predictions:
            self._predict_dng(step, predictions["negative"], predictions["uncond"])
        if self.probe is not None and self.probe.rows is not None and self.probe.maps:
            self._update_adaptive(step)

    def _update_adaptive(self, step: Step) -> None:
        if self.adaptive is None:
            max_step = max(1, int(round(self.method.max_start * step.num_steps)))
            self.adaptive = AdaptiveStart(step.batch, self.method.threshold, max_step)
        maps = self.probe.maps
        current = AdaptiveStart.token_map(maps, self.token_mask.to(maps[0].device))
        # the decision taken after step k applies from step k + 1
        self.negative_active = self.adaptive.update(step.index, current.cpu())

    def _predict_dng(self, step: Step, output_neg: torch.Tensor, output_u: torch.Tensor) -> None:
        scheduler = self.scheduler
        sample, timestep = step.cond_sample, step.timestep
        timesteps = scheduler.timesteps
        index = int((timesteps == timestep).nonzero()[0]) if (timesteps == timestep).any() else step.index
        alphas = scheduler.alphas_cumprod.to(sample.device)
        a_t = alphas[int(timesteps[index])]
        if index + 1 < len(timesteps):
            a_prev = alphas[int(timesteps[index + 1])]
        else:  # the last step lands on the scheduler's final alpha (DDIM's set_alpha_to_one) or on x0
            a_prev = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", 1.0), device=alphas.device, dtype=alphas.dtype)
        self.dng.predict(sample, output_neg, output_u, scheduler.config.prediction_type, a_t, a_prev)

    def report(self, report: GuidanceReport) -> None:
        if self.adaptive is not None:
            report.negative_start_steps = [None if s is None else s + 1 for s in self.adaptive.start_steps]
        if self.posterior is not None:
            report.dng_posterior = self.posterior
