"""Model families: one frozen dataclass per family, with the UNet, VAE and text-encoder configs.

Every number here is the one in the reference config named beside it (CompVis/stable-diffusion
`configs/stable-diffusion/v1-inference.yaml`, Stability-AI/stablediffusion `v2-inference(-v).yaml`,
Stability-AI/generative-models `sd_xl_base.yaml` / `sd_xl_refiner.yaml`). Module names built from these configs
are the LDM checkpoint's names, so a state dict loads with `strict=True`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class UNetConfig:
    """LDM `openaimodel.UNetModel` hyper-parameters (names as in the LDM yaml `unet_config.params`)."""

    in_channels: int = 4  # 4 latent channels; 9 for inpainting (x + mask + masked latent), 8 for instruct-pix2pix
    out_channels: int = 4
    model_channels: int = 320
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    # Downsampling factors ("ds") at which a SpatialTransformer follows each ResBlock: 1, 2, 4 = levels 0, 1, 2.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8  # SD1 fixes the head count ...
    num_head_channels: int = -1  # ... SD2/SDXL fix the head width (64) instead; -1 = unused
    # Transformer blocks per SpatialTransformer, one entry per level (SDXL: 0, 2, 10); middle block separately.
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)
    transformer_depth_middle: int = 1
    context_dim: int = 768  # width of the text conditioning (CLIP-L 768, OpenCLIP-H 1024, SDXL 2048)
    use_linear_in_transformer: bool = False  # SD1: 1x1 conv proj_in/proj_out; SD2/SDXL: Linear
    adm_in_channels: int = 0  # SDXL "vector" conditioning (pooled text + size embeddings) -> label_emb; 0 = none
    num_classes: str | None = None  # "sequential" for SDXL (label_emb is an MLP)


@dataclass(frozen=True)
class VAEConfig:
    """LDM `AutoencoderKL` hyper-parameters (`first_stage_config.params.ddconfig`)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.18215  # v1-inference.yaml `scale_factor`; SDXL 0.13025


@dataclass(frozen=True)
class TextConfig:
    """A CLIP text transformer (open_clip `TextTransformer` geometry) and how its output becomes conditioning.

    `layout` names the checkpoint key layout: "hf" (transformers CLIPTextModel, SD1 and SDXL CLIP-L) or
    "open_clip" (SD2, SDXL bigG). `layer` is "last" (final hidden state, after ln_final) or "penultimate"
    (hidden state before the last block, then ln_final for SD2; SDXL's embedders skip ln_final).
    """

    width: int = 768
    layers: int = 12
    heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77
    act: str = "quick_gelu"  # CLIP ViT-L/14 uses QuickGELU; OpenCLIP ViT-H and bigG use GELU
    layout: str = "hf"
    layer: str = "last"
    final_ln_on_penultimate: bool = True
    projection_dim: int = 0  # >0: pooled output through text_projection (SDXL bigG)
    pad_token: str = "eos"  # "eos" (SD1: pad with 49407) or "zero" (open_clip: pad with 0)


@dataclass(frozen=True)
class Family:
    """A model family: what to build, under which key prefixes, and how the denoiser reads the UNet output."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: tuple[TextConfig, ...]
    text_prefixes: tuple[str, ...]
    prediction: str = "eps"  # "eps" or "v" (k-diffusion CompVisDenoiser / CompVisVDenoiser)
    conditioning: str = "crossattn"  # "crossattn", "hybrid" (inpainting: c_concat of mask + masked latent), "edit"
    native_size: int = 512  # pixels; the size the model was trained at
    unet_prefix: str = "model.diffusion_model."
    vae_prefix: str = "first_stage_model."
    notes: tuple[str, ...] = field(default=())


CLIP_L = TextConfig()
OPENCLIP_H = TextConfig(width=1024, layers=24, heads=16, act="gelu", layout="open_clip", layer="penultimate",
                        pad_token="zero")
SDXL_CLIP_L = replace(CLIP_L, layer="penultimate", final_ln_on_penultimate=False)
SDXL_CLIP_G = TextConfig(width=1280, layers=32, heads=20, act="gelu", layout="open_clip", layer="penultimate",
                         final_ln_on_penultimate=False, projection_dim=1280, pad_token="zero")

SD1_UNET = UNetConfig()
SD2_UNET = replace(SD1_UNET, num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
SDXL_UNET = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1,
                       num_head_channels=64, transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                       context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
                       num_classes="sequential")

SD1 = Family("sd1", SD1_UNET, VAEConfig(), (CLIP_L,), ("cond_stage_model.transformer.",))
SD1_INPAINT = replace(SD1, name="sd1-inpaint", unet=replace(SD1_UNET, in_channels=9), conditioning="hybrid")

# The bundled tiny model (issue 6): SD's architecture at 64 px. Numbers are chosen for a 2-core CPU; see
# weights/README.md for the training recipe.
TINY_UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_heads=4,
                       transformer_depth=(1, 1, 1), context_dim=256)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1)
TINY_TEXT = replace(CLIP_L, width=256, layers=4, heads=4)
TINY = Family("tiny", TINY_UNET, TINY_VAE, (TINY_TEXT,), ("cond_stage_model.transformer.",), native_size=64)

FAMILIES = {f.name: f for f in (SD1, SD1_INPAINT, TINY)}
