"""The refactored data flow: `sdcore.pipeline` (img2img / txt2img / hires_fix -> `Result`), its `Plan`, the mask blend
strategies through the whole job, the VAE posterior's own RNG stream, and the A1111 adapter around them.

Tiny random-weight checkpoints, 64 px images, 2-6 steps (20 where a hand-derived schedule needs it). Expected numbers
are derived by hand from docs/a1111-semantics.md (cited as §N), not read back from the code under test.
"""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rect_mask
from sdcore import (Options, StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img, images,
                    pipeline, process_images, rng)
from sdcore.checkpoint import StableDiffusionModel
from sdcore.sampling import schedules
from sdcore.sampling.blends import MaskBlend, make_blend
from sdcore.sampling.samplers import find_sampler

SIZE = 64
# SD1 uniform 20-step schedule (§13 "20-step schedules"), values 0..4 and the last non-zero one.
UNIFORM_20 = [14.6146, 10.7468, 8.0815, 6.2049, 4.8557]
UNIFORM_20_LAST = 0.0292


def job(sd, image, **kw):
    args = dict(sd_model=sd, prompt="a red circle", negative_prompt="blurry", init_images=[image],
                sampler_name="Euler", steps=4, cfg_scale=7.0, seed=1234, width=SIZE, height=SIZE,
                denoising_strength=0.75)
    args.update(kw)
    return StableDiffusionProcessingImg2Img(**args)


def txt2img(sd, **kw):
    args = dict(sd_model=sd, prompt="a red circle", negative_prompt="blurry", sampler_name="Euler", steps=4,
                cfg_scale=7.0, seed=7, width=SIZE, height=SIZE)
    args.update(kw)
    return StableDiffusionProcessingTxt2Img(**args)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


@pytest.fixture(scope="module")
def photo(astronaut):
    return astronaut.resize((SIZE, SIZE), Image.LANCZOS)


def outside(box: tuple[int, int, int, int]) -> np.ndarray:
    keep = np.ones((SIZE, SIZE), bool)
    keep[box[1]:box[3], box[0]:box[2]] = False
    return keep


# ---------------------------------------------------------------------------------------------------------------
# 1. Same job twice -> same bytes; the job object and the model are not changed
# ---------------------------------------------------------------------------------------------------------------

def snap(v):
    """A comparable snapshot of a job field: values, and the identity of every mutable object (a field replaced by an
    equal copy is a change too). PIL images by mode, size and pixel bytes."""
    if isinstance(v, Image.Image):
        return ("PIL", id(v), v.mode, v.size, v.tobytes(), tuple(sorted(v.info.items(), key=str)))
    if isinstance(v, StableDiffusionModel):
        return ("model", id(v))
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), tuple(v.shape), v.dtype, v.detach().cpu().numpy().tobytes())
    if isinstance(v, list):
        return ("list", id(v), tuple(snap(x) for x in v))
    if isinstance(v, tuple):
        return ("tuple", tuple(snap(x) for x in v))
    if isinstance(v, dict):
        return ("dict", id(v), tuple((k, snap(x)) for k, x in v.items()))
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return (type(v).__name__, id(v), tuple((f.name, snap(getattr(v, f.name))) for f in dataclasses.fields(v)))
    if isinstance(v, (str, int, float, bool, type(None))):
        return ("value", type(v).__name__, repr(v))
    return ("object", id(v), repr(v))


def job_snapshot(p) -> dict:
    return {f.name: snap(getattr(p, f.name)) for f in dataclasses.fields(p)}


def model_fingerprint(sd: StableDiffusionModel) -> dict:
    """Every parameter and buffer (name, shape, dtype, sum, abs sum), module identities and training flags, the
    schedule, device and dtypes."""
    out = {"alphas_cumprod": sd.alphas_cumprod.double().sum().item(), "device": str(sd.device),
           "dtype": (sd.dtype, sd.vae_dtype), "modules": [id(m) for m in sd.components().values()]}
    for name, module in sd.components().items():
        out[name] = [(n, tuple(t.shape), t.dtype, t.double().sum().item(), t.double().abs().sum().item())
                     for n, t in list(module.named_parameters()) + list(module.named_buffers())]
        out[name + ".training"] = [m.training for m in module.modules()]
        out[name + ".requires_grad"] = [t.requires_grad for t in module.parameters()]
    return out


def _cases(sd1, inpaint, photo, astronaut):
    box_mask = rect_mask(photo.size, (16, 20, 40, 52))
    return {
        "img2img": lambda: job(sd1, photo, extra_generation_params={"Note": "x"}, comments={"c": 1}),
        "inpaint_only_masked": lambda: job(
            sd1, astronaut, mask=rect_mask(astronaut.size, (200, 100, 260, 180)), mask_blur=2, inpainting_fill=0,
            inpaint_full_res=True, inpaint_full_res_padding=8),
        "inpaint_model_only_masked_latent_noise": lambda: job(
            inpaint, photo, mask=box_mask, mask_blur=0, inpainting_fill=2, inpaint_full_res=True,
            inpaint_full_res_padding=4),
        "blank_mask_only_masked": lambda: job(sd1, photo, mask=rect_mask(photo.size, (0, 0, 0, 0)),
                                              inpaint_full_res=True),
        "soft_inpainting_object_and_latent_mask": lambda: job(
            sd1, photo, mask=box_mask, mask_blur=2, inpaint_full_res=False,
            latent_mask=rect_mask(photo.size, (8, 8, 48, 48)), mask_blend=make_blend("soft_inpainting")),
        "txt2img_hires_lanczos": lambda: txt2img(sd1, enable_hr=True, hr_scale=2.0, hr_upscaler="Lanczos",
                                                 hr_second_pass_steps=2, denoising_strength=0.5),
        "batch2_niter2_prompt_list": lambda: job(sd1, photo, batch_size=2, n_iter=2, steps=3,
                                                 prompt=["a", "b", "c", "d"], negative_prompt=["", "x", "", "y"],
                                                 override_settings={"eta_noise_seed_delta": 31337},
                                                 sampler_name="Euler a"),
        "refiner": lambda: job(sd1, photo, refiner_checkpoint=sd1, refiner_switch_at=0.5, steps=6,
                               denoising_strength=1.0),
    }


CASES = ["img2img", "inpaint_only_masked", "inpaint_model_only_masked_latent_noise", "blank_mask_only_masked",
         "soft_inpainting_object_and_latent_mask", "txt2img_hires_lanczos", "batch2_niter2_prompt_list", "refiner"]


@pytest.mark.parametrize("case", CASES)
def test_same_job_twice_same_bytes_and_nothing_changed(sd1_tiny, inpaint_tiny, photo, astronaut, case):
    p = _cases(sd1_tiny, inpaint_tiny, photo, astronaut)[case]()
    model = p.sd_model
    before, model_before = job_snapshot(p), model_fingerprint(model)
    a = process_images(p, disable_progress=True)
    assert job_snapshot(p) == before, [k for k, v in job_snapshot(p).items() if v != before[k]]
    assert p.sd_model is model and model_fingerprint(model) == model_before
    b = process_images(p, disable_progress=True)
    assert job_snapshot(p) == before and model_fingerprint(model) == model_before
    assert len(a.images) == len(b.images) == p.batch_size * p.n_iter
    assert [png_bytes(im) for im in a.images] == [png_bytes(im) for im in b.images]
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert a.infotexts == b.infotexts and a.seeds == b.seeds
    assert [[list(s.model_calls) for s in pl.passes] for pl in a.plans] == \
           [[list(s.model_calls) for s in pl.passes] for pl in b.plans]
    if case == "blank_mask_only_masked":
        assert a.plans[0].blank_mask and a.paste_to is None and "blank mask" in a.comments
        assert "blank mask" not in p.comments  # the job's own dict is not written to
    if case == "refiner":
        assert a.plans[0].refiner_switched  # the refiner really ran


def test_random_seed_is_not_written_back_to_the_job(sd1_tiny, photo):
    # A1111 writes the resolved seed into p.seed; sdcore's run leaves the job as it was (-1 = pick one per run).
    p = job(sd1_tiny, photo, seed=-1, subseed=-1, steps=1)
    processed = process_images(p)
    assert p.seed == -1 and p.subseed == -1
    assert processed.seeds[0] >= 0


# ---------------------------------------------------------------------------------------------------------------
# 2. The VAE posterior sample draws from its own stream
# ---------------------------------------------------------------------------------------------------------------

SEEDS = [0, 1, 2, 1234, 31337, 2**32 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_vae_stream_is_not_the_initial_noise(seed):
    shape = (4, 64, 64)
    vae = rng.vae_sample_noise([seed], shape)
    assert vae.shape == (1, *shape) and vae.dtype == torch.float32
    initial = rng.randn_local(seed, shape)
    image_rng = rng.ImageRNG(shape, [seed]).next()[0]
    assert torch.equal(initial, image_rng)  # the same reference draw both ways
    for other in (initial, image_rng, rng.randn_local(seed + 1, shape), rng.randn_local(max(seed - 1, 0), shape)):
        assert abs(corr(vae[0], other)) < 0.1
    # it is N(0, 1)
    assert abs(float(vae.mean())) < 0.05 and abs(float(vae.std()) - 1) < 0.05


@pytest.mark.parametrize("seed", SEEDS)
def test_stream_seed_differs_from_the_seed_and_its_neighbours(seed):
    s = rng.stream_seed(seed, rng.VAE_STREAM)
    assert rng.VAE_STREAM == 1 and s == rng.stream_seed(seed, 1)
    assert 0 <= s < 2**32 and isinstance(s, int)
    assert s not in (seed - 1, seed, seed + 1)
    assert s != rng.stream_seed(seed + 1, 1) and s != rng.stream_seed(seed - 1, 1)
    assert s != rng.stream_seed(seed, 0) and s != rng.stream_seed(seed, 2)
    assert s == rng.stream_seed(seed, 1)  # deterministic


def test_vae_stream_follows_randn_source():
    shape = (4, 8, 8)
    cpu = rng.vae_sample_noise([5, 6], shape, source="CPU")
    nv = rng.vae_sample_noise([5, 6], shape, source="NV")
    assert not torch.allclose(cpu, nv)
    for i, seed in enumerate([5, 6]):
        s = rng.stream_seed(seed, 1)
        assert torch.equal(cpu[i], rng.randn_local(s, shape, source="CPU"))
        assert torch.equal(nv[i], torch.from_numpy(rng.PhiloxGenerator(s).randn(shape)))
    assert not torch.equal(cpu[0], cpu[1])


@pytest.fixture(scope="module")
def source128(astronaut):
    return pipeline.pixels_to_source([astronaut.resize((128, 128), Image.LANCZOS)], torch.device("cpu"))


@pytest.mark.parametrize("seed", [3, 1234])
def test_encode_sample_is_mean_plus_std_times_vae_noise(sd1_tiny, source128, seed):
    sd = sd1_tiny
    source = source128.to(sd.device)
    with torch.inference_mode():
        z = pipeline.encode(sd, source, [seed], sample=True)
        dist = sd.vae.encode(source[0][None].to(sd.device, sd.vae_dtype))  # one image, as encode does
        mean = pipeline.encode(sd, source, [seed], sample=False)
    scale = sd.family.vae.scale_factor
    eps = rng.vae_sample_noise([seed], dist.mean.shape[1:], device=sd.device)
    by_hand = (dist.mean + dist.std * eps) * scale
    assert z.shape == (1, 4, 16, 16) and z.dtype == torch.float32
    torch.testing.assert_close(z, by_hand.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean, (dist.mean * scale).float(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(z, mean)
    # reconstruct the draw from the sample: it is the VAE stream, not the seed's initial noise
    recon = (z / scale - dist.mean) / dist.std
    torch.testing.assert_close(recon, eps, rtol=1e-3, atol=1e-3)
    initial = rng.ImageRNG(tuple(recon.shape[1:]), [seed]).next()
    assert abs(corr(recon, initial)) < 0.1
    assert abs(corr(recon, rng.randn_local(seed, recon.shape[1:]))) < 0.1
    # NV source: a different draw
    z_nv = pipeline.encode(sd, source, [seed], sample=True, rng_source="NV")
    assert not torch.allclose(z, z_nv)


def test_processing_init_latent_uses_the_vae_stream_of_the_first_seed(sd1_tiny, photo):
    p = job(sd1_tiny, photo, seed=77, steps=1)
    processed = process_images(p)
    resized = images.resize_image(0, photo.convert("RGB"), SIZE, SIZE)
    source = pipeline.pixels_to_source([resized], sd1_tiny.device)
    with torch.inference_mode():
        expected = pipeline.encode(sd1_tiny, source, [77], sample=True, rng_source="CPU")
        expected_nv = pipeline.encode(sd1_tiny, source, [77], sample=True, rng_source="NV")
        expected_mean = pipeline.encode(sd1_tiny, source, [77], sample=False)
    torch.testing.assert_close(processed.init_latent, expected, rtol=1e-6, atol=1e-6)
    nv = process_images(job(sd1_tiny, photo, seed=77, steps=1, opts=Options(randn_source="NV")))
    torch.testing.assert_close(nv.init_latent, expected_nv, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(nv.init_latent, processed.init_latent)
    mean = process_images(job(sd1_tiny, photo, seed=77, steps=1, opts=Options(vae_encode_sample=False)))
    torch.testing.assert_close(mean.init_latent, expected_mean, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 3. Plan contents (§6.2, §6.3, §6.4, §3.2, §2.9)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def euler20(sd1_tiny, photo):
    return process_images(job(sd1_tiny, photo, steps=20, denoising_strength=0.75, sampler_name="Euler"))


def test_plan_img2img_euler_20_steps_at_075(euler20):
    # §6.2: t_enc = int(0.75 * 20) = 15; §6.3: sigma_sched = sigmas[20 - 15 - 1:] = sigmas[4:], t_enc + 2 = 17
    # values, t_enc + 1 = 16 Euler steps, one model call each at sigma_sched[0..15].
    plan = euler20.plans[0]
    assert len(euler20.plans) == 1 and len(plan.passes) == 1
    sp = plan.passes[0]
    assert (sp.sampler, sp.steps, sp.t_enc, sp.width, sp.height) == ("Euler", 20, 15, SIZE, SIZE)
    assert sp.timesteps is None and sp.refiner_switch_call is None
    assert len(sp.sigmas) == 21 and len(sp.sigma_sched) == 17
    assert torch.equal(sp.sigma_sched.cpu(), sp.sigmas[4:].cpu())
    # Euler's default is the model's uniform schedule (§13): 14.6146 ... 4.8557 (index 4) ... 0.0292, 0.
    np.testing.assert_allclose(sp.sigmas[:5].tolist(), UNIFORM_20, rtol=1e-4)
    np.testing.assert_allclose(float(sp.sigma_sched[0]), 4.8557, rtol=1e-4)
    np.testing.assert_allclose(float(sp.sigma_sched[-2]), UNIFORM_20_LAST, rtol=2e-3)
    assert float(sp.sigma_sched[-1]) == 0.0
    assert plan.model_calls == 16 and len(sp.model_calls) == 16
    assert sp.model_calls == [float(s) for s in sp.sigma_sched[:-1]]
    assert plan.seeds == [1234] and plan.crop_region is None and plan.paste_to is None
    assert plan.mask_cells is None and plan.blend is None and not plan.blank_mask


def test_plan_heun_calls_twice_per_step_except_the_last(sd1_tiny, photo, euler20):
    # Heun: a call at sigma_i, then the corrector at sigma_{i+1}, except on the last step (sigma_{i+1} = 0):
    # 16 steps -> 15 * 2 + 1 = 31 calls: s0, s1, s1, s2, s2, ..., s14, s15, s15.
    processed = process_images(job(sd1_tiny, photo, steps=20, denoising_strength=0.75, sampler_name="Heun"))
    sp = processed.plans[0].passes[0]
    s = [float(v) for v in sp.sigma_sched]
    assert sp.t_enc == 15 and len(s) == 17
    assert torch.equal(sp.sigma_sched.cpu(), euler20.plans[0].passes[0].sigma_sched.cpu())  # same uniform slice
    expected = []
    for i in range(16):
        expected.append(s[i])
        if s[i + 1] != 0:
            expected.append(s[i + 1])
    assert len(expected) == 31
    assert sp.model_calls == expected


def test_plan_ddim_records_timesteps(sd1_tiny, photo):
    # §6.4: grid 1, 51, ..., 951 for 20 steps; t_enc 15; the sampler gets timesteps[:15] = 1 .. 701 and (DDIM loop
    # quirk) visits indices 14 .. 1 only: 14 model calls at t = 701, 651, ..., 51.
    processed = process_images(job(sd1_tiny, photo, steps=20, denoising_strength=0.75, sampler_name="DDIM"))
    sp = processed.plans[0].passes[0]
    assert (sp.sampler, sp.steps, sp.t_enc) == ("DDIM", 20, 15)
    assert sp.sigmas is None and sp.sigma_sched is None and sp.scheduler is None
    assert sp.timesteps.tolist() == [1 + 50 * k for k in range(15)]
    assert sp.model_calls == [float(1 + 50 * k) for k in range(14, 0, -1)]


def test_plan_only_masked_crop_and_paste_to(sd1_tiny, photo):
    # §2.2.4/§3.2: bbox (16,20,40,52) + padding 4 -> (12,16,44,56), 32x40; processing ratio 1 > 0.8 -> the width
    # grows by int(40 - 32) = 8, 4 each side -> (8,16,48,56); paste_to = (8, 16, 40, 40).
    p = job(sd1_tiny, photo, mask=rect_mask(photo.size, (16, 20, 40, 52)), mask_blur=0, inpaint_full_res=True,
            inpaint_full_res_padding=4, steps=2)
    processed = process_images(p)
    plan = processed.plans[0]
    assert plan.crop_region == (8, 16, 48, 56)
    assert plan.paste_to == (8, 16, 40, 40) == processed.paste_to
    assert not plan.blank_mask and plan.blend == "a1111"
    assert "Inpaint area: Only masked" in processed.info and "Masked area padding: 4" in processed.info


def test_plan_mask_coverage_16px_square(sd1_tiny, photo):
    # images.latent_mask docstring / §13: a 16x16 white square at (24..39) of a 64x64 mask -> 8x8 cells, the
    # centre 2x2 at 0.871 before rounding, exactly those 4 cells after.
    p = job(sd1_tiny, photo, mask=rect_mask(photo.size, (24, 24, 40, 40)), mask_blur=0, inpaint_full_res=False,
            steps=2)
    plan = process_images(p).plans[0]
    assert (plan.mask_cells, plan.latent_cells) == (4, 64)
    assert plan.mask_mean == pytest.approx(4 / 64)
    assert plan.crop_region is None and plan.paste_to is None and plan.blend == "a1111"


def test_plan_txt2img_hires_two_passes(sd1_tiny):
    # First pass: 4 steps from pure noise, sigma_sched = sigmas. Hires pass (§6.2 fix-steps rule, explicit steps):
    # setup_img2img_steps(4, 0.5, fix_steps=True) = (int(4 / 0.5), 4 - 1) = (8, 3) -> sigmas[8 - 3 - 1:] = sigmas[4:],
    # 5 values, 4 Euler calls.
    assert schedules.setup_img2img_steps(4, 0.5, fix_steps=True) == (8, 3)
    p = txt2img(sd1_tiny, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=4, denoising_strength=0.5)
    processed = process_images(p)
    plan = processed.plans[0]
    assert len(plan.passes) == 2
    first, second = plan.passes
    assert (first.steps, first.t_enc, first.width, first.height) == (4, None, SIZE, SIZE)
    assert torch.equal(first.sigma_sched.cpu(), first.sigmas.cpu()) and len(first.model_calls) == 4
    assert (second.steps, second.t_enc, second.width, second.height) == (8, 3, 2 * SIZE, 2 * SIZE)
    assert len(second.sigmas) == 9 and torch.equal(second.sigma_sched.cpu(), second.sigmas[4:].cpu())
    assert second.model_calls == [float(s) for s in second.sigma_sched[:-1]]
    assert plan.model_calls == 8
    # hires with default hr_second_pass_steps (0 = steps) and strength 0.75: (int(4 / 0.75), 3) = (5, 3)
    plan2 = process_images(txt2img(sd1_tiny, enable_hr=True, hr_scale=1.5, denoising_strength=0.75)).plans[0]
    assert (plan2.passes[1].steps, plan2.passes[1].t_enc) == (5, 3)
    assert (plan2.passes[1].width, plan2.passes[1].height) == (96, 96)


# ---------------------------------------------------------------------------------------------------------------
# 4. Mask blend strategies through the whole job
# ---------------------------------------------------------------------------------------------------------------

BOX = (16, 20, 40, 52)
BLEND_NAMES = ["a1111", "xt", "differential", "soft_inpainting"]
BLEND_SAMPLER = "Euler a"


@pytest.fixture(scope="module")
def blend_runs(sd1_tiny, photo):
    # An ancestral sampler: with a deterministic one (Euler, DPM++ 2M) the kept cells follow init + sigma * noise
    # under both a1111 and xt, so those two blends are equal in exact arithmetic and differ only by float rounding.
    out = {}
    for name in BLEND_NAMES:
        p = job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blur=0, inpaint_full_res=False,
                inpainting_fill=1, steps=5, mask_blend=name, sampler_name=BLEND_SAMPLER)
        out[name] = process_images(p)
    return out


@pytest.mark.parametrize("name", ["a1111", "xt", "differential"])
def test_blend_keeps_pixels_outside_a_binary_mask(blend_runs, photo, name):
    processed = blend_runs[name]
    out, src = np.asarray(processed.images[0]), np.asarray(photo)
    keep = outside(BOX)
    assert np.array_equal(out[keep], src[keep])
    assert np.abs(out[~keep].astype(int) - src[~keep]).mean() > 1.0
    assert processed.plans[0].blend == name


def test_blends_write_their_infotext(blend_runs):
    a1111 = blend_runs["a1111"].info
    assert "Mask blend" not in a1111 and "Soft inpainting" not in a1111
    assert "Mask blend: xt" in blend_runs["xt"].info
    assert "Mask blend: differential" in blend_runs["differential"].info
    soft = blend_runs["soft_inpainting"].info
    assert "Soft inpainting enabled: True" in soft and "Mask blend" not in soft
    for name in ("xt", "differential"):
        assert "Soft inpainting" not in blend_runs[name].info


def test_soft_inpainting_differs_from_a1111(blend_runs):
    soft, a1111 = blend_runs["soft_inpainting"], blend_runs["a1111"]
    assert soft.images[0].tobytes() != a1111.images[0].tobytes()
    assert soft.plans[0].blend == "soft_inpainting"
    # it keeps the grey latent mask (§15.2): not just 0/1 cells
    assert set(torch.unique(soft.nmask).tolist()) - {0.0, 1.0}


def test_xt_differs_from_a1111(blend_runs):
    xt, a1111 = (np.asarray(blend_runs[n].images[0]).astype(int) for n in ("xt", "a1111"))
    assert np.abs(xt - a1111)[~outside(BOX)].mean() > 1.0  # not float rounding: whole levels inside the mask


def test_differential_keeps_the_grey_edge_cells_of_a_binary_pixel_mask(blend_runs):
    # §16.4: the latent mask of a binary pixel mask is grey at its edges (bicubic downscale); differential uses those
    # cells as strengths (as ComfyUI does) where a1111 rounds them, so it regenerates more cells, never fewer.
    assert blend_runs["differential"].plans[0].mask_cells > blend_runs["a1111"].plans[0].mask_cells


def test_differential_rule_equals_a1111_on_a_rounded_latent_mask(sd1_tiny, photo, blend_runs):
    # Localises the failure above: the per-step rule and the final blend do reduce to A1111's when the latent mask
    # they get is binary (the same strategy, told not to keep grey masks).
    from sdcore.sampling.blends import DifferentialBlend

    @dataclasses.dataclass(frozen=True)
    class RoundedDifferential(DifferentialBlend):
        keeps_grey_mask: bool = dataclasses.field(default=False, init=False, repr=False)

    p = job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blur=0, inpaint_full_res=False,
            inpainting_fill=1, steps=5, mask_blend=RoundedDifferential(), sampler_name=BLEND_SAMPLER)
    processed = process_images(p)
    assert processed.plans[0].blend == "differential"
    assert processed.images[0].tobytes() == blend_runs["a1111"].images[0].tobytes()


def test_differential_with_whole_picture_mask_equals_a1111(sd1_tiny, photo):
    # all cells regenerate at every step in both (a mask whose latent version is binary even without rounding)
    runs = [process_images(job(sd1_tiny, photo, mask=rect_mask(photo.size, (0, 0, SIZE, SIZE)), mask_blur=0,
                               inpaint_full_res=False, steps=3, mask_blend=name)) for name in ("a1111", "differential")]
    assert runs[0].images[0].tobytes() == runs[1].images[0].tobytes()


@pytest.mark.parametrize("name", ["xt", "differential", "soft_inpainting"])
def test_non_a1111_blend_with_ddim_raises(sd1_tiny, photo, name):
    p = job(sd1_tiny, photo, sampler_name="DDIM", mask=rect_mask(photo.size, BOX), mask_blur=0,
            inpaint_full_res=False, mask_blend=name)
    with pytest.raises(NotImplementedError, match="DDIM|k-diffusion"):
        process_images(p)


def test_a1111_blend_with_ddim_runs(sd1_tiny, photo):
    p = job(sd1_tiny, photo, sampler_name="DDIM", mask=rect_mask(photo.size, BOX), mask_blur=0,
            inpaint_full_res=False, mask_blend="a1111")
    out = np.asarray(process_images(p).images[0])
    keep = outside(BOX)
    assert np.array_equal(out[keep], np.asarray(photo)[keep])


@pytest.mark.parametrize("value", ["bogus", "A1111", ""])
def test_unknown_mask_blend_name_raises(sd1_tiny, photo, value):
    p = job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blend=value)
    with pytest.raises(ValueError, match=r"mask.blend|" + (repr(value) if value else "''")):
        process_images(p)


@pytest.mark.parametrize("value", [42, None])
def test_mask_blend_of_wrong_type_raises_naming_the_field(sd1_tiny, photo, value):
    p = job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blend=value, steps=1)
    with pytest.raises((ValueError, TypeError), match="mask_blend"):
        p.validate()


def test_mask_blend_object_is_used(sd1_tiny, photo, blend_runs):
    blend = make_blend("xt")
    assert isinstance(blend, MaskBlend)
    p = job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blur=0, inpaint_full_res=False,
            inpainting_fill=1, steps=5, mask_blend=blend, sampler_name=BLEND_SAMPLER)
    processed = process_images(p)
    assert processed.images[0].tobytes() == blend_runs["xt"].images[0].tobytes()
    assert "Mask blend: xt" in processed.info


# ---------------------------------------------------------------------------------------------------------------
# 5. Beta scheduler options (§17)
# ---------------------------------------------------------------------------------------------------------------

def model_sigma_range(sd) -> tuple[float, float]:
    a = sd.alphas_cumprod.double()
    sigmas = ((1 - a) / a).sqrt()
    return float(sigmas.min()), float(sigmas.max())


def beta_by_hand(n: int, sigma_min: float, sigma_max: float, alpha: float, beta: float) -> list[float]:
    from scipy import stats

    ppf = stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return [sigma_min + q * (sigma_max - sigma_min) for q in ppf] + [0.0]


def test_beta_scheduler_writes_its_options_and_uses_them(sd1_tiny):
    default = process_images(txt2img(sd1_tiny, scheduler="beta", steps=5))
    assert "Beta schedule alpha: 0.6, Beta schedule beta: 0.6" in default.info
    assert "Schedule type: Beta" in default.info
    changed = process_images(txt2img(sd1_tiny, scheduler="beta", steps=5, opts=Options(beta_dist_alpha=0.5)))
    assert "Beta schedule alpha: 0.5, Beta schedule beta: 0.6" in changed.info
    s_default = default.plans[0].passes[0].sigmas
    s_changed = changed.plans[0].passes[0].sigmas
    assert len(s_default) == len(s_changed) == 6
    assert not torch.allclose(s_default, s_changed)
    lo, hi = model_sigma_range(sd1_tiny)
    np.testing.assert_allclose(s_default.tolist(), beta_by_hand(5, lo, hi, 0.6, 0.6), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_changed.tolist(), beta_by_hand(5, lo, hi, 0.5, 0.6), rtol=1e-5, atol=1e-6)
    assert default.images[0].tobytes() != changed.images[0].tobytes()


def test_beta_options_reach_img2img_and_beta_param(sd1_tiny, photo):
    a = process_images(job(sd1_tiny, photo, scheduler="Beta", steps=4))
    b = process_images(job(sd1_tiny, photo, scheduler="Beta", steps=4, opts=Options(beta_dist_beta=0.4)))
    assert "Beta schedule alpha: 0.6, Beta schedule beta: 0.6" in a.info
    assert "Beta schedule alpha: 0.6, Beta schedule beta: 0.4" in b.info
    assert not torch.allclose(a.plans[0].passes[0].sigmas, b.plans[0].passes[0].sigmas)
    lo, hi = model_sigma_range(sd1_tiny)
    np.testing.assert_allclose(b.plans[0].passes[0].sigmas.tolist(), beta_by_hand(4, lo, hi, 0.6, 0.4),
                               rtol=1e-5, atol=1e-6)


def test_beta_keys_written_for_the_hires_pass(sd1_tiny):
    p = txt2img(sd1_tiny, scheduler="karras", enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2,
                hr_scheduler="beta", denoising_strength=0.5, opts=Options(beta_dist_alpha=0.3))
    processed = process_images(p)
    assert "Beta schedule alpha: 0.3, Beta schedule beta: 0.6" in processed.info
    lo, hi = model_sigma_range(sd1_tiny)
    hr = processed.plans[0].passes[1]
    np.testing.assert_allclose(hr.sigmas.tolist(), beta_by_hand(hr.steps, lo, hi, 0.3, 0.6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler, scheduler", [("Euler", None), ("Euler", "karras"), ("DPM++ 2M", "Automatic"),
                                                ("Euler", "exponential"), ("DDIM", "beta")])
def test_other_schedulers_do_not_write_beta_keys(sd1_tiny, sampler, scheduler):
    info = process_images(txt2img(sd1_tiny, sampler_name=sampler, scheduler=scheduler, steps=3)).info
    assert "Beta schedule" not in info


# ---------------------------------------------------------------------------------------------------------------
# 6. The pipeline called directly
# ---------------------------------------------------------------------------------------------------------------

def test_pipeline_img2img_direct_call_equals_process_images(sd1_tiny, photo):
    euler = find_sampler("Euler")[0]
    result = pipeline.img2img(sd1_tiny, [photo], None, ["a cat"], [""], sampler=euler, scheduler=None, steps=4,
                              denoising_strength=0.5, cfg_scale=7.0, seeds=pipeline.Seeds((1,)), width=SIZE,
                              height=SIZE)
    assert isinstance(result, pipeline.Result)
    assert len(result.images) == 1 and result.images[0].size == (SIZE, SIZE) and result.images[0].mode == "RGB"
    assert result.latents.shape == (1, 4, 8, 8) and result.model is sd1_tiny
    assert result.mask is None and result.nmask is None and result.plan.blend is None
    sp = result.plan.passes[0]
    assert (sp.steps, sp.t_enc) == (4, 2) and len(sp.model_calls) == 3  # §6.2: int(0.5 * 4) = 2
    processed = process_images(job(sd1_tiny, photo, prompt="a cat", negative_prompt="", seed=1,
                                   sampler_name="Euler", steps=4, denoising_strength=0.5, cfg_scale=7.0))
    assert processed.images[0].tobytes() == result.images[0].tobytes()
    assert processed.plans[0].passes[0].model_calls == sp.model_calls
    torch.testing.assert_close(processed.init_latent, result.init_latent, rtol=0, atol=0)
    # the direct call does not change its inputs
    again = pipeline.img2img(sd1_tiny, [photo], None, ["a cat"], [""], sampler=euler, scheduler=None, steps=4,
                             denoising_strength=0.5, cfg_scale=7.0, seeds=pipeline.Seeds((1,)), width=SIZE,
                             height=SIZE)
    assert again.images[0].tobytes() == result.images[0].tobytes()


def test_pipeline_txt2img_and_hires_fix_direct_calls_equal_process_images(sd1_tiny):
    euler = find_sampler("Euler")[0]
    seeds = pipeline.Seeds((7,))
    first = pipeline.txt2img(sd1_tiny, ["a red circle"], ["blurry"], sampler=euler, scheduler=None, steps=4,
                             cfg_scale=7.0, seeds=seeds, width=SIZE, height=SIZE, decode_images=False)
    assert first.images == [] and first.latents.shape == (1, 4, 8, 8)
    second = pipeline.hires_fix(sd1_tiny, first.latents, ["a red circle"], ["blurry"], sampler=euler,
                                scheduler=None, steps=4, first_pass_steps=4, denoising_strength=0.5, cfg_scale=7.0,
                                seeds=seeds, width=2 * SIZE, height=2 * SIZE, cond_size=(SIZE, SIZE))
    assert second.images[0].size == (2 * SIZE, 2 * SIZE)
    processed = process_images(txt2img(sd1_tiny, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=4,
                                       denoising_strength=0.5))
    assert processed.images[0].tobytes() == second.images[0].tobytes()
    assert math.isclose(processed.plans[0].passes[1].model_calls[0], second.plan.passes[0].model_calls[0])
