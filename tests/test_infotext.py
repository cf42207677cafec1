"""Tests for sdcore/infotext.py. Vectors cite docs/a1111-semantics.md sections ("a1111-semantics §N").

The a1111-semantics §13 "Infotext example" strings end with A1111's "Version: v1.10.1"; here the Version value is ours,
"sdcore-0.1.0" (`infotext.VERSION`), and the placeholders <h>/<m> are filled with a made-up hash and name.
"""
from __future__ import annotations

import pytest

from sdcore import infotext
from sdcore.infotext import create_infotext, parse_infotext

BASE = dict(steps=20, sampler="Euler a", scheduler="Automatic", cfg_scale=7, seed=1234, width=512, height=512,
            model_hash="0123abcd", model="tiny-sd")


def test_version_is_ours():
    assert infotext.VERSION == "sdcore-0.1.0"


def test_spec13_img2img_example():
    # img2img's init records "Denoising strength" as an extra parameter (a1111-semantics §9.3); it lands at its fixed
    # place.
    text = create_infotext("a cat", "blurry", **BASE, extra={"Denoising strength": 0.75})
    assert text == ("a cat\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x512, "
                    "Model hash: 0123abcd, Model: tiny-sd, Denoising strength: 0.75, Version: sdcore-0.1.0")


def test_spec13_inpainting_only_masked_example():
    # Extras in A1111's insertion order (a1111-semantics §9.3); the sampler's "Schedule type" overrides the fixed
    # slot's value.
    extra = {"Denoising strength": 0.75, "Mask blur": 4, "Inpaint area": "Only masked", "Masked area padding": 32,
             "Masked content": "fill", "Schedule type": "Karras"}
    text = create_infotext("a cat", "", **{**BASE, "sampler": "DPM++ 2M"}, extra=extra)
    assert text == ("a cat\n"
                    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
                    "Model hash: 0123abcd, Model: tiny-sd, Denoising strength: 0.75, Mask blur: 4, "
                    "Inpaint area: Only masked, Masked area padding: 32, Masked content: fill, Version: sdcore-0.1.0")


def test_fixed_order_and_conditional_keys_spec93():
    text = create_infotext("p", "n", **BASE, image_cfg_scale=1.5, face_restoration="CodeFormer",
                           fp8_weight="Enable", cache_fp16_weight_for_lora=False, vae_hash="beef", vae="vae.pt",
                           subseed=77, subseed_strength=0.25, seed_resize_from=(640, 384), denoising_strength=0.5,
                           conditional_mask_weight=1.0, clip_skip=2, ensd=31337, token_merging_ratio=0.3,
                           token_merging_ratio_hr=0.2, init_image_hash="abc", rng="NV", tiling=True,
                           extra={"Mask blur": 4, "Eta": 1.0}, user="me")
    keys = [pair.split(":")[0] for pair in text.split("\n")[-1].split(", ")]
    assert keys == ["Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration",
                    "Size", "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE",
                    "Variation seed", "Variation seed strength", "Seed resize from", "Denoising strength",
                    "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr",
                    "Init image hash", "RNG", "Tiling", "Mask blur", "Eta", "Version", "User"]
    assert keys[:26] == list(infotext.FIXED_KEYS)
    assert "Variation seed: 77, Variation seed strength: 0.25, Seed resize from: 640x384" in text
    assert "Tiling: True" in text and "RNG: NV" in text and "Clip skip: 2" in text and "Eta: 1.0" in text


def test_keys_left_out_by_a1111_rules_spec93():
    text = create_infotext("p", **BASE, subseed=77, subseed_strength=0, seed_resize_from=(0, 512), clip_skip=1,
                           rng="GPU", tiling=False, token_merging_ratio=0, version=None)
    params = text.split("\n")[-1]
    for key in ("Variation seed", "Seed resize from", "Clip skip", "RNG", "Tiling", "Token merging", "Version",
                "Negative prompt"):
        assert key not in text
    assert params.startswith("Steps: 20") and params.endswith("Model: tiny-sd")
    # An extra value of None replaces a fixed key's value (A1111 builds one dict), so the key is left out.
    assert "Seed resize from" not in create_infotext("p", **BASE, seed_resize_from=(64, 64),
                                                     extra={"Seed resize from": None})


def test_quoting_bare_values_and_str_spec93():
    extra = {"Lora hashes": "a: 12, b: 34", "Note": "café, naïve", "Multi": "x\ny", "Same": "Same", "Skip": None,
             "Float": 7.0, "Plain": "no specials"}
    params = create_infotext("p", **BASE, extra=extra, version=None).split("\n", 1)[1]
    assert ('Lora hashes: "a: 12, b: 34", Note: "café, naïve", Multi: "x\\ny", Same, Float: 7.0, '
            'Plain: no specials') in params
    assert "Skip" not in params
    assert infotext.quote(7) == 7 and infotext.quote("a:b") == '"a:b"'
    assert infotext.format_params({"A": 1, "B": None, "C": "C"}) == "A: 1, C"


def test_parse_spec13_example():
    text = create_infotext("a cat", "blurry", **BASE, extra={"Denoising strength": 0.75})
    parsed = parse_infotext(text)
    assert parsed == {"Prompt": "a cat", "Negative prompt": "blurry", "Steps": "20", "Sampler": "Euler a",
                      "Schedule type": "Automatic", "CFG scale": "7", "Seed": "1234", "Size-1": "512",
                      "Size-2": "512", "Model hash": "0123abcd", "Model": "tiny-sd", "Denoising strength": "0.75",
                      "Version": "sdcore-0.1.0"}


def test_round_trip_with_quoted_and_multiline_values():
    prompt = "a (cat:1.2), sitting\non a mat"
    negative = "blurry, lowres\nugly"
    extra = {"Lora hashes": 'a: 12, "b": 34', "Note": "café, naïve", "Multi": "x\ny"}
    text = create_infotext(prompt, negative, **BASE, subseed=5, subseed_strength=0.1, seed_resize_from=(320, 256),
                           extra=extra)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == negative
    assert parsed["Lora hashes"] == 'a: 12, "b": 34' and parsed["Note"] == "café, naïve"
    assert parsed["Multi"] == "x\ny" and parsed["Variation seed strength"] == "0.1"
    assert (parsed["Seed resize from-1"], parsed["Seed resize from-2"]) == ("320", "256")
    assert parsed["Version"] == "sdcore-0.1.0"


def test_parse_without_a_parameter_line():
    # Fewer than 3 "Key: value" pairs on the last line: it belongs to the prompt (infotext_utils semantics).
    assert parse_infotext("a cat\nstyle: oil") == {"Prompt": "a cat\nstyle: oil", "Negative prompt": ""}
    assert parse_infotext("\n\nonly prompt") == {"Prompt": "only prompt", "Negative prompt": ""}
    parsed = parse_infotext("a\nNegative prompt: b\nc\nSteps: 5, Seed: 1, Size: 8x16")
    assert parsed == {"Prompt": "a", "Negative prompt": "b\nc", "Steps": "5", "Seed": "1", "Size-1": "8",
                      "Size-2": "16"}
    with pytest.raises(TypeError, match="str"):
        parse_infotext(None)
