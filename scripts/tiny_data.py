"""Training and evaluation data for the bundled tiny model (issue 6): synthetic captioned scenes and colour photo crops.

Everything is made locally and deterministically from a `numpy.random.Generator`:

- Scenes: one shape (circle, square, triangle, cross) of a named colour on a plain named-colour background or on a
  photo crop, 64 x 64 RGB uint8, with a caption such as "a red circle at the top left on a blue background". Without a
  position the shape is large and near the centre; with one it is smaller and centred on that ninth of the image.
- Photos: the colour photographs that scikit-image and matplotlib ship (public domain / their stated licences, see
  `PHOTO_SOURCES`). The right quarter of every training photo is held out for evaluation, as is the whole of
  grace_hopper.jpg; training crops come from the left three quarters at random scales (the whole region downscaled
  to 64 px ... native resolution) with random horizontal flips.

`detect_scene(image)` is the pixel-statistics detector that eval_tiny.py uses to check colour and shape: background
= median of the 2-pixel border, object = pixels far from it, colour = nearest palette entry to the object's median
colour, shape = nearest prototype in (bbox fill ratio, top/bottom mass ratio, corner occupancy, middle fill).
`detect_star(image)` reads the fifth shape, "star" (EXTRA_SHAPES: not in the base model's data, taught by the LoRA
of train_lora_tiny.py), from the 5-fold harmonic of the same object's outline (`radial_harmonics`).

Glossary: H, W = 64 pixels; images are uint8 [H, W, 3] RGB unless said otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64  # pixels; the tiny family's native_size

# Named colours, sRGB uint8. Chosen far apart (min pairwise distance ~100) so a nearest-colour detector is reliable.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 225, 40),
    "orange": (250, 140, 20),
    "purple": (135, 45, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Shapes the base model never saw; "star" is taught by the LoRA of scripts/train_lora_tiny.py (weights/README.md).
EXTRA_SHAPES = ("star",)
# Outer radius ranges of a star in pixels, (without a position, with one). A star covers only 36 % of its circumcircle
# and the VAE (8 px latent cells) fills the notches of stars under ~15 px, so stars are drawn larger than the
# (12, 20) / (7, 11) of the other shapes.
STAR_RADII = ((15.0, 22.0), (9.0, 12.0))
STAR_INNER = 0.38197  # inner / outer radius of the regular pentagram {5/2}: cos(72 deg) / cos(36 deg)
# Centre of each named position, as fractions of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25), "top": (0.5, 0.25), "top right": (0.75, 0.25),
    "left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right": (0.75, 0.75),
}
# (file inside a package, package): colour photographs only, so the VAE learns saturated colours.
PHOTO_SOURCES: dict[str, tuple[str, str]] = {
    "astronaut": ("data/astronaut.png", "skimage"),
    "coffee": ("data/coffee.png", "skimage"),
    "chelsea": ("data/chelsea.png", "skimage"),
    "rocket": ("data/rocket.jpg", "skimage"),
    "ihc": ("data/ihc.png", "skimage"),
    "hubble_deep_field": ("data/hubble_deep_field.jpg", "skimage"),
    "color": ("data/color.png", "skimage"),
    "retina": ("data/retina.jpg", "skimage"),
    "motorcycle_left": ("data/motorcycle_left.png", "skimage"),
    "logo": ("data/logo.png", "skimage"),
    "minduka": ("mpl-data/sample_data/Minduka_Present_Blue_Pack.png", "matplotlib"),
    "grace_hopper": ("mpl-data/sample_data/grace_hopper.jpg", "matplotlib"),
}
HELD_OUT_PHOTOS = ("grace_hopper",)  # never seen in training, not even its left part
TRAIN_FRACTION = 0.75  # of each training photo's width; the right rest is the held-out strip
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down (anti-aliasing)


@dataclass(frozen=True)
class Scene:
    """What a synthetic image shows; `caption()` renders it as text."""

    colour: str
    shape: str
    position: str | None  # None: large shape near the centre
    background: str | None  # a PALETTE name, or None when unnamed in the caption
    photo_background: bool  # the background is a photo crop (then `background` is None)
    # Half the side of the shape's bounding square in pixels, as drawn by `sample_scene` (None when not known). Not
    # part of the caption, so not compared: it only feeds `emphasis_weight`.
    radius: float | None = field(default=None, compare=False)

    def caption(self) -> str:
        text = f"a {self.colour} {self.shape}"
        if self.position is not None:
            text += f" at the {self.position}"
        if self.background is not None:
            text += f" on a {self.background} background"
        return text


def all_captions() -> list[str]:
    """Every caption `sample_scene` can produce, in a fixed order (colour, shape, position, background)."""
    out = []
    for colour in PALETTE:
        for shape in SHAPES:
            for position in (None, *POSITIONS):
                for background in (None, *PALETTE):
                    if background != colour:
                        out.append(Scene(colour, shape, position, background, False).caption())
    return out


def _package_dir(package: str) -> Path:
    module = __import__(package)
    return Path(module.__file__).parent


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A shipped colour photo as uint8 [h, w, 3] (alpha composited on white)."""
    if name not in PHOTO_SOURCES:
        raise ValueError(f"name={name!r} is not one of {sorted(PHOTO_SOURCES)}")
    rel, package = PHOTO_SOURCES[name]
    im = Image.open(_package_dir(package) / rel)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("RGB"))


def _split_region(name: str, split: str) -> np.ndarray:
    photo = load_photo(name)
    if name in HELD_OUT_PHOTOS:
        if split == "train":
            raise ValueError(f"photo {name!r} is held out and has no training region")
        return photo
    cut = int(photo.shape[1] * TRAIN_FRACTION)
    return photo[:, :cut] if split == "train" else photo[:, cut:]


def photo_names(split: str) -> list[str]:
    """Photos with a region in `split` ("train" or "eval"; eval strips narrower than 64 pixels are skipped)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; allowed: 'train', 'eval'")
    if split == "train":
        return [n for n in PHOTO_SOURCES if n not in HELD_OUT_PHOTOS]
    return [n for n in PHOTO_SOURCES if min(_split_region(n, "eval").shape[:2]) >= SIZE]


@lru_cache(maxsize=None)
def photo_pyramid(name: str, split: str) -> tuple[np.ndarray, ...]:
    """The split's region of a photo at geometric scales from native down to its short side = 64 pixels."""
    region = Image.fromarray(_split_region(name, split))
    short = min(region.size)
    levels, scale = [], 1.0
    while True:
        s = max(scale, SIZE / short)
        size = (max(SIZE, round(region.size[0] * s)), max(SIZE, round(region.size[1] * s)))
        levels.append(np.asarray(region.resize(size, Image.LANCZOS) if s < 1 else region))
        if s == SIZE / short:
            return tuple(levels)
        scale *= 0.8


def photo_crop(rng: np.random.Generator, split: str = "train", size: int = SIZE, flip: bool = True) -> np.ndarray:
    """A random `size` x `size` crop of a random photo region of `split`, at a random scale, optionally flipped."""
    names = photo_names(split)
    name = names[rng.integers(len(names))]
    levels = photo_pyramid(name, split)
    level = levels[rng.integers(len(levels))]
    y = rng.integers(level.shape[0] - size + 1)
    x = rng.integers(level.shape[1] - size + 1)
    crop = level[y:y + size, x:x + size]
    if flip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def eval_photo_crops(n: int, seed: int = 1234) -> np.ndarray:
    """`n` held-out crops, uint8 [n, 64, 64, 3]: from the right strips and grace_hopper, at all pyramid scales."""
    rng = np.random.default_rng(seed)
    return np.stack([photo_crop(rng, "eval", flip=False) for _ in range(n)])


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], float32 [size, size], of a shape centred at (cx, cy) pixels.

    `radius` is half the side of the shape's bounding square in pixels (the triangle points up, the cross has arms
    one third of its side wide; the star is the regular pentagram with outer radius `radius`, one point up, moved
    down by (1 - cos 36 deg) / 2 * radius so that its bounding box is centred at (cx, cy)).
    """
    if shape not in SHAPES + EXTRA_SHAPES:
        raise ValueError(f"shape={shape!r}; allowed: {SHAPES + EXTRA_SHAPES}")
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    x = coords[None, :] - cx
    y = coords[:, None] - cy
    if shape == "circle":
        inside = x * x + y * y <= radius * radius
    elif shape == "square":
        inside = (np.abs(x) <= radius) & (np.abs(y) <= radius)
    elif shape == "triangle":
        # apex (0, -r), base corners (+-r, r): inside when |x| <= r * (y + r) / (2 r) and y <= r
        inside = (y <= radius) & (np.abs(x) <= (y + radius) / 2)
    elif shape == "star":
        inside = _inside_star(x, y - (1 - np.cos(np.pi / 5)) / 2 * radius, radius)
    else:
        arm = radius / 3
        box = (np.abs(x) <= radius) & (np.abs(y) <= radius)
        inside = box & ((np.abs(x) <= arm) | (np.abs(y) <= arm))
    cover = inside.astype(np.float32).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return cover


def _inside_star(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Points (x, y), relative to the centre, inside the regular pentagram of outer radius `radius`, one point up.

    Folding the angle into one 36-degree wedge between an inner vertex I (radius STAR_INNER * radius) and an outer
    vertex O, the star is the triangle (centre, I, O) there: inside <=> the point is on the centre's side of line IO.
    """
    wedge = np.pi / 5
    angle = np.arctan2(x, -y)  # 0 = up
    folded = np.abs(np.mod(angle, 2 * wedge) - wedge)  # 0 at an inner vertex, 36 deg at an outer vertex
    rho = np.hypot(x, y)
    px, py = rho * np.cos(folded), rho * np.sin(folded)
    ix = STAR_INNER * radius
    ox, oy = radius * np.cos(wedge), radius * np.sin(wedge)
    # sign of cross((O - I), (P - I)); the centre gives cross((O - I), -I) = oy * ix > 0
    return (ox - ix) * py - oy * (px - ix) >= 0


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def sample_scene(rng: np.random.Generator, photo_background_p: float = 0.25,
                 photo_split: str = "train", shapes: tuple[str, ...] = SHAPES) -> tuple[np.ndarray, Scene]:
    """Draw one scene: (uint8 [64, 64, 3], Scene).

    Half the captions name a position, half name the background; an unnamed background is a photo crop with
    probability `photo_background_p` (so inpainting on photos has seen shapes over photos), otherwise a palette colour.
    The shape is drawn uniformly from `shapes` (SHAPES, the base model's; EXTRA_SHAPES for the LoRA); the random
    draws are the same for every `shapes` of the same length, only a star's radius range differs (STAR_RADII).
    """
    if not shapes or any(s not in SHAPES + EXTRA_SHAPES for s in shapes):
        raise ValueError(f"shapes={shapes!r}; allowed: a non-empty tuple of {SHAPES + EXTRA_SHAPES}")
    colours = list(PALETTE)
    colour = colours[rng.integers(len(colours))]
    shape = shapes[rng.integers(len(shapes))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))] if rng.random() < 0.5 else None
    named_bg = rng.random() < 0.5
    photo_bg = (not named_bg) and rng.random() < photo_background_p
    bg_name = None
    if photo_bg:
        canvas = photo_crop(rng, photo_split).astype(np.float32)
    else:
        others = [c for c in colours if c != colour]
        bg_name = others[rng.integers(len(others))]
        canvas = np.broadcast_to(_jitter(PALETTE[bg_name], rng, 12), (SIZE, SIZE, 3)).astype(np.float32)
    if position is None:
        radius = rng.uniform(*radius_range(shape, None))
        cx, cy = SIZE / 2 + rng.uniform(-4, 4, 2)
    else:
        radius = rng.uniform(*radius_range(shape, position))
        fx, fy = POSITIONS[position]
        cx, cy = fx * SIZE + rng.uniform(-3, 3), fy * SIZE + rng.uniform(-3, 3)
    cover = shape_mask(shape, cx, cy, radius)[..., None]
    image = canvas * (1 - cover) + _jitter(PALETTE[colour], rng, 12) * cover
    scene = Scene(colour, shape, position, bg_name if named_bg else None, photo_bg, float(radius))
    return np.round(image).astype(np.uint8), scene


def radius_range(shape: str, position: str | None) -> tuple[float, float]:
    """(low, high) outer radius in pixels that `sample_scene` draws uniformly for `shape` with or without a position."""
    if shape not in SHAPES + EXTRA_SHAPES:
        raise ValueError(f"shape={shape!r}; allowed: {SHAPES + EXTRA_SHAPES}")
    if shape == "star":
        return STAR_RADII[0] if position is None else STAR_RADII[1]
    return (12.0, 20.0) if position is None else (7.0, 11.0)


# Emphasis weights the tiny model is trained with on the colour word (scripts/train_tiny.py, phase "joint").
EMPHASIS_RANGE = (0.5, 1.5)


def emphasis_weight(scene: Scene) -> float:
    """The emphasis weight of the colour word that describes `scene`'s size: linear in its radius over
    `radius_range`, from EMPHASIS_RANGE[0] (smallest) to EMPHASIS_RANGE[1] (largest); 1.0 is the middle of the
    range, which is also the mean size of scenes without emphasis. So "a (red:1.5) circle" means a larger red
    circle than "a red circle", and "a (red:0.5) circle" a smaller one. Raises ValueError when `scene.radius` is
    None."""
    if scene.radius is None:
        raise ValueError("scene.radius is None: only scenes drawn by sample_scene know their size")
    low, high = radius_range(scene.shape, scene.position)
    lo_w, hi_w = EMPHASIS_RANGE
    return lo_w + (hi_w - lo_w) * (scene.radius - low) / (high - low)


# ---- detector -------------------------------------------------------------------------------------------------

def _shape_features(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1].astype(np.float32)
    h, w = box.shape
    fill = box.mean()
    top, bottom = box[: h // 2].sum(), box[(h + 1) // 2:].sum()
    qh, qw = max(1, h // 4), max(1, w // 4)
    corners = np.mean([box[:qh, :qw].mean(), box[:qh, -qw:].mean(), box[-qh:, :qw].mean(), box[-qh:, -qw:].mean()])
    middle = box[h // 3: h - h // 3, w // 3: w - w // 3].mean() if h >= 3 and w >= 3 else 1.0
    return np.array([fill, top / max(bottom, 1.0), corners, middle], np.float32)


@lru_cache(maxsize=1)
def _shape_prototypes() -> dict[str, np.ndarray]:
    protos = {}
    for shape in SHAPES:
        feats = [_shape_features(shape_mask(shape, SIZE / 2, SIZE / 2, r) > 0.5) for r in (8, 12, 16)]
        protos[shape] = np.mean(feats, axis=0)
    return protos


@dataclass(frozen=True)
class Detection:
    """Result of `detect_scene`: None fields when no object was found."""

    colour: str | None
    shape: str | None
    background_rgb: tuple[float, float, float]
    object_fraction: float  # share of pixels classed as object
    centre: tuple[float, float] | None  # (x, y) pixels


def nearest_colour(rgb: np.ndarray) -> str:
    """The PALETTE name nearest (Euclidean, sRGB) to a float [3] colour."""
    names = list(PALETTE)
    dist = np.linalg.norm(np.asarray([PALETTE[n] for n in names], np.float32) - rgb, axis=1)
    return names[int(np.argmin(dist))]


def object_mask(image: np.ndarray, threshold: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """(bool [H, W] object mask, float32 [3] background colour) of a uint8 [H, W, 3] image, as `detect_scene` sees it.

    Background = per-channel median of the 2-pixel border; the mask is the largest 4-connected component of the
    pixels farther than `threshold` (sRGB Euclidean) from it (all False when there is none).
    """
    from scipy import ndimage

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3]; got {image.dtype} {image.shape}")
    img = image.astype(np.float32)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    far = np.linalg.norm(img - bg, axis=2) > threshold
    labels, count = ndimage.label(far)
    if count == 0:
        return far, bg
    sizes = ndimage.sum(far, labels, index=np.arange(1, count + 1))
    return labels == (1 + int(np.argmax(sizes))), bg


def detect_scene(image: np.ndarray, threshold: float = 60.0, min_pixels: int = 20) -> Detection:
    """Detect the single shape in a uint8 [64, 64, 3] image by pixel statistics.

    Background = per-channel median of the 2-pixel border; object pixels are farther than `threshold` (sRGB
    Euclidean) from it, keeping the largest 4-connected component. Fewer than `min_pixels` -> no object.
    """
    from scipy import ndimage

    img = image.astype(np.float32)
    mask, bg = object_mask(image, threshold)
    if not mask.any():
        return Detection(None, None, tuple(bg), 0.0, None)
    if mask.sum() < min_pixels:
        return Detection(None, None, tuple(bg), float(mask.mean()), None)
    core = ndimage.binary_erosion(mask) if mask.sum() > 60 else mask
    colour = nearest_colour(np.median(img[core if core.any() else mask], axis=0))
    feats = _shape_features(mask)
    protos = _shape_prototypes()
    scale = np.array([1.0, 0.5, 1.0, 1.0], np.float32)  # the top/bottom ratio spans ~0..1.3, the rest 0..1
    shape = min(protos, key=lambda s: float(np.sum(((feats - protos[s]) * scale) ** 2)))
    ys, xs = np.nonzero(mask)
    return Detection(colour, shape, tuple(bg), float(mask.mean()), (float(xs.mean()), float(ys.mean())))


def radial_harmonics(mask: np.ndarray, kmax: int = 8, n_angles: int = 180, step: float = 0.25) -> np.ndarray:
    """Rotation-invariant shape signature of a bool [H, W] mask: float32 [kmax], entry k-1 = |c_k| * 2 / c_0.

    r(theta) = distance from the mask's centroid to the first exit from the (bilinearly sampled, holes filled) mask
    along the ray at angle theta, for `n_angles` angles, sampled every `step` pixels; c_k = its discrete Fourier
    coefficients. A k-fold rotationally symmetric outline has only harmonics that are multiples of k: a regular
    pentagram (r between 0.382 R and R) has entry 4 (k = 5) 0.38 (0.35 when drawn at 64 px), a circle, square or
    cross (4-fold) none, the tiny world's isosceles triangle (mirror symmetry only) about 0.04. All zeros for an empty mask or
    one whose centroid lies outside it.
    """
    from scipy import ndimage

    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"mask must be bool [H, W]; got {mask.dtype} {mask.shape}")
    if not mask.any():
        return np.zeros(kmax, np.float32)
    solid = ndimage.binary_fill_holes(mask)
    ys, xs = np.nonzero(solid)
    cy, cx = ys.mean(), xs.mean()
    if not solid[int(round(cy)), int(round(cx))]:
        return np.zeros(kmax, np.float32)
    theta = np.arange(n_angles) * 2 * np.pi / n_angles
    s = np.arange(0, float(np.hypot(*mask.shape)), step)
    yy = cy - s[None, :] * np.cos(theta)[:, None]  # theta = 0 points up, as the star's first point
    xx = cx + s[None, :] * np.sin(theta)[:, None]
    inside = ndimage.map_coordinates(solid.astype(np.float32), [yy.ravel(), xx.ravel()], order=1, cval=0.0)
    inside = inside.reshape(n_angles, len(s)) > 0.5
    r = np.cumprod(inside, axis=1).sum(axis=1) * step  # [n_angles]: run length from the centre to the first exit
    coef = np.abs(np.fft.rfft(r)) / n_angles
    return (2 * coef[1:kmax + 1] / max(float(coef[0]), 1e-6)).astype(np.float32)


def detect_star(image: np.ndarray, min_fifth: float = 0.08, threshold: float = 60.0, min_pixels: int = 20) -> bool:
    """Whether a uint8 [64, 64, 3] image shows a five-pointed star (the LoRA concept of scripts/train_lora_tiny.py).

    The object is `object_mask(image, threshold)` (as in `detect_scene`); it is a star when it has at least
    `min_pixels` pixels and the fifth harmonic of its radial profile (`radial_harmonics`) is at least `min_fifth`
    and the largest of harmonics 1-8. The thresholds were set on VAE reconstructions of true scenes (weights/README.md,
    LoRA card): 0.08 passes about 88 % of plain-background stars and none of 230 circles, squares, triangles and
    crosses; on photo backgrounds the border-median background model breaks down and few stars are read.
    """
    mask, _ = object_mask(image, threshold)
    if mask.sum() < min_pixels:
        return False
    h = radial_harmonics(mask)
    return bool(h[4] >= min_fifth and h[4] >= h.max())
