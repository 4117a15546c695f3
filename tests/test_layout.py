"""The package's architecture as it is checked: the layers contract, and what a wheel ships."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("lint-imports") is None,
                                reason="needs import-linter: pip install -e '.[dev]'")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run(["lint-imports", "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_no_lower_layer_imports_a_higher_one():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout


def test_an_inverted_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "hf_repair", tmp_path / "hf_repair", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "hf_repair" / "utils" / "files.py", "a") as f:
        f.write("\n\ndef _inverted():\n    from ..repairer import Repairer  # a lazy import counts too\n\n    return Repairer\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0
    assert "hf_repair.utils is not allowed to import hf_repair.repairer" in run.stdout


def test_every_subpackage_is_a_layer_of_the_contract():
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layered = {name.strip().removeprefix("hf_repair.") for layer in contract["layers"] for name in layer.split("|")}
    packages = {p.name for p in (ROOT / "hf_repair").iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in (ROOT / "hf_repair").glob("*.py") if p.stem != "__init__"}
    assert packages | modules == layered


def test_the_wheel_ships_the_library_only(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("hf_repair-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_repair/report/style.css" in names
    assert "hf_repair/cli/__main__.py" in names
    top_level = {name.split("/")[0] for name in names}
    assert {"testbed", "benchmarks", "examples", "tests"}.isdisjoint(top_level)
    testbed = {path.name for path in (ROOT / "testbed").glob("*.py") if path.name != "__init__.py"}
    assert not [name for name in names if name.rsplit("/", 1)[-1] in testbed]  # nor a copy of one inside the library
