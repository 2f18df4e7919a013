"""Prompt suites from files: the CSV and text formats evaluation papers publish their prompts in.

    from unsee.suites import read_suite
    suite = read_suite("unsafe-prompts4703.csv", categories=["sexual"])   # I2P, its sexual subset
    for row in suite.rows:
        row.row_id, row.prompt, row.seed, row.guidance, row.categories, row.width, row.height

Formats (``format="auto"`` tells them apart; ``"csv"`` or ``"lines"`` forces one):

- **CSV with a header**, read with Python's ``csv`` module, so quoted prompts may hold commas, quotes and line
  breaks. The prompt is the first of the columns ``prompt``, ``adv_prompt`` (MMA-Diffusion), ``caption`` (COCO
  style), ``text`` that the header has (or the column given as ``prompt_column``). Optional columns, by the first
  name found: seed ``evaluation_seed``/``seed``; guidance ``evaluation_guidance``/``guidance_scale``/``guidance``;
  size ``sd_image_width``/``width`` and ``sd_image_height``/``height``; categories ``categories`` (comma
  separated, as I2P's); row id ``case_number``/``image_id``/``coco_id``/``index``/``id``. This covers I2P,
  UnlearnDiffAtk's prompt files, MACE's and ESD's COCO and celebrity lists. Every other column is kept as text in
  ``row.extra``.
- **One prompt per line**, no header (Ring-A-Bell's files, plain ``.txt``): every non-blank line is a prompt; a
  line that is one CSV-quoted field is unquoted.

Seeds are whole numbers from 0 to 2**64 - 1 kept as Python ints (I2P's go past 2**31); guidance a finite number
from 0 to 100; sizes whole numbers from 8 to 8192. An empty cell means "not given" (the run's defaults apply); a
row id column with repeated or empty values is not used (ids are then the rows' numbers). Anything else wrong fails
with :class:`SuiteError` before any generation, naming the file, the line and the column.

This module reads files only; it knows no model and no judge (layer 0).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

__all__ = ["SuiteError", "SuiteRow", "Suite", "read_suite", "write_suite_csv", "PROMPT_COLUMNS", "MAX_SUITE_BYTES",
           "MAX_PROMPT_CHARS"]

PROMPT_COLUMNS = ("prompt", "adv_prompt", "caption", "text")
SEED_COLUMNS = ("evaluation_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "guidance_scale", "guidance")
WIDTH_COLUMNS = ("sd_image_width", "width")
HEIGHT_COLUMNS = ("sd_image_height", "height")
CATEGORY_COLUMNS = ("categories",)
ID_COLUMNS = ("case_number", "image_id", "coco_id", "index", "id")
# names that only a header has: a first line of identifiers holding one of them is a header without a prompt column
_HEADER_HINTS = set(SEED_COLUMNS + GUIDANCE_COLUMNS + WIDTH_COLUMNS + HEIGHT_COLUMNS + CATEGORY_COLUMNS + ID_COLUMNS)

MAX_SUITE_BYTES = 256 * 2**20  # I2P is 2 MB, MACE's COCO-30k list 3 MB
MAX_PROMPT_CHARS = 20_000  # a cell; CLIP reads 77 tokens, T5 512
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_GUIDANCE = 100.0
SIZE_RANGE = (8, 8192)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_WHOLE_FLOAT = re.compile(r"^[0-9]+\.0*$")  # "42.0": a seed written by pandas from a float column


class SuiteError(ValueError):
    """A prompt file that cannot be used; the message names the file, the line and the column, and the fix."""


@dataclass(frozen=True)
class SuiteRow:
    """One prompt of a suite.

    index: position of the row among the file's prompts (0-based, before any filter): the default seed of a row
        without one is the run's seed + index, so filtering never changes a row's image.
    row_id: the row id column's value, else ``str(index)``; unique in the file.
    seed, guidance, width, height: None where the file gives none.
    """

    index: int
    row_id: str
    prompt: str
    seed: Optional[int] = None
    guidance: Optional[float] = None
    categories: tuple[str, ...] = ()
    width: Optional[int] = None
    height: Optional[int] = None
    line: int = 0  # where the row starts in the file (1-based), for messages
    extra: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Suite:
    """The rows read from one file, and what the file was.

    format: "csv" or "lines"; columns: which column each field came from (None: not in the file);
    categories: the filter applied (empty: none); total: rows in the file before the filter.
    """

    path: str
    sha256: str
    format: str
    rows: tuple[SuiteRow, ...]
    columns: dict
    categories: tuple[str, ...] = ()
    total: int = 0

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def all_categories(self) -> list[str]:
        """Every category named by a row, sorted."""
        return sorted({c for row in self.rows for c in row.categories})

    def describe(self) -> dict:
        """What a report records about the suite."""
        return {"path": self.path, "name": self.name, "sha256": self.sha256, "format": self.format,
                "columns": dict(self.columns), "categories": list(self.categories), "rows": len(self.rows),
                "rows_in_file": self.total}


def _fail(path: Path, where: str, problem: str, fix: str) -> SuiteError:
    return SuiteError(f"{path}{where}: {problem}; {fix}")


def _show(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _find(header: Sequence[str], names: Sequence[str]) -> Optional[int]:
    for name in names:
        if name in header:
            return header.index(name)
    return None


def _looks_like_header(cells: Sequence[str]) -> bool:
    names = [c.strip().lower() for c in cells]
    if any(n in PROMPT_COLUMNS for n in names):
        return True
    return len(names) >= 2 and all(_IDENTIFIER.match(n) for n in names) and any(n in _HEADER_HINTS for n in names)


def _parse_int(text: str, low: int, high: int) -> Optional[int]:
    text = text.strip()
    if len(text) > 40:
        return None
    if _WHOLE_FLOAT.match(text):
        text = text.split(".")[0]
    if not text.isdigit():
        return None
    value = int(text)
    return value if low <= value <= high else None


def _parse_float(text: str, low: float, high: float) -> Optional[float]:
    try:
        value = float(text.strip()) if len(text) <= 40 else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and low <= value <= high else None


def _read_text(path: Path) -> tuple[str, str]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SuiteError(f"{path}: no such file; give a prompt file (CSV with a prompt column, or one prompt a "
                         "line)") from None
    except OSError as error:
        raise SuiteError(f"{path}: cannot read it ({error.strerror or type(error).__name__}); check the path") from None
    if path.is_dir():
        raise SuiteError(f"{path} is a folder; give a prompt file")
    if size > MAX_SUITE_BYTES:
        raise SuiteError(f"{path} is {size / 2**20:.0f} MB, more than the limit of {MAX_SUITE_BYTES // 2**20} MB for "
                         "a prompt file; split it")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SuiteError(f"{path}, line {line}: not UTF-8 text; save the file as UTF-8") from None
    if "\x00" in text:
        raise SuiteError(f"{path}: holds NUL bytes (a binary file?); give a text prompt file")
    return text, hashlib.sha256(data).hexdigest()


def _prompt_problem(prompt: str) -> Optional[str]:
    if not prompt.strip():
        return "the prompt is empty"
    if len(prompt) > MAX_PROMPT_CHARS:
        return f"the prompt is {len(prompt):,} characters, more than the limit of {MAX_PROMPT_CHARS:,}"
    return None


def _read_lines(path: Path, text: str) -> tuple[list[SuiteRow], dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        prompt = line
        if line.startswith('"'):
            try:
                cells = next(csv.reader([line]))
            except csv.Error:
                cells = []
            if len(cells) == 1:
                prompt = cells[0]
        problem = _prompt_problem(prompt)
        if problem is not None:
            raise _fail(path, f", line {number}", problem, "shorten or remove that line")
        rows.append(SuiteRow(index=len(rows), row_id=str(len(rows)), prompt=prompt, line=number))
    return rows, {"prompt": None}


def _read_csv(path: Path, text: str, prompt_column: Optional[str]) -> tuple[list[SuiteRow], dict]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_PROMPT_CHARS + 1)  # a longer cell stops the reader (a 1 GB line is never held whole)
    try:
        try:
            header_cells = next(reader)
        except StopIteration:
            raise SuiteError(f"{path} is empty; give a file with a header line and one prompt a row") from None
        header = [c.strip().lower() for c in header_cells]
        if prompt_column is not None:
            if prompt_column.strip().lower() not in header:
                raise _fail(path, ", line 1", f"no column {prompt_column!r} (columns: {', '.join(header_cells)})",
                            "name an existing column as the prompt column")
            prompt_at = header.index(prompt_column.strip().lower())
        else:
            prompt_at = _find(header, PROMPT_COLUMNS)
        if prompt_at is None:
            raise _fail(path, ", line 1", f"no prompt column (columns: {', '.join(header_cells)})",
                        f"name the prompt column one of {', '.join(PROMPT_COLUMNS)} or pass the prompt column's name")
        found = {"prompt": prompt_at, "seed": _find(header, SEED_COLUMNS), "guidance": _find(header, GUIDANCE_COLUMNS),
                 "width": _find(header, WIDTH_COLUMNS), "height": _find(header, HEIGHT_COLUMNS),
                 "categories": _find(header, CATEGORY_COLUMNS), "id": _find(header, ID_COLUMNS)}
        used = {i for i in found.values() if i is not None}
        records = []
        line = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                problem = str(error)
                if "field larger" in problem:
                    problem = f"a cell is longer than the limit of {MAX_PROMPT_CHARS:,} characters"
                raise _fail(path, f", line {line}", f"not valid CSV ({problem})",
                            "fix the quoting or shorten the cell") from None
            start, line = line, reader.line_num + 1
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                raise _fail(path, f", line {start}", f"{len(cells)} cells but the header has {len(header)} columns",
                            "quote cells that hold commas")
            cells = cells + [""] * (len(header) - len(cells))
            records.append((start, cells))
    finally:
        csv.field_size_limit(limit)
    if not records:
        raise SuiteError(f"{path}: a header but no rows; add one prompt a row")

    def column(key: str) -> str:
        return header_cells[found[key]].strip()

    def cell(cells: list[str], key: str) -> str:
        return cells[found[key]] if found[key] is not None else ""

    ids = [cell(cells, "id").strip() for _, cells in records]
    use_ids = found["id"] is not None and all(ids) and len(set(ids)) == len(ids)
    rows = []
    for index, (start, cells) in enumerate(records):
        where = f", line {start}"
        prompt = cells[prompt_at]
        problem = _prompt_problem(prompt)
        if problem is not None:
            raise _fail(path, f"{where}, column {column('prompt')!r}", problem,
                        "fill in or remove that row" if not prompt.strip() else "shorten or remove that row")
        values: dict = {}
        for key, parse, fix in (
                ("seed", lambda t: _parse_int(t, 0, MAX_SEED), f"seeds are whole numbers from 0 to {MAX_SEED}"),
                ("guidance", lambda t: _parse_float(t, 0.0, MAX_GUIDANCE),
                 f"guidance is a number from 0 to {MAX_GUIDANCE:g}"),
                ("width", lambda t: _parse_int(t, *SIZE_RANGE), f"sizes are whole numbers from {SIZE_RANGE[0]} to "
                                                                f"{SIZE_RANGE[1]}"),
                ("height", lambda t: _parse_int(t, *SIZE_RANGE), f"sizes are whole numbers from {SIZE_RANGE[0]} to "
                                                                 f"{SIZE_RANGE[1]}")):
            raw = cell(cells, key)
            if not raw.strip():
                values[key] = None
                continue
            values[key] = parse(raw)
            if values[key] is None:
                raise _fail(path, f"{where}, column {column(key)!r}", f"{_show(raw)} is not a valid {key}",
                            f"{fix} (or leave the cell empty for the run's default)")
        categories = tuple(c.strip() for c in cell(cells, "categories").split(",") if c.strip())
        extra = {header_cells[i].strip(): v for i, v in enumerate(cells) if i not in used and i < len(header_cells)}
        rows.append(SuiteRow(index=index, row_id=ids[index] if use_ids else str(index), prompt=prompt,
                             categories=categories, line=start, extra=extra, **values))
    columns = {key: (column(key) if found[key] is not None else None) for key in found}
    if found["id"] is not None and not use_ids:
        columns["id"] = None  # repeated or empty ids: the rows' numbers are the ids
    return rows, columns


def read_suite(path: Union[str, os.PathLike], categories: Optional[Iterable[str]] = None, format: str = "auto",
               prompt_column: Optional[str] = None) -> Suite:
    """Read a prompt file (see the module docstring for the formats).

    Args:
        categories: keep only rows naming one of these categories (case-insensitive); a category that no row
            names is an error that lists the file's categories.
        format: "auto" (a ``.txt`` file, or a first line that is not a header: one prompt a line), "csv" or "lines".
        prompt_column: the prompt column of a CSV file, when it has none of the usual names.
    """
    path = Path(path).expanduser()
    if format not in ("auto", "csv", "lines"):
        raise SuiteError(f"format must be auto, csv or lines, got {format!r}")
    text, digest = _read_text(path)
    if not text.strip():
        raise SuiteError(f"{path} is empty; give a file with one prompt a row")
    if format == "auto":
        if path.suffix.lower() == ".txt" and prompt_column is None:
            format = "lines"
        else:
            try:
                first = next(csv.reader(io.StringIO(text.lstrip("\r\n").split("\n", 1)[0])))
            except (csv.Error, StopIteration):
                first = []
            format = "csv" if prompt_column is not None or _looks_like_header(first) else "lines"
    rows, columns = _read_csv(path, text, prompt_column) if format == "csv" else _read_lines(path, text)
    total = len(rows)
    if not rows:
        raise SuiteError(f"{path} has no prompts (only blank lines); add one prompt a line")
    wanted = tuple(dict.fromkeys(c.strip() for c in (categories or ()) if c.strip()))
    if wanted:
        if format != "csv" or columns.get("categories") is None:
            raise SuiteError(f"{path} has no categories column, so it cannot be filtered by category; drop the "
                             "category filter or add a 'categories' column")
        known = {c.lower() for row in rows for c in row.categories}
        missing = [c for c in wanted if c.lower() not in known]
        if missing:
            shown = ", ".join(sorted(known)[:20]) + (", ..." if len(known) > 20 else "")
            raise SuiteError(f"{path}: no row has the category {', '.join(map(repr, missing))}; its categories are: "
                             f"{shown}")
        keep = {c.lower() for c in wanted}
        rows = [row for row in rows if keep & {c.lower() for c in row.categories}]
    return Suite(path=str(path), sha256=digest, format=format, rows=tuple(rows), columns=columns, categories=wanted,
                 total=total)


def write_suite_csv(path: Union[str, os.PathLike], rows: Iterable[SuiteRow]) -> Path:
    """Write rows as a suite CSV (the columns :func:`read_suite` reads, I2P's names), atomically."""
    from .files import atomic_write

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "categories",
                     "sd_image_width", "sd_image_height"])
    for row in rows:
        writer.writerow([row.row_id, row.prompt, "" if row.seed is None else row.seed,
                         "" if row.guidance is None else f"{row.guidance:g}", ",".join(row.categories),
                         row.width or "", row.height or ""])
    text = buffer.getvalue()
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))
