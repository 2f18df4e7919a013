"""The GPU speed benchmark is run only where a GPU is lent, rarely: its CPU smoke mode keeps it working meanwhile."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_speed_smoke_run_fills_every_ratio(tmp_path):
    out = tmp_path / "gpu_speed.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--smoke", "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    rows = [line for line in out.read_text().splitlines() if re.match(r"\| (sd15|sdxl) \| 64 \| sdpa \| [0-9]", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["sd15", "sdxl"] * 2  # the ratio and the ms tables
    ratios = [float(x) for x in rows[0].strip(" |").split("|")[3:]]
    assert len(ratios) == 9 and all(0 < r < 10 for r in ratios)
