"""A1111's LCM denoiser (modules/sd_samplers_lcm.py): 50-level table, quantised timesteps, boundary condition."""
import math

import pytest
import torch

from sdcore.sampling.denoisers import LCMCompVisDenoiser, sd_alphas_cumprod


def test_lcm_schedule_and_scalings_hand_derived():
    abar = sd_alphas_cumprod().double()
    eps = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    den = LCMCompVisDenoiser(lambda x, t, **c: eps + 0 * x, abar)
    # table = abar[19::20]: 50 levels, top = abar[999] (sigma_max of SD), bottom = abar[19]
    assert den.sigmas.shape == (50,)
    assert math.isclose(float(den.sigma_max), math.sqrt((1 - abar[999]) / abar[999]), rel_tol=1e-12)
    assert math.isclose(float(den.sigma_min), math.sqrt((1 - abar[19]) / abar[19]), rel_tol=1e-12)
    assert int(den.sigma_to_t(den.sigma_max.reshape(1))) == 999 and int(den.sigma_to_t(den.sigma_min.reshape(1))) == 19
    # get_sigmas(4): t = linspace(999, 19, 4) -> table index (t - 19) / 20 = 49, 32.67, 16.33, 0, then 0
    sig = den.get_sigmas(4)
    idx = torch.tensor([49.0, 98 / 3, 49 / 3, 0.0], dtype=torch.float64)
    lo, hi, w = idx.floor().long(), idx.ceil().long(), idx.frac()
    expected = ((1 - w) * den.log_sigmas[lo] + w * den.log_sigmas[hi]).exp()
    assert torch.allclose(sig[:4], expected, rtol=1e-6) and sig[4] == 0
    # forward with eps = 0: d = x, s = 10 t; at t = 19: c_out = 190 / sqrt(190^2 + 0.25), c_skip = 0.25 / (190^2 + 0.25)
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    out = den(x, den.sigma_min.reshape(1))
    c_skip, c_out = 0.25 / (190 ** 2 + 0.25), 190 / math.sqrt(190 ** 2 + 0.25)
    assert torch.allclose(out, (c_out + c_skip) * x, rtol=1e-12)
    # with eps != 0 the estimate is x - sigma * eps before the boundary condition
    den2 = LCMCompVisDenoiser(lambda x, t, **c: torch.ones_like(x), abar)
    s = den.sigma_max.reshape(1)
    c_skip, c_out = 0.25 / (9990 ** 2 + 0.25), 9990 / math.sqrt(9990 ** 2 + 0.25)
    assert torch.allclose(den2(x, s), c_out * (x - s) + c_skip * x, rtol=1e-10)


def test_lcm_bad_inputs_raise():
    abar = sd_alphas_cumprod()
    for bad in (0, 1, 1001, 2.5, True):
        with pytest.raises(ValueError, match=r"original_timesteps must be an int in \[2, 1000\]"):
            LCMCompVisDenoiser(lambda x, t, **c: x, abar, original_timesteps=bad)
    den = LCMCompVisDenoiser(lambda x, t, **c: x, abar)
    with pytest.raises(ValueError, match=r"sigma must have shape \[B\]=\[2\]"):
        den(torch.zeros(2, 4, 2, 2), den.sigma_max.reshape(1))
    assert torch.equal(den.get_sigmas(), torch.cat([den.sigmas.flip(0), den.sigmas.new_zeros([1])]))
