"""Write a random-weight Stable Diffusion checkpoint in the exact LDM single-file layout.

The tensors are those of sdcore's own modules (UNetModel, AutoencoderKL, TextEncoder), named as in an original
checkpoint: `model.diffusion_model.*`, `first_stage_model.*` and the family's text encoders:
`cond_stage_model.transformer.text_model.*` (SD1, instruct-pix2pix: transformers layout),
`cond_stage_model.model.*` (SD2: open_clip layout with text_projection and logit_scale),
`conditioner.embedders.0.transformer.text_model.*` + `conditioner.embedders.1.model.*` (SDXL base / inpaint: CLIP-L
in transformers layout, bigG in open_clip layout), `conditioner.embedders.0.model.*` (SDXL refiner: bigG only).
LDM families (SD1, SD2, instruct-pix2pix) also get the DDPM buffers LDM's `DDPM.register_schedule` stores (`betas`,
`alphas_cumprod`, ...) and `model_ema.decay` / `model_ema.num_updates`; sgm's SDXL files have none. Every tensor is
random (seeded), including the output convs LDM zero-initialises, so parity tests built on these files compare
something. SD2's eps and v checkpoints differ only in their weights: here the UNet's output bias is shifted so
that A1111's one-step v-prediction probe classifies the file as its family says (`calibrate_v_probe`).

Usage:
    python scripts/make_checkpoint.py --family sd1 --size tiny --seed 0 out.safetensors
    python scripts/make_checkpoint.py --family sd1-inpaint --size full --dtype fp16 sd15-inpaint.ckpt
    python scripts/make_checkpoint.py --family sdxl --size tiny sdxl-tiny.safetensors

Importable: `make_state_dict(family, size, seed, dtype=torch.float32) -> dict[str, Tensor]`.
Needs only the base dependencies (torch, safetensors, open_clip for the text transformer's classes).
Never overwrites an existing file.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcore.families import FAMILIES, Family, UNetConfig  # noqa: E402
from sdcore.models.unet import UNetModel  # noqa: E402
from sdcore.models.vae import AutoencoderKL  # noqa: E402

SIZES = ("tiny", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = (".safetensors", ".ckpt")

# DDPM schedule of v1-inference.yaml (linear_start, linear_end, timesteps); LDM's "linear" schedule is linear in
# sqrt(beta) (ldm/modules/diffusionmodules/util.py `make_beta_schedule`).
LINEAR_START, LINEAR_END, NUM_TIMESTEPS = 0.00085, 0.012, 1000
EMA_DECAY = 0.9999  # ldm/modules/ema.py `LitEma(decay=0.9999)`


TINY_MAX_DEPTH = 2  # transformer blocks per attention level in tiny UNets (SDXL: 2 and 10; refiner: 4)


def tiny_unet(unet: UNetConfig) -> UNetConfig:
    """The family's UNet with narrow widths: same levels, blocks, attention layout and key names, context width 64.

    Heads are not stored in the weights, so a loader takes them from the family; the tiny UNet keeps them:
    SD1 (fixed head count 8) gets model_channels 32 (8 heads of 4); families with a fixed head width (64) get
    model_channels 64 so each level still has whole heads. Transformer depths above TINY_MAX_DEPTH are cut to it
    (SDXL (0, 2, 10) -> (0, 2, 2)); levels without attention keep the family's (unused) value, as the loader reads
    it. SD1: about 8.6 M parameters, SD2 34 M, SDXL 33 M."""
    channels = 32 if unet.num_head_channels == -1 else 64
    attention = {i for i in range(len(unet.channel_mult)) if 2 ** i in unet.attention_resolutions}
    depth = tuple(min(d, TINY_MAX_DEPTH) if i in attention else d for i, d in enumerate(unet.transformer_depth))
    return replace(unet, model_channels=channels, context_dim=64, transformer_depth=depth,
                   transformer_depth_middle=min(unet.transformer_depth_middle, TINY_MAX_DEPTH))


def tiny_family(family: Family) -> Family:
    """`family` with every component shrunk but the same key structure, so loaders and config detection see the
    family's layout: UNet per `tiny_unet`, VAE ch 32, text encoders 64 wide with 2 layers and one head (CLIP's
    head width is 64, the rule a loader uses to recover the head count from the width) and projection 64. The UNet's
    context width is the text widths' sum (SDXL: 64 + 64) and its y width the pooled projection plus the family's
    size embeddings (SDXL: 64 + 6 x 256; the 256 features per number are kept)."""
    text = tuple(replace(t, width=64, layers=2, heads=1, projection_dim=64 if t.projection_dim else 0)
                 for t in family.text)
    unet = replace(tiny_unet(family.unet), context_dim=sum(t.width for t in text))
    if family.vector:
        adm = family.unet.adm_in_channels - family.text[-1].projection_dim + text[-1].projection_dim
        unet = replace(unet, adm_in_channels=adm)
    return replace(family, unet=unet, vae=replace(family.vae, ch=32), text=text)


def family_config(family: str, size: str) -> Family:
    """The Family for a `--family` name and `--size`. Raises ValueError naming the bad argument."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; allowed: {sorted(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"size={size!r}; allowed: {SIZES}")
    return FAMILIES[family] if size == "full" else tiny_family(FAMILIES[family])


@torch.no_grad()
def random_like(shapes: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random float32 values for each (meta) tensor in `shapes`, in its order.

    Scales keep activations O(1) through the network: norm weights (1-D `*.weight`) 1 + 0.1 N(0,1); 1-D biases
    and other vectors 0.1 N(0,1); scalars 0.1 N(0,1); matrices and conv kernels N(0, 1/fan_in) with
    fan_in = numel / out_features (He/LeCun-style scaling)."""
    out = {}
    for name, t in shapes.items():
        noise = torch.randn(t.shape, generator=generator)
        if t.ndim >= 2:
            out[name] = noise.mul_(t[0].numel() ** -0.5)
        elif t.ndim == 1 and name.endswith("weight"):
            out[name] = noise.mul_(0.1).add_(1.0)
        else:
            out[name] = noise.mul_(0.1)
    return out


def ldm_ddpm_buffers() -> dict[str, torch.Tensor]:
    """The schedule buffers LDM's `DDPM.register_schedule` (ldm/models/diffusion/ddpm.py) saves, float32 [1000],
    for the v1 schedule (scaled-linear betas, v_posterior=0), plus the EMA bookkeeping of `LitEma`."""
    betas = torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, NUM_TIMESTEPS, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    buffers = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": torch.log(posterior_variance.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    buffers = {k: v.float() for k, v in buffers.items()}
    buffers["model_ema.decay"] = torch.tensor(EMA_DECAY, dtype=torch.float32)
    buffers["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return buffers


def no_extra_keys() -> dict[str, torch.Tensor]:
    """sgm checkpoints (SDXL) store no schedule buffers: the DiscreteDenoiser rebuilds its sigmas."""
    return {}


# Non-module keys per family; a new family must be added here deliberately.
EXTRA_KEYS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "sd1": ldm_ddpm_buffers,
    "sd1-inpaint": ldm_ddpm_buffers,
    "instruct-pix2pix": ldm_ddpm_buffers,
    "sd2": ldm_ddpm_buffers,
    "sd2-v": ldm_ddpm_buffers,
    "sd2-inpaint": ldm_ddpm_buffers,
    "sdxl": no_extra_keys,
    "sdxl-refiner": no_extra_keys,
    "sdxl-inpaint": no_extra_keys,
    "tiny": ldm_ddpm_buffers,
}
# Where A1111's v-prediction probe (sdcore.checkpoint.v_prediction_probe, v below -1) lands for the families it
# decides: well clear of the threshold on either side.
PROBE_TARGETS = {"sd2": 0.0, "sd2-v": -2.0}


@torch.no_grad()
def calibrate_v_probe(unet_weights: dict[str, torch.Tensor], config: UNetConfig, target: float) -> float:
    """Shift `out.2.bias` (in place) so that `v_prediction_probe` of these UNet weights returns `target`.

    The probe is mean(unet(x) - x) and the output conv adds its bias to every cell of its channel, so adding
    d to every bias entry moves the mean by exactly d. Returns the probe value before the shift."""
    from sdcore.checkpoint import v_prediction_probe

    model = UNetModel(config, device="meta")
    model.load_state_dict(unet_weights, strict=True, assign=True)  # shares the tensors: no copy
    before = v_prediction_probe(model)
    unet_weights["out.2.bias"] += target - before
    return before


def text_state_dict(family: Family, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random text-encoder weights under the family's prefixes, in the layout its checkpoints use
    ("hf": transformers CLIPTextModel keys via `open_clip_to_hf`; "open_clip": as they are)."""
    from sdcore.models.text import TextEncoder

    out = {}
    for config, prefix in zip(family.text, family.text_prefixes, strict=True):
        weights = random_like(TextEncoder(config, device="meta").state_dict(), generator)
        out.update({prefix + k: v for k, v in text_layout(config, weights).items()})
    return out


def text_layout(config, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TextEncoder (open_clip-named) weights in the checkpoint layout of `config.layout`: "open_clip" as they are;
    "hf" through `open_clip_to_hf`, plus transformers' position_ids buffer [1, T] (int64) that SD1 and SDXL CLIP-L
    checkpoints carry."""
    from sdcore.models.text import open_clip_to_hf

    if config.layout != "hf":
        return weights
    weights = open_clip_to_hf(weights)
    weights["text_model.embeddings.position_ids"] = torch.arange(config.context_length)[None]
    return weights


def make_state_dict(family: str, size: str, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full LDM/sgm-layout state dict of random weights for `family` (a key of EXTRA_KEYS) at `size`
    ("tiny": `tiny_family`, "full": the real config, SD1.5 = 1.07 G parameters, SDXL 3.5 G).

    Draw order from one `torch.Generator().manual_seed(seed)`: UNet, VAE, text encoders, each in state-dict order,
    so the same arguments give the same bytes. Floating tensors (including the DDPM buffers, as in fp16 releases)
    are cast to `dtype`; integer tensors keep theirs. Raises ValueError on an unknown family, size or dtype.
    """
    config = family_config(family, size)
    if family not in EXTRA_KEYS:
        raise ValueError(f"family={family!r} has no entry in EXTRA_KEYS; allowed: {sorted(EXTRA_KEYS)}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype={dtype}; allowed: {list(DTYPES.values())}")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    unet = random_like(UNetModel(config.unet, device="meta").state_dict(), generator)
    if family in PROBE_TARGETS:
        calibrate_v_probe(unet, config.unet, PROBE_TARGETS[family])
    out.update({config.unet_prefix + k: v for k, v in unet.items()})
    vae = random_like(AutoencoderKL(config.vae, device="meta").state_dict(), generator)
    out.update({config.vae_prefix + k: v for k, v in vae.items()})
    out.update(text_state_dict(config, generator))
    out.update(EXTRA_KEYS[family]())
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}


def layout_shapes(family: str, size: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the tensors `make_state_dict(family, size, ...)` writes, from modules on the meta device
    (no memory, no random draws): what `sdcore.checkpoint.detect_family` reads, even for full-size SDXL."""
    from sdcore.models.text import TextEncoder

    config = family_config(family, size)
    out = {config.unet_prefix + k: tuple(v.shape)
           for k, v in UNetModel(config.unet, device="meta").state_dict().items()}
    out.update({config.vae_prefix + k: tuple(v.shape)
                for k, v in AutoencoderKL(config.vae, device="meta").state_dict().items()})
    for text, prefix in zip(config.text, config.text_prefixes, strict=True):
        weights = text_layout(text, TextEncoder(text, device="meta").state_dict())
        out.update({prefix + k: tuple(v.shape) for k, v in weights.items()})
    out.update({k: tuple(v.shape) for k, v in EXTRA_KEYS[family]().items()})
    return out


def write_checkpoint(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write `.safetensors` (safetensors `save_file`, `metadata` in its header) or `.ckpt`
    (`torch.save({"state_dict": ...})`). Written to a temporary file in the same folder, then hard-linked to
    `path`, which fails if `path` exists: an existing file is never overwritten (FileExistsError naming it)."""
    if path.suffix not in FORMATS:
        raise ValueError(f"output path {str(path)!r} must end with one of {FORMATS}")
    if path.exists():
        raise FileExistsError(f"{path} exists; make_checkpoint never overwrites a file")
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(state_dict, tmp, metadata=metadata)
        else:
            torch.save({"state_dict": state_dict}, tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists; make_checkpoint never overwrites a file") from None
    finally:
        os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="file to create: *.safetensors or *.ckpt (never overwritten)")
    parser.add_argument("--family", default="sd1", choices=sorted(EXTRA_KEYS), help="model family (default sd1)")
    parser.add_argument("--size", default="tiny", choices=SIZES,
                        help="tiny: same layout, narrow widths; full: the real config (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights' generator (default 0)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of float tensors")
    args = parser.parse_args(argv)
    if args.output.exists():
        parser.error(f"{args.output} exists; make_checkpoint never overwrites a file")
    state_dict = make_state_dict(args.family, args.size, args.seed, DTYPES[args.dtype])
    metadata = {"sdcore.random_weights": "true", "family": args.family, "size": args.size,
                "seed": str(args.seed), "dtype": args.dtype}
    write_checkpoint(state_dict, args.output, metadata)
    count = sum(v.numel() for v in state_dict.values())
    print(f"wrote {args.output}: {len(state_dict)} tensors, {count / 1e6:.1f} M values ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
