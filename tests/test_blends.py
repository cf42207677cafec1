"""Mask blend strategies (sdcore/sampling/blends.py; a1111-semantics §15 soft inpainting, §16 differential diffusion).

Every hand-derived number has its arithmetic in a comment. References written here from the formulas (not imported
from sdcore) check the vectorised code: a per-pixel weighted histogram filter, A1111's `latent_blend` with its
in-place float64 steps, and the composite-mask chain.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sdcore.infotext import create_infotext, parse_infotext
from sdcore.sampling.blends import (
    BLENDS,
    A1111Blend,
    BlendContext,
    DifferentialBlend,
    MaskBlend,
    SoftInpaintingBlend,
    XtBlend,
    blend_from_infotext,
    gaussian_kernel,
    latent_blend,
    make_blend,
    smootherstep,
    weighted_histogram_filter,
)
from sdcore.sampling.denoisers import DiscreteSchedule, sd_alphas_cumprod
from sdcore.sampling.schedules import get_sigmas_karras

SCHEDULE = DiscreteSchedule(sd_alphas_cumprod())
SIGMA_TO_T = SCHEDULE.sigma_to_t


def make_ctx(nmask: torch.Tensor, *, batch: int = 1, channels: int = 4, sigmas: torch.Tensor | None = None,
             seed: int = 0, init_latent: torch.Tensor | None = None, noise: torch.Tensor | None = None
             ) -> BlendContext:
    """A context over nmask's cells: random init latent and noise, mask = 1 - nmask, a 20-step Karras slice."""
    g = torch.Generator().manual_seed(seed)
    h, w = nmask.shape[-2:]
    if init_latent is None:
        init_latent = torch.randn(batch, channels, h, w, generator=g)
    if noise is None:
        noise = torch.randn(batch, channels, h, w, generator=g)
    if sigmas is None:
        sigmas = get_sigmas_karras(20, float(SCHEDULE.sigma_min), float(SCHEDULE.sigma_max))
    return BlendContext(init_latent=init_latent, mask=1 - nmask, nmask=nmask, noise=noise, sigmas=sigmas,
                        sigma_to_t=SIGMA_TO_T)


def cells(values, channels: int = 4) -> torch.Tensor:
    """nmask [1, C, 1, n] with one value per cell, repeated over the channels as A1111 tiles it."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1).repeat(1, channels, 1, 1)


def binary_nmask(h: int = 6, w: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 1, h, w, generator=g) > 0.5).float().repeat(1, 4, 1, 1)


def grey_nmask(h: int = 6, w: int = 6, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(1, 1, h, w, generator=g)
    m[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    return m.repeat(1, 4, 1, 1)


def opaque_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB").convert("RGBA")


ALL_BLENDS = [A1111Blend(), XtBlend(), SoftInpaintingBlend(), DifferentialBlend(),
              SoftInpaintingBlend(mask_blend_power=0.5, mask_blend_scale=1.25, inpaint_detail_preservation=8,
                                  composite_mask_influence=0.3, composite_difference_threshold=1.5,
                                  composite_difference_contrast=4)]


# ---------------------------------------------------------------------------------------------------------------
# Table, protocol, context
# ---------------------------------------------------------------------------------------------------------------

def test_table_names_and_grey_mask_flags():
    assert list(BLENDS) == ["a1111", "xt", "soft_inpainting", "differential"]
    for name, cls in BLENDS.items():
        blend = make_blend(name)
        assert isinstance(blend, cls) and isinstance(blend, MaskBlend)
        assert blend.name == name
    assert [make_blend(n).keeps_grey_mask for n in BLENDS] == [False, False, True, True]


def test_blends_are_frozen():
    with pytest.raises(Exception):
        SoftInpaintingBlend().mask_blend_power = 2


def test_context_rejects_mismatched_shapes():
    nmask = cells([0.0, 1.0])
    with pytest.raises(ValueError, match="noise"):
        make_ctx(nmask, noise=torch.zeros(1, 4, 1, 3))
    with pytest.raises(ValueError, match="nmask"):
        BlendContext(torch.zeros(1, 4, 1, 2), 1 - nmask, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 1, 2),
                     torch.tensor([1.0, 0.0]), SIGMA_TO_T)
    with pytest.raises(ValueError, match="sigmas"):
        BlendContext(torch.zeros(1, 4, 1, 2), 1 - nmask, nmask, torch.zeros(1, 4, 1, 2), torch.tensor([1.0]),
                     SIGMA_TO_T)


# ---------------------------------------------------------------------------------------------------------------
# a1111
# ---------------------------------------------------------------------------------------------------------------

def test_a1111_hand_values():
    # nmask (0, 1, 0.25): current 8, init 2 -> 8*0 + 2*1 = 2; 8*1 + 2*0 = 8; 8*0.25 + 2*0.75 = 2 + 1.5 = 3.5.
    nmask = cells([0.0, 1.0, 0.25])
    ctx = make_ctx(nmask, init_latent=torch.full((1, 4, 1, 3), 2.0))
    out = A1111Blend().blend(torch.full((1, 4, 1, 3), 8.0), torch.tensor([3.0]), ctx)
    assert out[0, :, 0].T.tolist() == [[2.0] * 4, [8.0] * 4, [3.5] * 4]
    assert torch.equal(A1111Blend().final(torch.full((1, 4, 1, 3), 8.0), ctx), out)


def test_a1111_expression_order_is_bit_exact():
    nmask = grey_nmask()
    ctx = make_ctx(nmask, batch=2)
    current = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    expected = current * ctx.nmask + ctx.init_latent * ctx.mask
    assert torch.equal(A1111Blend().blend(current, torch.tensor([1.0, 1.0]), ctx), expected)
    assert torch.equal(A1111Blend().final(current, ctx), expected)
    x = current + 1
    assert torch.equal(A1111Blend().blend_input(x, torch.tensor([1.0, 1.0]), ctx), x)
    assert A1111Blend().infotext() == {}


# ---------------------------------------------------------------------------------------------------------------
# xt
# ---------------------------------------------------------------------------------------------------------------

def test_xt_hand_values():
    # init 1, noise 0.5, sigma 2: kept cell 1 + 2*0.5 = 2; regenerated cell keeps x = 7;
    # nmask 0.25: 7*0.25 + 2*0.75 = 1.75 + 1.5 = 3.25.
    nmask = cells([0.0, 1.0, 0.25])
    ctx = make_ctx(nmask, init_latent=torch.ones(1, 4, 1, 3), noise=torch.full((1, 4, 1, 3), 0.5))
    out = XtBlend().blend_input(torch.full((1, 4, 1, 3), 7.0), torch.tensor([2.0]), ctx)
    assert out[0, :, 0].T.tolist() == [[2.0] * 4, [7.0] * 4, [3.25] * 4]


def test_xt_kept_cells_are_the_noised_init_exactly():
    nmask = binary_nmask()
    ctx = make_ctx(nmask, batch=2)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(7))
    for sigma in ctx.sigmas[:-1]:
        sigma_b = torch.stack([sigma, sigma * 0.5])  # rows apply their own sigma
        out = XtBlend().blend_input(x, sigma_b, ctx)
        keep = ctx.mask.expand_as(x).bool()
        noised = ctx.init_latent + sigma_b.view(2, 1, 1, 1) * ctx.noise
        assert torch.equal(out[keep], noised[keep])
        assert torch.equal(out[~keep], x[~keep])
    denoised = x * 3
    assert torch.equal(XtBlend().blend(denoised, ctx.sigmas[:1].repeat(2), ctx), denoised)
    assert torch.equal(XtBlend().final(x, ctx), x * ctx.nmask + ctx.init_latent * ctx.mask)
    assert XtBlend().infotext() == {"Mask blend": "xt"}


# ---------------------------------------------------------------------------------------------------------------
# soft inpainting: per-step mask and latent_blend
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nmask, sigma, power, scale, expected", [
    (0.5, 2.0, 1, 0.5, 0.5),          # exponent 2**1 * 0.5 = 1 -> 0.5**1 = 0.5
    (0.5, 4.0, 2, 0.5, 1 / 256),      # exponent 4**2 * 0.5 = 8 -> 0.5**8 = 0.00390625
    (0.25, 1.0, 3, 0.5, 0.5),         # exponent 1**3 * 0.5 = 0.5 -> sqrt(0.25) = 0.5
    (0.25, 0.5, 1, 1.0, 0.5),         # exponent 0.5 * 1 = 0.5 -> 0.5
    (0.0, 3.0, 1, 0.5, 0.0),          # 0 ** 1.5 = 0: fully kept stays kept
    (1.0, 3.0, 1, 0.5, 1.0),          # 1 ** 1.5 = 1: fully regenerated stays regenerated
])
def test_soft_modified_nmask_hand_values(nmask, sigma, power, scale, expected):
    blend = SoftInpaintingBlend(mask_blend_power=power, mask_blend_scale=scale)
    ctx = make_ctx(cells([nmask]))
    out = blend.modified_nmask(torch.tensor([sigma, 99.0]), ctx)  # sigma[0] only, as A1111
    assert out.shape == (1, 4, 1, 1)
    assert out.flatten().tolist() == [pytest.approx(expected, rel=1e-6, abs=0)] * 4


def test_latent_blend_worked_examples():
    a = torch.tensor([3.0, 4.0, 0.0, 0.0]).view(1, 4, 1, 1)   # |a| = 5
    b = torch.tensor([0.0, 0.0, 6.0, 8.0]).view(1, 4, 1, 1)   # |b| = 10
    half = torch.full((1, 4, 1, 1), 0.5)
    v = torch.tensor([1.5, 2.0, 3.0, 4.0])                     # (a + b) / 2, |v| = sqrt(31.25) = 5.59017
    v_len = math.sqrt(31.25)
    # p = 1: length = 0.5*5 + 0.5*10 = 7.5; result = v * 7.5 / (5.59017 + 1e-5)
    out = latent_blend(a, b, half, 1).flatten()
    assert out.tolist() == pytest.approx((v * 7.5 / (v_len + 1e-5)).tolist(), rel=1e-6)
    assert out.norm().item() == pytest.approx(7.5, rel=1e-5)
    # p = 4: length = (0.5*5^4 + 0.5*10^4)^(1/4) = (312.5 + 5000)^(1/4) = 5312.5^(1/4) = 8.537382; the result's
    # length is 8.537382 * 5.59017 / 5.59018 = 8.537367 (longer than the linear 7.5: contrast kept).
    out = latent_blend(a, b, half, 4).flatten()
    assert 5312.5 ** 0.25 == pytest.approx(8.537382, rel=1e-6)
    assert out.tolist() == pytest.approx((v * 5312.5 ** 0.25 / (v_len + 1e-5)).tolist(), rel=1e-6)
    assert out.norm().item() == pytest.approx(8.537367, rel=1e-6)
    # t = 0: v = a, length = |a| = 5, result = a * 5 / (5 + 1e-5) = a * 0.999998: the epsilon shows.
    out = latent_blend(a, b, torch.zeros(1, 4, 1, 1), 4).flatten()
    assert out.tolist() == pytest.approx([3 * 5 / 5.00001, 4 * 5 / 5.00001, 0, 0], rel=1e-6)
    assert out[0].item() != 3.0
    # t = 1: result = b * 10 / (10 + 1e-5)
    out = latent_blend(a, b, torch.ones(1, 4, 1, 1), 4).flatten()
    assert out.tolist() == pytest.approx([0, 0, 6 * 10 / 10.00001, 8 * 10 / 10.00001], rel=1e-6)


def reference_latent_blend(a: torch.Tensor, b: torch.Tensor, t3d: torch.Tensor, p: float) -> torch.Tensor:
    """A1111's latent_blend re-derived: t is A1111's [C,h,w] nmask; in-place float64 steps in A1111's order."""
    t_vec = t3d.unsqueeze(0)                      # [1,C,h,w] weights of the vectors
    t_len = t3d[0].unsqueeze(0).unsqueeze(0)      # [1,1,h,w] weights of the lengths (channel 0)
    mixed = a * (1 - t_vec)
    mixed.add_(b * t_vec)
    out_dtype = mixed.dtype
    current = torch.norm(mixed, p=2, dim=1, keepdim=True).to(torch.float64).add_(0.00001)
    wanted = torch.norm(a, p=2, dim=1, keepdim=True).to(torch.float64).pow_(p) * (1 - t_len)
    wanted.add_(torch.norm(b, p=2, dim=1, keepdim=True).to(torch.float64).pow_(p) * t_len).pow_(1 / p)
    return mixed.mul_(wanted.div_(current).to(out_dtype))


@pytest.mark.parametrize("p", [1, 4, 8.5, 32])
def test_latent_blend_matches_a1111_formulas_bit_for_bit(p):
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 5, 7, generator=g) * 3
    t3d = torch.rand(1, 5, 7, generator=g).repeat(4, 1, 1)
    assert torch.equal(latent_blend(a, b, t3d.unsqueeze(0), p), reference_latent_blend(a, b, t3d, p))


def test_soft_blend_matches_a1111_on_mask_blend_at_every_step():
    nmask = grey_nmask()
    blend = SoftInpaintingBlend(mask_blend_power=1.5, mask_blend_scale=0.75, inpaint_detail_preservation=6)
    ctx = make_ctx(nmask, batch=2)
    g = torch.Generator().manual_seed(3)
    for sigma in ctx.sigmas[:-1]:
        current = torch.randn(2, 4, 6, 6, generator=g)
        t3d = torch.pow(nmask[0], (sigma ** 1.5) * 0.75)   # get_modified_nmask on A1111's [C,h,w] nmask
        expected = reference_latent_blend(ctx.init_latent, current, t3d, 6)
        assert torch.equal(blend.blend(current, sigma.repeat(2), ctx), expected)
    samples = torch.randn(2, 4, 6, 6, generator=g)
    assert torch.equal(blend.final(samples, ctx), samples)  # is_final_blend: no blend
    assert torch.equal(blend.blend_input(samples, ctx.sigmas[:1], ctx), samples)


def test_soft_blend_of_a_binary_mask_is_close_to_but_not_a1111():
    # 0 ** e = 0 and 1 ** e = 1, so t is the binary mask; only the 1e-5 in |v| + 1e-5 separates the two.
    nmask = binary_nmask()
    ctx = make_ctx(nmask)
    current = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    soft = SoftInpaintingBlend().blend(current, torch.tensor([2.0]), ctx)
    a1111 = A1111Blend().blend(current, torch.tensor([2.0]), ctx)
    assert torch.allclose(soft, a1111, rtol=1e-4, atol=1e-5)
    assert not torch.equal(soft, a1111)


# ---------------------------------------------------------------------------------------------------------------
# soft inpainting: kernel, weighted histogram filter, composite masks
# ---------------------------------------------------------------------------------------------------------------

def test_gaussian_kernel_values():
    # g(s) = exp(-s / 1.5^2), zero = g(3^2) = exp(-4) = 0.0183156, k = (g - zero) / (1 - zero):
    # (0,1): (exp(-1/2.25) = 0.641180 - 0.018316) / 0.981684 = 0.634486
    # (1,1): (exp(-2/2.25) = 0.411112 - 0.018316) / 0.981684 = 0.400125
    # (2,2): (exp(-8/2.25) = 0.028566 - 0.018316) / 0.981684 = 0.010441
    k = gaussian_kernel(1.5, 2)
    assert k.shape == (5, 5) and k.dtype == np.float64
    assert k[2, 2] == 1.0
    assert k[2, 3] == pytest.approx(0.634486, abs=1e-6)
    assert k[1, 1] == pytest.approx(0.400125, abs=1e-6)
    assert k[0, 0] == pytest.approx(0.010441, abs=1e-6)
    assert np.array_equal(k, k.T) and np.array_equal(k, k[::-1])
    # radius 1, stddev 1: zero = exp(-4); the corners d^2 = 2 give (exp(-2) - exp(-4)) / (1 - exp(-4)) = 0.119203
    assert gaussian_kernel(1.0, 1)[0, 0] == pytest.approx((math.exp(-2) - math.exp(-4)) / (1 - math.exp(-4)))


def test_weighted_histogram_filter_hand_example():
    # [[0, 10, 20]], kernel (1.5, 2), window (0.25, 0.75), min width 1. Row 0 only; weights 1, 0.634486, 0.153509
    # for offsets 0, 1, 2 (columns).
    # Pixel 0: stack 0 [0, 1], 10 [1, 1.634486], 20 [1.634486, 1.787995]; S = 1.787995 -> window
    #   [0.446999, 1.340996] is 0.893997 < 1 wide -> widened around 0.893997 to [0.393997, 1.393997];
    #   overlaps 0: 0.606003, 10: 0.393997 -> (0 + 3.93997) / 1 = 3.93997.
    # Pixel 1: weights 0.634486, 1, 0.634486; S = 2.268971 -> window [0.567243, 1.701728] (1.134486 wide);
    #   overlaps 0.067243, 1, 0.067243 -> (10 + 20 * 0.067243) / 1.134486 = 10.
    # Pixel 2 mirrors pixel 0: 20 - 3.93997 = 16.06003.
    out = weighted_histogram_filter(np.array([[0, 10, 20]], np.float32), gaussian_kernel(1.5, 2), 2, 0.25, 0.75, 1)
    assert out.dtype == np.float32
    assert out[0].tolist() == pytest.approx([3.93997, 10.0, 16.06003], abs=2e-5)
    # A 1x1 image is its own value; a constant image stays constant.
    assert weighted_histogram_filter(np.array([[2.5]], np.float32), gaussian_kernel(1.5, 2), 2, 0.9, 1)[0, 0] == 2.5
    flat = np.full((4, 5), 0.75, np.float32)
    assert np.allclose(weighted_histogram_filter(flat, gaussian_kernel(1.5, 2), 2, 0.25, 0.75), 0.75, atol=1e-7)


def per_pixel_histogram_filter(img, kernel, center, pmin, pmax, min_width):
    """The weighted histogram filter one pixel at a time, written from its definition (reference for the test)."""
    out = img.copy()
    height, width = img.shape
    kh, kw = kernel.shape
    for y in range(height):
        for x in range(width):
            items = []
            for yy in range(max(0, y - center), min(height, y - center + kh)):
                for xx in range(max(0, x - center), min(width, x - center + kw)):
                    items.append((img[yy, xx], kernel[yy - y + center, xx - x + center]))
            items.sort(key=lambda item: item[0])  # stable: ties keep the row-major order
            spans, total = [], 0
            for value, weight in items:
                spans.append((value, total, total + weight))
                total += weight
            lo, hi = total * pmin, total * pmax
            if hi - lo < min_width:
                mid = (lo + hi) / 2
                lo, hi = mid - min_width / 2, mid + min_width / 2
                if hi > total:
                    lo, hi = total - min_width, total
                if lo < 0:
                    lo, hi = 0, min_width
            acc = acc_w = 0
            for value, bottom, top in spans:
                if lo >= top or hi <= bottom:
                    continue
                overlap = min(hi, top) - max(lo, bottom)
                acc += value * overlap
                acc_w += overlap
            out[y, x] = acc / acc_w if acc_w != 0 else 0
    return out


@pytest.mark.parametrize("pmin, pmax", [(0.9, 1), (0.25, 0.75), (0.0, 1.0), (0.5, 0.5), (0.0, 0.05)])
@pytest.mark.parametrize("kind", ["random", "ties", "tiny", "random kernel"])
def test_weighted_histogram_filter_equals_per_pixel_reference(pmin, pmax, kind):
    rng = np.random.default_rng([round(pmin * 100), round(pmax * 100), len(kind)])
    kernel = gaussian_kernel(1.5, 2)
    if kind == "random":
        img = rng.random((7, 9)).astype(np.float32) * 3
    elif kind == "ties":
        img = rng.integers(0, 3, (6, 6)).astype(np.float32)
    elif kind == "tiny":
        img = rng.random((2, 3)).astype(np.float32)
    else:
        img = rng.random((6, 5)).astype(np.float32)
        kernel = rng.random((5, 5)) * 3
    fast = weighted_histogram_filter(img, kernel, 2, pmin, pmax, 1)
    slow = per_pixel_histogram_filter(img, kernel, 2, pmin, pmax, 1)
    assert fast.dtype == slow.dtype == np.float32
    assert np.array_equal(fast, slow)


def test_smootherstep_values():
    # x^3 (x (6x - 15) + 10): 0.2 -> 0.008 * (0.2 * (1.2 - 15) + 10) = 0.008 * 7.24 = 0.05792
    x = np.array([0.0, 0.2, 0.5, 1.0], np.float32)
    assert smootherstep(x).tolist() == pytest.approx([0.0, 0.05792, 0.5, 1.0], abs=1e-6)
    assert smootherstep(x).dtype == np.float32


def uniform_distance_ctx(distance: float, h: int = 4, w: int = 4):
    """init 0 and samples whose channel 0 is `distance`: every cell moved by exactly `distance`."""
    nmask = torch.ones(1, 4, h, w)
    ctx = make_ctx(nmask, init_latent=torch.zeros(1, 4, h, w))
    samples = torch.zeros(1, 4, h, w)
    samples[:, 0] = distance
    return ctx, samples


@pytest.mark.parametrize("distance, expected", [
    # Defaults: s = 1 - 1 ** 0.25 = 0 -> 0.5 * (1 - 0) + 0 * 0 = 0.5 -> 0.5 / (1.00001 - 0.5) = 0.99998;
    # half = 0.5 * 0.99998 = 0.49999; m = 1 - smootherstep(1 / (1 + (d / 0.49999) ** 2)), uint8(255 * m):
    (0.0, 0),     # 1 / (1 + 0) = 1 -> smootherstep 1 -> m = 0
    (0.25, 14),   # (0.25 / 0.49999)^2 = 0.25001 -> 0.799994 -> smootherstep 0.512 * 1.84 = 0.94208 -> 255 * 0.05792
                  # = 14.77 -> 14
    (1.0, 240),   # (1 / 0.49999)^2 = 4.00016 -> 0.199994 -> smootherstep 0.008 * 7.24 = 0.05792 -> 255 * 0.94208
                  # = 240.23 -> 240
])
def test_composite_mask_of_uniform_distance(distance, expected):
    # A constant distance map stays constant through both filters, the resize and the blur.
    ctx, samples = uniform_distance_ctx(distance)
    (mask,) = SoftInpaintingBlend().composite_masks(samples, ctx, 32, 32, None, [(32, 32)])
    assert mask.mode == "L" and mask.size == (32, 32)
    values = np.asarray(mask)
    assert values.min() == values.max() == expected


def reference_composite_mask(blend: SoftInpaintingBlend, nmask: torch.Tensor, init: torch.Tensor,
                             samples: torch.Tensor, index: int, width: int, height: int,
                             paste_to=None, dest_size=None) -> Image.Image:
    """apply_adaptive_masks re-derived for one image, with PIL directly for the resizes (same aspect ratio)."""
    scalar = 1 - torch.clamp(nmask[0, 0].float(), 0, 1) ** (blend.mask_blend_scale / 2)  # A1111's nmask[0]
    scalar = 0.5 * (1 - blend.composite_mask_influence) + scalar * blend.composite_mask_influence
    scalar = (scalar / (1.00001 - scalar)).numpy()
    d = torch.norm(samples - init, p=2, dim=1)[index].float().numpy()
    kernel = gaussian_kernel(1.5, 2)
    d = per_pixel_histogram_filter(d, kernel, 2, 0.9, 1, 1)
    d = per_pixel_histogram_filter(d, kernel, 2, 0.25, 0.75, 1)
    d = d / (blend.composite_difference_threshold * scalar)
    d = 1 - smootherstep(1 / (1 + d ** blend.composite_difference_contrast))
    mask = Image.fromarray((255.0 * d).astype(np.uint8))
    mask = mask.resize((width, height), Image.Resampling.LANCZOS).filter(ImageFilter.GaussianBlur(radius=4))
    if paste_to is not None:
        x, y, w, h = paste_to
        canvas = Image.new("L", dest_size)
        canvas.paste(mask.resize((w, h), Image.Resampling.LANCZOS), (x, y))
        mask = canvas
    return mask


@pytest.mark.parametrize("params", [{}, {"composite_mask_influence": 0.6, "mask_blend_scale": 1.5,
                                         "composite_difference_threshold": 0.8, "composite_difference_contrast": 3}])
def test_composite_masks_equal_a_rederivation(params):
    blend = SoftInpaintingBlend(**params)
    g = torch.Generator().manual_seed(21)
    nmask = torch.rand(1, 1, 5, 6, generator=g).repeat(1, 4, 1, 1)
    ctx = make_ctx(nmask, batch=2)
    samples = ctx.init_latent + torch.randn(2, 4, 5, 6, generator=g) * torch.linspace(0, 1.5, 6)
    masks = blend.composite_masks(samples, ctx, 48, 40, None, [(48, 40), (48, 40)])
    for i in range(2):
        expected = reference_composite_mask(blend, nmask, ctx.init_latent, samples, i, 48, 40)
        assert np.array_equal(np.asarray(masks[i]), np.asarray(expected))
    assert not np.array_equal(np.asarray(masks[0]), np.asarray(masks[1]))


def test_composite_masks_uncrop_with_paste_to():
    blend = SoftInpaintingBlend()
    g = torch.Generator().manual_seed(22)
    nmask = torch.rand(1, 1, 4, 4, generator=g).repeat(1, 4, 1, 1)
    ctx = make_ctx(nmask)
    samples = ctx.init_latent + torch.randn(1, 4, 4, 4, generator=g)
    paste_to = (10, 6, 64, 64)  # a 64x64 crop at (10, 6) of a 100x80 image, processed at 32x32
    (mask,) = blend.composite_masks(samples, ctx, 32, 32, paste_to, [(100, 80)])
    expected = reference_composite_mask(blend, nmask, ctx.init_latent, samples, 0, 32, 32, paste_to, (100, 80))
    assert mask.size == (100, 80)
    assert np.array_equal(np.asarray(mask), np.asarray(expected))
    assert np.asarray(mask)[:6].max() == 0 and np.asarray(mask)[:, :10].max() == 0  # outside the crop: original


def test_soft_overlays_paste_the_whole_image_through_the_composite_mask():
    blend = SoftInpaintingBlend()
    h, w = 4, 16
    nmask = torch.ones(1, 4, h, w)
    ctx = make_ctx(nmask, init_latent=torch.zeros(1, 4, h, w))
    samples = torch.zeros(1, 4, h, w)
    samples[:, 0, :, 8:] = 5.0  # right half moved far, left half unchanged
    sources = [opaque_image(128, 32, 0), opaque_image(128, 32, 1)]
    out = blend.overlays([], sources, samples, ctx, 128, 32, None)
    assert len(out) == 2 and out is not sources
    assert out[1] is sources[1]  # only B = 1 latent: the second overlay is left as it was (A1111's zip)
    alpha = np.asarray(out[0].getchannel("A"))
    (mask,) = blend.composite_masks(samples, ctx, 128, 32, None, [(128, 32)])
    assert np.array_equal(alpha, 255 - np.asarray(mask))
    # Far left: original (alpha 255). Far right: generated; d = 5 -> (5 / 0.49999)^2 = 100.004 -> 1/101.004 =
    # 0.0099 -> smootherstep 9.6e-6 -> 255 * 0.99999 = 254.997 -> mask 254, alpha 1 (truncation).
    assert alpha[:, 0].min() == 255 and alpha[:, -1].max() == 1
    assert np.array_equal(np.asarray(out[0])[:, 0, :3], np.asarray(sources[0])[:, 0, :3])


def test_soft_overlays_reject_cut_out_overlays():
    cut = opaque_image(32, 32, 0)
    cut.putpixel((3, 3), (1, 2, 3, 0))
    ctx, samples = uniform_distance_ctx(1.0)
    with pytest.raises(ValueError, match="transparent"):
        SoftInpaintingBlend().overlays([], [cut], samples, ctx, 32, 32, None)


def test_soft_infotext_keys_are_a1111s():
    assert SoftInpaintingBlend().infotext() == {
        "Soft inpainting enabled": True,
        "Soft inpainting schedule bias": 1,
        "Soft inpainting preservation strength": 0.5,
        "Soft inpainting transition contrast boost": 4,
        "Soft inpainting mask influence": 0,
        "Soft inpainting difference threshold": 0.5,
        "Soft inpainting difference contrast": 2,
    }
    assert list(SoftInpaintingBlend().infotext())[0] == "Soft inpainting enabled"


# ---------------------------------------------------------------------------------------------------------------
# differential diffusion
# ---------------------------------------------------------------------------------------------------------------

def test_differential_thresholds_hand_values():
    # sigmas at t = 800, 400, 200, then 0: t_from = 800, t_to = t(max(0, sigma_min)) = 0.
    # threshold(t) = (t - 0) / (800 - 0): 1, 0.5, 0.25. Strengths (0, 0.3, 0.6, 1):
    # t 800 -> only 1 >= 1; t 400 -> 0.6, 1 >= 0.5; t 200 -> 0.3, 0.6, 1 >= 0.25; 0 never.
    sig = SCHEDULE.t_to_sigma(torch.tensor([800.0, 400.0, 200.0]))
    sigmas = torch.cat([sig, torch.zeros(1)])
    ctx = make_ctx(cells([0.0, 0.3, 0.6, 1.0]), sigmas=sigmas)
    blend = DifferentialBlend()
    expected = [(1.0, [0, 0, 0, 1]), (0.5, [0, 0, 1, 1]), (0.25, [0, 1, 1, 1])]
    for sigma, (threshold, regenerate) in zip(sig, expected):
        assert blend.threshold(sigma.view(1), ctx).item() == pytest.approx(threshold, abs=1e-4)
        assert blend.regenerate_mask(sigma.view(1), ctx)[0, 0, 0].tolist() == regenerate
    # The x0 blend with current 8 and init 2: regenerated cells 8, kept 2 (t = 400).
    ctx = make_ctx(cells([0.0, 0.3, 0.6, 1.0]), sigmas=sigmas, init_latent=torch.full((1, 4, 1, 4), 2.0))
    out = blend.blend(torch.full((1, 4, 1, 4), 8.0), sig[1].view(1), ctx)
    assert out[0, 0, 0].tolist() == [2.0, 2.0, 8.0, 8.0]
    # Grey final: every cell with strength > 0 keeps the sample, strength 0 gets the init back.
    assert blend.final(torch.full((1, 4, 1, 4), 8.0), ctx)[0, 0, 0].tolist() == [2.0, 8.0, 8.0, 8.0]


def test_differential_slice_ending_above_sigma_min():
    # No trailing 0: t_to = t(sigmas[-1]) = 200, so at t = 400 the threshold is (400 - 200) / (800 - 200) = 1/3.
    sig = SCHEDULE.t_to_sigma(torch.tensor([800.0, 400.0, 200.0]))
    ctx = make_ctx(cells([0.3, 0.34]), sigmas=sig)
    blend = DifferentialBlend()
    assert blend.threshold(sig[1].view(1), ctx).item() == pytest.approx(1 / 3, abs=1e-4)
    assert blend.regenerate_mask(sig[1].view(1), ctx)[0, 0, 0].tolist() == [0, 1]


@pytest.mark.parametrize("start", [0, 5])
def test_differential_with_binary_mask_equals_a1111_at_every_step(start):
    sigmas = get_sigmas_karras(20, float(SCHEDULE.sigma_min), float(SCHEDULE.sigma_max))[start:]
    nmask = binary_nmask()
    ctx = make_ctx(nmask, batch=2, sigmas=sigmas)
    g = torch.Generator().manual_seed(9)
    diff, a1111 = DifferentialBlend(), A1111Blend()
    for sigma in sigmas[:-1]:
        current = torch.randn(2, 4, 6, 6, generator=g)
        sigma_b = sigma.repeat(2)
        assert torch.equal(diff.blend(current, sigma_b, ctx), a1111.blend(current, sigma_b, ctx))
        assert torch.equal(diff.blend_input(current, sigma_b, ctx), a1111.blend_input(current, sigma_b, ctx))
    samples = torch.randn(2, 4, 6, 6, generator=g)
    assert torch.equal(diff.final(samples, ctx), a1111.final(samples, ctx))
    # The last call is at the model's sigma_min: ComfyUI's threshold is 0 there and `nmask >= 0` would regenerate
    # the kept cells too; the `nmask > 0` guard keeps the reduction exact.
    last = sigmas[-2].view(1)
    assert diff.threshold(last, ctx).item() == 0.0
    assert bool((nmask >= diff.threshold(last, ctx)).all())
    assert torch.equal(diff.regenerate_mask(last, ctx), nmask)


def test_differential_edge_cases():
    blend = DifferentialBlend()
    sig = SCHEDULE.t_to_sigma(torch.tensor([600.0, 300.0]))
    ctx = make_ctx(cells([0.0, 0.5, 1.0]), sigmas=torch.cat([sig, torch.zeros(1)]))
    # Euler churn evaluates above sigmas[0]: raw threshold t(9.0) / 600 > 1; capped at 1, strength 1 regenerates.
    assert (SIGMA_TO_T(torch.tensor(9.0)) / 600).item() > 1
    assert blend.threshold(torch.tensor([9.0]), ctx).item() == 1.0
    assert blend.regenerate_mask(torch.tensor([9.0]), ctx)[0, 0, 0].tolist() == [0, 0, 1]
    # A slice that starts at sigma_min: t_from = t_to = 0 -> threshold 0 (no 0/0).
    ctx = make_ctx(cells([0.0, 0.5, 1.0]), sigmas=torch.stack([SCHEDULE.sigma_min, torch.tensor(0.0)]))
    assert blend.threshold(SCHEDULE.sigma_min.view(1), ctx).item() == 0.0
    assert blend.regenerate_mask(SCHEDULE.sigma_min.view(1), ctx)[0, 0, 0].tolist() == [0, 1, 1]


# ---------------------------------------------------------------------------------------------------------------
# No mutation, errors, infotext
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blend", ALL_BLENDS, ids=lambda b: b.name)
def test_inputs_are_never_mutated(blend):
    nmask = grey_nmask(4, 4)
    ctx = make_ctx(nmask, batch=2)
    g = torch.Generator().manual_seed(13)
    x, current, samples = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    sigma = torch.tensor([2.0, 2.0])
    before = {name: getattr(ctx, name).clone() for name in ("init_latent", "mask", "nmask", "noise", "sigmas")}
    tensors = {"x": x.clone(), "current": current.clone(), "samples": samples.clone(), "sigma": sigma.clone()}
    sources = [opaque_image(32, 32, 3), opaque_image(32, 32, 4)]
    pixels = [im.tobytes() for im in sources]
    listed = list(sources)

    outs = [blend.blend_input(x, sigma, ctx), blend.blend(current, sigma, ctx), blend.final(samples, ctx)]
    overlays = blend.overlays(list(sources), sources, samples, ctx, 32, 32, None)
    for out in outs:
        out.add_(1.0)  # a result must not alias an argument
    for name, value in before.items():
        assert torch.equal(getattr(ctx, name), value), name
    for name, value in {"x": x, "current": current, "samples": samples, "sigma": sigma}.items():
        assert torch.equal(value, tensors[name]), name
    assert overlays is not sources and sources == listed
    assert [im.tobytes() for im in sources] == pixels


def test_make_blend_errors():
    with pytest.raises(ValueError, match=r"name='soft'.*a1111, xt, soft_inpainting, differential"):
        make_blend("soft")
    with pytest.raises(ValueError, match=r"'xt'.*mask_blend_power.*no parameters"):
        make_blend("xt", mask_blend_power=1)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) power.*mask_blend_power"):
        make_blend("soft_inpainting", power=1)
    with pytest.raises(ValueError, match=r"inpaint_detail_preservation must lie in \(0"):
        make_blend("soft_inpainting", inpaint_detail_preservation=0)
    with pytest.raises(ValueError, match="composite_mask_influence"):
        make_blend("soft_inpainting", composite_mask_influence=1.5)
    with pytest.raises(ValueError, match="mask_blend_scale must be a finite real number"):
        make_blend("soft_inpainting", mask_blend_scale=True)
    with pytest.raises(ValueError, match="mask_blend_power"):
        make_blend("soft_inpainting", mask_blend_power=float("nan"))
    assert make_blend("soft_inpainting", mask_blend_scale=2) == SoftInpaintingBlend(mask_blend_scale=2)


@pytest.mark.parametrize("blend", ALL_BLENDS, ids=lambda b: b.name)
def test_infotext_round_trip(blend):
    text = create_infotext("a cat", steps=20, sampler="Euler", cfg_scale=7, seed=1, width=64, height=64,
                           denoising_strength=0.75, extra=blend.infotext())
    restored = blend_from_infotext(parse_infotext(text))
    assert type(restored) is type(blend) and restored == blend
    assert restored.infotext() == blend.infotext()


def test_infotext_text_and_parsing():
    text = create_infotext("p", steps=20, sampler="Euler", cfg_scale=7, seed=1, width=64, height=64,
                           extra=SoftInpaintingBlend(mask_blend_power=0.5).infotext())
    assert ("Soft inpainting enabled: True, Soft inpainting schedule bias: 0.5, Soft inpainting preservation "
            "strength: 0.5, Soft inpainting transition contrast boost: 4, Soft inpainting mask influence: 0, "
            "Soft inpainting difference threshold: 0.5, Soft inpainting difference contrast: 2") in text
    assert "Mask blend: differential" in create_infotext("p", steps=1, sampler="Euler", cfg_scale=7, seed=1,
                                                         width=8, height=8, extra=DifferentialBlend().infotext())
    assert blend_from_infotext({}) == A1111Blend()
    assert blend_from_infotext({"Steps": "20"}) == A1111Blend()
    assert blend_from_infotext({"Soft inpainting enabled": "False"}) == A1111Blend()
    # A missing label keeps A1111's default.
    assert blend_from_infotext({"Soft inpainting enabled": "True", "Soft inpainting difference contrast": "3.5"}) \
        == SoftInpaintingBlend(composite_difference_contrast=3.5)
    with pytest.raises(ValueError, match="'Mask blend'='blur'"):
        blend_from_infotext({"Mask blend": "blur"})
    with pytest.raises(ValueError, match="only one mask blend"):
        blend_from_infotext({"Soft inpainting enabled": "True", "Mask blend": "xt"})
    with pytest.raises(ValueError, match="'True' or 'False'"):
        blend_from_infotext({"Soft inpainting enabled": "yes"})
    with pytest.raises(ValueError, match="schedule bias.*number"):
        blend_from_infotext({"Soft inpainting enabled": "True", "Soft inpainting schedule bias": "high"})
