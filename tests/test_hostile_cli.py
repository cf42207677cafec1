"""Hostile conditions for the command line (issue 11 items 4, 5, 12): a full disk while saving, sizes that cannot
fit in memory, and a fast start (--help and argument errors without torch; nothing loads before the files are
checked; a finished batch loads nothing)."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import rect_mask
from sdcore import families, images, resources
from sdcore.cli import commands, flags, main

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("--width", "64", "--height", "64", "--steps", "2")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def init_png(tmp_path, astronaut):
    path = tmp_path / "init.png"
    astronaut.resize((64, 64)).save(path)
    return path


@pytest.fixture
def disk_full(monkeypatch):
    """PNG saving that writes 100 bytes of the file, then fails as a full disk does."""
    calls = []

    def save(im, fp, filename):
        calls.append(filename)
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 92)
        fp.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setitem(Image.SAVE, "PNG", save)
    return calls


@pytest.fixture
def no_model(monkeypatch):
    """The model must not load: any load fails the test."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(commands, "_load_model", load)


# -- item 4: every save is atomic -------------------------------------------------------------------------------------

def test_one_writer_for_every_save():
    """save_image, the batch outputs and the trace go through one helper (no twin)."""
    import sdcore.cli

    assert commands.write_new_file is images.write_new_file is sdcore.cli.write_new_file


def test_save_image_disk_full_leaves_nothing(tmp_path, disk_full):
    with pytest.raises(OSError) as e:
        images.save_image(Image.new("RGB", (8, 8)), tmp_path, 42, "params", date_subfolder=False)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "00000-42.png")
    assert disk_full and os.listdir(tmp_path) == []  # no truncated 00000-42.png, no temporary file


def test_write_new_file_failing_writer_or_flush_leaves_nothing(tmp_path, monkeypatch):
    def half(tmp):
        tmp.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        images.write_new_file(tmp_path / "x.png", half)
    assert os.listdir(tmp_path) == []

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as e:
        images.write_new_file(tmp_path / "x.png", lambda tmp: tmp.write_bytes(b"complete"))
    assert e.value.errno == errno.EIO and e.value.filename == str(tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_save_image_never_overwrites_a_name_taken_while_writing(tmp_path, monkeypatch):
    """Another process creates 00000-7.png after the number was chosen: it is kept, this image takes 00001."""
    real = Image.SAVE["PNG"]

    def racing(im, fp, filename):
        (tmp_path / "00000-7.png").write_bytes(b"the other run's image")
        monkeypatch.setitem(Image.SAVE, "PNG", real)
        real(im, fp, filename)

    monkeypatch.setitem(Image.SAVE, "PNG", racing)
    path = images.save_image(Image.new("RGB", (8, 8), "red"), tmp_path, 7, date_subfolder=False)
    assert path == tmp_path / "00001-7.png"
    assert (tmp_path / "00000-7.png").read_bytes() == b"the other run's image"
    assert sorted(os.listdir(tmp_path)) == ["00000-7.png", "00001-7.png"]
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)


def test_save_without_hard_links_still_never_overwrites(tmp_path, monkeypatch):
    """File systems without hard links (os.link -> EPERM): reserve the name exclusively, then rename onto it."""
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "00000-7.png").write_bytes(b"first")
    path = images.save_image(Image.new("RGB", (8, 8)), tmp_path, 7, "params", date_subfolder=False)
    assert path.name == "00001-7.png" and (tmp_path / "00000-7.png").read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["00000-7.png", "00001-7.png"]
    with Image.open(path) as im:
        assert im.text["parameters"] == "params"
    with pytest.raises(FileExistsError):
        images.write_new_file(tmp_path / "00000-7.png", lambda tmp: tmp.write_bytes(b"second"))
    assert (tmp_path / "00000-7.png").read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["00000-7.png", "00001-7.png"]


def test_cli_disk_full_single_image_exits_2_in_one_line(capsys, init_png, sd1_tiny_path, tmp_path, disk_full):
    outdir = tmp_path / "out"
    code, out, err = run(capsys, "img2img", init_png, "--ckpt", sd1_tiny_path, *SMALL, "--seed", 5, "--outdir",
                         outdir)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "00000-5.png" in err and out == ""
    assert disk_full and files_under(outdir) == []


def test_cli_disk_full_batch_exits_2_in_one_line(capsys, init_png, sd1_tiny_path, tmp_path, disk_full):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    os.replace(init_png, inputs / "a.png")
    code, _, err = run(capsys, "img2img", "--input-dir", inputs, "--output-dir", out, "--ckpt", sd1_tiny_path,
                       *SMALL)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err, err
    assert disk_full and files_under(out) == []


# -- item 5: memory estimated before allocating ----------------------------------------------------------------------

def test_estimate_terms_follow_the_documented_formula():
    sd1, tiny = families.SD1, families.TINY
    # SD's decoder: 256 channels (ch 128 x ch_mult[1]) enter its full-resolution level
    assert resources.vae_bytes(sd1, 512, 512) == int(resources.VAE_CONV_FACTOR * 256 * 512 * 512 * 4)
    assert resources.vae_bytes(tiny, 512, 512) == int(resources.VAE_CONV_FACTOR * 64 * 512 * 512 * 4)
    # the mid-block attention runs torch's O(N) flash kernel (VAE_ATTENTION_MATERIALISED is False): convolutions
    # dominate at every size; the N x N term returns for a kernel that materialises the scores
    assert not resources.VAE_ATTENTION_MATERIALISED
    assert resources.vae_bytes(sd1, 2048, 2048) == int(resources.VAE_CONV_FACTOR * 256 * 2048 * 2048 * 4)
    assert resources.vae_bytes(sd1, 512, 512, "float16") == resources.vae_bytes(sd1, 512, 512) // 2
    assert resources.unet_bytes(sd1, 512, 512, 4) == 4 * resources.unet_bytes(sd1, 512, 512, 1)
    parts = resources.estimate_parts(sd1, 512, 512, 2, image_size=(1024, 1024))
    assert parts["pixels"] == resources.PIXEL_BYTES * 1024 * 1024 * 2
    assert resources.estimate_bytes(sd1, 512, 512, 2, image_size=(1024, 1024)) == \
        parts["fixed"] + parts["pixels"] + max(parts["vae"], parts["unet"])
    assert resources.estimate_bytes(sd1, 1024, 1024) > resources.estimate_bytes(sd1, 512, 512)


def test_vae_attention_term_matches_the_vae_code(monkeypatch):
    """VAE_ATTENTION_MATERIALISED says whether torch's CPU attention takes its math kernel (N x N scores) for the
    VAE: it does when q's last dimension is not contiguous (flash needs stride 1); AttnBlock passes contiguous q/k/v
    (scripts/bench_vae_tiling.py measures both layouts at 1024 px)."""
    import torch

    from sdcore.models import vae

    strides = []
    real = vae.F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        strides.append(q.stride(-1))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(vae.F, "scaled_dot_product_attention", spy)
    block = vae.AttnBlock(32)
    with torch.inference_mode():
        block(torch.randn(1, 32, 4, 4))
    assert strides and resources.VAE_ATTENTION_MATERIALISED == (strides[0] != 1)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset is Linux-only")
def test_estimate_covers_measured_peaks():
    """Measured peak (fresh process, VmHWM) <= the estimate's term without its fixed part: the tiny VAE decoding
    512 px and 768 px (convolutions dominate; the attention's flash kernel is O(N)), one tiny UNet call."""
    for case in ({"kind": "decode", "family": "tiny", "size": 512}, {"kind": "decode", "family": "tiny", "size": 768},
                 {"kind": "unet", "family": "tiny", "size": 512, "batch": 2}):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_cli.py"), "--measure", json.dumps(case)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        m = json.loads(r.stdout.strip().splitlines()[-1])
        assert m["measured"] <= m["estimated"], (case, m)


def test_available_bytes_reads_meminfo_cgroup_and_cuda(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    500 kB\n")
    assert resources._meminfo_available(str(meminfo)) == 500 * 1024
    monkeypatch.setattr(resources, "_meminfo_available", lambda: 500 * 1024)
    monkeypatch.setattr(resources, "_cgroup_headroom", lambda: None)
    assert resources.available_bytes("cpu") == 500 * 1024
    monkeypatch.setattr(resources, "_cgroup_headroom", lambda: 300 * 1024)
    assert resources.available_bytes("cpu") == 300 * 1024  # the container's limit is lower
    monkeypatch.setattr(resources, "_meminfo_available", lambda: None)
    monkeypatch.setattr(resources, "_windows_available", lambda: None)
    monkeypatch.setattr(resources, "_cgroup_headroom", lambda: None)
    monkeypatch.setattr(resources, "_physical_bytes", lambda: 8 * resources.GIB)
    assert resources.available_bytes("cpu") == 4 * resources.GIB  # elsewhere: half the physical memory
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123, 456))
    assert resources.available_bytes("cuda:0") == 123


def test_check_fits_names_size_estimate_and_limit():
    need = resources.check_fits(families.SD1, 512, 512, available=100 * resources.GIB)
    assert need == resources.estimate_bytes(families.SD1, 512, 512)
    with pytest.raises(ValueError) as e:
        resources.check_fits(families.SD1, 512, 512, 8, available=need)
    text = str(e.value)
    assert "width/height 512x512" in text and "batch size 8" in text
    assert f"{resources.estimate_bytes(families.SD1, 512, 512, 8) / resources.GIB:.1f} GiB" in text
    assert f"{need / resources.GIB:.1f} GiB available" in text


def test_cli_refuses_what_cannot_fit_before_the_model_loads(capsys, init_png, sd1_tiny_path, tmp_path, no_model,
                                                            monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 2 * resources.GIB)
    outdir = tmp_path / "out"
    for extra in (["--batch-size", "64", "--width", "1024", "--height", "1024"],
                  ["--width", "4096", "--height", "4096", "--explain"]):
        code, out, err = run(capsys, "img2img", init_png, "--ckpt", sd1_tiny_path, "--outdir", outdir, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--width/--height" in err and "GiB" in err and "2.0 GiB available" in err and out == ""
    code, _, err = run(capsys, "txt2img", "--ckpt", sd1_tiny_path, "--outdir", outdir, "--width", "512",
                       "--height", "512", "--enable-hr", "--hr-scale", "8")  # the hires pass is 4096 x 4096
    assert code == 2 and "4096x4096" in err, err
    assert not outdir.exists()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset is Linux-only")
def test_explain_16384_is_refused_at_once_without_allocating(capsys, init_png, sd1_tiny_path, no_model):
    """The request that took 84 s and 14 GB: refused from the checkpoint's header with the estimate."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, t0 = status("VmRSS"), time.perf_counter()
    code, out, err = run(capsys, "img2img", init_png, "--ckpt", sd1_tiny_path, "--width", "16384", "--height",
                         "16384", "--explain")
    seconds, grown = time.perf_counter() - t0, status("VmHWM") - base
    assert code == 2 and out == "" and "16384x16384" in err and "GiB" in err, err
    assert seconds < 10 and grown < 200 << 20, (seconds, grown)


def test_python_api_validate_refuses_what_cannot_fit(sd1_tiny, monkeypatch):
    """processing's validate calls resources.check_processing (so process_images and dry_run refuse too)."""
    from sdcore.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img

    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 2 * resources.GIB)
    p = StableDiffusionProcessingImg2Img(sd_model=sd1_tiny, init_images=[Image.new("RGB", (64, 64))], width=16384,
                                         height=16384)
    with pytest.raises(ValueError, match="width/height 16384x16384"):
        p.validate()
    dataclasses.replace(p, width=64, height=64).validate()
    t = StableDiffusionProcessingTxt2Img(sd_model=sd1_tiny, width=512, height=512, enable_hr=True, hr_scale=8)
    with pytest.raises(ValueError, match="4096x4096"):
        t.validate()


# -- item 12: fast start; files checked before the model; a finished batch loads nothing ------------------------------

def _python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_help_and_argument_errors_do_not_import_torch(tmp_path):
    code = """
import sys
from sdcore.cli import main
codes = []
for argv in (["--help"], ["img2img", "--help"], ["txt2img", "--help"], ["img2img", "x.png", "--steps", "abc"],
             ["img2img", "x.png", "--denoising-strength", "1.5"], ["img2img", "x.png", "--sampler", "Eulerr"],
             ["img2img", "x.png", "--scheduler", "karas"], ["img2img", "x.png", "--emphasis", "Loud"],
             ["txt2img", "--hr-upscaler", "Bicubic"], ["img2img", "x.png", "--randn-source", "TPU"],
             ["img2img", "missing.png"], ["img2img", "--input-dir", "nowhere", "--output-dir", "o"],
             ["img2img", "x.png", "--ckpt", "missing.safetensors"], ["img2img", "x.png", "--mask", "missing.png"]):
    try:
        codes.append(main(argv))
    except SystemExit as e:
        codes.append(e.code)
print(codes, "torch" in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] in ("scipy", "open_clip")))
"""
    (tmp_path / "x.png").write_bytes((ROOT / "docs" / "gallery" / "00000" / "input.png").read_bytes())
    r = _python(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == f"{[0, 0, 0] + [2] * 11} False []", r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("sdcore")]
    assert len(errors) == 11 and "--steps" in errors[0] and "--ckpt" in errors[-2] and "--mask" in errors[-1], errors


def test_parser_import_time_has_no_torch():
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import sdcore.cli; sdcore.cli.build_parser()"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "sdcore.cli.flags" in r.stderr
    assert [line for line in r.stderr.splitlines() if "torch" in line] == []


def test_finished_batch_exits_without_torch_or_model(tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(inputs / f"{name}.png")
        (out / f"{name}.png").write_bytes(b"done before")
    code = (f"import sys; from sdcore.cli import main; rc = main(['img2img', '--input-dir', {str(inputs)!r}, "
            f"'--output-dir', {str(out)!r}, '--ckpt', {str(tmp_path / 'no-such.safetensors')!r}]); "
            "print(rc, 'torch' in sys.modules)")
    r = _python(code)
    assert r.stdout.split() == ["0", "False"], (r.stdout, r.stderr)
    assert "skip: a.png" in r.stderr and "skip: b.png" in r.stderr
    assert (out / "a.png").read_bytes() == b"done before"


@pytest.mark.parametrize("make, arg", [
    (lambda d: (d / "m.png").mkdir(), "--mask"),
    (lambda d: (d / "m.png").write_bytes((d / "init.png").read_bytes()[:120]), "--mask"),
    (lambda d: None, "--mask"),  # missing
    (lambda d: (d / "vae.safetensors").mkdir(), "--vae"),
])
def test_files_are_checked_before_the_model_loads(capsys, init_png, sd1_tiny_path, tmp_path, no_model, make, arg):
    d = init_png.parent
    make(d)
    extra = ["--vae", d / "vae.safetensors"] if arg == "--vae" else ["--mask", d / "m.png"]
    code, _, err = run(capsys, "img2img", init_png, "--ckpt", sd1_tiny_path, "--outdir", tmp_path / "out", *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(f"sdcore: error: {arg}: "), err
    assert not (tmp_path / "out").exists()


def test_literal_defaults_equal_the_dataclasses():
    """The parser's copy of processing.py's fields and defaults (so --help needs no torch) cannot drift."""
    from sdcore.processing import Options, StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img

    def defaults(cls):
        return [(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cls) if f.init]

    assert list(flags.OPTIONS_DEFAULTS.items()) == defaults(Options)
    for command, cls in (("img2img", StableDiffusionProcessingImg2Img), ("inpaint", StableDiffusionProcessingImg2Img),
                         ("txt2img", StableDiffusionProcessingTxt2Img)):
        literal = [(k, Options(**v) if k == "opts" else v) for k, v in flags.PROCESSING_DEFAULTS[command].items()]
        assert literal == defaults(cls), command
        assert [(k, type(v)) for k, v in literal] == [(k, type(v)) for k, v in defaults(cls)]
        assert flags.PROCESSING_CLASS_NAMES[command] == cls.__name__ == flags.processing_class(command).__name__


def test_literal_name_tables_equal_their_sources():
    from sdcore import pipeline, prompts, rng
    from sdcore.sampling import blends
    from sdcore.sampling.samplers import SAMPLERS
    from sdcore.sampling.schedules import SCHEDULERS

    assert flags.SAMPLER_NAMES == {s.name: tuple(s.aliases) for s in SAMPLERS}
    assert list(flags.SAMPLER_NAMES) == [s.name for s in SAMPLERS]
    assert list(flags.SCHEDULER_NAMES.items()) == [(s.name, (s.label, *s.aliases)) for s in SCHEDULERS]
    assert flags.EMPHASIS_MODES == tuple(prompts.EMPHASIS_MODES) and flags.RANDN_SOURCES == tuple(rng.SOURCES)
    assert flags.HR_UPSCALERS == (*pipeline.LATENT_UPSCALERS, *pipeline.PIXEL_UPSCALERS)
    assert flags.BLEND_INFOTEXT_KEYS == {blends.MASK_BLEND_KEY, blends.SOFT_INPAINTING_ENABLED_LABEL,
                                         *blends.SOFT_INPAINTING_LABELS.values()}


def test_name_checks_agree_with_the_lookups():
    from sdcore.sampling.samplers import SAMPLERS, find_sampler
    from sdcore.sampling.schedules import SCHEDULERS, find_scheduler

    suffixes = [o for s in SCHEDULERS for o in (s.label, s.name, *s.aliases)]
    names = [n for s in SAMPLERS for n in (s.name, *s.aliases)]
    corpus = names + [f"{n} {x}" for n in names[::3] for x in suffixes] + [
        "Eulerr", "euler", "Euler  Karras", "Karras", " Euler", "Euler Karras Uniform", "DDIM DDIM", "Euler a Beta",
        "k_euler Karras", "DPM++ 2M Karras ", "", "LCM karras"]
    for name in corpus:
        try:
            find_sampler(name)
            expected = None
        except ValueError as e:
            expected = str(e)
        assert flags._sampler(name) == expected, name
    for name in [o for s in SCHEDULERS for o in (s.name, s.label, *s.aliases)] + ["karas", "KARRAS", "", "sgm"]:
        try:
            find_scheduler(name)
            expected = None
        except ValueError as e:
            expected = str(e)
        assert flags._scheduler(name) == expected, name


def test_cli_memory_check_counts_a_large_init_image(capsys, sd1_tiny_path, tmp_path, no_model, monkeypatch):
    """A 4096 x 4096 photo processed at 64 px: its overlays are kept at 4096 x 4096, so the pixel term counts it."""
    big = tmp_path / "big.png"
    Image.new("RGB", (4096, 4096)).save(big)
    seen = []
    real = resources.check_fits

    def spy(*args, **kwargs):
        seen.append(kwargs["image_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(resources, "check_fits", spy)
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": resources.FIXED_BYTES + 100_000_000)
    code, _, err = run(capsys, "img2img", big, "--ckpt", sd1_tiny_path, "--width", "64", "--height", "64",
                       "--outdir", tmp_path / "out")
    assert code == 2 and "init image 4096x4096" in err and seen == [(4096, 4096)], err


def test_small_jobs_run_on_one_thread():
    """--threads 0 (auto): one thread for the tiny model at 64 px, torch's default for SD at 512 px; N is N."""
    from argparse import Namespace

    from sdcore.cli.jobs import Run

    def threads(family, size, threads=0, batch=1, device="cpu"):
        values = {"width": size, "height": size, "batch_size": batch}
        return commands.threads_for(Namespace(threads=threads, device=device), Run("img2img", values, [], [], False),
                                    family)

    assert threads(families.TINY, None) == 1 and threads(families.TINY, 64, batch=2) == 1
    assert threads(families.TINY, 64, batch=4) == 0 and threads(families.TINY, 128) == 0
    assert threads(families.SD1, 512) == 0 and threads(families.SD1, 64) == 0
    assert threads(families.SD1, 512, threads=1) == 1 and threads(families.TINY, 64, device="cuda") == 0
    assert flags.build_parser().parse_args(["img2img", "x.png", "--threads", "3"]).threads == 3
    with pytest.raises(SystemExit):
        flags.build_parser().parse_args(["img2img", "x.png", "--threads", "-1"])


def test_an_unforeseen_memory_error_is_one_line(capsys, init_png, sd1_tiny_path, tmp_path, monkeypatch):
    """Should an allocation fail anyway (numpy's _ArrayMemoryError is a MemoryError): one line, exit 2."""
    def oom(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.00 GiB for an array with shape (1, 16384, 16384, 3)")

    monkeypatch.setattr(commands, "process_images", oom)
    code, out, err = run(capsys, "img2img", init_png, "--ckpt", sd1_tiny_path, *SMALL, "--outdir", tmp_path / "o")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "out of memory" in err and "Unable to allocate 3.00 GiB" in err


def test_saved_files_get_the_usual_mode(tmp_path):
    """The final file keeps the temporary's mode: 0o666 less the umask, as a plain open() would give."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = images.save_image(Image.new("RGB", (8, 8)), tmp_path, 1, date_subfolder=False)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
