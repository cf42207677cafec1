# The source of docs/tutorial.ipynb, in the "percent" format: `# %%` starts a code cell, `# %% [markdown]` a
# markdown cell (its lines are comments); `gallery="NAME.png"` after `# %%` makes scripts/build_tutorial.py copy the
# cell's figure to docs/gallery/NAME.png. Edit this file, never the notebook, then regenerate both with
#     .venv/bin/python scripts/build_tutorial.py
# This file also runs as a plain script (figures are then rendered but not shown).

# %% [markdown]
# # sdcore, step by step: img2img and inpainting with the bundled tiny model
#
# This notebook takes one img2img run and one inpainting run of sdcore apart, one function call at a time, and draws
# a figure at each step. It uses the model that ships inside the package
# (`sdcore/weights/sdcore-tiny.safetensors`, 64 x 64 pixels, latents of 4 x 8 x 8, trained on coloured shapes and
# photo crops; model card in `weights/README.md`), so it runs on any CPU in a minute or two and downloads nothing.
#
# Every call below is a public function of sdcore, mostly of `sdcore/pipeline.py`, the page where `pipeline.img2img`
# makes the same calls in the same order. Each formula names where it comes from: the AUTOMATIC1111 (A1111) v1.10.1 file and
# function, and the section of [a1111-semantics.md](a1111-semantics.md) ("§N") that states the fact with worked
# numbers. Two cells check that the hand-made run gives exactly the bytes of `sdcore.process_images`.
#
# The notebook is generated: `scripts/build_tutorial.py` builds it from `docs/tutorial.py` and executes it, and
# `tests/test_tutorial.py` executes it in CI.

# %%
import io
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto in a kernel without ipywidgets
import matplotlib

matplotlib.use("Agg")  # render off-screen; `show` below puts the PNG into the notebook
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image as PNG
from IPython.display import display
from PIL import Image
from skimage import data

import sdcore
from sdcore import images, pipeline
from sdcore.cli import DEFAULT_CKPT
from sdcore.pipeline import MaskOptions, SamplerOptions, Seeds, TextOptions
from sdcore.plan import SamplingPass
from sdcore.sampling import schedules
from sdcore.sampling.blends import BlendContext, make_blend
from sdcore.sampling.denoisers import CFGDenoiser
from sdcore.sampling.samplers import find_sampler

torch.set_grad_enabled(False)  # inference only
DPI = 72


def show(fig):
    """Render `fig` to PNG with Agg, display it, close it (no timestamp in the PNG, so rebuilds are identical)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    display(PNG(data=buf.getvalue()))


def picture(ax, im, title=""):
    """A PIL RGB or L image (or [H,W] array in [0, 1]) without axes, pixels shown as squares."""
    if isinstance(im, Image.Image) and im.mode == "L":
        im = np.asarray(im, np.float32) / 255.0
    ax.imshow(im, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def heat(ax, values, title="", vmax=None, cmap="RdBu_r", vmin=None):
    """A 2-D tensor as a heat map; symmetric around 0 unless vmin is given."""
    values = torch.as_tensor(values).float().cpu().numpy()
    vmax = float(np.abs(values).max()) if vmax is None else vmax
    ax.imshow(values, cmap=cmap, vmin=-vmax if vmin is None else vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def decoded(model, latent):
    """The VAE's picture of one latent [1,C,h,w] (pipeline.decode: uint8 RGB, a1111-semantics §7.2)."""
    return pipeline.decode(model, latent)[0]


# %% [markdown]
# ## 1. The model, the photo and its latent
#
# `sdcore.load_checkpoint` reads the safetensors file, detects the family from the tensor names and shapes (here
# `tiny`: SD1's architecture, narrower) and builds the UNet, the VAE and the CLIP text encoder.
#
# The photo is scikit-image's `astronaut` (NASA, public domain, shipped inside scikit-image), resized to the
# model's 64 px as `scripts/demo.py` does. `images.prepare_inputs` does what A1111's
# `StableDiffusionProcessingImg2Img.init` does to every init image (`modules/processing.py`, §2): flatten onto the
# background colour, resize (mode 0, §3.1), and with a mask make the overlay and the fill; it returns float pixels
# in [0, 1].
#
# **Encode** (`pipeline.encode`; A1111 `sd_samplers_common.images_tensor_to_samples` -> LDM
# `get_first_stage_encoding`, §2.7): the pixels are mapped to [-1, 1], the VAE encoder gives a diagonal Gaussian
# per latent cell, and the latent is a *sample* of it, times the family's scale factor:
#
# $$\mathrm{init\_latent} = s\,(\mu + \sigma_\mathrm{VAE}\,\varepsilon)$$
#
# with $s$ = 0.18215 for SD1 and 0.2086 for the tiny model (1 / the std of its latents, `weights/README.md`).
#
# sdcore draws that $\varepsilon$ from a stream of the image's own seed (A1111 draws it from the unseeded global RNG;
# §2.7 "sdcore deviates"), so the run is reproducible. 64 x 64 x 3 pixels become 4 x 8 x 8 numbers: each latent
# cell stands for an 8 x 8 pixel patch.

# %%
sd = sdcore.load_checkpoint(DEFAULT_CKPT)
device = sd.device
W = H = sd.family.native_size  # 64
SEED, STEPS, CFG = 1234, 20, 7.0
PROMPT, NEGATIVE = "a yellow circle", ""
sampler, _ = find_sampler("Euler")  # scheduler "Automatic": Euler has no preferred one, so the uniform schedule
seeds = Seeds((SEED,))
photo = Image.fromarray(data.astronaut()).resize((W, H), Image.LANCZOS)

prep = images.prepare_inputs([photo], None, width=W, height=H, batch_size=1)
source = (2.0 * torch.from_numpy(prep.pixels).permute(0, 3, 1, 2) - 1.0).to(device)  # [1,3,64,64] in [-1, 1]
init_latent = pipeline.encode(sd, source, list(seeds.seeds))  # [1,4,8,8]
print(f"family {sd.family.name}, scale factor {sd.family.vae.scale_factor}, {sd.family.prediction}-prediction")
print(f"pixels {tuple(source.shape)} -> init_latent {tuple(init_latent.shape)}, "
      f"mean {init_latent.mean():.3f}, std {init_latent.std():.3f}")

fig, axes = plt.subplots(1, 6, figsize=(10, 1.9))
picture(axes[0], photo, "photo, 64 px")
for c in range(4):
    heat(axes[1 + c], init_latent[0, c], f"latent channel {c}")
picture(axes[5], decoded(sd, init_latent), "decode(init_latent)")
fig.suptitle("The photo, its 4 latent channels (8 x 8, red > 0 > blue) and the VAE round trip", fontsize=9, y=1.05)
show(fig)

# %% [markdown]
# The last panel is a plain VAE round trip (denoising strength 0): the tiny VAE keeps colours and coarse shapes,
# not detail.
#
# ## 2. The sigma schedule and where img2img cuts it
#
# k-diffusion samplers work with $x = x_0 + \sigma\,\varepsilon$: $\sigma$ is the noise standard deviation in
# latent units. A schedule is `steps + 1` decreasing sigmas ending in 0 (`pipeline.sigma_schedule` ->
# `schedules.get_sigmas`; A1111 `KDiffusionSampler.get_sigmas` and `modules/sd_schedulers.py`, §10.2). Euler's
# "Automatic" is the model's *uniform* schedule: the sigmas of the DDPM timesteps `linspace(999, 0, steps)` (k-diffusion
# `DiscreteSchedule.get_sigmas`, §7.1). DPM++ 2M's is *Karras* ($\rho = 7$), shown for comparison.
#
# img2img does not start from pure noise. The denoising strength $d$ picks how much of the schedule runs
# (`schedules.setup_img2img_steps`; A1111 `sd_samplers_common.setup_img2img_steps`, §6.2) and the sampler gets the
# tail (`schedules.img2img_sigmas`; A1111 `KDiffusionSampler.sample_img2img`, §6.3):
#
# $$t_\text{enc} = \lfloor \min(d, 0.999)\cdot\text{steps} \rfloor$$
#
# $$\mathrm{sigma\_sched} = \text{sigmas}[\text{steps} - t_\text{enc} - 1:]$$
#
# i.e. $t_\text{enc} + 2$ sigmas and $t_\text{enc} + 1$ model steps. 20 steps at 0.75 give $t_\text{enc} = 15$: 16
# steps, not 15 (diffusers) or 20 (A1111's "fix steps" option); the table in §13 lists more.

# %%
STRENGTHS = (0.25, 0.5, 0.75)
STRENGTH = 0.75  # the img2img run of this notebook
karras, _ = find_sampler("DPM++ 2M")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
for ax, smp in zip(axes, (sampler, karras)):
    label, sigmas = pipeline.sigma_schedule(sd, smp, None, STEPS, SamplerOptions())
    idx = np.arange(STEPS + 1)
    ax.semilogy(idx[:-1], sigmas[:-1], "o-", color="0.6", ms=3, label="sigmas (the last one, 0, not drawn)")
    for d, colour in reversed(list(zip(STRENGTHS, ("tab:green", "tab:orange", "tab:red")))):
        steps, t_enc = schedules.setup_img2img_steps(STEPS, d)
        sched = schedules.img2img_sigmas(sigmas, steps, t_enc)
        cut = steps - t_enc - 1
        ax.semilogy(idx[cut:-1], sched[:-1], "o-", color=colour, ms=4,
                    label=f"d={d}: t_enc={t_enc}, {t_enc + 1} steps, start sigma {float(sched[0]):.3f}")
        ax.axvline(cut, color=colour, ls="--", lw=1)
    ax.set_title(f"{label or 'Uniform'} schedule ({smp.name}'s Automatic), {STEPS} steps", fontsize=9)
    ax.set_xlabel("index into sigmas (--- = img2img cut, steps - t_enc - 1)", fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
axes[0].set_ylabel("sigma")
show(fig)

print("strength  t_enc  model steps  start sigma: uniform  karras")
for d in STRENGTHS:
    starts = [float(schedules.img2img_sigmas(pipeline.sigma_schedule(sd, smp, None, STEPS, SamplerOptions())[1],
                                             *schedules.setup_img2img_steps(STEPS, d))[0]) for smp in (sampler, karras)]
    t = schedules.setup_img2img_steps(STEPS, d)[1]
    print(f"{d:8}  {t:5}  {t + 1:11}  {starts[0]:20.3f}  {starts[1]:6.3f}")
steps, t_enc = schedules.setup_img2img_steps(STEPS, STRENGTH)  # the run of this notebook: 20 steps, t_enc 15

# %% [markdown]
# Karras packs its steps towards small sigmas. At a low strength its tail therefore starts much lower than the
# uniform one and the photo survives more of the run; at a high strength it starts higher.
#
# ## 3. The noised start latent
#
# One draw of Gaussian noise per image, from the image's seed (`Seeds.rng` -> `rng.ImageRNG`; A1111 `rng.ImageRNG`,
# first draw in `StableDiffusionProcessingImg2Img.sample`, §6.1, §8.2), lifts the init latent to the first sigma of
# the slice (`pipeline.noised_init`; §6.3 step 2):
#
# $$x_\text{start} = \mathrm{init\_latent} + \text{noise}\cdot\mathrm{sigma\_sched}[0]$$
#
# `noised_init` also fills a `SamplingPass`, the record of what ran (`sdcore/plan.py`, printed by `--explain`).
# Below, the same noise at the three strengths, each decoded as it is, before any denoising.

# %%
noise_rng = seeds.rng(init_latent.shape[1:], device)
noise = noise_rng.next().float()  # [1,4,8,8], N(0, 1)
record = SamplingPass(sampler.name, None, steps, t_enc, None, None, None, W, H)
x_start = pipeline.noised_init(sd, sampler, None, init_latent, noise, SamplerOptions(), record)
assert torch.equal(x_start, init_latent + noise * record.sigma_sched[0])
print(f"sigma_sched ({len(record.sigma_sched)} values):", ", ".join(f"{s:.3f}" for s in record.sigma_sched.tolist()))

_, sigmas = pipeline.sigma_schedule(sd, sampler, None, STEPS, SamplerOptions())
fig, axes = plt.subplots(1, 6, figsize=(10, 1.9))
picture(axes[0], photo, "photo")
picture(axes[1], decoded(sd, init_latent), "init_latent")
for ax, d in zip(axes[2:5], STRENGTHS):
    sched = schedules.img2img_sigmas(sigmas, *schedules.setup_img2img_steps(STEPS, d))
    picture(ax, decoded(sd, init_latent + noise * sched[0]), f"d={d}: σ={float(sched[0]):.2f}")
picture(axes[5], decoded(sd, noise), "noise alone")
fig.suptitle("Start latents init_latent + noise * sigma_sched[0], decoded", fontsize=9, y=1.05)
show(fig)

# %% [markdown]
# ## 4. The prompt, the guided denoiser and the sampler loop
#
# `pipeline.encode_conds` turns the prompt and the negative prompt into CLIP token embeddings [1, 77, 128] per
# model call (prompt editing can change them from call to call; A1111 `prompt_parser` and `sd_hijack_clip`, §11).
#
# The model's UNet predicts the noise $\hat\varepsilon$. k-diffusion's `CompVisDenoiser` (`pipeline.inner_denoiser`;
# §7.1) turns it into a prediction of the clean latent, `denoised`:
#
# $$D(x, \sigma) = x - \sigma\,\hat\varepsilon\!\left(\frac{x}{\sqrt{\sigma^2 + 1}},\ t(\sigma)\right)$$
#
# with $t(\sigma)$ the DDPM timestep found by interpolating $\log\sigma$ in the model's 1000 sigmas. Classifier-free
# guidance runs it with the prompt and with the negative prompt and extrapolates (section 5). `pipeline.sample`
# wraps this guided denoiser and runs the sampler; Euler (k-diffusion `sample_euler`, Karras et al. 2022,
# Algorithm 2, with A1111's `to_d`, §7.1) steps along the probability-flow ODE:
#
# $$d_i = \frac{x_i - D(x_i, \sigma_i)}{\sigma_i}, \qquad x_{i+1} = x_i + d_i\,(\sigma_{i+1} - \sigma_i)$$
#
# The sampler's `callback` reports `x` and `denoised` after every step. The hand-written loop under it is the
# same Euler loop with `pipeline.guided_denoiser`, and gives the same tensor bit for bit.

# %%
conds = pipeline.encode_conds(sd, [PROMPT], [NEGATIVE], sampler.total_steps(steps), TextOptions(), W, H)
print("cond", tuple(conds.cond(0)["c_crossattn"].shape), "uncond", tuple(conds.uncond(0)["c_crossattn"].shape))

trace = []
samples = pipeline.sample(sd, sampler, x_start, record, conds, cfg_scale=CFG, image_cond=None, blend=None, ctx=None,
                          noise_rng=noise_rng, seeds=seeds, options=SamplerOptions(),
                          callback=lambda d: trace.append({k: v.clone() if torch.is_tensor(v) else v
                                                           for k, v in d.items()}),
                          disable_progress=True)
print(f"{len(record.model_calls)} model calls at sigmas", ", ".join(f"{s:.3f}" for s in record.model_calls))

denoise = pipeline.guided_denoiser(sd, sampler, conds, None, None, None, None, 0.0)
x = x_start
for i in range(t_enc + 1):
    sigma, sigma_next = record.sigma_sched[i], record.sigma_sched[i + 1]
    denoised = denoise(x, sigma * x.new_ones(1), step=i, total_steps=t_enc + 1, cond_scale=CFG)
    assert torch.equal(denoised, trace[i]["denoised"])
    x = x + (x - denoised) / sigma * (sigma_next - sigma)
assert torch.equal(x, samples), "the hand-written Euler loop must equal pipeline.sample"
print("hand-written Euler loop == pipeline.sample: True")

# %% gallery="tutorial_denoised.png"
n = len(trace)
fig, axes = plt.subplots(2, n + 1, figsize=(0.95 * (n + 1), 2.5))
for i, step in enumerate(trace):
    picture(axes[0, i], decoded(sd, step["x"]), f"σ={float(step['sigma']):.2f}")
    picture(axes[1, i], decoded(sd, step["denoised"]), f"step {i}")
picture(axes[0, n], decoded(sd, samples), "x final")
picture(axes[1, n], photo, "photo")
axes[0, 0].text(-8, 32, "x", ha="right", va="center", fontsize=9)
axes[1, 0].text(-8, 32, "denoised", ha="right", va="center", fontsize=9)
fig.suptitle(f"img2img '{PROMPT}', strength {STRENGTH}, Euler, {n} steps: the sampler's x (top) and the "
             "model's prediction of the clean image at each step (bottom), decoded", fontsize=9, y=1.02)
show(fig)

# %% [markdown]
# The bottom row is what the model believes the finished image is, given the current noisy latent: at high sigma a
# vague yellow blob on the photo's colours, sharpening as sigma falls. The top row is the noisy state the sampler
# carries; it converges to the last prediction.
#
# ## 5. Classifier-free guidance at one step
#
# A1111's `CFGDenoiser.forward` (`modules/sd_samplers_cfg_denoiser.py`, §7) puts the latent in the batch twice, once
# with the prompt ("cond") and once with the negative prompt ("uncond"), makes one UNet call and combines the two
# predictions (`combine_denoised`, §7 step 8; sdcore `denoisers.combine_denoised`):
#
# $$\text{denoised} = D_\text{uncond} + s\,(D_\text{cond} - D_\text{uncond}), \qquad s = \mathrm{cfg\_scale}.$$
#
# $s = 1$ is the cond prediction itself; $s > 1$ goes past it, away from the negative prompt. Below: the inner
# denoiser called by hand on the [cond; uncond] batch at step 2, and the combination at several scales; the one at
# $s = 7$ is exactly the `denoised` the sampler got.

# %%
i = 2
x_i, sigma_i = trace[i]["x"], trace[i]["sigma"] * x_start.new_ones(1)
inner = pipeline.inner_denoiser(sd, sampler)
both = inner(torch.cat([x_i, x_i]), torch.cat([sigma_i, sigma_i]),
             c_crossattn=torch.cat([conds.cond(i)["c_crossattn"], conds.uncond(i)["c_crossattn"]]))
d_cond, d_uncond = both[:1], both[1:]
guided = {s: d_uncond + (d_cond - d_uncond) * s for s in (1.0, 3.0, CFG, 12.0)}
assert torch.equal(guided[CFG], trace[i]["denoised"]), "hand-made CFG must equal the sampler's denoised"
print(f"step {i}, sigma {float(sigma_i):.3f}: uncond + {CFG:g} * (cond - uncond) == the sampler's denoised: True")

fig, axes = plt.subplots(1, 7, figsize=(11, 1.9))
picture(axes[0], decoded(sd, x_i), f"x at step {i}")
picture(axes[1], decoded(sd, d_uncond), "uncond ('')")
picture(axes[2], decoded(sd, d_cond), "cond = s 1")
for ax, s in zip(axes[3:6], (3.0, CFG, 12.0)):
    picture(ax, decoded(sd, guided[s]), f"guided, s {s:g}" + (" (used)" if s == CFG else ""))
heat(axes[6], (d_cond - d_uncond)[0].norm(dim=0), "|cond - uncond| per cell", cmap="viridis", vmin=0)
fig.suptitle(f"Classifier-free guidance for '{PROMPT}' at sigma {float(sigma_i):.2f}", fontsize=9, y=1.05)
show(fig)

# %% [markdown]
# ## 6. Decode, and the same run through the public API
#
# The last latent is decoded (`pipeline.decode`; A1111 `decode_latent_batch`, §7.2): divided by the scale factor,
# through the VAE decoder, then $\text{clamp}((x + 1)/2, 0, 1)\cdot 255$ **truncated** to uint8, as A1111 does.
# `pipeline.finish_images` would then apply colour correction and paste back the kept pixels of a mask (§9.1, §9.2);
# plain img2img has neither.
#
# Every step above is what `pipeline.img2img` does, and what `sdcore.process_images` runs for an A1111-style job
# object (A1111 `process_images_inner`, §9). The assertions check that the step-by-step run and the public API give
# the same latents and the same image, byte for byte.

# %%
by_hand = pipeline.finish_images(pipeline.decode(sd, samples), prep.color_corrections, None, prep.paste_to)[0]

job = sdcore.StableDiffusionProcessingImg2Img(
    sd_model=sd, init_images=[photo], prompt=PROMPT, negative_prompt=NEGATIVE, sampler_name="Euler", steps=STEPS,
    cfg_scale=CFG, seed=SEED, width=W, height=H, denoising_strength=STRENGTH)
processed = sdcore.process_images(job, disable_progress=True)
result = pipeline.img2img(sd, [photo], None, [PROMPT], [NEGATIVE], sampler=sampler, scheduler=None, steps=STEPS,
                          denoising_strength=STRENGTH, cfg_scale=CFG, seeds=seeds, width=W, height=H,
                          disable_progress=True)
assert torch.equal(processed.init_latent, init_latent)
assert torch.equal(result.latents, samples)
assert np.array_equal(np.asarray(processed.images[0]), np.asarray(by_hand)), "step by step != process_images"
print("step-by-step img2img == pipeline.img2img == sdcore.process_images (latents and uint8 pixels): True")
print(processed.infotexts[0])

fig, axes = plt.subplots(1, 2, figsize=(3.6, 2))
picture(axes[0], photo, "photo")
picture(axes[1], processed.images[0], f"img2img, d={STRENGTH}")
show(fig)

# %% [markdown]
# ## 7. Inpainting: mask, nmask and the latent mask
#
# Inpainting is img2img with a mask (white = regenerate). The user's mask is binarised, optionally inverted, blurred
# (`images.prepare_mask`: A1111 `create_binary_mask`, OpenCV `GaussianBlur`, §2.2.1-§2.2.3) and resized to the
# processing size. The sampler works on 8 x 8 latent cells, so the mask is shrunk too (`images.latent_mask` via
# `pipeline.latent_masks`; A1111 `StableDiffusionProcessingImg2Img.init`, §2.9): PIL's default bicubic resize to
# the latent size, channel 0 divided by 255, then **rounded** (`np.around`) unless a blend asks for grey:
#
# $$\text{nmask} = \text{round}(\text{bicubic}_{1/8}(\text{mask}) / 255) \quad (1 = \text{regenerate})$$
#
# $$\text{mask} = 1 - \text{nmask} \quad (1 = \text{keep})$$
#
# A 4 px blur at 64 px spreads over half a latent cell, so the unrounded latent mask is grey in a ring of cells; the
# rounded one keeps the 4 x 4 centre. Soft inpainting and differential diffusion keep the grey (§15.2, §16.4).

# %%
INPAINT_PROMPT, INPAINT_STRENGTH, MASK_BLUR, FILL = "a red circle", 0.9, 4, 1  # fill 1 = "original"
mask_pixels = np.zeros((H, W), np.uint8)
mask_pixels[H // 4:3 * H // 4, W // 4:3 * W // 4] = 255  # a centred square, as scripts/demo.py
user_mask = Image.fromarray(mask_pixels, "L")


def prepared(mask_round):
    """prepare_inputs for the inpainting job: whole picture, blur 4, fill 'original' (a1111-semantics §2)."""
    return images.prepare_inputs([photo], user_mask, width=W, height=H, batch_size=1, mask_blur_x=MASK_BLUR,
                                 mask_blur_y=MASK_BLUR, mask_round=mask_round, full_res=False, inpainting_fill=FILL)


prep_i = prepared(mask_round=True)
source_i = (2.0 * torch.from_numpy(prep_i.pixels).permute(0, 3, 1, 2) - 1.0).to(device)
init_i = pipeline.encode(sd, source_i, [SEED])
keep, nmask = pipeline.latent_masks(prep_i.latent_mask, init_i, mask_round=True)  # [1,4,8,8] each
_, grey_nmask = pipeline.latent_masks(prepared(mask_round=False).latent_mask, init_i, mask_round=False)
print("latent nmask before rounding (channel 0):\n", np.round(grey_nmask[0, 0].numpy(), 2))

fig, axes = plt.subplots(1, 6, figsize=(11, 2))
picture(axes[0], user_mask, "user mask, 64 px")
picture(axes[1], prep_i.mask, f"blurred ({MASK_BLUR} px)")
picture(axes[2], Image.alpha_composite(Image.new("RGBA", (W, H), (128, 128, 128, 255)), prep_i.overlay_images[0]),
        "overlay (on grey)")
heat(axes[3], grey_nmask[0, 0], "latent mask 8x8, grey", vmin=0, vmax=1, cmap="gray")
heat(axes[4], nmask[0, 0], "nmask = rounded", vmin=0, vmax=1, cmap="gray")
heat(axes[5], keep[0, 0], "mask = 1 - nmask", vmin=0, vmax=1, cmap="gray")
fig.suptitle("The mask at pixel and at latent resolution (white = 1)", fontsize=9, y=1.05)
show(fig)

# %% [markdown]
# What the masked cells start from is the "masked content" option (`inpainting_fill`). 1 "original" keeps the
# photo's latent; 0 "fill" repaints the masked pixels from blurred surroundings before encoding (`images.fill`,
# §4); 2 "latent noise" and 3 "latent nothing" edit the latent (`pipeline.fill_latent`, §2.9): they make it
# $\mathrm{init\_latent}\cdot\text{mask} + \mathcal{N}(0, 1)\cdot\text{nmask}$ and
# $\mathrm{init\_latent}\cdot\text{mask}$. Fill 2's noise is drawn from the seed with unit variance, not scaled by sigma.

# %%
fills = {1: init_i, 2: pipeline.fill_latent(init_i, keep, nmask, 2, [SEED], "CPU"),
         3: pipeline.fill_latent(init_i, keep, nmask, 3, [SEED], "CPU")}
fig, axes = plt.subplots(1, 3, figsize=(5, 2))
for ax, (fill, latent) in zip(axes, fills.items()):
    picture(ax, decoded(sd, latent), {1: "1 original", 2: "2 latent noise", 3: "3 latent nothing"}[fill])
fig.suptitle("init_latent after the latent fills, decoded", fontsize=9, y=1.05)
show(fig)

# %% [markdown]
# ## 8. The per-step blend: a1111, xt, soft inpainting, differential
#
# During sampling something must hold the kept cells to the photo. sdcore makes that rule a named strategy
# (`sdcore/sampling/blends.py`), called around every guided model call:
#
# | strategy | where | rule at noise level $\sigma$ | source |
# |---|---|---|---|
# | `a1111` | on `denoised`, after CFG | $D\cdot\text{nmask} + \text{init}\cdot\text{mask}$ | A1111 `CFGDenoiser.forward` (`apply_blend`), §7 step 3 |
# | `xt` | on $x$, before the call | $x\cdot\text{nmask} + (\text{init} + \sigma\,\text{noise})\cdot\text{mask}$ | diffusers `StableDiffusionInpaintPipeline.__call__`, §16.6 |
# | `soft_inpainting` | on `denoised` | `latent_blend`(init, $D$, $\text{nmask}^{\sigma^{p} k}$), grey mask | A1111 soft-inpainting `get_modified_nmask`, `latent_blend`, §15.3-15.4 |
# | `differential` | on `denoised` | $m = (\text{nmask} \ge \tau(\sigma)) \wedge (\text{nmask} > 0)$, $D m + \text{init}(1 - m)$ | ComfyUI `DifferentialDiffusion.forward`, §16.2-16.3 |
#
# with $p$ = schedule bias (1), $k$ = preservation strength (0.5), and $\tau(\sigma) = (t(\sigma) - t_\text{end}) /
# (t_\text{start} - t_\text{end})$ falling from 1 to 0 over the run: a cell of strength $s$ joins in for the last
# fraction $s$ of the schedule. After sampling, `a1111` and `xt` restore the kept cells exactly ($x\cdot\text{nmask} +
# \text{init}\cdot\text{mask}$, A1111 `StableDiffusionProcessingImg2Img.sample`, §6.1), `differential` those of
# strength 0, and soft inpainting none: it pastes the photo back through a mask of how far each cell moved (§15.5,
# §15.6).
#
# `inpaint_by_hand` below is `pipeline.img2img` for a mask written out, with the Euler loop and the CFG denoiser
# called directly and the blend around them; each run is checked against `pipeline.img2img` with the same blend.

# %%
def inpaint_by_hand(blend):
    """One inpainting run with `blend`, step by step; returns (latents, image, per-step log, BlendContext)."""
    mask_round = not blend.keeps_grey_mask
    prep = prepared(mask_round)
    source = (2.0 * torch.from_numpy(prep.pixels).permute(0, 3, 1, 2) - 1.0).to(device)
    init = pipeline.encode(sd, source, [SEED])
    keep, nmask = pipeline.latent_masks(prep.latent_mask, init, mask_round)
    init = pipeline.fill_latent(init, keep, nmask, FILL, [SEED], "CPU")
    conds = pipeline.encode_conds(sd, [INPAINT_PROMPT], [NEGATIVE], sampler.total_steps(STEPS), TextOptions(), W, H)
    steps, t_enc = schedules.setup_img2img_steps(STEPS, INPAINT_STRENGTH)
    noise_rng = seeds.rng(init.shape[1:], device)
    noise = noise_rng.next().float()
    record = SamplingPass(sampler.name, None, steps, t_enc, None, None, None, W, H)
    x = pipeline.noised_init(sd, sampler, None, init, noise, SamplerOptions(), record)
    inner = pipeline.inner_denoiser(sd, sampler)
    ctx = BlendContext(init, keep, nmask, noise, pipeline.blend_sigmas(record, inner), inner.sigma_to_t)
    cfg = CFGDenoiser(inner)
    log = []
    for i in range(t_enc + 1):
        sigma, sigma_next = record.sigma_sched[i], record.sigma_sched[i + 1]
        s = sigma * x.new_ones(1)
        x_in = blend.blend_input(x, s, ctx)  # xt: kept cells put on the noised photo
        raw = cfg(x_in, s, cond=conds.cond, uncond=conds.uncond, cond_scale=CFG, conds_list=conds.conds_list,
                  step=i, total_steps=t_enc + 1)
        denoised = blend.blend(raw, s, ctx)  # a1111, soft inpainting, differential
        log.append({"sigma": float(sigma), "x_in": x_in, "raw": raw, "denoised": denoised})
        x = x + (x - denoised) / sigma * (sigma_next - sigma)  # Euler
    samples = blend.final(x, ctx)
    overlays = blend.overlays(prep.overlay_images, prep.originals, samples, ctx, W, H, prep.paste_to)
    image = pipeline.finish_images(pipeline.decode(sd, samples), None, overlays, prep.paste_to)[0]
    return samples, image, log, ctx


BLEND_NAMES = ("a1111", "xt", "soft_inpainting", "differential")
runs = {}
for name in BLEND_NAMES:
    blend = make_blend(name)
    runs[name] = inpaint_by_hand(blend)
    ref = pipeline.img2img(sd, [photo], user_mask, [INPAINT_PROMPT], [NEGATIVE], sampler=sampler, scheduler=None,
                           steps=STEPS, denoising_strength=INPAINT_STRENGTH, cfg_scale=CFG, seeds=seeds, width=W,
                           height=H, blend=blend, disable_progress=True,
                           masking=MaskOptions(mask_blur_x=MASK_BLUR, mask_blur_y=MASK_BLUR, inpainting_fill=FILL,
                                               inpaint_full_res=False))
    assert torch.equal(ref.latents, runs[name][0]), name
    assert np.array_equal(np.asarray(ref.images[0]), np.asarray(runs[name][1])), name
print("inpaint_by_hand == pipeline.img2img for", ", ".join(BLEND_NAMES))

# The a1111 run once more through the A1111-style job object.
job = sdcore.StableDiffusionProcessingImg2Img(
    sd_model=sd, init_images=[photo], mask=user_mask, prompt=INPAINT_PROMPT, negative_prompt=NEGATIVE,
    sampler_name="Euler", steps=STEPS, cfg_scale=CFG, seed=SEED, width=W, height=H,
    denoising_strength=INPAINT_STRENGTH, mask_blur=MASK_BLUR, inpainting_fill=FILL, inpaint_full_res=False)
processed_i = sdcore.process_images(job, disable_progress=True)
assert np.array_equal(np.asarray(processed_i.images[0]), np.asarray(runs["a1111"][1]))
print("a1111 inpainting by hand == sdcore.process_images: True")

# a1111's rule, read off the log: every kept cell of every blended `denoised` is the init latent itself.
_, _, log, ctx = runs["a1111"]
kept = ctx.mask.expand_as(ctx.init_latent) == 1
assert all(torch.equal(step["denoised"][kept], ctx.init_latent[kept]) for step in log)

# %% [markdown]
# First, the weight each strategy gives the model's prediction, per latent cell, at a few of the 19 steps (white = the
# model's value, black = the photo's). `a1111` and `xt` use the rounded mask throughout (`xt` on $x$, before the
# call); soft inpainting's grey ring starts dark ($\text{nmask}^{\sigma/2}$: $0.82^{5.4} = 0.34$ at $\sigma = 10.75$)
# and brightens as $\sigma$ falls; differential diffusion lets each grey cell in once the threshold has fallen below
# its strength.

# %%
SHOW = (0, 3, 6, 9, 12, 15, 18)


def weight(name, blend, sigma, ctx):
    """The per-cell weight of the model's prediction at `sigma` (channel 0)."""
    s = torch.tensor([sigma])
    if name == "soft_inpainting":
        return blend.modified_nmask(s, ctx)[0, 0]
    if name == "differential":
        return blend.regenerate_mask(s, ctx)[0, 0]
    return ctx.nmask[0, 0]


fig, axes = plt.subplots(len(BLEND_NAMES), len(SHOW), figsize=(1.2 * len(SHOW), 1.6 * len(BLEND_NAMES)))
for r, name in enumerate(BLEND_NAMES):
    _, _, log, ctx = runs[name]
    for c, i in enumerate(SHOW):
        heat(axes[r, c], weight(name, make_blend(name), log[i]["sigma"], ctx), f"step {i}\nσ={log[i]['sigma']:.2f}",
             vmin=0, vmax=1, cmap="gray")
    axes[r, 0].set_ylabel(name, fontsize=9)
fig.suptitle("Regenerate weight per latent cell and step", fontsize=9, y=1.01)
show(fig)

# %% [markdown]
# Then what comes out: the blended `denoised` at the same steps, decoded, and the final image (after the final blend
# and the pixel overlay). For `xt` the `denoised` row is the raw prediction: that strategy pins $x$, not `denoised`.

# %% gallery="tutorial_blends.png"
fig, axes = plt.subplots(len(BLEND_NAMES), len(SHOW) + 2, figsize=(1.2 * (len(SHOW) + 2), 1.35 * len(BLEND_NAMES)))
for r, name in enumerate(BLEND_NAMES):
    samples_b, image_b, log, ctx = runs[name]
    picture(axes[r, 0], photo, "photo")
    for c, i in enumerate(SHOW):
        picture(axes[r, c + 1], decoded(sd, log[i]["denoised"]), f"step {i}")
    picture(axes[r, -1], image_b, "final")
    axes[r, 0].text(-8, 32, name, ha="right", va="center", fontsize=9)
fig.suptitle(f"Inpainting '{INPAINT_PROMPT}' (strength {INPAINT_STRENGTH}, Euler, blur {MASK_BLUR}): the blended "
             "denoised per step, and the final image, for each blend", fontsize=9, y=1.02)
show(fig)

# %% [markdown]
# ## 9. The 9-channel conditioning of an inpainting model
#
# SD1.5-inpainting and its kin have a UNet whose first convolution takes **9** channels: the 4 of the noisy latent,
# then 5 of "image conditioning" that tell it what to keep (A1111
# `StableDiffusionProcessing.inpainting_image_conditioning`, §5.1; sdcore `pipeline.image_conditioning`):
#
# - the processing mask, rounded, shrunk to latent size by **nearest** interpolation (not bicubic as the latent mask);
# - the latent of the masked photo, $\text{lerp}(\text{source}, \text{source}\cdot(1 - \text{mask}), w)$ in [-1, 1]
#   pixels, where $w$ = "inpainting conditioning mask strength" (1: the hole becomes mid-grey);
#
# concatenated after $x$ on every call, cond and uncond alike (LDM's hybrid `DiffusionWrapper`; sdcore
# `StableDiffusionModel.apply_model`). Nearest interpolation (`F.interpolate`'s default) reads the top-left pixel of
# each 8 x 8 block, so the conditioning mask is not the latent mask: in the figure the blurred mask's rounded corner
# at pixel (16, 16) costs the top-left cell, while the other three corners are sampled 7 px inside the square.
#
# The tiny model has no inpainting variant, so the cell below writes an SD1-inpaint checkpoint with **random
# weights** in SD1's key layout, narrowed to a tiny size (`scripts/make_checkpoint.py`, into a temporary
# directory). Its VAE and UNet are untrained: only the shapes and the data flow mean something here, not the
# values or the pictures it would draw.

# %%
make_checkpoint = Path(sdcore.__file__).resolve().parents[1] / "scripts" / "make_checkpoint.py"
tmp = Path(tempfile.mkdtemp(prefix="sdcore-tutorial-"))
ckpt = tmp / "sd1-inpaint-tiny-random.safetensors"
subprocess.run([sys.executable, str(make_checkpoint), "--family", "sd1-inpaint", "--size", "tiny", "--seed", "0",
                str(ckpt)], check=True, capture_output=True)
inpaint_model = sdcore.load_checkpoint(ckpt)
first_conv = inpaint_model.unet.input_blocks[0][0].weight
print(f"family {inpaint_model.family.name}, conditioning {inpaint_model.family.conditioning!r}, "
      f"input_blocks.0.0.weight {tuple(first_conv.shape)} (in_channels 9)")

init_9 = pipeline.encode(inpaint_model, source_i, [SEED])
image_cond = pipeline.image_conditioning(inpaint_model, source_i, init_9, prep_i.mask, [SEED], mask_round=True,
                                         mask_weight=1.0, vae_sample=True, rng_source="CPU")  # [1,5,8,8]
x_9 = init_9 + noise * record.sigma_sched[0]
unet_input = torch.cat([x_9, image_cond], dim=1)  # what the UNet's first convolution sees: [1,9,8,8]
print("x", tuple(x_9.shape), "+ image_conditioning", tuple(image_cond.shape), "->", tuple(unet_input.shape))

# One guided call with the conditioning: 9 channels in, 4 out.
conds_9 = pipeline.encode_conds(inpaint_model, [INPAINT_PROMPT], [NEGATIVE], 1, TextOptions(), W, H)
out = pipeline.guided_denoiser(inpaint_model, sampler, conds_9, image_cond, None, None, None, 0.0)(
    x_9, record.sigma_sched[:1], step=0, total_steps=1, cond_scale=CFG)
print("guided denoised", tuple(out.shape))

cmask = torch.from_numpy(np.asarray(prep_i.mask, np.float32) / 255.0).round()[None, None]
masked = {w: torch.lerp(source_i, source_i * (1.0 - cmask), w) for w in (1.0, 0.5)}
fig, axes = plt.subplots(2, 9, figsize=(12, 3))
picture(axes[0, 0], cmask[0, 0].numpy(), "mask, rounded")
picture(axes[0, 1], ((masked[1.0][0].permute(1, 2, 0) + 1) / 2).numpy(), "masked, w=1")
picture(axes[0, 2], ((masked[0.5][0].permute(1, 2, 0) + 1) / 2).numpy(), "masked, w=0.5")
heat(axes[0, 3], image_cond[0, 0], "nearest (cond.)", vmin=0, vmax=1, cmap="gray")
heat(axes[0, 4], nmask[0, 0], "bicubic (nmask)", vmin=0, vmax=1, cmap="gray")
for ax in axes[0, 5:]:
    ax.axis("off")
titles = [f"x {c}" for c in range(4)] + ["mask"] + [f"masked latent {c}" for c in range(4)]
for c in range(9):
    if c == 4:
        heat(axes[1, c], unet_input[0, c], titles[c], vmin=0, vmax=1, cmap="gray")
    else:
        heat(axes[1, c], unet_input[0, c], titles[c])
fig.suptitle("Inpainting-model conditioning (random-weight SD1-inpaint, 8 x 8 latents): the UNet's 9 input "
             "channels (bottom)", fontsize=9, y=1.03)
show(fig)
del inpaint_model
shutil.rmtree(tmp)

# %% [markdown]
# ## Summary: where each step lives
#
# | step | sdcore | A1111 v1.10.1 | a1111-semantics |
# |---|---|---|---|
# | resize, mask, overlay, fill | `images.prepare_inputs` | `StableDiffusionProcessingImg2Img.init` | §2-§4 |
# | encode | `pipeline.encode` | `images_tensor_to_samples`, `get_first_stage_encoding` | §2.7 |
# | latent mask, fills | `pipeline.latent_masks`, `pipeline.fill_latent` | `StableDiffusionProcessingImg2Img.init` | §2.9 |
# | 9-channel conditioning | `pipeline.image_conditioning` | `inpainting_image_conditioning` | §5.1 |
# | prompts | `pipeline.encode_conds` | `prompt_parser`, `sd_hijack_clip` | §11 |
# | strength -> steps, slice | `schedules.setup_img2img_steps`, `img2img_sigmas` | `setup_img2img_steps`, `sample_img2img` | §6.2, §6.3 |
# | schedule | `pipeline.sigma_schedule` | `KDiffusionSampler.get_sigmas`, `sd_schedulers` | §10.2 |
# | noise, start latent | `Seeds.rng`, `pipeline.noised_init` | `ImageRNG`, `sample_img2img` | §6.3, §8 |
# | eps -> denoised | `pipeline.inner_denoiser` | k-diffusion `CompVisDenoiser` | §7.1 |
# | CFG and blend | `pipeline.guided_denoiser`, `sampling/blends.py` | `CFGDenoiser.forward` | §7, §15, §16 |
# | sampler loop | `pipeline.sample` | k-diffusion `sample_euler` ... | §6.3-§6.5 |
# | decode, overlay | `pipeline.decode`, `pipeline.finish_images` | `decode_latent_batch`, `apply_overlay` | §7.2, §9.1 |
