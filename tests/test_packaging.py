"""Packaging: the wheel installs unsee's folders under the unsee namespace only (no top-level guidance/erasure/
pipelines), ships the weights, license and typing marker, builds without setuptools warnings, declares dependency
ranges a user can live with; and ``import unsee`` works from the root of a checkout (issue 22, items 25 and 27)."""

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SUBPACKAGES = ("guidance", "erasure", "pipelines", "apps", "weights")
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                               "runs", "out", "checkpoints", ".whl", "tests", "benchmarks", "docs")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel path, build output): the wheel built by setuptools' own backend from a copy of the checkout (so the
    checkout gets no build/ or egg-info churn), with every warning printed."""
    pytest.importorskip("setuptools", minversion="77")  # pyproject's build requirement (SPDX license expression)
    source = tmp_path_factory.mktemp("source") / "unsee"
    shutil.copytree(ROOT, source, ignore=_SKIP, symlinks=True)
    out = tmp_path_factory.mktemp("wheel")
    code = f"import setuptools.build_meta as backend; print(backend.build_wheel({str(out)!r}))"
    result = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=source, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = out.glob("unsee-*.whl")
    return wheel, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel_files(built):
    return zipfile.ZipFile(built[0]).namelist()


@pytest.fixture(scope="module")
def metadata(built):
    wheel = zipfile.ZipFile(built[0])
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(name))


def test_wheel_uses_the_unsee_namespace_only(wheel_files):
    top_level = {name.split("/")[0] for name in wheel_files if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"unsee"}
    for package in SUBPACKAGES:
        assert f"unsee/{package}/__init__.py" in wheel_files
    for module in ("toy/__init__.py", "toy/world.py", "toy/presets.py", "jobs.py"):  # the toy world, the job runner
        assert f"unsee/{module}" in wheel_files


def test_wheel_ships_the_weights(wheel_files):
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "weights").rglob("*")
                     if p.is_file() and p.suffix in (".json", ".safetensors", ".txt", ".yaml"))
    assert shipped
    for path in shipped:
        assert "unsee/" + path in wheel_files, path


def test_namespaced_imports_work():
    code = "import unsee, unsee.guidance, unsee.erasure, unsee.pipelines, unsee.apps; import importlib.util as u; " \
           "print([m for m in ('guidance', 'erasure', 'pipelines') if u.find_spec(m)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


# -- item 25 ------------------------------------------------------------------------------------


def test_the_build_prints_no_setuptools_warnings(built):
    _, output = built
    for noise in ("Package would be ignored", "is absent from the `packages` configuration", "deprecated",
                  "Warning"):
        assert noise not in output, output[-3000:]


def test_license_typing_marker_urls_and_classifiers_are_declared(wheel_files, metadata):
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a stub
    assert metadata["License-Expression"] == "Apache-2.0"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel_files)
    assert "unsee/py.typed" in wheel_files
    urls = dict(value.split(", ", 1) for value in metadata.get_all("Project-URL") or [])
    assert {"Homepage", "Source", "Issues"} <= set(urls) and all(u.startswith("https://") for u in urls.values())
    classifiers = metadata.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Programming Language :: Python :: 3.1") for c in classifiers)
    assert any(c.startswith("Topic :: Scientific/Engineering") for c in classifiers)


def _requirements(names: list[str]) -> dict[str, Requirement]:
    return {Requirement(text).name.lower(): Requirement(text) for text in names}


def test_dependency_ranges_admit_the_next_releases_and_the_tested_lowest():
    dependencies = _requirements(PYPROJECT["project"]["dependencies"])
    diffusers = dependencies["diffusers"].specifier
    for version in ("0.43.0", "0.45.0", "0.99.0"):  # later minor releases are not blocked
        assert diffusers.contains(version), (str(diffusers), version)
    lowest = min((v for v in (Version(f"0.{minor}.0") for minor in range(20, 100)) if diffusers.contains(v)))
    assert lowest == Version("0.40.0"), f"the lowest diffusers tested is 0.40.0 (from_pipe(dtype=...)), got {lowest}"
    import diffusers as installed

    assert diffusers.contains(installed.__version__)


def test_no_extra_can_replace_the_users_torch():
    # every xformers wheel pins one torch release: an extra that pulls xformers can swap the user's torch
    for extra, names in PYPROJECT["project"].get("optional-dependencies", {}).items():
        for name in _requirements(names):
            assert name not in ("xformers", "torch", "torchvision"), f"extra {extra!r} pulls {name}"


# -- item 27: import unsee from the root of a checkout ----------------------------------------------


def _site_dirs() -> list[str]:
    """The interpreter's site-packages folders, to be put on sys.path without running their .pth files (so the
    development environment's editable-install finder is not there: Python sees the checkout as a user would)."""
    dirs = [p for p in sys.path if p.endswith("site-packages")]
    return dirs or [sysconfig.get_paths()["purelib"]]


IMPORT_ALL = ("import unsee, unsee.guidance, unsee.erasure, unsee.pipelines, unsee.apps, unsee.weights; "
              "from unsee.guidance import CFGpp; "
              "print(unsee.__file__); print(unsee.guidance.__file__); print(unsee.weights.__file__)")


def _import_from_root(extra_paths: list[str]) -> subprocess.CompletedProcess:
    # python -S: no site processing; sys.path = [cwd (the checkout's root), stdlib, *extra_paths, *site-packages]
    code = f"import sys; sys.path.extend({[*extra_paths, *_site_dirs()]!r}); {IMPORT_ALL}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def test_import_unsee_from_the_root_of_a_checkout_without_an_install():
    result = _import_from_root([])
    assert result.returncode == 0, result.stderr[-2000:]
    unsee_file, guidance_file, weights_file = result.stdout.split()[-3:]
    assert Path(unsee_file) == ROOT / "unsee" / "__init__.py"
    assert Path(guidance_file) == ROOT / "guidance" / "__init__.py"  # the subpackages of the same checkout
    assert Path(weights_file) == ROOT / "weights" / "__init__.py"


def test_import_unsee_from_the_root_of_a_checkout_with_a_regular_install(built, tmp_path):
    installed = tmp_path / "site"
    zipfile.ZipFile(built[0]).extractall(installed)  # what pip install . (not -e) puts in site-packages
    result = _import_from_root([str(installed)])
    assert result.returncode == 0, result.stderr[-2000:]
    unsee_file, guidance_file, _ = result.stdout.split()[-3:]
    assert Path(unsee_file) == ROOT / "unsee" / "__init__.py"  # the current folder comes first, as in Python
    assert Path(guidance_file) == ROOT / "guidance" / "__init__.py"


def test_the_checkout_map_matches_pyproject():
    import unsee

    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    mapped = {name.split(".", 1)[1]: folder for name, folder in package_dir.items() if name.startswith("unsee.")}
    assert mapped == unsee._CHECKOUT_FOLDERS
