"""Stable Diffusion img2img, inpainting and txt2img as one page of plain calls.

`img2img` reads top to bottom as the data flow (docs/ARCHITECTURE.md):

    init images, mask -> images.prepare_inputs  resize / crop ("Only masked") / fill / overlays
                      -> encode                 init_latent = scale_factor * VAE posterior sample   [B,C,h,w]
                      -> latent_masks           nmask (1 = regenerate), mask = 1 - nmask            [1,C,h,w]
                      -> fill_latent            "latent noise" / "latent nothing"
                      -> image_conditioning     9-channel inpainting: mask + masked-image latent
                      -> encode_conds           prompts -> cond / uncond per model call
                      -> setup_img2img_steps    t_enc from denoising_strength
                      -> get_sigmas, slice      sigma_sched = sigmas[steps - t_enc - 1:]
                      -> seeds.rng              noise; x = init_latent + noise * sigma_sched[0]
                      -> guided_denoiser        blend.blend_input -> CFG -> blend.blend (the per-step mask blend)
                      -> run_sampler            the k-diffusion (or DDIM/PLMS/UniPC) loop
                      -> blend.final            samples * nmask + init_latent * mask
                      -> decode, finish_images  VAE decode, colour correction, overlay of the kept pixels

Every argument is explicit; nothing here keeps state between calls, changes its inputs or changes the model, so the
same call twice gives the same bytes. A1111's job object (`processing.py`) maps its fields onto these arguments and
builds the infotext from the returned `Plan`. Facts are cited as "a1111-semantics §N" (docs/a1111-semantics.md).

Glossary: B images in the batch, C latent channels, H x W pixels, h x w = H/8 x W/8 latent cells; sigma = noise
standard deviation of k-diffusion's x = x0 + sigma * eps; t = DDPM timestep in [0, 999].
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import images, resources, rng
from .checkpoint import StableDiffusionModel
from .embeddings import Embedding, as_lookup
from .models import vae_tiling as tiling
from .plan import Plan, SamplingPass
from .prompts import (get_learned_conditioning, get_multicond_learned_conditioning, reconstruct_cond_batch,
                      reconstruct_multicond_batch)
from .sampling import schedules
from .sampling.blends import A1111Blend, BlendContext, MaskBlend
from .sampling.denoisers import CFGDenoiser, CompVisDenoiser, LCMCompVisDenoiser, with_call_index
from .sampling.samplers import BrownianTreeNoiseSampler, SamplerInfo
from .sampling.timesteps import TIMESTEP_SAMPLERS, CompVisTimestepsDenoiser, get_timesteps, img2img_start

Tensor = torch.Tensor

LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
PIXEL_UPSCALERS = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


# -- arguments -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seeds:
    """The seeds of one batch (a1111-semantics §8): one `seeds` / `subseeds` entry per image; variation
    `subseed_strength` in [0, 1]; `seed_resize_from_h/w` in pixels (<= 0 = off); `source` "CPU", "GPU" (the
    model's device) or "NV" (Philox); `eta_noise_seed_delta` offsets the per-step noise generators."""

    seeds: tuple[int, ...]
    subseeds: tuple[int, ...] = ()
    subseed_strength: float = 0.0
    seed_resize_from_h: int = 0
    seed_resize_from_w: int = 0
    source: str = "CPU"
    eta_noise_seed_delta: int = 0

    def rng(self, shape: Sequence[int], device: torch.device,
            on_draw: Callable[[str, Tensor], None] | None = None) -> rng.ImageRNG:
        """The batch's noise source for latents of one image's `shape` (C, h, w) (a1111-semantics §8.2); `on_draw`
        is told the draws of the initial noise (`rng.ImageRNG`, for noise fingerprints)."""
        return rng.ImageRNG(shape, list(self.seeds), subseeds=list(self.subseeds), source=self.source, device=device,
                            subseed_strength=self.subseed_strength, seed_resize_from_h=self.seed_resize_from_h,
                            seed_resize_from_w=self.seed_resize_from_w,
                            eta_noise_seed_delta=self.eta_noise_seed_delta, on_draw=on_draw)


@dataclass(frozen=True)
class SamplerOptions:
    """The sampler's numeric options, already resolved (a1111-semantics §6.5, §10.2).

    `sampler_kwargs`: keyword options of the sampler function (eta, s_churn, s_tmin, s_tmax, s_noise, only those in
    `SamplerInfo.extra_params`); `s_min_uncond`: NGMS sigma threshold (0 = off); `sigma_min`/`sigma_max`/`rho`:
    schedule overrides (None = the model's / the scheduler's); `discard_next_to_last_sigma`; `beta_alpha`/`beta_beta`:
    the Beta scheduler's parameters; `initial_noise_multiplier` scales the initial noise; `extra_noise` adds
    unscaled noise to img2img's start; `fix_steps`: A1111's img2img_fix_steps (run exactly `steps` steps).
    """

    sampler_kwargs: dict[str, float] = field(default_factory=dict)
    s_min_uncond: float = 0.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float | None = None
    discard_next_to_last_sigma: bool = False
    beta_alpha: float = 0.6
    beta_beta: float = 0.6
    initial_noise_multiplier: float = 1.0
    extra_noise: float = 0.0
    fix_steps: bool = False


@dataclass(frozen=True)
class TextOptions:
    """Prompt encoding (a1111-semantics §11): CLIP skip (1 = last layer), emphasis mode, old editing timelines, and
    the textual-inversion embeddings the prompts may name (a1111-semantics §20, `sdcore.embeddings`; None = none)."""

    clip_skip: int = 1
    emphasis: str = "Original"
    use_old_scheduling: bool = False
    embeddings: Mapping[str, Embedding] | None = None


@dataclass(frozen=True)
class MaskOptions:
    """How the mask is read (a1111-semantics §1-4): blur sigma in pixels, rounding, `inpainting_fill` 0 fill /
    1 original / 2 latent noise / 3 latent nothing, "Only masked" (`inpaint_full_res`) with padding in pixels,
    inversion, the 9-channel models' `inpainting_mask_weight`, whether the kept pixels are pasted back
    (`overlay`), and an optional separate `latent_mask` image for the latent blend and the fill."""

    mask_blur_x: float = 4
    mask_blur_y: float = 4
    mask_round: bool = True
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    inpainting_mask_weight: float = 1.0
    overlay: bool = True
    latent_mask: Image.Image | None = None


@dataclass(frozen=True)
class Refiner:
    """A second model that takes over once the completed ratio `(999 - t) / 1000` reaches `switch_at` in (0, 1)
    (A1111 v1.10 `apply_refiner`; t = the timestep nearest to the call's largest sigma)."""

    model: StableDiffusionModel
    switch_at: float


@dataclass
class Result:
    """What a pipeline call returns: PIL RGB `images` (B), the sampled `latents` [B,C,h,w] before decoding, the
    `plan` of what ran, and the intermediate state a reader may inspect: `init_latent` [B,C,h,w], `mask`/`nmask`
    [1,C,h,w] (keep / regenerate), `image_conditioning` [B,Cc,h,w], `overlay_images`, `mask_for_overlay`, and
    `model`, the model in use at the end (the refiner after a switch)."""

    images: list[Image.Image]
    latents: Tensor
    plan: Plan
    model: StableDiffusionModel
    init_latent: Tensor | None = None
    mask: Tensor | None = None
    nmask: Tensor | None = None
    image_conditioning: Tensor | None = None
    overlay_images: list[Image.Image] | None = None
    mask_for_overlay: Image.Image | None = None


@dataclass(frozen=True)
class Conds:
    """Prompt-scheduled conditioning for one batch: `cond(step)` / `uncond(step)` give the CFGDenoiser dicts
    ({"c_crossattn": [N,T,C], optional "y"}) for model call `step`; `conds_list[i]` the (row, weight) AND-parts of
    image i (a1111-semantics §11.1, §11.3)."""

    cond: Callable[[int], dict[str, Tensor]]
    uncond: Callable[[int], dict[str, Tensor]]
    conds_list: list[list[tuple[int, float]]]


# -- the three entry points -----------------------------------------------------------------------------------------

def img2img(model: StableDiffusionModel, init_images: list[Image.Image], mask: Image.Image | None,
            prompts: list[str], negative_prompts: list[str], *, sampler: SamplerInfo, scheduler: str | None,
            steps: int, denoising_strength: float, cfg_scale: float, seeds: Seeds, width: int, height: int,
            blend: MaskBlend = A1111Blend(), resize_mode: int = 0, masking: MaskOptions = MaskOptions(),
            options: SamplerOptions = SamplerOptions(), text: TextOptions = TextOptions(),
            image_cfg_scale: float | None = None, background_color: str = "#ffffff", color_correction: bool = False,
            vae_sample: bool = True, fill_seeds: Sequence[int] | None = None, refiner: Refiner | None = None,
            callback: Callable | None = None, model_callback: Callable | None = None,
            disable_progress: bool | None = None, vae_tiling: bool | None = None) -> Result:
    """img2img and inpainting of one batch (a1111-semantics §2, §6, §9). Returns `Result`.

    `init_images`: PIL images (one, repeated to the batch, or one per image); `mask`: PIL, white = regenerate, or
    None; `prompts`/`negative_prompts`: one per image; `seeds`: the batch's seeds (B = len(seeds.seeds));
    `width`/`height`: processing size in pixels (multiples of 8); `denoising_strength` in [0, 1]: the share of the
    schedule that runs; `fill_seeds`: seeds of the "latent noise" fill (A1111 draws it once per job from the job's
    first seeds; default `seeds.seeds`). The VAE posterior sample of image i draws from the stream of its own seed
    (`seeds.seeds[i]`), so image i of a later batch equals the same seed run alone (sdcore deviates: A1111 samples
    the posterior once per job from the unseeded global RNG). `vae_tiling`: encode and decode in tiles
    (`models/vae_tiling.py`, equal to the untiled VAE up to float rounding) when True, never when False, and when
    None only if the untiled VAE would not fit in the memory available (`resources.vae_tiling_choice`; the Plan
    says which and why). Raises ValueError / NotImplementedError for values the steps below refuse.
    """
    device, mask_round = model.device, masking.mask_round and not blend.keeps_grey_mask
    tiled, tiled_why = vae_tiling_for(model, width, height, vae_tiling)
    on_noise = noise_reporter(model_callback)
    prep = images.prepare_inputs(
        init_images, mask, width=width, height=height, batch_size=len(seeds.seeds), resize_mode=resize_mode,
        mask_blur_x=masking.mask_blur_x, mask_blur_y=masking.mask_blur_y, mask_round=mask_round,
        invert=masking.inpainting_mask_invert, full_res=masking.inpaint_full_res,
        padding=masking.inpaint_full_res_padding, inpainting_fill=masking.inpainting_fill,
        latent_mask=masking.latent_mask, background_color=background_color, color_correction=color_correction)
    batch_seeds, fill_seeds = list(seeds.seeds), list(fill_seeds or seeds.seeds)
    source = (2.0 * torch.from_numpy(prep.pixels).permute(0, 3, 1, 2) - 1.0).to(device)  # [B,3,H,W] in [-1, 1]
    init_latent = encode(model, source, batch_seeds, sample=vae_sample, rng_source=seeds.source, on_noise=on_noise,
                         tiled=tiled)
    if resize_mode == 3:
        init_latent = F.interpolate(init_latent, size=(height // 8, width // 8), mode="bilinear")
    keep, nmask = latent_masks(prep.latent_mask if prep.mask is not None else None, init_latent, mask_round)
    init_latent = fill_latent(init_latent, keep, nmask, masking.inpainting_fill, fill_seeds, seeds.source,
                              on_noise=on_noise)
    image_cond = image_conditioning(model, source, init_latent, prep.mask, batch_seeds, mask_round=mask_round,
                                    mask_weight=masking.inpainting_mask_weight, vae_sample=vae_sample,
                                    rng_source=seeds.source, on_noise=on_noise, tiled=tiled)
    conds = encode_conds(model, prompts, negative_prompts, sampler.total_steps(steps), text, width, height)
    later_conds = refiner_conds(refiner, prompts, negative_prompts, sampler, steps, text, width, height)
    steps, t_enc = schedules.setup_img2img_steps(steps, denoising_strength, options.fix_steps)
    noise_rng = seeds.rng(init_latent.shape[1:], device, on_draw=on_noise)
    noise = noise_rng.next().float() * options.initial_noise_multiplier
    record = SamplingPass(sampler.name, None, steps, t_enc, None, None, None, width, height)
    x = noised_init(model, sampler, scheduler, init_latent, noise, options, record)
    schedule = inner_denoiser(model, sampler)
    ctx = None if nmask is None else BlendContext(init_latent, keep, nmask, noise, blend_sigmas(record, schedule),
                                                  schedule.sigma_to_t)
    samples = sample(model, sampler, x, record, conds, cfg_scale=cfg_scale, image_cond=image_cond, blend=blend,
                     ctx=ctx, noise_rng=noise_rng, seeds=seeds, options=options, image_cfg_scale=image_cfg_scale,
                     refiner=refiner, refiner_conds=later_conds, callback=callback, model_callback=model_callback,
                     disable_progress=disable_progress)
    if ctx is not None:
        samples = blend.final(samples, ctx)
    final_model = model_in_use(model, refiner, record)
    overlays = prep.overlay_images if masking.overlay else None
    if overlays is not None and ctx is not None:
        overlays = blend.overlays(overlays, prep.originals, samples, ctx, width, height, prep.paste_to)
    pictures = finish_images(decode(final_model, samples.to(device), tiled=tiled), prep.color_corrections, overlays,
                             prep.paste_to)
    plan = Plan([record], list(seeds.seeds), list(seeds.subseeds), crop_region=prep.crop_region,
                paste_to=prep.paste_to, blank_mask=prep.blank_mask, blend=blend.name if ctx is not None else None,
                vae_tiling=tiled, vae_tiling_reason=tiled_why, **mask_coverage(nmask))
    return Result(pictures, samples, plan, final_model, init_latent=init_latent, mask=keep, nmask=nmask,
                  image_conditioning=image_cond, overlay_images=prep.overlay_images,
                  mask_for_overlay=prep.mask_for_overlay)


def txt2img(model: StableDiffusionModel, prompts: list[str], negative_prompts: list[str], *, sampler: SamplerInfo,
            scheduler: str | None, steps: int, cfg_scale: float, seeds: Seeds, width: int, height: int,
            options: SamplerOptions = SamplerOptions(), text: TextOptions = TextOptions(),
            vae_sample: bool = True, inpainting_mask_weight: float = 1.0, refiner: Refiner | None = None,
            decode_images: bool = True, callback: Callable | None = None,
            model_callback: Callable | None = None, disable_progress: bool | None = None,
            vae_tiling: bool | None = None) -> Result:
    """txt2img of one batch from pure noise at the schedule's first sigma (a1111-semantics §6.3, last paragraph).

    Same arguments as `img2img` without images, masks or strength; `decode_images` False skips the VAE decode
    (the hires fix continues from `Result.latents`). Returns `Result` (images empty when not decoded).
    """
    device = model.device
    tiled, tiled_why = vae_tiling_for(model, width, height, vae_tiling)
    shape = (model.family.unet.out_channels, height // 8, width // 8)
    conds = encode_conds(model, prompts, negative_prompts, sampler.total_steps(steps), text, width, height)
    later_conds = refiner_conds(refiner, prompts, negative_prompts, sampler, steps, text, width, height)
    on_noise = noise_reporter(model_callback)
    noise_rng = seeds.rng(shape, device, on_draw=on_noise)
    noise = noise_rng.next().float()
    image_cond = txt2img_image_conditioning(model, noise, list(seeds.seeds), mask_weight=inpainting_mask_weight,
                                            vae_sample=vae_sample, rng_source=seeds.source, on_noise=on_noise,
                                            tiled=tiled)
    record = SamplingPass(sampler.name, None, steps, None, None, None, None, width, height)
    if sampler.kind == "timestep":
        x, record.timesteps = noise, get_timesteps(steps, sampler.discard_next_to_last_sigma, device=device)
    else:
        record.scheduler, record.sigmas = sigma_schedule(model, sampler, scheduler, steps, options)
        record.sigma_sched = record.sigmas.to(device)
        x = noise * record.sigma_sched[0]
    samples = sample(model, sampler, x, record, conds, cfg_scale=cfg_scale, image_cond=image_cond, blend=None,
                     ctx=None, noise_rng=noise_rng, seeds=seeds, options=options, refiner=refiner,
                     refiner_conds=later_conds, callback=callback, model_callback=model_callback, disable_progress=disable_progress)
    final_model = model_in_use(model, refiner, record)
    pictures = decode(final_model, samples.to(device), tiled=tiled) if decode_images else []
    plan = Plan([record], list(seeds.seeds), list(seeds.subseeds), vae_tiling=tiled, vae_tiling_reason=tiled_why)
    return Result(pictures, samples, plan, final_model, image_conditioning=image_cond)


def hires_fix(model: StableDiffusionModel, latents: Tensor, prompts: list[str], negative_prompts: list[str], *,
              sampler: SamplerInfo, scheduler: str | None, steps: int, first_pass_steps: int,
              denoising_strength: float, cfg_scale: float, seeds: Seeds, width: int, height: int,
              cond_size: tuple[int, int],
              upscaler: str = "Latent", options: SamplerOptions = SamplerOptions(), text: TextOptions = TextOptions(),
              vae_sample: bool = True, inpainting_mask_weight: float = 1.0, refiner: Refiner | None = None,
              callback: Callable | None = None,
              model_callback: Callable | None = None, disable_progress: bool | None = None,
              vae_tiling: bool | None = None) -> Result:
    """The hires fix's second pass (A1111 `sample_hr_pass`): upscale txt2img `latents` [B,C,h,w] to `width` x
    `height` pixels in latent space (`LATENT_UPSCALERS`) or in pixels (decode, PIL resize, encode), then img2img
    them with `steps` as an explicit step count (a1111-semantics §6.2: the fix-steps rule). `first_pass_steps`
    is the step count prompt-editing schedules are laid out on (A1111 `calculate_hr_conds`); `cond_size` the
    (width, height) in pixels the SDXL size conditioning reports (the first pass's size, as the job's width and
    height stay those of the first pass). `vae_tiling` as `img2img`'s, decided at the hires size (the pixel
    upscalers decode the first pass's latents with that choice too). Returns `Result`.
    """
    device, batch_seeds, on_noise = model.device, list(seeds.seeds), noise_reporter(model_callback)
    tiled, tiled_why = vae_tiling_for(model, width, height, vae_tiling)
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        init_latent = F.interpolate(latents, size=(height // 8, width // 8), mode=mode, antialias=antialias)
        source = None
    else:
        resized = [im.resize((width, height), PIXEL_UPSCALERS[upscaler]) for im in decode(model, latents,
                                                                                            tiled=tiled)]
        source = pixels_to_source(resized, device)
        init_latent = encode(model, source, batch_seeds, sample=vae_sample, rng_source=seeds.source, on_noise=on_noise,
                             tiled=tiled)
    image_cond = None
    if model.family.conditioning == "hybrid":
        source = pixels_to_source(decode(model, init_latent, tiled=tiled), device) if source is None else source
        image_cond = image_conditioning(model, source, init_latent, None, batch_seeds, mask_round=True,
                                        mask_weight=inpainting_mask_weight, vae_sample=vae_sample,
                                        rng_source=seeds.source, on_noise=on_noise, tiled=tiled)
    noise_rng = seeds.rng(tuple(init_latent.shape[1:]), device, on_draw=on_noise)
    noise = noise_rng.next().float()
    conds = encode_conds(model, prompts, negative_prompts, sampler.total_steps(first_pass_steps), text, *cond_size,
                         hires_steps=sampler.total_steps(steps))
    later_conds = refiner_conds(refiner, prompts, negative_prompts, sampler, first_pass_steps, text, *cond_size,
                                hires_steps=sampler.total_steps(steps))
    steps, t_enc = schedules.setup_img2img_steps(steps, denoising_strength, fix_steps=True)
    record = SamplingPass(sampler.name, None, steps, t_enc, None, None, None, width, height)
    x = noised_init(model, sampler, scheduler, init_latent, noise, options, record)
    samples = sample(model, sampler, x, record, conds, cfg_scale=cfg_scale, image_cond=image_cond, blend=None,
                     ctx=None, noise_rng=noise_rng, seeds=seeds, options=options, refiner=refiner,
                     refiner_conds=later_conds, callback=callback, model_callback=model_callback, disable_progress=disable_progress)
    final_model = model_in_use(model, refiner, record)
    plan = Plan([record], batch_seeds, list(seeds.subseeds), vae_tiling=tiled, vae_tiling_reason=tiled_why)
    return Result(decode(final_model, samples.to(device), tiled=tiled), samples, plan, final_model,
                  init_latent=init_latent, image_conditioning=image_cond)


# -- the arrows ------------------------------------------------------------------------------------------------------

def encode(model: StableDiffusionModel, source: Tensor, seeds: Sequence[int], *, sample: bool = True,
           rng_source: str = "CPU", on_noise: Callable[..., None] | None = None, tiled: bool = False) -> Tensor:
    """Scaled latents float32 [B,C,h,w] of pixels `source` [B,3,H,W] in [-1, 1] (LDM `get_first_stage_encoding`,
    a1111-semantics §2.7): one image at a time (as A1111 does for batches), `scale_factor * (mean + std * eps)`
    with eps from image i's own VAE stream (`rng.vae_sample_noise(seeds[i % len(seeds)])`), or the posterior mean
    when `sample` is False. `on_noise("vae_sample", eps)` is told each eps (`noise_reporter`). `tiled`: through
    `models/vae_tiling.py` (the same posterior up to float rounding, in less memory)."""
    out = []
    for i, px in enumerate(source):
        dist = tiling.encode(model.vae, px[None].to(model.device, model.vae_dtype), tiled)
        if sample:
            eps = rng.vae_sample_noise([seeds[i % len(seeds)]], dist.mean.shape[1:], source=rng_source,
                                       device=model.device)
            if on_noise is not None:
                on_noise("vae_sample", eps)
            z = dist.sample_from(eps)
        else:
            z = dist.mode()
        out.append(z * model.family.vae.scale_factor)
    return torch.cat(out).float()


def decode(model: StableDiffusionModel, latents: Tensor, tiled: bool = False) -> list[Image.Image]:
    """PIL RGB images of scaled latents [B,C,h,w] (a1111-semantics §7.2): one at a time, divided by scale_factor,
    `(x + 1) / 2` clamped to [0, 1], times 255, truncated to uint8; `tiled`: through `models/vae_tiling.py`.

    Raises FloatingPointError if a latent is not finite (NaN or inf: made upstream, the message says so) or the
    VAE's output is not (the hint depends on the VAE's dtype: float32 for a float16/bfloat16 VAE; otherwise the
    latent is out of range or the weights are bad, reported with the largest |latent|)."""
    result = []
    vae_dtype = str(model.vae_dtype).removeprefix("torch.")
    for i, z in enumerate(latents):
        if not bool(torch.isfinite(z).all()):
            raise FloatingPointError(f"VAE decode: the latent of image {i} is already non-finite (NaN or inf) before "
                                     "decoding; it was produced upstream (sampling or upscaling), not by the VAE")
        x = tiling.decode(model.vae, (z[None] / model.family.vae.scale_factor).to(model.device, model.vae_dtype),
                          tiled).float()
        if not bool(torch.isfinite(x).all()):
            largest = float(z.abs().max())
            hint = ("run the VAE in float32 (load_checkpoint(..., vae_dtype=torch.float32); the command line "
                    "always does)" if model.vae_dtype in (torch.float16, torch.bfloat16) else
                    f"the latent is finite but far out of the VAE's range (largest |latent| {largest:.3g}; sampled "
                    "latents normally stay within about 10, such values come from e.g. an extreme cfg_scale), or the "
                    "VAE weights hold non-finite values")
            raise FloatingPointError(f"VAE decode of image {i} produced non-finite values (NaN or inf) in "
                                     f"{vae_dtype}; {hint}")
        x = torch.clamp((x[0] + 1) / 2, 0, 1)
        result.append(Image.fromarray((255.0 * x.permute(1, 2, 0).cpu().numpy()).astype(np.uint8)))
    return result


def pixels_to_source(pictures: list[Image.Image], device: torch.device) -> Tensor:
    """[B,3,H,W] float32 in [-1, 1] of RGB PIL images (the VAE's input range)."""
    px = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255.0 for im in pictures]))
    return (2.0 * px.permute(0, 3, 1, 2) - 1.0).to(device)


def latent_masks(mask: Image.Image | None, init_latent: Tensor, mask_round: bool) -> tuple[Tensor | None, ...]:
    """(mask, nmask) [1,C,h,w] float32 of the processing mask (a1111-semantics §2.9): nmask = the regenerate weight
    per latent cell (`images.latent_mask`, rounded unless the blend keeps grey masks), mask = 1 - nmask (keep).
    (None, None) without a mask."""
    if mask is None:
        return None, None
    h, w = init_latent.shape[2:]
    nmask = images.latent_mask(mask, w, h, round=mask_round).to(init_latent.device)
    nmask = nmask.expand(1, init_latent.shape[1], h, w).float()
    return 1.0 - nmask, nmask


def fill_latent(init_latent: Tensor, mask: Tensor | None, nmask: Tensor | None, inpainting_fill: int,
                seeds: Sequence[int], rng_source: str, on_noise: Callable[..., None] | None = None) -> Tensor:
    """The init latent with its masked cells replaced (a1111-semantics §2 step 8): fill 2 "latent noise" = the
    first N(0, 1) draw of each image's seed (`rng.randn_local`, told to `on_noise` as "latent_noise_fill"), fill 3
    "latent nothing" = 0; other fills (and no mask) return `init_latent` itself."""
    if mask is None or inpainting_fill not in (2, 3):
        return init_latent
    if inpainting_fill == 3:
        return init_latent * mask
    noise = torch.stack([rng.randn_local(s, init_latent.shape[1:], source=rng_source, device=init_latent.device)
                         for s in seeds[:init_latent.shape[0]]])
    if on_noise is not None:
        on_noise("latent_noise_fill", noise)
    return init_latent * mask + noise.float() * nmask


def image_conditioning(model: StableDiffusionModel, source: Tensor, latent: Tensor, mask: Image.Image | None,
                       seeds: Sequence[int], *, mask_round: bool, mask_weight: float, vae_sample: bool,
                       rng_source: str, on_noise: Callable[..., None] | None = None,
                       tiled: bool = False) -> Tensor | None:
    """c_concat of models with image conditioning (a1111-semantics §5, §5.1), else None; `tiled`: the tiled VAE.

    9-channel inpainting ("hybrid"): [B, 1 + C, h, w] = the processing mask (1 = regenerate; rounded when
    `mask_round`; all ones without a mask) at latent size by nearest interpolation, then the latent of
    `lerp(source, source * (1 - mask), mask_weight)`. instruct-pix2pix ("edit"): the posterior mean of `source`,
    unscaled. `source` [B,3,H,W] in [-1, 1]; `latent` [B,C,h,w] gives the size and dtype. The masked image's VAE
    sample eps is told to `on_noise` as "vae_sample_conditioning".
    """
    if model.family.conditioning == "edit":
        return torch.cat([tiling.encode(model.vae, px[None].to(model.device, model.vae_dtype), tiled).mode()
                          for px in source]).float()
    if model.family.conditioning != "hybrid":
        return None
    if mask is not None:
        cmask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
        cmask = cmask.to(source.device)
        cmask = torch.round(cmask) if mask_round else cmask
    else:
        cmask = source.new_ones(1, 1, *source.shape[-2:])
    masked = torch.lerp(source, source * (1.0 - cmask), mask_weight)
    renamed = None if on_noise is None else lambda name, eps: on_noise("vae_sample_conditioning", eps)
    masked_latent = encode(model, masked, seeds, sample=vae_sample, rng_source=rng_source, on_noise=renamed,
                           tiled=tiled)
    cmask = F.interpolate(cmask, size=latent.shape[-2:]).expand(latent.shape[0], -1, -1, -1)
    return torch.cat([cmask, masked_latent], dim=1).to(latent.dtype)


def txt2img_image_conditioning(model: StableDiffusionModel, x: Tensor, seeds: Sequence[int], *, mask_weight: float,
                               vae_sample: bool, rng_source: str,
                               on_noise: Callable[..., None] | None = None, tiled: bool = False) -> Tensor | None:
    """txt2img with a 9-channel model (a1111-semantics §5.1): a ones mask and the latent of a 0.5-grey image.
    Raises NotImplementedError for instruct-pix2pix models (they need an image)."""
    if model.family.conditioning == "edit":
        raise NotImplementedError("txt2img with an instruct-pix2pix (edit) model is not supported; use img2img")
    if model.family.conditioning != "hybrid":
        return None
    grey = x.new_zeros(x.shape[0], 3, x.shape[2] * 8, x.shape[3] * 8)  # 0.5 in [0, 1] is 0 in [-1, 1]
    return image_conditioning(model, grey, x, None, seeds, mask_round=True, mask_weight=mask_weight,
                              vae_sample=vae_sample, rng_source=rng_source, on_noise=on_noise, tiled=tiled)


def encode_conds(model: StableDiffusionModel, prompts: list[str], negative_prompts: list[str], total_steps: int,
                 text: TextOptions, width: int, height: int, hires_steps: int | None = None) -> Conds:
    """Prompt-edited, AND-composed conditioning of one batch (a1111-semantics §11.1, §11.3; A1111 `setup_conds`).

    Schedules are laid out on `total_steps` model calls (the sampler's `total_steps(steps)`: x2 for second-order
    samplers); `hires_steps` is the hires pass's count. The negative prompts go through A1111's negative flag
    (SDXL: zeroed empty negative, refiner: low aesthetic score). Textual-inversion embeddings come from
    `text.embeddings`."""
    lookup = as_lookup(text.embeddings, model.tokenizer)  # the names are tokenised once for the whole batch

    def encoder(is_negative: bool):
        return lambda texts: model.encode_texts(texts, clip_skip=text.clip_skip, emphasis=text.emphasis, width=width,
                                                height=height, is_negative_prompt=is_negative, embeddings=lookup)

    kw = dict(hires_steps=hires_steps, use_old_scheduling=text.use_old_scheduling)
    uc = get_learned_conditioning(encoder(True), negative_prompts, total_steps, **kw)
    c = get_multicond_learned_conditioning(encoder(False), prompts, total_steps, **kw)
    conds_list, _ = reconstruct_multicond_batch(c, 0)
    return Conds(cond=lambda step: _as_cond_dict(reconstruct_multicond_batch(c, step)[1]),
                 uncond=lambda step: _as_cond_dict(reconstruct_cond_batch(uc, step)), conds_list=conds_list)


def refiner_conds(refiner: Refiner | None, prompts: list[str], negative_prompts: list[str], sampler: SamplerInfo,
                  steps: int, text: TextOptions, width: int, height: int, hires_steps: int | None = None):
    """The refiner's own conditioning of the batch's prompts (its text encoders), or None without a refiner."""
    if refiner is None:
        return None
    return encode_conds(refiner.model, prompts, negative_prompts, sampler.total_steps(steps), text, width, height,
                        hires_steps=hires_steps)


def noised_init(model: StableDiffusionModel, sampler: SamplerInfo, scheduler: str | None, init_latent: Tensor,
                noise: Tensor, options: SamplerOptions, record: SamplingPass) -> Tensor:
    """img2img's start: the init latent noised to the level where sampling begins, for the `record.steps`-step
    schedule cut at `record.t_enc` (fills `record`'s schedule fields). `init_latent`, `noise` [B,C,h,w].

    k-diffusion samplers (a1111-semantics §6.3): `sigma_sched = sigmas[steps - t_enc - 1:]` (t_enc + 2 values) and
    `x = init_latent + noise * sigma_sched[0]`, plus `noise * extra_noise` (A1111's "Extra noise", unscaled).
    DDIM/PLMS/UniPC (§6.4): `x = init_latent * sqrt(a) + noise * sqrt(1 - a)` with a = abar[grid[t_enc]], and the
    grid cut to `grid[:t_enc]`.
    """
    device, steps, t_enc = init_latent.device, record.steps, record.t_enc
    if sampler.kind == "timestep":
        grid = get_timesteps(steps, sampler.discard_next_to_last_sigma, device=device)
        x, record.timesteps = img2img_start(init_latent, noise, grid, t_enc, model.alphas_cumprod.to(device),
                                            options.extra_noise)
        record.start_timestep = int(grid[t_enc])
        return x
    record.scheduler, record.sigmas = sigma_schedule(model, sampler, scheduler, steps, options)
    record.sigma_sched = schedules.img2img_sigmas(record.sigmas.to(device), steps, t_enc)
    x = init_latent + noise * record.sigma_sched[0]
    return x + noise * options.extra_noise if options.extra_noise > 0 else x


def inner_denoiser(model: StableDiffusionModel, sampler: SamplerInfo) -> CompVisDenoiser:
    """k-diffusion's model wrapper (a1111-semantics §7.1): eps/v `CompVisDenoiser`, or A1111's LCM denoiser with
    its own 50-level sigma table for the "LCM" sampler. Its `DiscreteSchedule` also serves the schedulers."""
    alphas = model.alphas_cumprod.to(model.device)
    if sampler.denoiser == "lcm":
        if model.family.prediction != "eps":
            raise NotImplementedError("the LCM sampler supports eps-prediction models only")
        return LCMCompVisDenoiser(model.apply_model, alphas)
    return CompVisDenoiser(model.apply_model, alphas, prediction=model.family.prediction)


def sigma_schedule(model: StableDiffusionModel, sampler: SamplerInfo, scheduler: str | None, steps: int,
                   options: SamplerOptions) -> tuple[str | None, Tensor]:
    """(scheduler label, sigmas float32 [steps + 1] on the CPU) for `steps` (a1111-semantics §10.2): the named
    scheduler, or with None/"automatic" the sampler's default (uniform when it has none). The label is None when
    Automatic resolves to nothing (A1111 then writes no "Schedule type")."""
    automatic = scheduler in (None, "automatic", "Automatic")
    name = sampler.scheduler if automatic else scheduler
    sigmas = schedules.get_sigmas(scheduler or "automatic", steps, inner_denoiser(model, sampler),
                                  default_scheduler=sampler.scheduler,
                                  discard_next_to_last_sigma=options.discard_next_to_last_sigma,
                                  sigma_min=options.sigma_min, sigma_max=options.sigma_max, rho=options.rho,
                                  is_sdxl=model.family.name.startswith("sdxl"), beta_alpha=options.beta_alpha,
                                  beta_beta=options.beta_beta)
    return (schedules.find_scheduler(name).label if name else None), sigmas


def sample(model: StableDiffusionModel, sampler: SamplerInfo, x: Tensor, record: SamplingPass, conds: Conds, *,
           cfg_scale: float, image_cond: Tensor | None, blend: MaskBlend | None, ctx: BlendContext | None,
           noise_rng: rng.ImageRNG, seeds: Seeds, options: SamplerOptions, image_cfg_scale: float | None = None,
           refiner: Refiner | None = None, refiner_conds: Conds | None = None, callback: Callable | None = None,
           model_callback: Callable | None = None, disable_progress: bool | None = None) -> Tensor:
    """Run the sampler from `x` over `record.sigma_sched` (or `record.timesteps`) with the guided denoiser.

    The denoiser the sampler calls is composed before sampling: `with_call_index` (call k gets step=k) ->
    `traced` (appends sigma to `record.model_calls`, reports to `model_callback`) -> `refiner_switch` (when a
    refiner is given) -> `guided_denoiser` (blend, CFG, model). Returns latents [B,C,h,w].

    Every model call's output (one `torch.isfinite(...).all()` each) and the returned latents are checked: the
    first NaN/inf raises FloatingPointError naming the call (k of N, its sigma or timestep), cfg_scale and the UNet
    dtype, what was already non-finite (the incoming latent, the conditioning) and a hint that holds for the run:
    lower cfg_scale when |cfg_scale| > 30 (A1111's UI range is 1..30), float32 only for a float16/bfloat16 UNet."""
    timestep = sampler.kind == "timestep"
    guided = guided_denoiser(model, sampler, conds, image_cond, blend, ctx, image_cfg_scale, options.s_min_uncond)
    if refiner is not None:
        schedule = None if timestep else inner_denoiser(model, sampler)
        later = guided_denoiser(refiner.model, sampler, refiner_conds, None, blend, ctx, image_cfg_scale,
                                options.s_min_uncond)
        guided = refiner_switch(guided, later, refiner.switch_at, schedule, record)
    n_calls = len(record.timesteps) if timestep else sampler.total_steps(
        record.steps if record.t_enc is None else record.t_enc + 1)

    def finite(t) -> bool:
        return all(bool(torch.isfinite(v).all()) for v in (t.values() if isinstance(t, dict) else [t]))

    def non_finite(what: str, x_in: Tensor | None, step: int) -> FloatingPointError:
        """The error for the first non-finite value; x_in = the latent the failing model call received."""
        unet = model_in_use(model, refiner, record)
        step_conds = conds if unet is model else refiner_conds
        notes = [f"{what} with cfg_scale {cfg_scale:g}, UNet dtype {str(unet.dtype).removeprefix('torch.')}"]
        explained = False
        if x_in is not None and not finite(x_in):
            explained = True
            notes.append("the starting latent (init latent + noise) was already non-finite" if step == 0 else
                         "the latent it received was already non-finite (the sampler's update after model call "
                         f"{step} overflowed)")
        elif x_in is not None:
            notes.append(f"largest |latent| it received {float(x_in.abs().max()):.3g}")
        if x_in is not None and not (finite(step_conds.cond(step)) and finite(step_conds.uncond(step))):
            explained = True
            notes.append("the prompt conditioning of this call is not finite")
        if not abs(cfg_scale) <= 30:  # also NaN
            too_big = (f"{cfg_scale:g} does not even fit in float32; " if torch.isinf(torch.tensor(float(cfg_scale)))
                       else "")
            notes.append(f"lower cfg_scale ({too_big}A1111's UI allows 1 to 30)")
        if unet.dtype in (torch.float16, torch.bfloat16):
            notes.append("run the UNet in float32 (--dtype float32; load_checkpoint(..., dtype=torch.float32))")
        elif not explained and abs(cfg_scale) <= 30:
            notes.append("cfg_scale and the UNet dtype are ordinary here, so the checkpoint's weights or the inputs "
                         "may hold non-finite or extreme values")
        return FloatingPointError("; ".join(notes))

    def checked(x: Tensor, sigma: Tensor, *, step: int, **kwargs: Any):
        out = guided(x, sigma, step=step, **kwargs)
        if not finite(out[0] if isinstance(out, tuple) else out):
            of_n = f" of {n_calls}" if step < n_calls else ""
            level = f"{'timestep' if timestep else 'sigma'} {float(sigma.flatten()[0]):.4g}"
            raise non_finite(f"model call {step + 1}{of_n} ({level}) produced non-finite values (NaN or inf)", x,
                             step)
        return out

    denoiser = with_call_index(traced(checked, record, model_callback), n_calls)
    samples = run_sampler(model, sampler, denoiser, x, record, cfg_scale, noise_rng, seeds, options, callback,
                          disable_progress, is_img2img=record.t_enc is not None,
                          on_noise=noise_reporter(model_callback))
    if not finite(samples):
        calls = len(record.model_calls)
        raise non_finite(f"the sampler's update after its last model call ({calls}) produced non-finite latents",
                         None, calls)
    return samples


def guided_denoiser(model: StableDiffusionModel, sampler: SamplerInfo, conds: Conds, image_cond: Tensor | None,
                    blend: MaskBlend | None, ctx: BlendContext | None, image_cfg_scale: float | None,
                    s_min_uncond: float) -> Callable[..., Tensor]:
    """`denoise(x, sigma, *, step, total_steps, cond_scale, return_uncond=False)`: one CFG model call with the
    mask blend around it (a1111-semantics §7).

    k-diffusion samplers: `blend.blend_input` on x, CFG, then `blend.blend` on `denoised` (A1111's x0 blend,
    `init_latent * mask + denoised * nmask`). DDIM/PLMS/UniPC: A1111 blends x before the call (`blend.blend` on x;
    the sigma passed there is a timestep, so only the "a1111" blend is allowed). No blend without a mask.
    """
    timestep = sampler.kind == "timestep"
    alphas = model.alphas_cumprod.to(model.device)
    inner = (CompVisTimestepsDenoiser(model.apply_model, alphas, prediction=model.family.prediction) if timestep
             else inner_denoiser(model, sampler))
    cfg = CFGDenoiser(inner, image_cfg_scale=image_cfg_scale, is_edit_model=model.family.conditioning == "edit")
    if ctx is not None and timestep and blend.name != "a1111":
        raise NotImplementedError(f"mask blend {blend.name!r} works with k-diffusion samplers only, not {sampler.name}")

    def denoise(x: Tensor, sigma: Tensor, *, step: int, total_steps: int, cond_scale: float,
                return_uncond: bool = False):
        if ctx is not None:
            x = blend.blend(x, sigma, ctx) if timestep else blend.blend_input(x, sigma, ctx)
        out = cfg(x, sigma, cond=conds.cond, uncond=conds.uncond, conds_list=conds.conds_list, cond_scale=cond_scale,
                  image_cond=image_cond, s_min_uncond=s_min_uncond, step=step, total_steps=total_steps,
                  return_uncond=return_uncond)
        if ctx is None or timestep:
            return out
        if return_uncond:
            return blend.blend(out[0], sigma, ctx), out[1]
        return blend.blend(out, sigma, ctx)

    return denoise


def refiner_switch(first: Callable[..., Tensor], then: Callable[..., Tensor], switch_at: float,
                   schedule: CompVisDenoiser | None, record: SamplingPass) -> Callable[..., Tensor]:
    """Call `first` until the completed ratio `(999 - t) / 1000` reaches `switch_at`, then `then` for the rest of
    the run (A1111 v1.10 `apply_refiner`): t is the discrete timestep nearest to the call's largest sigma on
    `schedule` (timestep samplers pass t itself, `schedule` None). The first refiner call's index is written to
    `record.refiner_switch_call`."""
    def call(x: Tensor, sigma: Tensor, *, step: int, **kwargs: Any):
        if record.refiner_switch_call is None:
            t = int(sigma.max()) if schedule is None else int(torch.argmin(
                (schedule.sigmas.to(sigma.device) - sigma.max()).abs()))
            if (999 - t) / 1000 < switch_at:
                return first(x, sigma, step=step, **kwargs)
            record.refiner_switch_call = step
        return then(x, sigma, step=step, **kwargs)

    return call


def model_in_use(model: StableDiffusionModel, refiner: Refiner | None, record: SamplingPass) -> StableDiffusionModel:
    """The model running now (and at the end of a pass): the refiner once `refiner_switch` has switched to it."""
    return refiner.model if refiner is not None and record.refiner_switch_call is not None else model


def traced(denoiser: Callable[..., Tensor], record: SamplingPass,
           model_callback: Callable[[dict], None] | None) -> Callable[..., Tensor]:
    """`denoiser`, appending each call's sigma (of image 0) to `record.model_calls` and reporting
    {"i": call index, "x", "sigma", "sigma_hat", "denoised"} to `model_callback` (e.g. a `TraceRecorder`); unlike
    the sampler callback (once per step) this sees second-order sub-steps too. Noise draws reach `model_callback`
    separately, as dicts with a "noise" key (`noise_reporter`)."""
    def call(x: Tensor, sigma: Tensor, *, step: int, **kwargs: Any):
        out = denoiser(x, sigma, step=step, **kwargs)
        record.model_calls.append(float(sigma[0]))
        if model_callback is not None:
            denoised = out[0] if isinstance(out, tuple) else out
            model_callback({"i": step, "x": x, "sigma": sigma[0], "sigma_hat": sigma[0], "denoised": denoised})
        return out

    return call


def run_sampler(model: StableDiffusionModel, sampler: SamplerInfo, denoiser: Callable[..., Tensor], x: Tensor,
                record: SamplingPass, cfg_scale: float, noise_rng: rng.ImageRNG, seeds: Seeds,
                options: SamplerOptions, callback: Callable | None, disable: bool | None, is_img2img: bool,
                on_noise: Callable[..., None] | None = None) -> Tensor:
    """Call the sampler function with A1111's arguments (a1111-semantics §6.3-6.5): the per-step noise from the
    image RNG (or a per-image Brownian tree), the options of `options.sampler_kwargs`, DPM fast/adaptive with a
    sigma range instead of a schedule, DDIM's eta noise, UniPC's img2img flag. Every draw is told to `on_noise`
    (`reported_noise`)."""
    extra_args = {"cond_scale": cfg_scale}
    kw = dict(options.sampler_kwargs)
    if sampler.kind == "timestep":
        alphas = model.alphas_cumprod.to(model.device)
        if "eta" in kw:
            kw["noise_sampler"] = reported_noise(lambda sigma, sigma_next: noise_rng.next().to(x.dtype), "step_noise",
                                                 None, on_noise)
        if sampler.funcname == "unipc":
            kw["is_img2img"] = is_img2img
        return TIMESTEP_SAMPLERS[sampler.name](denoiser, x, record.timesteps, alphas, extra_args=extra_args,
                                               callback=callback, disable=disable, **kw)
    sigma_sched = record.sigma_sched
    if sampler.brownian_noise:
        sigmas = record.sigmas.to(x.device)
        noise_sampler = BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seeds=list(seeds.seeds))
        noise_sampler = reported_noise(noise_sampler, "brownian_noise", sigma_sched, on_noise)
    else:
        noise_sampler = reported_noise(lambda sigma, sigma_next: noise_rng.next().to(x.dtype), "step_noise",
                                       sigma_sched, on_noise)
    if sampler.solver_type:
        kw["solver_type"] = sampler.solver_type
    if sampler.sigma_range:  # DPM fast / adaptive take a range and a call count (a1111-semantics §6.3 step 3)
        kw.update(sigma_min=sigma_sched[-2], sigma_max=sigma_sched[0])
        if sampler.funcname == "sample_dpm_fast":
            kw["n"] = len(sigma_sched) - 1
        return sampler.function(denoiser, x, extra_args=extra_args, callback=callback, disable=disable,
                                noise_sampler=noise_sampler, **kw)
    return sampler.function(denoiser, x, sigma_sched, extra_args=extra_args, callback=callback, disable=disable,
                            noise_sampler=noise_sampler, **kw)


def vae_tiling_for(model: StableDiffusionModel, width: int, height: int, vae_tiling: bool | None
                   ) -> tuple[bool, str]:
    """(tile the VAE?, why) for one `width x height` pixel image of `model` on its device and VAE dtype:
    `resources.vae_tiling_choice` (True / False as asked, None = tile only when the untiled VAE would not fit)."""
    return resources.vae_tiling_choice(model.family, width, height, vae_tiling, vae_dtype=model.vae_dtype,
                                       device=model.device)


def noise_reporter(model_callback: Callable[[dict], None] | None) -> Callable[..., None] | None:
    """`on_noise(name, noise, step=-1, sigma=None, sigma_next=None)`, telling `model_callback` about one noise draw
    as {"noise", "name", "step", "sigma", "sigma_next"} (a `TraceRecorder` keeps its sha256, not the tensor); None
    without a model_callback. Model-call dicts (`traced`) never have a "noise" key."""
    if model_callback is None:
        return None

    def on_noise(name: str, noise: Tensor, step: int = -1, sigma: float | None = None,
                 sigma_next: float | None = None) -> None:
        model_callback({"noise": noise, "name": name, "step": step, "sigma": sigma, "sigma_next": sigma_next})

    return on_noise


def reported_noise(noise_sampler: Callable[[Tensor, Tensor], Tensor], name: str, sigma_sched: Tensor | None,
                   on_noise: Callable[..., None] | None) -> Callable[[Tensor, Tensor], Tensor]:
    """`noise_sampler`, telling `on_noise` about each draw as `name` with its interval and step: the i with
    sigma_sched[i] equal to the draw's sigma (rtol 1e-5: DPM++ SDE passes exp(-(-log sigma))), else -1 (Restart's
    jumps, DPM fast/adaptive, timestep samplers). `noise_sampler` itself when `on_noise` is None."""
    if on_noise is None:
        return noise_sampler
    levels = None if sigma_sched is None else sigma_sched.detach().double().cpu()

    def draw(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        noise = noise_sampler(sigma, sigma_next)
        match = [] if levels is None else torch.nonzero(torch.isclose(levels, torch.tensor(float(sigma)).double(),
                                                                      rtol=1e-5, atol=0.0)).flatten().tolist()
        on_noise(name, noise, step=match[0] if match else -1, sigma=float(sigma), sigma_next=float(sigma_next))
        return noise

    return draw


def blend_sigmas(record: SamplingPass, schedule: CompVisDenoiser) -> Tensor:
    """The sigmas a blend sees: the k-diffusion slice, or for timestep samplers the noise levels of the grid they
    walk (`t_to_sigma`, descending, then 0)."""
    if record.sigma_sched is not None:
        return record.sigma_sched
    grid = schedule.t_to_sigma(record.timesteps.flip(0).float())
    return torch.cat([grid, grid.new_zeros(1)])


def finish_images(pictures: list[Image.Image], color_corrections: list | None, overlays: list | None,
                  paste_to: tuple[int, int, int, int] | None) -> list[Image.Image]:
    """Colour correction (a1111-semantics §9.2), then the overlay of the kept original pixels (§9.1), per image."""
    out = []
    for i, image in enumerate(pictures):
        if color_corrections is not None and i < len(color_corrections):
            image = images.apply_color_correction(color_corrections[i], image)
        if overlays is not None and i < len(overlays):
            image = images.apply_overlay(image, paste_to, overlays[i])
        out.append(image)
    return out


def mask_coverage(nmask: Tensor | None) -> dict[str, Any]:
    """Plan fields of a latent regenerate mask: cells with weight > 0, all cells, mean weight."""
    if nmask is None:
        return {}
    m = nmask[0, 0].float()
    return {"mask_cells": int((m > 0).sum()), "latent_cells": m.numel(), "mask_mean": float(m.mean())}


def _as_cond_dict(cond) -> dict[str, Tensor]:
    return dict(cond) if isinstance(cond, dict) else {"c_crossattn": cond}
