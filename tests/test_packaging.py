"""The wheel installs unsee's folders under the unsee namespace only (no top-level guidance/erasure/pipelines)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = out.glob("unsee-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_wheel_uses_the_unsee_namespace_only(wheel_files):
    top_level = {name.split("/")[0] for name in wheel_files if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"unsee"}
    for package in ("guidance", "erasure", "pipelines", "apps", "weights"):
        assert f"unsee/{package}/__init__.py" in wheel_files


def test_wheel_ships_the_weights(wheel_files):
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "weights").rglob("*")
                     if p.is_file() and p.suffix in (".json", ".safetensors", ".txt"))
    for path in shipped:
        assert "unsee/" + path in wheel_files, path


def test_namespaced_imports_work():
    code = "import unsee, unsee.guidance, unsee.erasure, unsee.pipelines, unsee.apps; import importlib.util as u; " \
           "print([m for m in ('guidance', 'erasure', 'pipelines') if u.find_spec(m)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"
