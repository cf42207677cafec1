"""Hostile numbers and hostile text (issue 11, items 1 and 7): emphasis never divides by a vanishing mean, NaN/inf
is caught where it first appears with advice true for the run, and the prompt and infotext parsers hold up against
arbitrary text (hypothesis). Emphasis: a1111-semantics §11.2, §11.4; decode: §7.2; infotext: §9.3."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdcore import StableDiffusionProcessingImg2Img, load_checkpoint, pipeline, process_images
from sdcore.infotext import FIXED_KEYS, create_infotext, parse_infotext, quote
from sdcore.prompts import (MAX_BRACKET_DEPTH, apply_emphasis, get_learned_conditioning_prompt_schedules,
                            get_multicond_prompt_list, parse_prompt_attention)

ROOT = Path(__file__).resolve().parent.parent
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EMPHASIS_PROMPTS = ("a (red) circle", "(a red circle:1.5)", "((a (red:abc) cat [ 🐱🔥 日本語")


def a1111_original(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """A1111 `EmphasisOriginal.after_transformers`, operation for operation, in z's dtype."""
    w = z * m.to(z.dtype)[..., None]
    return w * (z.mean() / w.mean())


# ------------------------------------------------------------------------------------------ emphasis, by hand

def test_original_emphasis_is_a1111_on_hand_derived_numbers():
    """z [2, 2, 2], m [2, 2]. mean(z) = (1+3+2+6 -1+1+.5+.5)/8 = 13/8; w = z*m = 1,3,4,12,-1,1,2,2 -> mean 24/8 = 3;
    result = w * 13/24. The means are over the whole batch: per-prompt means would give row 0 *3/5, row 1 *1/4."""
    z = torch.tensor([[[1.0, 3.0], [2.0, 6.0]], [[-1.0, 1.0], [0.5, 0.5]]])
    m = torch.tensor([[1.0, 2.0], [1.0, 4.0]])
    hand = torch.tensor([[[1.0, 3.0], [4.0, 12.0]], [[-1.0, 1.0], [2.0, 2.0]]]) * (13 / 24)
    for dtype in (torch.float32, torch.float64):
        got = apply_emphasis(z.to(dtype), m, "Original")
        assert got.dtype == dtype
        assert torch.equal(got, a1111_original(z.to(dtype), m))  # A1111's own operations, to the bit
        torch.testing.assert_close(got, hand.to(dtype), rtol=1e-7, atol=0)
    assert torch.equal(apply_emphasis(z, m, "No norm"), torch.tensor([[[1.0, 3.0], [4.0, 12.0]],
                                                                      [[-1.0, 1.0], [2.0, 2.0]]]))


def test_small_but_real_mean_is_still_restored():
    """The floor is one rounding unit of mean(|z|), not a loose tolerance: a mean of 1e-5 x mean(|z|) (float32) or
    5e-3 x (float16) is restored exactly as A1111 does."""
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.functional.layer_norm(torch.randn(1, 77, 64, generator=gen), (64,))  # mean ~1e-9
    m = torch.ones(1, 77)
    m[0, 3:6] = 1.5
    for dtype, shift in ((torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)):
        z = (base + shift).to(dtype)
        got = apply_emphasis(z, m)
        assert torch.equal(got, a1111_original(z, m)), dtype
        assert not torch.equal(got, z * m.to(dtype)[..., None]), dtype  # the restoration did something


def test_zero_mean_inputs_fall_back_to_no_norm():
    """Where A1111's ratio divides rounding noise: 0/0 (NaN), 0/x (all zeros), x/0 (inf). sdcore returns z * m."""
    m = torch.tensor([[2.0, 1.0]])
    cases = {
        "0/0": torch.tensor([[[1.0, -1.0], [2.0, -2.0]]]),  # both means 0
        "0/x": torch.tensor([[[3.0, -1.0], [-2.0, 0.0]]]),  # mean(z) 0, mean(w) = (6-2-2+0)/4
        "x/0": torch.tensor([[[1.0, 1.0], [-4.0, 0.0]]]),  # mean(z) -1/2, mean(w) = (2+2-4+0)/4 = 0
    }
    a1111 = {k: a1111_original(z, m) for k, z in cases.items()}
    assert a1111["0/0"].isnan().all() and torch.equal(a1111["0/x"], torch.zeros(1, 2, 2))
    assert a1111["x/0"].isinf().any()
    for name, z in cases.items():
        got = apply_emphasis(z, m)
        assert torch.isfinite(got).all(), name
        assert torch.equal(got, z * m[..., None]), name


def test_layer_norm_without_bias_is_not_scaled_by_noise():
    """A final LayerNorm without bias (the bundled model's encoder at init) has mean(z) ~ 1e-9: pure rounding."""
    z = torch.nn.functional.layer_norm(torch.randn(2, 77, 128, generator=torch.Generator().manual_seed(3)), (128,))
    m = torch.ones(2, 77)
    m[:, 1:4] = 1.1
    got = apply_emphasis(z, m)
    assert torch.equal(got, z * m[..., None])
    assert not torch.allclose(a1111_original(z, m), got)  # A1111 multiplies by a noise/noise ratio


@PROPERTY
@given(st.sampled_from([torch.float32, torch.float64, torch.float16]), st.integers(1, 2), st.integers(1, 4),
       st.integers(1, 3), st.data())
def test_original_emphasis_property(dtype, b, t, c, data):
    """Any finite z, m: finite output; A1111's exact numbers whenever they are finite and both means clear the
    floor (eps(dtype) x mean|.|); else z * m."""
    values = st.one_of(st.integers(-3, 3).map(float), st.floats(-100, 100, width=16))
    z = torch.tensor(data.draw(st.lists(values, min_size=b * t * c, max_size=b * t * c)), dtype=dtype)
    z = z.reshape(b, t, c)
    m = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1 / 1.1, 1.0, 1.1, 1.5, 2.0, -1.0]),
                                        min_size=b * t, max_size=b * t))).reshape(b, t)
    got = apply_emphasis(z, m)
    w = z * m.to(dtype)[..., None]
    assume(torch.isfinite(w).all())  # float16 z * m can overflow on its own
    assert torch.isfinite(got).all()
    ref = a1111_original(z, m)
    eps = torch.finfo(dtype).eps
    clear = bool(z.mean().abs() > eps * z.abs().mean()) and bool(w.mean().abs() > eps * w.abs().mean())
    if bool((m == 1).all()):
        assert torch.equal(got, z)
    elif clear and torch.isfinite(ref).all():
        assert torch.equal(got, ref)
    else:
        assert torch.equal(got, w)


# ----------------------------------------------------------------------------------- the bundled model, end to end

@pytest.fixture(scope="module")
def bundled() -> Path:
    from sdcore.cli import DEFAULT_CKPT

    assert DEFAULT_CKPT.is_file(), f"the bundled model is missing ({DEFAULT_CKPT})"
    return DEFAULT_CKPT


@pytest.fixture(scope="module")
def tiny(bundled):
    return load_checkpoint(bundled)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((64, 64), Image.LANCZOS)


def _img2img(model, photo, prompt, **kw):
    args = dict(sd_model=model, init_images=[photo], prompt=prompt, seed=1234, steps=20, width=64, height=64,
                denoising_strength=0.75)
    return process_images(StableDiffusionProcessingImg2Img(**{**args, **kw}))


def _red_share(image: Image.Image) -> float:
    a = np.asarray(image.convert("RGB")).astype(int)
    return float(((a[..., 0] > 150) & (a[..., 1] < 100) & (a[..., 2] < 100)).mean())


@torch.inference_mode()
def test_bundled_encoder_features_have_zero_mean(tiny):
    """The premise: the bundled text encoder's output mean is rounding noise, so A1111's rescale divides noise."""
    z = tiny.encode_texts(["a red circle"], emphasis="No norm")
    assert z.abs().mean() > 0.5 and z.mean().abs() <= torch.finfo(z.dtype).eps * z.abs().mean()


@torch.inference_mode()
@pytest.mark.parametrize("prompt", EMPHASIS_PROMPTS)
def test_emphasis_prompts_on_bundled_model(tiny, photo, prompt):
    """Item 1: A1111's "Original" gives all-zero conditioning ("a (red) circle") or NaN (the others) here; sdcore
    falls back to "No norm" and draws a picture."""
    cond = tiny.encode_texts([prompt])
    assert torch.isfinite(cond).all() and cond.abs().mean() > 0.5
    assert torch.equal(cond, tiny.encode_texts([prompt], emphasis="No norm"))
    image = _img2img(tiny, photo, prompt).images[0]
    pixels = np.asarray(image).reshape(-1, 3)
    assert np.ptp(pixels, axis=0).max() > 100 and pixels.std() > 20  # not one colour
    if "red circle" in prompt:  # the tiny model draws the circle it is asked for (zero conditioning: none)
        assert _red_share(image) > 0.1


def test_emphasis_prompts_through_the_cli(bundled, tmp_path, capsys):
    from sdcore.cli import main

    photo_path = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 200, 200)).save(photo_path)
    assert main(["img2img", str(photo_path), "--ckpt", str(bundled), "--prompt", "(a red circle:1.5)", "--seed", "1",
                 "--outdir", str(tmp_path / "out")]) == 0
    (written,) = (tmp_path / "out").rglob("*.png")
    assert _red_share(Image.open(written)) > 0.1


# --------------------------------------------------------------------------------- NaN / inf where it first appears

@torch.inference_mode()
def test_huge_cfg_scale_names_the_call_and_true_advice(tiny, photo):
    with pytest.raises(FloatingPointError) as info:
        _img2img(tiny, photo, "a red circle", cfg_scale=1e308)
    message = str(info.value)
    assert re.match(r"model call 1 of 16 \(sigma 5\.789\) produced non-finite values \(NaN or inf\) with "
                    r"cfg_scale 1e\+308, UNet dtype float32; ", message), message
    assert "lower cfg_scale (1e+308 does not even fit in float32; A1111's UI allows 1 to 30)" in message
    assert "float32 (--dtype" not in message and "vae_dtype" not in message  # it already is float32


@torch.inference_mode()
def test_half_precision_unet_gets_the_dtype_hint(bundled, photo):
    half = load_checkpoint(bundled, dtype=torch.bfloat16)
    with pytest.raises(FloatingPointError, match=r"model call 1 of 16 .* UNet dtype bfloat16; .*lower cfg_scale.*; "
                                                 r"run the UNet in float32 \(--dtype float32"):
        _img2img(half, photo, "a red circle", cfg_scale=1e308)


@torch.inference_mode()
def test_nan_from_the_model_at_an_ordinary_cfg_scale(tiny, photo, monkeypatch):
    """A NaN made by the model itself at call 3 (DPM++ 2M Karras, 20 steps, strength 0.75: sigmas 5.789, 4.500,
    3.465, ...): named there, and neither cfg_scale nor float32 is the advice."""
    calls = []
    apply = tiny.apply_model

    def poisoned(*args, **kwargs):
        out = apply(*args, **kwargs)
        calls.append(1)
        return out * float("nan") if len(calls) == 3 else out

    monkeypatch.setattr(tiny, "apply_model", poisoned)
    with pytest.raises(FloatingPointError) as info:
        _img2img(tiny, photo, "a red circle")
    message = str(info.value)
    assert message.startswith("model call 3 of 16 (sigma 3.465) produced non-finite values (NaN or inf) with "
                              "cfg_scale 7, UNet dtype float32; largest |latent| it received "), message
    assert "lower cfg_scale" not in message and "--dtype" not in message
    assert message.endswith("cfg_scale and the UNet dtype are ordinary here, so the checkpoint's weights or the "
                            "inputs may hold non-finite or extreme values")


@torch.inference_mode()
def test_non_finite_conditioning_is_named(tiny, photo, monkeypatch):
    encode = tiny.encode_texts
    monkeypatch.setattr(tiny, "encode_texts", lambda texts, **kw: encode(texts, **kw) * float("inf"))
    with pytest.raises(FloatingPointError, match=r"^model call 1 of 16 .*; the prompt conditioning of this call is "
                                                 r"not finite$"):
        _img2img(tiny, photo, "a red circle")


@torch.inference_mode()
def test_decode_checks_the_latent_then_the_vae(tiny):
    latent = torch.zeros(2, 4, 8, 8)
    latent[1, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^VAE decode: the latent of image 1 is already non-finite .* "
                                                 r"upstream"):
        pipeline.decode(tiny, latent)
    with pytest.raises(FloatingPointError) as info:
        pipeline.decode(tiny, torch.full((1, 4, 8, 8), 1e36))
    message = str(info.value)
    assert message.startswith("VAE decode of image 0 produced non-finite values (NaN or inf) in float32; the latent "
                              "is finite but far out of the VAE's range (largest |latent| 1e+36"), message
    assert "vae_dtype" not in message


@torch.inference_mode()
def test_half_precision_vae_gets_the_float32_hint(bundled):
    half = load_checkpoint(bundled, vae_dtype=torch.float16)
    assert len(pipeline.decode(half, torch.zeros(1, 4, 2, 2))) == 1
    with pytest.raises(FloatingPointError, match=r"in float16; run the VAE in float32 \(load_checkpoint\(\.\.\., "
                                                 r"vae_dtype=torch\.float32\)"):
        pipeline.decode(half, torch.full((1, 4, 2, 2), 1e5))  # 1e5 / 0.18215 > float16's 65504


def test_cli_huge_cfg_scale_writes_nothing(bundled, tmp_path, capsys):
    """The CLI either exits 2 with the one-line message or lets the FloatingPointError through; nothing is saved."""
    from sdcore.cli import main

    photo_path = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 200, 200)).save(photo_path)
    argv = ["img2img", str(photo_path), "--ckpt", str(bundled), "--prompt", "a red circle", "--cfg-scale", "1e308",
            "--outdir", str(tmp_path / "out")]
    try:
        status = main(argv)
    except FloatingPointError as e:
        message = str(e)
    else:
        assert status == 2
        message = capsys.readouterr().err
    assert "cfg_scale 1e+308" in message and "lower cfg_scale" in message and "vae_dtype" not in message
    assert [p.name for p in tmp_path.rglob("*.png")] == ["photo.png"]


# ------------------------------------------------------------------------------------------- prompt parsers, fuzzed

SYNTAX = "()[]:|\\,. 0123456789-+eE"
hostile_text = st.one_of(
    st.text(),
    st.lists(st.sampled_from(list(SYNTAX) + ["a", "b", "AND", "BREAK", " AND ", "🐱", "日本", "\n", "\u0663"]),
             max_size=40).map("".join),
)


def _allowed_error(e: Exception) -> bool:
    return type(e) is ValueError and str(e).startswith("prompt ")


@PROPERTY
@given(hostile_text)
def test_parse_prompt_attention_never_crashes(text):
    try:
        pieces = parse_prompt_attention(text)
    except ValueError as e:
        assert _allowed_error(e), repr(e)
        return
    assert pieces and all(isinstance(s, str) and isinstance(w, float) and math.isfinite(w) for s, w in pieces)
    if not any(ch in text for ch in "\\()[]") and not re.search(r"\bBREAK\b", text):
        assert pieces == [[text, 1.0]]


@PROPERTY
@given(hostile_text, st.integers(1, 60), st.booleans())
def test_prompt_schedules_never_crash(text, steps, old):
    try:
        (schedule,) = get_learned_conditioning_prompt_schedules([text], steps, use_old_scheduling=old)
    except ValueError as e:
        assert _allowed_error(e), repr(e)
        return
    ends = [end for end, _ in schedule]
    assert ends == sorted(set(ends)) and ends[0] >= 1 and ends[-1] == steps
    assert all(isinstance(t, str) for _, t in schedule)
    if not any(ch in text for ch in "[]()\\:|"):
        assert schedule == [(steps, text)]


@PROPERTY
@given(hostile_text)
def test_multicond_never_crashes(text):
    try:
        indexes, flat, index_of = get_multicond_prompt_list([text])
    except ValueError as e:
        assert _allowed_error(e), repr(e)
        return
    assert len(indexes) == 1 and all(math.isfinite(w) for _, w in indexes[0])
    assert all(flat[index_of[t]] == t for t in flat)


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
plain_weight = st.floats(-1e6, 1e6, allow_nan=False).filter(lambda w: "e" not in repr(w))  # A1111: [+-]?[.\d]+


@PROPERTY
@given(words, plain_weight, st.lists(st.sampled_from(["()", "[]", "(:w)"]), max_size=6), st.data())
def test_emphasis_weights_round_trip(word, w, wrappers, data):
    """"(word:w)" -> float(f"{w}") exactly; each wrapper outside multiplies it, innermost first."""
    text, expected = f"({word}:{w})", float(f"{w}")
    for kind in wrappers:
        if kind == "(:w)":
            v = data.draw(plain_weight)
            text, expected = f"({text}:{v})", expected * float(f"{v}")
        else:
            text, expected = kind[0] + text + kind[1], expected * (1.1 if kind == "()" else 1 / 1.1)
    assert parse_prompt_attention(text) == [[word, expected]]
    assert parse_prompt_attention(f"x {text} y") == ([["x " + word + " y", 1.0]] if expected == 1.0 else
                                                     [["x ", 1.0], [word, expected], [" y", 1.0]])


@PROPERTY
@given(st.text())
def test_escaped_text_is_literal(text):
    assume(not re.search(r"\bBREAK\b", text))
    escaped = re.sub(r"([\\()\[\]])", r"\\\1", text)
    assert parse_prompt_attention(escaped) == [[text, 1.0]]


@PROPERTY
@given(words, words, st.integers(0, 80), st.integers(1, 60))
def test_schedule_steps_round_trip(a, b, when, steps):
    (schedule,) = get_learned_conditioning_prompt_schedules([f"x [{a}:{b}:{when}] y"], steps)
    first, second = f"x {a} y", f"x {b} y"
    if when < 1:
        assert schedule == [(steps, second)]
    elif when >= steps:
        assert schedule == [(steps, first)]
    else:
        assert schedule == [(when, first), (steps, second)]


@PROPERTY
@given(st.lists(st.tuples(words, plain_weight), min_size=1, max_size=5))
def test_and_weights_round_trip(parts):
    prompt = " AND ".join(f"{t}:{w}" for t, w in parts)
    indexes, flat, _ = get_multicond_prompt_list([prompt])
    texts = [t if i == 0 else " " + t for i, (t, _) in enumerate(parts)]
    assert [(flat[i], w) for i, w in indexes[0]] == [(t, float(f"{w}")) for t, (_, w) in zip(texts, parts)]


def test_parser_limits_are_value_errors():
    """Numbers past float range and nesting past the recursive parser's depth give ValueError, not OverflowError,
    RecursionError or inf weights (A1111: OverflowError for the schedule, inf weights for the others)."""
    assert get_learned_conditioning_prompt_schedules(["[a:b:1e999]", "[a:b:-1e999]"], 20) == [[(20, "a")],
                                                                                               [(20, "b")]]
    with pytest.raises(ValueError, match="emphasis weight at position 2 is not a finite number"):
        parse_prompt_attention("(a:" + "9" * 400 + ")")
    with pytest.raises(ValueError, match="nested emphasis multiplies the weight of 'a' to inf"):
        parse_prompt_attention("(" * 7500 + "a")
    with pytest.raises(ValueError, match="AND weight of part 'a' is not a finite number"):
        get_multicond_prompt_list(["a:" + "9" * 400])
    deep = "(" * MAX_BRACKET_DEPTH + "[a:b:5]" + ")" * MAX_BRACKET_DEPTH
    with pytest.raises(ValueError, match=f"more than {MAX_BRACKET_DEPTH} brackets open at once"):
        get_learned_conditioning_prompt_schedules([deep], 20)
    ok = "(" * (MAX_BRACKET_DEPTH - 1) + "[a:b:5]" + ")" * (MAX_BRACKET_DEPTH - 1)
    schedules = get_learned_conditioning_prompt_schedules([ok, "[" * MAX_BRACKET_DEPTH], 20)
    assert [end for end, _ in schedules[0]] == [5, 20] and schedules[1] == [(20, "[" * MAX_BRACKET_DEPTH)]


# ------------------------------------------------------------------------------------------- infotext, fuzzed

def _line(text: str) -> bool:
    return text == text.strip() and not text.startswith("Negative prompt:")


line = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",))).filter(_line)
block = st.lists(line, max_size=4).filter(lambda ls: not ls or ls[0] != "").map("\n".join)
key = st.from_regex(r"[A-Za-zÄé][A-Za-z0-9_ÄéΩ/\- ]{0,14}[A-Za-z0-9é]", fullmatch=True).filter(
    lambda k: k not in {*FIXED_KEYS, "Version", "User", "Prompt", "Negative prompt"} and k[-2:] not in ("-1", "-2"))


def _round_trips(key_: str, value: str) -> bool:
    """Values A1111's format reads back unchanged (the others are listed in test_infotext_known_losses)."""
    bare = quote(value) == value
    if bare and (value != value.lstrip() or re.fullmatch(r"\d+x\d+", value) or value == key_
                 or value.startswith('"')):
        return False
    return True


value = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@PROPERTY
@given(block, block, st.dictionaries(key, value, max_size=5), st.integers(1, 150), value,
       st.floats(-1e6, 1e6, allow_nan=False), st.integers(0, 2**32), st.integers(8, 4096), st.integers(8, 4096))
def test_infotext_round_trip(prompt, negative, extra, steps, sampler, cfg, seed, width, height):
    assume(all(_round_trips(k, v) for k, v in extra.items()) and _round_trips("Sampler", sampler))
    text = create_infotext(prompt, negative, steps=steps, sampler=sampler, cfg_scale=cfg, seed=seed, width=width,
                           height=height, extra=extra)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == negative
    expected = {"Steps": str(steps), "Sampler": sampler, "CFG scale": str(cfg), "Seed": str(seed),
                "Size-1": str(width), "Size-2": str(height), **extra, "Version": "sdcore-0.1.0"}
    assert {k: v for k, v in parsed.items() if k not in ("Prompt", "Negative prompt")} == expected


def test_infotext_known_losses():
    """What A1111's format itself cannot carry (A1111 `quote` / `parse_generation_parameters` do the same)."""
    base = dict(steps=1, sampler="x", cfg_scale=7, seed=1, width=8, height=8)
    extra = {"Quote": '"quoted"', "Same": "Same", "Lead": "  x", "Dims": "3x4", "Open": '"a', "Next": 'b"', "K": "v"}
    parsed = parse_infotext(create_infotext("  a \n b", "", **base, extra=extra))
    assert parsed["Prompt"] == "a\nb"  # each line is stripped
    assert parsed["Quote"] == "quoted" and "Same" not in parsed and parsed["Lead"] == "x"
    assert "K" not in parsed  # a key is 2+ characters
    assert (parsed["Dims-1"], parsed["Dims-2"]) == ("3", "4")
    assert parsed["Open"] == "a, Next: b" and "Next" not in parsed  # a bare value opening with '"' runs on


@PROPERTY
@given(st.one_of(st.text(), st.lists(st.sampled_from(list(':,"\\\n x1') + ["Steps", "Negative prompt:", "é"]),
                                     max_size=40).map("".join)))
def test_infotext_garbage_gives_prompt_only_or_params(text):
    parsed = parse_infotext(text)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())
    assert list(parsed)[:2] == ["Prompt", "Negative prompt"]
    last = text.strip().split("\n")[-1]
    if len(parsed) > 2:
        assert last.count(":") >= 3  # a parameter line needs 3 "Key: value" pairs
    if ":" not in text:
        assert parsed == {"Prompt": "\n".join(s.strip() for s in text.strip().split("\n")).lstrip("\n"),
                          "Negative prompt": ""}


def test_infotext_rejects_non_text():
    for bad in (None, b"Steps: 1", 7):
        with pytest.raises(TypeError, match="infotext must be a str"):
            parse_infotext(bad)
