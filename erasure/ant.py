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
  -- by default the concept alone; with ``toy_world=True``, on the embedded toy model only, the concept and its
  synonyms in the toy world -- under each seed of ``saliency_seeds``) the
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
own prediction (kept, not enhanced). The saliency mask is still taken on the concept's own words. On the toy model
neither the bare word nor ``erase_from`` erased a style ("striped"), though the stripes form in the mid steps that
ANT erases: any early term, even the plain keep at eta 1 and of the first step alone, leaves 91-100% of the
stripes, also with every UNet weight trained; without it (``enhance_weight=0``) 0-34% (see ``erasure/presets.py``).
With the single-concept script's order (``keep_phase="late"``: the last steps kept, all before them erased) it
erases the style, and the toy preset for styles uses that order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from unsee import world

from .base import (
    OUTPUT_KINDS,
    ConfigError,
    Conditioning,
    TrainerConfig,
    _is_int,
    _is_number,
    _is_prompt_list,
    checked_erase_from,
    ddim_sample,
    encode_prompts,
    erase_from_prompts,
    fill_concept,
    gaussian_lora_config,
    mse,
    predict,
)
from .esd import ESD_VARIANTS
from .salun import SaliencyMaskedTrainer, pack_mask, top_fraction_mask, unpack_mask

__all__ = ["ANTConfig", "ANTTrainer", "ant_lora_modules", "augmentation_prompts"]

PARAMETER_SETS = ("full", *ESD_VARIANTS)
KEEP_PHASES = ("early", "late")


@dataclass
class ANTConfig(TrainerConfig):
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
            concept alone, or with ``toy_world`` the concept and its toy-world synonyms.
        saliency_seeds: the seeds of the augmentations (the official five).
        saliency_iterations: trajectories whose gradients are accumulated per augmentation (10).
        batch_size: trajectories per step (1). resolution: image size (None: the pipeline's default).
        erase_from: prompts that name the concept, to erase it from in context (one drawn per step; see the
            module docstring); None erases the concept's own words.
        toy_world: take the augmentations the config does not give from the toy shapes world (the concept's
            synonyms there); set by the ``toy`` preset for the embedded toy model, refused on any other model.
    """

    steps: int = 250
    lr: float = 5e-4
    eta: float = 1.0
    before_step: int = 7
    keep_phase: str = "early"
    ddim_steps: int = 50
    start_guidance: float = 3.0
    enhance_weight: float = 1.0
    uncond_weight: float = 0.5
    kind: str = "delta"
    rank: int = 4
    lora_alpha: Optional[float] = None
    parameters: str = "full"
    mask_fraction: float = 0.5
    saliency_prompts: Optional[list[str]] = None
    saliency_seeds: list[int] = field(default_factory=lambda: [24, 42, 98, 403, 3407])
    saliency_iterations: int = 10
    batch_size: int = 1
    resolution: Optional[int] = None
    erase_from: Union[str, tuple[str, ...], None] = None
    toy_world: bool = False

    method: ClassVar[str] = "ant"

    def validate(self) -> None:
        super().validate()
        for name in ("eta", "enhance_weight", "uncond_weight", "start_guidance"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("ddim_steps", "saliency_iterations", "batch_size", "rank"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.before_step) or not 1 <= self.before_step < self.ddim_steps:
            raise ConfigError(f"before_step must be an integer in [1, ddim_steps - 1] = [1, {self.ddim_steps - 1}] "
                              f"(both phases need steps), got {self.before_step!r}")
        if self.keep_phase not in KEEP_PHASES:
            raise ConfigError(f"keep_phase must be one of {', '.join(KEEP_PHASES)}, got {self.keep_phase!r}")
        if self.kind not in OUTPUT_KINDS:
            raise ConfigError(f"kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.kind!r}")
        if self.lora_alpha is not None and (not _is_number(self.lora_alpha) or self.lora_alpha == 0):
            raise ConfigError(f"lora_alpha must be a non-zero number or None, got {self.lora_alpha!r}")
        if self.parameters not in PARAMETER_SETS:
            raise ConfigError(f"parameters must be one of {', '.join(PARAMETER_SETS)}, got {self.parameters!r}")
        if not _is_number(self.mask_fraction) or not 0 < self.mask_fraction <= 1:
            raise ConfigError(f"mask_fraction must be in (0, 1], got {self.mask_fraction!r}")
        if self.saliency_prompts is not None and not _is_prompt_list(self.saliency_prompts):
            raise ConfigError(f"saliency_prompts must be a non-empty list of non-empty prompts or None, "
                              f"got {self.saliency_prompts!r}")
        if (isinstance(self.saliency_seeds, (str, bytes)) or not isinstance(self.saliency_seeds, (list, tuple))
                or not self.saliency_seeds or not all(_is_int(s) and s >= 0 for s in self.saliency_seeds)):
            raise ConfigError(f"saliency_seeds must be a non-empty list of non-negative integers, "
                              f"got {self.saliency_seeds!r}")
        if self.resolution is not None and (not _is_int(self.resolution) or self.resolution < 8):
            raise ConfigError(f"resolution must be an integer >= 8 or None, got {self.resolution!r}")
        self.erase_from = checked_erase_from(self.erase_from)
        if not isinstance(self.toy_world, bool):
            raise ConfigError(f"toy_world must be true or false, got {self.toy_world!r}")
        augmentation_prompts(self)  # raises ConfigError for toy_world with a concept outside the world


def augmentation_prompts(config: ANTConfig) -> list[str]:
    """The saliency augmentations' prompts: ``saliency_prompts`` (``{concept}`` filled in), else the concept
    alone, or with ``toy_world`` the concept and its toy-world synonyms."""
    if config.saliency_prompts is not None:
        return fill_concept(config.saliency_prompts, config.concept)
    prompts = [config.concept]
    if not config.toy_world:
        return prompts
    try:
        _, value = world.concept_attribute(config.concept)
    except ValueError:
        raise ConfigError(f"toy_world=True takes ANT's augmentations from the toy shapes world, and "
                          f"{config.concept!r} is not one of its concepts; pass saliency_prompts with "
                          "toy_world=False") from None
    for word in world.SYNONYMS.get(value, (value,)):
        if word != config.concept.strip().lower():
            prompts.append(word)
    return prompts


def ant_lora_modules(unet: nn.Module) -> list[str]:
    """Every Linear/Conv2d inside the UNet's down, mid and up blocks (the multi-concept LoRA's targets)."""
    return [name for name, module in unet.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and name.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")]


class ANTTrainer(SaliencyMaskedTrainer):
    """Trains an ANT adapter. ``ANTTrainer(ANTConfig(concept="circle")).train(pipe)``.

    With ``kind="delta"``, ``mask`` holds the saliency mask after ``train`` (parameter name -> bool tensor).
    """

    config_class: ClassVar[type] = ANTConfig
    config: ANTConfig

    def lora_config(self, unet: nn.Module) -> Any:
        return gaussian_lora_config(self.config.rank, self.config.lora_alpha, ant_lora_modules(unet))

    def setup(self, pipe: Any, state: Optional[dict] = None) -> None:
        config = self.config
        height, width = self.image_size(pipe)
        self.latent_shape = (config.batch_size, *self.latent_size(pipe))
        self.scheduler = self.ddim_scheduler(config.ddim_steps)
        froms = erase_from_prompts(config.erase_from)
        conditioning = encode_prompts(pipe, ["", config.concept] + list(froms), height, width)
        self.cond_empty, self.cond_concept = conditioning.rows([0]), conditioning.rows([1])
        self.cond_from = [conditioning.rows([2 + i]) for i in range(len(froms))]
        self.mask = None
        if config.kind == "delta":
            if state is not None:
                self.mask = unpack_mask(state["mask"])
            else:
                augmentations = encode_prompts(pipe, augmentation_prompts(config), height, width)
                self.mask = self.saliency_mask(augmentations)

    # -- the trajectory and the loss ------------------------------------------------------------

    def sample_pair(self, cond: Conditioning, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(x+, t+, x-, t-): one DDIM run from fresh noise with the model being trained, stopped at a random step of
        the kept phase (x+) and one of the erased phase (x-), whichever comes first, then continued to the other."""
        config = self.config
        if config.keep_phase == "early":
            k_plus = int(torch.randint(0, config.before_step, (), generator=generator))
            k_minus = int(torch.randint(config.before_step, config.ddim_steps, (), generator=generator))
        else:  # the official single-concept script: the last before_step steps are kept
            split = config.ddim_steps - config.before_step
            k_minus = int(torch.randint(0, split, (), generator=generator))
            k_plus = int(torch.randint(split, config.ddim_steps, (), generator=generator))
        noise = torch.randn(self.latent_shape, generator=generator).to(self.device, self.unet.dtype)
        n = self.latent_shape[0]
        cond, uncond = cond.repeat(n), self.cond_empty.repeat(n)
        first, second = sorted((k_plus, k_minus))
        x_first = ddim_sample(self.unet, self.scheduler, noise * self.scheduler.init_noise_sigma, cond, uncond,
                              config.start_guidance, stop_at=first)
        x_second = ddim_sample(self.unet, self.scheduler, x_first, cond, uncond, config.start_guidance,
                               stop_at=second, start_at=first)
        x_plus, x_minus = (x_first, x_second) if k_plus < k_minus else (x_second, x_first)
        return x_plus, self.scheduler.timesteps[k_plus], x_minus, self.scheduler.timesteps[k_minus]

    def loss(self, model: nn.Module, cond: Conditioning, generator: torch.Generator,
             concept: Optional[Conditioning] = None) -> torch.Tensor:
        """The ANT loss of one trajectory pair for the conditioning ``cond``: the concept itself, or a prompt that
        names it (``c_from``) with ``concept`` the concept's own conditioning, whose direction is kept (eta 1) or
        enhanced early and reversed late."""
        config = self.config
        x_plus, t_plus, x_minus, t_minus = self.sample_pair(cond, generator)
        n = x_plus.shape[0]
        x = torch.cat([x_plus, x_minus, x_plus, x_minus])  # rows: [+ c, - c, + "", - ""]
        t = torch.cat([t_plus.expand(n), t_minus.expand(n)]).repeat(2)
        rows = Conditioning.cat([cond.repeat(2 * n), self.cond_empty.repeat(2 * n)])
        teacher_x, teacher_t, teacher_rows = x, t, rows
        if concept is not None:  # in context, the teacher also sees the concept itself at x+ and x-
            teacher_x, teacher_t = torch.cat([x, x_plus, x_minus]), torch.cat([t, t[: 2 * n]])
            teacher_rows = Conditioning.cat([rows, concept.repeat(2 * n)])
        with torch.no_grad(), self.frozen_teacher() as teacher:  # one batched call for the teacher rows
            c_plus, c_minus, u_plus, u_minus, *concept_rows = predict(teacher, teacher_x, teacher_t,
                                                                      teacher_rows).split(n)
        s_plus, s_minus, su_plus, su_minus = predict(model, x, t, rows).chunk(4)
        if concept is None:
            enhance = mse(s_plus, u_plus + config.eta * (c_plus - u_plus))
            erase = mse(s_minus, u_minus - config.eta * (c_minus - u_minus))
        else:  # the paper's targets with c_from less the concept's direction in place of eps*("")
            concept_plus, concept_minus = concept_rows
            enhance = mse(s_plus, c_plus + (config.eta - 1) * (concept_plus - u_plus))
            erase = mse(s_minus, c_minus - (config.eta + 1) * (concept_minus - u_minus))
        a1, a2 = config.enhance_weight, config.uncond_weight
        return erase + a2 * mse(su_minus, u_minus) + a1 * (enhance + a2 * mse(su_plus, u_plus))

    def training_step(self, step: int) -> torch.Tensor:
        if self.cond_from:
            return self.loss(self.model, self.draw(self.cond_from), self.generator, concept=self.cond_concept)
        return self.loss(self.model, self.cond_concept, self.generator)

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

