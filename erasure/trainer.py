"""The trainer loop, written once for every method (:class:`Trainer`), and its progress events.

:mod:`unsee.erasure.base` states the contract; the pieces the loop uses are small modules of their own:
:mod:`~unsee.erasure.snapshot` (the pipeline handed back as it came), :mod:`~unsee.erasure.checkpoints`,
:mod:`~unsee.erasure.processes` (data parallel through accelerate), :mod:`~unsee.erasure.precision` (float32 masters
of half-precision weights) and :mod:`~unsee.erasure.adapter_builders` (the adapter from the trained tensors).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from unsee.adapters import Adapter, AdapterError

from .adapter_builders import delta_adapter_from_weights, lora_adapter_from_peft
from .checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, changed_settings, check_draw_count, check_resumable,
                          load_checkpoint, save_checkpoint)
from .conditioning import Conditioning
from .config import TrainerConfig
from .errors import ConfigError, TrainingError
from .fields import DTYPES
from .precision import MasterWeights
from .processes import accelerator_session, check_draws, draw_seed, on_main_process
from .sampling import Trajectory, epsilon_from_output
from .snapshot import PipelineSnapshot

__all__ = ["Trainer", "Progress", "ProgressCallback"]


@dataclass(frozen=True)
class Progress:
    """A progress event. ``phase`` is ``"setup"`` (data generation, saliency mask...) or ``"train"``."""

    phase: str
    step: int
    total: int
    loss: Optional[float] = None
    message: str = ""


ProgressCallback = Callable[[Progress], None]


class Trainer:
    """Base class of the erasure trainers; :mod:`unsee.erasure.base` states the contract it keeps.

    Subclasses set ``config_class`` and implement :meth:`select_parameters`, :meth:`setup` and
    :meth:`training_step`; they may override :meth:`adjust_gradients` (e.g. SalUn's mask),
    :meth:`extra_state` (method data kept in checkpoints, handed back to :meth:`setup` on resume),
    :meth:`training_summary`, and :meth:`artifact_names` / :meth:`write_artifact` (files written next to the
    adapter, e.g. SalUn's mask). ``@register_method(name, summary=...)`` (:mod:`unsee.erasure.registry`) gives the
    class its name on the CLI, in the demo and in job files.

    While :meth:`train` runs, these attributes are set: ``pipe``, ``unet`` (the bare UNet), ``trained_module``
    (the component named by ``trained_component``: the UNet, or the text encoder for AdvUnlearn), ``model``
    (it as prepared by ``accelerate``: call it for predictions that need gradients), ``accelerator``,
    ``device``, ``generator`` (the CPU generator of the draw being computed, see ``draws_per_step``: every random
    number of a step comes from it, directly or through :meth:`randn` and :meth:`randint`) and ``params`` (name ->
    trained parameter). A method that carries values from one step to the next names them in :attr:`draw_state`.
    A method whose steps sample x_t with a DDIM run takes it through :meth:`trajectory`, which serves one run to
    ``trajectory_reuse`` consecutive steps.
    """

    config_class: ClassVar[type] = TrainerConfig
    #: a gradient mask (trained tensor name -> bool tensor) applied by :meth:`adjust_gradients`; None: none
    mask: Optional[dict[str, torch.Tensor]] = None
    #: leave tensors the training did not change out of a delta adapter
    drop_unchanged: ClassVar[bool] = False
    #: the pipeline component whose weights are trained ("unet", or "text_encoder" for AdvUnlearn)
    trained_component: ClassVar[str] = "unet"
    #: attributes that :meth:`training_step` carries from one step to the next (AdvUnlearn's latest adversarial
    #: prefix): each draw of ``draws_per_step`` keeps its own, as it keeps its own generator, and checkpoints hold
    #: every draw's
    draw_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: TrainerConfig) -> None:
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()  # fields may have been changed since construction
        self.config = config
        self.params: dict[str, nn.Parameter] = {}
        self.losses: list[float] = []
        self._originals: dict[str, torch.Tensor] = {}
        self._lora = False
        self._device_mask: dict[str, torch.Tensor] = {}

    # -- what a method defines ---------------------------------------------------------------

    @property
    def method(self) -> str:
        """The method name stored in the adapter, e.g. ``"esd-u"``."""
        return self.config.method

    @property
    def output_kind(self) -> str:
        return getattr(self.config, "kind", "delta")

    def select_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters of the trained component (the UNet unless ``trained_component`` says otherwise) to
        train (full-weight training), name -> parameter, in a stable order."""
        raise NotImplementedError

    def lora_config(self, unet: nn.Module) -> Any:
        """A peft ``LoraConfig`` for LoRA output (only methods with ``kind="lora"`` need it)."""
        raise ConfigError(f"{self.method} cannot train a LoRA adapter; use kind='delta'")

    def setup(self, pipe: Any, state: Optional[dict] = None) -> None:
        """Work before the first step, with the original weights: encode prompts, generate data, masks...

        ``state`` is what :meth:`extra_state` returned when the checkpoint being resumed was written (None
        on a fresh run): restore from it instead of recomputing.
        """

    def training_step(self, step: int) -> torch.Tensor:
        """The loss of one optimisation step (a scalar with gradients on the trained parameters)."""
        raise NotImplementedError

    def adjust_gradients(self) -> None:
        """Called after the backward pass, before the optimizer step. By default: when the method set ``mask``
        (name -> bool tensor, SalUn and ANT), each trained tensor's gradient is multiplied by its mask; with
        zero gradients Adam's moments and updates stay zero, so the entries outside the mask stay bit-identical."""
        if self.mask is None:
            return
        for name, param in self.params.items():
            if param.grad is None:
                continue
            if name not in self._device_mask:
                self._device_mask[name] = self.mask[name].to(param.device, param.grad.dtype)
            param.grad.mul_(self._device_mask[name])

    def extra_state(self) -> dict:
        """Method data to keep in checkpoints (tensors, numbers, strings, lists, dicts only)."""
        return {}

    def training_summary(self) -> dict:
        """Method-specific entries for the adapter's ``training`` metadata."""
        return {}

    @classmethod
    def artifact_names(cls, config: TrainerConfig) -> tuple[str, ...]:
        """The files besides the adapter that a run with ``config`` produces (e.g. ``("mask",)``); a job writes
        artifact ``name`` with :meth:`write_artifact` to ``<adapter>.<name>.safetensors``. None by default."""
        return ()

    def write_artifact(self, name: str, path: Path, adapter_file: str) -> None:
        """Write the artifact ``name`` (one of :meth:`artifact_names`) of the finished run to ``path``, atomically;
        ``adapter_file`` is the adapter's file name, recorded in the artifact."""
        raise ValueError(f"{self.method} writes no artifact {name!r}")

    # -- helpers for methods -----------------------------------------------------------------

    def report(self, phase: str, step: int, total: int, loss: Optional[float] = None, message: str = "") -> None:
        if self._progress is not None:
            self._progress(Progress(phase, step, total, loss, message))

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal noise from the run's generator (drawn on the CPU: the same on every device)."""
        return torch.randn(shape, generator=self.generator).to(self.device, self.unet.dtype)

    def randint(self, low: int, high: int, size: Sequence[int] = ()) -> torch.Tensor:
        """Integers in ``[low, high)`` from the run's generator."""
        return torch.randint(low, high, tuple(size), generator=self.generator)

    def draw_index(self, n: int) -> int:
        """A random index in ``[0, n)`` (no random number is drawn when ``n`` is 1)."""
        return 0 if n == 1 else int(self.randint(0, n))

    def cycle_index(self, step: int, n: int) -> int:
        """Which of ``n`` items (a run's erased concepts) step ``step``'s current draw trains on: the draws of the run,
        in order (step by step, and within a step draw by draw), go through the items in cycles of ``n``, each cycle
        in its own shuffled order, so that every item comes up equally often (within one) at any point of the run.
        The orders come from the seed alone (not from the run's generator: its stream is the same for any ``n``, and
        a resumed run continues the same cycle); 0 for ``n`` = 1."""
        if n == 1:
            return 0
        position = step * self._draws_total + self._draw_number
        cycle, offset = divmod(position, n)
        digest = hashlib.sha256(f"unsee-cycle:{self.config.seed}:{cycle}".encode()).digest()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
        return int(order[offset])

    @property
    def trajectory_reuse(self) -> int:
        """Training steps one sampled DDIM trajectory serves (the config's ``trajectory_reuse``; 1 without it)."""
        return getattr(self.config, "trajectory_reuse", 1)

    def trajectory_number(self, step: int) -> int:
        """Which trajectory of its draw serves step ``step`` (``step // trajectory_reuse``): the position to pass
        to :meth:`cycle_index` for what the trajectory is conditioned on (with reuse 1, the step itself)."""
        return step // self.trajectory_reuse

    def trajectory(self, step: int, sample: Callable[[int], Trajectory]) -> tuple[Trajectory, int]:
        """The DDIM trajectory that serves step ``step`` of the current draw, and the step's place in its ``stops``.

        ``sample(r)`` makes a trajectory for ``r`` = ``trajectory_reuse`` steps: the method's draws for them from
        the draw's generator (its prompts, a stop per step, fresh noise, in the order a step of reuse 1 draws them)
        and one DDIM run through every stop. It is called at the first step a trajectory serves (every r-th step;
        always r steps' worth, so that a run extended on resume samples what an uninterrupted one does); the
        steps after it take their place in the stored one. With reuse 1 every step samples its own, as the papers
        do. Each draw (``draws_per_step``) keeps its own trajectory, in checkpoints too.
        """
        number, place = divmod(step, self.trajectory_reuse)
        current = self._trajectories.get(self._draw_number)
        if current is None or current.number != number:
            current = sample(self.trajectory_reuse)
            current.number = number
            self._trajectories[self._draw_number] = current
        return current, place

    def draw(self, choices: Sequence[Conditioning]) -> Conditioning:
        """One of ``choices`` at random (no random number is drawn when there is only one)."""
        return choices[self.draw_index(len(choices))]

    @contextlib.contextmanager
    def frozen_teacher(self) -> Iterator[nn.Module]:
        """The frozen original model, in place: the trained tensors' original values are swapped in (or the
        LoRA adapter is disabled) for the duration of the block; yields the bare UNet. Use under no_grad."""
        unet = self.unet
        if self._lora:
            unet.disable_adapters()
            try:
                yield unet
            finally:
                unet.enable_adapters()
            return
        current = {}
        for name, param in self.params.items():
            current[name] = param.data
            param.data = self._originals[name]
        try:
            yield unet
        finally:
            for name, param in self.params.items():
                param.data = current[name]

    def loss_view(self, output: torch.Tensor, x_t: torch.Tensor, t: Union[int, torch.Tensor],
                  scheduler: Any) -> torch.Tensor:
        """A UNet output as the loss compares it: as it is (``loss_space="output"``, the default), or the noise
        prediction it stands for (``loss_space="epsilon"``, :func:`epsilon_from_output`), for methods that have
        the setting."""
        if getattr(self.config, "loss_space", "output") == "epsilon":
            return epsilon_from_output(scheduler, output, x_t, t)
        return output

    def default_resolution(self, pipe: Any) -> tuple[int, int]:
        """The pipeline's default image size (height, width)."""
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return size, size

    def image_size(self, pipe: Any) -> tuple[int, int]:
        """Image (height, width): ``config.resolution`` or the pipeline's default, checked against the VAE's factor."""
        height, width = self.default_resolution(pipe)
        resolution = getattr(self.config, "resolution", None)
        if resolution is not None:
            height = width = resolution
        if height % pipe.vae_scale_factor:
            raise ConfigError(f"resolution {height} is not a multiple of the VAE's scale factor {pipe.vae_scale_factor}")
        return height, width

    def latent_size(self, pipe: Any) -> tuple[int, int, int]:
        """(channels, height, width) of the UNet's latents for :meth:`image_size`."""
        height, width = self.image_size(pipe)
        factor = pipe.vae_scale_factor
        return pipe.unet.config.in_channels, height // factor, width // factor

    def ddim_scheduler(self, steps: int) -> Any:
        """A fresh ``DDIMScheduler`` with the pipeline's noise schedule, set to ``steps`` steps on the run's device."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    # -- the training loop -------------------------------------------------------------------

    def train(
        self,
        pipe: Any,
        progress: Optional[ProgressCallback] = None,
        checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
        resume: bool = False,
    ) -> Adapter:
        """Train on ``pipe`` and return the adapter; the pipeline is handed back exactly as it came.

        Every parameter and buffer of the pipeline's components comes back as the same tensor with the same
        values, dtype and device (``config.dtype`` and the training device apply to copies), with its
        ``requires_grad`` flag and gradient; the UNet's attention processors are the same objects; no LoRA
        layers are left. This holds after an error too.

        Args:
            pipe: an SD 1.x/2.x or SDXL pipeline (``unsee.load_pipeline`` or a diffusers pipeline).
            progress: called with a :class:`Progress` event during setup and after every step.
            checkpoint_dir: folder for ``checkpoint.pt`` (written every ``config.checkpoint_every`` steps and at
                the end); None: no checkpoints.
            resume: continue from the checkpoint in ``checkpoint_dir`` when there is one. Its settings must
                match this config except :data:`~unsee.erasure.checkpoints.RESUMABLE_CHANGES` (``steps``, ``lr``,
                ``checkpoint_every``, ``device``, ``dtype``, ``mixed_precision``), which take this config's
                values from the resumed step on (Adam keeps its moments; its learning rate becomes ``lr``).

        Raises:
            ConfigError: invalid settings, a checkpoint written with other settings (or another number of draws
                per step), a launch that would not train as asked (``accelerate launch --cpu --num_processes N``
                starts one process), or ``draws_per_step`` that does not split over the processes.
            TrainingError: a non-finite loss (the last good checkpoint is kept), or an unusable pipeline.
        """
        from accelerate.utils import gather_object

        config = self.config
        config.validate()
        if not isinstance(getattr(pipe, "unet", None), nn.Module):
            raise TrainingError(f"{type(pipe).__name__} has no UNet; erasure trainers need an SD 1.x/2.x or SDXL pipeline")
        if getattr(pipe.unet, "peft_config", None):
            raise TrainingError("the UNet already has LoRA adapters; unload them (pipe.unload_lora_weights()) first")
        if resume and checkpoint_dir is None:
            raise ConfigError("resume=True needs the checkpoint_dir to resume from")
        checkpoint = load_checkpoint(checkpoint_dir) if (resume and checkpoint_dir is not None) else None
        if checkpoint is not None:
            check_resumable(checkpoint, config, Path(checkpoint_dir))

        with accelerator_session(config) as accelerator:
            return self._train(pipe, accelerator, progress, checkpoint, checkpoint_dir, gather_object)

    def _train(self, pipe: Any, accelerator: Any, progress: Optional[ProgressCallback], checkpoint: Optional[dict],
               checkpoint_dir: Optional[Union[str, os.PathLike]], gather_object: Callable) -> Adapter:
        config = self.config
        # one process may train on any device it is told; several use accelerate's per-process device
        device = torch.device(config.device) if config.device and accelerator.num_processes == 1 else accelerator.device
        if device.type == "cpu":  # accelerate names a process's CPU "cpu:<rank>": moving there would copy every tensor
            device = torch.device("cpu")
        self.accelerator, self.device, self._progress = accelerator, device, progress
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._elapsed_before = 0.0
        trained = getattr(pipe, self.trained_component, None)
        if not isinstance(trained, nn.Module):
            raise TrainingError(f"{self.method} trains the pipeline's {self.trained_component}, and "
                                f"{type(pipe).__name__} has none")
        draws = self._plan_draws(accelerator.num_processes, accelerator.process_index)
        self._draws_total, self._draw_number = len(draws) * accelerator.num_processes, draws[0]
        if checkpoint is not None:
            check_draw_count(checkpoint, len(draws) * accelerator.num_processes, Path(checkpoint_dir))
        self._resume_changes = changed_settings(checkpoint, config) if checkpoint is not None else {}
        snapshot = PipelineSnapshot(pipe)  # what goes back to the caller, whatever happens below
        self.pipe, self.unet = pipe, pipe.unet
        self.trained_module = trained
        # setup draws from the run's generator on every process alike (the same data, anchors, masks everywhere);
        # draw 0 goes on with it, the other draws have generators of their own (see the module docstring)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.losses = []
        self._device_mask = {}
        self._trajectories = {}  # draw -> the trajectory serving its steps (see trajectory())
        self.params, self._originals, self._lora = {}, {}, False  # nothing of an earlier run is restored
        started = time.perf_counter()
        was_training = {module: module.training for module in {self.unet, trained}}
        model = None
        try:
            snapshot.move(device, DTYPES[config.dtype] if config.dtype is not None else None)
            for module in snapshot.modules:
                module.requires_grad_(False)
            for module in was_training:
                module.eval()  # no dropout: the teacher and the student see the same function
            self.setup(pipe, checkpoint.get("extra") if checkpoint is not None else None)
            self._share_mask()
            self._draw_generators = {j: self.generator if j == 0 else torch.Generator().manual_seed(
                draw_seed(config.seed, j)) for j in draws}
            self._draw_values = {j: {name: getattr(self, name, None) for name in self.draw_state} for j in draws}
            self._attach_trainable()
            self._masters = MasterWeights(self.params)  # Adam steps float32 copies of half-precision tensors
            optimizer = torch.optim.Adam(self._masters.optimized(), lr=config.lr, weight_decay=0.0)
            model, optimizer = accelerator.prepare(trained, optimizer)
            self.model = model
            start = 0
            if checkpoint is not None:
                start = self._restore(checkpoint, optimizer)

            for step in range(start, config.steps):
                optimizer.zero_grad(set_to_none=True)
                losses = []
                for number, j in enumerate(draws):
                    # gradients are averaged across processes once, at the backward pass of the last draw here
                    last = number == len(draws) - 1
                    with (contextlib.nullcontext() if last else accelerator.no_sync(model)), self._draw(j):
                        loss = self.training_step(step)
                        losses.append(loss.detach().float())
                        accelerator.backward(loss if len(draws) == 1 else loss / len(draws))
                mean = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
                value = float(accelerator.reduce(mean, reduction="mean"))
                if not math.isfinite(value):
                    raise TrainingError(self._nonfinite_message(value, step))
                self.adjust_gradients()
                self._masters.pull_gradients()
                optimizer.step()
                self._masters.push()
                self.losses.append(value)
                self.report("train", step + 1, config.steps, value)
                every = config.checkpoint_every
                if self._checkpoint_dir is not None and (step + 1 == config.steps or (every and (step + 1) % every == 0)):
                    self._save_checkpoint(step + 1, optimizer, started, gather_object)

            if not all(bool(torch.isfinite(p.detach()).all()) for p in self.params.values()):
                raise TrainingError(self._nonfinite_message(float("nan"), config.steps - 1, what="the trained weights"))
            summary = {
                "steps": config.steps,
                "losses": self.losses,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None,
                "seconds": round(time.perf_counter() - started + self._elapsed_before, 3),
                "resumed_from_step": start if checkpoint is not None else None,
                **({"resumed_with": self._resume_changes} if self._resume_changes else {}),
                "device": str(device),
                "num_processes": accelerator.num_processes,
                "draws_per_step": len(draws) * accelerator.num_processes,
                "trained_tensors": len(self.params),
                "trained_parameters": sum(p.numel() for p in self.params.values()),
                **self.training_summary(),
            }
            return self._make_adapter(summary)
        finally:
            if model is not None:
                accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            try:
                self._restore_pipeline()
            finally:
                snapshot.restore()  # the caller's own tensors, flags, gradients and processors
                for module, mode in was_training.items():
                    module.train(mode)
                accelerator.free_memory()
                self.model = None

    # -- internals ---------------------------------------------------------------------------

    _progress: Optional[ProgressCallback] = None
    _checkpoint_dir: Optional[Path] = None
    _elapsed_before: float = 0.0
    _resume_changes: dict = {}
    _draws_total: int = 1
    _draw_number: int = 0
    _trajectories: dict[int, Trajectory] = {}

    def _attach_trainable(self) -> None:
        """Choose the trained tensors: LoRA layers added with peft, or a subset of the UNet's own parameters."""
        if self.output_kind == "lora":
            # peft draws the down weights from the global generator: seed it from the config for this call only,
            # so a LoRA trainer is deterministic for its seed whatever ran before it
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(self.config.seed)
                self.unet.add_adapter(self.lora_config(self.unet))
            self._lora = True
            self.params = {n: p for n, p in self.unet.named_parameters() if ".lora_" in n}
            for param in self.params.values():  # peft creates them in the UNet's dtype; train in it as well
                param.requires_grad_(True)
            self._originals = {}
        else:
            self._lora = False
            self.params = self.select_parameters(self.trained_module)
            # the trained subset's original tensors stay as they are (the teacher and the restore use them);
            # training writes to copies
            self._originals = {}
            with torch.no_grad():
                for name, param in self.params.items():
                    self._originals[name] = param.data
                    param.data = param.data.clone()
            for param in self.params.values():
                param.requires_grad_(True)
        if not self.params:
            raise TrainingError(f"{self.method} selects no parameters of this UNet; check the variant")

    def _restore_pipeline(self) -> None:
        """Take the trained tensors out (their originals back in, the LoRA layers removed); the caller's
        tensors, flags and gradients come back with the snapshot ``train`` took."""
        with torch.no_grad():
            if self._lora:
                self.unet.unload_lora()  # removes the peft layers: the base weights were never touched
                self._lora = False
            for name, param in self.params.items():
                if name in self._originals:
                    param.data = self._originals[name]  # the original tensor itself

    def _make_adapter(self, summary: dict) -> Adapter:
        concepts = [self.config.concept, *getattr(self.config, "concepts", ())]  # several: ESD, SPM
        common = dict(method=self.method, concepts=concepts, hyperparameters=self.config.to_dict(),
                      training=summary)
        try:
            if self._lora:
                return lora_adapter_from_peft(self.unet, "unet", **common)
            trained = {n: p.detach() for n, p in self.params.items()}
            return delta_adapter_from_weights(self._originals, trained, self.trained_component, model=self.trained_module,
                                              drop_unchanged=self.drop_unchanged, **common)
        except AdapterError as error:
            raise TrainingError(f"training produced no usable adapter: {error}") from error

    def _nonfinite_message(self, value: float, step: int, what: str = "the loss") -> str:
        lower = f"{self.config.lr / 10:.3g}"
        precision = "" if self.config.dtype in (None, "float32") else " or dtype float32 (--dtype float32)"
        if self._checkpoint_dir is not None and (self._checkpoint_dir / CHECKPOINT_NAME).exists():
            # RESUMABLE_CHANGES allows lr and dtype to change on resume, so this advice works as written
            advice = (f"the last good checkpoint in {self._checkpoint_dir} is kept; resume from it with a lower "
                      f"learning rate: the same settings with lr={lower} and resume=True (unsee erase: the same "
                      f"command with --resume --lr {lower}){precision}")
        else:
            advice = f"no checkpoint was written; start again with a lower learning rate (lr={lower}){precision}"
        return (f"{self.method}: {what} became {value} at step {step + 1} of {self.config.steps}; training stopped "
                f"before applying it ({advice})")

    # -- draws and processes --------------------------------------------------------------------

    def _plan_draws(self, processes: int, index: int) -> list[int]:
        """The draws (of ``draws_per_step``) this process computes: a block of consecutive ones."""
        check_draws(self.config.draws_per_step, processes)
        each = (self.config.draws_per_step or processes) // processes
        return list(range(index * each, (index + 1) * each))

    @contextlib.contextmanager
    def _draw(self, draw: int) -> Iterator[None]:
        """:meth:`training_step` runs for draw ``draw``: its generator and its :attr:`draw_state` are in place."""
        self.generator = self._draw_generators[draw]
        self._draw_number = draw
        values = self._draw_values[draw]
        for name in self.draw_state:
            setattr(self, name, values[name])
        try:
            yield
        finally:
            for name in self.draw_state:
                values[name] = getattr(self, name, None)

    def _share_mask(self) -> None:
        """With several processes, every one takes the main process's gradient mask (computed by each alike; on GPUs
        a last-bit difference could move an entry across the threshold, and the processes would drift apart)."""
        if self.mask is None or self.accelerator.num_processes == 1:
            return
        for name in sorted(self.mask):
            shared = self.mask[name].to(self.device, torch.uint8)
            torch.distributed.broadcast(shared, src=0)
            self.mask[name] = shared.to("cpu").bool()

    def _save_checkpoint(self, step: int, optimizer: Any, started: float, gather_object: Callable) -> None:
        """Every process calls it (it gathers the draws' states); the main process writes the file."""
        # never write non-finite weights over a good checkpoint (the weights are the same in every process)
        if not all(bool(torch.isfinite(p.detach()).all()) for p in self.params.values()):
            raise TrainingError(self._nonfinite_message(float("nan"), step - 1, what="the trained weights"))
        # every draw's generator and carried state, in draw order (each process holds a block of consecutive draws)
        # (and, with trajectory_reuse > 1, the trajectory each draw is serving)
        reuse = self.trajectory_reuse > 1
        draws = sorted(gather_object([(j, self._draw_generators[j].get_state(), self._draw_values[j],
                                       self._trajectories[j].state() if reuse and j in self._trajectories else None)
                                      for j in self._draw_generators]), key=lambda item: item[0])

        def write() -> None:
            state = {
                "format": CHECKPOINT_FORMAT,
                "method": self.method,
                "config": self.config.to_dict(),
                "step": step,
                "trained": {n: t.to("cpu", copy=True) for n, t in self._masters.values().items()},
                "optimizer": optimizer.state_dict(),
                "rng": {
                    "generators": [generator for _, generator, _, _ in draws],
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "python": random.getstate(),
                },
                **({"draw_state": [values for _, _, values, _ in draws]} if self.draw_state else {}),
                **({"trajectories": [trajectory for _, _, _, trajectory in draws]} if reuse else {}),
                "losses": list(self.losses),
                "elapsed": time.perf_counter() - started + self._elapsed_before,
                "extra": self.extra_state(),
            }
            save_checkpoint(state, self._checkpoint_dir)

        on_main_process(write, "writing the checkpoint")
        self.accelerator.wait_for_everyone()  # every process: a barrier on the main process alone desynchronises them

    def _restore(self, checkpoint: dict, optimizer: Any) -> int:
        trained = checkpoint["trained"]
        if set(trained) != set(self.params):
            raise TrainingError("the checkpoint trains other tensors than this run; it belongs to another model or variant")
        self._masters.load(trained)
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group in optimizer.param_groups:  # the learning rate is this run's (it may change on resume)
            group["lr"] = self.config.lr
        rng = checkpoint["rng"]
        generators = rng["generators"]  # one per draw (checked against this run's draws before setup)
        carried = checkpoint.get("draw_state") or []
        trajectories = checkpoint.get("trajectories") or []
        for j, generator in self._draw_generators.items():
            generator.set_state(generators[j])
            if j < len(carried):
                self._draw_values[j].update({k: v for k, v in carried[j].items() if k in self.draw_state})
            if j < len(trajectories) and trajectories[j] is not None:
                self._trajectories[j] = Trajectory.from_state(trajectories[j], self.device)
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        python_state = rng["python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        self.losses = list(checkpoint["losses"])
        self._elapsed_before = float(checkpoint.get("elapsed", 0.0))
        return int(checkpoint["step"])
