"""The flag table, the argparse parser built from it, and the values a run uses.

Every processing flag sets one field of `StableDiffusionProcessingImg2Img` (`...Txt2Img` for txt2img) or of its
`opts: Options`, under the A1111 name with dashes (`--denoising-strength` -> `denoising_strength`; one exception,
`--clip-skip` -> `CLIP_stop_at_last_layers`); `FLAGS` is the table. A value comes from, in increasing priority:
the field's default (the A1111 UI default where a1111-semantics §1 gives one), `--from-infotext FILE` (mapped by
`values_from_infotext`), the command line; `resolve_values` applies them and checks each (UsageError naming the flag).

Nothing here imports torch (open_image's EXIF helper aside): the processing fields' defaults and the sampler,
scheduler, emphasis, upscaler, noise-source and blend-key names are literal copies (PROCESSING_DEFAULTS,
OPTIONS_DEFAULTS, SAMPLER_NAMES, ...), which tests/test_hostile_cli.py compares with their sources, so --help and
every argument error answer at once.
"""
from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageColor

from ..infotext import parse_infotext

DEFAULT_CKPT = Path(__file__).resolve().parent.parent / "weights" / "sdcore-tiny.safetensors"  # package data
DEFAULT_OUTDIRS = {"img2img": Path("outputs/img2img-images"), "inpaint": Path("outputs/img2img-images"),
                   "txt2img": Path("outputs/txt2img-images")}
MAX_INFOTEXT_BYTES = 1 << 20  # PIL's own cap on a PNG text chunk (PngImagePlugin.MAX_TEXT_CHUNK)

IMG2IMG_HELP = """\
img2img: noise the init image's latent to the level set by --denoising-strength, then denoise it with the prompt.

denoising strength d in [0, 1] and the steps actually run (A1111 sd_samplers_common.setup_img2img_steps, a1111-semantics §6.2):
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
  to int(steps / d) steps and its last `steps` run (A1111's explicit-steps rule, a1111-semantics §6.2).
  --explain prints both passes' sigmas, the model calls and the seeds without running the UNet.
"""


# ---------------------------------------------------------------------------------------------------------------
# The flag table


class UsageError(ValueError):
    """A bad command line or input file; printed as one line, exit status 2."""


class _Default:
    """Marker: the flag's default is its dataclass field's default (PROCESSING_DEFAULTS / OPTIONS_DEFAULTS)."""

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


# sdcore.sampling.blends.BLENDS (tests/test_cli.py checks they agree); a literal so --help needs no torch import.
BLEND_NAMES = ("a1111", "xt", "soft_inpainting", "differential")
# The infotext keys of the blends (sdcore.sampling.blends: MASK_BLEND_KEY, SOFT_INPAINTING_ENABLED_LABEL and
# SOFT_INPAINTING_LABELS' values; tests/test_hostile_cli.py checks): only an infotext holding one imports blends.
BLEND_INFOTEXT_KEYS = frozenset({
    "Mask blend", "Soft inpainting enabled", "Soft inpainting schedule bias", "Soft inpainting preservation strength",
    "Soft inpainting transition contrast boost", "Soft inpainting mask influence",
    "Soft inpainting difference threshold", "Soft inpainting difference contrast"})


def _size(v: int) -> str | None:
    return None if 8 <= v <= 16384 and v % 8 == 0 else "must be a multiple of 8 in [8, 16384] (pixels)"


def _seed(v: int) -> str | None:
    return None if -1 <= v < 2 ** 63 else "must be -1 (random) or an integer in [0, 2**63)"


def _seed_resize(v: int) -> str | None:
    return None if v in (-1, 0) or 8 <= v <= 16384 else "must be -1 or 0 (off) or a size in [8, 16384] pixels"


# The names the checks below accept, as literals: --help and every argument error must answer without importing
# torch (the modules holding these tables import it). tests/test_hostile_cli.py checks each equals its source.
# sdcore.sampling.samplers.SAMPLERS: name -> aliases, in table order.
SAMPLER_NAMES = {
    "DPM++ 2M": ("k_dpmpp_2m",), "DPM++ SDE": ("k_dpmpp_sde",), "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
    "DPM++ 2M SDE Heun": ("k_dpmpp_2m_sde_heun",), "DPM++ 2S a": ("k_dpmpp_2s_a",),
    "DPM++ 3M SDE": ("k_dpmpp_3m_sde",), "Euler a": ("k_euler_a", "k_euler_ancestral"), "Euler": ("k_euler",),
    "LMS": ("k_lms",), "Heun": ("k_heun",), "DPM2": ("k_dpm_2",), "DPM2 a": ("k_dpm_2_a",),
    "DPM fast": ("k_dpm_fast",), "DPM adaptive": ("k_dpm_ad",), "Restart": ("restart",), "DDIM": ("ddim",),
    "DDIM CFG++": ("ddim_cfgpp",), "PLMS": ("plms",), "UniPC": ("unipc",), "LCM": ("k_lcm",),
}
# sdcore.sampling.schedules.SCHEDULERS: name -> (label, *aliases), in table order.
SCHEDULER_NAMES = {
    "automatic": ("Automatic",), "uniform": ("Uniform",), "karras": ("Karras",), "exponential": ("Exponential",),
    "polyexponential": ("Polyexponential",), "sgm_uniform": ("SGM Uniform", "SGMUniform"),
    "kl_optimal": ("KL Optimal",), "align_your_steps": ("Align Your Steps",), "simple": ("Simple",),
    "normal": ("Normal",), "ddim": ("DDIM",), "beta": ("Beta",),
}
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")  # sdcore.prompts.EMPHASIS_MODES
RANDN_SOURCES = ("CPU", "GPU", "NV")  # sdcore.rng.SOURCES
# sdcore.pipeline.LATENT_UPSCALERS, then PIXEL_UPSCALERS (StableDiffusionProcessingTxt2Img's).
HR_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                "Latent (nearest)", "Latent (nearest-exact)", "None", "Lanczos", "Nearest")


def _sampler(v: str) -> str | None:
    """`sdcore.sampling.samplers.find_sampler`'s rule: trailing " <scheduler label, name or alias>" parts are split
    off in table order, then the rest must be a sampler name or alias (tests check the two agree)."""
    base = v
    for name, (label, *aliases) in SCHEDULER_NAMES.items():
        for suffix in (label, name, *aliases):
            if base.endswith(" " + suffix):
                base = base[:-(len(suffix) + 1)]
    if any(base == name or base in aliases for name, aliases in SAMPLER_NAMES.items()):
        return None
    return (f"unknown sampler {v!r}; valid names: {', '.join(SAMPLER_NAMES)} (aliases: "
            f"{', '.join(a for aliases in SAMPLER_NAMES.values() for a in aliases)}), optionally followed by a "
            "scheduler label such as ' Karras'")


def _scheduler(v: str) -> str | None:
    if any(v == name or v in labels for name, labels in SCHEDULER_NAMES.items()):
        return None
    return (f"unknown scheduler {v!r}; expected one of {list(SCHEDULER_NAMES)} (or their labels "
            f"{[labels[0] for labels in SCHEDULER_NAMES.values()]})")


def _colour(v: str) -> str | None:
    try:
        ImageColor.getrgb(v)
    except ValueError:
        return "must be a colour PIL understands, e.g. '#ffffff' or 'white'"
    return None


def _emphasis(v: str) -> str | None:
    return None if v in EMPHASIS_MODES else f"allowed: {', '.join(map(repr, EMPHASIS_MODES))}"


def _hr_upscaler(v: str) -> str | None:
    return None if v in HR_UPSCALERS else f"allowed: {', '.join(map(repr, HR_UPSCALERS))}"


def _folder(v: str) -> str | None:
    return None if Path(v).is_dir() else f"an existing folder ({v} is not one)"


def _randn_source(v: str) -> str | None:
    return None if v in RANDN_SOURCES else f"allowed: {', '.join(map(repr, RANDN_SOURCES))}"


NON_NEGATIVE = _between(0)
UNIT = _between(0, 1)

FLAGS: tuple[Flag, ...] = (
    # prompts and seeds (StableDiffusionProcessing, a1111-semantics §1, 8)
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
    # sampler (a1111-semantics §10)
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
    # img2img (StableDiffusionProcessingImg2Img, a1111-semantics §1-2)
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
    Flag("mask_blend", str, "per-step mask blend: a1111 (x0 blend, default), xt (noised init latent, as diffusers), "
         "soft_inpainting (A1111's soft inpainting with its default parameters), differential (the grey mask as a "
         "per-pixel strength map)", check=lambda v: _one_of(*BLEND_NAMES)(v) if isinstance(v, str) else None),
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
    # A1111 settings (Options, a1111-semantics §1 'Relevant global options')
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
    Flag("opts.lora_dir", str, "folder of LoRA / LyCORIS files (searched recursively) for the prompt's "
         "<lora:name:te:unet> tags; name = file stem", check=_folder),
    Flag("opts.embeddings_dir", str, "folder of textual-inversion embeddings (searched recursively); a prompt uses "
         "one by writing its file stem", check=_folder),
    Flag("disable_extra_networks", bool, "cut <lora:...> tags out of the prompt but apply no network"),
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
    Flag("opts.vae_tiling", bool, "run the VAE in tiles with whole-image GroupNorm statistics (the untiled result "
         "up to float rounding, in a fraction of the memory); --no-vae-tiling never; default: automatic, when the "
         "untiled VAE would not fit in the memory available (--explain says which)"),
)

# Fields with no flag of their own, and why. tests/test_cli.py checks that every field is either flagged or here.
FIELDS_WITHOUT_FLAG = {
    "sd_model": "--ckpt", "init_images": "INIT or --input-dir", "outpath_samples": "--outdir",
    "outpath_grids": "no grids are written", "prompt_for_display": "display only",
    "styles": "styles are not supported", "restore_faces": "not implemented", "tiling": "not implemented",
    "do_not_save_samples": "the CLI always saves", "do_not_save_grid": "no grids are written",
    "extra_generation_params": "written by processing", "overlay_images": "internal state",
    "do_not_reload_embeddings": "embeddings are read once per job", "ddim_discretize": "not implemented",
    "override_settings": "the opts flags", "override_settings_restore_afterwards": "no global settings",
    "sampler_index": "--sampler-name",
    "token_merging_ratio": "not implemented", "token_merging_ratio_hr": "not implemented",
    "firstpass_image": "not implemented", "comments": "internal",
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
# way; the others are written only when non-default, a1111-semantics §9.3).
INFOTEXT_ABSENT = {"Clip skip": "1", "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": "0",
                   "Schedule min sigma": "0", "Schedule rho": "0", "ENSD": "0", "Variation seed strength": "0",
                   "Noise multiplier": "1.0", "Extra noise": "0"}
# Keys that describe the run but set nothing (hashes, names, versions).
INFOTEXT_INFORMATIONAL = {"Model hash", "Model", "Version", "VAE hash", "VAE", "Init image hash", "User", "Task ID",
                          "Lora hashes", "TI hashes", "Hires checkpoint"}
# Infotext values meaning "not set" (A1111 writes them for the hires pass).
INFOTEXT_NONE = {"Use same sampler", "Use same scheduler", "Automatic"}


# The processing dataclasses' fields and defaults (`sdcore.processing`), as literals: the parser's help shows them and
# `processing_flags` reads which fields a command has, and importing processing would import torch.
# tests/test_hostile_cli.py checks these equal `dataclasses.fields` of the classes (names, order, defaults).
PROCESSING_CLASS_NAMES = {"img2img": "StableDiffusionProcessingImg2Img", "inpaint": "StableDiffusionProcessingImg2Img",
                          "txt2img": "StableDiffusionProcessingTxt2Img"}
OPTIONS_DEFAULTS = {
    "img2img_fix_steps": False, "img2img_color_correction": False, "img2img_background_color": "#ffffff",
    "inpainting_mask_weight": 1.0, "img2img_extra_noise": 0.0, "overlay_inpaint": True,
    "initial_noise_multiplier": 1.0, "eta_noise_seed_delta": 0, "randn_source": "CPU", "eta_ancestral": 1.0,
    "eta_ddim": 0.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "s_min_uncond": 0.0,
    "CLIP_stop_at_last_layers": 1, "emphasis": "Original", "sigma_min": 0.0, "sigma_max": 0.0, "rho": 0.0,
    "use_old_scheduling": False, "always_discard_next_to_last_sigma": False, "use_old_karras_scheduler_sigmas": False,
    "save_to_dirs": True, "vae_encode_sample": True, "beta_dist_alpha": 0.6, "beta_dist_beta": 0.6,
    "lora_dir": None, "embeddings_dir": None, "vae_tiling": None,
}
_COMMON_DEFAULTS = {  # StableDiffusionProcessing; "opts" defaults to Options() (OPTIONS_DEFAULTS)
    "sd_model": None, "outpath_samples": None, "outpath_grids": None, "prompt": "", "prompt_for_display": None,
    "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "seed_enable_extras": True, "sampler_name": None,
    "scheduler": None, "batch_size": 1, "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512,
    "restore_faces": None, "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False,
    "extra_generation_params": None, "overlay_images": None, "eta": None, "do_not_reload_embeddings": False,
    "denoising_strength": None, "ddim_discretize": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None,
    "s_tmin": None, "s_noise": None, "override_settings": None, "override_settings_restore_afterwards": True,
    "sampler_index": None, "refiner_checkpoint": None, "refiner_switch_at": None, "token_merging_ratio": 0,
    "token_merging_ratio_hr": 0, "disable_extra_networks": False, "firstpass_image": None, "comments": None,
    "opts": OPTIONS_DEFAULTS,
}
_IMG2IMG_DEFAULTS = {
    **_COMMON_DEFAULTS, "denoising_strength": 0.75, "init_images": None, "resize_mode": 0, "image_cfg_scale": None,
    "mask": None, "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0,
    "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None, "latent_mask": None, "force_task_id": None, "mask_blend": "a1111",
}
_TXT2IMG_DEFAULTS = {
    **_COMMON_DEFAULTS, "denoising_strength": 0.75, "enable_hr": False, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "force_task_id": None,
}
PROCESSING_DEFAULTS = {"img2img": _IMG2IMG_DEFAULTS, "inpaint": _IMG2IMG_DEFAULTS, "txt2img": _TXT2IMG_DEFAULTS}


def processing_class(command: str):
    """The processing dataclass a command fills."""
    # lazy: processing imports torch; only a run needs the class itself (the parser reads PROCESSING_DEFAULTS)
    from ..processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img

    return StableDiffusionProcessingTxt2Img if command == "txt2img" else StableDiffusionProcessingImg2Img


def processing_flags(command: str = "img2img") -> tuple[Flag, ...]:
    """The flags of a command: FLAGS whose field its processing class has, plus a generic flag for any Options
    field added since the table was written."""
    cls_fields = PROCESSING_DEFAULTS[command]
    mine = tuple(f for f in FLAGS if f.is_option or f.field in cls_fields)
    known = {f.field for f in FLAGS} | set(FIELDS_WITHOUT_FLAG)
    extra = tuple(Flag(f"opts.{name}", type(default), f"A1111 option {name}")
                  for name, default in OPTIONS_DEFAULTS.items() if f"opts.{name}" not in known
                  and type(default) in (bool, int, float, str))
    return mine + extra


def field_default(flag: Flag, command: str = "img2img") -> Any:
    """The value a flag has when nothing sets it."""
    if flag.field in COMMAND_DEFAULTS.get(command, {}):
        return COMMAND_DEFAULTS[command][flag.field]
    if flag.default is not FIELD_DEFAULT:
        return flag.default
    table, name = (OPTIONS_DEFAULTS, flag.field[5:]) if flag.is_option else (PROCESSING_DEFAULTS[command], flag.field)
    if name not in table:
        owner = "Options" if flag.is_option else PROCESSING_CLASS_NAMES[command]
        raise KeyError(f"{flag.field} is not a field of {owner}")
    return table[name]


# ---------------------------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage block) and exits 2; flags that only work together
    (`preview_flags_problem`) are checked right after parsing, so they too exit 2 before torch is imported."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        problem = preview_flags_problem(namespace)
        if problem:
            self.error(problem)
        return namespace, extras


def _add_processing_flags(ap: argparse.ArgumentParser, command: str) -> None:
    cls = PROCESSING_CLASS_NAMES[command]
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


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"invalid thread count: {text!r} (0 = auto, or 1 .. 1024)")
    return value


def _argparse_float(text: str, allow_inf: bool) -> float:
    try:
        return _finite_float(text, allow_inf)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid finite number: {text!r}") from None


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    """--ckpt, --vae, --prediction, --device, --dtype: which model and where it runs (every command that loads one)."""
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint .safetensors/.ckpt (LDM layout); "
                    "default: the bundled tiny model")
    ap.add_argument("--vae", type=Path, metavar="FILE", help="a separate VAE file replacing the checkpoint's")
    ap.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type (SD2-768 "
                    "models are v; default: NAME.yaml beside the checkpoint, else A1111's probe)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, mps")
    ap.add_argument("--dtype", default="float32", type=dtype_name, choices=DTYPE_NAMES,
                    help="UNet and text-encoder compute dtype (bf16, fp16, fp32 are aliases); the VAE's is "
                    "--vae-dtype")
    ap.add_argument("--vae-dtype", default="float32", type=dtype_name, choices=DTYPE_NAMES,
                    help="VAE dtype (default float32: SD1/SDXL VAEs overflow to NaN in float16)")


DTYPE_NAMES = ("float32", "float16", "bfloat16")  # torch dtype names: flags must not import torch
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def dtype_name(text: str) -> str:
    """A dtype flag's value as a torch dtype name: the aliases bf16/fp16/half/fp32 mapped, anything else kept for
    argparse's `choices` check (which names the flag and the allowed values)."""
    return DTYPE_ALIASES.get(text.lower(), text)


PREVIEW_METHODS = ("approx_cheap", "taesd", "full")  # = sdcore.previews.METHODS (not imported here: torch)


def _preview_every(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid step count: {text!r} (an integer >= 1)")
    return value


def preview_flags_problem(ns: argparse.Namespace) -> str | None:
    """What is wrong with the live-preview flags of a parsed run command (None when fine or not a run command):
    --preview-every and --preview-dir go together; --preview-method and --taesd need them; taesd needs --taesd and
    --taesd needs taesd; not with --input-dir (a batch runs its rows without a callback) or --explain (writes
    nothing); the folder is not a file and holds no previews of an earlier run (previews are never overwritten);
    the --taesd file is readable."""
    every, folder = getattr(ns, "preview_every", None), getattr(ns, "preview_dir", None)
    method, taesd = getattr(ns, "preview_method", None), getattr(ns, "taesd", None)
    if every is None and folder is None:
        for flag, value in (("--preview-method", method), ("--taesd", taesd)):
            if value is not None:
                return f"{flag}: only with --preview-every N --preview-dir DIR"
        return None
    if folder is None:
        return "--preview-every: needs --preview-dir DIR (where the previews are written)"
    if every is None:
        return "--preview-dir: needs --preview-every N (steps between previews)"
    if (method or "approx_cheap") == "taesd" and taesd is None:
        return ("--taesd: missing; --preview-method taesd needs the decoder weights (taesd_decoder.pth, "
                "taesdxl_decoder.pth for SDXL)")
    if taesd is not None and method != "taesd":
        return f"--taesd: only with --preview-method taesd (the method is {method or 'approx_cheap'})"
    if getattr(ns, "input_dir", None) is not None:
        return "--preview-dir: previews one job; not with --input-dir"
    if getattr(ns, "explain", False):
        return "--preview-dir: not with --explain (which writes nothing)"
    if folder.exists() and not folder.is_dir():
        return f"--preview-dir: {folder} exists and is not a folder"
    if folder.is_dir():
        earlier = sorted(p.name for pattern in ("step-*.png", "pass*-step-*.png") for p in folder.glob(pattern))
        if earlier:
            return (f"--preview-dir: {folder} holds previews of an earlier run ({earlier[0]}, ...); previews are "
                    "never overwritten: give a new or empty folder")
    if taesd is not None:
        try:
            check_readable(taesd, "--taesd")
        except UsageError as e:
            return str(e)
    return None


def _add_run_flags(ap: argparse.ArgumentParser, command: str) -> None:
    if command != "txt2img":
        ap.add_argument("init", type=Path, nargs="?", help="init image file (or use --input-dir)")
    add_model_flags(ap)
    ap.add_argument("--outdir", type=Path, default=None, help=f"where PNGs are written, A1111 names "
                    f"(<outdir>/<YYYY-MM-DD>/00000-<seed>.png); default {DEFAULT_OUTDIRS[command]}")
    ap.add_argument("--threads", type=_threads, default=0, metavar="N", help="CPU threads of torch; default 0 = "
                    "auto: 1 for small jobs (UNet rows x latent cells x model channels^2 <= 2**20, e.g. the bundled "
                    "tiny model at 64 px), where more threads cost more than they save, else torch's default")
    ap.add_argument("--explain", action="store_true", help="print the plan (t_enc, sigmas, model calls, mask "
                    "coverage, crop region, seeds) without running the UNet; writes nothing")
    ap.add_argument("--from-infotext", type=Path, metavar="FILE", help="reuse the parameters of a PNG's A1111 "
                    "'parameters' text (or a .txt file holding it); flags given on the command line win")
    ap.add_argument("--trace", type=Path, metavar="FILE.safetensors", help="record sigma, x, denoised and the "
                    "index of every model call, second-order sub-steps included (scripts/compare_traces.py compares "
                    "two); never overwrites")
    ap.add_argument("--preview-every", type=_preview_every, metavar="N", help="live previews: write a PNG of the "
                    "sampler's current estimate of the final image (denoised) at sampling steps 0, N, 2N, ... into "
                    "--preview-dir")
    ap.add_argument("--preview-dir", type=Path, metavar="DIR", help="folder of the previews, step-NNN.png "
                    "(step-NNN-K.png for image K of a batch, passP-step-NNN.png for later passes); created if "
                    "missing, never overwritten")
    ap.add_argument("--preview-method", choices=PREVIEW_METHODS, help="approx_cheap (default; A1111 'Approx "
                    "cheap': a 4x3 matrix, one pixel per latent cell), taesd (the Tiny AutoEncoder, needs --taesd), "
                    "full (the model's VAE)")
    ap.add_argument("--taesd", type=Path, metavar="FILE", help="TAESD decoder weights for --preview-method taesd: "
                    "taesd_decoder.pth (SD1/SD2) or taesdxl_decoder.pth (SDXL), or .safetensors with the same keys")
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
    sub.add_parser("samplers", help="list sampler names, aliases and default schedulers, and the schedulers")
    add_batch_parser(sub)
    add_serve_parser(sub)
    add_xyz_parser(sub)
    return ap


# ---------------------------------------------------------------------------------------------------------------
# `sdcore batch` (run by sdcore/batch.py) and `sdcore serve` (run by sdcore/server.py): their arguments live here so
# that building the parser needs neither module (both import torch through processing).

RESULTS_NAME = "results.csv"  # the batch results table, in --output-dir
BATCH_COMMAND = "img2img"  # the batch rows' processing flags and defaults are img2img's

BATCH_HELP = """\
batch: img2img for every row of a manifest (CSV with a header line, or Parquet), one job per row.

columns: image (required; init image file, relative to the manifest's folder), seed (required; integer >= 0),
  mask (optional; mask file), output (optional; output name), and any img2img field by its A1111 name (prompt,
  negative_prompt, denoising_strength, steps, sampler_name, cfg_scale, width, height, mask_blur, inpainting_fill,
  ... = the flags below with _ for -; options as opts.<name> or <name>). Empty cells take the flags' values.

outputs: OUTPUT_DIR/<row>-<image stem>-<seed>.png (row from 0, at least 5 digits; <name>-<k>.png for several images
  per row; or the output column's name), PNGs with the A1111 infotext, never overwritten. Re-running the same
  manifest skips the rows whose PNGs exist (resumable after an interruption or a crash).
  OUTPUT_DIR/results.csv: row, path, seed, infotext, sha256, error, status, seconds, worker. A bad row (missing file,
  bad value) is recorded there and the other rows go on; the exit status is then 1.

--engine ray (pip install 'sdcore[ray]'): the rows run on a Ray actor pool, --workers actors that each load the
  checkpoint once; --ray-address auto joins the cluster started with `ray start --head` / `ray start --address`
  (inputs and OUTPUT_DIR on a filesystem every node mounts at the same path); without it a local Ray starts.
"""


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `batch` command to an argparse subparsers object (`sdcore.cli.flags.build_parser`'s); returns it.
    The processing flags are the img2img command's (`_add_processing_flags`): they set every row's defaults."""
    sp = subparsers.add_parser("batch", help="img2img for every row of a CSV/Parquet manifest (resumable; local or "
                               "Ray)", description=BATCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("manifest", type=Path, help="CSV (header line) or .parquet manifest, one row per job")
    sp.add_argument("--output-dir", type=Path, metavar="DIR", required=True,
                    help="where the PNGs and results.csv go (created if missing)")
    sp.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint .safetensors/.ckpt (LDM layout); "
                    "default: the bundled tiny model")
    sp.add_argument("--vae", type=Path, metavar="FILE", help="a separate VAE file replacing the checkpoint's")
    sp.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    sp.add_argument("--device", default="cpu", help="torch device: cpu, cuda, mps (with --engine ray and "
                    "--gpus-per-worker, cuda is each actor's own GPU)")
    sp.add_argument("--dtype", default="float32", type=dtype_name, choices=DTYPE_NAMES,
                    help="UNet and text-encoder dtype (bf16, fp16, fp32 are aliases; the VAE runs in float32)")
    sp.add_argument("--from-infotext", type=Path, metavar="FILE", help="defaults for every row from a PNG's "
                    "A1111 'parameters' text (or a .txt file); flags and cells win")
    sp.add_argument("--results", default=RESULTS_NAME, metavar="NAME", help=f"results table file name in "
                    f"--output-dir (default {RESULTS_NAME})")
    sp.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local: rows one after another in this process; ray: a Ray actor pool")
    sp.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join: auto (this node's cluster), "
                    "HOST:6379, ray://HOST:10001; default: RAY_ADDRESS, else a local Ray instance")
    sp.add_argument("--workers", type=int, default=2, metavar="N", help="Ray actors (each loads the checkpoint "
                    "once; default 2)")
    sp.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="X", help="Ray CPUs per actor "
                    "(default 1)")
    sp.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="X", help="Ray GPUs per actor (default "
                    "0; use with --device cuda)")
    sp.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads of each worker: this process "
                    "(local; default: torch's) or each Ray actor (default: --cpus-per-worker, at least 1). Small "
                    "models on busy machines run fastest with 1")
    sp.add_argument("--rows-per-batch", type=int, default=1, metavar="N", help="rows per Ray map_batches call "
                    "(default 1)")
    _add_processing_flags(sp, BATCH_COMMAND)
    return sp


DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # A1111's


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` command to the sdcore parser's subparsers; returns its parser."""
    ap = subparsers.add_parser(
        "serve", help="AUTOMATIC1111-compatible web API over one model (needs sdcore[serve])",
        description="Serve POST /sdapi/v1/txt2img and /sdapi/v1/img2img with A1111's request and response fields "
                    "(also GET /sdapi/v1/samplers, /schedulers, /sd-models; the schema at /docs). The model is "
                    "loaded once; requests run one at a time in arrival order. A bad field is a 422 naming it.")
    add_model_flags(ap)
    ap.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}; 0.0.0.0 "
                    "for every interface: there is no authentication)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, A1111's)")
    ap.add_argument("--outdir", type=Path, default=None, help="where requests with save_images=true write PNGs "
                    "(<outdir>/<txt2img|img2img>-images/<date>/); without it they get a 422")
    ap.add_argument("--ignore-unknown-fields", action="store_true", help="ignore request fields A1111's API does "
                    "not have, as A1111 does (default: 422 naming them)")
    return ap


XYZ_HELP = """\
xyz: A1111's X/Y/Z plot. Every combination of the axis values is one cell, a run of the job with those values
(the same seed in every cell unless seed is an axis; a cell is the image the single run gives, byte for byte);
the cells make a grid PNG with the X labels on top and the Y labels on the left, one grid per Z value side by side.

axis types (--x-type / --y-type / --z-type; A1111's labels such as 'CFG Scale' or 'Prompt S/R' work too):
  sampler, scheduler, steps, cfg_scale, denoising_strength, seed, mask_blur, inpainting_fill (0-3 or fill,
  original, 'latent noise', 'latent nothing'), mask_blend (a1111, xt, soft_inpainting, differential), prompt_sr
  (the first value is searched for in the prompt and the negative prompt and replaced by each value), nothing.
  `sdcore samplers` lists every sampler and scheduler name.

axis values (A1111's syntax): a comma-separated list, quotes keep commas ('"a, b",c'); numbers also take ranges:
  1-5 -> 1,2,3,4,5   1-10 (+3) -> 1,4,7,10   10-1 (-3) -> 10,7,4,1   1-10 [4] -> 1,4,7,10 (4 values)
  0.25-1 (+0.25) -> 0.25,0.5,0.75,1.0   0-1 [3] -> 0.0,0.5,1.0

--equal-nfe compares samplers at equal model calls: a steps value N is a budget of N model calls (the steps axis
  value, else --steps) and each cell runs the most steps that make at most N calls (counted on a dry run of the
  real pipeline: Heun 2 per step but 1 into sigma 0, img2img int(strength x steps) + 1 steps, ...); the cells are
  captioned with the steps and calls they ran. --explain prints every cell's steps and model calls, writes nothing.

outputs: the grid (--grid FILE.png, or <outdir>/<date>/xyz_grid-NNNN-<seed>.png) with the first cell's infotext
  plus 'Script: X/Y/Z plot, X Type, X Values, ...'; beside it <grid>.json with every cell's infotext, values, seed,
  steps and model calls; with --save-cells every cell's PNG (<grid>-x<i>-y<j>-z<k>.png). Never overwritten.
"""


def add_xyz_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `xyz` command (run by sdcore/xyz.py) to the sdcore parser's subparsers; returns its parser. The
    processing flags are the img2img command's; with --txt2img the img2img-only ones are refused."""
    sp = subparsers.add_parser("xyz", help="X/Y/Z plot: a labelled grid over samplers, steps, CFG, strength, ...",
                               description=XYZ_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("init", type=Path, nargs="?", help="init image file (img2img / inpainting; omit with --txt2img)")
    sp.add_argument("--txt2img", action="store_true", help="txt2img cells (no init image)")
    for axis in "xyz":
        sp.add_argument(f"--{axis}-type", metavar="TYPE", help=f"what the {axis.upper()} axis changes (see above)")
        sp.add_argument(f"--{axis}-values", metavar="LIST", help=f"the {axis.upper()} axis values (see above)")
    sp.add_argument("--equal-nfe", action="store_true", help="steps values are model-call budgets (see above)")
    sp.add_argument("--grid", type=Path, metavar="FILE.png", help="the grid file to write (its folder must exist)")
    sp.add_argument("--outdir", type=Path, default=None, help="folder for xyz_grid-NNNN-<seed>.png when --grid is "
                    "not given; default outputs/img2img-grids (txt2img-grids with --txt2img)")
    sp.add_argument("--save-cells", action="store_true", help="also write every cell's PNG beside the grid")
    sp.add_argument("--margin-size", type=int, default=0, metavar="PX", help="grid margins between cells (A1111 "
                    "'Grid margins (px)', default 0)")
    add_model_flags(sp)
    sp.add_argument("--threads", type=_threads, default=0, metavar="N", help="CPU threads of torch; default 0 = "
                    "auto (as img2img)")
    sp.add_argument("--explain", action="store_true", help="print every cell's sampler, steps and model calls "
                    "without running the UNet; writes nothing")
    sp.add_argument("--from-infotext", type=Path, metavar="FILE", help="the job's parameters from a PNG's A1111 "
                    "'parameters' text (or a .txt file); flags given on the command line win")
    _add_processing_flags(sp, "img2img")
    return sp


# ---------------------------------------------------------------------------------------------------------------
# Values: defaults < infotext < command line


def _checked(flag: Flag, value: Any, source: str) -> Any:
    """`value` if the flag's check accepts it; else UsageError naming the flag, the value and what is allowed."""
    if value is not None and flag.check is not None:
        problem = flag.check(value)
        if problem:
            raise UsageError(f"{source}{flag.flag}: {value!r}; {problem}")
    return value


def check_readable(path: Path, arg: str) -> None:
    """UsageError naming `arg` unless `path` is a file this process can open and read (checked before decoding, so
    a missing file is refused without importing anything heavy)."""
    if path.is_dir():
        raise UsageError(f"{arg}: {path} is a folder, not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UsageError(f"{arg}: cannot read {path} ({e.strerror or e.__class__.__name__})") from e


def read_infotext_file(path: Path) -> str:
    """The A1111 "parameters" text of a PNG (or the whole of a .txt file). UsageError if unreadable or absent."""
    arg = f"--from-infotext {path}"
    check_readable(path, "--from-infotext")
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

    Keys follow `sdcore.infotext.parse_infotext` (a1111-semantics §9.3): "Size" gives width and height, "Mask blur" both blur
    axes, "Inpaint area" / "Masked content" / "Mask mode" their A1111 labels, and any "Hires upscale/upscaler/
    resize" key turns the hires fix on (as A1111's paste does). Absent keys that A1111 omits at their default
    (`INFOTEXT_ABSENT`) set that default. Raises UsageError for a text without a parameter line or a bad value.
    """
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
    if "mask_blend" in fields and BLEND_INFOTEXT_KEYS & set(params):
        from ..sampling.blends import blend_from_infotext  # lazy: the blends module imports torch

        try:
            values["mask_blend"] = blend_from_infotext(params)
        except ValueError as e:
            raise UsageError(f"{source}{e}") from None
        params = {k: v for k, v in params.items() if k not in BLEND_INFOTEXT_KEYS}
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
    """Read an image file fully into memory, turned as a viewer shows it. UsageError naming `arg` for anything Pillow
    cannot or should not read.

    The EXIF Orientation is applied (`sdcore.images.upright`, as A1111's `images.read` / `fix_image`), so a phone
    photo stored sideways comes back upright and the size checks between init image, mask and latent mask compare
    what the user sees; pixel values are left to `images.flatten` / `create_binary_mask` (16-bit, float, palette).
    An unparsable EXIF block is ignored. Decompression bombs (more than `PIL.Image.MAX_IMAGE_PIXELS` pixels) are
    refused, not just warned about.
    """
    from ..images import upright  # lazy: sdcore.images imports torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                # upright() reads TIFF orientation from the open file, so it runs before the copy.
                turned = upright(im)
                return im.copy() if turned is im else turned
    # A decoder of hostile bytes can raise nearly anything (OSError, SyntaxError, ValueError, EOFError, struct.error,
    # DecompressionBomb*); all mean "not a usable image".
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{arg}: cannot read image {path} ({e.__class__.__name__}: {e})") from e

