"""Test oracles that cannot be imported the ordinary way.

`k_sampling()` loads k-diffusion's `k_diffusion/sampling.py` (and the `utils.py` it needs) from the installed
k-diffusion 0.1.1.post1 without running the package `__init__`, which imports optional heavy dependencies
(clip, wandb, accelerate, ...) that are not installed. A bare module object stands in for the `k_diffusion`
package, with the installed package directory as its `__path__`, so the relative import `from . import utils`
inside sampling.py resolves to the real file.

`patched_randn_like(sampling, draw)` replaces the `torch` name inside the oracle module by a proxy whose
`randn_like(x)` returns `draw(x)`, as A1111 does (`sd_samplers_common.Sampler.initialize`, spec 6.5), so a test can
feed the oracle the same noise sequence as an injected `noise_sampler`.

Only tests and audit scripts import this module; the sdcore package never does.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator

import torch

_PACKAGE = "k_diffusion"


def _bare_package() -> types.ModuleType:
    """Register a `k_diffusion` package module that has a `__path__` but never ran `__init__.py`."""
    existing = sys.modules.get(_PACKAGE)
    if existing is not None and hasattr(existing, "__path__"):
        return existing
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed in this environment (pip install --no-deps k-diffusion)")
    package = types.ModuleType(_PACKAGE)
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = _PACKAGE
    package.__file__ = spec.origin
    sys.modules[_PACKAGE] = package
    return package


def k_sampling() -> types.ModuleType:
    """Return k-diffusion's `sampling` module (k_diffusion/sampling.py), imported without the package __init__."""
    package = _bare_package()
    utils = importlib.import_module(f"{_PACKAGE}.utils")
    sampling = importlib.import_module(f"{_PACKAGE}.sampling")
    package.utils = utils
    package.sampling = sampling
    return sampling


class _TorchProxy:
    """Stands in for the `torch` module inside the oracle: `randn_like` is replaced, everything else forwarded."""

    def __init__(self, draw: Callable[[torch.Tensor], torch.Tensor]):
        self._draw = draw

    def randn_like(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._draw(x)

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextlib.contextmanager
def patched_randn_like(sampling: types.ModuleType,
                       draw: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Make every `torch.randn_like(x)` inside the oracle module `sampling` return `draw(x)`.

    Yields a list that records every tensor handed out (so a test can count the oracle's draws). The original
    `torch` binding is restored on exit, also after an exception.
    """
    drawn: list[torch.Tensor] = []

    def recording_draw(x: torch.Tensor) -> torch.Tensor:
        noise = draw(x)
        if noise.shape != x.shape:
            raise ValueError(f"draw returned shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
        drawn.append(noise)
        return noise.to(dtype=x.dtype, device=x.device)

    original = sampling.torch
    sampling.torch = _TorchProxy(recording_draw)
    try:
        yield drawn
    finally:
        sampling.torch = original


class NoiseSequence:
    """A fixed, pre-drawn sequence of noise tensors served in order.

    The same instance can be used as the oracle's `randn_like` replacement (`draw(x)`) and, after `reset()`, as a
    k-diffusion-style `noise_sampler(sigma, sigma_next)` for our samplers, so both consume identical noise.
    `generator`-seeded; every draw has `shape` and `dtype`. Raises IndexError if more than `count` draws are asked.
    """

    def __init__(self, shape, count: int, seed: int = 0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.noises = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(count)]
        self.index = 0

    def reset(self) -> "NoiseSequence":
        self.index = 0
        return self

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        if self.index >= len(self.noises):
            raise IndexError(f"noise sequence exhausted after {len(self.noises)} draws")
        noise = self.noises[self.index]
        self.index += 1
        return noise

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        return self.draw(None)
