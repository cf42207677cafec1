"""Compare two sampler traces and report the first model call where they diverge.

A trace is the .safetensors file written by `sdcore.sampling.samplers.TraceRecorder` (one entry per sampler
callback call n: `step{n}.x`, `step{n}.denoised`, `step{n}.sigma`, `step{n}.sigma_hat`, `step{n}.i`). Record one
run with sdcore and one with another implementation (e.g. k-diffusion or A1111 with the same callback), then:

    python scripts/compare_traces.py ours.safetensors theirs.safetensors --atol 1e-5

Prints, for the first call whose tensors differ by more than `atol` (max abs difference, any key), every key's
max abs difference at that call, and the per-call maxima up to there. Exit status: 0 no divergence, 1 divergence
(or different numbers of calls / keys / shapes), 2 bad usage.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcore.sampling.samplers import load_trace  # noqa: E402

KEYS = ("sigma", "sigma_hat", "x", "denoised")


def max_abs_diffs(a: dict, b: dict) -> dict[str, float]:
    """Max abs difference per key present in both records (float64); inf when shapes differ."""
    out = {}
    for key in [k for k in KEYS if k in a and k in b]:
        if a[key].shape != b[key].shape:
            out[key] = float("inf")
        else:
            out[key] = float((a[key].double() - b[key].double()).abs().max()) if a[key].numel() else 0.0
    return out


def first_divergence(trace_a: list[dict], trace_b: list[dict], atol: float):
    """(index of the first call with a difference > atol, its per-key diffs, all per-call maxima), or (None, ...)."""
    maxima = []
    for n, (a, b) in enumerate(zip(trace_a, trace_b)):
        diffs = max_abs_diffs(a, b)
        maxima.append(max(diffs.values(), default=0.0))
        if maxima[-1] > atol or set(a) != set(b):
            return n, diffs, maxima
    return None, {}, maxima


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--atol", type=float, default=1e-5, help="max abs difference allowed (default 1e-5)")
    args = parser.parse_args(argv)
    trace_a, trace_b = load_trace(args.a), load_trace(args.b)
    print(f"{args.a}: {len(trace_a)} calls; {args.b}: {len(trace_b)} calls; atol {args.atol:g}")
    n, diffs, maxima = first_divergence(trace_a, trace_b, args.atol)
    for k, m in enumerate(maxima):
        i = int(trace_a[k]["i"]) if "i" in trace_a[k] else k
        sigma = float(trace_a[k]["sigma"]) if "sigma" in trace_a[k] else float("nan")
        print(f"  call {k:4d}  i {i:4d}  sigma {sigma:10.5g}  max abs diff {m:.3e}")
    if n is not None:
        detail = ", ".join(f"{key} {value:.3e}" for key, value in diffs.items())
        print(f"first divergence at call {n} (i = {int(trace_a[n]['i'])}): {detail}")
        if set(trace_a[n]) != set(trace_b[n]):
            print(f"  keys differ: {sorted(trace_a[n])} vs {sorted(trace_b[n])}")
        return 1
    if len(trace_a) != len(trace_b):
        print(f"no divergence in the first {len(maxima)} calls, but the call counts differ")
        return 1
    print(f"no divergence: all {len(maxima)} calls within {args.atol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
