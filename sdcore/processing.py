"""A1111's jobs: `StableDiffusionProcessingImg2Img` (img2img, inpainting), `StableDiffusionProcessingTxt2Img`
(txt2img with the hires fix, sharing the same sampling core), `process_images`, `Processed`.

Follows AUTOMATIC1111 stable-diffusion-webui v1.10.1 `modules/processing.py` (see shared/spec/a1111-img2img.md,
cited below as "spec N"). One job:

    init()    images -> resize/crop/fill -> VAE encode -> init_latent [B,4,H/8,W/8];
              mask -> blur -> latent mask (nmask = regenerate, mask = keep); image_conditioning
    sample()  sigmas for `steps`; t_enc = int(min(denoising_strength, 0.999) * steps);
              sigma_sched = sigmas[steps - t_enc - 1:]; xi = init_latent + noise * sigma_sched[0];
              sampler over sigma_sched with CFG, denoised = init_latent * mask + denoised * nmask after each call;
              samples = samples * nmask + init_latent * mask
    decode    VAE decode -> pixels; colour correction; overlay of the original through the blurred mask
txt2img is the same sampling core started from pure noise at sigmas[0] (no init latent, no mask).

Glossary: B batch, C latent channels (4), H x W pixels, h x w = H/8 x W/8 latent cells; sigma is the noise standard
deviation of k-diffusion's parameterisation x = x0 + sigma * eps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from . import images, infotext, rng
from .checkpoint import StableDiffusionModel
from .sampling import schedules
from .sampling.denoisers import CFGDenoiser, CompVisDenoiser, LCMCompVisDenoiser
from .sampling.samplers import SamplerInfo, find_sampler

VERSION = infotext.VERSION


@dataclass(frozen=True)
class Options:
    """A1111 global settings that change img2img numbers, as explicit parameters with the reference defaults.

    Names are the option names of `modules/shared_options.py` (spec 1, "Relevant global options"). One deliberate
    difference: `randn_source` defaults to "CPU" (A1111: "GPU"), so the same seed gives the same image on every
    device; "GPU" draws on the model's device, "NV" uses the Philox generator (spec 8.3).
    """

    img2img_fix_steps: bool = False
    img2img_color_correction: bool = False
    img2img_background_color: str = "#ffffff"
    inpainting_mask_weight: float = 1.0
    img2img_extra_noise: float = 0.0
    overlay_inpaint: bool = True
    initial_noise_multiplier: float = 1.0
    eta_noise_seed_delta: int = 0
    randn_source: str = "CPU"
    eta_ancestral: float = 1.0
    eta_ddim: float = 0.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0  # 0 means infinity (fill_fields_from_opts)
    s_noise: float = 1.0
    s_min_uncond: float = 0.0
    CLIP_stop_at_last_layers: int = 1
    emphasis: str = "Original"
    sigma_min: float = 0.0  # 0 = the model's
    sigma_max: float = 0.0
    rho: float = 0.0
    use_old_scheduling: bool = False
    always_discard_next_to_last_sigma: bool = False
    use_old_karras_scheduler_sigmas: bool = False
    save_to_dirs: bool = True  # outputs go to a YYYY-MM-DD subfolder
    vae_encode_sample: bool = True  # A1111 samples the VAE posterior (seeded here per image); False = its mean


@dataclass
class StableDiffusionProcessing:
    """Fields shared by txt2img and img2img (A1111 `StableDiffusionProcessing`, spec 1).

    Values: `width`, `height` in pixels (multiples of 8); `steps` >= 1; `cfg_scale` the classifier-free guidance
    scale; `seed` -1 = random; `subseed_strength` in [0, 1]; `eta` None = option default.
    Fields A1111 has but sdcore does not implement raise NotImplementedError when set to a non-default value.
    """

    sd_model: StableDiffusionModel | None = None
    outpath_samples: str | None = None
    outpath_grids: str | None = None
    prompt: str | list[str] = ""
    prompt_for_display: str | None = None
    negative_prompt: str | list[str] = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict[str, Any] | None = None
    overlay_images: list | None = None
    eta: float | None = None
    do_not_reload_embeddings: bool = False
    denoising_strength: float | None = None
    ddim_discretize: str | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    sampler_index: int | None = None
    refiner_checkpoint: Any = None  # path of an SDXL refiner checkpoint, or a loaded StableDiffusionModel
    refiner_switch_at: float | None = None
    token_merging_ratio: float = 0
    token_merging_ratio_hr: float = 0
    disable_extra_networks: bool = False
    firstpass_image: Image.Image | None = None
    comments: dict | None = None
    opts: Options = field(default_factory=Options)

    # Internal state set by process_images / init / sample (A1111 names).
    sampler: SamplerInfo | None = field(default=None, init=False)
    is_using_inpainting_conditioning: bool = field(default=False, init=False)
    paste_to: tuple | None = field(default=None, init=False)
    color_corrections: list | None = field(default=None, init=False)
    all_prompts: list[str] | None = field(default=None, init=False)
    all_negative_prompts: list[str] | None = field(default=None, init=False)
    all_seeds: list[int] | None = field(default=None, init=False)
    all_subseeds: list[int] | None = field(default=None, init=False)

    refiner = None  # the loaded refiner model, set by validate()
    batch_prompts = ([], [])  # this iteration's (prompts, negative prompts), for re-encoding at a refiner switch

    # Img2img state read by the shared sampling code; txt2img leaves them None (no mask, no init latent).
    mask = None
    nmask = None
    init_latent = None
    image_conditioning = None

    # Fields accepted for signature compatibility whose non-default values sdcore cannot honour.
    _NOT_IMPLEMENTED = {
        "styles": (None, []), "restore_faces": (None, False), "tiling": (None, False),
        "ddim_discretize": (None, "uniform"), "sampler_index": (None,), "token_merging_ratio": (0, 0.0), "token_merging_ratio_hr": (0, 0.0),
        "firstpass_image": (None,),
    }

    def __post_init__(self):
        if self.override_settings:
            unknown = sorted(set(self.override_settings) - {f.name for f in dataclasses.fields(Options)})
            if unknown:
                raise ValueError(f"override_settings: unknown option(s) {unknown}; allowed: "
                                 f"{[f.name for f in dataclasses.fields(Options)]}")
            self.opts = dataclasses.replace(self.opts, **self.override_settings)
        if not self.seed_enable_extras:
            self.subseed, self.subseed_strength, self.seed_resize_from_h, self.seed_resize_from_w = -1, 0, 0, 0
        if self.extra_generation_params is None:
            self.extra_generation_params = {}
        if self.comments is None:
            self.comments = {}

    def validate(self) -> None:
        """Raise ValueError / NotImplementedError for values outside what the reference allows."""
        for name, defaults in self._NOT_IMPLEMENTED.items():
            value = getattr(self, name)
            if not any(value is d or value == d for d in defaults):
                raise NotImplementedError(f"{name}={value!r} is not implemented in sdcore (allowed: {defaults[0]!r})")
        if self.sd_model is None:
            raise ValueError("sd_model: None; pass the model returned by sdcore.load_checkpoint")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 8 or v % 8:
                raise ValueError(f"{name}: {v!r}; must be a positive multiple of 8 (pixels)")
        for name, lo in (("steps", 1), ("batch_size", 1), ("n_iter", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: {v!r}; must be an integer >= {lo}")
        if not 0 <= self.subseed_strength <= 1:
            raise ValueError(f"subseed_strength: {self.subseed_strength}; must be in [0, 1]")
        if self.opts.randn_source not in ("CPU", "GPU", "NV"):
            raise ValueError(f"opts.randn_source: {self.opts.randn_source!r}; allowed: 'CPU', 'GPU', 'NV'")
        self.validate_refiner()

    def validate_refiner(self) -> None:
        """Load `refiner_checkpoint` (same device and dtype as the model) and check `refiner_switch_at`."""
        if self.refiner_checkpoint is None:
            return
        sw = self.refiner_switch_at
        if isinstance(sw, bool) or not isinstance(sw, (int, float)) or not 0 < sw < 1:
            raise ValueError(f"refiner_switch_at: {sw!r}; must be in (0, 1) with a refiner_checkpoint")
        if isinstance(self.refiner_checkpoint, StableDiffusionModel):
            self.refiner = self.refiner_checkpoint
        else:
            from .checkpoint import load_checkpoint

            self.refiner = load_checkpoint(self.refiner_checkpoint, device=self.sd_model.device,
                                           dtype=self.sd_model.dtype)
        if self.refiner.family.unet.out_channels != self.sd_model.family.unet.out_channels:
            raise ValueError(f"refiner_checkpoint: {self.refiner.name} has "
                             f"{self.refiner.family.unet.out_channels} latent channels, the model "
                             f"{self.sd_model.family.unet.out_channels}")

    # -- prompts and seeds (spec 8.1, 9 step 1) ------------------------------------------------------------------

    def setup_prompts(self) -> None:
        """`all_prompts` / `all_negative_prompts`: batch_size * n_iter entries (a str is repeated)."""
        n = self.batch_size * self.n_iter
        self.all_prompts = _expand(self.prompt, n, "prompt")
        self.all_negative_prompts = _expand(self.negative_prompt, n, "negative_prompt")

    def setup_seeds(self) -> None:
        """Resolve -1 seeds and build `all_seeds` / `all_subseeds` (spec 8.1)."""
        n = self.batch_size * self.n_iter
        seed, subseed = rng.get_fixed_seed(self.seed), rng.get_fixed_seed(self.subseed)
        self.seed, self.subseed = seed, subseed
        self.all_seeds = [seed if self.subseed_strength else seed + k for k in range(n)]
        self.all_subseeds = [subseed + k for k in range(n)]

    def make_rng(self, seeds: list[int], subseeds: list[int]) -> rng.ImageRNG:
        """The per-iteration noise source (spec 8.2): one generator per image seed."""
        sd = self.sd_model
        return rng.ImageRNG((sd.family.unet.out_channels, self.height // 8, self.width // 8), seeds,
                            subseeds=subseeds, subseed_strength=self.subseed_strength,
                            seed_resize_from_h=self.seed_resize_from_h, seed_resize_from_w=self.seed_resize_from_w,
                            source=self.opts.randn_source, device=sd.device,
                            eta_noise_seed_delta=self.opts.eta_noise_seed_delta)

    # -- VAE ---------------------------------------------------------------------------------------------------

    def encode_first_stage(self, pixels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Scaled latents [B,C,h,w] of pixels [B,3,H,W] in [-1, 1] (LDM `get_first_stage_encoding`, spec 2.7).

        Each image is encoded on its own (as A1111 does for batches); the posterior sample of image i draws from a
        generator seeded with `seeds[i]`, so the encode is reproducible (A1111 uses the unseeded global RNG).
        """
        sd = self.sd_model
        out = []
        for i, px in enumerate(pixels):
            dist = sd.vae.encode(px[None].to(sd.device, sd.vae_dtype))
            if self.opts.vae_encode_sample:
                eps = rng.vae_sample_noise([seeds[i % len(seeds)]], dist.mean.shape[1:], source=self.opts.randn_source,
                                           device=sd.device)
                z = dist.sample_from(eps)
            else:
                z = dist.mode()
            out.append(z * sd.family.vae.scale_factor)
        return torch.cat(out).float()

    def decode_first_stage(self, latents: torch.Tensor) -> list[Image.Image]:
        """PIL RGB images from scaled latents (spec 7.2: one at a time, (x+1)/2 clamped, x255, truncated to uint8)."""
        sd = self.sd_model
        result = []
        for z in latents:
            x = sd.vae.decode((z[None] / sd.family.vae.scale_factor).to(sd.device, sd.vae_dtype)).float()
            if torch.isnan(x).any():
                raise FloatingPointError(f"VAE decode produced NaN in {sd.vae_dtype}; run with vae_dtype=float32")
            x = torch.clamp((x[0] + 1) / 2, 0, 1)
            arr = (255.0 * x.permute(1, 2, 0).cpu().numpy()).astype(np.uint8)
            result.append(Image.fromarray(arr))
        return result

    # -- text -----------------------------------------------------------------------------------------------------

    def encode_texts(self, texts: list[str], is_negative_prompt: bool = False):
        """Plain texts -> conditioning: [N, 77*k, C], or a dict {"c_crossattn": ..., "y": [N, adm]} for models
        with vector conditioning (spec 11.4: chunks, emphasis, clip skip). Delegates to the model;
        `is_negative_prompt` is A1111's SdConditioning flag (SDXL: zeroed empty negative, refiner aesthetic score)."""
        return self.sd_model.encode_texts(texts, clip_skip=self.opts.CLIP_stop_at_last_layers,
                                          emphasis=self.opts.emphasis, width=self.width, height=self.height,
                                          is_negative_prompt=is_negative_prompt)

    def setup_conds(self, prompts: list[str], negative_prompts: list[str], hires_steps: int | None = None):
        """(c, uc): prompt-edited, AND-composed conditioning for this batch (spec 11.1, 11.3; A1111 `setup_conds`).

        Schedules are computed for `sampler.total_steps(steps)` model calls (x2 for second-order samplers); for a
        hires pass, `hires_steps` is the second pass's count (A1111 `calculate_hr_conds`).
        """
        from .prompts import get_learned_conditioning, get_multicond_learned_conditioning

        total = self.sampler.total_steps(self.steps)
        kw = dict(hires_steps=hires_steps, use_old_scheduling=self.opts.use_old_scheduling)
        if self.opts.use_old_scheduling:
            self.extra_generation_params["Old prompt editing timelines"] = True
        if self.opts.emphasis != "Original" and any("(" in t or "[" in t for t in prompts + negative_prompts):
            self.extra_generation_params["Emphasis"] = self.opts.emphasis
        uc = get_learned_conditioning(lambda texts: self.encode_texts(texts, is_negative_prompt=True),
                                      negative_prompts, total, **kw)
        c = get_multicond_learned_conditioning(self.encode_texts, prompts, total, **kw)
        return c, uc

    @staticmethod
    def cond_extra_args(c, uc) -> dict[str, Any]:
        """CFGDenoiser arguments that give, for model call `step`, the scheduled cond rows and uncond (spec 7.2)."""
        from .prompts import reconstruct_cond_batch, reconstruct_multicond_batch

        conds_list, _ = reconstruct_multicond_batch(c, 0)
        return {"cond": lambda step: as_cond_dict(reconstruct_multicond_batch(c, step)[1]),
                "uncond": lambda step: as_cond_dict(reconstruct_cond_batch(uc, step)),
                "conds_list": conds_list}

    # -- sampler ------------------------------------------------------------------------------------------------

    CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
    CHURN_LABELS = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}

    def sampler_kwargs(self, function) -> dict[str, Any]:
        """Keyword options A1111 passes to a k-diffusion function, taken from p or the options (spec 6.5).

        eta: p.eta, else opts.eta_ancestral (infotext "Eta" when != 1). s_churn/s_tmin/s_tmax/s_noise: p's value,
        else the option; A1111's quirk kept: an option that differs from the sampler default (0, 0, inf, 1) wins
        over p's value and is written to the infotext ("Sigma churn", ...).
        """
        params = inspect.signature(function).parameters
        kw = {}
        if "eta" in params:
            kw["eta"] = self.eta if self.eta is not None else self.opts.eta_ancestral
            if kw["eta"] != 1.0:
                self.extra_generation_params["Eta"] = kw["eta"]
        for name in self.sampler.extra_params:
            if name == "eta":
                continue
            option = getattr(self.opts, name)
            if name == "s_tmax" and option == 0:
                option = float("inf")
            value = getattr(self, name)
            if option != self.CHURN_DEFAULTS.get(name, option):
                value = option
                self.extra_generation_params[self.CHURN_LABELS[name]] = option
            kw[name] = option if value is None else value
        if self.sampler.solver_type and "solver_type" in params:
            kw["solver_type"] = self.sampler.solver_type
        return kw

    def get_sigmas(self, steps: int) -> torch.Tensor:
        """Noise levels for `steps` (spec 10.2): `steps + 1` values ending in 0 for most schedulers.

        Option overrides that change the schedule are written to the infotext as A1111 does ("Schedule min sigma",
        "Schedule max sigma", "Schedule rho", "Discard penultimate sigma").
        """
        sd, o, extra = self.sd_model, self.opts, self.extra_generation_params
        sched = self.denoiser_schedule()
        sigma_min = o.sigma_min or (0.1 if o.use_old_karras_scheduler_sigmas else None)
        sigma_max = o.sigma_max or (10.0 if o.use_old_karras_scheduler_sigmas else None)
        if o.sigma_min and o.sigma_min != float(sched.sigma_min):
            extra["Schedule min sigma"] = o.sigma_min
        if o.sigma_max and o.sigma_max != float(sched.sigma_max):
            extra["Schedule max sigma"] = o.sigma_max
        name = self.sampler.scheduler if self.scheduler in (None, "automatic", "Automatic") else self.scheduler
        default_rho = schedules.find_scheduler(name).default_rho if name else None
        if o.rho and default_rho is not None and o.rho != default_rho:
            extra["Schedule rho"] = o.rho
        discard = self.sampler.discard_next_to_last_sigma or o.always_discard_next_to_last_sigma
        if o.always_discard_next_to_last_sigma and not self.sampler.discard_next_to_last_sigma:
            extra["Discard penultimate sigma"] = True
        return schedules.get_sigmas(self.scheduler or "automatic", steps, sched,
                                    default_scheduler=self.sampler.scheduler, discard_next_to_last_sigma=discard,
                                    sigma_min=sigma_min, sigma_max=sigma_max, rho=o.rho or None,
                                    is_sdxl=sd.family.name.startswith("sdxl"))

    def denoiser_schedule(self):
        """The model wrapper whose sigma table the schedulers read (LCM has its own 50-level table)."""
        return self.make_inner_denoiser()

    def make_inner_denoiser(self) -> CompVisDenoiser:
        """k-diffusion model wrapper: eps/v CompVisDenoiser, or A1111's LCM denoiser for the "LCM" sampler."""
        sd = self.sd_model
        alphas = sd.alphas_cumprod.to(sd.device)
        if self.sampler.denoiser == "lcm":
            if sd.family.prediction != "eps":
                raise NotImplementedError("the LCM sampler supports eps-prediction models only")
            return LCMCompVisDenoiser(sd.apply_model, alphas)
        return CompVisDenoiser(sd.apply_model, alphas, prediction=sd.family.prediction)

    def noise_sampler(self, x: torch.Tensor, sigmas: torch.Tensor, noise: rng.ImageRNG, seeds: list[int]):
        """Per-step noise: the image RNG's next draw (A1111's randn_like proxy), or a per-image Brownian tree."""
        if self.sampler.brownian_noise:
            from .sampling.samplers import BrownianTreeNoiseSampler

            positive = sigmas[sigmas > 0]
            return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seeds=seeds)
        return lambda sigma, sigma_next: noise.next().to(x.dtype)

    def img2img_image_conditioning(self, source: torch.Tensor, latent: torch.Tensor, image_mask: Image.Image | None,
                                   seeds: list[int]) -> torch.Tensor | None:
        """c_concat for 9-channel inpainting UNets (spec 5.1): [B, 1 + 4, h, w] = mask, masked-image latent.

        `source` [B,3,H,W] in [-1,1]. cmask is the processing mask (1 = regenerate), rounded when mask_round; the
        masked image is lerp(source, source * (1 - cmask), inpainting_mask_weight); the mask goes to latent size by
        nearest interpolation. Returns None for models without image conditioning.
        """
        if self.sd_model.family.conditioning == "edit":
            # instruct-pix2pix: the posterior mean of the source, without scale_factor (spec 5)
            sd = self.sd_model
            return torch.cat([sd.vae.encode(px[None].to(sd.device, sd.vae_dtype)).mode() for px in source]).float()
        if self.sd_model.family.conditioning != "hybrid":
            return None
        self.is_using_inpainting_conditioning = True
        if image_mask is not None:
            cmask = torch.from_numpy(np.asarray(image_mask.convert("L"), dtype=np.float32) / 255.0)
            cmask = cmask[None, None].to(source.device)
            if self.mask_round:
                cmask = torch.round(cmask)
        else:
            cmask = source.new_ones(1, 1, *source.shape[-2:])
        masked = torch.lerp(source, source * (1.0 - cmask), self.opts.inpainting_mask_weight)
        masked_latent = self.encode_first_stage(masked, seeds)
        cmask = F.interpolate(cmask, size=latent.shape[-2:]).expand(latent.shape[0], -1, -1, -1)
        return torch.cat([cmask, masked_latent], dim=1).to(latent.dtype)

    def txt2img_image_conditioning(self, x: torch.Tensor, seeds: list[int]) -> torch.Tensor | None:
        """c_concat for txt2img with a 9-channel model (spec 5.1): a ones mask and the latent of a 0.5-grey image."""
        if self.sd_model.family.conditioning == "edit":
            raise NotImplementedError("txt2img with an instruct-pix2pix (edit) model is not supported; use img2img")
        if self.sd_model.family.conditioning != "hybrid":
            return None
        grey = x.new_zeros(x.shape[0], 3, x.shape[2] * 8, x.shape[3] * 8)  # 0.5 in [0,1] is 0 in [-1,1]
        return self.img2img_image_conditioning(grey, x, None, seeds)

    def run_kdiffusion_sampler(self, noise, steps, t_enc, cond_args, noise_rng, seeds, callback, disable):
        """k-diffusion img2img (spec 6.3): slice the sigmas, noise the init latent to sigma_sched[0], sample."""
        sigmas = self.get_sigmas(steps).to(self.sd_model.device)
        sigma_sched = schedules.img2img_sigmas(sigmas, steps, t_enc)
        xi = self.init_latent + noise * sigma_sched[0]
        if self.opts.img2img_extra_noise > 0:
            self.extra_generation_params["Extra noise"] = self.opts.img2img_extra_noise
            xi = xi + noise * self.opts.img2img_extra_noise
        return self.launch_sampling(xi, sigma_sched, sigmas, t_enc + 1, cond_args, noise_rng, seeds, callback,
                                    disable)

    def launch_sampling(self, x, sigma_sched, sigmas, n_steps, cond_args, noise_rng, seeds, callback, disable):
        """Run the k-diffusion function over `sigma_sched` from `x` with CFG and the mask blend."""
        info = self.sampler
        self.record_schedule_type()
        model = self.traced(self.guided_model(self.make_inner_denoiser, info.total_steps(n_steps)))
        s_min_uncond = self.s_min_uncond if self.s_min_uncond is not None else self.opts.s_min_uncond
        if s_min_uncond > 0:
            self.extra_generation_params["NGMS"] = s_min_uncond
        extra_args = {**cond_args, "cond_scale": self.cfg_scale, "image_cond": self.image_conditioning,
                      "s_min_uncond": s_min_uncond}
        fn = info.function
        params = inspect.signature(fn).parameters
        kw = self.sampler_kwargs(fn)
        if "sigma_min" in params:  # DPM fast / adaptive take a sigma range, not a schedule (spec 6.3 step 3)
            kw.update(sigma_min=sigma_sched[-2], sigma_max=sigma_sched[0])
            if "n" in params:
                kw["n"] = len(sigma_sched) - 1
            args = (model, x)
        else:
            args = (model, x, sigma_sched)
        return fn(*args, extra_args=extra_args, callback=callback, disable=disable,
                  noise_sampler=self.noise_sampler(x, sigmas, noise_rng, seeds), **kw)

    def run_timestep_sampler(self, noise, steps, t_enc, cond_args, noise_rng, seeds, callback, disable):
        """DDIM / PLMS / UniPC img2img (spec 6.4): noise to abar[timesteps[t_enc]], mask blended before each call."""
        from .sampling.timesteps import get_timesteps, img2img_start

        sd, info = self.sd_model, self.sampler
        alphas = sd.alphas_cumprod.to(sd.device)
        timesteps = get_timesteps(steps, info.discard_next_to_last_sigma, device=sd.device)
        xi, ts = img2img_start(self.init_latent, noise, timesteps, t_enc, alphas, self.opts.img2img_extra_noise)
        return self.launch_timestep_sampling(xi, ts, cond_args, noise_rng, callback, disable, is_img2img=True)

    def launch_timestep_sampling(self, x, timesteps, cond_args, noise_rng, callback, disable, is_img2img):
        """Run DDIM / DDIM CFG++ / PLMS / UniPC over the ascending DDPM `timesteps` from `x` (spec 6.4): the model
        returns eps, the mask is blended into x before each call, DDIM's eta noise comes from the image RNG."""
        from .sampling.timesteps import TIMESTEP_SAMPLERS, CompVisTimestepsDenoiser

        sd, info = self.sd_model, self.sampler
        alphas = sd.alphas_cumprod.to(sd.device)

        def inner():
            return CompVisTimestepsDenoiser(self.sd_model.apply_model, self.sd_model.alphas_cumprod.to(sd.device),
                                            prediction=self.sd_model.family.prediction)

        model = self.traced(self.guided_model(inner, len(timesteps), mask_before_denoising=True))
        extra_args = {**cond_args, "cond_scale": self.cfg_scale, "image_cond": self.image_conditioning}
        fn = TIMESTEP_SAMPLERS[info.name]
        params = inspect.signature(fn).parameters
        kw = {}
        if "eta" in params:
            kw["eta"] = self.eta if self.eta is not None else self.opts.eta_ddim
            if kw["eta"] != 0.0:
                self.extra_generation_params["Eta DDIM"] = kw["eta"]
            kw["noise_sampler"] = lambda sigma, sigma_next: noise_rng.next().to(x.dtype)
        if "is_img2img" in params:
            kw["is_img2img"] = is_img2img
        return fn(model, x, timesteps, alphas, extra_args=extra_args, callback=callback, disable=disable, **kw)

    def guided_model(self, make_inner, total_steps: int, mask_before_denoising: bool = False):
        """The CFG denoiser as the sampler's `model(x, sigma, **extra_args)`, with the explicit call index.

        With a refiner (`refiner_checkpoint`), the first call whose noise level has passed `refiner_switch_at`
        swaps in the refiner for the rest of the run, as A1111 v1.10 `apply_refiner` does: the completed ratio is
        `(999 - t) / 1000` with t the discrete timestep nearest to max(sigma); the conditioning is re-encoded with
        the refiner's text encoders (prompt schedules keep counting calls), and it has no image conditioning.
        """
        def build():
            return CFGDenoiser(make_inner(), mask=self.mask, nmask=self.nmask, init_latent=self.init_latent,
                               image_cfg_scale=getattr(self, "image_cfg_scale", None),
                               is_edit_model=self.sd_model.family.conditioning == "edit",
                               mask_before_denoising=mask_before_denoising)

        state = {"cfg": build(), "args": {}}
        calls = iter(range(1 << 62))

        def call(x, sigma, **extra_args):
            if self.refiner is not None and self.sd_model is not self.refiner and self.refiner_due(sigma, state):
                self.sd_model = self.refiner
                c, uc = self.setup_conds(*self.batch_prompts)
                state["cfg"] = build()
                state["args"] = {**self.cond_extra_args(c, uc), "image_cond": None}
                self.extra_generation_params["Refiner"] = f"{self.refiner.name} [{self.refiner.shorthash()}]"
                self.extra_generation_params["Refiner switch at"] = self.refiner_switch_at
            return state["cfg"](x, sigma, step=next(calls), total_steps=total_steps,
                                **{**extra_args, **state["args"]})

        return call

    def refiner_due(self, sigma: torch.Tensor, state) -> bool:
        """Whether the completed ratio `(999 - t) / 1000` has reached `refiner_switch_at` (A1111 v1.10)."""
        inner = state["cfg"].inner
        if hasattr(inner, "sigmas"):
            t = int(torch.argmin((inner.sigmas.to(sigma.device) - sigma.max()).abs()))
        else:  # timestep samplers pass timesteps
            t = int(sigma.max())
        return (999 - t) / 1000 >= self.refiner_switch_at

    def traced(self, model):
        """`model`, reporting every call to `self.model_callback` (if set) as a k-diffusion-style dict:
        {"i": call index, "x": input [B,C,h,w], "sigma"/"sigma_hat": sigma (or timestep) of image 0,
        "denoised": output}. Unlike the sampler callback (once per step) this sees second-order sub-steps too."""
        report = getattr(self, "model_callback", None)
        if report is None:
            return model
        calls = iter(range(1 << 62))

        def call(x, sigma, **kwargs):
            out = model(x, sigma, **kwargs)
            denoised = out[0] if isinstance(out, tuple) else out
            report({"i": next(calls), "x": x, "sigma": sigma[0], "sigma_hat": sigma[0], "denoised": denoised})
            return out

        return call

    def record_schedule_type(self) -> None:
        """Infotext "Schedule type": the resolved label unless Automatic resolves to nothing (spec 9.3)."""
        automatic = self.scheduler in (None, "automatic", "Automatic")
        if not automatic or self.sampler.scheduler:
            name = self.sampler.scheduler if automatic else self.scheduler
            self.extra_generation_params["Schedule type"] = schedules.find_scheduler(name).label


def as_cond_dict(cond) -> dict[str, torch.Tensor]:
    """CFGDenoiser's cond format: a text tensor [N,T,C] becomes {"c_crossattn": it}; dicts pass through."""
    return dict(cond) if isinstance(cond, dict) else {"c_crossattn": cond}


def _expand(value: str | list[str], n: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * n
    if isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name}: must be a str or a list of batch_size * n_iter = {n} str; got {value!r:.80}")


@dataclass
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """img2img and inpainting (A1111 `StableDiffusionProcessingImg2Img`, spec 1-2, 6).

    Fields (spec 1): `init_images` list of PIL images (any size; resized per `resize_mode` 0 just resize,
    1 crop and resize, 2 resize and fill, 3 just resize in latent space); `denoising_strength` in [0, 1];
    `mask` PIL image, white (255) = regenerate, black = keep (RGBA: its alpha, when not fully opaque);
    `mask_blur_x/y` Gaussian sigma in pixels (`mask_blur` sets both); `inpainting_fill` 0 fill, 1 original,
    2 latent noise, 3 latent nothing; `inpaint_full_res` True = "Only masked" with `inpaint_full_res_padding` pixels;
    `inpainting_mask_invert` 1 = inpaint what is not masked; `image_cfg_scale` for instruct-pix2pix only.
    After `init()`: `init_latent` [B,4,h,w], `mask` / `nmask` [1 or B,4,h,w] (keep / regenerate weights),
    `image_conditioning` [B,5,h,w] for 9-channel models else None, `overlay_images`, `mask_for_overlay`.
    """

    init_images: list | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: Any = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: Any = None
    force_task_id: str | None = None

    image_mask: Any = field(default=None, init=False)
    nmask: torch.Tensor | None = field(default=None, init=False)
    image_conditioning: torch.Tensor | None = field(default=None, init=False)
    init_img_hash: str | None = field(default=None, init=False)
    mask_for_overlay: Image.Image | None = field(default=None, init=False)
    init_latent: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        self.image_mask = self.mask
        self.mask = None
        if self.mask_blur is not None:
            self.mask_blur_x = self.mask_blur_y = self.mask_blur
        if self.initial_noise_multiplier is None:
            self.initial_noise_multiplier = self.opts.initial_noise_multiplier
        if self.force_task_id is not None:
            self.extra_generation_params["Task ID"] = self.force_task_id

    @property
    def mask_blur_value(self) -> int | None:
        """A1111's `mask_blur` property: the blur when x == y, else None."""
        return self.mask_blur_x if self.mask_blur_x == self.mask_blur_y else None

    def validate(self) -> None:
        super().validate()
        if not self.init_images:
            raise ValueError("init_images: empty; img2img needs at least one PIL image")
        for i, im in enumerate(self.init_images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"init_images[{i}]: {type(im).__name__}; must be a PIL.Image.Image")
        if len(self.init_images) > self.batch_size and len(self.init_images) > 1:
            raise ValueError(f"init_images: {len(self.init_images)} images but batch_size is {self.batch_size} "
                             "(A1111: 'bad number of images passed')")
        if not isinstance(self.denoising_strength, (int, float)) or not 0 <= self.denoising_strength <= 1:
            raise ValueError(f"denoising_strength: {self.denoising_strength!r}; must be in [0, 1]")
        if self.resize_mode not in (0, 1, 2, 3):
            raise ValueError(f"resize_mode: {self.resize_mode!r}; allowed: 0 just resize, 1 crop and resize, "
                             "2 resize and fill, 3 just resize (latent upscale)")
        if self.inpainting_fill not in (0, 1, 2, 3):
            raise ValueError(f"inpainting_fill: {self.inpainting_fill!r}; allowed: 0 fill, 1 original, "
                             "2 latent noise, 3 latent nothing")
        for name in ("mask_blur_x", "mask_blur_y", "inpaint_full_res_padding"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name}: {v!r}; must be >= 0 (pixels)")
        if self.inpainting_mask_invert not in (0, 1, False, True):
            raise ValueError(f"inpainting_mask_invert: {self.inpainting_mask_invert!r}; allowed: 0, 1")
        if self.image_mask is not None and not isinstance(self.image_mask, Image.Image):
            raise TypeError(f"mask: {type(self.image_mask).__name__}; must be a PIL.Image.Image")
        if self.image_mask is not None and self.image_mask.size != self.init_images[0].size:
            raise ValueError(f"mask: size {self.image_mask.size} differs from init_images[0] size "
                             f"{self.init_images[0].size}")

    # -- init (spec 2) -------------------------------------------------------------------------------------------

    def init(self, all_prompts: list[str], all_seeds: list[int], all_subseeds: list[int]) -> None:
        """Prepare init_latent, the masks, overlays and image conditioning (spec 2, in the reference's order)."""
        sd = self.sd_model
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        if self.image_cfg_scale is not None and sd.family.conditioning != "edit":
            self.image_cfg_scale = None
        crop_region = None
        image_mask = self.image_mask
        if image_mask is not None:
            image_mask = images.create_binary_mask(image_mask, round=self.mask_round)
            if self.inpainting_mask_invert:
                image_mask = ImageOps.invert(image_mask)
                self.extra_generation_params["Mask mode"] = "Inpaint not masked"
            if self.mask_blur_x > 0 or self.mask_blur_y > 0:
                image_mask = images.blur_mask(image_mask, self.mask_blur_x, self.mask_blur_y)
                self.extra_generation_params["Mask blur"] = self.mask_blur_value
            if self.inpaint_full_res:
                self.mask_for_overlay = image_mask
                crop_region = images.get_crop_region_v2(image_mask, self.inpaint_full_res_padding)
                if crop_region is not None:
                    crop_region = images.expand_crop_region(crop_region, self.width, self.height,
                                                            image_mask.width, image_mask.height)
                    x1, y1, x2, y2 = crop_region
                    image_mask = images.resize_image(2, image_mask.crop(crop_region), self.width, self.height)
                    self.paste_to = (x1, y1, x2 - x1, y2 - y1)
                    self.extra_generation_params["Inpaint area"] = "Only masked"
                    self.extra_generation_params["Masked area padding"] = self.inpaint_full_res_padding
                else:
                    image_mask = None
                    self.mask_for_overlay = None
                    self.inpaint_full_res = False
                    self.comments["blank mask"] = ('Unable to perform "Inpaint Only mask" because mask is blank, '
                                                   "switch to img2img mode.")
            else:
                image_mask = images.resize_image(self.resize_mode, image_mask, self.width, self.height)
                self.mask_for_overlay = images.double_mask_for_overlay(image_mask)
            self.overlay_images = []
        self.image_mask = image_mask
        latent_mask = self.latent_mask if self.latent_mask is not None else image_mask

        if self.opts.img2img_color_correction and self.color_corrections is None:
            self.color_corrections = []
        imgs = []
        for img in self.init_images:
            self.init_img_hash = hashlib.md5(img.tobytes()).hexdigest()
            image = images.flatten(img, self.opts.img2img_background_color)
            if crop_region is None and self.resize_mode != 3:
                image = images.resize_image(self.resize_mode, image, self.width, self.height)
            if image_mask is not None:
                overlay_mask = self.mask_for_overlay
                if overlay_mask.size != image.size:
                    overlay_mask = images.resize_image(self.resize_mode, overlay_mask, image.width, image.height)
                    overlay_mask = overlay_mask.convert("L")
                self.overlay_images.append(images.make_overlay(image, overlay_mask))
            if crop_region is not None:
                image = images.resize_image(2, image.crop(crop_region), self.width, self.height)
            if image_mask is not None and self.inpainting_fill != 1:
                image = images.fill(image, latent_mask.convert("L"))
                if self.inpainting_fill == 0:
                    self.extra_generation_params["Masked content"] = "fill"
            if self.color_corrections is not None:
                self.color_corrections.append(images.setup_color_correction(image))
            imgs.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)

        if len(imgs) == 1:
            imgs = imgs * self.batch_size
            if self.overlay_images:
                self.overlay_images = self.overlay_images * self.batch_size
            if self.color_corrections:
                self.color_corrections = self.color_corrections * self.batch_size
        elif len(imgs) <= self.batch_size:
            self.batch_size = len(imgs)
        else:
            raise RuntimeError(f"bad number of images passed: {len(imgs)}; expecting {self.batch_size} or less")

        pixels = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 1]
        source = (2.0 * pixels - 1.0).to(sd.device)
        self.init_latent = self.encode_first_stage(source, all_seeds)
        if self.resize_mode == 3:
            self.init_latent = F.interpolate(self.init_latent, size=(self.height // 8, self.width // 8),
                                             mode="bilinear")
        if image_mask is not None:
            h, w = self.init_latent.shape[2:]
            latmask = images.latent_mask(latent_mask, w, h, round=self.mask_round).to(sd.device)
            latmask = latmask.expand(1, self.init_latent.shape[1], h, w).float()
            self.mask = 1.0 - latmask
            self.nmask = latmask
            if self.inpainting_fill == 2:
                noise = rng.ImageRNG(tuple(self.init_latent.shape[1:]), all_seeds[: self.init_latent.shape[0]],
                                     source=self.opts.randn_source, device=sd.device).next()
                self.init_latent = self.init_latent * self.mask + noise.float() * self.nmask
                self.extra_generation_params["Masked content"] = "latent noise"
            elif self.inpainting_fill == 3:
                self.init_latent = self.init_latent * self.mask
                self.extra_generation_params["Masked content"] = "latent nothing"
        self.image_conditioning = self.img2img_image_conditioning(source, self.init_latent, image_mask, all_seeds)

    # -- sample (spec 6) -----------------------------------------------------------------------------------------

    def sample(self, c, uc, seeds: list[int], subseeds: list[int], noise_rng: rng.ImageRNG, prompts=None,
               negative_prompts=None, callback=None, disable_progress: bool | None = None) -> torch.Tensor:
        """Latents [B,4,h,w] for this iteration's images (spec 6.1-6.4)."""
        x = noise_rng.next().float()
        if self.initial_noise_multiplier != 1.0:
            self.extra_generation_params["Noise multiplier"] = self.initial_noise_multiplier
            x = x * self.initial_noise_multiplier
        steps, t_enc = schedules.setup_img2img_steps(self.steps, self.denoising_strength, self.opts.img2img_fix_steps)
        run = self.run_timestep_sampler if self.sampler.kind == "timestep" else self.run_kdiffusion_sampler
        samples = run(x, steps, t_enc, self.cond_extra_args(c, uc), noise_rng, seeds, callback, disable_progress)
        if self.mask is not None:
            samples = samples * self.nmask + self.init_latent * self.mask
        return samples


@dataclass
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """txt2img, optionally with the hires fix (A1111 `StableDiffusionProcessingTxt2Img`).

    The first pass samples from pure noise at `width` x `height`. With `enable_hr`, the result is upscaled by
    `hr_scale` (or to `hr_resize_x` x `hr_resize_y` pixels) in latent space (`hr_upscaler` "Latent",
    "Latent (nearest)", "Latent (antialiased)", "Latent (bicubic)", ...) or in pixel space (any other name:
    decode, PIL Lanczos/nearest resize, encode), then denoised again as img2img with `denoising_strength` and
    `hr_second_pass_steps` (0 = `steps`) as an explicit step count (spec 6.2: the fix-steps rule).
    """

    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None

    LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                        "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                        "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
    PIXEL_UPSCALERS = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}

    def validate(self) -> None:
        super().validate()
        if self.hr_checkpoint_name is not None:
            raise NotImplementedError("hr_checkpoint_name is not implemented in sdcore (allowed: None)")
        if self.firstphase_width or self.firstphase_height:
            raise NotImplementedError("firstphase_width/height (legacy hires fields) are not implemented; "
                                      "use hr_scale or hr_resize_x/y")
        if self.enable_hr:
            upscaler = self.hr_upscaler or "Latent"
            if upscaler not in self.LATENT_UPSCALERS and upscaler not in self.PIXEL_UPSCALERS:
                raise ValueError(f"hr_upscaler: {upscaler!r}; allowed: "
                                 f"{sorted(self.LATENT_UPSCALERS) + sorted(self.PIXEL_UPSCALERS)}")
            if not 0 <= self.denoising_strength <= 1:
                raise ValueError(f"denoising_strength: {self.denoising_strength!r}; must be in [0, 1]")
            w, h = self.hr_size()
            if w % 8 or h % 8 or w < 8 or h < 8:
                raise ValueError(f"hires size {w}x{h} (hr_scale {self.hr_scale}, hr_resize {self.hr_resize_x}x"
                                 f"{self.hr_resize_y}) must be positive multiples of 8 pixels")

    def hr_size(self) -> tuple[int, int]:
        """Target (width, height) of the hires pass (A1111 `calculate_target_resolution`; resize wins over scale,
        one resize side 0 keeps the aspect ratio)."""
        if not self.hr_resize_x and not self.hr_resize_y:
            return int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        if not self.hr_resize_y:
            return self.hr_resize_x, self.hr_resize_x * self.height // self.width
        if not self.hr_resize_x:
            return self.hr_resize_y * self.width // self.height, self.hr_resize_y
        return self.hr_resize_x, self.hr_resize_y

    def init(self, all_prompts: list[str], all_seeds: list[int], all_subseeds: list[int]) -> None:
        """Record the hires-fix parameters in the infotext (txt2img has no images or masks to prepare)."""
        if self.enable_hr:
            extra = self.extra_generation_params
            extra["Denoising strength"] = self.denoising_strength
            if self.hr_resize_x or self.hr_resize_y:
                w, h = self.hr_size()
                extra["Hires resize"] = f"{w}x{h}"
            else:
                extra["Hires upscale"] = self.hr_scale
            if self.hr_second_pass_steps:
                extra["Hires steps"] = self.hr_second_pass_steps
            extra["Hires upscaler"] = self.hr_upscaler or "Latent"

    def sample(self, c, uc, seeds: list[int], subseeds: list[int], noise_rng: rng.ImageRNG, prompts=None,
               negative_prompts=None, callback=None, disable_progress: bool | None = None) -> torch.Tensor:
        """Latents of the first pass (from noise), then of the hires pass when enabled."""
        x = noise_rng.next().float()
        self.image_conditioning = self.txt2img_image_conditioning(x, seeds)
        cond_args = self.cond_extra_args(c, uc)
        if self.sampler.kind == "timestep":
            from .sampling.timesteps import get_timesteps

            timesteps = get_timesteps(self.steps, self.sampler.discard_next_to_last_sigma, device=x.device)
            samples = self.launch_timestep_sampling(x, timesteps, cond_args, noise_rng, callback, disable_progress,
                                                    is_img2img=False)
        else:
            sigmas = self.get_sigmas(self.steps).to(x.device)
            samples = self.launch_sampling(x * sigmas[0], sigmas, sigmas, self.steps, cond_args, noise_rng, seeds,
                                           callback, disable_progress)
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples, seeds, subseeds, prompts, negative_prompts, callback, disable_progress)

    def sample_hr_pass(self, samples, seeds, subseeds, prompts, negative_prompts, callback, disable_progress):
        """Upscale the first-pass latents and denoise them again as img2img (A1111 `sample_hr_pass`)."""
        w, h = self.hr_size()
        upscaler = self.hr_upscaler or "Latent"
        if upscaler in self.LATENT_UPSCALERS:
            mode, antialias = self.LATENT_UPSCALERS[upscaler]
            samples = F.interpolate(samples, size=(h // 8, w // 8), mode=mode, antialias=antialias)
            source = None
        else:
            decoded = [im.resize((w, h), self.PIXEL_UPSCALERS[upscaler]) for im in self.decode_first_stage(samples)]
            px = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255.0 for im in decoded]))
            source = (2.0 * px.permute(0, 3, 1, 2) - 1.0).to(samples.device)
            samples = self.encode_first_stage(source, seeds)
        if self.sd_model.family.conditioning == "hybrid":
            if source is None:
                px = [torch.from_numpy(np.asarray(im, np.float32) / 255.0) for im in self.decode_first_stage(samples)]
                source = (2.0 * torch.stack(px).permute(0, 3, 1, 2) - 1.0).to(samples.device)
            self.image_conditioning = self.img2img_image_conditioning(source, samples, None, seeds)
        else:
            self.image_conditioning = None
        self.init_latent = samples
        hr_rng = rng.ImageRNG(tuple(samples.shape[1:]), seeds, subseeds=subseeds,
                              subseed_strength=self.subseed_strength, seed_resize_from_h=self.seed_resize_from_h,
                              seed_resize_from_w=self.seed_resize_from_w, source=self.opts.randn_source,
                              device=samples.device, eta_noise_seed_delta=self.opts.eta_noise_seed_delta)
        noise = hr_rng.next().float()
        hr_steps = self.hr_second_pass_steps or self.steps
        base = (self.sampler, self.scheduler)
        if self.hr_sampler_name or self.hr_scheduler:
            self.sampler, scheduler = find_sampler(self.hr_sampler_name or self.sampler.name)
            self.scheduler = self.hr_scheduler or scheduler or self.scheduler
            self.extra_generation_params["Hires sampler"] = self.sampler.name
            if self.hr_scheduler:
                self.extra_generation_params["Hires schedule type"] = schedules.find_scheduler(self.hr_scheduler).label
        try:
            if self.hr_prompt:
                self.extra_generation_params["Hires prompt"] = self.hr_prompt
            if self.hr_negative_prompt:
                self.extra_generation_params["Hires negative prompt"] = self.hr_negative_prompt
            hr_prompts = [self.hr_prompt or p for p in prompts]
            hr_negative = [self.hr_negative_prompt or p for p in negative_prompts]
            c, uc = self.setup_conds(hr_prompts, hr_negative, hires_steps=self.sampler.total_steps(hr_steps))
            steps, t_enc = schedules.setup_img2img_steps(hr_steps, self.denoising_strength, fix_steps=True)
            run = self.run_timestep_sampler if self.sampler.kind == "timestep" else self.run_kdiffusion_sampler
            return run(noise, steps, t_enc, self.cond_extra_args(c, uc), hr_rng, seeds, callback, disable_progress)
        finally:
            self.sampler, self.scheduler = base


@dataclass
class Processed:
    """Result of `process_images` (A1111 `Processed`): images and what made them.

    `images`: PIL RGB images, one per prompt (batch_size * n_iter); `seeds`/`subseeds`/`prompts`/`infotexts`
    aligned with them; `paths` where they were saved (empty when not saved). The internal state of the last
    iteration is kept for inspection: `init_latent`, `mask`, `nmask`, `image_conditioning` (tensors),
    `overlay_images`, `mask_for_overlay` (PIL).
    """

    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    infotexts: list[str]
    paths: list[Path]
    comments: dict
    init_latent: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    nmask: torch.Tensor | None = None
    image_conditioning: torch.Tensor | None = None
    overlay_images: list | None = None
    mask_for_overlay: Image.Image | None = None

    @property
    def seed(self) -> int:
        return self.seeds[0]

    @property
    def info(self) -> str:
        return self.infotexts[0]


def create_infotext(p: StableDiffusionProcessing, index: int) -> str:
    """The A1111 "parameters" text of image `index` (spec 9.3)."""
    sd = p.sd_model
    resize = (p.seed_resize_from_w, p.seed_resize_from_h)
    return infotext.create_infotext(
        p.all_prompts[index], p.all_negative_prompts[index], steps=p.steps, sampler=p.sampler.name,
        scheduler=p.scheduler or "Automatic", cfg_scale=p.cfg_scale, image_cfg_scale=getattr(p, "image_cfg_scale", None),
        seed=p.all_seeds[index], width=p.width, height=p.height, model_hash=sd.shorthash(), model=sd.name,
        vae_hash=sd.vae_shorthash(), vae=sd.vae_name,
        subseed=p.all_subseeds[index] if p.subseed_strength else None,
        subseed_strength=p.subseed_strength or None,
        seed_resize_from=resize if min(resize) > 0 else None,
        conditional_mask_weight=p.opts.inpainting_mask_weight if p.is_using_inpainting_conditioning else None,
        clip_skip=p.opts.CLIP_stop_at_last_layers if p.opts.CLIP_stop_at_last_layers > 1 else None,
        ensd=p.opts.eta_noise_seed_delta if p.opts.eta_noise_seed_delta and p.sampler.uses_ensd
        and (p.eta if p.eta is not None else p.opts.eta_ancestral) != 0 else None,
        rng=p.opts.randn_source if p.opts.randn_source != "GPU" else None,
        extra=p.extra_generation_params, version=VERSION)


def process_images(p: StableDiffusionProcessing, callback=None, disable_progress: bool | None = None,
                   model_callback=None) -> Processed:
    """Run a whole job: validate, init once, then n_iter iterations of sample -> decode -> overlay -> save.

    Follows `process_images_inner` (spec 9). Images are saved (never overwriting) when `p.outpath_samples` is
    set and `do_not_save_samples` is False. `callback` receives k-diffusion's per-step dict; `model_callback`
    receives one dict per model (CFG denoiser) call, e.g. a `sdcore.sampling.samplers.TraceRecorder`.
    """
    p.model_callback = model_callback
    p.validate()
    p.sampler, scheduler = find_sampler(p.sampler_name or "DPM++ 2M")
    if scheduler is not None and p.scheduler in (None, "automatic", "Automatic"):
        p.scheduler = scheduler
    p.setup_prompts()
    p.setup_seeds()
    sd = p.sd_model
    out_images, infotexts, paths = [], [], []
    try:
        with torch.inference_mode():
            p.init(p.all_prompts, p.all_seeds, p.all_subseeds)
            for n in range(p.n_iter):
                sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
                seeds, subseeds = p.all_seeds[sl], p.all_subseeds[sl]
                noise_rng = p.make_rng(seeds, subseeds)
                p.batch_prompts = (p.all_prompts[sl], p.all_negative_prompts[sl])
                c, uc = p.setup_conds(*p.batch_prompts)
                samples = p.sample(c, uc, seeds, subseeds, noise_rng, prompts=p.all_prompts[sl],
                                   negative_prompts=p.all_negative_prompts[sl], callback=callback,
                                   disable_progress=disable_progress)
                decoded = p.decode_first_stage(samples.to(sd.device))  # the refiner's VAE after a switch, as A1111
                p.sd_model = sd
                for i, image in enumerate(decoded):
                    index = n * p.batch_size + i
                    if p.color_corrections is not None and i < len(p.color_corrections):
                        image = images.apply_color_correction(p.color_corrections[i], image)
                    if p.overlay_images is not None and p.opts.overlay_inpaint and i < len(p.overlay_images):
                        image = images.apply_overlay(image, p.paste_to, p.overlay_images[i])
                    text = create_infotext(p, index)
                    if p.outpath_samples and not p.do_not_save_samples:
                        paths.append(images.save_image(image, p.outpath_samples, p.all_seeds[index], text,
                                                        date_subfolder=p.opts.save_to_dirs))
                    out_images.append(image)
                    infotexts.append(text)
    finally:
        p.sd_model = sd  # a refiner switch replaced it for the rest of the run
    return Processed(images=out_images, seeds=list(p.all_seeds), subseeds=list(p.all_subseeds),
                     prompts=list(p.all_prompts), negative_prompts=list(p.all_negative_prompts),
                     infotexts=infotexts, paths=paths, comments=dict(p.comments),
                     init_latent=getattr(p, "init_latent", None), mask=getattr(p, "mask", None),
                     nmask=getattr(p, "nmask", None), image_conditioning=getattr(p, "image_conditioning", None),
                     overlay_images=p.overlay_images, mask_for_overlay=getattr(p, "mask_for_overlay", None))
