"""`sdcore img2img | inpaint | txt2img | info | samplers`: a thin command line over the Python API.

Every processing flag sets one field of `StableDiffusionProcessingImg2Img` (`...Txt2Img` for txt2img) or of its
`opts: Options`, under the A1111 name with dashes (`--denoising-strength` -> `denoising_strength`; one exception,
`--clip-skip` -> `CLIP_stop_at_last_layers`); `FLAGS` is the table. A value comes from, in increasing priority:
the field's default (the A1111 UI default where spec 1 gives one), `--from-infotext FILE`, the command line.

Bad input exits with status 2 and one line naming the argument, before anything is written (no output directory
is created). `--explain` runs the whole job with stand-ins for the UNet and VAE that only record what they are
asked (a dry run through `process_images`), so the plan it prints is what a real run does.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CKPT = Path(__file__).resolve().parent.parent / "weights" / "sdcore-tiny.safetensors"
DEFAULT_OUTDIRS = {"img2img": Path("outputs/img2img-images"), "inpaint": Path("outputs/img2img-images"),
                   "txt2img": Path("outputs/txt2img-images")}
MAX_INFOTEXT_BYTES = 1 << 20  # PIL's own cap on a PNG text chunk (PngImagePlugin.MAX_TEXT_CHUNK)

IMG2IMG_HELP = """\
img2img: noise the init image's latent to the level set by --denoising-strength, then denoise it with the prompt.

denoising strength d in [0, 1] and the steps actually run (A1111 sd_samplers_common.setup_img2img_steps, spec 6.2):
  the schedule is built for --steps N, and only its last t_enc + 1 steps run, t_enc = int(min(d, 0.999) * N):
    N = 20: d 0.75 -> 16 steps, d 0.5 -> 11, d 0.3 -> 7, d 1.0 -> 20, d 0 -> 1 (at the smallest sigma).
  Each step is one model call (two for second-order samplers: Heun, DPM2, DPM++ 2S a, DPM++ SDE, Restart), and each
  call runs the UNet on 2 x batch-size rows (cond + uncond for CFG). --img2img-fix-steps runs exactly N steps of a
  longer schedule (int(N / d) steps) instead. d = 0 keeps the image, d = 1 starts from (almost) pure noise.
  --explain prints t_enc, the sigmas, the model calls and the seeds without running the UNet.

inpainting (--mask, white = regenerate, black = keep): --inpainting-fill sets what the masked area starts from:
  0 fill            the masked area is painted with blurred surrounding colours before encoding
  1 original        the init image itself (default; best for small changes)
  2 latent noise    the masked latent cells are replaced by unit Gaussian noise (seeded per image)
  3 latent nothing  the masked latent cells are set to zero
  --inpaint-full-res ("Only masked") processes a crop around the mask at --width x --height and pastes it back;
  otherwise the whole picture is processed. Kept pixels are pasted back through the blurred mask (--overlay-inpaint).

batch: --input-dir DIR --output-dir OUT [--mask-dir MASKS] writes OUT/<stem>.png per input (<stem>-<k>.png for
  several images per input), skips inputs whose outputs exist, never overwrites, and can be re-run after an
  interruption (outputs are written to a temporary name, then linked into place).
"""

TXT2IMG_HELP = """\
txt2img: sample --width x --height from pure noise with the prompt (--steps model steps, two per step for
  second-order samplers, each on 2 x batch-size UNet rows for CFG).

hires fix (--enable-hr): upscale the first pass by --hr-scale (or to --hr-resize-x x --hr-resize-y) with
  --hr-upscaler (Latent* = in latent space; Lanczos, Nearest, None = decode, resize the pixels, encode), then run
  img2img on it at --denoising-strength for --hr-second-pass-steps (0 = --steps) steps: the schedule is stretched
  to int(steps / d) steps and its last `steps` run (A1111's explicit-steps rule, spec 6.2).
  --explain prints both passes' sigmas, the model calls and the seeds without running the UNet.
"""


# ---------------------------------------------------------------------------------------------------------------
# The flag table


class UsageError(ValueError):
    """A bad command line or input file; printed as one line, exit status 2."""


class _Default:
    """Marker: the flag's default is its dataclass field's default (read from processing.py)."""

    def __repr__(self) -> str:
        return "<field default>"


FIELD_DEFAULT: Any = _Default()


@dataclass(frozen=True)
class Flag:
    """One command-line flag = one field (`field` of the processing object, or `opts.<name>` of its Options).

    `kind`: int, float, str, bool or Path (a file read as an image). `default`: the value used when neither the
    command line nor an infotext sets it (FIELD_DEFAULT = the dataclass's; None for width/height = the model's
    native size). `check(value)` returns None or what is allowed. `infotext`: the A1111 infotext key whose value
    `--from-infotext` copies into this field. `name` overrides the flag name derived from the field.
    """

    field: str
    kind: type
    help: str
    default: Any = FIELD_DEFAULT
    check: Callable[[Any], str | None] | None = None
    infotext: str | None = None
    name: str | None = None
    aliases: tuple[str, ...] = ()
    allow_inf: bool = False

    @property
    def flag(self) -> str:
        return "--" + (self.name or self.field.removeprefix("opts.").replace("_", "-"))

    @property
    def is_option(self) -> bool:
        return self.field.startswith("opts.")

    def parse(self, text: str) -> Any:
        """Convert a string (from an infotext) to this flag's type; ValueError names what was expected."""
        if self.kind is bool:
            if text.strip().lower() in ("true", "1"):
                return True
            if text.strip().lower() in ("false", "0"):
                return False
            raise ValueError("expected True or False")
        if self.kind is int:
            return int(text.strip())
        if self.kind is float:
            return _finite_float(text, self.allow_inf)
        return text


def _finite_float(text: str, allow_inf: bool = False) -> float:
    value = float(text)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _between(lo: float, hi: float | None = None) -> Callable[[Any], str | None]:
    def check(v):
        if v < lo or (hi is not None and v > hi):
            return f"must be in [{lo}, {hi}]" if hi is not None else f"must be >= {lo}"
        return None
    return check


def _one_of(*allowed) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"allowed: {', '.join(map(repr, allowed))}"


def _size(v: int) -> str | None:
    return None if 8 <= v <= 16384 and v % 8 == 0 else "must be a multiple of 8 in [8, 16384] (pixels)"


def _seed(v: int) -> str | None:
    return None if -1 <= v < 2 ** 63 else "must be -1 (random) or an integer in [0, 2**63)"


def _seed_resize(v: int) -> str | None:
    return None if v in (-1, 0) or 8 <= v <= 16384 else "must be -1 or 0 (off) or a size in [8, 16384] pixels"


def _known(lookup_name: str) -> Callable[[str], str | None]:
    """A check that a name resolves through `sdcore.sampling.<lookup_name>` (ValueError text = what is allowed)."""
    def check(v: str) -> str | None:
        import importlib

        module, function = lookup_name.rsplit(".", 1)
        try:
            getattr(importlib.import_module(f"sdcore.sampling.{module}"), function)(v)
        except ValueError as e:
            return str(e)
        return None

    return check


_sampler = _known("samplers.find_sampler")
_scheduler = _known("schedules.find_scheduler")


def _colour(v: str) -> str | None:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(v)
    except ValueError:
        return "must be a colour PIL understands, e.g. '#ffffff' or 'white'"
    return None


def _emphasis(v: str) -> str | None:
    from .prompts import EMPHASIS_MODES

    return None if v in EMPHASIS_MODES else f"allowed: {', '.join(map(repr, EMPHASIS_MODES))}"


def _hr_upscaler(v: str) -> str | None:
    from .processing import StableDiffusionProcessingTxt2Img as P

    allowed = [*P.LATENT_UPSCALERS, *P.PIXEL_UPSCALERS]
    return None if v in allowed else f"allowed: {', '.join(map(repr, allowed))}"


def _randn_source(v: str) -> str | None:
    from .rng import SOURCES

    return None if v in SOURCES else f"allowed: {', '.join(map(repr, SOURCES))}"


NON_NEGATIVE = _between(0)
UNIT = _between(0, 1)

FLAGS: tuple[Flag, ...] = (
    # prompts and seeds (StableDiffusionProcessing, spec 1, 8)
    Flag("prompt", str, "text prompt (A1111 syntax: (emphasis:1.2), [from:to:when], [a|b], BREAK, AND)",
         infotext="Prompt"),
    Flag("negative_prompt", str, "negative prompt (the unconditional branch of CFG)", infotext="Negative prompt"),
    Flag("seed", int, "seed of the first image; image k uses seed + k; -1 = random (resolved, written to the "
         "infotext)", check=_seed, infotext="Seed"),
    Flag("subseed", int, "variation seed; -1 = random", check=_seed, infotext="Variation seed"),
    Flag("subseed_strength", float, "variation strength: slerp of the seed's noise towards the variation seed's, "
         "0 = off", check=UNIT, infotext="Variation seed strength"),
    Flag("seed_resize_from_h", int, "'resize seed from' height in pixels: draw the noise at this size and paste it "
         "centred; -1 or 0 = off", check=_seed_resize, infotext="Seed resize from-2"),
    Flag("seed_resize_from_w", int, "'resize seed from' width in pixels; -1 or 0 = off", check=_seed_resize,
         infotext="Seed resize from-1"),
    Flag("seed_enable_extras", bool, "honour subseed and seed resize (A1111 'Extra' checkbox)"),
    # sampler (spec 10)
    Flag("sampler_name", str, "sampler (see `sdcore samplers`); 'DPM++ 2M Karras' style names also set the "
         "scheduler", default="DPM++ 2M", check=_sampler, infotext="Sampler", aliases=("--sampler",)),
    Flag("scheduler", str, "schedule type: automatic (the sampler's), uniform, karras, exponential, polyexponential, "
         "sgm_uniform, kl_optimal, align_your_steps, simple, normal, ddim, beta", check=_scheduler,
         infotext="Schedule type"),
    Flag("steps", int, "sampling steps of the full schedule (img2img runs only the last t_enc + 1, see above)",
         default=20, check=_between(1, 10000), infotext="Steps"),
    Flag("cfg_scale", float, "classifier-free guidance scale", infotext="CFG scale"),
    Flag("batch_size", int, "images per sampling batch", check=_between(1, 1024)),
    Flag("n_iter", int, "number of batches", check=_between(1, 10000)),
    Flag("width", int, "processing width in pixels, a multiple of 8; default: the model's native size", default=None,
         check=_size, infotext="Size-1"),
    Flag("height", int, "processing height in pixels (as --width); default: the model's native size",
         default=None, check=_size, infotext="Size-2"),
    Flag("eta", float, "noise multiplier of ancestral / SDE / DDIM steps; default: --eta-ancestral (k-diffusion) "
         "or --eta-ddim", check=NON_NEGATIVE),
    Flag("s_churn", float, "Karras churn of Euler / Heun / DPM2 (default: 0)", check=NON_NEGATIVE,
         infotext="Sigma churn"),
    Flag("s_tmin", float, "churn only at sigma >= s-tmin (default: 0)", check=NON_NEGATIVE, infotext="Sigma tmin"),
    Flag("s_tmax", float, "churn only at sigma <= s-tmax (default: 0 = infinity)", check=NON_NEGATIVE,
         infotext="Sigma tmax", allow_inf=True),
    Flag("s_noise", float, "scale of the noise added by stochastic steps (default: 1)", check=NON_NEGATIVE,
         infotext="Sigma noise"),
    Flag("s_min_uncond", float, "NGMS: skip the uncond branch on odd calls below this sigma (default: 0 = off)",
         check=NON_NEGATIVE, infotext="NGMS"),
    # img2img (StableDiffusionProcessingImg2Img, spec 1-2)
    Flag("denoising_strength", float, "how much of the schedule to run, in [0, 1] (see above)", default=0.75,
         check=UNIT, infotext="Denoising strength"),
    Flag("resize_mode", int, "0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale)",
         check=_one_of(0, 1, 2, 3)),
    Flag("mask", Path, "mask image, same size as the init image: white (255) = regenerate, black = keep; an RGBA "
         "mask with transparency uses its alpha"),
    Flag("mask_blur", int, "Gaussian blur sigma of the mask in pixels for both axes; sets --mask-blur-x and -y "
         "(default: unset, they keep their own defaults)",
         check=_between(0, 1024)),
    Flag("mask_blur_x", int, "mask blur along x, pixels", check=_between(0, 1024)),
    Flag("mask_blur_y", int, "mask blur along y, pixels", check=_between(0, 1024)),
    Flag("mask_round", bool, "binarise the mask's alpha and round the latent mask"),
    Flag("inpainting_fill", int, "masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing (see above)",
         default=1, check=_one_of(0, 1, 2, 3)),
    Flag("inpaint_full_res", bool, "inpaint area 'Only masked': process a crop around the mask (default: whole "
         "picture)", default=False),
    Flag("inpaint_full_res_padding", int, "'Only masked' padding around the mask's bounding box, pixels",
         default=32, check=_between(0, 16384), infotext="Masked area padding"),
    Flag("inpainting_mask_invert", int, "1 = inpaint what is not masked", check=_one_of(0, 1)),
    Flag("initial_noise_multiplier", float, "scale of the initial noise (default: 1)", check=_between(0, 100),
         infotext="Noise multiplier"),
    Flag("latent_mask", Path, "a separate mask (processing size) for the latent blend and the fill; needs --mask"),
    Flag("image_cfg_scale", float, "image guidance scale, instruct-pix2pix models only (ignored otherwise)",
         default=1.5, check=NON_NEGATIVE, infotext="Image CFG scale"),
    Flag("force_task_id", str, "a task id recorded in the infotext"),
    Flag("refiner_checkpoint", str, "SDXL refiner checkpoint file that takes over at --refiner-switch-at"),
    Flag("refiner_switch_at", float, "completed fraction (0..1, by noise level) at which the refiner takes over",
         check=UNIT, infotext="Refiner switch at"),
    # txt2img hires fix (StableDiffusionProcessingTxt2Img)
    Flag("enable_hr", bool, "hires fix: upscale the first pass and denoise it again (see above)"),
    Flag("hr_scale", float, "hires upscale factor (used when --hr-resize-x/y are 0)", check=_between(1, 16),
         infotext="Hires upscale"),
    Flag("hr_upscaler", str, "Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
         "Latent (nearest), Latent (nearest-exact), Lanczos, Nearest, None", check=_hr_upscaler,
         infotext="Hires upscaler"),
    Flag("hr_second_pass_steps", int, "hires steps; 0 = --steps", check=_between(0, 10000), infotext="Hires steps"),
    Flag("hr_resize_x", int, "hires width in pixels (0 = from --hr-scale, or from the height keeping the aspect)",
         check=_between(0, 16384), infotext="Hires resize-1"),
    Flag("hr_resize_y", int, "hires height in pixels (0 = from --hr-scale, or from the width)",
         check=_between(0, 16384), infotext="Hires resize-2"),
    Flag("hr_sampler_name", str, "sampler of the hires pass (default: the same)", check=_sampler,
         infotext="Hires sampler"),
    Flag("hr_scheduler", str, "schedule type of the hires pass (default: the same)", check=_scheduler,
         infotext="Hires schedule type"),
    Flag("hr_prompt", str, "prompt of the hires pass (empty: the same)", infotext="Hires prompt"),
    Flag("hr_negative_prompt", str, "negative prompt of the hires pass (empty: the same)",
         infotext="Hires negative prompt"),
    # A1111 settings (Options, spec 1 'Relevant global options')
    Flag("opts.img2img_fix_steps", bool, "run exactly --steps steps of a longer schedule"),
    Flag("opts.img2img_color_correction", bool, "match the output's colours to the init image (LAB histograms)"),
    Flag("opts.img2img_background_color", str, "colour under transparent init images", check=_colour),
    Flag("opts.inpainting_mask_weight", float, "inpainting models: how much of the masked area is hidden from the "
         "conditioning image, in [0, 1]", check=UNIT, infotext="Conditional mask weight"),
    Flag("opts.img2img_extra_noise", float, "extra unscaled noise added to the noised init latent, in [0, 1]",
         check=UNIT, infotext="Extra noise"),
    Flag("opts.overlay_inpaint", bool, "paste the kept original pixels back over the result"),
    Flag("opts.eta_noise_seed_delta", int, "ENSD: added to the seeds of the per-step noise", check=_between(0, 2 ** 32),
         infotext="ENSD"),
    Flag("opts.randn_source", str, "noise generator: CPU (torch CPU), GPU (torch on the model's device), NV "
         "(Philox, CUDA's stream on any device)", check=_randn_source, infotext="RNG"),
    Flag("opts.eta_ancestral", float, "default eta of k-diffusion samplers", check=NON_NEGATIVE, infotext="Eta"),
    Flag("opts.eta_ddim", float, "default eta of DDIM", check=NON_NEGATIVE, infotext="Eta DDIM"),
    Flag("opts.CLIP_stop_at_last_layers", int, "CLIP skip: use the output of the N-th last text-encoder layer",
         check=_between(1, 12), infotext="Clip skip", name="clip-skip"),
    Flag("opts.emphasis", str, "prompt emphasis mode: Original, No norm, Ignore, None", check=_emphasis,
         infotext="Emphasis"),
    Flag("opts.sigma_min", float, "schedule's smallest sigma (0 = the model's)", check=NON_NEGATIVE,
         infotext="Schedule min sigma"),
    Flag("opts.sigma_max", float, "schedule's largest sigma (0 = the model's)", check=NON_NEGATIVE,
         infotext="Schedule max sigma"),
    Flag("opts.rho", float, "karras / polyexponential rho (0 = the scheduler's)", check=NON_NEGATIVE,
         infotext="Schedule rho"),
    Flag("opts.use_old_scheduling", bool, "old prompt-editing timelines", infotext="Old prompt editing timelines"),
    Flag("opts.always_discard_next_to_last_sigma", bool, "drop the penultimate sigma for every sampler",
         infotext="Discard penultimate sigma"),
    Flag("opts.use_old_karras_scheduler_sigmas", bool, "karras schedule over sigma 0.1 .. 10 (old A1111)"),
    Flag("opts.save_to_dirs", bool, "save into a YYYY-MM-DD subfolder of --outdir"),
    Flag("opts.vae_encode_sample", bool, "encode by sampling the VAE posterior (seeded per image) rather than "
         "taking its mean"),
)

# Fields with no flag of their own, and why. tests/test_cli.py checks that every field is either flagged or here.
FIELDS_WITHOUT_FLAG = {
    "sd_model": "--ckpt", "init_images": "INIT or --input-dir", "outpath_samples": "--outdir",
    "outpath_grids": "no grids are written", "prompt_for_display": "display only",
    "styles": "styles are not supported", "restore_faces": "not implemented", "tiling": "not implemented",
    "do_not_save_samples": "the CLI always saves", "do_not_save_grid": "no grids are written",
    "extra_generation_params": "written by processing", "overlay_images": "internal state",
    "do_not_reload_embeddings": "no embeddings", "ddim_discretize": "not implemented",
    "override_settings": "the opts flags", "override_settings_restore_afterwards": "no global settings",
    "sampler_index": "--sampler-name",
    "token_merging_ratio": "not implemented", "token_merging_ratio_hr": "not implemented",
    "disable_extra_networks": "no extra networks", "firstpass_image": "not implemented", "comments": "internal",
    "firstphase_width": "legacy hires field, not implemented", "firstphase_height": "legacy hires field, not "
    "implemented", "hr_checkpoint_name": "not implemented",
    "opts": "the opts flags",
    # Options that A1111 also has on p: the p field's flag sets them (p's value wins when given).
    "opts.initial_noise_multiplier": "--initial-noise-multiplier", "opts.s_churn": "--s-churn",
    "opts.s_tmin": "--s-tmin", "opts.s_tmax": "--s-tmax", "opts.s_noise": "--s-noise",
    "opts.s_min_uncond": "--s-min-uncond",
}

# A1111 UI defaults that differ between commands (modules/ui.py: txt2img's hires denoising strength is 0.7).
COMMAND_DEFAULTS = {"txt2img": {"denoising_strength": 0.7, "hr_upscaler": "Latent"}}

# How --from-infotext reads keys whose value does not map to one field by the flag's type.
MASKED_CONTENT = {"fill": 0, "original": 1, "latent noise": 2, "latent nothing": 3}
INPAINT_AREA = {"Whole picture": False, "Only masked": True}
MASK_MODE = {"Inpaint masked": 0, "Inpaint not masked": 1}
INFOTEXT_LABELS = {"Inpaint area": ("inpaint_full_res", INPAINT_AREA),
                   "Masked content": ("inpainting_fill", MASKED_CONTENT),
                   "Mask mode": ("inpainting_mask_invert", MASK_MODE)}
# Absent keys that mean a default (A1111 `infotext_utils.parse_generation_parameters` fills the first six the same
# way; the others are written only when non-default, spec 9.3).
INFOTEXT_ABSENT = {"Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": "0",
                   "Schedule min sigma": "0", "Schedule rho": "0", "ENSD": "0", "Variation seed strength": "0",
                   "Noise multiplier": "1.0", "Extra noise": "0"}
# Keys that describe the run but set nothing (hashes, names, versions).
INFOTEXT_INFORMATIONAL = {"Model hash", "Model", "Version", "VAE hash", "VAE", "Init image hash", "User", "Task ID",
                          "Lora hashes", "TI hashes", "Hires checkpoint"}
# Infotext values meaning "not set" (A1111 writes them for the hires pass).
INFOTEXT_NONE = {"Use same sampler", "Use same scheduler", "Automatic"}


def processing_class(command: str):
    """The processing dataclass a command fills."""
    from .processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img

    return StableDiffusionProcessingTxt2Img if command == "txt2img" else StableDiffusionProcessingImg2Img


def processing_flags(command: str = "img2img") -> tuple[Flag, ...]:
    """The flags of a command: FLAGS whose field its processing class has, plus a generic flag for any Options
    field added since the table was written."""
    from .processing import Options

    cls_fields = {f.name for f in dataclasses.fields(processing_class(command)) if f.init}
    mine = tuple(f for f in FLAGS if f.is_option or f.field in cls_fields)
    known = {f.field for f in FLAGS} | set(FIELDS_WITHOUT_FLAG)
    extra = tuple(Flag(f"opts.{f.name}", type(f.default), f"A1111 option {f.name}")
                  for f in dataclasses.fields(Options) if f"opts.{f.name}" not in known
                  and type(f.default) in (bool, int, float, str))
    return mine + extra


def field_default(flag: Flag, command: str = "img2img") -> Any:
    """The value a flag has when nothing sets it."""
    if flag.field in COMMAND_DEFAULTS.get(command, {}):
        return COMMAND_DEFAULTS[command][flag.field]
    if flag.default is not FIELD_DEFAULT:
        return flag.default
    from .processing import Options

    cls, name = (Options, flag.field[5:]) if flag.is_option else (processing_class(command), flag.field)
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    raise KeyError(f"{flag.field} is not a field of {cls.__name__}")


# ---------------------------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage block) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_processing_flags(ap: argparse.ArgumentParser, command: str) -> None:
    cls = processing_class(command).__name__
    group = ap.add_argument_group(f"processing (one flag per field of {cls} / Options)")
    for flag in processing_flags(command):
        said = "default" in flag.help  # the help text explains the default itself
        where = f"[{flag.field}]" if said else f"[{flag.field}; default: {field_default(flag, command)!r}]"
        kwargs: dict[str, Any] = {"dest": flag.field, "default": argparse.SUPPRESS, "help": f"{flag.help} {where}"}
        if flag.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif flag.kind is float:
            kwargs["type"] = lambda s, inf=flag.allow_inf: _argparse_float(s, inf)
            kwargs["metavar"] = "X"
        elif flag.kind is int:
            kwargs["type"] = int
            kwargs["metavar"] = "N"
        elif flag.kind is Path:
            kwargs["type"] = Path
            kwargs["metavar"] = "FILE"
        else:
            kwargs["metavar"] = "TEXT" if flag.check is None else "NAME"
        group.add_argument(flag.flag, *flag.aliases, **kwargs)


def _argparse_float(text: str, allow_inf: bool) -> float:
    try:
        return _finite_float(text, allow_inf)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid finite number: {text!r}") from None


def _add_run_flags(ap: argparse.ArgumentParser, command: str) -> None:
    if command != "txt2img":
        ap.add_argument("init", type=Path, nargs="?", help="init image file (or use --input-dir)")
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint .safetensors/.ckpt (LDM layout); "
                    "default: the bundled tiny model")
    ap.add_argument("--outdir", type=Path, default=None, help=f"where PNGs are written, A1111 names "
                    f"(<outdir>/<YYYY-MM-DD>/00000-<seed>.png); default {DEFAULT_OUTDIRS[command]}")
    ap.add_argument("--vae", type=Path, metavar="FILE", help="a separate VAE file replacing the checkpoint's")
    ap.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type (SD2-768 "
                    "models are v; default: NAME.yaml beside the checkpoint, else A1111's probe)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, mps")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="UNet and text-encoder dtype (the VAE runs in float32)")
    ap.add_argument("--explain", action="store_true", help="print the plan (t_enc, sigmas, model calls, mask "
                    "coverage, crop region, seeds) without running the UNet; writes nothing")
    ap.add_argument("--from-infotext", type=Path, metavar="FILE", help="reuse the parameters of a PNG's A1111 "
                    "'parameters' text (or a .txt file holding it); flags given on the command line win")
    ap.add_argument("--trace", type=Path, metavar="FILE.safetensors", help="record sigma, x, denoised and the "
                    "index of every model call, second-order sub-steps included (scripts/compare_traces.py compares "
                    "two); never overwrites")
    if command == "txt2img":
        return
    ap.add_argument("--input-dir", type=Path, metavar="DIR", help="batch: every image in DIR (needs --output-dir)")
    ap.add_argument("--mask-dir", type=Path, metavar="DIR", help="batch: the mask of input <stem>.* is "
                    "DIR/<stem>.*; a folder with a single image uses it for every input")
    ap.add_argument("--output-dir", type=Path, metavar="DIR", help="batch: writes DIR/<stem>.png; existing outputs "
                    "are skipped, never overwritten")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="sdcore", description="Stable Diffusion img2img, inpainting and txt2img (A1111 semantics)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, what, text in (("img2img", "img2img / inpainting of an image file", IMG2IMG_HELP),
                             ("inpaint", "inpainting: img2img that needs a mask", IMG2IMG_HELP),
                             ("txt2img", "an image from a prompt, optionally with the hires fix", TXT2IMG_HELP)):
        sp = sub.add_parser(name, help=what, description=text, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_run_flags(sp, name)
        _add_processing_flags(sp, name)
    info = sub.add_parser("info", help="what a checkpoint is, and why")
    info.add_argument("ckpt", type=Path, nargs="?", default=DEFAULT_CKPT)
    info.add_argument("--vae", type=Path, metavar="FILE", help="a separate VAE file")
    info.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    sub.add_parser("samplers", help="list sampler names, aliases and default schedulers")
    return ap


# ---------------------------------------------------------------------------------------------------------------
# Values: defaults < infotext < command line


def _checked(flag: Flag, value: Any, source: str) -> Any:
    """`value` if the flag's check accepts it; else UsageError naming the flag, the value and what is allowed."""
    if value is not None and flag.check is not None:
        problem = flag.check(value)
        if problem:
            raise UsageError(f"{source}{flag.flag}: {value!r}; {problem}")
    return value


def read_infotext_file(path: Path) -> str:
    """The A1111 "parameters" text of a PNG (or the whole of a .txt file). UsageError if unreadable or absent."""
    arg = f"--from-infotext {path}"
    if path.suffix.lower() == ".txt":
        try:
            if path.stat().st_size > MAX_INFOTEXT_BYTES:
                raise UsageError(f"{arg}: larger than {MAX_INFOTEXT_BYTES} bytes")
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{arg}: cannot read ({e.__class__.__name__}: {e})") from e
    image = open_image(path, "--from-infotext")
    text = image.info.get("parameters")
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{arg}: no A1111 'parameters' text in the file")
    return text


def values_from_infotext(text: str, flags: tuple[Flag, ...], source: str = "--from-infotext: "
                         ) -> tuple[dict[str, Any], list[str]]:
    """Map an infotext to {field: value} for the given flags, plus the keys that set nothing.

    Keys follow `sdcore.infotext.parse_infotext` (spec 9.3): "Size" gives width and height, "Mask blur" both blur
    axes, "Inpaint area" / "Masked content" / "Mask mode" their A1111 labels, and any "Hires upscale/upscaler/
    resize" key turns the hires fix on (as A1111's paste does). Absent keys that A1111 omits at their default
    (`INFOTEXT_ABSENT`) set that default. Raises UsageError for a text without a parameter line or a bad value.
    """
    from .infotext import parse_infotext

    params = parse_infotext(text)
    if set(params) <= {"Prompt", "Negative prompt"}:
        raise UsageError(f"{source}no A1111 parameter line ('Steps: ..., Sampler: ..., ...') in the text")
    hires = any(k in params for k in ("Hires upscale", "Hires upscaler", "Hires resize-1"))
    absent = {key: value for key, value in INFOTEXT_ABSENT.items() if key not in params}
    params.update(absent)
    fields = {f.field: f for f in flags}
    by_key = {f.infotext: f for f in flags if f.infotext}
    values: dict[str, Any] = {"enable_hr": hires} if "enable_hr" in fields else {}
    unused = []
    for key, raw in params.items():
        if key == "Mask blur" and "mask_blur_x" in fields:
            values["mask_blur_x"] = values["mask_blur_y"] = _parse_infotext_value(fields["mask_blur_x"], key, raw,
                                                                                   source)
        elif key in INFOTEXT_LABELS and INFOTEXT_LABELS[key][0] in fields:
            field, table = INFOTEXT_LABELS[key]
            if raw not in table:
                raise UsageError(f"{source}'{key}: {raw}'; allowed: {', '.join(map(repr, table))}")
            values[field] = table[raw]
        elif key in by_key:
            flag = by_key[key]
            none = flag.kind is str and raw in INFOTEXT_NONE
            values[flag.field] = None if none else _parse_infotext_value(flag, key, raw, source)
        elif key not in INFOTEXT_INFORMATIONAL and key not in absent:
            unused.append(key)
    return values, unused


def _parse_infotext_value(flag: Flag, key: str, raw: str, source: str) -> Any:
    try:
        value = flag.parse(raw)
    except ValueError as e:
        raise UsageError(f"{source}'{key}: {raw}' is not a valid {flag.flag} ({e})") from None
    return _checked(flag, value, f"{source}'{key}: {raw}' -> ")


def resolve_values(args: argparse.Namespace, flags: tuple[Flag, ...]) -> tuple[dict[str, Any], list[str]]:
    """{field: value} for every flag: defaults, then --from-infotext, then the command line (each checked)."""
    values = {f.field: field_default(f, args.command) for f in flags}
    unused: list[str] = []
    if args.from_infotext is not None:
        source = f"--from-infotext {args.from_infotext}: "
        found, unused = values_from_infotext(read_infotext_file(args.from_infotext), flags, source)
        values.update(found)
    explicit = {f.field: getattr(args, f.field) for f in flags if hasattr(args, f.field)}
    for flag in flags:
        if flag.field in explicit:
            values[flag.field] = _checked(flag, explicit[flag.field], "")
    if "mask_blur" in explicit and ({"mask_blur_x", "mask_blur_y"} & set(explicit)):
        raise UsageError("--mask-blur: sets both axes; give it or --mask-blur-x / --mask-blur-y, not both")
    if values.get("mask_blur") is not None:
        values["mask_blur_x"] = values["mask_blur_y"] = values["mask_blur"]
    smin, smax = values.get("opts.sigma_min"), values.get("opts.sigma_max")
    if smin and smax and smin >= smax:
        raise UsageError(f"--sigma-min: {smin}; must be smaller than --sigma-max {smax}")
    return values, unused


# ---------------------------------------------------------------------------------------------------------------
# Files


def open_image(path: Path, arg: str):
    """Read an image file fully into memory. UsageError naming `arg` for anything Pillow cannot or should not read.

    Decompression bombs (more than `PIL.Image.MAX_IMAGE_PIXELS` pixels) are refused, not just warned about.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.copy()
    # A decoder of hostile bytes can raise nearly anything (OSError, SyntaxError, ValueError, EOFError, struct.error,
    # DecompressionBomb*); all mean "not a usable image".
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{arg}: cannot read image {path} ({e.__class__.__name__}: {e})") from e


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
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    return lambda tmp: image.save(tmp, format="PNG", pnginfo=info)


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
    from PIL import Image

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


# ---------------------------------------------------------------------------------------------------------------
# Running jobs


def _load_model(path: Path, device: str, dtype: str, vae: Path | None = None, prediction: str | None = None):
    import torch

    from .checkpoint import load_checkpoint

    return load_checkpoint(path, device=device, dtype=getattr(torch, dtype), vae=vae, prediction=prediction)


def make_processing(sd, values: dict[str, Any], command: str, init=None, mask=None, latent_mask=None,
                    outdir: Path | None = None):
    """The command's processing object from resolved flag values (width/height None -> the model's native size)."""
    from .processing import Options

    fields = {k: v for k, v in values.items() if not k.startswith("opts.")}
    opts = Options(**{k[5:]: v for k, v in values.items() if k.startswith("opts.")})
    size = sd.family.native_size
    fields.update(width=fields["width"] or size, height=fields["height"] or size)
    if command != "txt2img":
        fields.update(init_images=[init], mask=mask, latent_mask=latent_mask)
    return processing_class(command)(sd_model=sd, opts=opts, outpath_samples=None if outdir is None else str(outdir),
                                     **fields)


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
    from tqdm.auto import tqdm

    for task in tqdm(todo, desc="images", unit="input", disable=None if len(todo) > 1 else True):
        run_task(sd, values, command, task, outdir, args.trace)
    return 0


def run_task(sd, values: dict[str, Any], command: str, task: Task, outdir: Path | None, trace: Path | None) -> None:
    """Run one job; print the saved paths. Batch tasks write only their missing outputs."""
    from .processing import process_images

    p = make_processing(sd, values, command, *_open_inputs(task, values), outdir=outdir)
    recorder = None
    if trace is not None:
        from .sampling.samplers import TraceRecorder

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
        meta = {"index": "model call", "command": command, "sampler": p.sampler.name, "scheduler": str(p.scheduler),
                "steps": str(p.steps),
                "denoising_strength": str(p.denoising_strength), "seeds": json.dumps(processed.seeds),
                "infotext": processed.infotexts[0], "calls": str(len(recorder.records))}
        write_new_file(trace, lambda tmp: recorder.save(tmp, metadata=meta))
        print(trace)


# ---------------------------------------------------------------------------------------------------------------
# --explain: a dry run through process_images with recording stand-ins for the UNet and the VAE


def _recording_unet(out_channels: int, events: list):
    import torch

    class RecordingUNet(torch.nn.Module):
        """Stands in for the UNet: records ("call", rows, timestep) per call, returns zeros (eps = 0: denoised = x)."""

        def forward(self, x, timesteps, context=None, y=None):
            events.append(("call", x.shape[0], float(timesteps.reshape(-1)[0])))
            return x.new_zeros(x.shape[0], out_channels, *x.shape[2:])

    return RecordingUNet()


def _zero_vae(config):
    import torch

    from .models.vae import DiagonalGaussianDistribution

    factor = 2 ** (len(config.ch_mult) - 1)

    class ZeroVAE(torch.nn.Module):
        """Stands in for the VAE: zero latents and zero pixels of the right shapes."""

        def encode(self, x):
            b, _, h, w = x.shape
            return DiagonalGaussianDistribution(x.new_zeros(b, 2 * config.embed_dim, h // factor, w // factor))

        def decode(self, z):
            b, _, h, w = z.shape
            return z.new_zeros(b, config.out_ch, h * factor, w * factor)

    return ZeroVAE()


def split_passes(events: list[tuple]) -> list[list[tuple[int, float]]]:
    """Group recorded UNet calls into sampling passes: a pass starts at a sampler callback with step index 0.

    `events`: ("call", rows, timestep) from the recording UNet and ("step", i) from the sampler callback, in order.
    A call belongs to the pass of the next callback (samplers call the model, then the callback).
    """
    passes: list[list[tuple[int, float]]] = []
    pending: list[tuple[int, float]] = []
    for kind, *data in events:
        if kind == "call":
            pending.append((data[0], data[1]))
            continue
        if data[0] == 0 or not passes:
            passes.append([])
        passes[-1] += pending
        pending = []
    if pending:
        passes.append(pending) if not passes else passes[-1].extend(pending)
    return passes


@dataclass
class Plan:
    """What a job will do, read off a dry run (see `dry_run`).

    `passes`: the UNet calls (rows, timestep) of each sampling pass, in order (n_iter passes, or 2 * n_iter with
    the hires fix). img2img: `steps`, `t_enc` from `setup_img2img_steps`, `sigma_sched` the tail of the schedule
    (t_enc + 2 values) or, for timestep samplers, `timesteps` the grid. txt2img: `sigma_sched` the whole schedule,
    t_enc None; `hr_steps`, `hr_t_enc` for the hires pass.
    """

    p: Any
    processed: Any
    passes: list[list[tuple[int, float]]]
    steps: int
    t_enc: int | None
    sigma_sched: Any
    timesteps: Any
    hr_steps: int | None = None
    hr_t_enc: int | None = None

    @property
    def unet_calls(self) -> list[tuple[int, float]]:
        return [c for calls in self.passes for c in calls]


def dry_run(sd, values: dict[str, Any], task: Task, command: str = "img2img") -> Plan:
    """Run `process_images` on the job with the UNet and VAE replaced by recording stand-ins (text encoder real).

    Seeds, masks, crop regions, schedules and the sampler's calls come from the same processing code as a real
    run. Only values that depend on the UNet's output differ: DPM adaptive's step count. Nothing is saved.
    """
    from .processing import process_images
    from .sampling import schedules

    fam, events = sd.family, []
    stub = dataclasses.replace(sd, unet=_recording_unet(fam.unet.out_channels, events), vae=_zero_vae(fam.vae),
                               path=None)
    p = make_processing(stub, values, command, *_open_inputs(task, values))
    processed = process_images(p, callback=lambda d: events.append(("step", int(d["i"]))), disable_progress=True)
    plan = Plan(p, processed, split_passes(events), p.steps, None, None, None)
    if command == "txt2img":
        plan.sigma_sched = p.get_sigmas(p.steps) if p.sampler.kind != "timestep" else None
        if p.enable_hr:
            plan.hr_steps, plan.hr_t_enc = schedules.setup_img2img_steps(
                p.hr_second_pass_steps or p.steps, p.denoising_strength, fix_steps=True)
    else:
        plan.steps, plan.t_enc = schedules.setup_img2img_steps(p.steps, p.denoising_strength, p.opts.img2img_fix_steps)
        if p.sampler.kind != "timestep":
            plan.sigma_sched = schedules.img2img_sigmas(p.get_sigmas(plan.steps), plan.steps, plan.t_enc)
    if p.sampler.kind == "timestep":
        from .sampling.timesteps import get_timesteps

        plan.timesteps = get_timesteps(plan.steps, p.sampler.discard_next_to_last_sigma)
    return plan


def _numbers(values, fmt: str = "{:.4f}") -> str:
    return ", ".join(fmt.format(float(v)) for v in values)


def _calls_line(p, name: str, calls: list[tuple[int, float]], n_passes: int, timestep: bool) -> list[str]:
    import torch

    rows = sum(r for r, _ in calls)
    note = " (DPM adaptive: the count depends on the model's outputs)" if p.sampler.name == "DPM adaptive" else ""
    lines = [f"{name}model calls: {len(calls)} per batch x {n_passes} batch(es); UNet rows per batch: {rows} "
             f"(batch {p.batch_size} x 2 for cond + uncond in each call){note}"]
    if timestep:
        lines.append(f"{name}model call timesteps: {_numbers([t for _, t in calls], '{:.0f}')}")
    elif calls:
        sigmas = p.denoiser_schedule().t_to_sigma(torch.tensor([t for _, t in calls]))
        lines.append(f"{name}model call sigmas: {_numbers(sigmas)}")
    return lines


def explain(sd, values: dict[str, Any], command: str, task: Task) -> str:
    """The plan of one job as text: t_enc, sigmas, model calls, mask coverage, crop region, seeds."""
    plan = dry_run(sd, values, task, command)
    p, processed = plan.p, plan.processed
    h, w = p.height // 8, p.width // 8
    lines = [f"model: {sd.family.name} ({sd.path}); size {p.width}x{p.height} px = latent {w}x{h} cells"]
    if task.init is not None:
        lines.insert(0, f"input: {task.init}" + (f" -> {', '.join(map(str, task.outputs))}" if task.outputs else ""))
    timestep = p.sampler.kind == "timestep"
    scheduler = "" if timestep else f"; scheduler: {p.extra_generation_params.get('Schedule type', 'Uniform')}"
    order = " (second order: two model calls per step)" if p.sampler.second_order else ""
    lines.append(f"sampler: {p.sampler.name}{scheduler}{order}")
    if command == "txt2img":
        lines.append(f"steps: {p.steps} from pure noise")
        if plan.sigma_sched is not None:
            lines.append(f"sigmas ({len(plan.sigma_sched)} values): {_numbers(plan.sigma_sched)}")
    else:
        fix = " (img2img-fix-steps)" if p.opts.img2img_fix_steps else ""
        lines.append(f"steps: {p.steps}, denoising strength {p.denoising_strength} -> a schedule of {plan.steps} "
                     f"steps{fix}, t_enc = {plan.t_enc}")
        if timestep:
            lines.append(f"timesteps: noise level of t = {int(plan.timesteps[plan.t_enc])}, then the sampler walks "
                         f"{_numbers(reversed(plan.timesteps[:plan.t_enc]), '{:.0f}')}")
        else:
            lines.append(f"sigma slice: the last {plan.t_enc + 1} steps, {len(plan.sigma_sched)} values (noise added "
                         f"at the first): {_numbers(plan.sigma_sched)}")
    per_batch = len(plan.passes) // p.n_iter
    lines += _calls_line(p, "first pass " if per_batch == 2 else "", plan.passes[0], p.n_iter, timestep)
    if per_batch == 2:
        hw, hh = p.hr_size()
        lines.append(f"hires pass: {p.hr_upscaler or 'Latent'} to {hw}x{hh} px, {p.hr_second_pass_steps or p.steps} "
                     f"steps at denoising strength {p.denoising_strength} -> a schedule of {plan.hr_steps} steps, "
                     f"t_enc = {plan.hr_t_enc}")
        hr_timestep = find_sampler_kind(p.hr_sampler_name) if p.hr_sampler_name else timestep
        lines += _calls_line(p, "hires pass ", plan.passes[1], p.n_iter, hr_timestep)
    if processed.nmask is not None:
        nmask = processed.nmask[0, 0].float()
        cells = int((nmask > 0).sum())
        lines.append(f"mask coverage: {cells} of {h * w} latent cells regenerated ({cells / (h * w):.4f}); "
                     f"mean regenerate weight {float(nmask.mean()):.4f}")
        lines.append(f"masked content: {['fill', 'original', 'latent noise', 'latent nothing'][p.inpainting_fill]}")
    elif command != "txt2img":
        lines.append("mask: none (every latent cell regenerated)")
    if getattr(p, "paste_to", None) is not None:
        x, y, pw, ph = p.paste_to
        lines.append(f"inpaint area: only masked; crop region (x1, y1, x2, y2) = ({x}, {y}, {x + pw}, {y + ph}), "
                     f"processed at {p.width}x{p.height}, pasted back at {pw}x{ph}")
    elif processed.nmask is not None:
        lines.append("inpaint area: whole picture")
    for comment in processed.comments.values():
        lines.append(f"note: {comment}")
    seeds = ", ".join(f"{s}" + (f" (variation {v} at {p.subseed_strength})" if p.subseed_strength else "")
                      for s, v in zip(processed.seeds, processed.subseeds))
    lines.append(f"seeds ({len(processed.seeds)} images): {seeds}")
    return "\n".join(lines)


def find_sampler_kind(name: str) -> bool:
    """True if the named sampler is a timestep sampler (DDIM, PLMS, UniPC)."""
    from .sampling.samplers import find_sampler

    return find_sampler(name)[0].kind == "timestep"


# ---------------------------------------------------------------------------------------------------------------
# info, samplers, main


def run_info(args) -> int:
    from .checkpoint import load_checkpoint

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
    from .sampling.samplers import SAMPLERS

    for s in SAMPLERS:
        print(f"{s.name:20s} aliases: {', '.join(s.aliases) or '-':30s} scheduler: {s.scheduler or 'uniform'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sdcore` console script; returns the exit status (2 for bad input)."""
    from .checkpoint import CheckpointError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a parse error (2, already printed in one line)
        return e.code if isinstance(e.code, int) else 2
    run = {"img2img": run_generate, "inpaint": run_generate, "txt2img": run_generate, "info": run_info,
           "samplers": run_samplers}[args.command]
    try:
        return run(args)
    except (ValueError, TypeError, NotImplementedError, CheckpointError, OSError) as e:
        message = " ".join(str(e).split("\n"))
        print(f"sdcore: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
