"""CFG++ (Chung, Kim, Park, Nam, Ye, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
Models", ICLR 2025, arXiv 2406.08070).

CFG++ denoises with the guided prediction but renoises with the *unconditional* one, and its
scale lambda lives in [0, 1] (an interpolation, not an extrapolation):

    eps_lam = eps_u + lam * (eps_c - eps_u)
    DDIM:   x_prev = sqrt(a_prev) * x0(eps_lam) + sqrt(1 - a_prev) * eps_u
    Euler:  x_next = D_lam + sigma_next * (x - D_u) / sigma          (D = denoised estimate)

Supported schedulers: DDIM (eta 0), Euler, Euler ancestral and DPM++ 2M
(``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_order=2``); any
other is refused before sampling starts.

**Strength depends on the step count.** One deterministic CFG++ step with lambda equals one CFG
step with ``omega_t = lam * sigma_t / (sigma_t - sigma_next)`` (sigma = sqrt((1 - a)/a); for Euler
ancestral sigma_next is sigma_down). With SD's schedule that ratio is about 12.8 at 50 steps and
5.5 at 20, so the same lambda guides more strongly with more steps; the paper's lambda = 0.6
default is for 50 DDIM steps.

Choices where implementations differ (documented in ../shared/specs/guidance.md section 1):
- DPM++ 2M keeps a history of the *unconditional* denoised estimate and uses it in the
  second-order correction (the paper's general form, as the official SDXL code); the official
  SD 1.5 code and ComfyUI use the guided estimate there. First and final steps are first order.
- We use the scheduler's own alphas and sigmas (diffusers indexing), so results differ slightly
  from the official code, which shifts the alpha table by one step.
- lambda = 1 is not conditional-only sampling: the renoise still uses eps_u.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from .base import Contract, Guidance, GuidanceError, MethodRun, Step, check_range, vp_denoised

SUPPORTED = "DDIMScheduler (eta=0), EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler (dpmsolver++, order 2)"


@dataclass
class CFGpp(Guidance):
    """CFG++ with scale ``lam`` in [0, 1] (paper default 0.6 for 50-step DDIM on SD 1.5)."""

    lam: float = 0.6
    contract: ClassVar[Contract] = Contract(combines=True, replaces_step=True, branches=("uncond",))

    def validate(self) -> None:
        check_range("CFGpp", "lam", self.lam, 0.0, 1.0)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return uncond + self.lam * (cond - uncond)

    def prepare(self, call) -> "CFGppRun":
        check_scheduler(call.scheduler, call.kwargs.get("eta", 0.0) or 0.0)
        return CFGppRun(self)

    def describe(self) -> str:
        return f"CFG++ λ={self.lam:g}"


class CFGppRun(MethodRun):
    """Combines with lambda, and steps with :func:`cfgpp_step` from the guided and unconditional predictions."""

    needs_uncond = True

    def __init__(self, method: CFGpp) -> None:
        self.method = method
        self.state = CFGppState()

    def combine(self, predictions: dict, step: Step) -> torch.Tensor:
        return self.method.combine(predictions["cond"], predictions["uncond"])

    def scheduler_step(self, scheduler, model_output, timestep, sample, predictions, generator):
        return cfgpp_step(scheduler, model_output, predictions["uncond"], timestep, sample, self.state, generator)


def check_scheduler(scheduler, eta: float = 0.0) -> None:
    """Refuse schedulers CFG++ has no update rule for, with the way out."""
    fix = "switch with e.g. pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
    name = type(scheduler).__name__
    if type(scheduler) not in (DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler):
        raise GuidanceError(f"CFG++ supports {SUPPORTED}; the pipeline has {name}: {fix}")
    prediction = scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise GuidanceError(f"CFG++ needs an epsilon or v-prediction model, this one predicts {prediction!r}")
    if isinstance(scheduler, DDIMScheduler) and eta != 0:
        raise GuidanceError(f"CFG++ with DDIM needs eta=0, got eta={eta}")
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        cfg = scheduler.config
        if cfg.algorithm_type != "dpmsolver++" or cfg.solver_order != 2:
            raise GuidanceError(
                f"CFG++ supports DPM++ 2M only (algorithm_type='dpmsolver++', solver_order=2); got "
                f"algorithm_type={cfg.algorithm_type!r}, solver_order={cfg.solver_order}: {fix}"
            )
    if getattr(scheduler.config, "thresholding", False):
        raise GuidanceError("CFG++ does not support dynamic thresholding; set thresholding=False")


@dataclass
class CFGppState:
    """Per-call state: the unconditional denoised estimate of the previous step (DPM++ 2M)."""

    previous_denoised_uncond: Optional[torch.Tensor] = None
    previous_lambda: Optional[torch.Tensor] = None


def _ddim_step(scheduler, guided, uncond, timestep, sample):
    t = int(timestep)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t].to(sample.device, torch.float32)
    a_prev = (scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod).to(sample.device, torch.float32)
    x = sample.float()
    x0_guided = vp_denoised(scheduler.config.prediction_type, guided.float(), x, a_t.sqrt(), (1 - a_t).sqrt())
    x0_uncond = vp_denoised(scheduler.config.prediction_type, uncond.float(), x, a_t.sqrt(), (1 - a_t).sqrt())
    eps_uncond = (x - a_t.sqrt() * x0_uncond) / (1 - a_t).sqrt()
    return a_prev.sqrt() * x0_guided + (1 - a_prev).sqrt() * eps_uncond


def _ve_denoised(scheduler, output, sample, sigma):
    """Denoised estimate D for Euler-type schedulers (sample x = x0 + sigma * eps, scaled model input)."""
    if scheduler.config.prediction_type == "epsilon":
        return sample - sigma * output
    return output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)


def _euler_step(scheduler, guided, uncond, sample, generator, ancestral: bool):
    if scheduler.step_index is None:
        scheduler._init_step_index(scheduler.timesteps[0])
    i = scheduler.step_index
    sigma, sigma_next = scheduler.sigmas[i].float(), scheduler.sigmas[i + 1].float()
    x = sample.float()
    d_guided = _ve_denoised(scheduler, guided.float(), x, sigma)
    d_uncond = _ve_denoised(scheduler, uncond.float(), x, sigma)
    if ancestral:
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    else:
        sigma_up, sigma_down = torch.zeros(()), sigma_next
    prev = d_guided + sigma_down * (x - d_uncond) / sigma
    if ancestral and sigma_up > 0:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev = prev + noise * sigma_up
    scheduler._step_index += 1
    return prev


def _dpm_2m_step(scheduler, guided, uncond, sample, state: CFGppState):
    if scheduler.step_index is None:
        scheduler._init_step_index(scheduler.timesteps[0])
    i = scheduler.step_index
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[i].float())
    alpha_n, sigma_n = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[i + 1].float())
    x = sample.float()
    d_guided = vp_denoised(scheduler.config.prediction_type, guided.float(), x, alpha_t, sigma_t)
    d_uncond = vp_denoised(scheduler.config.prediction_type, uncond.float(), x, alpha_t, sigma_t)
    # work in the VE variables x~ = x / alpha, s = sigma / alpha, lambda = -log s
    x_ve = x / alpha_t
    s_t, s_n = sigma_t / alpha_t, sigma_n / alpha_n
    last = i == len(scheduler.timesteps) - 1
    if s_n == 0:
        x_next_ve = d_guided
    else:
        lam_t, lam_n = -torch.log(s_t), -torch.log(s_n)
        h = lam_n - lam_t
        x_next_ve = d_guided + torch.exp(-h) * (x_ve - d_uncond)
        if state.previous_denoised_uncond is not None and not last:
            r = (lam_t - state.previous_lambda) / h
            x_next_ve = x_next_ve + (1 - torch.exp(-h)) * (d_uncond - state.previous_denoised_uncond) / (2 * r)
        state.previous_lambda = lam_t
    state.previous_denoised_uncond = d_uncond
    scheduler._step_index += 1
    return x_next_ve * alpha_n if s_n != 0 else d_guided


def cfgpp_step(scheduler, guided: torch.Tensor, uncond: torch.Tensor, timestep, sample: torch.Tensor,
               state: CFGppState, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One CFG++ update: the previous sample from the guided and unconditional model outputs."""
    if isinstance(scheduler, DDIMScheduler):
        prev = _ddim_step(scheduler, guided, uncond, timestep, sample)
    elif isinstance(scheduler, EulerAncestralDiscreteScheduler):
        prev = _euler_step(scheduler, guided, uncond, sample, generator, ancestral=True)
    elif isinstance(scheduler, EulerDiscreteScheduler):
        prev = _euler_step(scheduler, guided, uncond, sample, generator, ancestral=False)
    elif isinstance(scheduler, DPMSolverMultistepScheduler):
        prev = _dpm_2m_step(scheduler, guided, uncond, sample, state)
    else:
        check_scheduler(scheduler)
        raise AssertionError("unreachable")
    return prev.to(sample.dtype)


def equivalent_cfg_scale(scheduler, lam: float, step_index: int) -> float:
    """The CFG scale omega_t that one deterministic CFG++ step with ``lam`` equals at ``step_index``.

    omega_t = lam * sigma_t / (sigma_t - sigma_next), sigma = sqrt((1 - a)/a); call after ``set_timesteps``.
    """
    if isinstance(scheduler, DDIMScheduler):
        t = int(scheduler.timesteps[step_index])
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        a_t = scheduler.alphas_cumprod[t]
        a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        sigma, sigma_next = ((1 - a_t) / a_t) ** 0.5, ((1 - a_prev) / a_prev) ** 0.5
    else:
        sigma, sigma_next = scheduler.sigmas[step_index], scheduler.sigmas[step_index + 1]
        if isinstance(scheduler, DPMSolverMultistepScheduler):
            a, s = scheduler._sigma_to_alpha_sigma_t(sigma)
            a_n, s_n = scheduler._sigma_to_alpha_sigma_t(sigma_next)
            sigma, sigma_next = s / a, s_n / a_n
    return float(lam * sigma / (sigma - sigma_next))
