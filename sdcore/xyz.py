"""`sdcore xyz`: A1111's X/Y/Z plot, a labelled grid of images over up to three axes of job values.

Reference: A1111 v1.10.1 `scripts/xyz_grid.py` (`Script.run`, `draw_xyz_grid`, `process_axis`) and
`modules/images.py` (`image_grid`, `draw_grid_annotations`), read for their rules; the code here is sdcore's own.

What a plot is. Each axis has a type (what it changes: sampler, steps, CFG scale, ...) and a list of values. Every
combination (x, y, z) is one cell: a copy of the job with the three values applied, run through
`processing.process_images` exactly as a single run (the same seed for every cell unless the seed is an axis), so a
cell is byte for byte the image `sdcore img2img` gives with those values. The cells of one z value make a grid with
the x labels on top and the y labels on the left; several z values make several grids side by side, each titled
with its z label (A1111's main grid).

Axis values (A1111 `process_axis`): a comma-separated list read as one CSV line (so `"a, b",c` is two values), each
item stripped. Integer and float axes also take ranges, expanded in place:
    `1-5` -> 1, 2, 3, 4, 5            `1-10 (+3)` -> 1, 4, 7, 10        `10-1 (-3)` -> 10, 7, 4, 1
    `1-10 [4]` -> 1, 4, 7, 10 (4 values, np.linspace, int() truncates: `0-10 [4]` -> 0, 3, 6, 10)
    `0.25-1 (+0.25)` -> 0.25, 0.5, 0.75, 1.0                            `0-1 [3]` -> 0.0, 0.5, 1.0
The whole list may also be written in brackets, `[Euler a, DPM++ 2M]` (sdcore; not for Prompt S/R, whose values
may be prompt-editing syntax). Differences from A1111, where its rule is an accident: a range with a negative step
ends at its end value inclusive (A1111's `range(a, b + 1, step)` stops above b + 1: `10-1 (-1)` ends at 3), a
float range never overshoots its end (A1111's `np.arange(a, b + step, step)` gives 0.1, 0.2, 0.3, 0.4 for
`0.1-0.3 (+0.1)`), an empty range or a count below 1 is an error rather than no cells, and a step without a sign,
`(3)`, is accepted.

Prompt S/R (A1111): the first value is the search string, found in the prompt or the negative prompt (else an
error); each value replaces it in both, the first value itself giving the unchanged prompt.

Equal-NFE mode (`equal_nfe=True`, sdcore's): compare samplers at the same number of model calls (NFE, function
evaluations of the guided denoiser, each one UNet batch of cond + uncond) rather than the same steps. The steps
value of a cell (its steps axis value, else the job's steps) becomes a budget N, and the cell runs with the largest
steps whose run makes at most N model calls, counted on the Plan of a dry run through the real pipeline
(`processing.dry_run`: the same code with a stand-in UNet), so every sampler quirk is counted as it runs: Heun and
DPM2 make 2 calls per step except the last (2s - 1), DPM++ 2M one per step, img2img runs int(strength * s) + 1
steps of an s-step schedule. Each cell is captioned under its image with the steps it ran and its model calls.

Outputs (`run`): the grid PNG, whose "parameters" text is the first cell's infotext plus A1111's "Script",
"X Type", "X Values", ... keys; a JSON sidecar beside it holding every cell's infotext, values, seed, steps and
model calls; optionally each cell's PNG (`--save-cells`). All written atomically, never overwriting
(`images.write_new_file`), and only after every cell has run.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from tqdm.auto import tqdm

from . import images, infotext, rng
from .processing import StableDiffusionProcessing, dry_run, process_images
from .sampling.blends import BLENDS
from .sampling.samplers import find_sampler
from .sampling.schedules import find_scheduler

SCRIPT_TITLE = "X/Y/Z plot"  # A1111's infotext "Script" value
GRID_BASENAME = "xyz_grid"  # A1111 saves the grid as <basename>-<NNNN>-<seed>.png
MAX_GRID_PIXELS = 200_000_000  # A1111 option img_max_size_mp (200 megapixels): bigger grids are refused
MAX_STEPS = 10_000  # the --steps flag's limit; the equal-NFE search stops here
MIN_FONT_SIZE = 12  # A1111's font size (w + h) // 25 is 5 px for 64-px cells: unreadable

MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # inpainting_fill 0..3, A1111's labels


# ---------------------------------------------------------------------------------------------------------------
# Axis types


def _check_sampler(value: str) -> None:
    find_sampler(value)


def _check_scheduler(value: str) -> None:
    find_scheduler(value)


def _check_blend(value: str) -> None:
    if value not in BLENDS:
        raise ValueError(f"unknown mask blend {value!r}; allowed: {', '.join(BLENDS)}")


def _between(lo: float, hi: float | None) -> Callable[[Any], None]:
    def check(value):
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"{value!r} is out of range; allowed: [{lo}, {hi if hi is not None else 'inf'}]")
    return check


def _check_seed(value: int) -> None:
    if not -1 <= value < 2 ** 63:
        raise ValueError(f"{value!r} is not a seed; allowed: -1 (random) or an integer in [0, 2**63)")


@dataclass(frozen=True)
class AxisType:
    """What an axis changes.

    `name`: sdcore's name (`--x-type steps`); `label`: A1111's ("Steps"), written to the infotext as "X Type" and
    used in the legend; `kind`: int, float or str (how values parse; int and float take ranges); `field`: the
    processing field set (None: special, see `apply_value`); `prefixed`: the legend reads "Label: value" (A1111
    `format_value_add_label`) rather than the bare value (Sampler, Prompt S/R); `needs`: "init" or "mask" when
    the axis means something only for img2img / inpainting; `check(value)` raises ValueError for a bad value;
    `names`: words accepted for int values ("latent noise" -> 2); `aliases`: other spellings of the type.
    """

    name: str
    label: str
    kind: type
    field: str | None
    prefixed: bool = True
    needs: str | None = None
    check: Callable[[Any], None] | None = None
    names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    def legend(self, value: Any) -> str:
        """The grid label of `value` (A1111 `format_value_add_label` / `format_value`: floats rounded to 8
        digits); "" for the Nothing axis."""
        if self.name == "nothing":
            return ""
        if self.names and isinstance(value, int):
            value = self.names[value]
        if isinstance(value, float):
            value = round(value, 8)
        return f"{self.label}: {value}" if self.prefixed else str(value)


AXIS_TYPES: tuple[AxisType, ...] = (
    AxisType("nothing", "Nothing", str, None, prefixed=False),
    AxisType("seed", "Seed", int, "seed", check=_check_seed),
    AxisType("steps", "Steps", int, "steps", check=_between(1, MAX_STEPS)),
    AxisType("cfg_scale", "CFG Scale", float, "cfg_scale", aliases=("cfg",)),
    AxisType("prompt_sr", "Prompt S/R", str, "prompt", prefixed=False, aliases=("prompt_s/r", "prompt_s_r", "sr")),
    AxisType("sampler", "Sampler", str, "sampler_name", prefixed=False, check=_check_sampler,
             aliases=("sampler_name",)),
    AxisType("scheduler", "Schedule type", str, "scheduler", check=_check_scheduler),
    AxisType("denoising_strength", "Denoising", float, "denoising_strength", needs="init", check=_between(0, 1),
             aliases=("denoising", "strength")),
    AxisType("mask_blur", "Mask blur", int, "mask_blur", needs="mask", check=_between(0, 1024), aliases=("blur",)),
    AxisType("inpainting_fill", "Masked content", int, "inpainting_fill", needs="mask", check=_between(0, 3),
             names=MASKED_CONTENT, aliases=("masked_content", "fill")),
    AxisType("mask_blend", "Mask blend", str, "mask_blend", needs="mask", check=_check_blend, aliases=("blend",)),
)


def _normal(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def find_axis_type(name: str) -> AxisType:
    """The axis type called `name`: sdcore's name, A1111's label or an alias, case-insensitive, with spaces and
    dashes read as "_" ("CFG Scale", "cfg-scale", "cfg"). Raises ValueError listing the names."""
    key = _normal(name)
    for t in AXIS_TYPES:
        if key in (t.name, _normal(t.label), *t.aliases):
            return t
    raise ValueError(f"unknown axis type {name!r}; allowed: {', '.join(t.name for t in AXIS_TYPES)} "
                     f"(or A1111's labels: {', '.join(repr(t.label) for t in AXIS_TYPES)})")


# ---------------------------------------------------------------------------------------------------------------
# Axis values: A1111's syntax


_INT = r"[+-]?\d+"
_FLOAT = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"


def _range_pattern(number: str) -> re.Pattern:
    """`a-b`, `a-b (+step)` or `a-b [count]` (A1111 `re_range`, `re_range_count` and their float forms)."""
    return re.compile(rf"\s*({number})\s*-\s*({number})\s*(?:\(\s*({number})\s*\)|\[\s*(\d+)\s*\])?\s*")


INT_RANGE = _range_pattern(_INT)
FLOAT_RANGE = _range_pattern(_FLOAT)


def split_values(text: str, brackets: bool = True) -> list[str]:
    """The items of an axis value list: one CSV line (A1111 `csv_string_to_list_strip`; quotes keep commas inside
    a value: `"a, b",c` -> ['a, b', 'c']), each item stripped. With `brackets`, a list written as `[a, b]` is
    read as `a, b`. A line break inside the text is read as CSV does (a new row; its items follow)."""
    text = text.strip()
    if brackets and len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        text = text[1:-1]
    return [item.strip() for row in csv.reader(io.StringIO(text)) for item in row]


def expand_range(item: str, kind: type) -> list[int] | list[float] | None:
    """The values of a range item (`1-5`, `1-10 (+2)`, `1-10 [5]`; int or float), or None when `item` is not a
    range. Raises ValueError for a zero step, an empty range or a count below 1 (see the module docstring for the
    rules and where they differ from A1111)."""
    m = (INT_RANGE if kind is int else FLOAT_RANGE).fullmatch(item)
    if m is None:
        return None
    start, end = kind(m.group(1)), kind(m.group(2))
    if m.group(4) is not None:  # a-b [count]: np.linspace, int() truncates towards zero as A1111's [int(x) ...]
        count = int(m.group(4))
        if count < 1:
            raise ValueError(f"{item!r}: the count in [n] must be at least 1")
        values = np.linspace(start, end, count).tolist()
        return [int(v) for v in values] if kind is int else [float(v) for v in values]
    step = kind(m.group(3)) if m.group(3) is not None else kind(1)
    if step == 0:
        raise ValueError(f"{item!r}: the step must not be 0")
    # k-th value start + k * step for k = 0 .. floor((end - start) / step); the 1e-9 absorbs float rounding in the
    # quotient, so 0.1-0.3 (+0.1) ends at 0.3 (0.2 / 0.1 = 1.9999999999999998).
    last = math.floor((end - start) / step + 1e-9)
    if last < 0:
        raise ValueError(f"{item!r}: empty range (from {start} to {end} in steps of {step}; a descending range "
                         "needs a negative step, e.g. 10-1 (-3))")
    return [start + k * step for k in range(last + 1)]


def _parse_number(item: str, kind: type) -> int | float:
    if kind is int:
        return int(item)
    value = float(item)
    if not math.isfinite(value):
        raise ValueError(f"{item!r} is not a finite number")
    return value


def parse_values(axis_type: AxisType, text: str) -> list[Any]:
    """The values of an axis from its text (A1111 `process_axis` with "Use text inputs"), typed and checked.

    Int and float axes expand ranges (`expand_range`); Masked content also takes its labels ("latent noise");
    -1 on the seed axis stays -1 here (`fix_seeds` draws it). Raises ValueError naming the bad item."""
    if axis_type.name == "nothing":
        return [None]
    items = split_values(text, brackets=axis_type.name != "prompt_sr")
    if not items:
        raise ValueError("no values")
    values: list[Any] = []
    for item in items:
        if axis_type.kind is str:
            values.append(item)
            continue
        if item.lower() in axis_type.names:
            values.append(axis_type.names.index(item.lower()))
            continue
        expanded = expand_range(item, axis_type.kind)
        if expanded is not None:
            values += expanded
            continue
        try:
            values.append(_parse_number(item, axis_type.kind))
        except ValueError:
            what = "an integer" if axis_type.kind is int else "a number"
            names = f", {', '.join(map(repr, axis_type.names))}" if axis_type.names else ""
            raise ValueError(f"{item!r} is not {what}{names} or a range (a-b, a-b (+step), a-b [count])") from None
    for value in values:
        if axis_type.check is not None:
            axis_type.check(value)
    return values


@dataclass(frozen=True)
class Axis:
    """One axis of a plot: its type, its values (typed, ranges expanded) and the text they came from (A1111 writes
    the text to the grid's infotext as "X Values")."""

    type: AxisType
    values: tuple[Any, ...]
    text: str = ""

    @property
    def labels(self) -> list[str]:
        return [self.type.legend(v) for v in self.values]


NOTHING = Axis(AXIS_TYPES[0], (None,), "")


def parse_axis(type_name: str | None, text: str | None, arg: str = "--x") -> Axis:
    """An Axis from a type name and its values text. `arg` ("--x") names the flags in errors: ValueError
    "--x-type: ..." or "--x-values: ..."; a type without values (or values without a type) is an error too."""
    if type_name is None and text is None:
        return NOTHING
    if type_name is None:
        raise ValueError(f"{arg}-values: given without {arg}-type")
    try:
        axis_type = find_axis_type(type_name)
    except ValueError as e:
        raise ValueError(f"{arg}-type: {e}") from None
    if axis_type.name == "nothing":
        return NOTHING
    if text is None:
        raise ValueError(f"{arg}-values: missing for {arg}-type {type_name}")
    try:
        values = parse_values(axis_type, text)
    except ValueError as e:
        raise ValueError(f"{arg}-values: {text!r}: {e}") from None
    if axis_type.name == "prompt_sr" and not values[0]:
        raise ValueError(f"{arg}-values: {text!r}: the first value, the text to search for, is empty")
    return Axis(axis_type, tuple(values), text)


def fix_seeds(axis: Axis, rand=None) -> Axis:
    """The axis with -1 seeds drawn at random once, before any cell runs (A1111 `fix_axis_seeds`), so every cell
    of that row or column shares the seed. Other axes are returned unchanged."""
    if axis.type.name != "seed":
        return axis
    return dataclasses.replace(axis, values=tuple(rng.get_fixed_seed(v, rand) for v in axis.values))


# ---------------------------------------------------------------------------------------------------------------
# Cells


def apply_value(p: StableDiffusionProcessing, axis: Axis, value: Any, arg: str = "--x") -> StableDiffusionProcessing:
    """A copy of job `p` with one axis value applied (A1111 `AxisOption.apply`); `p` is not changed.

    Prompt S/R replaces the axis's first value by `value` in the prompt and the negative prompt (ValueError naming
    `arg`-values when the first value is in neither, A1111's RuntimeError). Mask blur sets both blur axes. Nothing
    changes nothing."""
    t = axis.type
    if t.name == "nothing":
        return p
    if t.name == "prompt_sr":
        search = axis.values[0]
        prompts = [p.prompt] if isinstance(p.prompt, str) else list(p.prompt)
        negatives = [p.negative_prompt] if isinstance(p.negative_prompt, str) else list(p.negative_prompt)
        if not any(search in text for text in prompts + negatives):
            raise ValueError(f"{arg}-values: Prompt S/R did not find {search!r} in the prompt or the negative prompt")
        prompt = [text.replace(search, value) for text in prompts]
        negative = [text.replace(search, value) for text in negatives]
        return dataclasses.replace(p, prompt=prompt[0] if isinstance(p.prompt, str) else prompt,
                                   negative_prompt=negative[0] if isinstance(p.negative_prompt, str) else negative)
    if t.name == "mask_blur":
        return dataclasses.replace(p, mask_blur=value, mask_blur_x=value, mask_blur_y=value)
    return dataclasses.replace(p, **{t.field: value})


def planned_model_calls(p: StableDiffusionProcessing) -> int:
    """Guided-model calls a run of `p` makes (first batch), from the Plan of a dry run (`processing.dry_run`: the
    real pipeline with a stand-in UNet, so the count is the one a real run makes)."""
    return dry_run(p).plan.model_calls


def steps_for_budget(p: StableDiffusionProcessing, budget: int,
                     count: Callable[[StableDiffusionProcessing], int] = planned_model_calls) -> tuple[int, int]:
    """(steps, model calls): the largest steps in [1, MAX_STEPS] whose run of `p` makes at most `budget` model
    calls, and that count (`count(p with steps)`, default `planned_model_calls`).

    The count is taken to grow with the steps (true of every sdcore sampler: checked for 1..24 steps, txt2img and
    img2img, in tests/test_xyz.py), so the search doubles the steps until the budget is exceeded, then bisects.
    Steps counts a sampler cannot run (DPM++ SDE with 1 step: the Brownian tree needs two distinct sigmas; UniPC
    below its order) are skipped at the low end. Raises ValueError when no steps count fits the budget, and for
    DPM adaptive, whose calls depend on the model's outputs.
    """
    if p.resolve_sampler()[0].name == "DPM adaptive":
        raise ValueError("DPM adaptive chooses its own steps (its model calls depend on the model's outputs); it "
                         "has no steps count for a call budget")
    calls_at: dict[int, int] = {}

    def calls(steps: int) -> int:
        if steps not in calls_at:
            calls_at[steps] = count(dataclasses.replace(p, steps=steps))
        return calls_at[steps]

    low, error = None, None
    for steps in range(1, 6):  # the smallest steps count the sampler runs
        try:
            calls(steps)
            low = steps
            break
        except ValueError as e:
            error = e
    if low is None:
        raise ValueError(f"{p.sampler_name}: cannot run with 1 to 5 steps ({error})")
    if calls(low) > budget:
        raise ValueError(f"a budget of {budget} model calls is too small for {p.sampler_name}: {low} step(s) make "
                         f"{calls(low)} calls")
    high = low
    while calls(high) <= budget:  # low fits; find high > low that does not
        if high == MAX_STEPS:
            return high, calls(high)
        low, high = high, min(2 * high, MAX_STEPS)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if calls(mid) <= budget else (low, mid)
    return low, calls(low)


@dataclass(frozen=True)
class Cell:
    """One cell of a plot: its position (ix, iy, iz), its job and, in equal-NFE mode, the model-call `budget` and
    the `steps` chosen for it with the `planned_calls` they make."""

    ix: int
    iy: int
    iz: int
    p: StableDiffusionProcessing
    budget: int | None = None
    planned_calls: int | None = None

    def caption(self) -> list[str]:
        """The lines drawn under the cell in equal-NFE mode: steps run and model calls."""
        return [f"steps {self.p.steps}", f"NFE {self.planned_calls}"]


def make_cells(p: StableDiffusionProcessing, x: Axis, y: Axis, z: Axis, *, equal_nfe: bool = False,
               count: Callable[[StableDiffusionProcessing], int] = planned_model_calls) -> list[Cell]:
    """Every cell's job, in A1111's image order (index ix + iy * len(x) + iz * len(x) * len(y)).

    `p` must have its seeds resolved (A1111 `fix_seed`, `run` does it) so all cells share them. Values apply in
    the order x, y, z (A1111's `cell`). With `equal_nfe`, each cell's steps (the steps axis value or `p.steps`)
    is a model-call budget, replaced by `steps_for_budget` (ValueError naming the cell when nothing fits).
    """
    cells = []
    for iz, vz in enumerate(z.values):
        for iy, vy in enumerate(y.values):
            for ix, vx in enumerate(x.values):
                pc = p
                for axis, value, arg in ((x, vx, "--x"), (y, vy, "--y"), (z, vz, "--z")):
                    pc = apply_value(pc, axis, value, arg)
                if not equal_nfe:
                    cells.append(Cell(ix, iy, iz, pc))
                    continue
                try:
                    steps, planned = steps_for_budget(pc, pc.steps, count)
                except ValueError as e:
                    where = ", ".join(label for label in (x.labels[ix], y.labels[iy], z.labels[iz]) if label)
                    raise ValueError(f"--equal-nfe: cell ({where}): {e}") from None
                cells.append(Cell(ix, iy, iz, dataclasses.replace(pc, steps=steps), pc.steps, planned))
    return cells


# ---------------------------------------------------------------------------------------------------------------
# Drawing: A1111 `image_grid` + `draw_grid_annotations`


def legend_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled default font at `size` px (no font file is read or downloaded)."""
    return ImageFont.load_default(size=size)


def legend_font_size(cell_width: int, cell_height: int) -> int:
    """(w + h) // 25 (A1111 `draw_grid_annotations`), at least MIN_FONT_SIZE."""
    return max((cell_width + cell_height) // 25, MIN_FONT_SIZE)


def wrap(text: str, font, width: float) -> list[str]:
    """Words of `text` packed greedily into lines no wider than `width` px (A1111's `wrap`; a word wider than
    `width` gets a line of its own, later drawn smaller). "" -> []."""
    lines: list[str] = []
    for word in text.split():
        line = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(line) <= width:
            lines[-1] = line
        else:
            lines.append(word)
    return lines


def _fitting_font(line: str, size: int, width: float):
    """The default font at `size`, or smaller until `line` fits `width` (A1111 shrinks a line the same way)."""
    font = legend_font(size)
    while size > 1 and font.getlength(line) > width:
        size -= 1
        font = legend_font(size)
    return font


def _line_height(size: int) -> int:
    ascent, descent = legend_font(size).getmetrics()
    return ascent + descent


def _block_height(lines: Sequence[str], size: int) -> int:
    """Height in px of `lines` drawn at `size` with A1111's line spacing size // 2."""
    return len(lines) * _line_height(size) + max(len(lines) - 1, 0) * (size // 2)


def _draw_block(draw: ImageDraw.ImageDraw, lines: Sequence[str], centre_x: float, top: float, size: int,
                width: float) -> None:
    for line in lines:
        draw.text((centre_x, top), line, fill=(0, 0, 0), font=_fitting_font(line, size, width), anchor="ma")
        top += _line_height(size) + size // 2


@dataclass(frozen=True)
class GridLayout:
    """Where a labelled grid puts things, in px: `cols` x `rows` cells of `cell_width` x `cell_height`, `margin`
    between cells, a `caption_height` band under each cell (0 without captions), `pad_left` for the y labels
    (A1111: 3/4 of a cell width when any y label has text, else 0) and `pad_top` for the x labels (their tallest
    block plus a line spacing above and below; 0 when no x label has text)."""

    cols: int
    rows: int
    cell_width: int
    cell_height: int
    pad_left: int
    pad_top: int
    margin: int = 0
    caption_height: int = 0

    def cell_box(self, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the cell's image in the grid."""
        x0 = self.pad_left + col * (self.cell_width + self.margin)
        y0 = self.pad_top + row * (self.cell_height + self.caption_height + self.margin)
        return x0, y0, x0 + self.cell_width, y0 + self.cell_height

    @property
    def size(self) -> tuple[int, int]:
        return (self.pad_left + self.cols * self.cell_width + (self.cols - 1) * self.margin,
                self.pad_top + self.rows * (self.cell_height + self.caption_height) + (self.rows - 1) * self.margin)


def draw_grid(cells: Sequence[Image.Image], cols: int, rows: int, x_labels: Sequence[str], y_labels: Sequence[str],
              *, margin: int = 0, captions: Sequence[Sequence[str]] | None = None) -> tuple[Image.Image, GridLayout]:
    """The cells (row-major, all one size) on a white grid with `x_labels` centred above the columns and
    `y_labels` left of the rows (A1111 `image_grid(rows=len(y))` then `draw_grid_annotations`), and optional
    caption lines under each cell. Returns (RGB image, its GridLayout); the cells are pasted unchanged.

    Font: Pillow's default at `legend_font_size` px, line spacing half of it; labels wrap at word boundaries to
    the cell width (x) or `pad_left` (y), a word still too wide is drawn smaller. Raises ValueError when the
    counts or the cell sizes do not match."""
    if len(cells) != cols * rows or len(x_labels) != cols or len(y_labels) != rows:
        raise ValueError(f"draw_grid: {len(cells)} cells, {len(x_labels)} x labels, {len(y_labels)} y labels for a "
                         f"{cols} x {rows} grid")
    if captions is not None and len(captions) != len(cells):
        raise ValueError(f"draw_grid: {len(captions)} captions for {len(cells)} cells")
    w, h = cells[0].size
    if any(c.size != (w, h) for c in cells):
        raise ValueError(f"draw_grid: cells differ in size: {sorted({c.size for c in cells})}")
    if margin < 0:
        raise ValueError(f"margin: {margin}; must be >= 0 px")
    size = legend_font_size(w, h)
    spacing = size // 2
    pad_left = w * 3 // 4 if any(label.strip() for label in y_labels) else 0
    font = legend_font(size)
    x_lines = [wrap(label, font, w) for label in x_labels]
    y_lines = [wrap(label, font, pad_left) for label in y_labels]
    top_text = max(_block_height(lines, size) for lines in x_lines)
    pad_top = top_text + 2 * spacing if top_text else 0
    caption_height = 0
    if captions is not None:
        caption_height = max(_block_height(lines, size) for lines in captions) + 2 * spacing
    layout = GridLayout(cols, rows, w, h, pad_left, pad_top, margin, caption_height)
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    for i, cell in enumerate(cells):
        x0, y0, x1, y1 = layout.cell_box(i % cols, i // cols)
        grid.paste(cell.convert("RGB"), (x0, y0))
        if captions is not None:
            _draw_block(draw, captions[i], (x0 + x1) / 2, y1 + spacing, size, w)
    for col, lines in enumerate(x_lines):
        x0, _, x1, _ = layout.cell_box(col, 0)
        _draw_block(draw, lines, (x0 + x1) / 2, (pad_top - _block_height(lines, size)) / 2, size, w)
    for row, lines in enumerate(y_lines):
        _, y0, _, y1 = layout.cell_box(0, row)
        _draw_block(draw, lines, pad_left / 2, (y0 + y1 - _block_height(lines, size)) / 2, size, pad_left)
    return grid, layout


def join_grids(grids: Sequence[Image.Image], titles: Sequence[str]) -> Image.Image:
    """The z sub-grids side by side, each titled on top (A1111: `image_grid(rows=1)` and
    `draw_grid_annotations` with the z labels, font from the sub-grid's size); one untitled grid is returned as is.
    """
    if len(grids) == 1 and not titles[0].strip():
        return grids[0]
    return draw_grid(grids, len(grids), 1, titles, [""])[0]


# ---------------------------------------------------------------------------------------------------------------
# Running a plot


@dataclass
class CellResult:
    """A cell after its run: the cell, its image, infotext and the model calls its Plan records."""

    cell: Cell
    image: Image.Image
    infotext: str
    model_calls: int


@dataclass(frozen=True)
class Plot:
    """A plot ready to run: the job (seeds resolved), the axes (-1 seeds drawn) and every cell (checked)."""

    p: StableDiffusionProcessing
    axes: tuple[Axis, Axis, Axis]
    cells: list[Cell]
    equal_nfe: bool = False


@dataclass
class XYZResult:
    """A finished plot: the grid image and its infotext, the z sub-grids and their layout, every cell's result
    (A1111 order)."""

    grid: Image.Image
    infotext: str
    sub_grids: list[Image.Image]
    layout: GridLayout
    cells: list[CellResult]
    axes: tuple[Axis, Axis, Axis]
    equal_nfe: bool


def grid_params(x: Axis, y: Axis, z: Axis, *, equal_nfe: bool = False) -> dict[str, str]:
    """The keys A1111 adds to the grid's infotext (`Script.run`'s `cell`): "Script", then per axis that is not
    Nothing its "Type", "Values" (the text given) and, for a seed axis, "Fixed Values" (the seeds used); plus
    sdcore's "XYZ equal NFE" in that mode."""
    params = {"Script": SCRIPT_TITLE}
    for name, axis in (("X", x), ("Y", y), ("Z", z)):
        if axis.type.name == "nothing":
            continue
        params[f"{name} Type"] = axis.type.label
        params[f"{name} Values"] = axis.text
        if axis.type.name == "seed":
            params[f"Fixed {name} Values"] = ", ".join(str(v) for v in axis.values)
    if equal_nfe:
        params["XYZ equal NFE"] = "True"
    return params


def add_params(text: str, params: dict[str, Any]) -> str:
    """An infotext with `params` appended to its parameter line (its last line) before "Version", where A1111's
    `create_infotext` puts extra generation parameters added after the run."""
    head, newline, line = text.rpartition("\n")
    marker = line.rfind(", Version: ")
    added = infotext.format_params(params)
    line = f"{line[:marker]}, {added}{line[marker:]}" if marker >= 0 else f"{line}, {added}"
    return f"{head}{newline}{line}"


def run_cells(cells: Sequence[Cell], progress: Callable[[int, int], None] | None = None) -> list[CellResult]:
    """Run every cell with `process_images` (its own seeds, no files saved); `progress(done, total)` after each."""
    results = []
    for k, cell in enumerate(cells):
        processed = process_images(cell.p, disable_progress=True)
        results.append(CellResult(cell, processed.images[0], processed.infotexts[0], processed.plans[0].model_calls))
        if progress is not None:
            progress(k + 1, len(cells))
    return results


def plan_plot(p: StableDiffusionProcessing, x: Axis, y: Axis = NOTHING, z: Axis = NOTHING, *,
              equal_nfe: bool = False) -> Plot:
    """Everything decided before the first cell runs (A1111 `Script.run` up to `draw_xyz_grid`): the job's seed and
    subseed resolved once (-1 -> random, A1111 `fix_seed`) and -1 values of a seed axis too, so the cells share
    them; every cell built (`make_cells`) and validated. `p`: a processing object with batch_size = n_iter = 1
    (one image per cell). Raises ValueError for a bad value or a grid over MAX_GRID_PIXELS."""
    if p.batch_size != 1 or p.n_iter != 1:
        raise ValueError(f"batch_size {p.batch_size}, n_iter {p.n_iter}: an X/Y/Z plot draws one image per cell; "
                         "use 1 and 1")
    count = len(x.values) * len(y.values) * len(z.values)
    if count * p.width * p.height > MAX_GRID_PIXELS:
        raise ValueError(f"{count} cells of {p.width}x{p.height} px exceed {MAX_GRID_PIXELS // 10 ** 6} megapixels "
                         "(A1111's img_max_size_mp)")
    p = dataclasses.replace(p, seed=rng.get_fixed_seed(p.seed), subseed=rng.get_fixed_seed(p.subseed))
    x, y, z = fix_seeds(x), fix_seeds(y), fix_seeds(z)
    cells = make_cells(p, x, y, z, equal_nfe=equal_nfe)
    for cell in cells:
        cell.p.validate()
    return Plot(p, (x, y, z), cells, equal_nfe)


def _legend(axis: Axis, equal_nfe: bool) -> list[str]:
    """An axis's labels; in equal-NFE mode a steps axis holds budgets, labelled "NFE: N"."""
    if equal_nfe and axis.type.name == "steps":
        return [f"NFE: {v}" for v in axis.values]
    return axis.labels


def run_plot(plot: Plot, *, margin: int = 0, progress: Callable[[int, int], None] | None = None) -> XYZResult:
    """Run the cells of `plot` and draw them (A1111 `draw_xyz_grid`): one grid per z value (`draw_grid`, captions
    with steps and NFE in equal-NFE mode), side by side (`join_grids`); the infotext is the first cell's plus
    `grid_params`. Writes no file."""
    x, y, z = plot.axes
    results = run_cells(plot.cells, progress)
    nx, ny = len(x.values), len(y.values)
    sub_grids, layout = [], None
    for iz in range(len(z.values)):
        part = results[iz * nx * ny:(iz + 1) * nx * ny]
        captions = [r.cell.caption() for r in part] if plot.equal_nfe else None
        grid, layout = draw_grid([r.image for r in part], nx, ny, _legend(x, plot.equal_nfe),
                                 _legend(y, plot.equal_nfe), margin=margin, captions=captions)
        sub_grids.append(grid)
    grid = join_grids(sub_grids, _legend(z, plot.equal_nfe))
    text = add_params(results[0].infotext, grid_params(x, y, z, equal_nfe=plot.equal_nfe))
    return XYZResult(grid, text, sub_grids, layout, results, plot.axes, plot.equal_nfe)


def xyz_plot(p: StableDiffusionProcessing, x: Axis, y: Axis = NOTHING, z: Axis = NOTHING, *,
             equal_nfe: bool = False, margin: int = 0, progress: Callable[[int, int], None] | None = None
             ) -> XYZResult:
    """Run an X/Y/Z plot of job `p` (`plan_plot`, then `run_plot`); writes no file. `p` is not changed."""
    return run_plot(plan_plot(p, x, y, z, equal_nfe=equal_nfe), margin=margin, progress=progress)


def sidecar(result: XYZResult, grid_path: Path | None = None, cell_paths: Sequence[Path | None] | None = None
            ) -> dict[str, Any]:
    """The JSON record of a plot: the grid file and infotext, each axis (type, text, values, labels) and every
    cell (position, labels, seed, steps, model calls, NFE budget, infotext, file when saved), in A1111 order."""
    axes = {}
    for name, axis in zip("xyz", result.axes):
        axes[name] = {"type": axis.type.label, "name": axis.type.name, "text": axis.text,
                      "values": list(axis.values), "labels": axis.labels}
    cells = []
    for k, r in enumerate(result.cells):
        c = r.cell
        cells.append({"x": c.ix, "y": c.iy, "z": c.iz,
                      "labels": [axis.labels[i] for axis, i in zip(result.axes, (c.ix, c.iy, c.iz))],
                      "seed": c.p.seed, "steps": c.p.steps, "model_calls": r.model_calls, "nfe_budget": c.budget,
                      "infotext": r.infotext,
                      "path": str(cell_paths[k]) if cell_paths and cell_paths[k] is not None else None})
    return {"script": SCRIPT_TITLE, "grid": str(grid_path) if grid_path is not None else None,
            "infotext": result.infotext, "equal_nfe": result.equal_nfe, "axes": axes, "cells": cells}


# ---------------------------------------------------------------------------------------------------------------
# Files


def _png_writer(image: Image.Image, text: str) -> Callable[[Path], None]:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return lambda tmp: image.save(tmp, format="PNG", pnginfo=info)


def next_grid_number(directory: Path) -> int:
    """One past the largest NNNN of `xyz_grid-NNNN-*` files in `directory` (A1111 `get_next_sequence_number` with
    the grid's basename); 0 for a missing or empty folder."""
    numbers = [-1]
    if directory.is_dir():
        for f in directory.iterdir():
            m = re.match(rf"{GRID_BASENAME}-(\d+)", f.name)
            if m:
                numbers.append(int(m.group(1)))
    return max(numbers) + 1


def sidecar_path(grid_path: Path) -> Path:
    return grid_path.with_suffix(".json")


def cell_path(grid_path: Path, cell: Cell) -> Path:
    return grid_path.with_name(f"{grid_path.stem}-x{cell.ix}-y{cell.iy}-z{cell.iz}.png")


def save_plot(result: XYZResult, *, grid_path: Path | None = None, outdir: Path | None = None,
              date_subfolder: bool = True, save_cells: bool = False) -> list[Path]:
    """Write the grid PNG (its infotext in "parameters"), then with `save_cells` each cell's PNG beside it
    (`<grid stem>-x<i>-y<j>-z<k>.png`, the cell's infotext inside), then the JSON sidecar `<grid stem>.json`.
    Returns the paths written, grid first.

    The grid goes to `grid_path`, or to `outdir` (under a YYYY-MM-DD folder with `date_subfolder`) as
    `xyz_grid-<NNNN>-<seed>.png`, NNNN the next free number. Every file is written by `images.write_new_file`:
    atomically, never overwriting (FileExistsError for an existing `grid_path`, cell or sidecar name)."""
    if grid_path is None:
        if outdir is None:
            raise ValueError("save_plot: give grid_path or outdir")
        directory = Path(outdir)
        if date_subfolder:
            directory = directory / datetime.date.today().isoformat()
        directory.mkdir(parents=True, exist_ok=True)
        seed = result.cells[0].cell.p.seed
        start = next_grid_number(directory)
        candidates = (directory / f"{GRID_BASENAME}-{n:04d}-{seed}.png" for n in range(start, start + 10_000))
        grid_path = images.write_new_file(candidates, _png_writer(result.grid, result.infotext))
    else:
        images.write_new_file(grid_path, _png_writer(result.grid, result.infotext))
    written = [grid_path]
    cell_paths: list[Path | None] = [None] * len(result.cells)
    if save_cells:
        for k, r in enumerate(result.cells):
            cell_paths[k] = images.write_new_file(cell_path(grid_path, r.cell), _png_writer(r.image, r.infotext))
            written.append(cell_paths[k])
    record = json.dumps(sidecar(result, grid_path, cell_paths), indent=1, ensure_ascii=False)
    written.append(images.write_new_file(sidecar_path(grid_path),
                                         lambda tmp: tmp.write_text(record + "\n", encoding="utf-8")))
    return written


# ---------------------------------------------------------------------------------------------------------------
# `sdcore xyz`


def explain_cells(cells: Sequence[Cell], axes: tuple[Axis, Axis, Axis]) -> str:
    """One line per cell: its labels, sampler, scheduler, steps and the model calls of its dry run (`--explain`)."""
    lines = []
    for cell in cells:
        labels = [axis.labels[i] for axis, i in zip(axes, (cell.ix, cell.iy, cell.iz)) if axis.labels[i]]
        calls = cell.planned_calls if cell.planned_calls is not None else planned_model_calls(cell.p)
        sampler, scheduler = cell.p.resolve_sampler()
        budget = f" (budget {cell.budget})" if cell.budget is not None else ""
        lines.append(f"cell x{cell.ix} y{cell.iy} z{cell.iz} [{' | '.join(labels) or '-'}]: {sampler.name}, "
                     f"scheduler {scheduler or 'automatic'}, {cell.p.steps} steps, {calls} model calls{budget}, "
                     f"seed {cell.p.seed}")
    return "\n".join(lines)


def _check_outputs(args) -> None:
    from .cli.flags import UsageError

    if args.grid is not None:
        if args.grid.suffix.lower() != ".png":
            raise UsageError(f"--grid: {args.grid}; the file name must end in .png")
        if args.outdir is not None:
            raise UsageError("--grid: names the grid file itself; give --grid or --outdir, not both")
        if not args.grid.parent.is_dir():
            raise UsageError(f"--grid: folder {args.grid.parent} does not exist")
        if args.grid.exists() or sidecar_path(args.grid).exists():
            raise UsageError(f"--grid: {args.grid} or {sidecar_path(args.grid).name} exists; files are never "
                             "overwritten")
    if args.outdir is not None and args.outdir.exists() and not args.outdir.is_dir():
        raise UsageError(f"--outdir: {args.outdir} exists and is not a folder")


def run(args: argparse.Namespace) -> int:
    """`sdcore xyz`: check everything that needs no model (flags, axes, files), load the model, build and check
    every cell, then (unless --explain) run them, write the grid, the cells and the sidecar, print their paths.
    Bad input raises UsageError / ValueError before anything is written (exit 2 in `sdcore.cli.main`)."""
    from .cli import commands
    from .cli.flags import UsageError, processing_flags, resolve_values
    from .cli.jobs import Run, Task, _check_processing, _open_inputs, make_processing
    from .files import checkpoint_path_problem

    if args.txt2img and args.init is not None:
        raise UsageError(f"init: {args.init}; --txt2img runs without an init image, give one or the other")
    if not args.txt2img and args.init is None:
        raise UsageError("init: missing; give an init image file (img2img / inpainting) or --txt2img")
    command = "txt2img" if args.txt2img else "img2img"
    if command == "txt2img":
        txt2img_fields = {f.field for f in processing_flags("txt2img")}
        for flag in processing_flags("img2img"):
            if flag.field not in txt2img_fields and hasattr(args, flag.field):
                raise UsageError(f"{flag.flag}: img2img only; not with --txt2img")
    values, unused = resolve_values(argparse.Namespace(**{**vars(args), "command": command}),
                                    processing_flags(command))
    if unused:
        print(f"sdcore: note: infotext keys not used: {', '.join(unused)}", file=sys.stderr)
    for name in ("batch_size", "n_iter"):
        if values[name] != 1:
            raise UsageError(f"--{name.replace('_', '-')}: {values[name]}; an X/Y/Z plot draws one image per cell")
    if args.margin_size < 0:
        raise UsageError(f"--margin-size: {args.margin_size}; must be >= 0 px")
    axes = []
    for a in "xyz":
        try:
            axes.append(parse_axis(getattr(args, f"{a}_type"), getattr(args, f"{a}_values"), f"--{a}"))
        except ValueError as e:
            raise UsageError(str(e)) from None
    x, y, z = axes
    seen = set()
    for axis, a in zip(axes, "xyz"):
        if axis.type.name in seen and axis.type.name not in ("nothing", "prompt_sr"):
            raise UsageError(f"--{a}-type: {axis.type.name} is on an earlier axis too; this one would override it")
        seen.add(axis.type.name)
        if axis.type.needs == "init" and command == "txt2img":
            raise UsageError(f"--{a}-type: {axis.type.name} needs an init image (img2img), not --txt2img")
        if axis.type.needs == "mask" and values.get("mask") is None:
            raise UsageError(f"--{a}-type: {axis.type.name} needs a mask (--mask FILE)")
        if axis.type.name == "prompt_sr":
            search = axis.values[0]
            if search not in values["prompt"] and search not in values["negative_prompt"]:
                raise UsageError(f"--{a}-values: Prompt S/R did not find {search!r} in the prompt or the negative "
                                 "prompt")
    _check_outputs(args)
    for path, arg in ((args.ckpt, "--ckpt"), (args.vae, "--vae")):
        problem = None if path is None else checkpoint_path_problem(path)
        if problem:
            raise UsageError(f"{arg}: {problem}")
    task = Task(args.init, values.get("mask"))
    inputs = _open_inputs(task, values)  # decodes the init image, mask and latent mask (UsageError naming them)

    sd = commands._load_model(args.ckpt, args.device, args.dtype, args.vae, args.prediction, args.vae_dtype)
    threads = commands.threads_for(args, Run(command, values, [], [], False), sd.family)
    if threads:
        torch.set_num_threads(threads)
    p = make_processing(sd, values, command, *inputs)
    _check_processing(p)
    try:
        plot = plan_plot(p, x, y, z, equal_nfe=args.equal_nfe)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for cell in plot.cells:
        _check_processing(cell.p)
    if args.explain:
        print(explain_cells(plot.cells, plot.axes))
        return 0
    print(f"X/Y/Z plot: {len(plot.cells)} images on {len(z.values)} {len(x.values)}x{len(y.values)} grid"
          f"{'s' if len(z.values) > 1 else ''}", file=sys.stderr)
    with tqdm(total=len(plot.cells), desc="cells", unit="image", disable=None) as bar:
        result = run_plot(plot, margin=args.margin_size, progress=lambda done, total: bar.update(1))
    outdir = args.outdir or Path(f"outputs/{command}-grids")
    for path in save_plot(result, grid_path=args.grid, outdir=outdir, date_subfolder=p.opts.save_to_dirs,
                          save_cells=args.save_cells):
        print(path)
    return 0
