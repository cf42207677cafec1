"""Denoisers: the discrete DDPM noise schedule, the eps/v model wrappers and classifier-free guidance.

Glossary: B = images in the batch, N = conditioning rows (B, or more with AND prompts), C = latent channels,
h, w = latent cells (pixels / 8), T = tokens, sigma = noise standard deviation in latent units (k-diffusion's
"variance exploding" parametrisation x_sigma = x_0 + sigma * eps), t = DDPM timestep in [0, 999] (continuous).

Sources (facts, re-implemented): k-diffusion `k_diffusion/external.py` (`DiscreteSchedule`, `CompVisDenoiser`,
`CompVisVDenoiser`), A1111 `modules/sd_samplers_cfg_denoiser.py` (`CFGDenoiser`), spec sections 7 and 7.1.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Cond = Mapping[str, Tensor]
CondSource = Cond | Callable[[int], Cond]


def sd_alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012,
                      num_timesteps: int = 1000) -> Tensor:
    """The cumulative product of alphas of Stable Diffusion's "scaled linear" DDPM schedule.

    `betas = linspace(sqrt(linear_start), sqrt(linear_end), num_timesteps, float64) ** 2`,
    `alphas_cumprod = cumprod(1 - betas)`, computed in float64 and returned as float32 [num_timesteps] on the CPU
    (the dtype checkpoints store). Values decrease from 0.99915 (t=0) to 0.0046601 (t=999) (a1111-semantics §13).
    Source: CompVis `configs/stable-diffusion/v1-inference.yaml` (linear_start, linear_end) and
    `ldm/modules/diffusionmodules/util.py::make_beta_schedule("linear")`; SDXL's `LegacyDDPMDiscretization` uses the
    same numbers (a1111-semantics §7.1).

    Raises ValueError if the bounds are not 0 < linear_start <= linear_end < 1 or num_timesteps < 2.
    """
    if not 0.0 < linear_start <= linear_end < 1.0:
        raise ValueError(f"need 0 < linear_start <= linear_end < 1, got linear_start={linear_start}, "
                         f"linear_end={linear_end}")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def _as_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    if not isinstance(alphas_cumprod, Tensor):
        raise TypeError(f"alphas_cumprod must be a torch.Tensor, got {type(alphas_cumprod).__name__}")
    if alphas_cumprod.ndim != 1 or alphas_cumprod.shape[0] < 2:
        raise ValueError(f"alphas_cumprod must be 1-D with at least 2 values, got shape {tuple(alphas_cumprod.shape)}")
    if not torch.is_floating_point(alphas_cumprod):
        raise TypeError(f"alphas_cumprod must be floating point, got {alphas_cumprod.dtype}")
    if bool(((alphas_cumprod <= 0) | (alphas_cumprod > 1)).any()):
        raise ValueError(f"alphas_cumprod values must lie in (0, 1], got min {float(alphas_cumprod.min()):g}, "
                         f"max {float(alphas_cumprod.max()):g}")
    return alphas_cumprod


def _check_sigma(sigma: Tensor, x: Tensor) -> None:
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must have shape [B]=[{x.shape[0]}], got {tuple(sigma.shape)}")


class DiscreteSchedule:
    """Map between the model's 1000 discrete timesteps and continuous noise levels sigma.

    `alphas_cumprod`: [n] float tensor, decreasing, values in (0, 1] (e.g. `sd_alphas_cumprod()`); the schedule's
    tensors live on its device and have its dtype.

    Attributes: `sigmas` [n] ascending `sqrt((1 - a) / a)`, `log_sigmas` [n], `sigma_min = sigmas[0]`,
    `sigma_max = sigmas[-1]` (0-dim tensors; SD1: 0.0291675 and 14.614642, a1111-semantics §13), `quantize` (default for
    `sigma_to_t`).

    Source: k-diffusion `external.py::DiscreteSchedule` and `DiscreteEpsDDPMDenoiser.__init__` (a1111-semantics §7.1).
    """

    def __init__(self, alphas_cumprod: Tensor, quantize: bool = False):
        alphas_cumprod = _as_alphas_cumprod(alphas_cumprod)
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.quantize = quantize

    @property
    def sigma_min(self) -> Tensor:
        """The smallest discrete noise level, sigmas[0] (0-dim)."""
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        """The largest discrete noise level, sigmas[-1] (0-dim)."""
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: Tensor, quantize: bool | None = None) -> Tensor:
        """Continuous timestep t for noise level `sigma` (any shape, > 0), same shape.

        Linear interpolation in log sigma between the two neighbouring discrete levels, clamped to [0, n-1];
        `quantize=True` returns the nearest integer index instead (int64). Defaults to `self.quantize`.
        Example (SD1): sigma_to_t(1.0) = 353.89 (a1111-semantics §13).
        """
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.log().flatten()
        dists = log_sigma - self.log_sigmas[:, None]  # (n, numel): signed distance to every level
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        # Index of the last level <= sigma (log_sigmas ascend), kept in [0, n-2] so that `high` exists.
        low_idx = (dists.ge(0).sum(dim=0) - 1).clamp(min=0, max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Noise level for continuous timestep `t` (any shape, values in [0, n-1]), float32-or-wider, same shape.

        `exp((1 - frac) * log_sigmas[floor t] + frac * log_sigmas[ceil t])`. Example (SD1): t_to_sigma(250.5) =
        0.697097, t_to_sigma(500) = 1.61828 (a1111-semantics §13). Raises ValueError for t outside [0, n-1].
        """
        t = torch.as_tensor(t, device=self.sigmas.device).float()
        if bool(((t < 0) | (t > self.sigmas.shape[0] - 1)).any()):
            raise ValueError(f"t must lie in [0, {self.sigmas.shape[0] - 1}], got values "
                             f"{float(t.min())}..{float(t.max())}")
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()

    def get_sigmas(self, n: int | None = None) -> Tensor:
        """The "uniform" schedule: `t_to_sigma(linspace(n_t - 1, 0, n))` followed by a 0 -> [n + 1], descending.

        `n=None` returns all discrete sigmas descending plus 0. Raises ValueError if n < 1.
        """
        if n is None:
            sigmas = self.sigmas.flip(0)
        else:
            if n < 1:
                raise ValueError(f"n must be >= 1, got {n}")
            t = torch.linspace(self.sigmas.shape[0] - 1, 0, n, device=self.sigmas.device)
            sigmas = self.t_to_sigma(t)
        return torch.cat([sigmas, sigmas.new_zeros([1])])


def _append_dims(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class CompVisDenoiser(DiscreteSchedule):
    """Wrap an LDM eps- or v-prediction model as a k-diffusion denoiser `D(x, sigma) -> denoised x0`.

    `apply_model(x_scaled [B,C_in,h,w], t [B] float, **cond) -> [B,C,h,w]` is the UNet call (eps or v prediction);
    the cond keys (`c_crossattn` [B,T,Ctxt], `c_concat` [B,Cc,h,w], `y` [B,adm]) are passed through unchanged.
    `alphas_cumprod` [1000] as in `DiscreteSchedule`. `prediction`: "eps" (k-diffusion `CompVisDenoiser`) or "v"
    (`CompVisVDenoiser`, SD2-768). Also a `DiscreteSchedule` (sigma_to_t, t_to_sigma, get_sigmas, sigma_min...).

    Source: k-diffusion `external.py` `DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser` with sigma_data = 1
    (a1111-semantics §7.1); v-parametrisation: Salimans & Ho 2022, "Progressive distillation", eq. for v.
    Raises ValueError for an unknown `prediction`.
    """

    PREDICTIONS = ("eps", "v")

    def __init__(self, apply_model: Callable[..., Tensor], alphas_cumprod: Tensor, prediction: str = "eps",
                 quantize: bool = False):
        if prediction not in self.PREDICTIONS:
            raise ValueError(f"prediction must be one of {self.PREDICTIONS}, got {prediction!r}")
        if not callable(apply_model):
            raise TypeError(f"apply_model must be callable, got {type(apply_model).__name__}")
        super().__init__(alphas_cumprod, quantize)
        self.apply_model = apply_model
        self.prediction = prediction

    def get_scalings(self, sigma: Tensor) -> tuple[Tensor | float, Tensor, Tensor]:
        """(c_skip, c_out, c_in) for noise level `sigma` (any shape); denoised = F(x*c_in)*c_out + x*c_skip.

        eps: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1).
        v: c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1), c_in = 1/sqrt(sigma^2+1).
        Example: sigma = 14.614642 -> c_in 0.068265, v c_skip 0.0046601, v c_out -0.997667 (a1111-semantics §13).
        """
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        if self.prediction == "eps":
            return 1.0, -sigma, c_in
        c_skip = 1 / (sigma ** 2 + 1)
        c_out = -sigma / (sigma ** 2 + 1) ** 0.5
        return c_skip, c_out, c_in

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """Denoised estimate of x0 for latents `x` [B,C,h,w] at noise levels `sigma` [B] (> 0); shape of x.

        Raises ValueError unless sigma has shape [B]."""
        _check_sigma(sigma, x)
        c_skip, c_out, c_in = self.get_scalings(sigma)
        c_out, c_in = _append_dims(c_out, x.ndim), _append_dims(c_in, x.ndim)
        out = self.apply_model(x * c_in, self.sigma_to_t(sigma), **cond)
        if self.prediction == "eps":
            return x + out * c_out
        return out * c_out + x * _append_dims(c_skip, x.ndim)

    __call__ = forward


class LCMCompVisDenoiser(CompVisDenoiser):
    """The denoiser A1111 uses for its "LCM" sampler (`modules/sd_samplers_lcm.py` `LCMCompVisDenoiser`).

    Latent Consistency Models (Luo et al. 2023) are distilled on `original_timesteps` = 50 of the 1000 DDPM steps,
    every `skip = 1000 // 50 = 20`-th one ending at 999: their schedule is `alphas_cumprod[skip-1::skip]` (50 values).
    - `sigma_to_t`: the nearest of those 50 levels (quantised), as a DDPM timestep `index * skip + skip - 1`.
    - `t_to_sigma(t)`: interpolation on the 50-level table at `clamp((t - (skip - 1)) / skip, 0, 49)`.
    - `get_sigmas(n)` ("uniform" for LCM): `t_to_sigma(linspace(t(sigma_max), t(sigma_min), n))` + [0].
    - `forward`: the eps estimate `d = x - sigma * eps(x * c_in, t)` passed through the consistency-model boundary
      condition with sigma_data = 0.5 and a timestep scaled by 10: `c_skip = 0.25 / (s^2 + 0.25)`,
      `c_out = s / sqrt(s^2 + 0.25)`, `s = 10 t`, `out = c_out * d + c_skip * x` (Song et al. 2023, eq. 7).
    eps-prediction models only. Raises ValueError unless 2 <= original_timesteps <= len(alphas_cumprod).
    """

    def __init__(self, apply_model: Callable[..., Tensor], alphas_cumprod: Tensor, original_timesteps: int = 50):
        full = _as_alphas_cumprod(alphas_cumprod)
        if isinstance(original_timesteps, bool) or not isinstance(original_timesteps, int) \
                or not 2 <= original_timesteps <= full.shape[0]:
            raise ValueError(f"original_timesteps must be an int in [2, {full.shape[0]}], got {original_timesteps!r}")
        self.skip = full.shape[0] // original_timesteps
        super().__init__(apply_model, full[self.skip - 1::self.skip], prediction="eps", quantize=True)

    def sigma_to_t(self, sigma: Tensor, quantize: bool | None = None) -> Tensor:
        return super().sigma_to_t(sigma, quantize=True) * self.skip + (self.skip - 1)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=self.sigmas.device).float()
        index = ((t - (self.skip - 1)) / self.skip).clamp(0, self.sigmas.shape[0] - 1)
        return super().t_to_sigma(index)

    def get_sigmas(self, n: int | None = None) -> Tensor:
        if n is None:
            return super().get_sigmas()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        t = torch.linspace(float(self.sigma_to_t(self.sigma_max)), float(self.sigma_to_t(self.sigma_min)), n,
                           device=self.sigmas.device)
        return torch.cat([self.t_to_sigma(t), self.sigmas.new_zeros([1])])

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """LCM denoised estimate for `x` [B,C,h,w] at `sigma` [B] (class docstring); ValueError unless sigma is [B]."""
        _check_sigma(sigma, x)
        t = self.sigma_to_t(sigma)
        c_in = _append_dims(1 / (sigma ** 2 + 1) ** 0.5, x.ndim)
        d = x - _append_dims(sigma, x.ndim) * self.apply_model(x * c_in, t, **cond)
        s = _append_dims(t.to(x.dtype) * 10.0, x.ndim)
        c_skip = 0.25 / (s ** 2 + 0.25)
        c_out = s / (s ** 2 + 0.25) ** 0.5
        return c_out * d + c_skip * x

    __call__ = forward


def combine_denoised(x_out: Tensor, uncond_out: Tensor, conds_list: Sequence[Sequence[tuple[int, float]]],
                     cond_scale: float) -> Tensor:
    """Classifier-free guidance with AND-composition (composable diffusion, Liu et al. 2022).

    `out[i] = uncond_out[i] + sum_k (x_out[row_k] - uncond_out[i]) * (w_k * cond_scale)` over the (row_k, w_k) pairs
    of `conds_list[i]`. `x_out` [N, ...] cond-row outputs, `uncond_out` [B, ...]. Returns [B, ...] (new tensor).
    Source: A1111 `CFGDenoiser.combine_denoised` (a1111-semantics §7 step 8).
    """
    denoised = uncond_out.clone()
    for i, parts in enumerate(conds_list):
        for row, weight in parts:
            denoised[i] += (x_out[row] - uncond_out[i]) * (weight * cond_scale)
    return denoised


def combine_denoised_for_edit_model(out_cond: Tensor, out_img_cond: Tensor, out_uncond: Tensor, cond_scale: float,
                                    image_cfg_scale: float) -> Tensor:
    """InstructPix2Pix three-way guidance (Brooks et al. 2023, eq. 3), all tensors [B, ...].

    `out_uncond + cond_scale * (out_cond - out_img_cond) + image_cfg_scale * (out_img_cond - out_uncond)` where
    out_cond = text and image conditioned, out_img_cond = image only, out_uncond = neither.
    Source: A1111 `CFGDenoiser.combine_denoised_for_edit_model` (a1111-semantics §7 step 8).
    """
    return out_uncond + cond_scale * (out_cond - out_img_cond) + image_cfg_scale * (out_img_cond - out_uncond)


def _cat_conds(conds: Sequence[Cond]) -> dict[str, Tensor]:
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ValueError(f"cond and uncond must have the same keys, got {sorted(keys)} and {sorted(c)}")
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


@dataclass
class CFGDenoiser:
    """Classifier-free guidance around a denoiser (a1111-semantics §7); the mask blend lives in `sampling/blends.py`.

    `inner(x [R,C,h,w], sigma [R], **cond) -> [R,C,h,w]`: a `CompVisDenoiser` (k-diffusion samplers, outputs
    denoised) or an eps model taking timesteps (timestep samplers, outputs eps); guidance is linear so both work.
    `image_cfg_scale`, `is_edit_model`: InstructPix2Pix; edit mode iff is_edit_model and image_cfg_scale is not None
    and != 1.0 (then AND prompts are refused).

    Batching (A1111 with batch_cond_uncond on, pad conds off): cond and uncond rows go in one model call when their
    token lengths match, else cond rows and uncond rows in two calls.

    Call index: the denoiser holds no step counter. `forward` takes `step` (0-based index of this model evaluation,
    as A1111's `self.step`) and `total_steps` explicitly; the sampling loop supplies them (see `with_call_index`).
    Prompt schedules: `cond`/`uncond` may be callables `step -> dict` that return the conditioning for that call.
    """

    inner: Callable[..., Tensor]
    image_cfg_scale: float | None = None
    is_edit_model: bool = False

    @property
    def edit_mode(self) -> bool:
        """True when three-way InstructPix2Pix guidance is used (a1111-semantics §7 step 1)."""
        return self.is_edit_model and self.image_cfg_scale is not None and self.image_cfg_scale != 1.0

    def skips_uncond(self, sigma: Tensor, step: int, s_min_uncond: float) -> bool:
        """NGMS (a1111-semantics §7 step 5): odd calls below the `s_min_uncond` sigma drop the uncond rows."""
        return bool(step % 2 and s_min_uncond > 0 and float(sigma[0]) < s_min_uncond and not self.edit_mode)

    def forward(self, x: Tensor, sigma: Tensor, cond: CondSource, uncond: CondSource, cond_scale: float,
                image_cond: Tensor | None = None, s_min_uncond: float = 0.0,
                conds_list: Sequence[Sequence[tuple[int, float]]] | None = None, step: int = 0,
                total_steps: int | None = None, return_uncond: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """One guided model evaluation (a1111-semantics §7).

        - `x` [B,C,h,w] latents, `sigma` [B] noise levels (or timesteps for eps-model inners).
        - `cond`: {"c_crossattn": [N,T,Ctxt], optional "y": [N,adm]} with N conditioning rows, or a callable
          `step -> dict` (prompt schedules); `uncond` the same with B rows.
        - `cond_scale`: CFG scale; `image_cond` [B,Cc,h,w] or None: passed as `c_concat` (inpainting mask + masked
          latent, or the InstructPix2Pix image latent).
        - `s_min_uncond`: NGMS sigma threshold (0 = off). `conds_list[i]` = [(row, weight), ...] the AND-parts of
          image i; rows must be 0..N-1 in order (default: one row of weight 1 per image).
        - `step`: index of this call (NGMS acts on odd calls); `total_steps`: the expected number of calls
          (accepted for the sampler contract, unused by CFG itself).
        - `return_uncond`: also return the uncond rows' output [B,C,h,w] (the first cond row's output on skipped
          calls) — DDIM CFG++ needs it.
        Returns denoised (or guided eps) [B,C,h,w]. Raises ValueError on inconsistent shapes.
        """
        batch = x.shape[0]
        _check_sigma(sigma, x)
        cond = dict(cond(step) if callable(cond) else cond)
        uncond = dict(uncond(step) if callable(uncond) else uncond)
        if "c_crossattn" not in cond or "c_crossattn" not in uncond:
            raise ValueError("cond and uncond must contain 'c_crossattn'")
        n_rows = cond["c_crossattn"].shape[0]
        if conds_list is None:
            if n_rows != batch:
                raise ValueError(f"cond has {n_rows} rows but x has {batch} images; pass conds_list for AND prompts")
            conds_list = [[(i, 1.0)] for i in range(batch)]
        rows = [row for parts in conds_list for row, _ in parts]
        if len(conds_list) != batch or rows != list(range(n_rows)):
            raise ValueError(f"conds_list must list the cond rows 0..{n_rows - 1} in order, one entry per image "
                             f"({batch}), got {conds_list}")
        if uncond["c_crossattn"].shape[0] != batch:
            raise ValueError(f"uncond must have {batch} rows, got {uncond['c_crossattn'].shape[0]}")
        edit = self.edit_mode
        if edit and n_rows != batch:
            raise ValueError("AND prompts are not supported with the edit model unless image_cfg_scale = 1")
        if edit and image_cond is None:
            raise ValueError("the edit model needs image_cond (the image latent)")

        repeats = torch.tensor([len(parts) for parts in conds_list], device=x.device)
        skip = self.skips_uncond(sigma, step, s_min_uncond)
        # Row layout (a1111-semantics §7 step 4): cond rows (x[i] once per AND part), then B uncond rows; edit: + B
        # rows with
        # a zero image.
        groups = [(x.repeat_interleave(repeats, 0), sigma.repeat_interleave(repeats, 0),
                   None if image_cond is None else image_cond.repeat_interleave(repeats, 0))]
        if not skip:
            groups.append((x, sigma, image_cond))
            if edit:
                groups.append((x, sigma, torch.zeros_like(image_cond)))
        x_in, sigma_in = torch.cat([g[0] for g in groups]), torch.cat([g[1] for g in groups])
        image_cond_in = None if image_cond is None else torch.cat([g[2] for g in groups])

        text_cond, text_uncond = cond["c_crossattn"], uncond["c_crossattn"]
        if skip:
            x_out = self.inner(x_in, sigma_in, **_with_image(cond, image_cond_in))
        else:
            unconds = [uncond, uncond] if edit else [uncond]
            if text_cond.shape[1] == text_uncond.shape[1]:
                x_out = self.inner(x_in, sigma_in, **_with_image(_cat_conds([cond, *unconds]), image_cond_in))
            else:
                x_out = torch.cat([
                    self.inner(x_in[:n_rows], sigma_in[:n_rows], **_with_image(cond, _rows(image_cond_in, 0, n_rows))),
                    self.inner(x_in[n_rows:], sigma_in[n_rows:],
                               **_with_image(_cat_conds(unconds), _rows(image_cond_in, n_rows, None))),
                ])

        out_cond = x_out[:n_rows]
        if skip:
            first_rows = [parts[0][0] for parts in conds_list]
            out_uncond = out_cond[first_rows]
            denoised = combine_denoised(out_cond, out_uncond, conds_list, 1.0)
        elif edit:
            out_uncond = x_out[n_rows + batch:]
            denoised = combine_denoised_for_edit_model(out_cond, x_out[n_rows:n_rows + batch], out_uncond,
                                                       cond_scale, self.image_cfg_scale)
        else:
            out_uncond = x_out[n_rows:]
            denoised = combine_denoised(out_cond, out_uncond, conds_list, cond_scale)

        return (denoised, out_uncond) if return_uncond else denoised

    __call__ = forward


def _with_image(cond: Cond, image_cond: Tensor | None) -> dict[str, Tensor]:
    """The inner model's keyword conditioning: the text dict plus `c_concat` when there is image conditioning."""
    return dict(cond) if image_cond is None else {**cond, "c_concat": image_cond}


def _rows(t: Tensor | None, a: int, b: int | None) -> Tensor | None:
    return None if t is None else t[a:b]


def with_call_index(denoiser: Callable[..., Tensor], total_steps: int | None = None) -> Callable[..., Tensor]:
    """Wrap `denoiser` so that its k-th call receives `step=k` (k = 0, 1, ...) and `total_steps`.

    The counter lives in the returned closure, built fresh for one sampling run by the caller, so the denoiser
    itself stays a pure function of its arguments. Use: `model = with_call_index(cfg, total_steps)` then
    `sample_euler(model, x, sigmas, extra_args={...})`.
    """
    calls = itertools.count()

    def call(x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        return denoiser(x, sigma, step=next(calls), total_steps=total_steps, **kwargs)

    return call


__all__ = ["sd_alphas_cumprod", "DiscreteSchedule", "CompVisDenoiser", "LCMCompVisDenoiser", "CFGDenoiser",
           "combine_denoised", "combine_denoised_for_edit_model", "with_call_index"]

