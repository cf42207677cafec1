"""Tiled VAE encode and decode: images larger than the VAE's activations allow, equal to the untiled VAE.

The problem. A 2048 x 2048 decode with SD's VAE holds activations of 128-256 channels at full resolution: one
such tensor is 2-4 GiB in float32, and the untiled decoder keeps several alive. Cutting the image into tiles and
running the VAE on each alone bounds the memory, but every GroupNorm then normalises with the mean and variance of
its own tile instead of the whole image's, so tiles differ in brightness and contrast and the seams show (the
"naive" method below; diffusers' `AutoencoderKL.enable_vae_tiling` does that and hides the steps by blending
overlapping tiles linearly: `AutoencoderKL.tiled_decode` / `_tiled_encode` / `blend_v` / `blend_h` in diffusers'
models/autoencoders/autoencoder_kl.py, tiles of `sample_size` pixels overlapping by `tile_overlap_factor` 0.25).

What sdcore does (`stats="global"`, the default) follows the non-fast mode of the multidiffusion "Tiled VAE"
extension (pkuliyi2015/multidiffusion-upscaler-for-automatic1111, scripts/tilevae.py, `VAEHook.vae_tile_forward`,
`GroupNormParam`): the encoder and decoder are run as a sequence of operations per tile that stops at every
GroupNorm, the statistics of all tiles are combined into the whole image's, and every tile resumes normalised by
those. Three things differ, each to make the result the untiled VAE's, not an approximation of it:

1. Statistics are exact. Each tile adds the sum and the sum of squares of its own cells (no overlap, each cell
   counted once) per sample and group, in float64; mean and variance come from the totals. The extension
   averages the per-tile variances weighted by area, which leaves out the spread of the tile means (the
   between-tile term of the law of total variance) and counts the padding twice.
2. The state between two GroupNorms is one full-size tensor, not a padded copy per tile. A tile reads from it its
   own cells plus a halo of one cell per 3x3 convolution that follows (the receptive field of that stretch of
   the network, not of the whole network), so every cell a tile writes is the untiled value and tiles never
   overlap: there is nothing to blend and no seam to hide. Two full-size tensors at most are alive at once: a
   ResnetBlock that keeps its channel count stores its first convolution's output and writes its result into its
   input in place; an upsampling is fused into the ResnetBlock that follows it, so that the 4x larger upsampled
   tensor is never stored, and that block (and any block that changes the channel count) computes its first
   convolution twice, once to measure the statistics of its output and once to go on, instead of storing it.
3. The latent-resolution stage (the decoder's post_quant_conv, conv_in, middle block with its self-attention and
   lowest level; the encoder's lowest level, middle block, norm_out and conv_out) runs untiled: its activations
   are 1/16 of the full-resolution ones or less, and the attention needs every cell (the extension runs it per
   tile, an approximation). `AttnBlock` gives torch's flash kernel contiguous q/k/v, so it needs O(cells)
   memory.

So `tiled_decode(vae, z)` equals `vae.decode(z)` up to float rounding (measured on SD1.5's full-size VAE with random
weights at 512 px: see docs/vae_tiling.md and scripts/bench_vae_tiling.py), at any tile size, and its peak memory
is about two 128-channel full-resolution activations (`sdcore.resources.vae_tiled_bytes`: SD's VAE decoding 2048 px
is estimated at 5.5 GiB against 24 GiB untiled, and measured at 4.5 GiB, 5.3 GiB peak RSS for the whole process).
The price is time: the convolutions computed twice or three times make it about 1.7x the untiled VAE's.

`stats="tile"` is the naive method with diffusers' remedy, kept to show what the global statistics fix
(tests/test_vae_tiling.py): tiles overlapping by `overlap` pixels, each encoded or decoded alone by the VAE, blended
with linear (feathered) weights across the overlaps.

Glossary: B batch, C channels, H x W pixels, h x w latent cells (H = h * f, f = `vae.downscale`, 8 for SD); a
`Box` is (top, left, bottom, right), half-open, in the cells of the level it is used at; G = 32 GroupNorm groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..resources import VAE_TILE_SIZE
from .vae import AutoencoderKL, DiagonalGaussianDistribution, ResnetBlock

Tensor = torch.Tensor
Box = tuple[int, int, int, int]  # (top, left, bottom, right), half-open

STATS = ("global", "tile")
MIN_TILE_CELLS = 4  # latent cells per tile edge (32 px for SD): smaller tiles spend most of their work on halos


# -- the tile grid ----------------------------------------------------------------------------------------------------

def check_tile_size(tile_size: int, downscale: int, name: str = "tile_size") -> int:
    """`tile_size` (pixels) as latent cells per tile edge; ValueError naming `name` unless it is an int multiple of
    `downscale` of at least MIN_TILE_CELLS cells."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size % downscale \
            or tile_size < MIN_TILE_CELLS * downscale:
        raise ValueError(f"{name}: {tile_size!r}; must be an integer number of pixels, a multiple of {downscale} "
                         f"(the VAE's downscale) and at least {MIN_TILE_CELLS * downscale}")
    return tile_size // downscale


def split(length: int, tile: int) -> list[tuple[int, int]]:
    """Cut [0, length) into ceil(length / tile) consecutive pieces whose sizes differ by at most one (the first
    ones longer): split(10, 4) -> [(0, 4), (4, 7), (7, 10)]. A size that `tile` does not divide gives no sliver."""
    n = max(1, math.ceil(length / tile))
    edges = [length * i // n for i in range(n + 1)]
    sizes = sorted((edges[i + 1] - edges[i] for i in range(n)), reverse=True)
    starts = [sum(sizes[:i]) for i in range(n + 1)]
    return [(starts[i], starts[i + 1]) for i in range(n)]


def tile_grid(h: int, w: int, tile: int) -> list[Box]:
    """Boxes (top, left, bottom, right) covering an h x w grid once, row by row, edges <= `tile` cells."""
    return [(t, l, b, r) for t, b in split(h, tile) for l, r in split(w, tile)]


def scale_boxes(boxes: list[Box], factor: int) -> list[Box]:
    """The same boxes on a grid `factor` times finer (a higher-resolution level)."""
    return [tuple(v * factor for v in box) for box in boxes]


def _grow(box: Box, halo: int, h: int, w: int) -> Box:
    t, l, b, r = box
    return max(0, t - halo), max(0, l - halo), min(h, b + halo), min(w, r + halo)


def _crop(x: Tensor, inner: Box, outer: Box) -> Tensor:
    """The part of `x` (covering `outer`) that covers `inner`."""
    t, l = inner[0] - outer[0], inner[1] - outer[1]
    return x[..., t:t + inner[2] - inner[0], l:l + inner[3] - inner[1]]


# -- sources: where a block's input comes from ------------------------------------------------------------------------

@dataclass
class Stored:
    """A full activation [B, C, H, W] kept in memory; `region(box, halo)` is the box grown by `halo` cells (clipped
    to the image) and that grown box."""

    x: Tensor

    @property
    def size(self) -> tuple[int, int]:
        return self.x.shape[-2], self.x.shape[-1]

    def region(self, box: Box, halo: int) -> tuple[Tensor, Box]:
        g = _grow(box, halo, *self.size)
        return self.x[..., g[0]:g[2], g[1]:g[3]], g


@dataclass
class Upsampled:
    """`upsample(x)` (nearest 2x, then a 3x3 conv: LDM `Upsample`) never stored: each region is computed from the
    half-resolution `x` [B, C, H/2, W/2] on demand."""

    x: Tensor
    upsample: torch.nn.Module

    @property
    def size(self) -> tuple[int, int]:
        return 2 * self.x.shape[-2], 2 * self.x.shape[-1]

    def region(self, box: Box, halo: int) -> tuple[Tensor, Box]:
        g = _grow(box, halo, *self.size)
        h, w = self.x.shape[-2:]
        # the conv at fine row p reads fine rows p-1..p+1 = coarse rows (p-1)//2 .. (p+1)//2
        low = (max(0, (g[0] - 1) // 2), max(0, (g[1] - 1) // 2), min(h, g[2] // 2 + 1), min(w, g[3] // 2 + 1))
        fine = F.interpolate(self.x[..., low[0]:low[2], low[1]:low[3]], scale_factor=2.0, mode="nearest")
        out = self.upsample.conv(fine)
        return _crop(out, g, scale_boxes([low], 2)[0]), g


# -- GroupNorm with statistics of the whole image ---------------------------------------------------------------------

class GroupStats:
    """Running sums of one GroupNorm's input over tiles: per sample and group, the count, sum and sum of squares
    (float64). `add(core)` takes a tile's own cells [B, C, h, w]; `mean_var()` -> mean, var [B, G] float64 (the
    biased variance E[x^2] - E[x]^2, as GroupNorm uses)."""

    def __init__(self, groups: int):
        self.groups, self.count, self.sum, self.sumsq = groups, 0, 0.0, 0.0

    def add(self, core: Tensor) -> None:
        x = core.reshape(core.shape[0], self.groups, -1).double()
        self.count += x.shape[-1]
        self.sum = self.sum + x.sum(-1)
        self.sumsq = self.sumsq + (x * x).sum(-1)

    def mean_var(self) -> tuple[Tensor, Tensor]:
        mean = self.sum / self.count
        return mean, (self.sumsq / self.count - mean * mean).clamp_min(0.0)


def norm_silu(norm: torch.nn.GroupNorm, x: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
    """silu(GroupNorm(x)) with given statistics (mean, var [B, G] float64), or the tile's own when `stats` is None.
    x: [B, C, h, w] -> same shape and dtype; computed in float32 (LDM `Normalize` then `nonlinearity`)."""
    if stats is None:
        return F.silu(norm(x))
    mean, var = stats
    per_group = x.shape[1] // norm.num_groups
    # (x - mean) * rstd * weight + bias = x * a + (bias - mean * a) with a = rstd * weight: one output tensor
    a = (torch.rsqrt(var + norm.eps).repeat_interleave(per_group, dim=1) * norm.weight.double())  # [B, C]
    shift = norm.bias.double() - mean.repeat_interleave(per_group, dim=1) * a
    y = torch.addcmul(shift.float()[..., None, None], x.float(), a.float()[..., None, None])
    return F.silu(y, inplace=True).to(x.dtype)


def _stats_of(source, boxes: list[Box], groups: int) -> tuple[Tensor, Tensor]:
    stats = GroupStats(groups)
    for box in boxes:
        stats.add(source.region(box, 0)[0])
    return stats.mean_var()


# -- the tiled pieces -------------------------------------------------------------------------------------------------

def resnet_block(block: ResnetBlock, source, boxes: list[Box]) -> Tensor:
    """`block(x)` for x = `source` (Stored or Upsampled), tile by tile with whole-image GroupNorm statistics.

    Statistics of x (norm1), then h = conv1(silu(norm1(x))) per tile with a 1-cell halo and its statistics (norm2),
    then per tile conv2(silu(norm2(h))) with a 1-cell halo plus the shortcut. When x is stored and keeps its channel
    count, h is stored and the sum is written into x in place (a tile reads x only at its own cells): two full
    tensors alive. Otherwise (an upsampled source, or nin_shortcut) h is not stored but computed again in the last
    pass from x with a 2-cell halo, and the sum goes into a new tensor: the input (a quarter of the size when
    upsampled) and the output alive. Returns [B, C_out, H, W].
    """
    s1 = _stats_of(source, boxes, block.norm1.num_groups)
    s2 = GroupStats(block.norm2.num_groups)
    inplace = isinstance(source, Stored) and not hasattr(block, "nin_shortcut")
    kept = None
    for box in boxes:
        x, g = source.region(box, 1)
        h = _crop(block.conv1(norm_silu(block.norm1, x, s1)), box, g)
        s2.add(h)
        if inplace:
            if kept is None:
                kept = h.new_empty(*h.shape[:2], *source.size)
            kept[..., box[0]:box[2], box[1]:box[3]] = h
    s2 = s2.mean_var()
    out = source.x if inplace else None
    for box in boxes:
        if inplace:
            h, g = Stored(kept).region(box, 1)
            x = source.x[..., box[0]:box[2], box[1]:box[3]]
        else:
            x, g = source.region(box, 2)
            h = block.conv1(norm_silu(block.norm1, x, s1))
            x = _crop(x, box, g)
            if hasattr(block, "nin_shortcut"):
                x = block.nin_shortcut(x)
        y = x + _crop(block.conv2(norm_silu(block.norm2, h, s2)), box, g)
        if out is None:
            out = y.new_empty(*y.shape[:2], *source.size)
        out[..., box[0]:box[2], box[1]:box[3]] = y
    return out


def conv_tiles(conv: torch.nn.Conv2d, source, boxes: list[Box], norm: torch.nn.GroupNorm | None = None) -> Tensor:
    """`conv(x)` or, with `norm`, `conv(silu(norm(x)))` with whole-image statistics, tile by tile (3x3 conv, padding 1,
    a 1-cell halo). x = `source`; returns a new [B, C_out, H, W] tensor."""
    stats = _stats_of(source, boxes, norm.num_groups) if norm is not None else None
    out = None
    for box in boxes:
        x, g = source.region(box, 1)
        y = _crop(conv(norm_silu(norm, x, stats) if norm is not None else x), box, g)
        if out is None:
            out = y.new_empty(*y.shape[:2], *source.size)
        out[..., box[0]:box[2], box[1]:box[3]] = y
    return out


def downsample_tiles(down: torch.nn.Module, x: Tensor, boxes: list[Box]) -> Tensor:
    """LDM `Downsample` (pad right and bottom by one zero, 3x3 conv with stride 2) tile by tile. x: [B, C, H, W] ->
    [B, C, H/2, W/2]; `boxes` are on the output grid. Output row q reads input rows 2q .. 2q+2."""
    h, w = x.shape[-2:]
    out = None
    for t, l, b, r in boxes:
        part = x[..., 2 * t:min(h, 2 * b + 1), 2 * l:min(w, 2 * r + 1)]
        part = F.pad(part, (0, 2 * r + 1 - min(w, 2 * r + 1), 0, 2 * b + 1 - min(h, 2 * b + 1)))
        y = down.conv(part)
        if out is None:
            out = y.new_empty(*y.shape[:2], h // 2, w // 2)
        out[..., t:b, l:r] = y
    return out


# -- encode and decode ------------------------------------------------------------------------------------------------

def _check(vae: AutoencoderKL, tile_size: int, stats: str, overlap: int) -> int:
    if stats not in STATS:
        raise ValueError(f"stats: {stats!r}; allowed: {', '.join(map(repr, STATS))}")
    cells = check_tile_size(tile_size, vae.downscale)
    f = vae.downscale
    if stats == "tile" and (isinstance(overlap, bool) or not isinstance(overlap, int) or overlap % f
                            or not 0 <= overlap < tile_size):
        raise ValueError(f"overlap: {overlap!r}; must be a multiple of {f} pixels in [0, tile_size={tile_size})")
    return cells


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, z: Tensor, *, tile_size: int = VAE_TILE_SIZE, stats: str = "global",
                 overlap: int = 128) -> Tensor:
    """`vae.decode(z)` computed in tiles of at most `tile_size` x `tile_size` output pixels.

    z: [B, embed_dim, h, w] unscaled latent (already divided by scale_factor), any dtype (cast to the VAE's) ->
    [B, out_ch, h*f, w*f] in the VAE's dtype, roughly in [-1, 1] (not clipped), f = `vae.downscale`.
    `tile_size`: pixels (default 256), a multiple of f, at least 4 f (sizes it does not divide give tiles of nearly
    equal size);
    `stats`: "global" (default: whole-image GroupNorm statistics, equal to `vae.decode` up to float rounding; module
    docstring) or "tile" (each tile decoded alone, tiles overlapping by `overlap` pixels and blended linearly, as
    diffusers' `enable_vae_tiling`). Raises ValueError naming a bad `tile_size`, `stats`, `overlap` or `z`.
    """
    cells = _check(vae, tile_size, stats, overlap)
    vae.check_latent(z)
    if stats == "tile":
        return _blended(vae.decode, z, cells, overlap // vae.downscale, vae.downscale)
    dec, levels = vae.decoder, len(vae.decoder.up)
    z = z.to(vae.post_quant_conv.weight.dtype)
    grid = tile_grid(z.shape[2], z.shape[3], cells)
    h = dec.mid(dec.conv_in(vae.post_quant_conv(z)))
    source = Stored(h)
    for level in reversed(range(levels)):
        stage = dec.up[level]
        boxes = scale_boxes(grid, 2 ** (levels - 1 - level))
        for block in stage.block:
            # the latent-resolution level runs untiled (module docstring, point 3)
            h = block(source.x) if level == levels - 1 else resnet_block(block, source, boxes)
            source = Stored(h)
            del h
        if hasattr(stage, "upsample"):
            source = Upsampled(source.x, stage.upsample)
    return conv_tiles(dec.conv_out, source, scale_boxes(grid, 2 ** (levels - 1)), norm=dec.norm_out)


@torch.no_grad()
def tiled_encode(vae: AutoencoderKL, x: Tensor, *, tile_size: int = VAE_TILE_SIZE, stats: str = "global",
                 overlap: int = 128) -> DiagonalGaussianDistribution:
    """`vae.encode(x)` computed in tiles of at most `tile_size` x `tile_size` input pixels.

    x: [B, in_channels, H, W] in [-1, 1], H and W divisible by f = `vae.downscale` -> the posterior over
    [B, embed_dim, H/f, W/f] (its moments in the VAE's dtype). `tile_size`, `stats`, `overlap`: as
    `tiled_decode` ("tile" blends the moments, as diffusers' `tiled_encode` does). Raises ValueError naming a bad
    argument.
    """
    cells = _check(vae, tile_size, stats, overlap)
    vae.check_pixels(x)
    f = vae.downscale
    if stats == "tile":
        moments = _blended(lambda t: vae.quant_conv(vae.encoder(t)), x.to(vae.quant_conv.weight.dtype),
                           cells * f, overlap, 1, out_scale=f)
        return DiagonalGaussianDistribution(moments)
    enc, levels = vae.encoder, len(vae.encoder.down)
    grid = tile_grid(x.shape[2] // f, x.shape[3] // f, cells)
    h = conv_tiles(enc.conv_in, Stored(x.to(vae.quant_conv.weight.dtype)), scale_boxes(grid, f))
    for level, stage in enumerate(enc.down):
        boxes = scale_boxes(grid, 2 ** (levels - 1 - level))
        for block in stage.block:
            h = block(h) if level == levels - 1 else resnet_block(block, Stored(h), boxes)
        if hasattr(stage, "downsample"):
            h = downsample_tiles(stage.downsample, h, scale_boxes(grid, 2 ** (levels - 2 - level)))
    h = enc.mid(h)
    return DiagonalGaussianDistribution(vae.quant_conv(enc.conv_out(F.silu(enc.norm_out(h)))))


# -- the naive method: tiles alone, blended ---------------------------------------------------------------------------

def _ramp(n: int, lead: int, trail: int, dtype, device) -> Tensor:
    """Blend weights along one axis of a tile of n cells: rising linearly over its first `lead` cells and falling
    over its last `trail` (1 elsewhere): (k + 0.5) / lead, never 0, so every covered cell has weight."""
    w = torch.ones(n, dtype=dtype, device=device)
    if lead:
        w[:lead] = (torch.arange(lead, dtype=dtype, device=device) + 0.5) / lead
    if trail:
        w[n - trail:] = torch.minimum(w[n - trail:], torch.flip(torch.arange(trail, dtype=dtype, device=device)
                                                                + 0.5, [0]) / trail)
    return w


def overlapping(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of `tile` cells stepping by `tile - overlap` over [0, length), the last one ending at `length`."""
    if length <= tile:
        return [(0, length)]
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    return [(s, s + tile) for s in starts]


def _blended(run, x: Tensor, tile: int, overlap: int, in_per_out: int, out_scale: int = 1) -> Tensor:
    """`run` on overlapping windows of x [B, C, H, W] (`tile`, `overlap` in x's cells), outputs blended with
    linear ramps across the overlaps (normalised by the summed weights). `in_per_out`/`out_scale`: output cells per
    input cell as a ratio (decode: 8 and 1; encode: 1 and 8)."""
    rows, cols = overlapping(x.shape[2], tile, overlap), overlapping(x.shape[3], tile, overlap)
    out = weight = None
    for t, b in rows:
        for l, r in cols:
            y = run(x[..., t:b, l:r])
            if out is None:
                size = (x.shape[2] * in_per_out // out_scale, x.shape[3] * in_per_out // out_scale)
                out = y.new_zeros(*y.shape[:2], *size)
                weight = y.new_zeros(size)
            ov = overlap * in_per_out // out_scale
            wy = _ramp(y.shape[2], ov if t else 0, ov if b < x.shape[2] else 0, y.dtype, y.device)
            wx = _ramp(y.shape[3], ov if l else 0, ov if r < x.shape[3] else 0, y.dtype, y.device)
            w = wy[:, None] * wx[None, :]
            o = [v * in_per_out // out_scale for v in (t, l, b, r)]
            out[..., o[0]:o[2], o[1]:o[3]] += y * w
            weight[o[0]:o[2], o[1]:o[3]] += w
    return out / weight


# -- what the pipeline calls ------------------------------------------------------------------------------------------

def encode(vae, x: Tensor, tiled: bool) -> DiagonalGaussianDistribution:
    """`tiled_encode(vae, x)` when `tiled` and `vae` is an AutoencoderKL, else `vae.encode(x)` (the allocation-free
    stand-in VAE of `--explain` dry runs encodes whole)."""
    return tiled_encode(vae, x) if tiled and isinstance(vae, AutoencoderKL) else vae.encode(x)


def decode(vae, z: Tensor, tiled: bool) -> Tensor:
    """`tiled_decode(vae, z)` when `tiled` and `vae` is an AutoencoderKL, else `vae.decode(z)` (see `encode`)."""
    return tiled_decode(vae, z) if tiled and isinstance(vae, AutoencoderKL) else vae.decode(z)
