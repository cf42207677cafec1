"""Tests for sdcore.sampling.denoisers: hand-derived values (a1111-semantics §13), parity with k-diffusion `external.py`, and CFG
behaviour (a1111-semantics §7) on a fake model whose output is a known function of its inputs."""
from __future__ import annotations

import importlib

import pytest
import torch

from oracles import k_sampling
from sdcore.sampling.denoisers import (CFGDenoiser, CompVisDenoiser, DiscreteSchedule, combine_denoised,
                                       sd_alphas_cumprod, with_call_index)


@pytest.fixture(scope="module")
def external():
    k_sampling()  # registers the bare k_diffusion package with sampling and utils
    return importlib.import_module("k_diffusion.external")


@pytest.fixture(scope="module")
def alphas():
    return sd_alphas_cumprod()


def assert_printed(actual, expected, decimals):
    """`actual` rounds to the spec's printed `expected` values: |actual - expected| <= half a unit of the last digit."""
    actual = torch.as_tensor(actual, dtype=torch.float64).flatten()
    expected = torch.tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    assert err <= 0.5 * 10 ** -decimals + 1e-9, f"max abs error {err} vs printed values at {decimals} decimals"


def fake_unet(x, t, c_crossattn=None, c_concat=None, y=None):
    """A deterministic 'UNet' depending on every input: x, t, text and image conditioning."""
    out = 0.3 * x + (t / 1000.0).reshape(-1, 1, 1, 1)
    if c_crossattn is not None:
        out = out + c_crossattn.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    if c_concat is not None:
        out = out + 0.1 * c_concat.sum(dim=1, keepdim=True)
    return out


# ---------------------------------------------------------------------------------------------- schedule
# (a1111-semantics §13)

def test_alphas_cumprod_spec13(alphas):
    # a1111-semantics §13 "Model sigmas": abar[0]=0.99915, abar[999]=0.0046601, abar[751]=0.055719 (float32)
    assert alphas.dtype == torch.float32 and alphas.shape == (1000,)
    assert alphas[0].item() == pytest.approx(0.99915, rel=1e-5)
    assert alphas[999].item() == pytest.approx(0.0046601, rel=1e-4)
    assert alphas[751].item() == pytest.approx(0.055719, rel=1e-4)
    assert alphas[751].sqrt().item() == pytest.approx(0.236049, rel=1e-5)
    assert (1 - alphas[751]).sqrt().item() == pytest.approx(0.971741, rel=1e-5)


def test_alphas_cumprod_formula(alphas):
    betas = [((0.00085 ** 0.5) + i * ((0.012 ** 0.5 - 0.00085 ** 0.5) / 999)) ** 2 for i in range(1000)]
    prod, expected = 1.0, []
    for b in betas:
        prod *= 1 - b
        expected.append(prod)
    assert torch.allclose(alphas.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_discrete_schedule_spec13(alphas):
    s = DiscreteSchedule(alphas)
    # a1111-semantics §13: sigma_min=0.0291675, sigma_max=14.614642, sigma(t=500)=1.61828, t_to_sigma(250.5)=0.697097,
    # sigma_to_t(1.0)=353.89
    assert s.sigma_min.item() == pytest.approx(0.0291675, rel=1e-5)
    assert s.sigma_max.item() == pytest.approx(14.614642, rel=1e-6)
    assert s.t_to_sigma(torch.tensor(500.0)).item() == pytest.approx(1.61828, rel=1e-5)
    assert s.t_to_sigma(torch.tensor(250.5)).item() == pytest.approx(0.697097, rel=1e-5)
    assert s.sigma_to_t(torch.tensor(1.0)).item() == pytest.approx(353.89, abs=5e-3)
    # round trip and clamping at both ends
    t = torch.tensor([0.0, 12.25, 500.0, 998.5, 999.0])
    assert torch.allclose(s.sigma_to_t(s.t_to_sigma(t)), t, atol=2e-3)
    assert s.sigma_to_t(torch.tensor([1e-4, 100.0])).tolist() == [0.0, 999.0]
    assert s.sigma_to_t(torch.tensor(1.0), quantize=True).item() == 354


def test_get_sigmas_uniform_spec13(alphas):
    # a1111-semantics §13 "20-step schedules", uniform: 14.6146, 10.7468, 8.0815, 6.2049, 4.8557, ..., 0.2322, 0.0292, 0
    sig = DiscreteSchedule(alphas).get_sigmas(20)
    assert sig.shape == (21,) and sig[-1] == 0
    expected = [14.6146, 10.7468, 8.0815, 6.2049, 4.8557, 3.8654, 3.1238, 2.5572, 2.1157, 1.7648, 1.4806, 1.2458,
                1.0481, 0.8784, 0.7297, 0.5964, 0.4736, 0.3555, 0.2322, 0.0292]
    assert_printed(sig[:-1], expected, decimals=4)
    full = DiscreteSchedule(alphas).get_sigmas()
    assert full.shape == (1001,) and torch.equal(full[:-1], DiscreteSchedule(alphas).sigmas.flip(0))


def test_schedule_bad_input(alphas):
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteSchedule(alphas[None])
    with pytest.raises(TypeError, match="alphas_cumprod"):
        DiscreteSchedule([0.9, 0.8])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DiscreteSchedule(torch.tensor([0.9, 0.0]))
    with pytest.raises(ValueError, match="t must lie"):
        DiscreteSchedule(alphas).t_to_sigma(torch.tensor([1000.0]))
    with pytest.raises(ValueError, match="n must be"):
        DiscreteSchedule(alphas).get_sigmas(0)
    with pytest.raises(ValueError, match="linear_start"):
        sd_alphas_cumprod(0.02, 0.012)


# ----------------------------------------------------------------------------------- parity with external.py

class _LDMStub(torch.nn.Module):
    """What k-diffusion's CompVisDenoiser expects: .alphas_cumprod and .apply_model(x, t, cond)."""

    def __init__(self, alphas):
        super().__init__()
        self.alphas_cumprod = alphas

    def apply_model(self, x, t, cond=None, **kwargs):
        # CompVisVDenoiser passes the text conditioning positionally as `cond` and drops other keywords
        return fake_unet(x, t, c_crossattn=cond, **kwargs)


def test_discrete_schedule_parity(external, alphas):
    ref = external.CompVisDenoiser(_LDMStub(alphas))
    ours = DiscreteSchedule(alphas)
    sig = torch.exp(torch.linspace(-6.0, 4.0, 2001))  # beyond both ends of [sigma_min, sigma_max]
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.log_sigmas, ref.log_sigmas)
    assert torch.equal(ours.sigma_to_t(sig), ref.sigma_to_t(sig))
    assert torch.equal(ours.sigma_to_t(sig, quantize=True), ref.sigma_to_t(sig, quantize=True))
    assert torch.equal(ours.sigma_to_t(sig.double()), ref.sigma_to_t(sig.double()))
    t = torch.linspace(0, 999, 3001)
    assert torch.equal(ours.t_to_sigma(t), ref.t_to_sigma(t))
    for n in (1, 2, 7, 20, 150, None):
        assert torch.equal(ours.get_sigmas(n), ref.get_sigmas(n))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_compvis_denoiser_parity(external, alphas, prediction):
    cls = external.CompVisDenoiser if prediction == "eps" else external.CompVisVDenoiser
    ref = cls(_LDMStub(alphas))
    ours = CompVisDenoiser(fake_unet, alphas, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g) * 5
    sigma = torch.tensor([14.614642, 3.0, 1.0, 0.0291675])
    ctx = torch.randn(4, 77, 16, generator=g)
    expected = ref(x, sigma, cond=ctx)
    got = ours(x, sigma, c_crossattn=ctx)
    assert (got - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()
    for a, b in zip(ours.get_scalings(sigma)[::-1], ref.get_scalings(sigma)[::-1]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def test_scalings_spec13(alphas):
    # a1111-semantics §13 "Scalings": sigma=14.614642: c_in 0.068265, v c_skip 0.0046601, v c_out -0.997667; sigma=1:
    # c_in 0.707107
    sigma = torch.tensor([14.614642, 1.0], dtype=torch.float64)
    c_skip, c_out, c_in = CompVisDenoiser(fake_unet, alphas, "eps").get_scalings(sigma)
    assert c_skip == 1.0 and torch.equal(c_out, -sigma)
    assert c_in.tolist() == pytest.approx([0.068265, 0.707107], rel=1e-5)
    v_skip, v_out, v_in = CompVisDenoiser(fake_unet, alphas, "v").get_scalings(sigma)
    assert v_skip[0].item() == pytest.approx(0.0046601, rel=1e-4)
    assert v_out[0].item() == pytest.approx(-0.997667, rel=1e-6)
    assert torch.equal(v_in, c_in)


def test_denoiser_calls_model_with_scaled_input_and_t(alphas):
    seen = {}

    def model(x, t, **cond):
        seen.update(x=x, t=t, cond=cond)
        return torch.zeros_like(x)

    d = CompVisDenoiser(model, alphas)
    x = torch.ones(1, 4, 2, 2)
    out = d(x, torch.tensor([1.0]), c_crossattn=torch.zeros(1, 3, 2), y=None)
    assert torch.allclose(seen["x"], x / 2 ** 0.5) and seen["t"].item() == pytest.approx(353.89, abs=5e-3)
    assert set(seen["cond"]) == {"c_crossattn", "y"}
    assert torch.equal(out, x)  # eps = 0 -> denoised = x
    with pytest.raises(ValueError, match="prediction"):
        CompVisDenoiser(model, alphas, prediction="x0")
    with pytest.raises(ValueError, match="sigma must have shape"):
        d(x, torch.tensor(1.0))


# --------------------------------------------------------------------------------------------- CFG (a1111-semantics §7)

class Recorder:
    """A fake inner denoiser: output = fake_unet(x, sigma, ...); records every call's row count and kwargs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, **cond):
        self.calls.append({"x": x, "sigma": sigma, **cond})
        return fake_unet(x, sigma, **cond)


def _inputs(batch=2, tokens=77, tokens_u=None, rows=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 4, 4, generator=g)
    sigma = torch.full((batch,), 2.0)
    cond = {"c_crossattn": torch.randn(rows or batch, tokens, 8, generator=g)}
    uncond = {"c_crossattn": torch.randn(batch, tokens_u or tokens, 8, generator=g)}
    return x, sigma, cond, uncond


def _expected_rows(x, sigma, text, image_cond=None):
    return fake_unet(x, sigma, c_crossattn=text, c_concat=image_cond)


def test_cfg_combine_one_call():
    x, sigma, cond, uncond = _inputs()
    rec = Recorder()
    out = CFGDenoiser(rec)(x, sigma, cond, uncond, cond_scale=7.5)
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape[0] == 4  # cond rows then uncond rows in one call
    c = _expected_rows(x, sigma, cond["c_crossattn"])
    u = _expected_rows(x, sigma, uncond["c_crossattn"])
    assert torch.allclose(out, u + 7.5 * (c - u), atol=1e-6)
    assert torch.equal(rec.calls[0]["c_crossattn"], torch.cat([cond["c_crossattn"], uncond["c_crossattn"]]))


def test_cfg_scale_one_is_cond():
    x, sigma, cond, uncond = _inputs()
    out = CFGDenoiser(Recorder())(x, sigma, cond, uncond, cond_scale=1.0)
    assert torch.allclose(out, _expected_rows(x, sigma, cond["c_crossattn"]), atol=1e-6)


def test_cfg_token_length_mismatch_separate_calls():
    x, sigma, cond, uncond = _inputs(tokens=154, tokens_u=77)
    rec = Recorder()
    out = CFGDenoiser(rec)(x, sigma, cond, uncond, cond_scale=5.0)
    assert [c["c_crossattn"].shape[1] for c in rec.calls] == [154, 77]
    c = _expected_rows(x, sigma, cond["c_crossattn"])
    u = _expected_rows(x, sigma, uncond["c_crossattn"])
    assert torch.allclose(out, u + 5.0 * (c - u), atol=1e-6)


def test_cfg_and_composition():
    # image 0 has two AND parts (weights 1.0, 0.5), image 1 one part: rows 0, 1 | 2
    x, sigma, cond, uncond = _inputs(rows=3)
    conds_list = [[(0, 1.0), (1, 0.5)], [(2, 1.0)]]
    rec = Recorder()
    out = CFGDenoiser(rec)(x, sigma, cond, uncond, cond_scale=3.0, conds_list=conds_list)
    assert torch.equal(rec.calls[0]["x"][:3], x[[0, 0, 1]])
    c = _expected_rows(x[[0, 0, 1]], sigma[[0, 0, 1]], cond["c_crossattn"])
    u = _expected_rows(x, sigma, uncond["c_crossattn"])
    assert torch.allclose(out[0], u[0] + (c[0] - u[0]) * 3.0 + (c[1] - u[0]) * 1.5, atol=1e-6)
    assert torch.allclose(out[1], u[1] + (c[2] - u[1]) * 3.0, atol=1e-6)
    direct = combine_denoised(c, u, conds_list, 3.0)
    assert torch.equal(direct, out)
    with pytest.raises(ValueError, match="conds_list"):
        CFGDenoiser(rec)(x, sigma, cond, uncond, 3.0, conds_list=[[(0, 1.0)], [(2, 1.0)]])
    with pytest.raises(ValueError, match="AND"):
        CFGDenoiser(rec)(x, sigma, cond, uncond, 3.0)


def test_cfg_image_cond_on_cond_and_uncond_rows():
    x, sigma, cond, uncond = _inputs()
    image_cond = torch.randn(2, 5, 4, 4)
    rec = Recorder()
    out = CFGDenoiser(rec)(x, sigma, cond, uncond, cond_scale=7.0, image_cond=image_cond)
    assert torch.equal(rec.calls[0]["c_concat"], torch.cat([image_cond, image_cond]))
    c = _expected_rows(x, sigma, cond["c_crossattn"], image_cond)
    u = _expected_rows(x, sigma, uncond["c_crossattn"], image_cond)
    assert torch.allclose(out, u + 7.0 * (c - u), atol=1e-6)
    rec = Recorder()
    CFGDenoiser(rec)(x, sigma, cond, uncond, cond_scale=7.0)
    assert "c_concat" not in rec.calls[0]


def test_cfg_dict_cond_keys_concatenated():
    x, sigma, cond, uncond = _inputs()
    cond["y"], uncond["y"] = torch.ones(2, 6), torch.zeros(2, 6)
    rec = Recorder()
    CFGDenoiser(rec)(x, sigma, cond, uncond, cond_scale=7.0)
    assert torch.equal(rec.calls[0]["y"], torch.cat([cond["y"], uncond["y"]]))
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(rec)(x, sigma, cond, {"c_crossattn": uncond["c_crossattn"]}, cond_scale=7.0)


def test_cfg_ngms_skip_uncond():
    # a1111-semantics §7 step 5: NGMS skips uncond on odd calls when sigma < s_min_uncond; CFG then uses scale 1 ->
    # cond output
    x, sigma, cond, uncond = _inputs()
    c = _expected_rows(x, sigma, cond["c_crossattn"])
    for step, sigma_value, s_min, skipped in [(1, 2.0, 3.0, True), (0, 2.0, 3.0, False), (1, 2.0, 1.5, False),
                                              (1, 2.0, 0.0, False)]:
        rec = Recorder()
        s = torch.full((2,), sigma_value)
        out, out_u = CFGDenoiser(rec)(x, s, cond, uncond, 7.0, s_min_uncond=s_min, step=step, return_uncond=True)
        assert (rec.calls[0]["x"].shape[0] == 2) is skipped
        if skipped:
            assert torch.allclose(out, c, atol=1e-6) and torch.equal(out_u, out)


def test_cfg_edit_model_three_way():
    x, sigma, cond, uncond = _inputs()
    image_cond = torch.randn(2, 4, 4, 4)
    rec = Recorder()
    out = CFGDenoiser(rec, is_edit_model=True, image_cfg_scale=1.5)(
        x, sigma, cond, uncond, 7.0, image_cond=image_cond)
    call = rec.calls[0]
    assert call["x"].shape[0] == 6
    assert torch.equal(call["c_crossattn"], torch.cat([cond["c_crossattn"], uncond["c_crossattn"],
                                                       uncond["c_crossattn"]]))
    assert torch.equal(call["c_concat"], torch.cat([image_cond, image_cond, torch.zeros_like(image_cond)]))
    c = _expected_rows(x, sigma, cond["c_crossattn"], image_cond)
    ic = _expected_rows(x, sigma, uncond["c_crossattn"], image_cond)
    u = _expected_rows(x, sigma, uncond["c_crossattn"], torch.zeros_like(image_cond))
    assert torch.allclose(out, u + 7.0 * (c - ic) + 1.5 * (ic - u), atol=1e-5)
    # image_cfg_scale = 1 -> ordinary CFG (a1111-semantics §7 step 1)
    rec = Recorder()
    CFGDenoiser(rec, is_edit_model=True, image_cfg_scale=1.0)(x, sigma, cond, uncond, 7.0, image_cond=image_cond)
    assert rec.calls[0]["x"].shape[0] == 4
    with pytest.raises(ValueError, match="AND"):
        CFGDenoiser(rec, is_edit_model=True, image_cfg_scale=1.5)(
            x, sigma, {"c_crossattn": torch.randn(3, 77, 8)}, uncond, 7.0, image_cond=image_cond,
            conds_list=[[(0, 1.0), (1, 1.0)], [(2, 1.0)]])


def test_cfg_prompt_schedule_callable_and_call_index():
    x, sigma, cond, uncond = _inputs()
    other = {"c_crossattn": cond["c_crossattn"] + 1.0}
    schedule = lambda step: cond if step < 2 else other  # noqa: E731
    cfg = CFGDenoiser(Recorder())
    model = with_call_index(cfg, total_steps=4)
    outs = [model(x, sigma, cond=schedule, uncond=uncond, cond_scale=7.0) for _ in range(4)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3]) and not torch.equal(outs[1], outs[2])
    assert torch.equal(outs[2], cfg(x, sigma, other, uncond, 7.0))


def test_cfg_plugs_into_compvis_denoiser(alphas):
    x, sigma, cond, uncond = _inputs()
    inner = CompVisDenoiser(fake_unet, alphas)
    out = CFGDenoiser(inner)(x, sigma, cond, uncond, 7.0)
    c = inner(x, sigma, c_crossattn=cond["c_crossattn"])
    u = inner(x, sigma, c_crossattn=uncond["c_crossattn"])
    assert torch.allclose(out, u + 7.0 * (c - u), atol=1e-5)
