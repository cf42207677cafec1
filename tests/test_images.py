"""Tests for sdcore/images.py. Vectors cite docs/a1111-semantics.md sections ("a1111-semantics §N")."""
from __future__ import annotations

import datetime

import cv2
import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image
from skimage import data as skdata
from skimage import exposure

from sdcore import images


def _square_mask(size: int = 64, lo: int = 24, hi: int = 40) -> Image.Image:
    """The a1111-semantics §13 mask: a white square covering pixels lo..hi-1 on both axes."""
    a = np.zeros((size, size), np.uint8)
    a[lo:hi, lo:hi] = 255
    return Image.fromarray(a, mode="L")


# ---------------------------------------------------------------------------------------------------------------
# Mask blur (a1111-semantics §2.2.3, 13)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blur, k", [(1, 7), (2, 11), (4, 21), (8, 41), (16, 81), (64, 321)])
def test_mask_blur_kernel_size_spec13(blur, k):
    assert images.mask_blur_kernel_size(blur) == k


@pytest.mark.parametrize("blur", [-1, -0.5, float("nan"), "4", True])
def test_mask_blur_kernel_size_rejects_bad_blur(blur):
    with pytest.raises(ValueError, match=r"blur must be a real number >= 0"):
        images.mask_blur_kernel_size(blur)


def test_step_edge_x_blur_matches_spec13():
    # a1111-semantics §13: a 0|255 vertical step at column 32, x-blur 4, columns 24..40 (OpenCV 5.0 values; ±1 across
    # versions).
    a = np.zeros((64, 64), np.uint8)
    a[:, 32:] = 255
    out = np.asarray(images.blur_mask(Image.fromarray(a, mode="L"), 4, 0))
    expected = [7, 12, 21, 32, 48, 67, 90, 115, 140, 165, 188, 207, 223, 234, 243, 248, 252]
    for row in (0, 31, 63):
        np.testing.assert_array_equal(out[row, 24:41], expected)


def test_square_xy_blur_matches_spec13_and_grows_bbox():
    # a1111-semantics §13: 16x16 square at 24..39 in 64x64, blurred x then y with 4: row 32, cols 16..32; bbox
    # (14,14,50,50).
    out = images.blur_mask(_square_mask(), 4, 4)
    expected = [7, 12, 20, 31, 46, 64, 86, 111, 135, 159, 181, 199, 214, 225, 233, 235, 235]
    np.testing.assert_array_equal(np.asarray(out)[32, 16:33], expected)
    assert out.getbbox() == (14, 14, 50, 50)
    assert out.mode == "L" and out.size == (64, 64)


def test_blur_is_separable_x_then_y_and_skips_zero_axes():
    mask = _square_mask()
    x_only = images.blur_mask(mask, 4, 0)
    # A y-blur of a mask that is constant along y changes nothing; blur 0 on both axes is the identity.
    step = np.zeros((32, 64), np.uint8)
    step[:, 20:] = 255
    np.testing.assert_array_equal(np.asarray(images.blur_mask(Image.fromarray(step), 0, 6)), step)
    np.testing.assert_array_equal(np.asarray(images.blur_mask(mask, 0, 0)), np.asarray(mask))
    # x then y equals the y pass applied to the x-blurred mask.
    np.testing.assert_array_equal(np.asarray(images.blur_mask(mask, 4, 3)),
                                  np.asarray(images.blur_mask(x_only, 0, 3)))


@pytest.mark.parametrize("sigma", [0.5, 1, 2.5, 4, 9])
def test_fixed_point_kernel_sums_to_256_and_tracks_the_float_gaussian(sigma):
    k = images.mask_blur_kernel_size(sigma)
    q = images.gaussian_kernel_u8(k, sigma)
    assert q.sum() == 256 and q.dtype == np.int64
    np.testing.assert_array_equal(q, q[::-1])
    d = np.arange(k) - (k - 1) / 2
    w = np.exp(-d * d / (2 * sigma * sigma))
    assert np.abs(q / 256 - w / w.sum()).max() <= 1 / 256


def test_blur_tracks_a_float_gaussian_with_reflect_101_border():
    # Independent oracle: float Gaussian with scipy's "mirror" (= OpenCV BORDER_REFLECT_101). The fixed-point result
    # may differ by the kernel quantisation, at most 255 * sum|q/256 - w|, plus 0.5 for the final rounding.
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 50)).astype(np.uint8)
    for sigma in (1, 3, 8, 30):  # 30: kernel 151 longer than the image, repeated reflection
        k = images.mask_blur_kernel_size(sigma)
        d = np.arange(k) - (k - 1) / 2
        w = np.exp(-d * d / (2 * sigma * sigma))
        w /= w.sum()
        bound = 255 * np.abs(images.gaussian_kernel_u8(k, sigma) / 256 - w).sum() + 0.5
        for axis, (bx, by) in ((1, (sigma, 0)), (0, (0, sigma))):
            ref = scipy.ndimage.correlate1d(a.astype(np.float64), w, axis=axis, mode="mirror")
            ours = np.asarray(images.blur_mask(Image.fromarray(a), bx, by)).astype(np.float64)
            assert np.abs(ours - ref).max() <= bound


def test_blur_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blur_x"):
        images.blur_mask(_square_mask(), -1, 4)
    with pytest.raises(ValueError, match="blur_y"):
        images.blur_mask(_square_mask(), 4, float("nan"))
    with pytest.raises(ValueError, match="mode"):
        images.blur_mask(_square_mask().convert("RGB"), 4, 4)


# ---------------------------------------------------------------------------------------------------------------
# Binary mask, overlay mask, latent mask (a1111-semantics §2.2.1, 2.2.5, 2.9, 13)
# ---------------------------------------------------------------------------------------------------------------

def test_create_binary_mask_alpha_rule_spec13():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 3] = [[0, 128, 129], [255, 200, 1]]
    mask = Image.fromarray(rgba, mode="RGBA")
    np.testing.assert_array_equal(np.asarray(images.create_binary_mask(mask)), [[0, 0, 255], [255, 255, 0]])
    np.testing.assert_array_equal(np.asarray(images.create_binary_mask(mask, round=False)), rgba[..., 3])
    assert images.create_binary_mask(mask).mode == "L"


def test_create_binary_mask_luma_for_opaque_and_rgb_masks_spec221():
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], np.uint8)
    expected = [[76, 150, 29, 90]]  # ITU-R 601 luma, never binarised
    np.testing.assert_array_equal(np.asarray(images.create_binary_mask(Image.fromarray(pixels))), expected)
    opaque = np.concatenate([pixels, np.full((1, 4, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(np.asarray(images.create_binary_mask(Image.fromarray(opaque, mode="RGBA"))),
                                  expected)


def test_double_mask_for_overlay_spec13():
    mask = Image.fromarray(np.array([[0, 100, 127, 128, 200, 255]], np.uint8))
    np.testing.assert_array_equal(np.asarray(images.double_mask_for_overlay(mask)), [[0, 200, 254, 255, 255, 255]])
    # Modes 1/2 of resize_image return grey RGB masks; the result is the same.
    np.testing.assert_array_equal(np.asarray(images.double_mask_for_overlay(mask.convert("RGB"))),
                                  [[0, 200, 254, 255, 255, 255]])


def test_latent_mask_of_square_spec13():
    soft = images.latent_mask(_square_mask(), 8, 8, round=False)
    assert soft.shape == (1, 1, 8, 8) and soft.dtype == torch.float32
    s = soft[0, 0]
    assert torch.allclose(s[3:5, 3:5], torch.full((2, 2), 0.871), atol=1.5e-3)
    for ring in (s[2, 3:5], s[5, 3:5], s[3:5, 2], s[3:5, 5]):
        assert torch.allclose(ring, torch.full((2,), 0.075), atol=1.5e-3)
    for corner in (s[2, 2], s[2, 5], s[5, 2], s[5, 5]):
        assert abs(float(corner) - 0.008) < 1.5e-3
    rounded = images.latent_mask(_square_mask(), 8, 8)[0, 0]
    expected = torch.zeros(8, 8)
    expected[3:5, 3:5] = 1
    assert torch.equal(rounded, expected)


def test_latent_mask_of_blurred_square_spec13():
    s = images.latent_mask(images.blur_mask(_square_mask(), 4, 4), 8, 8, round=False)[0, 0]
    assert torch.allclose(s[3:5, 3:5], torch.full((2, 2), 0.667), atol=1.5e-3)
    assert torch.allclose(s[3:5, 2], torch.full((2,), 0.161), atol=1.5e-3)  # left of centre
    assert torch.allclose(s[2, 3:5], torch.full((2,), 0.157), atol=1.5e-3)  # above centre
    assert abs(float(s[2, 2]) - 0.035) < 1.5e-3
    rounded = images.latent_mask(images.blur_mask(_square_mask(), 4, 4), 8, 8)[0, 0]
    assert torch.equal(rounded.nonzero(), torch.tensor([[3, 3], [3, 4], [4, 3], [4, 4]]))


def test_latent_mask_rounds_at_one_half_spec29():
    # a1111-semantics §2.9: np.around of value/255. A uniform mask stays uniform through the bicubic resize, so grey 127
    # (0.498) -> 0 and grey 128 (0.502) -> 1; without rounding the weight is exactly v / 255.
    for grey, expected in ((127, 0.0), (128, 1.0), (140, 1.0)):
        mask = Image.new("L", (64, 64), grey)
        assert torch.equal(images.latent_mask(mask, 8, 8), torch.full((1, 1, 8, 8), expected))
        assert torch.allclose(images.latent_mask(mask, 8, 8, round=False), torch.full((1, 1, 8, 8), grey / 255))


def test_latent_mask_device_dtype_and_errors():
    m = images.latent_mask(_square_mask(), 8, 4, dtype=torch.float64, device="cpu")
    assert m.shape == (1, 1, 4, 8) and m.dtype == torch.float64
    with pytest.raises(ValueError, match="latent_w"):
        images.latent_mask(_square_mask(), 0, 8)


# ---------------------------------------------------------------------------------------------------------------
# Resize modes (a1111-semantics §3.1, 13)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src, dst, crop, fill", [
    ((640, 480), (512, 512), ((682, 512), (-85, 0)), ((512, 384), (0, 64))),
    ((300, 600), (512, 512), ((512, 1024), (0, -256)), ((256, 512), (128, 0))),
    ((512, 512), (768, 512), ((768, 768), (0, -128)), ((512, 512), (128, 0))),
    ((1000, 700), (512, 768), ((1097, 768), (-292, 0)), ((512, 358), (0, 205))),
    ((513, 512), (512, 512), ((513, 512), (0, 0)), ((512, 511), (0, 1))),
])
def test_resize_geometry_spec13(src, dst, crop, fill):
    assert images.resize_geometry(1, *src, *dst) == crop
    assert images.resize_geometry(2, *src, *dst) == fill
    assert images.resize_geometry(3, *src, *dst) == fill


def _bands_image(w: int, h: int, vertical: bool) -> Image.Image:
    """Red first fifth, blue last fifth, green between (along y, or along x when not `vertical`)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = (0, 255, 0)
    if vertical:
        a[: h // 5] = (255, 0, 0)
        a[h - h // 5:] = (0, 0, 255)
    else:
        a[:, : w // 5] = (255, 0, 0)
        a[:, w - w // 5:] = (0, 0, 255)
    return Image.fromarray(a)


def test_resize_mode2_fills_top_and_bottom_bands_with_the_edge_rows():
    im = _bands_image(640, 480, vertical=True)
    out = np.asarray(images.resize_image(2, im, 512, 512))
    resized = np.asarray(im.resize((512, 384), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out[64:448], resized)
    assert (out[:64] == (255, 0, 0)).all() and (out[448:] == (0, 0, 255)).all()


def test_resize_mode2_fills_left_and_right_bands_with_the_edge_columns():
    im = _bands_image(300, 600, vertical=False)
    out = np.asarray(images.resize_image(2, im, 512, 512))
    resized = np.asarray(im.resize((256, 512), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out[:, 128:384], resized)
    assert (out[:, :128] == (255, 0, 0)).all() and (out[:, 384:] == (0, 0, 255)).all()


def test_resize_mode2_band_overshoot_spec31():
    # a1111-semantics §3.1: a 3-row ramp 0/100/200 stretched from its bottom edge gives 213 (bicubic overshoot).
    ramp = Image.fromarray(np.repeat(np.array([[0], [100], [200]], np.uint8), 16, axis=1)).convert("RGB")
    out = np.asarray(images.resize_image(2, ramp, 16, 9))[:, 0, 0]
    np.testing.assert_array_equal(out[3:6], [0, 100, 200])
    np.testing.assert_array_equal(out[6:], [213, 213, 213])


def test_resize_mode1_crops_symmetrically():
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (480, 640, 3)).astype(np.uint8))
    out = np.asarray(images.resize_image(1, im, 512, 512))
    resized = np.asarray(im.resize((682, 512), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out, resized[:, 85:597])


def test_resize_modes_output_modes_spec31():
    mask = _square_mask()
    assert images.resize_image(0, mask, 32, 16).mode == "L"
    for mode in (1, 2, 3):
        out = images.resize_image(mode, mask, 32, 16)
        assert out.mode == "RGB" and out.size == (32, 16)
    # Mode 3 is mode 2 inside resize_image.
    im = _bands_image(64, 48, vertical=True)
    assert images.resize_image(3, im, 40, 40).tobytes() == images.resize_image(2, im, 40, 40).tobytes()


def test_resize_image_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resize mode"):
        images.resize_image(4, _square_mask(), 8, 8)
    with pytest.raises(ValueError, match="height"):
        images.resize_image(0, _square_mask(), 8, 0)
    with pytest.raises(TypeError, match="im must be a PIL"):
        images.resize_image(0, np.zeros((4, 4)), 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# Crop regions (a1111-semantics §3.2, 2.2.4, 13)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("region, proc, image, expected", [
    ((100, 200, 228, 232), (512, 512), (512, 512), (100, 152, 228, 280)),
    ((68, 168, 260, 264), (512, 512), (512, 512), (68, 120, 260, 312)),
    ((0, 0, 64, 16), (512, 512), (512, 512), (0, 0, 64, 64)),
    ((400, 500, 500, 512), (512, 512), (512, 512), (400, 412, 500, 512)),
    ((10, 0, 20, 512), (512, 512), (512, 512), (0, 0, 512, 512)),
    ((100, 100, 200, 300), (768, 512), (1024, 1024), (0, 100, 300, 300)),
])
def test_expand_crop_region_spec13(region, proc, image, expected):
    assert images.expand_crop_region(region, *proc, *image) == expected


def test_crop_region_v2_spec13():
    mask = np.zeros((512, 512), np.uint8)
    mask[200:232, 100:228] = 255
    mask = Image.fromarray(mask)
    assert images.get_crop_region_v2(mask, 0) == (100, 200, 228, 232)
    assert images.get_crop_region_v2(mask, 32) == (68, 168, 260, 264)
    x1, y1, x2, y2 = images.expand_crop_region(images.get_crop_region_v2(mask, 0), 512, 512, 512, 512)
    assert (x1, y1, x2 - x1, y2 - y1) == (100, 152, 128, 128)  # paste_to of the first example
    assert images.get_crop_region_v2(_square_mask(), 8) == (16, 16, 48, 48)
    assert images.get_crop_region_v2(_square_mask(), 30) == (0, 0, 64, 64)
    assert images.get_crop_region_v2(Image.new("L", (8, 8)), 4) is None


def test_crop_region_errors():
    with pytest.raises(ValueError, match="pad"):
        images.get_crop_region_v2(_square_mask(), -1)
    with pytest.raises(ValueError, match="mode"):
        images.get_crop_region_v2(_square_mask().convert("RGB"), 0)
    with pytest.raises(ValueError, match="crop_region"):
        images.expand_crop_region((10, 10, 10, 20), 512, 512, 512, 512)


# ---------------------------------------------------------------------------------------------------------------
# flatten, fill, overlay (a1111-semantics §2.5, 4, 9.1)
# ---------------------------------------------------------------------------------------------------------------

def test_flatten_composites_rgba_over_the_background():
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8)
    out = np.asarray(images.flatten(Image.fromarray(rgba, mode="RGBA"), "#ffffff")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 20, 30]
    assert np.abs(out[0, 2] - 127).max() <= 1
    rgb = Image.fromarray(rgba[..., :3])
    assert images.flatten(rgb, "#000000").tobytes() == rgb.tobytes()


def _left_right_image(w=64, h=48) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (200, 40, 40)
    a[:, w // 2:] = (40, 40, 200)
    return Image.fromarray(a)


def test_fill_keeps_unmasked_pixels_and_fills_from_the_surroundings_spec4():
    image = _left_right_image()
    mask = np.zeros((48, 64), np.uint8)
    mask[16:32, 8:24] = 255  # entirely inside the red half
    out = np.asarray(images.fill(image, Image.fromarray(mask)))
    src = np.asarray(image)
    keep = mask == 0
    np.testing.assert_array_equal(out[keep], src[keep])
    # Masked pixels come from blurs of red surroundings (with some blue from afar): reddish, not the black canvas.
    filled = out[mask == 255].astype(int)
    assert (filled[:, 0] > filled[:, 2]).all() and filled.min() > 30


def test_fill_of_a_uniform_image_is_that_colour_up_to_premultiplied_rounding():
    # PIL's 8-bit premultiplied layers lose precision where alpha is small; a few levels accumulate at the centre.
    image = Image.new("RGB", (32, 32), (90, 150, 30))
    mask = _square_mask(32, 8, 24)
    out = np.asarray(images.fill(image, mask)).astype(int)
    err = np.abs(out - (90, 150, 30)).max(axis=-1)
    assert err[np.asarray(mask) == 0].max() == 0
    assert err.max() <= 6 and err.mean() < 1


def test_make_overlay_alpha_is_inverse_mask():
    image = _left_right_image()
    mask = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    overlay = images.make_overlay(image, Image.fromarray(mask))
    arr = np.asarray(overlay)
    assert overlay.mode == "RGBA"
    np.testing.assert_array_equal(arr[..., 3], 255 - mask)
    np.testing.assert_array_equal(arr[mask == 0][:, :3], np.asarray(image)[mask == 0])
    with pytest.raises(ValueError, match="size"):
        images.make_overlay(image, Image.new("L", (10, 10)))


def test_apply_overlay_whole_picture_spec91():
    original = _left_right_image()
    generated = Image.new("RGB", original.size, (0, 255, 0))
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:50] = 255
    overlay = images.make_overlay(original, Image.fromarray(mask))
    out = np.asarray(images.apply_overlay(generated, None, overlay))
    np.testing.assert_array_equal(out[mask == 0], np.asarray(original)[mask == 0])
    assert (out[mask == 255] == (0, 255, 0)).all()
    assert images.apply_overlay(generated, None, None) is generated
    with pytest.raises(ValueError, match="size"):
        images.apply_overlay(generated.resize((32, 32)), None, overlay)


def test_apply_overlay_only_masked_uncrops_to_the_original_size_spec91():
    original = Image.fromarray(np.random.default_rng(2).integers(0, 256, (128, 160, 3)).astype(np.uint8))
    mask = np.zeros((128, 160), np.uint8)
    mask[40:60, 50:90] = 255
    overlay = images.make_overlay(original, Image.fromarray(mask))
    paste_to = (40, 30, 64, 48)  # x, y, w, h of the crop region (40, 30, 104, 78)
    crop_result = Image.new("RGB", (128, 96), (7, 8, 9))  # the processed crop at processing size
    out = images.apply_overlay(crop_result, paste_to, overlay)
    assert out.size == (160, 128)
    arr = np.asarray(out)
    np.testing.assert_array_equal(arr[mask == 0], np.asarray(original)[mask == 0])
    assert (arr[mask == 255] == (7, 8, 9)).all()


# ---------------------------------------------------------------------------------------------------------------
# Colour correction (a1111-semantics §9.2)
# ---------------------------------------------------------------------------------------------------------------

def test_set_luminosity_hand_vectors():
    # In gamut: C + (l - Lum(C)); Lum(0.2, 0.4, 0.6) = 0.363.
    c = np.array([0.2, 0.4, 0.6])
    np.testing.assert_allclose(images.luminosity(c), 0.363, atol=1e-12)
    np.testing.assert_allclose(images.set_luminosity(c, np.array(0.5)), c + 0.137, atol=1e-12)
    # Above 1: (1,0,0) to l = 0.9 -> (1.601, .601, .601), ClipColor with L = 0.9, x = 1.601.
    out = images.set_luminosity(np.array([1.0, 0.0, 0.0]), np.array(0.9))
    np.testing.assert_allclose(out, [1.0, 0.9 - 0.299 * 0.1 / 0.701, 0.9 - 0.299 * 0.1 / 0.701], atol=1e-12)
    np.testing.assert_allclose(images.luminosity(out), 0.9, atol=1e-12)
    # Below 0: (0,0,1) to l = 0.05 -> (-0.064, -0.064, 0.936); L = 0.05, n = -0.064.
    out = images.set_luminosity(np.array([0.0, 0.0, 1.0]), np.array(0.05))
    d = 0.05 - 0.114
    expected = 0.05 + (np.array([d, d, 1 + d]) - 0.05) * 0.05 / (0.05 - d)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    assert out.min() >= -1e-12


def _blendmodes_2022_luminosity(background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """blendmodes 2022 `blendLayers(background, foreground, LUMINOSITY)` of two opaque uint8 RGB arrays, restated.

    `imageIntToFloat` (/255), `luminosity = _setLum(background, _lum(foreground))` with its per-pixel ClipColor loop
    (min, max and Lum taken before either clip; the second clip sees the first one's result), the alpha composite
    (both alphas 1: `0 * bg + 0 * fg + 1 * blend`), `np.clip` to [0, 1] and `imageFloatToInt` (`* 255`, truncated).
    """
    bg, fg = background / 255, foreground / 255

    def lum(c):
        return (c[:, :, 0] * 0.299) + (c[:, :, 1] * 0.587) + (c[:, :, 2] * 0.114)

    colours = bg.copy()
    delta = lum(fg) - lum(colours)
    for k in range(3):
        colours[:, :, k] += delta
    lums, mins, maxs = lum(colours), colours.min(axis=2), colours.max(axis=2)
    for i in range(colours.shape[0]):
        for j in range(colours.shape[1]):
            c, l = colours[i][j], lums[i, j]
            if mins[i, j] < 0:
                colours[i][j] = l + (((c - l) * l) / (l - mins[i, j]))
            if maxs[i, j] > 1:
                colours[i][j] = l + (((c - l) * (1 - l)) / (maxs[i, j] - l))
    composed = 0.0 * bg + 0.0 * fg + 1.0 * colours
    return (np.clip(composed, 0, 1) * 255).astype(np.uint8)


def _a1111_color_correction(init: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """A1111 v1.10.1 `setup_color_correction` + `apply_color_correction` on uint8 RGB arrays, from the libraries."""
    correction = cv2.cvtColor(init, cv2.COLOR_RGB2LAB)
    corrected = cv2.cvtColor(exposure.match_histograms(cv2.cvtColor(generated, cv2.COLOR_RGB2LAB), correction,
                                                       channel_axis=2), cv2.COLOR_LAB2RGB).astype("uint8")
    return _blendmodes_2022_luminosity(corrected, generated)


def test_setup_color_correction_is_opencv_8bit_lab():
    # White/black: L* 100/0, a* = b* = 0. Red (sRGB): L* 53.24, a* 80.09, b* 67.20 -> 136, 208, 195. Grey 128: L* 53.59.
    points = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [128, 128, 128]]], np.uint8)
    lab = images.setup_color_correction(Image.fromarray(points))
    assert lab.dtype == np.uint8 and lab.shape == (1, 4, 3)
    np.testing.assert_array_equal(lab, [[[255, 128, 128], [0, 128, 128], [136, 208, 195], [137, 128, 128]]])
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    lab = images.setup_color_correction(Image.fromarray(rgb))
    assert lab.shape == (48, 80, 3)
    np.testing.assert_array_equal(lab, cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB))  # 0 levels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_color_correction_lab_round_trip_is_opencv_exactly(seed):
    # An image corrected against itself: match_histograms is then the identity, so the corrected layer is the plain
    # 8-bit LAB round trip, which must be OpenCV's (RGB2LAB then LAB2RGB) to the level.
    rgb = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    np.testing.assert_array_equal(exposure.match_histograms(lab, lab, channel_axis=2), lab)
    round_trip = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    assert np.abs(round_trip.astype(int) - rgb).max() > 0  # the round trip is lossy, so this test can tell
    pil = Image.fromarray(rgb)
    out = np.asarray(images.apply_color_correction(images.setup_color_correction(pil), pil))
    np.testing.assert_array_equal(out, _blendmodes_2022_luminosity(round_trip, rgb))  # 0 levels


def test_color_correction_lab_to_rgb_of_uniform_lab_vectors_is_opencv():
    # A uniform generated image matched to a uniform correction takes the correction's LAB value, so the corrected
    # layer is LAB2RGB of that vector: white, black, sRGB red, and LAB triples far outside the sRGB gamut.
    vectors = [(255, 128, 128), (0, 128, 128), (136, 208, 195), (128, 0, 255), (255, 255, 0), (0, 255, 255)]
    generated = np.full((4, 6, 3), (90, 140, 200), np.uint8)
    for v in vectors:
        correction = np.full((3, 5, 3), v, np.uint8)
        out = np.asarray(images.apply_color_correction(correction, Image.fromarray(generated)))
        corrected = np.broadcast_to(cv2.cvtColor(np.array([[v]], np.uint8), cv2.COLOR_LAB2RGB), generated.shape)
        np.testing.assert_array_equal(out, _blendmodes_2022_luminosity(corrected, generated), err_msg=str(v))


def test_apply_color_correction_equals_a1111_chain():
    # Different sizes for init and generated images; a photo and a noisy colour cast.
    init = np.asarray(Image.fromarray(skdata.coffee()).resize((72, 48), Image.Resampling.BICUBIC))
    rng = np.random.default_rng(11)
    generated = np.clip(rng.normal((100, 110, 160), 40, (40, 64, 3)), 0, 255).astype(np.uint8)
    out = images.apply_color_correction(images.setup_color_correction(Image.fromarray(init)),
                                        Image.fromarray(generated))
    assert out.mode == "RGB" and out.size == (64, 40)
    np.testing.assert_array_equal(np.asarray(out), _a1111_color_correction(init, generated))
    astronaut = np.asarray(Image.fromarray(skdata.astronaut()).resize((64, 64), Image.Resampling.BICUBIC))
    out = images.apply_color_correction(images.setup_color_correction(Image.fromarray(astronaut)),
                                        Image.fromarray(init))
    np.testing.assert_array_equal(np.asarray(out), _a1111_color_correction(astronaut, init))


def test_color_correction_moves_hue_towards_init_and_keeps_luminosity():
    rng = np.random.default_rng(5)
    init = np.clip(rng.normal((170, 90, 70), 25, (48, 48, 3)), 0, 255).astype(np.uint8)  # warm, reddish
    generated = np.clip(rng.normal((100, 110, 160), 25, (48, 48, 3)), 0, 255).astype(np.uint8)  # cool, bluish
    out = np.asarray(images.apply_color_correction(images.setup_color_correction(Image.fromarray(init)),
                                                   Image.fromarray(generated))).astype(float)
    assert out[..., 0].mean() > out[..., 2].mean() + 30  # now red > blue like the init image
    lum_out = images.luminosity(out / 255)
    lum_gen = images.luminosity(generated / 255)
    assert np.abs(lum_out - lum_gen).mean() < 0.01  # luminosity of the generated image kept (blend LUMINOSITY)


def test_color_correction_against_itself_is_near_identity():
    # Matching a histogram to itself is the identity; what is left is the 8-bit LAB round trip and the final
    # truncation of the blend (blendmodes 2022 truncates), a few levels on a photo.
    pil = Image.fromarray(skdata.astronaut()).resize((96, 96), Image.Resampling.BICUBIC)
    image = np.asarray(pil).astype(int)
    out = np.asarray(images.apply_color_correction(images.setup_color_correction(pil), pil)).astype(int)
    assert np.abs(out - image).max() <= 6 and np.abs(out - image).mean() < 1


def test_color_correction_errors():
    with pytest.raises(ValueError, match="correction"):
        images.apply_color_correction(np.zeros((4, 4, 3), np.float32), Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="mode"):
        images.setup_color_correction(Image.new("L", (4, 4)))


# ---------------------------------------------------------------------------------------------------------------
# Saving (a1111-semantics §9.4)
# ---------------------------------------------------------------------------------------------------------------

def test_save_image_names_numbers_and_infotext_spec94(tmp_path):
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    day = datetime.date(2024, 7, 27)
    first = images.save_image(image, tmp_path, 1234, "a cat\nSteps: 20", date=day)
    assert first == tmp_path / "2024-07-27" / "00000-1234.png"  # a1111-semantics §13: <YYYY-MM-DD>/00000-1234.png
    second = images.save_image(image, tmp_path, 1234, None, date=day)
    assert second.name == "00001-1234.png"
    with Image.open(first) as saved:
        assert saved.text["parameters"] == "a cat\nSteps: 20"
        assert saved.tobytes() == image.tobytes()


def test_save_image_numbering_uses_max_leading_integer(tmp_path):
    for name in ("00007-99.png", "00002-5.png", "notes.txt", "x-12.png", "00003"):
        (tmp_path / name).write_bytes(b"")
    path = images.save_image(Image.new("RGB", (4, 4)), tmp_path, 42, date_subfolder=False)
    assert path == tmp_path / "00008-42.png"
    assert images.next_sequence_number(tmp_path / "missing") == 0


def test_save_image_never_overwrites(tmp_path, monkeypatch):
    existing = tmp_path / "00000-1.png"
    existing.write_bytes(b"keep me")
    monkeypatch.setattr(images, "next_sequence_number", lambda directory: 0)  # as if another process raced us
    path = images.save_image(Image.new("RGB", (4, 4)), tmp_path, 1, date_subfolder=False)
    assert path.name == "00001-1.png"
    assert existing.read_bytes() == b"keep me"


def test_save_image_prompt_and_suffix_are_sanitised(tmp_path):
    path = images.save_image(Image.new("RGB", (4, 4)), tmp_path, 7, prompt='a "cat": 1/2?', date_subfolder=False,
                             suffix="-mask")
    assert path.name == "00000-7-a _cat__ 1_2_-mask.png"
    assert images.sanitize_filename_part("  a b. ") == "__a_b._"  # spaces become "_" before the strip
    assert images.sanitize_filename_part("  a b. ", replace_spaces=False) == "a b"
    assert images.sanitize_filename_part("x" * 200) == "x" * 128
    with pytest.raises(TypeError, match="seed"):
        images.save_image(Image.new("RGB", (4, 4)), tmp_path, "7")
