"""Tests for sdcore.sampling.schedules: parity with k-diffusion's get_sigmas_* functions, the hand-derived 20-step
vectors and the steps / t_enc table of spec section 13, and the get_sigmas options of a1111-semantics §10.2."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from oracles import k_sampling
from sdcore.sampling import schedules as sch
from sdcore.sampling.denoisers import DiscreteSchedule, sd_alphas_cumprod
from sdcore.sampling.schedules import (SCHEDULERS, find_scheduler, get_sigmas, img2img_sigmas, setup_img2img_steps)


@pytest.fixture(scope="module")
def model():
    return DiscreteSchedule(sd_alphas_cumprod())


@pytest.fixture(scope="module")
def ks():
    return k_sampling()


def assert_printed(actual, expected, decimals=4):
    """`actual` matches the spec's printed values to within half a unit of their last printed digit."""
    actual = torch.as_tensor(actual, dtype=torch.float64).flatten()
    expected = torch.tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    assert err <= 0.5 * 10 ** -decimals + 1e-9, f"max abs error {err}: {actual.tolist()} vs {expected.tolist()}"


def check_ends(sigmas, head, tail, decimals=4, length=21):
    """a1111-semantics §13 prints the first values '...' the last ones; check both ends and the length."""
    assert sigmas.shape == (length,) and sigmas.dtype == torch.float32
    assert_printed(sigmas[:len(head)], head, decimals)
    assert_printed(sigmas[-len(tail):], tail, decimals)
    assert bool((sigmas[:-1] > sigmas[1:]).all()), "schedule must be strictly decreasing"


# ------------------------------------------------------------------------------------ k-diffusion parity

@pytest.mark.parametrize("n", [1, 2, 3, 10, 20, 37, 100])
def test_karras_exponential_polyexponential_parity(ks, n):
    for smin, smax in [(0.0291675, 14.614642), (0.1, 10.0), (0.002, 80.0)]:
        for rho in (7.0, 3.0, 1.0):
            assert torch.equal(sch.get_sigmas_karras(n, smin, smax, rho), ks.get_sigmas_karras(n, smin, smax, rho))
            assert torch.equal(sch.get_sigmas_polyexponential(n, smin, smax, rho),
                               ks.get_sigmas_polyexponential(n, smin, smax, rho))
        assert torch.equal(sch.get_sigmas_exponential(n, smin, smax), ks.get_sigmas_exponential(n, smin, smax))


# ------------------------------------------------------------------------------------ a1111-semantics §13 vectors

def test_uniform_and_normal_spec13(model):
    # a1111-semantics §13 "20-step schedules", uniform / normal
    expected = [14.6146, 10.7468, 8.0815, 6.2049, 4.8557, 3.8654, 3.1238, 2.5572, 2.1157, 1.7648, 1.4806, 1.2458,
                1.0481, 0.8784, 0.7297, 0.5964, 0.4736, 0.3555, 0.2322, 0.0292, 0.0]
    for name in ("uniform", "normal", "automatic", None):
        assert_printed(get_sigmas(name, 20, model), expected)


def test_karras_spec13(model):
    expected = [14.6146, 11.7254, 9.3402, 7.3836, 5.7894, 4.4998, 3.4648, 2.6408, 1.9909, 1.4832, 1.0908, 0.7909,
                0.5647, 0.3964, 0.2730, 0.1842, 0.1213, 0.0779, 0.0485, 0.0292, 0.0]
    assert_printed(get_sigmas("karras", 20, model), expected)
    assert_printed(get_sigmas("Automatic", 20, model, default_scheduler="karras"), expected)


def test_exponential_spec13(model):
    sig = get_sigmas("exponential", 20, model)
    check_ends(sig, [14.6146, 10.5363, 7.5961, 5.4763, 3.9481, 2.8464, 2.0521, 1.4794, 1.0666, 0.7689],
               [0.0405, 0.0292, 0.0])
    assert torch.allclose(get_sigmas("polyexponential", 20, model), sig, rtol=1e-6, atol=0)  # rho = 1


def test_old_karras_spec13(model):
    # a1111-semantics §13: karras with the old (0.1, 10) range (use_old_karras_scheduler_sigmas)
    check_ends(get_sigmas("karras", 20, model, sigma_min=0.1, sigma_max=10), [10.0, 8.3536, 6.9453, 5.7455, 4.7280],
               [0.1398, 0.1, 0.0])


def test_sgm_uniform_simple_spec13(model):
    check_ends(get_sigmas("sgm_uniform", 20, model), [14.6146, 10.9073, 8.3072], [0.3437, 0.2255, 0.0])
    assert torch.equal(get_sigmas("SGMUniform", 20, model), get_sigmas("SGM Uniform", 20, model))
    check_ends(get_sigmas("simple", 20, model), [14.6146, 10.9042, 8.3028], [0.3417, 0.2230, 0.0])


def test_ddim_scheduler_spec13(model):
    sig = get_sigmas("ddim", 20, model)
    check_ends(sig, [11.0283, 8.3907, 6.5064, 5.1344, 4.1167], [0.2281, 0.0413, 0.0])
    # the values are the model's sigmas at t = 951, 901, ..., 1 (a1111-semantics §6.4 timesteps)
    assert torch.equal(sig[:-1], model.sigmas[[951 - 50 * i for i in range(20)]])


def test_kl_optimal_spec13(model):
    sig = get_sigmas("kl_optimal", 20, model)
    check_ends(sig, [14.6146, 6.9957, 4.5650, 3.3594, 2.6329], [0.1783, 0.1032, 0.0292])  # 21 values, no zero
    assert sig[-1].item() == pytest.approx(model.sigma_min.item(), rel=1e-6)


def test_align_your_steps_spec13(model):
    check_ends(get_sigmas("align_your_steps", 20, model), [14.615, 9.5217, 6.3012, 4.8000, 3.7179],
               [0.1599, 0.0694, 0.029, 0.0])
    # n = 11 uses the table itself (a1111-semantics §10.2), SD1 or SDXL
    assert_printed(get_sigmas("align_your_steps", 11, model), list(sch.AYS_SD1) + [0.0], decimals=6)
    assert_printed(get_sigmas("align_your_steps", 11, model, is_sdxl=True), list(sch.AYS_SDXL) + [0.0], decimals=6)
    sdxl20 = get_sigmas("align_your_steps", 20, model, is_sdxl=True)
    # log-linear interpolation: the midpoint of 20 points (x = 9.5/19 = 0.5 -> table index 5) is exact
    assert sdxl20[0].item() == pytest.approx(14.615) and sdxl20[-2].item() == pytest.approx(0.029)
    mid = np.exp(np.interp(0.5, np.linspace(0, 1, 11), np.log(sch.AYS_SDXL[::-1])))
    assert mid == pytest.approx(sch.AYS_SDXL[5])


def test_beta_spec13(model):
    sig = get_sigmas("beta", 20, model)
    check_ends(sig, [14.6146, 14.4152, 13.9863, 13.3927], [0.6575, 0.2286, 0.0292, 0.0])
    other = get_sigmas("beta", 20, model, beta_alpha=2.0, beta_beta=0.5)
    smin, smax = model.sigma_min.item(), model.sigma_max.item()
    ref = smin + stats.beta.ppf(1 - 5 / 19, 2.0, 0.5) * (smax - smin)
    assert other[5].item() == pytest.approx(ref, rel=1e-6)


def test_img2img_first_sigmas_spec13(model):
    # a1111-semantics §13: img2img 20 steps, d=0.75 -> t_enc 15; first sigma Euler (uniform) 4.8557, DPM++ 2M (karras)
    # 5.7894,
    # DPM++ 2M SDE (exponential) 3.9481; 17 sigmas = 16 model steps
    steps, t_enc = setup_img2img_steps(20, 0.75)
    for name, first in [("uniform", 4.8557), ("karras", 5.7894), ("exponential", 3.9481)]:
        tail = img2img_sigmas(get_sigmas(name, steps, model), steps, t_enc)
        assert tail.shape == (17,) and tail[-1] == 0
        assert_printed(tail[:1], [first])


# a1111-semantics §13 "Steps / t_enc / slice": (p.steps, d, steps, t_enc, start, calls, fix: steps, t_enc, start)
STEPS_TABLE = [
    (20, 0.75, 20, 15, 4, 16, (26, 19, 6)),
    (20, 0.5, 20, 10, 9, 11, (40, 19, 20)),
    (20, 1.0, 20, 19, 0, 20, (20, 19, 0)),
    (20, 0.0, 20, 0, 19, 1, None),  # fix_steps: 0 steps, "degenerate" in the spec -> ValueError here
    (20, 0.3, 20, 6, 13, 7, (66, 19, 46)),
    (20, 0.05, 20, 1, 18, 2, (400, 19, 380)),
    (20, 0.049, 20, 0, 19, 1, (408, 19, 388)),
    (10, 0.35, 10, 3, 6, 4, (28, 9, 18)),
    (50, 0.75, 50, 37, 12, 38, (66, 49, 16)),
    (100, 0.29, 100, 28, 71, 29, (344, 99, 244)),  # 0.29 * 100 = 28.999... -> 28
]


@pytest.mark.parametrize("p_steps, d, steps, t_enc, start, calls, fixed", STEPS_TABLE)
def test_setup_img2img_steps_table_spec13(model, p_steps, d, steps, t_enc, start, calls, fixed):
    assert setup_img2img_steps(p_steps, d) == (steps, t_enc)
    sigmas = get_sigmas("uniform", steps, model)
    tail = img2img_sigmas(sigmas, steps, t_enc)
    assert torch.equal(tail, sigmas[start:]) and len(tail) - 1 == calls
    if fixed is None:
        with pytest.raises(ValueError, match="denoising_strength=0"):
            setup_img2img_steps(p_steps, d, fix_steps=True)
        return
    f_steps, f_t_enc, f_start = fixed
    assert setup_img2img_steps(p_steps, d, fix_steps=True) == (f_steps, f_t_enc)
    f_tail = img2img_sigmas(get_sigmas("karras", f_steps, model), f_steps, f_t_enc)
    assert len(f_tail) - 1 == p_steps  # fix_steps runs exactly the requested number of steps
    assert f_steps - f_t_enc - 1 == f_start


def test_strength_capped_at_0_999_spec62():
    # a1111-semantics §6.2: A1111 uses min(denoising_strength, 0.999). At 1000 steps and strength 1: t_enc = int(0.999
    # * 1000)
    # = 999 (a cap of 0.99 would give 990); with fix_steps the schedule has int(1000 / 0.999) = int(1001.001) = 1001
    # steps (0.99 would give 1010).
    assert setup_img2img_steps(1000, 1.0) == (1000, 999)
    assert setup_img2img_steps(1000, 1.0, fix_steps=True) == (1001, 999)
    assert setup_img2img_steps(1000, 0.9995) == (1000, 999)


def test_img2img_errors(model):
    sigmas = get_sigmas("uniform", 20, model)
    with pytest.raises(ValueError, match="t_enc"):
        img2img_sigmas(sigmas, 20, 20)
    with pytest.raises(ValueError, match="t_enc"):
        img2img_sigmas(sigmas, 20, -1)
    with pytest.raises(ValueError, match="sigmas has"):
        img2img_sigmas(sigmas[-1:], 20, 0)
    with pytest.raises(ValueError, match="denoising_strength"):
        setup_img2img_steps(20, 1.5)
    with pytest.raises(ValueError, match="steps"):
        setup_img2img_steps(0, 0.5)


# ------------------------------------------------------------------------------------ get_sigmas options (10.2)

def test_discard_next_to_last_sigma(model):
    full = get_sigmas("karras", 21, model)
    got = get_sigmas("karras", 20, model, discard_next_to_last_sigma=True)
    assert got.shape == (21,) and torch.equal(got, torch.cat([full[:-2], full[-1:]]))


def test_overrides_and_rho(model):
    assert torch.equal(get_sigmas("karras", 10, model, rho=3.0),
                       sch.get_sigmas_karras(10, model.sigma_min.item(), model.sigma_max.item(), 3.0))
    assert torch.equal(get_sigmas("exponential", 10, model, sigma_min=0.5, sigma_max=5.0),
                       sch.get_sigmas_exponential(10, 0.5, 5.0))
    sgm = get_sigmas("sgm_uniform", 10, model, sigma_max=5.0)
    assert sgm[0].item() == pytest.approx(5.0, rel=1e-5)
    # uniform / simple / ddim read the model's discrete sigmas and ignore the range (as A1111 does)
    assert torch.equal(get_sigmas("uniform", 10, model, sigma_max=5.0), get_sigmas("uniform", 10, model))
    # rho is a global A1111 option: schedules without rho ignore it (a1111-semantics §10.2)
    assert torch.equal(get_sigmas("exponential", 10, model, rho=3.0), get_sigmas("exponential", 10, model))
    assert torch.equal(get_sigmas("polyexponential", 10, model, rho=3.0),
                       sch.get_sigmas_polyexponential(10, model.sigma_min.item(), model.sigma_max.item(), 3.0))
    with pytest.raises(ValueError, match="sigma_min"):
        get_sigmas("karras", 10, model, sigma_min=20.0)


def test_scheduler_table_and_lookup(model):
    names = [s.name for s in SCHEDULERS]
    assert names == ["automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
                     "align_your_steps", "simple", "normal", "ddim", "beta"]  # a1111-semantics §10.2 order
    assert find_scheduler("Karras").name == "karras" and find_scheduler(None).name == "automatic"
    for entry in SCHEDULERS[1:]:
        sig = get_sigmas(entry.name, 7, model)
        # ddim: 1000 // 7 = 142 -> t = 1, 143, ..., 995: 8 sigmas + 0 (reference quirk)
        assert sig.dtype == torch.float32 and sig.device.type == "cpu" and len(sig) == (9 if entry.name == "ddim" else 8)
        assert torch.equal(get_sigmas(entry.label, 7, model), sig)
    with pytest.raises(ValueError, match="unknown scheduler"):
        get_sigmas("karas", 20, model)
    with pytest.raises(ValueError, match="steps"):
        get_sigmas("karras", 0, model)


def test_ddim_scheduler_uneven_steps(model):
    # 30 steps: stride 1000 // 30 = 33 -> t = 1, 34, ..., 991: 31 sigmas + 0 (reference quirk, a1111-semantics §10.2)
    assert len(get_sigmas("ddim", 30, model)) == 32
