"""SPM: One-dimensional Adapter to Rule Them All (Lyu, Yang, Hong, Chen, Zhang, Ding, Han; CVPR 2024).

arXiv 2312.16145. A rank-1 LoRA ("semi-permeable membrane") on every Linear and Conv2d inside every
transformer block of the UNet (``proj_in``, ``proj_out``, the query/key/value/out projections of self- and
cross-attention, the feed-forward's two projections: 12 per block, 192 on SD 1.5), trained with

    L = MSE( eps_spm(x_t, c),  eps*(x_t, "") - g * (eps*(x_t, c) - eps*(x_t, "")) )            (erase, ESD form)
      + la_strength * mean_a MSE( eps_spm(x_t, a),  eps*(x_t, a) )                          (Latent Anchoring)

``eps*`` is the model with the adapter switched off. ``x_t`` is sampled by DDIM (``ddim_steps`` steps, CFG
``start_guidance``, prompt ``c``) with the adapter on, stopped after k ~ U{1..ddim_steps-1} steps. The anchors
``a`` are random text embeddings, not words: Gaussian vectors of the text-embedding shape, normalised, kept
with probability ``1 - cos(c, a)`` (so directions close to the concept are rarely anchored), rescaled to
``|c| * U(0.8, 1.2)``.

``erase_from`` (not in the paper; None by default) erases the concept in context, as ESD's option of that name
does: each step draws one of these prompts, ``c_from`` ("a red circle on black"), samples x_t from it, and trains
``eps_spm(x_t, c_from)`` towards ``eps*(x_t, c_from) - g * (eps*(x_t, c) - eps*(x_t, ""))``. A small text encoder
can embed the bare word far from the prompts that use it (``docs/erasure-notes.md``).

``preserve`` (not in the paper; empty by default) anchors real prompts as well as random embeddings: each step draws
one, p, and adds its row to the Latent Anchoring term (``eps_spm(x_t, p)`` towards ``eps*(x_t, p)``, at the same
x_t, weighed as one more anchor). On the toy model erasing "red" drew other colours along (orange to yellow);
preserving prompts of the other colours keeps them (``docs/erasure-notes.md``).

At inference, Facilitated Transport (:func:`transport_strength`) scales each SPM by how much the prompt
relates to its erased concept: ``m = max(cos(E(prompt), E(concept)), token overlap)`` in [0, 1], with
``E`` the text encoder's last hidden states, flattened. unsee's pipelines apply it by themselves for SPM
adapters (``pipe.load_erasure(path)``); ``load_erasure(path, facilitated_transport=False)`` turns it off.

Deliberate differences from the official code (Con6924/SPM):

- every sampled anchor is used (``anchors``, default 4); the official code packs them with the
  unconditional embedding and, splitting the batch in half, trains on only two of the four;
- Facilitated Transport multiplies the adapter's *delta* by ``m`` (``W + m * scale * up @ down``); the
  official code multiplies each of down, up and alpha by ``m`` (an ``m^2``-scaled delta) and sums the
  tensors of several SPMs before loading, so (sum up_i)(sum down_j) has cross terms between SPMs; here
  several SPMs add their deltas, each with its own ``m``, and no cross terms;
- one batch of prompts gets one strength per SPM, the largest over its prompts (erasing whenever any
  prompt of the batch relates to the concept); ``prompt_embeds`` without text gets full strength;
- plain Adam with a constant learning rate (the trainer contract) instead of AdamW8bit with cosine restarts;
- the UNet is queried at exactly the noise level the sampler stopped at (the official code rounds to
  ``int(k * 1000 / ddim_steps)``);
- the file is a diffusers/peft LoRA (``lora_A`` = down, ``lora_B`` = up, rank and alpha in the header's
  ``lora_adapter_metadata``) that ``pipe.load_lora_weights`` reads, instead of kohya-style keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from unsee.pipelines.encoding import encode_text

from .conditioning import Conditioning, encode_concepts, encode_each
from .config import (CONCEPTS, ConceptsInContext, TrainerConfig, TrajectoryReuse, check_preserve_names_none,
                     for_concept)
from .errors import ConfigError
from .fields import (ERASE_FROM, FLAG, GUIDANCE, NUMBER, RANK, RESOLUTION, integer, number, per_concept, prompt_list,
                     setting)
from .registry import register_method
from .sampling import Trajectory, ddim_latents, esd_target, mse, predict
from .selectors import linear_modules, lora_config
from .trainer import Trainer

__all__ = ["SPMConfig", "SPMTrainer", "spm_modules", "transport_strength"]


@dataclass
class SPMConfig(ConceptsInContext, TrajectoryReuse, TrainerConfig):
    """SPM settings; defaults from the paper and its official configs (Lyu et al., CVPR 2024).

    Args:
        rank, alpha: the adapter's rank (1: "one-dimensional") and LoRA alpha (1.0).
        steps: iterations (3000). lr: learning rate (1e-4).
        guidance: the erase term's negative guidance g (1.0); with ``concepts``, a list gives each concept its own
            (``concept`` first).
        la_strength: weight of the Latent Anchoring term (1000).
        anchors: random anchor embeddings per step (4; 0: no Latent Anchoring).
        start_guidance: CFG scale of the DDIM run that samples x_t (3).
        ddim_steps: DDIM steps of that run (30); it stops after k ~ U{1..ddim_steps-1} of them.
        resolution: image size of the sampled x_t (None: the pipeline's default).
        facilitated_transport: stored in the adapter; unsee pipelines then scale it per prompt (True).
        erase_from: prompts that name the concept, to erase it from in context (one drawn per step; see the
            module docstring); None: the bare concept (the paper).
        concepts: more concepts erased by the same adapter (not in the paper; default none): each step draws one of
            ``concept`` and ``concepts`` (in cycles through them all, each cycle shuffled from the seed, so every
            concept gets as many steps as the others, within one) and trains on it, its anchors drawn
            around it; with ``erase_from`` each prompt there goes to the concept it names (it must name one).
            Facilitated Transport then scales the adapter by the prompt's relation to the closest of them. One
            concept draws nothing: a single-concept run is what it always was.
        preserve: prompts anchored as they are (not in the paper; empty by default): every step draws one and adds
            it to the Latent Anchoring term as one more anchor (see the module docstring). A prompt that names an
            erased concept is refused.
        trajectory_reuse: training steps one DDIM run serves (1; see
            :class:`~unsee.erasure.config.TrajectoryReuse`): the prompt drawn (``erase_from``, the concept of
            ``concepts``) stays the run's; the anchors and the preserved prompt are drawn every step.
    """

    steps: int = 3000
    lr: float = 1e-4
    rank: int = setting(1, RANK)
    alpha: float = setting(1.0, number(nonzero=True))
    guidance: Union[float, tuple[float, ...]] = setting(1.0, per_concept(NUMBER))
    la_strength: float = setting(1000.0, number(low=0))
    anchors: int = setting(4, integer(0, limits=(0, 256)))
    start_guidance: float = setting(3.0, GUIDANCE)
    ddim_steps: int = setting(30, integer(2, limits=(2, 1000)))
    resolution: Optional[int] = setting(None, RESOLUTION)
    facilitated_transport: bool = setting(True, FLAG)
    erase_from: Union[str, tuple[str, ...], None] = setting(None, ERASE_FROM)
    concepts: tuple[str, ...] = setting((), CONCEPTS, says="a list of non-empty concepts (erased with concept by one "
                                                          "adapter)")
    preserve: tuple[str, ...] = setting((), prompt_list(allow_empty=True, as_tuple=True))

    method: ClassVar[str] = "spm"
    text_kv_only: ClassVar[bool] = False  # a LoRA on every layer of the transformer blocks

    def validate(self) -> None:
        super().validate()
        check_preserve_names_none(self.preserve, self.erased)


def spm_modules(unet: nn.Module) -> list[str]:
    """Names of every Linear and Conv2d inside the UNet's transformer blocks (``isinstance``, not class names)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return linear_modules(unet, inside=Transformer2DModel)


@register_method("spm", summary="SPM: a rank-1 LoRA membrane trained with ESD's target and latent anchoring")
class SPMTrainer(Trainer):
    """Trains an SPM adapter. ``SPMTrainer(SPMConfig(concept="circle")).train(pipe)``."""

    config_class: ClassVar[type] = SPMConfig
    config: SPMConfig
    #: the last step's two loss terms (before weighting): {"erase": ..., "anchor": ...}
    last_terms: dict[str, float] = {}
    #: the adapted modules' names (set when the adapter is attached)
    modules: list[str] = []

    @property
    def output_kind(self) -> str:
        return "lora"

    def lora_config(self, unet: nn.Module) -> Any:
        modules = self.modules = spm_modules(unet)
        if not modules:
            raise ConfigError("this UNet has no transformer blocks for SPM to attach to")
        # peft's default init is SPM's: down Kaiming-uniform, up zero (the adapter starts as the identity)
        return lora_config(self.config.rank, self.config.alpha, modules, init=True)

    def setup(self, pipe: Any, state: Optional[dict] = None) -> None:
        height, width = self.image_size(pipe)
        self.latent_shape = (1, *self.latent_size(pipe))
        # one conditioning per erased concept; self.prompts is the one the step drew
        self.concept_prompts = encode_concepts(pipe, self.config.erased, self.config.erase_from, height, width)
        self.prompts, self.concept_index = self.concept_prompts[0], 0
        self.concept_draws = list((state or {}).get("concept_draws") or [0] * len(self.concept_prompts))
        self.scheduler = self.ddim_scheduler(self.config.ddim_steps)
        self.cond_preserve = encode_each(pipe, self.config.preserve, height, width)

    def sample_anchors(self, n: int) -> Conditioning:
        """``n`` random anchor embeddings (rejection-sampled away from the concept, scaled to its norm)."""
        target = self.prompts.concept.embeds[0].float().cpu()
        direction = target.flatten() / target.norm()
        anchors = []
        while len(anchors) < n:
            noise = torch.randn(target.numel(), generator=self.generator)
            noise = noise / noise.norm()
            keep_probability = 1.0 - float(noise @ direction)
            if float(torch.rand((), generator=self.generator)) < keep_probability:
                scale = float(torch.empty(()).uniform_(0.8, 1.2, generator=self.generator))
                anchors.append((noise * target.norm() * scale).reshape(target.shape))
        embeds = torch.stack(anchors).to(self.device, self.prompts.concept.embeds.dtype)
        empty = self.prompts.empty.repeat(n)  # SDXL: the anchors replace the token embeddings only
        return Conditioning(embeds, empty.pooled, empty.time_ids)

    def draw_concept(self, position: int) -> None:
        """Several concepts: choose the concept of trajectory ``position`` (with ``trajectory_reuse`` 1, the step;
        :meth:`~unsee.erasure.Trainer.cycle_index`: every concept equally often, in an order shuffled from the seed;
        the run's generator is not used), count it for this step and make it :attr:`prompts`."""
        index = self.cycle_index(position, len(self.concept_prompts))
        self.concept_draws[index] += 1
        self.prompts, self.concept_index = self.concept_prompts[index], index

    def sample_trajectory(self, steps: int) -> Trajectory:
        """A trajectory for ``steps`` steps (:meth:`~unsee.erasure.Trainer.trajectory`): the student's prompt drawn
        (a ``c_from``, or the concept), a stop k ~ U{1..ddim_steps-1} per step, fresh noise, and one DDIM run
        through every stop with the adapter on (the model being trained)."""
        student, cond_student = self.prompts.draw(self.draw_index)
        stops = [int(self.randint(1, self.config.ddim_steps)) for _ in range(steps)]
        noise = self.randn(*self.latent_shape) * self.scheduler.init_noise_sigma
        latents = ddim_latents(self.unet, self.scheduler, noise, cond_student, self.prompts.empty,
                               self.config.start_guidance, stops)
        return Trajectory({"student": student}, [(k,) for k in stops], latents)

    def training_step(self, step: int) -> torch.Tensor:
        config = self.config
        self.draw_concept(self.trajectory_number(step))
        # rows: (the trajectory's c_from when erasing in context), c, "", then the anchors and the preserved prompt
        # drawn; the student erases on row 0
        trajectory, place = self.trajectory(step, self.sample_trajectory)
        cond_student = self.prompts.student(trajectory.draws["student"])
        in_context = bool(self.prompts.contexts)
        o = 1 if in_context else 0  # the row of c
        (k,) = trajectory.stops[place]
        x_t, t = trajectory.latents[k], self.scheduler.timesteps[k]
        parts = ([cond_student] if in_context else []) + [self.prompts.concept, self.prompts.empty]
        if config.anchors:
            parts.append(self.sample_anchors(config.anchors))
        if self.cond_preserve:
            parts.append(self.cond_preserve[self.draw_index(len(self.cond_preserve))])
        anchored = len(parts) > o + 2
        rows = Conditioning.cat(parts)
        x = x_t.repeat(len(rows), 1, 1, 1)
        with torch.no_grad(), self.frozen_teacher() as teacher:
            frozen = predict(teacher, x, t, rows)
        # the paper's target anchors at "" (in context: at c_from's own prediction)
        eps_c, eps_empty = frozen[o:o + 1], frozen[o + 1:o + 2]
        target = esd_target(frozen[0:1] if in_context else eps_empty, eps_c, eps_empty,
                            for_concept(config.guidance, self.concept_index))
        # the student sees the teacher's exact batch, so at initialisation (up = 0) both agree bit for bit
        student = predict(self.model, x, t, rows)
        erase = mse(student[0:1], target)
        anchor = mse(student[o + 2:], frozen[o + 2:]) if anchored else torch.zeros((), device=erase.device)
        self.last_terms = {"erase": float(erase.detach()), "anchor": float(anchor.detach())}
        return erase + config.la_strength * anchor

    def extra_state(self) -> dict:
        return {"concept_draws": list(self.concept_draws)} if len(self.concept_draws) > 1 else {}

    def training_summary(self) -> dict:
        summary = {"modules": len(self.modules), "rank": self.config.rank}
        if len(self.config.erased) > 1:  # how many steps (draws) trained on each concept, in this process
            summary["concept_draws"] = dict(zip(self.config.erased, self.concept_draws))
        return summary


# ----------------------------------------------------------------------------------------------
# Facilitated Transport
# ----------------------------------------------------------------------------------------------


def _hidden_states(pipe: Any, texts: Sequence[str]) -> torch.Tensor:
    """The text encoder's last hidden states for ``texts`` as the pipeline encodes prompts, flattened per text."""
    with torch.no_grad():
        embeds, _ = encode_text(pipe, texts, pipe.unet.device)
    return embeds.float().flatten(1)


def _tokens(pipe: Any, text: str) -> set[int]:
    special = set(pipe.tokenizer.all_special_ids)
    return {i for i in pipe.tokenizer(text).input_ids if i not in special}


def transport_strength(pipe: Any, prompts: Sequence[str], concepts: Sequence[str]) -> float:
    """Facilitated Transport's strength for an SPM erasing ``concepts``, given a batch of ``prompts``.

    For each prompt p and concept e: ``max(cos(E(p), E(e)), |tokens(p) & tokens(e)| / |tokens(e)|)``, with E
    the text encoder's last hidden states (flattened) and special tokens left out; clipped to [0, 1]. The
    strength is the largest over the prompts and concepts: 1 for a prompt that is the concept itself.
    """
    prompts, concepts = list(prompts), list(concepts)
    if not prompts or not concepts:
        return 1.0
    states = _hidden_states(pipe, prompts + concepts)
    cos = F.cosine_similarity(states[: len(prompts), None], states[None, len(prompts):], dim=-1)
    best = 0.0
    for i, prompt in enumerate(prompts):
        words = _tokens(pipe, prompt)
        for j, concept in enumerate(concepts):
            target = _tokens(pipe, concept)
            overlap = len(words & target) / len(target) if target else 0.0
            best = max(best, float(cos[i, j]), overlap)
    return min(1.0, max(0.0, best))


# Facilitated Transport at inference: unsee pipelines scale an SPM adapter by this strength for each call's prompts
# (an installed unsee also declares it as the "unsee.prompt_scales" entry point "spm", for users who never import
# unsee.erasure).
from unsee.pipelines.erasure import register_prompt_scale  # noqa: E402

register_prompt_scale("spm", transport_strength)
