"""Packaging: `python -m sdcore`, the bundled model as package data, and (slow tier) the built sdist and wheel.

The slow tests run `python -m build` on this checkout (an sdist, then the wheel built from that sdist, so the sdist
is shown to hold everything a build needs), then install the wheel into a new venv (`python -m venv`, then
`pip install -c constraints.txt <wheel>`: no test extras, torch from this machine's disk) and run the installed
`sdcore img2img` on a photo with the bundled default model, from a directory outside the repository. Several
minutes, nearly all of it pip installing torch and its CUDA wheels into the new venv.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

import sdcore
from sdcore.cli import DEFAULT_CKPT

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(sdcore.__file__).resolve().parent
MODEL = "sdcore/weights/sdcore-tiny.safetensors"


def _clean_env() -> dict[str, str]:
    """This environment without anything that would make a subprocess see the checkout or the dev venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(args, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=timeout)


# -- default tier ------------------------------------------------------------------------------------------------------

def test_python_m_sdcore_help(tmp_path):
    """`python -m sdcore` is the `sdcore` command (sdcore/__main__.py -> sdcore.cli.main)."""
    out = _run([sys.executable, "-m", "sdcore", "--help"], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "img2img" in out.stdout and "inpaint" in out.stdout
    bad = _run([sys.executable, "-m", "sdcore", "no-such-command"], cwd=tmp_path, timeout=120)
    assert bad.returncode == 2


def test_bundled_model_is_package_data():
    """The CLI's default checkpoint lies inside the package and is declared as package data (so the wheel has it),
    and py.typed is shipped too."""
    assert DEFAULT_CKPT.is_file()
    assert DEFAULT_CKPT.resolve().relative_to(PACKAGE).as_posix() == "weights/sdcore-tiny.safetensors"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert set(package_data["sdcore"]) >= {"py.typed", "weights/sdcore-tiny.safetensors"}
    assert (PACKAGE / "py.typed").is_file()


# -- slow tier: build, install into a clean venv, run ------------------------------------------------------------------

@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """`python -m build` on the checkout: (sdist, wheel, build output, seconds)."""
    out = tmp_path_factory.mktemp("dist")
    start = time.perf_counter()
    built = _run([sys.executable, "-m", "build", "--outdir", out, ROOT], cwd=out, timeout=900)
    seconds = time.perf_counter() - start
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,), (wheel,) = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    return sdist, wheel, built.stdout + built.stderr, seconds


@pytest.mark.slow
def test_sdist_and_wheel_contents(dists):
    sdist, wheel, log, _ = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{dist_info}/METADATA").decode()
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
        model_size = z.getinfo(MODEL).file_size
    assert {MODEL, "sdcore/py.typed", "sdcore/__main__.py", "sdcore/cli/__init__.py",
            f"{dist_info}/licenses/LICENSE"} <= names
    assert model_size == DEFAULT_CKPT.stat().st_size
    assert not any(n.startswith(("tests/", "weights/", "scripts/")) for n in names)
    assert "License-Expression: MIT" in metadata and "sdcore = sdcore.cli:main" in entry_points
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        members = {n.removeprefix(f"{top}/") for n in t.getnames()}
    assert {"pyproject.toml", "README.md", "LICENSE", "weights/README.md", MODEL, "sdcore/py.typed",
            "sdcore/__main__.py"} <= members
    assert {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")} <= members
    # setuptools' "`project.license` as a TOML table is deprecated" (and any other deprecation) is gone
    assert "deprecated" not in log.lower(), log


@pytest.fixture
def clean_venv(tmp_path):
    """A new venv's directory (created by the test); removed afterwards: with torch and its CUDA wheels it is ~6 GB."""
    path = tmp_path / "venv"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_wheel_runs_img2img_in_clean_venv(dists, clean_venv, tmp_path):
    """The installed wheel, nothing else: `sdcore img2img photo.png` with the bundled model writes a PNG with its
    "parameters" infotext, without torchsde's float-rounding warnings (an SDE sampler), and `python -m sdcore --help`
    works. Run from tmp_path, with no PYTHONPATH, so the checkout cannot be imported."""
    _, wheel, _, build_seconds = dists
    times = {"build": build_seconds}
    venv = clean_venv
    start = time.perf_counter()
    made = _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, timeout=300)
    assert made.returncode == 0, made.stderr
    python, sdcore_script = venv / "bin" / "python", venv / "bin" / "sdcore"
    installed = _run([python, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt", wheel], cwd=tmp_path,
                     timeout=3000)
    times["venv + pip install"] = time.perf_counter() - start
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    where = _run([python, "-c", "import sdcore, sdcore.cli; print(sdcore.__file__); print(sdcore.cli.DEFAULT_CKPT)"],
                 cwd=tmp_path, timeout=300)
    assert where.returncode == 0, where.stderr
    module_file, default_ckpt = where.stdout.split()
    assert Path(module_file).is_relative_to(venv) and Path(default_ckpt).is_relative_to(venv)
    assert Path(default_ckpt).is_file()

    help_ = _run([python, "-m", "sdcore", "--help"], cwd=tmp_path, timeout=300)
    assert help_.returncode == 0 and "img2img" in help_.stdout, help_.stderr

    Image.fromarray(data.astronaut()).save(tmp_path / "photo.png")  # 512 x 512, public domain (NASA)
    start = time.perf_counter()
    run = _run([sdcore_script, "img2img", "photo.png", "--prompt", "a red circle", "--sampler-name", "DPM++ 2M SDE",
                "--seed", "1234", "--outdir", "out"], cwd=tmp_path, timeout=900)
    times["sdcore img2img"] = time.perf_counter() - start
    assert run.returncode == 0, run.stderr
    assert "Should have t" not in run.stderr, run.stderr  # torchsde's rounding warnings (BrownianTreeNoiseSampler)
    (png,) = sorted((tmp_path / "out").rglob("*.png"))
    assert str(png.relative_to(tmp_path)) in run.stdout or str(png) in run.stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (64, 64)  # the tiny model's native size
        parameters = image.info["parameters"]
    assert parameters.startswith("a red circle\n") and "Sampler: DPM++ 2M SDE" in parameters
    assert "Seed: 1234" in parameters and "Denoising strength: 0.75" in parameters
    print(" ".join(f"{k} {v:.0f} s;" for k, v in times.items()))
