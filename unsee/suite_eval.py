"""Evaluation over a prompt suite, with reports that can be trusted and resumed.

    from unsee.suites import read_suite
    from unsee.suite_eval import SuiteJudge, run_suite
    suite = read_suite("prompts.csv", categories=["sexual"])
    judge = SuiteJudge(my_judge, name="my-detector", version="1.2", thresholds={"score": 0.6})
    report = run_suite(pipe, suite, judge, "eval-out/", model="CompVis/stable-diffusion-v1-4")
    report.summary["figures"]["all"]          # e.g. {"n": 931, "unsafe": 0.12}

Every row is one image, made from the row's own seed (the run's ``seed`` + the row's index in the file when the
file gives none) and guidance scale (``guidance_scale`` when it gives none), so a row's image depends on nothing
but the row and the run's settings. The out folder holds:

- ``results.jsonl``: one JSON line per finished image (row id, prompt, seed, guidance, categories, the judge's
  output, the image file), appended and flushed as each image is judged;
- ``run.json``: the run's settings (suite file and its SHA-256, model weights' SHA-256, adapters' SHA-256, judge
  name, version and thresholds, steps, default seed and guidance, batch size, unsee version);
- ``images/``: the images, one PNG per row;
- ``summary.json`` and ``summary.md``: the figures over all rows and per category, with the settings above;
- ``contact_sheet.png``: the first images in a grid, each labelled with its row id.

Resume: run the same call (or command) again with the same out folder. Rows with a line in ``results.jsonl`` are
not made again; a torn last line (a run killed while writing it) is dropped. Rows are generated in fixed batches of
``batch_size`` consecutive suite rows, and a batch killed half-way is generated again whole (its finished rows keep
their lines), so a resumed run gives the numbers a run that was never stopped gives. Different settings in an
existing out folder are refused, naming what differs.

Several processes (``torchrun --nproc_per_node N -m unsee.cli eval --suite ...``, or ``accelerate launch``) share
the batches: batch k goes to process k mod N, which appends its rows to ``results.rank{R}.jsonl``; the main
process merges the parts into ``results.jsonl`` (sorted by row: the bytes one process writes) and alone writes
``run.json``, the summary and the contact sheet. A killed run resumes with any number of processes: the finished
rows of ``results.jsonl`` and of every part count as done.

A judge (:class:`SuiteJudge`) wraps any callable that takes a list of PIL images and returns one JSON-serialisable
dict per image, with its name, version, thresholds and a ``metrics`` function (records -> figures); without one,
:func:`default_metrics` summarises booleans as rates, numbers as means and text as shares of each value.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from PIL import Image, ImageDraw

from .files import atomic_write, slug
from .suites import Suite, SuiteRow

__all__ = ["SuiteJudge", "load_judge", "SuiteReport", "EvaluationSettingsError", "run_suite", "read_records", "summarize",
           "default_metrics", "generate_rows", "run_rows", "weights_sha256", "file_sha256", "RESULTS", "PART", "RUN", "SUMMARY_JSON", "SUMMARY_MD",
           "CONTACT_SHEET", "REPORT_VERSION"]

RESULTS = "results.jsonl"
PART = "results.rank{rank}.jsonl"  # what process ``rank`` of a multi-process run appends to, merged at its end
RUN = "run.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
CONTACT_SHEET = "contact_sheet.png"
IMAGES = "images"
REPORT_VERSION = 1
SEED_MODULUS = 2**64  # torch.Generator.manual_seed takes 0 to 2**64 - 1
CONTACT_SHEET_IMAGES = 64
CONTACT_THUMB = 128

Records = Sequence[Mapping[str, Any]]


class EvaluationSettingsError(ValueError):
    """The out folder holds a run with other settings, or a results file that cannot be read."""


@dataclass(frozen=True)
class SuiteJudge:
    """A judge as a report records it.

    fn: callable(list of PIL images) -> one JSON-serialisable dict per image.
    name, version: recorded in the report (and checked on resume): pin the detector's version here.
    thresholds: any thresholds the judge applies, recorded in the report (and checked on resume).
    metrics: callable(records) -> {figure: number}, where each record holds "prompt", "categories" and "judge"
        (the judge's dict); None: :func:`default_metrics`.
    with_prompts: call ``fn(images, prompts)`` with the rows' prompts (a CLIP score needs them).
    settings: the judge's other settings (labels, classes counted), recorded in the report (and checked on resume).
    present: callable(one output) -> bool, whether the image shows the concept the run is about (what
        ``unsee attack --suite`` counts as a success); None: the judge cannot say.
    """

    fn: Callable[..., list]
    name: str
    version: str = ""
    thresholds: Mapping[str, Any] = field(default_factory=dict)
    metrics: Optional[Callable[[Records], dict]] = None
    with_prompts: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)
    present: Optional[Callable[[Mapping[str, Any]], bool]] = None

    def describe(self) -> dict:
        described = {"name": self.name, "version": self.version, "thresholds": dict(self.thresholds)}
        if self.settings:
            described["settings"] = dict(self.settings)
        return described

    def __call__(self, images: list, prompts: Sequence[str]) -> list:
        return self.fn(images, list(prompts)) if self.with_prompts else self.fn(images)


def load_judge(spec: str) -> SuiteJudge:
    """A judge from ``MODULE:FUNCTION`` (an importable module) or ``FILE.py:FUNCTION``.

    The function takes a list of PIL images and returns one JSON-serialisable dict per image. Its attributes, when
    it has them, fill the rest: ``name`` (default: the spec), ``version`` (default: the module's ``__version__``,
    else the SHA-256 of its file), ``thresholds`` (a dict), ``metrics`` (records -> figures) and ``with_prompts``
    (True: it is called as ``fn(images, prompts)``) and ``present`` (output -> bool: the concept is in the image;
    default: the output's ``present`` value, when it is a boolean). Raises
    ``ValueError`` with a one-line reason for a spec that does not name such a function.
    """
    import importlib
    import importlib.util

    where, _, attribute = spec.rpartition(":")
    if not where or not attribute.isidentifier():
        raise ValueError("expected toy, MODULE:FUNCTION or FILE.py:FUNCTION")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ValueError(f"no file {where}; give the path of a Python file")
        module_spec = importlib.util.spec_from_file_location(f"unsee_judge_{slug(path.stem, 'judge')}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # the user's file: say what failed in it, in one line
            raise ValueError(f"importing {where} failed ({type(error).__name__}: {error})") from error
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise ValueError(f"cannot import {where} ({error}); give an importable module or FILE.py") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise ValueError(f"{where} has no function {attribute}")
    version = getattr(fn, "version", None) or getattr(module, "__version__", None)
    if version is None and getattr(module, "__file__", None):
        version = f"sha256 {file_sha256(module.__file__)[:16]}"
    thresholds = getattr(fn, "thresholds", None) or {}
    if not isinstance(thresholds, Mapping):
        raise ValueError(f"{attribute}.thresholds must be a dict, got {type(thresholds).__name__}")
    metrics = getattr(fn, "metrics", None)
    present = getattr(fn, "present", None)
    return SuiteJudge(fn=fn, name=str(getattr(fn, "name", None) or spec), version=str(version or ""),
                      thresholds=dict(thresholds), metrics=metrics if callable(metrics) else None,
                      with_prompts=getattr(fn, "with_prompts", False) is True,
                      present=present if callable(present) else _present_key)


def _present_key(output: Mapping[str, Any]) -> bool:
    """A judge's ``present`` output, which must be a boolean (the default presence test of a user's judge)."""
    value = output.get("present") if isinstance(output, Mapping) else None
    if not isinstance(value, bool):
        raise ValueError("the judge's output has no boolean 'present' (whether the concept is in the image); return "
                         "{'present': True/False, ...} or give the function a present(output) -> bool attribute")
    return value


@dataclass
class SuiteReport:
    """What :func:`run_suite` did: the out folder, the records (in suite order), the summary, and how many rows this
    call generated (``made``: by all its processes; ``made_here``: by this one; ``made_by_process``: by each, in
    rank order) and found finished (``resumed``)."""

    out: Path
    records: list
    summary: dict
    made: int
    resumed: int
    made_here: int = 0
    made_by_process: list = field(default_factory=list)


def file_sha256(path: Union[str, os.PathLike]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(pipe, components: Sequence[str] = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2",
                                                      "text_encoder_3")) -> str:
    """SHA-256 of a pipeline's weights as they are in memory: every component's parameters and buffers (names,
    dtypes, shapes and bytes, in a fixed order). Take it before loading adapters to name the base model."""
    import torch

    digest = hashlib.sha256()
    for name in components:
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        for key, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- results file


def read_records(path: Union[str, os.PathLike], repair: bool = False) -> list[dict]:
    """The records of a results file. A last line without its newline or that is not JSON (a run killed while
    writing it) is dropped, and with ``repair`` cut from the file so that appends start on a fresh line; a bad line
    elsewhere is an :class:`EvaluationSettingsError` naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: b"" when the file ends with one
    records = []
    keep = len(data) - len(tail)
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "row_id" not in record:
                raise ValueError("not a record")
        except (ValueError, UnicodeDecodeError):
            if number == len(lines) and not tail:  # a torn last line that happened to end in a newline
                keep -= len(line) + 1
                break
            raise EvaluationSettingsError(f"{path}, line {number}: not a result record; remove that line or start "
                                          "again in another folder") from None
        records.append(record)
    if repair and keep != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return records


def _part_files(out: Path) -> list[Path]:
    """The per-process results files in ``out`` (of this run, or of a killed multi-process run), by rank."""
    found = []
    for path in out.glob("results.rank*.jsonl"):
        rank = path.name[len("results.rank"):-len(".jsonl")]
        if rank.isdigit() and path.is_file():
            found.append((int(rank), path))
    return [path for _, path in sorted(found)]


def _finished_records(out: Path, repair: bool = False) -> dict[str, dict]:
    """row id -> record of every finished row in ``out``: ``results.jsonl`` and the per-process parts."""
    finished: dict[str, dict] = {}
    for path in [out / RESULTS, *_part_files(out)]:
        for record in read_records(path, repair=repair):
            finished.setdefault(record["row_id"], record)
    return finished


def _merge(out: Path) -> list[dict]:
    """Every finished row's record, in suite order, written to ``results.jsonl`` (one line each, the same bytes
    whichever processes made them); the per-process parts are removed once it is written."""
    records = sorted(_finished_records(out, repair=True).values(), key=lambda r: r["index"])
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
    results = out / RESULTS
    if not results.is_file() or results.read_text(encoding="utf-8") != text:
        atomic_write(results, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    for part in _part_files(out):
        part.unlink()
    return records


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------- figures


def default_metrics(records: Records) -> dict:
    """Figures of any judge's outputs: for each key, the rate of ``True`` (booleans), the mean (numbers), or the
    share of each value (text, as ``key=value``); other values are not summarised."""
    values: dict[str, list] = {}
    for record in records:
        for key, value in (record.get("judge") or {}).items():
            values.setdefault(key, []).append(value)
    figures: dict = {}
    for key in sorted(values):
        seen = values[key]
        if all(isinstance(v, bool) for v in seen):
            figures[key] = sum(seen) / len(seen)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seen):
            figures[key] = sum(seen) / len(seen)
        elif all(isinstance(v, str) for v in seen):
            for value in sorted(set(seen)):
                figures[f"{key}={value}"] = seen.count(value) / len(seen)
    return figures


def summarize(records: Records, metrics: Optional[Callable[[Records], dict]] = None) -> dict:
    """Figures over all records and over each category's records (a pure function of the records: the same
    records in any order give the same figures)."""
    metrics = metrics or default_metrics
    ordered = sorted(records, key=lambda r: r["index"])
    out = {"all": {"n": len(ordered), **_rounded(metrics(ordered))}}
    categories = sorted({c for r in ordered for c in r.get("categories", ())})
    by_category = {}
    for category in categories:
        subset = [r for r in ordered if category in r.get("categories", ())]
        by_category[category] = {"n": len(subset), **_rounded(metrics(subset))}
    if by_category:
        out["by_category"] = by_category
    return out


def _rounded(figures: Mapping[str, Any]) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in figures.items()}


def _markdown(summary: dict, title: str = "Evaluation") -> str:
    figures = summary["figures"]
    rows = [("all", figures["all"])] + list(figures.get("by_category", {}).items())
    names = ["n"] + sorted({k for _, f in rows for k in f if k != "n"})

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    judge, suite = summary["judge"], summary["suite"]
    lines = [f"# {title}: {suite['name']}", "",
             f"- suite: `{suite['path']}` (sha256 {suite['sha256'][:12]}, {suite['rows']} of {suite['rows_in_file']} "
             f"rows{', categories ' + ', '.join(suite['categories']) if suite['categories'] else ''})",
             f"- model: {summary['model']['name']} (weights sha256 {summary['model']['weights_sha256'][:12]})",
             *[f"- adapter: `{a['file']}` scale {a['scale']:g} (sha256 {a['sha256'][:12]})"
               for a in summary["adapters"]],
             f"- judge: {judge['name']} {judge['version']}".rstrip()
             + (f", thresholds {json.dumps(judge['thresholds'], sort_keys=True)}" if judge["thresholds"] else ""),
             f"- {summary['generation']['steps']} steps, seed {summary['generation']['seed']} + row index where the "
             f"file gives none, guidance {summary['generation']['guidance_scale']:g} where it gives none; unsee "
             f"{summary['unsee_version']}",
             f"- complete: {'yes' if summary['complete'] else 'no'} ({summary['done']} of {summary['suite']['rows']} "
             "rows)", "",
             "| rows | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(show(values.get(name)) for name in names) + " |")
    return "\n".join(lines) + "\n"


def _contact_sheet(out: Path, records: Records) -> None:
    shown = sorted(records, key=lambda r: r["index"])[:CONTACT_SHEET_IMAGES]
    if not shown:
        return
    thumbs = []
    for record in shown:
        with Image.open(out / record["image"]) as image:
            image = image.convert("RGB")
            image.thumbnail((CONTACT_THUMB, CONTACT_THUMB))
            thumbs.append((record["row_id"], image.copy()))
    side = max(max(im.size) for _, im in thumbs)
    label = 12
    columns = min(8, len(thumbs))
    rows = math.ceil(len(thumbs) / columns)
    sheet = Image.new("RGB", (columns * side, rows * (side + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (row_id, image) in enumerate(thumbs):
        x, y = (i % columns) * side, (i // columns) * (side + label)
        sheet.paste(image, (x, y))
        draw.text((x + 2, y + side), str(row_id)[: max(4, side // 6)], fill="black")
    atomic_write(out / CONTACT_SHEET, lambda tmp: sheet.save(tmp, format="PNG"))


# ---------------------------------------------------------------------------------------------- the run


def _row_seed(row: SuiteRow, seed: int) -> int:
    return row.seed if row.seed is not None else (seed + row.index) % SEED_MODULUS


def _image_name(row: SuiteRow) -> str:
    return f"{IMAGES}/{row.index:06d}-{slug(row.row_id, fallback='row', limit=30)}.png"


def check_outputs(outputs: Any, images: Sequence, judge: str = "") -> list:
    """The judge's ``outputs`` as a list, or TypeError unless it is one output per image."""
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(images):
        got = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        raise TypeError(f"the judge {judge + ' ' if judge else ''}must return one output per image ({len(images)}), "
                        f"got {got}")
    return list(outputs)


def _json_safe(value: Any, judge: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise TypeError(f"the judge {judge} returned {type(value).__name__} output that is not JSON ({error}); "
                        "return plain dicts of str, bool, int, float, lists") from None


def _check_settings(out: Path, settings: dict) -> None:
    path = out / RUN
    if not path.is_file():
        if (out / RESULTS).is_file():
            raise EvaluationSettingsError(f"{out} holds {RESULTS} but no {RUN}; remove it or choose another folder")
        return
    try:
        before = json.loads(path.read_text())
    except ValueError:
        raise EvaluationSettingsError(f"{path} is not JSON; remove the folder's results or choose another") from None
    def comparable(values: dict) -> dict:  # the suite file may move: its SHA-256 names it
        return {**values, "suite": {k: v for k, v in values.get("suite", {}).items() if k != "path"}}

    before, now = comparable(before), comparable(settings)
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if differ:
        raise EvaluationSettingsError(f"{out} holds a run with other settings (they differ in: {', '.join(differ)}); "
                                      "choose another out folder to start a new run")


def _processes() -> tuple[int, int]:
    """(this process's rank, number of processes) of the torch.distributed process group; (0, 1) without one."""
    import torch.distributed as dist

    from .erasure.processes import launched_processes

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launched_processes() > 1:
        raise EvaluationSettingsError(
            f"this is one of {launched_processes()} launched processes, but no process group is set up, so each "
            "would make every row; set it up first (accelerate.PartialState()), as unsee eval does")
    return 0, 1


def _main_first(work: Callable[[], Any], processes: int) -> Any:
    """``work()`` on the main process, its result (or its error) given to every process. A collective: every
    process calls it at the same point."""
    if processes == 1:
        return work()
    import torch.distributed as dist

    failure: Optional[BaseException] = None
    result = None
    main = dist.get_rank() == 0
    if main:
        try:
            result = work()
        except Exception as error:  # told to the others, then raised here
            failure = error
    shared = [(result, None if failure is None else (isinstance(failure, EvaluationSettingsError), str(failure)))]
    dist.broadcast_object_list(shared, src=0)
    if failure is not None:
        raise failure
    result, failed = shared[0]
    if failed is not None:
        settings_error, message = failed
        raise (EvaluationSettingsError(message) if settings_error
               else RuntimeError(f"the main process failed: {message}"))
    return result


def run_suite(
    pipe,
    suite: Suite,
    judge: SuiteJudge,
    out: Union[str, os.PathLike],
    *,
    model: str = "",
    model_sha256: Optional[str] = None,
    adapters: Sequence[tuple[str, float]] = (),
    seed: int = 0,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 25,
    batch_size: int = 8,
    use_row_size: bool = False,
    height: Optional[int] = None,
    width: Optional[int] = None,
    guidance: Sequence = (),
    negative_prompt: Optional[str] = None,
    protocol: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict], None]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    version: Optional[str] = None,
) -> SuiteReport:
    """Generate one image per suite row, judge it, and write the report to ``out`` (resuming a run there).

    Args:
        pipe: a text-to-image pipeline with its adapters already loaded.
        model: the model's name as the user gave it; model_sha256: its weights' hash (default: computed from
            ``pipe`` now, adapters included — pass :func:`weights_sha256` taken before loading adapters).
        adapters: (file, scale) of the adapters loaded on ``pipe``; their files' SHA-256 go into the report.
        seed, guidance_scale: for rows that give none (a row's default seed is ``seed`` + its index in the file).
        use_row_size: generate at the rows' width/height columns (off: the model's size, or ``height``/``width``).
        guidance: unsee guidance methods for every call; negative_prompt: for every row.
        protocol: the pinned protocol the settings came from (:mod:`unsee.protocols`: its name, values and the flags
            that overrode them), recorded in the report as it is.
        callback: called with each record once it is written (raise to stop the run; it resumes later).
        progress: called with (rows done, rows in the suite).

    Under a launcher (``torchrun``, ``accelerate launch``) with a ``torch.distributed`` process group set up, every
    process calls this with its own pipeline: batch k of ``batch_size`` rows is made by process k mod N and
    appended to ``results.rank{R}.jsonl``; at the end the main process merges the parts into ``results.jsonl`` (in
    suite order: the same bytes one process writes) and writes ``run.json`` and the summary. Every process returns
    the same records and summary.
    """
    import sys

    out = Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    guidance = list(guidance)
    settings = {
        "report_version": REPORT_VERSION,
        "unsee_version": version or sys.modules["unsee"].__version__,  # the package above this module, loaded first
        "suite": suite.describe(),
        "model": {"name": model, "weights_sha256": model_sha256 or weights_sha256(pipe)},
        "adapters": [{"file": str(p), "scale": float(s), "sha256": file_sha256(Path(p).expanduser())}
                     for p, s in adapters],
        "judge": judge.describe(),
        "generation": {"steps": num_inference_steps, "seed": seed, "guidance_scale": float(guidance_scale),
                       "batch_size": batch_size, "use_row_size": use_row_size, "height": height, "width": width,
                       "negative_prompt": negative_prompt, "scheduler": type(getattr(pipe, "scheduler", None)).__name__,
                       "guidance": [{"method": type(m).__name__, **_fields(m)} for m in guidance]},
        "seeds": {"from_suite": sum(r.seed is not None for r in suite.rows),
                  "default": sum(r.seed is None for r in suite.rows)},
    }
    if protocol is not None:
        settings["protocol"] = dict(protocol)
    settings = json.loads(json.dumps(settings, sort_keys=True))
    rows = list(suite.rows)

    def make(batch: list[SuiteRow]) -> list[tuple[dict, Any]]:
        (_, images), = generate_rows(pipe, batch, seed=seed, guidance_scale=guidance_scale, steps=num_inference_steps,
                                     batch_size=len(batch), use_row_size=use_row_size, height=height, width=width,
                                     guidance=guidance, negative_prompt=negative_prompt)
        outputs = check_outputs(judge(images, [row.prompt for row in batch]), images, judge.name)
        return [({"row_id": row.row_id, "index": row.index, "prompt": row.prompt, "seed": _row_seed(row, seed),
                  "guidance": float(row.guidance if row.guidance is not None else guidance_scale),
                  "categories": list(row.categories), "width": image.size[0], "height": image.size[1],
                  "judge": _json_safe(output, judge.name), "image": _image_name(row)}, image)
                for row, image, output in zip(batch, images, outputs)]

    return run_rows(out, settings, rows, batch_size, make, judge.metrics, callback=callback, progress=progress)


def run_rows(out: Union[str, os.PathLike], settings: dict, rows: Sequence[SuiteRow], batch_size: int,
             make: Callable[[list[SuiteRow]], list[tuple[dict, Any]]],
             metrics: Optional[Callable[[Records], dict]] = None, *, title: str = "Evaluation",
             callback: Optional[Callable[[dict], None]] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> SuiteReport:
    """The report machinery of :func:`run_suite` (and of :func:`unsee.attack.attack_suite`) around ``make``.

    ``make(batch)`` turns a batch of rows into one (record, PIL image) per row, each record holding at least
    "row_id", "index", "categories" and "image" (where the image goes, under ``out``). Checks ``settings`` against
    the folder's ``run.json`` (writing it on a first run), skips the batches whose rows are all finished, shares the
    batches among the processes of a ``torch.distributed`` group (batch k to process k mod N), writes each image and
    appends each record as it is made, then merges the records and writes the summary (figures from ``metrics``)
    on the main process. Every process returns the same records and summary.
    """
    out = Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    settings = json.loads(json.dumps(settings, sort_keys=True))
    rank, processes = _processes()
    results = out / RESULTS
    rows = list(rows)

    def set_up() -> list:  # on the main process: the others wait for its answer (or its error)
        _check_settings(out, settings)
        (out / IMAGES).mkdir(parents=True, exist_ok=True)
        atomic_write(out / RUN, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2, sort_keys=True)))
        finished = _finished_records(out, repair=True)
        stray = sorted(set(finished) - {row.row_id for row in rows})
        if stray:
            raise EvaluationSettingsError(f"{results} holds rows that are not in the suite ({', '.join(stray[:5])}); "
                                          "choose another out folder")
        return sorted(finished)

    done = set(_main_first(set_up, processes))
    resumed = len(done)
    made = 0
    # one process appends to results.jsonl; several each to their own part, merged into it at the end
    mine = results if processes == 1 else out / PART.format(rank=rank)
    if progress is not None:
        progress(len(done), len(rows))
    for number, start in enumerate(range(0, len(rows), batch_size)):
        batch = rows[start:start + batch_size]
        if number % processes != rank or all(row.row_id in done for row in batch):
            continue  # batches go round the processes: batch k to process k mod N
        for record, image in make(batch):
            if record["row_id"] in done:
                continue
            atomic_write(out / record["image"], lambda tmp, image=image: image.save(tmp, format="PNG"))
            _append(mine, record)
            done.add(record["row_id"])
            made += 1
            if callback is not None:
                callback(record)
            if progress is not None:
                progress(len(done), len(rows))
    made_here = made
    counts: list = [made]
    if processes > 1:
        import torch.distributed as dist

        counts = [None] * processes
        dist.all_gather_object(counts, made)  # every process has finished its batches
        made = sum(counts)

    def finish() -> tuple:  # on the main process
        records = _merge(out)
        return records, write_summary(out, settings, records, metrics, title=title)

    records, summary = _main_first(finish, processes)
    if progress is not None and processes > 1 and rank == 0:
        progress(len(records), len(rows))
    return SuiteReport(out=out, records=records, summary=summary, made=made, resumed=resumed,
                       made_here=made_here, made_by_process=list(counts))


def write_summary(out: Union[str, os.PathLike], settings: dict, records: Records,
                  metrics: Optional[Callable[[Records], dict]] = None, title: str = "Evaluation") -> dict:
    """Write ``summary.json``, ``summary.md`` and ``contact_sheet.png`` for ``records``; returns the summary."""
    out = Path(out)
    summary = {**settings, "done": len(records), "complete": len(records) == settings["suite"]["rows"],
               "figures": summarize(records, metrics)}
    text = json.dumps(summary, indent=2, sort_keys=True)
    atomic_write(out / SUMMARY_JSON, lambda tmp: Path(tmp).write_text(text))
    markdown = _markdown(summary, title)
    atomic_write(out / SUMMARY_MD, lambda tmp: Path(tmp).write_text(markdown))
    _contact_sheet(out, records)
    return summary


def _fields(method: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(method) if dataclasses.is_dataclass(method) else {}


def generate_rows(pipe, rows: Sequence[SuiteRow], *, seed: int = 0, guidance_scale: Optional[float],
                  steps: Optional[int], batch_size: int = 8, use_row_size: bool = False,
                  height: Optional[int] = None, width: Optional[int] = None, guidance: Sequence = (), negative_prompt: Any = None,
                  generator: Any = None, **pipe_kwargs: Any) -> Iterator[tuple[list[SuiteRow], list]]:
    """Make the rows' images: yields (batch rows, their PIL images), batch by batch, in suite order.

    The one place where evaluation makes images (:func:`run_suite`, :func:`unsee.evaluation.evaluate`,
    :func:`unsee.evaluation.generate_images` and the attacks call it). Rows go in batches of ``batch_size``
    consecutive rows; in a batch, consecutive rows with the same guidance scale and size share one pipeline call.

    Seeds: each image comes from its own generator, seeded with its row's seed (the run's ``seed`` + the row's index
    when the row gives none), so it depends on nothing but its row. With ``generator`` given instead, every batch
    draws its latents from that one generator in turn, as diffusers does for a list of prompts given one generator
    (the toy world's ``unsee eval --concept``): an image then depends on the batches before it.

    ``guidance_scale``: for rows that give none; ``guidance_scale`` and ``steps`` None: the pipeline's defaults.
    ``negative_prompt``: a text for every row, or a sequence giving each row's (indexed by the row's position in
    ``rows``); ``guidance``: unsee guidance methods for every call; ``pipe_kwargs``: passed to every call.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = list(rows)
    negatives = None if negative_prompt is None or isinstance(negative_prompt, str) else list(negative_prompt)
    if negatives is not None and len(negatives) != len(rows):
        raise ValueError(f"negative_prompt gives {len(negatives)} prompts for {len(rows)} rows; give one per row or "
                         "one text")
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        images: list = []
        groups: list[tuple[tuple, list[int]]] = []  # (scale, size) -> positions in rows
        for position in range(start, start + len(batch)):
            row = rows[position]
            scale = row.guidance if row.guidance is not None else guidance_scale
            size = (row.height, row.width) if use_row_size and row.height and row.width else (height, width)
            key = (None if scale is None else float(scale), size)
            if groups and groups[-1][0] == key:
                groups[-1][1].append(position)
            else:
                groups.append((key, [position]))
        for (scale, (h, w)), positions in groups:
            kwargs: dict = dict(pipe_kwargs)
            if scale is not None:
                kwargs["guidance_scale"] = scale
            if steps is not None:
                kwargs["num_inference_steps"] = steps
            if guidance:
                kwargs["guidance"] = list(guidance)
            if negative_prompt is not None:
                kwargs["negative_prompt"] = ([negative_prompt] * len(positions) if negatives is None
                                             else [negatives[i] for i in positions])
            generators = generator if generator is not None else [
                torch.Generator(device="cpu").manual_seed(_row_seed(rows[i], seed)) for i in positions]
            result = pipe([rows[i].prompt for i in positions], height=h, width=w, generator=generators,
                          output_type="pil", **kwargs)
            images.extend(result.images)
        yield batch, images
