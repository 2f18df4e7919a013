"""ANT: Set You Straight: Auto-Steering Denoising Trajectories to Sidestep Unwanted Concepts
(Li, Lu et al.; ACM MM 2025).

arXiv 2504.12782, code https://github.com/lileyang1210/ANT. ESD reverses the classifier-free guidance
direction of the concept at every noise level, which also bends the early, structure-setting part of the
trajectory and damages what the image keeps (layout, background). ANT splits the denoising trajectory:

- the **early** steps (the first ``before_step`` of ``ddim_steps`` DDIM steps, high noise) keep the
  concept's direction, even enhance it, so the layout is the original model's::

      L_enh   = MSE( eps_theta(x+, c),  eps*(x+, "") + eta * (eps*(x+, c) - eps*(x+, "")) )

- the **mid-to-late** steps erase it with the reversed CFG direction (the ESD target)::

      L_erase = MSE( eps_theta(x-, c),  eps*(x-, "") - eta * (eps*(x-, c) - eps*(x-, "")) )

- both keep the unconditional prediction: ``L_unc+- = MSE(eps_theta(x+-, ""), eps*(x+-, ""))``;

``L = L_erase + a2 * L_unc- + a1 * (L_enh + a2 * L_unc+)`` with ``a1`` = ``enhance_weight`` (1.0) and
``a2`` = ``uncond_weight`` (0.5), the single-concept configuration's values. ``x+`` and ``x-`` come from one
DDIM run (CFG ``start_guidance``) from the same noise with the model being trained, stopped at a random
early step and continued to a random later one. ``eps*`` is the frozen original model (no gradients).

Two kinds of adapter:

- ``kind="delta"`` (the paper's single-concept recipe): full-weight training restricted by an
  **augmentation-enhanced saliency mask**: for every augmentation (each prompt of ``saliency_prompts``
  -- by default the concept alone; e.g. the concept and its synonyms -- under each seed of ``saliency_seeds``) the
  gradient of the ANT loss is accumulated over ``saliency_iterations`` trajectories; per tensor the
  ``mask_fraction`` of entries with the **largest** ``|g|`` are kept; the mask is the intersection over all
  augmentations. Unmasked entries stay bit-identical.
- ``kind="lora"`` (the paper's multi-concept recipe): a LoRA on every Linear/Conv2d inside the UNet's
  down, mid and up blocks. Several concepts are erased with one LoRA per concept -- one job each, e.g. a
  job file ``{"method": "ant", "kind": "lora", "concept": ["circle", "red"]}`` for ``unsee erase --config`` --
  and the LoRAs are stacked at generation time (``pipe.load_erasure`` once per file).

Where the paper and the official code disagree, and what this file does:

- which end of the trajectory is kept: the single-concept script (CompVis sampler) calls the *last*
  7 steps (t < 140) the "plus" phase, the multi-concept script and the paper the *first* (high-noise)
  steps. Here ``keep_phase``: ``"early"`` (the default) keeps the first ``before_step`` steps, as the paper
  describes (structure is set early); ``"late"`` keeps the last ``before_step`` steps, as the single-concept
  script does, and erases in all the steps before them.
- the mask: ``generate_mask.py`` sorts ascending without negation and so keeps the **lowest** 50% of
  ``|g|`` per tensor, the opposite of saliency; here the highest, as the paper says.
- the gradient pass: the official script applies its updates (lr 1e-2) while accumulating the gradients;
  here the gradients are all taken at the original weights, so the mask does not depend on the order of
  the augmentations.
- ``L_unc`` terms: the single-concept script computes ``eps_theta(., "")`` under no_grad (they add no
  gradient); here they train, as in the multi-concept script.
- ``before_step`` defaults to 7 of 50 steps (the single-concept configuration; the multi-concept one uses 4).

``erase_from`` (not in the paper; None by default) erases the concept in context, as ESD's option of that name
does: each step draws one of these prompts, ``c_from`` ("a striped green triangle"), runs the trajectory from it,
and uses the paper's two targets with ``eps*(x, "")`` replaced by ``c_from``'s prediction less the concept's
direction, ``b = eps*(x, c_from) - (eps*(x, c) - eps*(x, ""))``: early ``b + eta * (eps*(x+, c) - eps*(x+, ""))``,
late ``b - eta * (eps*(x-, c) - eps*(x-, ""))``. The rest of the prompt is kept; with ``c_from`` the concept
itself, ``b = eps*(x, "")`` and the targets are the paper's; at the paper's eta 1 the early target is ``c_from``'s
own prediction (kept, not enhanced). The saliency mask is still taken on the concept's own words. What the two
``keep_phase`` orders did to a style on the toy model: ``docs/erasure-notes.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from .conditioning import Conditioning, encode_concept, encode_prompts
from .config import TrainerConfig, TrajectoryReuse, fill_concept
from .errors import ConfigError
from .fields import (BATCH_SIZE, DDIM_STEPS, ERASE_FROM, FRACTION, GUIDANCE, LORA_ALPHA, OUTPUT_KIND, RANK,
                     RESOLUTION, SEEDS, choice, integer, number, prompt_list, setting)
from .registry import register_method
from .saliency import PARAMETERS, SaliencyMaskedTrainer, pack_mask, top_fraction_mask, unpack_mask
from .sampling import Trajectory, ddim_latents, esd_target, mse, predict
from .selectors import linear_modules, lora_config

__all__ = ["ANTConfig", "ANTTrainer", "ant_lora_modules", "augmentation_prompts"]

KEEP_PHASES = ("early", "late")


@dataclass
class ANTConfig(TrajectoryReuse, TrainerConfig):
    """ANT settings; defaults from the paper's single-concept configuration (Li, Lu et al., ACM MM 2025).

    Args:
        steps: optimisation steps (250). lr: Adam learning rate (5e-4 on the masked weights).
        eta: guidance strength of the enhance and erase targets (1.0).
        before_step: the first ``before_step`` of the ``ddim_steps`` DDIM steps keep (enhance) the concept;
            the remaining steps erase it (7 of 50).
        keep_phase: ``"early"`` (the paper: the first ``before_step`` steps are kept) or ``"late"`` (the
            official single-concept script: the last ``before_step`` steps are kept, the ones before erased).
        ddim_steps: DDIM steps of the trajectory (50). start_guidance: its CFG scale (3.0).
        enhance_weight: ``a1``, weight of the early-phase terms (1.0).
        uncond_weight: ``a2``, weight of the unconditional-preservation terms (0.5).
        kind: ``"delta"`` (saliency-masked full weights) or ``"lora"`` (one LoRA for the concept).
        rank, lora_alpha: LoRA rank and alpha (alpha None: equal to the rank, i.e. scaling 1).
        parameters: the weights the mask ranks: ``"full"`` (all, the paper) or an ESD variant.
        mask_fraction: share of each tensor's entries a single augmentation's mask keeps (0.5).
        saliency_prompts: the prompts of the augmentations (``{concept}`` is replaced by the concept); None: the
            concept alone.
        saliency_seeds: the seeds of the augmentations (the official five).
        saliency_iterations: trajectories whose gradients are accumulated per augmentation (10).
        batch_size: trajectories per step (1). resolution: image size (None: the pipeline's default).
        erase_from: prompts that name the concept, to erase it from in context (one drawn per step; see the
            module docstring); None erases the concept's own words.
        trajectory_reuse: training steps one DDIM run serves (1; see
            :class:`~unsee.erasure.config.TrajectoryReuse`): each step takes its own pair of stops (x+ and x-) of
            the run, whose prompt (``erase_from``) it keeps. The saliency mask's trajectories are not reused.
    """

    steps: int = 250
    lr: float = 5e-4
    eta: float = setting(1.0, number(low=0))
    before_step: int = setting(7, integer(1, limits=(0, 1000)), says="an integer in [1, ddim_steps - 1]")
    keep_phase: str = setting("early", choice(KEEP_PHASES))
    ddim_steps: int = setting(50, DDIM_STEPS)
    start_guidance: float = setting(3.0, GUIDANCE)
    enhance_weight: float = setting(1.0, number(low=0))
    uncond_weight: float = setting(0.5, number(low=0))
    kind: str = setting("delta", OUTPUT_KIND)
    rank: int = setting(4, RANK)
    lora_alpha: Optional[float] = setting(None, LORA_ALPHA)
    parameters: str = setting("full", PARAMETERS)
    mask_fraction: float = setting(0.5, FRACTION)
    saliency_prompts: Optional[list[str]] = setting(None, prompt_list(none=True))
    saliency_seeds: list[int] = setting([24, 42, 98, 403, 3407], SEEDS)
    saliency_iterations: int = setting(10, integer(1, limits=(1, 10_000)))
    batch_size: int = setting(1, BATCH_SIZE)
    resolution: Optional[int] = setting(None, RESOLUTION)
    erase_from: Union[str, tuple[str, ...], None] = setting(None, ERASE_FROM)

    method: ClassVar[str] = "ant"

    @property
    def text_kv_only(self) -> bool:  # type: ignore[override]
        return self.kind == "delta" and self.parameters == "esd-x-strict"

    def validate(self) -> None:
        super().validate()
        if self.before_step >= self.ddim_steps:
            raise ConfigError(f"before_step must be an integer in [1, ddim_steps - 1] = [1, {self.ddim_steps - 1}] "
                              f"(both phases need steps), got {self.before_step!r}")


def augmentation_prompts(config: ANTConfig) -> list[str]:
    """The saliency augmentations' prompts: ``saliency_prompts`` (``{concept}`` filled in), else the concept alone."""
    if config.saliency_prompts is not None:
        return fill_concept(config.saliency_prompts, config.concept)
    return [config.concept]


def ant_lora_modules(unet: nn.Module) -> list[str]:
    """Every Linear/Conv2d inside the UNet's down, mid and up blocks (the multi-concept LoRA's targets)."""
    return linear_modules(unet, lambda name: name.split(".")[0] in ("down_blocks", "mid_block", "up_blocks"))


@register_method("ant", summary="ANT: keep the early, layout-setting steps, steer the late ones away from the concept")
class ANTTrainer(SaliencyMaskedTrainer):
    """Trains an ANT adapter. ``ANTTrainer(ANTConfig(concept="circle")).train(pipe)``.

    With ``kind="delta"``, ``mask`` holds the saliency mask after ``train`` (parameter name -> bool tensor).
    """

    config_class: ClassVar[type] = ANTConfig
    config: ANTConfig

    def lora_config(self, unet: nn.Module) -> Any:
        return lora_config(self.config.rank, self.config.lora_alpha, ant_lora_modules(unet))

    def setup(self, pipe: Any, state: Optional[dict] = None) -> None:
        config = self.config
        height, width = self.image_size(pipe)
        self.latent_shape = (config.batch_size, *self.latent_size(pipe))
        self.scheduler = self.ddim_scheduler(config.ddim_steps)
        self.prompts = encode_concept(pipe, config.concept, config.erase_from, height, width)
        self.mask = None
        if config.kind == "delta":
            if state is not None:
                self.mask = unpack_mask(state["mask"])
            else:
                augmentations = encode_prompts(pipe, augmentation_prompts(config), height, width)
                self.mask = self.saliency_mask(augmentations)

    # -- the trajectory and the loss ------------------------------------------------------------

    def draw_stops(self, generator: torch.Generator) -> tuple[int, int]:
        """(k+, k-): a random step of the kept phase and one of the erased phase."""
        config = self.config
        if config.keep_phase == "early":
            k_plus = int(torch.randint(0, config.before_step, (), generator=generator))
            k_minus = int(torch.randint(config.before_step, config.ddim_steps, (), generator=generator))
        else:  # the official single-concept script: the last before_step steps are kept
            split = config.ddim_steps - config.before_step
            k_minus = int(torch.randint(0, split, (), generator=generator))
            k_plus = int(torch.randint(split, config.ddim_steps, (), generator=generator))
        return k_plus, k_minus

    def sample_pairs(self, cond: Conditioning, generator: torch.Generator, steps: int) -> Trajectory:
        """A trajectory for ``steps`` steps: a pair of stops (k+, k-) per step (:meth:`draw_stops`), fresh noise, and
        one DDIM run from it with the model being trained through every stop."""
        stops = [self.draw_stops(generator) for _ in range(steps)]
        noise = torch.randn(self.latent_shape, generator=generator).to(self.device, self.unet.dtype)
        n = self.latent_shape[0]
        latents = ddim_latents(self.unet, self.scheduler, noise * self.scheduler.init_noise_sigma, cond.repeat(n),
                               self.prompts.empty.repeat(n), self.config.start_guidance,
                               [k for pair in stops for k in pair])
        return Trajectory({}, stops, latents)

    def pair(self, trajectory: Trajectory, place: int) -> tuple[torch.Tensor, ...]:
        """(x+, t+, x-, t-) of the step at ``place`` in ``trajectory``."""
        k_plus, k_minus = trajectory.stops[place]
        timesteps = self.scheduler.timesteps
        return trajectory.latents[k_plus], timesteps[k_plus], trajectory.latents[k_minus], timesteps[k_minus]

    def sample_pair(self, cond: Conditioning, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(x+, t+, x-, t-): one DDIM run from fresh noise with the model being trained, through a random step of
        the kept phase (x+) and one of the erased phase (x-)."""
        return self.pair(self.sample_pairs(cond, generator, 1), 0)

    def loss(self, model: nn.Module, cond: Conditioning, generator: torch.Generator,
             concept: Optional[Conditioning] = None, pair: Optional[tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        """The ANT loss of one trajectory pair for the conditioning ``cond``: the concept itself, or a prompt that
        names it (``c_from``) with ``concept`` the concept's own conditioning, whose direction is kept (eta 1) or
        enhanced early and reversed late. ``pair``: (x+, t+, x-, t-) sampled from ``cond`` already; None: sampled
        here (:meth:`sample_pair`, from ``generator``)."""
        config = self.config
        x_plus, t_plus, x_minus, t_minus = pair if pair is not None else self.sample_pair(cond, generator)
        n = x_plus.shape[0]
        x = torch.cat([x_plus, x_minus, x_plus, x_minus])  # rows: [+ c, - c, + "", - ""]
        t = torch.cat([t_plus.expand(n), t_minus.expand(n)]).repeat(2)
        rows = Conditioning.cat([cond.repeat(2 * n), self.prompts.empty.repeat(2 * n)])
        teacher_x, teacher_t, teacher_rows = x, t, rows
        if concept is not None:  # in context, the teacher also sees the concept itself at x+ and x-
            teacher_x, teacher_t = torch.cat([x, x_plus, x_minus]), torch.cat([t, t[: 2 * n]])
            teacher_rows = Conditioning.cat([rows, concept.repeat(2 * n)])
        with torch.no_grad(), self.frozen_teacher() as teacher:  # one batched call for the teacher rows
            c_plus, c_minus, u_plus, u_minus, *concept_rows = predict(teacher, teacher_x, teacher_t,
                                                                      teacher_rows).split(n)
        s_plus, s_minus, su_plus, su_minus = predict(model, x, t, rows).chunk(4)
        if concept is None:  # early: guided towards the concept (eta > 0 enhances it); late: away from it
            enhance = mse(s_plus, esd_target(u_plus, c_plus, u_plus, -config.eta))
            erase = mse(s_minus, esd_target(u_minus, c_minus, u_minus, config.eta))
        else:  # the paper's targets with c_from less the concept's direction in place of eps*("")
            concept_plus, concept_minus = concept_rows
            enhance = mse(s_plus, esd_target(c_plus, concept_plus, u_plus, 1 - config.eta))
            erase = mse(s_minus, esd_target(c_minus, concept_minus, u_minus, config.eta + 1))
        a1, a2 = config.enhance_weight, config.uncond_weight
        return erase + a2 * mse(su_minus, u_minus) + a1 * (enhance + a2 * mse(su_plus, u_plus))

    def sample_trajectory(self, steps: int) -> Trajectory:
        """A trajectory for ``steps`` steps (:meth:`~unsee.erasure.Trainer.trajectory`): the prompt drawn (a
        ``c_from``, or the concept), then :meth:`sample_pairs` from it."""
        student, cond = self.prompts.draw(self.draw_index)
        trajectory = self.sample_pairs(cond, self.generator, steps)
        trajectory.draws["student"] = student
        return trajectory

    def training_step(self, step: int) -> torch.Tensor:
        trajectory, place = self.trajectory(step, self.sample_trajectory)
        cond = self.prompts.student(trajectory.draws["student"])
        concept = self.prompts.concept if self.prompts.contexts else None
        return self.loss(self.model, cond, self.generator, concept=concept, pair=self.pair(trajectory, place))

    # -- the augmentation-enhanced saliency mask ------------------------------------------------

    def saliency_mask(self, augmentations: Conditioning) -> dict[str, torch.Tensor]:
        """Per tensor, the top ``mask_fraction`` of ``|grad|`` of the ANT loss, intersected over augmentations."""
        config = self.config
        total = len(augmentations) * len(config.saliency_seeds)
        done = 0
        with self.candidate_gradients() as candidates:
            mask = {name: torch.ones(p.shape, dtype=torch.bool) for name, p in candidates.items()}
            for row in range(len(augmentations)):
                for seed in config.saliency_seeds:
                    generator = torch.Generator().manual_seed(int(seed))
                    for param in candidates.values():
                        param.grad = None
                    for _ in range(config.saliency_iterations):
                        self.loss(self.unet, augmentations.rows([row]), generator).backward()
                    for name, param in candidates.items():
                        mask[name] &= top_fraction_mask(param.grad, config.mask_fraction).cpu()
                    done += 1
                    self.report("setup", done, total, message="computing the saliency mask")
        return mask

    def extra_state(self) -> dict:
        return {"mask": pack_mask(self.mask)} if self.mask is not None else {}

    def training_summary(self) -> dict:
        summary: dict[str, Any] = {"before_step": self.config.before_step, "ddim_steps": self.config.ddim_steps,
                                   "erase_from": self.config.erase_from}
        if self.mask is not None:
            summary["mask_candidates"] = sum(int(m.numel()) for m in self.mask.values())
            summary["mask_kept"] = sum(int(m.sum()) for m in self.mask.values())
        return summary

