"""Parity of sdcore.models.text.TextEncoder against transformers' CLIP text model and open_clip's TextTransformer.

The same random weights go into the oracle and (converted by `hf_to_open_clip`, or as they are for open_clip's
layout) into our encoder. Every parameter is randomised, biases and LayerNorms included, so a wrong rule in the
key map or a wrong layer/LN choice shows up as a large difference.
"""
from __future__ import annotations

import gzip
from dataclasses import replace

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, TextTransformer
from open_clip.transformer import Transformer as OpenClipTransformer
from torch import nn

from sdcore.families import CLIP_L, OPENCLIP_H, SDXL_CLIP_G, SDXL_CLIP_L
from sdcore.models import text
from sdcore.models.text import (TextEncoder, hf_to_open_clip, hidden_layer, load_tokenizer,
                                open_clip_to_hf)

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32 max abs difference allowed (brief: <= 1e-4)


def _randomise(module: nn.Module, seed: int) -> None:
    """Every parameter random: N(0, 0.05^2), LayerNorm weights N(1, 0.05^2), embeddings N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "embedding" in name:
                p.copy_(noise)
            elif "norm" in name or "ln_" in name:
                p.copy_(noise * 0.05 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(noise * 0.05)


def _tokens(batch: int, length: int = 77, seed: int = 1) -> torch.Tensor:
    """BOS, random ids, EOS, then EOS padding (SD1 style) of varying lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 49406, (batch, length), generator=g)
    tokens[:, 0] = 49406
    for i in range(batch):
        tokens[i, 5 + 17 * i:] = 49407
    return tokens


def _hf_pair(width: int, layers: int, heads: int, act: str, projection_dim: int, seed: int = 0):
    hf_config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
        projection_dim=projection_dim or width, eos_token_id=49407)
    hf = transformers.CLIPTextModelWithProjection(hf_config).eval()
    _randomise(hf, seed)
    config = replace(CLIP_L, width=width, layers=layers, heads=heads, act=act, projection_dim=projection_dim)
    ours = TextEncoder(config, device="meta")
    hf_sd = hf.state_dict()  # transformers-4 checkpoint layout: text_model.* and text_projection.weight
    if not projection_dim:
        hf_sd = {k: v for k, v in hf_sd.items() if k.startswith("text_model.")}
    ours.load_state_dict(hf_to_open_clip(hf_sd), strict=True, assign=True)
    return hf, ours.eval()


def _check_hf_parity(width, layers, heads, act, projection_dim):
    hf, ours = _hf_pair(width, layers, heads, act, projection_dim)
    tokens = _tokens(3)
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        last = ours(tokens)
        skip2 = ours(tokens, clip_skip=2)
        skip_ref = hf.text_model.final_layer_norm(ref.hidden_states[-2])
    errors = {
        "last_hidden_state": (last.hidden - ref.last_hidden_state).abs().max().item(),
        "clip_skip 2": (skip2.hidden - skip_ref).abs().max().item(),
    }
    if projection_dim:
        errors["pooled"] = (last.pooled - ref.text_embeds).abs().max().item()
        errors["pooled clip_skip 2"] = (skip2.pooled - ref.text_embeds).abs().max().item()
    else:
        assert last.pooled is None
    assert max(errors.values()) <= TOL, errors
    # the clip-skip output really is a different layer
    assert (skip2.hidden - last.hidden).abs().max() > 100 * TOL
    return errors


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_parity_with_transformers_small(act):
    _check_hf_parity(64, 3, 4, act, projection_dim=32)


def test_parity_with_transformers_no_projection_clip_skip_3():
    hf, ours = _hf_pair(48, 3, 3, "quick_gelu", projection_dim=0, seed=5)
    tokens = _tokens(2, seed=3)
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        out = ours(tokens, clip_skip=3)
        expected = hf.text_model.final_layer_norm(ref.hidden_states[-3])
    assert out.pooled is None
    assert (out.hidden - expected).abs().max() <= TOL


@pytest.mark.slow
def test_parity_with_transformers_full_clip_l():
    errors = _check_hf_parity(768, 12, 12, "quick_gelu", projection_dim=768)
    print("CLIP-L parity max abs errors:", errors)


def test_key_map_round_trip_and_shapes():
    hf, ours = _hf_pair(32, 2, 2, "quick_gelu", projection_dim=16)
    hf_sd = dict(hf.state_dict())
    hf_sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # present in many SD1 checkpoints
    oc = hf_to_open_clip(hf_sd)
    assert set(oc) == set(ours.state_dict())
    assert oc["transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert torch.equal(oc["transformer.resblocks.1.attn.in_proj_bias"][32:64],
                       hf_sd["text_model.encoder.layers.1.self_attn.k_proj.bias"])
    assert torch.equal(oc["text_projection"], hf_sd["text_projection.weight"].t())
    back = open_clip_to_hf(oc)
    del hf_sd["text_model.embeddings.position_ids"]
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_key_map_errors():
    with pytest.raises(ValueError, match="not transformers CLIPTextModel keys.*vision_model"):
        hf_to_open_clip({"text_model.final_layer_norm.weight": torch.ones(2),
                         "vision_model.post_layernorm.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="needs q, k and v"):
        hf_to_open_clip({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="not open_clip text-transformer keys.*visual"):
        open_clip_to_hf({"visual.proj": torch.ones(2)})


@pytest.mark.parametrize("layer, final_ln", [("last", True), ("penultimate", True), ("penultimate", False)])
def test_open_clip_layout_parity(layer, final_ln):
    """SD2/SDXL-bigG style: open_clip's own TextTransformer (GELU, zero padding) and its state dict as it is."""
    width, layers, heads, proj = 64, 3, 4, 48
    ref = TextTransformer(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers,
                          output_dim=proj, act_layer=nn.GELU, output_tokens=True).eval()
    _randomise(ref, 7)
    config = replace(OPENCLIP_H, width=width, layers=layers, heads=heads, projection_dim=proj, layer=layer,
                     final_ln_on_penultimate=final_ln)
    ours = TextEncoder(config, device="meta")
    sd = dict(ref.state_dict())
    sd["logit_scale"] = torch.tensor(4.6052)  # SD2/SDXL checkpoints carry CLIP's logit_scale beside the text tower
    ours.load_state_dict(sd, strict=True, assign=True)
    tokens = _tokens(2, seed=9)
    tokens[0, 5:] = 0  # open_clip pads with 0 after EOS; pooling must still pick the EOS (argmax)
    tokens[0, 5] = 49407
    with torch.no_grad():
        pooled_ref, tokens_ref = ref(tokens)
        index = layers - 1 if layer == "last" else layers - 2
        inter = ref.forward_intermediates(tokens, indices=[index], normalize_intermediates=final_ln,
                                          output_fmt="NLC", intermediates_only=True)["text_intermediates"][0]
        out = ours(tokens)
    if layer == "last":
        assert (out.hidden - tokens_ref).abs().max() <= TOL
    assert (out.hidden - inter).abs().max() <= TOL
    assert (out.pooled - pooled_ref).abs().max() <= TOL


def test_open_clip_model_text_keys_load_as_they_are():
    """A full open_clip CLIP's text keys (what SD2 stores under cond_stage_model.model.) load with strict=True."""
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    model = open_clip.CLIP(**cfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    config = replace(OPENCLIP_H, width=32, heads=2, layers=2, projection_dim=16)
    ours = TextEncoder(config, device="meta")
    ours.load_state_dict(sd, strict=True, assign=True)
    assert ours.text_projection.shape == (32, 16) and ours.logit_scale.shape == ()


def test_meta_build_then_assign_and_dtype():
    config = replace(CLIP_L, width=32, layers=2, heads=2)
    src = TextEncoder(config).reset_parameters(torch.Generator().manual_seed(0))
    meta = TextEncoder(config, device="meta", dtype=torch.float16)
    assert all(p.is_meta and p.dtype == torch.float16 for p in meta.parameters())
    assert not any(p.is_meta for p in TextEncoder(config).parameters())
    meta.load_state_dict(src.state_dict(), strict=True, assign=True)
    assert not any(p.is_meta for p in meta.parameters())
    tokens = _tokens(1)
    with torch.no_grad():
        a, b = src(tokens).hidden, meta.float()(tokens).hidden
    assert torch.equal(a, b)


def test_reset_parameters_is_seeded():
    config = replace(CLIP_L, width=32, layers=2, heads=2)
    a = TextEncoder(config).reset_parameters(torch.Generator().manual_seed(3))
    b = TextEncoder(config).reset_parameters(torch.Generator().manual_seed(3))
    c = TextEncoder(config).reset_parameters(torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.token_embedding.weight, c.token_embedding.weight)
    assert torch.equal(a.ln_final.weight, torch.ones(32)) and torch.equal(a.ln_final.bias, torch.zeros(32))


def test_activation_classes():
    mlp = TextEncoder(replace(CLIP_L, width=32, layers=1, heads=2), device="meta").transformer.resblocks[0].mlp
    assert isinstance(mlp.gelu, text.QuickGELU)
    mlp = TextEncoder(replace(OPENCLIP_H, width=32, layers=1, heads=2), device="meta").transformer.resblocks[0].mlp
    assert type(mlp.gelu) is nn.GELU and mlp.gelu.approximate == "none"


def test_hidden_layer_rule():
    """a1111-semantics §11.4: clip skip N -> hidden_states[-N] (output of block L-N, i.e. L+1-N blocks) then final LN."""
    assert hidden_layer(CLIP_L, 1) == (12, True)
    assert hidden_layer(CLIP_L, 2) == (11, True)
    assert hidden_layer(CLIP_L, 12) == (1, True)
    assert hidden_layer(OPENCLIP_H, 1) == (23, True)  # SD2: penultimate, then ln_final
    assert hidden_layer(OPENCLIP_H, 2) == (23, True)
    assert hidden_layer(SDXL_CLIP_L, 1) == (11, False)  # SDXL: penultimate without ln_final
    assert hidden_layer(SDXL_CLIP_G, 1) == (31, False)
    for bad in (0, 13, 1.0, True):
        with pytest.raises(ValueError, match="clip_skip"):
            hidden_layer(CLIP_L, bad)


def test_input_errors():
    enc = TextEncoder(replace(CLIP_L, width=32, layers=2, heads=2)).reset_parameters(torch.Generator())
    with pytest.raises(TypeError, match="tokens"):
        enc(torch.zeros(1, 77))
    with pytest.raises(ValueError, match="tokens.shape"):
        enc(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens.shape"):
        enc(torch.zeros(77, dtype=torch.long))
    with pytest.raises(ValueError, match="clip_skip"):
        enc(torch.zeros(1, 77, dtype=torch.long), clip_skip=3)
    with pytest.raises(ValueError, match="act"):
        TextEncoder(replace(CLIP_L, act="relu"))


def _vocab_id(token: str) -> int:
    """Id of `token` derived from open_clip's BPE merges file: 256 byte symbols, their 256 `</w>` forms, then one
    id per merge line in file order (line 1 is a header)."""
    path = open_clip.tokenizer.default_bpe()
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    joined = ["".join(m.split()) for m in merges]
    return 512 + joined.index(token)


def test_tokenizer_ids():
    """a1111-semantics §11.4: BOS 49406, EOS 49407, ',</w>' 267. ',' is byte 44, the 12th printable byte from '!' (33), so its
    symbol is 11 and its `</w>` form 256 + 11 = 267; 'a' (97) -> 256 + 64 = 320."""
    tok = load_tokenizer()
    assert tok.sot_token_id == 49406 and tok.eot_token_id == 49407
    assert tok.encoder[",</w>"] == 267 == 256 + (ord(",") - ord("!"))
    assert tok.encode("a , a") == [320, 267, 320]
    assert tok.encode("A Cat, photo") == [320, _vocab_id("cat</w>"), 267, _vocab_id("photo</w>")]


@pytest.mark.parametrize("act, oc_act", [("quick_gelu", QuickGELU), ("gelu", nn.GELU)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_equal_open_clips_bit_for_bit(act, oc_act, dtype):
    """sdcore's own blocks (written to avoid importing open_clip's package) are open_clip's: the same state dict
    keys, and bit-identical outputs, with the causal mask, in float32 and bfloat16."""
    width, layers, heads = 64, 3, 4
    ref = OpenClipTransformer(width, layers, heads, act_layer=oc_act).eval()
    _randomise(ref, 11)
    ours = text.Transformer(width, layers, heads, text.ACTIVATIONS[act]).eval()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(2, 77, width, generator=torch.Generator().manual_seed(0)).to(dtype)
    mask = text.causal_mask(77, dtype, None)
    with torch.no_grad():
        a = x
        for block in ref.resblocks:
            a = block(a, attn_mask=mask)
        b = x
        for block in ours.resblocks:
            b = block(b, attn_mask=mask)
    assert torch.equal(a, b)


def test_the_tokenizer_does_not_import_open_clips_package():
    import subprocess
    import sys

    code = ("import sys; from sdcore.models.text import load_tokenizer; t = load_tokenizer();"
            "print(t.encode('a red circle'), 'open_clip' in sys.modules, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("]")[1].split() == ["False", "False"]
    assert out.split("]")[0] + "]" == str(open_clip.get_tokenizer("ViT-L-14").encode("a red circle"))
