"""Benchmark live previews: what each preview method costs, as a share of one sampling step.

One process runs, per case, a txt2img job through `sdcore.process_images` (Euler, CFG 7, batch 1) once without
previews and once per method (and write mode) with `sdcore.previews.PreviewWriter(every=1)` (a preview PNG at
every step):

- step time: the median interval between the sampler's per-step callbacks in the run without previews (one UNet
  call on 2 rows for CFG, the sampler's update, the callback);
- preview cost: per preview, the time the sampling thread spends in the writer's callback (making the image, and
  writing the PNG unless the writer writes in a background thread, "(bg)", as the CLI does), from the runs with
  previews; also the writer's own timing of making the image (`preview_image`) and of writing the file
  (`previews.save_png`: temporary file, link; in the worker thread for "(bg)");
- share = callback time / step time. Goal (issue 12): <= 2 % for approx_cheap.

Cases: "tiny" (the bundled model, 64 px, 20 steps), "sd1-reduced" (scripts/make_checkpoint.py's reduced SD1:
SD1's layout with narrow widths, 8.6 M UNet parameters, at 512 px = a 64 x 64 latent, 4 steps) and, with --full,
"sd1-full" (the real SD1.5 size, random weights written as an fp16 .safetensors in a temporary folder and loaded
in fp32; about 5 GB peak RSS; 3 steps). TAESD runs with random weights in the public layout (the real files are not
available here; the time does not depend on the values). The full method is the model's own VAE decode.

Usage: python scripts/bench_previews.py [--full | --tiny-only] [--threads 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import make_checkpoint  # noqa: E402
from sdcore import load_checkpoint, previews  # noqa: E402
from sdcore.cli.flags import DEFAULT_CKPT  # noqa: E402
from sdcore.processing import StableDiffusionProcessingTxt2Img, process_images  # noqa: E402

PROMPT = "a red circle on a blue background"
# (method, write in a background thread): the Python API's default writes in the callback; the CLI in the background
VARIANTS = (("approx_cheap", False), ("approx_cheap", True), ("taesd", True), ("full", True))


class StepClock:
    """A sampler callback recording the time of each call (one per step), optionally passing the dict on to
    `inner` and timing it (`inner_seconds`: what the sampling thread spends in the preview callback)."""

    def __init__(self, inner=None):
        self.inner, self.times, self.inner_seconds = inner, [], 0.0

    def __call__(self, d) -> None:
        self.times.append(time.perf_counter())
        if self.inner is not None:
            self.inner(d)
            self.inner_seconds += time.perf_counter() - self.times[-1]

    def step_seconds(self) -> float:
        """Median interval between consecutive steps (the first step's interval includes nothing else)."""
        return statistics.median(b - a for a, b in zip(self.times, self.times[1:], strict=False))


def run(model, size: int, steps: int, callback) -> None:
    p = StableDiffusionProcessingTxt2Img(sd_model=model, prompt=PROMPT, sampler_name="Euler", scheduler="uniform",
                                         steps=steps, seed=1, width=size, height=size, cfg_scale=7.0)
    process_images(p, callback=callback, disable_progress=True)


def bench_case(name: str, model, size: int, steps: int, taesd, folder: Path) -> dict:
    run(model, size, min(steps, 2), None)  # warm-up: first-call allocations and lazy imports (PIL's PNG plugin ...)
    latent = torch.zeros(1, 4, size // model.vae.downscale, size // model.vae.downscale)
    for method in previews.METHODS:
        image = previews.preview_image(method, latent, model, taesd if method == "taesd" else None)[0]
        previews.save_png(image, folder / f"warm-up-{name}-{method}.png")
    clock = StepClock()
    run(model, size, steps, clock)
    step = clock.step_seconds()
    out = {"case": name, "pixels": size, "latent": size // model.vae.downscale, "steps": steps,
           "step_ms": step * 1e3, "methods": {}}
    for method, background in VARIANTS:
        label = method + (" (bg)" if background else "")
        with previews.PreviewWriter(1, folder / f"{name}-{method}-{background}", method, model,
                                    taesd if method == "taesd" else None, background=background) as writer:
            with_previews = StepClock(writer)
            run(model, size, steps, with_previews)
        n = len(writer.paths)
        callback = with_previews.inner_seconds / n
        out["methods"][label] = {"make_ms": writer.seconds / n * 1e3, "write_ms": writer.write_seconds / n * 1e3,
                                 "callback_ms": callback * 1e3, "share": callback / step,
                                 "step_ms_with_previews": with_previews.step_seconds() * 1e3}
    return out


def sd1_model(size: str, folder: Path):
    """A random-weight SD1 checkpoint of `size` ("tiny" = reduced, "full"), written as fp16 and loaded in fp32."""
    path = folder / f"sd1-{size}.safetensors"
    make_checkpoint.write_checkpoint(make_checkpoint.make_state_dict("sd1", size, seed=0, dtype=torch.float16), path,
                                     metadata={})
    return load_checkpoint(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="also the full-size SD1.5 case (about 5 GB peak RSS)")
    ap.add_argument("--tiny-only", action="store_true", help="only the tiny case (about a minute)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    taesd = previews.TAESDDecoder().eval().requires_grad_(False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results.append(bench_case("tiny", load_checkpoint(DEFAULT_CKPT), 64, 20, taesd, folder))
        if not args.tiny_only:
            results.append(bench_case("sd1-reduced", sd1_model("tiny", folder), 512, 4, taesd, folder))
        if args.full and not args.tiny_only:
            results.append(bench_case("sd1-full", sd1_model("full", folder), 512, 3, taesd, folder))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps({"threads": args.threads, "peak_rss_mib": peak, "load_average": os.getloadavg()[0],
                          "cases": results}, indent=1))
        return 0
    print(f"threads {args.threads}, peak RSS {peak:.0f} MiB, load average {os.getloadavg()[0]:.2f}; share = time "
          "in the preview callback / step time")
    print(f"{'case':12s} {'latent':>7s} {'step ms':>9s} {'method':>18s} {'make ms':>9s} {'write ms':>9s} "
          f"{'callback ms':>12s} {'share':>8s} {'step ms w/ previews':>20s}")
    for r in results:
        for method, m in r["methods"].items():
            print(f"{r['case']:12s} {r['latent']:>4d}^2  {r['step_ms']:9.2f} {method:>18s} {m['make_ms']:9.3f} "
                  f"{m['write_ms']:9.3f} {m['callback_ms']:12.3f} {100 * m['share']:7.2f}% "
                  f"{m['step_ms_with_previews']:20.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
