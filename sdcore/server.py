"""`sdcore serve`: AUTOMATIC1111's web API for txt2img and img2img, over one model loaded at startup.

Clients that already speak A1111's API (`modules/api/api.py`, `modules/api/models.py`, v1.10.1) can point at
sdcore instead:

    POST /sdapi/v1/txt2img   body: A1111's `StableDiffusionTxt2ImgProcessingAPI` fields
    POST /sdapi/v1/img2img   body: A1111's `StableDiffusionImg2ImgProcessingAPI` fields (base64 `init_images`, `mask`)
    GET  /sdapi/v1/samplers, /sdapi/v1/schedulers, /sdapi/v1/sd-models   (what clients list at startup)

Responses have A1111's shape (`TextToImageResponse` / `ImageToImageResponse`): `{"images": [base64 PNG, ...],
"parameters": {every request field, defaults filled in}, "info": "<JSON text of Processed.js(): prompt, all_prompts,
seed, all_seeds, infotexts, ...>"}`. Each PNG carries its infotext as the "parameters" text chunk, as A1111's do.

Request fields (`API_FIELDS`, in A1111's order, with A1111's API defaults) have three roles:
- processing fields: set the field of the same name of `StableDiffusionProcessingImg2Img` / `...Txt2Img`; null means
  the field's default. Values are checked with the CLI's flag table (`sdcore.cli.flags.FLAGS`) and then by
  `validate()`; a bad value is a 422 whose `detail[0].loc` names the field. img2img also takes sdcore's own
  `mask_blend` ("a1111", "xt", "soft_inpainting", "differential"; not an A1111 field).
- fields A1111 has and sdcore cannot honour (`restore_faces`, `tiling`, `styles`, `script_name`, `script_args`,
  `alwayson_scripts`, `firstpass_image`, `refiner_checkpoint`, `hr_checkpoint_name`, ...): accepted at their A1111
  default, a 422 naming the field otherwise.
- the API's own fields: `sampler_index` (A1111's default sampler "Euler" when `sampler_name` is null),
  `send_images`, `save_images` (needs `outdir`), `include_init_images`, `infotext` (fills the fields the request does
  not set, as A1111's `apply_infotext`), `comments`, `do_not_save_samples` / `do_not_save_grid` (ignored, as A1111's
  API ignores them).
Unknown fields are a 422 naming them (A1111 ignores them silently; `create_app(..., ignore_unknown_fields=True)` /
`sdcore serve --ignore-unknown-fields` does the same).

Differences from A1111, all deliberate: a bad value is a 422 naming the field where A1111 answers 400 "Sampler not
found", 404 "Init image not found", 500 "Invalid encoded image" or runs with a silently replaced value; image URLs
are not fetched; `override_settings` takes the `Options` of `sdcore.processing` (plus `sd_model_checkpoint` / `sd_vae`
naming what is loaded), and never changes the server's state (A1111 restores them after the job too).

Queue: one worker thread (`concurrent.futures.ThreadPoolExecutor(max_workers=1)`) runs every job, in arrival order,
so two requests never run the model at once. Chosen over an `asyncio.Lock` because the job is blocking torch code
that must leave the event loop anyway: one dedicated thread both serialises the jobs (FIFO, which a
`threading.Lock` does not promise) and keeps the model on a single thread, while the event loop stays free to
accept, decode and validate other requests (a bad request gets its 422 at once, without waiting for the queue).
Decoding and validation run in the server's ordinary thread pool before a job is queued; PNG encoding after it.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import datetime
import functools
import io
import json
import math
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from .checkpoint import StableDiffusionModel, load_checkpoint
from .cli.flags import DEFAULT_CKPT, DEFAULT_HOST, DEFAULT_PORT, processing_flags, values_from_infotext
from .images import upright
from .infotext import FIXED_KEYS, VERSION, parse_infotext
from .processing import (Options, Processed, StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img,
                         process_images)
from .sampling.samplers import SAMPLERS
from .sampling.schedules import SCHEDULERS

try:  # the optional extra sdcore[serve]; without it this module still imports (the CLI builds its parser from it)
    import uvicorn
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, create_model
except ImportError as _e:
    SERVE_IMPORT_ERROR: ImportError | None = _e
else:
    SERVE_IMPORT_ERROR = None

EXTRA_HINT = "sdcore serve needs the optional extra: pip install 'sdcore[serve]'"

# ---------------------------------------------------------------------------------------------------------------
# The request fields (A1111 modules/api/models.py: the dataclass fields of StableDiffusionProcessing* minus
# API_NOT_ALLOWED, then the API's additional fields)


@dataclass(frozen=True)
class ApiField:
    """One field of A1111's request body: its JSON type (any field may also be null), A1111's API default, and what
    sdcore does with it. `role`: "processing" (sets the processing field of that name), "default_only" (sdcore cannot
    honour it: only the values in `allowed` are accepted, the first being A1111's default) or "api" (read by the
    server itself). `commands`: the endpoints that have the field."""

    name: str
    type: Any
    default: Any
    role: str = "processing"
    allowed: tuple = ()
    commands: tuple[str, ...] = ("txt2img", "img2img")
    help: str = ""


_T2I, _I2I = ("txt2img",), ("img2img",)

API_FIELDS: tuple[ApiField, ...] = (
    # StableDiffusionProcessing (modules/processing.py), in order
    ApiField("prompt", str, ""),
    ApiField("negative_prompt", str, ""),
    ApiField("styles", list[str], None, "default_only", (None, [])),
    ApiField("seed", int, -1),
    ApiField("subseed", int, -1),
    ApiField("subseed_strength", float, 0),
    ApiField("seed_resize_from_h", int, -1),
    ApiField("seed_resize_from_w", int, -1),
    ApiField("sampler_name", str, None, help="null: sampler_index"),
    ApiField("scheduler", str, None),
    ApiField("batch_size", int, 1),
    ApiField("n_iter", int, 1),
    ApiField("steps", int, 50),
    ApiField("cfg_scale", float, 7.0),
    ApiField("width", int, 512),
    ApiField("height", int, 512),
    ApiField("restore_faces", bool, None, "default_only", (None, False)),
    ApiField("tiling", bool, None, "default_only", (None, False)),
    ApiField("do_not_save_samples", bool, False, "api", help="ignored: A1111's API sets it from save_images"),
    ApiField("do_not_save_grid", bool, False, "api", help="ignored: no grids are made"),
    ApiField("eta", float, None),
    ApiField("denoising_strength", float, None),
    ApiField("s_min_uncond", float, None),
    ApiField("s_churn", float, None),
    ApiField("s_tmax", float, None),
    ApiField("s_tmin", float, None),
    ApiField("s_noise", float, None),
    ApiField("override_settings", dict[str, Any], None, "api", help="Options fields of sdcore.processing"),
    ApiField("override_settings_restore_afterwards", bool, True, "default_only", (True, None)),
    ApiField("refiner_checkpoint", str, None, "default_only", (None, "", "None", "none"),
             help="one model is loaded at startup; requests cannot load checkpoint files"),
    ApiField("refiner_switch_at", float, None),
    ApiField("disable_extra_networks", bool, False, "default_only", (False, None)),
    ApiField("firstpass_image", str, None, "default_only", (None, "")),
    ApiField("comments", dict[str, Any], None, "api", help="ignored, as A1111's __post_init__ resets it"),
    # StableDiffusionProcessingTxt2Img
    ApiField("enable_hr", bool, False, commands=_T2I),
    ApiField("firstphase_width", int, 0, "default_only", (0, None), _T2I),
    ApiField("firstphase_height", int, 0, "default_only", (0, None), _T2I),
    ApiField("hr_scale", float, 2.0, commands=_T2I),
    ApiField("hr_upscaler", str, None, commands=_T2I),
    ApiField("hr_second_pass_steps", int, 0, commands=_T2I),
    ApiField("hr_resize_x", int, 0, commands=_T2I),
    ApiField("hr_resize_y", int, 0, commands=_T2I),
    ApiField("hr_checkpoint_name", str, None, "default_only", (None, "", "Use same checkpoint"), _T2I),
    ApiField("hr_sampler_name", str, None, commands=_T2I, help='"Use same sampler": null'),
    ApiField("hr_scheduler", str, None, commands=_T2I, help='"Use same scheduler": null'),
    ApiField("hr_prompt", str, "", commands=_T2I),
    ApiField("hr_negative_prompt", str, "", commands=_T2I),
    # StableDiffusionProcessingImg2Img
    ApiField("init_images", list[str], None, "api", commands=_I2I, help="base64 images (a data: URL prefix is "
             "accepted); required"),
    ApiField("resize_mode", int, 0, commands=_I2I),
    ApiField("image_cfg_scale", float, None, commands=_I2I),
    ApiField("mask", str, None, "api", commands=_I2I, help="base64 image, white = regenerate"),
    ApiField("mask_blur_x", int, 4, commands=_I2I),
    ApiField("mask_blur_y", int, 4, commands=_I2I),
    ApiField("mask_blur", int, None, commands=_I2I),
    ApiField("mask_round", bool, True, commands=_I2I),
    ApiField("inpainting_fill", int, 0, commands=_I2I),
    ApiField("inpaint_full_res", bool, True, commands=_I2I),
    ApiField("inpaint_full_res_padding", int, 0, commands=_I2I),
    ApiField("inpainting_mask_invert", int, 0, commands=_I2I),
    ApiField("initial_noise_multiplier", float, None, commands=_I2I),
    ApiField("latent_mask", str, None, "api", commands=_I2I, help="base64 image at the processing size"),
    ApiField("mask_blend", str, "a1111", commands=_I2I, help="sdcore's field (not A1111's): a1111, xt, "
             "soft_inpainting, differential"),
    # the API's additional fields (models.py StableDiffusion*ProcessingAPI), denoising_strength 0.75 for img2img
    ApiField("force_task_id", str, None),
    ApiField("sampler_index", str, "Euler", "api", help="the sampler when sampler_name is null (A1111's API)"),
    ApiField("include_init_images", bool, False, "api", commands=_I2I, help="echo init_images and mask in "
             "parameters"),
    ApiField("script_name", str, None, "default_only", (None, "")),
    ApiField("script_args", list, [], "default_only", ([], None)),
    ApiField("send_images", bool, True, "api"),
    ApiField("save_images", bool, False, "api", help="save PNGs under the server's outdir"),
    ApiField("alwayson_scripts", dict[str, Any], {}, "default_only", ({}, None)),
    ApiField("infotext", str, None, "api", help="an A1111 infotext filling the fields the request does not set"),
)

IMG2IMG_DENOISING_DEFAULT = 0.75  # models.py: img2img's additional field; txt2img keeps the base class's None
# Values of hr_sampler_name / hr_scheduler that mean "the first pass's" (A1111's UI choices).
SAME_AS_FIRST_PASS = {"Use same sampler", "Use same scheduler", ""}
# A1111 options that name the loaded files rather than set a number (accepted when they name what is loaded).
FILE_OPTIONS = ("sd_model_checkpoint", "sd_vae")


def api_fields(command: str) -> tuple[ApiField, ...]:
    """The request fields of an endpoint ("txt2img" or "img2img"), in A1111's order."""
    out = []
    for f in API_FIELDS:
        if command in f.commands:
            if f.name == "denoising_strength" and command == "img2img":
                f = dataclasses.replace(f, default=IMG2IMG_DENOISING_DEFAULT)
            out.append(f)
    return tuple(out)


def _request_model(command: str, ignore_unknown_fields: bool):
    """The pydantic request model of an endpoint: every field optional (null = default), finite floats only."""
    name = "StableDiffusionProcessingTxt2Img" if command == "txt2img" else "StableDiffusionProcessingImg2Img"
    fields = {f.name: (f.type | None, Field(default=f.default, description=f.help or None))
              for f in api_fields(command)}
    config = ConfigDict(extra="ignore" if ignore_unknown_fields else "forbid", allow_inf_nan=False)
    return create_model(name, __config__=config, **fields)


if SERVE_IMPORT_ERROR is None:
    Txt2ImgRequest = _request_model("txt2img", False)
    Img2ImgRequest = _request_model("img2img", False)

    class ImageResponse(BaseModel):
        """A1111's `TextToImageResponse` / `ImageToImageResponse`."""

        images: list[str] | None = Field(default=None, description="The generated images, base64 PNG.")
        parameters: dict
        info: str


# ---------------------------------------------------------------------------------------------------------------
# Errors: every bad value becomes a 422 whose loc names the field


class FieldError(ValueError):
    """A request value sdcore cannot run: `loc` is the path of the field, e.g. ("init_images", 0)."""

    def __init__(self, loc: tuple, message: str, value: Any = None):
        super().__init__(message)
        self.loc, self.value = tuple(loc), value


_FIELD_IN_MESSAGE = re.compile(r"^\s*(?:opts\.)?([A-Za-z_]\w*)(?:\[(\d+)\])?\s*[:=]")


def _loc_of_message(message: str, fields: set[str]) -> tuple:
    """The field an sdcore ValueError / NotImplementedError names at its start ("denoising_strength: 2; ...",
    "restore_faces=True is not implemented", "opts.randn_source: ..."), as a loc; () when it names none."""
    m = _FIELD_IN_MESSAGE.match(message)
    if m is None:
        return ()
    name, index = m.group(1), m.group(2)
    if message.lstrip().startswith("opts."):
        return ("override_settings", name)
    if name not in fields:
        return ()
    return (name,) if index is None else (name, int(index))


def _as_validation_error(e: FieldError) -> RequestValidationError:
    error = {"type": "value_error", "loc": ("body", *e.loc), "msg": str(e), "input": _jsonable(e.value)}
    return RequestValidationError([error])


def _finite(value: Any) -> Any:
    """`value` with every non-finite float written as text (a body's NaN would otherwise break the 422 itself)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return getattr(value, "name", None) or repr(value)


# ---------------------------------------------------------------------------------------------------------------
# Images in and out (A1111 api.py decode_base64_to_image / encode_pil_to_base64)


def decode_image(text: str, loc: tuple) -> Image.Image:
    """A base64 image as A1111's `decode_base64_to_image` reads it: a "data:image/...;base64," prefix is accepted;
    the picture is turned by its EXIF Orientation (A1111 `images.read` -> `fix_image`; `sdcore.images.upright`).
    FieldError naming `loc` for a URL (never fetched), bad base64, a file Pillow cannot read, or a decompression
    bomb (more than `PIL.Image.MAX_IMAGE_PIXELS` pixels)."""
    if text.startswith(("http://", "https://")):
        raise FieldError(loc, f"{_name(loc)}: image URLs are not fetched; send the image as base64", text[:80])
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FieldError(loc, f"{_name(loc)}: not valid base64 ({e})", text[:80]) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                turned = upright(im)
                return im.copy() if turned is im else turned
    # A decoder of hostile bytes can raise nearly anything; all mean "not a usable image".
    except Exception as e:  # noqa: BLE001
        raise FieldError(loc, f"{_name(loc)}: not a readable image ({e.__class__.__name__}: {e})",
                         text[:80]) from None


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """Base64 PNG with the infotext as its "parameters" text chunk (A1111 `encode_pil_to_base64`, samples_format
    png: the image's str info items become PNG text)."""
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    with io.BytesIO() as out:
        image.save(out, format="PNG", pnginfo=info)
        return base64.b64encode(out.getvalue()).decode("ascii")


def _name(loc: tuple) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


# ---------------------------------------------------------------------------------------------------------------
# Request -> processing object


@dataclass
class Job:
    """A checked request, ready for the queue: the processing object, the echo of the request (`parameters`) and
    the API options that shape the response."""

    command: str
    p: StableDiffusionProcessingImg2Img | StableDiffusionProcessingTxt2Img
    parameters: dict[str, Any]
    send_images: bool


@functools.lru_cache(maxsize=None)
def _flags(command: str) -> dict[str, Any]:
    """The CLI's flag table of a command by field name ("opts.x" for Options): its checks validate request values."""
    return {f.field: f for f in processing_flags(command)}


def _check(command: str, field: str, value: Any, loc: tuple) -> None:
    flag = _flags(command).get(field)
    if flag is None or flag.check is None or value is None or flag.kind is Path:
        return
    problem = flag.check(value)
    if problem:
        raise FieldError(loc, f"{_name(loc)}: {value!r}; {problem}", value)


def _apply_infotext(command: str, data: dict[str, Any], explicit: set[str]) -> None:
    """A1111 `Api.apply_infotext`: the infotext's values fill the fields the request did not set; its settings
    (clip skip, RNG, ENSD, ...) go to override_settings unless already there. Mapping: `cli.flags.values_from_infotext`."""
    try:
        values, _unused = values_from_infotext(data["infotext"], tuple(processing_flags(command)), source="")
    except ValueError as e:
        raise FieldError(("infotext",), f"infotext: {e}", data["infotext"][:80]) from None
    settings = dict(data.get("override_settings") or {})
    for field, value in values.items():
        if field.startswith("opts."):
            settings.setdefault(field[5:], value)
        elif field in data and field not in explicit:
            data[field] = value
    data["override_settings"] = settings


def _options(model: StableDiffusionModel, command: str, settings: dict[str, Any] | None) -> dict[str, Any]:
    """override_settings checked: Options fields of the right type and range; `sd_model_checkpoint` / `sd_vae`
    only naming what is loaded (they are dropped). FieldError names `override_settings.<key>`."""
    if settings is None:
        return {}
    types = {f.name: type(f.default) for f in dataclasses.fields(Options)}
    out = {}
    for key, value in settings.items():
        loc = ("override_settings", key)
        if key == "sd_model_checkpoint":
            names = {model.name, f"{model.name}.safetensors", f"{model.name}.ckpt"}
            if model.path is not None:
                names |= {model.path.name, str(model.path), f"{model.path.name} [{model.shorthash()}]"}
                names.add(model.shorthash())
            if value not in names and value is not None:
                raise FieldError(loc, f"{_name(loc)}: {value!r}; the server has one model loaded: "
                                      f"{sorted(n for n in names if n)}", value)
            continue
        if key == "sd_vae":
            if value not in ("Automatic", "None", None, model.vae_name):
                raise FieldError(loc, f"{_name(loc)}: {value!r}; the server's VAE is fixed at startup "
                                      f"({model.vae_name or 'the checkpoint own'}); allowed: 'Automatic'", value)
            continue
        if key not in types:
            raise FieldError(loc, f"{_name(loc)}: unknown option; allowed: {sorted(types) + list(FILE_OPTIONS)}",
                             value)
        want = types[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise FieldError(loc, f"{_name(loc)}: {value!r}; must be a {want.__name__}", value)
        _check(command, f"opts.{key}", value, loc)
        out[key] = value
    return out


def prepare(model: StableDiffusionModel, command: str, request: Any, outdir: Path | None = None) -> Job:
    """Check a request and build its processing object (A1111 `Api.text2imgapi` / `img2imgapi` up to the queue).
    Raises FieldError naming the field for anything sdcore cannot run; nothing touches the model's weights."""
    fields = {f.name: f for f in api_fields(command)}
    data = request.model_dump()
    explicit = set(request.model_fields_set)
    if data.get("infotext"):
        _apply_infotext(command, data, explicit)
    for f in fields.values():
        value = data[f.name]
        if f.role == "default_only" and not any(value is a or (value == a and type(value) is type(a))
                                                 for a in f.allowed):
            raise FieldError((f.name,), f"{f.name}: {value!r} is not supported by sdcore; allowed: "
                                        f"{f.allowed[0]!r}" + (f" ({f.help})" if f.help else ""), value)
    if data["save_images"] and outdir is None:
        raise FieldError(("save_images",), "save_images: true needs a server started with --outdir", True)
    for name in ("hr_sampler_name", "hr_scheduler"):
        if data.get(name) in SAME_AS_FIRST_PASS:
            data[name] = None

    # the sampler: sampler_name, else A1111's API default sampler_index ("Euler")
    sampler_field = "sampler_name" if data["sampler_name"] else "sampler_index"
    sampler = data[sampler_field] or "Euler"
    _check(command, "sampler_name", sampler, (sampler_field,))
    for name, value in data.items():
        if fields[name].role == "processing" and name != "sampler_name":
            _check(command, name, value, (name,))

    kwargs: dict[str, Any] = {name: value for name, value in data.items()
                              if fields[name].role == "processing" and value is not None}
    kwargs["sampler_name"] = sampler
    options = _options(model, command, data["override_settings"])
    if options:
        kwargs["override_settings"] = options
    if data["save_images"]:
        kwargs["outpath_samples"] = str(outdir / f"{command}-images")
    else:
        kwargs["do_not_save_samples"] = True

    if command == "img2img":
        if not data["init_images"]:
            raise FieldError(("init_images",), "init_images: required; a list of base64 images", data["init_images"])
        kwargs["init_images"] = [decode_image(text, ("init_images", i)) for i, text in enumerate(data["init_images"])]
        if data["mask"]:
            kwargs["mask"] = decode_image(data["mask"], ("mask",))
        if data["latent_mask"]:
            kwargs["latent_mask"] = decode_image(data["latent_mask"], ("latent_mask",))

    cls = StableDiffusionProcessingTxt2Img if command == "txt2img" else StableDiffusionProcessingImg2Img
    try:
        p = cls(sd_model=model, **kwargs)
        p.validate()
    except (ValueError, TypeError, NotImplementedError) as e:
        message = " ".join(str(e).split())
        raise FieldError(_loc_of_message(message, set(fields)), message) from None
    latent_mask = getattr(p, "latent_mask", None)
    if latent_mask is not None and latent_mask.size != (p.width, p.height):
        raise FieldError(("latent_mask",), f"latent_mask: size {latent_mask.size[0]}x{latent_mask.size[1]}; must be "
                                           f"the processing size {p.width}x{p.height}")

    parameters = {name: _jsonable(value) for name, value in data.items()}  # a mask_blend from infotext: its name
    if command == "img2img" and not data["include_init_images"]:
        parameters["init_images"] = None
        parameters["mask"] = None
    return Job(command, p, parameters, bool(data["send_images"]))


# ---------------------------------------------------------------------------------------------------------------
# Processed -> response (A1111 Processed.js())


def _typed(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def extra_generation_params(infotext: str) -> dict[str, Any]:
    """A1111's `p.extra_generation_params` as read back from an infotext: the keys after create_infotext's fixed
    ones ("Denoising strength" and "Schedule type", which A1111 keeps there, included), numbers as numbers."""
    fixed = (set(FIXED_KEYS) | {"Version", "User"}) - {"Denoising strength", "Schedule type"}
    parsed = parse_infotext(infotext)
    out: dict[str, Any] = {}
    for key, value in parsed.items():
        if key in ("Prompt", "Negative prompt"):
            continue
        base = key[:-2] if key.endswith(("-1", "-2")) else key
        if base in fixed:
            continue
        if key.endswith("-1") and f"{base}-2" in parsed:
            out[base] = f"{value}x{parsed[f'{base}-2']}"
        elif key.endswith("-2") and f"{base}-1" in parsed:
            continue
        else:
            out[key] = _typed(value)
    return out


def info_json(p, processed: Processed, job_timestamp: str) -> str:
    """The `info` string of A1111's response: `json.dumps` of `Processed.js()`'s keys, filled from sdcore's run."""
    sd = p.sd_model
    obj = {
        "prompt": processed.prompts[0],
        "all_prompts": processed.prompts,
        "negative_prompt": processed.negative_prompts[0],
        "all_negative_prompts": processed.negative_prompts,
        "seed": processed.seeds[0],
        "all_seeds": processed.seeds,
        "subseed": processed.subseeds[0],
        "all_subseeds": processed.subseeds,
        "subseed_strength": p.subseed_strength,
        "width": p.width,
        "height": p.height,
        "sampler_name": p.resolve_sampler()[0].name,
        "cfg_scale": p.cfg_scale,
        "steps": p.steps,
        "batch_size": p.batch_size,
        "restore_faces": bool(p.restore_faces),
        "face_restoration_model": None,
        "sd_model_name": sd.name,
        "sd_model_hash": sd.shorthash(),
        "sd_vae_name": sd.vae_name,
        "sd_vae_hash": sd.vae_shorthash(),
        "seed_resize_from_w": p.seed_resize_from_w,
        "seed_resize_from_h": p.seed_resize_from_h,
        "denoising_strength": p.denoising_strength,
        "extra_generation_params": extra_generation_params(processed.infotexts[0]) if processed.infotexts else {},
        "index_of_first_image": 0,
        "infotexts": processed.infotexts,
        "styles": list(p.styles or []),
        "job_timestamp": job_timestamp,
        "clip_skip": p.opts.CLIP_stop_at_last_layers,
        "is_using_inpainting_conditioning": sd.family.conditioning == "hybrid",
        "version": VERSION,
    }
    return json.dumps(obj, default=lambda o: None)


def run_job(job: Job) -> tuple[Processed, str]:
    """Run a job on the calling thread (the queue's worker): `process_images`, and the job's start time stamp."""
    stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    return process_images(job.p, disable_progress=True), stamp


def respond(job: Job, processed: Processed, stamp: str) -> dict[str, Any]:
    images = [encode_png(im, text) for im, text in zip(processed.images, processed.infotexts)] if job.send_images \
        else []
    return {"images": images, "parameters": job.parameters, "info": info_json(job.p, processed, stamp)}


# ---------------------------------------------------------------------------------------------------------------
# The app


def _worker() -> ThreadPoolExecutor:
    """The queue: one thread runs every job, in submission order."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdcore-model")


def create_app(model: StableDiffusionModel, *, outdir: Path | str | None = None,
               ignore_unknown_fields: bool = False) -> FastAPI:
    """The FastAPI app serving `model` (loaded once, by the caller) at A1111's /sdapi/v1 paths.

    `outdir`: where `save_images: true` writes PNGs (`<outdir>/txt2img-images/<date>/00000-<seed>.png`, A1111's
    names; never overwriting); None = such requests get a 422. `ignore_unknown_fields`: ignore body fields A1111's
    API does not have (A1111's behaviour) instead of answering 422. Jobs run one at a time on one worker thread
    (module docstring). `app.state.model`, `app.state.executor` hold them.
    """
    if SERVE_IMPORT_ERROR is not None:
        raise ImportError(EXTRA_HINT) from SERVE_IMPORT_ERROR
    outdir = Path(outdir) if outdir is not None else None

    @asynccontextmanager
    async def lifespan(app):
        yield
        # Shutting down: queued jobs are cancelled (the running one finishes). A fresh worker lets the same app be
        # started again (tests do).
        old, app.state.executor = app.state.executor, _worker()
        old.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="sdcore", version=VERSION, lifespan=lifespan,
                  description="AUTOMATIC1111-compatible txt2img / img2img API over one sdcore model")
    app.state.model, app.state.executor, app.state.outdir = model, _worker(), outdir

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        """FastAPI's 422 `{"detail": [{"loc": ["body", field, ...], "msg": ..., ...}]}`, also for a NaN input."""
        return JSONResponse(status_code=422, content={"detail": _finite(jsonable_encoder(exc.errors()))})

    requests = {"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest} if not ignore_unknown_fields else \
        {command: _request_model(command, True) for command in ("txt2img", "img2img")}

    async def generate(command: str, request) -> dict[str, Any]:
        try:
            job = await run_in_threadpool(prepare, model, command, request, outdir)
        except FieldError as e:
            raise _as_validation_error(e) from None
        try:
            processed, stamp = await asyncio.wrap_future(app.state.executor.submit(run_job, job))
        except (ValueError, NotImplementedError) as e:  # what validate() could not foresee
            message = " ".join(str(e).split())
            raise _as_validation_error(FieldError(_loc_of_message(message, {f.name for f in api_fields(command)}),
                                                  message)) from None
        return await run_in_threadpool(respond, job, processed, stamp)

    async def text2imgapi(txt2imgreq):
        """A1111 `Api.text2imgapi`."""
        return await generate("txt2img", txt2imgreq)

    async def img2imgapi(img2imgreq):
        """A1111 `Api.img2imgapi`."""
        return await generate("img2img", img2imgreq)

    # The request models are built at run time, so the annotations are set here (FastAPI reads them).
    text2imgapi.__annotations__ = {"txt2imgreq": requests["txt2img"]}
    img2imgapi.__annotations__ = {"img2imgreq": requests["img2img"]}
    app.add_api_route("/sdapi/v1/txt2img", text2imgapi, methods=["POST"], response_model=ImageResponse)
    app.add_api_route("/sdapi/v1/img2img", img2imgapi, methods=["POST"], response_model=ImageResponse)

    @app.get("/sdapi/v1/samplers")
    def get_samplers() -> list[dict[str, Any]]:
        """A1111 `Api.get_samplers`: name, aliases, options."""
        return [{"name": s.name, "aliases": list(s.aliases),
                 "options": {**({"scheduler": s.scheduler} if s.scheduler else {}),
                             **({"second_order": True} if s.second_order else {})}} for s in SAMPLERS]

    @app.get("/sdapi/v1/schedulers")
    def get_schedulers() -> list[dict[str, Any]]:
        """A1111 `Api.get_schedulers`."""
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
                 "need_inner_model": s.name in ("uniform", "simple", "ddim", "normal")} for s in SCHEDULERS]

    @app.get("/sdapi/v1/sd-models")
    def get_sd_models() -> list[dict[str, Any]]:
        """A1111 `Api.get_sd_models`: the one loaded model."""
        file = model.path.name if model.path else model.name
        return [{"title": f"{file} [{model.shorthash()}]", "model_name": model.name, "hash": model.shorthash(),
                 "sha256": model.sha256(), "filename": str(model.path.resolve()) if model.path else None, "config": None}]

    return app


def serve(ckpt: Path | str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "cpu",
          dtype: str | torch.dtype = "float32", *, vae: Path | None = None, prediction: str | None = None,
          outdir: Path | None = None, ignore_unknown_fields: bool = False,
          vae_dtype: str | torch.dtype = "float32") -> None:
    """Load `ckpt` once and serve it with uvicorn until interrupted (the `sdcore serve` command). `dtype`: the UNet
    and text encoders' compute dtype, `vae_dtype` the VAE's (torch dtypes or their names)."""
    if SERVE_IMPORT_ERROR is not None:
        raise ImportError(EXTRA_HINT) from SERVE_IMPORT_ERROR
    dtype, vae_dtype = (getattr(torch, d) if isinstance(d, str) else d for d in (dtype, vae_dtype))
    model = load_checkpoint(ckpt, device=device, dtype=dtype, vae_dtype=vae_dtype, vae=vae, prediction=prediction)
    app = create_app(model, outdir=outdir, ignore_unknown_fields=ignore_unknown_fields)
    uvicorn.run(app, host=host, port=port)


# ---------------------------------------------------------------------------------------------------------------
# The command line: `sdcore serve` (wired by sdcore/cli)


def run(args: argparse.Namespace) -> int:
    """Run `sdcore serve` from parsed arguments; returns the exit status (2: the serve extra is not installed or
    a bad argument)."""
    if SERVE_IMPORT_ERROR is not None:
        print(f"sdcore: error: {EXTRA_HINT} ({SERVE_IMPORT_ERROR})", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"sdcore: error: --port: {args.port}; must be in [0, 65535]", file=sys.stderr)
        return 2
    if args.outdir is not None and args.outdir.exists() and not args.outdir.is_dir():
        print(f"sdcore: error: --outdir: {args.outdir} exists and is not a folder", file=sys.stderr)
        return 2
    serve(args.ckpt, args.host, args.port, args.device, args.dtype, vae=args.vae, prediction=args.prediction,
          outdir=args.outdir, ignore_unknown_fields=args.ignore_unknown_fields, vae_dtype=args.vae_dtype)
    return 0


__all__ = ["API_FIELDS", "ApiField", "FieldError", "Job", "api_fields", "create_app", "decode_image",
           "encode_png", "extra_generation_params", "info_json", "prepare", "run", "serve"]
