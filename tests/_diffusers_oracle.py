"""Build diffusers' UNet2DConditionModel / AutoencoderKL from an LDM-layout state dict (test oracle only).

The conversion is diffusers' own single-file path (`diffusers.loaders.single_file_utils`:
`create_unet_diffusers_config_from_ldm`, `convert_ldm_unet_checkpoint`, `create_vae_diffusers_config_from_ldm`,
`convert_ldm_vae_checkpoint`), fed with an LDM yaml-like dict written from our dataclass configs.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from sdcore.families import UNetConfig, VAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_checkpoint  # noqa: E402  (scripts/ is not a package)

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


def _independent(state_dict: dict) -> dict:
    """Contiguous copies, so the oracle never shares storage with the module the weights came from."""
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()}


def diffusers_unet(unet_state_dict: dict, unet: UNetConfig, vae: VAEConfig | None = None):
    """diffusers UNet2DConditionModel (fp32, eval) holding `unet_state_dict` (LDM keys without prefix)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {UNET_PREFIX + k: v for k, v in unet_state_dict.items()}
    original = ldm_original_config(unet, vae or VAEConfig())
    config = sfu.create_unet_diffusers_config_from_ldm(original, checkpoint, image_size=None)
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):  # no random init; the weights are assigned below
        model = UNet2DConditionModel(**config)
    model.load_state_dict(_independent(converted), strict=True, assign=True)
    return model.eval()


def diffusers_vae(vae_state_dict: dict, vae: VAEConfig):
    """diffusers AutoencoderKL (fp32, eval) holding `vae_state_dict` (LDM keys without prefix)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {VAE_PREFIX + k: v for k, v in vae_state_dict.items()}
    original = ldm_original_config(UNetConfig(), vae)
    config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint, image_size=None)
    converted = sfu.convert_ldm_vae_checkpoint(checkpoint, config)
    with torch.device("meta"):  # no random init; the weights are assigned below
        model = AutoencoderKL(**config)
    model.load_state_dict(_independent(converted), strict=True, assign=True)
    return model.eval()



def random_weights(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random LDM-layout weights for `module` (scripts/make_checkpoint.py `random_like`), loaded into it
    (strict, assign) and returned for the oracle."""
    weights = make_checkpoint.random_like(module.state_dict(), torch.Generator().manual_seed(seed))
    module.load_state_dict(weights, strict=True, assign=True)
    return weights
