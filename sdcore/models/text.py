"""CLIP text encoders with open_clip's text transformer layout, the transformers (HF) key layout, and the tokenizer.

Glossary: B = batch of token sequences, T = sequence length (77 = `TextConfig.context_length`), W = width
(768 CLIP-L, 1024 OpenCLIP-H, 1280 OpenCLIP-bigG), P = `projection_dim`.

The module tree is open_clip's `TextTransformer` (open_clip/transformer.py): `token_embedding`,
`positional_embedding`, `transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj,
ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`. SD2 and SDXL-bigG checkpoints
(`cond_stage_model.model.*`, `conditioner.embedders.1.model.*`) therefore load as they are; SD1 and SDXL CLIP-L
checkpoints are in transformers' `CLIPTextModel` layout and go through `hf_to_open_clip` (one short rule list) first.

The blocks (`ResidualAttentionBlock`, `LayerNorm`, `QuickGELU`) are written here, the same operations as open_clip's
in the same order (tests/test_text.py checks bit equality against open_clip's `Transformer`): importing open_clip's
package pulls in its vision models, transformers and torchvision, 3-5 s of a cold CLI run. The tokenizer is open_clip's
`SimpleTokenizer`, loaded from its own file (`load_tokenizer`) for the same reason.
"""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from sdcore.families import TextConfig

LAYERS = ("last", "penultimate")


class LayerNorm(nn.LayerNorm):
    """open_clip's `LayerNorm`: torch's, with the output cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with (open_clip `QuickGELU`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """A pre-norm transformer block with open_clip's names and operations (`ResidualAttentionBlock`, no layer
    scale): x + attn(ln_1(x)), then + mlp(ln_2(x)), mlp = c_fc -> activation -> c_proj with width 4W. x: [B, T, W]."""

    def __init__(self, width: int, heads: int, act_layer: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", act_layer()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        # one tensor as query, key and value: MultiheadAttention's packed self-attention path, as open_clip calls it
        x = x + self.attn(h, h, h, need_weights=False,
                          attn_mask=None if attn_mask is None else attn_mask.to(x.dtype))[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """`layers` ResidualAttentionBlocks under open_clip's name `resblocks` (`TextEncoder.forward` runs them)."""

    def __init__(self, width: int, layers: int, heads: int, act_layer: type[nn.Module]):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, act_layer) for _ in range(layers)])


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "quick_gelu": QuickGELU,  # x * sigmoid(1.702 x): OpenAI CLIP ViT-L/14 (SD1, SDXL CLIP-L)
    "gelu": nn.GELU,  # exact (erf) GELU: OpenCLIP ViT-H/14 (SD2), ViT-bigG/14 (SDXL)
}


@dataclass
class TextOutput:
    """Output of `TextEncoder.forward`.

    hidden: [B, T, W] float, the per-token conditioning (cross-attention context).
    pooled: [B, P] float, the EOS token's final-layer feature through `text_projection` (SDXL's "vector"
        conditioning), or None when the config has no projection (`projection_dim == 0`).
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None


def hidden_layer(config: TextConfig, clip_skip: int = 1) -> tuple[int, bool]:
    """Which hidden state becomes the conditioning: (number of blocks to run, whether ln_final follows).

    clip_skip = 1 uses `config.layer`: "last" -> all L blocks then ln_final (transformers' `last_hidden_state`);
    "penultimate" -> L-1 blocks, then ln_final iff `config.final_ln_on_penultimate` (SD2: yes,
    ldm `FrozenOpenCLIPEmbedder`; SDXL: no, sgm embedders).
    clip_skip = N > 1 is A1111's "Clip skip" (`CLIP_stop_at_last_layers`, a1111-semantics §11.4): transformers'
    `hidden_states[-N]`, i.e. the output of block L-N (L+1-N blocks run), then ln_final (for "last" configs) or
    as the config's intermediate layer (for "penultimate" configs). It never goes shallower than the config's own
    layer: on a "penultimate" config clip_skip 1 and 2 are the same. A1111 applies CLIP skip to SD1 only (SD2
    ignores the setting; SDXL only with `sdxl_clip_l_skip`), so callers pass 1 for the others.

    Example: CLIP-L (L=12), clip_skip=2 -> (11, True). Raises ValueError if clip_skip is not an int in [1, L].
    """
    if config.layer not in LAYERS:
        raise ValueError(f"TextConfig.layer={config.layer!r}; allowed: {LAYERS}")
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= config.layers:
        raise ValueError(f"clip_skip={clip_skip!r}; allowed: an int in [1, {config.layers}] (1 = no skip)")
    if config.layer == "last":
        return config.layers + 1 - clip_skip, True
    return min(config.layers - 1, config.layers + 1 - clip_skip), config.final_ln_on_penultimate


def causal_mask(length: int, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """Additive attention mask [T, T]: 0 on and below the diagonal, -inf above (token i sees tokens <= i)."""
    return torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1)


class TextEncoder(nn.Module):
    """A CLIP text transformer with open_clip's parameter names and blocks (`Transformer` above).

    Built on the meta device (no memory, no random draws), then moved with `to_empty` to `device`: parameters are
    uninitialised until `load_state_dict(..., assign=True)` (the checkpoint loader) or `reset_parameters(generator)`
    (random weights). `device="meta"` keeps them on meta; None = torch's default device, as for the UNet and VAE.
    `dtype` defaults to float32.

    Parameters present: token_embedding.weight [V, W], positional_embedding [T, W], transformer.resblocks.N.*,
    ln_final.*, text_projection [W, P] (only if projection_dim > 0), logit_scale [] (only for
    layout "open_clip": SD2/SDXL checkpoints carry CLIP's contrastive temperature there; it is unused here).
    """

    def __init__(self, config: TextConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(config, TextConfig):
            raise TypeError(f"config must be a TextConfig, got {type(config).__name__}")
        if config.act not in ACTIVATIONS:
            raise ValueError(f"TextConfig.act={config.act!r}; allowed: {tuple(ACTIVATIONS)}")
        if config.layer not in LAYERS:
            raise ValueError(f"TextConfig.layer={config.layer!r}; allowed: {LAYERS}")
        if config.width % config.heads:
            raise ValueError(f"TextConfig.width={config.width} is not divisible by heads={config.heads}")
        self.config = config
        with torch.device("meta"):
            # _weight given: nn.Embedding skips its normal_ init, whose meta-device path imports torch._dynamo (2-3 s)
            self.token_embedding = nn.Embedding(config.vocab_size, config.width,
                                                _weight=torch.empty(config.vocab_size, config.width))
            self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
            self.transformer = Transformer(config.width, config.layers, config.heads, ACTIVATIONS[config.act])
            self.ln_final = LayerNorm(config.width)
            if config.projection_dim > 0:
                self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))
            if config.layout == "open_clip":
                self.logit_scale = nn.Parameter(torch.empty(()))
        self.to(dtype=dtype or torch.float32)
        device = torch.get_default_device() if device is None else torch.device(device)
        if device.type != "meta":
            self.to_empty(device=device)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> TextEncoder:
        """Fill every parameter with open_clip's initialisation (`TextTransformer.init_parameters`) drawn from
        `generator` (a CPU generator; values are moved to the parameters' device): normal std 0.02 (token
        embedding), 0.01 (positions), W^-0.5 (in_proj, text_projection), (2W)^-0.5 (c_fc),
        W^-0.5 (2L)^-0.5 (out_proj, c_proj); biases 0, LayerNorm weight 1; logit_scale log(1/0.07).
        Returns self."""
        width, layers = self.config.width, self.config.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        stds = {"token_embedding.weight": 0.02, "positional_embedding": 0.01, "text_projection": width ** -0.5}
        for name, p in self.named_parameters():
            if name in stds:
                std = stds[name]
            elif name.endswith("attn.in_proj_weight"):
                std = width ** -0.5
            elif name.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")):
                std = proj_std
            elif name.endswith("mlp.c_fc.weight"):
                std = (2 * width) ** -0.5
            else:
                is_ln_weight = re.search(r"ln_\w+\.weight$", name) is not None
                p.fill_(math.log(1 / 0.07) if name == "logit_scale" else float(is_ln_weight))
                continue
            p.copy_(torch.randn(p.shape, generator=generator) * std)
        return self

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1, token_embeds: torch.Tensor | None = None
                ) -> TextOutput:
        """Encode token ids.

        tokens: LongTensor [B, T], T <= context_length (77), ids in [0, vocab_size); the EOS token must be the
            largest id of each row (true for CLIP: EOS 49407 is the last vocabulary entry), as pooling picks
            the argmax position (open_clip `text_global_pool(pool_type="argmax")`).
        clip_skip: see `hidden_layer` (1 = the config's layer; N > 1 = A1111 Clip skip).
        token_embeds: optional [B, T, W] input embeddings used instead of `token_embedding(tokens)` (positions are
            still added; `tokens` still picks the pooled position). Textual inversion splices its vectors into
            these rows (A1111 `EmbeddingsWithFixes`, see `sdcore.embeddings`).
        Returns TextOutput(hidden [B, T, W], pooled [B, P] or None), dtype of the parameters.
        Raises ValueError/TypeError for a wrong dtype, rank, length, token_embeds shape or clip_skip.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an int64/int32 tensor, got {getattr(tokens, 'dtype', type(tokens))}")
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.config.context_length:
            raise ValueError(f"tokens.shape={tuple(tokens.shape)}; expected [B, T] with "
                             f"1 <= T <= {self.config.context_length}")
        depth, final_ln = hidden_layer(self.config, clip_skip)
        length = tokens.shape[1]
        if token_embeds is None:
            token_embeds = self.token_embedding(tokens)
        elif token_embeds.shape != (*tokens.shape, self.config.width):
            raise ValueError(f"token_embeds.shape={tuple(token_embeds.shape)}; expected "
                             f"{(*tokens.shape, self.config.width)} (tokens [B, T] + the width)")
        x = token_embeds + self.positional_embedding[:length]  # (B, T, W)
        mask = causal_mask(length, x.dtype, x.device)
        blocks = self.transformer.resblocks
        for block in blocks[:depth]:
            x = block(x, attn_mask=mask)
        hidden = self.ln_final(x) if final_ln else x
        pooled = None
        if self.config.projection_dim > 0:
            for block in blocks[depth:]:
                x = block(x, attn_mask=mask)
            last = hidden if depth == len(blocks) and final_ln else self.ln_final(x)
            eos = tokens.argmax(dim=-1)
            pooled = last[torch.arange(last.shape[0], device=last.device), eos] @ self.text_projection  # (B, P)
        return TextOutput(hidden, pooled)


# transformers CLIPTextModel key fragment <-> open_clip fragment, applied in order (reverse order for the inverse).
# q/k/v projections (concatenated into MultiheadAttention's in_proj, in that order), `text_projection` (a Linear
# [P, W] in transformers, a matrix [W, P] in open_clip) and `embeddings.position_ids` (a buffer) are the only
# entries that are not renames; they are handled by the two functions below.
HF_TO_OPEN_CLIP_RULES: tuple[tuple[str, str], ...] = (
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    ("text_model.final_layer_norm.", "ln_final."),
)
_HF_QKV = re.compile(r"^(text_model\.encoder\.layers\.\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_OC_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_HF_DROPPED = ("text_model.embeddings.position_ids",)


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for old, new in rules:
        key = key.replace(old, new)
    return key


def _reject_unknown(function: str, layout: str, unknown: list[str]) -> None:
    if unknown:
        more = " ..." if len(unknown) > 20 else ""
        raise ValueError(f"{function}: not {layout} keys: {unknown[:20]}{more}")


def hf_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP text keys (SD1 / SDXL CLIP-L checkpoints) -> open_clip `TextTransformer` keys.

    The layout is transformers 4's `CLIPTextModel` (transformers 5 keeps it in `CLIPTextModelWithProjection`
    only). Input keys are relative to that module, i.e. after the checkpoint prefix
    `cond_stage_model.transformer.`: `text_model.embeddings.token_embedding.weight`, ...,
    `text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.*`, `text_model.final_layer_norm.*`, optionally
    `text_projection.weight`; `text_model.embeddings.position_ids` is dropped. Tensors are shared, except in_proj
    (q, k, v concatenated along dim 0, MultiheadAttention's layout) and text_projection (transposed copy).
    Raises ValueError naming keys that are not HF text-model keys or q/k/v sets that are incomplete.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _HF_DROPPED:
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
            continue
        m = _HF_QKV.match(key)
        if m:
            target = _rename(m[1], HF_TO_OPEN_CLIP_RULES) + f".attn.in_proj_{m[3]}"
            qkv.setdefault(target, {})[m[2]] = value
            continue
        new = _rename(key, HF_TO_OPEN_CLIP_RULES)
        if new.startswith("text_model.") or not key.startswith("text_model."):
            unknown.append(key)
        out[new] = value
    _reject_unknown("hf_to_open_clip", "transformers CLIPTextModel", unknown)
    for target, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"hf_to_open_clip: {target} needs q, k and v projections, got {sorted(parts)}")
        out[target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def open_clip_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_open_clip`: open_clip text keys -> transformers `CLIPTextModel` keys.

    in_proj_weight [3W, W] / in_proj_bias [3W] are split into q, k, v; `text_projection` [W, P] becomes
    `text_projection.weight` [P, W] (as in `CLIPTextModelWithProjection`); `logit_scale` is dropped (transformers'
    text model has none). `position_ids` is not produced (transformers rebuilds it).
    Raises ValueError naming keys that are not open_clip text-transformer keys.
    """
    inverse = tuple((new, old) for old, new in reversed(HF_TO_OPEN_CLIP_RULES))
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key == "logit_scale":
            continue
        if key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
            continue
        m = _OC_IN_PROJ.match(key)
        if m:
            prefix = f"text_model.encoder.layers.{m[1]}.self_attn"
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.{name}_proj.{m[2]}"] = part.contiguous()
            continue
        new = _rename(key, inverse)
        if not new.startswith("text_model."):
            unknown.append(key)
        out[new] = value
    _reject_unknown("open_clip_to_hf", "open_clip text-transformer", unknown)
    return out


@lru_cache(maxsize=1)
def _open_clip_tokenizer_module() -> ModuleType:
    """open_clip's `tokenizer.py`, executed on its own when open_clip is not imported yet (that file imports only
    ftfy, regex, numpy and torch; open_clip's `__init__` would import the vision models, transformers and
    torchvision too). `importlib.util.find_spec` locates the package without running it."""
    if "open_clip" in sys.modules:
        return importlib.import_module("open_clip.tokenizer")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip (package open-clip-torch) is not installed; sdcore's tokenizer is its "
                          "SimpleTokenizer")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    file_spec = importlib.util.spec_from_file_location("sdcore._open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def load_tokenizer():
    """open_clip's CLIP BPE tokenizer: the `SimpleTokenizer` its tokenizer.py builds, shared (its vocabulary
    `bpe_simple_vocab_16e6.txt.gz` ships with the open_clip package, nothing is downloaded). Text is ftfy-fixed,
    whitespace-collapsed and lower-cased.

    `encode(text) -> list[int]` gives ids without BOS/EOS; `sot_token_id` = 49406 (BOS), `eot_token_id` = 49407
    (EOS); `encoder[",</w>"]` = 267 (a1111-semantics §11.4). Raises ImportError when open-clip-torch is missing.
    """
    module = _open_clip_tokenizer_module()
    # tokenizer.py builds a default SimpleTokenizer when imported (`_tokenizer`); building another costs ~0.3 s
    shared = getattr(module, "_tokenizer", None)
    return shared if isinstance(shared, module.SimpleTokenizer) else module.SimpleTokenizer()
