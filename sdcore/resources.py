"""Memory a run needs, estimated before anything of that size is allocated, and memory available.

A run at a size that cannot fit would otherwise die deep inside the VAE or numpy (an `_ArrayMemoryError` traceback)
after loading the model; `check_fits` refuses it up front with one ValueError naming the size, the estimate and the
limit. The CLI calls it after reading the checkpoint's header, before the weights load; `processing`'s `validate`
calls `check_processing` for the Python API. No torch import here (the CUDA query imports it on use).

What the estimate counts (peak resident bytes above the loaded model, one image of the batch at a time through the
VAE, as `pipeline.encode` / `pipeline.decode` run it):

- VAE activations, the largest of
  - convolutions: `VAE_CONV_FACTOR x C x H x W x itemsize`, where `C x H x W` is the largest activation that enters
    a decoder level: for SD's VAE the 256 channels that the last up block receives, upsampled to full resolution
    (ch 128 x ch_mult[1] 2; the tiny model's 64). Live at once there: the upsampled input, the conv output and
    oneDNN's buffer, then in the first ResnetBlock its input, the GroupNorm and SiLU outputs and the conv output.
  - the mid-block self-attention over the `N = H/8 x W/8` latent cells: `models/vae.py` `AttnBlock` hands
    `scaled_dot_product_attention` contiguous q/k/v, so torch's CPU flash kernel runs in O(N) memory and
    `VAE_ATTENTION_MATERIALISED` is False. With the strided q/k/v the block passed before, torch materialised the
    N x N scores and their softmax, `VAE_ATTENTION_FACTOR x N^2 x itemsize` (2.4 GB at 1024 px, 39 GB at 2048 px:
    measured by scripts/bench_vae_tiling.py at 1024 px, strided against contiguous); the term is kept for a
    device whose kernel still materialises them.
- UNet activations on the 2 x batch rows of one CFG call, per latent cell: every skip connection kept for the
  output blocks (their channels, weighted by 1/4 per level down) plus `UNET_WORK_FACTOR` x the widest level's
  channels (ResBlock and transformer intermediates: GEGLU's 8C projection, attention outputs).
- pixel arrays: `PIXEL_BYTES` per pixel and batch image at the larger of the processing size and the init
  image's size (the PIL image, float32 [H,W,3] pixels, the [-1, 1] tensor, the decoded float image, its uint8
  copy, overlay and original RGBA copies, masks).

- a fixed part, `FIXED_BYTES`: first-call caches, allocator arenas, oneDNN scratch.

With VAE tiling (`models/vae_tiling.py`, `vae_tiled_bytes`) the VAE term is the tiled VAE's instead: two full
activations of the largest tiled level (the block input and its first convolution's output, or the input and the
output of a block that changes the channel count), the untiled latent-resolution stage, and the working set of one
tile. `vae_tiling_choice` tiles automatically when the untiled estimate does not fit in the memory available.

VAE and UNet run one after the other, so the peak is `fixed + pixels + max(VAE, UNet)`. The factors are measured
peaks (Linux VmHWM above the resident size just before the call, a fresh process per case) divided by the
formula's unit, for the tiny model's VAE (ch 32) and UNet, a reduced SD1 (VAE ch 64, UNet 32 channels) and SD1's
own VAE and UNet, at two or three sizes each, rounded up with a margin: `python scripts/bench_cli.py --memory`
prints measured next to estimated for every case, whole `process_images` runs included.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from .families import Family

GIB = 1 << 30

# Measured peak / unit (scripts/bench_cli.py --memory), with a margin; see the module docstring.
VAE_CONV_FACTOR = 6.0  # measured 3.6 .. 5.0 on ch 32 / 64 / 128 VAEs at 256 .. 768 px (peaks vary run to run)
VAE_ATTENTION_FACTOR = 3.0  # measured 2.3 .. 2.4 x N^2 x itemsize (scores, softmax and the math kernel's copies)
VAE_ATTENTION_MATERIALISED = False  # models/vae.py AttnBlock passes contiguous q/k/v -> the O(N) flash kernel
UNET_WORK_FACTOR = 48.0  # measured 29 .. 41 x the widest level's channels at 512 px (tiny, reduced, SD1 UNets)
PIXEL_BYTES = 96  # per pixel and batch image: every pixel array of a job alive at once would be about 80
FIXED_BYTES = 256 << 20  # what the factors leave at small sizes: up to ~140 MB (SD1 UNet, 256 px)
VAE_TILE_SIZE = 256  # pixels per tile edge of the tiled VAE (models/vae_tiling.py's default)
VAE_TILED_STATE_FACTOR = 1.25  # x the two full activations the tiled VAE keeps (vae_tiled_bytes); margin for the
# per-tile statistics' copies
VAE_TILE_FACTOR = 8.0  # x one tile's largest activation: the live copies of a fused upsample + ResnetBlock
# (the two tiled factors: SD's VAE decoding 1024 / 2048 px in 256 px tiles measured 1.52 / 4.47 GiB above the resident
# size before the call, estimated 1.77 / 5.52 GiB; scripts/bench_vae_tiling.py)

_ITEMSIZE = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "double": 8}


def itemsize(dtype: Any) -> int:
    """Bytes per element of a dtype given as a name ("float16") or a torch / numpy dtype."""
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    name = str(dtype).removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise ValueError(f"dtype: {dtype!r}; allowed: {', '.join(_ITEMSIZE)} or a torch dtype")
    return _ITEMSIZE[name]


def _vae_conv_unit(family: Family, width: int, height: int) -> int:
    """Elements of the largest activation entering a VAE level: max over levels l of channels x H x W / 4^l."""
    ch, mult = family.vae.ch, family.vae.ch_mult
    last = len(mult) - 1
    decoder = max(ch * mult[min(level + 1, last)] * (width >> level) * (height >> level) for level in range(last + 1))
    encoder = max(ch * m * (width >> level) * (height >> level) for level, m in enumerate(mult))
    return max(decoder, encoder)


def _latent_cells(family: Family, width: int, height: int) -> int:
    factor = 2 ** (len(family.vae.ch_mult) - 1)
    return (width // factor) * (height // factor)


def vae_bytes(family: Family, width: int, height: int, dtype: Any = "float32") -> int:
    """Peak activation bytes of one image's VAE encode or decode at `width x height` pixels (module docstring)."""
    size = itemsize(dtype)
    conv = VAE_CONV_FACTOR * _vae_conv_unit(family, width, height) * size
    cells = _latent_cells(family, width, height)
    attention = VAE_ATTENTION_FACTOR * cells * cells * size if VAE_ATTENTION_MATERIALISED else 0
    return int(max(conv, attention))


def _tiled_units(family: Family, width: int, height: int, tile_size: int) -> tuple[int, int, int]:
    """Elements of (the full activations the tiled VAE keeps at once, its untiled latent-resolution stage's conv
    unit, one tile's largest activation), per `models/vae_tiling.py`: at every level l but the last (pixels / 2^l,
    channels c_l = ch x ch_mult[l]), 2 c_l (a ResnetBlock's input and its first conv's output), or c_l plus the
    channels c_(l-1) of the encoder's level above (a block that changes the channel count: input and output).
    Tiles: min(tile_size, side) / 2^l + 4 cells a side at level l with the larger of c_l and c_(l+1) (an upsample
    fused in)."""
    ch, mult = family.vae.ch, family.vae.ch_mult
    last = len(mult) - 1
    state, tile = 0, 0
    for level in range(last):
        area = (width >> level) * (height >> level)
        c, above, below = ch * mult[level], ch * mult[max(level - 1, 0)], ch * mult[level + 1]
        state = max(state, area * max(2 * c, c + above))
        edges = [(min(tile_size, side) >> level) + 4 for side in (width, height)]
        tile = max(tile, max(c, below) * edges[0] * edges[1])
    return state, ch * mult[last] * _latent_cells(family, width, height), tile


def vae_tiled_bytes(family: Family, width: int, height: int, dtype: Any = "float32",
                    tile_size: int = VAE_TILE_SIZE) -> int:
    """Peak activation bytes of one image's tiled VAE encode or decode (`models/vae_tiling.py`, global statistics)
    at `width x height` pixels with `tile_size`-pixel tiles: `VAE_TILED_STATE_FACTOR x` the full activations it keeps
    (or the untiled latent stage's `VAE_CONV_FACTOR x` unit, whichever is larger) plus `VAE_TILE_FACTOR x` one
    tile's largest activation (`_tiled_units`). SD's VAE at 2048 px: 2 x 128 channels at full resolution, 4 GiB."""
    state, latent, tile = _tiled_units(family, width, height, tile_size)
    size = itemsize(dtype)
    return int((max(VAE_TILED_STATE_FACTOR * state, VAE_CONV_FACTOR * latent) + VAE_TILE_FACTOR * tile) * size)


def vae_tiling_choice(family: Family, width: int, height: int, requested: bool | None = None, *,
                      vae_dtype: Any = "float32", device: Any = "cpu", available: int | None = None
                      ) -> tuple[bool, str]:
    """(tile the VAE?, why) for one image of `width x height` pixels. `requested`: True / False (the caller's
    choice: `--vae-tiling` / `--no-vae-tiling`, `Options.vae_tiling`) or None = automatic: tile when the untiled
    VAE's estimate plus `FIXED_BYTES` and the pixel arrays (`vae_bytes`, `pixel_bytes`) exceeds `available`
    (default `available_bytes(device)`)."""
    if requested is not None:
        return bool(requested), "asked for" if requested else "turned off"
    need = FIXED_BYTES + pixel_bytes(width, height) + vae_bytes(family, width, height, vae_dtype)
    limit = available_bytes(device) if available is None else available
    if need > limit:
        return True, (f"automatic: the untiled VAE needs about {_gib(need)} at {width}x{height}, more than the "
                      f"{_gib(limit)} available")
    return False, f"automatic: the untiled VAE needs about {_gib(need)} at {width}x{height}, {_gib(limit)} available"


def _unet_per_cell(family: Family) -> float:
    """Channels per latent cell and UNet row: skip connections (1/4 per level down) + the working set."""
    u = family.unet
    widths = [u.model_channels * m for m in u.channel_mult]
    skips = u.model_channels + sum(u.num_res_blocks * c / 4 ** level + (c / 4 ** (level + 1) if level < len(widths) - 1
                                                                         else 0) for level, c in enumerate(widths))
    return skips + UNET_WORK_FACTOR * max(c / 4 ** level for level, c in enumerate(widths))


def unet_bytes(family: Family, width: int, height: int, batch_size: int = 1, dtype: Any = "float32") -> int:
    """Peak activation bytes of one UNet call on the 2 x batch_size rows of CFG (module docstring)."""
    return int(2 * batch_size * _latent_cells(family, width, height) * _unet_per_cell(family) * itemsize(dtype))


def pixel_bytes(width: int, height: int, batch_size: int = 1, image_size: tuple[int, int] | None = None) -> int:
    """Bytes of the pixel arrays of a batch: PIXEL_BYTES per pixel and image at the larger of the two sizes."""
    area = max(width * height, image_size[0] * image_size[1] if image_size else 0)
    return PIXEL_BYTES * area * batch_size


def estimate_parts(family: Family, width: int, height: int, batch_size: int = 1, dtype: Any = "float32", *,
                   vae_dtype: Any = "float32", image_size: tuple[int, int] | None = None,
                   vae_tiling: bool = False) -> dict[str, int]:
    """The terms of `estimate_bytes`, in bytes: "fixed", "pixels", "vae" (the tiled VAE's with `vae_tiling`),
    "unet"."""
    vae = vae_tiled_bytes(family, width, height, vae_dtype) if vae_tiling else vae_bytes(family, width, height,
                                                                                         vae_dtype)
    return {"fixed": FIXED_BYTES, "pixels": pixel_bytes(width, height, batch_size, image_size), "vae": vae,
            "unet": unet_bytes(family, width, height, batch_size, dtype)}


def estimate_bytes(family: Family, width: int, height: int, batch_size: int = 1, dtype: Any = "float32", *,
                   vae_dtype: Any = "float32", image_size: tuple[int, int] | None = None) -> int:
    """A conservative estimate of a run's peak memory above the loaded model, in bytes.

    `family`: the model's (`sdcore.families`); `width x height`: the processing size in pixels (the larger pass for
    the hires fix); `dtype`: the UNet's compute dtype; `vae_dtype`: the VAE's (float32 unless asked otherwise);
    `image_size`: the init image's (w, h) when it is larger than the processing size (its overlays are kept at that
    size). `FIXED_BYTES + pixels + max(VAE, UNet)`: the VAE and the UNet run one after the other (see the module
    docstring for each term and the measurements behind the factors).
    """
    parts = estimate_parts(family, width, height, batch_size, dtype, vae_dtype=vae_dtype, image_size=image_size)
    return parts["fixed"] + parts["pixels"] + max(parts["vae"], parts["unet"])


# ---------------------------------------------------------------------------------------------------------------
# Available memory


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """Bytes the process's cgroup still allows (v2 memory.max - memory.current, else v1), None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def _windows_available() -> int | None:
    """ullAvailPhys of GlobalMemoryStatusEx (Windows), else None."""
    if sys.platform != "win32":
        return None
    import ctypes  # lazy: Windows only

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                    ("available", ctypes.c_ulonglong), ("page_total", ctypes.c_ulonglong),
                    ("page_available", ctypes.c_ulonglong), ("virtual_total", ctypes.c_ulonglong),
                    ("virtual_available", ctypes.c_ulonglong), ("extended", ctypes.c_ulonglong)]

    status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return int(status.available)


def _physical_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


FALLBACK_BYTES = 4 * GIB  # when nothing can be read


def available_bytes(device: Any = "cpu") -> int:
    """Bytes a run may still allocate on `device`.

    CUDA: free device memory (`torch.cuda.mem_get_info`). Otherwise host memory: on Linux /proc/meminfo
    MemAvailable, lowered to the cgroup's remaining limit when there is one; on Windows the available physical
    memory; elsewhere (macOS: what is free is not exposed without a native call) half the physical memory, else
    FALLBACK_BYTES. Conservative on purpose: a refused run can be made smaller, a killed one has lost its work.
    """
    kind = str(getattr(device, "type", device)).split(":")[0]
    if kind == "cuda":
        import torch  # lazy: only a CUDA run asks, and it has imported torch already

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    found = _meminfo_available()
    if found is None:
        found = _windows_available()
    if found is None:
        physical = _physical_bytes()
        found = physical // 2 if physical else FALLBACK_BYTES
    headroom = _cgroup_headroom()
    return min(found, headroom) if headroom is not None else found


# ---------------------------------------------------------------------------------------------------------------
# Refusing what does not fit


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_fits(family: Family, width: int, height: int, batch_size: int = 1, dtype: Any = "float32", *,
               vae_dtype: Any = "float32", image_size: tuple[int, int] | None = None, device: Any = "cpu",
               available: int | None = None, vae_tiling: bool | None = None) -> int:
    """The estimate (`estimate_bytes`) if it fits in `available` (default `available_bytes(device)`), else
    ValueError naming width/height, the estimate and the limit. Nothing is allocated. The VAE term is the tiled
    VAE's when `vae_tiling_choice(..., vae_tiling)` tiles (True; None = automatic, when the untiled VAE does not
    fit)."""
    limit = available_bytes(device) if available is None else available
    tiled, _ = vae_tiling_choice(family, width, height, vae_tiling, vae_dtype=vae_dtype, available=limit)
    parts = estimate_parts(family, width, height, batch_size, dtype, vae_dtype=vae_dtype, image_size=image_size,
                           vae_tiling=tiled)
    need = parts["fixed"] + parts["pixels"] + max(parts["vae"], parts["unet"])
    if need > limit:
        image = f", init image {image_size[0]}x{image_size[1]}" if image_size else ""
        terms = ", ".join(f"{k}{' (tiled)' if k == 'vae' and tiled else ''} {_gib(v)}" for k, v in parts.items()
                          if k != "fixed")
        raise ValueError(f"width/height {width}x{height} (batch size {batch_size}{image}, {family.name}): needs about "
                         f"{_gib(need)} ({terms}; sdcore.resources.estimate_bytes), more than the {_gib(limit)} "
                         f"available on {getattr(device, 'type', device)}; use a smaller size or batch")
    return need


def check_processing(p, available: int | None = None, image_size: tuple[int, int] | None = None) -> None:
    """`check_fits` for a processing object (`StableDiffusionProcessing*`): its model's family, device and dtypes,
    its batch size, its width x height and, with the hires fix, the hires size; the first init image's size (or
    `image_size`, for a check made before the images are decoded)."""
    model = p.sd_model
    sizes = [(p.width, p.height)]
    if getattr(p, "enable_hr", False):
        sizes.append(p.hr_size())
    images = getattr(p, "init_images", None) or []
    size = (getattr(images[0], "size", None) if images else None) or image_size
    image_size = size if isinstance(size, tuple) and len(size) == 2 else None  # validate checks the type later
    for width, height in sizes:
        check_fits(model.family, width, height, p.batch_size, getattr(model, "dtype", "float32"),
                   vae_dtype=getattr(model, "vae_dtype", "float32"), image_size=image_size,
                   device=getattr(model, "device", "cpu"), available=available,
                   vae_tiling=getattr(getattr(p, "opts", None), "vae_tiling", None))
