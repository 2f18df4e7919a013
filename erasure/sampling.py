"""UNet calls, DDIM sampling and the targets the trainers regress on.

The loss space. The papers write their losses on noise predictions (epsilon). On a v-prediction model (the toy
model, SD 2.x-v) a trainer's default, ``loss_space="output"``, takes them on the UNet's raw v outputs. With
``alpha_t^2 = alphas_cumprod[t]``, ``sigma_t^2 = 1 - alpha_t^2`` and ``v = alpha_t eps - sigma_t x0``, two predictions
at the same ``x_t`` map as ``eps = alpha_t v + sigma_t x_t``, so a v-space squared error is ``1 / alpha_t^2 =
1 + 1/SNR(t)`` times the epsilon-space one: equal at low noise, larger with the noise (on SD's scaled-linear schedule:
1.12x at t = 100, 3.6x at t = 500, 18x at t = 750, 215x at t = 999; 21x on average over uniform timesteps). Targets
whose coefficients sum to one (ESD's) map the same way, so the target is the same in either space; what changes is
how much each sampled timestep weighs in the gradient: the v loss leans on the noisiest, layout-setting steps far
more than the papers' loss, and its values are larger (compare losses across models only in the same space).
``loss_space="epsilon"`` (ESD, SalUn) converts the predictions to noise predictions first
(:func:`epsilon_from_output`) and takes the papers' loss; on epsilon-prediction models (SD 1.x, SDXL) the two are
identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import Conditioning
from .errors import TrainingError

__all__ = ["predict", "ddim_sample", "ddim_latents", "Trajectory", "denoising_target", "epsilon_from_output",
           "esd_target", "mse"]


def predict(unet: nn.Module, x: torch.Tensor, t: Union[int, torch.Tensor], cond: Conditioning) -> torch.Tensor:
    """One UNet call: the model output (noise, or v for v-prediction models) for each row of ``x``."""
    if len(cond) != x.shape[0]:
        cond = cond.repeat(x.shape[0] // len(cond))
    return unet(x, t, **cond.unet_kwargs(), return_dict=False)[0]


@torch.no_grad()
def ddim_sample(unet: nn.Module, scheduler: Any, x: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                guidance_scale: float, stop_at: Optional[int] = None, start_at: int = 0) -> torch.Tensor:
    """Deterministic DDIM sampling with classifier-free guidance from the noise ``x``.

    ``scheduler`` is a ``DDIMScheduler`` whose ``set_timesteps`` was called. Runs steps ``start_at`` to
    ``stop_at`` (the end when None): the result is at the noise level of ``scheduler.timesteps[stop_at]`` (the
    clean latents when ``stop_at`` is None); ``x`` must be at the level of ``scheduler.timesteps[start_at]``.
    The conditional and unconditional predictions share one UNet call.
    """
    stop = len(scheduler.timesteps) if stop_at is None else stop_at
    return ddim_latents(unet, scheduler, x, cond, uncond, guidance_scale, [stop], start_at)[stop]


@torch.no_grad()
def ddim_latents(unet: nn.Module, scheduler: Any, x: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                 guidance_scale: float, stops: Sequence[int], start_at: int = 0,
                 outputs: Optional[dict[int, torch.Tensor]] = None) -> dict[int, torch.Tensor]:
    """One DDIM run (as :func:`ddim_sample`) that keeps its latents at several steps: step index -> the latents at
    the noise level of ``scheduler.timesteps[index]`` (``len(scheduler.timesteps)``: the clean latents), for each
    index of ``stops`` (from ``start_at`` on). The run stops at the last of them; each kept latent is exactly what
    :func:`ddim_sample` with that ``stop_at`` returns.

    ``outputs``, a dict, receives the UNet's raw outputs at each stop the run steps on from (every stop but the
    last): index -> the batch ``[cond rows; uncond rows]`` at those latents and ``scheduler.timesteps[index]``."""
    wanted = set(stops)
    if not wanted or min(wanted) < start_at or max(wanted) > len(scheduler.timesteps):
        raise ValueError(f"stops {sorted(wanted)} are not DDIM step indices from {start_at} to "
                         f"{len(scheduler.timesteps)}")
    both = Conditioning.cat([cond, uncond])
    kept = {}
    for index in range(start_at, max(wanted)):
        if index in wanted:
            kept[index] = x
        t = scheduler.timesteps[index]
        out = predict(unet, torch.cat([x, x]), t, both)
        if outputs is not None and index in wanted:
            outputs[index] = out
        out_c, out_u = out.chunk(2)
        guided = out_u + guidance_scale * (out_c - out_u)
        x = scheduler.step(guided, t, x).prev_sample
    kept[max(wanted)] = x
    return kept


@dataclass
class Trajectory:
    """One sampled DDIM trajectory and the training steps it serves (a trainer's ``trajectory_reuse``).

    ``draws``: the method's random choices the run was made with (which prompt, which preserved prompt...), the
    same for every step it serves: numbers, lists of numbers or None. ``stops``: for each step it serves, in order,
    the DDIM step indices that step trains at. ``latents``: the run's latents at each of those indices (see
    :func:`ddim_latents`). ``number``: which trajectory of its draw it is (step // trajectory_reuse). ``frozen``:
    the frozen model's predictions a method keeps per stop index (name -> tensor or None), so that steps training at
    the same stop of the run do not ask the frozen model again (its weights do not change).
    """

    draws: dict[str, Any]
    stops: list[tuple[int, ...]]
    latents: dict[int, torch.Tensor]
    number: int = 0
    frozen: dict[int, dict[str, Optional[torch.Tensor]]] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        """The trajectory as a checkpoint keeps it (plain values; the tensors on the CPU)."""
        cpu = lambda v: None if v is None else v.detach().to("cpu", copy=True)  # noqa: E731
        return {"number": self.number, "draws": dict(self.draws), "stops": [list(s) for s in self.stops],
                "latents": {k: cpu(v) for k, v in self.latents.items()},
                "frozen": {k: {name: cpu(v) for name, v in kept.items()} for k, kept in self.frozen.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "Trajectory":
        on = lambda v: None if v is None else v.to(device)  # noqa: E731
        return cls(draws=dict(state["draws"]), stops=[tuple(s) for s in state["stops"]],
                   latents={int(k): v.to(device) for k, v in state["latents"].items()}, number=int(state["number"]),
                   frozen={int(k): {name: on(v) for name, v in kept.items()}
                           for k, kept in (state.get("frozen") or {}).items()})


def esd_target(anchor: torch.Tensor, concept: torch.Tensor, empty: torch.Tensor, eta: float) -> torch.Tensor:
    """``anchor - eta * (concept - empty)``: the frozen model's prediction guided away from the concept (ESD, Gandikota
    et al. 2023, Eq. 3 with ``anchor`` the empty prompt's prediction), the erasure target of ESD, SPM, AdvUnlearn
    and ANT. ``concept`` and ``empty`` are the frozen predictions for the concept and for ``""``; in context the anchor
    is ``c_from``'s own prediction. A negative ``eta`` guides towards the concept (ANT's early steps)."""
    return anchor - eta * (concept - empty)


def denoising_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for ``add_noise(x0, noise, t)`` under the scheduler's parametrisation."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise TrainingError(f"unsupported prediction_type {kind!r}")


def epsilon_from_output(scheduler: Any, output: torch.Tensor, x_t: torch.Tensor,
                        t: Union[int, torch.Tensor]) -> torch.Tensor:
    """The noise prediction that a UNet output at ``(x_t, t)`` stands for, under the scheduler's parametrisation.

    With ``alpha_t = sqrt(alphas_cumprod[t])`` and ``sigma_t = sqrt(1 - alphas_cumprod[t])``, so that
    ``x_t = alpha_t x0 + sigma_t eps``: ``epsilon`` outputs are returned as they are; ``v_prediction`` outputs
    (``v = alpha_t eps - sigma_t x0``) give ``eps = alpha_t v + sigma_t x_t``; ``sample`` outputs give
    ``eps = (x_t - alpha_t x0) / sigma_t``. ``t`` is one timestep or one per row; the result is float32 (or the
    output's dtype for ``epsilon``).

    For two outputs at the same ``x_t`` and ``t``, ``eps_a - eps_b = alpha_t (v_a - v_b)``: an MSE between v
    outputs is ``1 / alpha_t^2 = 1 + 1 / SNR(t)`` times the MSE between the noise predictions they stand for.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    if kind not in ("v_prediction", "sample"):
        raise TrainingError(f"unsupported prediction_type {kind!r}")
    alphas_cumprod = scheduler.alphas_cumprod.to(device=output.device, dtype=torch.float32)
    steps = torch.as_tensor(t, device=output.device).long().reshape(-1)
    shape = (-1,) + (1,) * (output.ndim - 1)
    alpha = alphas_cumprod[steps].sqrt().reshape(shape)
    sigma = (1 - alphas_cumprod[steps]).sqrt().reshape(shape)
    if kind == "v_prediction":
        return alpha * output.float() + sigma * x_t.float()
    return (x_t.float() - alpha * output.float()) / sigma


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, in float32."""
    return F.mse_loss(prediction.float(), target.float())
