"""Render the demo in headless Chromium and save a screenshot (the picture in the README).

    .venv/bin/python scripts/screenshot_demo.py                 # the toy model -> docs/demo.png
    .venv/bin/python scripts/screenshot_demo.py --tiny          # a tiny random pipeline (no weights needed)

Needs Debian's chromium (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from unsee.apps.demo import DemoApp, launch

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def screenshot(url: str, out: Path, width: int = 1280, height: int = 1000) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium is not installed (scripts/setup.sh installs Debian's chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        "--virtual-time-budget=20000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/demo.png")
    parser.add_argument("--tiny", action="store_true", help="serve a tiny random pipeline instead of the toy model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        if args.tiny:
            from unsee.testing import tiny_sd_pipeline

            app = DemoApp(pipe=tiny_sd_pipeline(), model="tiny", workdir=workdir)
        else:
            app = DemoApp(model="toy", workdir=workdir)
            app.pipeline()
        demo = launch(app, port=None, block=False)
        try:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            screenshot(demo.local_url, out)
            print(f"wrote {out}")
        finally:
            demo.close()


if __name__ == "__main__":
    main()
