"""Tiled VAE (sdcore.models.vae_tiling): memory and time of a large decode, and the difference from the untiled VAE.

    python scripts/bench_vae_tiling.py                 # everything below (the 2048 px decode took 22 minutes
                                                       # on one thread of this machine's CPU)
    python scripts/bench_vae_tiling.py --skip-large    # only the 512 px differences and the attention memory

All on SD1.5's full-size VAE (VAEConfig(): ch 128, ch_mult 1 2 4 4) with seeded random weights in the LDM layout
(scripts/make_checkpoint.py `random_like`), float32, one torch thread. Each memory figure comes from a fresh
subprocess that measures one thing (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, the peak resident set of the whole
process: Python, torch, the weights and the activations):

- `--size` (2048) decode, tiled: peak RSS and wall time; the untiled decode at that size is not run but estimated
  (`sdcore.resources.vae_bytes`) and checked against the memory available now (`resources.available_bytes`);
- the mid-block self-attention (`AttnBlock`) at 1024 px (128 x 128 latent cells): peak RSS with the strided q/k/v the
  block used to pass (torch's CPU flash kernel then materialises the scores) and with the contiguous ones it passes;
- 512 px: max and mean |tiled - untiled| of the decoded image in float and in 0-255 levels after the pipeline's
  uint8 conversion (`sdcore.pipeline.decode`: (x + 1) / 2 clamped, x 255, truncated), for the global statistics
  (sdcore's method) and the naive per-tile statistics; the same for the encoder's posterior mean.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import make_checkpoint  # noqa: E402

from sdcore import resources  # noqa: E402
from sdcore.families import SD1  # noqa: E402
from sdcore.models.vae import AutoencoderKL  # noqa: E402
from sdcore.models.vae_tiling import tiled_decode, tiled_encode  # noqa: E402


def full_vae(seed: int = 1) -> AutoencoderKL:
    """SD1.5's VAE with seeded random weights (make_checkpoint.random_like), float32, eval mode."""
    vae = AutoencoderKL(SD1.vae, device="meta").eval()
    vae.load_state_dict(make_checkpoint.random_like(vae.state_dict(), torch.Generator().manual_seed(seed)),
                        assign=True)
    return vae


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """The pipeline's uint8 conversion of decoded pixels in [-1, 1] (sdcore.pipeline.decode), as float levels."""
    return (255.0 * torch.clamp((x.float() + 1) / 2, 0, 1)).to(torch.uint8).float()


# -- one measurement per subprocess -----------------------------------------------------------------------------------

def child_decode(size: int, tile_size: int) -> dict:
    vae = full_vae()
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    before = peak_gib()
    start = time.perf_counter()
    x = tiled_decode(vae, z, tile_size=tile_size)
    seconds = time.perf_counter() - start
    return {"size": size, "tile_size": tile_size, "seconds": round(seconds, 1), "peak_rss_gib": round(peak_gib(), 3),
            "peak_rss_before_decode_gib": round(before, 3), "finite": bool(torch.isfinite(x).all())}


def _strided_attention(block, x: torch.Tensor) -> torch.Tensor:
    """AttnBlock.forward as it was before the contiguous q/k/v (the layout the module used to hand torch)."""
    b, c, h, w = x.shape
    x_norm = block.norm(x)
    q, k, v = (t(x_norm).flatten(2).transpose(1, 2)[:, None] for t in (block.q, block.k, block.v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return x + block.proj_out(out[:, 0].transpose(1, 2).reshape(b, c, h, w))


def child_attention(cells: int, layout: str) -> dict:
    block = full_vae().decoder.mid.attn_1
    x = torch.randn(1, 512, cells, cells, generator=torch.Generator().manual_seed(0))
    before = peak_gib()
    start = time.perf_counter()
    with torch.no_grad():
        y = block(x) if layout == "contiguous" else _strided_attention(block, x)
    return {"cells": cells, "layout": layout, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(peak_gib(), 3), "increase_gib": round(peak_gib() - before, 3),
            "finite": bool(torch.isfinite(y).all())}


def in_child(*args: str) -> dict:
    """Run this script with `--child ...` in a fresh process; its last stdout line is a JSON object."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the 512 px differences (in this process) -------------------------------------------------------------------------

def differences(size: int = 512, tile_size: int = 256) -> dict:
    """Tiled against untiled at `size` px: decode of a N(0, 1) latent (unscaled: what the sampler's latents divided
    by the scale factor look like) and encode of uniform pixels in [-1, 1]."""
    vae = full_vae()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, size // 8, size // 8, generator=g)
    px = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    result = {}
    with torch.no_grad():
        start = time.perf_counter()
        ref = vae.decode(z)
        result["untiled_decode_seconds"] = round(time.perf_counter() - start, 1)
        for stats in ("global", "tile"):
            start = time.perf_counter()
            out = tiled_decode(vae, z, tile_size=tile_size, stats=stats, overlap=64)
            seconds = time.perf_counter() - start
            levels = (to_levels(out) - to_levels(ref)).abs()
            diff = (out - ref).abs()
            result[f"decode_{stats}"] = {
                "seconds": round(seconds, 1), "max_abs_float": float(diff.max()), "mean_abs_float": float(diff.mean()),
                "max_abs_levels": float(levels.max()), "mean_abs_levels": float(levels.mean()),
                "pixels_differing": int((levels > 0).sum()), "output_max_abs": float(ref.abs().max())}
        ref = vae.encode(px).mean
        for stats in ("global", "tile"):
            mean = tiled_encode(vae, px, tile_size=tile_size, stats=stats, overlap=64).mean
            diff = (mean - ref).abs()
            result[f"encode_{stats}"] = {"max_abs_float": float(diff.max()), "mean_abs_float": float(diff.mean()),
                                         "latent_max_abs": float(ref.abs().max())}
    return result


def untiled_estimate(size: int) -> dict:
    need = resources.vae_bytes(SD1, size, size)
    available = resources.available_bytes()
    return {"size": size, "untiled_estimate_gib": round(need / 2 ** 30, 2),
            "tiled_estimate_gib": round(resources.vae_tiled_bytes(SD1, size, size) / 2 ** 30, 2),
            "available_now_gib": round(available / 2 ** 30, 2), "untiled_refused": need > available}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="side of the large decode in pixels (default 2048)")
    ap.add_argument("--tile-size", type=int, default=256, help="tile edge in pixels (default 256)")
    ap.add_argument("--skip-large", action="store_true", help="skip the large decode")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        kind, *rest = args.child
        result = child_decode(*map(int, rest)) if kind == "decode" else child_attention(int(rest[0]), rest[1])
        print(json.dumps(result))
        return
    results = {"attention": [in_child("attention", "128", layout) for layout in ("strided", "contiguous")]}
    for r in results["attention"]:
        print(f"AttnBlock at {r['cells']}x{r['cells']} latent cells, {r['layout']} q/k/v: peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB (+{r['increase_gib']:.2f} GiB during the call), {r['seconds']} s",
              flush=True)
    results["512"] = differences()
    for key, r in results["512"].items():
        print(f"512 px {key}: {r}", flush=True)
    results["estimate"] = untiled_estimate(args.size)
    print(f"{args.size} px untiled decode: {results['estimate']}", flush=True)
    if not args.skip_large:
        r = in_child("decode", str(args.size), str(args.tile_size))
        results["large"] = r
        print(f"{args.size} px tiled decode (tile {args.tile_size} px): peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"({r['peak_rss_gib'] * 2 ** 30 / 1e9:.2f} GB; {r['peak_rss_before_decode_gib']:.2f} GiB before the "
              f"decode, estimate of the decode's own {results['estimate']['tiled_estimate_gib']} GiB), "
              f"{r['seconds']} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
