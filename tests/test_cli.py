"""The command line: good runs write A1111-named PNGs with infotext and never overwrite; bad values exit 2 naming
the argument and write nothing; --explain, --from-infotext, batch folders and --trace do what the help says.

Numbers checked against the spec (docs/a1111-semantics.md) cite its section."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from conftest import rect_mask
from sdcore import cli
from sdcore import batch as sdbatch
from sdcore.cli import commands
from sdcore.cli import (FIELDS_WITHOUT_FLAG, FLAGS, Task, build_parser, dry_run, main, make_processing,
                        processing_flags, resolve_values, values_from_infotext, write_new_file)
from sdcore.processing import Options, StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img
from sdcore.sampling.samplers import SAMPLERS

_cached_load = functools.lru_cache(maxsize=4)(commands._load_model)


@pytest.fixture(autouse=True)
def load_each_checkpoint_once(monkeypatch):
    """Each CLI run would load its checkpoint again; the tests share one load per file (errors are not cached)."""
    monkeypatch.setattr(commands, "_load_model", _cached_load)


@pytest.fixture(scope="module")
def files(tmp_path_factory, astronaut):
    d = tmp_path_factory.mktemp("cli")
    astronaut.resize((64, 64)).save(d / "init.png")
    rect_mask((64, 64), (16, 16, 48, 48)).save(d / "mask.png")
    rect_mask((64, 64), (24, 24, 40, 40)).save(d / "square.png")  # the a1111-semantics §13 16x16 square at 24..39
    rect_mask((64, 64), (0, 0, 0, 0)).save(d / "blank.png")
    rect_mask((32, 32), (8, 8, 24, 24)).save(d / "small_mask.png")
    (d / "notes.txt").write_text("not an image")
    (d / "truncated.png").write_bytes((d / "init.png").read_bytes()[:200])
    Image.new("RGB", (8, 8)).save(d / "no_params.png")
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def plan_for(sd, *argv):
    """The dry-run plan of `sdcore img2img *argv`."""
    args = build_parser().parse_args(["img2img", *map(str, argv)])
    values, _ = resolve_values(args, processing_flags())
    return dry_run(sd, values, Task(args.init, values["mask"]))


def txt2img_plan(sd, *argv):
    args = build_parser().parse_args(["txt2img", *map(str, argv)])
    values, _ = resolve_values(args, processing_flags("txt2img"))
    return dry_run(sd, values, Task(None, None), "txt2img")


SMALL = ("--width", "64", "--height", "64")


# -- single runs ---------------------------------------------------------------------------------------------------

def test_img2img_writes_numbered_pngs_and_never_overwrites(capsys, files, sd1_tiny_path, tmp_path):
    outdir = tmp_path / "out"
    args = ["img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--prompt", "a cat", "--steps", "3",
            "--seed", "42", *SMALL, "--outdir", outdir, "--sampler", "Euler a"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    first = Path(out.split()[0])
    assert first.name == "00000-42.png" and first.parent.parent == outdir  # outdir/<YYYY-MM-DD>/ (a1111-semantics §9.4)
    before = first.read_bytes()
    code, out, _ = run(capsys, *args)
    assert code == 0 and out.split() == [str(first.parent / "00001-42.png")]
    assert first.read_bytes() == before
    info = Image.open(first).text["parameters"]
    assert info.startswith("a cat\nSteps: 3, Sampler: Euler a, ") and "Seed: 42" in info


@pytest.mark.parametrize("flag, alias, name", [("--dtype", "bf16", "bfloat16"), ("--dtype", "FP16", "float16"),
                                               ("--vae-dtype", "bf16", "bfloat16"), ("--vae-dtype", "fp32", "float32")])
def test_dtype_aliases(flag, alias, name):
    args = build_parser().parse_args(["img2img", "x.png", flag, alias])
    assert getattr(args, flag[2:].replace("-", "_")) == name


def test_dtype_flags_reach_the_model_and_bad_names_exit_2(capsys, files, sd1_tiny_path, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(commands, "_load_model", lambda *a: loads.append(a) or _cached_load(*a[:5]))
    code, _, err = run(capsys, "img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--steps", "1", *SMALL,
                       "--outdir", tmp_path, "--dtype", "bf16", "--vae-dtype", "bf16")
    assert code == 0, err
    assert loads[0][2] == "bfloat16" and loads[0][5] == "bfloat16"
    sd = _cached_load.__wrapped__(sd1_tiny_path, "cpu", "bfloat16", None, None, "bfloat16")
    assert sd.dtype == sd.vae_dtype == torch.bfloat16 and sd.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    code, _, err = run(capsys, "img2img", files / "init.png", "--vae-dtype", "fp8")
    assert code == 2 and "--vae-dtype" in err and "bfloat16" in err and "Traceback" not in err


def test_inpaint_alias_with_mask(capsys, files, inpaint_tiny_path, tmp_path):
    code, out, err = run(capsys, "inpaint", files / "init.png", "--mask", files / "mask.png", "--ckpt",
                         inpaint_tiny_path, "--steps", "2", "--seed", "1", *SMALL, "--outdir", tmp_path)
    assert code == 0, err
    assert Image.open(out.split()[0]).size == (64, 64)


def test_info_and_samplers(capsys, sd1_tiny_path):
    code, out, _ = run(capsys, "info", sd1_tiny_path)
    assert code == 0 and "family: sd1" in out and "model hash" in out
    code, out, _ = run(capsys, "samplers")
    assert code == 0 and "DPM++ 2M" in out and "Euler a" in out


# -- flags ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, cls", [("img2img", StableDiffusionProcessingImg2Img),
                                          ("txt2img", StableDiffusionProcessingTxt2Img)])
def test_every_field_has_one_flag_or_a_reason(command, cls):
    """Issue 5 item 7: one flag per field. A new processing field must get a flag (or a reason in the table)."""
    flagged = [f.field for f in processing_flags(command)]
    assert len(flagged) == len(set(flagged))
    names = [n for f in processing_flags(command) for n in (f.flag, *f.aliases)]
    assert len(names) == len(set(names))
    for f in dataclasses.fields(cls):
        if f.init:
            assert f.name in flagged or f.name in FIELDS_WITHOUT_FLAG, f.name
    for f in dataclasses.fields(Options):
        assert f"opts.{f.name}" in flagged or f"opts.{f.name}" in FIELDS_WITHOUT_FLAG, f.name
    assert {f.field for f in FLAGS} >= {"opts.CLIP_stop_at_last_layers", "opts.eta_noise_seed_delta", "mask_round"}
    assert next(f for f in FLAGS if f.field == "opts.CLIP_stop_at_last_layers").flag == "--clip-skip"


def test_every_flag_sets_its_field(sd1_tiny, files):
    """Each flag, given a non-default value, lands in its field of the processing object or its Options."""
    chosen = {
        "prompt": "a", "negative_prompt": "b", "seed": 5, "subseed": 6, "subseed_strength": 0.5,
        "seed_resize_from_h": 32, "seed_resize_from_w": 40, "sampler_name": "Heun",
        "scheduler": "karras", "steps": 7, "cfg_scale": 3.5, "batch_size": 2, "n_iter": 3, "width": 72,
        "height": 80, "eta": 0.5, "s_churn": 0.1, "s_tmin": 0.2, "s_tmax": 9.0, "s_noise": 0.9, "s_min_uncond": 0.3,
        "denoising_strength": 0.4, "resize_mode": 2, "mask_blur_x": 3, "mask_blur_y": 5, "mask_round": False,
        "inpainting_fill": 3, "inpaint_full_res": True, "inpaint_full_res_padding": 12, "inpainting_mask_invert": 1,
        "initial_noise_multiplier": 0.8, "image_cfg_scale": 1.2, "force_task_id": "t1",
        "refiner_checkpoint": "refiner.safetensors", "refiner_switch_at": 0.8,
        "opts.img2img_fix_steps": True, "opts.img2img_color_correction": True,
        "opts.img2img_background_color": "#000000", "opts.inpainting_mask_weight": 0.5,
        "opts.img2img_extra_noise": 0.2, "opts.overlay_inpaint": False, "opts.eta_noise_seed_delta": 31337,
        "opts.randn_source": "NV", "opts.eta_ancestral": 0.7, "opts.eta_ddim": 0.1,
        "opts.CLIP_stop_at_last_layers": 2, "opts.emphasis": "No norm", "opts.sigma_min": 0.1, "opts.sigma_max": 10.0,
        "opts.rho": 5.0, "opts.use_old_scheduling": True, "opts.always_discard_next_to_last_sigma": True,
        "opts.use_old_karras_scheduler_sigmas": True, "opts.save_to_dirs": False, "opts.vae_encode_sample": False,
        "mask_blend": "differential", "opts.beta_dist_alpha": 0.5, "opts.beta_dist_beta": 0.7,
        "opts.lora_dir": str(files), "opts.embeddings_dir": str(files), "disable_extra_networks": True,
        "opts.vae_tiling": True,
    }
    argv = ["img2img", str(files / "init.png")]
    for flag in processing_flags():
        if flag.field not in chosen:
            continue
        value = chosen[flag.field]
        assert value != cli.field_default(flag), flag.field
        if flag.kind is bool:
            argv.append(flag.flag if value else "--no-" + flag.flag[2:])
        else:
            argv += [flag.flag, str(value)]
    args = build_parser().parse_args(argv)
    values, _ = resolve_values(args, processing_flags())
    p = make_processing(sd1_tiny, values, "img2img", Image.open(files / "init.png"))
    for field, value in chosen.items():
        owner, name = (p.opts, field[5:]) if field.startswith("opts.") else (p, field)
        assert getattr(owner, name) == value, field
    untested = {f.field for f in processing_flags()} - set(chosen)
    assert untested == {"mask", "latent_mask", "mask_blur", "seed_enable_extras"}  # files; tested below
    args = build_parser().parse_args(["img2img", str(files / "init.png"), "--no-seed-enable-extras",
                                      "--seed-resize-from-w", "40", "--mask-blur", "6"])
    values, _ = resolve_values(args, processing_flags())
    p = make_processing(sd1_tiny, values, "img2img", Image.open(files / "init.png"))
    assert not p.seed_enable_extras and p.subseed_strength == 0 and p.seed_resize_from_w == 0  # A1111 __post_init__
    assert (p.mask_blur_x, p.mask_blur_y) == (6, 6)


def test_defaults_are_the_a1111_ui_defaults(sd1_tiny, files):
    """a1111-semantics §1 (UI column): 20 steps, d 0.75, fill 1 original, whole picture, padding 32, mask blur 4, DPM++ 2M;
    width/height the model's native size."""
    args = build_parser().parse_args(["img2img", str(files / "init.png")])
    values, _ = resolve_values(args, processing_flags())
    p = make_processing(sd1_tiny, values, "img2img", Image.open(files / "init.png"))
    assert (p.steps, p.denoising_strength, p.inpainting_fill, p.inpaint_full_res, p.inpaint_full_res_padding) == \
        (20, 0.75, 1, False, 32)
    assert (p.mask_blur_x, p.mask_blur_y, p.sampler_name, p.cfg_scale, p.seed) == (4, 4, "DPM++ 2M", 7.0, -1)
    assert (p.width, p.height) == (sd1_tiny.family.native_size,) * 2


def test_help_explains_strength_steps_and_masked_content(capsys):
    code, out, _ = run(capsys, "img2img", "--help")
    assert code == 0
    assert "t_enc = int(min(d, 0.999) * N)" in out and "d 0.75 -> 16 steps" in out
    for mode in ("0 fill", "1 original", "2 latent noise", "3 latent nothing"):
        assert mode in out
    for flag in processing_flags():
        assert flag.flag in out
    assert "--sampler" in out and "--from-infotext" in out and "--explain" in out


# -- --explain -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, steps, strength, extra, schedule_steps, t_enc, first_sigma, calls", [
    ("Euler a", 20, 0.75, [], 20, 15, 4.8557, 16),  # a1111-semantics §13: uniform slice starts at 4.8557, 16 calls
    ("DPM++ 2M", 20, 0.75, [], 20, 15, 5.7894, 16),  # a1111-semantics §13: karras 5.7894
    ("DPM++ 2M SDE", 20, 0.75, [], 20, 15, 3.9481, 16),  # a1111-semantics §13: exponential 3.9481
    ("Heun", 20, 0.75, [], 20, 15, 4.8557, 31),  # second order: 2 calls per step, 1 on the step to sigma 0
    ("Euler", 20, 0.3, [], 20, 6, None, 7),  # a1111-semantics §13 table
    ("Euler", 10, 0.35, [], 10, 3, None, 4),
    ("Euler", 20, 0.75, ["--img2img-fix-steps"], 26, 19, None, 20),  # a1111-semantics §13: fix steps 26, 19
])
def test_explain_steps_sigmas_and_calls(sd1_tiny, files, sampler, steps, strength, extra, schedule_steps, t_enc,
                                        first_sigma, calls):
    """a1111-semantics §6.2-6.3 and 13: t_enc, the sigma slice and the model calls; every call runs 2 rows (cond + uncond)."""
    plan = plan_for(sd1_tiny, files / "init.png", "--sampler", sampler, "--steps", steps, "--denoising-strength",
                    strength, "--seed", 1, *SMALL, *extra)
    assert (plan.steps, plan.t_enc) == (schedule_steps, t_enc)
    assert len(plan.sigma_sched) == t_enc + 2 and float(plan.sigma_sched[-1]) == 0
    if first_sigma is not None:
        assert float(plan.sigma_sched[0]) == pytest.approx(first_sigma, rel=1e-4)
    assert len(plan.unet_calls) == calls and all(rows == 2 for rows, _ in plan.unet_calls)


@pytest.mark.parametrize("name", [s.name for s in SAMPLERS])
def test_explain_runs_every_sampler(sd1_tiny, files, name):
    """The dry run goes through every sampler's real code. k-diffusion samplers make one call per step of the
    t_enc + 1 = 8 steps (10 steps at 0.75, a1111-semantics §6.2); second-order ones two, except into sigma 0
    (a1111-semantics §10.1);
    DDIM skips the grid's first entry (a1111-semantics §6.4): t_enc - 1 calls. DPM adaptive's count depends on the model."""
    info = next(s for s in SAMPLERS if s.name == name)
    plan = plan_for(sd1_tiny, files / "init.png", "--sampler", name, "--steps", 10, "--seed", 1, *SMALL)
    calls = len(plan.unet_calls)
    assert plan.t_enc == 7 and calls > 0
    if info.kind == "kdiffusion" and name != "DPM adaptive":
        assert calls == (2 * 8 - 1 if info.second_order else 8)
    elif name.startswith("DDIM"):
        assert calls == 6


def test_explain_ddim_walks_the_timestep_grid(sd1_tiny, files):
    """a1111-semantics §6.4/13: 20 steps at 0.75 -> noise level at timestep 751; the loop skips the grid's first entry, so the
    calls are at 701, 651, ..., 51 (14 calls)."""
    plan = plan_for(sd1_tiny, files / "init.png", "--sampler", "DDIM", "--steps", 20, "--seed", 1, *SMALL)
    assert plan.plan.passes[0].start_timestep == 751
    assert [round(t) for _, t in plan.unet_calls] == list(range(701, 50, -50))


def test_explain_mask_coverage_and_crop_region(sd1_tiny, files):
    """a1111-semantics §13: the 16x16 square at 24..39 of 64x64 -> exactly the 2x2 centre latent cells, with blur 0 and 4;
    "only masked" with padding 8 (no blur) crops (16, 16, 48, 48), padding 30 -> the whole image."""
    for blur in (0, 4):
        plan = plan_for(sd1_tiny, files / "init.png", "--mask", files / "square.png", "--mask-blur", blur,
                        "--seed", 1, "--steps", 2, *SMALL)
        nmask = plan.processed.nmask[0, 0]
        assert nmask.sum() == 4 and nmask[3:5, 3:5].sum() == 4 and plan.plan.paste_to is None
    plan = plan_for(sd1_tiny, files / "init.png", "--mask", files / "square.png", "--mask-blur", 0,
                    "--inpaint-full-res", "--inpaint-full-res-padding", 8, "--seed", 1, "--steps", 2, *SMALL)
    x, y, w, h = plan.plan.paste_to
    assert (x, y, x + w, y + h) == (16, 16, 48, 48)
    # The crop (16..48) is scaled 2x to 64x64, so the square covers pixels 16..48 = latent cells 2..5.
    assert plan.processed.nmask[0, 0].sum() == 16 and plan.processed.nmask[0, 0, 2:6, 2:6].sum() == 16
    plan = plan_for(sd1_tiny, files / "init.png", "--mask", files / "square.png", "--mask-blur", 0,
                    "--inpaint-full-res", "--inpaint-full-res-padding", 30, "--seed", 1, "--steps", 2, *SMALL)
    assert plan.plan.paste_to == (0, 0, 64, 64)
    plan = plan_for(sd1_tiny, files / "init.png", "--mask", files / "square.png", "--mask-blur", 0,
                    "--inpainting-mask-invert", 1, "--seed", 1, "--steps", 2, *SMALL)
    assert plan.processed.nmask[0, 0].sum() == 60


def test_explain_prints_the_plan_and_writes_nothing(capsys, files, sd1_tiny_path, tmp_path, monkeypatch):
    """a1111-semantics §8.1/13 seeds: seed 1000, batch 2, n_iter 2 -> 1000..1003; with strength 0.3 and subseed 7 the seeds
    stay 1000 and the variation seeds are 7..10. The UNet never runs (its forward raises here)."""
    from sdcore.models.unet import UNetModel

    def refuse(*a, **k):
        raise AssertionError("the UNet ran during --explain")

    monkeypatch.setattr(UNetModel, "forward", refuse)
    outdir = tmp_path / "never"
    code, out, err = run(capsys, "img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--explain", "--seed",
                         1000, "--batch-size", 2, "--n-iter", 2, "--sampler", "Euler a", "--mask", files / "square.png",
                         "--inpaint-full-res", "--mask-blur", 0, "--inpaint-full-res-padding", 8, *SMALL,
                         "--outdir", outdir)
    assert code == 0, err
    assert "t_enc = 15" in out and "4.8557, 3.8654" in out
    assert "model calls: 16 per batch x 2 batch(es); UNet rows per batch: 64" in out
    assert "crop region (x1, y1, x2, y2) = (16, 16, 48, 48)" in out
    assert "16 of 64 latent cells regenerated (0.2500)" in out
    assert "seeds (4 images): 1000, 1001, 1002, 1003" in out
    code, out, err = run(capsys, "img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--explain", "--seed",
                         1000, "--subseed", 7, "--subseed-strength", 0.3, "--n-iter", 4, "--steps", 2, *SMALL)
    assert code == 0, err
    assert "1000 (variation 7 at 0.3), 1000 (variation 8 at 0.3), 1000 (variation 9 at 0.3), " \
           "1000 (variation 10 at 0.3)" in out
    assert not outdir.exists()


# -- --from-infotext -------------------------------------------------------------------------------------------------

SPEC_INPAINT_INFOTEXT = (  # a1111-semantics §13 "Inpainting 'Only masked', DPM++ 2M, fill"
    "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
    "Seed: 1234, Size: 512x512, Model hash: 0123456789, Model: m, Denoising strength: 0.75, Mask blur: 4, "
    "Inpaint area: Only masked, Masked area padding: 32, Masked content: fill, Version: v1.10.1")


def test_infotext_keys_map_back_to_fields():
    values, unused = values_from_infotext(SPEC_INPAINT_INFOTEXT, processing_flags())
    assert values == {
        "prompt": "a cat", "negative_prompt": "blurry", "steps": 20, "sampler_name": "DPM++ 2M",
        "scheduler": "Karras", "cfg_scale": 7.0, "seed": 1234, "width": 512, "height": 512,
        "denoising_strength": 0.75, "mask_blur_x": 4, "mask_blur_y": 4, "inpaint_full_res": True,
        "inpaint_full_res_padding": 32, "inpainting_fill": 0,
        # absent keys that A1111 leaves out at their defaults (infotext_utils.parse_generation_parameters)
        "opts.CLIP_stop_at_last_layers": 1, "opts.randn_source": "GPU", "opts.sigma_min": 0.0,
        "opts.sigma_max": 0.0, "opts.rho": 0.0, "opts.eta_noise_seed_delta": 0, "subseed_strength": 0.0,
        "initial_noise_multiplier": 1.0, "opts.img2img_extra_noise": 0.0}
    assert unused == []
    text = ("x\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5.5, Seed: 9, Size: 64x72, "
            "Variation seed: 11, Variation seed strength: 0.2, Seed resize from: 40x48, Denoising strength: 0.5, "
            "Clip skip: 2, ENSD: 31337, RNG: NV, Mask mode: Inpaint not masked, Masked content: latent noise, "
            "Eta: 0.5, Sigma churn: 0.1, Noise multiplier: 0.9, Extra noise: 0.1, Conditional mask weight: 0.5, "
            "Emphasis: No norm, Hires upscale: 2, Version: sdcore-0.1.0")
    values, unused = values_from_infotext(text, processing_flags())
    assert values["scheduler"] is None and values["subseed"] == 11 and values["subseed_strength"] == 0.2
    assert (values["seed_resize_from_w"], values["seed_resize_from_h"]) == (40, 48)
    assert (values["width"], values["height"], values["opts.CLIP_stop_at_last_layers"]) == (64, 72, 2)
    assert (values["opts.eta_noise_seed_delta"], values["opts.randn_source"]) == (31337, "NV")
    assert (values["inpainting_mask_invert"], values["inpainting_fill"], values["opts.eta_ancestral"]) == (1, 2, 0.5)
    assert (values["s_churn"], values["initial_noise_multiplier"], values["opts.img2img_extra_noise"]) == \
        (0.1, 0.9, 0.1)
    assert (values["opts.inpainting_mask_weight"], values["opts.emphasis"]) == (0.5, "No norm")
    assert unused == ["Hires upscale"]


def test_from_infotext_reproduces_the_image_and_flags_override(capsys, files, sd1_tiny_path, sd1_tiny, tmp_path):
    """Every key processing writes reads back to the same field: re-running from a PNG's infotext gives the same
    pixels; flags on the command line win over the infotext."""
    code, out, err = run(capsys, "img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--prompt", "a (red:1.2) cat",
                         "--negative-prompt", "blur", "--seed", 7, "--steps", 3, "--sampler", "Euler a",
                         "--cfg-scale", 5, "--denoising-strength", 0.6, "--mask", files / "mask.png", "--mask-blur", 2,
                         "--inpainting-fill", 2, "--inpaint-full-res", "--inpaint-full-res-padding", 4,
                         "--clip-skip", 2, "--subseed", 3, "--subseed-strength", 0.2, "--eta-noise-seed-delta", 5,
                         "--randn-source", "NV", *SMALL, "--outdir", tmp_path / "a")
    assert code == 0, err
    first = Path(out.split()[0])
    code, out, err = run(capsys, "img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--mask", files / "mask.png",
                         "--from-infotext", first, "--outdir", tmp_path / "b")
    assert code == 0, err
    second = Path(out.split()[0])
    assert Image.open(first).text["parameters"] == Image.open(second).text["parameters"]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    plan = plan_for(sd1_tiny, files / "init.png", "--from-infotext", first, "--seed", 9, "--steps", 4)
    assert plan.processed.seeds == [9] and plan.p.steps == 4 and plan.p.denoising_strength == 0.6
    assert plan.plan.passes[0].sampler == "Euler a" and plan.p.opts.CLIP_stop_at_last_layers == 2


def _png_with_parameters(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("text, needle", [
    ("a\nSteps: abc, Sampler: Euler, CFG scale: 7", "'Steps: abc'"),
    ("a\nSteps: 20, Sampler: Euler, Denoising strength: 1.5", "--denoising-strength"),
    ("a\nSteps: 20, Sampler: Eulerr, CFG scale: 7", "--sampler-name"),
    ("a\nSteps: 20, Sampler: Euler, Masked content: blur", "'Masked content: blur'"),
    ("a\nSteps: 20, Sampler: Euler, Size: 60x64", "--width"),
    ("a\nSteps: 20, Sampler: Euler, CFG scale: nan", "'CFG scale: nan'"),
])
def test_bad_infotext_values_exit_2(capsys, files, sd1_tiny_path, tmp_path, text, needle):
    png = _png_with_parameters(tmp_path / "p.png", text)
    code, _, err = run(capsys, "img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--from-infotext", png,
                       "--outdir", tmp_path / "never")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--from-infotext" in err and needle in err
    assert not (tmp_path / "never").exists()


# -- batch folders ---------------------------------------------------------------------------------------------------

@pytest.fixture
def batch(tmp_path, astronaut, coffee):
    inputs, masks = tmp_path / "in", tmp_path / "masks"
    inputs.mkdir(), masks.mkdir()
    astronaut.resize((64, 64)).save(inputs / "a.png")
    coffee.resize((64, 48)).save(inputs / "b.jpg")
    (inputs / "readme.txt").write_text("ignored: not an image")
    rect_mask((64, 64), (8, 8, 40, 40)).save(masks / "a.png")
    rect_mask((64, 48), (16, 8, 48, 40)).save(masks / "b.png")
    return inputs, masks, tmp_path / "out"


def test_batch_writes_stem_pngs_skips_done_and_resumes(capsys, batch, sd1_tiny_path, monkeypatch):
    inputs, masks, out = batch
    argv = ["img2img", "--input-dir", inputs, "--mask-dir", masks, "--output-dir", out, "--ckpt", sd1_tiny_path,
            "--steps", 2, "--seed", 3, *SMALL]

    calls = []
    real = sdbatch._png_writer  # the folder batch runs the manifest code path (sdcore/batch.py)

    def interrupted_second_write(data):
        calls.append(1)
        if len(calls) < 2:
            return real(data)

        def write(tmp):
            tmp.write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt

        return write

    monkeypatch.setattr(sdbatch, "_png_writer", interrupted_second_write)
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in argv])
    capsys.readouterr()
    assert sorted(os.listdir(out)) == ["a.png"]  # no half-written b.png, no temporary file left
    a_bytes, a_mtime = (out / "a.png").read_bytes(), (out / "a.png").stat().st_mtime_ns
    monkeypatch.setattr(sdbatch, "_png_writer", real)

    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert "skip: a.png" in err and stdout.split() == [str(out / "b.png")]
    assert sorted(os.listdir(out)) == ["a.png", "b.png"]
    assert (out / "a.png").read_bytes() == a_bytes and (out / "a.png").stat().st_mtime_ns == a_mtime
    with Image.open(out / "b.png") as im:
        assert im.size == (64, 64) and "Seed: 3" in im.text["parameters"]

    code, stdout, err = run(capsys, *argv)
    assert code == 0 and stdout == "" and "skip: a.png" in err and "skip: b.jpg" in err


def test_write_new_file_never_overwrites(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        write_new_file(path, lambda tmp: tmp.write_bytes(b"second"))
    assert path.read_bytes() == b"first" and os.listdir(tmp_path) == ["x.png"]


def test_batch_names_one_output_per_image(capsys, batch, sd1_tiny_path):
    inputs, masks, out = batch
    code, stdout, err = run(capsys, "img2img", "--input-dir", inputs, "--output-dir", out, "--ckpt", sd1_tiny_path,
                            "--explain", "--batch-size", 2, "--steps", 2, *SMALL)
    assert code == 0, err
    assert f"a.png -> {out / 'a-0.png'}, {out / 'a-1.png'}" in stdout and not out.exists()


@pytest.mark.parametrize("change, needle", [
    (lambda i, m: Image.new("RGB", (8, 8)).save(i / "c.png"), "--mask-dir: no mask for c.png"),
    (lambda i, m: ((i / "c.png").write_bytes(b"garbage"), (m / "c.png").write_bytes((m / "a.png").read_bytes())),
     "--input-dir c.png"),
    (lambda i, m: (i / "a.jpg").write_bytes(b"x"), "share the stem 'a'"),
    (lambda i, m: Image.new("L", (8, 8)).save(m / "a.png"), "--mask-dir a.png: size 8x8"),
])
def test_batch_problems_exit_2_before_any_output(capsys, batch, sd1_tiny_path, change, needle):
    inputs, masks, out = batch
    change(inputs, masks)
    code, _, err = run(capsys, "img2img", "--input-dir", inputs, "--mask-dir", masks, "--output-dir", out,
                       "--ckpt", sd1_tiny_path, "--steps", 2, *SMALL)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists()


# -- --trace ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, calls", [("Euler", 3), ("Heun", 5)])
def test_trace_records_every_model_call_and_is_never_overwritten(capsys, files, sd1_tiny_path, sd1_tiny, tmp_path,
                                                                  sampler, calls):
    """a1111-semantics §6.2: int(0.5 * 4) = 2 -> 3 steps; Heun calls the model twice per step except into sigma 0 (5 calls).
    The trace's sigmas are the plan's model-call sigmas."""
    from sdcore.sampling.samplers import load_trace

    trace = tmp_path / "t.safetensors"
    common = ["--sampler", sampler, "--steps", 4, "--denoising-strength", 0.5, "--seed", 2, *SMALL]
    argv = ["img2img", files / "init.png", "--ckpt", sd1_tiny_path, *common, "--trace", trace]
    code, out, err = run(capsys, *argv, "--outdir", tmp_path / "out")
    assert code == 0 and str(trace) in out, err
    records = load_trace(trace)
    plan = plan_for(sd1_tiny, files / "init.png", *common)
    assert len(records) == len(plan.unet_calls) == calls
    assert [int(r["i"]) for r in records] == list(range(calls))
    planned = torch.tensor([s for _, s in plan.unet_calls])
    traced = torch.stack([r["sigma"].float().reshape(()) for r in records])
    assert torch.allclose(traced, planned, rtol=1e-4)
    assert float(traced[0]) == pytest.approx(float(plan.sigma_sched[0]))
    assert records[0]["x"].shape == records[0]["denoised"].shape == (1, 4, 8, 8)
    before = trace.read_bytes()
    code, _, err = run(capsys, *argv, "--outdir", tmp_path / "again")
    assert code == 2 and "--trace" in err and "exists" in err
    assert trace.read_bytes() == before and not (tmp_path / "again").exists()


# -- txt2img ---------------------------------------------------------------------------------------------------------

def test_txt2img_defaults_and_hires_flags(sd1_tiny):
    """txt2img's UI defaults (A1111 modules/ui.py): hires denoising 0.7, upscaler Latent, scale 2; no img2img flags."""
    args = build_parser().parse_args(["txt2img", "--enable-hr", "--hr-resize-x", "128", "--hr-second-pass-steps",
                                      "5", "--hr-sampler-name", "Euler", "--hr-prompt", "x"])
    values, _ = resolve_values(args, processing_flags("txt2img"))
    p = make_processing(sd1_tiny, values, "txt2img")
    assert isinstance(p, StableDiffusionProcessingTxt2Img)
    assert (p.denoising_strength, p.hr_upscaler, p.hr_scale, p.steps) == (0.7, "Latent", 2.0, 20)
    assert (p.enable_hr, p.hr_resize_x, p.hr_second_pass_steps, p.hr_sampler_name, p.hr_prompt) == \
        (True, 128, 5, "Euler", "x")
    assert {f.field for f in processing_flags("txt2img")}.isdisjoint({"mask", "inpainting_fill", "resize_mode"})


def test_txt2img_explain_both_passes(sd1_tiny):
    """First pass: the whole 4-step uniform schedule, Heun = 2 calls per step but 1 into sigma 0 -> 7. Hires pass:
    3 steps at d 0.5 are an explicit step count (a1111-semantics §6.2): a schedule of int(3 / 0.5) = 6 steps, t_enc 2
    -> 3 steps,
    5 calls."""
    plan = txt2img_plan(sd1_tiny, "--sampler", "Heun", "--steps", 4, "--seed", 3, *SMALL, "--enable-hr",
                        "--hr-second-pass-steps", 3, "--denoising-strength", 0.5)
    assert len(plan.sigma_sched) == 5 and float(plan.sigma_sched[0]) == pytest.approx(14.6146, rel=1e-4)
    assert (plan.hr_steps, plan.hr_t_enc) == (6, 2)
    assert [len(calls) for calls in plan.passes] == [7, 5]
    assert plan.p.hr_size() == (128, 128) and plan.processed.seeds == [3]


def test_txt2img_hires_run_reproduces_from_its_infotext(capsys, sd1_tiny_path, tmp_path):
    code, out, err = run(capsys, "txt2img", "--ckpt", sd1_tiny_path, "--prompt", "a cat", "--seed", 3, "--steps", 2,
                         *SMALL, "--enable-hr", "--hr-upscaler", "Lanczos", "--hr-second-pass-steps", 2,
                         "--outdir", tmp_path / "a")
    assert code == 0, err
    first = Path(out.split()[0])
    assert Image.open(first).size == (128, 128) and "Hires upscaler: Lanczos" in Image.open(first).text["parameters"]
    code, out, err = run(capsys, "txt2img", "--ckpt", sd1_tiny_path, "--from-infotext", first, "--outdir",
                         tmp_path / "b")
    assert code == 0 and err == "", err
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(out.split()[0])))


def test_txt2img_infotext_hires_keys():
    text = ("a\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.4, "
            "Hires resize: 1024x768, Hires steps: 5, Hires upscaler: Latent (nearest), "
            "Hires sampler: Use same sampler, Hires prompt: b, Mask blur: 4")
    values, unused = values_from_infotext(text, processing_flags("txt2img"))
    assert values["enable_hr"] is True and values["denoising_strength"] == 0.4
    assert (values["hr_resize_x"], values["hr_resize_y"], values["hr_second_pass_steps"]) == (1024, 768, 5)
    assert (values["hr_upscaler"], values["hr_sampler_name"], values["hr_prompt"]) == ("Latent (nearest)", None, "b")
    assert unused == ["Mask blur"]
    values, _ = values_from_infotext("a\nSteps: 20, Sampler: Euler, Seed: 1", processing_flags("txt2img"))
    assert values["enable_hr"] is False


@pytest.mark.parametrize("extra, arg", [
    (["--enable-hr", "--hr-upscaler", "Bicubic"], "--hr-upscaler"),
    (["--enable-hr", "--hr-scale", "1.3"], "hires size"),  # 83 px: not a multiple of 8
    (["--width", "100"], "--width"),
    (["--hr-sampler-name", "nope"], "--hr-sampler-name"),
    (["--mask", "m.png"], "--mask"),  # not a txt2img flag
])
def test_txt2img_bad_values_exit_2(capsys, sd1_tiny_path, tmp_path, extra, arg):
    code, _, err = run(capsys, "txt2img", "--ckpt", sd1_tiny_path, "--outdir", tmp_path / "never", *SMALL[2:],
                       *(["--width", "64"] if "--width" not in extra else []), *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and arg in err, err
    assert not (tmp_path / "never").exists()


# -- bad input -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, arg", [
    (["--denoising-strength", "1.5"], "--denoising-strength"),
    (["--denoising-strength", "-0.1"], "--denoising-strength"),
    (["--width", "60"], "--width"),
    (["--height", "0"], "--height"),
    (["--steps", "0"], "--steps"),
    (["--steps", "abc"], "--steps"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--batch-size", "0"], "--batch-size"),
    (["--n-iter", "0"], "--n-iter"),
    (["--seed", "-2"], "--seed"),
    (["--subseed-strength", "2"], "--subseed-strength"),
    (["--seed-resize-from-w", "4"], "--seed-resize-from-w"),
    (["--resize-mode", "4"], "--resize-mode"),
    (["--mask-blur", "-1"], "--mask-blur"),
    (["--mask-blur-x", "2000"], "--mask-blur-x"),
    (["--mask-blur", "4", "--mask-blur-x", "2"], "--mask-blur"),
    (["--inpainting-fill", "5"], "--inpainting-fill"),
    (["--inpaint-full-res-padding", "-4"], "--inpaint-full-res-padding"),
    (["--inpainting-mask-invert", "2"], "--inpainting-mask-invert"),
    (["--initial-noise-multiplier", "-1"], "--initial-noise-multiplier"),
    (["--eta", "-1"], "--eta"),
    (["--s-noise", "-1"], "--s-noise"),
    (["--inpainting-mask-weight", "1.5"], "--inpainting-mask-weight"),
    (["--img2img-extra-noise", "2"], "--img2img-extra-noise"),
    (["--clip-skip", "0"], "--clip-skip"),
    (["--emphasis", "Loud"], "--emphasis"),
    (["--randn-source", "TPU"], "--randn-source"),
    (["--img2img-background-color", "notacolour"], "--img2img-background-color"),
    (["--sigma-min", "5", "--sigma-max", "1"], "--sigma-min"),
    (["--scheduler", "karas"], "--scheduler"),
    (["--sampler", "Eulerr"], "Eulerr"),
    (["--sampler-name", "Eulerr"], "--sampler-name"),
    (["--mask", "{files}/small_mask.png"], "--mask"),
    (["--mask", "{files}/notes.txt"], "--mask"),
    (["--mask", "{files}/truncated.png"], "--mask"),
    (["--latent-mask", "{files}/mask.png"], "--latent-mask"),
    (["--mask", "{files}/mask.png", "--latent-mask", "{files}/small_mask.png", "--width", "64", "--height", "64"],
     "--latent-mask"),
    (["--from-infotext", "{files}/no_params.png"], "--from-infotext"),
    (["--from-infotext", "{files}/notes.txt"], "--from-infotext"),
    (["--from-infotext", "{files}/missing.png"], "--from-infotext"),
    (["--trace", "{files}/trace.pt"], "--trace"),
    (["--output-dir", "{files}/out"], "--output-dir"),
    (["--input-dir", "{files}"], "init"),
    (["--outdir", "{files}/notes.txt"], "--outdir"),
])
def test_bad_values_exit_2_naming_the_argument_and_write_nothing(capsys, files, sd1_tiny_path, tmp_path, extra,
                                                                  arg):
    outdir = tmp_path / "never"
    extra = [e.format(files=files) for e in extra]
    code, out, err = run(capsys, "img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--outdir", outdir, *extra)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and arg in err, err
    assert not outdir.exists()


def test_unreadable_init_and_checkpoint(capsys, files, tmp_path):
    code, _, err = run(capsys, "img2img", files / "notes.txt", "--ckpt", files / "init.png", "--outdir", tmp_path)
    assert code == 2 and "init" in err
    code, _, err = run(capsys, "img2img", files / "init.png", "--ckpt", files / "notes.txt", "--outdir", tmp_path)
    assert code == 2 and "notes.txt" in err
    code, _, err = run(capsys, "img2img", "--outdir", tmp_path)
    assert code == 2 and "init: missing" in err
    code, _, err = run(capsys, "inpaint", files / "init.png", "--outdir", tmp_path)
    assert code == 2 and "--mask" in err


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/sdcore-cli-pwned",))


def test_hostile_files_are_refused(capsys, files, sd1_tiny_path, tmp_path, monkeypatch):
    import pickle

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": {"x": _Evil()}}))
    code, _, err = run(capsys, "img2img", files / "init.png", "--ckpt", evil, "--outdir", tmp_path / "o")
    assert code == 2 and "evil.ckpt" in err and not os.path.exists("/tmp/sdcore-cli-pwned")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 pixels > the limit: a decompression bomb
    code, _, err = run(capsys, "img2img", files / "init.png", "--ckpt", sd1_tiny_path, "--outdir", tmp_path / "o")
    assert code == 2 and "init" in err and "Decompression" in err
    huge = tmp_path / "huge.txt"
    huge.write_text("a" * (cli.MAX_INFOTEXT_BYTES + 1))
    code, _, err = run(capsys, "img2img", files / "init.png", "--from-infotext", huge, "--outdir", tmp_path / "o")
    assert code == 2 and "--from-infotext" in err
    assert not (tmp_path / "o").exists()


def test_info_lists_every_text_encoder_of_sdxl(capsys, tmp_path):
    from make_checkpoint import make_state_dict, write_checkpoint

    path = tmp_path / "xl.safetensors"
    write_checkpoint(make_state_dict("sdxl", "tiny", seed=0, dtype=torch.float16), path, metadata={})
    code, out, _ = run(capsys, "info", path)
    assert code == 0 and "family: sdxl" in out
    assert "text_encoder.conditioner.embedders.0.transformer" in out and "conditioner.embedders.1.model" in out
    assert "file dtypes: float16" in out


def test_mask_blend_flag_names_are_the_blend_table():
    from sdcore.cli.flags import BLEND_NAMES
    from sdcore.sampling.blends import BLENDS

    assert BLEND_NAMES == tuple(BLENDS)


def test_mask_blend_from_infotext(sd1_tiny):
    """"Mask blend: xt" (sdcore's key) and A1111's soft-inpainting keys restore the strategy, parameters included."""
    from sdcore.cli.flags import values_from_infotext
    from sdcore.sampling.blends import SoftInpaintingBlend

    base = "a cat\nSteps: 4, Sampler: Euler, Seed: 1, Size: 64x64"
    values, unused = values_from_infotext(base + ", Mask blend: xt", processing_flags())
    assert values["mask_blend"].name == "xt" and not unused
    text = base + ", " + ", ".join(f"{k}: {v}" for k, v in SoftInpaintingBlend(mask_blend_power=2).infotext().items())
    values, unused = values_from_infotext(text, processing_flags())
    assert values["mask_blend"] == SoftInpaintingBlend(mask_blend_power=2) and not unused
