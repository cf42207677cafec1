"""Every img2img field through the real pipeline on real photos (issue 5 item 9): masked-content modes, resize modes,
invert, alpha masks, variation seeds, colour correction, noise options. Spec sections are cited per test."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import rect_mask
from sdcore import Options, StableDiffusionProcessingImg2Img, process_images
from sdcore import images, pipeline, rng
from sdcore.sampling.samplers import find_sampler

SIZE = 64
BOX = (16, 24, 40, 48)


def job(sd, image, **kw):
    args = dict(sd_model=sd, prompt="a red circle", init_images=[image], sampler_name="Euler", steps=4,
                cfg_scale=5.0, seed=99, width=SIZE, height=SIZE, denoising_strength=0.75)
    args.update(kw)
    return StableDiffusionProcessingImg2Img(**args)


@pytest.fixture(scope="module")
def photo(astronaut):
    return astronaut.resize((SIZE, SIZE), Image.LANCZOS)


def outside(box, shape=(SIZE, SIZE)):
    keep = np.ones(shape, bool)
    keep[box[1]:box[3], box[0]:box[2]] = False
    return keep


@pytest.mark.parametrize("fill, label", [(0, "fill"), (1, None), (2, "latent noise"), (3, "latent nothing")])
def test_masked_content_modes_keep_outside_pixels(sd1_tiny, photo, fill, label):
    # a1111-semantics §2 step 5.6 and 9: infotext "Masked content"; pixels outside an unblurred mask are restored
    # exactly
    p = job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blur=0, inpainting_fill=fill,
            inpaint_full_res=False)
    processed = process_images(p)
    out = np.asarray(processed.images[0])
    assert np.array_equal(out[outside(BOX)], np.asarray(photo)[outside(BOX)])
    if label:
        assert f"Masked content: {label}" in processed.info
    else:
        assert "Masked content" not in processed.info


def test_latent_nothing_and_latent_noise_init_latents(sd1_tiny, photo):
    # a1111-semantics §2 step 9: fill 3 zeroes the regenerated latent cells; fill 2 puts unit noise from the first
    # batch's
    # seeds there (create_random_tensors), leaving kept cells as encoded. Both encode the filled image (a1111-semantics
    # §2
    # step 5.6 applies masking.fill for every mode but 1), so their kept cells agree with each other.
    base = process_images(job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blur=0, inpainting_fill=1,
                              inpaint_full_res=False))
    nothing = process_images(job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blur=0, inpainting_fill=3,
                                 inpaint_full_res=False))
    noise = process_images(job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blur=0, inpainting_fill=2,
                               inpaint_full_res=False))
    keep, regen = base.mask.bool(), base.nmask.bool()
    assert torch.equal(nothing.init_latent[regen], torch.zeros(int(regen.sum())))
    assert not torch.equal(nothing.init_latent[keep], base.init_latent[keep])
    expected = rng.ImageRNG((4, 8, 8), [99]).next()
    assert torch.allclose(noise.init_latent[regen], expected[regen], atol=1e-6)
    assert torch.equal(noise.init_latent[keep], nothing.init_latent[keep])


def test_fill_mode_replaces_masked_pixels_before_encoding(sd1_tiny, photo):
    # a1111-semantics §4: the image given to the VAE has the masked area filled from blurred surroundings, kept pixels
    # exact
    filled = images.fill(photo, rect_mask(photo.size, BOX))
    src = np.asarray(photo)
    assert np.array_equal(np.asarray(filled)[outside(BOX)], src[outside(BOX)])
    assert np.abs(np.asarray(filled)[~outside(BOX)].astype(int) - src[~outside(BOX)]).mean() > 5


def test_invert_regenerates_the_other_side(sd1_tiny, photo):
    p = job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blur=0, inpaint_full_res=False,
            inpainting_mask_invert=1)
    processed = process_images(p)
    out, src = np.asarray(processed.images[0]), np.asarray(photo)
    inside = ~outside(BOX)
    assert np.array_equal(out[inside], src[inside])
    assert "Mask mode: Inpaint not masked" in processed.info
    assert processed.nmask[0, 0, 0, 0] == 1 and processed.nmask[0, 0, 4, 3] == 0


def test_alpha_mask_uses_the_alpha_channel(sd1_tiny, photo):
    # a1111-semantics §2 step 2.1: RGBA with a non-opaque alpha -> the alpha is the mask (rounded: >128 -> 255)
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 3] = 0
    rgba[BOX[1]:BOX[3], BOX[0]:BOX[2], 3] = 200
    alpha = process_images(job(sd1_tiny, photo, mask=Image.fromarray(rgba, "RGBA"), mask_blur=0,
                               inpaint_full_res=False))
    plain = process_images(job(sd1_tiny, photo, mask=rect_mask(photo.size, BOX), mask_blur=0,
                               inpaint_full_res=False))
    assert torch.equal(alpha.nmask, plain.nmask)
    assert np.array_equal(np.asarray(alpha.images[0]), np.asarray(plain.images[0]))


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_resize_modes(sd1_tiny, coffee, mode):
    # a1111-semantics §3.1 geometry; mode 3 encodes at the source size and resizes the latent bilinearly
    # (a1111-semantics §2 step 8)
    p = job(sd1_tiny, coffee.resize((96, 64)), resize_mode=mode, width=64, height=64)
    processed = process_images(p)
    assert processed.images[0].size == (64, 64)
    assert processed.init_latent.shape == (1, 4, 8, 8)
    if mode == 3:
        direct = pipeline.encode(sd1_tiny, 2 * torch.from_numpy(np.asarray(coffee.resize((96, 64)), np.float32) / 255)
                                 .permute(2, 0, 1)[None] - 1, [99])
        assert torch.allclose(processed.init_latent, F.interpolate(direct, size=(8, 8), mode="bilinear"), atol=1e-5)


def test_variation_seed(sd1_tiny, photo):
    # a1111-semantics §8.1/8.2: with a subseed strength all seeds equal `seed`; strength 0 ignores the subseed
    plain = process_images(job(sd1_tiny, photo))
    zero = process_images(job(sd1_tiny, photo, subseed=5, subseed_strength=0.0))
    varied = process_images(job(sd1_tiny, photo, subseed=5, subseed_strength=0.5, batch_size=2))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(zero.images[0]))
    assert varied.seeds == [99, 99] and varied.subseeds == [5, 6]
    assert "Variation seed: 5, Variation seed strength: 0.5" in varied.infotexts[0]
    a, b = (np.asarray(im, np.int16) for im in varied.images)
    assert np.abs(a - b).mean() > 0.5 and np.abs(a - np.asarray(plain.images[0], np.int16)).mean() > 0.5


def test_random_seed_is_resolved_and_recorded(sd1_tiny, photo):
    processed = process_images(job(sd1_tiny, photo, seed=-1))
    assert processed.seed >= 0 and f"Seed: {processed.seed}," in processed.info


def test_noise_options_are_recorded(sd1_tiny, photo):
    processed = process_images(job(sd1_tiny, photo, initial_noise_multiplier=0.9,
                                   opts=Options(img2img_extra_noise=0.1)))
    assert "Noise multiplier: 0.9" in processed.info and "Extra noise: 0.1" in processed.info


def test_colour_correction_pulls_colours_towards_the_init_image(sd1_tiny, photo):
    # a1111-semantics §9.2: LAB histogram matching to the init image, luminosity of the generation kept
    kw = dict(denoising_strength=1.0)
    raw = np.asarray(process_images(job(sd1_tiny, photo, **kw)).images[0], np.float64)
    corrected = np.asarray(process_images(job(sd1_tiny, photo, opts=Options(img2img_color_correction=True),
                                              **kw)).images[0], np.float64)
    target = np.asarray(photo, np.float64)

    def hist_distance(a):
        return sum(np.abs(np.sort(a[..., c].ravel()) - np.sort(target[..., c].ravel())).mean() for c in range(3))

    assert hist_distance(corrected) < hist_distance(raw)


def test_blank_mask_with_only_masked_falls_back_to_img2img(sd1_tiny, photo):
    # a1111-semantics §2 step 2.4: a blank mask drops the mask and adds A1111's comment
    processed = process_images(job(sd1_tiny, photo, mask=Image.new("L", photo.size, 0), inpaint_full_res=True))
    assert processed.mask is None and processed.overlay_images == []
    assert any("mask is blank" in c for c in processed.comments.values())


def test_image_cfg_scale_dropped_for_non_edit_models(sd1_tiny, photo):
    p = job(sd1_tiny, photo, image_cfg_scale=1.5)
    processed = process_images(p)
    assert p.image_cfg_scale == 1.5  # the job is not changed; the run drops it
    assert "Image CFG scale" not in processed.info


def test_eta_noise_seed_delta_changes_only_per_step_noise(sd1_tiny, photo):
    # a1111-semantics §8.2: after the initial noise the generators are reseeded with seed + ENSD; ENSD is written to the
    # infotext only for samplers flagged uses_ensd (Euler a), and deterministic samplers are unaffected.
    ensd = Options(eta_noise_seed_delta=31337)
    a = process_images(job(sd1_tiny, photo, sampler_name="Euler a"))
    b = process_images(job(sd1_tiny, photo, sampler_name="Euler a", opts=ensd))
    assert np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16)).mean() > 0.5
    assert "ENSD: 31337" in b.info
    c = process_images(job(sd1_tiny, photo, sampler_name="DPM++ 2M"))
    d = process_images(job(sd1_tiny, photo, sampler_name="DPM++ 2M", opts=ensd))
    assert np.array_equal(np.asarray(c.images[0]), np.asarray(d.images[0])) and "ENSD" not in d.info


def test_nv_rng_source(sd1_tiny, photo):
    # a1111-semantics §8.3: "NV" draws the initial noise from Philox; recorded as "RNG: NV"
    cpu = process_images(job(sd1_tiny, photo))
    nv = process_images(job(sd1_tiny, photo, opts=Options(randn_source="NV")))
    assert "RNG: NV" in nv.info and "RNG: CPU" in cpu.info
    assert np.abs(np.asarray(cpu.images[0], np.int16) - np.asarray(nv.images[0], np.int16)).mean() > 0.5


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE", "DDIM"])
def test_batch_image_equals_same_seed_alone(sd1_tiny, photo, sampler):
    # issue 4: per-image noise -> image i of a batch of 4 is the same seed run alone (up to float32 batching)
    kw = dict(sampler_name=sampler, eta=1.0 if sampler == "DDIM" else None)
    batch = process_images(job(sd1_tiny, photo, seed=500, batch_size=4, **kw))
    alone = process_images(job(sd1_tiny, photo, seed=502, **kw))
    diff = np.abs(np.asarray(batch.images[2], np.int16) - np.asarray(alone.images[0], np.int16))
    assert diff.max() <= 1


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "Heun"])
def test_n_iter_image_is_the_same_seed_alone_byte_for_byte(sd1_tiny, photo, sampler):
    # a1111-semantics §2.7: each batch encodes with its own seeds' VAE streams, so image i of n_iter 3 is exactly the
    # seed 500 + i run alone (before, the encode of the first batch was reused and differed by 1 level on pixels)
    mask = rect_mask(photo.size, (16, 16, 48, 48))
    kw = dict(sampler_name=sampler, mask=mask, inpainting_fill=1, inpaint_full_res=False, steps=6)
    many = process_images(job(sd1_tiny, photo, seed=500, n_iter=3, **kw))
    for i in (1, 2):
        alone = process_images(job(sd1_tiny, photo, seed=500 + i, **kw))
        assert many.images[i].tobytes() == alone.images[0].tobytes()
        assert torch.equal(many.plans[i].passes[0].sigma_sched, alone.plans[0].passes[0].sigma_sched)


def test_seed_resize_from(sd1_tiny, photo):
    # a1111-semantics §8.2: noise drawn at 32x32 px (4x4 latent cells) for the seed, centre-pasted into the 8x8 draw
    plain = process_images(job(sd1_tiny, photo))
    resized = process_images(job(sd1_tiny, photo, seed_resize_from_w=32, seed_resize_from_h=32))
    assert "Seed resize from: 32x32" in resized.info
    assert np.abs(np.asarray(plain.images[0], np.int16) - np.asarray(resized.images[0], np.int16)).mean() > 0.5


def test_eta_and_churn_options_follow_a1111(sd1_tiny, photo):
    # a1111-semantics §6.5: "Eta" in the infotext when != 1 (k-diffusion); an option s_churn that differs from the
    # default 0
    # overrides p.s_churn and is written as "Sigma churn"; "Eta DDIM" when != 0.
    p = job(sd1_tiny, photo, sampler_name="Euler a", eta=0.5)
    assert "Eta: 0.5" in process_images(p).info
    p = job(sd1_tiny, photo, sampler_name="Euler", s_churn=0.3, opts=Options(s_churn=0.7))
    info = process_images(p).info
    assert "Sigma churn: 0.7" in info
    options, params = p.sampler_options(sd1_tiny, find_sampler("Euler")[0], None, img2img=True)
    assert options.sampler_kwargs["s_churn"] == 0.7 and params["Sigma churn"] == 0.7
    p = job(sd1_tiny, photo, sampler_name="DDIM", eta=0.3)
    assert "Eta DDIM: 0.3" in process_images(p).info


def test_schedule_option_infotext(sd1_tiny, photo):
    # a1111-semantics §10.2 / 9.3: option overrides that change the numbers are recorded
    opts = Options(sigma_min=0.05, sigma_max=10.0, rho=5.0, always_discard_next_to_last_sigma=True,
                   emphasis="No norm", use_old_scheduling=True, s_min_uncond=1.0)
    info = process_images(job(sd1_tiny, photo, prompt="(a:1.2) cat", sampler_name="DPM++ 2M", opts=opts)).info
    for key in ("Schedule min sigma: 0.05", "Schedule max sigma: 10.0", "Schedule rho: 5.0",
                "Discard penultimate sigma: True", "Emphasis: No norm", "Old prompt editing timelines: True",
                "NGMS: 1.0"):
        assert key in info, key
