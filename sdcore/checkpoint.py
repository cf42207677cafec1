"""Open an original Stable Diffusion checkpoint, tell what it is, and build its modules from it.

Files: `.safetensors` (memory-mapped through `safetensors.safe_open`) or `.ckpt`/`.pt`/`.pth` (pickles opened with
`torch.load(weights_only=True)`, which refuses any global outside torch's tensor allow-list: nothing in the file is
executed). Modules are built on the meta device and loaded with `load_state_dict(strict=True, assign=True)`, so no
random initialisation runs and no second copy of the weights is made.

Key prefixes (LDM layout): `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.text_model.*` (SD1, transformers layout), `cond_stage_model.model.*` (SD2, open_clip
layout), `conditioner.embedders.N.*` (SDXL).
"""
from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import families
from .families import Family, TextConfig, UNetConfig, VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."

# Tensors real checkpoints carry that sdcore does not build modules for. Each rule says why it is safe to drop.
DROPPED_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^model_ema\.", "EMA copy of the UNet kept by the trainer; the main weights are the ones used for inference"),
    (r"^(betas|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod"
     r"|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|posterior_log_variance_clipped"
     r"|posterior_mean_coef1|posterior_mean_coef2|logvar|lvlb_weights)$",
     "DDPM training buffers; sampling needs only alphas_cumprod"),
    (r"^first_stage_model\.loss\.", "VAE training loss (LPIPS, discriminator)"),
    (r"^cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$", "index buffer 0..76 of transformers"),
    (r"^cond_stage_model\.model\.(logit_scale|visual\..*)$", "open_clip's image tower and logit scale (unused)"),
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be opened, recognised or loaded; the message names the file and the keys."""


@dataclass
class Detection:
    """What `detect_family` read off a state dict: the family with configs sized from the weights, and why."""

    family: Family
    reasons: list[str] = field(default_factory=list)


@dataclass
class StableDiffusionModel:
    """A loaded model: UNet, VAE, text encoder(s) and the noise schedule, on one device.

    `alphas_cumprod`: float32 [1000], from the checkpoint when it has one, else SD's scaled-linear schedule.
    `dtype` is the compute dtype of the UNet and text encoder; the VAE runs in `vae_dtype` (float32 by default,
    since fp16 VAE decodes overflow to NaN on SD1/SDXL weights).
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
    _sha256: str | None = None

    @property
    def name(self) -> str:
        """A1111's "Model" infotext value: the file name without extension."""
        return self.path.stem if self.path else self.family.name

    def sha256(self) -> str | None:
        """sha256 hex digest of the checkpoint file (computed once, on first use)."""
        if self._sha256 is None and self.path is not None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def shorthash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
        full = self.sha256()
        return full[:10] if full else None

    def encode_texts(self, texts: list[str], clip_skip: int = 1, emphasis: str = "Original", **size) -> torch.Tensor:
        """Cross-attention conditioning [N, 77*k, C] of plain texts (SD1 family: one CLIP text encoder).

        `size` (width, height in pixels) is accepted for families with size conditioning and unused here.
        """
        from .prompts import encode_prompts

        c = encode_prompts(self.text_encoders[0], self.tokenizer, texts, clip_skip=clip_skip, emphasis=emphasis)
        return c.to(self.device)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_crossattn: torch.Tensor,
                    c_concat: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """UNet output (eps or v) for latents x [B,4,h,w] at continuous timesteps t [B].

        `c_concat` [B,Cc,h,w] (inpainting: mask + masked-image latent; instruct-pix2pix: image latent) is
        concatenated after x along channels, as LDM's `DiffusionWrapper` with conditioning_key hybrid does.
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
        from safetensors import safe_open

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


def drop_known_extras(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Split off the tensors named by DROPPED_KEY_RULES; returns (kept, {rule reason: count dropped})."""
    kept, dropped = {}, {}
    for k, v in sd.items():
        reason = next((why for pattern, why in DROPPED_KEY_RULES if re.search(pattern, k)), None)
        if reason is None:
            kept[k] = v
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    return kept, dropped


def sub_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------------
# Detection: one pure function over names and shapes


def _count(shapes: dict[str, tuple], pattern: str) -> int:
    """Number of distinct values of the first group of `pattern` among the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def read_unet_config(shapes: dict[str, tuple], base: UNetConfig) -> tuple[UNetConfig, list[str]]:
    """UNet hyper-parameters read off `model.diffusion_model.*` shapes; heads come from `base` (not in the weights).

    Input blocks are: 0 = conv_in, then per level `num_res_blocks` ResBlocks (each optionally followed by a
    SpatialTransformer at index .1) and a Downsample (`.0.op`) except after the last level.
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
                  num_res_blocks=num_res_blocks, channel_mult=tuple(mult), attention_resolutions=tuple(sorted(attn_ds, reverse=True)),
                  transformer_depth=tuple(depth),
                  transformer_depth_middle=_count(shapes, re.escape(p + "middle_block.1.transformer_blocks.") + r"(\d+)\."),
                  context_dim=context_dim, use_linear_in_transformer=linear, adm_in_channels=adm,
                  num_classes="sequential" if adm else None)
    why = [f"UNet: {cin} input channels, model_channels {mc}, channel_mult {tuple(mult)}, {num_res_blocks} res "
           f"blocks per level, attention at ds {tuple(attn_ds)}, context_dim {context_dim}, "
           f"{'linear' if linear else 'conv'} transformer projections"]
    return cfg, why


def read_vae_config(shapes: dict[str, tuple], base: VAEConfig) -> VAEConfig:
    """VAE hyper-parameters read off `first_stage_model.*` shapes (scale_factor comes from `base`)."""
    p = VAE
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
                   layers=_count(shapes, re.escape(prefix + "text_model.encoder.layers.") + r"(\d+)\."))


def detect_family(shapes: dict[str, tuple]) -> Detection:
    """Tell the model family from a state dict's key names and shapes (a pure function; tensors are not read).

    `shapes` maps key -> shape tuple (use `{k: tuple(v.shape) for k, v in sd.items()}`). Size-dependent
    hyper-parameters are read off the shapes, so reduced-size test checkpoints of a family are that family.
    Rules, in order:
      - `conditioner.embedders.*` -> SDXL (not supported yet: raises).
      - `cond_stage_model.model.*` (open_clip layout) -> SD2 (not supported yet: raises).
      - `cond_stage_model.transformer.text_model.*` (transformers CLIP) -> SD1 family:
        UNet input channels 9 -> "sd1-inpaint"; 8 -> instruct-pix2pix (not supported yet: raises);
        4 with the bundled tiny model's model_channels and context width -> "tiny"; else "sd1".
    Raises CheckpointError naming what was looked for when no rule matches.
    """
    reasons: list[str] = []
    if not any(k.startswith(UNET) for k in shapes):
        raise CheckpointError(f"checkpoint: no UNet keys: looked for '{UNET}*' (LDM layout); first keys: "
                              f"{sorted(shapes)[:5]}")
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        raise CheckpointError("checkpoint: SDXL layout ('conditioner.embedders.*') recognised but not supported yet")
    if any(k.startswith(SD2_TEXT) for k in shapes):
        raise CheckpointError(f"checkpoint: SD2 layout ('{SD2_TEXT}*', open_clip text encoder) recognised but not "
                              "supported yet")
    if not any(k.startswith(SD1_TEXT + "text_model.") for k in shapes):
        raise CheckpointError(f"checkpoint: no text encoder found: looked for '{SD1_TEXT}text_model.*' (SD1), "
                              f"'{SD2_TEXT}*' (SD2), 'conditioner.embedders.*' (SDXL)")
    reasons.append(f"text encoder in transformers CLIP layout under '{SD1_TEXT}text_model.' -> SD1 family")
    cin = shapes[UNET + "input_blocks.0.0.weight"][1]
    if cin == 9:
        base, why = families.SD1_INPAINT, "UNet input_blocks.0.0 takes 9 channels (x + mask + masked latent) -> inpainting"
    elif cin == 8:
        raise CheckpointError("checkpoint: 8-channel UNet (instruct-pix2pix) recognised but not supported yet")
    elif cin == 4:
        base, why = families.SD1, "UNet input_blocks.0.0 takes 4 channels -> plain txt2img/img2img model"
    else:
        raise CheckpointError(f"checkpoint: UNet input_blocks.0.0 takes {cin} channels; known: 4, 8, 9")
    reasons.append(why)
    unet, unet_why = read_unet_config(shapes, base.unet)
    text = read_hf_text_config(shapes, SD1_TEXT, base.text[0])
    tiny = families.TINY
    if cin == 4 and (unet.model_channels, unet.context_dim) == (tiny.unet.model_channels, tiny.unet.context_dim):
        base = tiny
        unet, unet_why = read_unet_config(shapes, tiny.unet)
        text = read_hf_text_config(shapes, SD1_TEXT, tiny.text[0])
        reasons.append(f"model_channels {unet.model_channels} and context width {unet.context_dim} are the bundled "
                       "tiny model's -> family 'tiny' (64 px)")
    elif unet.model_channels != base.unet.model_channels:
        reasons.append(f"model_channels {unet.model_channels} != {base.unet.model_channels}: a reduced-size "
                       f"{base.name} (test checkpoint)")
    reasons += unet_why
    vae = read_vae_config(shapes, base.vae)
    reasons.append(f"VAE: ch {vae.ch}, ch_mult {vae.ch_mult}, {vae.z_channels} latent channels")
    reasons.append(f"text: CLIP width {text.width}, {text.layers} layers, vocab {text.vocab_size}")
    return Detection(replace(base, unet=unet, vae=vae, text=(text,)), reasons)


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
    """Construct `cls(config)` on the meta device and load `sd` into it strictly with assign=True."""
    with torch.device("meta"):
        module = cls(config)
    _check_keys(module, sd, what, path)
    module.load_state_dict(sd, strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype = torch.float32) -> StableDiffusionModel:
    """Load an LDM-layout checkpoint file into sdcore's UNet, VAE and text encoder.

    Args:
      path: `.safetensors` or `.ckpt` file in the original (LDM) key layout.
      device: where the modules live ("cpu", "cuda", "mps", ...).
      dtype: compute dtype of the UNet and text encoder (independent of the file's dtype).
      vae_dtype: compute dtype of the VAE (float32 by default).
    Raises CheckpointError for unreadable, hostile, unrecognised or mismatching files (keys listed).
    """
    from .models.text import TextEncoder, hf_to_open_clip, load_tokenizer
    from .models.unet import UNetModel
    from .models.vae import AutoencoderKL
    from .sampling.denoisers import sd_alphas_cumprod

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

    known = (UNET, VAE, SD1_TEXT)
    stray = sorted(k for k in sd if not k.startswith(known))
    if stray:
        raise CheckpointError(f"checkpoint {path}: unexpected tensors outside {known}: {stray[:8]}"
                              + (f" ... ({len(stray)} in all)" if len(stray) > 8 else ""))
    unet = build_module(UNetModel, fam.unet, sub_state_dict(sd, UNET), "UNet", device, dtype, path)
    vae = build_module(AutoencoderKL, fam.vae, sub_state_dict(sd, VAE), "VAE", device, vae_dtype, path)
    text_sd = hf_to_open_clip(sub_state_dict(sd, SD1_TEXT))
    text = build_module(TextEncoder, fam.text[0], text_sd, "text encoder", device, dtype, path)
    return StableDiffusionModel(family=fam, unet=unet, vae=vae, text_encoders=[text], tokenizer=load_tokenizer(),
                                alphas_cumprod=alphas.float().cpu(), device=device, dtype=dtype, vae_dtype=vae_dtype,
                                path=path, reasons=reasons)
