"""Image and mask helpers for img2img and inpainting, with A1111 v1.10.1 semantics.

Every function is a pure function of its arguments (it never changes an input image) and names the section of
`docs/a1111-semantics.md` (cited "a1111-semantics §N") and the reference function it follows.

Glossary
- Images are PIL images, sizes are `(W, H)` in pixels. A mask is a PIL image, usually mode "L":
  255 = regenerate this pixel, 0 = keep it (a1111-semantics §0).
- A crop region is `(x1, y1, x2, y2)` in pixels, right/bottom exclusive (PIL box); `paste_to` is `(x, y, w, h)`.
- Latent cells: the latent grid is `W/8 x H/8`; `latent_mask` returns one weight per cell.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import itertools
import os
import re
import secrets
from collections.abc import Callable, Iterable
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

RESIZE_MODES = {
    0: "Just resize",
    1: "Crop and resize",
    2: "Resize and fill",
    3: "Just resize (latent upscale)",
}

# masking.fill: (Gaussian radius in pixels, times the blurred layer is composited), widest first (a1111-semantics §4).
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))

# Characters A1111 replaces by "_" in file name parts (modules/images.py `invalid_filename_chars`, a1111-semantics §9.4).
INVALID_FILENAME_CHARS = '#<>:"/\\|?*\n\r\t'
MAX_FILENAME_PART_LENGTH = 128


def _check_image(name: str, im) -> None:
    if not isinstance(im, Image.Image):
        raise TypeError(f"{name} must be a PIL.Image.Image, got {type(im).__name__}")


def _check_mode(name: str, im, modes: tuple[str, ...]) -> None:
    _check_image(name, im)
    if im.mode not in modes:
        raise ValueError(f"{name} must have mode {' or '.join(modes)}, got mode {im.mode!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_same_size(name_a: str, a: Image.Image, name_b: str, b: Image.Image) -> None:
    if a.size != b.size:
        raise ValueError(f"{name_a} size {a.size} differs from {name_b} size {b.size}; they must be equal (W, H)")


# ---------------------------------------------------------------------------------------------------------------
# Geometry (a1111-semantics §3)
# ---------------------------------------------------------------------------------------------------------------

def resize_geometry(mode: int, im_w: int, im_h: int, width: int, height: int
                    ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Size `(src_w, src_h)` of the scaled image and its paste offset `(x, y)` for resize modes 1-3 (a1111-semantics §3.1).

    Reference: `modules/images.py` `resize_image`. With `ratio = width/height`, `src_ratio = im_w/im_h`:
    - mode 1 (cover): `src_w = width if ratio > src_ratio else im_w*height//im_h`,
      `src_h = height if ratio <= src_ratio else im_h*width//im_w`;
    - modes 2, 3 (fit): `src_w = width if ratio < src_ratio else im_w*height//im_h`,
      `src_h = height if ratio >= src_ratio else im_h*width//im_w`;
    offset `(width//2 - src_w//2, height//2 - src_h//2)` (negative = cropped). In mode 2 the offset along the short
    side is also the width of each fill band. Example: 640x480 -> 512x512: mode 1 ((682, 512), (-85, 0)),
    mode 2 ((512, 384), (0, 64)).

    Raises ValueError for a mode other than 1, 2, 3 or non-positive sizes.
    """
    if mode not in (1, 2, 3):
        raise ValueError(f"resize_geometry mode must be 1, 2 or 3 (mode 0 has no geometry), got {mode!r}")
    for name, value in (("im_w", im_w), ("im_h", im_h), ("width", width), ("height", height)):
        _check_positive_int(name, value)
    ratio = width / height
    src_ratio = im_w / im_h
    if mode == 1:
        scaled_to_width = ratio > src_ratio
    else:
        scaled_to_width = ratio < src_ratio
    src_w = width if scaled_to_width else im_w * height // im_h
    src_h = height if not scaled_to_width else im_h * width // im_w
    return (src_w, src_h), (width // 2 - src_w // 2, height // 2 - src_h // 2)


def resize_image(mode: int, im: Image.Image, width: int, height: int) -> Image.Image:
    """Resize `im` to `width x height` pixels with one of A1111's four resize modes (a1111-semantics §3.1).

    Reference: `modules/images.py` `resize_image` with no upscaler (`opts.upscaler_for_img2img` None), so every inner
    resize is a plain Lanczos resize.
    - 0 "Just resize": Lanczos to `(width, height)`, aspect ratio not kept; keeps the input mode (L stays L).
    - 1 "Crop and resize": scale to cover the target (`src_w, src_h` from integer `//` arithmetic), paste centred on
      a black RGB canvas; negative offsets crop symmetrically.
    - 2 "Resize and fill" and 3 "Just resize (latent upscale)": scale to fit inside, paste centred on a black RGB
      canvas, then fill the empty bands by stretching the edge row (top/bottom bands) or edge column (left/right
      bands) with a bicubic resize of a zero-height/zero-width box. Mode 3 is not special here (a1111-semantics §3.1); its
      latent upscale happens in processing.
    Modes 1-3 always return mode "RGB", even for an "L" mask.

    Raises ValueError for an unknown mode or a non-positive size, TypeError if `im` is not a PIL image.
    """
    _check_image("im", im)
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {sorted(RESIZE_MODES)} ({RESIZE_MODES}), got {mode!r}")
    _check_positive_int("width", width)
    _check_positive_int("height", height)

    lanczos = Image.Resampling.LANCZOS
    if mode == 0:
        return im.resize((width, height), resample=lanczos)

    (src_w, src_h), offset = resize_geometry(mode, im.width, im.height, width, height)
    resized = im.resize((src_w, src_h), resample=lanczos)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=offset)
    if mode == 1:
        return res

    # Band widths are the paste offsets. A box of zero height (width) makes PIL's bicubic resize stretch the edge
    # row (column) over the band.
    x, y = offset
    ratio, src_ratio = width / height, im.width / im.height
    if ratio < src_ratio and y > 0:
        res.paste(resized.resize((width, y), box=(0, 0, width, 0)), box=(0, 0))
        res.paste(resized.resize((width, y), box=(0, src_h, width, src_h)), box=(0, y + src_h))
    elif ratio > src_ratio and x > 0:
        res.paste(resized.resize((x, height), box=(0, 0, 0, height)), box=(0, 0))
        res.paste(resized.resize((x, height), box=(src_w, 0, src_w, height)), box=(x + src_w, 0))
    return res


def get_crop_region_v2(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """Bounding box of the non-zero pixels of an "L" mask, grown by `pad` pixels and clamped to the image (a1111-semantics §2.2.4).

    Reference: `modules/masking.py` `get_crop_region_v2`. Returns `(x1, y1, x2, y2)` (right/bottom exclusive), the bare
    bbox when `pad == 0`, or None for an all-zero mask. A blurred mask's bbox includes the blur halo.

    Raises ValueError for a mask not in mode "L" or a negative pad.
    """
    _check_mode("mask", mask, ("L",))
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0:
        raise ValueError(f"pad must be an int >= 0 (pixels), got {pad!r}")
    box = mask.getbbox()
    if box is None:
        return None
    if pad == 0:
        return box
    x1, y1, x2, y2 = box
    w, h = mask.size
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)


def _expand_axis(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """Grow `[lo, hi)` by `diff` (half each side, the odd pixel after), shift back inside `[0, limit)`, a1111-semantics §3.2."""
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    if hi >= limit:
        hi = limit
    return lo, hi


def expand_crop_region(crop_region: tuple[int, int, int, int], processing_width: int, processing_height: int,
                       image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """Grow a crop region to the processing aspect ratio, then shift it back inside the image (a1111-semantics §3.2).

    Reference: `modules/masking.py` `expand_crop_region`. With `r_crop = (x2-x1)/(y2-y1)` and
    `r_proc = processing_width/processing_height`: if `r_crop > r_proc` the height grows by
    `diff = int((x2-x1)/r_proc - (y2-y1))` (half above, `diff - diff//2` below), else the width grows by
    `diff = int((y2-y1)*r_proc - (x2-x1))`. The region may still exceed the image when it is larger than the image in
    the grown direction (then it is cut at the far edge). Example: `(100,200,228,232)`, 512x512 -> `(100,152,228,280)`.

    Raises ValueError for an empty region or non-positive sizes.
    """
    x1, y1, x2, y2 = (int(v) for v in crop_region)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"crop_region must have x2 > x1 and y2 > y1, got {crop_region!r}")
    for name, value in (("processing_width", processing_width), ("processing_height", processing_height),
                        ("image_width", image_width), ("image_height", image_height)):
        _check_positive_int(name, value)

    ratio_crop = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop > ratio_processing:
        diff = int((x2 - x1) / ratio_processing - (y2 - y1))
        y1, y2 = _expand_axis(y1, y2, diff, image_height)
    else:
        diff = int((y2 - y1) * ratio_processing - (x2 - x1))
        x1, x2 = _expand_axis(x1, x2, diff, image_width)
    return x1, y1, x2, y2


# ---------------------------------------------------------------------------------------------------------------
# Flatten and masks (a1111-semantics §2.2, 2.5.2, 2.9)
# ---------------------------------------------------------------------------------------------------------------

# EXIF tag 0x0112 "Orientation" values 2..8 and the PIL transposition that shows the picture as a viewer does
# (EXIF 2.32 / TIFF 6.0; the same table as `PIL.ImageOps.exif_transpose`). 1 or absent = already upright.
EXIF_ORIENTATION = 0x0112
_SWAPS_WIDTH_AND_HEIGHT = (5, 6, 7, 8)


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF Orientation of `im` (1..8), 1 when absent, out of range or when the EXIF block cannot be parsed.

    Loads the pixels first, as `ImageOps.exif_transpose` does: Pillow's TIFF reader turns the picture itself on load
    (and drops the tag), and already reports the turned size before it.
    """
    im.load()
    try:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    # Pillow's EXIF parser raises SyntaxError, ValueError, struct.error, ... on a malformed block. A viewer then shows
    # the picture as stored, and so does A1111 (`images.fix_image` ignores any exception of `exif_transpose`).
    except Exception:  # noqa: BLE001
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def upright(im: Image.Image) -> Image.Image:
    """`im` turned the way a photo viewer shows it: its EXIF Orientation (tag 0x0112) applied, the tag removed.

    Reference: A1111 `modules/images.py` `fix_image` (called by `modules/img2img.py` on the init image and the mask,
    and by `images.read` in batch mode) applies `PIL.ImageOps.exif_transpose`: 2 mirror left-right, 3 rotate 180,
    4 mirror top-bottom, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise; 5-8 swap
    width and height. E.g. a phone photo stored 640x480 with Orientation 6 comes back 480x640, the stored top row
    as the right column. Any mode. Orientation 1, absent, out of range or an unparsable EXIF block: `im` itself is
    returned (not a copy). Otherwise a new image whose EXIF no longer carries the tag, so applying `upright` twice
    turns the picture once. `im` is never changed.
    """
    _check_image("im", im)
    if _exif_orientation(im) == 1:
        return im
    return ImageOps.exif_transpose(im)


def viewed_size(im: Image.Image) -> tuple[int, int]:
    """`(W, H)` of `upright(im)` without transposing any pixels: width and height swapped for Orientation 5-8."""
    _check_image("im", im)
    w, h = im.size
    return (h, w) if _exif_orientation(im) in _SWAPS_WIDTH_AND_HEIGHT else (w, h)


def to_8bit(im: Image.Image) -> Image.Image:
    """`im` as 8 bits per channel in mode "L", "RGB" or "RGBA", scaled (never clipped) from deeper modes.

    Modes, value ranges and the rules (the value range of the *format*, never of the picture, so a dark 16-bit photo
    stays dark):
    - "L", "RGB", "RGBA": returned as they are (`im` itself).
    - "I;16", "I;16L", "I;16B", "I;16N" (16-bit grey, e.g. 16-bit PNG/TIFF) and "I" (32-bit int; Pillow's mode for
      16-bit grey from some formats): 0..65535 -> "L" 0..255 as `round(v / 257)` (`(v + 128) // 257`); "I" values
      outside 0..65535 are clipped first. This is the exact inverse of the usual 8 -> 16 bit expansion `v * 257`
      (0x8080 -> 128, 0xFFFF -> 255, 983 = 1.5 % -> 4) and what ImageMagick (`ScaleShortToChar`) and libpng
      (`png_set_scale_16`, `(v * 255 + 32895) >> 16`, equal for every v) do; scikit-image's `img_as_ubyte`
      truncates (`v >> 8`) instead, at most 1 lower.
      Pillow's own `convert("L")` clips at 255 (any value >= 255 becomes white): the bug this replaces.
    - "F" (32-bit float): 0.0..1.0 -> "L" `rint(x * 255)` (ties to even: 0.5 -> 127.5 -> 128), clipped to 0..1
      first, NaN -> 0; scikit-image's float convention and rounding (`img_as_ubyte`: `rint(x * 255)`), and
      torchvision's (`to_pil_image` reads floats as 0..1). Note Pillow's `convert("F")` of an 8-bit image gives
      0..255 floats, which this reads as white.
    - "1": "L" 0/255. "P": "RGBA" when it has transparency (`info["transparency"]`, bytes or one index, or an RGBA
      palette), else "RGB". "LA" (grey replicated), "PA": "RGBA". "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa":
      Pillow's own conversion to "RGB" (or "RGBA" when the mode has alpha); CMYK without colour management
      ((0,0,0,0) -> white, (0,0,0,255) -> black, (255,0,0,0) -> cyan).
    A colour-key transparency of an "L" or "RGB" PNG (`info["transparency"]`) is ignored, as A1111 ignores it.
    Raises ValueError naming the mode for a mode Pillow cannot convert. `im` is never changed.
    """
    _check_image("im", im)
    mode = im.mode
    if mode in ("L", "RGB", "RGBA"):
        return im
    if mode == "I" or mode.startswith("I;16"):
        values = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8))
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return Image.fromarray(np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8))
    if mode == "1":
        return im.convert("L")
    if mode == "P":
        palette_alpha = im.palette is not None and im.palette.mode == "RGBA"
        return im.convert("RGBA" if "transparency" in im.info or palette_alpha else "RGB")
    target = "RGBA" if ("A" in im.getbands() or "a" in im.getbands()) else "RGB"
    try:
        return im.convert(target)
    except ValueError as e:
        raise ValueError(f"image mode {mode!r} cannot be converted to {target} ({e})") from None


def as_viewed(im: Image.Image) -> Image.Image:
    """What a photo viewer shows of a user image: `to_8bit(upright(im))`, mode "L", "RGB" or "RGBA".

    The single normalisation of user images: `flatten` runs it on every init image and `create_binary_mask` on every
    mask, the first thing `prepare_inputs` does with each, so sizes, crops and overlays are all measured on the
    upright 8-bit picture; the CLI's `open_image` already applies `upright` (its size checks need viewer sizes),
    and `upright` is idempotent. `im` is never changed; `im` itself is returned when it is already upright 8-bit.
    """
    return to_8bit(upright(im))


def flatten(img: Image.Image, bgcolor: str | tuple[int, ...] = "#ffffff") -> Image.Image:
    """Composite an image over `bgcolor` through its alpha and return RGB, as a viewer shows it (a1111-semantics §2.5.2).

    Reference: `modules/images.py` `flatten` (PIL paste of the RGBA image through its own alpha onto an opaque canvas;
    default colour = `opts.img2img_background_color` "#ffffff"), after `modules/img2img.py`'s `images.fix_image`
    (EXIF orientation; a "P" image with a transparency table becomes RGBA). `bgcolor` is any PIL colour spec.
    Any mode: first `as_viewed` (EXIF orientation, 16-bit and float scaled to 8 bits, see `to_8bit`); every mode
    with alpha ("RGBA", "LA", "PA", "P" with transparency) is then composited. sdcore deviates: A1111 composites
    only RGBA and a "P" with a transparency *table*; it drops the alpha of "LA" and of a "P" with one transparent
    index, showing the colours hidden under the transparent pixels. Returns a new image; `img` is never changed.
    """
    _check_image("img", img)
    img = as_viewed(img)
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, bgcolor)
        background.paste(img, mask=img)
        img = background
    return img.convert("RGB")


def create_binary_mask(mask: Image.Image, round: bool = True) -> Image.Image:
    """Turn a user mask into an "L" mask, 255 = regenerate (a1111-semantics §2.2.1).

    Reference: `modules/processing.py` `create_binary_mask`. An RGBA mask whose alpha is not all 255 is read from its
    alpha channel; with `round` it is binarised `255 if a > 128 else 0` (128 -> 0, 129 -> 255), without it the alpha is
    kept as is. Any other mask is converted to "L" (ITU-R 601 luma: (255,0,0) -> 76, (0,255,0) -> 150,
    (0,0,255) -> 29, grey g -> g), never binarised.

    Any mode: the mask is first read as a viewer shows it (`as_viewed`: EXIF orientation as A1111's
    `images.fix_image`, then `to_8bit`), so a 16-bit grey mask is scaled, not clipped (a 1.5 % grey 983 -> 4, which
    the latent mask rounds to "keep"; A1111's `convert('L')` would clip it to 255, "regenerate"), a float "F" mask
    0..1 -> 0..255, and "LA", "PA" and "P" masks with transparency are read from their alpha like RGBA. Returns a new
    image; `mask` is never changed.
    """
    _check_image("mask", mask)
    mask = as_viewed(mask)
    if mask.mode == "RGBA" and mask.getextrema()[3] != (255, 255):
        alpha = mask.getchannel("A")
        if not round:
            return alpha
        return Image.fromarray(np.where(np.asarray(alpha) > 128, 255, 0).astype(np.uint8), mode="L")
    return mask.convert("L")


def mask_blur_kernel_size(blur: float) -> int:
    """Gaussian kernel length A1111 uses for a mask blur of sigma `blur` pixels: `2*int(2.5*blur + 0.5) + 1`.

    a1111-semantics §2.2.3 / 13: blur 1 -> 7, 2 -> 11, 4 -> 21, 8 -> 41, 16 -> 81, 64 -> 321. Raises ValueError for a negative
    or non-real blur.
    """
    if isinstance(blur, bool) or not isinstance(blur, Real) or not blur >= 0:
        raise ValueError(f"blur must be a real number >= 0 (sigma in pixels), got {blur!r}")
    return 2 * int(2.5 * blur + 0.5) + 1


def gaussian_kernel_u8(ksize: int, sigma: float) -> np.ndarray:
    """OpenCV's fixed-point Gaussian kernel for uint8 images: int64 weights in units of 1/256 that sum to 256.

    Reference: OpenCV `imgproc/src/smooth.dispatch.cpp` (`getGaussianKernelBitExact`,
    `getGaussianKernelFixedPoint_ED`), the bit-exact path `cv2.GaussianBlur` takes for CV_8U. The float kernel is
    `w_i = exp(-d_i^2 / (2 sigma^2))`, `d_i = i - (ksize-1)/2`, normalised to sum 1. The outer half is quantised to
    multiples of 1/256 from the outside in, carrying each rounding error (round half to even) into the next weight
    ("error diffusion"); the centre weight takes whatever makes the sum exactly 256.
    """
    if isinstance(ksize, bool) or not isinstance(ksize, (int, np.integer)) or ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"ksize must be a positive odd int, got {ksize!r}")
    if not isinstance(sigma, Real) or not sigma > 0:
        raise ValueError(f"sigma must be a real number > 0 (pixels), got {sigma!r}")
    d = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    w = np.exp(-d * d / (2.0 * float(sigma) ** 2))
    w /= w.sum()
    half = ksize // 2
    q = np.zeros(ksize, dtype=np.int64)
    carry = 0.0
    for i in range(half):
        wanted = w[i] * 256.0 + carry
        q[i] = q[ksize - 1 - i] = round(wanted)
        carry = wanted - q[i]
    q[half] = 256 - 2 * int(q[:half].sum())
    return q


def _gaussian_blur_u8_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """One `cv2.GaussianBlur` pass on a uint8 array along `axis` (kernel `(k,1)` for x, `(1,k)` for y).

    OpenCV's 8-bit path sums `k_i * x_i` exactly in fixed point and rounds half up on the division by 256; the border
    is BORDER_REFLECT_101 (`dcb|abcd|cba`), which is scipy.ndimage's "mirror" mode (also for kernels longer than the
    image). Float64 holds the integer sums (< 2^17) exactly.
    """
    k = gaussian_kernel_u8(mask_blur_kernel_size(sigma), sigma)
    import scipy.ndimage  # lazy, as cv2 and skimage below: a cold CLI run imports only what it uses

    sums = scipy.ndimage.correlate1d(a.astype(np.float64), k.astype(np.float64), axis=axis, mode="mirror")
    return ((sums.astype(np.int64) + 128) >> 8).astype(np.uint8)


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """Gaussian-blur an "L" mask exactly as A1111's `cv2.GaussianBlur` calls do, x first, then y (a1111-semantics §2.2.3).

    Reference: `modules/processing.py` `StableDiffusionProcessingImg2Img.init` (mask blur). For each axis with a blur
    `b > 0` (sigma in pixels), one pass with kernel length `mask_blur_kernel_size(b)` and OpenCV's uint8 fixed-point
    arithmetic (see `gaussian_kernel_u8`); an axis with `b == 0` is skipped. Matches OpenCV 5.0 bit for bit on the
    cases in tests/test_images.py.

    Raises ValueError for a negative or non-real blur or a mask not in mode "L".
    """
    _check_mode("mask", mask, ("L",))
    for name, value in (("blur_x", blur_x), ("blur_y", blur_y)):
        if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
            raise ValueError(f"{name} must be a real number >= 0 (sigma in pixels), got {value!r}")
    a = np.asarray(mask)
    if blur_x > 0:
        a = _gaussian_blur_u8_axis(a, blur_x, axis=1)
    if blur_y > 0:
        a = _gaussian_blur_u8_axis(a, blur_y, axis=0)
    return Image.fromarray(a, mode="L")


def double_mask_for_overlay(mask: Image.Image) -> Image.Image:
    """`mask_for_overlay` for "Whole picture" inpainting: `min(2*v, 255)` of the (blurred, resized) mask (a1111-semantics §2.2.5).

    Reference: `modules/processing.py` `StableDiffusionProcessingImg2Img.init`. Values >= 128 become 255, so the
    original only shows through the outer half of the blur ramp: 100 -> 200, 127 -> 254, 128 -> 255 (a1111-semantics §13). The
    mask is read as "L" (modes 1/2 of `resize_image` return grey RGB, whose L is the same value). Returns mode "L".
    """
    _check_image("mask", mask)
    doubled = np.clip(np.asarray(mask.convert("L"), dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(doubled, mode="L")


def latent_mask(mask: Image.Image, latent_w: int, latent_h: int, round: bool = True, *,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Regenerate weight per latent cell, `nmask`, shape `[1, 1, latent_h, latent_w]`, values in [0, 1] (a1111-semantics §2.9).

    Reference: `modules/processing.py` `StableDiffusionProcessingImg2Img.init` (latmask). The processing-size mask is
    converted to RGB and resized with PIL's default filter (bicubic, area-aware when shrinking), channel 0 is divided by
    255 and, with `round`, rounded with `np.around` (>= 0.5 -> 1, ties to even). 1 = regenerate, 0 = keep; the keep
    mask is `1 - nmask`. Processing repeats the channel to the latent's channel count. Example (a1111-semantics §13): a 16x16 white
    square at (24..39) of a 64x64 mask -> 8x8, centre 2x2 cells 0.871 before rounding, exactly those 4 cells after.
    `device` None = torch's default device.
    """
    _check_image("mask", mask)
    _check_positive_int("latent_w", latent_w)
    _check_positive_int("latent_h", latent_h)
    small = mask.convert("RGB").resize((latent_w, latent_h), resample=Image.Resampling.BICUBIC)
    weights = np.asarray(small, dtype=np.float32)[:, :, 0] / 255
    if round:
        weights = np.around(weights)
    return torch.as_tensor(weights, dtype=dtype, device=device)[None, None]


# ---------------------------------------------------------------------------------------------------------------
# Fill, overlay (a1111-semantics §4, 2.5.4, 9.1)
# ---------------------------------------------------------------------------------------------------------------

def _premultiplied_through_inverted_mask(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Premultiplied 'RGBa' copy of `image` whose alpha is `255 - mask` (PIL paste into an empty 'RGBa' canvas)."""
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return masked


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Inpainting fill 0 "fill": replace the masked area by blurred surroundings (a1111-semantics §4).

    Reference: `modules/masking.py` `fill`. The image gets alpha `255 - mask` (premultiplied); for each
    `(radius, repeats)` of `FILL_LAYERS` it is blurred with PIL `GaussianBlur(radius)`, un-premultiplied and
    alpha-composited `repeats` times onto a transparent canvas, widest blur first. The last layer (radius 0) restores
    kept pixels exactly; masked pixels get progressively sharper blurs of what surrounds them. Returns RGB. `mask` is
    the processing-size latent mask (any mode; read as "L"), same size as `image`.
    """
    _check_image("image", image)
    _check_image("mask", mask)
    _check_same_size("image", image, "mask", mask)
    source = _premultiplied_through_inverted_mask(image, mask)
    canvas = Image.new("RGBA", image.size)
    for radius, repeats in FILL_LAYERS:
        layer = source.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            canvas.alpha_composite(layer)
    return canvas.convert("RGB")


def make_overlay(image: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """The original image as RGBA with alpha `255 - mask_for_overlay`, pasted back after generation (a1111-semantics §2.5.4).

    Reference: `modules/processing.py` `StableDiffusionProcessingImg2Img.init` (overlay_images): a paste into an empty
    premultiplied 'RGBa' canvas through the inverted mask, converted to RGBA, so colours where alpha is small carry
    the premultiplication's rounding. `mask_for_overlay` (any mode, read as "L") must already have the image's size;
    A1111 first resizes it with the job's resize mode when it does not.
    """
    _check_image("image", image)
    _check_image("mask_for_overlay", mask_for_overlay)
    _check_same_size("image", image, "mask_for_overlay", mask_for_overlay)
    return _premultiplied_through_inverted_mask(image, mask_for_overlay).convert("RGBA")


def uncrop(image: Image.Image, dest_size: tuple[int, int], paste_to: tuple[int, int, int, int]) -> Image.Image:
    """Put a processed crop back at its place on a transparent RGBA canvas of `dest_size` (a1111-semantics §9.1).

    Reference: `modules/processing.py` `uncrop`: the crop is resized to `(w, h)` with `resize_image(1, ...)` (crop and
    resize) and pasted at `(x, y)`, `paste_to = (x, y, w, h)`.
    """
    _check_image("image", image)
    x, y, w, h = (int(v) for v in paste_to)
    canvas = Image.new("RGBA", tuple(dest_size))
    canvas.paste(resize_image(1, image, w, h), (x, y))
    return canvas


def apply_overlay(image: Image.Image, paste_to: tuple[int, int, int, int] | None,
                  overlay: Image.Image | None) -> Image.Image:
    """Composite the kept original pixels back over a generated image (a1111-semantics §9.1).

    Reference: `modules/processing.py` `apply_overlay`. With no overlay (no mask, or `overlay_inpaint` off) the image is
    returned unchanged, also without uncropping. With `paste_to` ("Only masked") the generated crop is first put back
    with `uncrop` onto a canvas of the overlay's size. Then the overlay (alpha `255 - mask_for_overlay`) is
    alpha-composited on top and the result converted to RGB; its size is the overlay's size.

    Raises ValueError when, without `paste_to`, the image and overlay sizes differ (A1111 would composite the overlay
    unscaled at (0, 0), a misalignment noted in a1111-semantics §3.1 for resize mode 3).
    """
    _check_image("image", image)
    if overlay is None:
        return image
    _check_mode("overlay", overlay, ("RGBA",))
    if paste_to is not None:
        image = uncrop(image, overlay.size, paste_to)
    else:
        _check_same_size("image", image, "overlay", overlay)
    composed = image.convert("RGBA")
    composed.alpha_composite(overlay)
    return composed.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Colour correction (a1111-semantics §9.2)
# ---------------------------------------------------------------------------------------------------------------

def luminosity(rgb: np.ndarray) -> np.ndarray:
    """`Lum(C) = 0.299 R + 0.587 G + 0.114 B` of float RGB in [0, 1], shape [..., 3] -> [...].

    The coefficients of blendmodes 2022 (`blend._lum`), which A1111 v1.10.1 pins; W3C "Compositing and Blending"
    uses 0.3/0.59/0.11 in the same formula.
    """
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def set_luminosity(rgb: np.ndarray, lum: np.ndarray) -> np.ndarray:
    """W3C `SetLum(C, l)`: shift C by `d = l - Lum(C)`, then `ClipColor` back into [0, 1], float [..., 3].

    ClipColor, with `L = Lum(C)`, `n = min(C)`, `x = max(C)` taken before either step:
    `if n < 0: C = L + (C - L) * L / (L - n)`; then `if x > 1: C = L + (C - L) * (1 - L) / (x - L)`.
    (W3C Compositing and Blending Level 1, section 10.2 "non-separable blend modes"; blendmodes 2022 `_setLum`.)
    """
    shifted = rgb + (lum - luminosity(rgb))[..., None]
    lum_now = luminosity(shifted)[..., None]
    lowest = shifted.min(axis=-1, keepdims=True)
    highest = shifted.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lifted = lum_now + (shifted - lum_now) * lum_now / (lum_now - lowest)
        shifted = np.where(lowest < 0, lifted, shifted)
        lowered = lum_now + (shifted - lum_now) * (1 - lum_now) / (highest - lum_now)
        shifted = np.where(highest > 1, lowered, shifted)
    return shifted


def setup_color_correction(image: Image.Image) -> np.ndarray:
    """Colour-correction target: the final init image (after crop, resize and fill) as 8-bit LAB (a1111-semantics §9.2).

    `image`: PIL "RGB", size (W, H). Returns uint8 [H, W, 3], OpenCV's 8-bit LAB encoding (`L*255/100`, `a + 128`,
    `b + 128`; sRGB, D65), computed by OpenCV itself: `cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2LAB)`.
    Reference: `modules/processing.py` `setup_color_correction`. Raises ValueError for an image not in mode "RGB".
    """
    _check_mode("image", image, ("RGB",))
    import cv2

    return cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2LAB)


def apply_color_correction(correction: np.ndarray, image: Image.Image) -> Image.Image:
    """Match a generated RGB image's colours to the init image's, keeping its own luminosity (a1111-semantics §9.2).

    `correction`: uint8 [H', W', 3] LAB from `setup_color_correction` (its size need not equal the image's);
    `image`: the generated PIL "RGB" image, size (W, H). Returns a new PIL "RGB" image of size (W, H).
    Reference: `modules/processing.py` `apply_color_correction`, with OpenCV and scikit-image as A1111 calls them:
    1. `corrected = cv2.cvtColor(match_histograms(cv2.cvtColor(image, COLOR_RGB2LAB), correction, channel_axis=2),
       COLOR_LAB2RGB)`: per-channel histogram matching in 8-bit LAB (`skimage.exposure.match_histograms` stores the
       matched float channels back into the input's uint8, truncating), then OpenCV's 8-bit LAB -> RGB, uint8.
    2. Luminosity blend (blendmodes 2022 `blendLayers(corrected, image, LUMINOSITY)`, both opaque), in floats `/255`:
       `out = SetLum(corrected, Lum(image))` (see `set_luminosity`): hue and saturation of the corrected image,
       luminosity of the generated one; `out` clipped to [0, 1], times 255, truncated to uint8 (as blendmodes 2022).
    Applied before the overlay.

    Raises ValueError for an image not in mode "RGB" or a correction that is not a uint8 [H, W, 3] array.
    """
    _check_mode("image", image, ("RGB",))
    correction = np.asarray(correction)
    if correction.ndim != 3 or correction.shape[2] != 3 or correction.dtype != np.uint8:
        raise ValueError(f"correction must be a uint8 LAB array [H, W, 3] from setup_color_correction, got "
                         f"{correction.dtype} {correction.shape}")
    generated = np.asarray(image)
    # match_histograms writes the matched float channels into an array of the input's dtype: uint8, truncated.
    import cv2
    from skimage import exposure

    matched = exposure.match_histograms(cv2.cvtColor(generated, cv2.COLOR_RGB2LAB), correction, channel_axis=2)
    corrected = cv2.cvtColor(matched, cv2.COLOR_LAB2RGB)
    blended = set_luminosity(corrected / 255.0, luminosity(generated / 255.0))
    out = (np.clip(blended, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(out, mode="RGB")


# ---------------------------------------------------------------------------------------------------------------
# Saving (a1111-semantics §9.4)
# ---------------------------------------------------------------------------------------------------------------

def sanitize_filename_part(text: str, replace_spaces: bool = True) -> str:
    """A1111's file-name sanitiser (a1111-semantics §9.4; `modules/images.py` `sanitize_filename_part`).

    Spaces -> "_" (if `replace_spaces`), each of `INVALID_FILENAME_CHARS` -> "_", leading spaces stripped, cut to 128
    characters, trailing spaces and dots stripped.
    """
    if replace_spaces:
        text = text.replace(" ", "_")
    text = text.translate({ord(c): "_" for c in INVALID_FILENAME_CHARS})
    return text.lstrip(" ")[:MAX_FILENAME_PART_LENGTH].rstrip(" .")


_LEADING_NUMBER = re.compile(r"(\d+)")


def next_sequence_number(directory: str | os.PathLike) -> int:
    """The number for the next saved file: 1 + the largest leading integer of any file name in `directory` (a1111-semantics §9.4).

    Reference: `modules/images.py` `get_next_sequence_number` with an empty basename: each name without its extension
    is split at "-" and the first part read as an int (names whose first part is not an int are ignored). 0 for an
    empty or missing directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    largest = -1
    for entry in os.listdir(directory):
        first = os.path.splitext(entry)[0].split("-")[0]
        if _LEADING_NUMBER.fullmatch(first):
            largest = max(largest, int(first))
    return largest + 1


# Errors of os.link meaning "this file system has no hard links" (FAT, some network and FUSE mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.ENOTSUP,
                  getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file's data (or a folder's entries) to the disk. Folders are best effort (not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY if directory else os.O_RDWR)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _new_temporary(beside: Path) -> Path:
    """A new empty hidden file `.<name>.<random>.partial` in `beside`'s folder, created exclusively with mode 0o666
    less the umask (the mode the final file keeps; `tempfile.mkstemp` would make it 0o600)."""
    while True:
        tmp = beside.with_name(f".{beside.name}.{secrets.token_hex(6)}.partial")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_new_file(path: str | os.PathLike | Iterable[str | os.PathLike], write: Callable[[Path], None]) -> Path:
    """Create a new file whose content `write(tmp)` writes, atomically and never overwriting. Returns its path.

    `path`: the name, or an iterable of candidate names in one folder, tried in order (the first that does not exist
    is taken; `save_image` passes its numbered names). `write` gets a fresh hidden temporary file in that folder
    (`_new_temporary`: a new random name, exclusive creation), whose data are then flushed to the disk (fsync) and
    which is then hard-linked to the final name. `os.link` refuses an existing name atomically (FileExistsError), so
    no file is ever overwritten, not even one a concurrent run creates between a check and the link: a check then
    `os.rename` / `os.replace` would overwrite it silently, and exclusive creation of the final name itself would
    leave a truncated file there when the write fails (disk full). The temporary name is removed whatever happens
    (`finally`), and the folder is flushed so the new name survives a crash. On a file system without hard links
    (`_NO_HARD_LINKS`) the name is reserved by exclusive creation and the complete temporary file renamed over the
    reservation (still atomic and never overwriting; only a process killed between the two steps leaves an empty
    file under the name).

    Raises FileExistsError when every candidate exists; an OSError of `write` or of the flush (ENOSPC, EIO, ...)
    propagates naming the final file, and leaves neither a file under the final name nor the temporary file.
    """
    names = iter([path] if isinstance(path, (str, os.PathLike)) else path)
    first = Path(next(names))
    tmp = _new_temporary(first)
    try:
        try:
            write(tmp)
            _fsync_path(tmp)
        except OSError as e:
            if e.errno is None or isinstance(e, FileExistsError):
                raise
            raise OSError(e.errno, e.strerror or str(e), str(first)) from e
        hard_links = True
        for name in itertools.chain([first], (Path(n) for n in names)):
            if hard_links:
                try:
                    os.link(tmp, name)
                    break
                except FileExistsError:
                    continue
                except OSError as e:
                    if e.errno not in _NO_HARD_LINKS:
                        raise
                    hard_links = False
            try:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # reserve the name
            except FileExistsError:
                continue
            try:
                os.replace(tmp, name)
            except BaseException:
                Path(name).unlink(missing_ok=True)  # our empty reservation
                raise
            break
        else:
            raise FileExistsError(errno.EEXIST, "exists; files are never overwritten", str(first))
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(name.parent, directory=True)
    return name


def save_image(image: Image.Image, outdir: str | os.PathLike, seed: int, infotext: str | None = None, *,
               prompt: str | None = None, date_subfolder: bool = True, suffix: str = "",
               date: datetime.date | None = None) -> Path:
    """Save `image` as PNG named like A1111's samples and never overwrite a file (a1111-semantics §9.4). Returns the path.

    Reference: `modules/images.py` `save_image` with the default options (`save_images_add_number`, pattern `[seed]`,
    `save_to_dirs`). Directory: `outdir/<YYYY-MM-DD>` (`date`, default today) when `date_subfolder`, else `outdir`;
    created if missing. Name: `%05d-<seed><suffix>.png` with the next free number (`next_sequence_number`), e.g.
    `00000-1234.png`; without the date subfolder and with a `prompt`, A1111's `[seed]-[prompt_spaces]` pattern:
    `00000-1234-a cat.png`. Prompt and suffix are sanitised. The file is written by `write_new_file`: complete or
    not at all under its name (a full disk leaves nothing), and a name that appears meanwhile is never overwritten
    (the number is bumped instead). `infotext` goes into the PNG text chunk "parameters".
    """
    _check_image("image", image)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    directory = Path(outdir)
    if date_subfolder:
        directory = directory / (date or datetime.date.today()).isoformat()
    directory.mkdir(parents=True, exist_ok=True)

    decoration = str(seed)
    if prompt is not None and not date_subfolder:
        decoration += "-" + sanitize_filename_part(prompt, replace_spaces=False)
    decoration += sanitize_filename_part(suffix)

    pnginfo = None
    if infotext is not None:
        pnginfo = PngImagePlugin.PngInfo()
        pnginfo.add_text("parameters", infotext)

    start = next_sequence_number(directory)
    names = (directory / f"{number:05d}-{decoration}.png" for number in itertools.count(start))
    return write_new_file(names, lambda tmp: image.save(tmp, format="PNG", pnginfo=pnginfo))


# ---------------------------------------------------------------------------------------------------------------
# The whole input preparation of one img2img job (a1111-semantics §2), as one function over the helpers above
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PreparedInputs:
    """What `prepare_inputs` made of the init images and the mask (a1111-semantics §2).

    - `pixels`: float32 [B, H, W, 3] in [0, 1] at the processing size (cropped to the mask region for "Only masked",
      masked pixels filled for `inpainting_fill` 0); one row per batch image (a single init image is repeated).
    - `mask`: the processing mask at `width x height` ("L", 255 = regenerate) after binarising, inverting, blurring
      and cropping; None without a mask (or when "Only masked" found it blank).
    - `latent_mask`: the mask the latent blend and the fill read (`latent_mask` argument, else `mask`).
    - `mask_for_overlay`, `overlay_images` (RGBA, one per batch image): what `apply_overlay` pastes back;
      `originals` (RGBA, one per batch image): the same originals un-cut (soft inpainting pastes them through its
      own composite mask).
    - `paste_to` `(x, y, w, h)` and `crop_region` `(x1, y1, x2, y2)` for "Only masked", else None.
    - `color_corrections`: one LAB histogram target per batch image, or None when colour correction is off.
    - `blank_mask`: "Only masked" was asked with a blank mask and fell back to whole-picture img2img.
    """

    pixels: np.ndarray
    mask: Image.Image | None
    latent_mask: Image.Image | None
    mask_for_overlay: Image.Image | None
    overlay_images: list[Image.Image] | None
    originals: list[Image.Image] | None
    paste_to: tuple[int, int, int, int] | None
    crop_region: tuple[int, int, int, int] | None
    color_corrections: list[np.ndarray] | None
    blank_mask: bool = False


def prepare_mask(mask: Image.Image, *, width: int, height: int, resize_mode: int, mask_blur_x: float,
                 mask_blur_y: float, mask_round: bool, invert: bool, full_res: bool, padding: int):
    """(processing mask, mask_for_overlay, crop_region, paste_to) of a user mask (a1111-semantics §2 steps 1-4).

    Binarise (`create_binary_mask`), invert, blur; then "Only masked" (`full_res`): crop region of the mask with
    `padding` px, expanded to the processing aspect ratio, the crop resized to `width x height` (resize mode 2);
    a blank mask gives (None, None, None, None). Whole picture: the mask resized with `resize_mode` and the overlay
    mask doubled (`double_mask_for_overlay`).
    """
    mask = create_binary_mask(mask, round=mask_round)
    if invert:
        mask = ImageOps.invert(mask)
    if mask_blur_x > 0 or mask_blur_y > 0:
        mask = blur_mask(mask, mask_blur_x, mask_blur_y)
    if not full_res:
        mask = resize_image(resize_mode, mask, width, height)
        return mask, double_mask_for_overlay(mask), None, None
    crop = get_crop_region_v2(mask, padding)
    if crop is None:
        return None, None, None, None
    crop = expand_crop_region(crop, width, height, mask.width, mask.height)
    x1, y1, x2, y2 = crop
    return resize_image(2, mask.crop(crop), width, height), mask, crop, (x1, y1, x2 - x1, y2 - y1)


def prepare_inputs(init_images: list[Image.Image], mask: Image.Image | None, *, width: int, height: int,
                   batch_size: int, resize_mode: int = 0, mask_blur_x: float = 4, mask_blur_y: float = 4,
                   mask_round: bool = True, invert: bool = False, full_res: bool = True, padding: int = 0,
                   inpainting_fill: int = 1, latent_mask: Image.Image | None = None,
                   background_color: str = "#ffffff", color_correction: bool = False) -> PreparedInputs:
    """Init images and mask -> processing-size pixels, masks and overlays, in A1111's order (a1111-semantics §2).

    Per image: flatten onto `background_color`, resize (`resize_mode` 0-2; mode 3 resizes the latent later), make the
    overlay of the original through `mask_for_overlay`, crop to the mask region ("Only masked"), fill the masked
    pixels (`inpainting_fill` != 1, a1111-semantics §4), record the colour-correction target. A single image is repeated to
    `batch_size`; several images make a batch of their own size (at most `batch_size`). Inputs are never changed.
    Raises ValueError for more images than `batch_size`.
    """
    if len(init_images) > 1 and len(init_images) > batch_size:
        raise ValueError(f"init_images: {len(init_images)} images but batch_size is {batch_size}")
    mask_for_overlay = crop = paste_to = None
    blank, masked_job = False, mask is not None
    if mask is not None:
        mask, mask_for_overlay, crop, paste_to = prepare_mask(
            mask, width=width, height=height, resize_mode=resize_mode, mask_blur_x=mask_blur_x,
            mask_blur_y=mask_blur_y, mask_round=mask_round, invert=invert, full_res=full_res, padding=padding)
        blank = mask is None
    fill_mask = as_viewed(latent_mask) if latent_mask is not None else mask
    pixels, overlays, originals, corrections = [], [], [], []
    for img in init_images:
        image = flatten(img, background_color)
        if crop is None and resize_mode != 3:
            image = resize_image(resize_mode, image, width, height)
        if mask is not None:
            overlay_mask = mask_for_overlay
            if overlay_mask.size != image.size:
                overlay_mask = resize_image(resize_mode, overlay_mask, image.width, image.height).convert("L")
            overlays.append(make_overlay(image, overlay_mask))
            originals.append(image.convert("RGBA"))
        if crop is not None:
            image = resize_image(2, image.crop(crop), width, height)
        if mask is not None and inpainting_fill != 1:
            image = fill(image, fill_mask.convert("L"))
        if color_correction:
            corrections.append(setup_color_correction(image))
        pixels.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    if len(pixels) == 1:
        pixels, overlays, corrections = pixels * batch_size, overlays * batch_size, corrections * batch_size
        originals = originals * batch_size
    return PreparedInputs(pixels=np.stack(pixels), mask=mask, latent_mask=fill_mask, mask_for_overlay=mask_for_overlay,
                          overlay_images=overlays if masked_job else None,
                          originals=originals if masked_job else None, paste_to=paste_to, crop_region=crop,
                          color_corrections=corrections if color_correction else None, blank_mask=blank)
