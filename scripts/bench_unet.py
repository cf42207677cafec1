"""Benchmark sdcore's UNet against diffusers' UNet2DConditionModel, and time checkpoint loading.

1. Speed: one process, the same random SD1.5-size weights (scripts/make_checkpoint.py, seed 0) in our UNetModel
   and in diffusers' UNet (converted by diffusers' own LDM single-file functions); batch 2, latents 32x32 and
   64x64 (256 and 512 px), fp32 and bf16 on the CPU; one warm-up call, then the median of `--repeats` timed calls
   each, alternating ours / diffusers so machine load hits both alike.
2. Loading: a child process writes the full-size checkpoint (scripts/make_checkpoint.py), another loads it
   with `sdcore.checkpoint.load_checkpoint` and reports wall time and peak RSS before and after the load, both as
   `resource.getrusage(RUSAGE_SELF).ru_maxrss` (Linux keeps it across fork+exec, so it starts at least at the
   parent's RSS: the parent is still small then) and as /proc/self/status VmHWM (reset by exec); compared with
   the file size. The speed test then reads its UNet weights from the same file.

Needs the test extras (diffusers). Usage: python scripts/bench_unet.py [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

import make_checkpoint  # noqa: E402
from _diffusers_oracle import diffusers_unet  # noqa: E402
from sdcore.models.unet import UNetModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
UNET = "model.diffusion_model."


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mib() -> float:
    """Peak RSS of this process image from /proc/self/status `VmHWM` (kB), MiB; NaN where /proc is missing."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")), float("nan"))


def load_child(path: str) -> None:
    """Child-process body: import, note the RSS, load the checkpoint, print a JSON line of measurements."""
    from sdcore.checkpoint import load_checkpoint

    before, hwm_before = peak_rss_mib(), vm_hwm_mib()
    start = time.perf_counter()
    model = load_checkpoint(path)
    seconds = time.perf_counter() - start
    loaded = {"seconds": seconds, "maxrss_before": before, "maxrss": peak_rss_mib(), "hwm_before": hwm_before,
              "hwm": vm_hwm_mib()}
    # safetensors tensors are memory-mapped: pages become resident when first read (the first forward pass).
    params = [p for m in (model.unet, model.vae, *model.text_encoders) for p in m.parameters()]
    with torch.no_grad():
        sum(p.float().sum() for p in params)
    loaded.update(params=sum(p.numel() for p in params), hwm_touched=vm_hwm_mib())
    print(json.dumps(loaded))


def bench_load(path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--load-child", str(path)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_calls(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall seconds per entry of `fns` (callables without arguments), after one warm-up call each."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median reported)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (cells)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-speed", action="store_true", help="only write and load the checkpoint")
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_child:
        load_child(args.load_child)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the inputs below; weights use make_checkpoint's own seeded generator

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd15-random.safetensors"
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_checkpoint.py"), "--family", "sd1",
                        "--size", "full", "--seed", "0", str(path)], check=True)
        print(f"make_checkpoint (child process): {time.perf_counter() - start:.1f} s")
        size_mib = path.stat().st_size / 2**20
        load = bench_load(path)
        print(f"\nload_checkpoint (fresh process): {load['seconds']:.1f} s, file {size_mib:.0f} MiB, "
              f"{load['params'] / 1e6:.0f} M parameters; peak RSS ru_maxrss {load['maxrss_before']:.0f} -> "
              f"{load['maxrss']:.0f} MiB, VmHWM {load['hwm_before']:.0f} -> {load['hwm']:.0f} MiB "
              f"(increase {(load['hwm'] - load['hwm_before']) / size_mib:.2f} x file); after reading every weight "
              f"once VmHWM {load['hwm_touched']:.0f} MiB "
              f"(increase {(load['hwm_touched'] - load['hwm_before']) / size_mib:.2f} x file)")
        if args.no_speed:
            return 0
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            unet_weights = {k[len(UNET):]: f.get_tensor(k) for k in f.keys() if k.startswith(UNET)}

    config = make_checkpoint.family_config("sd1", "full").unet
    ours = UNetModel(config, device="meta").eval().requires_grad_(False)
    ours.load_state_dict(unet_weights, strict=True, assign=True)
    theirs = diffusers_unet(unet_weights, config).requires_grad_(False)
    del unet_weights

    rows = []
    for dtype_name, dtype in DTYPES.items():
        ours.to(dtype)
        theirs.to(dtype)
        for size in args.sizes:
            x = torch.randn(2, 4, size, size, dtype=dtype)
            t = torch.tensor([999.0, 500.5])
            context = torch.randn(2, 77, config.context_dim, dtype=dtype)
            with torch.inference_mode():
                medians = time_calls({"ours": lambda: ours(x, t, context),
                                      "diffusers": lambda: theirs(x, t, context).sample}, args.repeats)
            rows.append((dtype_name, size, medians["ours"], medians["diffusers"]))
            print(f"  done {dtype_name} {size}x{size}", flush=True)

    print(f"\nUNet SD1.5, batch 2, median of {args.repeats} (s):")
    print(f"{'dtype':6} {'latent':>7} {'ours':>8} {'diffusers':>10} {'ours/diffusers':>15}")
    for dtype_name, size, a, b in rows:
        print(f"{dtype_name:6} {f'{size}x{size}':>7} {a:8.2f} {b:10.2f} {a / b:15.2f}")
    print(f"bench process peak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
