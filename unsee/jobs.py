"""Scripted training: erasure jobs (concepts x methods) from one config, run one after another, one report.

    from unsee.jobs import run_jobs
    report = run_jobs({"model": "toy", "steps": 200, "out_dir": "adapters",
                       "jobs": [{"method": ["esd-u", "salun"], "concept": ["circle", "red"]}]})

The same config as a YAML or JSON file: ``unsee erase --config jobs.yaml`` or ``run_jobs("jobs.yaml")``.

Keys (every ``unsee erase`` flag has one, spelled with underscores):

- ``method`` (a name of ``unsee.erasure.METHODS``: esd-x, esd-u, esd-all, esd-x-strict, salun, spm, advunlearn, ant,
  uce, rece; uce, rece, the ESD variants and spm erase ``concept`` and the list ``concepts`` in one run)
  and ``concept``: a value or a list; a job with lists runs every (concept, method) pair;
- ``model`` ("toy", a hub id, a local folder or a single file), ``model_config`` (configs folder for a
  single file), ``dtype``, ``device``;
- ``preset``: ``toy`` or ``paper``, the settings a job starts from (``unsee.toy.presets``; default:
  ``toy`` for the toy model, ``paper`` otherwise); the job's own settings win;
- ``out`` (the adapter file; default ``<out_dir>/<method>-<concept>.safetensors``), ``checkpoint_dir``
  (default ``<out>.ckpt``: this run's checkpoint is removed after success, and the folder with it when it is
  left empty; nothing else in it is ever deleted), ``resume``, ``overwrite``;
- ``grid``: prompts in the before/after image grid written next to the adapter as ``<name>.grid.png``
  (top row: the model as it was, bottom row: with the adapter, same seeds; default 4, 0 for none, at most
  16);
- any field of the method's config dataclass (``steps``, ``lr``, ``seed``, ``eta``, ``erase_from``, ``kind``,
  ``rank``, ``alpha``, ``mask_fraction``, ``ddim_steps``, ...);
- top level only: ``jobs`` (a list of job entries; without it the top level is the one job), ``out_dir``
  (default: the current folder), ``report`` (the combined JSON report; default ``<out>.json`` for one
  job, ``<fuse>.json`` with ``fuse``, ``<out_dir>/erase-report.json`` for several), ``fuse``: an adapter file
  that, once every job is done, gets all their adapters fused into one (:func:`unsee.fuse.fuse_adapters`; each
  job's own adapter is written as well), and ``fuse_method``: ``stack`` (the default; ``distill`` when every job
  trains a text-encoder adapter), ``mace`` (MACE's refit of
  cross-attention key/value adapters with the job's model's text encoder: :func:`mace_options`; a job whose
  config's ``text_kv_only`` is False is refused before any work) or ``distill`` (a text-encoder delta distilled
  from text-encoder adapters on the job's model: :func:`distill_options`; a job whose config is not
  ``text_encoder_only`` is refused before any work). ``unsee erase
  --concepts FILE`` (or repeated ``--concept``) with a method that erases one concept per run (SalUn, ANT,
  AdvUnlearn), or with ``--fuse``, is such a config: one job per concept, fused.

Top-level keys are defaults for every job (a method-specific key such as ``eta`` only applies to the methods
that have it); a job's own keys win. Everything is validated before any model is loaded: an unknown key or
method, a bad value, two jobs writing the same file all raise :class:`~unsee.erasure.ConfigError`.

Files are never replaced or deleted unless asked for:

- an existing output (the adapter, its ``.README.md`` model card, ``.json`` report, ``.grid.png`` or an artifact such as
  ``.mask.safetensors``) is
  replaced only with ``overwrite: true`` (``--overwrite``); without it the jobs are refused before any
  training, naming the file. One exception: with ``resume: true``, the report of the run being resumed
  (a report whose jobs did not all finish) is replaced;
- a checkpoint folder that holds anything (a checkpoint of an earlier run) is used only with
  ``resume: true`` (``--resume``); a checkpoint path that is a file is refused before training;
- the output folders must be writable (tried before training); missing ones are created.

Every number is checked by the method's config (:func:`unsee.erasure.make_trainer`): finite, and the settings
that cost time or memory bounded, e.g. ``steps`` 1..100000, ``ddim_steps`` 1..1000, ``rank`` 1..1024, ``seed``
0..2**32-1; ``grid`` is 0..16.

Several processes (``torchrun --nproc_per_node N -m unsee.cli erase ...``) train each job data parallel; only the
main process checks and writes files (see :func:`run_jobs`).

Each adapter is written atomically, and so is every artifact its trainer names
(``Trainer.artifact_names(config)``, written by ``trainer.write_artifact``) next to it as
``<name>.<artifact>.safetensors``: e.g. the saliency mask (packed bits) of a SalUn job, or of an ANT job with
``kind: delta``, as ``<name>.mask.safetensors``.

On the embedded toy model the ``toy`` preset gives a job the shapes world's prompts (``unsee.toy.presets``); such a
job is refused on a pipeline that is not the toy model.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from unsee.erasure import METHODS, ConfigError, Progress, Trainer, TrainerConfig, TrainingError, make_trainer
from unsee.erasure.base import (CHECKPOINT_NAME, DTYPES, check_draws, launch_problem, launched_processes,
                                on_main_process, process_rank, process_state)
from unsee.erasure.registry import coerce, config_fields
from unsee.files import atomic_write, is_temporary, model_file_problem, output_problem, remove_stale_temporaries, slug
from unsee.fuse import FUSE_METHODS
from unsee.model_card import card_path, write_model_card
from unsee.toy.presets import WORLD_PROMPT_KEYS, is_toy_pipeline, preset_settings

__all__ = ["Job", "plan_jobs", "run_jobs", "load_job_file", "read_concepts_file", "grid_prompts",
           "before_after_images", "before_after_grid"]

JOB_KEYS = ("method", "concept", "model", "model_config", "out", "checkpoint_dir", "resume", "overwrite", "grid", "preset")
FILE_KEYS = ("jobs", "out_dir", "report", "fuse", "fuse_method")
#: the largest ``--concepts`` file read, in bytes
MAX_CONCEPTS_FILE = 1024 * 1024


def _fixed_fields() -> set[str]:
    """Config fields that the method names fix (ESD's ``variant``): not settings of a job."""
    return {key for method in METHODS.values() for key in method.fixed}


MAX_GRID = 16  # prompts in a before/after grid


@dataclass
class Job:
    """One planned erasure: what to train, on which model, and where the files go."""

    method: str
    config: TrainerConfig
    model: str = "toy"
    model_config: Optional[str] = None
    out: Path = Path("adapter.safetensors")
    checkpoint_dir: Optional[Path] = None
    remove_checkpoint: bool = True
    resume: bool = False
    grid: int = 4
    overwrite: bool = False
    world_prompts: bool = False  # the toy preset gave it the toy world's prompts: it trains on the toy model only
    fuse_into: Optional[Path] = None  # the file every job's adapter is fused into when all are done (``fuse``)
    fuse_method: str = "stack"  # how (``fuse_method``)

    @property
    def grid_path(self) -> Path:
        return self.out.with_suffix(".grid.png")

    @property
    def card_path(self) -> Path:
        """The adapter's model card, ``<name>.README.md`` (:mod:`unsee.model_card`)."""
        return card_path(self.out)

    @property
    def artifact_paths(self) -> dict[str, Path]:
        """The files the trainer writes beside the adapter (``Trainer.artifact_names``), by artifact name:
        ``<name>.<artifact>.safetensors`` (a SalUn job's saliency mask: ``<name>.mask.safetensors``)."""
        names = METHODS[self.method].trainer.artifact_names(self.config)
        return {name: self.out.with_suffix(f".{name}.safetensors") for name in names}

    @property
    def mask_path(self) -> Optional[Path]:
        """The saliency mask's file (SalUn; ANT with ``kind: delta``), or None when the job writes none."""
        return self.artifact_paths.get("mask")

    def describe(self) -> str:
        erase_from = getattr(self.config, "erase_from", None)
        if _erase_from_text(self.config):
            extra = f" from {erase_from!r}"
        else:
            extra = f" in {len(erase_from)} prompts" if erase_from else ""
        more = getattr(self.config, "concepts", ())
        named = f"{self.config.concept!r}" + (f" (and {', '.join(repr(c) for c in more)})" if more else "")
        return f"{self.method} {named}{extra}"


def _erase_from_text(config: Any) -> Optional[str]:
    """The one concept an ESD job erases from; None when it erases everywhere or within a list of prompts."""
    erase_from = getattr(config, "erase_from", None)
    return erase_from if isinstance(erase_from, str) else None


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a number of more than 30 digits"
    return text if len(text) <= 60 else text[:57] + "..."


def load_job_file(path: Union[str, os.PathLike]) -> dict:
    """Read a jobs file (``.yaml``/``.yml`` or ``.json``) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .json")
    except (ValueError, ImportError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"cannot parse {path}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # yaml.YAMLError
        raise ConfigError(f"cannot parse {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings (with an optional 'jobs' list)")
    return data


def _as_list(value: Any, name: str, where: str) -> list:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigError(f"{where}: {name} is an empty list")
    return list(values)


def plan_jobs(config: Union[dict, str, os.PathLike]) -> tuple[list[Job], Optional[Path]]:
    """Validate a jobs config and expand it into jobs; returns (jobs, report path). Does no work.

    Raises :class:`ConfigError` for anything invalid.
    """
    jobs, report_path = _plan(config)
    _check_files(jobs, report_path)
    return jobs, report_path


def _plan(config: Union[dict, str, os.PathLike]) -> tuple[list[Job], Path]:
    """:func:`plan_jobs` without the checks of the files on disk (:func:`_check_files`)."""
    if not isinstance(config, dict):
        config = load_job_file(config)
    top = dict(config)
    entries = top.pop("jobs", None)
    out_dir = Path(str(top.pop("out_dir", None) or "."))
    report = top.pop("report", None)
    fuse = top.pop("fuse", None)
    fuse_method = top.pop("fuse_method", None)
    if fuse_method is not None and fuse_method not in FUSE_METHODS:
        raise ConfigError(f"fuse_method: unknown method {fuse_method!r}; choose one of {', '.join(FUSE_METHODS)}")
    if fuse_method is not None and fuse is None:
        raise ConfigError("fuse_method needs fuse (the file the jobs' adapters are fused into); give fuse too, or "
                          "leave fuse_method out")
    if entries is None:  # the top level is the one job (possibly with lists of methods/concepts)
        entries, top = [top], {}
    elif not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("'jobs' must be a non-empty list of mappings (one per job)")
    all_fields = set().union(*(config_fields(m.config) for m in METHODS.values())) - _fixed_fields()
    unknown = sorted(k for k in top if k not in JOB_KEYS and k not in all_fields)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(set(JOB_KEYS) | all_fields | set(FILE_KEYS)))}")

    jobs: list[Job] = []
    used_top: set[str] = set()
    for number, entry in enumerate(entries, 1):
        where = f"job {number}" if len(entries) > 1 else "the job"
        merged = {**top, **entry}
        methods = _as_list(merged.pop("method", None), "method", where)
        concepts = _as_list(merged.pop("concept", None), "concept", where)
        if methods == [None]:
            raise ConfigError(f"{where} has no method; choose one of {', '.join(METHODS)}")
        if concepts == [None]:
            raise ConfigError(f"{where} has no concept to erase")
        known = {m: set(config_fields(METHODS[m].config)) - set(METHODS[m].fixed) for m in methods if m in METHODS}
        for key in entry:  # a job's own key must fit at least one of its methods
            if key not in JOB_KEYS and known and not any(key in fields for fields in known.values()):
                raise ConfigError(f"{where}: {' / '.join(known)} has no setting {key!r}")
        for concept, method in itertools.product(concepts, methods):
            if method not in METHODS:
                raise ConfigError(f"{where}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
            fields = set(config_fields(METHODS[method].config)) - set(METHODS[method].fixed)
            own = {}
            for key, value in merged.items():
                if key in JOB_KEYS or key not in fields:
                    continue  # meant for the job's other methods, or a top-level default for other jobs
                if key in top:
                    used_top.add(key)
                own[key] = value
            preset, model_name = merged.get("preset"), str(merged.get("model", "toy"))
            try:  # whether the preset gives this job the toy world's prompts (then it trains on the toy model only)
                world_prompts = bool(set(preset_settings(preset, method, model_name, concept)) & set(WORLD_PROMPT_KEYS))
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
            try:
                settings = preset_settings(preset, method, model_name, concept, settings=own)
                trainer = make_trainer(method, concept=concept, **settings)
            except ConfigError as error:
                raise ConfigError(f"{where} ({method} {concept!r}): {error}") from None
            job_config = trainer.config
            out = merged.get("out")
            if out is None:
                name = f"{method}-{slug(str(concept))}"
                more = getattr(job_config, "concepts", ())  # erased with it in one run (UCE, RECE)
                if more:
                    name += "-" + "-".join(slug(c) for c in more) if len(more) <= 3 else f"-and-{len(more)}-more"
                erase_from = _erase_from_text(job_config)  # a list of prompts (the toy preset's context) adds nothing
                if erase_from:
                    name += f"-from-{slug(erase_from)}"
                out = out_dir / f"{name}.safetensors"
            out = Path(str(out))
            if out.suffix != ".safetensors":
                raise ConfigError(f"{where}: the adapter file must end in .safetensors, got {out}")
            if out.is_dir():
                raise ConfigError(f"{where}: {out} is a folder; give the adapter file's path")
            checkpoint_dir = merged.get("checkpoint_dir")
            model = merged.get("model", "toy")
            dtype = getattr(job_config, "dtype", None)
            if dtype is not None and dtype not in DTYPES:
                raise ConfigError(f"{where}: dtype must be one of {', '.join(DTYPES)}")
            device = getattr(job_config, "device", None)
            if device is not None:
                from unsee.loading import device_problem

                problem = device_problem(str(device))
                if problem is not None:
                    raise ConfigError(f"{where}: device {problem}")
            problem = _model_problem(str(model))
            if problem is not None:
                raise ConfigError(f"{where}: {problem}")
            flags = {}
            for flag in ("resume", "overwrite"):
                flags[flag] = merged.get(flag, False)
                if not isinstance(flags[flag], bool):
                    raise ConfigError(f"{where}: {flag} must be true or false, got {flags[flag]!r}")
            grid = coerce("grid", merged.get("grid", 4), int)
            if not isinstance(grid, int) or isinstance(grid, bool) or not 0 <= grid <= MAX_GRID:
                raise ConfigError(f"{where}: grid must be a number of prompts from 0 to {MAX_GRID}, got {_short(grid)}")
            jobs.append(Job(
                method=method, config=job_config, model=str(model),
                model_config=None if merged.get("model_config") is None else str(merged["model_config"]),
                out=out,
                checkpoint_dir=Path(str(checkpoint_dir)) if checkpoint_dir is not None else out.with_suffix(".ckpt"),
                remove_checkpoint=checkpoint_dir is None, resume=flags["resume"], grid=grid,
                overwrite=flags["overwrite"], world_prompts=world_prompts,
            ))
    unused = sorted(k for k in top if k not in JOB_KEYS and k not in used_top)
    if unused:
        raise ConfigError(f"setting {unused[0]!r} applies to none of the jobs' methods "
                          f"({', '.join(sorted({j.method for j in jobs}))})")
    outs = [job.out.resolve() for job in jobs]
    duplicate = next((p for p in outs if outs.count(p) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"two jobs write {duplicate}; give each job its own 'out'")
    folders = [job.checkpoint_dir.resolve() for job in jobs if job.checkpoint_dir is not None]
    duplicate = next((p for p in folders if folders.count(p) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"two jobs use the checkpoint folder {duplicate}; give each job its own 'checkpoint_dir'")
    if fuse is not None:
        fuse = Path(str(fuse))
        if fuse.suffix != ".safetensors":
            raise ConfigError(f"fuse: the fused adapter file must end in .safetensors, got {fuse}")
        if len(jobs) < 2:
            raise ConfigError("fuse needs at least two jobs (one adapter per concept) to fuse; give several concepts, "
                              "or leave fuse out")
        if len({(job.model, job.model_config) for job in jobs}) > 1:
            raise ConfigError("fuse takes the adapters of one base model; give every job the same model")
        if fuse.resolve() in outs:
            raise ConfigError(f"fuse: {fuse} is also a job's adapter file; give the fused adapter its own name")
        if fuse_method is None:  # text-encoder adapters are distilled, the others summed
            fuse_method = "distill" if all(job.config.text_encoder_only for job in jobs) else "stack"
        for job in jobs:
            job.fuse_into, job.fuse_method = fuse, fuse_method
        wide = next((job for job in jobs if job.config.text_kv_only is False), None) if fuse_method == "mace" else None
        if wide is not None:
            raise ConfigError(f"fuse_method mace refits the UNet's cross-attention keys and values only, but "
                              f"{wide.describe()} trains an adapter that changes more; use fuse_method stack "
                              f"(--fuse stack), or a method whose adapters change only those (uce, rece, esd-x-strict)")
        unet = next((job for job in jobs if not job.config.text_encoder_only), None) if fuse_method == "distill" else None
        if unet is not None:
            raise ConfigError(f"fuse_method distill fuses text-encoder adapters, but {unet.describe()} trains an "
                              f"adapter of the UNet; use fuse_method stack (--fuse stack), or a method that trains "
                              f"the text encoder (advunlearn)")
    if report is not None:
        report_path = Path(str(report))
    elif fuse is not None:
        report_path = fuse.with_suffix(".json")
    elif len(jobs) == 1:
        report_path = jobs[0].out.with_suffix(".json")
    else:
        report_path = out_dir / "erase-report.json"
    if report_path.suffix != ".json":
        raise ConfigError(f"the report must be a .json file, got {report_path}")
    return jobs, report_path


def _model_problem(model: str) -> Optional[str]:
    """Why a local single-file model cannot be a checkpoint (its first bytes), or None; other models load later."""
    path = Path(model).expanduser()
    if model == "toy" or not path.is_file():
        return None
    problem = model_file_problem(path)
    if problem is None:
        return None
    return f"{problem}; pass a Stable Diffusion checkpoint, a diffusers folder, a hub id or 'toy'"


def _outputs(job: Job) -> list[Path]:
    return [job.out, job.card_path, *job.artifact_paths.values(), *([job.grid_path] if job.grid else []),
            *([job.fuse_into] if job.fuse_into is not None else [])]


def _unfinished_report(path: Path) -> bool:
    """Whether ``path`` is an erase report whose jobs did not all finish (the run ``resume`` continues)."""
    try:
        if path.stat().st_size > 64 * 1024 * 1024:
            return False
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    jobs = data.get("jobs") if isinstance(data, dict) else None
    return (isinstance(jobs, list) and "unsee_version" in data
            and any(not isinstance(j, dict) or j.get("status") != "done" for j in jobs))


def _checkpoint_contents(folder: Path) -> list[str]:
    """What a checkpoint folder holds, leaving out the temporaries of killed writes."""
    try:
        return sorted(name for name in os.listdir(folder) if not is_temporary(name))
    except OSError:
        return []


def _check_files(jobs: list[Job], report_path: Path) -> None:
    """Refuse, before any work, jobs that would replace a file not named for replacement, reuse a checkpoint
    folder without ``resume``, or write where nothing can be written."""
    for job in jobs:
        where = job.describe()
        for path in [*_outputs(job), report_path]:
            problem = output_problem(path)
            if problem is not None:
                raise ConfigError(f"{where}: cannot write {path}: {problem}; choose another path (--out / --report)")
            if path.exists() and not job.overwrite:
                if path == report_path and job.resume and _unfinished_report(path):
                    continue  # the report of the run this one resumes
                raise ConfigError(f"{path} exists; pass --overwrite (overwrite: true) to replace it, or choose another "
                                  "--out / --report")
        folder = job.checkpoint_dir
        if folder is None:
            continue
        if os.path.lexists(folder) and not folder.is_dir():
            raise ConfigError(f"{where}: the checkpoint folder {folder} is a file; move it away or give another "
                              "--checkpoint-dir")
        problem = output_problem(folder, folder=True)
        if problem is not None:
            raise ConfigError(f"{where}: cannot use the checkpoint folder {folder}: {problem}; give another "
                              "--checkpoint-dir")
        if folder.is_dir() and not job.resume and _checkpoint_contents(folder):
            raise ConfigError(f"{where}: the checkpoint folder {folder} is not empty (an earlier run's checkpoint?); "
                              "pass --resume (resume: true) to continue from it, or give another --checkpoint-dir")


def _remove_own_checkpoint(folder: Path) -> None:
    """After success: this run's checkpoint file, and the folder if that leaves it empty. Nothing else."""
    (folder / CHECKPOINT_NAME).unlink(missing_ok=True)
    remove_stale_temporaries(folder)
    try:
        folder.rmdir()
    except OSError:  # not empty: it holds something this run did not write
        pass


def grid_prompts(concept: str, n: int, seed: int = 0, toy: bool = False) -> list[str]:
    """Prompts for the before/after grid: on the toy model (``toy``), toy-world prompts naming the concept; on any
    other model (or for a concept the world lacks), "a photo of {concept}"."""
    from unsee.toy import world

    if toy:
        try:
            return world.concept_prompts(concept, seed, n)
        except ValueError:
            pass
    return [f"a photo of {concept}"] * n


def before_after_images(pipe: Any, adapter: Any, prompts: list[str], seed: int = 0, steps: int = 25) -> tuple[list, list]:
    """(before, after): PIL images of ``prompts`` from the model as it is and with ``adapter`` loaded, same seeds."""
    import torch

    def generate() -> list:
        generator = torch.Generator().manual_seed(seed)
        return pipe(prompts, num_inference_steps=steps, generator=generator).images

    before = generate()
    name = pipe.load_erasure(adapter, adapter_name="unsee-grid-preview")
    try:
        after = generate()
    finally:
        pipe.unload_erasure(name)
    return before, after


def before_after_grid(pipe: Any, adapter: Any, prompts: list[str], seed: int = 0, steps: int = 25) -> Any:
    """A PIL image: one column per prompt, the model as it is on top, with ``adapter`` below (same seeds)."""
    from PIL import Image

    before, after = before_after_images(pipe, adapter, prompts, seed=seed, steps=steps)
    width, height = before[0].size
    grid = Image.new("RGB", (width * len(prompts), height * 2), "white")
    for column, (top, bottom) in enumerate(zip(before, after)):
        grid.paste(top, (column * width, 0))
        grid.paste(bottom, (column * width, height))
    return grid


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _load_model(job: Job, dtype: Any) -> Any:
    """The job's pipeline; a local model that diffusers cannot read is a :class:`ConfigError` naming it."""
    from unsee.loading import ModelLoadError, load_pipeline

    try:
        return load_pipeline(job.model, dtype=dtype, config=job.model_config)
    except ModelLoadError:
        raise
    except Exception as error:
        from unsee.loading import model_load_failure

        if not Path(job.model).expanduser().exists():
            raise
        raise ConfigError(model_load_failure(job.model, error)) from error


def run_jobs(
    config: Union[dict, str, os.PathLike],
    progress: Optional[Callable[[Job, Progress], None]] = None,
    pipe: Any = None,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Plan, validate and run erasure jobs one after another; returns the combined report (also written).

    Args:
        config: a dict, or the path of a YAML/JSON jobs file (see the module docstring).
        progress: called with (job, :class:`Progress`) events.
        pipe: a pipeline to train on instead of loading each job's ``model``.
        log: called with one-line notes (e.g. "resuming from step 40").

    Several processes (``torchrun --nproc_per_node N -m unsee.cli erase ...``) train each job together, data
    parallel (see ``draws_per_step`` in :class:`~unsee.erasure.TrainerConfig`); the main process alone checks the
    files on disk before any work and writes the adapters, masks, grids and the report (the others return the same
    report without writing anything), and a failure there ends every process with the same error.

    Raises:
        ConfigError: an invalid config (nothing is loaded or written), an output that exists without ``overwrite``,
            a checkpoint folder in use without ``resume``, or a local model file diffusers cannot read.
        TrainingError: a job failed (the adapters of the jobs before it are written; so is the report).
    """
    import torch

    from unsee import __version__

    jobs, report_path = _plan(config)
    problem = launch_problem()
    if problem is not None:
        raise ConfigError(problem)
    if launched_processes() > 1:  # the process group first: the main process decides for all of them
        for job in jobs:
            try:
                check_draws(job.config.draws_per_step, launched_processes())
            except ConfigError as error:
                raise ConfigError(f"{job.describe()}: {error}") from None
        process_state(next((job.config.device for job in jobs if job.config.device is not None), None))
    on_main_process(lambda: _check_files(jobs, report_path), "checking the output files")
    main = process_rank() == 0
    log = log if (log is not None and main) else (lambda message: None)  # notes once, from the main process
    report: dict[str, Any] = {"unsee_version": __version__, "report": str(report_path), "jobs": []}
    started = time.perf_counter()
    pipes: dict[tuple, Any] = {}
    try:
        for job in jobs:
            if pipe is not None:
                job_pipe = pipe
            else:
                key = (job.model, job.model_config, job.config.dtype)
                if key not in pipes:
                    pipes.clear()  # one model in memory at a time
                    dtype = getattr(torch, job.config.dtype) if job.config.dtype else None
                    pipes[key] = _load_model(job, dtype)
                    pipes[key].set_progress_bar_config(disable=True)
                job_pipe = pipes[key]
            if job.world_prompts and not is_toy_pipeline(job_pipe):
                raise ConfigError(f"{job.describe()} was planned for the embedded toy model with the toy world's prompts, "
                                  f"but the pipeline given is not the embedded toy model; name your model in the job "
                                  f"(model: ...) or use preset: paper")
            entry: dict[str, Any] = {"method": job.method, "concept": job.config.concept, "model": job.model,
                                     "out": str(job.out), "settings": job.config.to_dict(), "status": "running"}
            report["jobs"].append(entry)
            trainer = METHODS[job.method].trainer(job.config)
            checkpoint = job.checkpoint_dir / CHECKPOINT_NAME if job.checkpoint_dir else None
            if checkpoint is not None and checkpoint.exists() and job.resume:
                log(f"{job.describe()}: resuming from {checkpoint}")
            job_started = time.perf_counter()
            try:
                adapter = trainer.train(
                    job_pipe, progress=(lambda event, job=job: progress(job, event)) if progress else None,
                    checkpoint_dir=job.checkpoint_dir, resume=job.resume,
                )
            except (TrainingError, ConfigError) as error:
                entry.update(status="failed", error=str(error))
                raise
            for name, path in job.artifact_paths.items():
                entry[name] = str(path)
            entry["card"] = str(job.card_path)
            grid = job.grid and hasattr(job_pipe, "load_erasure")
            if job.grid and not grid:
                log(f"{job.describe()}: no before/after grid (the pipeline has no load_erasure; use unsee.load_pipeline)")
            elif grid:
                entry["grid"] = str(job.grid_path)
            on_main_process(lambda: _write_outputs(job, trainer, adapter, job_pipe, grid), "writing the outputs")
            summary = adapter.training
            entry.update(
                status="done", seconds=round(time.perf_counter() - job_started, 3),
                training_seconds=summary.get("seconds"), steps=summary.get("steps"),
                resumed_from_step=summary.get("resumed_from_step"), loss_first=summary.get("loss_first"),
                loss_last=summary.get("loss_last"), losses=summary.get("losses"),
                tensors=len(adapter.tensors), kind=adapter.kind,
            )
        fused = jobs[0].fuse_into if jobs else None
        if fused is not None:
            on_main_process(lambda: _write_fused(jobs, fused, job_pipe), "fusing the adapters")
            report["fused"] = {"out": str(fused), "from": [str(job.out) for job in jobs], "fuse": jobs[0].fuse_method}
    finally:
        report["seconds"] = round(time.perf_counter() - started, 3)
        if report["jobs"] and main:  # no collective here: another process may be gone
            _write_json(report_path, report)
    return report


def _write_fused(jobs: list[Job], path: Path, pipe: Any) -> None:
    """Every job's adapter (written already) fused into one file (``fuse``), by ``fuse_method`` (MACE with ``pipe``'s
    text encoder, the jobs' model)."""
    from unsee.adapters import AdapterError
    from unsee.fuse import fuse_adapters

    method = jobs[0].fuse_method
    concepts = [c for job in jobs for c in job.config.erased]
    options = fuse_options(method, pipe, jobs[0].model, concepts)
    try:
        fuse_adapters([job.out for job in jobs], method=method, **options).save(path)
    except AdapterError as error:
        raise TrainingError(f"fusing the jobs' adapters into {path}: {error}") from None


def mace_options(pipe: Any, model: str, concepts: Sequence[str], templates: Optional[Sequence[str]] = None,
                 preserve: Optional[Sequence[str]] = None, lamb: Optional[float] = None,
                 preserve_scale: Optional[float] = None) -> dict[str, Any]:
    """The keyword arguments of :func:`unsee.fuse.fuse_adapters` for ``method="mace"`` with ``pipe``'s text encoder:
    each concept refitted on ``templates`` filled with it (none: on the toy model the toy preset's world prompts,
    :func:`unsee.toy.presets.fuse_settings`), ``preserve`` kept (none: the toy preset's on the toy model, else
    ``[""]``), ``lamb`` 0.5 and ``preserve_scale`` 1 unless given."""
    import functools

    from unsee.adapters import fill_concept
    from unsee.erasure.uce import embed
    from unsee.toy.presets import fuse_settings, is_toy_model_name

    preset = fuse_settings(list(concepts)) if is_toy_model_name(model) else {"prompts": {}, "preserve": [""]}
    prompts = {c: fill_concept(templates, c) for c in concepts} if templates else preset["prompts"]
    return dict(embed=functools.partial(embed, pipe), preserve=list(preserve or preset["preserve"]), prompts=prompts,
                lamb=0.5 if lamb is None else lamb, preserve_scale=1.0 if preserve_scale is None else preserve_scale)


def distill_options(pipe: Any, model: str, concepts: Sequence[str], templates: Optional[Sequence[str]] = None,
                    preserve: Optional[Sequence[str]] = None, config: Any = None,
                    progress: bool = False) -> dict[str, Any]:
    """The keyword arguments of :func:`unsee.fuse.fuse_adapters` for ``method="distill"`` on ``pipe``: the
    prompts and preserved prompts as :func:`mace_options` gives them, and the distillation
    (:class:`unsee.erasure.distill.TextEncoderDistiller` with ``config``, a
    :class:`~unsee.erasure.distill.DistillConfig`, default if None; a tqdm bar if ``progress``)."""
    from unsee.erasure.distill import TextEncoderDistiller

    options = mace_options(pipe, model, concepts, templates=templates, preserve=preserve)
    return dict(prompts=options["prompts"], preserve=options["preserve"],
                distill=TextEncoderDistiller(pipe, config, progress=progress))


def fuse_options(method: str, pipe: Any, model: str, concepts: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments of :func:`unsee.fuse.fuse_adapters` for ``method`` with ``pipe`` (the model's)."""
    if method == "mace":
        return mace_options(pipe, model, concepts)
    if method == "distill":
        return distill_options(pipe, model, concepts)
    return {}


def read_concepts_file(path: Union[str, os.PathLike]) -> list[str]:
    """The concepts of a ``--concepts`` file: one a line, blank lines and lines starting with ``#`` left out, each
    stripped. Raises :class:`ConfigError` for a missing, unreadable, too large or empty file, or a concept listed
    twice (case-insensitive)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--concepts {path}: no such file; give a text file with one concept per line")
    if path.stat().st_size > MAX_CONCEPTS_FILE:
        raise ConfigError(f"--concepts {path}: the file is larger than {MAX_CONCEPTS_FILE // 1024} KiB; give a text "
                          f"file with one concept per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"--concepts {path}: not UTF-8 text; give a text file with one concept per line") from None
    except OSError as error:
        raise ConfigError(f"--concepts {path}: cannot read it ({error.strerror or error}); check the path and its "
                          f"permissions") from None
    concepts: list[str] = []
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        concept = line.strip()
        if not concept or concept.startswith("#"):
            continue
        if "\x00" in concept:
            raise ConfigError(f"--concepts {path}: line {number} holds a NUL character; is it a text file?")
        key = concept.lower()
        if key in lines:
            raise ConfigError(f"--concepts {path}: {concept!r} on line {number} is listed on line {lines[key]} "
                              f"already; name each concept once")
        lines[key] = number
        concepts.append(concept)
    if not concepts:
        raise ConfigError(f"--concepts {path}: the file lists no concept (blank lines and # comments are left out); "
                          f"write one concept per line")
    return concepts


def _write_outputs(job: Job, trainer: Trainer, adapter: Any, pipe: Any, grid: bool) -> None:
    """A finished job's files (the main process's work): its artifacts (e.g. a saliency mask), the adapter, the grid;
    then its checkpoint goes."""
    for name, path in job.artifact_paths.items():
        trainer.write_artifact(name, path, adapter_file=job.out.name)
    adapter.save(job.out)
    write_model_card(adapter, job.card_path, file_name=job.out.name, base_model=job.model, overwrite=True)  # checked
    if grid:
        concept = _erase_from_text(job.config) or job.config.concept
        prompts = grid_prompts(concept, job.grid, job.config.seed, toy=is_toy_pipeline(pipe))
        image = before_after_grid(pipe, adapter, prompts, seed=job.config.seed)
        atomic_write(job.grid_path, lambda tmp: image.save(tmp, format="PNG"))
    if job.remove_checkpoint and job.checkpoint_dir is not None and job.checkpoint_dir.is_dir():
        _remove_own_checkpoint(job.checkpoint_dir)
