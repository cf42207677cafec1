"""The A1111 adapter: `StableDiffusionProcessingImg2Img` / `...Txt2Img` jobs, `Options`, `process_images`, `Processed`.

A job object holds AUTOMATIC1111 v1.10.1's fields under their names and defaults (a1111-semantics §1). Running it
(`process_images`) maps those fields and the global `Options` onto the arguments of `pipeline.img2img`,
`pipeline.txt2img` and `pipeline.hires_fix`, one pipeline call per batch (`n_iter` of them), and builds the infotext
and `Processed` from what the pipeline returns. The algorithm itself is in `pipeline.py`; what is here is A1111's
bookkeeping: seed lists, the sampler's option quirks, infotext keys in A1111's order, file saving.

A run never changes the job's fields or the model: the same job run twice gives the same bytes (with a fixed seed).

Glossary: B batch, C latent channels, H x W pixels, h x w = H/8 x W/8 latent cells; sigma is the noise standard
deviation of k-diffusion's parameterisation x = x0 + sigma * eps.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import extra_networks, images, infotext, pipeline, resources, rng
from .checkpoint import StableDiffusionModel, load_checkpoint
from .plan import DryRun, Plan, SamplingPass, stand_in_model
from .sampling import schedules
from .sampling.blends import MaskBlend, make_blend
from .sampling.samplers import SamplerInfo, find_sampler

VERSION = infotext.VERSION


@dataclass(frozen=True)
class Options:
    """A1111 global settings that change img2img numbers, as explicit parameters with the reference defaults.

    Names are the option names of `modules/shared_options.py` (a1111-semantics §1, "Relevant global options"). One
    deliberate
    difference: `randn_source` defaults to "CPU" (A1111: "GPU"), so the same seed gives the same image on every
    device; "GPU" draws on the model's device, "NV" uses the Philox generator (a1111-semantics §8.3).
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
    beta_dist_alpha: float = 0.6  # the Beta scheduler's alpha (a1111-semantics §17)
    beta_dist_beta: float = 0.6
    # A1111 command-line options: where `<lora:name>` and embedding names are looked up (None = nowhere)
    lora_dir: str | None = None
    embeddings_dir: str | None = None
    # sdcore's, not an A1111 option (A1111 v1.10.1 has no VAE tiling; extensions add it): True = always tile the
    # VAE, False = never, None = when the untiled VAE would not fit in the memory available (pipeline.img2img's
    # `vae_tiling`; the result is the untiled VAE's up to float rounding, so it writes no infotext key)
    vae_tiling: bool | None = None



@dataclass
class StableDiffusionProcessing:
    """Fields shared by txt2img and img2img (A1111 `StableDiffusionProcessing`, a1111-semantics §1).

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

    # Fields accepted for signature compatibility whose non-default values sdcore cannot honour.
    _NOT_IMPLEMENTED = {
        "styles": (None, []), "restore_faces": (None, False), "tiling": (None, False),
        "ddim_discretize": (None, "uniform"), "sampler_index": (None,), "token_merging_ratio": (0, 0.0),
        "token_merging_ratio_hr": (0, 0.0), "firstpass_image": (None,), "outpath_grids": (None,),
        "prompt_for_display": (None,), "do_not_save_grid": (False,), "do_not_reload_embeddings": (False,),
        "override_settings_restore_afterwards": (True,),
        "overlay_images": (None,),
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
        """Raise ValueError / NotImplementedError for values outside what the reference allows (changes nothing)."""
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
        if self.opts.vae_tiling is not None and not isinstance(self.opts.vae_tiling, bool):
            raise ValueError(f"opts.vae_tiling: {self.opts.vae_tiling!r}; allowed: True, False or None (automatic)")
        if self.opts.randn_source not in ("CPU", "GPU", "NV"):
            raise ValueError(f"opts.randn_source: {self.opts.randn_source!r}; allowed: 'CPU', 'GPU', 'NV'")
        if self.refiner_checkpoint is not None:
            sw = self.refiner_switch_at
            if isinstance(sw, bool) or not isinstance(sw, (int, float)) or not 0 < sw < 1:
                raise ValueError(f"refiner_switch_at: {sw!r}; must be in (0, 1) with a refiner_checkpoint")
        resources.check_processing(self)  # a size that cannot fit is refused before anything is allocated

    def load_refiner(self) -> pipeline.Refiner | None:
        """The refiner of `refiner_checkpoint` (a path is loaded on the model's device and dtype), or None.
        Raises ValueError when its latent channels differ from the model's."""
        if self.refiner_checkpoint is None:
            return None
        refiner = self.refiner_checkpoint
        if not isinstance(refiner, StableDiffusionModel):
            refiner = load_checkpoint(refiner, device=self.sd_model.device, dtype=self.sd_model.dtype)
        if refiner.family.unet.out_channels != self.sd_model.family.unet.out_channels:
            raise ValueError(f"refiner_checkpoint: {refiner.name} has {refiner.family.unet.out_channels} latent "
                             f"channels, the model {self.sd_model.family.unet.out_channels}")
        return pipeline.Refiner(refiner, self.refiner_switch_at)

    def load_networks(self, requests: list[extra_networks.LoraRequest], loaded: dict[Path, Any]
                      ) -> list[tuple[Any, float, float]]:
        """The LoRA files of a batch's `<lora:...>` tags, read from `opts.lora_dir` (each file once per job, kept
        in `loaded`): (Network, te multiplier, unet multiplier, dyn rank or None, the name as written). Raises
        ValueError naming an unknown name (with the names available) or an unreadable file."""
        if not requests:
            return []
        from . import networks  # imports torch modules only the LoRA path needs

        active = []
        for r in requests:
            path = extra_networks.find_lora(r.name, self.opts.lora_dir, what="opts.lora_dir (--lora-dir)")
            if path not in loaded:
                loaded[path] = networks.load_network(path, self.sd_model)
            active.append((loaded[path], r.te_multiplier, r.unet_multiplier, r.dyn_dim, r.name))
        return active

    def resolve_sampler(self) -> tuple[SamplerInfo, str | None]:
        """(sampler row, scheduler): `sampler_name` (default "DPM++ 2M"); a scheduler carried in the sampler name
        ("DPM++ 2M Karras") is used when `scheduler` is None/Automatic (A1111 `fix_p_invalid_sampler_and_scheduler`)."""
        info, from_name = find_sampler(self.sampler_name or "DPM++ 2M")
        if from_name is not None and self.scheduler in (None, "automatic", "Automatic"):
            return info, from_name
        return info, self.scheduler

    # -- A1111 fields -> pipeline arguments ------------------------------------------------------------------------

    def text_options(self, job: Job) -> pipeline.TextOptions:
        return pipeline.TextOptions(clip_skip=self.opts.CLIP_stop_at_last_layers, emphasis=self.opts.emphasis,
                                    use_old_scheduling=self.opts.use_old_scheduling, embeddings=job.embeddings)

    def seeds_of(self, seeds: list[int], subseeds: list[int]) -> pipeline.Seeds:
        return pipeline.Seeds(tuple(seeds), tuple(subseeds), subseed_strength=self.subseed_strength,
                              seed_resize_from_h=self.seed_resize_from_h, seed_resize_from_w=self.seed_resize_from_w,
                              source=self.opts.randn_source, eta_noise_seed_delta=self.opts.eta_noise_seed_delta)

    def sampler_options(self, model: StableDiffusionModel, sampler: SamplerInfo, scheduler: str | None, *,
                        img2img: bool) -> tuple[pipeline.SamplerOptions, dict]:
        """The sampler's options as A1111 resolves them (a1111-semantics §6.5, §10.2), and the infotext keys they
        produce, in A1111's order.

        eta: p.eta, else `eta_ancestral` (k-diffusion, infotext "Eta" when != 1) or `eta_ddim` (DDIM, "Eta DDIM"
        when != 0). s_churn/s_tmin/s_tmax/s_noise: p's value, else the option; A1111's quirk kept: an option that
        differs from the sampler default (0, 0, inf, 1) wins over p's value and is written to the infotext.
        """
        o, params, kw = self.opts, {}, {}
        timestep = sampler.kind == "timestep"
        discard = sampler.discard_next_to_last_sigma or o.always_discard_next_to_last_sigma
        if not timestep:
            schedule = pipeline.inner_denoiser(model, sampler)
            if o.sigma_min and o.sigma_min != float(schedule.sigma_min):
                params["Schedule min sigma"] = o.sigma_min
            if o.sigma_max and o.sigma_max != float(schedule.sigma_max):
                params["Schedule max sigma"] = o.sigma_max
            name = sampler.scheduler if scheduler in (None, "automatic", "Automatic") else scheduler
            entry = schedules.find_scheduler(name) if name else None
            if o.rho and entry is not None and entry.default_rho is not None and o.rho != entry.default_rho:
                params["Schedule rho"] = o.rho
            if o.always_discard_next_to_last_sigma and not sampler.discard_next_to_last_sigma:
                params["Discard penultimate sigma"] = True
            if entry is not None and entry.name == "beta":
                params["Beta schedule alpha"] = o.beta_dist_alpha
                params["Beta schedule beta"] = o.beta_dist_beta
            if img2img and o.img2img_extra_noise > 0:
                params["Extra noise"] = o.img2img_extra_noise
            if entry is not None:
                params["Schedule type"] = entry.label
        s_min_uncond = self.s_min_uncond if self.s_min_uncond is not None else o.s_min_uncond
        if not timestep and s_min_uncond > 0:
            params["NGMS"] = s_min_uncond
        if "eta" in sampler.extra_params:
            default, label, neutral = (o.eta_ddim, "Eta DDIM", 0.0) if timestep else (o.eta_ancestral, "Eta", 1.0)
            kw["eta"] = self.eta if self.eta is not None else default
            if kw["eta"] != neutral:
                params[label] = kw["eta"]
        for name in sampler.extra_params:
            if name == "eta":
                continue
            option = getattr(o, name)
            if name == "s_tmax" and option == 0:
                option = float("inf")
            value = getattr(self, name)
            if option != CHURN_DEFAULTS.get(name, option):
                value = option
                params[CHURN_LABELS[name]] = option
            kw[name] = option if value is None else value
        return pipeline.SamplerOptions(
            sampler_kwargs=kw, s_min_uncond=s_min_uncond if not timestep else 0.0,
            sigma_min=o.sigma_min or (0.1 if o.use_old_karras_scheduler_sigmas else None),
            sigma_max=o.sigma_max or (10.0 if o.use_old_karras_scheduler_sigmas else None), rho=o.rho or None,
            discard_next_to_last_sigma=discard, beta_alpha=o.beta_dist_alpha, beta_beta=o.beta_dist_beta,
            extra_noise=o.img2img_extra_noise), params

    def prompt_params(self, prompts: list[str], negative_prompts: list[str]) -> dict[str, Any]:
        """Infotext keys of prompt encoding (A1111 `setup_conds`): old timelines, non-default emphasis in use."""
        params = {}
        if self.opts.use_old_scheduling:
            params["Old prompt editing timelines"] = True
        if self.opts.emphasis != "Original" and any("(" in t or "[" in t for t in prompts + negative_prompts):
            params["Emphasis"] = self.opts.emphasis
        return params

    def refiner_params(self, refiner: pipeline.Refiner | None, record: SamplingPass) -> dict[str, Any]:
        if refiner is None or record.refiner_switch_call is None:
            return {}
        return {"Refiner": f"{refiner.model.name} [{refiner.model.shorthash()}]",
                "Refiner switch at": self.refiner_switch_at}

    def infotext(self, index: int, job: Job, params: dict[str, Any]) -> str:
        """The A1111 "parameters" text of image `index` (a1111-semantics §9.3)."""
        sd, o = self.sd_model, self.opts
        resize = (self.seed_resize_from_w, self.seed_resize_from_h)
        eta = self.eta if self.eta is not None else o.eta_ancestral
        return infotext.create_infotext(
            job.prompts[index], job.negative_prompts[index], steps=self.steps, sampler=job.sampler.name,
            scheduler=job.scheduler or "Automatic", cfg_scale=self.cfg_scale, image_cfg_scale=job.image_cfg_scale,
            seed=job.seeds[index], width=self.width, height=self.height, model_hash=sd.shorthash(), model=sd.name,
            vae_hash=sd.vae_shorthash(), vae=sd.vae_name,
            subseed=job.subseeds[index] if self.subseed_strength else None,
            subseed_strength=self.subseed_strength or None,
            seed_resize_from=resize if min(resize) > 0 else None,
            conditional_mask_weight=o.inpainting_mask_weight if sd.family.conditioning == "hybrid" else None,
            clip_skip=o.CLIP_stop_at_last_layers if o.CLIP_stop_at_last_layers > 1 else None,
            ensd=o.eta_noise_seed_delta if o.eta_noise_seed_delta and job.sampler.uses_ensd and eta != 0 else None,
            rng=o.randn_source if o.randn_source != "GPU" else None, extra=params, version=VERSION)


CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
CHURN_LABELS = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}


@dataclass(frozen=True)
class Job:
    """What `process_images` resolved once per job, without touching the job object: the sampler row and
    scheduler, the per-image prompts and seeds (batch_size * n_iter, a1111-semantics §8.1), the effective batch
    size (several init images make a batch of their own size), the refiner, and `image_cfg_scale` (kept for
    instruct-pix2pix models only)."""

    sampler: SamplerInfo
    scheduler: str | None
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    subseeds: list[int]
    batch_size: int
    refiner: pipeline.Refiner | None
    image_cfg_scale: float | None
    embeddings: Any = None  # sdcore.embeddings.EmbeddingDatabase of opts.embeddings_dir, or None


def _expand(value: str | list[str], n: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * n
    if isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name}: must be a str or a list of batch_size * n_iter = {n} str; got {value!r:.80}")


@dataclass
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """img2img and inpainting (A1111 `StableDiffusionProcessingImg2Img`, a1111-semantics §1-2, §6).

    Fields (a1111-semantics §1): `init_images` list of PIL images (any size; resized per `resize_mode` 0 just resize,
    1 crop and resize, 2 resize and fill, 3 just resize in latent space); `denoising_strength` in [0, 1];
    `mask` PIL image, white (255) = regenerate, black = keep (RGBA: its alpha, when not fully opaque);
    `mask_blur_x/y` Gaussian sigma in pixels (`mask_blur` sets both); `inpainting_fill` 0 fill, 1 original,
    2 latent noise, 3 latent nothing; `inpaint_full_res` True = "Only masked" with `inpaint_full_res_padding` pixels;
    `inpainting_mask_invert` 1 = inpaint what is not masked; `image_cfg_scale` for instruct-pix2pix only;
    `mask_blend`: the per-step mask blend strategy, a name of `sampling.blends.BLENDS` ("a1111", "xt",
    "soft_inpainting", "differential") or a `MaskBlend` object (sdcore's field; A1111 selects soft inpainting with
    its script). The run's intermediate tensors (init_latent, mask, nmask, image_conditioning) are in `Processed`.
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
    mask_blend: Any = "a1111"

    def __post_init__(self):
        super().__post_init__()
        if self.mask_blur is not None:
            self.mask_blur_x = self.mask_blur_y = self.mask_blur
        if self.initial_noise_multiplier is None:
            self.initial_noise_multiplier = self.opts.initial_noise_multiplier

    @property
    def image_mask(self) -> Image.Image | None:
        """A1111's name for the user's mask (`mask`)."""
        return self.mask

    @property
    def mask_blur_value(self) -> int | None:
        """A1111's `mask_blur` property: the blur when x == y, else None."""
        return self.mask_blur_x if self.mask_blur_x == self.mask_blur_y else None

    def blend(self) -> MaskBlend:
        """The mask blend strategy of `mask_blend` (a name or a MaskBlend). Raises ValueError for an unknown name,
        TypeError for anything else."""
        if isinstance(self.mask_blend, str):
            return make_blend(self.mask_blend)
        if not isinstance(self.mask_blend, MaskBlend):
            raise TypeError(f"mask_blend: {self.mask_blend!r}; must be a name of sdcore.sampling.blends.BLENDS "
                            "or a MaskBlend object")
        return self.mask_blend

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
        if self.mask is not None and not isinstance(self.mask, Image.Image):
            raise TypeError(f"mask: {type(self.mask).__name__}; must be a PIL.Image.Image")
        if self.mask is not None and images.viewed_size(self.mask) != images.viewed_size(self.init_images[0]):
            raise ValueError(f"mask: size {images.viewed_size(self.mask)} differs from init_images[0] size "
                             f"{images.viewed_size(self.init_images[0])} (as shown, EXIF orientation applied)")
        self.blend()

    def effective_batch_size(self) -> int:
        """Several init images make a batch of their own size (A1111 `init`), one image is repeated."""
        n = len(self.init_images)
        return n if 1 < n <= self.batch_size else self.batch_size

    def masking(self) -> pipeline.MaskOptions:
        return pipeline.MaskOptions(
            mask_blur_x=self.mask_blur_x, mask_blur_y=self.mask_blur_y, mask_round=self.mask_round,
            inpainting_fill=self.inpainting_fill, inpaint_full_res=self.inpaint_full_res,
            inpaint_full_res_padding=self.inpaint_full_res_padding,
            inpainting_mask_invert=bool(self.inpainting_mask_invert),
            inpainting_mask_weight=self.opts.inpainting_mask_weight, overlay=self.opts.overlay_inpaint,
            latent_mask=self.latent_mask)

    def run_batch(self, job: Job, seeds: list[int], subseeds: list[int], prompts: list[str],
                  negative_prompts: list[str], callback, model_callback, disable_progress,
                  network_params: dict[str, Any] | None = None):
        """One pipeline.img2img call; returns (Result, infotext keys in A1111's order). `network_params`: the
        "Lora hashes" / "TI hashes" keys of the batch (`network_params`), placed where A1111 adds them."""
        options, sampler_params = self.sampler_options(self.sd_model, job.sampler, job.scheduler, img2img=True)
        options = dataclasses.replace(options, initial_noise_multiplier=self.initial_noise_multiplier,
                                      fix_steps=self.opts.img2img_fix_steps)
        blend = self.blend()
        result = pipeline.img2img(
            self.sd_model, self.init_images, self.mask, prompts, negative_prompts, sampler=job.sampler,
            scheduler=job.scheduler, steps=self.steps, denoising_strength=self.denoising_strength,
            cfg_scale=self.cfg_scale, seeds=self.seeds_of(seeds, subseeds), width=self.width, height=self.height,
            blend=blend, resize_mode=self.resize_mode, masking=self.masking(), options=options,
            text=self.text_options(job), image_cfg_scale=job.image_cfg_scale,
            background_color=self.opts.img2img_background_color, color_correction=self.opts.img2img_color_correction,
            vae_sample=self.opts.vae_encode_sample, fill_seeds=job.seeds[:job.batch_size], refiner=job.refiner,
            callback=callback, model_callback=model_callback, disable_progress=disable_progress,
            vae_tiling=self.opts.vae_tiling)
        params = self.init_params(result.plan)
        if result.nmask is not None:
            params.update(blend.infotext())
        params.update(network_params or {})
        params.update(self.prompt_params(prompts, negative_prompts))
        if self.initial_noise_multiplier != 1.0:
            params["Noise multiplier"] = self.initial_noise_multiplier
        params.update(sampler_params)
        params.update(self.refiner_params(job.refiner, result.plan.passes[0]))
        return result, params

    def init_params(self, plan: Plan) -> dict[str, Any]:
        """Infotext keys of the input preparation, in A1111's order (`StableDiffusionProcessingImg2Img.init`)."""
        params: dict[str, Any] = {}
        if self.force_task_id is not None:
            params["Task ID"] = self.force_task_id
        params["Denoising strength"] = self.denoising_strength
        if self.mask is None:
            return params
        if self.inpainting_mask_invert:
            params["Mask mode"] = "Inpaint not masked"
        if self.mask_blur_x > 0 or self.mask_blur_y > 0:
            params["Mask blur"] = self.mask_blur_value
        if plan.paste_to is not None:
            params["Inpaint area"] = "Only masked"
            params["Masked area padding"] = self.inpaint_full_res_padding
        if not plan.blank_mask and self.inpainting_fill != 1:
            params["Masked content"] = ["fill", None, "latent noise", "latent nothing"][self.inpainting_fill]
        return params


@dataclass
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """txt2img, optionally with the hires fix (A1111 `StableDiffusionProcessingTxt2Img`).

    The first pass samples from pure noise at `width` x `height`. With `enable_hr`, the result is upscaled by
    `hr_scale` (or to `hr_resize_x` x `hr_resize_y` pixels) in latent space (`hr_upscaler` "Latent",
    "Latent (nearest)", "Latent (antialiased)", "Latent (bicubic)", ...) or in pixel space (any other name:
    decode, PIL Lanczos/nearest resize, encode), then denoised again as img2img with `denoising_strength` and
    `hr_second_pass_steps` (0 = `steps`) as an explicit step count (a1111-semantics §6.2: the fix-steps rule):
    two pipeline calls, `pipeline.txt2img` then `pipeline.hires_fix`.
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

    LATENT_UPSCALERS = pipeline.LATENT_UPSCALERS
    PIXEL_UPSCALERS = pipeline.PIXEL_UPSCALERS

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

    def effective_batch_size(self) -> int:
        return self.batch_size

    def hr_sampler(self, job: Job) -> tuple[SamplerInfo, str | None]:
        """The hires pass's sampler and scheduler (A1111 `sample_hr_pass`): hr_sampler_name / hr_scheduler, a
        scheduler carried in hr_sampler_name, else the first pass's."""
        if not (self.hr_sampler_name or self.hr_scheduler):
            return job.sampler, job.scheduler
        sampler, from_name = find_sampler(self.hr_sampler_name or job.sampler.name)
        return sampler, self.hr_scheduler or from_name or job.scheduler

    def init_params(self) -> dict[str, Any]:
        """Infotext keys of the hires fix settings (A1111 `StableDiffusionProcessingTxt2Img.init`)."""
        params: dict[str, Any] = {}
        if self.enable_hr:
            params["Denoising strength"] = self.denoising_strength
            if self.hr_resize_x or self.hr_resize_y:
                w, h = self.hr_size()
                params["Hires resize"] = f"{w}x{h}"
            else:
                params["Hires upscale"] = self.hr_scale
            if self.hr_second_pass_steps:
                params["Hires steps"] = self.hr_second_pass_steps
            params["Hires upscaler"] = self.hr_upscaler or "Latent"
        return params

    def run_batch(self, job: Job, seeds: list[int], subseeds: list[int], prompts: list[str],
                  negative_prompts: list[str], callback, model_callback, disable_progress,
                  network_params: dict[str, Any] | None = None):
        """pipeline.txt2img, then pipeline.hires_fix when enabled; returns (Result, infotext keys in order)."""
        batch_seeds, text = self.seeds_of(seeds, subseeds), self.text_options(job)
        options, sampler_params = self.sampler_options(self.sd_model, job.sampler, job.scheduler, img2img=False)
        first = pipeline.txt2img(
            self.sd_model, prompts, negative_prompts, sampler=job.sampler, scheduler=job.scheduler, steps=self.steps,
            cfg_scale=self.cfg_scale, seeds=batch_seeds, width=self.width, height=self.height, options=options,
            text=text, vae_sample=self.opts.vae_encode_sample, inpainting_mask_weight=self.opts.inpainting_mask_weight,
            refiner=job.refiner, decode_images=not self.enable_hr, callback=callback,
            model_callback=model_callback, disable_progress=disable_progress, vae_tiling=self.opts.vae_tiling)
        params = {**self.init_params(), **(network_params or {}), **self.prompt_params(prompts, negative_prompts),
                  **sampler_params,
                  **self.refiner_params(job.refiner, first.plan.passes[0])}
        if not self.enable_hr:
            return first, params
        sampler, scheduler = self.hr_sampler(job)
        if self.hr_sampler_name or self.hr_scheduler:
            params["Hires sampler"] = sampler.name
        if self.hr_scheduler:
            params["Hires schedule type"] = schedules.find_scheduler(self.hr_scheduler).label
        if self.hr_prompt:
            params["Hires prompt"] = self.hr_prompt
        if self.hr_negative_prompt:
            params["Hires negative prompt"] = self.hr_negative_prompt
        if self.hr_prompt and extra_networks.batch_networks([self.hr_prompt])[1]:
            raise NotImplementedError("hr_prompt: <lora:...> tags of its own are not applied to the hires pass in "
                                      "sdcore; the first pass's networks stay applied (put the tags in prompt)")
        hr_prompts = [self.hr_prompt or p for p in prompts]
        hr_negative = [self.hr_negative_prompt or p for p in negative_prompts]
        refiner = None if first.plan.refiner_switched else job.refiner
        hr_options, hr_params = self.sampler_options(first.model, sampler, scheduler, img2img=True)
        width, height = self.hr_size()
        second = pipeline.hires_fix(
            first.model, first.latents, hr_prompts, hr_negative, sampler=sampler, scheduler=scheduler,
            steps=self.hr_second_pass_steps or self.steps, first_pass_steps=self.steps,
            denoising_strength=self.denoising_strength, cfg_scale=self.cfg_scale, seeds=batch_seeds, width=width,
            height=height, cond_size=(self.width, self.height), upscaler=self.hr_upscaler or "Latent", options=hr_options, text=text,
            vae_sample=self.opts.vae_encode_sample, inpainting_mask_weight=self.opts.inpainting_mask_weight,
            refiner=refiner, callback=callback, model_callback=model_callback,
            disable_progress=disable_progress, vae_tiling=self.opts.vae_tiling)
        params.update(self.prompt_params(hr_prompts, hr_negative))
        params.update(hr_params)
        params.update(self.refiner_params(refiner, second.plan.passes[0]))
        second.plan = dataclasses.replace(second.plan, passes=first.plan.passes + second.plan.passes)
        return second, params


@dataclass
class Processed:
    """Result of `process_images` (A1111 `Processed`): images and what made them.

    `images`: PIL RGB images, one per prompt (batch_size * n_iter); `seeds`/`subseeds`/`prompts`/`infotexts`
    aligned with them; `paths` where they were saved (empty when not saved); `plans`: the `Plan` of each batch
    (t_enc, sigma slice, model calls, crop box, mask coverage). The intermediate state of the last batch is kept for
    inspection: `init_latent`, `mask`, `nmask`, `image_conditioning` (tensors), `overlay_images`,
    `mask_for_overlay` (PIL), `paste_to` (x, y, w, h) of "Only masked".
    """

    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    infotexts: list[str]
    paths: list[Path]
    comments: dict
    plans: list[Plan] = field(default_factory=list)
    init_latent: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    nmask: torch.Tensor | None = None
    image_conditioning: torch.Tensor | None = None
    overlay_images: list | None = None
    mask_for_overlay: Image.Image | None = None
    paste_to: tuple[int, int, int, int] | None = None

    @property
    def seed(self) -> int:
        return self.seeds[0]

    @property
    def info(self) -> str:
        return self.infotexts[0]


def resolve_job(p: StableDiffusionProcessing) -> Job:
    """Everything `process_images` decides once per job (a1111-semantics §9 step 1): sampler and scheduler, seeds
    (-1 resolved to a random seed), per-image prompts, the effective batch size, the loaded refiner."""
    sampler, scheduler = p.resolve_sampler()
    n = p.batch_size * p.n_iter
    seeds, subseeds = rng.seed_lists(rng.get_fixed_seed(p.seed), rng.get_fixed_seed(p.subseed), p.subseed_strength,
                                     p.batch_size, p.n_iter)
    image_cfg_scale = getattr(p, "image_cfg_scale", None)
    if p.sd_model.family.conditioning != "edit":
        image_cfg_scale = None
    embeddings = None
    if p.opts.embeddings_dir is not None:
        from .embeddings import load_embeddings_dir

        embeddings = load_embeddings_dir(p.opts.embeddings_dir)
    return Job(sampler, scheduler, _expand(p.prompt, n, "prompt"), _expand(p.negative_prompt, n, "negative_prompt"),
               seeds, subseeds, p.effective_batch_size(), p.load_refiner(), image_cfg_scale, embeddings)


def _applied(model: StableDiffusionModel, active: list):
    """The batch's LoRAs merged into `model` for the duration (`networks.applied`), or nothing to do."""
    if not active:
        return contextlib.nullcontext()
    from . import networks

    return networks.applied(model, [entry[:4] for entry in active])


def network_params(active: list, job: Job, prompts: list[str], negative_prompts: list[str],
                   p: StableDiffusionProcessing) -> dict[str, Any]:
    """A batch's "Lora hashes" (A1111 `ExtraNetworkLora.activate`: the name as written in the tag, the file's
    short hash) and "TI hashes" (the embeddings its conditioning uses, `embeddings.ti_hashes`) infotext keys."""
    params: dict[str, Any] = {}
    lora = extra_networks.lora_hashes_value([(entry[4], entry[0].shorthash()) for entry in active])
    if lora:
        params["Lora hashes"] = lora
    if job.embeddings:
        from .embeddings import embeddings_used_by_prompts, ti_hashes

        hires = getattr(p, "hr_second_pass_steps", 0) or p.steps if getattr(p, "enable_hr", False) else None
        used = embeddings_used_by_prompts(prompts, negative_prompts, p.sd_model.tokenizer, job.embeddings,
                                          job.sampler.total_steps(p.steps), hires_steps=hires,
                                          use_old_scheduling=p.opts.use_old_scheduling, emphasis=p.opts.emphasis)
        ti = ti_hashes(used)
        if ti:
            params["TI hashes"] = ti
    return params


def process_images(p: StableDiffusionProcessing, callback=None, disable_progress: bool | None = None,
                   model_callback=None) -> Processed:
    """Run a whole job: validate, resolve seeds and prompts once, then n_iter batches of pipeline call -> infotext
    -> save (a1111-semantics §9). `p` and its model are not changed.

    Images are saved (never overwriting) when `p.outpath_samples` is set and `do_not_save_samples` is False.
    `callback` receives k-diffusion's per-step dict; `model_callback` receives one dict per model (CFG denoiser)
    call and one per noise draw (those have a "noise" key: `pipeline.noise_reporter`), e.g. a
    `sdcore.sampling.samplers.TraceRecorder`.
    """
    p.validate()
    job = resolve_job(p)
    params = dict(p.extra_generation_params)
    comments = dict(p.comments)
    out_images, infotexts, paths, plans, result = [], [], [], [], None
    b = job.batch_size
    loaded: dict[Path, Any] = {}
    with torch.inference_mode():
        for n in range(p.n_iter):
            sl = slice(n * b, (n + 1) * b)
            prompts, lora = extra_networks.batch_networks(job.prompts[sl])
            active = [] if p.disable_extra_networks else p.load_networks(lora, loaded)
            with _applied(p.sd_model, active):
                result, batch_params = p.run_batch(job, job.seeds[sl], job.subseeds[sl], prompts,
                                                   job.negative_prompts[sl], callback, model_callback,
                                                   disable_progress, network_params(active, job, prompts,
                                                                                    job.negative_prompts[sl], p))
            params.update(batch_params)
            plans.append(result.plan)
            if result.plan.blank_mask:
                comments["blank mask"] = ('Unable to perform "Inpaint Only mask" because mask is blank, '
                                          "switch to img2img mode.")
            for i, image in enumerate(result.images):
                index = n * b + i
                text = p.infotext(index, job, params)
                if p.outpath_samples and not p.do_not_save_samples:
                    paths.append(images.save_image(image, p.outpath_samples, job.seeds[index], text,
                                                    date_subfolder=p.opts.save_to_dirs))
                out_images.append(image)
                infotexts.append(text)
    return Processed(images=out_images, seeds=list(job.seeds), subseeds=list(job.subseeds), prompts=list(job.prompts),
                     negative_prompts=list(job.negative_prompts), infotexts=infotexts, paths=paths, comments=comments,
                     plans=plans, init_latent=result.init_latent, mask=result.mask, nmask=result.nmask,
                     image_conditioning=result.image_conditioning, overlay_images=result.overlay_images,
                     mask_for_overlay=result.mask_for_overlay, paste_to=result.plan.paste_to)


def dry_run(p: StableDiffusionProcessing) -> DryRun:
    """Run job `p` with `plan.stand_in_model` in place of its model (zero UNet and VAE, real text encoders): the
    Plans of `Processed.plans` are what a real run does, except DPM adaptive's step count, which depends on the
    UNet's output. `p` is not changed (a copy holds the stand-in); nothing is saved. Format with `plan.explain`."""
    model, rows = stand_in_model(p.sd_model)
    job = dataclasses.replace(p, sd_model=model, outpath_samples=None)
    return DryRun(job, process_images(job, disable_progress=True), rows)
