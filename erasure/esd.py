"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzyńska, Fiotto-Kaufman, Bau; ICCV 2023).

arXiv 2303.07345, https://erasing.baulab.info. The UNet is fine-tuned so that, for the concept ``c``,
it predicts what the frozen original model predicts when guided *away* from ``c``:

    L = MSE( eps_theta(x_t, c, t),  eps*(x_t, a, t) - eta * (eps*(x_t, c, t) - eps*(x_t, "", t)) )

with ``eps*`` the frozen original model (no gradients), ``eta`` the negative guidance and ``a`` the anchor:
``""`` in the paper (its Eq. 3), so at step 0 the loss is ``(1 + eta)^2 * mean((eps*(c) - eps*(""))^2)``.
``anchor="concept"`` uses ``a = c`` as the official diffusers rewrite does (loss ``eta^2 * ...`` at step 0,
zero for ``eta = 0``); that rewrite's ``negative_guidance=2`` is the paper's ``eta = 1``.
``erase_from`` erases an attribute from one concept ("hat" from "cowboy"): the student and the anchor
see ``c_from``, the guidance direction is the erased concept's. A list of ``erase_from`` prompts draws one
per step: erasing "striped" from many prompts that contain it ("a striped green triangle", ...) reaches the
concept in context, where a small text encoder's embedding of the bare word alone may not.

``x_t`` is sampled as in the paper: a DDIM run (``ddim_steps`` steps, classifier-free guidance
``start_guidance``, prompt ``c`` or ``c_from``) from fresh noise *with the model being trained*, stopped
at a random step ``k``; the UNet is then queried at that step's timestep. ``sample_with="frozen"``
samples with the original model instead (the official 2025 rewrite). ``trajectory_reuse`` (not in the paper; 1 by
default) lets one DDIM run serve several consecutive steps, each at its own stop of it.

Variants (which parameters are trained; Linear and Conv2d modules, names as in diffusers'
``UNet2DConditionModel``; the official rewrite's rules, except ``esd-u``, which keeps the paper's code's rule
``noxattn``, without the rewrite's ``conv_out`` and time embedding):

=================  ============================================================================
``esd-x``          every Linear/Conv2d inside a cross-attention module (``attn2``): for styles
``esd-u``          every Linear/Conv2d outside the cross-attention modules except the output conv
                   (``conv_out``) and the time embedding: for objects, nudity
``esd-all``        every Linear/Conv2d
``esd-x-strict``   only ``attn2.to_k`` and ``attn2.to_v``
=================  ============================================================================

On SDXL UNets ``esd-u`` and ``esd-all`` additionally keep only modules inside the down/mid/up blocks
whose names do not contain ``emb`` (the official SDXL script's rule; it calls them experimental).
Norm layers are never trained. ``kind="lora"`` trains a LoRA of rank ``rank`` on the same modules
instead of the full weights (teacher: the adapter disabled).

The loss is taken on the UNet's raw outputs (v on v-prediction models) unless ``loss_space="epsilon"``: the
paper's loss on noise predictions; :mod:`unsee.erasure.sampling` explains how the two weigh timesteps.

Deliberate differences from the official code (each documented in the config):
the query timestep is exactly the noise level the sampler stopped at (the CompVis code draws a timestep
1-2 steps off); the paper's defaults (eta 1, lr 1e-5, 1000 iterations, fp32) rather than the rewrite's;
the teacher is the same UNet with the original weights swapped in, not a second copy; its three (or two)
predictions are one batched UNet call. Why ``esd-u`` keeps the paper's rule: ``docs/erasure-notes.md``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from .conditioning import Conditioning, encode_concepts, encode_each
from .config import CONCEPTS, ConceptsInContext, TrainerConfig, TrajectoryReuse, erase_from_prompts, for_concept
from .fields import (BATCH_SIZE, DDIM_STEPS, ERASE_FROM, GUIDANCE, LORA_ALPHA, LOSS_SPACE, NUMBER, OUTPUT_KIND, RANK,
                     RESOLUTION, choice, number, per_concept, prompt_list, setting)
from .registry import register_method
from .sampling import Trajectory, ddim_latents, esd_target, mse, predict
from .selectors import linear_modules, lora_config, module_parameters
from .trainer import Trainer

__all__ = ["ESD_VARIANTS", "ESDConfig", "ESDTrainer", "esd_modules", "esd_parameters"]

ESD_VARIANTS = ("esd-x", "esd-u", "esd-all", "esd-x-strict")
VARIANT = choice(ESD_VARIANTS, message="unknown ESD variant {value}; choose one of " + ", ".join(ESD_VARIANTS))
ANCHORS = ("unconditional", "concept")
SAMPLERS = ("trained", "frozen")


@dataclass
class ESDConfig(ConceptsInContext, TrajectoryReuse, TrainerConfig):
    """ESD settings; defaults from the paper (Gandikota et al., ICCV 2023) and its original code.

    Args:
        variant: ``esd-x``, ``esd-u``, ``esd-all`` or ``esd-x-strict`` (see the module docstring). The paper
            uses ESD-x for artistic styles and ESD-u for objects and nudity.
        concepts: more concepts erased by the same adapter (not in the paper; default none): each step draws one of
            ``concept`` and ``concepts`` (in cycles through them all, each cycle shuffled from the seed, so every
            concept gets as many steps as the others, within one) and trains on it; with ``erase_from``
            each prompt there goes to the concept it names (it must name one). One concept draws nothing: a
            single-concept run is what it always was.
        erase_from: erase ``concept`` only from this concept ("hat" from "cowboy"), or from each of a list of
            prompts (one drawn per step); None: everywhere.
        eta: negative guidance (paper: 1.0); with ``concepts``, a list gives each concept its own (in the order
            ``concept``, then ``concepts``).
        anchor: ``"unconditional"`` (the paper) or ``"concept"`` (the official diffusers rewrite; with it
            ``eta`` = paper eta + 1). With ``erase_from`` the anchor is always ``c_from``.
        steps: iterations (paper code: 1000). lr: Adam learning rate (paper code: 1e-5).
        start_guidance: CFG scale of the DDIM run that samples x_t (3).
        ddim_steps: DDIM steps of that run (50); it stops after a uniformly random number of them.
        sample_with: ``"trained"`` (the paper: the model being fine-tuned) or ``"frozen"`` (the original model;
            with ``trajectory_reuse`` > 1 and no ``erase_from``, the run's own predictions at the stops it steps on
            from serve as the teacher's there, so only the deepest stop of a run asks the teacher).
        batch_size: x_t samples per step (1).
        resolution: image size of the sampled x_t (None: the pipeline's default, 512 for SD 1.x).
        kind: ``"delta"`` (full-weight deltas of the trained tensors) or ``"lora"``.
        rank, lora_alpha: LoRA rank and alpha (alpha None: equal to the rank, i.e. scaling 1).
        preserve: prompts whose predictions are kept (not in the paper; empty by default): every step draws one,
            p, samples its own x_t' (same DDIM run and stop as x_t) and adds ``preserve_weight`` times
            MSE(eps_theta(x_t', p, t), eps*(x_t', p, t)). Erasing "red" from a small model can drag its neighbour
            "orange" along; preserving orange prompts keeps it. The term is 0 at the first step.
        preserve_weight: weight of that term (1.0).
        loss_space: ``"output"`` (the UNet's raw output: v on v-prediction models such as SD 2.x-v) or
            ``"epsilon"`` (noise predictions, the paper's loss); identical on epsilon-prediction models.
        trajectory_reuse: training steps one DDIM run serves (1; see
            :class:`~unsee.erasure.config.TrajectoryReuse`): the prompts drawn (``erase_from``, ``preserve``, the
            concept of ``concepts``) stay those of the run; the teacher's predictions at every stop of a run come from
            one batched call, made at the run's first step.
    """

    variant: str = setting("esd-u", VARIANT)
    concepts: tuple[str, ...] = setting((), CONCEPTS, says="a list of non-empty concepts (erased with concept by one "
                                                          "adapter)")
    erase_from: Union[str, tuple[str, ...], None] = setting(None, ERASE_FROM)
    eta: Union[float, tuple[float, ...]] = setting(1.0, per_concept(NUMBER), label="negative guidance")
    anchor: str = setting("unconditional", choice(ANCHORS))
    steps: int = 1000
    lr: float = 1e-5
    start_guidance: float = setting(3.0, GUIDANCE)
    ddim_steps: int = setting(50, DDIM_STEPS)
    sample_with: str = setting("trained", choice(SAMPLERS))
    batch_size: int = setting(1, BATCH_SIZE)
    resolution: Optional[int] = setting(None, RESOLUTION)
    kind: str = setting("delta", OUTPUT_KIND)
    rank: int = setting(4, RANK)
    lora_alpha: Optional[float] = setting(None, LORA_ALPHA)
    preserve: tuple[str, ...] = setting((), prompt_list(allow_empty=True, as_tuple=True))
    preserve_weight: float = setting(1.0, number(low=0))
    loss_space: str = setting("output", LOSS_SPACE)

    @property
    def method(self) -> str:  # type: ignore[override]
        return self.variant

    @property
    def erase_from_prompts(self) -> tuple[str, ...]:
        """``erase_from`` as a tuple of prompts (empty: erase everywhere)."""
        return erase_from_prompts(self.erase_from)

    @property
    def text_kv_only(self) -> bool:  # type: ignore[override]
        return self.variant == "esd-x-strict"



def esd_modules(unet: nn.Module, variant: str) -> list[str]:
    """Names of the Linear/Conv2d modules an ESD variant trains, in ``named_modules`` order."""
    variant = VARIANT.check("variant", variant)
    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"

    def keep(name: str) -> bool:
        if variant == "esd-x":
            chosen = "attn2" in name
        elif variant == "esd-x-strict":
            chosen = "attn2.to_k" in name or "attn2.to_v" in name
        elif variant == "esd-u":  # the paper's code: neither the output conv nor the time embedding
            chosen = "attn2" not in name and not name.startswith(("conv_out", "time_embedding"))
        else:  # esd-all
            chosen = True
        if sdxl and variant in ("esd-u", "esd-all"):
            chosen = chosen and "block" in name and "emb" not in name
        return chosen

    return linear_modules(unet, keep)


def esd_parameters(unet: nn.Module, variant: str) -> dict[str, nn.Parameter]:
    """The parameters (weights and biases) of :func:`esd_modules`, full name -> parameter."""
    return module_parameters(unet, esd_modules(unet, variant))


class ESDTrainer(Trainer):
    """Trains an ESD adapter. ``ESDTrainer(ESDConfig(concept="circle", variant="esd-u")).train(pipe)``."""

    config_class: ClassVar[type] = ESDConfig
    config: ESDConfig

    def select_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        return esd_parameters(unet, self.config.variant)

    def lora_config(self, unet: nn.Module) -> Any:
        return lora_config(self.config.rank, self.config.lora_alpha, esd_modules(unet, self.config.variant))

    def setup(self, pipe: Any, state: Optional[dict] = None) -> None:
        config = self.config
        height, width = self.image_size(pipe)
        self.latent_shape = (config.batch_size, *self.latent_size(pipe))
        # one conditioning per erased concept; self.prompts is the one the step drew (concept_index)
        self.concept_prompts = encode_concepts(pipe, config.erased, config.erase_from, height, width)
        self.concept_index = 0
        self.concept_draws = list((state or {}).get("concept_draws") or [0] * len(self.concept_prompts))
        self.cond_preserve = encode_each(pipe, config.preserve, height, width)
        self.scheduler = self.ddim_scheduler(config.ddim_steps)

    def sample_trajectory(self, steps: int) -> Trajectory:
        """A trajectory for ``steps`` steps (:meth:`~unsee.erasure.Trainer.trajectory`): the student's prompt (a
        ``c_from`` drawn, or the concept) and the preserved prompt drawn, a stop k ~ U{0..ddim_steps-1} per step,
        fresh noise, and one DDIM run through every stop: x_t from the student's prompt and, in the same batch,
        x_keep from the preserved prompt.

        With ``sample_with="frozen"`` and the bare concept as the student's prompt, the run's own predictions at
        the stops it steps on from are the frozen model's predictions the loss needs there (c and "" at x_t, the
        preserved prompt at x_keep): they are kept in the trajectory instead of being asked for again."""
        student, _ = self.prompts.draw(self.draw_index)
        keep = self.draw_index(len(self.cond_preserve)) if self.cond_preserve else None
        stops = [int(self.randint(0, self.config.ddim_steps)) for _ in range(steps)]
        batch = self.latent_shape[0]
        rows = [self.prompts.student(student)] + ([self.cond_preserve[keep]] if keep is not None else [])
        noise = self.randn(batch * len(rows), *self.latent_shape[1:]) * self.scheduler.init_noise_sigma
        frozen = self.config.sample_with == "frozen"
        sampler = self.frozen_teacher() if frozen else contextlib.nullcontext(self.unet)
        outputs: Optional[dict[int, torch.Tensor]] = {} if frozen and rows[0] is self.prompts.concept else None
        with sampler as unet:
            latents = ddim_latents(unet, self.scheduler, noise, Conditioning.cat([c.repeat(batch) for c in rows]),
                                   self.prompts.empty.repeat(len(noise)), self.config.start_guidance, stops,
                                   outputs=outputs)
        trajectory = Trajectory({"student": student, "keep": keep}, [(k,) for k in stops], latents)
        for k, out in (outputs or {}).items():  # rows: [student, (kept)] with their prompts, then with ""
            x, t = latents[k], self.scheduler.timesteps[k]
            view = self.loss_view(out, torch.cat([x, x]), t, self.scheduler)
            eps_c, eps_empty = view[:batch], view[len(noise):len(noise) + batch]
            trajectory.frozen[k] = {"concept": eps_c, "empty": eps_empty, "from": None,
                                    "kept": view[batch:len(noise)] if keep is not None else None}
        return trajectory

    def sample_xt(self, trajectory: Trajectory, place: int
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(x_t, x_keep, t) of the step at ``place`` in ``trajectory``: the run's latents at the step's stop k,
        t = timesteps[k]; x_keep is None without a preserved prompt."""
        (k,) = trajectory.stops[place]
        x, batch = trajectory.latents[k], self.latent_shape[0]
        return x[:batch], (x[batch:] if trajectory.draws["keep"] is not None else None), self.scheduler.timesteps[k]

    @torch.no_grad()
    def frozen_predictions(self, x_t: torch.Tensor, t: torch.Tensor, cond_student: Optional[Conditioning] = None,
                           x_keep: Optional[torch.Tensor] = None, cond_keep: Optional[Conditioning] = None
                           ) -> dict[str, Optional[torch.Tensor]]:
        """The frozen model's predictions the loss needs at (x_t, t), in the loss space, from one batched call:
        ``concept`` and ``empty`` (c and ""), ``from`` (``cond_student``'s when it is a c_from, else None) and
        ``kept`` (the preserved prompt's at x_keep, else None). ``t`` is one timestep, or one per row of ``x_t``
        (x_keep's rows then take those of x_t: several stops of a trajectory in one call)."""
        n = x_t.shape[0]
        concept, empty = self.prompts.concept, self.prompts.empty
        erasing_from = cond_student is not None and cond_student is not concept
        rows = Conditioning.cat([concept, empty] + ([cond_student] if erasing_from else []))
        teacher_x, teacher_cond = x_t.repeat(len(rows), 1, 1, 1), rows.repeat(n)
        per_row = torch.is_tensor(t) and t.ndim > 0
        teacher_t = t.repeat(len(rows)) if per_row else t
        if x_keep is not None:  # the preserved prompt's rows ride along in the same call
            teacher_x = torch.cat([teacher_x, x_keep])
            teacher_cond = Conditioning.cat([teacher_cond, cond_keep.repeat(n)])
            teacher_t = torch.cat([teacher_t, t]) if per_row else t
        with self.frozen_teacher() as teacher:
            # rows [c, "", (c_from)] at x_t, then the preserved prompt at x_keep; in the loss space: the raw
            # outputs, or the noise predictions they stand for
            out = self.loss_view(predict(teacher, teacher_x, teacher_t, teacher_cond), teacher_x, teacher_t,
                                 self.scheduler)
        outs = out[: n * len(rows)].chunk(len(rows))
        return {"concept": outs[0], "empty": outs[1], "from": outs[2] if erasing_from else None,
                "kept": out[n * len(rows):] if x_keep is not None else None}

    def loss(self, x_t: torch.Tensor, t: torch.Tensor, cond_student: Optional[Conditioning] = None,
             x_keep: Optional[torch.Tensor] = None, cond_keep: Optional[Conditioning] = None, *,
             frozen: dict[str, Optional[torch.Tensor]]) -> torch.Tensor:
        """The ESD loss at (x_t, t): student on c (or ``cond_student``, a c_from) against the negatively guided
        teacher, whose predictions there are ``frozen`` (:meth:`frozen_predictions`); with ``x_keep``, plus
        ``preserve_weight`` times the student's error on the preserved prompt."""
        config = self.config
        n = x_t.shape[0]
        eps_c, eps_empty = frozen["concept"], frozen["empty"]
        if frozen["from"] is not None:
            anchor = frozen["from"]
        else:
            anchor = eps_empty if config.anchor == "unconditional" else eps_c
        target = esd_target(anchor, eps_c, eps_empty, for_concept(config.eta, self.concept_index))
        student_x = x_t
        student_cond = (cond_student if cond_student is not None else self.prompts.concept).repeat(n)
        if x_keep is not None:
            student_x = torch.cat([student_x, x_keep])
            student_cond = Conditioning.cat([student_cond, cond_keep.repeat(n)])
        student = self.loss_view(predict(self.model, student_x, t, student_cond), student_x, t, self.scheduler)
        loss = mse(student[:n], target)
        if x_keep is not None:
            loss = loss + config.preserve_weight * mse(student[n:], frozen["kept"])
        return loss

    @property
    def prompts(self) -> Conditioning:
        """The conditioning of the concept the step drew (:meth:`draw_concept`)."""
        return self.concept_prompts[self.concept_index]

    def draw_concept(self, position: int) -> None:
        """Several concepts: choose the concept of trajectory ``position`` (with ``trajectory_reuse`` 1, the step;
        :meth:`~unsee.erasure.Trainer.cycle_index`: every concept equally often, in an order shuffled from the seed;
        the run's generator is not used), count it for this step and make it :attr:`prompts`."""
        index = self.cycle_index(position, len(self.concept_prompts))
        self.concept_draws[index] += 1
        self.concept_index = index

    def training_step(self, step: int) -> torch.Tensor:
        self.draw_concept(self.trajectory_number(step))
        trajectory, place = self.trajectory(step, self.sample_trajectory)
        keep = trajectory.draws["keep"]
        cond_student = self.prompts.student(trajectory.draws["student"])
        cond_keep = self.cond_preserve[keep] if keep is not None else None
        x_t, x_keep, t = self.sample_xt(trajectory, place)
        # the frozen model's predictions at a stop of this run are the same for every step trained there
        (k,) = trajectory.stops[place]
        if self.trajectory_reuse > 1:
            self.teach_trajectory(trajectory, cond_student, cond_keep)
            frozen = trajectory.frozen[k]
        else:
            frozen = self.frozen_predictions(x_t, t, cond_student, x_keep, cond_keep)
        return self.loss(x_t, t, cond_student, x_keep, cond_keep, frozen=frozen)

    def teach_trajectory(self, trajectory: Trajectory, cond_student: Conditioning,
                         cond_keep: Optional[Conditioning]) -> None:
        """Ask the frozen model, in one batched call, for its predictions at every stop of ``trajectory`` that
        it does not hold yet (:meth:`frozen_predictions` with one timestep per row), and keep them there. Its
        weights do not change, so they serve every step the trajectory trains; one call for several stops costs less
        than one call per stop."""
        missing = sorted({k for (k,) in trajectory.stops} - trajectory.frozen.keys())
        if not missing:
            return
        batch = self.latent_shape[0]
        latents = [trajectory.latents[k] for k in missing]
        x_t = torch.cat([x[:batch] for x in latents])
        x_keep = torch.cat([x[batch:] for x in latents]) if cond_keep is not None else None
        t = torch.stack([self.scheduler.timesteps[k] for k in missing]).repeat_interleave(batch)
        frozen = self.frozen_predictions(x_t, t, cond_student, x_keep, cond_keep)
        for i, k in enumerate(missing):
            rows = slice(i * batch, (i + 1) * batch)
            trajectory.frozen[k] = {name: None if v is None else v[rows] for name, v in frozen.items()}

    def extra_state(self) -> dict:
        return {"concept_draws": list(self.concept_draws)} if len(self.concept_draws) > 1 else {}

    def training_summary(self) -> dict:
        summary = {"variant": self.config.variant, "erase_from": self.config.erase_from}
        if len(self.config.erased) > 1:  # how many steps (draws) trained on each concept, in this process
            summary["concept_draws"] = dict(zip(self.config.erased, self.concept_draws))
        return summary


_SUMMARIES = {
    "esd-x": "ESD-x: fine-tune the cross-attention layers (the paper's choice for artistic styles)",
    "esd-u": "ESD-u: fine-tune the layers outside cross-attention (the paper's choice for objects, nudity)",
    "esd-all": "ESD on every Linear/Conv2d layer of the UNet",
    "esd-x-strict": "ESD on the cross-attention keys and values only",
}
for _variant in ESD_VARIANTS:  # one name per variant, in this order; each fixes the config's variant
    register_method(_variant, summary=_SUMMARIES[_variant], fixed={"variant": _variant})(ESDTrainer)
