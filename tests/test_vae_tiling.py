"""sdcore.models.vae_tiling: tiled encode / decode against the untiled VAE, the naive per-tile method, seams, the
tile grid, bad arguments; the tiling choice (resources) and its wiring (Options.vae_tiling, --vae-tiling, the Plan).

The oracle is the untiled `AutoencoderKL` itself (its parity with diffusers is tests/test_vae.py's): with
whole-image GroupNorm statistics and a halo of one cell per 3x3 convolution, every output cell of the tiled VAE is
computed from the same numbers as the untiled one, so the two may differ only by float rounding (summation order of
the statistics and of the convolutions on smaller inputs). TOL is test_vae.py's fp32 parity tolerance.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdcore import families, resources
from sdcore.models.vae import AutoencoderKL
from sdcore.models.vae_tiling import split, tile_grid, tiled_decode, tiled_encode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import make_checkpoint  # noqa: E402  (scripts/ is not a package)

TOL = 1e-4  # fp32 max abs difference against the untiled VAE (outputs of magnitude ~1-4)


def _vae(config) -> AutoencoderKL:
    vae = AutoencoderKL(config, device="meta").eval()
    vae.load_state_dict(make_checkpoint.random_like(vae.state_dict(), torch.Generator().manual_seed(1)), assign=True)
    return vae


@pytest.fixture(scope="module")
def vae():
    """The bundled tiny model's VAE geometry (ch 32, ch_mult 1 2 2 4, one ResnetBlock per encoder level and two per
    decoder level: four levels, downscale 8; upsamplings fused into channel-changing blocks, in-place blocks)."""
    return _vae(families.TINY.vae)


@pytest.fixture(scope="module")
def latents():
    """A batch of two 96 x 160 px latents (12 x 20 cells: 48 and 64 px tiles divide neither side)."""
    return torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def decoded(vae, latents):
    with torch.no_grad():
        return vae.decode(latents)


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """The pipeline's uint8 conversion (sdcore.pipeline.decode) as float levels."""
    return (255.0 * torch.clamp((x + 1) / 2, 0, 1)).to(torch.uint8).float()


# -- tiled = untiled ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile_size", [32, 48, 512])
def test_tiled_decode_equals_untiled(vae, latents, decoded, tile_size):
    """32 px = the smallest tile (4 cells); 48 px divides neither 96 nor 160; 512 px = one tile."""
    out = tiled_decode(vae, latents, tile_size=tile_size)
    assert out.shape == decoded.shape and out.dtype == decoded.dtype
    err = (out - decoded).abs().max().item()
    assert err <= TOL and decoded.abs().max() > 1.0, err
    assert (to_levels(out) - to_levels(decoded)).abs().max() <= 1  # a value at a rounding edge may flip a level


def test_naive_per_tile_statistics_are_measurably_worse(vae, latents, decoded):
    """Each tile normalised by its own statistics (diffusers' enable_vae_tiling; here with no blending and with
    linear blending over 16 px) is far from the untiled VAE: the tolerance above separates the two methods."""
    tiled = (tiled_decode(vae, latents, tile_size=64) - decoded).abs().max().item()
    for overlap in (0, 16):
        naive = (tiled_decode(vae, latents, tile_size=64, stats="tile", overlap=overlap) - decoded).abs().max().item()
        assert naive > 100 * TOL and naive > 1000 * tiled, (overlap, naive, tiled)


def test_batch_images_are_independent(vae, latents, decoded):
    """GroupNorm statistics are per image: image 1 of the batch decodes as it does alone."""
    alone = tiled_decode(vae, latents[1:], tile_size=48)
    assert (alone[0] - decoded[1]).abs().max().item() <= TOL


def test_tiled_encode_equals_untiled(vae):
    x = torch.rand(2, 3, 104, 136, generator=torch.Generator().manual_seed(3)) * 2 - 1  # 13 x 17 cells
    with torch.no_grad():
        ref = vae.encode(x)
    for tile_size in (32, 64):
        post = tiled_encode(vae, x, tile_size=tile_size)
        for name in ("mean", "logvar"):
            err = (getattr(post, name) - getattr(ref, name)).abs().max().item()
            assert err <= TOL, (tile_size, name, err)
    naive = tiled_encode(vae, x, tile_size=64, stats="tile", overlap=16)
    assert (naive.mean - ref.mean).abs().max().item() > 100 * TOL


# -- seams --------------------------------------------------------------------------------------------------------

def seam_ratio(image: torch.Tensor, tile: int) -> float:
    """Mean |difference| of neighbouring pixels across tile boundaries (columns and rows at multiples of `tile`)
    over the mean inside tiles. image: [..., H, W]. About 1 when no boundary is visible."""
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs()  # dx[..., j]: between columns j and j + 1
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs()
    across_x = torch.zeros(dx.shape[-1], dtype=torch.bool)
    across_x[[b - 1 for b in range(tile, image.shape[-1], tile)]] = True
    across_y = torch.zeros(dy.shape[-2], dtype=torch.bool)
    across_y[[b - 1 for b in range(tile, image.shape[-2], tile)]] = True
    across = torch.cat([dx[..., across_x].flatten(), dy[..., across_y, :].flatten()]).mean()
    inside = torch.cat([dx[..., ~across_x].flatten(), dy[..., ~across_y, :].flatten()]).mean()
    return float(across / inside)


def test_no_step_at_tile_boundaries(vae):
    """On the uint8 image (192 px, 64 px tiles: 2 boundaries each way), the mean gradient across tile boundaries is
    the untiled image's there (ratio within 0.01) and below 1.05 x the gradient inside tiles; tiles decoded alone and
    abutted show a step (ratio above 1.15)."""
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        untiled = seam_ratio(to_levels(vae.decode(z)), 64)
    tiled = seam_ratio(to_levels(tiled_decode(vae, z, tile_size=64)), 64)
    naive = seam_ratio(to_levels(tiled_decode(vae, z, tile_size=64, stats="tile", overlap=0)), 64)
    assert abs(tiled - untiled) < 0.01 and tiled < 1.05, (tiled, untiled)
    print(f"seam ratios: untiled {untiled:.3f}, tiled {tiled:.3f}, naive {naive:.3f}")
    assert naive > 1.15, naive


# -- the tile grid and bad arguments ------------------------------------------------------------------------------

def test_split_and_grid():
    assert split(10, 4) == [(0, 4), (4, 7), (7, 10)]  # ceil(10 / 4) = 3 pieces of 4, 3, 3
    assert split(8, 4) == [(0, 4), (4, 8)] and split(3, 4) == [(0, 3)]
    for h, w, t in ((20, 28, 6), (17, 25, 8), (5, 5, 4)):
        covered = torch.zeros(h, w, dtype=torch.int64)
        for top, left, bottom, right in tile_grid(h, w, t):
            assert 0 < bottom - top <= t and 0 < right - left <= t
            covered[top:bottom, left:right] += 1
        assert bool((covered == 1).all())


@pytest.mark.parametrize("kwargs, name", [
    ({"tile_size": 60}, "tile_size"), ({"tile_size": 24}, "tile_size"), ({"tile_size": 0}, "tile_size"),
    ({"tile_size": -64}, "tile_size"), ({"tile_size": 64.0}, "tile_size"), ({"tile_size": True}, "tile_size"),
    ({"stats": "local"}, "stats"), ({"stats": "tile", "tile_size": 64, "overlap": 64}, "overlap"),
    ({"stats": "tile", "tile_size": 64, "overlap": 12}, "overlap"),
])
def test_bad_arguments_name_themselves(vae, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        tiled_decode(vae, torch.zeros(1, 4, 8, 8), **kwargs)
    with pytest.raises(ValueError, match=f"^{name}: "):
        tiled_encode(vae, torch.zeros(1, 3, 64, 64), **kwargs)


def test_bad_shapes(vae):
    with pytest.raises(ValueError, match=r"^z must be \[B, 4, h, w\]"):
        tiled_decode(vae, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by 8"):
        tiled_encode(vae, torch.zeros(1, 3, 60, 64))


# -- memory estimate and the automatic choice ---------------------------------------------------------------------

def test_tiled_estimate_and_choice():
    sd1 = families.SD1
    # SD's VAE at 2048 px: two 128-channel full-resolution activations; a 256 px tile + 4 cells, 256 channels
    state, tile = 2 * 128 * 2048 * 2048, 256 * 260 * 260
    assert resources.vae_tiled_bytes(sd1, 2048, 2048) == \
        int((resources.VAE_TILED_STATE_FACTOR * state + resources.VAE_TILE_FACTOR * tile) * 4)
    assert resources.vae_tiled_bytes(sd1, 2048, 2048) < resources.vae_bytes(sd1, 2048, 2048) / 4
    untiled = resources.FIXED_BYTES + resources.pixel_bytes(2048, 2048) + resources.vae_bytes(sd1, 2048, 2048)
    assert resources.vae_tiling_choice(sd1, 2048, 2048, available=untiled)[0] is False
    tiled, why = resources.vae_tiling_choice(sd1, 2048, 2048, available=untiled - 1)
    assert tiled and why.startswith("automatic") and "2048x2048" in why
    assert resources.vae_tiling_choice(sd1, 64, 64, True, available=0) == (True, "asked for")
    assert resources.vae_tiling_choice(sd1, 2048, 2048, False, available=0) == (False, "turned off")
    # check_fits counts the tiled VAE when tiling is chosen, refuses when it is turned off
    limit = resources.estimate_bytes(sd1, 2048, 2048) - 1
    need = resources.check_fits(sd1, 2048, 2048, available=limit)
    assert need == resources.FIXED_BYTES + resources.pixel_bytes(2048, 2048) + max(
        resources.vae_tiled_bytes(sd1, 2048, 2048), resources.unet_bytes(sd1, 2048, 2048))
    with pytest.raises(ValueError, match="width/height 2048x2048"):
        resources.check_fits(sd1, 2048, 2048, available=limit, vae_tiling=False)


# -- wiring: Options.vae_tiling -> pipeline -> Plan; the CLI flag --------------------------------------------------

def _job(model, size=(128, 96), **opts):
    from sdcore.processing import Options, StableDiffusionProcessingImg2Img

    image = Image.effect_mandelbrot(size, (-2, -1.5, 1, 1.5), 60).convert("RGB")
    return StableDiffusionProcessingImg2Img(sd_model=model, init_images=[image], width=size[0], height=size[1],
                                            steps=2, sampler_name="Euler", denoising_strength=0.5, seed=3,
                                            opts=Options(**opts))


def test_processing_vae_tiling_option(sd1_tiny, monkeypatch):
    """Options.vae_tiling True / False reach img2img (and txt2img with a pixel-space hires fix: every VAE call tiled);
    the images agree to a level; the Plan says whether and why (None, automatic: test_cli_flag_and_explain)."""
    import numpy as np

    from sdcore import pipeline
    from sdcore.processing import process_images

    calls = []
    real = pipeline.tiling.decode
    monkeypatch.setattr(pipeline.tiling, "decode", lambda vae, z, tiled: calls.append(tiled) or real(vae, z, tiled))
    runs = {v: process_images(_job(sd1_tiny, vae_tiling=v), disable_progress=True) for v in (True, False)}
    assert calls == [True, False]
    a, b = (np.asarray(runs[v].images[0], np.int16) for v in (True, False))
    assert np.abs(a - b).max() <= 1
    assert runs[True].plans[0].vae_tiling and runs[True].plans[0].vae_tiling_reason == "asked for"
    assert not runs[False].plans[0].vae_tiling
    from sdcore.processing import Options, StableDiffusionProcessingTxt2Img

    calls.clear()  # txt2img with a pixel-space hires fix: decode, resize, encode, sample, decode, all tiled
    hires = StableDiffusionProcessingTxt2Img(sd_model=sd1_tiny, width=64, height=64, steps=2, sampler_name="Euler",
                                             seed=3, enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos",
                                             opts=Options(vae_tiling=True))
    plan = process_images(hires, disable_progress=True).plans[0]
    assert plan.vae_tiling and calls == [True, True] and [p.width for p in plan.passes] == [64, 96]
    with pytest.raises(ValueError, match="opts.vae_tiling"):
        _job(sd1_tiny, vae_tiling="yes").validate()


def test_cli_flag_and_explain(capsys, sd1_tiny, sd1_tiny_path, tmp_path, monkeypatch):
    """--vae-tiling / --no-vae-tiling / neither, as --explain reports them; automatic tiling when the memory
    available is just below what the untiled VAE needs at 384 px (where the tiled estimate is the smaller: below
    that one 256 px tile holds the whole image)."""
    from sdcore.cli import main

    image = tmp_path / "in.png"
    Image.effect_mandelbrot((64, 64), (-2, -1.5, 1, 1.5), 60).convert("RGB").save(image)
    for flag, expected in (("--vae-tiling", "VAE: tiled (asked for)"),
                           ("--no-vae-tiling", "VAE: untiled (turned off)"), (None, "VAE: untiled (automatic: ")):
        argv = ["img2img", str(image), "--ckpt", str(sd1_tiny_path), "--width", "64", "--height", "64", "--explain"]
        assert main(argv + ([flag] if flag else [])) == 0
        assert expected in capsys.readouterr().out
    fam = sd1_tiny.family
    untiled = resources.FIXED_BYTES + resources.pixel_bytes(384, 384) + resources.vae_bytes(fam, 384, 384)
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": untiled - 1)
    argv = ["img2img", str(image), "--ckpt", str(sd1_tiny_path), "--width", "384", "--height", "384", "--explain"]
    assert main(argv) == 0
    assert "VAE: tiled (automatic: the untiled VAE needs about" in capsys.readouterr().out
    assert main(argv + ["--no-vae-tiling"]) == 2  # refused: the untiled VAE does not fit
    assert "--width/--height" in capsys.readouterr().err


# -- full size ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_sd1_vae_tiled_equals_untiled():
    """SD1.5's VAE (ch 128) at 256 px in 128 px tiles (four tiles): decode and encode within TOL of the untiled VAE,
    the naive method far from it."""
    vae = _vae(families.SD1.vae)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 32, 32, generator=g)
    x = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    with torch.no_grad():
        ref, post = vae.decode(z), vae.encode(x)
    assert (tiled_decode(vae, z, tile_size=128) - ref).abs().max().item() <= TOL
    assert (tiled_encode(vae, x, tile_size=128).mean - post.mean).abs().max().item() <= TOL
    naive = tiled_decode(vae, z, tile_size=128, stats="tile", overlap=32)
    assert (naive - ref).abs().max().item() > 100 * TOL
