"""`sdcore img2img | inpaint | txt2img | info | samplers | xyz`: a thin command line over the Python API.

Every processing flag sets one field of `StableDiffusionProcessingImg2Img` (`...Txt2Img` for txt2img) or of its
`opts: Options`, under the A1111 name with dashes (`--denoising-strength` -> `denoising_strength`; one exception,
`--clip-skip` -> `CLIP_stop_at_last_layers`); `FLAGS` is the table. A value comes from, in increasing priority:
the field's default (the A1111 UI default where a1111-semantics §1 gives one), `--from-infotext FILE`, the command line.

Bad input exits with status 2 and one line naming the argument, before anything is written (no output directory
is created). `--explain` runs the whole job with stand-ins for the UNet and VAE that only record what they are
asked (a dry run through `process_images`), so the plan it prints is what a real run does.

Modules: `flags` (the flag table, the parser, values from defaults / infotext / command line), `jobs` (a job's
input files, its processing object, `prepare_run`: every check that needs no model), `explain` (the --explain dry
run), `commands` (the memory check on the checkpoint's header, running the commands, writing files). This file
holds `main` and re-exports the names the tests and scripts use; the names of `jobs`, `explain` and `commands` are
imported on first use. `flags` and `jobs` do not import torch: --help, argument errors, missing files and a batch
whose outputs all exist answer without it (`explain` and `commands` import it).
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
        from ..images import write_new_file
        return write_new_file
    if name == "prepare_run":
        from .jobs import prepare_run
        return prepare_run
    if name == "_load_model":
        from .commands import _load_model
        return _load_model
    raise AttributeError(f"module 'sdcore.cli' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sdcore` console script; returns the exit status (2 for bad input).

    Parsing, the flag values and (for img2img / inpaint / txt2img) every check of `jobs.prepare_run` run before
    torch is imported: --help and argument errors answer at once, and a batch whose outputs all exist ends here.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a parse error (2, already printed in one line)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command in ("img2img", "inpaint", "txt2img"):
            from .jobs import prepare_run  # jobs does not import torch (lazy only to keep `import sdcore.cli` small)

            run = prepare_run(args)
            if not run.todo:  # a batch whose outputs all exist: nothing to load
                return 0
            from .commands import run_generate  # lazy: imports torch

            return run_generate(args, run)
        if args.command == "batch":
            from ..batch import run as run_batch  # lazy: sdcore.batch imports torch when it runs rows

            return run_batch(args)
        if args.command == "serve":
            from ..server import run as run_serve  # lazy: imports torch and the serve extra

            return run_serve(args)
        if args.command == "xyz":
            from ..xyz import run as run_xyz  # lazy: imports torch

            return run_xyz(args)
        if args.command == "info":
            from .info import run_info  # reads the header without torch where it can

            return run_info(args)
        from .commands import run_samplers  # lazy: imports torch

        return run_samplers(args)
    # CheckpointError and UsageError are ValueErrors; MemoryError: an allocation the estimate did not foresee;
    # FloatingPointError: non-finite values, reported where they first appear with advice for the run's dtypes
    except (ValueError, TypeError, NotImplementedError, OSError, MemoryError, FloatingPointError) as e:
        message = " ".join(str(e).split("\n")) or e.__class__.__name__
        if isinstance(e, MemoryError):
            message = f"out of memory ({e.__class__.__name__}: {message}); try a smaller size or batch"
        print(f"sdcore: error: {message}", file=sys.stderr)
        return 2
