"""Train the bundled tiny model (family "tiny", issue 6) from scratch on this machine's CPU.

Phases (each resumable from its last saved state in --workdir; every random draw comes from the fixed --seed and the
step number, so a rerun with the same arguments gives the same weights up to CPU kernel nondeterminism):

  vae      AutoencoderKL on 64 px colour photo crops (tiny_data.photo_crop) and synthetic scenes, loss
           L1 + MSE + 1e-6 * KL (LDM's weighting: KL summed over latent elements, reconstruction per pixel summed,
           both per image), AdamW, warmup + cosine learning rate, EMA of the weights (the EMA is what is exported).
  latents  encode a fixed set of synthetic scenes with the EMA VAE (posterior mean and std, so every UNet step
           draws a fresh latent sample) and measure the latent std -> scale_factor (scaled latents have unit
           variance); encode every caption (and "") once with the frozen text encoder, exactly as inference does
           (BOS, tokens, EOS padding to 77, final layer after ln_final).
  unet     eps-prediction DDPM on the scaled latents (with --base: continuing that checkpoint's UNet on a new
           schedule) with SD's scaled-linear alphas_cumprod (so CompVisDenoiser and every sampler apply
           unchanged), Min-SNR-5 loss weights (Hang et al. 2023, "Efficient Diffusion Training
           via Min-SNR Weighting Strategy"), 10 % empty captions (classifier-free guidance), EMA.
  export   sdcore/weights/sdcore-tiny.safetensors in the LDM layout (model.diffusion_model.*, first_stage_model.*,
           cond_stage_model.transformer.text_model.* via open_clip_to_hf, alphas_cumprod). Runs with whatever phases
           have finished (an untrained UNet is exported as initialised).

The text encoder is the real CLIP architecture and tokenizer at width 128, initialised with open_clip's scheme from
the seed and frozen in stage 1: its outputs are fixed random features of the token sequence, which the UNet's
cross-attention learns to read. This keeps the UNet steps cheap (text features are computed once per caption).

Stage 2 (issue 14; phases of `stage2`, starting from the stage-1 checkpoint given with --base):

  decoder  fine-tune post_quant_conv + decoder on full 64 px images with edge-weighted L1 + MSE (`edge_weights`), the
           encoder frozen (latents, scale_factor, the UNet and the Approx-cheap fit stay valid): against the coloured
           speck in the bottom-right corner (eval_tiny.corner_speck).
  corners  (with --corner-steps > 0) continue that decoder with `corner_loss` on the four 8 px corner blocks, plain
           images in every batch and image sizes cycling through 48/64/80 px: the speck came from corner features
           the decoder built from its zero padding, dominating its GroupNorm statistics (so it grew with the size).
           --corner-init fresh trains a new decoder this way instead (on the same frozen encoder), with
           --corner-ramp to switch the corner loss on after the decoder has learnt to reconstruct.
           --corner-distill W (the recipe's step 5) replaces the reconstruction loss by W x `distill_loss`, which
           holds every pixel outside the corner blocks to the starting decoder's output, so only the corners move.
  latents  as above, with the base encoder and scale factor, also keeping each scene's emphasis weight
           (tiny_data.emphasis_weight: its size) and the caption tokens.
  joint    train the text encoder (ln_final frozen, see `make_text_unet`) and fine-tune the UNet together (or, with
           --joint-from, continue an earlier joint run's EMA on a new learning-rate schedule); for
           --emphasis-p of the samples the colour word carries the scene's emphasis weight, applied as inference
           applies it (sdcore.prompts.apply_emphasis), so "a (red:1.5) circle" draws a larger red circle.
  export   as above, with the stage-2 decoder, text encoder and UNet where they exist.

Every phase adds its process CPU time (time.process_time) to cpu_seconds.json in the workdir.

Usage: python scripts/train_tiny.py all --workdir /work/tiny_run  (or one phase name; see --help)
       python scripts/train_tiny.py stage2 --base stage1.safetensors --workdir /work/tiny_run2 --no-bf16 ...
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_data  # noqa: E402

from sdcore import families  # noqa: E402
from sdcore.models.text import TextEncoder, load_tokenizer, open_clip_to_hf  # noqa: E402
from sdcore.models.unet import UNetModel  # noqa: E402
from sdcore.models.vae import AutoencoderKL  # noqa: E402
from sdcore.sampling.denoisers import sd_alphas_cumprod  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BOS, EOS = 49406, 49407  # CLIP tokenizer's <start_of_text>, <end_of_text> (also SD1's padding token)


# ---- helpers ------------------------------------------------------------------------------------------------------

def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def step_rng(seed: int, phase: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, phase, step])


def step_generator(seed: int, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_000_019 + step)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def posterior_latents(mean: torch.Tensor, std: torch.Tensor, idx: torch.Tensor, scale: float,
                      gen: torch.Generator) -> torch.Tensor:
    """Scaled latents of dataset items `idx`: scale * (mean + std * eps), eps ~ N(0, 1) drawn from `gen` (LDM
    `DiagonalGaussianDistribution.sample` then `get_first_stage_encoding`). mean, std: [N, C, h, w]."""
    return (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale


def drop_captions(caption_ids: torch.Tensor, idx: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Caption indices of items `idx`, each replaced by 0 (the empty caption) with probability `p`, one draw per
    item from `gen` (classifier-free guidance training: Ho & Salimans 2022)."""
    ids = caption_ids[idx].clone()
    ids[torch.rand(len(idx), generator=gen) < p] = 0
    return ids


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, sqrt_a: torch.Tensor,
             sqrt_1ma: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alphas_cumprod[t]) x0 + sqrt(1 - alphas_cumprod[t]) eps (DDPM forward process, Ho et al. 2020
    eq. 4). x0, eps: [B, C, h, w]; t: [B] int64 in [0, 1000); sqrt_a, sqrt_1ma: [1000]."""
    return sqrt_a[t].view(-1, 1, 1, 1) * x0 + sqrt_1ma[t].view(-1, 1, 1, 1) * eps


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def save_state(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def tiny_family(scale_factor: float | None = None) -> families.Family:
    fam = families.TINY
    if scale_factor is not None:
        from dataclasses import replace
        fam = replace(fam, vae=replace(fam.vae, scale_factor=scale_factor))
    return fam


def unet_config(args) -> families.UNetConfig:
    """families.TINY's UNet, with --unet-res-blocks ResBlocks per level if given (1 is stage 1's UNet: the loader
    reads num_res_blocks from the file's shapes, so such a checkpoint still loads as family "tiny")."""
    from dataclasses import replace

    config = tiny_family().unet
    return config if args.unet_res_blocks is None else replace(config, num_res_blocks=args.unet_res_blocks)


def make_text_encoder(seed: int) -> TextEncoder:
    te = TextEncoder(tiny_family().text[0])
    te.reset_parameters(torch.Generator().manual_seed(seed + 7))
    return te.eval().requires_grad_(False)


def caption_tokens(tokenizer, captions: list[str], length: int = 77) -> torch.Tensor:
    """SD1 token layout: BOS, BPE tokens, then EOS repeated to `length` (A1111 pads SD1 prompts with EOS)."""
    rows = []
    for text in captions:
        ids = tokenizer.encode(text)[: length - 2]
        rows.append([BOS] + ids + [EOS] * (length - 1 - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


# ---- phase: vae ---------------------------------------------------------------------------------------------------

def vae_batch(seed: int, step: int, batch: int) -> torch.Tensor:
    """Half photo crops, half scenes. Three steps in four use 32 px crops of them (4x cheaper; the VAE is
    convolutional but for its 8x8 mid attention), every fourth step half as many full 64 px images."""
    rng = step_rng(seed, 1, step)
    size = tiny_data.SIZE if step % 4 == 3 else tiny_data.SIZE // 2
    batch = batch // 2 if size == tiny_data.SIZE else batch
    n_photo = batch // 2
    images = [tiny_data.photo_crop(rng, "train") for _ in range(n_photo)]
    images += [tiny_data.sample_scene(rng)[0] for _ in range(batch - n_photo)]
    if size < tiny_data.SIZE:
        y, x = rng.integers(0, tiny_data.SIZE - size + 1, (2, batch))
        images = [im[a:a + size, b:b + size] for im, a, b in zip(images, y, x)]
    return to_tensor(np.stack(images))


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator, kl_weight: float):
    """(loss, {l1, mse, kl}, reconstruction float32 like x) of one VAE step on x."""
    posterior = vae.encode(x)
    z = posterior.sample(generator)
    rec = vae.decode(z).float()
    l1 = (rec - x).abs().mean()
    mse = (rec - x).pow(2).mean()
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    pixels = x[0].numel()
    return l1 + mse + kl_weight * kl / pixels, dict(l1=l1.item(), mse=mse.item(), kl=kl.item()), rec


def setup(make, seed: int, lr: float, weight_decay: float, state_path: Path):
    """(model, ema, optimizer, first step): fresh from `seed`, or resumed from `state_path` when it exists."""
    torch.manual_seed(seed)
    model = make()
    ema = make().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    if not state_path.exists():
        return model, ema, opt, 0
    state = torch.load(state_path, weights_only=True)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    return model, ema, opt, state["step"]


def train_loop(name: str, loss_fn, model, ema, opt, start: int, total: int, peak_lr: float, warmup: int,
               args, ema_decay: float | None = None) -> None:
    """AdamW steps `start`..`total`-1 on `loss_fn(step) -> (loss, {name: float})` with warmup + cosine LR,
    gradient clipping at 1, EMA (warming up as (1+step)/(10+step)); a CSV log row every 10 steps and the full
    state every `args.save_every` steps (the resume point). `ema_decay` defaults to args.ema."""
    ema_decay = args.ema if ema_decay is None else ema_decay
    work = Path(args.workdir)
    t0 = time.time()
    bar = tqdm(range(start, total), initial=start, total=total, desc=name, mininterval=10)
    for step in bar:
        lr = lr_at(step, total, peak_lr, warmup=warmup)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        loss, parts = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        if step % 10 == 0:
            append_log(work / f"{name}_log.csv", dict(step=step, loss=loss.item(), **parts, lr=lr,
                                                      seconds=round(time.time() - t0, 1)))
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == total:
            save_state(work / f"{name}_state.pt", model=model.state_dict(), ema=ema.state_dict(),
                       opt=opt.state_dict(), step=step + 1)


def train_vae(args) -> None:
    """Phase vae. With --vae-sizes (issue 14's corner recipe from the first step, instead of phase corners'
    fine-tune): batches of `corners_batch` at sizes cycling through --vae-sizes with --corner-flat plain images,
    the loss plus `corner_gain_at` x `corner_loss`, ramped in over --corner-ramp."""
    vae, ema, opt, start = setup(lambda: AutoencoderKL(tiny_family().vae), args.seed, args.vae_lr, 0.0,
                                 Path(args.workdir) / "vae_state.pt")
    sizes = [int(s) for s in args.vae_sizes.split(",")] if args.vae_sizes else None

    def loss_fn(step):
        if sizes is None:
            x = vae_batch(args.seed, step, args.vae_batch)
        else:
            x = corners_batch(args.seed, step, args.vae_batch, sizes[step % len(sizes)], args.corner_flat)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, parts, rec = vae_loss(vae, x, step_generator(args.seed, 1, step), kl_weight=1e-6)
        if sizes is not None:
            corner = corner_loss(rec, x, args.corner_block)
            loss = loss + corner_gain_at(step, args.vae_steps, args.corner_gain, args.corner_ramp) * corner
            parts["corner"] = corner.item()
        return loss, parts

    train_loop("vae", loss_fn, vae, ema, opt, start, args.vae_steps, args.vae_lr, 200, args)


def load_ema(path: Path, module: torch.nn.Module) -> torch.nn.Module:
    state = torch.load(path, weights_only=True)
    module.load_state_dict(state["ema"])
    return module.eval().requires_grad_(False)


# ---- phase: latents -----------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_dataset(args) -> None:
    work = Path(args.workdir)
    vae = load_vae(args)
    rng = np.random.default_rng([args.seed, 2])
    captions = tiny_data.all_captions()
    index = {c: i + 1 for i, c in enumerate(captions)}  # 0 = empty caption
    means, stds, caption_ids, weights, large = [], [], [], [], []
    chunk = 256
    for start in tqdm(range(0, args.num_scenes, chunk), desc="encode scenes", mininterval=10):
        n = min(chunk, args.num_scenes - start)
        scenes = [tiny_data.sample_scene(rng) for _ in range(n)]
        x = to_tensor(np.stack([im for im, _ in scenes]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            posterior = vae.encode(x)
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
        caption_ids += [index[sc.caption()] for _, sc in scenes]
        weights += [tiny_data.emphasis_weight(sc) for _, sc in scenes]
        large += [sc.position is None for _, sc in scenes]
    mean, std = torch.cat(means), torch.cat(stds)
    sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(args.seed))
    scale_factor = round(float(1.0 / sample.std()), 4)  # the value written into families.TINY_VAE
    if args.keep_scale_factor:  # the encoder is the base model's: keep the scale the base UNet was trained with
        scale_factor = tiny_family().vae.scale_factor
    torch.save(dict(mean=mean, std=std, caption_ids=torch.tensor(caption_ids), scale_factor=scale_factor,
                    emphasis=torch.tensor(weights, dtype=torch.float32), large=torch.tensor(large)),
               work / "latents.pt")

    te = make_text_encoder(args.seed)
    tokenizer = load_tokenizer()
    texts = [""] + captions
    tokens = caption_tokens(tokenizer, texts)
    hidden = torch.cat([te(tokens[i:i + 128]).hidden for i in range(0, len(texts), 128)])
    torch.save(dict(texts=texts, hidden=hidden, tokens=tokens), work / "text.pt")
    (work / "scale_factor.json").write_text(json.dumps(dict(scale_factor=scale_factor,
                                                            latent_std=float(sample.std()),
                                                            latent_mean=float(sample.mean()))))
    print(f"latents: {tuple(mean.shape)}, latent std {float(sample.std()):.4f} -> scale_factor {scale_factor:.5f}")


# ---- phase: unet --------------------------------------------------------------------------------------------------

def train_unet(args) -> None:
    work = Path(args.workdir)
    data = torch.load(work / "latents.pt", weights_only=True)
    text = torch.load(work / "text.pt", weights_only=True)
    hidden = text["hidden"]
    mean, std, caption_ids = data["mean"], data["std"], data["caption_ids"]
    scale = data["scale_factor"]
    alphas = sd_alphas_cumprod().double()
    snr = alphas / (1 - alphas)
    weights = (torch.clamp(snr, max=args.min_snr_gamma) / snr).float()
    sqrt_a, sqrt_1ma = alphas.sqrt().float(), (1 - alphas).sqrt().float()

    unet, ema, opt, start = setup(lambda: UNetModel(unet_config(args)), args.seed + 3, args.unet_lr, 0.01,
                                  work / "unet_state.pt")
    if start == 0 and args.base:  # continue the --base checkpoint's UNet on a new schedule (fresh optimizer)
        base_module(args, "model.diffusion_model.", unet)
        ema.load_state_dict(unet.state_dict())
    n = mean.shape[0]

    def loss_fn(step):
        gen = step_generator(args.seed, 3, step)
        idx = torch.randint(0, n, (args.unet_batch,), generator=gen)
        x0 = posterior_latents(mean, std, idx, scale, gen)
        ids = drop_captions(caption_ids, idx, args.uncond_p, gen)
        t = torch.randint(0, 1000, (args.unet_batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = q_sample(x0, t, eps, sqrt_a, sqrt_1ma)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.unet_bf16):
            pred = unet(xt, t.float(), hidden[ids])
        per_sample = (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))
        return (per_sample * weights[t]).mean(), dict(mse=per_sample.mean().item())

    train_loop("unet", loss_fn, unet, ema, opt, start, args.unet_steps, args.unet_lr, args.unet_warmup, args)


# ---- stage 2 (issue 14): decoder fine-tune and joint text encoder + UNet training from a base checkpoint -----------

def load_base(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a tiny checkpoint (safetensors, LDM layout), every tensor as float32."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--base {str(path)!r} is not a file: stage 2 starts from a trained tiny checkpoint")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def base_module(args, prefix: str, module: torch.nn.Module) -> torch.nn.Module:
    """`module` with the `prefix`-ed weights of the --base checkpoint (strict: every key must match)."""
    sd = load_base(args.base)
    module.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return module


def load_vae(args) -> AutoencoderKL:
    """The EMA VAE of phase vae when it ran in this workdir, else the --base checkpoint's VAE (eval mode, frozen)."""
    work = Path(args.workdir)
    if (work / "vae_state.pt").exists():
        return load_ema(work / "vae_state.pt", AutoencoderKL(tiny_family().vae))
    return base_module(args, "first_stage_model.", AutoencoderKL(tiny_family().vae)).eval().requires_grad_(False)



def resume(path: Path, model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load a stage's saved model, EMA and optimizer state from `path` if it exists; the step to continue from."""
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    return state["step"]

def edge_weights(size: int, band: int, gain: float) -> torch.Tensor:
    """float32 [size, size] per-pixel loss weights: 1 inside, 1 + `gain` on the `band` pixels along every edge and
    1 + 2 `gain` where two edge bands meet (the corners), normalised to mean 1 so the loss scale is unchanged."""
    ramp = torch.zeros(size)
    ramp[:band] = 1
    ramp[-band:] = 1
    w = 1 + gain * (ramp[:, None] + ramp[None, :])
    return w / w.mean()


def decoder_batch(seed: int, step: int, batch: int) -> torch.Tensor:
    """Half photo crops, half scenes, all full 64 px (the corners of the decoded image are where inference sees
    them, unlike the 32 px crops of phase vae)."""
    rng = step_rng(seed, 4, step)
    images = [tiny_data.photo_crop(rng, "train") for _ in range(batch // 2)]
    images += [tiny_data.sample_scene(rng)[0] for _ in range(batch - batch // 2)]
    return to_tensor(np.stack(images))


class DecoderOnly(torch.nn.Module):
    """The trainable part of the VAE in phase decoder: post_quant_conv + decoder (encoder and quant_conv frozen, so
    latents, scale_factor, the UNet and the Approx-cheap fit stay valid)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder


def train_decoder(args) -> None:
    """Phase decoder: fine-tune post_quant_conv + decoder on full 64 px images with edge-weighted L1 + MSE
    (`edge_weights`), the encoder frozen; the EMA of the decoder is what export writes."""
    work = Path(args.workdir)
    vae = base_module(args, "first_stage_model.", AutoencoderKL(tiny_family().vae))
    vae.requires_grad_(False)
    model = DecoderOnly(vae).requires_grad_(True)
    ema = DecoderOnly(base_module(args, "first_stage_model.", AutoencoderKL(tiny_family().vae))).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.decoder_lr, weight_decay=0.0, betas=(0.9, 0.99))
    start = resume(work / "decoder_state.pt", model, ema, opt)
    weight = edge_weights(tiny_data.SIZE, args.edge_band, args.edge_gain)

    def loss_fn(step):
        x = decoder_batch(args.seed, step, args.decoder_batch)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            z = vae.encode(x).sample(step_generator(args.seed, 4, step))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            rec = vae.decode(z.float()).float()
        l1 = ((rec - x).abs() * weight).mean()
        mse = ((rec - x).pow(2) * weight).mean()
        return l1 + mse, dict(l1=l1.item(), mse=mse.item())

    train_loop("decoder", loss_fn, model, ema, opt, start, args.decoder_steps, args.decoder_lr, 50, args,
               ema_decay=args.stage2_ema)


def corner_loss(rec: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:
    """L1 + MSE of `rec` against `x` over the `block` x `block` pixels at each of the four image corners (all four
    blocks pooled): rec, x float [B, C, H, W] with H, W >= block; a scalar (0 when the corners are exact). Raises
    ValueError for a shape mismatch or a block larger than the image."""
    if rec.shape != x.shape or rec.ndim != 4:
        raise ValueError(f"rec {tuple(rec.shape)} and x {tuple(x.shape)} must be the same [B, C, H, W] shape")
    if not 0 < block <= min(x.shape[-2:]):
        raise ValueError(f"block={block} must be in 1..{min(x.shape[-2:])} (the image's smaller side)")
    d = rec - x
    corners = torch.cat([d[..., :block, :block], d[..., :block, -block:], d[..., -block:, :block],
                         d[..., -block:, -block:]])
    return corners.abs().mean() + corners.pow(2).mean()


def corner_blocks(size: int, block: int) -> torch.Tensor:
    """bool [size, size]: True on the `block` x `block` pixels at each of the four corners (what `corner_loss`
    reads). Raises ValueError unless 0 < block <= size."""
    if not 0 < block <= size:
        raise ValueError(f"block={block} must be in 1..{size} (the image side)")
    edge = torch.zeros(size, dtype=torch.bool)
    edge[:block] = True
    edge[-block:] = True
    return edge[:, None] & edge[None, :]


def distill_loss(rec: torch.Tensor, held: torch.Tensor, block: int) -> torch.Tensor:
    """L1 + MSE of `rec` against `held` (the starting decoder's output for the same latents) over every pixel
    outside the four `block` px corner blocks: rec, held float [B, C, H, W]; a scalar. With it phase corners moves
    the corners alone; the plain reconstruction loss moved the whole decoder and cost the scenes 0.9-2.3 dB
    (weights/README.md, "The speck against the scene PSNR"). Raises ValueError for a shape mismatch."""
    if rec.shape != held.shape or rec.ndim != 4:
        raise ValueError(f"rec {tuple(rec.shape)} and held {tuple(held.shape)} must be the same [B, C, H, W] shape")
    if rec.shape[-1] != rec.shape[-2]:
        raise ValueError(f"rec {tuple(rec.shape)} must be square")
    d = (rec - held)[..., ~corner_blocks(rec.shape[-1], block)]
    return d.abs().mean() + d.pow(2).mean()


def corners_batch(seed: int, step: int, batch: int, size: int, flat: int, crop: bool = False) -> torch.Tensor:
    """float32 [batch, 3, size, size] in [-1, 1]: (batch - flat) // 2 photo crops, the rest of the non-flat
    images synthetic scenes (both 64 px, or `size` px photo crops when size < 64, resized to `size` bilinearly
    otherwise: the photo pyramid's smallest level is 64 px), then `flat` images of one uniform random sRGB colour
    each (the plain backgrounds on which a corner speck shows). With `crop` a scene is cut to `size` at a random
    offset instead of resized (sharp edges at every size, as phase vae's 32 px crops); it needs size <= 64 and
    raises ValueError otherwise."""
    from PIL import Image

    if crop and size > tiny_data.SIZE:
        raise ValueError(f"size={size}: crop needs a size <= {tiny_data.SIZE} (the scenes are drawn at that size)")

    def resized(image: np.ndarray) -> np.ndarray:
        if image.shape[0] == size:
            return image
        if crop:
            y, x = rng.integers(0, image.shape[0] - size + 1, 2)
            return image[y:y + size, x:x + size]
        return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))

    rng = step_rng(seed, 7, step)
    n = batch - flat
    images = [resized(tiny_data.photo_crop(rng, "train", size=min(size, tiny_data.SIZE))) for _ in range(n // 2)]
    images += [resized(tiny_data.sample_scene(rng)[0]) for _ in range(n - n // 2)]
    images += [np.broadcast_to(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), (size, size, 3))
               for _ in range(flat)]
    return to_tensor(np.stack(images))


def train_corners(args) -> None:
    """Phase corners: continue the decoder phase's EMA decoder (post_quant_conv + decoder, encoder frozen) with the
    edge-weighted loss plus `args.corner_gain` x `corner_loss` on the four `args.corner_block` px corner blocks, on
    images whose size cycles through `args.corner_sizes` (so the decoder cannot keep size-specific corner features:
    the speck grew with the image size), `args.corner_flat` plain images per batch. With `args.corner_distill` > 0
    the edge-weighted loss is replaced by that weight x `distill_loss` against a frozen copy of the decoder the run
    starts from (the base's, or --corner-from's). The EMA is what export writes."""
    work = Path(args.workdir)
    vae = base_module(args, "first_stage_model.", AutoencoderKL(tiny_family().vae))
    if args.corner_init == "fresh":
        vae = fresh_decoder(vae, args.seed)
    elif args.corner_from:  # a second corners run with a new schedule, from an earlier run's EMA decoder
        load_ema(Path(args.corner_from), DecoderOnly(vae))
    elif (work / "decoder_state.pt").exists():
        load_ema(work / "decoder_state.pt", DecoderOnly(vae))
    vae.requires_grad_(False)
    teacher = copy.deepcopy(vae) if args.corner_distill > 0 else None
    model = DecoderOnly(vae).requires_grad_(True)
    ema = DecoderOnly(AutoencoderKL(tiny_family().vae)).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.corner_lr, weight_decay=0.0, betas=(0.9, 0.99))
    start = resume(work / "corners_state.pt", model, ema, opt)
    sizes = [int(s) for s in args.corner_sizes.split(",")]

    def loss_fn(step):
        size = sizes[step % len(sizes)]
        x = corners_batch(args.seed, step, args.decoder_batch, size, args.corner_flat, crop=args.corner_crop)
        with torch.no_grad():
            z = vae.encode(x).sample(step_generator(args.seed, 7, step))
        rec = vae.decode(z.float()).float()
        corner = corner_loss(rec, x, args.corner_block)
        gain = corner_gain_at(step, args.corner_steps, args.corner_gain, args.corner_ramp)
        if teacher is not None:
            with torch.no_grad():
                held = teacher.decode(z.float()).float()
            keep = distill_loss(rec, held, args.corner_block)
            return args.corner_distill * keep + gain * corner, dict(keep=keep.item(), corner=corner.item())
        weight = edge_weights(size, args.edge_band, args.edge_gain)
        l1 = ((rec - x).abs() * weight).mean()
        mse = ((rec - x).pow(2) * weight).mean()
        return l1 + mse + gain * corner, dict(l1=l1.item(), mse=mse.item(), corner=corner.item())

    train_loop("corners", loss_fn, model, ema, opt, start, args.corner_steps, args.corner_lr, args.corner_warmup,
               args, ema_decay=args.stage2_ema)


def corner_gain_at(step: int, total: int, gain: float, ramp: tuple[float, float]) -> float:
    """The corner-loss weight at `step` of `total`: 0 before the fraction ramp[0] of the steps, rising linearly to
    `gain` at ramp[1], `gain` after (ramp (0, 0): `gain` throughout). A decoder trained from scratch with the full
    weight from the first step stalled at 11 dB (corners are a quarter of a 32 px image's pixels): it learns to
    reconstruct first, then its corners."""
    start, end = ramp
    if not 0 <= start <= end <= 1:
        raise ValueError(f"corner ramp {ramp}: need 0 <= start <= end <= 1")
    progress = step / max(1, total)
    if progress >= end:
        return gain
    if progress < start:
        return 0.0
    return gain * (progress - start) / (end - start)


def fresh_decoder(vae: AutoencoderKL, seed: int) -> AutoencoderKL:
    """`vae` with post_quant_conv and decoder replaced by freshly initialised ones (PyTorch's default init, from
    `seed`); the encoder and quant_conv are kept, so the latents and everything trained on them stay valid. For
    phase corners with --corner-init fresh: the corner loss and the varied sizes from the first step, instead of a
    fine-tune against corner features a decoder already learnt."""
    torch.manual_seed(seed + 11)
    new = AutoencoderKL(tiny_family().vae)
    vae.post_quant_conv, vae.decoder = new.post_quant_conv, new.decoder
    return vae


class TextUNet(torch.nn.Module):
    """Phase joint's trainable pair: the CLIP text encoder (`te`, ln_final frozen) and the UNet (`unet`)."""

    def __init__(self, te: TextEncoder, unet: UNetModel):
        super().__init__()
        self.te = te
        self.unet = unet


def make_text_unet(args) -> TextUNet:
    """Text encoder as phase latents encoded the captions with (make_text_encoder: the features the base UNet was
    trained on), the base checkpoint's UNet. ln_final stays frozen at weight 1, bias 0: every token's feature then
    has mean exactly 0, so sdcore's "Original" emphasis is "No norm" (z * m, sdcore.prompts.apply_emphasis) by
    construction, the same in training and at inference, and never divides by a mean that training moved near 0."""
    te = make_text_encoder(args.seed).train().requires_grad_(True)
    te.ln_final.requires_grad_(False)
    unet = base_module(args, "model.diffusion_model.", UNetModel(unet_config(args)))
    return TextUNet(te, unet)


def colour_multipliers(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """float32 [B, 77] A1111 token multipliers: `weights` [B] on token 2 (the colour word of "a {colour} ...", one
    BPE token for every PALETTE name, after BOS and "a"), 1 elsewhere; rows of the empty caption stay 1."""
    m = torch.ones(tokens.shape, dtype=torch.float32)
    has_caption = tokens[:, 1] != EOS
    m[has_caption, 2] = weights[has_caption]
    return m


@torch.no_grad()
def photo_latents(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 [--photo-crops, 4, 8, 8]: the posterior of that many training photo crops
    (tiny_data.photo_crop, split "train", 64 px) under the workdir's VAE (load_vae), encoded once and kept in
    workdir/photos.pt (a resumed run reuses it)."""
    path = Path(args.workdir) / "photos.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        return cached["mean"], cached["std"]
    vae = load_vae(args)
    rng = np.random.default_rng([args.seed, 8])
    means, stds = [], []
    for start in range(0, args.photo_crops, 256):
        x = to_tensor(np.stack([tiny_data.photo_crop(rng, "train")
                                for _ in range(min(256, args.photo_crops - start))]))
        posterior = vae.encode(x)
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    mean, std = torch.cat(means), torch.cat(stds)
    save_state(path, mean=mean, std=std)
    return mean, std


def mix_photos(x0: torch.Tensor, ids: torch.Tensor, photos: tuple[torch.Tensor, torch.Tensor], scale: float,
               p: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ids) with each sample, with probability `p`, replaced by a scaled posterior draw of a random photo crop
    of `photos` (posterior_latents) and the empty caption (id 0): the unconditional model then also knows photos,
    which img2img with an empty prompt denoises. x0: [B, 4, h, w]; ids: int64 [B]; new tensors, inputs kept."""
    mean, std = photos
    use = torch.rand(len(ids), generator=gen) < p
    pidx = torch.randint(0, mean.shape[0], (len(ids),), generator=gen)
    xp = posterior_latents(mean, std, pidx, scale, gen)
    return torch.where(use.view(-1, 1, 1, 1), xp, x0), torch.where(use, torch.zeros_like(ids), ids)


def train_joint(args) -> None:
    """Phase joint: train the text encoder (ln_final frozen) and fine-tune the UNet together, with the caption
    words' emphasis weight on the colour word for `args.emphasis_p` of the samples (tiny_data.emphasis_weight: the
    drawn size), applied as inference applies it (sdcore.prompts.apply_emphasis, "Original")."""
    from sdcore.prompts import apply_emphasis

    work = Path(args.workdir)
    data = torch.load(work / "latents.pt", weights_only=True)
    tokens_all = torch.load(work / "text.pt", weights_only=True)["tokens"]
    mean, std, caption_ids, emph = data["mean"], data["std"], data["caption_ids"], data["emphasis"]
    scale = data["scale_factor"]
    alphas = sd_alphas_cumprod().double()
    snr = alphas / (1 - alphas)
    weights = (torch.clamp(snr, max=args.min_snr_gamma) / snr).float()
    sqrt_a, sqrt_1ma = alphas.sqrt().float(), (1 - alphas).sqrt().float()

    model = make_text_unet(args)
    ema = make_text_unet(args).requires_grad_(False)
    groups = [dict(params=[p for p in model.unet.parameters()], weight_decay=0.01, lr_scale=1.0),
              dict(params=[p for p in model.te.parameters() if p.requires_grad], weight_decay=0.0,
                   lr_scale=args.te_lr / args.joint_lr)]
    opt = torch.optim.AdamW(groups, lr=args.joint_lr, betas=(0.9, 0.99))
    start = resume(work / "joint_state.pt", model, ema, opt)
    if start == 0 and args.joint_from:  # a new schedule from an earlier joint run's EMA (fresh optimizer)
        init = torch.load(args.joint_from, weights_only=True)["ema"]
        model.load_state_dict(init)
        ema.load_state_dict(init)
    n = mean.shape[0]
    large = torch.nonzero(data["large"]).flatten() if args.large_p > 0 else None
    photos = photo_latents(args) if args.photo_p > 0 else None

    def loss_fn(step):
        gen = step_generator(args.seed, 5, step)
        idx = torch.randint(0, n, (args.unet_batch,), generator=gen)
        if large is not None:  # extra draws only then, so --large-p 0 keeps the random stream of earlier runs
            pick = torch.rand(args.unet_batch, generator=gen) < args.large_p
            idx = torch.where(pick, large[torch.randint(0, len(large), (args.unet_batch,), generator=gen)], idx)
        x0 = posterior_latents(mean, std, idx, scale, gen)
        ids = drop_captions(caption_ids, idx, args.uncond_p, gen)
        emphasised = torch.rand(args.unet_batch, generator=gen) < args.emphasis_p
        t = torch.randint(0, 1000, (args.unet_batch,), generator=gen)
        if args.high_t_p > 0:  # extra draws only then (as --large-p): the layout forms at high noise levels
            high = torch.rand(args.unet_batch, generator=gen) < args.high_t_p
            t = torch.where(high, torch.randint(400, 1000, (args.unet_batch,), generator=gen), t)
        if photos is not None:  # extra draws only then (as --large-p): photo crops under the empty caption
            x0, ids = mix_photos(x0, ids, photos, scale, args.photo_p, gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = q_sample(x0, t, eps, sqrt_a, sqrt_1ma)
        tokens = tokens_all[ids]
        m = colour_multipliers(tokens, torch.where(emphasised, emph[idx], torch.ones(args.unet_batch)))
        context = apply_emphasis(model.te(tokens).hidden, m)
        pred = model.unet(xt, t.float(), context)
        per_sample = (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))
        return (per_sample * weights[t]).mean(), dict(mse=per_sample.mean().item())

    train_loop("joint", loss_fn, model, ema, opt, start, args.joint_steps, args.joint_lr, 100, args,
               ema_decay=args.stage2_ema)


def record_cpu(work: Path, phase: str, seconds: float) -> None:
    """Add `seconds` of process CPU time (time.process_time) to phase's entry of work/cpu_seconds.json."""
    path = work / "cpu_seconds.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    table[phase] = round(table.get(phase, 0.0) + seconds, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)


# ---- phase: export ------------------------------------------------------------------------------------------------

def export(args) -> None:
    from safetensors.torch import save_file

    work = Path(args.workdir)
    fam = tiny_family()
    if (work / "scale_factor.json").exists():
        trained = json.loads((work / "scale_factor.json").read_text())["scale_factor"]
        if trained != fam.vae.scale_factor:
            raise SystemExit(f"families.TINY_VAE.scale_factor is {fam.vae.scale_factor} but the UNet was trained "
                             f"with {trained}: set it in sdcore/families.py (the loader reads it from there)")
    sd: dict[str, torch.Tensor] = {}
    vae = AutoencoderKL(fam.vae)
    torch.manual_seed(args.seed + 3)
    unet = UNetModel(unet_config(args))
    te = make_text_encoder(args.seed)
    if (work / "vae_state.pt").exists():
        load_ema(work / "vae_state.pt", vae)
    elif args.base:
        base_module(args, "first_stage_model.", vae)
    if (work / "decoder_state.pt").exists():
        load_ema(work / "decoder_state.pt", DecoderOnly(vae))
    if (work / "corners_state.pt").exists():
        load_ema(work / "corners_state.pt", DecoderOnly(vae))
    if (work / "unet_state.pt").exists():
        load_ema(work / "unet_state.pt", unet)
    elif args.base:
        base_module(args, "model.diffusion_model.", unet)
    if (work / "joint_state.pt").exists():
        load_ema(work / "joint_state.pt", TextUNet(te, unet))
    for k, v in unet.state_dict().items():
        sd["model.diffusion_model." + k] = v.half()
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + k] = v.float()
    for k, v in open_clip_to_hf(te.state_dict()).items():
        sd["cond_stage_model.transformer." + k] = v.half()
    sd["alphas_cumprod"] = sd_alphas_cumprod().float()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out),
              metadata={"family": "tiny", "note": "sdcore tiny model, trained by scripts/train_tiny.py"})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(sd)} tensors)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["vae", "latents", "unet", "export", "all", "decoder", "corners", "joint",
                                          "stage2"])
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "tiny"))
    ap.add_argument("--out", default=str(ROOT / "sdcore" / "weights" / "sdcore-tiny.safetensors"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is fastest on a shared, oversubscribed CPU (2 threads spin-wait on each other)")
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-sizes", default=None,
                    help="vae: image sizes cycled through with plain images and the ramped corner loss "
                         "(--corner-flat, --corner-gain, --corner-ramp, --corner-block); default: stage 1's 32/64 px")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast for the VAE (about 2x faster on CPUs with AMX)")
    ap.add_argument("--num-scenes", type=int, default=16000)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--unet-batch", type=int, default=48)
    ap.add_argument("--unet-lr", type=float, default=8e-4)
    ap.add_argument("--unet-warmup", type=int, default=300)
    ap.add_argument("--unet-res-blocks", type=int, default=None,
                    help="ResBlocks per UNet level (default: families.TINY's, 2; stage 1 had 1)")
    ap.add_argument("--unet-bf16", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--uncond-p", type=float, default=0.1)
    ap.add_argument("--min-snr-gamma", type=float, default=5.0)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every", type=int, default=250)
    stage2 = ap.add_argument_group("stage 2 (phases decoder, joint; 'stage2' = decoder, latents, joint, export)")
    stage2.add_argument("--base", default=None, help="trained tiny checkpoint that stage 2 starts from")
    stage2.add_argument("--decoder-steps", type=int, default=400)
    stage2.add_argument("--decoder-batch", type=int, default=8)
    stage2.add_argument("--decoder-lr", type=float, default=2e-4)
    stage2.add_argument("--edge-band", type=int, default=4, help="pixels along each edge weighted up (decoder)")
    stage2.add_argument("--edge-gain", type=float, default=4.0, help="extra loss weight of the edge band (decoder)")
    stage2.add_argument("--corner-steps", type=int, default=0, help="steps of phase corners (0: skipped)")
    stage2.add_argument("--corner-lr", type=float, default=5e-4)
    stage2.add_argument("--corner-gain", type=float, default=10.0, help="weight of corner_loss (corners)")
    stage2.add_argument("--corner-block", type=int, default=8, help="corner block side in pixels (corners)")
    stage2.add_argument("--corner-flat", type=int, default=2, help="plain images per batch (corners)")
    stage2.add_argument("--corner-sizes", default="48,64,80", help="image sizes cycled through (corners)")
    stage2.add_argument("--corner-init", choices=["base", "fresh"], default="base",
                        help="corners: continue the decoder phase's (or --base's) decoder, or start a new one")
    stage2.add_argument("--corner-ramp", type=lambda v: tuple(float(x) for x in v.split(",")), default=(0.0, 0.0),
                        help="START,END fractions of the steps over which the corner gain rises from 0 (corners)")
    stage2.add_argument("--corner-crop", action="store_true",
                        help="cut scenes to the corners size instead of resizing them (sizes <= 64; corners)")
    stage2.add_argument("--corner-from", default=None,
                        help="state file of an earlier decoder/corners run whose EMA decoder phase corners starts from")
    stage2.add_argument("--corner-distill", type=float, default=0.0,
                        help="corners: weight of distill_loss, which holds every pixel outside the corner blocks "
                             "to the starting decoder's output, in place of the reconstruction loss (0: off)")
    stage2.add_argument("--corner-warmup", type=int, default=20, help="learning-rate warm-up steps (corners)")
    stage2.add_argument("--joint-steps", type=int, default=1500)
    stage2.add_argument("--joint-from", default=None,
                        help="joint_state.pt of an earlier joint run: start from its EMA with a new schedule (joint)")
    stage2.add_argument("--joint-lr", type=float, default=3e-4, help="peak learning rate of the UNet (joint)")
    stage2.add_argument("--te-lr", type=float, default=1e-3, help="peak learning rate of the text encoder (joint)")
    stage2.add_argument("--emphasis-p", type=float, default=0.5,
                        help="share of samples whose colour word carries its size as emphasis weight (joint)")
    stage2.add_argument("--large-p", type=float, default=0.0,
                        help="share of samples redrawn from the scenes without a position (large shapes) (joint)")
    stage2.add_argument("--high-t-p", type=float, default=0.0,
                        help="share of samples whose t is redrawn uniformly from [400, 999] (joint)")
    stage2.add_argument("--photo-p", type=float, default=0.0,
                        help="share of joint samples that are training photo crops under the empty caption")
    stage2.add_argument("--photo-crops", type=int, default=4096, help="photo crops encoded for --photo-p (joint)")
    stage2.add_argument("--stage2-ema", type=float, default=0.995)
    stage2.add_argument("--keep-scale-factor", action=argparse.BooleanOptionalAction, default=None,
                        help="latents: keep families.TINY_VAE.scale_factor (default: on when --base is given)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.keep_scale_factor is None:
        args.keep_scale_factor = args.base is not None
    phases = {"all": ["vae", "latents", "unet", "export"],
              "stage2": ["decoder", "corners", "latents", "joint", "export"]}.get(args.phase, [args.phase])
    work = Path(args.workdir)
    for phase in phases:
        if phase == "latents" and (work / "latents.pt").exists() and args.phase == "stage2":
            continue  # resumed run: the latents of this workdir are final
        if phase == "corners" and args.corner_steps == 0:
            continue
        t = time.process_time()
        {"vae": train_vae, "latents": encode_dataset, "unet": train_unet, "export": export, "decoder": train_decoder,
         "corners": train_corners, "joint": train_joint}[phase](args)
        record_cpu(work, phase, time.process_time() - t)


if __name__ == "__main__":
    main()
