"""Hostile and unusual inputs: what users really hand in (phone photos, 16-bit scans, palette PNGs, odd sizes).

Each section names the code it guards. Expected values are written out or built with numpy independently of the
code under test, so every test can fail.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import rect_mask
from sdcore import StableDiffusionProcessingImg2Img, images, process_images
from sdcore.cli.flags import open_image

# ---------------------------------------------------------------------------------------------------------------
# -- images and masks
#    sdcore/images.py: upright, viewed_size, to_8bit, as_viewed, flatten, create_binary_mask;
#    sdcore/cli/flags.py: open_image. Issue 11 items 2 (EXIF orientation) and 3 (16-bit / float / palette modes).
# ---------------------------------------------------------------------------------------------------------------

ORIENTATION = 0x0112


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def _saved(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def _reopened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# What a viewer shows for each EXIF orientation (EXIF 2.32, tag 0x0112), written in numpy on a stored [H, W, C] array.
VIEWED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                    # mirrored left-right
    3: lambda a: a[::-1, ::-1],                 # rotated 180
    4: lambda a: a[::-1, :],                    # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),              # transposed: viewed[i, j] = stored[j, i]
    6: lambda a: np.rot90(a, k=-1),             # rotated 90 clockwise: the stored top row becomes the right column
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # transverse: viewed[i, j] = stored[H-1-j, W-1-i]
    8: lambda a: np.rot90(a, k=1),              # rotated 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_flatten_shows_every_exif_orientation_as_a_viewer_does(orientation):
    stored = (np.arange(3 * 5 * 3).reshape(3, 5, 3) * 5).astype(np.uint8)  # 45 distinct values, W=5, H=3
    png = _reopened(_saved(Image.fromarray(stored), "PNG", exif=_exif(orientation)))
    expected = VIEWED[orientation](stored)
    out = images.flatten(png)
    assert out.size == (expected.shape[1], expected.shape[0])
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert images.viewed_size(png) == out.size
    mask = images.create_binary_mask(_reopened(_saved(Image.fromarray(stored[..., 0]), "PNG",
                                                      exif=_exif(orientation))))
    np.testing.assert_array_equal(np.asarray(mask), expected[..., 0])


def _phone_photo() -> np.ndarray:
    """40x24 stored picture: grey, with a red 12x8 block in the stored top-left corner."""
    stored = np.full((24, 40, 3), 90, np.uint8)
    stored[:8, :12] = (255, 0, 0)
    return stored


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_phone_photo_with_orientation_6_comes_out_upright_from_the_cli_and_the_api(fmt, tmp_path):
    path = tmp_path / f"phone.{fmt.lower()}"
    path.write_bytes(_saved(Image.fromarray(_phone_photo()), fmt, exif=_exif(6)))
    assert Image.open(path).size == (40, 24)  # stored sideways

    from_cli = open_image(path, "init")
    assert from_cli.size == (24, 40)
    for image in (images.flatten(from_cli), images.flatten(Image.open(path))):  # CLI read, then flatten: turned once
        assert image.size == (24, 40)
        a = np.asarray(image).astype(int)
        # Rotated 90 clockwise, the red block is now in the top-right corner: rows 0..11, columns 16..23
        # (JPEG: red and grey 90 differ by 165; its chroma blur stays well within 40 away from the block's edge).
        assert np.abs(a[1:11, 17:23] - (255, 0, 0)).max() <= 40
        assert np.abs(a[1:11, 1:15] - 90).max() <= 40
        assert np.abs(a[14:39, 1:23] - 90).max() <= 40


def test_the_job_images_are_not_changed_and_an_oriented_job_overlays_upright(sd1_tiny):
    stored = np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    init = Image.fromarray(stored)
    init.info["exif"] = _exif(6).tobytes()
    stored_mask = np.zeros((24, 40), np.uint8)
    stored_mask[:8, :12] = 255
    mask = Image.fromarray(stored_mask)
    mask.info["exif"] = _exif(6).tobytes()
    p = StableDiffusionProcessingImg2Img(
        sd_model=sd1_tiny, prompt="a red circle", init_images=[init], mask=mask, mask_blur=0, inpaint_full_res=True,
        inpaint_full_res_padding=4, width=32, height=32, steps=1, sampler_name="Euler", seed=7,
        denoising_strength=0.9)
    out = np.asarray(process_images(p).images[0])

    viewed, viewed_mask = np.rot90(stored, k=-1), np.rot90(stored_mask, k=-1)
    assert out.shape == viewed.shape == (40, 24, 3)
    keep = viewed_mask == 0
    np.testing.assert_array_equal(out[keep], viewed[keep])
    assert np.abs(out[~keep].astype(int) - viewed[~keep]).mean() > 1  # the masked corner was regenerated there
    for im, raw in ((p.init_images[0], stored), (p.mask, stored_mask)):
        assert im.size == (40, 24) and im.getexif()[ORIENTATION] == 6
        np.testing.assert_array_equal(np.asarray(im), raw)


def test_upright_twice_turns_once_and_leaves_unoriented_images_alone():
    stored = _phone_photo()
    im = Image.fromarray(stored)
    im.info["exif"] = _exif(8).tobytes()
    once = images.upright(im)
    np.testing.assert_array_equal(np.asarray(once), np.rot90(stored, k=1))
    assert ORIENTATION not in once.getexif()
    np.testing.assert_array_equal(np.asarray(images.upright(once)), np.rot90(stored, k=1))
    plain = Image.fromarray(stored)
    assert images.upright(plain) is plain and images.viewed_size(plain) == (40, 24)


@pytest.mark.parametrize("exif", [b"Exif\x00\x00not a TIFF header", b"\x00\x00\x00"])  # Pillow: SyntaxError
def test_an_unparsable_exif_block_is_ignored(exif, tmp_path):
    stored = _phone_photo()
    path = tmp_path / "broken-exif.png"
    path.write_bytes(_saved(Image.fromarray(stored), "PNG", exif=exif))
    np.testing.assert_array_equal(np.asarray(open_image(path, "init")), stored)
    im = Image.fromarray(stored)
    im.info["exif"] = exif
    np.testing.assert_array_equal(np.asarray(images.flatten(im)), stored)
    assert images.viewed_size(im) == (40, 24)
    np.testing.assert_array_equal(np.asarray(images.create_binary_mask(im.convert("L"))),
                                  np.asarray(Image.fromarray(stored).convert("L")))


# 16-bit: round(v / 257) = (v + 128) // 257, written out by hand for these values.
WORDS = [0, 1, 128, 129, 255, 256, 983, 0x7F7F, 0x8080, 0xFFFE, 0xFFFF]
BYTES = [0, 0, 0, 1, 1, 1, 4, 127, 128, 255, 255]


def _sixteen_bit(mode: str, words: list[int]) -> Image.Image:
    order = {"I;16": "<", "I;16L": "<", "I;16B": ">", "I;16N": "="}[mode]  # N = native
    return Image.frombytes(mode, (len(words), 1), struct.pack(f"{order}{len(words)}H", *words))


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N", "I"])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(mode):
    if mode == "I":
        im = Image.fromarray(np.array([WORDS + [-5, 70000]], dtype=np.int32))
        expected = BYTES + [0, 255]  # outside 0..65535 clipped first
    else:
        im = _sixteen_bit(mode, WORDS)
        expected = BYTES
    assert im.mode == mode
    before = im.tobytes()
    out = images.to_8bit(im)
    assert out.mode == "L"
    assert np.asarray(out).ravel().tolist() == expected
    assert np.asarray(images.flatten(im))[0, :, 1].tolist() == expected  # grey -> R = G = B
    assert np.asarray(images.create_binary_mask(im)).ravel().tolist() == expected
    assert im.tobytes() == before and im.mode == mode


def test_every_8_bit_grey_survives_16_bit_and_float_encodings():
    grey = np.arange(256, dtype=np.uint8)[None]
    as_16 = Image.fromarray(grey.astype(np.uint16) * 257)  # the usual 8 -> 16 bit expansion, mode I;16
    as_float = Image.fromarray(grey.astype(np.float32) / 255)  # mode F, 0..1
    for im in (as_16, as_float):
        np.testing.assert_array_equal(np.asarray(images.to_8bit(im)), grey)
        np.testing.assert_array_equal(np.asarray(images.create_binary_mask(im)), grey)


def test_a_16_bit_png_photo_is_read_as_a_viewer_shows_it():
    words = np.array([[0x8080, 0x2000], [0xFFFF, 0x0100]], dtype=np.uint16)
    png = _reopened(_saved(Image.fromarray(words), "PNG"))
    assert png.mode in ("I;16", "I")  # Pillow >= 10: I;16; older: I
    out = np.asarray(images.flatten(png))
    np.testing.assert_array_equal(out[..., 0], [[128, 32], [255, 1]])  # 0x2000 / 257 = 31.9 -> 32
    assert (out == out[..., :1]).all()


def test_a_faint_strip_on_a_16_bit_mask_stays_keep():
    words = np.zeros((64, 64), np.uint16)
    words[:, 16:32] = 983  # 1.5 % grey, 983 / 65535 = 0.015
    words[:, 32:] = 0xFFFF
    mask = _reopened(_saved(Image.fromarray(words), "PNG"))
    binary = np.asarray(images.create_binary_mask(mask))
    assert binary[0, :40:8].tolist() == [0, 0, 4, 4, 255]
    nmask = images.latent_mask(images.create_binary_mask(mask), 8, 8)[0, 0].numpy()
    np.testing.assert_array_equal(nmask, np.repeat([[0, 0, 0, 0, 1, 1, 1, 1]], 8, axis=0))


def test_float_images_are_0_to_1():
    values = [0.0, 0.25, 0.5, 1.0, -0.5, 2.0, np.nan, np.inf, -np.inf, 127.5 / 255]
    expected = [0, 64, 128, 255, 0, 255, 0, 255, 0, 128]  # rint(x * 255), ties to even: 127.5 -> 128
    im = Image.fromarray(np.array([values], dtype=np.float32))
    assert im.mode == "F"
    assert np.asarray(images.to_8bit(im)).ravel().tolist() == expected
    assert np.asarray(images.flatten(im))[0, :, 2].tolist() == expected


def _palette_png(transparency) -> Image.Image:
    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    p.putdata([0, 1, 2])
    return _reopened(_saved(p, "PNG", **({} if transparency is None else {"transparency": transparency})))


def _rgba_flattened(rgba: list[tuple[int, int, int, int]], bg: str) -> np.ndarray:
    return np.asarray(images.flatten(Image.fromarray(np.array([rgba], np.uint8), mode="RGBA"), bg))


def test_palette_images_with_and_without_transparency():
    plain = _palette_png(None)
    assert plain.mode == "P" and "transparency" not in plain.info
    assert images.to_8bit(plain).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(images.flatten(plain, "#102030")), [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])

    table = _palette_png(bytes([255, 0, 128]))  # alpha per palette entry (PNG tRNS table)
    assert isinstance(table.info["transparency"], bytes)
    out = np.asarray(images.flatten(table, "#102030"))
    np.testing.assert_array_equal(out[0, :2], [[255, 0, 0], [16, 32, 48]])
    np.testing.assert_array_equal(out, _rgba_flattened([(255, 0, 0, 255), (0, 255, 0, 0), (0, 0, 255, 128)],
                                                       "#102030"))
    np.testing.assert_array_equal(np.asarray(images.create_binary_mask(table)), [[255, 0, 0]])  # a > 128

    one_index = _palette_png(1)  # a single transparent index
    assert one_index.info["transparency"] == 1
    np.testing.assert_array_equal(np.asarray(images.flatten(one_index, "#102030")),
                                  [[[255, 0, 0], [16, 32, 48], [0, 0, 255]]])


def test_grey_with_alpha_is_flattened_and_masks_read_its_alpha():
    la = Image.fromarray(np.array([[[100, 255], [100, 0], [200, 129], [200, 128]]], np.uint8), mode="LA")
    out = np.asarray(images.flatten(la, "#102030"))
    np.testing.assert_array_equal(out[0, :2], [[100, 100, 100], [16, 32, 48]])
    np.testing.assert_array_equal(out, _rgba_flattened([(100, 100, 100, 255), (100, 100, 100, 0),
                                                        (200, 200, 200, 129), (200, 200, 200, 128)], "#102030"))
    # The alpha is the mask, as for RGBA: 255 if a > 128 else 0 (129 -> regenerate, 128 -> keep), or a itself.
    np.testing.assert_array_equal(np.asarray(images.create_binary_mask(la)), [[255, 0, 255, 0]])
    np.testing.assert_array_equal(np.asarray(images.create_binary_mask(la, round=False)), [[255, 0, 129, 128]])


def test_cmyk_bilevel_and_rgba_modes():
    cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0]))
    np.testing.assert_array_equal(np.asarray(images.flatten(cmyk)), [[[255, 255, 255], [0, 0, 0], [0, 255, 255]]])
    bilevel = Image.fromarray(np.array([[True, False, True]]))
    assert bilevel.mode == "1"
    np.testing.assert_array_equal(np.asarray(images.flatten(bilevel))[..., 0], [[255, 0, 255]])
    np.testing.assert_array_equal(np.asarray(images.create_binary_mask(bilevel)), [[255, 0, 255]])
    rgba = Image.fromarray(np.array([[[9, 8, 7, 0], [9, 8, 7, 255]]], np.uint8), mode="RGBA")
    np.testing.assert_array_equal(np.asarray(images.flatten(rgba, "#102030")), [[[16, 32, 48], [9, 8, 7]]])


@pytest.mark.parametrize("mode", ["1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I",
                                  "I;16", "I;16B", "F"])
def test_to_8bit_always_gives_l_rgb_or_rgba(mode):
    out = images.to_8bit(Image.new(mode, (3, 2)))
    assert out.mode in ("L", "RGB", "RGBA") and out.size == (3, 2)
    assert images.flatten(Image.new(mode, (3, 2))).mode == "RGB"
    assert images.create_binary_mask(Image.new(mode, (3, 2))).mode == "L"


def test_a_mode_pillow_cannot_convert_is_refused_by_name():
    with pytest.raises(ValueError, match="'La'"):
        images.to_8bit(Image.new("La", (2, 2)))


# The inpainting guarantee as a property: with mask blur 0, every pixel outside the mask is the input's, exactly.

@st.composite
def _overlay_jobs(draw):
    w, h = draw(st.integers(24, 96)), draw(st.integers(24, 96))
    x1 = draw(st.integers(0, w - 1))
    y1 = draw(st.integers(0, h - 1))
    return dict(size=(w, h), box=(x1, y1, draw(st.integers(x1 + 1, w)), draw(st.integers(y1 + 1, h))),
                full_res=draw(st.booleans()), padding=draw(st.integers(0, 64)), resize_mode=draw(st.integers(0, 2)),
                width=draw(st.sampled_from((32, 64))), height=draw(st.sampled_from((32, 64))),
                steps=draw(st.integers(1, 2)), fill=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2**31 - 1)),
                grey16=draw(st.booleans()))


_IDENTITY = dict(size=(32, 32), box=(4, 6, 20, 30), full_res=False, padding=0, resize_mode=0, width=32, height=32,
                 steps=1, fill=1, seed=1, grey16=False)


@settings(max_examples=25, deadline=None, database=None)
@given(case=_overlay_jobs())
@example(case=_IDENTITY)
@example(case=dict(_IDENTITY, size=(95, 25), box=(0, 0, 1, 1), full_res=True, padding=64, fill=0, grey16=True))
@example(case=dict(_IDENTITY, size=(25, 95), box=(3, 80, 25, 95), resize_mode=2, width=64, fill=2))
def test_pixels_outside_the_mask_are_the_inputs_after_the_overlay(sd1_tiny, case):
    w, h = case["size"]
    rng = np.random.default_rng(case["seed"])
    if case["grey16"]:
        words = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        init = Image.fromarray(words)  # mode I;16
        viewed = np.repeat(((words.astype(np.int64) + 128) // 257).astype(np.uint8)[..., None], 3, axis=2)
    else:
        viewed = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        init = Image.fromarray(viewed)
    mask = rect_mask((w, h), case["box"])
    p = StableDiffusionProcessingImg2Img(
        sd_model=sd1_tiny, prompt="a red circle", init_images=[init], mask=mask, mask_blur=0,
        inpaint_full_res=case["full_res"], inpaint_full_res_padding=case["padding"], resize_mode=case["resize_mode"],
        inpainting_fill=case["fill"], width=case["width"], height=case["height"], steps=case["steps"],
        sampler_name="Euler", seed=case["seed"], denoising_strength=0.75)
    out = np.asarray(process_images(p).images[0])

    if case["full_res"]:  # pasted back into the original picture: the original size, kept where the mask is 0
        expected, keep = viewed, np.asarray(mask) == 0
    else:  # the whole picture at the processing size: kept where the resized mask is 0
        size = (case["width"], case["height"])
        expected = np.asarray(images.resize_image(case["resize_mode"], Image.fromarray(viewed), *size))
        keep = np.asarray(images.resize_image(case["resize_mode"], mask, *size).convert("L")) == 0
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out[keep], expected[keep])


# -- files that are not images, decompression bombs ----------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
                                     b"GIF89a" + b"\xff" * 10])
def test_a_file_that_is_not_an_image_is_one_line_exit_2(tmp_path, capsys, payload):
    """Hostile bytes under an image name: exit 2, one line naming the argument, nothing written."""
    from sdcore.cli import main

    bad = tmp_path / "photo.png"
    bad.write_bytes(payload)
    out = tmp_path / "out"
    code = main(["img2img", str(bad), "--outdir", str(out), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("sdcore: error: init: cannot read image"), err
    assert "Traceback" not in err and not out.exists()


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, capsys, monkeypatch):
    """An image above Pillow's MAX_IMAGE_PIXELS is refused (not just warned about) with one line, exit 2."""
    from PIL import Image as PILImage

    from sdcore.cli import main

    bomb = tmp_path / "bomb.png"
    PILImage.new("L", (64, 64)).save(bomb)  # small file; the limit is lowered so that it counts as a bomb
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)  # > 2x the limit: DecompressionBombError
    out = tmp_path / "out"
    code = main(["img2img", str(bomb), "--outdir", str(out), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read image" in err and "DecompressionBomb" in err and err.count("\n") == 1, err
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # between 1x and 2x: only a warning in Pillow
    code = main(["img2img", str(bomb), "--outdir", str(out), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "DecompressionBombWarning" in err, err
    assert not out.exists()
