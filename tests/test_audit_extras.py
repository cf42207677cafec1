"""Audit extras of issue 14 item 3: noise fingerprints in traces, the precision-drift report and the
step-refinement stability of the SDE samplers (scripts/sampler_convergence.py, scripts/compare_traces.py).

Fingerprints are checked against draws recomputed here with torch's CPU generator, numpy's SeedSequence and
torchsde's BrownianTree (the oracles), hashed with hashlib over float32 little-endian bytes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchsde

from sdcore import pipeline as P
from sdcore.checkpoint import load_checkpoint
from sdcore.rng import slerp
from sdcore.sampling import samplers as S

from sdcore.sampling.schedules import get_sigmas_karras
from tests.oracles import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "sdcore" / "weights" / "sdcore-tiny.safetensors"


def _script(name: str):
    """scripts/<name>.py as a module (registered in sys.modules: its dataclasses need their module)."""
    spec = importlib.util.spec_from_file_location(f"_audit_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def convergence():
    return _script("sampler_convergence")


@pytest.fixture(scope="module")
def compare():
    return _script("compare_traces")


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(TINY, dtype=torch.float32)


def sha256_f32(t: torch.Tensor) -> str:
    """The fingerprint's definition, written independently: float32, little-endian, C order."""
    return hashlib.sha256(np.ascontiguousarray(t.detach().cpu().numpy(), dtype="<f4").tobytes()).hexdigest()


def txt2img(model, sampler: str, steps: int, seeds: P.Seeds, recorder, scheduler=None) -> P.Result:
    return P.txt2img(model, ["a red circle"] * len(seeds.seeds), [""] * len(seeds.seeds),
                     sampler=S.find_sampler(sampler)[0], scheduler=scheduler, steps=steps, cfg_scale=7.0,
                     seeds=seeds, width=64, height=64, model_callback=recorder, decode_images=False,
                     disable_progress=True)


# -- noise fingerprints ------------------------------------------------------------------------------------------------

def test_noise_bytes_are_float32_little_endian_c_order():
    t = torch.arange(24, dtype=torch.float16).reshape(2, 3, 4) / 7
    assert S.noise_bytes(t) == np.asarray(t.float().numpy(), dtype="<f4").tobytes()
    assert len(S.noise_bytes(t)) == 4 * t.numel()
    transposed = t.float().transpose(1, 2)  # not contiguous: hashed in the order of its own shape
    assert S.noise_bytes(transposed) == np.ascontiguousarray(transposed.numpy(), dtype="<f4").tobytes()
    assert S.noise_bytes(torch.tensor([1.0])) == b"\x00\x00\x80\x3f"  # 1.0f = 0x3f800000, little-endian


def test_fingerprints_equal_independent_recomputation(tiny, tmp_path, compare, capsys):
    """Euler a with a variation seed: seed and subseed draws, the slerped initial noise and every per-step draw
    (the same CPU generator's next draws, A1111's CPU source) are the sha256 of tensors recomputed here."""
    seed, subseed, strength, steps = 1234, 99, 0.3, 4
    recorder = S.TraceRecorder()
    result = txt2img(tiny, "Euler a", steps, P.Seeds((seed,), (subseed,), strength), recorder)
    shape = (4, 8, 8)
    g = torch.Generator("cpu").manual_seed(seed)
    seed_noise = torch.randn(shape, generator=g)
    subseed_noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(subseed))
    initial = slerp(strength, seed_noise, subseed_noise)
    step_draws = [torch.randn(shape, generator=g) for _ in range(steps - 1)]  # no draw on the step to sigma 0
    expected = [("seed_noise", seed_noise), ("subseed_noise", subseed_noise), ("initial_noise", initial)]
    expected += [("step_noise", z) for z in step_draws]
    got = recorder.noise
    assert [r["name"] for r in got] == [name for name, _ in expected]
    assert [r["sha256"] for r in got] == [sha256_f32(z[None]) for _, z in expected]
    assert [r["sha256_images"] for r in got] == [[sha256_f32(z)] for _, z in expected]
    sigmas = result.plan.passes[0].sigma_sched
    for k, r in enumerate(got[3:]):  # step k: sigma_k -> sigma_{k+1}, after model call k
        assert (r["step"], r["call"], r["shape"], r["dtype"], r["device"]) == (k, k + 1, [1, *shape], "float32", "cpu")
        assert (r["sigma"], r["sigma_next"]) == (float(sigmas[k]), float(sigmas[k + 1]))
    assert all(r["step"] == -1 and r["call"] == 0 and r["sigma"] is None for r in got[:3])
    # another implementation writes its fingerprints with hashlib alone: compare_traces finds no difference
    recorder.save(tmp_path / "ours.safetensors")
    assert S.load_noise_fingerprints(tmp_path / "ours.safetensors") == got
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps([{"name": name, "shape": [1, *shape], "sha256": sha256_f32(z[None])}
                                  for name, z in expected]))
    assert compare.main([str(tmp_path / "ours.safetensors"), str(theirs)]) == 0
    assert f"no noise difference: all {len(expected)} draws" in capsys.readouterr().out


def test_vae_sample_fingerprint_is_the_seed_stream_draw(tiny, astronaut):
    """img2img: the VAE posterior sample's eps of image i is the first draw of a CPU generator seeded from numpy's
    SeedSequence([seed, 1]) (`rng.stream_seed`, sdcore's documented deviation), shape [1, 4, 8, 8]."""
    recorder, seed = S.TraceRecorder(), 77
    P.img2img(tiny, [astronaut.resize((64, 64))], None, ["a red circle"], [""], sampler=S.find_sampler("Euler")[0],
              scheduler=None, steps=4, denoising_strength=0.5, cfg_scale=7.0, seeds=P.Seeds((seed,)), width=64,
              height=64, model_callback=recorder, disable_progress=True)
    stream = int(np.random.SeedSequence([seed, 1]).generate_state(1, np.uint32)[0])
    eps = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(stream))
    initial = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
    assert [(r["name"], r["sha256"]) for r in recorder.noise[:2]] == [("vae_sample", sha256_f32(eps)),
                                                                       ("initial_noise", sha256_f32(initial))]
    # then Euler's churn draws, made at every step even with s_churn 0 (k-diffusion's draw order): the same
    # generator's next draws
    g = torch.Generator("cpu").manual_seed(seed)
    draws = [torch.randn((1, 4, 8, 8), generator=g) for _ in range(len(recorder.noise) - 1)][1:]
    assert [(r["name"], r["sha256"]) for r in recorder.noise[2:]] == [("step_noise", sha256_f32(z)) for z in draws]
    assert len(draws) == len(recorder.records) == 3  # 4 steps at strength 0.5: t_enc 2, 3 model calls


def test_same_seed_same_fingerprints_other_seed_differs_at_first_draw(tiny, tmp_path, compare, capsys):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        recorder = S.TraceRecorder()
        txt2img(tiny, "Euler a", 3, P.Seeds((seed,)), recorder)
        recorder.save(tmp_path / f"{name}.safetensors")
        runs[name] = recorder.noise
    assert runs["a"] == runs["b"] and len(runs["a"]) == 3
    assert compare.first_noise_difference(runs["a"], runs["c"]) == 0
    assert all(x["sha256"] != y["sha256"] for x, y in zip(runs["a"], runs["c"]))
    assert compare.main([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 0
    capsys.readouterr()
    assert compare.main([str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "first differing noise draw: 0" in out and f"sha256 {runs['c'][0]['sha256']}" in out
    # a run that stops drawing early: the draws agree, then only one run draws
    assert compare.first_noise_difference(runs["a"], runs["a"][:2]) == 2


@pytest.mark.filterwarnings("ignore:Should have t[ab]")  # torchsde's own clamp at the rounded ends warns
def test_sde_sampler_records_one_brownian_draw_per_step(tiny):
    """DPM++ 2M SDE, batch of two seeds: one Brownian draw per step with sigma_next > 0, each equal to the
    increment (W(sigma_next) - W(sigma)) / sqrt(sigma - sigma_next) of torchsde BrownianTrees over the run's
    [sigma_min, sigma_max] with entropy = seed (what k-diffusion's BrownianTreeNoiseSampler computes); the
    per-image digest of image 1 equals the same seed run alone."""
    steps, recorder = 3, S.TraceRecorder()
    result = txt2img(tiny, "DPM++ 2M SDE", steps, P.Seeds((3, 4)), recorder, scheduler="karras")
    sigmas = result.plan.passes[0].sigma_sched
    draws = [r for r in recorder.noise if r["name"] == "brownian_noise"]
    assert [r["step"] for r in draws] == list(range(steps - 1))  # the step to sigma = 0 returns denoised
    assert [(r["sigma"], r["sigma_next"]) for r in draws] == [(float(sigmas[k]), float(sigmas[k + 1]))
                                                              for k in range(steps - 1)]
    assert [r["call"] for r in draws] == list(range(1, steps))
    trees = [torchsde.BrownianTree(sigmas[-2], torch.zeros(4, 8, 8), sigmas[0], entropy=seed) for seed in (3, 4)]
    increments = [-torch.stack([tree(sigmas[k + 1], sigmas[k]) for tree in trees])  # tree(a, b) = W(b) - W(a)
                  / (sigmas[k] - sigmas[k + 1]).sqrt() for k in range(steps - 1)]
    assert [r["sha256"] for r in draws] == [sha256_f32(z) for z in increments]
    alone = S.TraceRecorder()
    txt2img(tiny, "DPM++ 2M SDE", steps, P.Seeds((4,)), alone, scheduler="karras")
    assert [r["sha256_images"][1] for r in draws] == [r["sha256_images"][0] for r in alone.noise[1:]]


# -- precision drift ---------------------------------------------------------------------------------------------------

def test_precision_drift_orders_the_dtypes(convergence):
    """Three steps of the tiny model: a second float64 run drifts by exactly 0, float32 by less than bfloat16 at
    every step (and bfloat16 by something: the dtype really changed)."""
    results = convergence.precision_drift(["float64", "float32", "bfloat16"], steps=3,
                                          run=convergence.TinyRun(seeds=(1,)))
    f64, f32, bf16 = results["float64"], results["float32"], results["bfloat16"]
    assert len(f64["drift"]) == len(f32["drift"]) == len(bf16["drift"]) == 3
    assert f64["drift"] == [0.0, 0.0, 0.0] and f64["latent"] == 0.0 and f64["pixels_max"] == 0
    assert all(a < b for a, b in zip(f32["drift"], bf16["drift"])), (f32["drift"], bf16["drift"])
    assert min(bf16["drift"]) > 1e-3 and max(f32["drift"]) < 1e-2
    with pytest.raises(ValueError, match="float8"):
        convergence.precision_drift(["float8"])


# -- step refinement ---------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Should have t[ab]")
def test_sde_refinement_converges_on_exact_gaussian_mixture_denoiser():
    """The sampler property itself, on the exact denoiser of a 3-d Gaussian mixture (4 points, float64): with the
    Brownian tree, DPM++ 2M SDE's distance 40->80 is under 0.6 x its distance 20->40 (measured 0.36-0.44 for three
    batches); with fresh per-step draws (Euler a, and the same DPM++ 2M SDE update) it stays above 0.8 x
    (measured 0.97-0.99), at the size of the data's spread."""
    gm = GaussianMixture.example(dim=3, components=3, seed=0)
    sigma_min, sigma_max = 0.0291675, 14.614642  # SD1's range
    g = torch.Generator().manual_seed(0)
    x_T = gm.sample(4, g) + torch.randn(4, 3, generator=g, dtype=torch.float64) * sigma_max

    def distances(function, noise):
        x = [function(gm, x_T.clone(), get_sigmas_karras(n, sigma_min, sigma_max).double(), disable=True,
                      noise_sampler=noise()) for n in (20, 40, 80)]
        return [float((b - a).pow(2).mean().sqrt()) for a, b in zip(x, x[1:])]

    def fresh():
        generator = torch.Generator().manual_seed(5)
        return lambda sigma, sigma_next: torch.randn(x_T.shape, generator=generator, dtype=torch.float64)

    tree = lambda: S.BrownianTreeNoiseSampler(x_T, sigma_min, sigma_max, seeds=[0, 1, 2, 3])  # noqa: E731
    sde = distances(S.sample_dpmpp_2m_sde, tree)
    assert sde[1] < 0.6 * sde[0], sde
    for function in (S.sample_euler_ancestral, S.sample_dpmpp_2m_sde):
        d = distances(function, fresh)
        assert d[1] > 0.8 * d[0] and d[1] > 10 * sde[1], (function.__name__, d)


@pytest.mark.slow
def test_sde_refinement_converges_and_euler_a_does_not(convergence, tiny):
    """Fixed seed 1, 20 -> 40 -> 80 steps: DPM++ 2M SDE Karras (Brownian tree) at least halves its distance
    (measured ratio 0.10 on the bundled model); Euler a (fresh per-step draws) does not (measured 1.08)."""
    run = convergence.TinyRun(seeds=(1,))
    sde = convergence.refinement_distances(tiny, "DPM++ 2M SDE", "karras", (20, 40, 80), run=run)["latent"][:, 0]
    euler_a = convergence.refinement_distances(tiny, "Euler a", None, (20, 40, 80), run=run)["latent"][:, 0]
    assert sde[1] < 0.5 * sde[0], sde
    assert euler_a[1] > 0.5 * euler_a[0], euler_a


@pytest.mark.slow
def test_sde_refinement_needs_the_brownian_tree(convergence, tiny):
    """The same DPM++ 2M SDE update with the tree replaced by fresh per-step draws loses the convergence."""
    run = convergence.TinyRun(seeds=(1,))
    fresh = convergence.refinement_distances(tiny, "DPM++ 2M SDE", "karras", (20, 40, 80), run=run,
                                             fresh_noise=True)["latent"][:, 0]
    assert fresh[1] > 0.5 * fresh[0], fresh


def test_write_section_replaces_only_its_block(convergence, tmp_path):
    path = tmp_path / "doc.md"
    convergence.write_section(path, "gm", "one")
    convergence.write_section(path, "drift", "two")
    convergence.write_section(path, "gm", "three")
    text = path.read_text()
    assert "three" in text and "one" not in text and text.index("three") < text.index("two")
    assert text.count("<!-- section gm:") == 1 and text.count("<!-- end of section drift -->") == 1
