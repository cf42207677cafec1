"""One job of a run: its input files (`Task`, the batch folders), reading them, and the processing object built
from the resolved flag values. Used by the commands and by the --explain dry run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..processing import Options
from .flags import UsageError, open_image, processing_class


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
    fields = {k: v for k, v in values.items() if not k.startswith("opts.")}
    opts = Options(**{k[5:]: v for k, v in values.items() if k.startswith("opts.")})
    size = sd.family.native_size
    fields.update(width=fields["width"] or size, height=fields["height"] or size)
    if command != "txt2img":
        fields.update(init_images=[init], mask=mask, latent_mask=latent_mask)
    return processing_class(command)(sd_model=sd, opts=opts, outpath_samples=None if outdir is None else str(outdir),
                                     **fields)


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
