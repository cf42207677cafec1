"""Tell what a checkpoint is from its tensor names and shapes alone: pure functions, no torch.

`sdcore info` and the CLI's memory check read a file's header (`sdcore.header`) and call `detect_family` here
without importing torch; `sdcore.checkpoint` re-exports every name for the loader. The rules follow A1111
`modules/sd_models_config.py` `guess_model_config_from_state_dict` (v1.10.1); see `detect_family`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from . import families
from .families import Family, TextConfig, UNetConfig, VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = "conditioner.embedders."
PREDICTIONS = ("eps", "v")
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

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



def drop_known_extras(sd: dict[str, Any], rules: tuple[tuple[str, str], ...] = DROPPED_KEY_RULES
                      ) -> tuple[dict[str, Any], dict[str, int]]:
    """Split off the tensors named by `rules`; returns (kept, {rule reason: count dropped})."""
    kept, dropped = {}, {}
    for k, v in sd.items():
        reason = next((why for pattern, why in rules if re.search(pattern, k)), None)
        if reason is None:
            kept[k] = v
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    return kept, dropped


def sub_state_dict(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
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


def _read_config(what: str, read, *args):
    """`read(*args)`; a key the reader needs that the file lacks, or a block layout it cannot follow, becomes a
    CheckpointError naming the component and the key."""
    try:
        return read(*args)
    except KeyError as e:
        raise CheckpointError(f"checkpoint: {what} incomplete: key {e.args[0]!r} is missing") from e
    except (IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"checkpoint: {what} keys do not follow the LDM layout ({e})") from e


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
    A file without a (complete) VAE is still detected (the reasons say so, the family's VAE geometry is kept):
    a separate VAE file can supply it; `missing_vae_parts` lists what is absent.
    Raises CheckpointError naming what was looked for when no rule matches, or the key missing when the UNet or a
    text encoder is incomplete.
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
    unet, unet_why = _read_config("UNet", read_unet_config, shapes, base.unet)
    tiny = families.TINY
    if (name, cin) == ("sd1", 4) and (unet.model_channels, unet.context_dim) == (tiny.unet.model_channels,
                                                                               tiny.unet.context_dim):
        base = tiny
        unet, unet_why = _read_config("UNet", read_unet_config, shapes, tiny.unet)
        reasons.append(f"model_channels {unet.model_channels} and context width {unet.context_dim} are the bundled "
                       "tiny model's -> family 'tiny' (64 px)")
    elif unet.model_channels != base.unet.model_channels:
        reasons.append(f"model_channels {unet.model_channels} != {base.unet.model_channels}: a reduced-size "
                       f"{base.name} (test checkpoint)")
    try:
        vae = read_vae_config(shapes, base.vae)
        vae_why = (f"VAE: ch {vae.ch}, ch_mult {vae.ch_mult}, {vae.z_channels} latent channels, "
                   f"scale_factor {vae.scale_factor}")
    except (KeyError, IndexError) as e:  # no (complete) VAE in the file: a separate VAE file can supply it
        vae = base.vae
        vae_why = (f"VAE: not complete in the file ({VAE}* key {e.args[0]!r} missing): the {base.name} geometry is "
                   "assumed; a separate VAE file is needed")
    fam = replace(base, unet=unet, vae=vae, text=_read_config("text encoder", _text_configs, shapes, base))
    reasons += unet_why
    reasons.append(vae_why)
    reasons += _check_text_against_unet(fam)
    probe = (name, cin) == ("sd2", 4)
    reasons.append("prediction: eps or v is not in the names and shapes (SD2): decided by resolve_prediction"
                   if probe else f"prediction: {fam.prediction} (fixed for family {fam.name})")
    return Detection(fam, reasons, probe_prediction=probe)


# ---------------------------------------------------------------------------------------------------------------
# eps or v


V_PROBE_THRESHOLD = -1.0  # A1111 `is_using_v_parameterization_for_sd2`: v when the mean is below -1


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


def decide_prediction(detection: Detection, prediction: str | None = None, yaml_path: Path | None = None,
                      probe: Callable[[], float] | None = None) -> tuple[Family, list[str]]:
    """The family with its prediction type decided, and why. First rule that applies:

    1. `prediction` ("eps" or "v") given explicitly;
    2. `yaml_path` exists (A1111 `find_checkpoint_config_near_filename`: NAME.yaml beside NAME.safetensors wins
       over the guess from the weights): its parameterization (`prediction_from_yaml`);
    3. `detection.probe_prediction` (SD2, 4 channels): `probe()` (A1111's one-step probe,
       `checkpoint.v_prediction_probe`) < -1 -> "v";
    4. the family's own value.
    An SD2 family resolved to "v" becomes "sd2-v" (v2-inference-v.yaml, 768 px).
    Raises ValueError for a prediction outside PREDICTIONS, or when the probe is needed and `probe` is None.
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
        if probe is None:
            raise ValueError("resolve_prediction: the SD2 v-prediction probe needs the loaded unet")
        mean = probe()
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


def vae_file_entries(raw: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[str]]:
    """A separate VAE file's entries with bare `AutoencoderKL` keys, and the reasons to report: keys under
    `first_stage_model.` are un-prefixed (the others are counted as unused), training extras are dropped
    (VAE_FILE_DROPPED_KEY_RULES). `raw` maps names to tensors or header records alike."""
    raw, dropped = drop_known_extras(raw, VAE_FILE_DROPPED_KEY_RULES)
    reasons = [f"VAE from the separate file {path.name}"]
    if any(k.startswith(VAE) for k in raw):
        sd = sub_state_dict(raw, VAE)
        if len(sd) != len(raw):
            reasons.append(f"  {len(raw) - len(sd)} tensors outside '{VAE}' in that file are not used")
    else:
        sd = raw
    reasons += [f"  dropped {n} tensors: {why}" for why, n in dropped.items()]
    return sd, reasons


def has_vae_parts(keys, prefix: str = VAE) -> bool:
    """Whether every part of an `AutoencoderKL` (VAE_PARTS) has at least one key under `prefix`."""
    keys = list(keys)
    return all(any(k.startswith(prefix + part) for k in keys) for part in VAE_PARTS)
