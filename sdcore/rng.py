"""Seeds and per-image random numbers with A1111 v1.10.1 semantics (spec section 8).

Every image of a batch has its own seed and its own generator, so an image's noise does not depend on the batch it
is in. Three sources (a1111-semantics §8.3):
- "CPU": a `torch.Generator` on the CPU, the draws then moved to `device` (same numbers on every machine);
- "GPU": a `torch.Generator` on `device` itself (A1111's default; CUDA streams differ from CPU streams);
- "NV": `PhiloxGenerator`, a numpy reproduction of CUDA's `torch.randn` (Philox4x32-10 + Box-Muller), the same
  numbers on any machine as "GPU" gives on an NVIDIA card.

Glossary: shape `(C, H, W)` is one image's latent noise (C latent channels, H = height//8, W = width//8 latent
cells); batches are `[B, C, H, W]`; noise is float32 N(0, 1).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from numbers import Integral, Real

import numpy as np
import torch

SOURCES = ("CPU", "GPU", "NV")

# `random.randrange(4294967294)` in `modules/processing.py` `get_fixed_seed` (a1111-semantics §1).
RANDOM_SEED_BOUND = 4294967294

# Philox4x32-10 constants (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; CUDA curand).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers for counter words 0 and 2
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments (golden ratio, sqrt(3) - 1)
PHILOX_ROUNDS = 10
# Box-Muller scale constants as A1111's `rng_philox.py` stores them: float32 values, used in float64 arithmetic.
TWO_POW32_INV = float(np.float32(2.3283064e-10))
TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))

_MASK32 = np.uint64(0xFFFFFFFF)


def get_fixed_seed(seed: int | str | None, rand: random.Random | None = None) -> int:
    """Resolve a user seed (a1111-semantics §1 table; `modules/processing.py` `get_fixed_seed`).

    -1, "", None or a string that is not an int -> a random seed `rand.randrange(4294967294)`; an int string -> its
    value; any other int (or integral float) is returned unchanged. `rand` defaults to a fresh `random.Random()`
    seeded from the OS, so the global `random` state is never touched.

    Raises TypeError for other types, ValueError for a non-integral float.
    """
    if seed is None or seed == "":
        seed = -1
    elif isinstance(seed, str):
        try:
            seed = int(seed)
        except ValueError:
            seed = -1
    elif isinstance(seed, bool) or not isinstance(seed, (Integral, Real)):
        raise TypeError(f"seed must be an int, a str or None, got {type(seed).__name__}")
    elif not isinstance(seed, Integral):
        if seed != int(seed):
            raise ValueError(f"seed must be a whole number, got {seed!r}")
    seed = int(seed)
    if seed == -1:
        return (rand or random.Random()).randrange(RANDOM_SEED_BOUND)
    return seed


def seed_lists(seed: int, subseed: int, subseed_strength: float, batch_size: int,
               n_iter: int) -> tuple[list[int], list[int]]:
    """`all_seeds`, `all_subseeds` for `batch_size * n_iter` images (a1111-semantics §8.1; `process_images_inner`).

    `all_seeds[k] = seed + k` when `subseed_strength == 0`, else every entry is `seed` (variations of one image);
    `all_subseeds[k] = subseed + k`. Iteration n uses entries `[n*batch_size, (n+1)*batch_size)`. Example
    (a1111-semantics §13):
    seed 1000, batch 2, n_iter 2 -> 1000, 1001, 1002, 1003.
    """
    for name, value in (("batch_size", batch_size), ("n_iter", n_iter)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    n = batch_size * n_iter
    all_seeds = [int(seed) + (k if subseed_strength == 0 else 0) for k in range(n)]
    all_subseeds = [int(subseed) + k for k in range(n)]
    return all_seeds, all_subseeds


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of one image's noise `low` (seed) towards `high` (subseed) (a1111-semantics §8.2).

    Reference: `modules/rng.py` `slerp`, with its quirks kept: the vectors are the slices along **dim 1** (the H axis
    of a `(C, H, W)` tensor), normalised by their L2 norm; `dot = sum_H(low_n * high_n)` has shape `(C, W)`.
    If `mean(dot) > 0.9995` (nearly parallel) the result is `low*val + high*(1-val)` (weights swapped relative to the
    slerp); otherwise, with `omega = acos(dot)`,
    `sin((1-val)*omega)/sin(omega) * low + sin(val*omega)/sin(omega) * high`, broadcast over H.
    val = 0 -> low, val = 1 -> high. `low`, `high`: same shape, at least 2 dims.
    """
    if low.shape != high.shape:
        raise ValueError(f"slerp: low shape {tuple(low.shape)} differs from high shape {tuple(high.shape)}")
    if low.dim() < 2:
        raise ValueError(f"slerp needs at least 2 dims (vectors along dim 1), got shape {tuple(low.shape)}")
    low_n = low / torch.norm(low, dim=1, keepdim=True)
    high_n = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_n * high_n).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def _philox4x32(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 on N counters at once. counter: uint64 [4, N] holding 32-bit words; key: two uint64 words.

    One round, with 64-bit products `p0 = c0*M0`, `p2 = c2*M1`:
    `(c0, c1, c2, c3) <- (hi(p2) ^ c1 ^ k0, lo(p2), hi(p0) ^ c3 ^ k1, lo(p0))`; the key gets `+ (W0, W1)` mod 2^32
    after each of the first nine rounds.
    """
    c0, c1, c2, c3 = (counter[i].copy() for i in range(4))
    k0, k1 = key
    for r in range(PHILOX_ROUNDS):
        p0 = c0 * np.uint64(PHILOX_M0)  # < 2^64: a 32-bit word times a 32-bit constant
        p2 = c2 * np.uint64(PHILOX_M1)
        c0, c1, c2, c3 = (p2 >> np.uint64(32)) ^ c1 ^ k0, p2 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
        if r < PHILOX_ROUNDS - 1:
            k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
    return np.stack([c0, c1, c2, c3])


class PhiloxGenerator:
    """The "NV" source: CUDA `torch.randn` reproduced on the CPU with numpy (a1111-semantics §8.3; `modules/rng_philox.py`).

    State: `seed` (its 64 bits are the Philox key, low word first) and `offset` (0, +1 per draw). A draw of n numbers
    runs Philox4x32-10 on n counters `(offset, 0, i, 0)`, i = 0..n-1, and turns the first two output words of each
    into one normal number (the first of a Box-Muller pair):
    `u = c0 * 2^-32 + 2^-33`, `v = c1 * 2pi*2^-32 + pi*2^-32`, `z = sqrt(-2 ln u) * sin v`
    (with A1111's float32 constants, float64 arithmetic, result float32). Seed 0, shape (3, 4) starts
    -0.9246624, -0.42534396, -2.6438458, 0.14518388 (a1111-semantics §13). At most 2^32 numbers per draw.
    """

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise TypeError(f"PhiloxGenerator seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """The next draw: float32 array of `shape`, N(0, 1). Advances `offset` by 1."""
        shape = tuple(int(s) for s in shape)
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 2**32:
            raise ValueError(f"PhiloxGenerator draws at most 2^32 numbers at once, shape {shape} has {n}")
        counter = np.zeros((4, n), dtype=np.uint64)
        counter[0] = self.offset & 0xFFFFFFFF
        counter[2] = np.arange(n, dtype=np.uint64)
        self.offset += 1
        key64 = self.seed % 2**64  # two's complement for negative seeds, like torch's manual_seed
        key = np.array([key64 & 0xFFFFFFFF, key64 >> 32], dtype=np.uint64)
        words = _philox4x32(counter, key)
        u = words[0].astype(np.float64) * TWO_POW32_INV + TWO_POW32_INV / 2
        v = words[1].astype(np.float64) * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2
        z = np.sqrt(-2.0 * np.log(u)) * np.sin(v)
        return z.astype(np.float32).reshape(shape)


class _SeededSource:
    """One seeded stream of N(0, 1) float32 tensors from one of `SOURCES`, delivered on `device`."""

    def __init__(self, seed: int, source: str, device: torch.device):
        self.device = device
        if source == "NV":
            self.philox = PhiloxGenerator(seed)
            self.generator = None
        else:
            # A1111 `create_generator`: GPU = a generator on the job's device, except MPS (no seeded generators there).
            gen_device = torch.device("cpu") if source == "CPU" or device.type == "mps" else device
            self.philox = None
            self.generator = torch.Generator(gen_device).manual_seed(int(seed))

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.philox is not None:
            return torch.from_numpy(self.philox.randn(shape)).to(self.device)
        g = self.generator
        return torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).to(self.device)


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def _resolve_device(device: torch.device | str | None) -> torch.device:
    return torch.get_default_device() if device is None else torch.device(device)


def randn_local(seed: int, shape: Sequence[int], *, source: str = "CPU",
                device: torch.device | str | None = None) -> torch.Tensor:
    """The first draw of a fresh generator seeded with `seed`: float32 N(0, 1) of `shape` on `device` (a1111-semantics §8.2).

    Reference: `modules/rng.py` `randn_local` (what A1111 patches into torchsde's Brownian tree) and `randn` (its
    global-RNG draws: a fresh seed followed by one draw gives the same numbers). `device` None = torch's default device.
    """
    _check_source(source)
    return _SeededSource(seed, source, _resolve_device(device)).draw(tuple(int(s) for s in shape))


VAE_STREAM = 1  # the stream index of the VAE posterior sample; the image's sampling noise is stream 0 (the seed)


def stream_seed(seed: int, stream: int) -> int:
    """A 32-bit seed for stream `stream` of image seed `seed`, independent of the seed's own stream.

    numpy's `SeedSequence([seed mod 2^64, stream])` hashes the pair (O'Neill's seed_seq mixing), so streams of one
    seed, and of neighbouring seeds, share no generator state. sdcore uses it for the VAE posterior sample (stream
    `VAE_STREAM`): A1111 draws that sample from the unseeded global RNG; drawing it from the image seed itself would
    make `(sample - mean) / std` equal the initial noise (a1111-semantics §2.7, sdcore deviates).
    """
    return int(np.random.SeedSequence([int(seed) % 2**64, int(stream)]).generate_state(1, np.uint32)[0])


def vae_sample_noise(seeds: Sequence[int], shape: Sequence[int], *, source: str = "CPU",
                     device: torch.device | str | None = None) -> torch.Tensor:
    """N(0, 1) float32 [B, *shape] for the VAE posterior samples of B images: image i draws from a fresh generator
    of `source` ("CPU", "GPU" = `device`, "NV" = Philox) seeded `stream_seed(seeds[i], VAE_STREAM)`."""
    return torch.stack([randn_local(stream_seed(s, VAE_STREAM), shape, source=source, device=device) for s in seeds])


def centre_paste(noise: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Copy the centre of `noise` (C, h0, w0) into the centre of a copy of `target` (C, H, W) (a1111-semantics §8.2, seed resize).

    With `dx = (W - w0)//2` and `dy = (H - h0)//2`: the pasted window is `w = w0` if `dx >= 0` else `w0 + 2*dx`
    (same for h), placed at `(max(dx, 0), max(dy, 0))` in the target and read from `(max(-dx, 0), max(-dy, 0))` in the
    noise. From 32x32 into 64x64: noise at [16:48, 16:48]; from 96x96 into 64x64: window [16:80] of the noise fills all.
    """
    _, h0, w0 = noise.shape
    _, height, width = target.shape
    dx, dy = (width - w0) // 2, (height - h0) // 2
    w = w0 if dx >= 0 else w0 + 2 * dx
    h = h0 if dy >= 0 else h0 + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out = target.clone()
    out[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return out


class ImageRNG:
    """Per-image seeded noise for one batch, A1111's `modules/rng.py` `ImageRNG` (a1111-semantics §8.2).

    `shape` = one image's `(C, H, W)` in latent cells; `seeds` one int per image (B images). `next()` returns
    `[B, C, H, W]` float32 on `device` (None = torch's default device).

    First `next()` (the initial noise), per image i with generator g_i (seeded `seeds[i]`):
    - `noise_shape = (C, seed_resize_from_h//8, seed_resize_from_w//8)` when both resize values are > 0, else `shape`;
    - with subseeds and `subseed_strength != 0`: `subnoise` = first draw of a fresh generator seeded `subseeds[i]`
      (0 when the list is shorter than the batch), shape `noise_shape`;
    - main noise: g_i's first draw of `shape`, or, when `noise_shape != shape`, a fresh generator's first draw of
      `noise_shape` for the same seed;
    - `noise = slerp(subseed_strength, noise, subnoise)` when there is a subnoise;
    - when `noise_shape != shape`: g_i draws a full `shape` tensor and `centre_paste` puts `noise` into its centre.
    Then, if `eta_noise_seed_delta != 0`, every g_i is replaced by a generator seeded `seeds[i] + ENSD`.
    Later `next()` calls: each g_i draws a fresh `shape` tensor (the sampler's per-step noise).

    `on_draw(name, noise)`, when given, is told the draws of the first `next()` (for noise fingerprints,
    `sdcore.sampling.samplers.TraceRecorder`), each stacked over the batch: with variations or a seed resize the
    separate generator draws "seed_noise" (the seed's draw of `noise_shape`), "subseed_noise" and
    "seed_resize_base" (the full-shape draw the resized noise is pasted into); always "initial_noise" (the result).
    """

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from_h: int = 0, seed_resize_from_w: int = 0,
                 source: str = "CPU", device: torch.device | str | None = None, eta_noise_seed_delta: int = 0,
                 on_draw: Callable[[str, torch.Tensor], None] | None = None):
        shape = tuple(shape)
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in shape):
            raise ValueError(f"shape must be (C, H, W) with positive ints (latent cells), got {shape!r}")
        if len(seeds) == 0:
            raise ValueError("seeds must hold one int per image, got an empty list")
        for name, values in (("seeds", seeds), ("subseeds", subseeds or [])):
            if any(isinstance(s, bool) or not isinstance(s, Integral) for s in values):
                raise TypeError(f"{name} must be ints, got {list(values)!r}")
        if isinstance(subseed_strength, bool) or not isinstance(subseed_strength, Real) \
                or not 0.0 <= subseed_strength <= 1.0:
            raise ValueError(f"subseed_strength must be a real number in [0, 1], got {subseed_strength!r}")
        if isinstance(eta_noise_seed_delta, bool) or not isinstance(eta_noise_seed_delta, Integral):
            raise TypeError(f"eta_noise_seed_delta must be an int, got {eta_noise_seed_delta!r}")
        _check_source(source)
        if seed_resize_from_h > 0 and seed_resize_from_w > 0 and (seed_resize_from_h < 8 or seed_resize_from_w < 8):
            raise ValueError(f"seed_resize_from_h/w must be >= 8 pixels (one latent cell) when enabled, got "
                             f"{seed_resize_from_h}x{seed_resize_from_w}")
        self.shape = tuple(int(s) for s in shape)
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.source = source
        self.device = _resolve_device(device)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta)
        self.generators = [_SeededSource(seed, source, self.device) for seed in self.seeds]
        self.on_draw = on_draw
        self.is_first = True

    def _fresh(self, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        return _SeededSource(seed, self.source, self.device).draw(shape)

    def first(self) -> torch.Tensor:
        """The initial noise `[B, C, H, W]` (see the class docstring); normally reached through `next()`."""
        if self.seed_resize_from_h > 0 and self.seed_resize_from_w > 0:
            noise_shape = (self.shape[0], self.seed_resize_from_h // 8, self.seed_resize_from_w // 8)
        else:
            noise_shape = self.shape
        resized = noise_shape != self.shape
        use_subseed = self.subseeds is not None and self.subseed_strength != 0
        xs = []
        parts: dict[str, list[torch.Tensor]] = {"seed_noise": [], "subseed_noise": [], "seed_resize_base": []}
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if use_subseed:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                subnoise = self._fresh(subseed, noise_shape)
                parts["subseed_noise"].append(subnoise)
            noise = self._fresh(seed, noise_shape) if resized else generator.draw(self.shape)
            if subnoise is not None or resized:
                parts["seed_noise"].append(noise)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if resized:
                base = generator.draw(self.shape)
                parts["seed_resize_base"].append(base)
                noise = centre_paste(noise, base)
            xs.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = [_SeededSource(seed + self.eta_noise_seed_delta, self.source, self.device)
                               for seed in self.seeds]
        noise = torch.stack(xs)
        if self.on_draw is not None:
            for name, draws in parts.items():
                if draws:
                    self.on_draw(name, torch.stack(draws))
            self.on_draw("initial_noise", noise)
        return noise

    def next(self) -> torch.Tensor:
        """The initial noise on the first call, then each image generator's next `(C, H, W)` draw, stacked."""
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([generator.draw(self.shape) for generator in self.generators])
