"""Live previews: the sampler's current estimate of the clean latent (`denoised`) as RGB images, while sampling.

Three methods, A1111's live-preview choices (v1.10.1 `modules/sd_samplers_common.py` `samples_to_images_tensor`,
a1111-semantics §7.2):

- "approx_cheap" (A1111 "Approx cheap", `modules/sd_vae_approx.py` `cheap_approximation`): each latent cell's
  colour is `latent @ M + b` with a fixed 4 x 3 matrix M per latent space (`families.LatentRGB`: A1111's numbers for
  SD1/SD2 and SDXL, b = 0; for the tiny model a least-squares fit with bias, scripts/fit_approx_cheap.py). The image
  has one pixel per latent cell (64 x 64 for a 512 px SD image): well under a millisecond, no network.
- "taesd" (A1111 "TAESD"): `TAESDDecoder`, the Tiny AutoEncoder's decoder (madebyollin/taesd `taesd.py` `Decoder`),
  a 1.2 M-parameter conv net that decodes the latent to full resolution; weights from the public
  `taesd_decoder.pth` (SD1/SD2) or `taesdxl_decoder.pth` (SDXL), loaded by `load_taesd_decoder`.
- "full" (A1111 "Full"): the model's own VAE decode (`pipeline.decode`), exactly what the final image goes through.

Every method ends as A1111's `single_sample_to_image` does: RGB in [-1, 1] -> `x * 0.5 + 0.5`, clamped to [0, 1],
x 255, truncated to uint8.

`preview_image(method, denoised, model, taesd)` turns a callback's `denoised` into PIL images; `PreviewWriter` is a
sampler callback (k-diffusion's per-step dict {"x", "i", "sigma", "sigma_hat", "denoised"}) that writes them as
PNG files every N steps, for `process_images(p, callback=...)` and `sdcore txt2img/img2img --preview-every N
--preview-dir DIR`. Previews only read `denoised`: a run's images are the same bytes with and without them.

Glossary: B images in the batch, h x w latent cells, H x W = 8h x 8w pixels; "scaled latent" = scale_factor x the
VAE's latent, the space the sampler works in.
"""
from __future__ import annotations

import errno
import functools
import os
import secrets
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .checkpoint import StableDiffusionModel, build_module, open_state_dict
from .families import Family, LatentRGB
from .images import write_new_file
from .pipeline import decode, vae_tiling_for

Tensor = torch.Tensor

METHODS = ("approx_cheap", "taesd", "full")


# -- Approx cheap ------------------------------------------------------------------------------------------------------

_NON_FINITE = "holds non-finite values (NaN or inf); a preview cannot show them (they were produced by sampling)"


def _check_latent(name: str, latent: Any, channels: int | None = 4, finite: bool = True) -> None:
    if not isinstance(latent, torch.Tensor) or latent.ndim != 4 or not latent.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [B, C, h, w], got "
                         f"{tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__}")
    if channels is not None and latent.shape[1] != channels:
        raise ValueError(f"{name} has {latent.shape[1]} channels; the preview needs {channels} (a scaled latent "
                         f"[B, {channels}, h, w])")
    if finite and not bool(torch.isfinite(latent).all()):
        raise FloatingPointError(f"{name} {_NON_FINITE}")


@functools.lru_cache(maxsize=16)
def _coefficients(latent_rgb: LatentRGB) -> tuple[np.ndarray, np.ndarray]:
    """(M float32 [C, 3], bias float32 [3]) of a LatentRGB, made once (read-only arrays)."""
    matrix, bias = np.asarray(latent_rgb.matrix, np.float32), np.asarray(latent_rgb.bias, np.float32)
    matrix.flags.writeable = bias.flags.writeable = False
    return matrix, bias


def _latent_array(name: str, latent: Tensor, channels: int | None) -> np.ndarray:
    """float32 numpy array [B, C, h, w] of a checked latent, on the CPU (shares memory with a float32 CPU latent;
    only read)."""
    _check_latent(name, latent, channels, finite=False)
    array = latent.detach().to(device="cpu", dtype=torch.float32).numpy()
    if not np.isfinite(array).all():  # numpy: a fifth of torch.isfinite's time on a small latent
        raise FloatingPointError(f"{name} {_NON_FINITE}")
    return array


def approx_cheap_rgb(latent: Tensor, latent_rgb: LatentRGB) -> np.ndarray:
    """`latent @ M + b` per latent cell: float32 numpy [B, h, w, 3] (channels last), roughly in [-1, 1], not clipped.

    `latent`: scaled latent [B, 4, h, w], any floating dtype and device (copied to the CPU in float32).
    Formula: rgb[b, y, x, r] = sum_l latent[b, l, y, x] * M[l][r] + bias[r] (A1111 `cheap_approximation`:
    einsum "...lxy,lr -> ...rxy", without bias). Computed in numpy: on an 8 x 8 latent torch's per-operation
    overhead was half the preview's time. Raises ValueError for another shape or channel count, FloatingPointError
    for NaN/inf.
    """
    matrix, bias = _coefficients(latent_rgb)
    array = _latent_array("latent", latent, len(matrix))
    return np.tensordot(array, matrix, axes=([1], [0])) + bias  # [B, h, w, C] . [C, 3] -> [B, h, w, 3]


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] of float32 RGB [B, H, W, 3] in about [-1, 1]: A1111 `single_sample_to_image`,
    `clamp(x * 0.5 + 0.5, 0, 1) * 255` truncated (not rounded) to uint8, in float32 as A1111's torch code."""
    half, full = np.float32(0.5), np.float32(255.0)
    return (np.clip(rgb.astype(np.float32, copy=False) * half + half, 0, 1) * full).astype(np.uint8)


def approx_cheap(latent: Tensor, family: Family) -> np.ndarray:
    """The "Approx cheap" preview of a scaled latent [B, 4, h, w]: uint8 numpy [B, h, w, 3] RGB (one pixel per
    latent cell), with `family.latent_rgb`. Raises ValueError when the family has no matrix or the latent's shape
    is wrong, FloatingPointError for NaN/inf (`approx_cheap_rgb`)."""
    if family.latent_rgb is None:
        raise ValueError(f"family {family.name!r} has no Approx cheap matrix (families.LatentRGB); use the "
                         "'taesd' or 'full' preview")
    return to_uint8(approx_cheap_rgb(latent, family.latent_rgb))


# -- TAESD -------------------------------------------------------------------------------------------------------------

class _Clamp(nn.Module):
    """Soft clamp of the latent into (-3, 3): 3 tanh(x / 3) (taesd.py `Clamp`)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


def _conv3(c_in: int, c_out: int, bias: bool = True, device=None, dtype=None) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias, device=device, dtype=dtype)


class _Block(nn.Module):
    """Residual block `relu(conv(relu(conv(relu(conv(x))))) + x)` of 3x3 convolutions (taesd.py `Block` with equal
    in and out widths, whose skip is the identity). Keys: conv.0, conv.2, conv.4 (weight, bias)."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.conv = nn.Sequential(_conv3(channels, channels, **kw), nn.ReLU(), _conv3(channels, channels, **kw),
                                  nn.ReLU(), _conv3(channels, channels, **kw))
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + x)


class TAESDDecoder(nn.Sequential):
    """The Tiny AutoEncoder decoder (madebyollin/taesd `taesd.py` `Decoder`; diffusers `AutoencoderTiny.decoder`):
    scaled latent [B, latent_channels, h, w] -> RGB [B, 3, 8h, 8w], roughly in [0, 1] (not clipped).

    Layers, with the index that names their keys in the public `taesd_decoder.pth` / `taesdxl_decoder.pth`:
    0 soft clamp 3 tanh(x/3); 1 conv 3x3 latent_channels -> 64, 2 ReLU; then three times: three `_Block`s, a 2x
    nearest-neighbour upsample and a 3x3 conv without bias (3-5, 6, 7; 8-10, 11, 12; 13-15, 16, 17); 18 one more
    block; 19 conv 3x3 64 -> 3. SD1/SD2 and SDXL decoders have this same shape (only the weights differ).
    Parameters are created on `device`/`dtype`; `load_taesd_decoder` builds it on the meta device and assigns the
    file's tensors.
    """

    def __init__(self, latent_channels: int = 4, width: int = 64, device=None, dtype=None):
        kw = dict(device=device, dtype=dtype)
        layers: list[nn.Module] = [_Clamp(), _conv3(latent_channels, width, **kw), nn.ReLU()]
        for _ in range(3):  # 3 doublings: 8x
            layers += [_Block(width, **kw) for _ in range(3)]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv3(width, width, bias=False, **kw)]
        layers += [_Block(width, **kw), _conv3(width, 3, **kw)]
        super().__init__(*layers)


def load_taesd_decoder(path: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> TAESDDecoder:
    """A `TAESDDecoder` with the weights of `path` (`taesd_decoder.pth` for SD1/SD2 latents, `taesdxl_decoder.pth`
    for SDXL, or .safetensors files with the same keys "1.weight", "3.conv.0.weight", ...), on `device` in `dtype`.

    Read by `checkpoint.open_state_dict` (safetensors, or torch's weights-only unpickler: no code in the file runs)
    and loaded strictly. Raises CheckpointError (a ValueError) naming "--taesd" and the file for an unreadable
    file, and listing missing, unexpected and mis-shaped keys for another layout (e.g. diffusers'
    `decoder.layers.*`). Which latent space the weights were trained for cannot be told from the file.
    """
    sd = open_state_dict(path, what="--taesd")
    return build_module(TAESDDecoder, 4, sd, "--taesd: the TAESD decoder (taesd_decoder.pth layout)", device, dtype,
                        Path(path))


# -- one entry point ---------------------------------------------------------------------------------------------------

def _check_method(method: str, taesd: nn.Module | None) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    if method == "taesd" and taesd is None:
        raise ValueError("method='taesd' needs taesd=load_taesd_decoder(path) (the public taesd_decoder.pth, or "
                         "taesdxl_decoder.pth for SDXL)")
    if method != "taesd" and taesd is not None:
        raise ValueError(f"taesd is given but method={method!r}; pass method='taesd' or taesd=None")


def preview_image(method: str, denoised: Tensor, model: StableDiffusionModel,
                  taesd: nn.Module | None = None, vae_tiling: bool | None = None) -> list[Image.Image]:
    """One PIL RGB preview per image of `denoised`, the scaled latent [B, 4, h, w] a sampler callback receives.

    method: "approx_cheap" (h x w pixels, `model.family.latent_rgb`), "taesd" (8h x 8w, the `taesd` decoder, run
    on its own device and dtype) or "full" (the model's VAE decode, `pipeline.decode`: the size of the final image;
    tiled as the job's final decode is, `pipeline.vae_tiling_for`: `vae_tiling` True / False as the job asked,
    None = automatic, tiled only when the untiled VAE would not fit).
    `denoised` is only read. Raises ValueError for an unknown method, a taesd decoder missing for "taesd" or given
    for another method, a family without an Approx cheap matrix or a latent of another shape; FloatingPointError
    when `denoised` is not finite.
    """
    _check_method(method, taesd)
    if method == "approx_cheap":  # numpy only: no autograd context needed (and none paid for)
        return [Image.fromarray(a) for a in approx_cheap(denoised, model.family)]
    with torch.no_grad():
        if method == "full":
            _check_latent("denoised", denoised, None)
            height, width = (8 * n for n in denoised.shape[-2:])
            return decode(model, denoised, tiled=vae_tiling_for(model, width, height, vae_tiling)[0])
        _check_latent("denoised", denoised)
        weight = next(taesd.parameters())
        # taesd.py's decoder outputs [0, 1]; A1111 maps it to [-1, 1] like the other methods (`x * 2 - 1`)
        rgb = taesd(denoised.to(weight.device, weight.dtype)).float() * 2 - 1
    return [Image.fromarray(a) for a in to_uint8(rgb.permute(0, 2, 3, 1).cpu().numpy())]


# -- the sampler callback ----------------------------------------------------------------------------------------------

# os.link errors meaning "no hard links on this file system" (as images.write_new_file's list)
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.ENOTSUP,
                  getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def save_png(image: Image.Image, path: Path) -> Path:
    """Write `image` as a PNG file at `path`, atomically and never overwriting, but without flushing to the disk.

    The PNG goes to a new hidden temporary file `.<name>.<random>.partial` beside `path` (exclusive creation), which
    is then hard-linked to `path` (os.link refuses an existing name atomically: FileExistsError) and removed, so a
    reader sees the whole file or none and no file is ever replaced. Unlike `images.write_new_file` nothing is
    fsynced: a preview is worth less than the 2-8 ms an fsync costs on this machine (a crash may lose recent
    previews). On a file system without hard links, `images.write_new_file` (with its fsyncs) writes it instead.
    Returns `path`; raises FileExistsError when it exists, and the OSError of a failed write.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
    try:
        with open(tmp, "xb") as f:
            image.save(f, format="PNG")
        os.link(tmp, path)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno not in _NO_HARD_LINKS:
            raise
        return write_new_file(path, lambda t: image.save(t, format="PNG"))
    finally:
        tmp.unlink(missing_ok=True)
    return path


class PreviewWriter:
    """A sampler callback that writes a preview PNG of `denoised` every `every` steps.

    Use: `process_images(p, callback=PreviewWriter(2, "previews", "approx_cheap", p.sd_model))`, or with
    `background=True` as a context manager, `with PreviewWriter(..., background=True) as w: process_images(p,
    callback=w)`. Called with k-diffusion's per-step dict {"x", "i", "sigma", "sigma_hat", "denoised"}; on steps
    with `i % every == 0` (0, N, 2N, ...; A1111's `show_progress_every_n_steps` test in `store_latent`) it writes
    `directory/step-<i:03d>.png`, or `step-<i:03d>-<k>.png` for image k of a batch of several. A run can have
    several sampling passes (`n_iter` batches, the hires fix's second pass): a step index that does not increase
    starts a new pass, whose files are named `pass<p>-step-...` (p = 1, 2, ...).

    The images are made during the callback (`preview_image`; `denoised` is only read; where a callback has no
    `denoised`, UniPC's last step, its `x`, the final sample, is shown). The files are written by
    `save_png` (a temporary file linked to the name: atomic, never overwriting, not fsynced); a name that exists
    raises FileExistsError. With `background=False` (default) the write happens in the callback, so every file
    exists when sampling returns. With `background=True` one worker thread writes them in order while sampling
    goes on (creating a file costs 0.3-1.5 ms here, more than an Approx cheap image); `close()` (or leaving the
    `with` block) waits for the writes and raises the first error, which also stops the run at the next preview.

    `paths` lists the files written (or queued); `seconds` is the time spent making the images, `write_seconds`
    writing them (in the worker thread with `background`).

    Args:
      every: int >= 1, steps between previews.
      directory: folder of the PNG files, created (with parents) if missing.
      method: "approx_cheap", "taesd" or "full" (`preview_image`).
      model: the StableDiffusionModel being sampled (its family's matrix, its VAE).
      taesd: a `TAESDDecoder` (`load_taesd_decoder`), only with method "taesd".
      background: write the files in a worker thread (see above).
      vae_tiling: the job's `Options.vae_tiling` (True / False / None = automatic), for method "full".
    Raises ValueError for a bad argument (named) or a directory path that is a file.
    """

    def __init__(self, every: int, directory: str | Path, method: str, model: StableDiffusionModel,
                 taesd: nn.Module | None = None, background: bool = False, vae_tiling: bool | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}; must be an integer >= 1 (steps between previews)")
        _check_method(method, taesd)
        if method == "approx_cheap" and model.family.latent_rgb is None:
            raise ValueError(f"method='approx_cheap': family {model.family.name!r} has no Approx cheap matrix")
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"directory={str(directory)!r} exists and is not a folder")
        directory.mkdir(parents=True, exist_ok=True)
        self.every, self.directory, self.method, self.model, self.taesd = every, directory, method, model, taesd
        self.vae_tiling = vae_tiling
        self.paths: list[Path] = []
        self.seconds = 0.0
        self.write_seconds = 0.0
        self._pass = -1
        self._last_step: int | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sdcore-previews") if background else None
        self._pending: list[Future] = []

    def name(self, step: int, index: int, batch: int) -> str:
        """The file name of image `index` of a batch of `batch` at sampling step `step` of the current pass."""
        prefix = f"pass{self._pass}-" if self._pass > 0 else ""
        return f"{prefix}step-{step:03d}" + (f"-{index}" if batch > 1 else "") + ".png"

    def _write(self, picture: Image.Image, path: Path) -> Path:
        start = time.perf_counter()
        try:
            return save_png(picture, path)
        finally:
            self.write_seconds += time.perf_counter() - start

    def _raise_failed(self) -> None:
        """Re-raise the first failed background write (finished ones are dropped from the queue)."""
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()

    def __call__(self, d: Mapping[str, Any]) -> None:
        step = int(d["i"])
        if self._last_step is None or step <= self._last_step:
            self._pass += 1
        self._last_step = step
        if step % self.every:
            return
        self._raise_failed()
        start = time.perf_counter()
        # UniPC's last step makes no model call and reports denoised None; its x is then the final sample
        latent = d["x"] if d.get("denoised") is None else d["denoised"]
        pictures = preview_image(self.method, latent, self.model, self.taesd, self.vae_tiling)
        self.seconds += time.perf_counter() - start
        for k, picture in enumerate(pictures):
            path = self.directory / self.name(step, k, len(pictures))
            if self._worker is None:
                self._write(picture, path)
            else:
                self._pending.append(self._worker.submit(self._write, picture, path))
            self.paths.append(path)

    def close(self) -> None:
        """Wait for the background writes and stop the worker; raise the first write error. Idempotent; nothing
        to do without `background`."""
        if self._worker is None:
            return
        pending, self._pending = self._pending, []
        self._worker.shutdown(wait=True)
        for future in pending:
            future.result()

    def __enter__(self) -> PreviewWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an error already propagates: still wait for the writes, but do not hide it behind a write error
            self.close()
        except Exception:  # noqa: BLE001
            pass
