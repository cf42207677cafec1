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
    `scaled_dot_product_attention` q/k/v whose last dimension is not contiguous, so torch takes the math kernel,
    which materialises the N x N scores and their softmax: `VAE_ATTENTION_FACTOR x N^2 x itemsize` (at 1024 px
    that is 2.4 GB, at 2048 px 39 GB: the attention, not the convolutions, limits large sizes; with contiguous
    q/k/v torch's flash kernel needs O(N) and `VAE_ATTENTION_MATERIALISED` becomes False).
- UNet activations on the 2 x batch rows of one CFG call, per latent cell: every skip connection kept for the
  output blocks (their channels, weighted by 1/4 per level down) plus `UNET_WORK_FACTOR` x the widest level's
  channels (ResBlock and transformer intermediates: GEGLU's 8C projection, attention outputs).
- pixel arrays: `PIXEL_BYTES` per pixel and batch image at the larger of the processing size and the init
  image's size (the PIL image, float32 [H,W,3] pixels, the [-1, 1] tensor, the decoded float image, its uint8
  copy, overlay and original RGBA copies, masks).

- a fixed part, `FIXED_BYTES`: first-call caches, allocator arenas, oneDNN scratch.

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
VAE_ATTENTION_MATERIALISED = True  # models/vae.py AttnBlock: q/k/v last-dim stride != 1 -> math SDPA kernel
UNET_WORK_FACTOR = 48.0  # measured 29 .. 41 x the widest level's channels at 512 px (tiny, reduced, SD1 UNets)
PIXEL_BYTES = 96  # per pixel and batch image: every pixel array of a job alive at once would be about 80
FIXED_BYTES = 256 << 20  # what the factors leave at small sizes: up to ~140 MB (SD1 UNet, 256 px)

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
                   vae_dtype: Any = "float32", image_size: tuple[int, int] | None = None) -> dict[str, int]:
    """The terms of `estimate_bytes`, in bytes: "fixed", "pixels", "vae", "unet"."""
    return {"fixed": FIXED_BYTES, "pixels": pixel_bytes(width, height, batch_size, image_size),
            "vae": vae_bytes(family, width, height, vae_dtype),
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
               available: int | None = None) -> int:
    """The estimate (`estimate_bytes`) if it fits in `available` (default `available_bytes(device)`), else
    ValueError naming width/height, the estimate and the limit. Nothing is allocated."""
    parts = estimate_parts(family, width, height, batch_size, dtype, vae_dtype=vae_dtype, image_size=image_size)
    need = parts["fixed"] + parts["pixels"] + max(parts["vae"], parts["unet"])
    limit = available_bytes(device) if available is None else available
    if need > limit:
        image = f", init image {image_size[0]}x{image_size[1]}" if image_size else ""
        terms = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if k != "fixed")
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
                   device=getattr(model, "device", "cpu"), available=available)
