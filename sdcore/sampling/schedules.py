"""Sigma schedules ("schedulers") and the img2img step arithmetic.

Every schedule returns a descending float32 tensor of noise levels sigma (latent units) of length n + 1, ending in 0
(except `kl_optimal`, which ends at sigma_min, as in the reference). A sampler with n steps walks from sigmas[0] to
sigmas[-1]. Each function is computed the way the reference computes it (same dtype and operation order), so the
values match it bit for bit where the reference is torch.

Sources (facts, re-implemented): A1111 `modules/sd_schedulers.py` and `sd_samplers_kdiffusion.py::get_sigmas`,
`sd_samplers_common.py::setup_img2img_steps` (a1111-semantics §6.2, 6.3, 10.2); k-diffusion
`sampling.py::get_sigmas_karras`,
`get_sigmas_exponential`, `get_sigmas_polyexponential`; papers named in each docstring.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .denoisers import DiscreteSchedule

# Align Your Steps (Sabour et al. 2024) 10-step tables, from NVIDIA's "how to" page, as used by A1111 (a1111-semantics
# §10.2).
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps n must be an int >= 1, got {n!r}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 ("Elucidating the design space", eq. 5): [n + 1] float32, last 0.

    `sigma_i = (sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`, i = 0..n-1.
    Source: k-diffusion `get_sigmas_karras`. 20 steps SD1: 14.6146, 11.7254, 9.3402, ... 0.0292, 0 (a1111-semantics
    §13).
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in log sigma: `exp(linspace(log sigma_max, log sigma_min, n))` + [0] -> [n + 1] float32.

    Source: k-diffusion `get_sigmas_exponential`.
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """Polynomial in log sigma: `exp(r^rho * (log sigma_max - log sigma_min) + log sigma_min)`, r = linspace(1, 0, n).

    rho = 1 is `get_sigmas_exponential`. Returns [n + 1] float32, last 0. Source: k-diffusion
    `get_sigmas_polyexponential`.
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def uniform(n: int, schedule: DiscreteSchedule) -> Tensor:
    """The model's own schedule: `t_to_sigma(linspace(999, 0, n))` + [0] (k-diffusion `DiscreteSchedule.get_sigmas`).

    Ignores sigma_min/sigma_max overrides, as A1111's "Uniform" does. [n + 1] on the schedule's device.
    """
    _check_n(n)
    return schedule.get_sigmas(n)


def _timestep_range(n_points: int, sigma_min: float, sigma_max: float, schedule: DiscreteSchedule) -> Tensor:
    start = schedule.sigma_to_t(torch.tensor(sigma_max, device=schedule.sigmas.device))
    end = schedule.sigma_to_t(torch.tensor(sigma_min, device=schedule.sigmas.device))
    return torch.linspace(float(start), float(end), n_points)


def normal(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSchedule) -> Tensor:
    """Evenly spaced timesteps from t(sigma_max) to t(sigma_min), n of them, mapped to sigmas, + [0] -> [n + 1].

    With the model's own sigma range this equals `uniform`. Source: A1111 `sd_schedulers.normal_scheduler`.
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    return _append_zero(schedule.t_to_sigma(_timestep_range(n, sigma_min, sigma_max, schedule)).float().cpu())


def sgm_uniform(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSchedule) -> Tensor:
    """Like `normal` but n + 1 evenly spaced timesteps of which the last (t(sigma_min)) is dropped, + [0].

    Stability's sgm `DiscreteSampling`-style spacing. Source: A1111 `sd_schedulers.sgm_uniform`. 20 steps SD1:
    14.6146, 10.9073, 8.3072, ... 0.3437, 0.2255, 0 (a1111-semantics §13).
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    t = _timestep_range(n + 1, sigma_min, sigma_max, schedule)[:-1]
    return _append_zero(schedule.t_to_sigma(t).float().cpu())


def simple(n: int, schedule: DiscreteSchedule) -> Tensor:
    """Every (1000/n)-th discrete sigma from the top: `sigmas[-(1 + int(i * 1000 / n))]`, i = 0..n-1, + [0].

    Source: A1111 `sd_schedulers.simple_scheduler` (ComfyUI "simple"). Returns [n + 1] float32 CPU.
    """
    _check_n(n)
    stride = len(schedule.sigmas) / n
    picked = [float(schedule.sigmas[-(1 + int(i * stride))]) for i in range(n)]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


def ddim(n: int, schedule: DiscreteSchedule) -> Tensor:
    """The DDIM timestep grid in sigma: `sigmas[1::max(1000 // n, 1)]` reversed, + [0].

    Length is `len(range(1, 1000, stride)) + 1` (= n + 1 when n divides 1000). Source: A1111
    `sd_schedulers.ddim_scheduler`. 20 steps SD1: 11.0283, 8.3907, ... 0.2281, 0.0413, 0 (a1111-semantics §13).
    """
    _check_n(n)
    stride = max(len(schedule.sigmas) // n, 1)
    picked = [float(s) for s in schedule.sigmas[1::stride]][::-1]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024, "Align Your Steps", appendix): [n + 1] float32, NO final 0.

    `sigma_i = tan((i/n) * atan(sigma_min) + (1 - i/n) * atan(sigma_max))`, i = 0..n, ending at sigma_min (the
    sampler's last step goes to sigma_min, not 0, as in A1111 `sd_schedulers.kl_optimal`).
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    i = torch.arange(n + 1)
    return torch.tan(i / n * alpha_min + (1.0 - i / n) * alpha_max)


def loglinear_interp(values: tuple[float, ...] | list[float], num: int) -> np.ndarray:
    """Resample a decreasing sequence to `num` points by linear interpolation of log(value) on [0, 1] (float64).

    Source: NVIDIA Align Your Steps "how to" page, as used in A1111 `get_align_your_steps_sigmas`.
    """
    xs = np.linspace(0, 1, len(values))
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, num), xs, ys))[::-1].copy()


def align_your_steps(n: int, is_sdxl: bool = False) -> Tensor:
    """Align Your Steps (Sabour et al. 2024) tables for SD1 or SDXL, resampled to n values if n != 11, + [0].

    Uses the fixed table sigmas (not the model's range). Returns [n + 1] float32. 20 steps SD1: 14.615, 9.5217,
    6.3012, 4.8000, 3.7179, ... 0.0694, 0.029, 0 (a1111-semantics §13).
    """
    _check_n(n)
    table = AYS_SDXL if is_sdxl else AYS_SD1
    values = list(table) if n == len(table) else loglinear_interp(table, n).tolist()
    return torch.tensor(values + [0.0], dtype=torch.float32)


def beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Beta-distribution schedule (Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173).

    `sigma_i = sigma_min + ppf_Beta(alpha, beta)(1 - i/(n-1)) * (sigma_max - sigma_min)` (linear in sigma), float64
    then float32, + [0] -> [n + 1]. alpha = beta = 0.6 are A1111's option defaults. Source: A1111
    `sd_schedulers.beta_scheduler`. Raises ValueError unless alpha, beta > 0.
    """
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"beta schedule needs alpha > 0 and beta > 0, got alpha={alpha}, beta={beta}")
    from scipy import stats  # lazy: scipy.stats takes ~1-2 s to import and only this scheduler needs it

    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    sigmas = sigma_min + quantiles * (sigma_max - sigma_min)
    return torch.tensor(sigmas.tolist() + [0.0], dtype=torch.float32)


@dataclass(frozen=True)
class Scheduler:
    """One entry of the scheduler table: `name` (as in infotext/API), UI `label`, `function` (None = automatic),
    other accepted spellings `aliases`, and `default_rho` (None when the schedule has no rho)."""

    name: str
    label: str
    function: Callable[..., Tensor] | None
    aliases: tuple[str, ...] = field(default=())
    default_rho: float | None = None


# A1111 `sd_schedulers.schedulers` order (a1111-semantics §10.2); "Karras Exponential" of later A1111 versions is not
# included.
SCHEDULERS: tuple[Scheduler, ...] = (
    Scheduler("automatic", "Automatic", None),
    Scheduler("uniform", "Uniform", uniform),
    Scheduler("karras", "Karras", get_sigmas_karras, default_rho=7.0),
    Scheduler("exponential", "Exponential", get_sigmas_exponential),
    Scheduler("polyexponential", "Polyexponential", get_sigmas_polyexponential, default_rho=1.0),
    Scheduler("sgm_uniform", "SGM Uniform", sgm_uniform, aliases=("SGMUniform",)),
    Scheduler("kl_optimal", "KL Optimal", kl_optimal),
    Scheduler("align_your_steps", "Align Your Steps", align_your_steps),
    Scheduler("simple", "Simple", simple),
    Scheduler("normal", "Normal", normal),
    Scheduler("ddim", "DDIM", ddim),
    Scheduler("beta", "Beta", beta),
)


def find_scheduler(name: str | None) -> Scheduler:
    """The table entry whose name, label or alias is `name` (exact match); None means "automatic".

    Raises ValueError naming the accepted names for anything else.
    """
    if name is None:
        name = "automatic"
    for entry in SCHEDULERS:
        if name == entry.name or name == entry.label or name in entry.aliases:
            return entry
    raise ValueError(f"unknown scheduler {name!r}; expected one of {[s.name for s in SCHEDULERS]} "
                     f"(or their labels {[s.label for s in SCHEDULERS]})")


def get_sigmas(scheduler: str | None, steps: int, schedule: DiscreteSchedule, *, default_scheduler: str | None = None,
               discard_next_to_last_sigma: bool = False, sigma_min: float | None = None,
               sigma_max: float | None = None, rho: float | None = None, is_sdxl: bool = False,
               beta_alpha: float = 0.6, beta_beta: float = 0.6) -> Tensor:
    """The sigma schedule for `steps` sampler steps, as A1111's `KDiffusionSampler.get_sigmas` (a1111-semantics §10.2).

    - `scheduler`: a name, label or alias of `SCHEDULERS`; "automatic"/None uses `default_scheduler` (the sampler's
      preferred one, e.g. "karras" for DPM++ 2M), and with none of those the model's uniform schedule.
    - `schedule`: the model's `DiscreteSchedule` (its sigma range is the default sigma_min/sigma_max; "uniform",
      "simple" and "ddim" read its discrete sigmas).
    - `sigma_min`, `sigma_max`: overrides (A1111 options sigma_min/sigma_max, or (0.1, 10) for
      `use_old_karras_scheduler_sigmas`); `rho` overrides the default rho of karras (7) / polyexponential (1) and,
      as in A1111 (a global option), is ignored by schedules without rho (`Scheduler.default_rho` is None).
    - `discard_next_to_last_sigma`: build steps + 1 sigmas and drop the penultimate one (DPM2, DPM++ 3M SDE...).
    - `is_sdxl`: selects the SDXL Align Your Steps table; `beta_alpha`, `beta_beta`: the beta schedule's parameters.
    Returns float32 on the CPU, normally [steps + 1] and descending (last 0; kl_optimal ends at sigma_min).
    Raises ValueError for unknown names, steps < 1 or a bad sigma range.
    """
    _check_n(steps)
    entry = find_scheduler(scheduler)
    if entry.function is None and default_scheduler is not None:
        entry = find_scheduler(default_scheduler)
        if entry.function is None:
            raise ValueError("default_scheduler must name a concrete scheduler, not 'automatic'")
    n = steps + 1 if discard_next_to_last_sigma else steps
    lo = float(schedule.sigma_min) if sigma_min is None else float(sigma_min)
    hi = float(schedule.sigma_max) if sigma_max is None else float(sigma_max)
    rho = entry.default_rho if rho is None or entry.default_rho is None else float(rho)
    name = entry.name
    if name in ("automatic", "uniform"):
        sigmas = uniform(n, schedule)
    elif name == "karras":
        sigmas = get_sigmas_karras(n, lo, hi, rho=rho)
    elif name == "exponential":
        sigmas = get_sigmas_exponential(n, lo, hi)
    elif name == "polyexponential":
        sigmas = get_sigmas_polyexponential(n, lo, hi, rho=rho)
    elif name in ("sgm_uniform", "normal"):
        sigmas = entry.function(n, lo, hi, schedule)
    elif name in ("simple", "ddim"):
        sigmas = entry.function(n, schedule)
    elif name == "kl_optimal":
        sigmas = kl_optimal(n, lo, hi)
    elif name == "align_your_steps":
        sigmas = align_your_steps(n, is_sdxl=is_sdxl)
    else:  # "beta"
        sigmas = beta(n, lo, hi, alpha=beta_alpha, beta=beta_beta)
    if discard_next_to_last_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.float().cpu()


def setup_img2img_steps(steps: int, denoising_strength: float, fix_steps: bool = False) -> tuple[int, int]:
    """(steps, t_enc) for img2img: how long a schedule to build and how many of its steps to run, minus one.

    Default (A1111): the schedule keeps `steps`; `t_enc = int(min(d, 0.999) * steps)` (Python truncation, so
    0.29 * 100 = 28.999... -> 28), i.e. t_enc + 1 model steps. `fix_steps` (A1111 option `img2img_fix_steps`, or
    an explicit step count as hires fix passes): the schedule is stretched to `int(steps / min(d, 0.999))` steps and
    `t_enc = steps - 1`, so exactly `steps` steps run. Source: A1111 `sd_samplers_common.setup_img2img_steps`
    (a1111-semantics §6.2, table in a1111-semantics §13: 20 steps at 0.75 -> (20, 15); with fix_steps -> (26, 19)).

    Raises ValueError for steps < 1, a strength outside [0, 1], or fix_steps with strength 0 (a 0-step schedule).
    """
    _check_n(steps)
    if not 0.0 <= denoising_strength <= 1.0:
        raise ValueError(f"denoising_strength must be in [0, 1], got {denoising_strength}")
    strength = min(denoising_strength, 0.999)
    if not fix_steps:
        return steps, int(strength * steps)
    if denoising_strength == 0:
        raise ValueError("fix_steps with denoising_strength=0 gives a 0-step schedule; use a strength > 0")
    return int(steps / strength), steps - 1


def img2img_sigmas(sigmas: Tensor, steps: int, t_enc: int) -> Tensor:
    """The tail of a `steps`-step schedule that img2img runs: `sigmas[steps - t_enc - 1:]`.

    `sigmas` from `get_sigmas(.., steps, ..)`, normally [steps + 1] so the tail has t_enc + 2 values (t_enc + 1
    sampler steps); `t_enc` from `setup_img2img_steps`, 0 <= t_enc <= steps - 1. The first value is the noise level
    added to the init latent (`xi = init_latent + noise * sigmas[0]`). The slice is taken from the front even when a
    schedule's length is not steps + 1 ("ddim" when steps does not divide 1000), as the reference does. Source: A1111
    `KDiffusionSampler.sample_img2img` (a1111-semantics §6.3). Example: 20-step uniform schedule, t_enc 15 -> starts at
    4.8557.
    Raises ValueError if t_enc is out of range or fewer than 2 sigmas would remain.
    """
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    if not 0 <= t_enc <= steps - 1:
        raise ValueError(f"t_enc must be in [0, steps - 1] = [0, {steps - 1}], got {t_enc}")
    start = steps - t_enc - 1
    if sigmas.shape[0] - start < 2:
        raise ValueError(f"sigmas has {sigmas.shape[0]} values; a {steps}-step schedule sliced at {start} needs more")
    return sigmas[start:]


__all__ = ["AYS_SD1", "AYS_SDXL", "SCHEDULERS", "Scheduler", "align_your_steps", "beta", "ddim", "find_scheduler",
           "get_sigmas", "get_sigmas_exponential", "get_sigmas_karras", "get_sigmas_polyexponential",
           "img2img_sigmas", "kl_optimal", "loglinear_interp", "normal", "setup_img2img_steps", "sgm_uniform",
           "simple", "uniform"]
