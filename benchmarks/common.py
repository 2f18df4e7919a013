"""Helpers for benchmark scripts: hardware description and BENCHMARKS.md sections."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Optional

import torch

from unsee.files import atomic_write

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun that script to update it.\n"


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads{gpu}"


def _section_pattern(name: str) -> re.Pattern:
    """The section ``name`` of BENCHMARKS.md, from <!-- name:start --> to <!-- name:end -->; group 1: its body."""
    return re.compile(rf"<!-- {re.escape(name)}:start -->\n?(.*?)\n?<!-- {re.escape(name)}:end -->", re.S)


def read_section(name: str) -> Optional[str]:
    """The body of the section between <!-- name:start --> and <!-- name:end --> in BENCHMARKS.md (None: none)."""
    found = _section_pattern(name).search(BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "")
    return found.group(1) if found else None


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between <!-- name:start --> and <!-- name:end --> in BENCHMARKS.md."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = _section_pattern(name)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write(BENCHMARKS_MD, lambda tmp: Path(tmp).write_text(text))
