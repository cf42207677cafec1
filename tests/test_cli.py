"""The command line: good runs write A1111-named PNGs with infotext and never overwrite; bad values exit 2 naming
the argument and write nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from conftest import rect_mask
from sdcore.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, astronaut):
    d = tmp_path_factory.mktemp("cli")
    astronaut.resize((64, 64)).save(d / "init.png")
    rect_mask((64, 64), (16, 16, 48, 48)).save(d / "mask.png")
    rect_mask((32, 32), (8, 8, 24, 24)).save(d / "small_mask.png")
    (d / "notes.txt").write_text("not an image")
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_img2img_writes_numbered_pngs_and_never_overwrites(capsys, files, sd1_tiny_path, tmp_path):
    outdir = tmp_path / "out"
    args = ["img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--prompt", "a cat", "--steps", "3",
            "--seed", "42", "--width", "64", "--height", "64", "--outdir", outdir]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    first = Path(out.split()[0])
    assert first.name == "00000-42.png" and first.parent.parent == outdir  # outdir/<YYYY-MM-DD>/ (spec 9.4)
    before = first.read_bytes()
    code, out, _ = run(capsys, *args)
    assert code == 0 and out.split() == [str(first.parent / "00001-42.png")]
    assert first.read_bytes() == before
    info = Image.open(first).text["parameters"]
    assert info.startswith("a cat\nSteps: 3, Sampler: Euler a, ") and "Seed: 42" in info


def test_inpaint_alias_with_mask(capsys, files, inpaint_tiny_path, tmp_path):
    code, out, err = run(capsys, "inpaint", files / "init.png", "--mask", files / "mask.png", "--ckpt",
                         inpaint_tiny_path, "--steps", "2", "--seed", "1", "--width", "64", "--height", "64",
                         "--outdir", tmp_path)
    assert code == 0, err
    assert Image.open(out.split()[0]).size == (64, 64)


@pytest.mark.parametrize("extra, arg", [
    (["--denoising-strength", "1.5"], "--denoising-strength"),
    (["--width", "60"], "--width"),
    (["--sampler", "Eulerr"], "Eulerr"),
    (["--mask", "{files}/small_mask.png"], "--mask"),
    (["--mask", "{files}/notes.txt"], "--mask"),
])
def test_bad_values_exit_2_naming_the_argument_and_write_nothing(capsys, files, sd1_tiny_path, tmp_path, extra,
                                                                  arg):
    outdir = tmp_path / "never"
    extra = [e.format(files=files) for e in extra]
    code, out, err = run(capsys, "img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--outdir", outdir, *extra)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and arg in err
    assert not outdir.exists()


def test_unreadable_init_and_checkpoint(capsys, files, tmp_path):
    code, _, err = run(capsys, "img2img", files / "notes.txt", "--ckpt", files / "init.png", "--outdir", tmp_path)
    assert code == 2 and "init" in err
    code, _, err = run(capsys, "img2img", files / "init.png", "--ckpt", files / "notes.txt", "--outdir", tmp_path)
    assert code == 2 and "notes.txt" in err


def test_info_and_samplers(capsys, sd1_tiny_path):
    code, out, _ = run(capsys, "info", sd1_tiny_path)
    assert code == 0 and "family: sd1" in out and "model hash" in out
    code, out, _ = run(capsys, "samplers")
    assert code == 0 and "DPM++ 2M" in out and "Euler a" in out
