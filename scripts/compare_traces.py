"""Compare two sampler traces: the first model call where they diverge and the first noise draw that differs.

A trace is the .safetensors file written by `sdcore.sampling.samplers.TraceRecorder` (one entry per model call n:
`step{n}.x`, `step{n}.denoised`, `step{n}.sigma`, `step{n}.sigma_hat`, `step{n}.i`; its metadata "noise" holds
one fingerprint per noise draw: name, step, shape, dtype, device and the sha256 of the draw's float32
little-endian C-order bytes, `samplers.noise_bytes`). Record one run with sdcore and one with another
implementation (e.g. k-diffusion or A1111 with the same callback and a hook on its noise draws), then:

    python scripts/compare_traces.py ours.safetensors theirs.safetensors --atol 1e-5

Model calls: prints, for the first call whose tensors differ by more than `atol` (max abs difference, any key),
every key's max abs difference at that call, and the per-call maxima up to there.
Noise: the draws are compared in order by name, shape and sha256; the first that differs is printed with both
records (and, for a batch, which images differ). Either file may instead be a .json file holding only the list
of fingerprints (what another implementation can write with hashlib alone); then only the noise is compared.
Exit status: 0 no divergence, 1 divergence (or different numbers of calls / draws / keys / shapes), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcore.sampling.samplers import load_noise_fingerprints, load_trace  # noqa: E402

KEYS = ("sigma", "sigma_hat", "x", "denoised")
NOISE_KEYS = ("name", "shape", "sha256")  # what must agree; dtype and device are printed, not compared


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


def first_noise_difference(noise_a: list[dict], noise_b: list[dict]) -> int | None:
    """Index of the first draw whose name, shape or sha256 differ (or the shorter list's length when one list
    continues past the other), or None when both lists agree entirely."""
    for n, (a, b) in enumerate(zip(noise_a, noise_b)):
        if any(a.get(key) != b.get(key) for key in NOISE_KEYS):
            return n
    return None if len(noise_a) == len(noise_b) else min(len(noise_a), len(noise_b))


def describe_draw(record: dict) -> str:
    """One line: name, step, sigma interval, shape, dtype, device, sha256 of a fingerprint record."""
    interval = "" if record.get("sigma") is None else f" sigma {record['sigma']:.6g} -> {record['sigma_next']:.6g}"
    return (f"{record.get('name')} (step {record.get('step')}, after {record.get('call')} model calls{interval}) "
            f"shape {record.get('shape')} {record.get('dtype')} on {record.get('device')} sha256 {record['sha256']}")


def load_fingerprints(path: Path) -> list[dict]:
    """The noise fingerprints of a trace file, or of a .json file holding the list itself."""
    if path.suffix == ".json":
        records = json.loads(path.read_text())
        if not isinstance(records, list) or not all(isinstance(r, dict) and "sha256" in r for r in records):
            raise ValueError(f"{path}: must hold a JSON list of fingerprint records with a 'sha256' each")
        return records
    return load_noise_fingerprints(path)


def compare_noise(noise_a: list[dict], noise_b: list[dict]) -> bool:
    """Print the comparison of two fingerprint lists; True when they agree."""
    print(f"noise draws: {len(noise_a)} vs {len(noise_b)}")
    n = first_noise_difference(noise_a, noise_b)
    if n is None:
        print(f"no noise difference: all {len(noise_a)} draws have equal name, shape and sha256")
        return True
    if n >= min(len(noise_a), len(noise_b)):
        longer = noise_a if len(noise_a) > len(noise_b) else noise_b
        print(f"the first {n} draws agree, then only one run draws: {describe_draw(longer[n])}")
        return False
    a, b = noise_a[n], noise_b[n]
    print(f"first differing noise draw: {n}\n  a: {describe_draw(a)}\n  b: {describe_draw(b)}")
    images_a, images_b = a.get("sha256_images") or [], b.get("sha256_images") or []
    if images_a and len(images_a) == len(images_b):
        print(f"  images that differ: {[i for i, (x, y) in enumerate(zip(images_a, images_b)) if x != y]}")
    return False


def compare_calls(path_a: Path, path_b: Path, atol: float) -> bool:
    """Print the model-call comparison of two trace files; True when they agree within atol."""
    trace_a, trace_b = load_trace(path_a), load_trace(path_b)
    print(f"{path_a}: {len(trace_a)} calls; {path_b}: {len(trace_b)} calls; atol {atol:g}")
    n, diffs, maxima = first_divergence(trace_a, trace_b, atol)
    for k, m in enumerate(maxima):
        i = int(trace_a[k]["i"]) if "i" in trace_a[k] else k
        sigma = float(trace_a[k]["sigma"]) if "sigma" in trace_a[k] else float("nan")
        print(f"  call {k:4d}  i {i:4d}  sigma {sigma:10.5g}  max abs diff {m:.3e}")
    if n is not None:
        detail = ", ".join(f"{key} {value:.3e}" for key, value in diffs.items())
        print(f"first divergence at call {n} (i = {int(trace_a[n]['i'])}): {detail}")
        if set(trace_a[n]) != set(trace_b[n]):
            print(f"  keys differ: {sorted(trace_a[n])} vs {sorted(trace_b[n])}")
        return False
    if len(trace_a) != len(trace_b):
        print(f"no divergence in the first {len(maxima)} calls, but the call counts differ")
        return False
    print(f"no divergence: all {len(maxima)} calls within {atol:g}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--atol", type=float, default=1e-5, help="max abs difference allowed (default 1e-5)")
    args = parser.parse_args(argv)
    calls_agree = True
    if args.a.suffix != ".json" and args.b.suffix != ".json":
        calls_agree = compare_calls(args.a, args.b, args.atol)
    noise_agree = compare_noise(load_fingerprints(args.a), load_fingerprints(args.b))
    return 0 if calls_agree and noise_agree else 1


if __name__ == "__main__":
    sys.exit(main())
