"""The A1111 "parameters" text (infotext) stored in PNGs: write and parse (a1111-semantics §9.3).

Format: the prompt, then `Negative prompt: ...` when there is one, then one line of `Key: value` pairs joined by
", " in a fixed key order. Values containing "," ":" or a newline are JSON-quoted; a value equal to its key is
written bare; None values are left out. Example (a1111-semantics §13, our Version):

    a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, ...
"""
from __future__ import annotations

import json
import re
from typing import Any

VERSION = "sdcore-0.1.0"

# The fixed part of the parameter line, in order (`modules/processing.py` `create_infotext`, v1.10.1). Extra
# generation parameters follow in insertion order, then "Version" and "User"; an extra parameter whose key is in this
# list takes that key's place.
FIXED_KEYS = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip",
    "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)


def quote(value: Any) -> Any:
    """JSON-quote (`ensure_ascii=False`) a value whose text contains "," ":" or a newline; else return it as is.

    Reference: `modules/infotext_utils.py` `quote`. `quote("a, b") == '"a, b"'`, `quote(7) == 7`.
    """
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(text: str) -> str:
    """Inverse of `quote` for a value read back: a '"'-delimited JSON string is decoded, anything else returned as is.

    Reference: `modules/infotext_utils.py` `unquote` (invalid JSON is returned unchanged).
    """
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_params(params: dict[str, Any]) -> str:
    """The parameter line: `Key: value` pairs joined by ", " in the dict's order (a1111-semantics §9.3).

    None values are left out; a value equal to its key is written bare (`Key`); values go through `quote` and `str`
    (int 7 -> "7", float 7.0 -> "7.0").
    """
    return ", ".join(key if key == value else f"{key}: {quote(value)}"
                     for key, value in params.items() if value is not None)


def create_infotext(prompt: str, negative_prompt: str = "", *, steps: int, sampler: str,
                    scheduler: str | None = None, cfg_scale: float, image_cfg_scale: float | None = None,
                    seed: int, face_restoration: str | None = None, width: int, height: int,
                    model_hash: str | None = None, model: str | None = None, fp8_weight: str | None = None,
                    cache_fp16_weight_for_lora: bool | None = None, vae_hash: str | None = None,
                    vae: str | None = None, subseed: int | None = None, subseed_strength: float | None = None,
                    seed_resize_from: tuple[int, int] | None = None, denoising_strength: float | None = None,
                    conditional_mask_weight: float | None = None, clip_skip: int | None = None,
                    ensd: int | None = None, token_merging_ratio: float | None = None,
                    token_merging_ratio_hr: float | None = None, init_image_hash: str | None = None,
                    rng: str | None = None, tiling: bool = False, extra: dict[str, Any] | None = None,
                    version: str | None = VERSION, user: str | None = None) -> str:
    """The infotext of one image (a1111-semantics §9.3; `modules/processing.py` `create_infotext`).

    `"{prompt}"` + `"\\nNegative prompt: {negative_prompt}"` (when non-empty) + `"\\n"` + `format_params(...)`,
    stripped. Keys in `FIXED_KEYS` order, then `extra` (A1111's `extra_generation_params`) in insertion order, then
    "Version" and "User". A1111's rules for leaving keys out are applied here too:
    - "Variation seed" and "Variation seed strength" only when `subseed_strength` is non-zero;
    - "Seed resize from" (`{w}x{h}`) only when `seed_resize_from = (w, h)` has both > 0;
    - "Clip skip" only when > 1; "RNG" only when not "GPU" (A1111's default source); "Tiling" = "True" when tiling;
    - token merging ratios only when non-zero;
    - "ENSD" is written whenever given: A1111 writes it only for samplers that use it with eta != 0 (the caller's
      decision, a1111-semantics §8.2).
    An `extra` key that is also a fixed key keeps the fixed position and takes the extra value (e.g. "Schedule type"
    "Karras" set by the sampler; "Denoising strength" recorded by img2img's init).
    """
    variation = subseed_strength is not None and subseed_strength != 0
    params: dict[str, Any] = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": scheduler,
        "CFG scale": cfg_scale,
        "Image CFG scale": image_cfg_scale,
        "Seed": seed,
        "Face restoration": face_restoration,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model,
        "FP8 weight": fp8_weight,
        "Cache FP16 weight for LoRA": cache_fp16_weight_for_lora,
        "VAE hash": vae_hash,
        "VAE": vae,
        "Variation seed": subseed if variation else None,
        "Variation seed strength": subseed_strength if variation else None,
        "Seed resize from": f"{seed_resize_from[0]}x{seed_resize_from[1]}"
        if seed_resize_from is not None and seed_resize_from[0] > 0 and seed_resize_from[1] > 0 else None,
        "Denoising strength": denoising_strength,
        "Conditional mask weight": conditional_mask_weight,
        "Clip skip": clip_skip if clip_skip is not None and clip_skip > 1 else None,
        "ENSD": ensd,
        "Token merging ratio": token_merging_ratio or None,
        "Token merging ratio hr": token_merging_ratio_hr or None,
        "Init image hash": init_image_hash,
        "RNG": rng if rng != "GPU" else None,
        "Tiling": "True" if tiling else None,
    }
    params.update(extra or {})
    params["Version"] = version
    params["User"] = user
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{format_params(params)}".strip()


# One "Key: value" pair of the parameter line (`modules/infotext_utils.py` `re_param`): the key starts with a word
# character and may hold words, spaces, dashes and slashes; the value is a JSON string or runs to the next comma.
_PARAM = re.compile(r"""
    \s*
    (\w[\w \-/]+)
    :\s*
    ("(?:\\.|[^\\"])+" | [^,]*)
    (?:,|$)
""", re.VERBOSE)
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict[str, str]:
    """Read an infotext back into a dict of strings (a1111-semantics §9.3; `modules/infotext_utils.py`
    `parse_generation_parameters`).

    The last line is the parameter line if it holds at least 3 `Key: value` pairs; otherwise it is part of the
    prompt. Lines before it are the prompt until one starts with "Negative prompt:", which starts the negative
    prompt (lines joined with "\\n", leading blank lines dropped). Result: "Prompt", "Negative prompt", then every
    parameter in order; JSON-quoted values are decoded; a `{w}x{h}` value becomes "Key-1" = w and "Key-2" = h
    ("Size" -> "Size-1", "Size-2"). All values stay strings. Unlike A1111 this does not add the UI defaults of
    absent keys ("Clip skip" 1, "RNG" GPU, ...).
    """
    if not isinstance(text, str):
        raise TypeError(f"infotext must be a str, got {type(text).__name__}")
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    # A line is appended after a "\n" unless the text so far is empty, so leading blank lines vanish (as in A1111).
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line

    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in _PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        size = _IMAGE_SIZE.match(value)
        if size is not None:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result
