"""sdcore.sampling.samplers against k-diffusion 0.1.1 (`k_diffusion/sampling.py`, loaded by tests/oracles.py).

Every sampler runs on an exact denoiser (a Gaussian mixture, tests/oracles.py `GaussianMixture`, float64), once in
k-diffusion and once here, with the same injected noise: the oracle's `torch.randn_like` is patched (as A1111 does,
a1111-semantics §6.5) and both get the same `noise_sampler`. The number of noise draws must match too, so per-image
noise
streams line up with A1111. Tolerance: max abs difference <= 1e-6 (float64; measured values are ~1e-14).
Schedules: txt2img (full Karras / exponential sigmas, a1111-semantics §10.2) and an img2img tail slice
`sigmas[steps - t_enc - 1:]` (a1111-semantics §6.3). Restart and LCM are A1111 functions with no k-diffusion 0.1.1
oracle:
Restart is checked against a chain of k-diffusion Heun steps over the hand-derived restart schedule, LCM against
its one-line update rule.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sdcore.sampling import samplers as S
from tests.oracles import (GaussianMixture, NoiseSequence, default_dtype, k_sampling, patched_randn_like)

K = k_sampling()
GM = GaussianMixture.example(dim=4, components=3, seed=0)
SHAPE = (2, 1, 2, 2)  # [B, C, H, W] with C*H*W = 4 = GM.dim
SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642  # SD1 model range (a1111-semantics §13)
TOL = 1e-6
STEPS = 12
T_ENC = int(0.6 * STEPS)  # denoising_strength 0.6 -> t_enc 7 (a1111-semantics §6.2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors have a few dozen elements; intra-op threads only add synchronisation cost (ms per op on a
    loaded machine). Restored afterwards for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _x(sigma_max, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = GM.sample(SHAPE[0], g).reshape(SHAPE)
    return x0 + torch.randn(SHAPE, generator=g, dtype=torch.float64) * sigma_max


def _schedule(kind: str, steps: int = STEPS) -> torch.Tensor:
    with default_dtype(torch.float64):
        if kind == "karras":
            return K.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).double()
        return K.get_sigmas_exponential(steps, SIGMA_MIN, SIGMA_MAX).double()


SCHEDULES = {
    "karras": _schedule("karras"),
    "exponential": _schedule("exponential"),
    "karras-img2img": _schedule("karras")[STEPS - T_ENC - 1:],  # t_enc + 2 values (a1111-semantics §6.3)
}

# (our function, k-diffusion function name, options, whether the k-diffusion function takes noise_sampler)
CASES = {
    "euler": (S.sample_euler, "sample_euler", {}, False),
    "euler-churn": (S.sample_euler, "sample_euler", dict(s_churn=2.0, s_tmin=0.05, s_tmax=5.0, s_noise=1.003),
                    False),
    "euler_ancestral": (S.sample_euler_ancestral, "sample_euler_ancestral", {}, True),
    "euler_ancestral-eta0.5": (S.sample_euler_ancestral, "sample_euler_ancestral", dict(eta=0.5, s_noise=0.9),
                               True),
    "heun": (S.sample_heun, "sample_heun", {}, False),
    "heun-churn": (S.sample_heun, "sample_heun", dict(s_churn=1.0, s_tmin=0.1, s_noise=1.01), False),
    "dpm_2": (S.sample_dpm_2, "sample_dpm_2", {}, False),
    "dpm_2-churn": (S.sample_dpm_2, "sample_dpm_2", dict(s_churn=1.5, s_tmax=3.0), False),
    "dpm_2_ancestral": (S.sample_dpm_2_ancestral, "sample_dpm_2_ancestral", {}, True),
    "lms": (S.sample_lms, "sample_lms", {}, False),
    "lms-order3": (S.sample_lms, "sample_lms", dict(order=3), False),
    "dpmpp_2s_ancestral": (S.sample_dpmpp_2s_ancestral, "sample_dpmpp_2s_ancestral", {}, True),
    "dpmpp_2s_ancestral-eta0": (S.sample_dpmpp_2s_ancestral, "sample_dpmpp_2s_ancestral", dict(eta=0.0), True),
    "dpmpp_sde": (S.sample_dpmpp_sde, "sample_dpmpp_sde", {}, True),
    "dpmpp_sde-eta0": (S.sample_dpmpp_sde, "sample_dpmpp_sde", dict(eta=0.0), True),
    "dpmpp_sde-r0.3": (S.sample_dpmpp_sde, "sample_dpmpp_sde", dict(r=0.3, s_noise=0.95), True),
    "dpmpp_2m": (S.sample_dpmpp_2m, "sample_dpmpp_2m", {}, False),
    "dpmpp_2m_sde": (S.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", {}, True),
    "dpmpp_2m_sde-heun": (S.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", dict(solver_type="heun"), True),
    "dpmpp_2m_sde-eta0": (S.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", dict(eta=0.0), True),
    "dpmpp_3m_sde": (S.sample_dpmpp_3m_sde, "sample_dpmpp_3m_sde", {}, True),
    "dpmpp_3m_sde-eta0.5": (S.sample_dpmpp_3m_sde, "sample_dpmpp_3m_sde", dict(eta=0.5), True),
}


def _run_pair(ours, theirs, x, args, options, oracle_takes_noise_sampler, seed=7, count=200):
    """Run the oracle then ours on the same noise; return (ours, oracle, number of draws)."""
    noise = NoiseSequence(x.shape, count, seed=seed)
    extra = {"noise_sampler": noise} if oracle_takes_noise_sampler else {}
    with patched_randn_like(K, noise.draw), default_dtype(torch.float64):
        expected = theirs(GM, x.clone(), *args, disable=True, **options, **extra)
    draws = noise.index
    out = ours(GM, x.clone(), *args, disable=True, noise_sampler=noise.reset(), **options)
    assert noise.index == draws, f"noise draws: ours {noise.index}, k-diffusion {draws}"
    return out, expected, draws


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_k_diffusion(case, schedule):
    ours, name, options, takes_ns = CASES[case]
    sigmas = SCHEDULES[schedule]
    out, expected, draws = _run_pair(ours, getattr(K, name), _x(float(sigmas[0])), (sigmas,), options, takes_ns)
    err = float((out - expected).abs().max())
    print(f"PARITY {case:28s} {schedule:15s} max_abs_err={err:.3e} draws={draws}")
    assert torch.isfinite(out).all()
    assert err <= TOL


@pytest.mark.parametrize("options", [dict(eta=0.0), dict(eta=1.0, s_noise=0.97)], ids=["eta0", "eta1"])
@pytest.mark.parametrize("nfe", [7, 9, 10])
def test_dpm_fast_parity(nfe, options):
    sigma_min, sigma_max = float(SCHEDULES["karras"][-2]), float(SCHEDULES["karras"][0])
    out, expected, draws = _run_pair(S.sample_dpm_fast, K.sample_dpm_fast, _x(sigma_max),
                                     (sigma_min, sigma_max, nfe), options, True)
    err = float((out - expected).abs().max())
    print(f"PARITY dpm_fast nfe={nfe} {options} max_abs_err={err:.3e} draws={draws}")
    assert err <= TOL


@pytest.mark.parametrize("options", [dict(), dict(order=2, rtol=0.01, atol=0.001), dict(eta=1.0)],
                         ids=["order3", "order2", "eta1"])
def test_dpm_adaptive_parity(options):
    sigma_min, sigma_max = float(SCHEDULES["karras"][-2]), float(SCHEDULES["karras"][0])
    (out, info), (expected, info_k), draws = _run_pair(
        S.sample_dpm_adaptive, K.sample_dpm_adaptive, _x(sigma_max), (sigma_min, sigma_max),
        dict(options, return_info=True), True, count=2000)
    err = float((out - expected).abs().max())
    print(f"PARITY dpm_adaptive {options} max_abs_err={err:.3e} info={info} draws={draws}")
    assert info == info_k
    assert err <= TOL


def _lcm_oracle(x, sigmas, noise):
    """x_{i+1} = D(x_i, sigma_i) + sigma_{i+1} z_i (A1111 sd_samplers_lcm.sample_lcm, Song et al. 2023 Alg. 1)."""
    for i in range(len(sigmas) - 1):
        x = GM(x, sigmas[i] * x.new_ones([x.shape[0]]))
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise()
    return x


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_lcm_against_update_rule(schedule):
    sigmas = SCHEDULES[schedule]
    x = _x(float(sigmas[0]))
    noise = NoiseSequence(SHAPE, 50, seed=3)
    expected = _lcm_oracle(x, sigmas, noise)
    out = S.sample_lcm(GM, x, sigmas, disable=True, noise_sampler=noise.reset())
    assert noise.index == len(sigmas) - 2  # one draw per step except the last (sigma_next = 0)
    assert float((out - expected).abs().max()) <= 1e-12


def _restart_steps_by_hand(sigmas):
    """Restart schedule for 20 <= N < 36 steps, derived from the rule in A1111 `restart_sampler` (Xu et al. 2023):
    main = Karras(N - 9) between sigmas[-2] and sigmas[0]; a restart of 10 levels from the main level nearest 2
    down to the level nearest 0.1, inserted once after the step that reaches it."""
    n = len(sigmas) - 1
    main = K.get_sigmas_karras(n - 9, sigmas[-2].item(), sigmas[0].item()).to(sigmas)
    lo = int((main - 0.1).abs().argmin())
    hi = int((main - 2).abs().argmin())
    restart = K.get_sigmas_karras(10, main[lo].item(), main[hi].item()).to(sigmas)[:-1]  # 10 levels
    pairs = list(zip(main[:-1], main[1:]))
    return pairs[:lo] + list(zip(restart[:-1], restart[1:])) + pairs[lo:]


def test_restart_against_heun_chain():
    sigmas = _schedule("karras", 24)
    x = _x(float(sigmas[0]))
    pairs = _restart_steps_by_hand(sigmas)
    assert len(pairs) == 15 + 9
    assert [(float(a), float(b)) for a, b in S.restart_schedule(sigmas)] == [(float(a), float(b)) for a, b in pairs]
    noise = NoiseSequence(SHAPE, 10, seed=5)
    expected, last = x.clone(), None
    with patched_randn_like(K, torch.zeros_like):  # the Heun churn draw is unused at s_churn = 0
        for old, new in pairs:
            if last is not None and last < old:
                expected = expected + noise() * 0.9 * (old ** 2 - last ** 2) ** 0.5
            expected = K.sample_heun(GM, expected, torch.stack([old, new]), disable=True)
            last = new
    jumps = noise.index
    seen, calls = [], []
    model = lambda x, sigma: calls.append(sigma) or GM(x, sigma)  # noqa: E731
    out = S.restart_sampler(model, x, sigmas, disable=True, noise_sampler=noise.reset(), s_noise=0.9,
                            callback=lambda d: seen.append((float(d["sigma_hat"]), float(d["sigma"]))))
    err = float((out - expected).abs().max())
    print(f"PARITY restart 24 steps max_abs_err={err:.3e} jumps={jumps}")
    assert jumps == 1 and noise.index == 1
    assert seen == [(float(a), float(b)) for a, b in pairs]  # A1111: 'sigma' = target, 'sigma_hat' = start
    assert len(calls) == 2 * len(pairs) - 1  # Heun, Euler on the last step to 0
    assert err <= TOL


def test_restart_short_schedule_is_heun():
    sigmas = SCHEDULES["karras-img2img"]
    x = _x(float(sigmas[0]))
    with patched_randn_like(K, torch.zeros_like):
        expected = K.sample_heun(GM, x.clone(), sigmas, disable=True)
    out = S.restart_sampler(GM, x, sigmas, disable=True)
    assert float((out - expected).abs().max()) <= TOL


# -- noise: the draws and the errors -----------------------------------------------------------------------------------

class CountingNoise:
    def __init__(self):
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.zeros(SHAPE, dtype=torch.float64)


@pytest.mark.parametrize("function", [S.sample_euler, S.sample_heun, S.sample_dpm_2])
def test_churn_noise_drawn_every_step(function):
    """k-diffusion draws the churn noise every step even with gamma = 0 (a1111-semantics §10.1): same here when a
    noise_sampler is given, so the per-image stream is consumed as in A1111; without one nothing is drawn."""
    sigmas = SCHEDULES["karras"]
    noise = CountingNoise()
    with_noise = function(GM, _x(15.0), sigmas, disable=True, noise_sampler=noise)
    assert len(noise.calls) == len(sigmas) - 1
    without = function(GM, _x(15.0), sigmas, disable=True)
    assert torch.equal(with_noise, without)


STOCHASTIC = {
    "euler-churn": (S.sample_euler, dict(s_churn=1.0)),
    "heun-churn": (S.sample_heun, dict(s_churn=1.0)),
    "dpm_2-churn": (S.sample_dpm_2, dict(s_churn=1.0)),
    "euler_ancestral": (S.sample_euler_ancestral, {}),
    "dpm_2_ancestral": (S.sample_dpm_2_ancestral, {}),
    "dpmpp_2s_ancestral": (S.sample_dpmpp_2s_ancestral, {}),
    "dpmpp_sde": (S.sample_dpmpp_sde, {}),
    "dpmpp_2m_sde": (S.sample_dpmpp_2m_sde, {}),
    "dpmpp_2m_sde-heun": (S.sample_dpmpp_2m_sde, dict(solver_type="heun")),
    "dpmpp_3m_sde": (S.sample_dpmpp_3m_sde, {}),
    "lcm": (S.sample_lcm, {}),
    "restart": (S.restart_sampler, {}),
}


@pytest.mark.parametrize("case", list(STOCHASTIC))
def test_missing_noise_sampler_raises(case):
    function, options = STOCHASTIC[case]
    sigmas = _schedule("karras", 24)  # Restart adds its restart noise from 20 steps on
    with pytest.raises(ValueError, match="noise_sampler"):
        function(GM, _x(float(sigmas[0])), sigmas, disable=True, **options)


def test_dpm_fast_missing_noise_sampler_raises():
    with pytest.raises(ValueError, match="noise_sampler"):
        S.sample_dpm_fast(GM, _x(14.6), SIGMA_MIN, SIGMA_MAX, 6, disable=True, eta=1.0)


@pytest.mark.parametrize("case", ["euler_ancestral-eta0", "dpmpp_2s_ancestral-eta0", "dpmpp_sde-eta0",
                                  "dpmpp_2m_sde-eta0", "dpmpp_3m_sde-eta0"])
def test_deterministic_settings_need_no_noise_sampler(case):
    """eta = 0 makes these samplers ODE solvers: no noise_sampler needed, result as k-diffusion's."""
    name = case.split("-")[0]
    sigmas = SCHEDULES["karras"]
    x = _x(float(sigmas[0]))
    with patched_randn_like(K, torch.zeros_like):
        expected = getattr(K, f"sample_{name}")(GM, x.clone(), sigmas, disable=True, eta=0.0,
                                                noise_sampler=lambda s, sn: torch.zeros_like(x))
    out = getattr(S, f"sample_{name}")(GM, x, sigmas, disable=True, eta=0.0)
    assert float((out - expected).abs().max()) <= TOL


# -- batch independence ------------------------------------------------------------------------------------------------

class PerImageNoise:
    """One seeded CPU generator per image (what sdcore.rng.ImageRNG does per seed, a1111-semantics §8.2)."""

    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, sigma, sigma_next):
        return torch.stack([torch.randn(SHAPE[1:], generator=g, dtype=torch.float64) for g in self.generators])


SEEDS = [101, 202, 303, 404]


def _batch_x(sigma_max):
    return torch.cat([_x(sigma_max, seed=s)[:1] for s in SEEDS])


def _per_image_runs(function, sigmas, make_noise, **options):
    x = _batch_x(float(sigmas[0]))
    batch = function(GM, x, sigmas, disable=True, noise_sampler=make_noise(x, SEEDS), **options)
    alone = [function(GM, x[i:i + 1], sigmas, disable=True, noise_sampler=make_noise(x[i:i + 1], SEEDS[i:i + 1]),
                      **options) for i in range(len(SEEDS))]
    return batch, torch.cat(alone)


@pytest.mark.parametrize("case", list(STOCHASTIC))
def test_batch_independence_per_image_generators(case):
    function, options = STOCHASTIC[case]
    sigmas = _schedule("karras", 24)
    batch, alone = _per_image_runs(function, sigmas, lambda x, seeds: PerImageNoise(seeds), **options)
    assert float((batch - alone).abs().max()) <= 1e-12


def test_batch_independence_dpm_fast():
    def function(model, x, sigmas, **kw):
        return S.sample_dpm_fast(model, x, SIGMA_MIN, SIGMA_MAX, 10, eta=1.0, **kw)

    batch, alone = _per_image_runs(function, SCHEDULES["karras"], lambda x, seeds: PerImageNoise(seeds))
    assert float((batch - alone).abs().max()) <= 1e-12


def _brownian(x, seeds):
    return S.BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seeds=seeds)


# torchsde rounds its interval ends and warns when a query at sigma_min/sigma_max lands a rounding error outside;
# sdcore's BrownianTreeNoiseSampler clamps those queries first, k-diffusion's (the oracle) does not
K_BROWNIAN_WARNINGS = pytest.mark.filterwarnings("ignore:Should have t[ab]")


@pytest.mark.filterwarnings("error:Should have t[ab]")
@pytest.mark.parametrize("case", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde-heun", "dpmpp_3m_sde"])
def test_batch_independence_brownian(case):
    function, options = STOCHASTIC[case]
    batch, alone = _per_image_runs(function, SCHEDULES["karras"], _brownian, **options)
    assert float((batch - alone).abs().max()) <= 1e-12


@K_BROWNIAN_WARNINGS
def test_brownian_noise_matches_k_diffusion():
    """Same seeds -> the same per-image Brownian trees as k-diffusion's BrownianTreeNoiseSampler (list of seeds)."""
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    sigmas = SCHEDULES["karras"]
    ours = S.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seeds=[5, 6, 7])
    theirs = K.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=[5, 6, 7])
    draws = [(ours(a, b), theirs(a, b)) for a, b in zip(sigmas[:-2], sigmas[1:-1])]
    assert all(torch.equal(a, b) for a, b in draws)
    z = torch.stack([a for a, _ in draws])
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 1.5  # unit-variance increments


@pytest.mark.parametrize("function", [S.sample_dpmpp_sde, S.sample_dpmpp_2m_sde, S.sample_dpmpp_3m_sde])
def test_brownian_rounding_clamped_silently_same_draws(function, recwarn):
    """A float32 SD1 schedule as the CLI builds it: torchsde stores the tree's ends rounded to 6 decimals (0.029168,
    14.614643 vs sigma_min 0.0291675385, sigma_max 14.6146431), so k-diffusion's sampler (sdcore's before the clamp)
    warns "Should have ta>=t0 / tb<=t1" at both ends and torchsde clamps. sdcore clamps first: the same samples
    bit for bit, and no warning."""
    sigmas = K.get_sigmas_karras(STEPS, 0.0291675366461277, 14.614642).float()  # the tiny/SD1 model's float32 range
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    with pytest.warns(UserWarning, match="Should have t[ab]"):
        before = function(GM, x.clone(), sigmas, disable=True,
                          noise_sampler=K.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=[5, 6]))
    recwarn.clear()
    ours = S.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seeds=[5, 6])
    after = function(GM, x.clone(), sigmas, disable=True, noise_sampler=ours)
    assert not [w for w in recwarn if "Should have" in str(w.message)]
    assert torch.equal(before, after)
    assert (ours.start, ours.end) == (ours.trees[0]._interval._start, ours.trees[0]._interval._end)  # torchsde's ends


def test_brownian_far_outside_query_still_reaches_torchsde():
    """Only rounding-sized excursions are clamped: a query well outside the interval keeps torchsde's warning."""
    ours = S.BrownianTreeNoiseSampler(torch.zeros(1, 4), 0.1, 10.0, seeds=[1])
    with pytest.warns(UserWarning, match="Should have tb<=t1"):
        ours(5.0, 10.5)


def test_brownian_seed_count_must_match_batch():
    with pytest.raises(ValueError, match="seeds"):
        S.BrownianTreeNoiseSampler(torch.zeros(2, 4), 0.1, 10.0, seeds=[1])


# -- the sampler table -------------------------------------------------------------------------------------------------

def test_table_order_and_options():
    """a1111-semantics §10.1 table (A1111 v1.10.1 order) and a1111-semantics §6.5 extra params."""
    assert [s.name for s in S.SAMPLERS] == [
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
        "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
        "PLMS", "UniPC", "LCM"]
    info = {s.name: s for s in S.SAMPLERS}
    assert info["DPM++ 2M"].scheduler == "karras" and not info["DPM++ 2M"].second_order
    assert info["DPM++ SDE"].brownian_noise and info["DPM++ SDE"].second_order
    assert info["DPM++ 2M SDE Heun"].solver_type == "heun" and info["DPM++ 2M SDE"].solver_type is None
    assert info["DPM++ 3M SDE"].discard_next_to_last_sigma and info["DPM++ 3M SDE"].scheduler == "exponential"
    assert info["DPM2 a"].uses_ensd and info["DPM2 a"].discard_next_to_last_sigma
    assert info["Euler a"].aliases == ("k_euler_a", "k_euler_ancestral")
    assert info["Restart"].function is S.restart_sampler and info["Restart"].total_steps(20) == 40
    assert info["Euler"].total_steps(20) == 20
    assert {s.name for s in S.SAMPLERS if s.kind == "timestep"} == {"DDIM", "DDIM CFG++", "PLMS", "UniPC"}
    assert all(s.function is None for s in S.SAMPLERS if s.kind == "timestep")
    assert info["LCM"].denoiser == "lcm"
    churn = ("s_churn", "s_tmin", "s_tmax", "s_noise")
    assert info["Euler"].extra_params == churn and info["Heun"].extra_params == churn
    assert info["DPM2"].extra_params == churn
    for name in ("DPM fast", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"):
        assert info[name].extra_params == ("s_noise", "eta"), name
    assert info["Euler a"].extra_params == ("eta",) and info["DPM adaptive"].extra_params == ("eta",)
    assert info["DPM++ 2M"].extra_params == () and info["LMS"].extra_params == ()


@pytest.mark.parametrize("name, sampler, scheduler", [
    ("DPM++ 2M", "DPM++ 2M", None),
    ("DPM++ 2M Karras", "DPM++ 2M", "karras"),
    ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "karras"),
    ("DPM++ 2M SDE Heun Exponential", "DPM++ 2M SDE Heun", "exponential"),
    ("DPM++ 3M SDE Exponential", "DPM++ 3M SDE", "exponential"),
    ("LMS Karras", "LMS", "karras"),
    ("DPM2 a Karras", "DPM2 a", "karras"),
    ("Euler a SGMUniform", "Euler a", "sgm_uniform"),
    ("Euler sgm_uniform", "Euler", "sgm_uniform"),
    ("Euler Align Your Steps", "Euler", "align_your_steps"),
    ("DDIM", "DDIM", None),
    ("DDIM CFG++", "DDIM CFG++", None),
    ("UniPC Automatic", "UniPC", "automatic"),
    ("k_euler_a", "Euler a", None),
    ("k_dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", None),
    ("restart", "Restart", None),
    ("k_lcm", "LCM", None),
])
def test_find_sampler(name, sampler, scheduler):
    info, found = S.find_sampler(name)
    assert (info.name, found) == (sampler, scheduler)


@pytest.mark.parametrize("name", ["euler a", "dpm++ 2m", "DPM++2M", "Karras", "", "DPM++ 2M karras_"])
def test_find_sampler_unknown(name):
    with pytest.raises(ValueError, match="valid names: DPM\\+\\+ 2M, DPM\\+\\+ SDE"):
        S.find_sampler(name)


# -- input checks and traces -------------------------------------------------------------------------------------------

def test_bad_inputs():
    x = _x(1.0)
    with pytest.raises(ValueError, match="sigmas"):
        S.sample_euler(GM, x, torch.tensor([1.0]), disable=True)
    with pytest.raises(ValueError, match="sigmas"):
        S.sample_dpmpp_2m(GM, x, torch.tensor([1.0, -0.5]), disable=True)
    with pytest.raises(ValueError, match="solver_type"):
        S.sample_dpmpp_2m_sde(GM, x, SCHEDULES["karras"], disable=True, solver_type="rk4")
    with pytest.raises(ValueError, match="sigma_min"):
        S.sample_dpm_fast(GM, x, 0.0, 10.0, 5, disable=True)
    with pytest.raises(ValueError, match="order"):
        S.sample_lms(GM, x, SCHEDULES["karras"], disable=True, order=0)


def test_callback_and_trace_roundtrip(tmp_path):
    sigmas = SCHEDULES["karras"]
    x = _x(float(sigmas[0]))
    trace, seen = S.TraceRecorder(), []
    with patched_randn_like(K, torch.zeros_like):
        K.sample_heun(GM, x.clone(), sigmas, disable=True, callback=lambda d: seen.append(d))
    S.sample_heun(GM, x, sigmas, disable=True, callback=trace)
    assert len(trace.records) == len(seen) == STEPS
    for record, d in zip(trace.records, seen):
        assert int(record["i"]) == d["i"] and float(record["sigma"]) == float(d["sigma"])
        assert float((record["x"] - d["x"]).abs().max()) <= TOL
        assert float((record["denoised"] - d["denoised"]).abs().max()) <= TOL
    trace.save(tmp_path / "a.safetensors", metadata={"sampler": "Heun"})
    loaded = S.load_trace(tmp_path / "a.safetensors")
    assert len(loaded) == STEPS and torch.equal(loaded[3]["x"], trace.records[3]["x"])


def _compare_traces_main():
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_traces.py"
    spec = importlib.util.spec_from_file_location("compare_traces", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_compare_traces_script(tmp_path, capsys):
    sigmas = SCHEDULES["karras"]
    x = _x(float(sigmas[0]))
    a, b = S.TraceRecorder(), S.TraceRecorder()
    S.sample_dpmpp_2m(GM, x, sigmas, disable=True, callback=a)
    perturbed = lambda x, sigma: GM(x, sigma) + (1e-3 if float(sigma[0]) < 1.0 else 0.0)  # noqa: E731
    S.sample_dpmpp_2m(perturbed, x, sigmas, disable=True, callback=b)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    first = next(n for n, s in enumerate(sigmas) if float(s) < 1.0)
    main = _compare_traces_main()
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--atol", "1e-6"]) == 1
    out = capsys.readouterr().out
    assert f"first divergence at call {first} (i = {first}): sigma 0.000e+00, sigma_hat 0.000e+00, x 0.000e+00, " \
           "denoised 1.000e-03" in out
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors")]) == 0
    assert "no divergence" in capsys.readouterr().out
