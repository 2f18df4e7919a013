"""Processes: how many a launcher started, which one this is, accelerate's state for a run, and work done on the
main process alone (data-parallel training through ``accelerate``; see ``draws_per_step``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .errors import ConfigError, TrainingError

__all__ = ["launched_processes", "process_rank", "launch_problem", "process_state", "accelerator_session",
           "check_draws", "draw_seed", "on_main_process"]

#: launchers' environment variables that give the number of processes started
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_int(names: Sequence[str]) -> Optional[int]:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def launched_processes() -> int:
    """How many processes the launcher (torchrun, ``accelerate launch``, mpirun) started: 1 without one."""
    return max(1, _env_int(_WORLD_SIZE_VARIABLES) or 1)


def process_rank() -> int:
    """This process's rank as its launcher set it (0 without one); rank 0 is the main process, the one that writes."""
    return _env_int(_RANK_VARIABLES) or 0


def launch_problem(command: str = "erase") -> Optional[str]:
    """Why this launch cannot train (or run ``unsee COMMAND``) as the user asked (one line naming the fix), or None.

    ``accelerate launch --cpu --num_processes N`` starts one process whatever N is (accelerate's simple launcher:
    it sets ``MASTER_ADDR`` for N > 1 and no rank); that process would train alone.
    """
    ranked = any(os.environ.get(name) for name in (*_RANK_VARIABLES, "LOCAL_RANK"))
    if _env_flag("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR") and not ranked:
        return ("accelerate launch --cpu starts one process whatever --num_processes says; start N CPU processes with "
                f"torchrun --nproc_per_node N -m unsee.cli {command} ... (or accelerate launch --multi_gpu "
                f"--num_processes N -m unsee.cli {command} ... --device cpu)")
    return None


def _wants_cpu(device: Optional[str]) -> bool:
    return _env_flag("ACCELERATE_USE_CPU") or (device is not None and torch.device(device).type == "cpu")


def process_state(device: Optional[str] = None, command: str = "erase") -> Any:
    """accelerate's ``PartialState`` for training on ``device`` (``"cpu"``, or None for the processes' GPUs), with
    the process group of a multi-process launch set up. Several processes on a machine where accelerate finds no
    GPU backend train on the CPU with gloo (accelerate would make each a world of its own). Raises
    :class:`ConfigError` for a launch that would not train as asked (:func:`launch_problem`), or a device other
    than the one the processes already use."""
    from accelerate.state import PartialState

    problem = launch_problem(command)
    if problem is not None:
        raise ConfigError(problem)
    cpu = _wants_cpu(device)
    if PartialState._shared_state:
        state = PartialState()
        wanted = "cpu" if cpu else (torch.device(device).type if device is not None else state.device.type)
        if state.num_processes > 1 and state.device.type != wanted:
            raise ConfigError(f"these {state.num_processes} processes train on {state.device.type}; every job of a "
                              f"multi-process run trains on the same device, and this one asks for {device!r}")
        return state
    state = PartialState(cpu=cpu)
    if launched_processes() > 1 and state.num_processes == 1 and not cpu:
        PartialState._reset_state()  # nothing distributed was set up: no GPU backend here, so gloo on the CPU
        state = PartialState(cpu=True)
    if state.num_processes != launched_processes():
        raise ConfigError(f"the launcher started {launched_processes()} processes and accelerate set up "
                          f"{state.num_processes}; launch with torchrun --nproc_per_node N -m unsee.cli {command} ...")
    return state


@contextlib.contextmanager
def accelerator_session(config: Any) -> Iterator[Any]:
    """An ``Accelerator`` for one training run of ``config`` (its ``device`` and ``mixed_precision``); accelerate's
    process-wide state is put back as it was found.

    accelerate keeps one state per process and refuses another ``mixed_precision`` (or the CPU after a GPU) once
    it is set; a run sets up its own, so trainers with different settings can follow one another (and an
    ``Accelerator`` of the caller's keeps its settings). The process group of a multi-process launch stays.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    saved_partial, saved_state = dict(PartialState._shared_state), dict(AcceleratorState._shared_state)
    AcceleratorState._shared_state.clear()
    if saved_partial.get("num_processes", 1) == 1:
        PartialState._shared_state.clear()
    try:
        state = process_state(config.device)
        yield Accelerator(cpu=state.device.type == "cpu", mixed_precision=config.mixed_precision,
                          device_placement=False)
    finally:
        AcceleratorState._shared_state.clear()
        AcceleratorState._shared_state.update(saved_state)
        if PartialState._shared_state.get("num_processes", 1) == 1:
            PartialState._shared_state.clear()
            PartialState._shared_state.update(saved_partial)


def check_draws(draws_per_step: Optional[int], processes: int) -> None:
    """Raise :class:`ConfigError` when ``draws_per_step`` does not split over ``processes`` processes."""
    if draws_per_step is not None and draws_per_step % processes:
        raise ConfigError(f"draws_per_step={draws_per_step} does not split over {processes} processes; give a multiple "
                          f"of {processes} (--set draws_per_step=...) or leave it unset (one draw per process)")


def draw_seed(seed: int, draw: int) -> int:
    """The seed of draw ``draw``'s generator (see ``draws_per_step``): ``seed`` itself for draw 0, else a 63-bit hash
    of both (no two (seed, draw) pairs share a stream, unlike ``seed + draw``)."""
    if draw == 0:
        return seed
    digest = hashlib.sha256(f"unsee-draw:{seed}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def on_main_process(work: Callable[[], Any], what: str) -> None:
    """Run ``work`` on the main process only; with several processes, each raises when it failed there.

    The error is the main process's own there, and elsewhere a :class:`ConfigError` (when it was one) or a
    :class:`TrainingError` with its message, so that every process ends the same way instead of waiting for a
    process that is gone. Every process must call it at the same point (it is a collective).
    """
    from accelerate.state import PartialState

    state = PartialState() if PartialState._shared_state else None
    main = state is None or state.is_main_process
    failure: Optional[BaseException] = None
    if main:
        try:
            work()
        except Exception as error:
            failure = error
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [None if failure is None else (isinstance(failure, ConfigError), str(failure))]
        broadcast_object_list(shared, from_process=0)
        if not main and shared[0] is not None:
            config_error, message = shared[0]
            raise (ConfigError if config_error else TrainingError)(
                message if config_error else f"the main process failed {what}: {message}")
    if failure is not None:
        raise failure
