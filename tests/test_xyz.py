"""`sdcore xyz` (sdcore/xyz.py): A1111's X/Y/Z plot.

- Axis values: vectors derived by hand from A1111's `scripts/xyz_grid.py` rules (CSV list, `a-b`, `a-b (+s)`,
  `a-b [n]` with np.linspace and int() truncation), and the documented differences (descending ranges end at their
  end, float ranges never overshoot).
- End to end with the bundled tiny model: every cell of a 2x2 grid is byte for byte the single `sdcore img2img`
  run with its values; the grid is the cells plus the label margins; the grid's infotext is the first cell's plus
  A1111's Script keys; the sidecar holds every cell's infotext.
- Equal-NFE mode: the steps picked for a call budget, derived by hand from how each sampler calls the model
  (a1111-semantics §6.2, §10.1) and checked against the Plan of the real runs.
- Bad input exits 2 with one line naming the argument and writes nothing; `sdcore samplers` lists the 12
  schedulers under A1111's "Schedule type" labels.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, rect_mask
from sdcore import xyz
from sdcore.cli import DEFAULT_CKPT, commands, main
from sdcore.infotext import parse_infotext
from sdcore.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img
from sdcore.sampling.schedules import SCHEDULERS

_cached_load = functools.lru_cache(maxsize=2)(commands._load_model)


@pytest.fixture(autouse=True)
def load_each_checkpoint_once(monkeypatch):
    monkeypatch.setattr(commands, "_load_model", _cached_load)


@pytest.fixture(scope="module")
def tiny():
    """The bundled tiny model (64 px)."""
    return _cached_load(DEFAULT_CKPT, "cpu", "float32")


@pytest.fixture(scope="module")
def photo(astronaut, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xyz") / "photo.png"
    astronaut.resize((64, 64), Image.LANCZOS).save(path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def values(type_name: str, text: str) -> list:
    return list(xyz.parse_axis(type_name, text).values)


# -- axis values ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("1-5", [1, 2, 3, 4, 5]),  # range(1, 5 + 1)
    ("1-10 (+2)", [1, 3, 5, 7, 9]),  # range(1, 11, 2)
    ("1-10 (+3)", [1, 4, 7, 10]),
    ("5-20 (+5)", [5, 10, 15, 20]),
    (" 1 - 3 ", [1, 2, 3]),  # spaces around the numbers and the dash
    ("-5-5 (+5)", [-5, 0, 5]),  # a signed start
    ("1-10 [4]", [1, 4, 7, 10]),  # linspace(1, 10, 4) = 1, 4, 7, 10
    ("1-10 [3]", [1, 5, 10]),  # linspace = 1, 5.5, 10; int() truncates
    ("0-10 [4]", [0, 3, 6, 10]),  # 0, 3.33, 6.67, 10
    ("3-3 [2]", [3, 3]),
    ("1, 3-5, 9", [1, 3, 4, 5, 9]),  # ranges expand in place in a list
    ("10-1 (-3)", [10, 7, 4, 1]),  # sdcore: ends at 1 (A1111's range(10, 2, -3) gives 10, 7, 4)
    ("[4, 8]", [4, 8]),  # sdcore: a bracketed list
])
def test_int_axis_values(text, expected):
    unchecked = xyz.AxisType("n", "N", int, None)  # an int axis without a range check (steps must be >= 1)
    assert xyz.parse_values(unchecked, text) == expected
    if min(expected) >= 1:
        assert values("steps", text) == expected


@pytest.mark.parametrize("text, expected", [
    ("0.25-1 (+0.25)", [0.25, 0.5, 0.75, 1.0]),
    ("0-1 [3]", [0.0, 0.5, 1.0]),  # linspace(0, 1, 3)
    ("7, 7.5, 12", [7.0, 7.5, 12.0]),
    ("1-2", [1.0, 2.0]),  # the default step is 1
    (".5-1.5", [0.5, 1.5]),
])
def test_float_axis_values(text, expected):
    assert values("cfg_scale", text) == pytest.approx(expected, abs=1e-12)


def test_float_range_never_overshoots_its_end():
    """A1111's np.arange(0.1, 0.3 + 0.1, 0.1) has 4 values (0.4 > 0.3, float rounding); sdcore's k * step rule
    floor((0.3 - 0.1) / 0.1 + 1e-9) = 2 gives 0.1, 0.2, 0.3."""
    assert len(np.arange(0.1, 0.3 + 0.1, 0.1)) == 4
    got = values("denoising", "0.1-0.3 (+0.1)")
    assert got == pytest.approx([0.1, 0.2, 0.3], abs=1e-12)
    # The label rounds to 8 digits as A1111's format_value_add_label: 0.1 + 2 * 0.1 = 0.30000000000000004.
    assert xyz.parse_axis("denoising", "0.1-0.3 (+0.1)").labels[-1] == "Denoising: 0.3"


@pytest.mark.parametrize("text, expected", [
    ("Euler a,DPM++ 2M", ["Euler a", "DPM++ 2M"]),
    (" Euler a , Euler ", ["Euler a", "Euler"]),  # items are stripped
    ("[Euler a, k_euler]", ["Euler a", "k_euler"]),
    ('"DPM++ 2M Karras",Heun', ["DPM++ 2M Karras", "Heun"]),
])
def test_string_axis_values(text, expected):
    assert values("sampler", text) == expected


def test_prompt_sr_values_keep_commas_in_quotes_and_brackets():
    """CSV quoting keeps a comma inside a value (A1111 csv_string_to_list_strip); Prompt S/R values are not
    unbracketed (they may be prompt-editing syntax)."""
    assert values("Prompt S/R", 'red,"blue, dark",[red:blue:0.5]') == ["red", "blue, dark", "[red:blue:0.5]"]
    assert values("prompt_sr", "[cat:dog:0.5]") == ["[cat:dog:0.5]"]


def test_masked_content_takes_numbers_labels_and_ranges():
    axis = xyz.parse_axis("Masked content", "fill, latent noise, 3, 0-1")
    assert list(axis.values) == [0, 2, 3, 0, 1]
    assert axis.labels == ["Masked content: fill", "Masked content: latent noise", "Masked content: latent nothing",
                           "Masked content: fill", "Masked content: original"]


def test_axis_types_accept_a1111_labels_and_aliases():
    for name, expected in (("CFG Scale", "cfg_scale"), ("cfg", "cfg_scale"), ("Prompt S/R", "prompt_sr"),
                           ("Schedule type", "scheduler"), ("Denoising", "denoising_strength"),
                           ("sampler-name", "sampler"), ("mask blend", "mask_blend"), ("SEED", "seed")):
        assert xyz.find_axis_type(name).name == expected
    with pytest.raises(ValueError, match="unknown axis type 'Checkpoint name'"):
        xyz.find_axis_type("Checkpoint name")


def test_legends():
    """A1111 format_value_add_label ("Label: value") for all but Sampler and Prompt S/R (format_value)."""
    assert xyz.parse_axis("steps", "10").labels == ["Steps: 10"]
    assert xyz.parse_axis("cfg", "7").labels == ["CFG Scale: 7.0"]
    assert xyz.parse_axis("sampler", "Euler a").labels == ["Euler a"]
    assert xyz.parse_axis("scheduler", "Karras").labels == ["Schedule type: Karras"]
    assert xyz.parse_axis("mask_blend", "xt").labels == ["Mask blend: xt"]
    assert xyz.NOTHING.labels == [""]


@pytest.mark.parametrize("type_name, text, message", [
    ("steps", "1-10 (+0)", "step must not be 0"),
    ("steps", "5-1", "empty range"),  # A1111: range(5, 2) is empty -> no cells
    ("steps", "1-10 (-1)", "empty range"),
    ("steps", "1-10 [0]", "count"),
    ("steps", "abc", "not an integer"),
    ("steps", "7.5", "not an integer"),
    ("steps", "0", "out of range"),
    ("steps", "", "no values"),
    ("cfg", "nan", "not a number"),
    ("denoising", "0.5, 1.5", "out of range"),
    ("sampler", "Eulerr", "unknown sampler 'Eulerr'"),
    ("scheduler", "karas", "unknown scheduler 'karas'"),
    ("mask_blend", "soft", "unknown mask blend 'soft'"),
    ("inpainting_fill", "4", "out of range"),
    ("seed", "-2", "not a seed"),
    ("prompt_sr", ",blue", "the text to search for, is empty"),
])
def test_bad_axis_values_name_the_flag(type_name, text, message):
    with pytest.raises(ValueError, match=message) as e:
        xyz.parse_axis(type_name, text, "--y")
    assert str(e.value).startswith("--y-values: ")


def test_seed_axis_minus_one_is_drawn_once():
    axis = xyz.fix_seeds(xyz.parse_axis("seed", "-1, 5, -1"))
    assert axis.values[1] == 5 and all(0 <= v < 4294967294 for v in axis.values)
    assert xyz.fix_seeds(xyz.parse_axis("steps", "3")).values == (3,)


def test_prompt_sr_replaces_in_prompt_and_negative(tiny):
    p = StableDiffusionProcessingTxt2Img(sd_model=tiny, prompt="a red circle", negative_prompt="red noise")
    axis = xyz.parse_axis("prompt_sr", "red,blue")
    first, second = (xyz.apply_value(p, axis, v) for v in axis.values)
    assert (first.prompt, first.negative_prompt) == ("a red circle", "red noise")
    assert (second.prompt, second.negative_prompt) == ("a blue circle", "blue noise")
    assert p.prompt == "a red circle"  # the job itself is not changed
    with pytest.raises(ValueError, match="--x-values: Prompt S/R did not find 'green'"):
        xyz.apply_value(p, xyz.parse_axis("prompt_sr", "green,blue"), "blue")


def test_add_params_inserts_before_version():
    text = "a cat\nSteps: 5, Sampler: Euler, Seed: 1, Version: sdcore-0.1.0"
    assert xyz.add_params(text, {"Script": "X/Y/Z plot", "X Values": "1, 2"}) == (
        'a cat\nSteps: 5, Sampler: Euler, Seed: 1, Script: X/Y/Z plot, X Values: "1, 2", Version: sdcore-0.1.0')


# -- drawing -------------------------------------------------------------------------------------------------------

def _cells(n: int, size=(64, 48)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * k % 256, 90, 200 - 10 * k)) for k in range(n)]


def test_draw_grid_pastes_cells_unchanged_inside_label_margins():
    """A1111 draw_grid_annotations: pad_left = 3/4 of a cell width when a y label has text; pad_top = the tallest
    x label block + 2 line spacings; margins between cells; everything else white except the labels."""
    cells = _cells(6)
    grid, layout = xyz.draw_grid(cells, 3, 2, ["Euler a", "Heun", "LMS"], ["Steps: 5", "Steps: 10"], margin=4)
    assert layout.pad_left == 64 * 3 // 4 and layout.pad_top > 0
    assert grid.size == layout.size == (48 + 3 * 64 + 2 * 4, layout.pad_top + 2 * 48 + 4)
    for k, cell in enumerate(cells):
        assert np.array_equal(np.asarray(grid.crop(layout.cell_box(k % 3, k // 3))), np.asarray(cell))
    a = np.asarray(grid)
    assert (a[:layout.pad_top, layout.pad_left:] < 128).any()  # x labels drawn
    assert (a[layout.pad_top:, :layout.pad_left] < 128).any()  # y labels drawn
    assert (a[:layout.pad_top, :layout.pad_left] == 255).all()  # the corner stays white


def test_draw_grid_without_labels_is_a1111_image_grid():
    cells = _cells(4)
    grid, layout = xyz.draw_grid(cells, 2, 2, ["", ""], ["", ""])
    assert (layout.pad_left, layout.pad_top) == (0, 0) and grid.size == (128, 96)
    assert np.array_equal(np.asarray(grid.crop((64, 48, 128, 96))), np.asarray(cells[3]))
    with pytest.raises(ValueError, match="3 x labels"):
        xyz.draw_grid(cells, 2, 2, ["a", "b", "c"], ["", ""])


def test_join_grids_titles_the_z_grids():
    grids = _cells(2, (100, 80))
    joined = xyz.join_grids(grids, ["Seed: 1", "Seed: 2"])
    pad = joined.height - 80
    assert joined.width == 200 and pad > 0
    assert np.array_equal(np.asarray(joined.crop((100, pad, 200, pad + 80))), np.asarray(grids[1]))
    assert xyz.join_grids(grids[:1], [""]) is grids[0]


# -- equal NFE -----------------------------------------------------------------------------------------------------

def test_steps_for_budget_search_with_a_counting_rule():
    """The search over a count function: 2s - 1 calls (Heun-like) in a budget of 10 -> 5 steps, 9 calls; a count
    that fails at 1 step starts at 2; a constant count stops at MAX_STEPS; a budget below the minimum is refused."""
    p = StableDiffusionProcessingTxt2Img(sampler_name="Heun", steps=10)
    assert xyz.steps_for_budget(p, 10, lambda q: 2 * q.steps - 1) == (5, 9)
    assert xyz.steps_for_budget(p, 1, lambda q: 2 * q.steps - 1) == (1, 1)

    def fails_at_one(q):
        if q.steps == 1:
            raise ValueError("needs two sigmas")
        return 2 * q.steps - 1
    assert xyz.steps_for_budget(p, 4, fails_at_one) == (2, 3)
    assert xyz.steps_for_budget(p, 3, lambda q: 1) == (xyz.MAX_STEPS, 1)
    with pytest.raises(ValueError, match="budget of 2 model calls is too small"):
        xyz.steps_for_budget(p, 2, lambda q: 3 * q.steps)
    with pytest.raises(ValueError, match="DPM adaptive"):
        xyz.steps_for_budget(StableDiffusionProcessingTxt2Img(sampler_name="DPM adaptive"), 10, lambda q: 1)


@pytest.mark.parametrize("sampler, strength, budget, steps, calls", [
    # txt2img: s steps of the schedule. Euler, DPM++ 2M, LMS: one call per step -> s = N.
    ("Euler", None, 10, 10, 10),
    ("DPM++ 2M", None, 10, 10, 10),
    # Heun, DPM2 (its schedule drops the penultimate sigma of s + 1 steps: s steps again), DPM++ SDE: two calls per
    # step but one into sigma 0 (a1111-semantics §10.1): 2s - 1 <= N -> s = (N + 1) // 2.
    ("Heun", None, 10, 5, 9),
    ("DPM2", None, 10, 5, 9),
    ("DPM++ SDE", None, 11, 6, 11),
    # img2img at strength d runs t_enc + 1 = int(d * s) + 1 steps (a1111-semantics §6.2): Euler at 0.75 with N = 20
    # -> int(0.75 s) <= 19 -> s = 26 (0.75 * 26 = 19.5; 27 -> 20.25); Heun: 2 (int(0.75 s) + 1) - 1 <= 10 ->
    # int(0.75 s) <= 4 -> s = 6 (4.5; 7 -> 5.25), 2 * 5 - 1 = 9 calls.
    ("Euler", 0.75, 20, 26, 20),
    ("Heun", 0.75, 10, 6, 9),
])
def test_equal_nfe_steps_from_the_plan(tiny, astronaut, sampler, strength, budget, steps, calls):
    common = {"sd_model": tiny, "prompt": "a red circle", "sampler_name": sampler, "steps": budget, "seed": 1,
              "width": 64, "height": 64}
    if strength is None:
        p = StableDiffusionProcessingTxt2Img(**common)
    else:
        p = StableDiffusionProcessingImg2Img(init_images=[astronaut.resize((64, 64))], denoising_strength=strength,
                                             **common)
    assert xyz.steps_for_budget(p, budget) == (steps, calls)


@pytest.mark.slow
@pytest.mark.parametrize("strength", [None, 0.6])
def test_model_calls_grow_with_steps_for_every_sampler(tiny, astronaut, strength):
    """steps_for_budget bisects, which needs the call count to be non-decreasing in the steps: checked for every
    sampler (DPM adaptive aside) on 1..24 steps of the real pipeline's dry run."""
    from sdcore.sampling.samplers import SAMPLERS

    for info in SAMPLERS:
        if info.name == "DPM adaptive":
            continue
        counts = []
        for s in range(1, 25):
            common = {"sd_model": tiny, "prompt": "a", "sampler_name": info.name, "steps": s, "seed": 1,
                      "width": 64, "height": 64}
            p = (StableDiffusionProcessingTxt2Img(**common) if strength is None else StableDiffusionProcessingImg2Img(
                init_images=[astronaut.resize((64, 64))], denoising_strength=strength, **common))
            try:
                counts.append(xyz.planned_model_calls(p))
            except ValueError:
                assert not counts, f"{info.name}: fails at {s} steps after running at fewer"
        assert counts == sorted(counts) and counts, (info.name, counts)


# -- end to end ----------------------------------------------------------------------------------------------------

FLAGS = ("--prompt", "a red circle", "--seed", "7", "--no-save-to-dirs")


def test_grid_cells_are_the_single_runs_byte_for_byte(capsys, photo, tmp_path):
    """A 2x2 img2img grid of the tiny model: each cell PNG equals the PNG `sdcore img2img` writes with its values
    (pixels and infotext: the same bytes), the grid shows those pixels at the layout's boxes inside the label
    margins, its infotext is the first cell's plus the Script keys, and the sidecar has every cell."""
    grid_path = tmp_path / "grid.png"
    code, out, err = run(capsys, "xyz", photo, *FLAGS, "--x-type", "sampler", "--x-values", "Euler a,DPM++ 2M",
                         "--y-type", "Steps", "--y-values", "3-6 (+3)", "--grid", grid_path, "--save-cells")
    assert code == 0, err
    written = [Path(line) for line in out.split()]
    assert written[0] == grid_path and written[-1] == tmp_path / "grid.json" and len(written) == 6
    record = json.loads((tmp_path / "grid.json").read_text())
    grid = Image.open(grid_path)
    cell_w = cell_h = 64
    pad_left = cell_w * 3 // 4
    pad_top = grid.height - 2 * cell_h
    assert grid.size == (pad_left + 2 * cell_w, pad_top + 2 * cell_h) and pad_top > 0
    a = np.asarray(grid.convert("RGB"))
    assert (a[:pad_top, pad_left:pad_left + cell_w] < 128).any() and (a[:pad_top, pad_left + cell_w:] < 128).any()
    assert (a[pad_top:pad_top + cell_h, :pad_left] < 128).any() and (a[pad_top + cell_h:, :pad_left] < 128).any()

    # img2img at 0.75 (a1111-semantics §6.2): 3 steps -> t_enc 2 -> 3 calls; 6 steps -> t_enc 4 -> 5 calls.
    expected = [("Euler a", 3, 3), ("DPM++ 2M", 3, 3), ("Euler a", 6, 5), ("DPM++ 2M", 6, 5)]
    assert [(c["labels"][0], c["steps"], c["model_calls"]) for c in record["cells"]] == expected
    for k, (sampler, steps, _) in enumerate(expected):
        cell = record["cells"][k]
        single_dir = tmp_path / f"single{k}"
        code, out, err = run(capsys, "img2img", photo, *FLAGS, "--sampler-name", sampler, "--steps", steps,
                             "--outdir", single_dir)
        assert code == 0, err
        single = Path(out.split()[0])
        assert Path(cell["path"]).read_bytes() == single.read_bytes()
        assert Image.open(single).info["parameters"] == cell["infotext"]
        x0, y0 = pad_left + (k % 2) * cell_w, pad_top + (k // 2) * cell_h
        assert np.array_equal(a[y0:y0 + cell_h, x0:x0 + cell_w], np.asarray(Image.open(single).convert("RGB")))

    params = parse_infotext(grid.info["parameters"])
    extra = {"Script": "X/Y/Z plot", "X Type": "Sampler", "X Values": "Euler a,DPM++ 2M", "Y Type": "Steps",
             "Y Values": "3-6 (+3)"}
    assert {k: params.pop(k) for k in extra} == extra
    assert params == parse_infotext(record["cells"][0]["infotext"])
    assert record["infotext"] == grid.info["parameters"]


def test_z_axis_grids_side_by_side_with_titles(tiny):
    """Z = seed: two sub-grids (CFG on x, no y labels -> no left margin) side by side under "Seed: N" titles; the
    seed changes the image, the sub-grids are the drawn grids pasted unchanged."""
    p = StableDiffusionProcessingTxt2Img(sd_model=tiny, prompt="a red circle", steps=3, width=64, height=64,
                                         sampler_name="Euler")
    result = xyz.xyz_plot(p, xyz.parse_axis("cfg", "1,7"), z=xyz.parse_axis("seed", "1,2"))
    sub = result.sub_grids[0]
    assert result.layout.pad_left == 0 and sub.size == (128, result.layout.pad_top + 64)
    pad = result.grid.height - sub.height
    assert result.grid.size == (2 * sub.width, sub.height + pad) and pad > 0
    for i, part in enumerate(result.sub_grids):
        box = (i * sub.width, pad, (i + 1) * sub.width, pad + sub.height)
        assert np.array_equal(np.asarray(result.grid.crop(box)), np.asarray(part))
    seeds = [r.cell.p.seed for r in result.cells]
    assert seeds == [1, 1, 2, 2]
    assert not np.array_equal(np.asarray(result.cells[0].image), np.asarray(result.cells[2].image))
    params = parse_infotext(result.infotext)
    assert params["Z Type"] == "Seed" and params["Fixed Z Values"] == "1, 2" and params["Seed"] == "1"


def test_equal_nfe_grid_captions_steps_and_calls(capsys, tmp_path):
    """--equal-nfe with budget 10 (--steps): Euler runs 10 steps, Heun 5 (2 * 5 - 1 = 9 calls); --explain prints
    that without running; the real runs' Plans count the same calls; the cells get a caption band."""
    argv = ["xyz", "--txt2img", *FLAGS, "--steps", "10", "--x-type", "sampler", "--x-values", "Euler,Heun",
            "--equal-nfe"]
    code, out, err = run(capsys, *argv, "--explain")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "Euler, scheduler automatic, 10 steps, 10 model calls (budget 10)" in lines[0]
    assert "Heun, scheduler automatic, 5 steps, 9 model calls (budget 10)" in lines[1]
    code, out, err = run(capsys, *argv, "--grid", tmp_path / "nfe.png")
    assert code == 0, err
    record = json.loads((tmp_path / "nfe.json").read_text())
    assert [(c["steps"], c["model_calls"], c["nfe_budget"]) for c in record["cells"]] == [(10, 10, 10), (5, 9, 10)]
    assert "Steps: 5, Sampler: Heun" in record["cells"][1]["infotext"]
    grid = Image.open(tmp_path / "nfe.png")
    assert grid.width == 128 and grid.height > 64 + 2 * xyz.MIN_FONT_SIZE  # labels above, captions below
    assert parse_infotext(grid.info["parameters"])["XYZ equal NFE"] == "True"


# -- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["--x-type", "Checkpoint name", "--x-values", "a"], "--x-type"),
    (["--x-type", "steps", "--x-values", "1-"], "--x-values"),
    (["--y-type", "sampler", "--y-values", "Euler a,Eulerr"], "--y-values"),
    (["--x-values", "1,2"], "--x-values"),
    (["--x-type", "steps"], "--x-values"),
    (["--x-type", "mask_blur", "--x-values", "0,4"], "--x-type"),  # needs --mask
    (["--x-type", "prompt_sr", "--x-values", "green,blue"], "--x-values"),
    (["--x-type", "steps", "--x-values", "2", "--y-type", "steps", "--y-values", "3"], "--y-type"),
    (["--x-type", "steps", "--x-values", "2", "--batch-size", "2"], "--batch-size"),
    (["--x-type", "steps", "--x-values", "2", "--margin-size", "-1"], "--margin-size"),
    (["--x-type", "steps", "--x-values", "2", "--grid", "grid.jpg"], "--grid"),
    (["--x-type", "sampler", "--x-values", "DPM adaptive", "--equal-nfe"], "--equal-nfe"),
])
def test_bad_input_exits_2_and_writes_nothing(capsys, photo, tmp_path, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "xyz", photo, *FLAGS, "--outdir", tmp_path / "out", *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"sdcore: error: {flag}"), err
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("argv, flag", [
    (["--txt2img", "--x-type", "denoising", "--x-values", "0.5"], "--x-type"),
    (["--txt2img", "--mask", "m.png", "--x-type", "steps", "--x-values", "2"], "--mask"),
    (["--x-type", "steps", "--x-values", "2"], "init"),
])
def test_txt2img_mode_errors(capsys, tmp_path, argv, flag):
    code, _, err = run(capsys, "xyz", *FLAGS, "--outdir", tmp_path / "out", *argv)
    assert code == 2 and err.startswith(f"sdcore: error: {flag}"), err
    assert not (tmp_path / "out").exists()


def test_existing_grid_is_never_overwritten(capsys, photo, tmp_path):
    (tmp_path / "g.json").write_text("mine")
    code, _, err = run(capsys, "xyz", photo, *FLAGS, "--x-type", "steps", "--x-values", "2", "--grid",
                       tmp_path / "g.png")
    assert code == 2 and "--grid" in err and (tmp_path / "g.json").read_text() == "mine"
    assert not (tmp_path / "g.png").exists()


def test_mask_axes_run_with_a_mask(capsys, photo, tmp_path):
    """Inpainting axes with --mask: masked content and blend strategy reach the cells' infotexts."""
    rect_mask((64, 64), (16, 16, 48, 48)).save(tmp_path / "mask.png")
    code, _, err = run(capsys, "xyz", photo, *FLAGS, "--mask", tmp_path / "mask.png", "--steps", "2",
                         "--x-type", "inpainting_fill", "--x-values", "original,latent noise", "--y-type", "blend",
                         "--y-values", "a1111,xt", "--grid", tmp_path / "m.png")
    assert code == 0, err
    cells = json.loads((tmp_path / "m.json").read_text())["cells"]
    texts = [parse_infotext(c["infotext"]) for c in cells]
    assert [t.get("Masked content") for t in texts] == [None, "latent noise", None, "latent noise"]
    assert [t.get("Mask blend", "a1111") for t in texts] == ["a1111", "a1111", "xt", "xt"]


# -- the command line without torch; samplers and schedulers --------------------------------------------------------

def test_xyz_help_does_not_import_torch():
    code = ("import sys; from sdcore.cli import main\n"
            "codes = []\n"
            "for argv in (['xyz', '--help'], ['xyz', '--margin-size', 'abc']):\n"
            "    try:\n        codes.append(main(argv))\n"
            "    except SystemExit as e:\n        codes.append(e.code)\n"
            "print(codes, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.strip().splitlines()[-1] == "[0, 2] False", (r.stdout, r.stderr)
    assert "1-10 (+3)" in r.stdout and "--equal-nfe" in r.stdout


# A1111 v1.10.1 modules/sd_schedulers.py: the "Schedule type" dropdown labels in order (a1111-semantics §10.2).
A1111_SCHEDULE_TYPES = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                        "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]


def test_samplers_lists_the_12_schedulers(capsys):
    code, out, _ = run(capsys, "samplers")
    assert code == 0
    lines = out.split("\nschedulers")[1].strip().splitlines()[1:]
    assert [line[:20].strip() for line in lines] == A1111_SCHEDULE_TYPES
    for line, entry in zip(lines, SCHEDULERS):
        assert f"name: {entry.name} " in line and all(alias in line for alias in entry.aliases)
    assert "SGMUniform" in lines[5] and "Euler a" in out and "k_dpmpp_2m" in out
    for label in A1111_SCHEDULE_TYPES:  # every label printed is accepted as an axis value
        assert xyz.parse_axis("scheduler", label).values == (label,)
