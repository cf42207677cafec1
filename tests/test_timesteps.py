"""Tests for sdcore.sampling.timesteps: DDIM / PLMS / UniPC against diffusers' DDIMScheduler, PNDMScheduler (PLMS
mode) and UniPCMultistepScheduler stepping the same eps model over the same timesteps; DDIM CFG++ and the img2img
start by hand (a1111-semantics §6.4, 13).

Tolerance: fp32 latents, max abs difference <= 2e-5 (DDIM, PLMS) / 1e-4 (UniPC) with latents of scale ~1; diffusers
computes its coefficients in float32, we compute them in float64, which accounts for differences of ~1e-6.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, UniPCMultistepScheduler

from sdcore import pipeline
from sdcore.sampling.blends import A1111Blend, BlendContext
from sdcore.sampling.denoisers import CFGDenoiser, DiscreteSchedule, sd_alphas_cumprod, with_call_index
from sdcore.sampling.samplers import find_sampler
from sdcore.sampling.timesteps import (CompVisTimestepsDenoiser, get_timesteps, img2img_start, sample_ddim,
                                       sample_ddim_cfgpp, sample_plms, sample_unipc)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers numpy-2 notice

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class EpsModel:
    """A smooth, nonlinear, t-dependent fake eps model that records the timesteps it is called with."""

    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, x, t, **kwargs):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1)
        self.calls.append(float(t[0]))
        tt = (t / 1000).reshape(-1, 1, 1, 1)
        return torch.tanh(0.7 * x) * (0.6 + 0.4 * tt) + 0.1 * torch.cos(6 * tt) + 0.05 * x * tt


def _latent(seed=0, shape=(2, 4, 6, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _max_err(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------- grid and img2img

def test_get_timesteps_spec64():
    # a1111-semantics §6.4: 20 steps -> 1, 51, ..., 951
    assert get_timesteps(20).tolist() == list(range(1, 1000, 50))
    assert get_timesteps(1).tolist() == [1]
    assert len(get_timesteps(30)) == 31 and get_timesteps(30)[-1].item() == 991  # 1000 // 30 = 33
    assert get_timesteps(19, discard_next_to_last_sigma=True).tolist() == get_timesteps(20).tolist()
    assert get_timesteps(1000).tolist() == list(range(1, 1000)) + [999]  # the +1 shift clipped at 999
    with pytest.raises(ValueError, match="steps"):
        get_timesteps(0)


def test_img2img_start_spec13():
    # a1111-semantics §13: DDIM img2img 20 steps, d=0.75 -> t_enc 15, noise level abar[timesteps[15] = 751]:
    # sqrt(abar) = 0.236049, sqrt(1 - abar) = 0.971741
    ac = sd_alphas_cumprod()
    x, noise = _latent(1), _latent(2)
    ts = get_timesteps(20)
    xi, sched = img2img_start(x, noise, ts, 15, ac)
    assert ts[15].item() == 751 and sched.tolist() == ts[:15].tolist()
    assert torch.allclose(xi, x * 0.236049 + noise * 0.971741, atol=1e-5)
    xi2, _ = img2img_start(x, noise, ts, 15, ac, extra_noise=0.5)
    assert torch.allclose(xi2 - xi, noise * 0.5 * 0.236049, atol=1e-5)
    with pytest.raises(ValueError, match="t_enc"):
        img2img_start(x, noise, ts, 20, ac)


# ----------------------------------------------------------------------------------------- DDIM

@pytest.mark.parametrize("steps, eta", [(20, 0.0), (20, 0.7), (10, 1.0)])
def test_ddim_matches_diffusers(steps, eta):
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod
    ts = get_timesteps(steps)
    assert sched.timesteps.flip(0).tolist() == ts.tolist()
    noises = [_latent(100 + i) for i in range(steps)]

    x0 = _latent()
    ref = x0.clone()
    for i, t in enumerate(sched.timesteps[:-1]):  # the reference never evaluates the first grid point (a1111-semantics §6.4)
        eps = EpsModel()(ref, t.float().expand(2))
        ref = sched.step(eps, t, ref, eta=eta, variance_noise=noises[i]).prev_sample

    drawn = iter(noises)
    model = EpsModel()
    ours = sample_ddim(model, x0.clone(), ts, ac, eta=eta, noise_sampler=lambda s, sn: next(drawn))
    assert len(model.calls) == steps - 1 and model.calls[0] == ts[-1].item() and model.calls[-1] == ts[1].item()
    assert _max_err(ours, ref) <= 2e-5


def test_ddim_eta_needs_noise_sampler():
    with pytest.raises(ValueError, match="noise_sampler"):
        sample_ddim(EpsModel(), _latent(), get_timesteps(5), sd_alphas_cumprod(), eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(EpsModel(), _latent(), get_timesteps(5), sd_alphas_cumprod(), eta=-1.0)


def test_ddim_img2img_calls():
    # a1111-semantics §6.4: timesteps[:t_enc] passed; first model call at timesteps[t_enc - 1]; t_enc - 1 calls
    ac = sd_alphas_cumprod()
    ts = get_timesteps(20)
    xi, sched = img2img_start(_latent(1), _latent(2), ts, 15, ac)
    model = EpsModel()
    sample_ddim(model, xi, sched, ac)
    assert model.calls == [float(t) for t in ts[1:15].flip(0)]


# ----------------------------------------------------------------------------------------- DDIM CFG++

class TextEps:
    """Fake inner eps model whose output depends on the text conditioning."""

    def __call__(self, x, t, c_crossattn=None, **kwargs):
        return EpsModel()(x, t) + c_crossattn.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def test_ddim_cfgpp_one_step_by_hand():
    # CFG++ (a1111-semantics §7 step 8, 6.4): guided eps with cond_scale / 12.5 in pred_x0, the uncond eps in the
    # direction term
    ac = sd_alphas_cumprod().double()
    ts = torch.tensor([1, 51])
    x = _latent().double()
    cond = {"c_crossattn": torch.full((2, 3, 4), 0.3, dtype=torch.float64)}
    uncond = {"c_crossattn": torch.full((2, 3, 4), -0.2, dtype=torch.float64)}
    cfg = CFGDenoiser(TextEps())
    out = sample_ddim_cfgpp(cfg, x, ts, ac, extra_args={"cond": cond, "uncond": uncond, "cond_scale": 7.5})
    t = torch.full((2,), 51.0, dtype=torch.float64)
    e_c, e_u = EpsModel()(x, t) + 0.3, EpsModel()(x, t) - 0.2
    e_g = e_u + (7.5 / 12.5) * (e_c - e_u)
    a_t, a_prev = ac[51].item(), ac[1].item()
    pred_x0 = (x - (1 - a_t) ** 0.5 * e_g) / a_t ** 0.5
    expected = a_prev ** 0.5 * pred_x0 + (1 - a_prev) ** 0.5 * e_u
    assert _max_err(out, expected) <= 1e-12
    # identical cond and uncond -> plain DDIM
    same = sample_ddim_cfgpp(cfg, x, get_timesteps(8), ac, extra_args={"cond": cond, "uncond": cond,
                                                                       "cond_scale": 7.5})
    plain = sample_ddim(lambda x_, t_, **kw: TextEps()(x_, t_, c_crossattn=cond["c_crossattn"]), x, get_timesteps(8),
                        ac)
    assert _max_err(same, plain) <= 1e-12
    with pytest.raises(ValueError, match="cond_scale"):
        sample_ddim_cfgpp(cfg, x, ts, ac, extra_args={"cond": cond, "uncond": uncond})


# ----------------------------------------------------------------------------------------- PLMS

@pytest.mark.parametrize("steps", [20, 8])
def test_plms_matches_diffusers_pndm(steps):
    sched = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod
    ts = get_timesteps(steps)
    x0 = _latent(3)
    # diffusers evaluates the model at 951, 901 (Euler-predicted x), 901 (new x), 851, ...; its first `steps`
    # calls cover A1111's steps - 1 updates, the last call being the step 51 -> 1.
    ref = x0.clone()
    for t in sched.timesteps[:steps]:
        ref = sched.step(EpsModel()(ref, t.float().expand(2)), t, ref).prev_sample
    model = EpsModel()
    ours = sample_plms(model, x0.clone(), ts, ac)
    assert model.calls == [float(t) for t in sched.timesteps[:steps]]
    assert _max_err(ours, ref) <= 2e-5


# ----------------------------------------------------------------------------------------- UniPC

@pytest.mark.parametrize("steps, order, variant", [(9, 3, "bh1"), (9, 3, "bh2"), (27, 3, "bh1"), (9, 2, "bh2"),
                                                   (3, 1, "bh1")])
def test_unipc_matches_diffusers(steps, order, variant):
    # With steps dividing 999, A1111's continuous times (1 - 1/1000 .. 0 on a uniform grid) hit integer timesteps,
    # which diffusers' "linspace" spacing with final sigma at t=0 ("sigma_min") also uses.
    sched = UniPCMultistepScheduler(**SD_BETAS, solver_order=order, solver_type=variant, predict_x0=True,
                                    lower_order_final=True, timestep_spacing="linspace",
                                    final_sigmas_type="sigma_min")
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod
    x0 = _latent(4)
    ref = x0.clone()
    for t in sched.timesteps:
        ref = sched.step(EpsModel()(ref, t.float().expand(2)), t, ref).prev_sample
    model = EpsModel()
    # txt2img UniPC only uses len(timesteps) (1000 // 9 = 111 gives A1111 a 10-entry grid, so cut it to `steps`)
    ours = sample_unipc(model, x0.clone(), get_timesteps(steps)[:steps], ac, variant=variant, order=order)
    assert model.calls == pytest.approx([float(t) for t in sched.timesteps], abs=1e-6)
    assert _max_err(ours, ref) <= 1e-4


def test_unipc_img2img_and_options():
    ac = sd_alphas_cumprod()
    ts = get_timesteps(20)
    xi, sched = img2img_start(_latent(1), _latent(2), ts, 15, ac)
    model = EpsModel()
    sample_unipc(model, xi, sched, ac, is_img2img=True)
    # 15 calls from model time timesteps[14] = 701 (t_start = 701/1000 + 1/1000) down to 0 (a1111-semantics §6.4)
    assert len(model.calls) == 15 and model.calls[0] == pytest.approx(701.0, abs=1e-4)
    assert model.calls[1] == pytest.approx(701.0 * 14 / 15, abs=1e-4)
    for skip in ("time_quadratic", "logSNR"):
        model = EpsModel()
        out = sample_unipc(model, xi, sched, ac, is_img2img=True, skip_type=skip)
        assert torch.isfinite(out).all() and model.calls[0] == pytest.approx(701.0, abs=1e-3)
        assert model.calls[1] < model.calls[0]
    with pytest.raises(ValueError, match="order"):
        sample_unipc(EpsModel(), xi, sched[:2], ac, order=3)
    with pytest.raises(ValueError, match="variant"):
        sample_unipc(EpsModel(), xi, sched, ac, variant="vary_coeff")


@pytest.mark.parametrize("order, min_ratio", [(1, 3.5), (2, 7.0)])
def test_unipc_converges_to_exact_ode_solution(order, min_ratio):
    # Unit-variance data x0 ~ N(0, 1) stays N(0, 1) under the VP process, so the exact eps is
    # E[eps | x_t] = sqrt(1 - abar_t) x_t and the probability-flow ODE has dx/dt = 0: the exact solution is x_T.
    # UniPC-p with the corrector is of order p + 1 (Zhao et al. 2023, thm 3.1): halving the log-SNR step must cut
    # the error by about 2^(p+1).
    ac = sd_alphas_cumprod().double()
    x = _latent(5).double()

    def exact_eps(x_, t, **kw):
        t = t.reshape(-1)[0].item()
        lo, frac = int(t), t - int(t)
        log_a = 0.5 * ((1 - frac) * ac[lo].log() + frac * ac[min(lo + 1, 999)].log())  # UniPC's log-alpha interp
        return (1 - (2 * log_a).exp()).sqrt() * x_

    errs = [_max_err(sample_unipc(exact_eps, x, torch.arange(n), ac, order=order, skip_type="logSNR"), x)
            for n in (20, 40)]
    assert errs[0] / errs[1] >= min_ratio, errs


# ----------------------------------------------------------------------------------------- v and mask

def test_v_prediction_converted_to_eps():
    ac = sd_alphas_cumprod()
    x0, eps = _latent(6), _latent(7)
    t = torch.tensor([500.0, 120.0])
    a = ac[t.long()].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # Salimans & Ho 2022
    wrapped = CompVisTimestepsDenoiser(lambda x_, t_, **kw: v, ac, prediction="v")
    assert _max_err(wrapped(x_t, t), eps) <= 1e-5
    assert CompVisTimestepsDenoiser(lambda x_, t_, **kw: eps, ac)(x_t, t) is eps
    with pytest.raises(ValueError, match="prediction"):
        CompVisTimestepsDenoiser(lambda x_, t_: x_, ac, prediction="x0")


def test_mask_blended_before_each_call():
    # a1111-semantics §6.4 / 7 step 3: timestep samplers blend the un-noised init latent into x before every model call
    ac = sd_alphas_cumprod()
    init = _latent(8)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1.0
    seen = []

    def inner(x, t, **kw):
        seen.append(x[:2].clone())
        return EpsModel()(x, t)

    model = SimpleNamespace(alphas_cumprod=ac, device=torch.device("cpu"), apply_model=inner,
                            family=SimpleNamespace(prediction="eps", conditioning=None))
    cond = {"c_crossattn": torch.zeros(2, 3, 4)}
    conds = pipeline.Conds(lambda step: cond, lambda step: cond, [[(0, 1.0)], [(1, 1.0)]])
    grid = get_timesteps(5)
    ctx = BlendContext(init, mask, 1 - mask, torch.zeros_like(init), torch.tensor([2.0, 1.0, 0.0]),
                       DiscreteSchedule(ac).sigma_to_t)
    denoiser = pipeline.guided_denoiser(model, find_sampler("DDIM")[0], conds, None, A1111Blend(), ctx, None, 0.0)
    sample_ddim(with_call_index(denoiser, len(grid)), _latent(9), grid, ac, extra_args={"cond_scale": 5.0})
    assert len(seen) == 4 and all(torch.equal(s[..., :3], init[..., :3]) for s in seen)
