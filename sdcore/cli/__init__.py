"""`sdcore img2img | inpaint | txt2img | info | samplers`: a thin command line over the Python API.

Every processing flag sets one field of `StableDiffusionProcessingImg2Img` (`...Txt2Img` for txt2img) or of its
`opts: Options`, under the A1111 name with dashes (`--denoising-strength` -> `denoising_strength`; one exception,
`--clip-skip` -> `CLIP_stop_at_last_layers`); `FLAGS` is the table. A value comes from, in increasing priority:
the field's default (the A1111 UI default where a1111-semantics §1 gives one), `--from-infotext FILE`, the command line.

Bad input exits with status 2 and one line naming the argument, before anything is written (no output directory
is created). `--explain` runs the whole job with stand-ins for the UNet and VAE that only record what they are
asked (a dry run through `process_images`), so the plan it prints is what a real run does.

Modules: `flags` (the flag table, the parser, values from defaults / infotext / command line), `jobs` (a job's
input files and its processing object), `explain` (the --explain dry run), `commands` (running the commands,
writing files). This file holds `main` and re-exports the names the tests and scripts use; the names of `jobs`,
`explain` and `commands` are imported on first use, since those modules import torch.
"""
from __future__ import annotations

import sys

from .flags import (DEFAULT_CKPT, DEFAULT_OUTDIRS, FIELDS_WITHOUT_FLAG, FLAGS, MAX_INFOTEXT_BYTES, Flag, UsageError,
                    build_parser, field_default, processing_flags, read_infotext_file, resolve_values,
                    values_from_infotext)

__all__ = ["DEFAULT_CKPT", "DEFAULT_OUTDIRS", "FIELDS_WITHOUT_FLAG", "FLAGS", "MAX_INFOTEXT_BYTES", "Flag", "DryRun",
           "Task", "UsageError", "batch_tasks", "build_parser", "dry_run", "field_default", "main", "make_processing",
           "processing_flags", "read_infotext_file", "resolve_values", "values_from_infotext", "write_new_file"]


def __getattr__(name: str):
    """The names of the modules that import torch, imported on first use."""
    # lazy: --help must not import torch
    if name == "Task":
        from .jobs import Task
        return Task
    if name == "batch_tasks":
        from .jobs import batch_tasks
        return batch_tasks
    if name == "make_processing":
        from .jobs import make_processing
        return make_processing
    if name == "DryRun":
        from ..plan import DryRun
        return DryRun
    if name == "dry_run":
        from .explain import dry_run
        return dry_run
    if name == "write_new_file":
        from .commands import write_new_file
        return write_new_file
    if name == "_load_model":
        from .commands import _load_model
        return _load_model
    raise AttributeError(f"module 'sdcore.cli' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sdcore` console script; returns the exit status (2 for bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a parse error (2, already printed in one line)
        return e.code if isinstance(e.code, int) else 2
    # lazy: --help must not import torch
    from ..checkpoint import CheckpointError
    from .commands import run_generate, run_info, run_samplers

    run = {"img2img": run_generate, "inpaint": run_generate, "txt2img": run_generate, "info": run_info,
           "samplers": run_samplers}[args.command]
    try:
        return run(args)
    except (ValueError, TypeError, NotImplementedError, CheckpointError, OSError) as e:
        message = " ".join(str(e).split("\n"))
        print(f"sdcore: error: {message}", file=sys.stderr)
        return 2
