"""AdvUnlearn: Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion Models
(Zhang, Chen, Jia, Zhang, Liu, Liu; NeurIPS 2024, arXiv 2405.15234).

The *text encoder* is fine-tuned (the UNet stays frozen) so that the concept's prompt, even behind an
adversarial prefix, conditions the UNet the way the original model's *negatively guided* prediction does,
while other prompts keep their original conditioning. Each step is a small bi-level game:

1. ``x_t``: a DDIM run (``ddim_steps``, CFG ``start_guidance``) from fresh noise with the original
   conditioning of the concept, stopped at a random step k; ``t = timesteps[k]``. The UNet is frozen, so the
   frozen model and the trained pipeline agree on everything but the text encoder.
2. Inner attack (after ``warmup`` steps): a continuous embedding ``delta`` of ``prefix_tokens`` (k) tokens put
   right after the start token of the concept's prompt; ``attack_steps`` Adam steps (lr ``attack_lr``)
   minimise ``MSE(eps(x_t, TE_theta([delta; c])), eps*(x_t, TE_0(c)))``: the prefix that best makes the
   current encoder regenerate the concept. ``delta`` starts from the embeddings of random vocabulary tokens.
3. Outer step on the encoder's weights theta:

       L = MSE(eps(x_t, TE_theta([delta; c])), eps*(x_t, "") - eta (eps*(x_t, c) - eps*(x_t, "")))
         + retain_weight * MSE(eps(x_r, TE_theta(r)), eps(x_r, TE_0(r)))

   over ``retain_batch`` retain prompts r (sampled the same way, with their own original conditioning).
   The retain term is exactly 0 at initialisation.

``erase_from`` (not in the paper; None by default) erases the concept in context, as ESD's option of that name
does: each step draws one of these prompts, ``c_from``, samples x_t from it, puts the adversarial prefix before it,
and trains towards ``eps*(x_t, c_from) - eta (eps*(x_t, c) - eps*(x_t, ""))``.

Trained parameters: the encoder layers by **exact index** (``layers``; default all of them plus the final
layer norm, the paper's ``text_encoder_full``); the token and position embeddings are never trained. The
adapter is a delta on ``text_encoder``: it plugs into any pipeline with the same text encoder.

Choices where the paper and the official code disagree or the code has bugs (documented, deliberate):

- layer selection by index: the official ``text_encoder_layer1`` matches names by prefix ``encoder.layers.1``
  and also trains layers 10 and 11;
- the retain term is added to the same step (the README's recipe ``retain_train=reg`` with weight 0.3), not
  the code default's separate retain iterations;
- the attack's gradients are cleared between its steps (the official loop never calls ``zero_grad``, so its
  Adam sees accumulated gradients); its losses are recorded (``last_attack_losses``);
- ``delta`` is re-drawn from random tokens at every attack (``attack_init="random"``, the README recipe;
  ``"latest"`` continues from the previous adversary);
- SD 1.x/2.x only: SDXL conditions on two encoders (train the first with a pipeline of your own if needed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional, Union

import torch
from torch import nn

from .conditioning import Conditioning, encode_concept, encode_prompts, is_sdxl
from .config import TrainerConfig, TrajectoryReuse, fill_concept
from .errors import ConfigError, TrainingError
from .fields import (DDIM_STEPS, ERASE_FROM, GUIDANCE, RESOLUTION, Kind, choice, integer, is_int, number, prompt_list,
                     setting)
from .registry import register_method
from .sampling import Trajectory, ddim_latents, esd_target, mse, predict
from .trainer import Trainer

__all__ = ["AdvUnlearnConfig", "AdvUnlearnTrainer", "COCO_OBJECTS", "encoder_layer_parameters", "prefix_embedding",
           "prefixed_ids", "token_ids"]

# The 80 COCO object classes: the official retain set is "a photo of <object>" over such a list.
COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
ATTACK_INITS = ("random", "latest")
#: encoder layers by index: one index, a non-empty list of them, or None (every layer and the final layer norm)
LAYERS = Kind("encoder layer indices such as [0, 1] (or None for all)",
              lambda v: v is None or (is_int(v) and v >= 0)
              or (isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(i) and i >= 0 for i in v)),
              normalise=lambda v: v if v is None else (v,) if isinstance(v, int) else tuple(v))


@dataclass
class AdvUnlearnConfig(TrajectoryReuse, TrainerConfig):
    """AdvUnlearn settings; defaults from the paper and its README recipe (Zhang et al., NeurIPS 2024).

    Args:
        steps: outer iterations (1000). lr: Adam learning rate of the encoder (1e-5).
        eta: negative guidance of the erasure target (1.0).
        start_guidance: CFG scale of the DDIM runs that produce x_t (3.0). ddim_steps: their length (50).
        warmup: first iterations trained on the plain prompt, without the attack (200).
        prefix_tokens: k, adversarial tokens put before the concept (1).
        attack_steps: Adam steps of the inner attack (30). attack_lr: its learning rate (1e-3).
        attack_init: ``"random"`` (vocabulary embeddings, each attack) or ``"latest"`` (the previous adversary).
        retain_weight: weight of the retain term (0.3, the README recipe). retain_batch: retain prompts per step (5).
        retain_prompts: prompts whose conditioning must not change (``{concept}`` is replaced by the concept);
            None: "a photo of a <COCO object>" (the official retain set).
        layers: encoder layer indices to train (exact indices; None: every layer and the final layer norm).
        resolution: image size for x_t (None: the pipeline's default).
        erase_from: prompts that name the concept, to erase it from in context (one drawn per step; see the
            module docstring); None: the bare concept (the paper).
        trajectory_reuse: training steps one pair of DDIM runs (the concept's and the retain prompts') serves (1;
            see :class:`~unsee.erasure.config.TrajectoryReuse`): the prompt (``erase_from``) and the retain prompts
            drawn stay the runs'; the attack runs every step. The UNet is frozen, so the runs are the ones a new
            step would make from the same draws.
    """

    steps: int = 1000
    lr: float = 1e-5
    eta: float = setting(1.0, number(low=0))
    start_guidance: float = setting(3.0, GUIDANCE)
    ddim_steps: int = setting(50, DDIM_STEPS)
    warmup: int = setting(200, integer(0, limits=(0, 100_000)),
                          says="a non-negative integer (0: attack from the first step)")
    prefix_tokens: int = setting(1, integer(1, limits=(1, 32)))
    attack_steps: int = setting(30, integer(1, limits=(1, 1000)))
    attack_lr: float = setting(1e-3, number(positive=True), says="a positive number such as 1e-3")
    attack_init: str = setting("random", choice(ATTACK_INITS))
    retain_weight: float = setting(0.3, number(low=0))
    retain_batch: int = setting(5, integer(1, limits=(1, 256)))
    retain_prompts: Optional[tuple[str, ...]] = setting(None, prompt_list(allow_empty=True, none=True, as_tuple=True))
    layers: Optional[tuple[int, ...]] = setting(None, LAYERS)
    resolution: Optional[int] = setting(None, RESOLUTION)
    erase_from: Union[str, tuple[str, ...], None] = setting(None, ERASE_FROM)

    method: ClassVar[str] = "advunlearn"
    text_kv_only: ClassVar[bool] = False  # the text encoder
    text_encoder_only: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        if self.retain_prompts == ():
            raise ConfigError("retain_prompts is empty; give prompts or None for the default set")


def _encoder_layers(text_encoder: nn.Module) -> nn.ModuleList:
    text_model = getattr(text_encoder, "text_model", text_encoder)
    layers = getattr(getattr(text_model, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TrainingError(f"{type(text_encoder).__name__} is not a CLIP text encoder (no text_model.encoder.layers)")
    return layers


def encoder_layer_parameters(text_encoder: nn.Module, layers: Optional[tuple[int, ...]] = None
                             ) -> dict[str, nn.Parameter]:
    """The trained parameters: those of the encoder layers at exactly these indices (None: every layer and the
    final layer norm). Selected by module identity, never by name prefix (layer 1 is never 10 or 11)."""
    modules = _encoder_layers(text_encoder)
    indices = range(len(modules)) if layers is None else layers
    for index in indices:
        if index >= len(modules):
            raise ConfigError(f"layers asks for encoder layer {index}, and this text encoder has {len(modules)} "
                              f"(0 to {len(modules) - 1})")
    chosen = {id(p) for i in indices for p in modules[i].parameters()}
    if layers is None:
        text_model = getattr(text_encoder, "text_model", text_encoder)
        chosen |= {id(p) for p in text_model.final_layer_norm.parameters()}
    return {name: p for name, p in text_encoder.named_parameters() if id(p) in chosen}


def token_ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """The prompts' token ids, padded to the tokenizer's length as the pipeline pads them."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def prefixed_ids(ids: torch.Tensor, k: int) -> torch.Tensor:
    """Token ids with ``k`` placeholder tokens right after the start token (the prompt's tokens move right by
    ``k``, the padded length stays); :func:`prefix_embedding` overwrites the placeholders' embeddings."""
    out = ids.clone()
    out[:, 1 + k:] = ids[:, 1:ids.shape[1] - k]
    out[:, 1:1 + k] = ids[:, 1:2]  # any real token: its embedding is overwritten
    return out


@contextlib.contextmanager
def prefix_embedding(text_encoder: nn.Module, delta: torch.Tensor, start: int = 1) -> Iterator[None]:
    """Within the block, the token embeddings at positions ``start .. start + k - 1`` are replaced by ``delta``
    (k x hidden), for every prompt the encoder reads: a continuous adversarial prefix."""

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, start:start + delta.shape[0]] = delta.to(output.dtype)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@register_method("advunlearn", summary="AdvUnlearn: adversarially trained text encoder, robust to prompt attacks")
class AdvUnlearnTrainer(Trainer):
    """Adversarial unlearning of the text encoder; see the module docstring."""

    config_class: ClassVar[type] = AdvUnlearnConfig
    config: AdvUnlearnConfig
    trained_component: ClassVar[str] = "text_encoder"
    #: ``attack_init="latest"`` starts each attack from the draw's own last prefix (see ``draws_per_step``)
    draw_state: ClassVar[tuple[str, ...]] = ("latest_delta",)

    def select_parameters(self, text_encoder: nn.Module) -> dict[str, nn.Parameter]:
        return encoder_layer_parameters(text_encoder, self.config.layers)

    # -- setup -------------------------------------------------------------------------------------

    def default_retain_prompts(self) -> tuple[str, ...]:
        """The retain set when ``retain_prompts`` is None: "a photo of a <COCO object>" (the official one)."""
        return tuple(f"a photo of a {name}" for name in COCO_OBJECTS)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return token_ids(self.pipe.tokenizer, prompts).to(self.device)

    def setup(self, pipe: Any, state: Optional[dict] = None) -> None:
        config = self.config
        if is_sdxl(pipe):
            raise TrainingError("AdvUnlearn trains an SD 1.x/2.x text encoder; SDXL conditions on two encoders")
        height, width = self.image_size(pipe)
        self.latent_shape = (1, *self.latent_size(pipe))
        self.scheduler = self.ddim_scheduler(config.ddim_steps)
        self.retain_prompts = (fill_concept(config.retain_prompts, config.concept) if config.retain_prompts
                               else list(self.default_retain_prompts()))
        # original conditioning (the encoder is untouched during setup): c, "", then each c_from
        self.prompts = encode_concept(pipe, config.concept, config.erase_from, height, width)
        self.cond_retain = encode_prompts(pipe, self.retain_prompts, height, width)
        # the prompts the student erases from: the concept itself, or each c_from
        self.concept_ids = self.tokenize(self.prompts.student_prompts)
        self.adversarial_ids = prefixed_ids(self.concept_ids, config.prefix_tokens)
        self.retain_ids = self.tokenize(self.retain_prompts)
        self.latest_delta = state.get("latest_delta") if state else None
        self.last_attack_losses: list[float] = []
        self.last_terms: dict[str, float] = {}

    # -- the two levels ----------------------------------------------------------------------------

    def sample_latents(self, cond: Conditioning, stops: list[int]) -> dict[int, torch.Tensor]:
        """One DDIM run from fresh noise for the rows of ``cond``, kept at each of ``stops``."""
        noise = self.randn(cond.embeds.shape[0], *self.latent_shape[1:]) * self.scheduler.init_noise_sigma
        uncond = self.prompts.empty.repeat(cond.embeds.shape[0])
        return ddim_latents(self.unet, self.scheduler, noise, cond, uncond, self.config.start_guidance, stops)

    def sample_trajectory(self, steps: int) -> Trajectory:
        """A trajectory for ``steps`` steps (:meth:`~unsee.erasure.Trainer.trajectory`): the student's prompt (a
        ``c_from``, or the concept), a stop k ~ U{0..ddim_steps-1} per step and ``retain_batch`` retain prompts
        drawn, then a DDIM run for the student's prompt and one for the retain prompts, from their original
        conditioning; the latents at each stop are x_t's row followed by the retain rows x_r."""
        student, cond_student = self.prompts.draw(self.draw_index)
        stops = [int(self.randint(0, self.config.ddim_steps)) for _ in range(steps)]
        retain_rows = self.randint(0, len(self.retain_prompts), (self.config.retain_batch,))
        x_t = self.sample_latents(cond_student, stops)
        x_r = self.sample_latents(self.cond_retain.rows(retain_rows), stops)
        latents = {k: torch.cat([x_t[k], x_r[k]]) for k in x_t}
        return Trajectory({"student": student, "retain": retain_rows.tolist()}, [(k,) for k in stops], latents)

    def encode(self, ids: torch.Tensor) -> Conditioning:
        """Conditioning from the encoder being trained (with gradients to its weights)."""
        return Conditioning(self.model(ids)[0].to(self.unet.dtype))

    def initial_delta(self) -> torch.Tensor:
        if self.config.attack_init == "latest" and self.latest_delta is not None:
            return self.latest_delta.to(self.device).clone()
        table = self.trained_module.get_input_embeddings().weight
        tokens = self.randint(0, table.shape[0], (self.config.prefix_tokens,)).to(table.device)
        return table[tokens].detach().float().clone()

    def attack(self, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, adversarial_ids: torch.Tensor
               ) -> torch.Tensor:
        """The prefix embedding that makes the current encoder regenerate the concept (the inner problem)."""
        delta = self.initial_delta().requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=self.config.attack_lr)
        losses = []
        for _ in range(self.config.attack_steps):
            optimizer.zero_grad(set_to_none=True)
            with prefix_embedding(self.trained_module, delta):
                embeds = self.trained_module(adversarial_ids)[0].to(self.unet.dtype)
            loss = mse(predict(self.unet, x_t, t, Conditioning(embeds)), target)
            (grad,) = torch.autograd.grad(loss, [delta])
            delta.grad = grad
            optimizer.step()
            losses.append(float(loss.detach()))
        self.last_attack_losses = losses
        self.latest_delta = delta.detach().cpu()
        return delta.detach()

    def training_step(self, step: int) -> torch.Tensor:
        config = self.config
        trajectory, place = self.trajectory(step, self.sample_trajectory)
        j = trajectory.draws["student"]  # a c_from drawn (in context), or the concept
        cond_student = self.prompts.student(j)
        in_context = bool(self.prompts.contexts)
        (k,) = trajectory.stops[place]
        t = self.scheduler.timesteps[k]
        retain_rows = torch.tensor(trajectory.draws["retain"])
        cond_retain = self.cond_retain.rows(retain_rows)
        x_t, x_r = trajectory.latents[k][:1], trajectory.latents[k][1:]
        # rows c, "" (and c_from): the paper's target anchors at "", in context at c_from's own prediction
        parts = [self.prompts.concept, self.prompts.empty] + ([cond_student] if in_context else [])
        with torch.no_grad():
            eps = predict(self.unet, x_t.repeat(len(parts), 1, 1, 1), t, Conditioning.cat(parts)).chunk(len(parts))
            eps_c, eps_empty, eps_student = eps[0], eps[1], eps[-1]  # eps_student: c_from's, or c's
            target = esd_target(eps_student if in_context else eps_empty, eps_c, eps_empty, config.eta)
            retain_target = predict(self.unet, x_r, t, cond_retain)
        if step >= config.warmup:
            adversarial_ids = self.adversarial_ids[j:j + 1]
            delta = self.attack(x_t, t, eps_student, adversarial_ids)
            with prefix_embedding(self.trained_module, delta):
                erase_cond = self.encode(adversarial_ids)
        else:
            self.last_attack_losses = []
            erase_cond = self.encode(self.concept_ids[j:j + 1])
        erase = mse(predict(self.unet, x_t, t, erase_cond), target)
        retain = mse(predict(self.unet, x_r, t, self.encode(self.retain_ids[retain_rows.to(self.device)])),
                     retain_target)
        self.last_terms = {"erase": float(erase.detach()), "retain": float(retain.detach())}
        return erase + config.retain_weight * retain

    def extra_state(self) -> dict:
        return {"latest_delta": self.latest_delta} if self.latest_delta is not None else {}

    def training_summary(self) -> dict:
        layers = self.config.layers
        return {"layers": list(layers) if layers is not None else "all", "prefix_tokens": self.config.prefix_tokens,
                "last_attack_loss_first": self.last_attack_losses[0] if self.last_attack_losses else None,
                "last_attack_loss_last": self.last_attack_losses[-1] if self.last_attack_losses else None}
