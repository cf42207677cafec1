"""End-to-end img2img / inpainting speed with the bundled tiny model (issue 6 item 5).

Times, in one process: checkpoint load, then `process_images` for img2img and inpainting at the model's native size
(64 px for the tiny model) with 20 steps (Euler a; d = 0.75 -> 16 model calls with CFG), median of --repeats runs,
and prints each against the issue's bound (10 s) and goal (2 s). Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sdcore  # noqa: E402
from sdcore.cli import DEFAULT_CKPT  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    sd = sdcore.load_checkpoint(args.ckpt)
    load = time.perf_counter() - t0
    size = sd.family.native_size
    photo = Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    jobs = {"img2img": {}, "inpaint": {"mask": Image.fromarray(mask, "L"), "inpaint_full_res": False}}
    print(f"checkpoint {args.ckpt.name}: load {load:.2f} s; {args.threads} threads; {size}x{size} px, "
          f"{args.steps} steps, Euler a")
    print(f"{'job':8s} {'median s':>9s} {'min s':>7s}  vs 10 s bound  vs 2 s goal")
    for name, kw in jobs.items():
        times = []
        for r in range(args.repeats + 1):  # the first run warms up kernels and is not counted
            p = sdcore.StableDiffusionProcessingImg2Img(sd_model=sd, prompt="a red circle", init_images=[photo],
                                                        sampler_name="Euler a", steps=args.steps, seed=r,
                                                        width=size, height=size, **kw)
            t0 = time.perf_counter()
            sdcore.process_images(p, disable_progress=True)
            if r:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"{name:8s} {med:9.3f} {min(times):7.3f}  {med / 10:12.3f}x  {med / 2:10.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
