"""k-diffusion samplers, written out to be read, plus A1111's sampler table.

Every sampler has k-diffusion's contract (STYLE.md 5):

    sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *, options...)

- `model(x, sigma, **extra_args) -> denoised`: the denoiser D(x; sigma), an estimate of the clean x0 (latent cells,
  same shape and dtype as x). `sigma` is a [B] tensor.
- `x`: [B, ...] (for Stable Diffusion [B, 4, H/8, W/8]), already noised to `sigmas[0]`.
- `sigmas`: 1-D tensor of noise levels (standard deviations in k-diffusion's variance-exploding parameterisation
  x = x0 + sigma * n), decreasing, usually ending in 0. img2img is a tail slice of the txt2img schedule.
- `noise_sampler(sigma, sigma_next) -> Tensor like x`: the only source of randomness. k-diffusion calls
  `torch.randn_like` on the global RNG, which A1111 routes to per-image seeded generators (a1111-semantics §6.5); here every
  draw is injected, in the same number and order as k-diffusion, so per-image noise streams line up with A1111.
  A sampler raises ValueError when a draw is needed (non-zero noise multiplier) and `noise_sampler` is None; with a
  noise_sampler it also makes k-diffusion's unused draws (e.g. the churn noise of Euler when gamma = 0).
- `callback({'x', 'i', 'sigma', 'sigma_hat', 'denoised'})` once per step, before the update, as k-diffusion.
- Returns x at sigmas[-1] (the sample when that is 0).

Glossary: B batch size; sigma noise level; t = -log(sigma), DPM-Solver's time variable lambda = log(alpha/sigma)
(half the log-SNR) with alpha = 1; h = t_next - t the step in t; D = denoised; d = (x - D) / sigma the
probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3 with sigma(t) = t).

Papers: Karras et al. 2022 "Elucidating the Design Space of Diffusion-Based Generative Models" (arXiv:2206.00364);
Lu et al. 2022 "DPM-Solver" (arXiv:2206.00927) and "DPM-Solver++" (arXiv:2211.01095); Xu et al. 2023 "Restart
Sampling for Improving Generative Processes" (arXiv:2306.14878); Luo et al. 2023 "Latent Consistency Models"
(arXiv:2310.04378). Update rules follow k-diffusion 0.1.1 `k_diffusion/sampling.py` (checked by tests/test_samplers.py
to 1e-6 in float64); Restart and LCM follow A1111 `modules/sd_samplers_extra.py` and `sd_samplers_lcm.py`.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm, trange

from .schedules import SCHEDULERS

from .schedules import get_sigmas_karras

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- shared pieces -----------------------------------------------------------------------------------------------------

def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative dx/dsigma = (x - D) / sigma (Karras et al. 2022 eq. 3); A1111's form, no append_dims (a1111-semantics §7.1).

    `sigma` is a scalar (0-dim tensor or float); x and denoised have the same shape.
    """
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split an ancestral step sigma_from -> sigma_to into a deterministic step to sigma_down and fresh noise sigma_up.

    sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)),
    sigma_down = sqrt(sigma_to^2 - sigma_up^2), so sigma_down^2 + sigma_up^2 = sigma_to^2 (eta = 1 is the DDPM
    posterior variance in the VE parameterisation). eta = 0 -> (sigma_to, 0.0). k-diffusion `get_ancestral_step`.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _t(sigma: torch.Tensor) -> torch.Tensor:
    """DPM-Solver time t = -log(sigma) (sigma = 0 -> +inf)."""
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    """Inverse of `_t`: sigma = exp(-t)."""
    return t.neg().exp()


def _add_noise(x, scale, noise_sampler: NoiseSampler | None, sigma, sigma_next, sampler: str):
    """x + z * scale, z = noise_sampler(sigma, sigma_next), at a place where k-diffusion draws noise.

    With a noise_sampler the draw always happens, also when scale is 0 (keeps the per-image noise streams aligned
    with A1111). Without one, a zero-scale draw is skipped and a needed one raises ValueError.
    """
    needed = bool(scale != 0)
    if noise_sampler is None:
        if needed:
            raise ValueError(f"{sampler}: noise_sampler is None, but this step adds random noise (sigma "
                             f"{float(sigma):g} -> {float(sigma_next):g}); pass noise_sampler(sigma, sigma_next) -> "
                             "Tensor like x, e.g. BrownianTreeNoiseSampler or a per-image seeded generator")
        return x
    noise = noise_sampler(sigma, sigma_next)
    return x + noise * scale if needed else x


def _report(callback, x, i, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _show_sigma(bar, sigma) -> None:
    """Put the noise level x has reached into a tqdm bar's postfix, without a refresh (no terminal write: the bar
    shows it at its next rate-limited update, beside it/s)."""
    if not bar.disable:
        bar.set_postfix(sigma=f"{float(sigma):.4g}", refresh=False)


def _steps(sigmas, disable):
    """Step indices 0 .. len(sigmas) - 2 under a tqdm bar (k-diffusion's `trange`) showing it/s and the current
    sigma: sigmas[i + 1] once step i is done."""
    bar = trange(len(sigmas) - 1, disable=disable)
    for i in bar:
        yield i
        _show_sigma(bar, sigmas[i + 1])


def _setup(x, sigmas, extra_args, sampler: str):
    """Check the sigmas; return (extra_args or {}, s_in = ones [B]) as every k-diffusion sampler starts."""
    _check_sigmas(sigmas, sampler)
    return ({} if extra_args is None else extra_args), x.new_ones([x.shape[0]])


def _check_sigmas(sigmas: torch.Tensor, sampler: str) -> None:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"{sampler}: sigmas must be a 1-D tensor with at least 2 noise levels, got "
                         f"{getattr(sigmas, 'shape', type(sigmas).__name__)}")
    if bool((sigmas < 0).any()):
        raise ValueError(f"{sampler}: sigmas must be >= 0, got min {float(sigmas.min()):g}")


def _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, sampler):
    """Karras et al. 2022 Algorithm 2 lines 4-6: raise the noise level sigma_i to sigma_hat = sigma_i (1 + gamma).

    gamma = min(s_churn / N, sqrt(2) - 1) inside [s_tmin, s_tmax], else 0; x += eps * s_noise *
    sqrt(sigma_hat^2 - sigma_i^2). k-diffusion draws eps every step, also when gamma = 0 (a1111-semantics §10.1).
    """
    sigma = sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    return _add_noise(x, s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5, noise_sampler, sigma, sigmas[i + 1],
                      sampler), sigma_hat


# -- Karras et al. 2022 ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler steps on the probability-flow ODE, with optional churn: Karras et al. 2022, Algorithm 2 (Euler only).

    x_{i+1} = x + d (sigma_{i+1} - sigma_hat), d = (x - D(x, sigma_hat)) / sigma_hat. One model call per step.
    """
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_euler")
    for i in _steps(sigmas, disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, "sample_euler")
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                           eta=1.0, s_noise=1.0):
    """Ancestral Euler ("Euler a"): an Euler step to sigma_down, then fresh noise of std sigma_up.

    The ancestral split (`get_ancestral_step`) reproduces the DDPM reverse step (Ho et al. 2020) in the VE
    parameterisation. Noise is drawn whenever sigma_{i+1} > 0 (k-diffusion `sample_euler_ancestral`).
    """
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_euler_ancestral")
    for i in _steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = _add_noise(x, s_noise * sigma_up, noise_sampler, sigmas[i], sigmas[i + 1], "sample_euler_ancestral")
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's method (explicit trapezoid) on the probability-flow ODE: Karras et al. 2022, Algorithm 2.

    Predictor x_2 = x + d dt, corrector x += (d + d(x_2, sigma_{i+1})) / 2 * dt; a plain Euler step when
    sigma_{i+1} = 0 (d is undefined there). Two model calls per step, one on the last.
    """
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_heun")
    for i in _steps(sigmas, disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, "sample_heun")
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = _heun_step(model, x, d, sigma_hat, sigmas[i + 1], s_in, extra_args)
    return x


def _heun_step(model, x, d, sigma, sigma_next, s_in, extra_args):
    """One Heun step sigma -> sigma_next given d = dx/dsigma at (x, sigma) (Karras et al. 2022, Algorithm 2 lines
    7-11): predictor x_2 = x + d dt, corrector x + (d + d(x_2, sigma_next)) / 2 dt; Euler when sigma_next = 0."""
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next * s_in, **extra_args))
    return x + (d + d_2) / 2 * dt


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """"DPM2": the explicit midpoint method in sigma with the midpoint taken in log sigma.

    A second-order step inspired by DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r1 = 1/2) inside Karras et al.'s
    Algorithm 2: sigma_mid = sqrt(sigma_hat * sigma_{i+1}), x_2 = x + d (sigma_mid - sigma_hat),
    x += d(x_2, sigma_mid) (sigma_{i+1} - sigma_hat). Euler on the last step (sigma_{i+1} = 0).
    """
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_dpm_2")
    for i in _steps(sigmas, disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, "sample_dpm_2")
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                           eta=1.0, s_noise=1.0):
    """"DPM2 a": the DPM2 midpoint step to sigma_down, then ancestral noise sigma_up (see `get_ancestral_step`).

    As k-diffusion, noise is added only after a midpoint step (sigma_down > 0), so never on the last step.
    """
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_dpm_2_ancestral")
    for i in _steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = _add_noise(x, s_noise * sigma_up, noise_sampler, sigmas[i], sigmas[i + 1], "sample_dpm_2_ancestral")
    return x


def linear_multistep_coeff(order: int, t, i: int, j: int) -> float:
    """Adams-Bashforth weight of the derivative from step i - j, for a step t[i] -> t[i+1] on an uneven grid.

    Integral over [t[i], t[i+1]] of the Lagrange basis polynomial through the nodes t[i], ..., t[i-order+1] that is
    1 at t[i-j] (scipy quad, epsrel 1e-4 as k-diffusion; exact for these low-degree polynomials). `t` is a numpy
    array of sigmas. Raises ValueError if fewer than `order` past steps exist.
    """
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    from scipy import integrate  # lazy: ~1.5 s to import, only LMS needs it

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *, order=4):
    """Linear multistep (Adams-Bashforth in sigma) on the probability-flow ODE, k-diffusion `sample_lms`.

    x_{i+1} = x_i + sum_j c_ij d_{i-j}, j < min(i + 1, order), with c_ij from `linear_multistep_coeff`; the first
    steps use the lower orders available. One model call per step.
    """
    if int(order) != order or order < 1:
        raise ValueError(f"sample_lms: order must be an integer >= 1, got {order!r}")
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_lms")
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds = []
    for i in _steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


# -- DPM-Solver (Lu et al. 2022, arXiv:2206.00927), noise-prediction form ----------------------------------------------

class PIDStepSizeController:
    """PID step-size control for `DPMSolver.dpm_solver_adaptive` (k-diffusion `PIDStepSizeController`).

    factor = limiter(e0^b1 e1^b2 e2^b3) with e = 1 / (error + eps) of the last three accepted steps and
    limiter(f) = 1 + atan(f - 1) (Söderlind and Wang 2006, "Adaptive time-stepping and computational stability").
    `propose_step(error)` scales h and returns whether the step is accepted (factor >= accept_safety).
    """

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []

    def propose_step(self, error) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


class DPMSolver:
    """DPM-Solver-1/2/3 steps in t = -log sigma on eps = (x - D) / sigma (Lu et al. 2022, Algorithms 1-2).

    With x = x0 + sigma eps, dx/dsigma = eps and dsigma/dt = -sigma, so the exact solution from t to t' = t + h is
        x(t') = x(t) - int_t^t' e^-tau eps(tau) dtau.
    Holding eps constant: x(t') = x - (sigma - sigma') eps = x - sigma' expm1(h) eps (DPM-Solver-1 = DDIM); the
    2nd/3rd-order steps add terms from a Taylor expansion of eps in t. `eps_callback()` is called per model
    evaluation, `info_callback(dict)` per step. k-diffusion `DPMSolver`.
    """

    def __init__(self, model, extra_args=None, eps_callback=None, info_callback=None):
        self.model = model
        self.extra_args = {} if extra_args is None else extra_args
        self.eps_callback = eps_callback
        self.info_callback = info_callback

    def eps(self, eps_cache: dict, key: str, x, t):
        """eps(x, t) = (x - D(x, sigma(t))) / sigma(t), cached under `key` within one step."""
        if key in eps_cache:
            return eps_cache[key], eps_cache
        sigma = _sigma(t) * x.new_ones([x.shape[0]])
        eps = (x - self.model(x, sigma, **self.extra_args)) / _sigma(t)
        if self.eps_callback is not None:
            self.eps_callback()
        return eps, {key: eps, **eps_cache}

    def dpm_solver_1_step(self, x, t, t_next, eps_cache=None):
        # x' = x - sigma' expm1(h) eps: exact for constant eps, since sigma' e^h = sigma (a DDIM step).
        eps, eps_cache = self.eps(eps_cache or {}, "eps", x, t)
        return x - _sigma(t_next) * (t_next - t).expm1() * eps, eps_cache

    def dpm_solver_2_step(self, x, t, t_next, r1=1 / 2, eps_cache=None):
        # DPM-Solver-2 (Algorithm 1): a first-order step to s = t + r1 h, then eps' ~ (eps_s - eps) / (r1 h) gives
        # the second-order term sigma' (e^h - 1) / (2 r1) (eps_s - eps).
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache or {}, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, "eps_r1", u1, s1)
        x_2 = x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        return x_2, eps_cache

    def dpm_solver_3_step(self, x, t, t_next, r1=1 / 3, r2=2 / 3, eps_cache=None):
        # DPM-Solver-3 (Algorithm 2): phi_2(z) = (e^z - 1) / z - 1 weights the first-derivative estimates
        # (eps_r - eps) / r at s1 = t + r1 h and s2 = t + r2 h.
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache or {}, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, "eps_r1", u1, s1)
        phi_2_r2 = (r2 * h).expm1() / (r2 * h) - 1
        u2 = x - _sigma(s2) * (r2 * h).expm1() * eps - _sigma(s2) * (r2 / r1) * phi_2_r2 * (eps_r1 - eps)
        eps_r2, eps_cache = self.eps(eps_cache, "eps_r2", u2, s2)
        phi_2 = h.expm1() / h - 1
        x_3 = x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * phi_2 * (eps_r2 - eps)
        return x_3, eps_cache

    def _ancestral(self, t, t_next, t_end, eta):
        """(t of sigma_down clamped to t_end, sigma_up recomputed from the clamped level) or (t_next, 0)."""
        if not eta:
            return t_next, 0.0
        sigma_down, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_down = torch.minimum(t_end, _t(sigma_down))
        return t_down, (_sigma(t_next) ** 2 - _sigma(t_down) ** 2) ** 0.5

    def _info(self, x, i, t, t_up, denoised, **extra):
        if self.info_callback is not None:
            self.info_callback({"x": x, "i": i, "t": t, "t_up": t_up, "denoised": denoised, **extra})

    def dpm_solver_fast(self, x, t_start, t_end, nfe, eta=0.0, s_noise=1.0, noise_sampler=None):
        """DPM-Solver-fast (Lu et al. 2022, section 3.4): m = nfe // 3 + 1 equal steps in t; order-3 steps with a
        final order-2+1 pair (nfe % 3 == 0) or one order-(nfe % 3) step, so exactly `nfe` model calls."""
        if not t_end > t_start and eta:
            raise ValueError("eta must be 0 for reverse sampling")
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(float(t_start), float(t_end), m + 1, dtype=x.dtype, device=x.device)
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        steps = {1: self.dpm_solver_1_step, 2: self.dpm_solver_2_step, 3: self.dpm_solver_3_step}
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            t_down, sigma_up = self._ancestral(t, t_next, t_end, eta)
            eps, eps_cache = self.eps({}, "eps", x, t)
            self._info(x, i, ts[i], t, x - _sigma(t) * eps)
            x, _ = steps[order](x, t, t_down, eps_cache=eps_cache)
            x = _add_noise(x, sigma_up * s_noise, noise_sampler, _sigma(t), _sigma(t_next), "sample_dpm_fast")
        return x

    def dpm_solver_adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0,
                            icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None):
        """DPM-Solver-12 / -23 (Lu et al. 2022, section 3.4 and Appendix C): embedded pair of orders (1, 2) or (2, 3),
        error = RMS((x_low - x_high) / max(atol, rtol * max(|x_low|, |x_prev|))), step size from
        `PIDStepSizeController`. Returns (x, info) with info = steps, nfe, n_accept, n_reject."""
        if order not in {2, 3}:
            raise ValueError(f"order should be 2 or 3, got {order!r}")
        forward = t_end > t_start
        if not forward and eta:
            raise ValueError("eta must be 0 for reverse sampling")
        atol, rtol = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (atol, rtol))
        s, x_prev = t_start, x
        pid = PIDStepSizeController(abs(h_init) * (1 if forward else -1), pcoeff, icoeff, dcoeff,
                                    1.5 if eta else order, accept_safety)
        info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            t_down, sigma_up = self._ancestral(s, t, t_end, eta)
            eps, eps_cache = self.eps({}, "eps", x, s)
            denoised = x - _sigma(s) * eps
            if order == 2:
                x_low, eps_cache = self.dpm_solver_1_step(x, s, t_down, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_2_step(x, s, t_down, eps_cache=eps_cache)
            else:
                x_low, eps_cache = self.dpm_solver_2_step(x, s, t_down, r1=1 / 3, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_3_step(x, s, t_down, eps_cache=eps_cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            accept = pid.propose_step(error)
            if accept:
                x_prev = x_low
                x = _add_noise(x_high, sigma_up * s_noise, noise_sampler, _sigma(s), _sigma(t), "sample_dpm_adaptive")
                s = t
            info["n_accept" if accept else "n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            self._info(x, info["steps"] - 1, s, s, denoised, error=error, h=pid.h, **info)
        return x, info


def _dpm_solver_setup(model, x, sigma_min, sigma_max, extra_args, callback, pbar, sampler):
    if float(sigma_min) <= 0 or float(sigma_max) <= 0:
        raise ValueError(f"{sampler}: sigma_min and sigma_max must be > 0, got {float(sigma_min):g}, "
                         f"{float(sigma_max):g}")
    solver = DPMSolver(model, extra_args, eps_callback=pbar.update)
    if callback is not None:
        solver.info_callback = lambda info: callback(
            {"sigma": _sigma(info["t"]), "sigma_hat": _sigma(info["t_up"]), **info})
    as_t = lambda sigma: _t(torch.as_tensor(sigma, dtype=x.dtype, device=x.device))  # noqa: E731
    return solver, as_t(sigma_max), as_t(sigma_min)


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None,
                    noise_sampler=None, *, eta=0.0, s_noise=1.0):
    """DPM-Solver-fast with `n` model calls from sigma_max down to sigma_min (> 0); see `DPMSolver.dpm_solver_fast`.

    k-diffusion's signature: (sigma_min, sigma_max, n) instead of sigmas (A1111 passes the last non-zero and the
    first sigma of the schedule and n = len(sigmas) - 1, a1111-semantics §6.3). Returns x at sigma_min (no final step to 0).
    """
    with tqdm(total=n, disable=disable) as pbar:
        solver, t_start, t_end = _dpm_solver_setup(model, x, sigma_min, sigma_max, extra_args, callback, pbar,
                                                   "sample_dpm_fast")
        return solver.dpm_solver_fast(x, t_start, t_end, n, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None,
                        noise_sampler=None, *, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0,
                        dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0, return_info=False):
    """DPM-Solver-12/23 with adaptive step size from sigma_max to sigma_min; see `DPMSolver.dpm_solver_adaptive`.

    The error norm is taken over the whole batch, so the images of a batch are not independent (as k-diffusion).
    Returns x at sigma_min, or (x, info) with `return_info`.
    """
    with tqdm(disable=disable) as pbar:
        solver, t_start, t_end = _dpm_solver_setup(model, x, sigma_min, sigma_max, extra_args, callback, pbar,
                                                   "sample_dpm_adaptive")
        x, info = solver.dpm_solver_adaptive(x, t_start, t_end, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff,
                                             accept_safety, eta, s_noise, noise_sampler)
    return (x, info) if return_info else x


# -- DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), data-prediction form ---------------------------------------------
#
# With x = x0 + sigma n and t = -log sigma, the probability-flow ODE dx/dsigma = (x - D) / sigma has the exact
# solution  x(t') = (sigma'/sigma) x(t) + sigma' int_t^t' e^tau D(tau) dtau.  Holding D constant:
#   sigma' (e^t' - e^t) D = (1 - sigma'/sigma) D = -expm1(-h) D,   h = t' - t,
# the first-order DPM-Solver++ step (= DDIM). The SDE variants add eta: x(t') = (sigma'/sigma) e^(-eta h) x +
# (1 - e^(-(1 + eta) h)) D + sigma' sqrt(1 - e^(-2 eta h)) z  (z ~ N(0, I)).

@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                              eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step second order (Lu et al. 2022b, Algorithm 1, r = 1/2) to sigma_down, then
    ancestral noise sigma_up (eta = 0: deterministic). Euler on the last step (sigma_down = 0)."""
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_dpmpp_2s_ancestral")
    for i in _steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            # DPM-Solver++(2S), r = 1/2: the first-order step (block comment above) to s = t + h/2 gives x_2; the
            # full step then uses D(x_2, sigma(s)), which is second-order accurate at the midpoint.
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma(s) * s_in, **extra_args)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = _add_noise(x, s_noise * sigma_up, noise_sampler, sigmas[i], sigmas[i + 1], "sample_dpmpp_2s_ancestral")
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                     eta=1.0, s_noise=1.0, r=1 / 2):
    """DPM-Solver++ stochastic, second order, single step (k-diffusion `sample_dpmpp_sde`).

    Stage 1: an ancestral first-order step from sigma to sigma_s, t_s = t + r h (noise draw 1). Stage 2: an
    ancestral first-order step from sigma to sigma_{i+1} using D_d = (1 - 1/(2r)) D + 1/(2r) D_s (noise draw 2),
    the DPM-Solver++(2S) combination. Two draws and two model calls per step; Euler on the last step.
    """
    if not r > 0:
        raise ValueError(f"sample_dpmpp_sde: r must be > 0, got {r!r}")
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_dpmpp_sde")
    fac = 1 / (2 * r)
    for i in _steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        s = t + (t_next - t) * r
        x_2 = _dpmpp_ancestral_step(x, t, s, denoised, eta, s_noise, noise_sampler)
        denoised_2 = model(x_2, _sigma(s) * s_in, **extra_args)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = _dpmpp_ancestral_step(x, t, t_next, denoised_d, eta, s_noise, noise_sampler)
    return x


def _dpmpp_ancestral_step(x, t, t_target, denoised, eta, s_noise, noise_sampler):
    """First-order DPM-Solver++ step from sigma(t) to sigma_down, then ancestral noise sigma_up, for the target
    level sigma(t_target) (`get_ancestral_step`): x' = (sigma_down / sigma) x - expm1(t - t_down) D + sigma_up z."""
    sigma_down, sigma_up = get_ancestral_step(_sigma(t), _sigma(t_target), eta)
    t_down = _t(sigma_down)
    x = (_sigma(t_down) / _sigma(t)) * x - (t - t_down).expm1() * denoised
    return _add_noise(x, s_noise * sigma_up, noise_sampler, _sigma(t), _sigma(t_target), "sample_dpmpp_sde")


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DPM-Solver++(2M): multistep second order (Lu et al. 2022b, Algorithm 2), one model call per step.

    D_d = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i, extrapolates D linearly in t to the step midpoint;
    first order (D_d = D_i) on the first step and on the step to sigma = 0 (a1111-semantics §10.1).
    """
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_dpmpp_2m")
    old_denoised = None
    for i in _steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        denoised_d = denoised
        if old_denoised is not None and sigmas[i + 1] != 0:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def _sde_noise(x, sigma, sigma_next, eta_h, s_noise, noise_sampler, sampler):
    """Add the DPM-Solver++ SDE noise term sigma_next sqrt(1 - e^(-2 eta h)) s_noise z (block comment above);
    eta_h = eta * h, h = t_next - t > 0."""
    return _add_noise(x, sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise, noise_sampler, sigma, sigma_next,
                      sampler)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                        eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, section 5 / Appendix, SDE form; k-diffusion `sample_dpmpp_2m_sde`).

    First-order SDE step (block comment above) plus a second-order correction from D_i - D_{i-1}:
    midpoint: 0.5 (1 - e^-H) / r (D_i - D_{i-1}); heun: ((1 - e^-H) / (-H) + 1) / r (D_i - D_{i-1}), H = (1 + eta) h,
    r = h_{i-1} / h. The step to sigma = 0 returns D. One model call and (eta != 0) one noise draw per step.
    """
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError(f"sample_dpmpp_2m_sde: solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_dpmpp_2m_sde")
    old_denoised, h_last = None, None
    for i in _steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = eta * h
            one_minus_exp = (-h - eta_h).expm1().neg()  # 1 - e^-H
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + one_minus_exp * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (one_minus_exp / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * one_minus_exp * (1 / r) * (denoised - old_denoised)
            if eta:
                x = _sde_noise(x, sigmas[i], sigmas[i + 1], eta_h, s_noise, noise_sampler, "sample_dpmpp_2m_sde")
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                        eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep, k-diffusion `sample_dpmpp_3m_sde` (after Lu et al. 2022b).

    With H = (1 + eta) h, the first-order SDE step plus phi_2 d1 - phi_3 d2, where d1, d2 are the first and second
    divided differences of D in t (scaled by h) over the last three steps, phi_2 = 1 - (1 - e^-H)/H and
    phi_3 = phi_2 / H - 1/2 (the integrals of e^-(H - u) u^k / k! terms, normalised by H^k). Orders 1, 2, then 3;
    the step to sigma = 0 returns D. Note: d2 ~ h^2 D''/2 while the exact step needs -phi_3 h^2 D'', so with eta = 0
    this is a second-order method, not third (docs/sampler_convergence.md); kept as k-diffusion for parity.
    """
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_dpmpp_3m_sde")
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in _steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = _sde_noise(x, sigmas[i], sigmas[i + 1], h * eta, s_noise, noise_sampler, "sample_dpmpp_3m_sde")
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
    return x


# -- LCM and Restart (A1111) -------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023 "Latent Consistency Models").

    x_{i+1} = D(x_i, sigma_i) + sigma_{i+1} z_i: jump to the clean estimate, re-noise to the next level (A1111
    `sd_samplers_lcm.sample_lcm`; meant for an LCM denoiser). One draw per step with sigma_{i+1} > 0.
    """
    extra_args, s_in = _setup(x, sigmas, extra_args, "sample_lcm")
    for i in _steps(sigmas, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = _add_noise(x, sigmas[i + 1], noise_sampler, sigmas[i], sigmas[i + 1], "sample_lcm")
    return x


def restart_schedule(sigmas: torch.Tensor, restart_list: dict | None = None):
    """The (sigma_from, sigma_to) Heun steps of the Restart sampler (A1111 `restart_sampler`, Xu et al. 2023).

    `restart_list` = {sigma_min_k: [restart_steps, restart_times, sigma_max_k]}. None -> A1111's default: with
    N = len(sigmas) - 1 >= 20 steps, the schedule is REPLACED by a Karras schedule of N - s*k steps between
    sigmas[-2] and sigmas[0] (s = 9, k = 1; s = N // 4, k = 2 when N >= 36) and one restart {0.1: [s + 1, k, 2]};
    fewer than 20 steps -> no restarts (plain Heun). Each key is snapped to the nearest schedule index; after the
    step that reaches it, a restart segment (a Karras schedule of restart_steps levels from the level nearest
    sigma_max_k down to it) is appended restart_times times. Returns a list of (sigma_from, sigma_to) 0-dim tensors.
    """
    if restart_list is None:
        steps = len(sigmas) - 1
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            n_main = steps - restart_steps * restart_times
            sigmas = get_sigmas_karras(n_main, sigmas[-2].item(), sigmas[0].item()).to(sigmas)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    nearest = lambda sigma: int(torch.argmin((sigmas - sigma).abs(), dim=0))  # noqa: E731
    restarts = {nearest(key): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts:
            restart_steps, restart_times, restart_max = restarts[i + 1]
            min_idx, max_idx = i + 1, nearest(restart_max)
            if max_idx < min_idx:
                sigma_restart = get_sigmas_karras(restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item())
                sigma_restart = sigma_restart.to(sigmas)  # [restart_steps + 1], last 0: the 0 is not used
                step_list.extend(list(zip(sigma_restart[:-2], sigma_restart[1:-1])) * restart_times)
    return step_list


@torch.no_grad()
def restart_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                    s_noise=1.0, restart_list=None):
    """Restart sampling (Xu et al. 2023): Heun ODE steps, and at each restart jump back up from sigma_lo to
    sigma_hi by adding noise of std s_noise * sqrt(sigma_hi^2 - sigma_lo^2), then integrate down again.

    Step list from `restart_schedule`. As A1111, the callback's 'sigma' is the step's target and 'sigma_hat' its
    start, and 'i' counts Heun steps. The noise draw for a jump is noise_sampler(sigma_lo, sigma_hi).
    """
    extra_args, s_in = _setup(x, sigmas, extra_args, "restart_sampler")
    last_sigma = None
    bar = tqdm(restart_schedule(sigmas, restart_list), disable=disable)
    for step_id, (old_sigma, new_sigma) in enumerate(bar):
        if last_sigma is not None and last_sigma < old_sigma:
            x = _add_noise(x, s_noise * (old_sigma ** 2 - last_sigma ** 2) ** 0.5, noise_sampler, last_sigma,
                           old_sigma, "restart_sampler")
        denoised = model(x, old_sigma * s_in, **extra_args)
        d = to_d(x, old_sigma, denoised)
        _report(callback, x, step_id, new_sigma, old_sigma, denoised)
        x = _heun_step(model, x, d, old_sigma, new_sigma, s_in, extra_args)
        last_sigma = new_sigma
        _show_sigma(bar, new_sigma)
    return x


# -- Brownian noise ----------------------------------------------------------------------------------------------------

class BrownianTreeNoiseSampler:
    """Noise from one Brownian motion per image: W(t0, t1) / sqrt(|t1 - t0|), [B, ...] like x (a1111-semantics §8.2).

    Image i uses `torchsde.BrownianTree(entropy=seeds[i])`, so image i of a batch equals the same seed run alone,
    and the noise of a step depends only on its interval, not on the step count (what A1111's "DPM++ SDE" samplers
    rely on). `transform` maps sigma to the tree's time (identity by default). Sigmas are converted with
    `torch.as_tensor` exactly as k-diffusion's `BrownianTreeNoiseSampler`, so equal inputs give equal trees.
    A1111 additionally routes torchsde's internal draws through its RNG source; on the CPU source with float32 that
    is the same stream as torchsde's own (a CPU generator seeded per node).

    Query times are clamped into the tree's interval when they lie outside it by a rounding error only: torchsde
    stores the ends rounded to 6 decimals (`round(t, -log10(tol))`, tol 1e-6), so a query at the schedule's own
    float32 sigma_min 0.0291675 (0.02916753...) lies below the stored 0.029168, and torchsde warned "Should have
    ta>=t0 but got ..." on every such query, then clamped it to that same end. Clamping first gives the same draws
    without the warning; a query farther outside still reaches torchsde (and its warning).

    Args: x [B, ...] (shape, dtype, device of the draws); sigma_min, sigma_max > 0 the interval queried later;
    seeds: list of B ints. Raises ValueError on a wrong seed count or an empty interval.
    """

    DECIMALS = 6  # torchsde's BrownianInterval keeps its times at round(t, -int(log10(tol))), tol = 1e-6 (default)

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seeds: list[int], transform=lambda sigma: sigma):
        if len(seeds) != x.shape[0]:
            raise ValueError(f"seeds: need one seed per image ({x.shape[0]}), got {len(seeds)}")
        self.transform = transform
        t0, t1 = self.transform(torch.as_tensor(sigma_min)), self.transform(torch.as_tensor(sigma_max))
        if t0 == t1:
            raise ValueError(f"sigma_min and sigma_max give an empty interval ({float(sigma_min):g})")
        t0, t1, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w0 = torch.zeros_like(x[0])
        import torchsde  # lazy: only the SDE samplers need it

        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(seed)) for seed in seeds]
        self.start, self.end = round(float(t0), self.DECIMALS), round(float(t1), self.DECIMALS)  # the trees' ends

    def _clamp(self, t: float) -> float:
        """t moved onto the tree's nearer end when outside it by at most a rounding error (of the 6-decimal ends,
        0.5e-6, or of float32 sigmas, a few ulp); otherwise unchanged."""
        slack = 10.0 ** -self.DECIMALS + 1e-6 * abs(t)
        if self.start - slack <= t < self.start:
            return self.start
        if self.end < t <= self.end + slack:
            return self.end
        return t

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0, t1 = self.transform(torch.as_tensor(sigma)), self.transform(torch.as_tensor(sigma_next))
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        # torchsde reads the times as float(t); clamped here as it would clamp them, minus its warning (class doc)
        lo, hi = self._clamp(float(lo)), self._clamp(float(hi))
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * (self.sign * sign)  # [B, ...]
        return w / (t1 - t0).abs().sqrt()


# -- the A1111 sampler table (a1111-semantics §10.1) -------------------------------------------------------------------------------

CHURN_PARAMS = ("s_churn", "s_tmin", "s_tmax", "s_noise")


@dataclass(frozen=True)
class SamplerInfo:
    """One row of A1111's sampler list (`sd_samplers_kdiffusion.samplers_k_diffusion`, `..._timesteps`, `..._lcm`).

    `function` is the sampler in this module (None for kind="timestep": DDIM, DDIM CFG++, PLMS, UniPC live in
    sdcore/sampling/timesteps.py under `funcname`). `scheduler`: default scheduler name when the user picks
    "Automatic" (None -> uniform). `extra_params`: keyword options A1111 takes from p for this function (a1111-semantics §6.5,
    including "eta" when the function has one). `denoiser` "lcm" -> A1111 wraps the model in its LCM denoiser.
    """

    name: str
    function: Callable | None
    aliases: tuple[str, ...]
    funcname: str
    kind: str = "kdiffusion"  # "kdiffusion" (sigma samplers in this module) or "timestep" (timesteps.py)
    scheduler: str | None = None
    second_order: bool = False  # two model calls per step: A1111 counts 2 * steps for prompt schedules
    brownian_noise: bool = False  # per-image BrownianTreeNoiseSampler instead of the image RNG
    discard_next_to_last_sigma: bool = False
    uses_ensd: bool = False  # infotext ENSD only for these (a1111-semantics §8.2)
    solver_type: str | None = None
    extra_params: tuple[str, ...] = ()
    denoiser: str = "default"
    sigma_range: bool = False  # DPM fast / adaptive: called with (sigma_min, sigma_max) instead of a schedule

    def total_steps(self, steps: int) -> int:
        """Steps as A1111 counts them for prompt editing and CFG fractions (`SamplerData.total_steps`, a1111-semantics §10.2)."""
        return steps * 2 if self.second_order else steps


def _k(name, function, aliases, from_p=(), eta=False, **options):
    """A k-diffusion-style row; extra_params = the options A1111 takes from p, plus "eta" for functions with one."""
    return SamplerInfo(name, function, tuple(aliases), function.__name__,
                       extra_params=tuple(from_p) + (("eta",) if eta else ()), **options)


def _timestep(name, funcname, aliases, eta=False):
    return SamplerInfo(name, None, tuple(aliases), funcname, kind="timestep", extra_params=("eta",) if eta else ())


_S_NOISE = ("s_noise",)
SAMPLERS: tuple[SamplerInfo, ...] = (
    _k("DPM++ 2M", sample_dpmpp_2m, ["k_dpmpp_2m"], scheduler="karras"),
    _k("DPM++ SDE", sample_dpmpp_sde, ["k_dpmpp_sde"], scheduler="karras", second_order=True, brownian_noise=True,
       from_p=_S_NOISE, eta=True),
    _k("DPM++ 2M SDE", sample_dpmpp_2m_sde, ["k_dpmpp_2m_sde"], scheduler="exponential", brownian_noise=True,
       from_p=_S_NOISE, eta=True),
    _k("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde, ["k_dpmpp_2m_sde_heun"], scheduler="exponential",
       brownian_noise=True, solver_type="heun", from_p=_S_NOISE, eta=True),
    _k("DPM++ 2S a", sample_dpmpp_2s_ancestral, ["k_dpmpp_2s_a"], scheduler="karras", uses_ensd=True,
       second_order=True, from_p=_S_NOISE, eta=True),
    _k("DPM++ 3M SDE", sample_dpmpp_3m_sde, ["k_dpmpp_3m_sde"], scheduler="exponential",
       discard_next_to_last_sigma=True, brownian_noise=True, from_p=_S_NOISE, eta=True),
    _k("Euler a", sample_euler_ancestral, ["k_euler_a", "k_euler_ancestral"], uses_ensd=True, eta=True),
    _k("Euler", sample_euler, ["k_euler"], from_p=CHURN_PARAMS),
    _k("LMS", sample_lms, ["k_lms"]),
    _k("Heun", sample_heun, ["k_heun"], second_order=True, from_p=CHURN_PARAMS),
    _k("DPM2", sample_dpm_2, ["k_dpm_2"], scheduler="karras", discard_next_to_last_sigma=True, second_order=True,
       from_p=CHURN_PARAMS),
    _k("DPM2 a", sample_dpm_2_ancestral, ["k_dpm_2_a"], scheduler="karras", discard_next_to_last_sigma=True,
       uses_ensd=True, second_order=True, from_p=_S_NOISE, eta=True),
    _k("DPM fast", sample_dpm_fast, ["k_dpm_fast"], uses_ensd=True, from_p=_S_NOISE, eta=True, sigma_range=True),
    _k("DPM adaptive", sample_dpm_adaptive, ["k_dpm_ad"], uses_ensd=True, eta=True, sigma_range=True),
    _k("Restart", restart_sampler, ["restart"], scheduler="karras", second_order=True),
    _timestep("DDIM", "ddim", ["ddim"], eta=True),
    _timestep("DDIM CFG++", "ddim_cfgpp", ["ddim_cfgpp"], eta=True),
    _timestep("PLMS", "plms", ["plms"]),
    _timestep("UniPC", "unipc", ["unipc"]),
    _k("LCM", sample_lcm, ["k_lcm"], denoiser="lcm"),
)


def _scheduler_suffixes() -> list[tuple[str, str]]:
    """(suffix, scheduler name) pairs in A1111 order: each scheduler's label, name and aliases."""
    return [(option, s.name) for s in SCHEDULERS for option in (s.label, s.name, *s.aliases)]


def find_sampler(name: str) -> tuple[SamplerInfo, str | None]:
    """Resolve a sampler name as A1111 does (`sd_samplers.get_sampler_and_scheduler`, a1111-semantics §9 step 1).

    First a trailing " <scheduler>" (label, name or alias, e.g. "DPM++ 2M Karras") is split off, as A1111 does for
    old infotexts; then the rest must be a sampler name (case-sensitive) or one of its aliases ("k_euler_a").
    Returns (SamplerInfo, scheduler name or None when the name carried none). Unknown names raise ValueError
    listing the valid names (A1111 silently falls back to the first sampler).
    """
    if not isinstance(name, str):
        raise TypeError(f"sampler name must be a str, got {type(name).__name__}")
    base, scheduler = name, None
    for suffix, scheduler_name in _scheduler_suffixes():
        if base.endswith(" " + suffix):
            base, scheduler = base[:-(len(suffix) + 1)], scheduler_name
    for info in SAMPLERS:
        if base == info.name or base in info.aliases:
            return info, scheduler
    raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(s.name for s in SAMPLERS)} "
                     f"(aliases: {', '.join(a for s in SAMPLERS for a in s.aliases)}), optionally followed by a "
                     f"scheduler label such as ' Karras'")


# -- traces ------------------------------------------------------------------------------------------------------------

def noise_bytes(noise: torch.Tensor) -> bytes:
    """The bytes a noise fingerprint hashes: `noise` as float32 (IEEE-754 binary32; a float16/bfloat16 draw is
    widened exactly, a float64 one rounded to nearest), copied to the CPU, C-contiguous (row-major over its shape,
    e.g. [B, C, h, w]), each value little-endian; 4 bytes per element, no header, shape not included.
    Equal to `numpy.ascontiguousarray(a, dtype="<f4").tobytes()` of the same values."""
    array = noise.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return array.astype("<f4", copy=False).tobytes()


def noise_fingerprint(noise: torch.Tensor, name: str, *, index: int, call: int, step: int = -1,
                      sigma: float | None = None, sigma_next: float | None = None) -> dict:
    """The record of one noise draw: sha256 hex digest of `noise_bytes(noise)` ("sha256"), one digest per image
    along dim 0 ("sha256_images", so image i can be matched to the same seed run alone), and what it was: `name`
    (`TraceRecorder` lists the names), `index` (its place among the run's draws, 0-based), `call` (model calls
    made before it), `step` (the sampler step i whose sigma_sched[i] is the draw's sigma, -1 for draws outside
    the sampler loop or off the schedule), `sigma` / `sigma_next` (the interval passed to the noise sampler, None
    outside the loop), `shape`, `dtype` and `device` of the draw as made."""
    images = [hashlib.sha256(noise_bytes(n)).hexdigest() for n in noise] if noise.dim() > 0 else []
    return {"index": index, "name": name, "step": step, "call": call, "sigma": sigma, "sigma_next": sigma_next,
            "shape": list(noise.shape), "dtype": str(noise.dtype).removeprefix("torch."), "device": str(noise.device),
            "sha256": hashlib.sha256(noise_bytes(noise)).hexdigest(), "sha256_images": images}


class TraceRecorder:
    """A sampler callback or (with `pipeline`'s `model_callback`) model callback that records every call and
    fingerprints every noise draw, for comparing two implementations (scripts/compare_traces.py).

    Trace format (.safetensors, one file per run): for the n-th call (n = 0, 1, ...), tensors
    `step{n}.x` (x before the update), `step{n}.denoised`, `step{n}.sigma`, `step{n}.sigma_hat` (0-dim) and
    `step{n}.i` (int64: the sampler's step index as a sampler callback, the model call's index as a model
    callback); metadata "steps" = number of calls, "noise" = a JSON list of
    `noise_fingerprint` records (one per draw, in draw order), plus user metadata. Tensors are stored as recorded
    (dtype kept), on the CPU.

    Noise fingerprints: `pipeline` reports each draw as a dict with a "noise" key ({"noise", "name", "step",
    "sigma", "sigma_next"}); only its sha256 and description are kept, never the tensor. Names: "initial_noise"
    (the first draw of the image RNG, before `initial_noise_multiplier`), with variations or seed resize also
    "seed_noise", "subseed_noise", "seed_resize_base" (the separate generator draws it is made of, `rng.ImageRNG`);
    "step_noise" (a sampler's per-step draw from the image RNG: ancestral, churn, LCM, Restart, DDIM eta),
    "brownian_noise" (a `BrownianTreeNoiseSampler` draw: the SDE samplers), "vae_sample" (the VAE posterior
    sample's N(0, 1) eps per image, `rng.vae_sample_noise`), "vae_sample_conditioning" (the same for the
    9-channel models' masked-image latent), "latent_noise_fill" (inpainting fill 2). Hashed bytes: `noise_bytes`
    (float32, little-endian, C order, on the CPU), so two implementations compare without sharing tensors.
    """

    def __init__(self):
        self.records: list[dict[str, torch.Tensor]] = []
        self.noise: list[dict] = []

    def __call__(self, d: dict) -> None:
        if "noise" in d:
            as_float = lambda v: None if v is None else float(v)  # noqa: E731
            self.noise.append(noise_fingerprint(
                d["noise"], str(d["name"]), index=len(self.noise), call=len(self.records), step=int(d.get("step", -1)),
                sigma=as_float(d.get("sigma")), sigma_next=as_float(d.get("sigma_next"))))
            return
        as_tensor = lambda v: torch.as_tensor(v).detach().to("cpu").clone().contiguous()  # noqa: E731
        record = {key: as_tensor(d[key]) for key in ("x", "denoised", "sigma", "sigma_hat") if key in d}
        record["i"] = torch.as_tensor(int(d["i"]), dtype=torch.int64)
        self.records.append(record)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"step{n}.{key}": value for n, record in enumerate(self.records) for key, value in record.items()}

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        meta = {"steps": str(len(self.records)), "noise": json.dumps(self.noise), **(metadata or {})}
        save_file(self.tensors(), str(path), metadata=meta)


def load_noise_fingerprints(path: str | Path) -> list[dict]:
    """The noise fingerprints of a `TraceRecorder` file (its "noise" metadata), in draw order; [] for a trace
    written before fingerprints existed. Raises ValueError when the metadata is not a JSON list of records."""
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get("noise")
    if text is None:
        return []
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata 'noise' is not JSON ({e})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "sha256" in r for r in records):
        raise ValueError(f"{path}: metadata 'noise' must be a JSON list of records with a 'sha256', got "
                         f"{text[:80]!r}")
    return records


def load_trace(path: str | Path) -> list[dict[str, torch.Tensor]]:
    """Read a `TraceRecorder` file back: a list with one {key: tensor} dict per callback call, in call order."""
    records: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            step, _, name = key.partition(".")
            if not step.startswith("step") or not step[4:].isdigit() or not name:
                raise ValueError(f"{path}: key {key!r} is not of the form step<n>.<name>")
            records.setdefault(int(step[4:]), {})[name] = f.get_tensor(key)
    if sorted(records) != list(range(len(records))):
        raise ValueError(f"{path}: step numbers are not 0..{len(records) - 1}")
    return [records[n] for n in range(len(records))]
