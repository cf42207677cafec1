"""Timestep samplers: DDIM, DDIM CFG++, PLMS and UniPC, as A1111 runs them (a1111-semantics §6.4).

Unlike the k-diffusion samplers (which walk a sigma schedule with a denoiser returning x0), these work in the
variance-preserving (VP) parametrisation `x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps` on the model's discrete
timesteps, and call an eps model:

    model(x [B,C,h,w], t [B] float timesteps in [0, 999], **extra_args) -> eps [B,C,h,w]

normally a `CFGDenoiser(CompVisTimestepsDenoiser(...), mask_before_denoising=True, ...)`: A1111 blends the un-noised
init latent into x *before* each model call for these samplers (a1111-semantics §7 step 3), so the blend lives in the
CFG denoiser, not here. Glossary: B images, C latent channels, h, w latent cells, abar = alphas_cumprod [1000].

Every sampler function takes the ascending timestep grid `timesteps` (e.g. `get_timesteps(20)` = 1, 51, ..., 951,
or its img2img head `timesteps[:t_enc]`) and `alphas_cumprod`, and returns the final latent.

Sources (facts, re-implemented): A1111 `modules/sd_samplers_timesteps.py` and `sd_samplers_timesteps_impl.py`
(v1.10.1), its UniPC port `modules/models/diffusion/uni_pc/uni_pc.py`; DDIM: Song et al. 2021 eq. 12; PLMS: Liu et
al. 2022 (PNDM) section 4; UniPC: Zhao et al. 2023, algorithms 1-2 ("B(h)" variants); CFG++: Chung et al. 2024.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .denoisers import _as_alphas_cumprod

NoiseSampler = Callable[[Tensor, Tensor], Tensor]

UNIPC_VARIANTS = ("bh1", "bh2")
UNIPC_SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")
CFGPP_SCALE = 12.5  # DDIM CFG++ maps cfg_scale in [0, 12.5] to the paper's lambda in [0, 1]


class CompVisTimestepsDenoiser:
    """Wrap the LDM UNet so that it always returns eps, called with raw (unscaled) x and timesteps.

    `apply_model(x [B,C_in,h,w], t [B] float, **cond) -> eps or v [B,C,h,w]`; `alphas_cumprod` [1000];
    `prediction` "eps" or "v". For v models, eps = sqrt(abar[t]) * v + sqrt(1 - abar[t]) * x, with t truncated to
    an integer index as the reference does (`t.to(int)`). Source: A1111 `CompVisTimestepsDenoiser`,
    `CompVisTimestepsVDenoiser.predict_eps_from_z_and_v`; Salimans & Ho 2022 (v-parametrisation).
    Raises ValueError for an unknown prediction.
    """

    def __init__(self, apply_model: Callable[..., Tensor], alphas_cumprod: Tensor, prediction: str = "eps"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.apply_model = apply_model
        self.alphas_cumprod = _as_alphas_cumprod(alphas_cumprod)
        self.prediction = prediction

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        out = self.apply_model(x, t, **cond)
        if self.prediction == "eps":
            return out
        abar = self.alphas_cumprod.to(x.device, torch.float64)[t.to(torch.int64)].reshape(-1, 1, 1, 1)
        return (abar.sqrt().to(x.dtype) * out) + ((1 - abar).sqrt().to(x.dtype) * x)


def get_timesteps(steps: int, discard_next_to_last_sigma: bool = False, device: torch.device | None = None) -> Tensor:
    """The ascending DDPM timestep grid `clip(range(0, 1000, 1000 // steps) + 1, 0, 999)` (int64).

    20 steps -> 1, 51, ..., 951 (a1111-semantics §6.4). When `steps` does not divide 1000 the grid has more than `steps`
    entries (30 -> 31 entries), as in the reference. `discard_next_to_last_sigma` adds one step first (A1111
    `CompVisSampler.get_timesteps`). Raises ValueError unless 1 <= steps <= 1000.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be an int in [1, 1000], got {steps!r}")
    steps += 1 if discard_next_to_last_sigma else 0
    return (torch.arange(0, 1000, 1000 // steps, device=device) + 1).clip(0, 999)


def img2img_start(init_latent: Tensor, noise: Tensor, timesteps: Tensor, t_enc: int, alphas_cumprod: Tensor,
                  extra_noise: float = 0.0) -> tuple[Tensor, Tensor]:
    """Noise the init latent for a timestep sampler and cut the grid: returns (xi, timesteps[:t_enc]).

    `init_latent`, `noise` [B,C,h,w] (noise ~ N(0, 1)); `timesteps` from `get_timesteps(steps)`; `t_enc` from
    `schedules.setup_img2img_steps`. With a = abar[timesteps[t_enc]]: `xi = init_latent * sqrt(a) + noise *
    sqrt(1 - a)`, plus `noise * extra_noise * sqrt(a)` for A1111's "Extra noise" option. Source: A1111
    `CompVisSampler.sample_img2img` (a1111-semantics §6.4; 20 steps at 0.75 -> t_enc 15, a = abar[751], sqrt 0.236049).
    Raises ValueError if t_enc is not a valid index of `timesteps` or shapes differ.
    """
    if noise.shape != init_latent.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal init_latent shape {tuple(init_latent.shape)}")
    if not 0 <= t_enc < len(timesteps):
        raise ValueError(f"t_enc must be in [0, {len(timesteps) - 1}], got {t_enc}")
    a = _as_alphas_cumprod(alphas_cumprod)[timesteps[t_enc]].to(torch.float64)
    sqrt_a, sqrt_1ma = float(a.sqrt()), float((1 - a).sqrt())
    xi = init_latent * sqrt_a + noise * sqrt_1ma
    if extra_noise > 0:
        xi = xi + noise * (extra_noise * sqrt_a)
    return xi, timesteps[:t_enc]


def _step_alphas(timesteps: Tensor, alphas_cumprod: Tensor) -> tuple[list[float], list[float]]:
    """abar at each grid point and at the grid point below it (abar[0] below the first), as Python floats."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    abar = _as_alphas_cumprod(alphas_cumprod).detach().to("cpu", torch.float64)
    ts = timesteps.detach().to("cpu", torch.int64)
    prev = torch.cat([ts.new_zeros(1), ts[:-1]])
    return abar[ts].tolist(), abar[prev].tolist()


def _ve_sigma(a: float) -> Tensor:
    return torch.tensor(math.sqrt((1 - a) / a))


def _ddim_update(x: Tensor, e_t: Tensor, e_dir: Tensor, a_t: float, a_prev: float, eta: float,
                 noise_sampler: NoiseSampler | None) -> tuple[Tensor, Tensor]:
    """One DDIM step t -> prev (Song et al. 2021, eq. 12); `e_dir` is the eps in the direction term."""
    # Song et al. 2021 eq. 16: eta = 1 gives the DDPM posterior std, eta = 0 deterministic DDIM.
    sigma_t = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    if 1 - a_prev - sigma_t ** 2 < 0:
        raise ValueError(f"eta={eta} is too large: the DDIM direction term sqrt(1 - a_prev - s^2) is undefined")
    pred_x0 = (x - math.sqrt(1 - a_t) * e_t) / math.sqrt(a_t)
    x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - sigma_t ** 2) * e_dir
    if sigma_t > 0:
        if noise_sampler is None:
            raise ValueError("eta > 0 needs a noise_sampler(sigma, sigma_next) -> Tensor like x")
        x = x + sigma_t * noise_sampler(_ve_sigma(a_t), _ve_sigma(a_prev))
    return x, pred_x0


def _ddim_loop(model: Callable[..., Any], x: Tensor, timesteps: Tensor, alphas_cumprod: Tensor,
               extra_args: dict | None, callback: Callable | None, eta: float, noise_sampler: NoiseSampler | None,
               cfgpp: bool) -> Tensor:
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    extra_args = {} if extra_args is None else dict(extra_args)
    if cfgpp:
        if "cond_scale" not in extra_args:
            raise ValueError("DDIM CFG++ needs extra_args['cond_scale'] (a CFGDenoiser-like model)")
        extra_args["cond_scale"] = extra_args["cond_scale"] * (1 / CFGPP_SCALE)
        extra_args["return_uncond"] = True
    alphas, alphas_prev = _step_alphas(timesteps, alphas_cumprod)
    s_in = x.new_ones([x.shape[0]])
    n = len(timesteps)
    # Reference quirk (a1111-semantics §6.4): grid indices n-1 ... 1 only; the last step lands on abar[timesteps[0]],
    # not x0.
    for i, index in enumerate(range(n - 1, 0, -1)):
        out = model(x, float(timesteps[index]) * s_in, **extra_args)
        e_t, e_dir = out if cfgpp else (out, out)
        x, pred_x0 = _ddim_update(x, e_t, e_dir, alphas[index], alphas_prev[index], eta, noise_sampler)
        if callback is not None:
            callback({"x": x, "i": i, "t": timesteps[index], "sigma": _ve_sigma(alphas[index]), "denoised": pred_x0})
    return x


@torch.no_grad()
def sample_ddim(model: Callable[..., Tensor], x: Tensor, timesteps: Tensor, alphas_cumprod: Tensor,
                extra_args: dict | None = None, callback: Callable | None = None, disable: bool | None = None,
                eta: float = 0.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DDIM (Song et al. 2021) over the ascending grid `timesteps` [n], n - 1 model calls.

    `x` [B,C,h,w] noisy latent at abar[timesteps[-1]] (txt2img: pure N(0, 1) noise; img2img: `img2img_start`).
    Step from grid index k to k - 1: `pred_x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t)`, `x = sqrt(a_prev) pred_x0 +
    sqrt(1 - a_prev - s^2) eps + s z`, `s = eta sqrt((1-a_prev)/(1-a_t) (1 - a_t/a_prev))`, z from
    `noise_sampler(sigma, sigma_next)` (VE sigmas sqrt((1-a)/a) of both ends; required when eta > 0; the reference
    draws z every step even at eta 0, which changes nothing but the RNG position). `disable` is accepted for
    k-diffusion signature compatibility (no progress bar here). Source: A1111 `sd_samplers_timesteps_impl.ddim`.
    """
    return _ddim_loop(model, x, timesteps, alphas_cumprod, extra_args, callback, eta, noise_sampler, cfgpp=False)


@torch.no_grad()
def sample_ddim_cfgpp(model: Callable[..., tuple[Tensor, Tensor]], x: Tensor, timesteps: Tensor,
                      alphas_cumprod: Tensor, extra_args: dict | None = None, callback: Callable | None = None,
                      disable: bool | None = None, eta: float = 0.0,
                      noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DDIM with CFG++ (Chung et al. 2024): the renoising direction uses the unconditional eps.

    Like `sample_ddim`, but `model` must be a `CFGDenoiser`-like callable taking `cond_scale` in `extra_args` and
    `return_uncond=True` (returning (guided eps, uncond eps)); cond_scale is multiplied by 1/12.5 so A1111's CFG
    range [0, 12.5] maps to the paper's [0, 1]. Source: A1111 `sd_samplers_timesteps_impl.ddim_cfgpp`.
    """
    return _ddim_loop(model, x, timesteps, alphas_cumprod, extra_args, callback, eta, noise_sampler, cfgpp=True)


@torch.no_grad()
def sample_plms(model: Callable[..., Tensor], x: Tensor, timesteps: Tensor, alphas_cumprod: Tensor,
                extra_args: dict | None = None, callback: Callable | None = None,
                disable: bool | None = None) -> Tensor:
    """PLMS (pseudo linear multistep, Liu et al. 2022) over the ascending grid `timesteps` [n]: n model calls.

    Same n - 1 deterministic DDIM-form steps as `sample_ddim` (eta 0), but with the eps replaced by an
    Adams-Bashforth combination of the current and up to 3 previous eps: first step pseudo improved Euler
    (eps at t and at the Euler-predicted x_prev, averaged: 2 calls), then AB2 (3e - e1)/2, AB3
    (23e - 16e1 + 5e2)/12, AB4 (55e - 59e1 + 37e2 - 9e3)/24. Source: A1111 `sd_samplers_timesteps_impl.plms`.
    """
    extra_args = {} if extra_args is None else extra_args
    alphas, alphas_prev = _step_alphas(timesteps, alphas_cumprod)
    s_in = x.new_ones([x.shape[0]])
    old_eps: list[Tensor] = []
    n = len(timesteps)
    for i, index in enumerate(range(n - 1, 0, -1)):
        a_t, a_prev = alphas[index], alphas_prev[index]
        e_t = model(x, float(timesteps[index]) * s_in, **extra_args)
        if not old_eps:
            x_euler, _ = _ddim_update(x, e_t, e_t, a_t, a_prev, 0.0, None)
            e_next = model(x_euler, float(timesteps[index - 1]) * s_in, **extra_args)
            e_prime = (e_t + e_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = _ddim_update(x, e_prime, e_prime, a_t, a_prev, 0.0, None)
        old_eps = (old_eps + [e_t])[-3:]
        if callback is not None:
            callback({"x": x, "i": i, "t": timesteps[index], "sigma": _ve_sigma(a_t), "denoised": pred_x0})
    return x


class _VPTime:
    """The discrete VP schedule on continuous time t in (0, 1]: knots t_k = (k + 1) / N carry log alpha_k =
    0.5 log abar[k]; piecewise-linear in between and linearly extrapolated outside (DPM-Solver's
    `NoiseScheduleVP('discrete')`). Model timestep = (t - 1/N) * 1000. Scalars, float64."""

    def __init__(self, alphas_cumprod: Tensor):
        abar = _as_alphas_cumprod(alphas_cumprod).detach().to("cpu", torch.float64)
        self.total_n = abar.shape[0]
        self.t_knots = torch.arange(1, self.total_n + 1, dtype=torch.float64) / self.total_n
        self.log_alpha_knots = 0.5 * abar.log()

    @staticmethod
    def _interp(x: float, xp: Tensor, fp: Tensor) -> float:
        """Piecewise-linear f(x) through (xp, fp), xp ascending, extended linearly beyond both ends."""
        k = int(torch.searchsorted(xp, torch.tensor([x], dtype=xp.dtype))[0]) - 1
        k = min(max(k, 0), xp.shape[0] - 2)
        x0, x1, y0, y1 = float(xp[k]), float(xp[k + 1]), float(fp[k]), float(fp[k + 1])
        return y0 + (x - x0) * (y1 - y0) / (x1 - x0)

    def log_alpha(self, t: float) -> float:
        """log alpha_t = 0.5 log abar at continuous time t (piecewise linear between knots)."""
        return self._interp(t, self.t_knots, self.log_alpha_knots)

    def alpha_sigma_lambda(self, t: float) -> tuple[float, float, float]:
        """alpha_t, sigma_t = sqrt(1 - alpha_t^2), and the half log-SNR lambda_t = log alpha_t - log sigma_t."""
        la = self.log_alpha(t)
        log_sigma = 0.5 * math.log(-math.expm1(2 * la))
        return math.exp(la), math.exp(log_sigma), la - log_sigma

    def inverse_lambda(self, lam: float) -> float:
        """The time t with half log-SNR lambda_t = lam (DPM-Solver `NoiseScheduleVP.inverse_lambda`)."""
        # alpha^2 + sigma^2 = 1 and lambda = log(alpha / sigma) give log alpha = -0.5 log(1 + exp(-2 lambda));
        # then invert the (decreasing) knot map log alpha -> t.
        log_alpha = -0.5 * float(torch.logaddexp(torch.tensor(0.0, dtype=torch.float64),
                                                 torch.tensor(-2.0 * lam, dtype=torch.float64)))
        return self._interp(log_alpha, self.log_alpha_knots.flip(0), self.t_knots.flip(0))

    def model_time(self, t: float) -> float:
        """The UNet timestep for continuous t: t = 1/N -> 0, t = 1 -> 999 (N = 1000)."""
        return (t - 1.0 / self.total_n) * 1000.0


def _unipc_time_grid(vp: _VPTime, skip_type: str, t_start: float, t_end: float, n: int) -> list[float]:
    if skip_type == "time_uniform":
        return torch.linspace(t_start, t_end, n + 1, dtype=torch.float64).tolist()
    if skip_type == "time_quadratic":
        return (torch.linspace(t_start ** 0.5, t_end ** 0.5, n + 1, dtype=torch.float64) ** 2).tolist()
    lam_start, lam_end = vp.alpha_sigma_lambda(t_start)[2], vp.alpha_sigma_lambda(t_end)[2]
    return [vp.inverse_lambda(lam) for lam in torch.linspace(lam_start, lam_end, n + 1, dtype=torch.float64).tolist()]


def _unipc_coefficients(rks: list[float], hh: float, b_h: float, order: int) -> tuple[Tensor | None, Tensor]:
    """UniPC's predictor and corrector weights (rhos_p, rhos_c) from the linear system R rho = b.

    R[i][k] = rks[k]^i (Vandermonde in the step ratios r_k), b[i] = h phi_{i+1}(h) * (i+1)! / B(h) with
    h phi_1 = expm1(hh) and h phi_{k+1} = h phi_k / hh - 1/k! (Zhao et al. 2023, eq. 8 and appendix).
    Orders 1 (corrector) and 2 (predictor) use the closed form rho = 1/2.
    """
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.tensor(rks, dtype=torch.float64)
    big_r = torch.stack([r ** i for i in range(order)])
    b_t = torch.tensor(b, dtype=torch.float64)
    if order == 1:
        rhos_p = None
    elif order == 2:
        rhos_p = torch.tensor([0.5], dtype=torch.float64)
    else:
        rhos_p = torch.linalg.solve(big_r[:-1, :-1], b_t[:-1])
    rhos_c = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(big_r, b_t)
    return rhos_p, rhos_c


def _unipc_update(data_fn: Callable[[Tensor, float], Tensor], vp: _VPTime, x: Tensor, model_prev: list[Tensor],
                  t_prev: list[float], t: float, order: int, variant: str, use_corrector: bool
                  ) -> tuple[Tensor, Tensor | None]:
    """One multistep UniPC step from t_prev[-1] to t in data-prediction form (UniP predictor + UniC corrector)."""
    _, sigma_prev0, lambda_prev0 = vp.alpha_sigma_lambda(t_prev[-1])
    alpha_t, sigma_t, lambda_t = vp.alpha_sigma_lambda(t)
    m0 = model_prev[-1]
    h = lambda_t - lambda_prev0
    rks, d1s = [], []
    for i in range(1, order):
        rk = (vp.alpha_sigma_lambda(t_prev[-(i + 1)])[2] - lambda_prev0) / h
        rks.append(rk)
        d1s.append((model_prev[-(i + 1)] - m0) / rk)
    rks.append(1.0)
    hh = -h  # data prediction solves in -lambda
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rhos_p, rhos_c = _unipc_coefficients(rks, hh, b_h, order)

    # First-order (DDIM-like) part: x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) m0
    x_t_ = (sigma_t / sigma_prev0) * x - (alpha_t * math.expm1(hh)) * m0
    pred_res = sum(float(rhos_p[k]) * d1s[k] for k in range(len(d1s))) if d1s else 0.0
    x_t = x_t_ - (alpha_t * b_h) * pred_res
    if not use_corrector:
        return x_t, None
    model_t = data_fn(x_t, t)
    corr_res = sum(float(rhos_c[k]) * d1s[k] for k in range(len(d1s))) if d1s else 0.0
    x_t = x_t_ - (alpha_t * b_h) * (corr_res + float(rhos_c[-1]) * (model_t - m0))
    return x_t, model_t


@torch.no_grad()
def sample_unipc(model: Callable[..., Tensor], x: Tensor, timesteps: Tensor, alphas_cumprod: Tensor,
                 extra_args: dict | None = None, callback: Callable | None = None, disable: bool | None = None,
                 is_img2img: bool = False, variant: str = "bh1", skip_type: str = "time_uniform", order: int = 3,
                 lower_order_final: bool = True) -> Tensor:
    """UniPC multistep (Zhao et al. 2023) in data-prediction form, `len(timesteps)` steps and model calls.

    Continuous time runs from T = 1 (txt2img) or `timesteps[-1]/1000 + 1/1000` (img2img, as the reference does:
    one grid slot below the noise level of `img2img_start`) down to 1/1000 (model timestep 0), spaced by
    `skip_type` ("time_uniform" default, "time_quadratic", "logSNR"). Warm-up steps use orders 1 .. order-1; then
    `order`, lowered near the end when `lower_order_final`. Each step but the last runs the UniC corrector with the
    model output at the predicted point, which is reused as the next step's history (no extra call).
    `variant`: "bh1" (B(h) = h, A1111's default option `uni_pc_variant`) or "bh2" (B(h) = e^h - 1).
    Sources: A1111 `sd_samplers_timesteps_impl.unipc` and `uni_pc.UniPC.sample` (method "multistep").
    Raises ValueError for an unknown variant/skip_type or `order > len(timesteps)`.
    """
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
    if skip_type not in UNIPC_SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {UNIPC_SKIP_TYPES}, got {skip_type!r}")
    steps = len(timesteps)
    if not 1 <= order <= steps:
        raise ValueError(f"UniPC order must be in [1, steps] = [1, {steps}], got {order}")
    extra_args = {} if extra_args is None else extra_args
    vp = _VPTime(alphas_cumprod)
    s_in = x.new_ones([x.shape[0]])

    def data_fn(x_: Tensor, t: float) -> Tensor:
        alpha_t, sigma_t, _ = vp.alpha_sigma_lambda(t)
        eps = model(x_, vp.model_time(t) * s_in, **extra_args)
        return (x_ - sigma_t * eps) / alpha_t

    t_start = float(timesteps[-1]) / 1000 + 1 / 1000 if is_img2img else 1.0
    grid = _unipc_time_grid(vp, skip_type, t_start, 1.0 / vp.total_n, steps)
    model_prev, t_prev = [data_fn(x, grid[0])], [grid[0]]
    for step in range(1, steps + 1):
        if step < order:
            step_order = step
        else:
            step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, model_x = _unipc_update(data_fn, vp, x, model_prev, t_prev, grid[step], step_order, variant,
                                   use_corrector=step < steps)
        if callback is not None:
            callback({"x": x, "i": step - 1, "t": vp.model_time(grid[step]), "denoised": model_x})
        if step < steps:
            model_prev, t_prev = (model_prev + [model_x])[-order:], (t_prev + [grid[step]])[-order:]
    return x


TIMESTEP_SAMPLERS = {"DDIM": sample_ddim, "DDIM CFG++": sample_ddim_cfgpp, "PLMS": sample_plms, "UniPC": sample_unipc}

__all__ = ["CompVisTimestepsDenoiser", "TIMESTEP_SAMPLERS", "get_timesteps", "img2img_start", "sample_ddim",
           "sample_ddim_cfgpp", "sample_plms", "sample_unipc"]
