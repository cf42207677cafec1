"""Build diffusers' UNet2DConditionModel / AutoencoderKL from an LDM-layout state dict (test oracle only).

The conversion is diffusers' own single-file path (`diffusers.loaders.single_file_utils`:
`create_unet_diffusers_config_from_ldm`, `convert_ldm_unet_checkpoint`, `create_vae_diffusers_config_from_ldm`,
`convert_ldm_vae_checkpoint`), fed with an LDM yaml-like dict written from our dataclass configs.
"""
from __future__ import annotations

import dataclasses

import torch

from sdcore.families import UNetConfig, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def ldm_original_config(unet: UNetConfig, vae: VAEConfig) -> dict:
    """The `model.params` part of an LDM inference yaml (v1-inference.yaml layout) for these configs."""
    unet_params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(unet).items()}
    if unet.num_head_channels != -1:
        del unet_params["num_heads"]
    if unet.num_classes is None:
        del unet_params["num_classes"]
        del unet_params["adm_in_channels"]
    ddconfig = dict(double_z=True, z_channels=vae.z_channels, resolution=256, in_channels=vae.in_channels,
                    out_ch=vae.out_ch, ch=vae.ch, ch_mult=list(vae.ch_mult), num_res_blocks=vae.num_res_blocks,
                    attn_resolutions=[], dropout=0.0)
    return {"model": {"params": {
        "scale_factor": vae.scale_factor,
        "unet_config": {"params": unet_params},
        "first_stage_config": {"params": {"embed_dim": vae.embed_dim, "ddconfig": ddconfig}},
    }}}


def diffusers_unet(unet_state_dict: dict, unet: UNetConfig, vae: VAEConfig | None = None):
    """diffusers UNet2DConditionModel (fp32, eval) holding `unet_state_dict` (LDM keys without prefix)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {UNET_PREFIX + k: v for k, v in unet_state_dict.items()}
    original = ldm_original_config(unet, vae or VAEConfig())
    config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=512)
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, config)
    model = UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def diffusers_vae(vae_state_dict: dict, vae: VAEConfig):
    """diffusers AutoencoderKL (fp32, eval) holding `vae_state_dict` (LDM keys without prefix)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {VAE_PREFIX + k: v for k, v in vae_state_dict.items()}
    original = ldm_original_config(UNetConfig(), vae)
    config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint, image_size=256)
    converted = sfu.convert_ldm_vae_checkpoint(checkpoint, config)
    model = AutoencoderKL(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def random_state_dict(module: torch.nn.Module, generator: torch.Generator) -> dict:
    """Every tensor of `module`'s state dict redrawn: norms' weights ~ 1 + 0.1 N, biases 0.1 N, other weights
    N(0, 1/fan_in) so activations keep unit scale through depth."""
    out = {}
    for name, t in module.state_dict().items():
        if t.ndim == 1 and name.endswith("weight"):
            v = 1.0 + 0.1 * torch.randn(t.shape, generator=generator)
        elif t.ndim == 1:
            v = 0.1 * torch.randn(t.shape, generator=generator)
        else:
            fan_in = t[0].numel()
            v = torch.randn(t.shape, generator=generator) / fan_in ** 0.5
        out[name] = v.to(t.dtype)
    return out
