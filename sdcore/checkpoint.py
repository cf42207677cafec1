"""Open an original Stable Diffusion checkpoint, tell what it is, and build its modules from it.

Files: `.safetensors` (memory-mapped through `safetensors.safe_open`) or `.ckpt`/`.pt`/`.pth`/`.bin` (pickles opened
with `torch.load(weights_only=True)`, torch's restricted unpickler: only tensors, storages and plain containers are
built and any other global is refused by name, so nothing in the file is executed; the same policy as A1111's
`modules/safe.py` `RestrictedUnpickler`). Zip pickles (torch >= 1.6) are memory-mapped; legacy non-zip pickles
(`torch.save(..., _use_new_zipfile_serialization=False)`, common among old SD1 files) cannot be, and are read with
the same restricted unpickler without mmap. Modules are built on the meta device and loaded with
`load_state_dict(strict=True, assign=True)`, so no random initialisation runs and no second copy of the weights is
made. `load_checkpoint(path, device="meta")` reads only the file's header (names, shapes, dtypes): what `sdcore info`
needs, in constant memory.

Errors: every problem with a file is a CheckpointError (a ValueError) whose one-line message names the file (and the
command-line argument it came from, `--ckpt` or `--vae`), what was found and what is allowed.

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
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from . import families
from .families import Family, TextConfig, UNetConfig, VAEConfig
from .files import CHECKPOINT_SUFFIXES, checkpoint_path_problem
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
    (e.g. {"float16": 1131}); `component_file_dtypes`: the same per entry of `components()` (the VAE's from the
    separate VAE file when one was given). `vae_path`: a separate VAE file, when one was given. On the meta device
    (`load_checkpoint(path, device="meta")`) the modules hold shapes only and `alphas_cumprod` is a meta tensor
    unless the file has none.
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
    component_file_dtypes: dict[str, dict[str, int]] = field(default_factory=dict)
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


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ZIP_MAGIC = b"PK\x03\x04"  # a zip's first local file header; torch.serialization._is_zipfile checks the same bytes
# What a valid file is, for error messages (safetensors format spec, github.com/huggingface/safetensors README).
SAFETENSORS_FORMAT = ("allowed: the safetensors layout: an 8-byte little-endian header length N (at most 100 MB), "
                      "N bytes of JSON header giving each tensor's dtype, shape and byte range, then all those bytes")
PICKLE_FORMAT = "allowed: a torch.save pickle (zip, or legacy non-zip) of tensors, storages and plain containers"
# safetensors header dtype -> torch dtype (safetensors format spec `Dtype`); others are refused by name.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
    ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)}


class LightningCallbackStandIn:
    """Inert stand-in for `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`.

    LDM-trained `.ckpt` files (SD1-era) keep PyTorch Lightning's trainer state beside `state_dict`, with the callback
    class as the key of their "callbacks" entry; torch's weights-only unpickler refuses that global, and A1111's
    `modules/safe.py` allows it by name. Here the name resolves to this empty class instead: Lightning is never
    imported and nothing runs (the trainer state is not read)."""

    def __init__(self, *args, **kwargs):  # whatever the pickle passes is ignored
        pass

    def __setstate__(self, state):
        pass


# Globals allowed by name on top of torch's weights-only allow-list, each resolved to an inert stand-in.
PICKLE_STAND_INS: tuple[tuple[type, str], ...] = (
    (LightningCallbackStandIn, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
)


def _check_path(path: Path, what: str) -> None:
    """Raise CheckpointError unless `path` is an existing file (`files.checkpoint_path_problem` says what it is)."""
    problem = checkpoint_path_problem(path)
    if problem:
        raise CheckpointError(f"{what}: {problem}")


def _read_safetensors(path: Path, what: str, meta: bool, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file (only the header when `meta`). safetensors validates the header before any
    tensor is read: its length field (at most 100 MB), its JSON, and that the byte ranges exactly cover the rest of
    the file; a file failing any check raises CheckpointError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = [k for k in f.keys() if k.startswith(prefix)]
            if not meta:
                return {k: f.get_tensor(k) for k in keys}
            sd = {}
            for k in keys:
                piece = f.get_slice(k)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{what}: {path}: tensor {k!r} has dtype {piece.get_dtype()}; allowed: "
                                          f"{', '.join(SAFETENSORS_DTYPES)}")
                sd[k] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
            return sd
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
        raise CheckpointError(f"{what}: {path} is not a readable .safetensors file ({' '.join(str(e).split())}); "
                              f"{SAFETENSORS_FORMAT}") from e


def _refused_global(error: Exception) -> str | None:
    """The global named by torch's weights-only unpickler when it refused one ("posix.system"), else None."""
    m = re.search(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(error))
    return m.group(1) if m else None


def _one_line(error: Exception) -> str:
    """The informative line of an exception (torch's weights-only errors wrap it in a paragraph of advice)."""
    text = str(error)
    m = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = m.group(1) if m else next((ln for ln in text.splitlines() if ln.strip()), type(error).__name__)
    return " ".join(line.split())


def _read_pickle(path: Path, what: str, meta: bool, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of a torch pickle through torch's weights-only unpickler (plus PICKLE_STAND_INS): memory-mapped for a
    zip file, read whole for a legacy non-zip pickle (torch cannot mmap those). Un-nested from "state_dict" when
    there is one; entries that are not tensors are left out. A refused global raises CheckpointError naming it.
    (`torch.serialization.safe_globals` adds the stand-ins to torch's allow-list for the duration of the call.)"""
    with open(path, "rb") as f:
        is_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    try:
        with torch.serialization.safe_globals(list(PICKLE_STAND_INS)), warnings.catch_warnings():
            # plain pickle.dump files (protocol > 2) make torch warn before it refuses or reads them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        name = _refused_global(e)
        if name:
            raise CheckpointError(
                f"{what}: {path} refused: its pickle needs global '{name}', which is not allowed (allowed: tensors, "
                "storages and plain containers; sdcore never executes code from a checkpoint)") from e
        raise CheckpointError(f"{what}: {path} is not a readable torch checkpoint ({_one_line(e)}); "
                              f"{PICKLE_FORMAT}") from e
    except Exception as e:
        raise CheckpointError(f"{what}: {path} is not a readable torch checkpoint ({_one_line(e)}); "
                              f"{PICKLE_FORMAT}") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what}: {path} holds a {type(obj).__name__}, not a state dict; {PICKLE_FORMAT}")
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if meta:
        sd = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
    return sd


def open_state_dict(path: str | Path, *, what: str = "--ckpt", meta: bool = False,
                    prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, un-nested from a `state_dict` entry when there is one.

    Args:
      path: a `.safetensors` file, or a `.ckpt`/`.pt`/`.pth`/`.bin` torch pickle (zip or legacy non-zip).
      what: the argument the path came from, first word of every error message ("--ckpt", "--vae").
      meta: read only names, shapes and dtypes: the tensors come back on the meta device and no tensor data is
        read (.safetensors: the header through `safe_open(...).get_slice(k)`; zip pickles: memory-mapped, never
        touched; legacy pickles are read whole, then dropped).
      prefix: only the tensors whose names start with it (names are kept whole).
    Raises CheckpointError, one line naming `what`, the path and what is allowed, for: a folder (a diffusers folder
    is named as such), a missing file, an unknown extension, a safetensors file that is truncated or whose header is
    not valid JSON or claims more than 100 MB, a pickle that needs a global outside tensors, storages and plain
    containers (refused by name, never executed; cf. A1111 `modules/safe.py`), an unreadable pickle, or no tensors.
    """
    path = Path(path)
    _check_path(path, what)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd = _read_safetensors(path, what, meta, prefix)
    elif suffix in PICKLE_SUFFIXES:
        sd = _read_pickle(path, what, meta, prefix)
    else:
        raise CheckpointError(f"{what}: {path} has extension {suffix!r}; allowed: {', '.join(CHECKPOINT_SUFFIXES)}")
    if not sd:
        raise CheckpointError(f"{what}: {path} contains no tensors" + (f" under '{prefix}'" if prefix else ""))
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


VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def missing_vae_parts(shapes: dict[str, tuple], config: VAEConfig, prefix: str = VAE) -> list[str]:
    """The parts of an `AutoencoderKL` (VAE_PARTS) of which `shapes` has no key at all, each as
    "first_stage_model.encoder.*: missing (N keys)" with N the number of tensors the part has in `config`'s
    geometry. Empty when every part is there (a part with only some keys is reported by the strict load)."""
    with torch.device("meta"):
        expected = AutoencoderKL(config).state_dict()
    out = []
    for part in VAE_PARTS:
        n = sum(k.startswith(part) for k in expected)
        if n and not any(k.startswith(prefix + part) for k in shapes):
            out.append(f"{prefix}{part}*: missing ({n} keys)")
    return out


def load_vae_file(path: str | Path, base: VAEConfig, *, meta: bool = False
                  ) -> tuple[dict[str, torch.Tensor], VAEConfig, list[str]]:
    """A separate VAE file (A1111 "SD VAE"): (state dict with bare `AutoencoderKL` keys, its config, reasons).

    Keys may be bare (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`, as vae-ft-mse-840000 and
    sdxl_vae ship) or under `first_stage_model.` (a VAE cut from a full checkpoint; other tensors are then not
    used, and the reasons say how many). Training extras are dropped by VAE_FILE_DROPPED_KEY_RULES. The geometry is
    read off the shapes, `scale_factor` comes from `base` (the checkpoint's family). `meta`: read only the header
    (meta tensors, see `open_state_dict`). Raises CheckpointError (naming `--vae` and the file) for an unreadable
    file, one without VAE keys or one missing a whole part (encoder, decoder, ...); other key mismatches are
    reported when the module is built.
    """
    path = Path(path)
    raw, dropped = drop_known_extras(open_state_dict(path, what="--vae", meta=meta), VAE_FILE_DROPPED_KEY_RULES)
    reasons = [f"VAE from the separate file {path.name}"]
    if any(k.startswith(VAE) for k in raw):
        sd = sub_state_dict(raw, VAE)
        if len(sd) != len(raw):
            reasons.append(f"  {len(raw) - len(sd)} tensors outside '{VAE}' in that file are not used")
    else:
        sd = raw
    reasons += [f"  dropped {n} tensors: {why}" for why, n in dropped.items()]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if not any(k.startswith(("encoder.", "decoder.")) for k in shapes):
        raise CheckpointError(f"--vae: {path}: no LDM AutoencoderKL keys: looked for 'encoder.conv_in.weight' or "
                              f"'{VAE}encoder.conv_in.weight'; first keys: {sorted(raw)[:5]}")
    missing = missing_vae_parts(shapes, base, prefix="")
    if missing:
        raise CheckpointError(f"--vae: {path}: " + "; ".join(missing) + "; allowed: a complete LDM AutoencoderKL "
                              f"({', '.join(p + '*' for p in VAE_PARTS)})")
    return sd, _read_config(f"VAE file {path}", read_vae_config, shapes, base, ""), reasons


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    vae_dtype: torch.dtype = torch.float32, *, vae: str | Path | None = None,
                    prediction: str | None = None) -> StableDiffusionModel:
    """Load an LDM/sgm-layout checkpoint file into sdcore's UNet, VAE and text encoder(s).

    Args:
      path: `.safetensors` or `.ckpt` file in the original key layout (any family of `detect_family`).
      device: where the modules live ("cpu", "cuda", "mps", ...). "meta" reads only the file's header (names,
        shapes, dtypes; no tensor data, memory independent of the file's size) and checks it as a real load does:
        what `sdcore info` uses. Exception: an SD2 file with 4 input channels and neither `prediction` nor a yaml
        beside it reads its UNet (only) to run the v-prediction probe on the CPU in float32.
      dtype: compute dtype of the UNet and text encoders (independent of the file's dtype: fp16/bf16/fp32 files
        load into any of them).
      vae_dtype: compute dtype of the VAE (float32 by default).
      vae: a separate VAE file replacing the checkpoint's (`load_vae_file`); recorded as `vae_path`.
      prediction: "eps" or "v" to override detection; None = a `NAME.yaml` beside the checkpoint, else the SD2
        probe, else the family's (`resolve_prediction`).
    Raises CheckpointError (one line, naming `--ckpt`/`--vae` and the file) for unreadable, hostile (refused by
    name, never executed), unrecognised or mismatching files (keys listed), a folder (a diffusers folder is named as
    such), and a checkpoint without a VAE when `vae` is not given ("first_stage_model.encoder.*: missing (N keys)");
    ValueError for a bad `prediction`.
    """

    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; allowed: {PREDICTIONS} (or None to detect it)")
    path = Path(path)
    device = torch.device(device)
    meta = device.type == "meta"
    raw = open_state_dict(path, what="--ckpt", meta=meta)
    sd, dropped = drop_known_extras(raw)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    detection = detect_family(shapes)
    fam = detection.family
    reasons = detection.reasons + [f"dropped {n} tensors: {why}" for why, n in dropped.items()]

    alphas = raw.get("alphas_cumprod")
    if alphas is not None and alphas.shape != (1000,):
        raise CheckpointError(f"--ckpt: {path}: alphas_cumprod has shape {tuple(alphas.shape)}; expected (1000,)")
    if alphas is None:
        alphas = sd_alphas_cumprod()
        reasons.append("no alphas_cumprod in the file: SD scaled-linear schedule (0.00085..0.012, 1000 steps)")
    sd.pop("alphas_cumprod", None)

    known = (UNET, VAE) + fam.text_prefixes
    stray = sorted(k for k in sd if not k.startswith(known))
    if stray:
        raise CheckpointError(f"--ckpt: {path}: unexpected tensors outside {known}: {stray[:8]}"
                              + (f" ... ({len(stray)} in all)" if len(stray) > 8 else ""))
    # The VAE is checked before the UNet is built, so a file without one fails at once.
    if vae is None:
        missing = missing_vae_parts(shapes, fam.vae)
        if missing:
            raise CheckpointError(f"--ckpt: {path}: " + "; ".join(missing) + "; a separate VAE can be given with "
                                  "--vae (vae= in load_checkpoint)")
        vae_sd, vae_path, vae_config, vae_why = sub_state_dict(sd, VAE), None, None, []
    else:
        vae_path = Path(vae)
        vae_sd, vae_config, vae_why = load_vae_file(vae_path, fam.vae, meta=meta)
    unet = build_module(UNetModel, fam.unet, sub_state_dict(sd, UNET), "UNet", device, dtype, path)
    yaml_path = path.with_suffix(".yaml")
    probe_unet = unet
    if meta and detection.probe_prediction and prediction is None and not yaml_path.is_file():
        # The probe runs the UNet: read its weights (only those), in float32 on the CPU as A1111 does.
        probe_unet = build_module(UNetModel, fam.unet, sub_state_dict(open_state_dict(path, prefix=UNET), UNET),
                                  "UNet", "cpu", torch.float32, path)
    fam, why = resolve_prediction(detection, prediction, yaml_path, probe_unet)
    del probe_unet
    reasons += why
    if vae_config is not None:
        fam = replace(fam, vae=vae_config)
        reasons += vae_why
    vae_module = build_module(AutoencoderKL, fam.vae, vae_sd, "VAE", device, vae_dtype, vae_path or path)
    component_dtypes = {"unet": dtype_counts(sub_state_dict(sd, UNET)), "vae": dtype_counts(vae_sd)}
    text_encoders = []
    for config, prefix in zip(fam.text, fam.text_prefixes, strict=True):
        text_sd = sub_state_dict(sd, prefix)
        component_dtypes["text_encoder." + prefix.rstrip(".")] = dtype_counts(text_sd)
        if config.layout == "hf":
            text_sd = hf_to_open_clip(text_sd)
        text_encoders.append(build_module(TextEncoder, config, text_sd, f"text encoder '{prefix}'", device, dtype,
                                          path))
    return StableDiffusionModel(family=fam, unet=unet, vae=vae_module, text_encoders=text_encoders,
                                tokenizer=load_tokenizer(),
                                alphas_cumprod=alphas.float() if alphas.is_meta else alphas.float().cpu(),
                                device=device, dtype=dtype, vae_dtype=vae_dtype, path=path, reasons=reasons,
                                vae_path=vae_path, file_dtypes=dtype_counts(sd), component_file_dtypes=component_dtypes)
