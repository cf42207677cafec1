"""LoRA and LyCORIS networks: read the files, map their keys to sdcore's modules, merge the deltas, restore exactly.

A network file holds, per adapted module of the UNet or a text encoder, a few small tensors whose product is a
change of that module's weight, `delta W` (a1111-semantics §19). This module follows A1111 v1.10.1
`extensions-builtin/Lora` (`network.py` `NetworkModule.calc_scale` / `finalize_updown` / `apply_weight_decompose`,
`network_lora.py`, `network_hada.py`, `network_lokr.py`, `lyco_helpers.py`, `networks.py` `load_network` /
`network_apply_weights`) and the key names of kohya-ss sd-scripts `networks/lora.py` (`create_modules`) and
diffusers/PEFT (`unet.` / `text_encoder.` prefixes, `lora_A` / `lora_B`). The code is written from those facts,
not copied.

Application is a merge (`applied`): each touched weight is backed up once (a copy of that tensor only, on the CPU
as A1111 does), the deltas are added in place, and on exit every backed-up tensor is copied back, so the model is
bit-identical to never having had a network. Nothing else of the model is copied.

Glossary: O / I = output / input features (channels) of the target weight, k = conv kernel side, r = rank (the
inner dimension of the factors), W = text-encoder width, "target" = one weight tensor (or row block of one, for
q/k/v inside open_clip's fused `in_proj_weight`) of a module of `sd_model`.

Key layouts read (one small function each, all tested):
- kohya (`kohya_target`): `lora_unet_<name>` with `<name>` the diffusers module path (SD1/SD2 files) or the LDM/sgm
  path (SDXL files), dots written as `_`; `lora_te_` / `lora_te1_` (first text encoder), `lora_te2_` (SDXL bigG);
  tensors `.lora_down.weight`, `.lora_up.weight`, optional `.lora_mid.weight`, `.alpha`, `.scale`, `.dora_scale`,
  and LyCORIS's `.hada_*` / `.lokr_*` under the same names.
- diffusers / PEFT (`peft_target`): `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.` and
  `text_encoder_2.` with transformers' CLIP names; the older `.lora.down/.up`, `.processor.to_q_lora.down`
  (attention processors) and `.lora_linear_layer.down` forms; `lora_alpha` from diffusers' `lora_adapter_metadata`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint import open_state_dict
from .models.unet import Downsample, ResBlock, SpatialTransformer, Upsample

if TYPE_CHECKING:
    from .checkpoint import StableDiffusionModel

NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # A1111 `list_available_networks` globs these
UNET = "unet"
KINDS = ("lora", "loha", "lokr")

# Tensor names (the part after the module key) of each supported kind, as A1111 stores them in `NetworkWeights.w`.
LORA_PARTS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
SCALAR_PARTS = ("alpha", "scale")
KNOWN_PARTS = LORA_PARTS + LOHA_PARTS + LOKR_PARTS + SCALAR_PARTS + ("dora_scale",)
# Parts of network types A1111 has but sdcore does not apply: named in the error instead of "unknown key".
UNSUPPORTED_PARTS = {
    "diff": "full weight difference (A1111 network_full.py)", "diff_b": "full bias difference (network_full.py)",
    "w_norm": "norm-layer network (network_norm.py)", "b_norm": "norm-layer network (network_norm.py)",
    "oft_blocks": "OFT (network_oft.py)", "oft_diag": "OFT (network_oft.py)", "weight": "IA3 (network_ia3.py)",
    "on_input": "IA3 (network_ia3.py)", "a1.weight": "GLoRA (network_glora.py)", "a2.weight": "GLoRA",
    "b1.weight": "GLoRA", "b2.weight": "GLoRA", "bias": "LyCORIS weight bias (network.py finalize_updown)",
    "dyn_up": "DyLoRA dyn_up/dyn_down", "dyn_down": "DyLoRA dyn_up/dyn_down",
    "lora_magnitude_vector": "PEFT DoRA (per-output magnitude; A1111 reads only kohya/LyCORIS dora_scale)",
}

# ResBlock children (LDM names) -> diffusers ResnetBlock2D names (diffusers `convert_ldm_unet_checkpoint`).
RESNET_TO_DIFFUSERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                       "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
UNET_TOP_TO_DIFFUSERS = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
                         "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
                         "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}
# transformers CLIP layer part -> (open_clip module under transformer.resblocks.N, parameter, q/k/v block index)
TEXT_PARTS = {"self_attn.q_proj": ("attn", "in_proj_weight", 0), "self_attn.k_proj": ("attn", "in_proj_weight", 1),
              "self_attn.v_proj": ("attn", "in_proj_weight", 2), "self_attn.out_proj": ("attn.out_proj", "weight", None),
              "mlp.fc1": ("mlp.c_fc", "weight", None), "mlp.fc2": ("mlp.c_proj", "weight", None)}
_HF_TEXT_MODULE = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|"
                             r"mlp\.fc1|mlp\.fc2)$")
_KOHYA_TEXT_MODULE = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|"
                                r"mlp_fc1|mlp_fc2)$")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PEFT_PREFIXES = {"unet": UNET, "text_encoder": 0, "text_encoder_2": 1}
# diffusers/PEFT tensor-name endings -> A1111's part names.
PEFT_PART_SUFFIXES = ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
                      (".lora.down.weight", "lora_down.weight"), (".lora.up.weight", "lora_up.weight"),
                      (".lora_linear_layer.down.weight", "lora_down.weight"),
                      (".lora_linear_layer.up.weight", "lora_up.weight"), (".alpha", "alpha"),
                      (".lora_magnitude_vector", "lora_magnitude_vector"),
                      (".lora_magnitude_vector.weight", "lora_magnitude_vector"))
# diffusers attention-processor form: <attn>.processor.to_q_lora.down.weight
_PEFT_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers `lora_base.LORA_ADAPTER_METADATA_KEY`
SHORTHASH_DIGITS = 12  # A1111 network.py `NetworkOnDisk.set_hash`: shorthash = hash[0:12]


class NetworkError(ValueError):
    """A network file that cannot be read, mapped onto the model or applied; the message names the file."""


# ---------------------------------------------------------------------------------------------------------------
# Targets and the model's names


@dataclass(frozen=True)
class Target:
    """One weight of `sd_model` that a network module changes.

    component: "unet" or "text_encoders.N" (index into `sd_model.text_encoders`, family order).
    module: the sdcore module path inside that component (LDM / open_clip names), e.g.
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q" or "transformer.resblocks.0.attn".
    param: the parameter's attribute name ("weight", or "in_proj_weight" for open_clip's fused q/k/v).
    shape: the full parameter's shape.
    rows: (start, stop) row block of the parameter the delta applies to (q, k or v inside in_proj_weight
        [3W, W]: (0, W), (W, 2W), (2W, 3W)), or None for the whole parameter.
    """

    component: str
    module: str
    param: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the part of the parameter the delta has: `shape` with `rows` applied."""
        if self.rows is None:
            return self.shape
        return (self.rows[1] - self.rows[0],) + self.shape[1:]

    @property
    def is_text(self) -> bool:
        return self.component != UNET

    def describe(self) -> str:
        rows = f"[{self.rows[0]}:{self.rows[1]}]" if self.rows else ""
        return f"{self.component}:{self.module}.{self.param}{rows}"


def _weight_modules(root: nn.Module) -> dict[str, tuple[int, ...]]:
    """Module path -> weight shape, for every module of `root` that owns a parameter named `weight`."""
    return {name: tuple(m._parameters["weight"].shape) for name, m in root.named_modules()
            if m._parameters.get("weight") is not None}


def unet_diffusers_names(unet: nn.Module) -> dict[str, str]:
    """diffusers `UNet2DConditionModel` module path -> sdcore (LDM) module path, for every module with a weight.

    Read off the block structure of `unet` (sdcore `UNetModel`), so it holds for any `num_res_blocks` and level
    layout (A1111's `convert_diffusers_name_to_compvis` writes the SD1 numbers 3 and 1 + 3i into its regexes, which
    fit only 2 ResBlocks per level). With p = num_res_blocks + 1 blocks per level:
      input_blocks.n (n >= 1): level i = (n-1) // p, j = (n-1) % p; child ResBlock -> down_blocks.i.resnets.j,
        SpatialTransformer -> down_blocks.i.attentions.j, Downsample (j = p-1) -> down_blocks.i.downsamplers.0;
      middle_block.0 / .1 / .2 -> mid_block.resnets.0 / attentions.0 / resnets.1;
      output_blocks.n: i = n // p, j = n % p; ResBlock -> up_blocks.i.resnets.j, SpatialTransformer ->
        up_blocks.i.attentions.j, Upsample -> up_blocks.i.upsamplers.0;
    inside a ResBlock `RESNET_TO_DIFFUSERS` renames (in_layers.2 -> conv1, ...), inside a SpatialTransformer the names
    are the same, Downsample `op` and Upsample `conv` -> `conv`; the rest is `UNET_TOP_TO_DIFFUSERS`.
    Example (SD1, p = 3): down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in;
    up_blocks.0.upsamplers.0.conv -> output_blocks.2.1.conv; mid_block.resnets.1.conv2 -> middle_block.2.out_layers.3.
    """
    per = unet.config.num_res_blocks + 1
    weights = _weight_modules(unet)
    out = {}

    def add_block(ldm: str, diffusers: str, child: nn.Module) -> None:
        for sub in _weight_modules(child):
            if isinstance(child, ResBlock):
                name = RESNET_TO_DIFFUSERS[sub]
            elif isinstance(child, (Downsample, Upsample)):
                name = "conv"
            else:
                name = sub
            out[f"{diffusers}.{name}"] = f"{ldm}.{sub}"

    def kind(child: nn.Module, j: int) -> str:
        if isinstance(child, ResBlock):
            return f"resnets.{j}"
        if isinstance(child, SpatialTransformer):
            return f"attentions.{j}"
        return "downsamplers.0" if isinstance(child, Downsample) else "upsamplers.0"

    for n, block in enumerate(unet.input_blocks):
        if n:
            for c, child in enumerate(block):
                add_block(f"input_blocks.{n}.{c}", f"down_blocks.{(n - 1) // per}.{kind(child, (n - 1) % per)}", child)
    for c, name in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        add_block(f"middle_block.{c}", f"mid_block.{name}", unet.middle_block[c])
    for n, block in enumerate(unet.output_blocks):
        for c, child in enumerate(block):
            add_block(f"output_blocks.{n}.{c}", f"up_blocks.{n // per}.{kind(child, n % per)}", child)
    out.update({diffusers: ldm for ldm, diffusers in UNET_TOP_TO_DIFFUSERS.items() if ldm in weights})
    return out


@dataclass(frozen=True)
class ModelNames:
    """The names a network key can resolve to on one model (built by `model_names`).

    unet: sdcore UNet module path -> weight shape. unet_by_underscore: kohya spelling (dots as `_`) of both the
    LDM and the diffusers path -> LDM path. unet_by_diffusers: diffusers dotted path -> LDM path.
    text: per text encoder (family order), parameter path -> shape
    ("transformer.resblocks.0.attn.in_proj_weight" -> (3W, W)).
    """

    family: str
    unet: dict[str, tuple[int, ...]]
    unet_by_underscore: dict[str, str]
    unet_by_diffusers: dict[str, str]
    text: tuple[dict[str, tuple[int, ...]], ...]


def model_names(sd_model: StableDiffusionModel) -> ModelNames:
    """The `ModelNames` of `sd_model` (module names only; no weight is read). Raises NetworkError if two module
    paths would have the same kohya spelling (cannot happen with sdcore's UNet; checked so a lookup is never
    ambiguous)."""
    unet = _weight_modules(sd_model.unet)
    by_diffusers = unet_diffusers_names(sd_model.unet)
    by_underscore: dict[str, str] = {}
    for spelling, ldm in [(k, k) for k in unet] + list(by_diffusers.items()):
        key = spelling.replace(".", "_")
        if by_underscore.setdefault(key, ldm) != ldm:
            raise NetworkError(f"model_names: {key!r} spells both {by_underscore[key]!r} and {ldm!r}")
    return ModelNames(family=sd_model.family.name, unet=unet, unet_by_underscore=by_underscore,
                      unet_by_diffusers=by_diffusers,
                      text=tuple({k: tuple(v.shape) for k, v in t.named_parameters()} for t in sd_model.text_encoders))


def _unet_target(names: ModelNames, ldm: str) -> Target:
    return Target(UNET, ldm, "weight", names.unet[ldm])


def text_target(names: ModelNames, index: int, layer: int, part: str) -> Target | None:
    """Target of transformers CLIP layer `layer`'s `part` ("self_attn.q_proj", "mlp.fc1", ... `TEXT_PARTS`) in
    text encoder `index`, or None when the model has no such encoder or layer.

    sdcore's text encoders have open_clip's names: fc1 -> mlp.c_fc, fc2 -> mlp.c_proj, out_proj -> attn.out_proj,
    and q / k / v are row blocks 0 / 1 / 2 of `attn.in_proj_weight` [3W, W] (transformers concatenates them in that
    order; `sdcore.models.text.hf_to_open_clip`). Example, W = 768: layer 3 k_proj -> rows 768:1536 of
    transformer.resblocks.3.attn.in_proj_weight.
    """
    module, param, block = TEXT_PARTS[part]
    path = f"transformer.resblocks.{layer}.{module}"
    shape = names.text[index].get(f"{path}.{param}") if index < len(names.text) else None
    if shape is None:
        return None
    if block is None:
        return Target(f"text_encoders.{index}", path, param, shape)
    width = shape[0] // 3
    return Target(f"text_encoders.{index}", path, param, shape, (block * width, (block + 1) * width))


def kohya_target(module_key: str, names: ModelNames) -> Target | None:
    """The target of a kohya module key (the key up to its first dot), or None if it names nothing on this model.

    kohya sd-scripts `networks/lora.py` `create_modules` writes `lora_name = prefix + "." + module path`, dots
    replaced by `_`, with prefix `lora_unet` (UNet), `lora_te` (SD1/SD2 text encoder), `lora_te1` / `lora_te2`
    (SDXL CLIP-L / bigG). SD1/SD2 files spell the UNet path in diffusers' names (kohya trains on diffusers'
    UNet), SDXL files in sgm's LDM names (kohya's own SDXL UNet); both are looked up here (`unet_diffusers_names`).
    As in A1111 `networks.load_network`, `lora_te1_` also names the only text encoder of a one-encoder model.
    Examples: lora_unet_down_blocks_0_attentions_1_proj_in -> unet input_blocks.2.1.proj_in (SD1);
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k -> unet input_blocks.4.1....attn2.to_k (SDXL);
    lora_te2_text_model_encoder_layers_5_mlp_fc2 -> text_encoders.1 transformer.resblocks.5.mlp.c_proj.
    """
    if module_key.startswith("lora_unet_"):
        ldm = names.unet_by_underscore.get(module_key[len("lora_unet_"):])
        return None if ldm is None else _unet_target(names, ldm)
    for prefix, index in (("lora_te_", 0), ("lora_te1_", 0), ("lora_te2_", 1)):
        if module_key.startswith(prefix):
            if prefix == "lora_te_" and len(names.text) > 1:
                return None  # SDXL files name their encoders te1 / te2 (A1111 maps lora_te_ to SD1/SD2 only)
            if prefix == "lora_te2_" and len(names.text) < 2:
                return None
            m = _KOHYA_TEXT_MODULE.match(module_key[len(prefix):])
            if m is None:
                return None
            part = m[2].replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            return text_target(names, index, int(m[1]), part)
    return None


def peft_target(component: str, module_path: str, names: ModelNames) -> Target | None:
    """The target of a diffusers/PEFT module path under `component` ("unet", "text_encoder", "text_encoder_2"),
    or None. UNet paths are diffusers' `UNet2DConditionModel` names (`unet_diffusers_names`), text paths
    transformers' `CLIPTextModel` names (`text_model.encoder.layers.N.self_attn.q_proj`, ...; `text_target`).
    Example: ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2") -> unet middle_block.1.transformer_blocks
    .0.ff.net.2.
    """
    if component not in PEFT_PREFIXES:
        return None
    if PEFT_PREFIXES[component] == UNET:
        ldm = names.unet_by_diffusers.get(module_path)
        return None if ldm is None else _unet_target(names, ldm)
    m = _HF_TEXT_MODULE.match(module_path)
    return None if m is None else text_target(names, PEFT_PREFIXES[component], int(m[1]), m[2])


def split_kohya_key(key: str) -> tuple[str, str]:
    """(module key, part): split at the first dot, as A1111 `load_network` does (`key.partition(".")`).
    Example: "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight" -> (..._proj_in, "lora_down.weight")."""
    module, _, part = key.partition(".")
    return module, part


def split_peft_key(key: str) -> tuple[str, str, str] | None:
    """(component, module path, part) of a diffusers/PEFT key, parts renamed to A1111's (`lora_A.weight` ->
    `lora_down.weight`, `lora_B.weight` -> `lora_up.weight`), or None if `key` is not in that layout.

    Forms: `unet.<path>.lora_A.weight` (PEFT, diffusers >= 0.24), `unet.<path>.lora.down.weight` (diffusers
    `LoRACompatibleLinear`), `unet.<attn>.processor.to_q_lora.down.weight` (diffusers attention processors,
    `to_out_lora` -> `to_out.0`), `text_encoder.<path>.lora_linear_layer.down.weight`, `<path>.alpha`; a key
    starting with `down_blocks.` / `mid_block.` / `up_blocks.` (attention processors saved without prefix) is a
    UNet key. Example: "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight" ->
    ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1", "lora_up.weight").
    """
    component, _, rest = key.partition(".")
    if component not in PEFT_PREFIXES:
        if not key.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
            return None
        component, rest = "unet", key
    m = _PEFT_PROCESSOR.match(rest)
    if m:
        return component, f"{m[1]}.{'to_out.0' if m[2] == 'to_out' else m[2]}", f"lora_{m[3]}.weight"
    for suffix, part in PEFT_PART_SUFFIXES:
        if rest.endswith(suffix):
            return component, rest[: -len(suffix)], part
    return None


# ---------------------------------------------------------------------------------------------------------------
# Loaded networks


@dataclass
class NetworkModule:
    """The tensors of one network module and what they change.

    key: the module's key as written in the file (kohya "lora_unet_..._to_q"; PEFT "unet.<path>").
    kind: "lora" (incl. LoCon and LoRA with a CP `lora_mid`), "loha" or "lokr".
    tensors: the file's tensors by A1111 part name ("lora_up.weight", "hada_w1_a", ...), dtype as stored.
    alpha: the `alpha` value (None if absent); scale: the `scale` value (None if absent); dim: the rank A1111
        divides alpha by (LoRA: lora_down rows; LoHa: hada_w1_b rows; LoKr: rows of lokr_w2_b, else lokr_w1_b,
        else None); dora_scale: per-input-channel magnitudes [1, I, 1...] (kohya/LyCORIS DoRA) or None.
    """

    key: str
    target: Target
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    scale: float | None = None
    dim: int | None = None
    dora_scale: torch.Tensor | None = None

    def calc_scale(self) -> float:
        """A1111 `NetworkModule.calc_scale`: the `scale` tensor when the file has one (it replaces alpha/rank),
        else alpha / dim when both are known, else 1.0. Example: alpha 8, rank 16 -> 0.5; alpha missing -> 1.0
        (the same as alpha = rank, kohya's convention for files without alpha)."""
        if self.scale is not None:
            return self.scale
        if self.alpha is not None and self.dim is not None:
            return self.alpha / self.dim
        return 1.0


@dataclass
class Network:
    """One loaded LoRA / LyCORIS file, mapped onto one model's module names (`load_network`).

    name: the file stem (A1111 names networks by `os.path.splitext(basename)[0]`); path: the file.
    modules: module key (as in the file) -> NetworkModule, in file order.
    layouts: the key layouts found ("kohya", "peft"). family: the model family it was mapped onto.
    metadata: the safetensors header metadata (strings; {} for pickles).
    bundle_embeddings: textual-inversion embeddings carried in the file (`bundle_emb.<name>.<part>` keys, A1111
        `load_network`), name -> {part: tensor}; not applied here (they are prompt embeddings).
    """

    name: str
    path: Path
    modules: dict[str, NetworkModule]
    layouts: tuple[str, ...] = ()
    family: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    bundle_embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)

    def sha256(self) -> str:
        """A1111's hash of the file (`NetworkOnDisk`): `sshs_model_hash` from the safetensors metadata when present
        (kohya writes it at training time), else for `.safetensors` the "addnet" hash (`addnet_hash_safetensors`)
        and for pickles the sha256 of the whole file. 64 hex digits, computed once."""
        if "sha256" not in self._hashes:
            self._hashes["sha256"] = (self.metadata.get("sshs_model_hash") or
                                      (addnet_hash(self.path) if self.path.suffix.lower() == ".safetensors"
                                       else file_sha256(self.path)))
        return self._hashes["sha256"]

    def shorthash(self) -> str:
        """A1111's "Lora hashes" value for this file: the first 12 hex digits of `sha256()`."""
        return self.sha256()[:SHORTHASH_DIGITS]

    def targets(self) -> list[Target]:
        """The weights this network changes, in file order (q/k/v of one attention are three row blocks)."""
        return [m.target for m in self.modules.values()]


def addnet_hash(path: str | Path) -> str:
    """sha256 (hex) of a .safetensors file's tensor data: every byte after the 8-byte little-endian header length N
    and the N header bytes (A1111 `modules/hashes.py` `addnet_hash_safetensors`, from kohya sd-scripts
    `train_util.addnet_hash_safetensors`). Changing only the metadata leaves it unchanged. Raises NetworkError when
    the file is shorter than its header claims."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        size = path.stat().st_size
        if n + 8 > size:
            raise NetworkError(f"lora {path}: header length {n} exceeds the file size {size}")
        f.seek(n + 8)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of the whole file (A1111 `hashes.calculate_sha256`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def _peft_alphas(metadata: dict[str, str], path: Path) -> dict[str, tuple[float, bool]]:
    """component -> (lora_alpha, use_rslora) from diffusers' `lora_adapter_metadata` (a JSON of PEFT `LoraConfig`
    fields with "unet." / "text_encoder." / "text_encoder_2." prefixes). PEFT scales by lora_alpha / r
    (lora_alpha / sqrt(r) with use_rslora). Raises NetworkError for settings sdcore does not apply: a non-empty
    alpha_pattern (per-module alphas) or use_dora."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise NetworkError(f"lora {path}: metadata {LORA_ADAPTER_METADATA_KEY} is not JSON ({e})") from e
    out = {}
    for component in PEFT_PREFIXES:
        if f"{component}.lora_alpha" not in config:
            continue
        if config.get(f"{component}.alpha_pattern"):
            raise NetworkError(f"lora {path}: {component}.alpha_pattern (per-module PEFT alphas) is not supported")
        if config.get(f"{component}.use_dora"):
            raise NetworkError(f"lora {path}: {component}.use_dora (PEFT DoRA) is not supported; A1111 applies "
                               "only kohya/LyCORIS dora_scale")
        out[component] = (float(config[f"{component}.lora_alpha"]), bool(config.get(f"{component}.use_rslora")))
    return out


def _kind(parts: dict[str, torch.Tensor]) -> str | None:
    """"lora", "loha" or "lokr" from the parts present (A1111 `ModuleType*.create_module` tests), else None."""
    if "lora_up.weight" in parts and "lora_down.weight" in parts:
        return "lora"
    if all(p in parts for p in LOHA_PARTS[:4]):
        return "loha"
    has1 = "lokr_w1" in parts or ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
    has2 = "lokr_w2" in parts or ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
    return "lokr" if has1 and has2 else None


def _kind_dim(kind: str, parts: dict[str, torch.Tensor]) -> int | None:
    """The rank A1111 divides alpha by (network_lora / network_hada / network_lokr `self.dim`)."""
    if kind == "lora":
        return parts["lora_down.weight"].shape[0]
    if kind == "loha":
        return parts["hada_w1_b"].shape[0]
    dim = parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else None
    return parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else dim


def _scalar(value: torch.Tensor, what: str) -> float:
    if value.numel() != 1:
        raise NetworkError(f"{what} has shape {tuple(value.shape)}; expected one number")
    return float(value.reshape(()).item())


def _make_module(key: str, target: Target, parts: dict[str, torch.Tensor], peft_alpha) -> NetworkModule:
    """A NetworkModule from its parts; raises NetworkError (without the file name) for an incomplete or unknown
    set of parts."""
    unsupported = sorted({UNSUPPORTED_PARTS[p] for p in parts if p in UNSUPPORTED_PARTS})
    if unsupported:
        raise NetworkError(f"{key}: unsupported network type: {', '.join(unsupported)}; sdcore applies LoRA, "
                           "LoCon, LoHa, LoKr and kohya/LyCORIS DoRA")
    unknown = sorted(p for p in parts if p not in KNOWN_PARTS)
    if unknown:
        raise NetworkError(f"{key}: unknown tensor names {unknown}")
    kind = _kind(parts)
    if kind is None:
        raise NetworkError(f"{key}: incomplete module, has only {sorted(parts)}; needs lora_up.weight + "
                           "lora_down.weight, hada_w1_a/b + hada_w2_a/b, or lokr_w1[_a/_b] + lokr_w2[_a/_b]")
    kind_parts = {"lora": LORA_PARTS, "loha": LOHA_PARTS, "lokr": LOKR_PARTS}[kind]
    mixed = sorted(p for p in parts if p not in kind_parts + SCALAR_PARTS + ("dora_scale",))
    if mixed:
        raise NetworkError(f"{key}: {kind} module also has {mixed}")
    module = NetworkModule(key, target, kind, {p: t for p, t in parts.items() if p in kind_parts},
                           dim=_kind_dim(kind, parts), dora_scale=parts.get("dora_scale"))
    if "alpha" in parts:
        module.alpha = _scalar(parts["alpha"], f"{key}.alpha")
    elif peft_alpha is not None:
        alpha, rslora = peft_alpha
        # PEFT rsLoRA scales by alpha / sqrt(r): the same as alpha' / r with alpha' = alpha * sqrt(r).
        module.alpha = alpha * math.sqrt(module.dim) if rslora else alpha
    if "scale" in parts:
        module.scale = _scalar(parts["scale"], f"{key}.scale")
    return module


def _group_keys(sd: dict[str, torch.Tensor], names: ModelNames, metadata: dict[str, str], path: Path):
    """Group the file's tensors by module: (modules, bundle embeddings, layouts, unmapped keys)."""
    groups: dict[str, tuple[Target, dict[str, torch.Tensor], tuple | None]] = {}
    bundle: dict[str, dict[str, torch.Tensor]] = {}
    layouts: set[str] = set()
    unmapped: list[str] = []
    peft_alphas = None
    for key, tensor in sd.items():
        if key.startswith("bundle_emb."):
            pieces = key.split(".", 2)  # bundle_emb.<embedding name>.<its tensor name>
            bundle.setdefault(pieces[1], {})[pieces[2] if len(pieces) > 2 else ""] = tensor
            continue
        if key.startswith(KOHYA_PREFIXES):
            module_key, part = split_kohya_key(key)
            target, layout, alpha = kohya_target(module_key, names), "kohya", None
        else:
            split = split_peft_key(key)
            if split is None:
                unmapped.append(key)
                continue
            component, path_in, part = split
            module_key, layout = f"{component}.{path_in}", "peft"
            target = peft_target(component, path_in, names)
            if peft_alphas is None:
                peft_alphas = _peft_alphas(metadata, path)
            alpha = peft_alphas.get(component)
        if target is None:
            unmapped.append(key)
            continue
        layouts.add(layout)
        groups.setdefault(module_key, (target, {}, alpha))[1][part] = tensor
    return groups, bundle, tuple(sorted(layouts)), unmapped


def _show(items: list[str], limit: int = 12) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def load_network(path: str | Path, sd_model: StableDiffusionModel) -> Network:
    """Read a LoRA / LyCORIS file and map every key onto `sd_model`'s modules.

    Args:
      path: `.safetensors` (read with safetensors) or `.pt` / `.ckpt` (torch's weights-only unpickler via
        `sdcore.checkpoint.open_state_dict`: nothing in the file is executed).
      sd_model: the model the network will be applied to (its module names and shapes are read, not its weights).
    Returns a Network named after the file stem; its tensors keep the file's dtype (float32/16, bfloat16).
    Raises NetworkError (a ValueError whose message names the file) for: an unreadable file or one
    without tensors; non-finite values (tensors listed); keys that map to no module of this model (listed: A1111
    logs "Failed to match keys" and skips them, sdcore refuses); module tensor sets that are incomplete, mixed or of
    an unsupported network type (full diff, IA3, OFT, GLoRA, norm, PEFT DoRA: named); two keys changing the same
    weight; factors whose delta does not fit the target weight's shape (both shapes named); a malformed dora_scale.
    """
    path = Path(path)
    if path.suffix.lower() not in NETWORK_SUFFIXES:
        raise NetworkError(f"lora {path}: extension {path.suffix!r}; allowed: {', '.join(NETWORK_SUFFIXES)}")
    try:
        sd = open_state_dict(path, what="lora")
    except ValueError as e:
        raise NetworkError(str(e)) from e
    metadata = _safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NetworkError(f"lora {path}: non-finite values (inf or nan) in {_show(sorted(bad))}")
    names = model_names(sd_model)
    groups, bundle, layouts, unmapped = _group_keys(sd, names, metadata, path)
    if unmapped:
        raise NetworkError(f"lora {path}: {len(unmapped)} keys map to no module of this {names.family} model "
                           f"(layouts read: kohya lora_unet_/lora_te*_, diffusers/PEFT unet./text_encoder*.): "
                           f"{_show(unmapped)}")
    modules: dict[str, NetworkModule] = {}
    problems: list[str] = []
    seen: dict[Target, str] = {}
    for key, (target, parts, alpha) in groups.items():
        try:
            module = _make_module(key, target, parts, alpha)
            _check_fits(module)
        except NetworkError as e:
            problems.append(str(e))
            continue
        if target in seen:
            problems.append(f"{key} and {seen[target]} both change {target.describe()}")
            continue
        seen[target] = key
        modules[key] = module
    if problems:
        raise NetworkError(f"lora {path}: " + "; ".join(problems[:8])
                           + (f"; ... ({len(problems)} problems in all)" if len(problems) > 8 else ""))
    if not modules and not bundle:
        raise NetworkError(f"lora {path}: no network modules found")
    return Network(name=path.stem, path=path, modules=modules, layouts=layouts, family=names.family,
                   metadata=metadata, bundle_embeddings=bundle)


def _check_fits(module: NetworkModule) -> None:
    """Compute the delta on the meta device (shapes only, no arithmetic) to check that the factors fit the target;
    raises NetworkError naming the module, the factor shapes and the target shape."""
    weight = torch.empty(module.target.weight_shape, device="meta")
    try:
        network_delta(module, weight)
    except NetworkError:
        raise
    except RuntimeError as e:
        shapes = {p: tuple(t.shape) for p, t in module.tensors.items()}
        raise NetworkError(f"{module.key}: factors {shapes} do not combine ({' '.join(str(e).split())[:160]})") from e


# ---------------------------------------------------------------------------------------------------------------
# Delta weights


def make_weight_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker/CP rebuild of LyCORIS (A1111 `lyco_helpers.make_weight_cp`): t [Ra, Rb, k, k], wa [Ra, O],
    wb [Rb, I] -> W [O, I, k, k] with W[o, i] = sum_ab wa[a, o] t[a, b] wb[b, i]."""
    return torch.einsum("abkl,ao,bi->oikl", t, wa, wb)


def rebuild_conventional(up: torch.Tensor, down: torch.Tensor, shape: Sequence[int],
                         dyn_dim: int | None = None) -> torch.Tensor:
    """`up` [O, r, ...] times `down` [r, I, ...] flattened to matrices, reshaped to `shape` (A1111
    `lyco_helpers.rebuild_conventional`); `dyn_dim` keeps only the first dyn_dim ranks (A1111's `dyn` argument)."""
    up = up.reshape(up.shape[0], -1)
    down = down.reshape(down.shape[0], -1)
    if dyn_dim is not None:
        up, down = up[:, :dyn_dim], down[:dyn_dim]
    return (up @ down).reshape(shape)


def _factors(module: NetworkModule, device, dtype) -> dict[str, torch.Tensor]:
    return {p: t.to(device=device, dtype=dtype) for p, t in module.tensors.items()}


def lora_updown(module: NetworkModule, device, dtype, dyn_dim: int | None = None,
                coefficient: float = 1.0) -> torch.Tensor:
    """LoRA delta (A1111 `NetworkModuleLora.calc_updown`) times `coefficient`: up @ down, with down [r, I] (linear)
    or [r, I, k, k] (conv; up is [O, r, 1, 1]) -> [O, I] or [O, I, k, k]; with a CP `lora_mid` [r, r, k, k]
    (LyCORIS LoCon use_cp) -> einsum(mid, up, down). A linear-shaped delta onto a 1x1 conv (or back) is reshaped
    later. The coefficient multiplies the small `up` factor, not the [O, I...] product."""
    f = _factors(module, device, dtype)
    up, down = f["lora_up.weight"] * coefficient, f["lora_down.weight"]
    if "lora_mid.weight" in f:
        mid = f["lora_mid.weight"]
        up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        return torch.einsum("nmkl,in,mj->ijkl", mid, up, down)
    shape = [up.shape[0], down.shape[1]] + list(down.shape[2:])
    return rebuild_conventional(up, down, shape, dyn_dim)


def loha_updown(module: NetworkModule, device, dtype, coefficient: float = 1.0) -> torch.Tensor:
    """LoHa delta (A1111 `NetworkModuleHada.calc_updown`, LyCORIS `loha.py`) times `coefficient` (applied to
    w1_a): the Hadamard (elementwise) product (w1_a @ w1_b) * (w2_a @ w2_b), each factor [O, r] @ [r, I...]; with
    `hada_t1` / `hada_t2` each product is the CP rebuild `make_weight_cp(t, w_a, w_b)` instead (then w_a is [r, O])."""
    f = _factors(module, device, dtype)
    w1a, w1b, w2a, w2b = f["hada_w1_a"] * coefficient, f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"]
    shape = [w1a.shape[0], w1b.shape[1]]
    if "hada_t1" in f:
        shape = [w1a.shape[1], w1b.shape[1]] + list(f["hada_t1"].shape[2:])
        first = make_weight_cp(f["hada_t1"], w1a, w1b)
    else:
        shape += list(w1b.shape[2:])
        first = rebuild_conventional(w1a, w1b, shape)
    second = (make_weight_cp(f["hada_t2"], w2a, w2b) if "hada_t2" in f else rebuild_conventional(w2a, w2b, shape))
    return first * second


def lokr_updown(module: NetworkModule, device, dtype, coefficient: float = 1.0) -> torch.Tensor:
    """LoKr delta (times `coefficient`, applied to w1) (A1111 `NetworkModuleLokr.calc_updown`, LyCORIS `lokr.py`): the Kronecker product
    w1 (x) w2 with w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b [a, b], w2 = lokr_w2 or lokr_w2_a @ lokr_w2_b [c, d] or
    `make_weight_cp(lokr_t2, w2_a, w2_b)` [c, d, k, k]; a 4-D w2 takes w1 as [a, b, 1, 1]. Result [a*c, b*d(, k, k)]:
    entry (i*c + p, j*d + q) = w1[i, j] * w2[p, q]."""
    f = _factors(module, device, dtype)
    w1 = (f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]) * coefficient
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = make_weight_cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


def apply_weight_decompose(updown: torch.Tensor, weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA as A1111 applies it (`NetworkModule.apply_weight_decompose`): with W' = W + updown, each input column
    of W' (W'[:, i] over outputs and kernel positions) is rescaled to the length dora_scale[i]; returns W'' - W.
    `dora_scale` has I entries (shape [1, I] or [1, I, 1, 1], kohya/LyCORIS convention); raises NetworkError
    otherwise (A1111 would broadcast a per-output [O, 1] vector against the column norms without a word)."""
    columns = weight.shape[1]
    if dora_scale.numel() != columns or dora_scale.shape[0] != 1:
        raise NetworkError(f"dora_scale of shape {tuple(dora_scale.shape)}; expected [1, {columns}(, 1, 1)], one "
                           f"magnitude per input channel of the weight {tuple(weight.shape)}")
    merged = weight + updown
    # norm of each input column: (O, I, ...) -> (I, O*...) -> (I,) -> broadcast as (1, I, 1...)
    norm = merged.transpose(0, 1).reshape(columns, -1).norm(dim=1).reshape(1, columns, *[1] * (weight.ndim - 2))
    scale = dora_scale.to(device=weight.device, dtype=weight.dtype).reshape(1, columns, *[1] * (weight.ndim - 2))
    return merged * (scale / norm) - weight


def fit_to_weight(updown: torch.Tensor, shape: Sequence[int], what: str = "delta") -> tuple[torch.Tensor, int]:
    """(delta reshaped to `shape`, number of zero input channels to append). The delta fits when it has as many
    entries as the weight (A1111 `finalize_updown` reshapes then: a linear [O, I] LoRA onto a 1x1 conv [O, I, 1, 1]
    and back), or when the weight is a conv with 9 input channels and the delta has 4 (a LoRA for a 4-channel
    model onto an inpainting UNet's input_blocks.0.0: A1111 `network_apply_weights` zero-pads channels 4..8, the
    mask and masked-image latent, so the delta acts on the noisy latent only). Raises NetworkError otherwise."""
    shape = tuple(shape)
    if updown.numel() == math.prod(shape):
        return updown.reshape(shape), 0
    if len(shape) == 4 and shape[1] == 9 and updown.ndim == 4 and updown.shape[1] == 4 \
            and (updown.shape[0],) + tuple(updown.shape[2:]) == (shape[0],) + shape[2:]:
        return updown, 5
    raise NetworkError(f"{what}: delta of shape {tuple(updown.shape)} does not fit the weight {shape}")


def network_delta(module: NetworkModule, weight: torch.Tensor, multiplier: float = 1.0,
                  dyn_dim: int | None = None) -> torch.Tensor:
    """The change this module makes to `weight`: what `applied` adds to it.

    delta = multiplier * f(scale * updown), with updown from `lora_updown` / `loha_updown` / `lokr_updown`, scale =
    `module.calc_scale()` (alpha / rank), f the identity, or with a dora_scale `apply_weight_decompose` against
    `weight` (A1111 `finalize_updown`: scale first, then DoRA, then the multiplier). Worked example (LoRA, rank 4,
    alpha 2, multiplier 0.8): delta = 0.8 * 0.5 * up @ down.

    Args:
      module: a NetworkModule of a loaded Network.
      weight: the current target weight (`module.target.weight_shape`; the q/k/v row block for text attention), any
        device; only its shape, device and dtype are used, and its values for DoRA.
      multiplier: the te or unet weight of the prompt's `<lora:name:te:unet>`.
      dyn_dim: keep only the first dyn_dim ranks of a plain LoRA (A1111's `dyn`); None keeps all.
    Returns the delta with `weight`'s shape, on its device, in float32 (float64 if weight is float64); for a
    4-channel delta onto a 9-channel conv, input channels 4..8 are zero (`fit_to_weight`).
    Raises NetworkError when the delta does not fit the weight or the dora_scale is malformed.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    device = weight.device
    dora = module.dora_scale is not None
    # Without DoRA the delta is linear in scale and multiplier: fold both into a small factor.
    coefficient = 1.0 if dora else module.calc_scale() * multiplier
    if module.kind == "lora":
        updown = lora_updown(module, device, dtype, dyn_dim, coefficient)
    elif module.kind == "loha":
        updown = loha_updown(module, device, dtype, coefficient)
    else:
        updown = lokr_updown(module, device, dtype, coefficient)
    updown, pad = fit_to_weight(updown, weight.shape, module.key)
    if dora:
        if pad:
            raise NetworkError(f"{module.key}: DoRA onto a 9-channel input conv (A1111 fails here too)")
        updown = apply_weight_decompose(updown * module.calc_scale(), weight.to(dtype), module.dora_scale)
        updown = updown * multiplier
    if pad:
        updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, pad))
    return updown


# ---------------------------------------------------------------------------------------------------------------
# Merge and restore


def component_module(sd_model: StableDiffusionModel, component: str) -> nn.Module:
    """`sd_model.unet` for "unet", `sd_model.text_encoders[N]` for "text_encoders.N"; NetworkError otherwise."""
    if component == UNET:
        return sd_model.unet
    m = re.fullmatch(r"text_encoders\.(\d+)", component)
    if m is None or int(m[1]) >= len(sd_model.text_encoders):
        raise NetworkError(f"component {component!r} is not part of this {sd_model.family.name} model")
    return sd_model.text_encoders[int(m[1])]


def target_parameter(sd_model: StableDiffusionModel, target: Target) -> torch.Tensor:
    """The parameter tensor a Target names; NetworkError if the model has none of that shape."""
    try:
        param = getattr(component_module(sd_model, target.component).get_submodule(target.module), target.param)
    except AttributeError as e:
        raise NetworkError(f"{target.describe()}: not in this {sd_model.family.name} model") from e
    if tuple(param.shape) != target.shape:
        raise NetworkError(f"{target.describe()}: the model's weight is {tuple(param.shape)}, the network was loaded "
                           f"for {target.shape}")
    return param


_ACTIVE: set[int] = set()  # ids of the modules inside an `applied` block (nested use is refused)


def _entries(networks) -> list[tuple[Network, float, float, int | None]]:
    out = []
    for i, entry in enumerate(networks):
        if not isinstance(entry, tuple) or len(entry) not in (3, 4) or not isinstance(entry[0], Network):
            raise ValueError(f"networks[{i}]={entry!r}; expected (Network, te_multiplier, unet_multiplier"
                             "[, dyn_dim])")
        te, unet = entry[1], entry[2]
        for what, value in (("te_multiplier", te), ("unet_multiplier", unet)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"networks[{i}] {what}={value!r}; allowed: a finite number")
        dyn = entry[3] if len(entry) == 4 else None
        if dyn is not None and (isinstance(dyn, bool) or not isinstance(dyn, int) or dyn < 1):
            raise ValueError(f"networks[{i}] dyn_dim={dyn!r}; allowed: None or an int >= 1")
        out.append((entry[0], float(te), float(unet), dyn))
    return out


@contextlib.contextmanager
def applied(sd_model: StableDiffusionModel, networks: Sequence[tuple]) -> Iterator[dict[str, int]]:
    """Merge networks into `sd_model`'s weights for the duration of a `with` block, then restore them exactly.

    `networks`: (Network, te_multiplier, unet_multiplier) or (..., dyn_dim) tuples, applied in order (A1111
    `network_apply_weights` adds each network's delta in turn; only DoRA deltas depend on the order). A network
    with both multipliers 0 is skipped, and so is every module whose multiplier is 0: an image at weight 0 is the
    base image byte for byte. Text-encoder modules take te_multiplier, UNet modules unet_multiplier (A1111
    `NetworkModule.multiplier`).
    Each touched weight is first copied (that tensor only) to the CPU, then changed in place under `torch.no_grad`:
    W <- W + delta, computed in float32 (`network_delta`) and rounded once to W's dtype. On exit, also when the
    block or the merge raises, every copied tensor is written back (`copy_`), so all parameters are bit-identical to
    before. Yields {"modules": merged modules, "tensors": tensors backed up, "backup_bytes": their size}.
    Raises ValueError for malformed entries, RuntimeError when `applied` is already active on this model (nested
    use), NetworkError when a network was loaded for a model of other shapes.
    """
    entries = _entries(networks)
    ids = {id(sd_model.unet)} | {id(t) for t in sd_model.text_encoders}
    if ids & _ACTIVE:
        raise RuntimeError("networks.applied is already active on this model; nested use is not allowed (pass all "
                           "networks to one applied(...) call)")
    backups: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    stats = {"modules": 0, "tensors": 0, "backup_bytes": 0}
    _ACTIVE.update(ids)
    try:
        with torch.no_grad():
            for net, te, unet, dyn in entries:
                if te == 0 and unet == 0:
                    continue
                for module in net.modules.values():
                    target = module.target
                    multiplier = te if target.is_text else unet
                    if multiplier == 0:
                        continue
                    param = target_parameter(sd_model, target)
                    slot = (target.component, target.module, target.param)
                    if slot not in backups:
                        backups[slot] = (param, param.detach().to("cpu", copy=True))
                        stats["tensors"] += 1
                        stats["backup_bytes"] += param.numel() * param.element_size()
                    view = param if target.rows is None else param[target.rows[0]:target.rows[1]]
                    delta = network_delta(module, view, multiplier, dyn)
                    view.add_(delta)  # computed in float32, rounded once to the weight's dtype
                    stats["modules"] += 1
        yield stats
    finally:
        with torch.no_grad():
            for param, saved in backups.values():
                param.copy_(saved)
        _ACTIVE.difference_update(ids)
