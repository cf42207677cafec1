"""One job of a run: its input files (`Task`, the batch folders), reading them, the processing object built from the
resolved flag values, and `prepare_run`, every check of a generate command that needs no model.

Importing this module does not import torch (`make_processing` imports processing on use), so `sdcore.cli.main` can
refuse bad arguments and unreadable files, and skip a finished batch, before torch or the model loads.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..extra_networks import all_lora_requests, find_lora
from ..files import checkpoint_path_problem
from .flags import UsageError, check_readable, open_image, processing_class, processing_flags, resolve_values

@dataclass
class Task:
    """One img2img job of a run: the init image (and mask) files and, in batch mode, the outputs to create."""

    init: Path | None  # None for txt2img
    mask: Path | None
    outputs: list[Path] = dataclasses.field(default_factory=list)
    batch: bool = False

    @property
    def done(self) -> bool:
        return bool(self.outputs) and all(p.exists() for p in self.outputs)


def _image_files(directory: Path, arg: str) -> list[Path]:
    if not directory.is_dir():
        raise UsageError(f"{arg}: {directory} is not a directory")
    extensions = set(Image.registered_extensions())
    files = sorted(f for f in directory.iterdir()
                   if f.suffix.lower() in extensions and not f.name.startswith(".") and f.is_file())
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise UsageError(f"{arg}: {stems[f.stem].name} and {f.name} share the stem {f.stem!r}")
        stems[f.stem] = f
    return files


def batch_tasks(input_dir: Path, mask_dir: Path | None, output_dir: Path | None, n_images: int) -> list[Task]:
    """One Task per image of `input_dir` (sorted by name): its mask `mask_dir/<stem>.*` and outputs in output_dir.

    Outputs are `<stem>.png`, or `<stem>-<k>.png` for k < n_images when a job makes several images. A mask folder
    holding a single image uses it for every input (as A1111's batch tab does). UsageError for a missing or
    ambiguous mask, an empty input folder, or an output folder that is the input folder.
    """
    inputs = _image_files(input_dir, "--input-dir")
    if not inputs:
        raise UsageError(f"--input-dir: no image files in {input_dir}")
    if output_dir is not None and output_dir.resolve() == input_dir.resolve():
        raise UsageError(f"--output-dir: {output_dir} is the input folder; outputs would shadow inputs")
    masks = {m.stem: m for m in _image_files(mask_dir, "--mask-dir")} if mask_dir is not None else None
    if masks is not None and not masks:
        raise UsageError(f"--mask-dir: no image files in {mask_dir}")
    tasks = []
    for f in inputs:
        mask = None
        if masks is not None:
            mask = next(iter(masks.values())) if len(masks) == 1 else masks.get(f.stem)
            if mask is None:
                raise UsageError(f"--mask-dir: no mask for {f.name} (looked for {f.stem}.* in {mask_dir})")
        names = [f"{f.stem}.png"] if n_images == 1 else [f"{f.stem}-{k}.png" for k in range(n_images)]
        tasks.append(Task(f, mask, [output_dir / n for n in names] if output_dir is not None else [], batch=True))
    return tasks


def make_processing(sd, values: dict[str, Any], command: str, init=None, mask=None, latent_mask=None,
                    outdir: Path | None = None):
    """The command's processing object from resolved flag values (width/height None -> the model's native size)."""
    from ..processing import Options  # lazy: processing imports torch (see the module docstring)

    fields = {k: v for k, v in values.items() if not k.startswith("opts.")}
    opts = Options(**{k[5:]: v for k, v in values.items() if k.startswith("opts.")})
    size = sd.family.native_size
    fields.update(width=fields["width"] or size, height=fields["height"] or size)
    if command != "txt2img":
        fields.update(init_images=[init], mask=mask, latent_mask=latent_mask)
    return processing_class(command)(sd_model=sd, opts=opts, outpath_samples=None if outdir is None else str(outdir),
                                     **fields)


def _input_files(task: Task, values: dict[str, Any]) -> list[tuple[Path, str]]:
    """(file, argument) of every image a task reads."""
    files = []
    if task.init is not None:
        files.append((task.init, f"--input-dir {task.init.name}" if task.batch else "init"))
    if task.mask is not None:
        files.append((task.mask, f"--mask-dir {task.mask.name}" if task.batch else "--mask"))
    if values.get("latent_mask"):
        files.append((values["latent_mask"], "--latent-mask"))
    return files


def _open_inputs(task: Task, values: dict[str, Any]):
    """(init, mask, latent mask) images of a task (None for txt2img), checked for matching sizes."""
    if task.init is None:
        return None, None, None
    init = open_image(task.init, f"--input-dir {task.init.name}" if task.batch else "init")
    mask_arg = f"--mask-dir {task.mask.name if task.mask else ''}" if task.batch else "--mask"
    mask = open_image(task.mask, mask_arg) if task.mask is not None else None
    if mask is not None and mask.size != init.size:
        raise UsageError(f"{mask_arg}: size {mask.size[0]}x{mask.size[1]} differs from the init image's "
                         f"{init.size[0]}x{init.size[1]} ({task.init.name})")
    latent_mask = open_image(values["latent_mask"], "--latent-mask") if values["latent_mask"] else None
    return init, mask, latent_mask


def _check_processing(p) -> None:
    """What processing would reject at run time, checked before anything is written."""
    p.validate()
    if getattr(p, "latent_mask", None) is not None and p.latent_mask.size != (p.width, p.height):
        raise UsageError(f"--latent-mask: size {p.latent_mask.size[0]}x{p.latent_mask.size[1]}; must be the "
                         f"processing size {p.width}x{p.height}")


# ---------------------------------------------------------------------------------------------------------------
# Everything that can be checked before a model loads


def check_run_args(args, values: dict[str, Any]) -> None:
    """The run flags that go together (init or --input-dir, --output-dir with batches, --trace's file, ...)."""
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


@dataclass
class Run:
    """A generate command after every check that needs no model: resolved values, the tasks, the ones to do."""

    command: str  # the processing command: "img2img" (img2img, inpaint) or "txt2img"
    values: dict[str, Any]
    tasks: list[Task]
    todo: list[Task]
    batch: bool


def prepare_run(args) -> Run:
    """Resolve and check the values, list the tasks, and check every file a run reads (the checkpoint and VAE are
    readable files; every init image, mask and latent mask decodes, with matching sizes), all before any model
    loads. Prints a "skip:" line for each batch input whose outputs exist and the infotext keys that set nothing.
    Raises UsageError naming the argument."""
    values, unused = resolve_values(args, processing_flags(args.command))
    check_run_args(args, values)
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
    if todo:
        for path, arg in ((args.ckpt, "--ckpt"), (args.vae, "--vae")):
            problem = None if path is None else checkpoint_path_problem(path)
            if problem:
                raise UsageError(f"{arg}: {problem}")
            if path is not None:
                check_readable(path, arg)
    for task in todo:
        for path, arg in _input_files(task, values):
            check_readable(path, arg)
    for task in todo:
        _open_inputs(task, values)  # decoded once here so that a bad file stops the run before the model loads
    if todo:
        check_lora_names(values)
    return Run(command, values, tasks, todo, batch)


def check_lora_names(values: dict[str, Any]) -> None:
    """Every `<lora:name:...>` tag of the prompts is well formed and names a file in --lora-dir (before any model
    loads). Raises UsageError naming the tag and the names available."""
    if values.get("disable_extra_networks"):
        return
    texts = [values.get("prompt") or ""] + ([values["hr_prompt"]] if values.get("hr_prompt") else [])
    try:
        for request in all_lora_requests(texts):
            find_lora(request.name, values.get("opts.lora_dir"))
    except ValueError as e:
        raise UsageError(str(e)) from None
