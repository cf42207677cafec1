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
from safetensors import safe_open

from . import families
from .detection import (  # noqa: F401 (re-exported: detection is part of the loader's public names)
    DROPPED_KEY_RULES, FAMILY_BY_CHANNELS, PREDICTIONS, SD1_TEXT, SD2_TEXT, SDXL_TEXT, TEXT_LAYOUTS, UNET, VAE,
    VAE_FILE_DROPPED_KEY_RULES, V_PROBE_THRESHOLD, CheckpointError, Detection, _read_config, decide_prediction,
    detect_family, drop_known_extras, prediction_from_yaml, read_hf_text_config, read_open_clip_text_config,
    read_unet_config, read_vae_config, sub_state_dict, vae_file_entries, VAE_PARTS, has_vae_parts)
from .families import Family, VAEConfig
from .files import CHECKPOINT_SUFFIXES, checkpoint_path_problem
from .models.text import TextEncoder, hf_to_open_clip, load_tokenizer
from .models.unet import UNetModel
from .models.vae import AutoencoderKL
from .prompts import encode_family_conditioning
from .sampling.denoisers import sd_alphas_cumprod


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
                     height: int | None = None, is_negative_prompt: bool = False, embeddings=None):
        """Conditioning of plain texts (no prompt editing / AND), see `prompts.encode_family_conditioning`.

        Returns [N, 77*k, C] for families without vector conditioning (SD1, SD2), else
        {"c_crossattn": [N, 77*k, C], "y": [N, adm_in_channels]} (SDXL; `width`/`height` in pixels feed the size
        conditioning, default the family's native size; `is_negative_prompt` selects A1111's zeroed empty negative
        prompt and the refiner's low aesthetic score). `embeddings`: textual-inversion embeddings found by name in
        the texts (`sdcore.embeddings`; None = none). On the model's device, in its compute dtype.
        """
        cond = encode_family_conditioning(self.family, self.text_encoders, self.tokenizer, texts,
                                          clip_skip=clip_skip, emphasis=emphasis, width=width, height=height,
                                          is_negative_prompt=is_negative_prompt, embeddings=embeddings)
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
    line = m.group(1) if m else next((ln for ln in text.splitlines() if ln.strip()), "")
    # torch leaves the reason empty for a plain pickle.dump file (it is not a torch.save archive)
    return " ".join(line.split()) or f"{type(error).__name__}: not a torch.save file"


def read_pickle_object(path: Path, what: str, stand_ins: tuple[tuple[type, str], ...] = ()) -> Any:
    """The object of a torch pickle through torch's weights-only unpickler (plus PICKLE_STAND_INS and `stand_ins`,
    (class, "module.Name") pairs): memory-mapped for a zip file, read whole for a legacy non-zip pickle (torch cannot
    mmap those). A refused global or an unreadable file raises CheckpointError naming `what` and the path.
    (`torch.serialization.safe_globals` adds the stand-ins to torch's allow-list for the duration of the call.)"""
    with open(path, "rb") as f:
        is_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    try:
        with torch.serialization.safe_globals(list(PICKLE_STAND_INS + tuple(stand_ins))), warnings.catch_warnings():
            # plain pickle.dump files (protocol > 2) make torch warn before it refuses or reads them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
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


def _read_pickle(path: Path, what: str, meta: bool, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of a torch pickle (`read_pickle_object`), un-nested from "state_dict" when there is one; entries
    that are not tensors are left out."""
    obj = read_pickle_object(path, what)
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


def dtype_counts(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """{dtype name: number of floating-point tensors} of a state dict, e.g. {"float16": 1131}."""
    counts: dict[str, int] = {}
    for v in sd.values():
        if v.is_floating_point():
            name = str(v.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------------------
# eps or v


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


def resolve_prediction(detection: Detection, prediction: str | None = None, yaml_path: Path | None = None,
                       unet: torch.nn.Module | None = None) -> tuple[Family, list[str]]:
    """`detection.decide_prediction` with A1111's probe run on `unet` (`v_prediction_probe`) when it is needed.
    Raises ValueError for a prediction outside PREDICTIONS, or when the probe is needed and `unet` is None."""
    return decide_prediction(detection, prediction, yaml_path,
                             None if unet is None else (lambda: v_prediction_probe(unet)))


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


def build_module(cls, config, sd: dict[str, torch.Tensor], what: str, device, dtype, path=None,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.nn.Module:
    """Construct `cls(config)` on the meta device and load `sd` into it strictly with assign=True, then move it
    to `device` in `dtype` (whatever the file's dtype), its 4-D weights in `memory_format`."""
    with torch.device("meta"):
        module = cls(config)
    _check_keys(module, sd, what, path)
    module.load_state_dict(sd, strict=True, assign=True)
    return module.to(device=device, dtype=dtype, memory_format=memory_format).eval().requires_grad_(False)


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
    raw = open_state_dict(path, what="--vae", meta=meta)
    sd, reasons = vae_file_entries(raw, path)
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
                    prediction: str | None = None, channels_last: bool | None = None) -> StableDiffusionModel:
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
      channels_last: keep the UNet's and VAE's convolution weights channels-last (NHWC), so every activation
        between them follows (the convolution kernels pick the layout from the weight) and the transformer tokens
        need no transposing copy. None = on the CPU only, where it was measured faster (docs/performance.md);
        results equal the default layout up to float rounding. An fp32 file loaded at fp32 is otherwise used
        in place (memory-mapped); channels-last copies its convolution weights once.
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
        missing = [] if has_vae_parts(shapes) else missing_vae_parts(shapes, fam.vae)
        if missing:
            raise CheckpointError(f"--ckpt: {path}: " + "; ".join(missing) + "; a separate VAE can be given with "
                                  "--vae (vae= in load_checkpoint)")
        vae_sd, vae_path, vae_config, vae_why = sub_state_dict(sd, VAE), None, None, []
    else:
        vae_path = Path(vae)
        vae_sd, vae_config, vae_why = load_vae_file(vae_path, fam.vae, meta=meta)
    if channels_last is None:
        channels_last = device.type == "cpu"
    layout = torch.channels_last if channels_last else torch.contiguous_format
    unet = build_module(UNetModel, fam.unet, sub_state_dict(sd, UNET), "UNet", device, dtype, path, layout)
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
    vae_module = build_module(AutoencoderKL, fam.vae, vae_sd, "VAE", device, vae_dtype, vae_path or path, layout)
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
