"""Inpainting mask blends: the named, pluggable rule that keeps the latent cells outside the mask during sampling.

Glossary
- B = images in the batch, C = latent channels (4), h, w = latent cells (pixels / 8).
- sigma: noise standard deviation in k-diffusion's parametrisation `x = x0 + sigma * eps` (latent units); a model
  call gets `sigma` [B] (all rows equal in every sampler).
- nmask: regenerate weight per latent cell, in [0, 1] (1 = regenerate); mask = 1 - nmask: keep weight.
- init_latent: the un-noised latent of the input image; noise: the initial draw, `x_start = init_latent +
  noise * sigmas[0]`.
- x0 blend: mixes the model's denoised estimate with init_latent (A1111). xt blend: mixes the noisy sample x with
  init_latent noised to the same sigma (diffusers, ComfyUI).

Where the pipeline calls a blend (A1111 `modules/sd_samplers_cfg_denoiser.py` `CFGDenoiser.forward`, the
`apply_blend` helper; `modules/processing.py` `StableDiffusionProcessingImg2Img.sample`):

    x = blend.blend_input(x, sigma, ctx)               before every CFG model call
    denoised = blend.blend(denoised, sigma, ctx)       k-diffusion samplers: after CFG
    x = blend.blend(x, sigma, ctx)                     DDIM / PLMS / UniPC: before the call (A1111 then passes the
                                                       DDPM timestep as "sigma": a1111-semantics §15.3)
    samples = blend.final(samples, ctx)                after sampling, before VAE decode
    overlays = blend.overlays(overlays, originals, samples, ...)   RGBA images pasted over the decoded images

Strategies (`BLENDS`, CLI / API names):
- "a1111" `A1111Blend`: A1111's x0 blend `current * nmask + init_latent * mask` (default).
- "xt" `XtBlend`: diffusers' blend of the noised init latent into x before each call.
- "soft_inpainting" `SoftInpaintingBlend`: A1111's built-in Soft Inpainting extension (a1111-semantics §15).
- "differential" `DifferentialBlend`: differential diffusion, a per-cell strength map (a1111-semantics §16).

Every function returns new tensors / images and never changes its arguments.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from numbers import Real
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor

from .. import images


@dataclass(frozen=True)
class BlendContext:
    """What a blend may read at a model call (all on the latent device).

    - `init_latent` [B,C,h,w]: un-noised init latent (after "latent noise" / "latent nothing" fill).
    - `mask` [1 or B, 1 or C, h, w]: keep weight (1 = keep original), `1 - nmask`.
    - `nmask` [1 or B, 1 or C, h, w]: regenerate weight in [0, 1]; grey values only when the blend keeps grey masks.
    - `noise` [B,C,h,w]: the initial noise draw; sampling started from `init_latent + noise * sigmas[0]`.
    - `sigmas` [n >= 2]: the sampling slice sigma_sched (k-diffusion sigmas, descending, normally last 0).
    - `sigma_to_t`: the model's sigma -> continuous DDPM timestep (`DiscreteSchedule.sigma_to_t`); it must clamp
      sigmas below the model's smallest level to that level's timestep, as k-diffusion's does.

    Raises ValueError for shapes that do not fit together.
    """
    init_latent: Tensor
    mask: Tensor
    nmask: Tensor
    noise: Tensor
    sigmas: Tensor
    sigma_to_t: Callable[[Tensor], Tensor]

    def __post_init__(self):
        if self.init_latent.ndim != 4:
            raise ValueError(f"init_latent must be [B,C,h,w], got shape {tuple(self.init_latent.shape)}")
        b, c, h, w = self.init_latent.shape
        if tuple(self.noise.shape) != (b, c, h, w):
            raise ValueError(f"noise shape {tuple(self.noise.shape)} must equal init_latent shape {(b, c, h, w)}")
        for name in ("mask", "nmask"):
            m = getattr(self, name)
            if m.ndim != 4 or m.shape[0] not in (1, b) or m.shape[1] not in (1, c) or tuple(m.shape[2:]) != (h, w):
                raise ValueError(f"{name} must be [1 or {b}, 1 or {c}, {h}, {w}], got shape {tuple(m.shape)}")
        if self.sigmas.ndim != 1 or self.sigmas.shape[0] < 2:
            raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {tuple(self.sigmas.shape)}")
        if not callable(self.sigma_to_t):
            raise ValueError(f"sigma_to_t must be callable, got {type(self.sigma_to_t).__name__}")


@runtime_checkable
class MaskBlend(Protocol):
    """The interface the pipeline calls (module docstring: where each method runs). All tensors [B,C,h,w] unless
    noted, `sigma` [B]; every method returns new tensors / a new list and changes none of its arguments."""

    name: str
    """The CLI / API value: "a1111", "xt", "soft_inpainting", "differential"."""
    keeps_grey_mask: bool
    """True: the pipeline must NOT round the latent mask (A1111 soft inpainting sets `p.mask_round = False`)."""

    def blend_input(self, x: Tensor, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """Applied to the model input x before each CFG model call; identity for x0 blends."""
        ...

    def blend(self, current: Tensor, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """A1111's `apply_blend` position: on `denoised` after CFG (k-diffusion samplers), or on x before the call
        (DDIM / PLMS / UniPC)."""
        ...

    def final(self, samples: Tensor, ctx: BlendContext) -> Tensor:
        """After sampling, before VAE decode (A1111: `samples * nmask + init_latent * mask`)."""
        ...

    def overlays(self, overlay_images: list[Image.Image], originals: list[Image.Image], samples: Tensor,
                 ctx: BlendContext, width: int, height: int,
                 paste_to: tuple[int, int, int, int] | None) -> list[Image.Image]:
        """RGBA overlays pasted over the decoded images. `overlay_images`: the default overlays (the original with
        the masked area cut out); `originals`: the whole original images (RGBA, un-cut, at the size the overlays
        have). Default: `overlay_images` unchanged."""
        ...

    def infotext(self) -> dict[str, Any]:
        """Extra infotext keys, {} for the default."""
        ...


def _first_sigma(sigma: Tensor) -> Tensor:
    """sigma[0] as a 0-dim tensor (A1111's soft inpainting and ComfyUI read the first row only)."""
    return torch.as_tensor(sigma).reshape(-1)[0]


def _per_row(sigma: Tensor) -> Tensor:
    """sigma [B] (or 0-dim) -> [B,1,1,1] (or [1,1,1,1]) to broadcast over [B,C,h,w]."""
    return torch.as_tensor(sigma).reshape(-1, 1, 1, 1)


class _Defaults:
    """The default behaviour of a blend, which each strategy overrides where it differs."""

    def blend_input(self, x: Tensor, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """Identity (a copy of `x` [B,C,h,w]): x0 blends leave the model input alone."""
        return x.clone()

    def final(self, samples: Tensor, ctx: BlendContext) -> Tensor:
        """A1111's last blend `samples * nmask + init_latent * mask` [B,C,h,w]: kept cells restored exactly.

        Source: A1111 `modules/processing.py` `StableDiffusionProcessingImg2Img.sample`.
        """
        return samples * ctx.nmask + ctx.init_latent * ctx.mask

    def overlays(self, overlay_images: list[Image.Image], originals: list[Image.Image], samples: Tensor,
                 ctx: BlendContext, width: int, height: int,
                 paste_to: tuple[int, int, int, int] | None) -> list[Image.Image]:
        """The pipeline's overlays unchanged (a new list holding the same images)."""
        return list(overlay_images)

    def infotext(self) -> dict[str, Any]:
        """No infotext keys."""
        return {}


# ---------------------------------------------------------------------------------------------------------------
# a1111
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class A1111Blend(_Defaults):
    """A1111's inpainting blend on the denoised estimate (x0): `current * nmask + init_latent * mask`.

    Every model call: kept cells of `denoised` are replaced by the un-noised init latent; after sampling the same
    blend restores them exactly. No model-input blend, no infotext keys. With a grey nmask this is a plain linear
    mix (A1111 rounds the latent mask unless an extension turns rounding off).
    Sources: A1111 `modules/sd_samplers_cfg_denoiser.py` `CFGDenoiser.forward` (`apply_blend`);
    `modules/processing.py` `StableDiffusionProcessingImg2Img.sample` (final blend); a1111-semantics §6.1, 7 step 3.
    """
    name: str = field(default="a1111", init=False, repr=False)
    keeps_grey_mask: bool = field(default=False, init=False, repr=False)

    def blend(self, current: Tensor, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """`current * nmask + init_latent * mask`, [B,C,h,w]; `sigma` is not used."""
        return current * ctx.nmask + ctx.init_latent * ctx.mask


# ---------------------------------------------------------------------------------------------------------------
# xt
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class XtBlend(_Defaults):
    """diffusers' inpainting blend for 4-channel UNets: kept cells of x follow the noised init trajectory.

    Before each model call `x = x * nmask + (init_latent + sigma * noise) * mask`: the kept region is put back at
    the init latent noised to the call's sigma with the same initial noise, so the model sees a consistent noisy
    image; `denoised` is left alone; the final blend (A1111's) restores the kept cells exactly.
    Source: diffusers `pipelines/stable_diffusion/pipeline_stable_diffusion_inpaint.py`
    `StableDiffusionInpaintPipeline.__call__`: after step i, `init_latents_proper = scheduler.add_noise(
    image_latents, noise, timesteps[i + 1])` and `latents = (1 - mask) * init_latents_proper + mask * latents`
    (clean `image_latents` after the last step). Blending before the call at its own sigma is the same thing in
    k-diffusion's `x = x0 + sigma * eps` scaling. ComfyUI's `KSamplerX0Inpaint` does this too (plus an x0 blend).

    `x` must be in that scaling: timestep samplers (DDIM / PLMS / UniPC) carry `x_t = sqrt(abar) * (x0 + sigma *
    eps)`, `abar = 1 / (1 + sigma^2)`, so the caller must divide by `sqrt(abar)` first and multiply after.
    Infotext: `"Mask blend": "xt"` (an sdcore key; A1111 has no such option).
    """
    name: str = field(default="xt", init=False, repr=False)
    keeps_grey_mask: bool = field(default=False, init=False, repr=False)

    def blend_input(self, x: Tensor, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """`x * nmask + (init_latent + sigma * noise) * mask`, [B,C,h,w]; `sigma` [B] applies per row."""
        return x * ctx.nmask + (ctx.init_latent + _per_row(sigma) * ctx.noise) * ctx.mask

    def blend(self, current: Tensor, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """Identity (a copy of `current`)."""
        return current.clone()

    def infotext(self) -> dict[str, Any]:
        """`{"Mask blend": "xt"}`."""
        return {"Mask blend": self.name}


# ---------------------------------------------------------------------------------------------------------------
# soft inpainting (A1111 extensions-builtin/soft-inpainting/scripts/soft_inpainting.py; a1111-semantics §15)
# ---------------------------------------------------------------------------------------------------------------

SOFT_INPAINTING_ENABLED_LABEL = "Soft inpainting enabled"
# Parameter -> infotext label, in the order A1111 writes them (`gen_param_labels`).
SOFT_INPAINTING_LABELS = {
    "mask_blend_power": "Soft inpainting schedule bias",
    "mask_blend_scale": "Soft inpainting preservation strength",
    "inpaint_detail_preservation": "Soft inpainting transition contrast boost",
    "composite_mask_influence": "Soft inpainting mask influence",
    "composite_difference_threshold": "Soft inpainting difference threshold",
    "composite_difference_contrast": "Soft inpainting difference contrast",
}


def latent_blend(a: Tensor, b: Tensor, t: Tensor, detail_preservation: float) -> Tensor:
    """Interpolate latent vectors from `a` to `b` by `t`, their lengths separately (a1111-semantics §15.4).

    `a`, `b` [B,C,h,w]; `t` [1 or B, 1 or C, h, w] in [0, 1] (0 = a, 1 = b); the lengths are the L2 norms over C
    and their weight is channel 0 of `t`. With `p = detail_preservation` (> 0):
        v = a * (1 - t) + b * t                                      (dtype of v = the result dtype)
        length = ((1 - t0) * |a|^p + t0 * |b|^p) ^ (1 / p)            (float64)
        result = v * (length / (|v| + 1e-5))                          (factor cast back to v's dtype)
    so a larger p pulls the length towards the longer of the two (less contrast lost in grey mask regions).
    Example: a = (3,4,0,0), b = (0,0,6,8), t = 0.5: v = (1.5,2,3,4), |v| = 5.5902; p = 1 -> length 7.5;
    p = 4 -> (0.5*625 + 0.5*10000)^(1/4) = 8.5374. At t = 0 the result is a * 5/(5 + 1e-5), not exactly a.
    Source: A1111 soft_inpainting.py `latent_blend` (float64 lengths, except on MPS / XPU where A1111 uses float32).
    """
    t0 = t[:, :1]
    v = a * (1 - t) + b * t
    v_length = torch.linalg.vector_norm(v, ord=2, dim=1, keepdim=True).to(torch.float64) + 0.00001
    a_part = torch.linalg.vector_norm(a, ord=2, dim=1, keepdim=True).to(torch.float64) ** detail_preservation * (1 - t0)
    b_part = torch.linalg.vector_norm(b, ord=2, dim=1, keepdim=True).to(torch.float64) ** detail_preservation * t0
    length = (a_part + b_part) ** (1 / detail_preservation)
    return v * (length / v_length).to(v.dtype)


def gaussian_kernel(stddev_radius: float = 1.0, max_radius: int = 2) -> np.ndarray:
    """A Gaussian tapered to 0 one cell beyond `max_radius`: float64 [2r+1, 2r+1], centre 1 (a1111-semantics §15.8).

    `k(d) = max(0, (g(d^2) - g((r+1)^2)) / (1 - g((r+1)^2)))`, `g(s) = exp(-s / stddev_radius^2)` (no factor 2),
    d = offset from the centre. Soft inpainting uses stddev 1.5, radius 2: centre 1, offset (0,1) 0.634486,
    (1,1) 0.400125, (0,2) 0.153509, (1,2) 0.091733, (2,2) 0.010441. Source: A1111 soft_inpainting.py
    `get_gaussian_kernel` (math.exp per element and the same operation order, for bit parity).
    """
    zero = math.exp(-((max_radius + 1.0) ** 2) / (stddev_radius * stddev_radius))
    size = 2 * max_radius + 1
    kernel = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            g = math.exp(-((i - max_radius) ** 2.0 + (j - max_radius) ** 2.0) / (stddev_radius * stddev_radius))
            kernel[i, j] = max(0.0, (g - zero) * (1 / (1 - zero)))
    return kernel


def weighted_histogram_filter(img: np.ndarray, kernel: np.ndarray, kernel_center: int | Sequence[int],
                              percentile_min: float = 0.0, percentile_max: float = 1.0,
                              min_width: float = 1.0) -> np.ndarray:
    """Weighted percentile-window mean filter (a1111-semantics §15.7): a new array of `img`'s shape and dtype.

    For each pixel: the neighbours under the kernel (windows are cut at the image border, no padding), each with
    its kernel weight, are sorted by value (stable: ties keep row-major order) and stacked so that element k spans
    `[W_k-1, W_k)` of the cumulative weight `S`. The window `[S * percentile_min, S * percentile_max]` is widened
    to `min_width` around its centre when narrower (then shifted back inside `[0, S]`); the output is the mean of
    the values weighted by their overlap with the window. (0.9, 1) is a soft maximum, (0.25, 0.75) a soft median.
    `img` 2-D float; `kernel` 2-D float64 (all weights >= 0); `kernel_center` (row, col) or one int for both.
    Arithmetic is float64 summed in sorted order, cast back to `img.dtype`, so the result equals A1111's per-pixel
    loop bit for bit (soft_inpainting.py `weighted_histogram_filter`), vectorised over the pixels.
    Example: [[0, 10, 20]] with the (1.5, 2) kernel, window (0.25, 0.75) -> [[3.93997, 10, 16.06002]].
    """
    img = np.asarray(img)
    if img.ndim != 2 or kernel.ndim != 2:
        raise ValueError(f"img and kernel must be 2-D, got shapes {img.shape} and {kernel.shape}")
    cy, cx = (kernel_center, kernel_center) if np.ndim(kernel_center) == 0 else tuple(kernel_center)
    height, width = img.shape
    kh, kw = kernel.shape
    # One slot per kernel offset, row-major (the reference's window order). Slots outside the image get weight 0:
    # they add exactly 0 to every sum below, so they change nothing.
    values = np.zeros((kh * kw, height, width))
    weights = np.zeros((kh * kw, height, width))
    for slot, (ky, kx) in enumerate(np.ndindex(kh, kw)):
        dy, dx = ky - cy, kx - cx
        y0, y1 = max(0, -dy), min(height, height - dy)
        x0, x1 = max(0, -dx), min(width, width - dx)
        if y0 < y1 and x0 < x1:
            values[slot, y0:y1, x0:x1] = img[y0 + dy:y1 + dy, x0 + dx:x1 + dx]
            weights[slot, y0:y1, x0:x1] = kernel[ky, kx]
    order = np.argsort(values, axis=0, kind="stable")
    values = np.take_along_axis(values, order, axis=0)
    weights = np.take_along_axis(weights, order, axis=0)
    # Running totals in sorted order; an element spans [previous total, total], as in the reference.
    tops = np.cumsum(weights, axis=0)
    bottoms = np.concatenate([np.zeros((1, height, width)), tops[:-1]])
    total = tops[-1]

    lo = total * percentile_min
    hi = total * percentile_max
    narrow = (hi - lo) < min_width
    centre = (lo + hi) / 2
    lo = np.where(narrow, centre - min_width / 2, lo)
    hi = np.where(narrow, centre + min_width / 2, hi)
    over = narrow & (hi > total)
    hi = np.where(over, total, hi)
    lo = np.where(over, total - min_width, lo)
    under = narrow & (lo < 0)
    lo = np.where(under, 0.0, lo)
    hi = np.where(under, min_width, hi)

    acc = np.zeros((height, width))
    acc_weight = np.zeros((height, width))
    for k in range(kh * kw):
        inside = (lo < tops[k]) & (hi > bottoms[k])
        overlap = np.minimum(hi, tops[k]) - np.maximum(lo, bottoms[k])
        acc = acc + np.where(inside, values[k] * overlap, 0.0)
        acc_weight = acc_weight + np.where(inside, overlap, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(acc_weight != 0, acc / acc_weight, 0.0)
    return out.astype(img.dtype)


def smootherstep(x: np.ndarray) -> np.ndarray:
    """Perlin's smootherstep `x^3 (x (6x - 15) + 10)` for x in [0, 1] (0 -> 0, 0.5 -> 0.5, 1 -> 1, 0.2 -> 0.05792).

    Source: A1111 soft_inpainting.py `smootherstep` (same operation order, so float32 in gives the same float32 out).
    """
    return x * x * x * (x * (6 * x - 15) + 10)


def _check_real(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must lie in {bound}, got {value!r}")


@dataclass(frozen=True)
class SoftInpaintingBlend(_Defaults):
    """A1111's Soft Inpainting: grey masks blend by noise level, then a pixel composite driven by what changed.

    Source: A1111 v1.10.1 built-in extension `extensions-builtin/soft-inpainting/scripts/soft_inpainting.py`
    (`Script.process`, `on_mask_blend`, `post_sample`, `postprocess_maskoverlay`); facts in a1111-semantics §15.
    - Mask: not rounded (`keeps_grey_mask`; A1111 sets `p.mask_round = False`), §15.2.
    - Each blend: `t = nmask ** (sigma[0] ** mask_blend_power * mask_blend_scale)` (`modified_nmask`), then
      `latent_blend(init_latent, current, t, inpaint_detail_preservation)` (§15.3, §15.4).
    - Final: none (A1111 returns the samples unchanged when `is_final_blend`), §15.5.
    - Overlays: per image, a mask from the latent difference `|samples - init_latent|` (`composite_masks`)
      through which the whole original image is pasted back (§15.6).
    Parameters (A1111 names, defaults and UI ranges; validated here only for the maths: lengths >= 0,
    detail > 0, influence in [0, 1]):
    - mask_blend_power "Schedule bias" 1 (0..8): how the preservation follows sigma.
    - mask_blend_scale "Preservation strength" 0.5 (0..8): how strongly grey regions keep the original.
    - inpaint_detail_preservation "Transition contrast boost" 4 (1..32): the length power p of `latent_blend`.
    - composite_mask_influence "Mask influence" 0 (0..1): how much the mask biases the difference threshold.
    - composite_difference_threshold "Difference threshold" 0.5 (0..8): latent distance at 50 % opacity.
    - composite_difference_contrast "Difference contrast" 2 (0..8): sharpness of that transition.
    Infotext: "Soft inpainting enabled": True and the six labels of `SOFT_INPAINTING_LABELS`, as A1111 writes them.
    """
    mask_blend_power: float = 1
    mask_blend_scale: float = 0.5
    inpaint_detail_preservation: float = 4
    composite_mask_influence: float = 0
    composite_difference_threshold: float = 0.5
    composite_difference_contrast: float = 2
    name: str = field(default="soft_inpainting", init=False, repr=False)
    keeps_grey_mask: bool = field(default=True, init=False, repr=False)

    def __post_init__(self):
        inf = math.inf
        _check_real("mask_blend_power", self.mask_blend_power, 0, inf)
        _check_real("mask_blend_scale", self.mask_blend_scale, 0, inf)
        _check_real("inpaint_detail_preservation", self.inpaint_detail_preservation, 0, inf, low_open=True)
        _check_real("composite_mask_influence", self.composite_mask_influence, 0, 1)
        _check_real("composite_difference_threshold", self.composite_difference_threshold, 0, inf)
        _check_real("composite_difference_contrast", self.composite_difference_contrast, 0, inf)

    def modified_nmask(self, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """`nmask ** (sigma[0] ** mask_blend_power * mask_blend_scale)`, nmask's shape (a1111-semantics §15.3).

        A grey cell keeps more of the original at high sigma and less as sigma falls; 0 and 1 stay 0 and 1.
        Example: nmask 0.5, sigma 2, power 1, scale 0.5 -> 0.5 ** 1 = 0.5; sigma 4, power 2 -> 0.5 ** 8 = 1/256.
        Source: soft_inpainting.py `get_modified_nmask`, called with `mba.sigma[0]`.
        """
        return torch.pow(ctx.nmask, (_first_sigma(sigma) ** self.mask_blend_power) * self.mask_blend_scale)

    def blend(self, current: Tensor, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """`latent_blend(init_latent, current, modified_nmask(sigma), inpaint_detail_preservation)`, [B,C,h,w].

        Source: soft_inpainting.py `Script.on_mask_blend` (not the final blend).
        """
        return latent_blend(ctx.init_latent, current, self.modified_nmask(sigma, ctx), self.inpaint_detail_preservation)

    def final(self, samples: Tensor, ctx: BlendContext) -> Tensor:
        """No final blend: a copy of `samples` (A1111 `on_mask_blend` with `is_final_blend`)."""
        return samples.clone()

    def composite_masks(self, samples: Tensor, ctx: BlendContext, width: int, height: int,
                        paste_to: tuple[int, int, int, int] | None,
                        sizes: Sequence[tuple[int, int]]) -> list[Image.Image]:
        """One "L" mask per image (255 = show the generated pixel), from how far each latent cell moved.

        For image i (i < min(B, len(sizes))), a1111-semantics §15.6:
        1. `d = |samples[i] - init_latent[i]|` over C (float32 [h, w]); a soft maximum then a soft median filter
           (`weighted_histogram_filter`, kernel `gaussian_kernel(1.5, 2)`, windows (0.9, 1) and (0.25, 0.75)).
        2. Threshold per cell: `s = 1 - clamp(nmask_ch0, 0, 1) ** (mask_blend_scale / 2)`,
           `s = 0.5 * (1 - influence) + s * influence`, `s = s / (1.00001 - s)` (float32; defaults: 0.99998),
           `half = composite_difference_threshold * s`.
        3. `m = 1 - smootherstep(1 / (1 + (d / half) ** composite_difference_contrast))`, `uint8(255 * m)`
           (truncated; NaN from 0/0 -> 0). Defaults: d = 0 -> 0, d = 1.0 -> 240.
        4. Resize to `width x height` (resize mode 2, Lanczos), Gaussian blur radius 4 (PIL), and with `paste_to`
           uncrop onto a canvas of `sizes[i]` (0 outside the crop).
        `samples` [B,C,h,w]; `sizes[i]` (W, H) of overlay image i. Source: soft_inpainting.py `apply_adaptive_masks`.
        """
        keep_scalar = 1 - torch.clamp(ctx.nmask[:, 0].float(), min=0, max=1) ** (self.mask_blend_scale / 2)
        keep_scalar = (0.5 * (1 - self.composite_mask_influence) + keep_scalar * self.composite_mask_influence)
        keep_scalar = (keep_scalar / (1.00001 - keep_scalar)).cpu().numpy()  # [1 or B, h, w]
        distances = torch.linalg.vector_norm(samples - ctx.init_latent, ord=2, dim=1)  # [B, h, w]
        kernel = gaussian_kernel(stddev_radius=1.5, max_radius=2)

        masks = []
        for i, (distance, size) in enumerate(zip(distances, sizes)):
            m = distance.float().cpu().numpy()
            m = weighted_histogram_filter(m, kernel, 2, percentile_min=0.9, percentile_max=1, min_width=1)
            m = weighted_histogram_filter(m, kernel, 2, percentile_min=0.25, percentile_max=0.75, min_width=1)
            half = self.composite_difference_threshold * keep_scalar[i if keep_scalar.shape[0] > i else 0]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                m = 1 - smootherstep(1 / (1 + (m / half) ** self.composite_difference_contrast))
                m = np.nan_to_num(255.0 * m, nan=0.0).astype(np.uint8)
            mask = Image.fromarray(m)
            mask = images.create_binary_mask(images.resize_image(2, mask, width, height), round=False)
            mask = mask.filter(ImageFilter.GaussianBlur(radius=4))
            if paste_to is not None:
                mask = images.uncrop(mask, size, paste_to).convert("L")
            masks.append(mask)
        return masks

    def overlays(self, overlay_images: list[Image.Image], originals: list[Image.Image], samples: Tensor,
                 ctx: BlendContext, width: int, height: int,
                 paste_to: tuple[int, int, int, int] | None) -> list[Image.Image]:
        """The whole `originals` pasted through `composite_masks` (new list; images past B unchanged); the cut-out
        `overlay_images` are not used. Overlay i = original i with alpha `255 - mask_i` (`images.make_overlay`).
        Raises ValueError for an original with a transparent pixel (a cut-out overlay passed by mistake).
        Source: soft_inpainting.py `apply_adaptive_masks`, `Script.post_sample` (which rebuilds the originals),
        `Script.postprocess_maskoverlay`.
        """
        for i, im in enumerate(originals):
            if im.mode == "RGBA" and im.getextrema()[3][0] != 255:
                raise ValueError(f"originals[{i}] has transparent pixels: soft inpainting pastes the whole original "
                                 "image, not the cut-out default overlay")
        masks = self.composite_masks(samples, ctx, width, height, paste_to, [im.size for im in originals])
        result = list(originals)
        for i, mask in enumerate(masks):
            result[i] = images.make_overlay(originals[i], mask)
        return result

    def infotext(self) -> dict[str, Any]:
        """`{"Soft inpainting enabled": True, <six labels>: values}` in A1111's order (`add_generation_params`)."""
        return {SOFT_INPAINTING_ENABLED_LABEL: True,
                **{label: getattr(self, param) for param, label in SOFT_INPAINTING_LABELS.items()}}


# ---------------------------------------------------------------------------------------------------------------
# differential diffusion (a1111-semantics §16)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DifferentialBlend(_Defaults):
    """Differential diffusion: the grey nmask is a per-cell strength, each cell joins when the noise is low enough.

    Sources: Levin & Fried 2023, "Differential Diffusion: Giving Each Pixel Its Strength" (arXiv 2306.00950);
    ComfyUI `comfy_extras/nodes_differential_diffusion.py` `DifferentialDiffusion.forward`. At each blend
    (a1111-semantics §16.2, §16.3):
        t_from = t(sigmas[0]),  t_to = t(max(sigmas[-1], model sigma_min)),  t_now = t(sigma[0])
        threshold = (t_now - t_to) / (t_from - t_to)                   1 at the first call, 0 at sigma_min
        m = (nmask >= min(threshold, 1)) and (nmask > 0)                regenerate (1) or keep (0), nmask's dtype
        blend = current * m + init_latent * (1 - m)                    an x0 blend like A1111's
    with `t = ctx.sigma_to_t`. Choices (§16.4):
    - model sigma_min: not in the context; `t(max(sigmas[-1], tiny))` is used, which equals
      `t(max(sigmas[-1], sigma_min))` because `sigma_to_t` clamps every sigma below sigma_min to t(sigma_min).
    - `nmask > 0`: ComfyUI's threshold reaches 0 when the last call is at sigma_min (Karras, exponential, ...),
      and `nmask >= 0` then regenerates every cell, kept ones too. Here a cell with strength 0 is never
      regenerated, so a binary mask gives exactly A1111's blend at every step.
    - `min(threshold, 1)`: a call above sigmas[0] (Euler / Heun churn) would otherwise drop strength-1 cells.
    - `t_from <= t_to` (a slice that starts at the model's sigma_min): threshold 0.
    - Final: `samples * r + init_latent * (1 - r)`, `r = (nmask > 0)`: the per-step rule's limit at threshold 0;
      A1111's final blend for a binary mask.
    ComfyUI also puts the noised init into x before the call (`KSamplerX0Inpaint`); this strategy does not, so that
    it reduces to A1111's. Infotext: `"Mask blend": "differential"` (an sdcore key).
    """
    name: str = field(default="differential", init=False, repr=False)
    keeps_grey_mask: bool = field(default=True, init=False, repr=False)

    def threshold(self, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """The strength a cell needs to be regenerated at `sigma` (0-dim float32, at most 1; see the class).

        Example (SD1 schedule): sigmas = t_to_sigma([800, 400, 200]) + [0] -> thresholds 1, 0.5, 0.25.
        """
        sigma_from = ctx.sigmas[0]
        sigma_to = ctx.sigmas[-1].clamp(min=torch.finfo(torch.float32).tiny)
        t = ctx.sigma_to_t(torch.stack([sigma_from, sigma_to, _first_sigma(sigma).to(sigma_from)])).float()
        t_from, t_to, t_now = t[0], t[1], t[2]
        span = t_from - t_to
        ratio = (t_now - t_to) / torch.where(span > 0, span, torch.ones_like(span))
        return torch.where(span > 0, ratio, torch.zeros_like(ratio)).clamp(max=1)

    def regenerate_mask(self, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """`(nmask >= threshold) & (nmask > 0)` as 0/1 in nmask's dtype and shape."""
        m = (ctx.nmask >= self.threshold(sigma, ctx).to(ctx.nmask.device)) & (ctx.nmask > 0)
        return m.to(ctx.nmask.dtype)

    def blend(self, current: Tensor, sigma: Tensor, ctx: BlendContext) -> Tensor:
        """`current * m + init_latent * (1 - m)` with `m = regenerate_mask(sigma)`, [B,C,h,w]."""
        m = self.regenerate_mask(sigma, ctx)
        return current * m + ctx.init_latent * (1 - m)

    def final(self, samples: Tensor, ctx: BlendContext) -> Tensor:
        """`samples * r + init_latent * (1 - r)`, `r = (nmask > 0)`: every cell with strength 0 restored exactly."""
        r = (ctx.nmask > 0).to(ctx.nmask.dtype)
        return samples * r + ctx.init_latent * (1 - r)

    def infotext(self) -> dict[str, Any]:
        """`{"Mask blend": "differential"}`."""
        return {"Mask blend": self.name}


# ---------------------------------------------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------------------------------------------

BLENDS: dict[str, type] = {
    "a1111": A1111Blend,
    "xt": XtBlend,
    "soft_inpainting": SoftInpaintingBlend,
    "differential": DifferentialBlend,
}

MASK_BLEND_KEY = "Mask blend"


def make_blend(name: str, **params: Any) -> MaskBlend:
    """The strategy called `name` ("a1111", "xt", "soft_inpainting", "differential") built with `params`.

    Only soft_inpainting takes parameters (`SoftInpaintingBlend` fields). Raises ValueError naming the argument,
    its value and what is allowed, for an unknown name, an unknown parameter or a parameter out of range.
    """
    if not isinstance(name, str) or name not in BLENDS:
        raise ValueError(f"mask blend name={name!r} is not known; allowed names: {', '.join(BLENDS)}")
    cls = BLENDS[name]
    allowed = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no parameters"
        raise ValueError(f"mask blend {name!r} got unknown parameter(s) {', '.join(unknown)}; it takes {takes}")
    return cls(**params)


def _number(label: str, text: Any) -> int | float:
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"infotext {label!r} must be a number, got {text!r}") from None


def blend_from_infotext(params: Mapping[str, Any]) -> MaskBlend:
    """Rebuild the strategy from parsed infotext keys (`sdcore.infotext.parse_infotext`); A1111Blend when none.

    - "Soft inpainting enabled": "True" -> `SoftInpaintingBlend` with the six labelled values (a missing label
      keeps its default, as A1111's paste keeps the slider).
    - "Mask blend": "xt" / "differential" (sdcore's key) -> that strategy.
    Numbers are read as int when they look like one ("4"), else float, so `infotext()` round-trips.
    Raises ValueError for an unknown "Mask blend", a "Soft inpainting enabled" other than "True"/"False", both
    keys naming different strategies, or a label that is not a number / out of range.
    """
    enabled_text = params.get(SOFT_INPAINTING_ENABLED_LABEL)
    enabled = False
    if enabled_text is not None:
        if str(enabled_text) not in ("True", "False"):
            raise ValueError(f"infotext {SOFT_INPAINTING_ENABLED_LABEL!r} must be 'True' or 'False', "
                             f"got {enabled_text!r}")
        enabled = str(enabled_text) == "True"
    name = params.get(MASK_BLEND_KEY)
    if enabled:
        if name is not None and name != "soft_inpainting":
            raise ValueError(f"infotext has {SOFT_INPAINTING_ENABLED_LABEL!r}: True and {MASK_BLEND_KEY!r}: "
                             f"{name!r}; only one mask blend can apply")
        name = "soft_inpainting"
    name = "a1111" if name is None else str(name)
    if name not in BLENDS:
        raise ValueError(f"infotext {MASK_BLEND_KEY!r}={name!r} is not known; allowed names: {', '.join(BLENDS)}")
    if name != "soft_inpainting":
        return make_blend(name)
    values = {param: _number(label, params[label]) for param, label in SOFT_INPAINTING_LABELS.items()
              if label in params}
    return make_blend(name, **values)


__all__ = ["A1111Blend", "BLENDS", "BlendContext", "DifferentialBlend", "MASK_BLEND_KEY", "MaskBlend",
           "SOFT_INPAINTING_ENABLED_LABEL", "SOFT_INPAINTING_LABELS", "SoftInpaintingBlend", "XtBlend",
           "blend_from_infotext", "gaussian_kernel", "latent_blend", "make_blend", "smootherstep",
           "weighted_histogram_filter"]
