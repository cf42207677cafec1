"""The commands: `img2img` / `inpaint` / `txt2img` (`run_generate`: check every input, then explain or run each
job; batch folders), `info` and `samplers`, and the file writing that never overwrites (`write_new_file`).

Bad input raises UsageError (or another ValueError) before anything is written; `sdcore.cli.main` turns it into
one line and exit status 2.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import PngImagePlugin
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint
from ..processing import process_images
from ..sampling.samplers import SAMPLERS, TraceRecorder
from .explain import explain
from .flags import DEFAULT_OUTDIRS, UsageError, processing_flags, resolve_values
from .jobs import Task, _check_processing, _open_inputs, batch_tasks, make_processing

# ---------------------------------------------------------------------------------------------------------------
# Files


def write_new_file(path: Path, write: Callable[[Path], None]) -> None:
    """Create `path` with `write(tmp)` without ever overwriting, and without a half-written file at `path`.

    The content goes to a hidden temporary name in the same folder and is then hard-linked to `path` (the link fails
    if `path` exists, so nothing is overwritten even by a concurrent run); an interrupted write leaves no `path`.
    Raises FileExistsError if `path` exists.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_png(image, infotext: str) -> Callable[[Path], None]:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    return lambda tmp: image.save(tmp, format="PNG", pnginfo=info)


# ---------------------------------------------------------------------------------------------------------------
# Running jobs


def _load_model(path: Path, device: str, dtype: str, vae: Path | None = None, prediction: str | None = None):
    return load_checkpoint(path, device=device, dtype=getattr(torch, dtype), vae=vae, prediction=prediction)


def _check_run_args(args, values: dict[str, Any]) -> None:
    if args.trace is not None:
        if getattr(args, "input_dir", None) is not None:
            raise UsageError("--trace: records one job; not with --input-dir")
        if args.trace.suffix != ".safetensors":
            raise UsageError(f"--trace: {args.trace}; the file name must end in .safetensors")
        if args.trace.exists():
            raise UsageError(f"--trace: {args.trace} exists; traces are never overwritten")
        if not args.trace.parent.is_dir():
            raise UsageError(f"--trace: folder {args.trace.parent} does not exist")
    for flag, folder in (("--outdir", args.outdir), ("--output-dir", getattr(args, "output_dir", None))):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise UsageError(f"{flag}: {folder} exists and is not a folder")
    if args.command == "txt2img":
        return
    batch = args.input_dir is not None
    if batch and args.init is not None:
        raise UsageError(f"init: {args.init}; give an init image or --input-dir, not both")
    if not batch and args.init is None:
        raise UsageError("init: missing; give an init image file or --input-dir DIR")
    if batch and args.output_dir is None and not args.explain:
        raise UsageError("--output-dir: missing; batch mode (--input-dir) writes <stem>.png files there")
    if not batch and (args.output_dir is not None or args.mask_dir is not None):
        flag = "--output-dir" if args.output_dir is not None else "--mask-dir"
        raise UsageError(f"{flag}: only with --input-dir (single images go to --outdir)")
    if batch and args.outdir is not None:
        raise UsageError("--outdir: not with --input-dir (batch outputs go to --output-dir)")
    if batch and values["mask"] is not None:
        raise UsageError("--mask: not with --input-dir (use --mask-dir)")
    if args.command == "inpaint" and values["mask"] is None and args.mask_dir is None:
        raise UsageError("--mask: inpaint needs a mask (--mask FILE, or --mask-dir with --input-dir)")
    if values["latent_mask"] is not None and values["mask"] is None and args.mask_dir is None:
        raise UsageError("--latent-mask: only used together with a mask (--mask)")


def run_generate(args) -> int:
    """img2img, inpaint and txt2img: resolve the values, check every input, then explain or run each job."""
    values, unused = resolve_values(args, processing_flags(args.command))
    _check_run_args(args, values)
    command = "txt2img" if args.command == "txt2img" else "img2img"
    batch = getattr(args, "input_dir", None) is not None
    if batch:
        tasks = batch_tasks(args.input_dir, args.mask_dir, args.output_dir, values["batch_size"] * values["n_iter"])
    else:
        tasks = [Task(getattr(args, "init", None), values.get("mask"))]
    todo = [t for t in tasks if args.explain or not t.done]
    for t in tasks:
        if t not in todo:
            print(f"skip: {t.init.name}: {', '.join(str(p) for p in t.outputs)} exist", file=sys.stderr)
    if unused:
        print(f"sdcore: note: infotext keys not used: {', '.join(unused)}", file=sys.stderr)

    sd = _load_model(args.ckpt, args.device, args.dtype, args.vae, args.prediction)
    outdir = None if batch else (args.outdir or DEFAULT_OUTDIRS[args.command])
    # Everything that can be checked is checked for every task before the first file is written.
    for task in todo:
        _check_processing(make_processing(sd, values, command, *_open_inputs(task, values), outdir=outdir))
    if args.explain:
        for task in todo:
            print(explain(sd, values, command, task))
        return 0
    for task in tqdm(todo, desc="images", unit="input", disable=None if len(todo) > 1 else True):
        run_task(sd, values, command, task, outdir, args.trace)
    return 0


def run_task(sd, values: dict[str, Any], command: str, task: Task, outdir: Path | None, trace: Path | None) -> None:
    """Run one job; print the saved paths. Batch tasks write only their missing outputs."""
    p = make_processing(sd, values, command, *_open_inputs(task, values), outdir=outdir)
    recorder = None
    if trace is not None:
        recorder = TraceRecorder()
    processed = process_images(p, model_callback=recorder, disable_progress=None)
    for path in processed.paths:
        print(path)
    if task.batch:
        task.outputs[0].parent.mkdir(parents=True, exist_ok=True)
        for path, image, text in zip(task.outputs, processed.images, processed.infotexts):
            try:
                write_new_file(path, _save_png(image, text))
            except FileExistsError:  # written meanwhile (another run on the same folders): keep it
                print(f"skip: {path} exists", file=sys.stderr)
                continue
            print(path)
    if recorder is not None:
        sampler, scheduler = p.resolve_sampler()
        meta = {"index": "model call", "command": command, "sampler": sampler.name, "scheduler": str(scheduler),
                "steps": str(p.steps),
                "denoising_strength": str(p.denoising_strength), "seeds": json.dumps(processed.seeds),
                "infotext": processed.infotexts[0], "calls": str(len(recorder.records))}
        write_new_file(trace, lambda tmp: recorder.save(tmp, metadata=meta))
        print(trace)


# ---------------------------------------------------------------------------------------------------------------
# info, samplers


def run_info(args) -> int:
    sd = load_checkpoint(args.ckpt, vae=args.vae, prediction=args.prediction)
    print(f"file: {args.ckpt}")
    print(f"family: {sd.family.name} (prediction {sd.family.prediction}, native {sd.family.native_size} px)")
    for r in sd.reasons:
        print(f"  because: {r}")
    components = sd.components()
    for name, count in sd.parameter_counts().items():
        print(f"{name}: {count:,} parameters, compute dtype {next(components[name].parameters()).dtype}")
    print("file dtypes: " + ", ".join(f"{k} x{n}" for k, n in sd.file_dtypes.items()))
    print(f"model hash (sha256[:10]): {sd.shorthash()}")
    return 0


def run_samplers(args) -> int:
    for s in SAMPLERS:
        print(f"{s.name:20s} aliases: {', '.join(s.aliases) or '-':30s} scheduler: {s.scheduler or 'uniform'}")
    return 0
