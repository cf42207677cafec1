"""Start-up, run and memory figures of the `sdcore` command, each printed against its goal (issue 11 items 5, 12).

Not a test: the numbers depend on the machine and its load (printed first). Every figure is a fresh process:

- `sdcore --help`: wall time (goal < 0.5 s) and peak RSS; and whether torch was imported (it must not be).
- an argument error (`--steps 0`): wall time, same goal.
- a cold-process img2img through the CLI with the bundled tiny model, 20 steps, 64 px (goal < 2.5 s wall).
- the tiny model's load time (`load_checkpoint`, imports excluded; goal < 0.5 s, this script's share of the
  2.5 s) and the import time of what the load needs.

`--memory` adds the table behind `sdcore.resources`: peak memory measured (Linux VmHWM above the resident size
just before the call, fresh process per case) next to the estimate, for VAE decode / encode, one UNet call and whole
`process_images` runs, on the tiny model, a reduced SD1 model and SD's VAE, at two sizes each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

GOALS = {"help": 0.5, "error": 0.5, "img2img": 2.5, "load": 0.5, "info_rss": 300}


def _child(argv: list[str], cwd: Path | None = None) -> dict:
    """Run argv; wall time, CPU time and peak RSS of that child alone (os.wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024,
            "rc": proc.returncode, "out": out, "err": err}


def _sdcore() -> list[str]:
    script = Path(sys.executable).with_name("sdcore")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sdcore.cli"]


def _line(name: str, value: float, goal: float | None, unit: str = "s", extra: str = "") -> None:
    if goal is None:
        print(f"  {name:34s} {value:8.2f} {unit:3s} {'':>14s} {extra}")
    else:
        verdict = "ok" if value < goal else "OVER"
        print(f"  {name:34s} {value:8.2f} {unit:3s} goal < {goal:<5g} ratio {value / goal:5.2f} {verdict:4s} {extra}")


def bench_start(repeats: int) -> None:
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(load)} (wall times rise with load; CPU times "
          "less so)")
    print("figure                               measured      goal       ratio")
    runs = [_child([*_sdcore(), "--help"]) for _ in range(repeats)]
    wall = statistics.median(r["wall"] for r in runs)
    _line("sdcore --help (median wall)", wall, GOALS["help"],
          extra=f"cpu {statistics.median(r['cpu'] for r in runs):.2f} s")
    _line("sdcore --help peak RSS", max(r["rss_mib"] for r in runs), None, "MiB")
    probe = _child([sys.executable, "-c", "import sys, sdcore.cli\ntry:\n    sdcore.cli.main(['--help'])\n"
                    "except SystemExit:\n    pass\nprint('torch' in sys.modules)"])
    print(f"  {'torch imported by --help':34s} {probe['out'].split()[-1]:>8s}")
    runs = [_child([*_sdcore(), "img2img", "in.png", "--steps", "0"]) for _ in range(repeats)]
    _line("argument error (median wall)", statistics.median(r["wall"] for r in runs), GOALS["error"],
          extra=f"exit {runs[0]['rc']}")

    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        Image.effect_mandelbrot((64, 64), (-2, -1.5, 1, 1.5), 100).convert("RGB").save(Path(tmp) / "in.png")
        runs = []
        for r in range(repeats):
            runs.append(_child([*_sdcore(), "img2img", "in.png", "--prompt", "a red circle", "--steps", "20",
                                "--seed", str(r), "--outdir", "out"], cwd=Path(tmp)))
            if runs[-1]["rc"]:
                print(runs[-1]["err"])
                raise SystemExit(1)
        _line("img2img 20 steps, cold process", statistics.median(r["wall"] for r in runs), GOALS["img2img"],
              extra=f"cpu {statistics.median(r['cpu'] for r in runs):.2f} s, "
                    f"RSS {max(r['rss_mib'] for r in runs):.0f} MiB")
    code = ("import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter();"
            "from sdcore.checkpoint import load_checkpoint; t2 = time.perf_counter();"
            "from sdcore.cli import DEFAULT_CKPT; load_checkpoint(DEFAULT_CKPT); t3 = time.perf_counter();"
            "print(t1 - t0, t2 - t1, t3 - t2)")
    runs = [[float(x) for x in _child([sys.executable, "-c", code])["out"].split()] for _ in range(repeats)]
    _, _, load_s = (statistics.median(r[i] for r in runs) for i in range(3))
    _line("tiny model load_checkpoint", load_s, GOALS["load"])
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.safetensors"
        _sparse_checkpoint(big, 4 << 30)
        run = _child([*_sdcore(), "info", str(big)])
        _line("sdcore info, 4 GiB file, peak RSS", run["rss_mib"], GOALS["info_rss"], "MiB",
              extra=f"wall {run['wall']:.1f} s (hashing), exit {run['rc']}")
    print("where a cold run's time goes (imports, each after the ones above it):")
    code = ("import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter();"
            "from sdcore.models.text import load_tokenizer; load_tokenizer(); t2 = time.perf_counter();"
            "import sdcore.cli.commands; t3 = time.perf_counter(); print(t1 - t0, t2 - t1, t3 - t2)")
    runs = [[float(x) for x in _child([sys.executable, "-c", code])["out"].split()] for _ in range(repeats)]
    names = ("import torch (the floor of any run)", "tokenizer (open_clip's tokenizer.py)",
             "import the rest of sdcore.cli.commands")
    for i, name in enumerate(names):
        _line(name, statistics.median(r[i] for r in runs), None)


def _sparse_checkpoint(path: Path, n_bytes: int) -> None:
    """The bundled model plus a zero `model_ema.big` float32 tensor of `n_bytes` (dropped as an EMA copy), sparse."""
    import json
    import struct

    from sdcore.cli import DEFAULT_CKPT

    data = Path(DEFAULT_CKPT).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    header["model_ema.big"] = {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [len(body), len(body) + n_bytes]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)
        f.truncate(8 + len(text) + len(body) + n_bytes)


# ---------------------------------------------------------------------------------------------------------------
# Memory: measured vs estimated


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_of(call) -> int:
    """Peak resident bytes of call() above the resident size just before it (Linux clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    call()
    return _status("VmHWM") - base


def _families():
    from dataclasses import replace

    from make_checkpoint import tiny_family

    from sdcore import families

    reduced = tiny_family(families.SD1)
    return {"tiny": families.TINY, "sd1-reduced": replace(reduced, vae=replace(reduced.vae, ch=64)),
            "sd1": families.SD1}


def measure_one(case: dict) -> dict:
    """One measurement in this process: case = {kind, family, size, batch}."""
    import torch

    from sdcore import resources

    torch.set_grad_enabled(False)
    fam = _families()[case["family"]]
    size, batch = case["size"], case.get("batch", 1)
    factor = 2 ** (len(fam.vae.ch_mult) - 1)
    if case["kind"] in ("decode", "encode"):
        from sdcore.models.vae import AutoencoderKL

        vae = AutoencoderKL(fam.vae).eval()
        with torch.inference_mode():
            if case["kind"] == "decode":
                vae.decode(torch.zeros(1, fam.vae.z_channels, 8, 8))
                z = torch.randn(1, fam.vae.z_channels, size // factor, size // factor)
                peak = _peak_of(lambda: vae.decode(z))
            else:
                vae.encode(torch.zeros(1, 3, 64, 64))
                x = torch.randn(1, 3, size, size)
                peak = _peak_of(lambda: vae.encode(x))
        return {"measured": peak, "estimated": resources.vae_bytes(fam, size, size)}
    if case["kind"] == "unet":
        from sdcore.models.unet import UNetModel

        unet = UNetModel(fam.unet).eval()
        rows = 2 * batch
        ctx = torch.randn(rows, 77, fam.unet.context_dim)
        with torch.inference_mode():
            unet(torch.randn(rows, fam.unet.in_channels, 8, 8), torch.full((rows,), 500.0), ctx)
            x = torch.randn(rows, fam.unet.in_channels, size // factor, size // factor)
            peak = _peak_of(lambda: unet(x, torch.full((rows,), 500.0), ctx))
        return {"measured": peak, "estimated": resources.unet_bytes(fam, size, size, batch)}
    # a whole img2img inpainting job through process_images (overlays, masks, encode, sampling, decode)
    import numpy as np
    from PIL import Image

    import sdcore
    from make_checkpoint import make_state_dict, write_checkpoint

    if case["family"] == "tiny":
        from sdcore.cli import DEFAULT_CKPT as path
    else:
        path = Path(tempfile.mkdtemp()) / "reduced.safetensors"
        write_checkpoint(make_state_dict("sd1", "tiny", seed=0), path, metadata={})
    sd = sdcore.load_checkpoint(path)
    if case["family"] != "tiny":  # the reduced model with the wider VAE of _families()
        from sdcore.models.vae import AutoencoderKL

        sd = __import__("dataclasses").replace(sd, family=fam, vae=AutoencoderKL(fam.vae).eval())

    def job(px: int, seed: int):
        image = Image.effect_mandelbrot((px, px), (-2, -1.5, 1, 1.5), 100).convert("RGB")
        mask = np.zeros((px, px), np.uint8)
        mask[px // 4:3 * px // 4, px // 4:3 * px // 4] = 255
        return sdcore.StableDiffusionProcessingImg2Img(
            sd_model=sd, prompt="a red circle", init_images=[image], mask=Image.fromarray(mask), batch_size=batch,
            sampler_name="Euler", steps=2, denoising_strength=1.0, seed=seed, width=px, height=px,
            inpaint_full_res=False, mask_blur=4)

    sdcore.process_images(job(64, 0), disable_progress=True)
    p = job(size, 1)
    peak = _peak_of(lambda: sdcore.process_images(p, disable_progress=True))
    return {"measured": peak, "estimated": resources.estimate_bytes(fam, size, size, batch)}


MEMORY_CASES = [
    *({"kind": k, "family": f, "size": s} for k in ("decode", "encode") for f, sizes in
      (("tiny", (256, 512, 768)), ("sd1-reduced", (256, 512)), ("sd1", (256, 512))) for s in sizes),
    *({"kind": "unet", "family": f, "size": s, "batch": b} for f in ("tiny", "sd1-reduced") for s in (256, 512)
      for b in (1, 2)),
    *({"kind": "unet", "family": "sd1", "size": s} for s in (256, 512)),
    *({"kind": "process_images", "family": "tiny", "size": s} for s in (256, 512, 768)),
    {"kind": "process_images", "family": "tiny", "size": 512, "batch": 2},
    *({"kind": "process_images", "family": "sd1-reduced", "size": s, "batch": b} for s in (256, 512) for b in (1, 2)),
]


def bench_memory() -> None:
    from sdcore import resources

    print(f"memory (MB = 1e6 bytes): factors VAE conv {resources.VAE_CONV_FACTOR}, VAE attention "
          f"{resources.VAE_ATTENTION_FACTOR} (materialised: {resources.VAE_ATTENTION_MATERIALISED}), UNet work "
          f"{resources.UNET_WORK_FACTOR}, pixels {resources.PIXEL_BYTES} B/px")
    print(f"  fixed part FIXED_BYTES {resources.FIXED_BYTES / 1e6:.0f} MB: in `estimated` for whole runs, added to a "
          "component's term in `+ fixed`")
    print(f"  {'what':15s} {'model':12s} {'px':>5s} {'batch':>5s} {'measured':>10s} {'estimated':>10s} "
          f"{'est/meas':>8s} {'+ fixed':>8s} {'ratio':>6s}")
    for case in MEMORY_CASES:
        r = _child([sys.executable, __file__, "--measure", json.dumps(case)])
        if r["rc"]:
            print(f"  {case}: failed: {r['err'].strip().splitlines()[-1:]}")
            continue
        m = json.loads(r["out"].strip().splitlines()[-1])
        whole = case["kind"] == "process_images"
        total = m["estimated"] + (0 if whole else resources.FIXED_BYTES)
        ok = "" if total >= m["measured"] else "  UNDER"
        fixed = "" if whole else f"{total / 1e6:8.1f} {total / m['measured']:6.2f}"
        print(f"  {case['kind']:15s} {case['family']:12s} {case['size']:5d} {case.get('batch', 1):5d} "
              f"{m['measured'] / 1e6:10.1f} {m['estimated'] / 1e6:10.1f} {m['estimated'] / m['measured']:8.2f} "
              f"{fixed}{ok}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs per timed figure (median)")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory against sdcore.resources")
    ap.add_argument("--memory-only", action="store_true", help="only the memory table")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure_one(json.loads(args.measure))))
        return 0
    if not args.memory_only:
        bench_start(args.repeats)
    if args.memory or args.memory_only:
        bench_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
