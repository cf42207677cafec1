"""Open an original Stable Diffusion checkpoint, tell what it is, and build its modules from it.

Files: `.safetensors` (memory-mapped through `safetensors.safe_open`) or `.ckpt`/`.pt`/`.pth` (pickles opened with
`torch.load(weights_only=True)`, which refuses any global outside torch's tensor allow-list: nothing in the file is
executed). Modules are built on the meta device and loaded with `load_state_dict(strict=True, assign=True)`, so no
random initialisation runs and no second copy of the weights is made.

Key prefixes (LDM layout): `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.text_model.*` (SD1, transformers layout), `cond_stage_model.model.*` (SD2, open_clip
layout), `conditioner.embedders.N.*` (SDXL: 0 = CLIP-L in transformers layout and 1 = OpenCLIP bigG for the base
model, 0 = bigG for the refiner).

Families (A1111 `modules/sd_models_config.py` `guess_model_config_from_state_dict`, v1.10.1), told apart by the text
encoder's layout and the UNet's input channels: SD1 (4), SD1-inpaint (9), instruct-pix2pix (8), SD2 (4; eps or v,
see `resolve_prediction`), SD2-inpaint (9), SDXL base (4), SDXL inpaint (9), SDXL refiner (4).
"""
from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from . import families
from .families import Family, TextConfig, UNetConfig, VAEConfig
from .models.text import TextEncoder, hf_to_open_clip, load_tokenizer
from .models.unet import UNetModel
from .models.vae import AutoencoderKL
from .prompts import encode_family_conditioning
from .sampling.denoisers import sd_alphas_cumprod

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = "conditioner.embedders."
PREDICTIONS = ("eps", "v")

# Tensors real checkpoints carry that sdcore does not build modules for. Each rule says why it is safe to drop.
DROPPED_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^model_ema\.", "EMA copy of the UNet kept by the trainer; the main weights are the ones used for inference"),
    (r"^(betas|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod"
     r"|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped"
     r"|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)$",
     "DDPM training buffers; sampling needs only alphas_cumprod"),
    (r"^denoiser\.sigmas$", "sgm DiscreteDenoiser's sigma table (LegacyDDPMDiscretization, the same schedule as "
                            "alphas_cumprod)"),
    (r"^first_stage_model\.loss\.", "VAE training loss (LPIPS, discriminator)"),
    (r"\.transformer\.text_model\.embeddings\.position_ids$", "index buffer 0..76 of transformers"),
    (r"^(cond_stage_model|conditioner\.embedders\.\d+)\.model\.visual\.", "open_clip's image tower (unused)"),
)
# A separate VAE file (A1111 `sd_vae._load_vae_dict`): LDM `AutoencoderKL` keys, bare or under first_stage_model.
VAE_FILE_DROPPED_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^(first_stage_model\.)?loss\.", "VAE training loss (LPIPS, discriminator)"),
    (r"^model_ema\.(decay|num_updates)$", "EMA bookkeeping of the VAE trainer"),
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be opened, recognised or loaded; the message names the file and the keys."""


@dataclass
class Detection:
    """What `detect_family` read off a state dict: the family with configs sized from the weights, and why.

    `probe_prediction` is True when eps vs v cannot be read from names and shapes (SD2 with 4 input channels);
    `resolve_prediction` then decides, as A1111 does.
    """

    family: Family
    reasons: list[str] = field(default_factory=list)
    probe_prediction: bool = False

    @property
    def prediction(self) -> str:
        """"eps" or "v" (for SD2 with probe_prediction, "eps" until resolved)."""
        return self.family.prediction

    @property
    def in_channels(self) -> int:
        """UNet input channels: 4 (x), 8 (x + image latent, instruct-pix2pix), 9 (x + mask + masked latent)."""
        return self.family.unet.in_channels


@dataclass
class StableDiffusionModel:
    """A loaded model: UNet, VAE, text encoder(s) and the noise schedule, on one device.

    `alphas_cumprod`: float32 [1000], from the checkpoint when it has one, else SD's scaled-linear schedule.
    `dtype` is the compute dtype of the UNet and text encoders; the VAE runs in `vae_dtype` (float32 by default,
    since fp16 VAE decodes overflow to NaN on SD1/SDXL weights). `text_encoders` are in `family.text` order
    (SDXL base: CLIP-L, then bigG). `file_dtypes`: number of floating tensors of each dtype in the checkpoint file
    (e.g. {"float16": 1131}). `vae_path`: a separate VAE file, when one was given.
    """

    family: Family
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizer: Any
    alphas_cumprod: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    path: Path | None = None
    reasons: list[str] = field(default_factory=list)
    vae_path: Path | None = None
    file_dtypes: dict[str, int] = field(default_factory=dict)
    _sha256: dict[Path, str] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """A1111's "Model" infotext value: the file name without extension."""
        return self.path.stem if self.path else self.family.name

    @property
    def vae_name(self) -> str | None:
        """A1111's "VAE" infotext value (`sd_vae.get_loaded_vae_name`): the separate VAE's file name, else None."""
        return self.vae_path.name if self.vae_path else None

    def _file_sha256(self, path: Path | None) -> str | None:
        if path is None:
            return None
        if path not in self._sha256:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._sha256[path] = digest.hexdigest()
        return self._sha256[path]

    def sha256(self) -> str | None:
        """sha256 hex digest of the checkpoint file (computed once, on first use)."""
        return self._file_sha256(self.path)

    def shorthash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
        full = self.sha256()
        return full[:10] if full else None

    def vae_shorthash(self) -> str | None:
        """A1111's "VAE hash": the first 10 hex digits of the separate VAE file's sha256, else None."""
        full = self._file_sha256(self.vae_path)
        return full[:10] if full else None

    def components(self) -> dict[str, torch.nn.Module]:
        """The modules by name: "unet", "vae", then one "text_encoder.<prefix>" per text encoder (checkpoint
        prefix without its trailing dot, e.g. "text_encoder.conditioner.embedders.1.model")."""
        out = {"unet": self.unet, "vae": self.vae}
        for prefix, encoder in zip(self.family.text_prefixes, self.text_encoders):
            out["text_encoder." + prefix.rstrip(".")] = encoder
        return out

    def parameter_counts(self) -> dict[str, int]:
        """Number of parameters of each module of `components()`."""
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.components().items()}

    def encode_texts(self, texts: list[str], clip_skip: int = 1, emphasis: str = "Original", width: int | None = None,
                     height: int | None = None, is_negative_prompt: bool = False):
        """Conditioning of plain texts (no prompt editing / AND), see `prompts.encode_family_conditioning`.

        Returns [N, 77*k, C] for families without vector conditioning (SD1, SD2), else
        {"c_crossattn": [N, 77*k, C], "y": [N, adm_in_channels]} (SDXL; `width`/`height` in pixels feed the size
        conditioning, default the family's native size; `is_negative_prompt` selects A1111's zeroed empty negative
        prompt and the refiner's low aesthetic score). On the model's device, in its compute dtype.
        """
        cond = encode_family_conditioning(self.family, self.text_encoders, self.tokenizer, texts,
                                          clip_skip=clip_skip, emphasis=emphasis, width=width, height=height,
                                          is_negative_prompt=is_negative_prompt)
        if isinstance(cond, dict):
            return {k: v.to(self.device) for k, v in cond.items()}
        return cond.to(self.device)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_crossattn: torch.Tensor,
                    c_concat: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """UNet output (eps or v) for latents x [B,4,h,w] at continuous timesteps t [B].

        `c_concat` [B,Cc,h,w] (inpainting: mask + masked-image latent; instruct-pix2pix: image latent) is
        concatenated after x along channels, as LDM's `DiffusionWrapper` with conditioning_key hybrid does.
        `y` [B, adm_in_channels]: SDXL's vector conditioning.
        """
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x.dtype)], dim=1)
        return self.unet(x.to(self.dtype), t, context=c_crossattn.to(self.dtype),
                         y=None if y is None else y.to(self.dtype)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Reading files


def open_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, un-nested from a `state_dict` entry when there is one.

    Raises CheckpointError for a missing or unreadable file, an unknown extension, or a pickle that needs a global
    outside torch's weights-only allow-list (such a file is refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
            raise CheckpointError(f"checkpoint: {path} is not a readable .safetensors file ({e})") from e
    elif suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"checkpoint: {path} refused: its pickle needs globals outside torch's weights-only allow-list, "
                f"and sdcore never executes code from a checkpoint ({str(e).splitlines()[0]})") from e
        except Exception as e:
            raise CheckpointError(f"checkpoint: {path} is not a readable torch checkpoint ({e})") from e
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise CheckpointError(f"checkpoint: {path} holds a {type(obj).__name__}, not a state dict")
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    else:
        raise CheckpointError(f"checkpoint: {path} has extension {suffix!r}; allowed: .safetensors, .ckpt, .pt, .pth")
    if not sd:
        raise CheckpointError(f"checkpoint: {path} contains no tensors")
    return sd


def drop_known_extras(sd: dict[str, torch.Tensor], rules: tuple[tuple[str, str], ...] = DROPPED_KEY_RULES
                      ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Split off the tensors named by `rules`; returns (kept, {rule reason: count dropped})."""
    kept, dropped = {}, {}
    for k, v in sd.items():
        reason = next((why for pattern, why in rules if re.search(pattern, k)), None)
        if reason is None:
            kept[k] = v
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    return kept, dropped


def sub_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def dtype_counts(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """{dtype name: number of floating-point tensors} of a state dict, e.g. {"float16": 1131}."""
    counts: dict[str, int] = {}
    for v in sd.values():
        if v.is_floating_point():
            name = str(v.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Detection: one pure function over names and shapes


def _count(shapes: dict[str, tuple], pattern: str) -> int:
    """Number of distinct values of the first group of `pattern` among the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def read_unet_config(shapes: dict[str, tuple], base: UNetConfig) -> tuple[UNetConfig, list[str]]:
    """UNet hyper-parameters read off `model.diffusion_model.*` shapes; heads come from `base` (not in the weights).

    Input blocks are: 0 = conv_in, then per level `num_res_blocks` ResBlocks (each optionally followed by a
    SpatialTransformer at index .1) and a Downsample (`.0.op`) except after the last level. The transformer depth
    of a level without attention is not in the weights either and is taken from `base`.
    """
    p = UNET
    w_in = shapes[p + "input_blocks.0.0.weight"]  # (model_channels, in_channels, 3, 3)
    mc, cin = w_in[0], w_in[1]
    n_in = _count(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    levels: list[list[int]] = [[]]
    for i in range(1, n_in):
        if p + f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(i)
    num_res_blocks = len(levels[0])
    mult, attn_ds, depth = [], [], []
    for lvl, blocks in enumerate(levels):
        mult.append(shapes[p + f"input_blocks.{blocks[0]}.0.out_layers.3.weight"][0] // mc)
        d = _count(shapes, re.escape(p + f"input_blocks.{blocks[0]}.1.transformer_blocks.") + r"(\d+)\.")
        if d:
            attn_ds.append(2 ** lvl)
        elif len(base.transformer_depth) == len(levels):
            d = base.transformer_depth[lvl]  # unused where a level has no attention; keep the family's value
        depth.append(d)
    k_attn = next((k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    context_dim = shapes[k_attn][1] if k_attn else base.context_dim
    proj = next((k for k in shapes if k.startswith(p) and k.endswith(".proj_in.weight")), None)
    linear = proj is not None and len(shapes[proj]) == 2
    adm = shapes[p + "label_emb.0.0.weight"][1] if p + "label_emb.0.0.weight" in shapes else 0
    cfg = replace(base, in_channels=cin, out_channels=shapes[p + "out.2.weight"][0], model_channels=mc,
                  num_res_blocks=num_res_blocks, channel_mult=tuple(mult),
                  attention_resolutions=tuple(sorted(attn_ds, reverse=True)), transformer_depth=tuple(depth),
                  transformer_depth_middle=_count(shapes, re.escape(p + "middle_block.1.transformer_blocks.")
                                                  + r"(\d+)\."),
                  context_dim=context_dim, use_linear_in_transformer=linear, adm_in_channels=adm,
                  num_classes="sequential" if adm else None)
    why = [f"UNet: {cin} input channels, model_channels {mc}, channel_mult {tuple(mult)}, {num_res_blocks} res "
           f"blocks per level, attention at ds {tuple(attn_ds)} with depth {tuple(depth)} (middle "
           f"{cfg.transformer_depth_middle}), context_dim {context_dim}, "
           f"{'linear' if linear else 'conv'} transformer projections"
           + (f", label_emb over y of {adm}" if adm else "")]
    return cfg, why


def read_vae_config(shapes: dict[str, tuple], base: VAEConfig, prefix: str = VAE) -> VAEConfig:
    """VAE hyper-parameters read off `{prefix}*` shapes (scale_factor comes from `base`)."""
    p = prefix
    ch = shapes[p + "encoder.conv_in.weight"][0]
    n_levels = _count(shapes, re.escape(p + "encoder.down.") + r"(\d+)\.")
    mult = tuple(shapes[p + f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(n_levels))
    return replace(base, ch=ch, ch_mult=mult,
                   num_res_blocks=_count(shapes, re.escape(p + "encoder.down.0.block.") + r"(\d+)\."),
                   z_channels=shapes[p + "decoder.conv_in.weight"][1],
                   embed_dim=shapes[p + "quant_conv.weight"][0] // 2,
                   in_channels=shapes[p + "encoder.conv_in.weight"][1], out_ch=shapes[p + "decoder.conv_out.weight"][0])


def read_hf_text_config(shapes: dict[str, tuple], prefix: str, base: TextConfig) -> TextConfig:
    """CLIP text geometry from transformers-layout keys (`{prefix}text_model.*`); heads = width / 64 as in CLIP."""
    vocab, width = shapes[prefix + "text_model.embeddings.token_embedding.weight"]
    return replace(base, vocab_size=vocab, width=width, heads=max(1, width // 64),
                   context_length=shapes[prefix + "text_model.embeddings.position_embedding.weight"][0],
                   layers=_count(shapes, re.escape(prefix + "text_model.encoder.layers.") + r"(\d+)\."),
                   projection_dim=shapes[prefix + "text_projection.weight"][0]
                   if prefix + "text_projection.weight" in shapes else 0)


def read_open_clip_text_config(shapes: dict[str, tuple], prefix: str, base: TextConfig) -> TextConfig:
    """Text geometry from open_clip-layout keys (`{prefix}token_embedding.weight`, `{prefix}transformer.resblocks.N.*`,
    `{prefix}text_projection` [W, P]); heads = width / 64 (ViT-H/14: 16, ViT-bigG/14: 20)."""
    vocab, width = shapes[prefix + "token_embedding.weight"]
    return replace(base, vocab_size=vocab, width=width, heads=max(1, width // 64),
                   context_length=shapes[prefix + "positional_embedding"][0],
                   layers=_count(shapes, re.escape(prefix + "transformer.resblocks.") + r"(\d+)\."),
                   projection_dim=shapes[prefix + "text_projection"][1] if prefix + "text_projection" in shapes else 0)


# Text-encoder layouts, tried in this order (A1111 checks SDXL's keys first): (name, key that marks it, what it is).
TEXT_LAYOUTS: tuple[tuple[str, str, str], ...] = (
    ("sdxl", SDXL_TEXT + "1.model.ln_final.weight", "OpenCLIP bigG under conditioner.embedders.1 -> SDXL base"),
    ("sdxl-refiner", SDXL_TEXT + "0.model.ln_final.weight",
     "OpenCLIP bigG alone under conditioner.embedders.0 -> SDXL refiner"),
    ("sd2", SD2_TEXT + "ln_final.weight", "open_clip text tower under cond_stage_model.model -> SD2"),
    ("sd1", SD1_TEXT + "text_model.final_layer_norm.weight",
     "transformers CLIP text model under cond_stage_model.transformer -> SD1"),
)
# (layout, UNet input channels) -> family, and what the channels mean.
FAMILY_BY_CHANNELS: dict[tuple[str, int], tuple[Family, str]] = {
    ("sd1", 4): (families.SD1, "4 channels -> plain txt2img/img2img model"),
    ("sd1", 9): (families.SD1_INPAINT, "9 channels (x + mask + masked latent) -> inpainting"),
    ("sd1", 8): (families.INSTRUCT_PIX2PIX, "8 channels (x + image latent) -> instruct-pix2pix (edit)"),
    ("sd2", 4): (families.SD2, "4 channels -> SD2 txt2img/img2img model"),
    ("sd2", 9): (families.SD2_INPAINT, "9 channels (x + mask + masked latent) -> SD2 inpainting"),
    ("sdxl", 4): (families.SDXL, "4 channels -> SDXL base"),
    ("sdxl", 9): (families.SDXL_INPAINT, "9 channels (x + mask + masked latent) -> SDXL inpainting"),
    ("sdxl-refiner", 4): (families.SDXL_REFINER, "4 channels -> SDXL refiner"),
}


def _text_configs(shapes: dict[str, tuple], base: Family) -> tuple[TextConfig, ...]:
    out = []
    for config, prefix in zip(base.text, base.text_prefixes, strict=True):
        read = read_hf_text_config if config.layout == "hf" else read_open_clip_text_config
        out.append(read(shapes, prefix, config))
    return tuple(out)


def _check_text_against_unet(fam: Family) -> list[str]:
    """The UNet's context width and y width must be what the text encoders (and size embeddings) produce."""
    widths = tuple(t.width for t in fam.text)
    if fam.unet.context_dim != sum(widths):
        raise CheckpointError(f"checkpoint: UNet cross-attention context_dim {fam.unet.context_dim} != text encoder "
                              f"width {' + '.join(map(str, widths))} (family {fam.name})")
    why = [f"text: {len(fam.text)} encoder(s) " + ", ".join(
        f"{t.layout} width {t.width}, {t.layers} layers, vocab {t.vocab_size}"
        + (f", projection {t.projection_dim}" if t.projection_dim else "") for t in fam.text)]
    if fam.vector:
        pooled = fam.text[-1].projection_dim
        scalars = {"original_size_as_tuple": 2, "crop_coords_top_left": 2, "target_size_as_tuple": 2,
                   "aesthetic_score": 1}
        n = sum(scalars[name] for name in fam.vector if name != "pooled")
        expected = pooled + n * fam.size_embed_dim
        if fam.unet.adm_in_channels != expected:
            raise CheckpointError(f"checkpoint: UNet label_emb takes y of {fam.unet.adm_in_channels} channels; "
                                  f"family {fam.name} builds y from {fam.vector} = {pooled} + {n} x "
                                  f"{fam.size_embed_dim} = {expected}")
        why.append(f"y = {' + '.join(fam.vector)} = {pooled} + {n} x {fam.size_embed_dim} = {expected} channels")
    return why


def detect_family(shapes: dict[str, tuple]) -> Detection:
    """Tell the model family from a state dict's key names and shapes (a pure function; tensors are not read).

    `shapes` maps key -> shape tuple (use `{k: tuple(v.shape) for k, v in sd.items()}`). Size-dependent
    hyper-parameters are read off the shapes, so reduced-size test checkpoints of a family are that family.
    Rules, in order (A1111 `guess_model_config_from_state_dict`):
      1. the text encoder's layout (`TEXT_LAYOUTS`): `conditioner.embedders.1.model.*` -> SDXL base,
         `conditioner.embedders.0.model.*` -> SDXL refiner, `cond_stage_model.model.*` -> SD2,
         `cond_stage_model.transformer.text_model.*` -> SD1;
      2. the UNet's input channels (`model.diffusion_model.input_blocks.0.0.weight` [C, in, 3, 3]) within that
         layout (`FAMILY_BY_CHANNELS`): 4 plain, 9 inpainting, 8 instruct-pix2pix (SD1 layout only);
      3. SD1 layout, 4 channels, with the bundled tiny model's model_channels and context width -> "tiny".
    SD2 with 4 channels comes back as "sd2" (eps) with `probe_prediction=True`: v-prediction is not in the names or
    shapes (`resolve_prediction` decides). The UNet's context width must equal the text encoders' total width and
    SDXL's label_emb input the width of its vector conditioning.
    Raises CheckpointError naming what was looked for when no rule matches.
    """
    if UNET + "input_blocks.0.0.weight" not in shapes:
        raise CheckpointError(f"checkpoint: no UNet: looked for '{UNET}input_blocks.0.0.weight' (LDM layout); "
                              f"first keys: {sorted(shapes)[:5]}")
    layout = next(((name, why) for name, key, why in TEXT_LAYOUTS if key in shapes), None)
    if layout is None:
        raise CheckpointError("checkpoint: no text encoder found: looked for " + ", ".join(
            f"'{key}' ({why.split(' -> ')[1]})" for _, key, why in TEXT_LAYOUTS))
    name, layout_why = layout
    reasons = [f"text encoder: {layout_why}"]
    cin = shapes[UNET + "input_blocks.0.0.weight"][1]
    if (name, cin) not in FAMILY_BY_CHANNELS:
        known = sorted(c for n, c in FAMILY_BY_CHANNELS if n == name)
        raise CheckpointError(f"checkpoint: UNet input_blocks.0.0 takes {cin} channels; known for the {name} "
                              f"layout: {known}")
    base, channels_why = FAMILY_BY_CHANNELS[name, cin]
    reasons.append(f"UNet input_blocks.0.0 takes {channels_why}")
    unet, unet_why = read_unet_config(shapes, base.unet)
    tiny = families.TINY
    if (name, cin) == ("sd1", 4) and (unet.model_channels, unet.context_dim) == (tiny.unet.model_channels,
                                                                               tiny.unet.context_dim):
        base = tiny
        unet, unet_why = read_unet_config(shapes, tiny.unet)
        reasons.append(f"model_channels {unet.model_channels} and context width {unet.context_dim} are the bundled "
                       "tiny model's -> family 'tiny' (64 px)")
    elif unet.model_channels != base.unet.model_channels:
        reasons.append(f"model_channels {unet.model_channels} != {base.unet.model_channels}: a reduced-size "
                       f"{base.name} (test checkpoint)")
    fam = replace(base, unet=unet, vae=read_vae_config(shapes, base.vae), text=_text_configs(shapes, base))
    reasons += unet_why
    reasons.append(f"VAE: ch {fam.vae.ch}, ch_mult {fam.vae.ch_mult}, {fam.vae.z_channels} latent channels, "
                   f"scale_factor {fam.vae.scale_factor}")
    reasons += _check_text_against_unet(fam)
    probe = (name, cin) == ("sd2", 4)
    reasons.append("prediction: eps or v is not in the names and shapes (SD2): decided by resolve_prediction"
                   if probe else f"prediction: {fam.prediction} (fixed for family {fam.name})")
    return Detection(fam, reasons, probe_prediction=probe)


# ---------------------------------------------------------------------------------------------------------------
# eps or v


V_PROBE_THRESHOLD = -1.0  # A1111 `is_using_v_parameterization_for_sd2`: v when the mean is below -1


@torch.no_grad()
def v_prediction_probe(unet: torch.nn.Module) -> float:
    """A1111's one-step test for SD2 v-prediction (`modules/sd_models_config.py`
    `is_using_v_parameterization_for_sd2`): mean(unet(x, t=999, context) - x) with x = 0.5 everywhere
    [1, 4, 8, 8] and context = 0.5 everywhere [1, 2, context_dim]. A v model at t = 999 predicts about -x0,
    pulling the mean below V_PROBE_THRESHOLD (-1); an eps model predicts about the noise, i.e. x itself (mean near 0).

    Runs on the module's device and dtype (A1111: float32 on the CPU). Returns the mean as a float.
    """
    p = next(unet.parameters())
    cfg = unet.config
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, cfg.context_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999.0], device=p.device), context)
    return (out.float() - x.float()).mean().item()


def prediction_from_yaml(path: Path) -> str:
    """Parameterization declared by an LDM/sgm inference yaml: `model.params.parameterization` ("eps" / "v"; LDM's
    default "eps" when absent), or for sgm configs the denoiser's scaling class (`VScaling` -> "v", `EpsScaling`
    -> "eps"). Raises CheckpointError for an unreadable yaml or a parameterization sdcore does not run ("x0")."""

    try:
        config = yaml.safe_load(path.read_text())
        params = config["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint config {path}: not an LDM inference yaml with model.params ({e!r})") from e
    value = params.get("parameterization")
    if value is None:
        scaling = str(((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config", {})
                      .get("target", ""))
        value = "v" if scaling.endswith(".VScaling") else "eps"
    if value not in PREDICTIONS:
        raise CheckpointError(f"checkpoint config {path}: parameterization {value!r}; sdcore runs {PREDICTIONS}")
    return value


def resolve_prediction(detection: Detection, prediction: str | None = None, yaml_path: Path | None = None,
                       unet: torch.nn.Module | None = None) -> tuple[Family, list[str]]:
    """The family with its prediction type decided, and why. First rule that applies:

    1. `prediction` ("eps" or "v") given explicitly;
    2. `yaml_path` exists (A1111 `find_checkpoint_config_near_filename`: NAME.yaml beside NAME.safetensors wins
       over the guess from the weights): its parameterization (`prediction_from_yaml`);
    3. `detection.probe_prediction` (SD2, 4 channels): `v_prediction_probe(unet)` < -1 -> "v";
    4. the family's own value.
    An SD2 family resolved to "v" becomes "sd2-v" (v2-inference-v.yaml, 768 px).
    Raises ValueError for a prediction outside PREDICTIONS, or when the probe is needed and `unet` is None.
    """
    fam = detection.family
    if prediction is not None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}; allowed: {PREDICTIONS} (or None to detect it)")
        value, why = prediction, f"prediction {prediction!r} given explicitly"
    elif yaml_path is not None and yaml_path.is_file():
        value = prediction_from_yaml(yaml_path)
        why = f"prediction {value!r} from the config beside the checkpoint ({yaml_path.name})"
    elif detection.probe_prediction:
        if unet is None:
            raise ValueError("resolve_prediction: the SD2 v-prediction probe needs the loaded unet")
        mean = v_prediction_probe(unet)
        value = "v" if mean < V_PROBE_THRESHOLD else "eps"
        why = (f"prediction {value!r}: one-step probe mean(unet(0.5, t=999) - 0.5) = {mean:.3f} "
               f"{'<' if value == 'v' else '>='} {V_PROBE_THRESHOLD} (A1111 is_using_v_parameterization_for_sd2)")
    else:
        return fam, []
    if value == "v" and fam.name == families.SD2.name:
        fam = replace(families.SD2_V, unet=fam.unet, vae=fam.vae, text=fam.text)
    else:
        fam = replace(fam, prediction=value)
    return fam, [why]


# ---------------------------------------------------------------------------------------------------------------
# Building modules


def _check_keys(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, path: Path | None) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys (before any weight is assigned)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
                        for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or mismatched:
        def show(items):
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
        parts = [f"{name} ({len(items)}): {show(items)}" for name, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if items]
        raise CheckpointError(f"checkpoint {path or ''}: {what} does not match the weights; " + "; ".join(parts))


def build_module(cls, config, sd: dict[str, torch.Tensor], what: str, device, dtype, path=None) -> torch.nn.Module:
    """Construct `cls(config)` on the meta device and load `sd` into it strictly with assign=True, then move it
    to `device` in `dtype` (whatever the file's dtype)."""
    with torch.device("meta"):
        module = cls(config)
    _check_keys(module, sd, what, path)
    module.load_state_dict(sd, strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_vae_file(path: str | Path, base: VAEConfig) -> tuple[dict[str, torch.Tensor], VAEConfig, list[str]]:
    """A separate VAE file (A1111 "SD VAE"): (state dict with bare `AutoencoderKL` keys, its config, reasons).

    Keys may be bare (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`, as vae-ft-mse-840000 and
    sdxl_vae ship) or under `first_stage_model.` (a VAE cut from a full checkpoint; other tensors are then not
    used, and the reasons say how many). Training extras are dropped by VAE_FILE_DROPPED_KEY_RULES. The geometry is
    read off the shapes, `scale_factor` comes from `base` (the checkpoint's family). Raises CheckpointError for an
    unreadable file or one without VAE keys; key mismatches are reported when the module is built.
    """
    path = Path(path)
    raw, dropped = drop_known_extras(open_state_dict(path), VAE_FILE_DROPPED_KEY_RULES)
    reasons = [f"VAE from the separate file {path.name}"]
    if any(k.startswith(VAE) for k in raw):
        sd = sub_state_dict(raw, VAE)
        if len(sd) != len(raw):
            reasons.append(f"  {len(raw) - len(sd)} tensors outside '{VAE}' in that file are not used")
    else:
        sd = raw
    reasons += [f"  dropped {n} tensors: {why}" for why, n in dropped.items()]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if "encoder.conv_in.weight" not in shapes:
        raise CheckpointError(f"VAE file {path}: no LDM AutoencoderKL keys: looked for 'encoder.conv_in.weight' or "
                              f"'{VAE}encoder.conv_in.weight'; first keys: {sorted(raw)[:5]}")
    return sd, read_vae_config(shapes, base, prefix=""), reasons


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype = torch.float32, *, vae: str | Path | None = None,
                    prediction: str | None = None) -> StableDiffusionModel:
    """Load an LDM/sgm-layout checkpoint file into sdcore's UNet, VAE and text encoder(s).

    Args:
      path: `.safetensors` or `.ckpt` file in the original key layout (any family of `detect_family`).
      device: where the modules live ("cpu", "cuda", "mps", ...).
      dtype: compute dtype of the UNet and text encoders (independent of the file's dtype: fp16/bf16/fp32 files
        load into any of them).
      vae_dtype: compute dtype of the VAE (float32 by default).
      vae: a separate VAE file replacing the checkpoint's (`load_vae_file`); recorded as `vae_path`.
      prediction: "eps" or "v" to override detection; None = a `NAME.yaml` beside the checkpoint, else the SD2
        probe, else the family's (`resolve_prediction`).
    Raises CheckpointError for unreadable, hostile, unrecognised or mismatching files (keys listed), ValueError for
    a bad `prediction`.
    """

    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; allowed: {PREDICTIONS} (or None to detect it)")
    path = Path(path)
    device = torch.device(device)
    raw = open_state_dict(path)
    sd, dropped = drop_known_extras(raw)
    detection = detect_family({k: tuple(v.shape) for k, v in sd.items()})
    fam = detection.family
    reasons = detection.reasons + [f"dropped {n} tensors: {why}" for why, n in dropped.items()]

    alphas = raw.get("alphas_cumprod")
    if alphas is not None and alphas.shape != (1000,):
        raise CheckpointError(f"checkpoint {path}: alphas_cumprod has shape {tuple(alphas.shape)}; expected (1000,)")
    if alphas is None:
        alphas = sd_alphas_cumprod()
        reasons.append("no alphas_cumprod in the file: SD scaled-linear schedule (0.00085..0.012, 1000 steps)")
    sd.pop("alphas_cumprod", None)

    known = (UNET, VAE) + fam.text_prefixes
    stray = sorted(k for k in sd if not k.startswith(known))
    if stray:
        raise CheckpointError(f"checkpoint {path}: unexpected tensors outside {known}: {stray[:8]}"
                              + (f" ... ({len(stray)} in all)" if len(stray) > 8 else ""))
    unet = build_module(UNetModel, fam.unet, sub_state_dict(sd, UNET), "UNet", device, dtype, path)
    fam, why = resolve_prediction(detection, prediction, path.with_suffix(".yaml"), unet)
    reasons += why
    if vae is None:
        vae_sd, vae_path = sub_state_dict(sd, VAE), None
    else:
        vae_path = Path(vae)
        vae_sd, vae_config, why = load_vae_file(vae_path, fam.vae)
        fam = replace(fam, vae=vae_config)
        reasons += why
    vae_module = build_module(AutoencoderKL, fam.vae, vae_sd, "VAE", device, vae_dtype, vae_path or path)
    text_encoders = []
    for config, prefix in zip(fam.text, fam.text_prefixes, strict=True):
        text_sd = sub_state_dict(sd, prefix)
        if config.layout == "hf":
            text_sd = hf_to_open_clip(text_sd)
        text_encoders.append(build_module(TextEncoder, config, text_sd, f"text encoder '{prefix}'", device, dtype,
                                          path))
    return StableDiffusionModel(family=fam, unet=unet, vae=vae_module, text_encoders=text_encoders,
                                tokenizer=load_tokenizer(), alphas_cumprod=alphas.float().cpu(), device=device,
                                dtype=dtype, vae_dtype=vae_dtype, path=path, reasons=reasons, vae_path=vae_path,
                                file_dtypes=dtype_counts(sd))
