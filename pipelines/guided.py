"""Running a pipeline call with unsee's guidance methods (the step contract of ``unsee.guidance.base``).

``GuidanceMixin.__call__`` accepts ``guidance=[...]`` on top of the ordinary diffusers signature.
Without it, the call is diffusers' own. With it, diffusers' pipeline still does everything it
usually does (prompt encoding, latents, timesteps, SDXL's added conditioning, callbacks, decoding);
for the duration of the call unsee

- registers a diffusers model hook on the UNet (``GuidedUNetHook``): each time the pipeline calls
  the UNet, the hook builds all the branches the step needs from the rows diffusers prepared
  (conditional, unconditional or negative, perturbed), runs them in **one** batched UNet call,
  combines them, and hands the guided prediction back in both CFG halves (so diffusers' own
  ``u + w (c - u)`` returns it unchanged, whatever ``w`` is);
- installs unsee's attention processors (PAG identity rows, NASA rows, attention probes) when a
  method needs them;
- for PAG, lets the perturbed rows join the batch only at the UNet block holding the first perturbed
  layer (``PerturbedRowsJoin``): until there they would repeat the conditional rows' computation;
- for CFG++, replaces ``scheduler.step`` by the CFG++ update.

All three are undone when the call returns or raises.

The pipeline's ``guidance_scale`` is the CFG scale in effect (``CFG(scale)``'s when one is given, the
call's ``guidance_scale`` otherwise), and ``do_classifier_free_guidance`` is true exactly when the
unconditional branch runs, so ``callback_on_step_end`` sees what the call does. What a guided call did
(UNet calls, adaptive start steps, DNG posteriors) comes back as ``output.guidance_report``; nothing of
the call stays on the pipeline.

How the negative prompt acts (the README's table): as in diffusers, it fills the unconditional
branch from the first step, whatever the combination (CFG, CFG++, FDG, PAG); ``NegativeSteer`` decides
from which step (or, in ``dng`` mode, gives it a branch of its own); ``NASA`` without ``NegativeSteer``
moves it into cross-attention, and the unconditional branch holds the empty prompt.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from unsee.guidance.base import Guidance, GuidanceError, validate_combination
from unsee.guidance.cfg import CFG
from unsee.guidance.cfgpp import CFGpp, CFGppState, cfgpp_step, check_scheduler
from unsee.guidance.nasa import NASA
from unsee.guidance.negative import AdaptiveStart, DNGState, NegativeSteer, check_dng_scheduler
from unsee.guidance.pag import PAG

from .attention import AttentionControl, attention_module_names, installed_processors, layer_matches

HOOK_NAME = "unsee_guidance"


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


def _rows(value: Any, index: torch.Tensor, total: int) -> Any:
    """Select batch rows of a tensor that has ``total`` rows; anything else passes through."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == total:
        return value.index_select(0, index.to(value.device))
    return value


def _concat(parts: Sequence[Any]) -> Any:
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) and parts[0].ndim > 0 else parts[0]


def unet_blocks(unet) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's top-level blocks by name, in the order its forward runs them."""
    blocks = [(f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    return blocks + [(f"up_blocks.{i}", block) for i, block in enumerate(unet.up_blocks)]


class PerturbedRowsJoin:
    """PAG's perturbed rows compute exactly what the conditional rows compute until the first perturbed layer.

    So the UNet runs without them up to the top-level block that holds that layer; a forward pre-hook on
    that block and on every later one appends a copy of the conditional rows to each batch tensor that
    does not have them yet (hidden states, time embedding, text states, skip connections). With PAG on
    the mid block (the default), the down blocks run two rows per image instead of three. The result is
    the full three-row computation's; only the repeated work is gone.
    """

    def __init__(self, unet, pag_layers: frozenset) -> None:
        blocks = unet_blocks(unet)
        first = next((i for i, (name, _) in enumerate(blocks)
                      if any(layer.startswith(name + ".") for layer in pag_layers)), 0)
        self.blocks = [block for _, block in blocks[first:]]
        self.rows_before: Optional[int] = None  # batch rows until the join, set for one UNet call
        self.cond: Optional[slice] = None  # where the conditional rows are in that batch

    def _with_perturbed(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == self.rows_before:
            return torch.cat([value, value[self.cond]])
        if isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):  # skip connections
            return tuple(self._with_perturbed(v) for v in value)
        return value

    def _hook(self, module, args: tuple, kwargs: dict):
        if self.rows_before is None:
            return None
        return (tuple(self._with_perturbed(a) for a in args),
                {key: self._with_perturbed(value) for key, value in kwargs.items()})

    @contextlib.contextmanager
    def installed(self):
        handles = [block.register_forward_pre_hook(self._hook, with_kwargs=True) for block in self.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# UNet inputs that carry rows of the pipeline's own batch into the blocks (ControlNet, T2I-Adapter): with them
# the perturbed rows run the whole UNet
_BLOCK_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual",
                    "down_intrablock_additional_residuals")


class GuidedStep:
    """What one guided call needs to know and remember between steps."""

    def __init__(self, pipe, methods: Sequence[Guidance], combine: Guidance, diffusers_cfg: bool,
                 empty: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]],
                 negative: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]],
                 token_mask: Optional[torch.Tensor], guidance_rescale: float) -> None:
        self.pipe = pipe
        self.combine = combine
        self.pag: Optional[PAG] = next((m for m in methods if isinstance(m, PAG)), None)
        self.nasa: Optional[NASA] = next((m for m in methods if isinstance(m, NASA)), None)
        self.steer: Optional[NegativeSteer] = next((m for m in methods if isinstance(m, NegativeSteer)), None)
        self.diffusers_cfg = diffusers_cfg
        self.needs_uncond = bool(getattr(combine, "needs_uncond", False)) or self.steer is not None
        self.empty = empty  # (embeds, pooled) of the empty prompt, one row per image
        self.negative = negative  # (embeds, pooled) of the negative prompt, one row per image (NASA)
        self.token_mask = token_mask
        self.guidance_rescale = guidance_rescale
        self.control = AttentionControl()
        self.step = 0
        self.report = GuidanceReport()
        self.last_uncond: Optional[torch.Tensor] = None
        self.cfgpp_state = CFGppState()
        self.adaptive: Optional[AdaptiveStart] = None
        self.dng: Optional[DNGState] = None
        self.negative_active: Optional[torch.Tensor] = None

        unet = pipe.unet
        self.cross_layers = frozenset(attention_module_names(unet, cross=True))  # once per call, not per step
        if self.pag is not None:
            selected = [n for n in attention_module_names(unet, cross=False) if layer_matches(n, self.pag.layers)]
            if not selected:
                raise GuidanceError(f"PAG.layers {self.pag.layers} match no self-attention layer of this UNet; "
                                    f"names look like {attention_module_names(unet, cross=False)[:3]}")
            self.control.pag_layers = frozenset(selected)
        self.join: Optional[PerturbedRowsJoin] = PerturbedRowsJoin(unet, self.control.pag_layers) if self.pag else None
        if self.nasa is not None:
            cross = sorted(self.cross_layers)
            selected = cross if self.nasa.layers is None else [n for n in cross if layer_matches(n, self.nasa.layers)]
            if not selected:
                raise GuidanceError(f"NASA.layers {self.nasa.layers} match no cross-attention layer of this UNet")
            self.control.nasa_layers = frozenset(selected)
            self.control.nasa_alpha = self.nasa.alpha

    @property
    def processor_modules(self) -> frozenset:
        """The attention modules that need unsee's processor in this call (the others keep theirs)."""
        modules = set(self.control.pag_layers) | set(self.control.nasa_layers)
        if self.steer is not None and self.steer.mode == "adaptive":
            modules |= self.cross_layers
        return frozenset(modules)

    # ---------------------------------------------------------------- which rows hold what, this step
    def _negative_rows_active(self, batch: int, num_steps: int) -> torch.Tensor:
        """Per image: does the unconditional branch hold the negative prompt (True) or the empty prompt?"""
        steer = self.steer
        if steer is None:
            # NASA alone: the negative acts in attention, the unconditional branch is the empty prompt
            return torch.full((batch,), self.nasa is None, dtype=torch.bool)
        if steer.mode == "fixed":
            return torch.full((batch,), self.step >= steer.first_step(num_steps), dtype=torch.bool)
        if steer.mode == "adaptive":
            if self.negative_active is None:
                self.negative_active = torch.zeros(batch, dtype=torch.bool)
            return self.negative_active
        return torch.zeros(batch, dtype=torch.bool)  # dng: the negative has its own branch

    def forward(self, original_forward, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                *args, added_cond_kwargs: Optional[dict] = None, return_dict: bool = True, **kwargs):
        self.report.unet_calls += 1
        total = sample.shape[0]
        batch = total // 2 if self.diffusers_cfg else total
        num_steps = len(self.pipe.scheduler.timesteps)
        cond_index = torch.arange(batch, 2 * batch) if self.diffusers_cfg else torch.arange(batch)
        uncond_index = torch.arange(batch)
        added = dict(added_cond_kwargs or {})
        if "image_embeds" in added:
            raise GuidanceError("unsee guidance does not support IP-Adapter image embeddings yet")

        def take(index: torch.Tensor):
            return (sample.index_select(0, index), encoder_hidden_states.index_select(0, index),
                    {k: _rows(v, index, total) for k, v in added.items()})

        branches: list[tuple[str, tuple]] = []
        if self.needs_uncond:
            if not self.diffusers_cfg:
                raise AssertionError("the unconditional branch needs diffusers' CFG rows")
            x_u, e_u, a_u = take(uncond_index)
            active = self._negative_rows_active(batch, num_steps).to(e_u.device)
            if self.empty is not None and not bool(active.all()):
                empty_embeds, empty_pooled = self.empty
                e_u = torch.where(active[:, None, None], e_u, empty_embeds.to(e_u.dtype))
                if empty_pooled is not None and "text_embeds" in a_u:
                    a_u["text_embeds"] = torch.where(active[:, None], a_u["text_embeds"], empty_pooled.to(e_u.dtype))
            branches.append(("uncond", (x_u, e_u, a_u)))
            if self.steer is not None and self.steer.mode == "dng":
                branches.append(("negative", take(uncond_index)))
        branches.append(("cond", take(cond_index)))
        pag_scale = self.pag.scale_at(timestep) if self.pag is not None else 0.0
        if pag_scale > 0:
            branches.append(("perturbed", take(cond_index)))

        # attention control: which rows of the branch batch get PAG / NASA / the probe
        starts = {}
        offset = 0
        for name, _ in branches:
            starts[name] = slice(offset, offset + batch)
            offset += batch
        control = self.control
        control.pag_rows = starts.get("perturbed")
        if self.nasa is not None and self.nasa.alpha > 0:
            first, last = starts["cond"].start, (starts.get("perturbed") or starts["cond"]).stop
            control.nasa_rows = slice(first, last)
            if control.nasa_negative is None:  # once per call, with rows for PAG's perturbed rows too when it has them
                repeats = 2 if self.pag is not None else 1
                control.nasa_negative = self.negative[0].to(encoder_hidden_states.dtype).repeat(repeats, 1, 1)
        probing = self.steer is not None and self.steer.mode == "adaptive" and (
            self.negative_active is None or not bool(self.negative_active.all()))
        control.probe_rows = starts["cond"] if probing else None
        control.probe_layers = self.cross_layers if probing else frozenset()
        control.probed_maps = []

        join_late = pag_scale > 0 and self.join is not None and all(kwargs.get(k) is None for k in _BLOCK_RESIDUALS)
        batched = branches[:-1] if join_late else branches  # the perturbed branch is the last one
        x_all = torch.cat([b[1][0] for b in batched])
        e_all = torch.cat([b[1][1] for b in batched])
        a_all = {k: _concat([b[1][2][k] for b in batched]) for k in added}
        if self.steer is not None and self.steer.mode == "dng" and self.dng is not None:
            self.dng.observe(sample.index_select(0, cond_index))
        if join_late:
            self.join.rows_before, self.join.cond = starts["perturbed"].start, starts["cond"]
        try:
            out = original_forward(x_all, timestep, e_all, *args, added_cond_kwargs=a_all or added_cond_kwargs,
                                   return_dict=False, **kwargs)[0]
        finally:
            if self.join is not None:
                self.join.rows_before = None
        parts = {name: out[s] for name, s in starts.items()}

        cond = parts["cond"]
        if self.needs_uncond:
            guided = self.combine.combine(cond, parts["uncond"]) if hasattr(self.combine, "combine") else cond
            self.last_uncond = parts["uncond"]
        else:
            guided = cond
        if pag_scale > 0:
            guided = guided + self.pag.term(cond, parts["perturbed"], timestep)
        if "negative" in parts:
            if self.dng is None:
                self.dng = DNGState(self.steer, batch)
            if self.report.dng_posterior is None:
                self.report.dng_posterior = []
            self.report.dng_posterior.append(self.dng.p.tolist())
            if self.step >= self.steer.first_step(num_steps):  # delayed DNG: p_t is tracked from the first step
                weight = self.dng.weight().to(guided.device, guided.dtype).view(-1, *([1] * (guided.ndim - 1)))
                guided = guided - weight * (parts["negative"] - parts["uncond"])
            self._predict_dng(sample.index_select(0, cond_index), parts["negative"], parts["uncond"], timestep)
        if self.guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, cond, guidance_rescale=self.guidance_rescale)
        if probing and control.probed_maps:
            self._update_adaptive(batch, num_steps)
        self.step += 1
        self.report.steps = self.step
        result = torch.cat([guided, guided]) if self.diffusers_cfg else guided
        return UNet2DConditionOutput(sample=result) if return_dict else (result,)

    def _update_adaptive(self, batch: int, num_steps: int) -> None:
        if self.adaptive is None:
            max_step = max(1, int(round(self.steer.max_start * num_steps)))
            self.adaptive = AdaptiveStart(batch, self.steer.threshold, max_step)
        current = AdaptiveStart.token_map(self.control.probed_maps, self.token_mask.to(self.control.probed_maps[0].device))
        # the decision taken after step k applies from step k + 1
        self.negative_active = self.adaptive.update(self.step, current.cpu())
        self.report.negative_start_steps = [None if s is None else s + 1 for s in self.adaptive.start_steps]

    def _predict_dng(self, sample, output_neg, output_u, timestep) -> None:
        scheduler = self.pipe.scheduler
        timesteps = scheduler.timesteps
        index = int((timesteps == timestep).nonzero()[0]) if (timesteps == timestep).any() else self.step
        alphas = scheduler.alphas_cumprod.to(sample.device)
        a_t = alphas[int(timesteps[index])]
        if index + 1 < len(timesteps):
            a_prev = alphas[int(timesteps[index + 1])]
        else:  # the last step lands on the scheduler's final alpha (DDIM's set_alpha_to_one) or on x0
            a_prev = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", 1.0), device=alphas.device, dtype=alphas.dtype)
        self.dng.predict(sample, output_neg, output_u, scheduler.config.prediction_type, a_t, a_prev)


class GuidedUNetHook(ModelHook):
    """A diffusers model hook that routes each UNet call through a ``GuidedStep``."""

    def __init__(self, state: GuidedStep) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        return self.state.forward(self.fn_ref.original_forward, *args, **kwargs)


class GuidanceMixin:
    """Adds ``guidance=[...]`` to a diffusers SD/SDXL pipeline's ``__call__``.

    Subclasses implement ``_unsee_encode(texts, device, num_images_per_prompt, clip_skip)`` returning
    (embeddings, pooled embeddings or None) for the conditional branch, and
    ``_unsee_empty_embeddings(rows, device, clip_skip)`` returning what diffusers puts in the unconditional
    rows when there is no negative prompt.
    """

    _unsee_step: Optional[GuidedStep] = None  # set for the duration of a guided call only

    @property
    def do_classifier_free_guidance(self) -> bool:
        # during a guided call: exactly when the unconditional branch runs (CFG, CFG++, FDG, negative steering)
        state = self._unsee_step
        return state.diffusers_cfg if state is not None else super().do_classifier_free_guidance

    def __call__(self, *args: Any, guidance: Optional[Sequence[Guidance]] = None, **kwargs: Any):
        base_call = super().__call__
        if not guidance:
            return base_call(*args, **kwargs)
        if isinstance(guidance, Guidance):
            guidance = [guidance]
        bound = inspect.signature(base_call).bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}) or {})
        methods = list(guidance)
        has_negative = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
        validate_combination(methods, has_negative)
        scale = call.get("guidance_scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise GuidanceError(f"guidance_scale must be a finite number, got {scale!r}")

        combine = next((m for m in methods if m.kind == "combine"), None) or CFG(scale)
        combine.validate()
        steer = next((m for m in methods if isinstance(m, NegativeSteer)), None)
        nasa = next((m for m in methods if isinstance(m, NASA)), None)
        needs_uncond = bool(getattr(combine, "needs_uncond", False)) or steer is not None
        if steer is not None and not getattr(combine, "needs_uncond", False):
            raise GuidanceError("NegativeSteer needs classifier-free guidance: use guidance_scale > 1, CFG, CFGpp or FDG")
        if getattr(self.unet.config, "time_cond_proj_dim", None) is not None and needs_uncond:
            raise GuidanceError("this UNet is guidance-distilled (time_cond_proj_dim): it has no unconditional branch")
        if isinstance(combine, CFGpp):
            check_scheduler(self.scheduler, call.get("eta", 0.0) or 0.0)
        if steer is not None and steer.mode == "dng":
            check_dng_scheduler(self.scheduler)

        images_per_prompt = call.get("num_images_per_prompt") or 1
        clip_skip = call.get("clip_skip")
        prompt = call.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        rows = (len(prompts) if prompts is not None else call["prompt_embeds"].shape[0] // images_per_prompt) * images_per_prompt
        negative = call.get("negative_prompt")
        negatives = None
        if negative is not None:
            negatives = [negative] * (rows // images_per_prompt) if isinstance(negative, str) else list(negative)

        # the execution device walks every module (offload hooks): only asked for when we encode prompts ourselves
        device = self._execution_device if (steer is not None or nasa is not None) else None
        # negative steering swaps the empty prompt in and out of the unconditional rows; encoded as diffusers encodes
        # the unconditional rows of a call without a negative prompt
        empty = self._unsee_empty_embeddings(rows, device, clip_skip) if steer is not None else None
        negative_embeds = None
        if nasa is not None:
            if negatives is None:
                raise GuidanceError("NASA needs negative_prompt as text (negative_prompt_embeds are not supported)")
            # NASA's negative stands beside the prompt in the conditional rows' cross-attention: encoded as the prompt is
            negative_embeds = self._unsee_encode(negatives, device, images_per_prompt, clip_skip)
        token_mask = None
        if steer is not None and steer.mode == "adaptive":
            if prompts is None or negatives is None:
                raise GuidanceError("adaptive NegativeSteer needs prompt and negative_prompt as text")
            token_mask = self._unsee_token_mask(prompts, negatives, images_per_prompt)

        state = GuidedStep(self, methods, combine, diffusers_cfg=needs_uncond, empty=empty, negative=negative_embeds,
                           token_mask=token_mask, guidance_rescale=float(call.get("guidance_rescale") or 0.0))
        # diffusers batches the unconditional rows when do_classifier_free_guidance says so, and its u + w (c - u)
        # returns our guided prediction for any finite w: the pipeline keeps the CFG scale in effect for callbacks
        call["guidance_scale"] = combine.scale if isinstance(combine, CFG) else scale
        if "guidance_rescale" in call:
            call["guidance_rescale"] = 0.0  # applied to the guided prediction by GuidedStep
        if nasa is not None and steer is None:
            call["negative_prompt"] = None  # the negative acts through NASA's attention only
            if "negative_prompt_2" in call:
                call["negative_prompt_2"] = None
        with self._unsee_guided(state, isinstance(combine, CFGpp)):
            output = base_call(**call)
        if call.get("return_dict", True) and not isinstance(output, tuple):
            output.guidance_report = state.report
        return output

    @contextlib.contextmanager
    def _unsee_guided(self, state: GuidedStep, cfgpp: bool):
        registry = HookRegistry.check_if_exists_or_initialize(self.unet)
        registry.register_hook(GuidedUNetHook(state), HOOK_NAME)
        scheduler = self.scheduler
        stack = contextlib.ExitStack()
        try:
            modules = state.processor_modules
            if modules:
                stack.enter_context(installed_processors(self.unet, state.control, modules))
            if state.join is not None:
                stack.enter_context(state.join.installed())
            if cfgpp:
                def step(model_output, timestep, sample, *args, generator=None, return_dict=True, **kwargs):
                    prev = cfgpp_step(scheduler, model_output, state.last_uncond, timestep, sample,
                                      state.cfgpp_state, generator)
                    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

                scheduler.step = step
            self._unsee_step = state
            yield
        finally:
            self.__dict__.pop("_unsee_step", None)
            if cfgpp:
                del scheduler.step  # back to the class's own method
            stack.close()
            registry.remove_hook(HOOK_NAME, recurse=False)  # the hook is on the UNet itself

    def _unsee_token_mask(self, prompts: list[str], negatives: list[str], images_per_prompt: int) -> torch.Tensor:
        """(rows, 77) mask of the positive prompt's tokens that the negative prompt also contains."""
        tokenizer = self.tokenizer
        special = set(tokenizer.all_special_ids)
        masks = []
        for prompt, negative in zip(prompts, negatives):
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
            wanted = set(tokenizer(negative).input_ids) - special
            mask = torch.tensor([i in wanted for i in ids])
            if not mask.any():
                mask = torch.tensor([i not in special for i in ids])
            masks.extend([mask] * images_per_prompt)
        return torch.stack(masks)
