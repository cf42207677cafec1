"""The commands: `img2img` / `inpaint` / `txt2img` (`run_generate`: after `jobs.prepare_run`'s checks, the memory
check on the checkpoint's header, then explain or run each job; batch folders), `info` and `samplers`, and the file
writing that never overwrites (`write_new_file`, the one `sdcore.images.save_image` uses).

Bad input raises UsageError (or another ValueError) before anything is written; `sdcore.cli.main` turns it into
one line and exit status 2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import resources
from ..batch import manifest_from_folders, run_manifest
from ..checkpoint import detect_family, drop_known_extras, load_checkpoint, load_vae_file, open_state_dict
from ..families import Family
from ..images import write_new_file
from ..previews import PreviewWriter, load_taesd_decoder
from ..processing import process_images
from ..sampling.samplers import SAMPLERS, TraceRecorder
from ..sampling.schedules import SCHEDULERS
from .explain import explain
from .flags import DEFAULT_OUTDIRS, UsageError
from .info import print_info
from .jobs import Run, Task, _check_processing, _open_inputs, make_processing, prepare_run

# ---------------------------------------------------------------------------------------------------------------
# Memory, from the checkpoint's header


@dataclasses.dataclass(frozen=True)
class _HeaderModel:
    """What a checkpoint's header tells before its weights load: enough for `make_processing` (the native size)
    and `resources.check_processing` (family, device, dtypes)."""

    family: Family
    device: str
    dtype: str
    vae_dtype: str = "float32"


def _header_family(args) -> Family:
    """The checkpoint's family from its header (names and shapes; no tensor data is read), the --vae file's VAE
    geometry applied. An unreadable, hostile or unknown file raises the CheckpointError its load would raise, only
    earlier. An SD2 file whose prediction (so native size, 512 or 768) the probe on its weights decides counts as
    768 px."""
    raw, _ = drop_known_extras(open_state_dict(args.ckpt, meta=True))
    detection = detect_family({k: tuple(v.shape) for k, v in raw.items()})
    family = detection.family
    if args.vae is not None:
        family = dataclasses.replace(family, vae=load_vae_file(args.vae, family.vae, meta=True)[1])
    if detection.probe_prediction and args.prediction is None:
        family = dataclasses.replace(family, native_size=max(family.native_size, 768))
    return family


def check_memory(args, run: Run, family: Family) -> None:
    """Refuse, before the weights load, a run whose estimated peak memory (`sdcore.resources`) exceeds what the
    device has available: UsageError naming --width/--height with the estimate and the limit. --explain is refused
    the same way (it plans a run that cannot happen), and allocates nothing for it. `family`: `_header_family`'s."""
    header = _HeaderModel(family, args.device, args.dtype, args.vae_dtype)
    available = resources.available_bytes(args.device)
    for task in run.todo:
        p = make_processing(header, run.values, run.command)
        image_size = None
        if task.init is not None:
            with Image.open(task.init) as im:  # the header only: prepare_run has decoded the file
                image_size = im.size
        try:
            resources.check_processing(p, available, image_size)
        except ValueError as e:
            raise UsageError(f"--width/--height: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Running jobs

SMALL_JOB = 1 << 20  # UNet rows x latent cells x model_channels^2 (~ conv work) at or below which one thread is used


def threads_for(args, run: Run, family: Family) -> int:
    """--threads, or for 0 (auto) 1 when every job is small (`SMALL_JOB`; the tiny model at 64 px, one image:
    2 x 8 x 8 x 64^2 = 2^19), else 0 = leave torch's default. Tiny convolutions run faster on one thread: with two,
    OpenMP's hand-offs cost more than the work (20-step img2img with the tiny model on this 2-core machine: 0.4 s
    on one thread, 0.6 s on two, and 5 to 28 s on two when the other core is busy)."""
    if args.threads or args.device != "cpu":
        return args.threads
    width = run.values["width"] or family.native_size
    height = run.values["height"] or family.native_size
    factor = 2 ** (len(family.vae.ch_mult) - 1)
    hires = run.values.get("hr_scale", 1) if run.values.get("enable_hr") else 1
    cells = (width // factor) * (height // factor) * hires * hires
    work = 2 * run.values["batch_size"] * cells * family.unet.model_channels ** 2
    return 1 if work <= SMALL_JOB else 0


def _load_model(path: Path, device: str, dtype: str, vae: Path | None = None, prediction: str | None = None,
                vae_dtype: str = "float32"):
    return load_checkpoint(path, device=device, dtype=getattr(torch, dtype), vae_dtype=getattr(torch, vae_dtype),
                           vae=vae, prediction=prediction)


def run_generate(args, run: Run | None = None) -> int:
    """img2img, inpaint and txt2img: `jobs.prepare_run` (unless given its result), the memory check on the
    checkpoint's header, then load the model, check every job against it and explain or run each job."""
    if run is None:
        run = prepare_run(args)
    if not run.todo:  # a batch whose outputs all exist: nothing to load
        return 0
    family = _header_family(args)
    check_memory(args, run, family)
    threads = threads_for(args, run, family)
    if threads:
        torch.set_num_threads(threads)
    values, command = run.values, run.command
    # before the model: a bad --taesd file stops the run at once
    taesd = load_taesd_decoder(args.taesd, args.device) if getattr(args, "taesd", None) is not None else None
    sd = _load_model(args.ckpt, args.device, args.dtype, args.vae, args.prediction, args.vae_dtype)
    outdir = None if run.batch else (args.outdir or DEFAULT_OUTDIRS[args.command])
    # Everything that can be checked is checked for every task before the first file is written.
    for task in run.todo:
        _check_processing(make_processing(sd, values, command, *_open_inputs(task, values), outdir=outdir))
    if args.explain:
        for task in run.todo:
            print(explain(sd, values, command, task))
        return 0
    if run.batch:  # the folder batch is a manifest built from the folders: one code path with `sdcore batch`
        rows = manifest_from_folders(args.input_dir, args.mask_dir, args.output_dir,
                                     values["batch_size"] * values["n_iter"])
        run_manifest(rows, sd, args.output_dir, values, strict=True, results_name=None, skip_lines=False)
        return 0
    preview = None
    if getattr(args, "preview_dir", None) is not None:  # flags.preview_flags_problem checked the combination
        preview = PreviewWriter(args.preview_every, args.preview_dir, args.preview_method or "approx_cheap", sd,
                                taesd, background=True, vae_tiling=values.get("opts.vae_tiling"))
    with preview or contextlib.nullcontext():  # waits for the previews' background writes
        for task in tqdm(run.todo, desc="images", unit="input", disable=None if len(run.todo) > 1 else True):
            run_task(sd, values, command, task, outdir, args.trace, preview)
    return 0


def run_task(sd, values: dict[str, Any], command: str, task: Task, outdir: Path | None, trace: Path | None,
             preview: PreviewWriter | None = None) -> None:
    """Run one single-image job (the folder batch runs `batch.run_manifest`); print the saved paths. `preview`:
    the sampler callback writing --preview-dir's PNGs."""
    p = make_processing(sd, values, command, *_open_inputs(task, values), outdir=outdir)
    recorder = None
    if trace is not None:
        recorder = TraceRecorder()
    processed = process_images(p, callback=preview, model_callback=recorder, disable_progress=None)
    for path in processed.paths:
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


def loaded_info(args) -> int:
    """`sdcore info` through `load_checkpoint(..., device="meta")`: for the files `info.run_info`'s torch-free
    reading passes on (legacy pickles, the SD2 probe, a file failing a check, whose error this load words). Only the
    SD2 probe reads tensor data: the UNet's, to run it."""
    sd = load_checkpoint(args.ckpt, device="meta", vae=args.vae, prediction=args.prediction)
    print_info(args.ckpt, sd.family, sd.reasons, sd.parameter_counts(), sd.component_file_dtypes, sd.file_dtypes,
               sd.shorthash())
    return 0


def run_samplers(args) -> int:
    """`sdcore samplers`: every sampler (name, aliases, the scheduler "Automatic" gives it), then the 12 schedulers
    under the label A1111's "Schedule type" shows, with the name and aliases --scheduler also takes
    (`schedules.SCHEDULERS`, A1111 `modules/sd_schedulers.py`, a1111-semantics §10.2)."""
    print("samplers (--sampler-name; xyz axis 'sampler'):")
    for s in SAMPLERS:
        print(f"{s.name:20s} aliases: {', '.join(s.aliases) or '-':30s} scheduler: {s.scheduler or 'uniform'}")
    print("\nschedulers (--scheduler; A1111 'Schedule type'; xyz axis 'scheduler'):")
    for entry in SCHEDULERS:
        note = "  (the sampler's scheduler above)" if entry.function is None else ""
        print(f"{entry.label:20s} name: {entry.name:20s} aliases: {', '.join(entry.aliases) or '-'}{note}")
    return 0
