"""Test oracles that cannot be imported the ordinary way.

`k_sampling()` loads k-diffusion's `k_diffusion/sampling.py` (and the `utils.py` it needs) from the installed
k-diffusion 0.1.1.post1 without running the package `__init__`, which imports optional heavy dependencies
(clip, wandb, accelerate, ...) that are not installed. A bare module object stands in for the `k_diffusion`
package, with the installed package directory as its `__path__`, so the relative import `from . import utils`
inside sampling.py resolves to the real file.

`patched_randn_like(sampling, draw)` replaces the `torch` name inside the oracle module by a proxy whose
`randn_like(x)` returns `draw(x)`, as A1111 does (`sd_samplers_common.Sampler.initialize`, a1111-semantics §6.5), so a
test can
feed the oracle the same noise sequence as an injected `noise_sampler`.

Only tests and audit scripts import this module; the sdcore package never does.
"""
from __future__ import annotations

import contextlib
import importlib
import math
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


class GaussianMixture:
    """Data distribution p0 = sum_k w_k N(mu_k, Sigma_k) in D dimensions, with closed-form denoiser and score.

    For x = x0 + sigma n, n ~ N(0, I): p_sigma = sum_k w_k N(mu_k, Sigma_k + sigma^2 I), and
        E[x0 | x] = sum_k r_k(x) (mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)),
        grad log p_sigma(x) = -sum_k r_k(x) (Sigma_k + sigma^2 I)^-1 (x - mu_k),
    with responsibilities r_k proportional to w_k N(x; mu_k, Sigma_k + sigma^2 I) (Bayes' rule for Gaussians).
    Computed in the eigenbasis of each Sigma_k = U diag(lam) U^T. float64 throughout.

    `denoise(x, sigma)` accepts x of shape [B, ...] with prod(...) = D and sigma a scalar or [B]; it is a valid
    k-diffusion model: `model(x, sigma) -> denoised`.
    """

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [K, D]
        self.covs = torch.as_tensor(covs, dtype=torch.float64)  # [K, D, D]
        self.lam, self.U = torch.linalg.eigh(self.covs)  # [K, D], [K, D, D]
        self.dim = self.means.shape[1]

    @classmethod
    def example(cls, dim: int = 4, components: int = 3, seed: int = 0, scale: float = 1.0,
                var_range=(0.05, 0.5)) -> "GaussianMixture":
        """A fixed random mixture: means ~ N(0, scale^2), random rotations, eigenvalues uniform in var_range."""
        g = torch.Generator().manual_seed(seed)
        weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
        means = torch.randn(components, dim, generator=g, dtype=torch.float64) * scale
        q, _ = torch.linalg.qr(torch.randn(components, dim, dim, generator=g, dtype=torch.float64))
        lo, hi = var_range
        lam = lo + (hi - lo) * torch.rand(components, dim, generator=g, dtype=torch.float64)
        covs = q @ torch.diag_embed(lam) @ q.transpose(-1, -2)
        return cls(weights / weights.sum(), means, covs)

    def _parts(self, x, sigma):
        shape = x.shape
        y = x.reshape(shape[0], -1).to(torch.float64)  # [B, D]
        s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2  # [B or 1, 1, 1]
        z = torch.einsum("kde,bkd->bke", self.U, y[:, None, :] - self.means[None])  # U^T (x - mu_k): [B, K, D]
        var = self.lam[None] + s2  # [B, K, D]
        log_p = (self.weights.log()[None] - 0.5 * (z ** 2 / var).sum(-1) - 0.5 * var.log().sum(-1)
                 - 0.5 * self.dim * math.log(2 * math.pi))
        return shape, z, var, torch.softmax(log_p, dim=1)  # r: [B, K]

    def denoise(self, x, sigma, **_):
        shape, z, var, r = self._parts(x, sigma)
        mean_k = self.means[None] + torch.einsum("kde,bke->bkd", self.U, z * self.lam[None] / var)
        return (r[..., None] * mean_k).sum(1).reshape(shape).to(x.dtype)

    __call__ = denoise

    def score(self, x, sigma):
        shape, z, var, r = self._parts(x, sigma)
        score_k = -torch.einsum("kde,bke->bkd", self.U, z / var)
        return (r[..., None] * score_k).sum(1).reshape(shape).to(x.dtype)

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self) -> torch.Tensor:
        mu = self.mean()
        d = self.means - mu
        return (self.weights[:, None, None] * (self.covs + d[:, :, None] * d[:, None, :])).sum(0)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n draws from p0: [n, D] float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        n01 = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[k] + torch.einsum("nde,ne->nd", chol[k], n01)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default dtype (k-diffusion builds some tensors with it, e.g. in DPMSolver)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
