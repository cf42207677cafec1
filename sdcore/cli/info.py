"""`sdcore info`: what a checkpoint is and why, read from its header without importing torch where it can be.

`sdcore.header.describe` reads names, shapes and dtypes (no tensor data, no torch) and the sha256 is streamed; a
file only torch can read, an SD2 file whose eps/v the probe must decide, or one that fails a check goes through
`load_checkpoint(..., device="meta")` instead (`commands.loaded_info`), which checks every key strictly and words
every error. Either way the same lines are printed.
"""
from __future__ import annotations

from pathlib import Path

from ..header import describe, file_sha256


def print_info(path, family, reasons, parameter_counts, component_file_dtypes, file_dtypes, shorthash) -> None:
    """The lines of `sdcore info`, from either reading."""
    print(f"file: {path}")
    print(f"family: {family.name} (prediction {family.prediction}, native {family.native_size} px)")
    for r in reasons:
        print(f"  because: {r}")
    for name, count in parameter_counts.items():
        dtypes = component_file_dtypes.get(name, {})
        shown = next(iter(dtypes)) if len(dtypes) == 1 else ", ".join(f"{k} x{n}" for k, n in dtypes.items())
        print(f"{name}: {count:,} parameters, file dtype {shown or '-'}")
    print("file dtypes: " + ", ".join(f"{k} x{n}" for k, n in file_dtypes.items()))
    print(f"model hash (sha256[:10]): {shorthash}")


def run_info(args) -> int:
    """What a checkpoint is and why: family, reasons, parameters and file dtypes per component, model hash.

    Memory does not grow with the file: the header is read (safetensors' JSON, or a zip pickle's data.pkl alone)
    and the sha256 streamed in 1 MiB blocks. Errors (CheckpointError: a folder, a missing, truncated, corrupt or
    hostile file, a checkpoint without a VAE and no --vae) reach `main`, which prints one line and exits 2.
    """
    d = describe(args.ckpt, vae=args.vae, prediction=args.prediction)
    if d is None:
        from .commands import loaded_info  # lazy: imports torch

        return loaded_info(args)
    print_info(args.ckpt, d.family, d.reasons, d.parameter_counts, d.component_file_dtypes, d.file_dtypes,
               file_sha256(Path(args.ckpt))[:10])
    return 0
