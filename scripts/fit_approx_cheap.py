"""Fit the tiny model's "Approx cheap" live-preview matrix: scaled latent -> RGB of each latent cell, by least squares.

A1111's "Approx cheap" preview (`modules/sd_vae_approx.py` `cheap_approximation`) multiplies each latent cell's 4
channels by a fixed 4 x 3 matrix to get a colour in about [-1, 1]. SD1/SD2 and SDXL have published matrices (fitted
for their VAEs, https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204); the bundled tiny
model has its own VAE, so its matrix is fitted here the same way, with a bias column:

    rgb[cell] ~= latent[cell] @ M + b        M: [4, 3], b: [3]

Data: `--num-scenes` synthetic scenes of the tiny model's training distribution (`scripts/tiny_data.py`
`sample_scene`, numpy generator seeded with `--seed`), 64 x 64 RGB, encoded by the bundled model's VAE to scaled
latents (posterior mean x scale_factor: what the sampler's `denoised` estimates), 4 x 8 x 8. Target: each 8 x 8
pixel block's mean colour mapped to [-1, 1] (`2 * rgb / 255 - 1`, the VAE's pixel range). Every latent cell is
one row of the least-squares problem (`torch.linalg.lstsq` in float64).

Printed: M and b (paste them into `sdcore/families.py` `TINY_LATENT_RGB`), the RMSE of the fit on its own data
and on `--num-scenes` fresh scenes (`--seed` + 1), each in [-1, 1] units and in 8-bit levels (x 127.5), and for
comparison the RMSE of SD1's A1111 matrix on the fresh scenes.

Run: .venv/bin/python scripts/fit_approx_cheap.py [--num-scenes 4096] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import tiny_data  # noqa: E402

from sdcore import families, load_checkpoint  # noqa: E402
from sdcore.cli.flags import DEFAULT_CKPT  # noqa: E402

NUM_SCENES = 4096  # 262,144 latent cells for 15 unknowns
SEED = 0


def scenes(n: int, seed: int) -> np.ndarray:
    """`n` training-distribution scenes, uint8 [n, 64, 64, 3] (tiny_data.sample_scene, generator seeded by `seed`)."""
    rng = np.random.default_rng([seed, 17])
    return np.stack([tiny_data.sample_scene(rng)[0] for _ in range(n)])


@torch.no_grad()
def scaled_latents(model, images: np.ndarray, chunk: int = 256) -> torch.Tensor:
    """float64 [n, 4, h, w]: scale_factor x the VAE posterior mean of uint8 [n, H, W, 3] images."""
    out = []
    for start in range(0, len(images), chunk):
        px = torch.from_numpy(images[start:start + chunk]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out.append(model.vae.encode(px.to(model.device, model.vae_dtype)).mode().double().cpu())
    return torch.cat(out) * model.family.vae.scale_factor


def cell_colours(images: np.ndarray, factor: int) -> torch.Tensor:
    """float64 [n, 3, H/f, W/f]: each f x f pixel block's mean colour of uint8 [n, H, W, 3], mapped to [-1, 1]."""
    n, h, w, _ = images.shape
    blocks = images.reshape(n, h // factor, factor, w // factor, factor, 3).astype(np.float64).mean(axis=(2, 4))
    return torch.from_numpy(blocks).permute(0, 3, 1, 2) / 127.5 - 1.0


def _rows(latents: torch.Tensor, colours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per latent cell: ([cells, 4] latents, [cells, 3] colours)."""
    return latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]), colours.permute(0, 2, 3, 1).reshape(-1, 3)


def fit(latents: torch.Tensor, colours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (M [4, 3], b [3]) minimising sum over cells of |latent @ M + b - colour|^2 (float64)."""
    x, y = _rows(latents, colours)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # [cells, 5]
    solution = torch.linalg.lstsq(design, y, driver="gelsd").solution  # [5, 3]
    return solution[:4], solution[4]


def rmse(latents: torch.Tensor, colours: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor) -> float:
    """Root-mean-square error over cells and channels of `latent @ matrix + bias` against `colours` ([-1, 1] units)."""
    x, y = _rows(latents, colours)
    return float(((x @ matrix.double() + bias.double() - y) ** 2).mean().sqrt())


def table(latent_rgb: families.LatentRGB) -> tuple[torch.Tensor, torch.Tensor]:
    """(matrix [4, 3], bias [3]) float64 tensors of a stored `families.LatentRGB`."""
    return (torch.tensor(latent_rgb.matrix, dtype=torch.float64), torch.tensor(latent_rgb.bias, dtype=torch.float64))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-scenes", type=int, default=NUM_SCENES)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_checkpoint(args.ckpt)
    factor = model.vae.downscale
    train = scenes(args.num_scenes, args.seed)
    fresh = scenes(args.num_scenes, args.seed + 1)
    z_train, z_fresh = scaled_latents(model, train), scaled_latents(model, fresh)
    c_train, c_fresh = cell_colours(train, factor), cell_colours(fresh, factor)
    matrix, bias = fit(z_train, c_train)
    fit_train, fit_fresh = rmse(z_train, c_train, matrix, bias), rmse(z_fresh, c_fresh, matrix, bias)
    sd1 = rmse(z_fresh, c_fresh, *table(families.SD1_LATENT_RGB))
    stored = rmse(z_fresh, c_fresh, *table(families.TINY_LATENT_RGB)) if families.TINY_LATENT_RGB else float("nan")
    rows = ",\n".join("    (" + ", ".join(f"{v:.4f}" for v in row) + ")" for row in matrix.tolist())
    print(f"# {args.num_scenes} scenes (seed {args.seed}), {len(train) * z_train[0, 0].numel()} latent cells")
    print(f"matrix=(\n{rows},\n),")
    print("bias=(" + ", ".join(f"{v:.4f}" for v in bias.tolist()) + "),")
    print(f"rmse fit data:     {fit_train:.4f} ({fit_train * 127.5:.1f} levels)")
    print(f"rmse fresh scenes: {fit_fresh:.4f} ({fit_fresh * 127.5:.1f} levels)  (seed {args.seed + 1})")
    print(f"stored TINY matrix on fresh scenes: {stored:.4f} ({stored * 127.5:.1f} levels)")
    print(f"SD1 A1111 matrix on fresh scenes:   {sd1:.4f} ({sd1 * 127.5:.1f} levels)")


if __name__ == "__main__":
    main()
