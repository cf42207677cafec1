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
class LatentRGB:
    """The "Approx cheap" live preview of a latent space: `rgb = latent @ matrix + bias` per latent cell.

    `matrix` rows are latent channels (4), columns R, G, B; the input is the scaled latent (what the sampler's
    `denoised` holds) and the output is roughly in [-1, 1] like the VAE's pixels. `source` says where the numbers
    come from. Used by `sdcore.previews.approx_cheap`.
    """

    matrix: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    source: str = ""


# A1111 v1.10.1 `modules/sd_vae_approx.py` `cheap_approximation` (no bias), a1111-semantics §7.2.
SD1_LATENT_RGB = LatentRGB(((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264),
                            (-0.184, -0.271, -0.473)), source="A1111 sd_vae_approx.cheap_approximation (SD1/SD2)")
SDXL_LATENT_RGB = LatentRGB(((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
                             (-0.3730, -0.2499, -0.2088)), source="A1111 sd_vae_approx.cheap_approximation (SDXL)")
# Fitted for the bundled tiny model's VAE by scripts/fit_approx_cheap.py (its defaults: least squares with a bias over
# the 262,144 latent cells of 4096 training-distribution scenes, seed 0), which prints these numbers. RMSE against
# each 8x8 pixel block's mean colour, in [-1, 1] units: 0.281 on the fit's scenes, 0.278 (35 levels of 255) on 4096
# fresh ones (seed 1), where SD1's matrix above scores 0.956.
TINY_LATENT_RGB = LatentRGB(((-0.0470, -0.2487, -0.4049), (0.5476, 0.0271, 0.3406), (-0.2708, -0.2857, -0.2027),
                             (-0.3232, -0.0902, 0.5393)), bias=(0.1029, -0.0755, -0.0420),
                            source="least squares on the tiny model's scenes (scripts/fit_approx_cheap.py)")


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
    # SDXL "vector" conditioning y, in the order sgm's GeneralConditioner concatenates its vector outputs (the
    # yaml's `emb_models` order): "pooled" (the bigG embedder's text_projection output), then scalar inputs
    # embedded by `ConcatTimestepEmbedderND` (each number -> `size_embed_dim` sinusoidal features):
    # "original_size_as_tuple" (h, w), "crop_coords_top_left" (top, left), "target_size_as_tuple" (h, w),
    # "aesthetic_score" (one number). Empty: the UNet takes no y.
    vector: tuple[str, ...] = ()
    size_embed_dim: int = 256  # `ConcatTimestepEmbedderND` outdim in sd_xl_base.yaml / sd_xl_refiner.yaml
    latent_rgb: LatentRGB | None = None  # the "Approx cheap" preview matrix (None: that preview is unavailable)
    notes: tuple[str, ...] = field(default=())


CLIP_L = TextConfig()
# SD2 checkpoints carry the whole open_clip text tower, text_projection [1024, 1024] included (unused by SD2's
# conditioning, which is the penultimate layer; kept so `cond_stage_model.model.*` loads strictly).
OPENCLIP_H = TextConfig(width=1024, layers=24, heads=16, act="gelu", layout="open_clip", layer="penultimate",
                        projection_dim=1024, pad_token="zero")
SDXL_CLIP_L = replace(CLIP_L, layer="penultimate", final_ln_on_penultimate=False)
SDXL_CLIP_G = TextConfig(width=1280, layers=32, heads=20, act="gelu", layout="open_clip", layer="penultimate",
                         final_ln_on_penultimate=False, projection_dim=1280, pad_token="zero")

SD1_UNET = UNetConfig()
SD2_UNET = replace(SD1_UNET, num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
SDXL_UNET = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_heads=-1,
                       num_head_channels=64, transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                       context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
                       num_classes="sequential")
# sd_xl_refiner.yaml: 4 levels of 384, attention at ds 2 and 4 with 4 blocks each (levels 0 and 3 have none, their
# depth entry is unused), context = bigG's 1280, y = pooled 1280 + 5 scalars x 256 = 2560.
SDXL_REFINER_UNET = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2),
                               num_heads=-1, num_head_channels=64, transformer_depth=(4, 4, 4, 4),
                               transformer_depth_middle=4, context_dim=1280, use_linear_in_transformer=True,
                               adm_in_channels=2560, num_classes="sequential")
SDXL_VAE = VAEConfig(scale_factor=0.13025)  # sd_xl_base.yaml `scale_factor`; same autoencoder geometry as SD1

SD1 = Family("sd1", SD1_UNET, VAEConfig(), (CLIP_L,), ("cond_stage_model.transformer.",),
             latent_rgb=SD1_LATENT_RGB)
SD1_INPAINT = replace(SD1, name="sd1-inpaint", unet=replace(SD1_UNET, in_channels=9), conditioning="hybrid")
# instruct-pix2pix (timothybrooks, configs/generate.yaml): SD1.5 with 8 input channels (x + image latent),
# cond_stage_key "edit".
INSTRUCT_PIX2PIX = replace(SD1, name="instruct-pix2pix", unet=replace(SD1_UNET, in_channels=8),
                           conditioning="edit")
# Stability-AI/stablediffusion configs/stable-diffusion: v2-inference.yaml (512 px, eps), v2-inference-v.yaml
# (768 px, parameterization "v"), v2-inpainting-inference.yaml (9 channels, hybrid).
SD2 = Family("sd2", SD2_UNET, VAEConfig(), (OPENCLIP_H,), ("cond_stage_model.model.",), latent_rgb=SD1_LATENT_RGB)
SD2_V = replace(SD2, name="sd2-v", prediction="v", native_size=768)
SD2_INPAINT = replace(SD2, name="sd2-inpaint", unet=replace(SD2_UNET, in_channels=9), conditioning="hybrid")
SDXL_SIZE_INPUTS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
SDXL = Family("sdxl", SDXL_UNET, SDXL_VAE, (SDXL_CLIP_L, SDXL_CLIP_G),
              ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."), native_size=1024,
              vector=("pooled",) + SDXL_SIZE_INPUTS, latent_rgb=SDXL_LATENT_RGB)
SDXL_REFINER = Family("sdxl-refiner", SDXL_REFINER_UNET, SDXL_VAE, (SDXL_CLIP_G,),
                      ("conditioner.embedders.0.model.",), native_size=1024,
                      vector=("pooled", "original_size_as_tuple", "crop_coords_top_left", "aesthetic_score"),
                      latent_rgb=SDXL_LATENT_RGB)
# diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (A1111 sd_xl_inpaint.yaml): SDXL base with 9 input channels.
SDXL_INPAINT = replace(SDXL, name="sdxl-inpaint", unet=replace(SDXL_UNET, in_channels=9), conditioning="hybrid")

# The bundled tiny model (issue 6): SD's architecture at 64 px. Numbers are chosen for a 2-core CPU; see
# weights/README.md for the training recipe.
# Cross-attention at every level (8x8, 4x4, 2x2 latent cells): position words need it at 8x8. Two ResBlocks per
# level, as SD1 (issue 14: shape accuracy needed the capacity; the first bundled file had one, and the loader reads
# num_res_blocks from a file's shapes, so such files still load as "tiny").
TINY_UNET = UNetConfig(model_channels=64, num_res_blocks=2, channel_mult=(1, 2, 2), attention_resolutions=(4, 2, 1),
                       num_heads=4, transformer_depth=(1, 1, 1), context_dim=128)
# scale_factor = 1 / std of the trained VAE's latents of 16000 training scenes (train_tiny.py "latents": std 4.795).
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, scale_factor=0.2086)
# Width 128 keeps the 49408-token embedding at 6.3 M parameters; heads = width / 64 as the loader reads it.
TINY_TEXT = replace(CLIP_L, width=128, layers=2, heads=2)
TINY = Family("tiny", TINY_UNET, TINY_VAE, (TINY_TEXT,), ("cond_stage_model.transformer.",), native_size=64,
              latent_rgb=TINY_LATENT_RGB)

FAMILIES = {f.name: f for f in (SD1, SD1_INPAINT, INSTRUCT_PIX2PIX, SD2, SD2_V, SD2_INPAINT, SDXL, SDXL_REFINER,
                                 SDXL_INPAINT, TINY)}
