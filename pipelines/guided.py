"""Running a pipeline call with unsee's guidance methods: the generic executor of ``unsee.guidance.base``'s contract.

``GuidanceMixin.__call__`` accepts ``guidance=[...]`` on top of the ordinary diffusers signature.
Without it, the call is diffusers' own. With it, diffusers' pipeline still does everything it
usually does (prompt encoding, latents, timesteps, SDXL's added conditioning, callbacks, decoding);
for the duration of the call unsee

- checks the methods (``unsee.guidance.composition.plan``) and prepares each one (``Guidance.prepare``), which
  gives the method's per-call run; nothing is done before every method is prepared;
- registers a diffusers model hook on the UNet (``GuidedUNetHook``): each time the pipeline calls the UNet,
  the executor builds the branches the step needs from the rows diffusers prepared (the conditional rows,
  the unconditional ones when a method needs them, and the branches the methods add), runs them in **one**
  batched UNet call, lets the combining method combine them and the others add their terms, and hands the
  guided prediction back in both CFG halves (so diffusers' own ``u + w (c - u)`` returns it unchanged,
  whatever ``w`` is);
- installs unsee's attention processor, with the methods' attention edits, on the modules they name;
- lets a branch that repeats its source rows' computation up to some layer (PAG's perturbed rows) join the
  batch only at the UNet block holding the first of those layers (``LateJoin``);
- replaces ``scheduler.step`` by the step of the method whose contract says it replaces it (CFG++);
- on ControlNet pipelines, registers a hook on the ControlNet too (``GuidedControlNetHook``): a branch whose inputs
  a method changed (the empty prompt ``NegativeSteer`` puts in the unconditional branch) gets ControlNet rows of
  its own in the same ControlNet call.

Every per-row input of the UNet call is re-rowed for each branch from the branch's source rows: the sample (with a
9-channel inpainting UNet's mask and masked-image channels), the text embeddings, each tensor of
``added_cond_kwargs`` (SDXL's ``text_embeds`` and ``time_ids``), per-row timesteps, ``timestep_cond``, and each
element of the ControlNet residual tuples (guess mode's zero rows included); ``cross_attention_kwargs`` are shared.
The steps a method counts are the steps the call runs (``pipe._num_timesteps``, which img2img and inpainting set
to the truncated schedule's length).

All of it is undone when the call returns or raises. The executor knows no method by name: it reads the
methods' contracts and calls their runs' hooks.

The pipeline's ``guidance_scale`` is the CFG scale in effect (``CFG(scale)``'s when one is given, the
call's ``guidance_scale`` otherwise), and ``do_classifier_free_guidance`` is true exactly when the
unconditional branch runs, so ``callback_on_step_end`` sees what the call does. What a guided call did
(UNet calls, adaptive start steps, DNG posteriors) comes back as ``output.guidance_report``; nothing of
the call stays on the pipeline.

How the negative prompt acts (the README's composition table): as in diffusers, it fills the unconditional
branch from the first step, whatever the combination (CFG, CFG++, FDG, PAG); a method that sets the
unconditional branch (``NegativeSteer``) decides from which step (or, in ``dng`` mode, gives it a branch of its
own); a method that uses it inside attention (``NASA``, ``NAG``) without one that sets the unconditional branch
moves it into attention, and the unconditional branch holds the empty prompt.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Optional, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from unsee.guidance.base import (Branch, BranchInputs, CallContext, Guidance, GuidanceError, GuidanceReport,
                                 MethodRun, Step)
from unsee.guidance.composition import as_guidance, plan

from .attention import attention_module_names, installed_processors

HOOK_NAME = "unsee_guidance"

__all__ = ["GuidanceMixin", "GuidanceReport", "GuidedStep", "LateJoin"]


def _rows(value: Any, index: torch.Tensor, total: int) -> Any:
    """Select batch rows of a tensor that has ``total`` rows; anything else passes through."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == total:
        return value.index_select(0, index.to(value.device))
    return value


def _gather(value: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of a tensor, or of each tensor in a tuple or list (ControlNet's residuals); else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(v, index) for v in value)
    return value


def _concat(parts: Sequence[Any]) -> Any:
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) and parts[0].ndim > 0 else parts[0]


def unet_blocks(unet) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's top-level blocks by name, in the order its forward runs them."""
    blocks = [(f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    return blocks + [(f"up_blocks.{i}", block) for i, block in enumerate(unet.up_blocks)]


class LateJoin:
    """A branch that copies its source rows computes exactly what they compute until the first layer it changes.

    So the UNet runs without it up to the top-level block that holds that layer; a forward pre-hook on that block
    and on every later one appends a copy of the source rows to each batch tensor that does not have them yet
    (hidden states, time embedding, text states, skip connections). With PAG on the mid block (the default), the
    down blocks run two rows per image instead of three. The result is the full batch's; only the repeated work is
    gone.

    ControlNet residuals are added to the skip connections after the down blocks and to the mid block's output: the
    ones made before the join get the early rows' residuals (the late branch's are copied with them, so it must take
    its source rows' residuals), the ones made after it every row's (:meth:`residual_rows`).
    """

    def __init__(self, unet, layers: frozenset) -> None:
        blocks = unet_blocks(unet)
        first = next((i for i, (name, _) in enumerate(blocks)
                      if any(layer.startswith(name + ".") for layer in layers)), 0)
        self.blocks = [block for _, block in blocks[first:]]
        # skip connections made before the join: conv_in's output, then each earlier down block's resnets and
        # downsamplers; and whether the mid block's output is made before it
        self.skips_before = 1 + sum(len(block.resnets) + len(getattr(block, "downsamplers", None) or [])
                                    for name, block in blocks[:first] if name.startswith("down_blocks."))
        self.mid_before = any(name == "mid_block" for name, _ in blocks[:first])
        self.rows_before: Optional[int] = None  # batch rows until the join, set for one UNet call
        self.source: Optional[slice] = None  # where the copied rows are in that batch

    def _joined(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == self.rows_before:
            return torch.cat([value, value[self.source]])
        if isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):  # skip connections
            return tuple(self._joined(v) for v in value)
        return value

    def _hook(self, module, args: tuple, kwargs: dict):
        if self.rows_before is None:
            return None
        return (tuple(self._joined(a) for a in args), {key: self._joined(value) for key, value in kwargs.items()})

    def residual_rows(self, name: str, value: Any, early: torch.Tensor, full: torch.Tensor) -> Any:
        """A ControlNet residual (``down_block_additional_residuals`` or ``mid_block_additional_residual``) with the
        rows its addition meets: ``early`` rows where it is added before the join, ``full`` ones after it."""
        if name == "mid_block_additional_residual":
            return _gather(value, early if self.mid_before else full)
        return type(value)(_gather(v, early if i < self.skips_before else full) for i, v in enumerate(value))

    @contextlib.contextmanager
    def installed(self):
        handles = [block.register_forward_pre_hook(self._hook, with_kwargs=True) for block in self.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# UNet inputs that carry rows of the pipeline's own batch into the blocks: ControlNet's residuals (a late-joining
# branch still joins late: LateJoin.residual_rows) and T2I-Adapter's, added inside the down blocks (with them a
# late-joining branch runs the whole UNet)
_BLOCK_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual",
                    "down_intrablock_additional_residuals")
_INSIDE_BLOCKS = ("down_intrablock_additional_residuals",)


def _ordered(branches: list[Branch]) -> list[Branch]:
    """Branches copying the unconditional rows first, then the conditional ones; a late-joining branch last."""
    late = [b for b in branches if b.late_join]
    if len(late) > 1:
        raise GuidanceError(f"branches {[b.name for b in late]} each join the batch late; at most one can")
    early = [b for b in branches if not b.late_join]
    return sorted(early, key=lambda b: b.source != "uncond") + late


class GuidedStep:
    """The executor of one guided call: the methods' runs, and what the call remembers between steps."""

    def __init__(self, pipe, runs: Sequence[MethodRun], combiner: MethodRun, diffusers_cfg: bool,
                 guidance_rescale: float) -> None:
        self.pipe = pipe
        self.runs = list(runs)
        self.combiner = combiner
        self.diffusers_cfg = diffusers_cfg
        self.guidance_rescale = guidance_rescale
        self.step = 0
        self.report = GuidanceReport()
        self.predictions: dict = {}  # the last UNet call's predictions by branch (a replaced scheduler step reads them)
        self.edits = [edit for run in self.runs for edit in run.attention_edits]
        late = frozenset().union(*(run.late_join for run in self.runs))
        self.join: Optional[LateJoin] = LateJoin(pipe.unet, late) if late else None
        self.stepper: Optional[MethodRun] = next((r for r in self.runs if type(r).scheduler_step
                                                  is not MethodRun.scheduler_step), None)
        # branch -> its rows in this step's ControlNet residuals, for branches whose inputs a method changed (set by
        # the ControlNet call, read by the UNet call of the same step)
        self.control_rows: Optional[dict] = None

    def plan(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, added: dict):
        """This step's branches and each branch's inputs, built from the rows diffusers prepared.

        Returns (step, branches in batch order, inputs by branch, sources: "cond"/"uncond" -> the rows of diffusers'
        batch they are, changed: the branches whose inputs a method changed from their source rows'). The same rows
        give the same plan, so the ControlNet (called first) and the UNet of one step see the same branches.
        """
        total = sample.shape[0]
        batch = total // 2 if self.diffusers_cfg else total
        sources = {"cond": torch.arange(batch, 2 * batch) if self.diffusers_cfg else torch.arange(batch)}
        if self.diffusers_cfg:
            sources["uncond"] = torch.arange(batch)
        if "image_embeds" in added:
            raise GuidanceError("unsee guidance does not support IP-Adapter image embeddings yet")

        def take(source: str) -> BranchInputs:
            index = sources[source]
            return BranchInputs(sample.index_select(0, index), encoder_hidden_states.index_select(0, index),
                                {k: _rows(v, index, total) for k, v in added.items()})

        # the steps this call runs: an img2img or inpainting call starts its loop part way down the schedule
        num_steps = getattr(self.pipe, "_num_timesteps", None) or len(self.pipe.scheduler.timesteps)
        cond_sample = sample.index_select(0, sources["cond"])
        if cond_sample.ndim == 4:  # a 9-channel inpainting UNet's sample carries the mask and masked image after it
            cond_sample = cond_sample[:, : self.pipe.unet.config.out_channels]
        step = Step(index=self.step, num_steps=num_steps, timestep=timestep, batch=batch, sample=sample,
                    cond_sample=cond_sample, layout={}, dtype=encoder_hidden_states.dtype)
        wanted = [Branch("uncond", "uncond")] if self.diffusers_cfg else []
        wanted.append(Branch("cond", "cond"))
        for run in self.runs:
            wanted.extend(run.branches(step))
        if any(b.source not in sources for b in wanted):
            raise AssertionError("a branch copies the unconditional rows, which this call does not have")
        branches = _ordered(wanted)
        for i, branch in enumerate(branches):
            step.layout[branch.name] = slice(i * batch, (i + 1) * batch)
        inputs, changed = {}, set()
        for branch in branches:
            value = original = take(branch.source)
            for run in self.runs:
                value = run.branch_inputs(step, branch.name, value)
            inputs[branch.name] = value
            if value is not original:
                changed.add(branch.name)
        return step, branches, inputs, sources, changed

    def forward(self, original_forward, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                *args, added_cond_kwargs: Optional[dict] = None, return_dict: bool = True, **kwargs):
        self.report.unet_calls += 1
        total = sample.shape[0]
        added = dict(added_cond_kwargs or {})
        step, branches, inputs, sources, _ = self.plan(sample, timestep, encoder_hidden_states, added)
        for run in self.runs:
            run.before_denoiser(step)

        # one batched UNet call; a late-joining branch enters at its first block
        last = branches[-1]
        control = self.control_rows or {}
        self.control_rows = None
        # a late branch joins late unless residuals are added inside the blocks or it has ControlNet rows of its own
        join_late = (bool(last.late_join) and self.join is not None and last.name not in control
                     and all(kwargs.get(k) is None for k in _INSIDE_BLOCKS))
        batched = branches[:-1] if join_late else branches
        x_all = torch.cat([inputs[b.name].sample for b in batched])
        e_all = torch.cat([inputs[b.name].embeds for b in batched])
        a_all = {k: _concat([inputs[b.name].added[k] for b in batched]) for k in added}
        # every other per-row input (per-row timesteps, timestep_cond, ...) takes each branch's source rows; the
        # ControlNet residuals (each element of the tuple) too, or the rows the ControlNet ran for the branch
        source_rows = torch.cat([sources[b.source] for b in batched])
        residual_rows = torch.cat([control.get(b.name, sources[b.source]) for b in batched])
        if join_late:  # residuals added after the join meet the late branch's rows too: its source's
            full_rows = torch.cat([residual_rows, sources[last.source]])
            kwargs = {k: self.join.residual_rows(k, v, residual_rows, full_rows)
                      if k in _BLOCK_RESIDUALS and v is not None else v for k, v in kwargs.items()}
        kwargs = {k: (v if join_late else _gather(v, residual_rows)) if k in _BLOCK_RESIDUALS
                  else _rows(v, source_rows, total) for k, v in kwargs.items()}
        timestep = _rows(timestep, source_rows, total)
        if join_late:
            self.join.rows_before, self.join.source = step.layout[last.name].start, step.layout[last.source]
        try:
            out = original_forward(x_all, timestep, e_all, *args, added_cond_kwargs=a_all or added_cond_kwargs,
                                   return_dict=False, **kwargs)[0]
        finally:
            if self.join is not None:
                self.join.rows_before = None
        predictions = {name: out[rows] for name, rows in step.layout.items()}

        # combine, add the terms, rescale
        guided = self.combiner.combine(predictions, step)
        for run in self.runs:
            guided = run.add_term(guided, predictions, step)
        if self.guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, predictions["cond"], guidance_rescale=self.guidance_rescale)
        for run in self.runs:
            run.after_denoiser(predictions, step)
            run.report(self.report)
        self.predictions = predictions
        self.step += 1
        self.report.steps = self.step
        result = torch.cat([guided, guided]) if self.diffusers_cfg else guided
        return UNet2DConditionOutput(sample=result) if return_dict else (result,)

    def controlnet_forward(self, original_forward, *args, **kwargs):
        """The pipeline's ControlNet call: as diffusers makes it, plus rows for the branches a method gave inputs of
        their own (``NegativeSteer``'s empty prompt in the unconditional branch, ...), so that each branch's
        residuals come from its own prompt. Other branches take their source rows' residuals in the UNet call.
        In guess mode diffusers runs only the conditional rows (the unconditional ones get zeros): passed through."""
        bound = inspect.signature(original_forward).bind(*args, **kwargs)
        call = bound.arguments
        sample, embeds = call["sample"], call["encoder_hidden_states"]
        added = dict(call.get("added_cond_kwargs") or {})
        if call.get("guess_mode") and self.diffusers_cfg:
            return original_forward(*args, **kwargs)
        _, branches, inputs, sources, changed = self.plan(sample, call["timestep"], embeds, added)
        own = [b for b in branches if b.name in changed]
        if not own:
            return original_forward(*args, **kwargs)
        total, batch = sample.shape[0], inputs[own[0].name].sample.shape[0]
        rows = torch.cat([sources[b.source] for b in own])

        def extended(value: Any) -> Any:  # diffusers' rows, then the source rows of the branches with their own
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == total:
                return torch.cat([value, value.index_select(0, rows.to(value.device))])
            if isinstance(value, (tuple, list)):
                return type(value)(extended(v) for v in value)
            return value

        for name, value in call.items():
            call[name] = extended(value)
        call["sample"] = torch.cat([sample] + [inputs[b.name].sample for b in own])
        call["encoder_hidden_states"] = torch.cat([embeds] + [inputs[b.name].embeds for b in own])
        if added:
            call["added_cond_kwargs"] = {k: _concat([v] + [inputs[b.name].added[k] for b in own])
                                         for k, v in added.items()}
        self.control_rows = {b.name: torch.arange(total + i * batch, total + (i + 1) * batch) for i, b in enumerate(own)}
        return original_forward(*bound.args, **bound.kwargs)

    def scheduler_step(self, scheduler, model_output, timestep, sample, generator=None, return_dict=True):
        prev = self.stepper.scheduler_step(scheduler, model_output, timestep, sample, self.predictions, generator)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


class GuidedUNetHook(ModelHook):
    """A diffusers model hook that routes each UNet call through a ``GuidedStep``."""

    def __init__(self, state: GuidedStep) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        return self.state.forward(self.fn_ref.original_forward, *args, **kwargs)


class GuidedControlNetHook(ModelHook):
    """A diffusers model hook that routes each ControlNet call through ``GuidedStep.controlnet_forward``."""

    def __init__(self, state: GuidedStep) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        return self.state.controlnet_forward(self.fn_ref.original_forward, *args, **kwargs)


class PipelineCall(CallContext):
    """The :class:`~unsee.guidance.base.CallContext` of one call of a unsee pipeline."""

    def __init__(self, pipe, kwargs: dict) -> None:
        self.pipe, self.unet, self.scheduler, self.kwargs = pipe, pipe.unet, pipe.scheduler, kwargs
        self.images_per_prompt = kwargs.get("num_images_per_prompt") or 1
        self.clip_skip = kwargs.get("clip_skip")
        prompt = kwargs.get("prompt")
        self.prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        count = len(self.prompts) if self.prompts is not None else kwargs["prompt_embeds"].shape[0] // self.images_per_prompt
        self.rows = count * self.images_per_prompt
        negative = kwargs.get("negative_prompt")
        self.negatives = None
        if negative is not None:
            self.negatives = [negative] * count if isinstance(negative, str) else list(negative)
        self._device = None

    @property
    def device(self):
        # the execution device walks every module (offload hooks): only asked for when a method encodes prompts
        if self._device is None:
            self._device = self.pipe._execution_device
        return self._device

    def encode(self, texts: list[str]):
        return self.pipe._unsee_encode(texts, self.device, self.images_per_prompt, self.clip_skip)

    def empty_embeddings(self):
        return self.pipe._unsee_empty_embeddings(self.rows, self.device, self.clip_skip)

    def token_mask(self) -> torch.Tensor:
        return self.pipe._unsee_token_mask(self.prompts, self.negatives, self.images_per_prompt)

    def attention_modules(self, cross: bool) -> list[str]:
        return attention_module_names(self.unet, cross=cross)


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
        if isinstance(as_guidance(guidance), Guidance):  # one method (or one diffusers guider) on its own
            guidance = [guidance]
        bound = inspect.signature(base_call).bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}) or {})
        scale = call.get("guidance_scale")
        has_negative = call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None
        if not isinstance(scale, bool) and isinstance(scale, (int, float)) and math.isfinite(scale):
            methods = plan(list(guidance), has_negative, scale)
        else:
            plan(list(guidance), has_negative, None)  # a bad entry is named first
            raise GuidanceError(f"guidance_scale must be a finite number, got {scale!r}")

        context = PipelineCall(self, call)
        runs = [method.prepare(context) for method in methods]  # every check and encoding, before any denoising
        combiner = next(run for run, method in zip(runs, methods) if method.contract.combines)
        needs_uncond = any(run.needs_uncond for run in runs)
        if getattr(self.unet.config, "time_cond_proj_dim", None) is not None and needs_uncond:
            raise GuidanceError("this UNet is guidance-distilled (time_cond_proj_dim): it has no unconditional branch")
        state = GuidedStep(self, runs, combiner, diffusers_cfg=needs_uncond,
                           guidance_rescale=float(call.get("guidance_rescale") or 0.0))
        # diffusers batches the unconditional rows when do_classifier_free_guidance says so, and its u + w (c - u)
        # returns our guided prediction for any finite w: the pipeline keeps the CFG scale in effect for callbacks
        if "guidance_rescale" in call:
            call["guidance_rescale"] = 0.0  # applied to the guided prediction by GuidedStep
        contracts = [m.contract for m in methods]
        if any(c.attention_negative for c in contracts) and not any(c.sets_unconditional for c in contracts):
            call["negative_prompt"] = None  # the negative acts inside attention only
            if "negative_prompt_2" in call:
                call["negative_prompt_2"] = None
        with self._unsee_guided(state):
            output = base_call(**call)
        if call.get("return_dict", True) and not isinstance(output, tuple):
            output.guidance_report = state.report
        return output

    @contextlib.contextmanager
    def _unsee_guided(self, state: GuidedStep):
        registry = HookRegistry.check_if_exists_or_initialize(self.unet)
        registry.register_hook(GuidedUNetHook(state), HOOK_NAME)
        scheduler = self.scheduler
        stack = contextlib.ExitStack()
        try:
            controlnet = getattr(self, "controlnet", None)
            if controlnet is not None:  # ControlNet pipelines (one ControlNet or a MultiControlNetModel)
                control_registry = HookRegistry.check_if_exists_or_initialize(controlnet)
                control_registry.register_hook(GuidedControlNetHook(state), HOOK_NAME)
                stack.callback(control_registry.remove_hook, HOOK_NAME, recurse=False)
            if state.edits:
                stack.enter_context(installed_processors(self.unet, state.edits))
            if state.join is not None:
                stack.enter_context(state.join.installed())
            if state.stepper is not None:
                # diffusers passes ``generator`` only to a step whose signature names it
                def step(model_output, timestep, sample, *args, generator=None, return_dict=True, **kwargs):
                    return state.scheduler_step(scheduler, model_output, timestep, sample, generator=generator,
                                                return_dict=return_dict)

                scheduler.step = step
            self._unsee_step = state
            yield
        finally:
            self.__dict__.pop("_unsee_step", None)
            if state.stepper is not None:
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
