"""Batch img2img from a manifest: one row per job, resumable, with a results table; run here or on a Ray cluster.

`sdcore batch MANIFEST --output-dir OUT` (`add_parser`, `run`) and `run_manifest` (Python). The folder batch of
`sdcore img2img --input-dir` is the same run on a manifest built from the folders (`manifest_from_folders`).

The manifest is a CSV file with a header line (or a Parquet file, read with pyarrow, which the `ray` extra brings);
each record is one job. Columns:

    image    required. The init image file. Relative paths are relative to the manifest's folder.
    seed     required. The seed of the row's first image, an integer in [0, 2**63) (image k of a row uses seed + k,
             as A1111's batches); -1 (random) is refused, since the output names are made from it.
    mask     optional. The mask image file (white = regenerate, black = keep), the size of the image.
    output   optional. The row's output name (a file name without folder or extension); default
             `<row>-<image stem>-<seed>` with the row number written with at least 5 digits, e.g. `00003-cat-42`.
    any field of `StableDiffusionProcessingImg2Img` or of its `Options` under its A1111 name, as in the flag table
             of the command line (`sdcore.cli.flags`): prompt, negative_prompt, denoising_strength, steps,
             sampler_name, scheduler, cfg_scale, width, height, mask_blur, inpainting_fill, inpaint_full_res,
             latent_mask (a file), ..., and the options as `opts.<name>` or `<name>` (img2img_color_correction,
             CLIP_stop_at_last_layers, ...). A cell is read as the flag reads an infotext value (`Flag.parse`:
             True/False/1/0, integers, finite numbers) and checked by the flag's check. An empty cell leaves the
             run's value (command-line flags, then `--from-infotext`, then the A1111 defaults).

A row is numbered from 0 in file order (the header is not a row; blank CSV lines are not records). Its outputs are
`OUT/<name>.png`, or `OUT/<name>-<k>.png` for k < batch_size * n_iter when a row makes several images (the folder
batch's rule, where the name is the input's stem). Names depend only on the row number, the image file name and the
seed, so a re-run of the same manifest finds the finished rows and skips them; reordering or inserting rows
renames them (give an `output` column to pin names). PNGs carry the A1111 "parameters" infotext and are written to
a hidden temporary name in OUT, fsynced, then hard-linked into place (`sdcore.images.write_new_file`, as every PNG
sdcore writes): an existing file is never overwritten, an interrupted write leaves no file, and a finished PNG is
what marks a row done (a row whose PNGs all exist is skipped; one with some of them makes only the missing ones).
A process killed while writing can leave its hidden temporary (`.<name>.<random>.partial`) in OUT: nothing reads it,
and it can be deleted once no run is going on.

The results table `OUT/results.csv` (`RESULT_COLUMNS`: one line per output image, or one per failed row) is written
when the run ends (also when interrupted), and every `checkpoint_seconds` meanwhile, atomically (`write_replacing`:
temporary file in OUT, fsync, rename). A bad row (missing or unreadable file, bad value, a mask of another size, an
error while processing) is recorded there with its error and the other rows go on (unless `strict`, the folder
batch's all-or-nothing checks). Rows found finished keep the sha256 and infotext the previous table recorded for
their files, or are read back from the PNGs.

Engines: "local" runs the rows in this process, one after another. "ray" (`pip install 'sdcore[ray]'`, Ray >= 2.51)
hands the rows still to do to `ray.data` and `Dataset.map_batches` with an actor class (`RayRowWorker`) on a
fixed-size actor pool (`ray.data.ActorPoolStrategy(size=workers)`, `num_cpus` / `num_gpus` per actor): each actor
loads the checkpoint once, sets torch's thread count, runs its rows with the same per-row code as the local engine,
writes the PNGs itself and returns only paths, hashes and infotexts. Ray restarts an actor that dies and retries its
rows; rows whose PNGs exist by then are not run again. It connects to a running cluster (`address`, e.g. "auto" or
"ray://head:10001") or starts a local one. On a cluster, the manifest's files and OUT must be on a filesystem that
every node mounts at the same path, and every node needs the same Python environment with sdcore installed.

Importing this module does not import torch (the command line's parser and --help must not): the modules that do
(checkpoint, processing, images, cli.explain, and Ray) are imported where a run needs them.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from .cli.flags import (BATCH_COMMAND as COMMAND, DEFAULT_CKPT, RESULTS_NAME, Flag, UsageError,
                        _add_processing_flags, field_default, open_image, processing_flags, resolve_values)
from .cli.jobs import Task, _check_processing, batch_tasks, check_readable, make_processing
from .infotext import parse_infotext

if TYPE_CHECKING:
    from .checkpoint import StableDiffusionModel

IMAGE, SEED, MASK, OUTPUT = "image", "seed", "mask", "output"
REQUIRED_COLUMNS = (IMAGE, SEED)
PATH_COLUMNS = (IMAGE, MASK, "latent_mask")  # file cells, relative to the manifest's folder
# The results table, one line per output image (a failed row: one line, no path):
#   row      the manifest row (0-based record number, as in the output names)
#   path     the PNG written or found ("" when the row failed before one was made)
#   seed     the image's seed (its infotext's "Seed" for a file found finished; "" if unknown)
#   infotext the A1111 "parameters" text in the PNG
#   sha256   hex SHA-256 of the PNG file's bytes
#   error    "" or one line saying what was wrong with the row (the other columns then empty but row, seed)
#   status   written (by this run), skipped (existed: finished before, or by a concurrent run) or error
#   seconds  wall-clock seconds this run spent on the row (load, sampling, encoding; the same on each of its
#            images); "" for skipped rows
#   worker   host:pid of the process that ran the row ("" for skipped rows)
RESULT_COLUMNS = ("row", "path", "seed", "infotext", "sha256", "error", "status", "seconds", "worker")


# ---------------------------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Row:
    """One manifest record: `index` (0-based record number), `cells` {column: text} ("" = not set; image, mask and
    latent_mask hold absolute paths once read by `read_manifest`), `labels` {column: how error messages name the
    cell} (default "row <index> <column>"; the folder batch uses its flags, e.g. "--input-dir a.png")."""

    index: int
    cells: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)

    def label(self, column: str) -> str:
        return self.labels.get(column, f"row {self.index} {column}")


@dataclass(frozen=True)
class Job:
    """A row made ready to run: its files, its values ({field: value} of the flag table, the run's values with the
    row's cells over them) and its output files."""

    row: Row
    image: Path
    mask: Path | None
    values: dict[str, Any]
    outputs: tuple[Path, ...]


@dataclass(frozen=True)
class Result:
    """One line of the results table (`RESULT_COLUMNS`)."""

    row: int
    path: str = ""
    seed: int | None = None
    infotext: str = ""
    sha256: str = ""
    error: str = ""
    status: str = "written"
    seconds: float | None = None
    worker: str = ""

    def as_cells(self) -> dict[str, str]:
        cells = {c: getattr(self, c) for c in RESULT_COLUMNS}
        cells["seed"] = "" if self.seed is None else str(self.seed)
        cells["seconds"] = "" if self.seconds is None else f"{self.seconds:.3f}"
        return {k: str(v) for k, v in cells.items()}

    @classmethod
    def from_cells(cls, cells: Mapping[str, str]) -> Result:
        seed, seconds = cells.get("seed", ""), cells.get("seconds", "")
        return cls(row=int(cells["row"]), path=cells.get("path", ""), seed=int(seed) if seed else None,
                   infotext=cells.get("infotext", ""), sha256=cells.get("sha256", ""), error=cells.get("error", ""),
                   status=cells.get("status", ""), seconds=float(seconds) if seconds else None,
                   worker=cells.get("worker", ""))


def column_flags() -> dict[str, Flag]:
    """{manifest column: its flag} for every img2img field and option (the CLI's flag table,
    `sdcore.cli.flags.processing_flags`): the field name, and for options also the name without "opts."."""
    flags = processing_flags(COMMAND)
    columns = {f.field: f for f in flags}
    for f in flags:
        if f.is_option and f.field[5:] not in columns:
            columns[f.field[5:]] = f
    return columns


def check_columns(columns: Iterable[str], source: str) -> None:
    """UsageError for a missing required column or an unknown one (`source` names the manifest)."""
    columns = list(columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise UsageError(f"{source}: no {' and no '.join(map(repr, missing))} column; a manifest needs "
                         f"{', '.join(REQUIRED_COLUMNS)} (and may have {MASK}, {OUTPUT} and img2img fields)")
    known = set(column_flags()) | {IMAGE, SEED, MASK, OUTPUT}
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise UsageError(f"{source}: unknown column {unknown[0]!r}; columns are {', '.join(REQUIRED_COLUMNS)}, "
                         f"{MASK}, {OUTPUT} and img2img field names (prompt, denoising_strength, steps, ...; "
                         "see `sdcore img2img --help`, flag names with _ for -)")


def _cell_text(value: Any) -> str:
    """A Parquet value as manifest text (None and NaN: not set)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bytes):
        raise TypeError("binary cells are not supported")
    return str(value)


def read_manifest(path: Path) -> list[Row]:
    """The rows of a CSV (UTF-8, header line, any extension but .parquet/.pq) or Parquet manifest.

    Columns and their meaning: see the module docstring (`check_columns`). File cells (image, mask, latent_mask)
    are made absolute, relative to the manifest's folder. Raises UsageError for an unreadable file, a missing or
    unknown column, a repeated column, a record with more cells than the header, or two rows with the same `output`.
    Parquet needs pyarrow (UsageError otherwise).
    """
    arg = f"manifest {path}"
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            try:
                import pyarrow.parquet as pq  # lazy: optional (the ray extra brings it); CSV needs no pyarrow
            except ImportError:
                raise UsageError(f"{arg}: reading Parquet needs pyarrow (pip install 'sdcore[ray]' or pyarrow)") \
                    from None
            table = pq.read_table(path)
            columns = list(table.column_names)
            records = [{k: _cell_text(v) for k, v in r.items()} for r in table.to_pylist()]
        else:
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                columns = next(reader, None)
                if columns is None:
                    raise UsageError(f"{arg}: empty file (a header line is needed: image,seed,...)")
                columns = [c.strip() for c in columns]
                records = []
                for line in reader:
                    if not line:
                        continue
                    if len(line) > len(columns):
                        raise UsageError(f"{arg}: line {reader.line_num}: {len(line)} cells, but the header has "
                                         f"{len(columns)} columns")
                    records.append(dict(zip(columns, line + [""] * (len(columns) - len(line)))))
    except (OSError, UnicodeDecodeError, csv.Error, TypeError) as e:
        raise UsageError(f"{arg}: cannot read ({e.__class__.__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own ArrowInvalid etc. for a broken Parquet file
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{arg}: cannot read ({e.__class__.__name__}: {e})") from e
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise UsageError(f"{arg}: column {repeated[0]!r} appears twice")
    check_columns(columns, arg)
    base = path.absolute().parent
    rows = []
    for i, record in enumerate(records):
        cells = dict(record)
        for c in PATH_COLUMNS:
            if cells.get(c):
                cells[c] = str(base / cells[c])
        rows.append(Row(i, cells))
    _check_unique_outputs(rows, arg)
    return rows


def _check_unique_outputs(rows: list[Row], source: str) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        name = row.cells.get(OUTPUT, "")
        if name:
            if name in seen:
                raise UsageError(f"{source}: output {name!r} in rows {seen[name]} and {row.index}")
            seen[name] = row.index


def manifest_from_folders(input_dir: Path, mask_dir: Path | None, output_dir: Path | None,
                          n_images: int) -> list[Row]:
    """The folder batch (`sdcore img2img --input-dir DIR [--mask-dir MASKS] --output-dir OUT`) as manifest rows.

    One row per image of `input_dir` (sorted by name, `sdcore.cli.jobs.batch_tasks`), with its mask
    `mask_dir/<stem>.*` (a mask folder holding one image: that image for every row) and `output` = the stem, so
    the outputs are OUT/<stem>.png (OUT/<stem>-<k>.png for k < n_images, n_images = batch_size * n_iter), as
    before. No seed cell: every row takes the run's seed (-1: a random one per row), as before. Messages name the
    flags ("--input-dir a.png", "--mask-dir a.png"). Raises UsageError as `batch_tasks` (missing or ambiguous mask,
    empty folder, output folder = input folder).
    """
    rows = []
    for i, task in enumerate(batch_tasks(input_dir, mask_dir, output_dir, n_images)):
        cells = {IMAGE: str(task.init), MASK: str(task.mask) if task.mask else "", OUTPUT: task.init.stem}
        labels = {IMAGE: f"--input-dir {task.init.name}", "latent_mask": "--latent-mask"}
        if task.mask is not None:
            labels[MASK] = f"--mask-dir {task.mask.name}"
        rows.append(Row(i, cells, labels))
    return rows


def default_values() -> dict[str, Any]:
    """{field: value} of every img2img flag at its default (what `resolve_values` gives with no flags)."""
    return {f.field: field_default(f, COMMAND) for f in processing_flags(COMMAND)}


def _output_name(name: str, label: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise UsageError(f"{label}: {name!r}; must be a file name without folder, not starting with '.'")
    return name


@functools.lru_cache(maxsize=1 << 16)
def _parse_cell(flag: Flag, text: str) -> Any:
    """A cell's value, parsed and checked by its flag; UsageError saying what is wrong. Cached: a manifest repeats
    its sampler names and numbers, and the checks (sampler lookup, ...) cost more than the parse."""
    if flag.kind is Path:
        value: Any = Path(text)
    else:
        try:
            value = flag.parse(text)
        except ValueError as e:
            raise UsageError(f"{text!r} is not a valid {flag.flag} ({e})") from None
    problem = flag.check(value) if flag.check is not None else None
    if problem:
        raise UsageError(f"{value!r}; {problem}")
    return value


def prepare(row: Row, values: Mapping[str, Any], output_dir: Path | None, columns: Mapping[str, Flag] | None = None
            ) -> Job:
    """The job of a row: the run's `values` with the row's cells parsed and checked over them, and its outputs in
    `output_dir` (none when it is None: --explain without an output folder).

    Raises UsageError naming the row and column for a bad cell (a value its flag refuses, a missing image or
    seed, a bad output name); files are not opened here.
    """
    columns = column_flags() if columns is None else columns
    merged = dict(values)
    given: set[str] = set()
    for column, text in row.cells.items():
        if column in (IMAGE, OUTPUT) or text == "":
            continue
        flag = columns.get(column)
        if flag is None:
            raise UsageError(f"{row.label(column)}: unknown column")
        try:
            value = _parse_cell(flag, text)
        except UsageError as e:
            raise UsageError(f"{row.label(column)}: {e}") from None
        merged[flag.field] = value
        given.add(flag.field)
    if "mask_blur" in given and given & {"mask_blur_x", "mask_blur_y"}:
        raise UsageError(f"{row.label('mask_blur')}: sets both axes; give it or mask_blur_x / mask_blur_y, not both")
    if "mask_blur" in given:
        merged["mask_blur_x"] = merged["mask_blur_y"] = merged["mask_blur"]
    elif given & {"mask_blur_x", "mask_blur_y"}:
        merged["mask_blur"] = None  # the row's axes win over the run's --mask-blur
    smin, smax = merged.get("opts.sigma_min"), merged.get("opts.sigma_max")
    if smin and smax and smin >= smax:
        raise UsageError(f"{row.label('opts.sigma_min')}: {smin}; must be smaller than sigma_max {smax}")
    image = row.cells.get(IMAGE, "")
    if not image:
        raise UsageError(f"{row.label(IMAGE)}: empty; every row needs an init image file")
    name = row.cells.get(OUTPUT, "")
    if name:
        name = _output_name(name, row.label(OUTPUT))
    else:
        if SEED not in given or merged["seed"] < 0:
            raise UsageError(f"{row.label(SEED)}: {row.cells.get(SEED, '')!r}; must be an integer in [0, 2**63) "
                             "(the output name is made from it, so a re-run finds it)")
        name = f"{row.index:05d}-{Path(image).stem}-{merged['seed']}"
    n_images = merged["batch_size"] * merged["n_iter"]
    names = [f"{name}.png"] if n_images == 1 else [f"{name}-{k}.png" for k in range(n_images)]
    mask = merged.get("mask")
    outputs = () if output_dir is None else tuple(output_dir / file_name for file_name in names)
    return Job(row, Path(image), Path(mask) if mask else None, merged, outputs)


# ---------------------------------------------------------------------------------------------------------------
# Running one row (both engines)


def open_inputs(job: Job):
    """(init, mask, latent mask) images of a job; UsageError naming the cell (or flag) for an unreadable file or a
    mask whose size differs from the image's (the messages of the folder batch for its rows)."""
    init = open_image(job.image, job.row.label(IMAGE))
    mask = open_image(job.mask, job.row.label(MASK)) if job.mask is not None else None
    if mask is not None and mask.size != init.size:
        raise UsageError(f"{job.row.label(MASK)}: size {mask.size[0]}x{mask.size[1]} differs from the init image's "
                         f"{init.size[0]}x{init.size[1]} ({job.image.name})")
    latent = job.values.get("latent_mask")
    latent_mask = open_image(latent, job.row.label("latent_mask")) if latent else None
    return init, mask, latent_mask


def png_bytes(image: Image.Image, infotext: str) -> bytes:
    """The PNG file of an output: the image with the A1111 "parameters" text chunk (the CLI's bytes exactly)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _png_writer(data: bytes) -> Callable[[Path], None]:
    """write(tmp) for `sdcore.images.write_new_file` (which flushes it to the disk and links it into place)."""
    return lambda tmp: tmp.write_bytes(data)


def existing_result(row: int, path: Path, known: Mapping[str, Result] | None = None) -> Result:
    """The results line of an output found on disk: from `known` (the previous table, by path) if it has one,
    else the file's sha256, infotext and seed read back."""
    prev = (known or {}).get(str(path))
    if prev is not None and prev.sha256 and not prev.error:
        return dataclasses.replace(prev, row=row, status="skipped", seconds=None, worker="")
    data = path.read_bytes()
    text, seed = "", None
    try:
        with Image.open(io.BytesIO(data)) as im:
            text = im.text.get("parameters", "") if hasattr(im, "text") else ""
        seed_text = parse_infotext(text).get("Seed", "") if text else ""
        seed = int(seed_text) if seed_text.lstrip("-").isdigit() else None
    except Exception:  # noqa: BLE001 - an unreadable PNG is still a finished output; its hash says what it is
        pass
    return Result(row, str(path), seed, text, hashlib.sha256(data).hexdigest(), status="skipped")


def error_text(e: BaseException, row: int) -> str:
    """One line for the results table: a UsageError's message (it names the row's cell), else "row N: " and the
    exception (its class unless a ValueError, whose messages name the value)."""
    text = " ".join(str(e).split())
    if isinstance(e, UsageError):
        return text
    return f"row {row}: {text}" if type(e) is ValueError and text else f"row {row}: {e.__class__.__name__}: {text}"


def run_job(sd: StableDiffusionModel, job: Job, worker: str = "", known: Mapping[str, Result] | None = None
            ) -> list[Result]:
    """Run one job and write its missing outputs (never overwriting); its results lines.

    A job whose outputs all exist is not run (status skipped). Errors propagate (UsageError for its files,
    ValueError from processing's checks, anything the model raises); `run_row` turns them into a results line.
    """
    from .images import write_new_file  # lazy: sdcore.images imports torch (see the module docstring)
    from .processing import process_images  # lazy: imports torch

    if all(p.exists() for p in job.outputs):
        return [existing_result(job.row.index, p, known) for p in job.outputs]
    start = time.perf_counter()
    p = make_processing(sd, job.values, COMMAND, *open_inputs(job), outdir=None)
    _check_processing(p)
    processed = process_images(p, disable_progress=True)
    encoded = [png_bytes(image, text) for image, text in zip(processed.images, processed.infotexts)]
    seconds = time.perf_counter() - start
    job.outputs[0].parent.mkdir(parents=True, exist_ok=True)
    results = []
    for path, data, text, seed in zip(job.outputs, encoded, processed.infotexts, processed.seeds):
        try:
            write_new_file(path, _png_writer(data))
        except FileExistsError:  # finished before (a partly done row) or meanwhile by a concurrent run: kept
            results.append(existing_result(job.row.index, path, known))
            continue
        results.append(Result(job.row.index, str(path), seed, text, hashlib.sha256(data).hexdigest(),
                              seconds=seconds, worker=worker))
    return results


def run_row(sd: StableDiffusionModel, row: Row, values: Mapping[str, Any], output_dir: Path, worker: str = "",
            columns: Mapping[str, Flag] | None = None) -> list[Result]:
    """`prepare` and `run_job` one row; any Exception becomes the row's error line (status error), so the other
    rows go on. KeyboardInterrupt and SystemExit propagate."""
    try:
        return run_job(sd, prepare(row, values, output_dir, columns), worker)
    except Exception as e:  # noqa: BLE001 - a bad row is recorded, whatever went wrong in it
        seed = row.cells.get(SEED, "")
        return [Result(row.index, seed=int(seed) if seed.isdigit() else None, error=error_text(e, row.index),
                       status="error", worker=worker)]


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------------------------------------------------------
# Results table


def write_replacing(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: a temporary file in the same folder, fsync, rename, fsync of the
    folder. Readers see the old or the new file, never a part; an interrupted write leaves the old one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the rename is done, only not yet durable
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def results_csv(results: Iterable[Result]) -> bytes:
    """The results table as CSV bytes (UTF-8, header `RESULT_COLUMNS`, multi-line infotexts quoted)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow(r.as_cells())
    return buffer.getvalue().encode("utf-8")


def read_results(path: Path) -> list[Result]:
    """A results table written by `write_replacing(results_csv(...))`; [] if there is none or it is unreadable."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [Result.from_cells(cells) for cells in csv.DictReader(f)]
    except (OSError, ValueError, KeyError, csv.Error):
        return []


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class ModelSpec:
    """How to load the checkpoint (each Ray actor loads its own copy): `load_checkpoint(ckpt, device, dtype, vae=,
    prediction=)`, dtype a torch dtype name ("float32", "float16", "bfloat16")."""

    ckpt: Path = DEFAULT_CKPT
    device: str = "cpu"
    dtype: str = "float32"
    vae: Path | None = None
    prediction: str | None = None

    def load(self) -> StableDiffusionModel:
        import torch  # lazy: see the module docstring

        from .checkpoint import load_checkpoint  # lazy: imports torch

        return load_checkpoint(self.ckpt, device=self.device, dtype=getattr(torch, self.dtype), vae=self.vae,
                               prediction=self.prediction)


@dataclass(frozen=True)
class RayOptions:
    """The Ray engine's settings. `address`: None = a running cluster named by RAY_ADDRESS, else start a local
    instance; "auto" = the cluster this node belongs to (`ray start`); "ray://host:10001" = Ray Client.
    `workers`: actors (each loads the checkpoint once); `cpus_per_worker` / `gpus_per_worker`: Ray resources
    reserved per actor (a GPU actor should use ModelSpec(device="cuda"); Ray sets CUDA_VISIBLE_DEVICES for it);
    `threads_per_worker`: torch intra-op threads per actor (default: cpus_per_worker, at least 1);
    `rows_per_batch`: rows per `map_batches` call (each row is still its own job; larger batches only cut Ray's
    per-call overhead, smaller ones spread a short manifest over the actors)."""

    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None
    rows_per_batch: int = 1

    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


def run_manifest(rows: list[Row], model: StableDiffusionModel | ModelSpec, output_dir: Path | None,
                 values: Mapping[str, Any] | None = None, *, engine: str = "local", strict: bool = False,
                 explain: bool = False, results_name: str | None = RESULTS_NAME, echo: bool = True,
                 skip_lines: bool = True, ray_options: RayOptions | None = None, checkpoint_seconds: float = 300.0,
                 on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Run the rows (a manifest's, or the folder batch's): each row's missing outputs are made and written to
    `output_dir`; rows whose outputs all exist are skipped. Returns the results lines (`Result`), sorted by row.

    model: a loaded model (local engine), or a ModelSpec (loaded only if some row is to be run; each Ray actor
      loads its own).
    values: the run's {field: value} (`resolve_values` of the command line; default `default_values()`); each
      row's cells override them.
    engine: "local" (this process) or "ray" (`ray_options`; needs the ray extra and a ModelSpec).
    strict: the folder batch's rule: every row to run is checked (cells, files, processing values) before the
      first file is written and the first problem raises (UsageError or ValueError, nothing written); errors
      while running propagate. Otherwise a bad row is recorded with its error and the others go on.
    explain: print each row's plan (`sdcore.cli.explain`) instead of running; writes nothing. Needs a local model;
      output_dir may then be None (the plans name no outputs).
    results_name: the results table's file name in output_dir, None = none.
    echo: print each written path (stdout), "skip: ..." and "error: ..." lines and a progress bar (stderr).
    skip_lines: with echo, print "skip: <image>: <outputs> exist" for the rows found done (the command line's
      `jobs.prepare_run` prints them itself).
    checkpoint_seconds: also write the results table this often during the run (0: only at the end).
    on_result: called with each results line of a row that is run or fails, as it arrives (progress, tests).
    Raises UsageError for rows with unknown columns or repeated output names, and as `strict` says; ValueError
    for a bad engine; ImportError (as UsageError) when Ray is asked for but not installed.
    """
    if engine not in ("local", "ray"):
        raise UsageError(f"--engine: {engine!r}; allowed: 'local', 'ray'")
    if engine == "ray" and (strict or explain or not isinstance(model, ModelSpec)):
        raise ValueError("engine 'ray' needs a ModelSpec (each actor loads the checkpoint) and no strict/explain")
    values = default_values() if values is None else dict(values)
    columns = column_flags()
    for row in rows:
        unknown = [c for c in row.cells if c not in columns and c not in (IMAGE, SEED, MASK, OUTPUT)]
        if unknown:
            check_columns([*REQUIRED_COLUMNS, *unknown], f"row {row.index}")
    _check_unique_outputs(rows, "rows")
    if output_dir is None and not explain:
        raise ValueError("output_dir: None; only --explain runs without an output folder")
    if engine == "ray":
        output_dir = output_dir.absolute()  # the actors run elsewhere; the table's paths are then absolute too
    results_path = output_dir / results_name if results_name and output_dir is not None else None
    known = {r.path: r for r in read_results(results_path)} if results_path is not None else {}

    # Which rows are done: the output folder is listed once (fast on network filesystems), not stat'ed per row.
    existing = set(os.listdir(output_dir)) if output_dir is not None and output_dir.is_dir() else set()
    done: dict[int, list[Result]] = {}
    errors: dict[int, list[Result]] = {}
    jobs: list[Job] = []
    for row in rows:
        try:
            job = prepare(row, values, output_dir, columns)
        except UsageError as e:
            if strict:
                raise
            errors[row.index] = [Result(row.index, error=error_text(e, row.index), status="error")]
            continue
        if not explain and all(p.name in existing for p in job.outputs):
            done[row.index] = [existing_result(row.index, p, known) for p in job.outputs]
            if echo and skip_lines:
                print(f"skip: {job.image.name}: {', '.join(str(p) for p in job.outputs)} exist", file=sys.stderr)
        else:
            jobs.append(job)

    # row -> {output path ("" for an error line): its line}
    collected: dict[int, dict[str, Result]] = {i: {r.path: r for r in rs} for i, rs in done.items()}
    last_write = time.monotonic()

    def ordered() -> list[Result]:
        lines = []
        for i in sorted(collected):
            row = collected[i]
            good = [r for r in row.values() if r.status != "error"]
            lines += sorted(good, key=lambda r: r.path) if good else list(row.values())
        return lines

    def write_table() -> None:
        if results_path is None or explain or not collected:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        write_replacing(results_path, results_csv(ordered()))

    def receive(results: list[Result]) -> None:
        nonlocal last_write
        for r in results:
            row = collected.setdefault(r.row, {})
            previous = row.get(r.path)
            # A Ray retry of a block can return a row twice (first written, then found existing): keep "written".
            if previous is None or RANK[r.status] >= RANK[previous.status]:
                row[r.path] = r
            if echo and r.status == "written":
                print(r.path)
            elif echo and r.status == "skipped":  # written meanwhile by another run on the same folder: kept
                print(f"skip: {r.path} exists", file=sys.stderr)
            elif echo and r.status == "error":
                print(f"error: {r.error}", file=sys.stderr)
            if on_result is not None:
                on_result(r)
        if checkpoint_seconds and time.monotonic() - last_write > checkpoint_seconds:
            write_table()
            last_write = time.monotonic()

    for rs in errors.values():
        receive(rs)
    try:
        if jobs or explain:
            if engine == "ray":
                _run_ray(jobs, model, values, output_dir, ray_options or RayOptions(), receive, echo)
            else:
                _run_local(jobs, model, output_dir, strict, explain, echo, receive, known)
    finally:
        write_table()
    return ordered()


RANK = {"error": 0, "skipped": 1, "written": 2}


def _run_local(jobs: list[Job], model, output_dir: Path, strict: bool, explain: bool, echo: bool,
               receive: Callable[[list[Result]], None], known: Mapping[str, Result]) -> None:
    sd = model.load() if isinstance(model, ModelSpec) else model
    if strict or explain:
        # Everything that can be checked is checked for every row before the first file is written.
        for job in jobs:
            _check_processing(make_processing(sd, job.values, COMMAND, *open_inputs(job)))
    if explain:
        from .cli.explain import explain as explain_job  # lazy: imports torch

        for job in jobs:
            print(explain_job(sd, job.values, COMMAND, Task(job.image, job.mask, list(job.outputs), batch=True)))
        return
    worker = _worker_name()
    for job in tqdm(jobs, desc="rows", unit="row", disable=None if echo and len(jobs) > 1 else True):
        if strict:
            receive(run_job(sd, job, worker, known))
            continue
        try:
            receive(run_job(sd, job, worker, known))
        except Exception as e:  # noqa: BLE001 - a bad row is recorded, whatever went wrong in it
            receive([Result(job.row.index, seed=job.values.get("seed"), error=error_text(e, job.row.index),
                            status="error", worker=worker)])


# ---------------------------------------------------------------------------------------------------------------
# Ray


class RayRowWorker:
    """The `map_batches` actor: loads the checkpoint once, then runs batches of rows (`run_row`, the local
    engine's per-row code) and writes their PNGs. A batch has columns row (int), cells and labels (JSON objects);
    it returns the results lines as columns of strings (`RESULT_COLUMNS`), never images."""

    def __init__(self, model: ModelSpec, values: dict[str, Any], output_dir: str, threads: int):
        import torch  # lazy: see the module docstring

        torch.set_num_threads(threads)
        self.sd = model.load()
        self.values = values
        self.output_dir = Path(output_dir)
        self.columns = column_flags()
        self.worker = _worker_name()

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        results: list[Result] = []
        for index, cells, labels in zip(batch["row"], batch["cells"], batch["labels"]):
            row = Row(int(index), json.loads(cells), json.loads(labels))
            results += run_row(self.sd, row, self.values, self.output_dir, self.worker, self.columns)
        out = {c: [r.as_cells()[c] for r in results] for c in RESULT_COLUMNS}
        out["row"] = [r.row for r in results]
        return out


def _import_ray():
    try:
        import ray  # lazy: the optional extra sdcore[ray]
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--engine ray: Ray is not installed; pip install 'sdcore[ray]' (ray[data] >= 2.51)") \
            from None
    return ray


def _absolute_paths(cells: Mapping[str, str]) -> dict[str, str]:
    """The cells with their files (image, mask, latent_mask) made absolute against this process's folder."""
    return {k: os.path.abspath(v) if k in PATH_COLUMNS and v else v for k, v in cells.items()}


def _run_ray(jobs: list[Job], model: ModelSpec, values: dict[str, Any], output_dir: Path, options: RayOptions,
             receive: Callable[[list[Result]], None], echo: bool) -> None:
    ray = _import_ray()
    import pyarrow as pa  # lazy: comes with ray[data]

    if options.workers < 1 or options.rows_per_batch < 1:
        raise UsageError("--workers and --rows-per-batch must be >= 1")
    # Actors run in other folders (and on other nodes): every path they get is absolute.
    model = dataclasses.replace(model, ckpt=Path(model.ckpt).absolute(),
                                vae=None if model.vae is None else Path(model.vae).absolute())
    values = {k: v.absolute() if isinstance(v, Path) else v for k, v in values.items()}
    output_dir = output_dir.absolute()
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, log_to_driver=echo)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if echo and cpus < options.workers * options.cpus_per_worker:
            print(f"sdcore: note: the cluster has {cpus:g} CPUs; {options.workers} workers x "
                  f"{options.cpus_per_worker:g} CPUs wait for more", file=sys.stderr)
        # Blocks of whole batches, at most 64 per actor: enough to balance the actors, few objects for huge runs.
        n = len(jobs)
        per_block = options.rows_per_batch * max(1, math.ceil(n / (options.rows_per_batch * 64 * options.workers)))
        blocks = []
        for start in range(0, n, per_block):
            part = jobs[start:start + per_block]
            blocks.append(pa.table({
                "row": pa.array([j.row.index for j in part], pa.int64()),
                "cells": pa.array([json.dumps(_absolute_paths(j.row.cells)) for j in part], pa.string()),
                "labels": pa.array([json.dumps(dict(j.row.labels)) for j in part], pa.string())}))
        gpus = {"num_gpus": options.gpus_per_worker} if options.gpus_per_worker else {}
        dataset = ray.data.from_arrow(blocks).map_batches(
            RayRowWorker, batch_size=options.rows_per_batch, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.workers), num_cpus=options.cpus_per_worker, **gpus,
            fn_constructor_kwargs={"model": model, "values": values, "output_dir": str(output_dir),
                                   "threads": options.threads()})
        batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            for batch in batches:
                receive([Result.from_cells({c: "" if batch[c][i] is None else str(batch[c][i])
                                            for c in RESULT_COLUMNS}) for i in range(len(batch["row"]))])
        finally:
            # Stops the pipeline and its actors now (not when garbage-collected) if the run is interrupted.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# Command line: `sdcore batch`

def run(args: argparse.Namespace) -> int:
    """`sdcore batch`: 0 when every row is done, 1 when some row failed (its error is in the results table), and
    UsageError (exit 2 in `sdcore.cli.main`) for a bad command line or manifest, before anything is written."""
    # The rows' defaults are the img2img command's (the flag table keys its defaults by command name).
    values, unused = resolve_values(argparse.Namespace(**{**vars(args), "command": COMMAND}),
                                    processing_flags(COMMAND))
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UsageError(f"--output-dir: {args.output_dir} exists and is not a folder")
    if not args.results or "/" in args.results or args.results.startswith("."):
        raise UsageError(f"--results: {args.results!r}; a file name in --output-dir")
    for flag, value in (("--workers", args.workers), ("--rows-per-batch", args.rows_per_batch),
                        ("--threads", args.threads or 1)):
        if value < 1:
            raise UsageError(f"{flag}: {value}; must be >= 1")
    for flag, value in (("--cpus-per-worker", args.cpus_per_worker), ("--gpus-per-worker", args.gpus_per_worker)):
        if not value >= 0 or math.isinf(value):
            raise UsageError(f"{flag}: {value}; must be a finite number >= 0")
    if args.ray_address is not None and args.engine != "ray":
        raise UsageError("--ray-address: only with --engine ray")
    if args.engine == "ray":
        _import_ray()
    check_readable(args.ckpt, "--ckpt")
    if args.vae is not None:
        check_readable(args.vae, "--vae")
    rows = read_manifest(args.manifest)
    if args.engine == "local" and args.threads:
        import torch  # lazy: see the module docstring

        torch.set_num_threads(args.threads)
    if unused:
        print(f"sdcore: note: infotext keys not used: {', '.join(unused)}", file=sys.stderr)
    spec = ModelSpec(args.ckpt, args.device, args.dtype, args.vae, args.prediction)
    ray_options = RayOptions(args.ray_address, args.workers, args.cpus_per_worker, args.gpus_per_worker,
                             args.threads, args.rows_per_batch)
    results = run_manifest(rows, spec, args.output_dir, values, engine=args.engine, results_name=args.results,
                           ray_options=ray_options)
    failed = sorted({r.row for r in results if r.status == "error"})
    if failed:
        print(f"sdcore: {len(failed)} of {len(rows)} rows failed (rows {', '.join(map(str, failed[:10]))}"
              f"{', ...' if len(failed) > 10 else ''}); see {args.output_dir / args.results}", file=sys.stderr)
        return 1
    return 0
