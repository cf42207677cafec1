"""sdcore.networks: LoRA / LyCORIS files mapped onto sdcore's modules, merged, and restored exactly.

Oracles:
- diffusers' own `load_lora_weights` + `fuse_lora` (PEFT backend) on a diffusers UNet2DConditionModel and
  transformers CLIP text models holding the same random weights (converted by diffusers' single-file functions and
  `open_clip_to_hf`): the fused modules' outputs must equal sdcore's merged modules' within 1e-4 (fp32), for files
  written by scripts/make_lora.py in the kohya and PEFT layouts (SD1 and SDXL at reduced size; SD1.5 full size slow);
- diffusers' `convert_ldm_unet_checkpoint` for the LDM <-> diffusers module-name table;
- hand-derived deltas on small tensors from the LyCORIS formulas as A1111 applies them (`network_hada.py`,
  `network_lokr.py`, `lyco_helpers.py`, `network.py` `apply_weight_decompose`), written out in the tests;
- A1111 `modules/hashes.py` `addnet_hash_safetensors` for the short hash, from the file's bytes.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _diffusers_oracle import diffusers_unet
from make_checkpoint import family_config
from make_lora import make_lora_state_dict, model_targets, random_model, write_lora
from safetensors.torch import save_file

from sdcore import StableDiffusionProcessingImg2Img, load_checkpoint, process_images
from sdcore.models.text import open_clip_to_hf
from sdcore.models.unet import UNetModel
from sdcore.networks import (
    NetworkError,
    NetworkModule,
    Target,
    addnet_hash,
    applied,
    kohya_target,
    load_network,
    model_names,
    network_delta,
    peft_target,
    split_peft_key,
    unet_diffusers_names,
)

TOL = 1e-4  # fp32 max abs difference allowed between sdcore's merged modules and diffusers' fused ones
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "sdcore" / "weights" / "sdcore-tiny.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def sd1(sd1_tiny_path):
    """A private reduced-size SD1 model (the session one is shared with other test files)."""
    return load_checkpoint(sd1_tiny_path)


@pytest.fixture(scope="module")
def sdxl():
    """A reduced-size SDXL UNet and both text encoders with random weights (no VAE: built on the meta device)."""
    return random_model(family_config("sdxl", "tiny"), torch.float32, seed=3)


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(TINY)


def lora_file(folder: Path, name: str, family: str, layout: str, size: str = "tiny", **kw) -> Path:
    path = folder / name
    if not path.exists():
        tensors, metadata = make_lora_state_dict(family_config(family, size), layout, **kw)
        write_lora(tensors, metadata, path)
    return path


def params(sd_model) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of every component."""
    return {f"{c}.{k}": v.detach().clone() for c, m in sd_model.components().items()
            for k, v in m.state_dict().items()}


def assert_same(before: dict[str, torch.Tensor], sd_model) -> None:
    after = params(sd_model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]


# ---------------------------------------------------------------------------------------------------------------
# name maps


@pytest.mark.parametrize("family", ["sd1", "sdxl", "tiny"])
def test_unet_diffusers_names_match_diffusers_conversion(family):
    """Every (diffusers name, LDM name) pair equals what diffusers' own LDM conversion does with the same tensors
    (matched by identity of the tensor objects it moves)."""
    from _diffusers_oracle import ldm_original_config
    from diffusers.loaders import single_file_utils as sfu

    config = family_config(family, "full" if family == "tiny" else "tiny")
    unet = UNetModel(config.unet, device="meta")
    sd = {k: torch.zeros(v.shape) for k, v in unet.state_dict().items()}
    checkpoint = {"model.diffusion_model." + k: v for k, v in sd.items()}
    dconfig = sfu.create_unet_diffusers_config_from_ldm(ldm_original_config(config.unet, config.vae), checkpoint,
                                                        image_size=None)
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, dconfig)
    by_id = {id(v): k for k, v in sd.items()}
    expected = {}
    for dkey, tensor in converted.items():
        if dkey.endswith(".weight"):
            ldm = by_id[id(tensor)]
            expected[dkey[:-len(".weight")]] = ldm[:-len(".weight")]
    ours = unet_diffusers_names(unet)
    if config.unet.num_classes is not None:  # diffusers names SDXL's label_emb class_embedding (projection)
        expected = {k.replace("class_embedding.", "add_embedding."): v for k, v in expected.items()}
    assert ours == expected


def test_kohya_and_peft_targets_hand_examples(sd1, sdxl):
    names = model_names(sd1)
    assert kohya_target("lora_unet_down_blocks_0_attentions_1_proj_in", names).module == "input_blocks.2.1.proj_in"
    assert kohya_target("lora_unet_up_blocks_0_upsamplers_0_conv", names).module == "output_blocks.2.1.conv"
    assert kohya_target("lora_unet_up_blocks_1_upsamplers_0_conv", names).module == "output_blocks.5.2.conv"
    assert kohya_target("lora_unet_mid_block_resnets_1_conv2", names).module == "middle_block.2.out_layers.3"
    assert kohya_target("lora_unet_down_blocks_2_downsamplers_0_conv", names).module == "input_blocks.9.0.op"
    assert kohya_target("lora_unet_down_blocks_1_resnets_0_time_emb_proj", names).module == \
        "input_blocks.4.0.emb_layers.1"
    assert kohya_target("lora_unet_conv_in", names).module == "input_blocks.0.0"
    w = sd1.text_encoders[0].config.width
    k = kohya_target("lora_te_text_model_encoder_layers_1_self_attn_k_proj", names)
    assert (k.component, k.module, k.param, k.rows) == ("text_encoders.0", "transformer.resblocks.1.attn",
                                                          "in_proj_weight", (w, 2 * w))
    assert kohya_target("lora_te1_text_model_encoder_layers_0_mlp_fc2", names).module == \
        "transformer.resblocks.0.mlp.c_proj"
    assert kohya_target("lora_te2_text_model_encoder_layers_0_mlp_fc2", names) is None  # SD1 has one encoder
    assert kohya_target("lora_te_text_model_encoder_layers_99_mlp_fc1", names) is None  # no layer 99
    assert kohya_target("lora_unet_down_blocks_0_attentions_0_norm_foo", names) is None
    assert peft_target("unet", "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj", names).module == \
        "input_blocks.5.1.transformer_blocks.0.ff.net.0.proj"
    xl = model_names(sdxl)
    assert kohya_target("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_out_0", xl).module == \
        "input_blocks.4.1.transformer_blocks.1.attn2.to_out.0"
    assert kohya_target("lora_unet_output_blocks_2_2_conv", xl).module == "output_blocks.2.2.conv"
    t = kohya_target("lora_te2_text_model_encoder_layers_1_self_attn_out_proj", xl)
    assert (t.component, t.module) == ("text_encoders.1", "transformer.resblocks.1.attn.out_proj")
    assert kohya_target("lora_te_text_model_encoder_layers_0_mlp_fc1", xl) is None  # SDXL uses te1/te2
    assert peft_target("text_encoder_2", "text_model.encoder.layers.0.self_attn.v_proj", xl).rows == (128, 192)


def test_split_peft_key_forms():
    assert split_peft_key("unet.mid_block.attentions.0.proj_in.lora_A.weight") == \
        ("unet", "mid_block.attentions.0.proj_in", "lora_down.weight")
    assert split_peft_key("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight") == \
        ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1", "lora_up.weight")
    assert split_peft_key("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight") \
        == ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "lora_up.weight")
    assert split_peft_key("down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight") \
        == ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "lora_down.weight")
    assert split_peft_key("text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_linear_layer.down.weight") \
        == ("text_encoder", "text_model.encoder.layers.3.self_attn.q_proj", "lora_down.weight")
    assert split_peft_key("unet.conv_in.lora.up.weight") == ("unet", "conv_in", "lora_up.weight")
    assert split_peft_key("unet.conv_in.alpha") == ("unet", "conv_in", "alpha")
    assert split_peft_key("model.diffusion_model.x.weight") is None


# ---------------------------------------------------------------------------------------------------------------
# parity with diffusers' load_lora_weights + fuse_lora


def hf_text(encoder):
    """transformers CLIPTextModelWithProjection with `encoder`'s weights (transformers 5 keeps the `text_model.`
    module names that diffusers' text-encoder LoRA keys use only in this class)."""
    import transformers

    c = encoder.config
    inner = encoder.transformer.resblocks[0].mlp.c_fc.weight.shape[0]
    config = transformers.CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=inner,
                                         num_hidden_layers=c.layers, num_attention_heads=c.heads,
                                         max_position_embeddings=c.context_length, hidden_act=c.act,
                                         layer_norm_eps=1e-5, projection_dim=c.projection_dim or c.width)
    model = transformers.CLIPTextModelWithProjection(config)
    weights = {k: v.clone() for k, v in open_clip_to_hf(encoder.state_dict()).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"text_projection.weight"}, (missing, unexpected)
    return model.eval()


def oracle_pipeline(sd_model):
    """A diffusers pipeline holding copies of sd_model's UNet and text encoders (no VAE, tokenizer or scheduler
    use): StableDiffusionPipeline for one text encoder, StableDiffusionXLPipeline for two."""
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    unet = diffusers_unet(sd_model.unet.state_dict(), sd_model.unet.config)
    texts = [hf_text(t) for t in sd_model.text_encoders]
    if len(texts) == 1:
        return StableDiffusionPipeline(vae=None, text_encoder=texts[0], tokenizer=None, unet=unet,
                                       scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=None, text_encoder=texts[0], text_encoder_2=texts[1], tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=DDIMScheduler())


def model_inputs(sd_model, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    cfg = sd_model.unet.config
    x = torch.randn(2, cfg.in_channels, size, size, generator=g)
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    y = torch.randn(2, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None
    tokens = torch.randint(0, 49406, (2, 77), generator=g)
    tokens[:, 0], tokens[0, 9:], tokens[1, 30:] = 49406, 49407, 49407
    return x, torch.tensor([17.0, 640.5]), context, y, tokens


@torch.no_grad()
def oracle_outputs(pipe, inputs, penultimate: bool):
    x, t, context, y, tokens = inputs
    unet = pipe.unet(x, t, context, class_labels=y).sample
    texts = []
    for name in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            out = model(tokens, output_hidden_states=True)
            texts.append(out.hidden_states[-2] if penultimate else out.last_hidden_state)
    return unet, texts


@torch.no_grad()
def our_outputs(sd_model, inputs):
    x, t, context, y, tokens = inputs
    return sd_model.unet(x, t, context, y), [e(tokens).hidden for e in sd_model.text_encoders]


def check_parity(sd_model, path, te=1.0, unet=1.0, size=8):
    """Max |sdcore merged - diffusers fused| over the UNet output and each text encoder's conditioning, and the
    size of the LoRA's effect on both sides (so a LoRA silently skipped by either side fails)."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs the PEFT backend")
    inputs = model_inputs(sd_model, size=size)
    penultimate = sd_model.family.text[0].layer == "penultimate" and not sd_model.family.text[0].final_ln_on_penultimate
    pipe = oracle_pipeline(sd_model)
    base_theirs = oracle_outputs(pipe, inputs, penultimate)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    theirs = oracle_outputs(pipe, inputs, penultimate)
    base = our_outputs(sd_model, inputs)
    net = load_network(path, sd_model)
    with applied(sd_model, [(net, te, unet)]):
        ours = our_outputs(sd_model, inputs)
    report = {"unet": (ours[0] - theirs[0]).abs().max().item(),
              "unet effect ours": (ours[0] - base[0]).abs().max().item(),
              "unet effect diffusers": (theirs[0] - base_theirs[0]).abs().max().item()}
    for i, (a, b, a0, b0) in enumerate(zip(ours[1], theirs[1], base[1], base_theirs[1])):
        report[f"text {i}"] = (a - b).abs().max().item()
        report[f"text {i} effect ours"] = (a - a0).abs().max().item()
        report[f"text {i} effect diffusers"] = (b - b0).abs().max().item()
    print(f"\nparity {path.name}: " + ", ".join(f"{k} {v:.2e}" for k, v in report.items()))
    for key, value in report.items():
        if "effect" in key:
            assert value > 100 * TOL, report
        else:
            assert value <= TOL, report
    return report, net


def test_parity_kohya_sd1(sd1, tmp_path):
    path = lora_file(tmp_path, "kohya-sd1.safetensors", "sd1", "kohya", rank=4, alpha=2.0, conv_rank=3,
                     conv_alpha=1.0)
    _, net = check_parity(sd1, path)
    assert net.layouts == ("kohya",)
    kinds = {m.target.component for m in net.modules.values()}
    assert kinds == {"unet", "text_encoders.0"}
    # every module kohya trains was written and mapped: attention, ff, ResBlock convs, time_emb_proj, samplers
    assert len(net.modules) == len(model_targets(sd1.family, conv=True))


def test_parity_peft_sd1_with_alpha_metadata(sd1, tmp_path):
    """diffusers' layout, lora_alpha 3 over rank 4 in lora_adapter_metadata (attention and text only: PEFT's
    injection costs ~10 ms per module; the 3x3-conv rank_pattern case runs in the slow tier)."""
    path = lora_file(tmp_path, "peft-sd1.safetensors", "sd1", "peft", rank=4, alpha=3.0)
    _, net = check_parity(sd1, path)
    assert net.layouts == ("peft",)
    assert {m.calc_scale() for m in net.modules.values()} == {0.75}


def test_parity_kohya_sdxl_sgm_names(sdxl, tmp_path):
    """SDXL kohya files: sgm/LDM UNet names, lora_te1_ (CLIP-L) and lora_te2_ (bigG); attention layers here, the
    ResBlock and sampler convs in the slow tier."""
    path = lora_file(tmp_path, "kohya-sdxl.safetensors", "sdxl", "kohya", rank=4, alpha=2.0)
    _, net = check_parity(sdxl, path)
    assert {m.target.component for m in net.modules.values()} == {"unet", "text_encoders.0", "text_encoders.1"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in net.modules)


@pytest.mark.slow
@pytest.mark.parametrize("family,layout", [("sdxl", "kohya"), ("sdxl", "peft"), ("sd1", "peft")])
def test_parity_with_conv_layers(family, layout, sd1, sdxl, tmp_path):
    """All layers kohya's LoCon trains (ResBlock convs, time_emb_proj, skip connections, Down/Upsample); PEFT
    files with 3x3 convs at another rank carry a rank_pattern (scale alpha / that rank)."""
    model = {"sd1": sd1, "sdxl": sdxl}[family]
    path = lora_file(tmp_path, f"{layout}-{family}-conv.safetensors", family, layout, rank=4, alpha=3.0,
                     conv_rank=2)
    _, net = check_parity(model, path)
    assert len(net.modules) == len(model_targets(model.family, conv=True))
    if layout == "peft":
        assert {m.calc_scale() for m in net.modules.values()} == {0.75, 1.5}


@pytest.mark.slow
def test_parity_kohya_sd15_full_size(tmp_path):
    """Full-size SD1.5 (random weights made in place), kohya layout, attention + ff + text encoder, rank 8."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs the PEFT backend")
    from _diffusers_oracle import ldm_original_config
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    family = family_config("sd1", "full")
    model = random_model(family, torch.float32, seed=5)
    path = lora_file(tmp_path, "kohya-sd15.safetensors", "sd1", "kohya", size="full", rank=8, alpha=4.0)
    inputs = model_inputs(model, size=8)
    base = our_outputs(model, inputs)
    net = load_network(path, model)
    with applied(model, [(net, 1.0, 1.0)]):
        ours = our_outputs(model, inputs)
    # the oracle shares the (restored) tensors: no second copy of the 3.4 GB UNet
    checkpoint = {"model.diffusion_model." + k: v for k, v in model.unet.state_dict().items()}
    config = sfu.create_unet_diffusers_config_from_ldm(ldm_original_config(family.unet, family.vae), checkpoint,
                                                       image_size=None)
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, config)
    del checkpoint
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet.load_state_dict(converted, strict=True, assign=True)
    del converted
    text = hf_text(model.text_encoders[0])
    del model
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=None, unet=unet.eval(),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    theirs = oracle_outputs(pipe, inputs, penultimate=False)
    errors = {"unet": (ours[0] - theirs[0]).abs().max().item(), "text": (ours[1][0] - theirs[1][0]).abs().max().item()}
    effects = {"unet": (ours[0] - base[0]).abs().max().item(), "text": (ours[1][0] - base[1][0]).abs().max().item()}
    print(f"\nfull-size SD1.5 kohya parity: {errors}, effects {effects}")
    assert max(errors.values()) <= TOL, errors
    assert min(effects.values()) > 100 * TOL, effects


# ---------------------------------------------------------------------------------------------------------------
# hand-derived deltas


def module(kind, tensors, shape, alpha=None, scale=None, dora=None, rows=None):
    target = Target("unet", "m", "weight", shape, rows)
    dims = {"lora": lambda t: t["lora_down.weight"].shape[0], "loha": lambda t: t["hada_w1_b"].shape[0],
            "lokr": lambda t: (t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else
                               t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None)}
    return NetworkModule("m", target, kind, tensors, alpha=alpha, scale=scale, dim=dims[kind](tensors),
                         dora_scale=dora)


def T(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_lora_linear_scale_and_multiplier_worked_example():
    """kohya networks/lora.py: delta = multiplier * (alpha / rank) * up @ down. rank 2, alpha 1, multiplier 0.5:
    up @ down = [[1*1 + 2*0, 1*2 + 2*1], [0*1 + 1*0, 0*2 + 1*1]] = [[1, 4], [0, 1]]; times 0.25."""
    m = module("lora", {"lora_up.weight": T([[1, 2], [0, 1]]), "lora_down.weight": T([[1, 2], [0, 1]])}, (2, 2),
               alpha=1.0)
    assert torch.equal(network_delta(m, torch.zeros(2, 2), 0.5), T([[0.25, 1.0], [0.0, 0.25]]))
    m.scale = 3.0  # A1111 calc_scale: a `scale` tensor replaces alpha / rank
    assert torch.equal(network_delta(m, torch.zeros(2, 2)), 3 * T([[1, 4], [0, 1]]))
    m.scale, m.alpha = None, None  # no alpha: scale 1
    assert torch.equal(network_delta(m, torch.zeros(2, 2)), T([[1, 4], [0, 1]]))


def test_lora_dyn_dim_keeps_first_ranks():
    up, down = torch.randn(5, 3), torch.randn(3, 4)
    m = module("lora", {"lora_up.weight": up, "lora_down.weight": down}, (5, 4), alpha=3.0)
    torch.testing.assert_close(network_delta(m, torch.zeros(5, 4), dyn_dim=1), up[:, :1] @ down[:1], rtol=0, atol=0)


def test_lora_conv3x3_and_linear_onto_1x1_conv_and_back():
    """Conv LoRA (kohya LoCon): down [r, I, 3, 3], up [O, r, 1, 1]: delta[o, i, y, x] = sum_r up[o, r] down[r, i, y, x];
    a linear-shaped LoRA on a 1x1 conv (SD1 proj_in) and a 1x1-conv LoRA on a Linear (SD2 proj_in) are reshaped."""
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(6, 2, 1, 1, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    m = module("lora", {"lora_up.weight": up, "lora_down.weight": down}, (6, 5, 3, 3), alpha=1.0)
    expected = torch.zeros(6, 5, 3, 3)
    for o in range(6):
        for i in range(5):
            for r in range(2):
                expected[o, i] += up[o, r, 0, 0] * down[r, i] * 0.5
    torch.testing.assert_close(network_delta(m, torch.zeros(6, 5, 3, 3)), expected, rtol=1e-6, atol=1e-6)
    lin = module("lora", {"lora_up.weight": up[:, :, 0, 0], "lora_down.weight": down[:, :, 1, 1]}, (6, 5, 1, 1))
    assert network_delta(lin, torch.zeros(6, 5, 1, 1)).shape == (6, 5, 1, 1)
    conv1 = module("lora", {"lora_up.weight": up, "lora_down.weight": down[:, :, 1:2, 1:2]}, (6, 5))
    torch.testing.assert_close(network_delta(conv1, torch.zeros(6, 5)), up[:, :, 0, 0] @ down[:, :, 1, 1])
    with pytest.raises(NetworkError, match=r"delta of shape \(6, 5, 3, 3\) does not fit the weight \(6, 5\)"):
        network_delta(m, torch.zeros(6, 5))


def test_lora_mid_cp_decomposition():
    """LyCORIS LoCon with use_cp (A1111 lyco_helpers.rebuild_cp_decomposition):
    delta[o, i, y, x] = sum_{n, m} mid[n, m, y, x] up[o, n] down[m, i]."""
    g = torch.Generator().manual_seed(1)
    up, down, mid = torch.randn(4, 2, 1, 1, generator=g), torch.randn(2, 3, 1, 1, generator=g), torch.randn(
        2, 2, 3, 3, generator=g)
    m = module("lora", {"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid}, (4, 3, 3, 3))
    expected = torch.zeros(4, 3, 3, 3)
    for o in range(4):
        for i in range(3):
            for n in range(2):
                for k in range(2):
                    expected[o, i] += mid[n, k] * up[o, n, 0, 0] * down[k, i, 0, 0]
    torch.testing.assert_close(network_delta(m, torch.zeros(4, 3, 3, 3)), expected, rtol=1e-6, atol=1e-6)


def test_loha_worked_example():
    """LoHa (LyCORIS loha.py, A1111 network_hada.py): delta = (alpha / dim) * (w1_a @ w1_b) * (w2_a @ w2_b)
    elementwise, dim = rows of hada_w1_b. w1_a = [[1], [2]], w1_b = [[3, 4]] -> [[3, 4], [6, 8]];
    w2_a = [[1], [-1]], w2_b = [[2, 0.5]] -> [[2, 0.5], [-2, -0.5]]; product [[6, 2], [-12, -4]]; alpha 0.5 / dim 1."""
    m = module("loha", {"hada_w1_a": T([[1], [2]]), "hada_w1_b": T([[3, 4]]), "hada_w2_a": T([[1], [-1]]),
                        "hada_w2_b": T([[2, 0.5]])}, (2, 2), alpha=0.5)
    assert torch.equal(network_delta(m, torch.zeros(2, 2)), T([[3, 1], [-6, -2]]))


def test_loha_cp_and_conv():
    """With hada_t1/t2 (A1111 lyco_helpers.make_weight_cp): W_k[o, i, y, x] = sum_{a, b} t_k[a, b, y, x] w_ka[a, o]
    w_kb[b, i], delta = scale * W_1 * W_2; without t on a conv, w_b is [r, I*k*k] and the product is reshaped."""
    g = torch.Generator().manual_seed(2)
    r, o_, i_ = 2, 3, 4
    t1, t2 = torch.randn(r, r, 3, 3, generator=g), torch.randn(r, r, 3, 3, generator=g)
    w = {n: torch.randn(r, d, generator=g) for n, d in (("hada_w1_a", o_), ("hada_w1_b", i_), ("hada_w2_a", o_),
                                                       ("hada_w2_b", i_))}
    m = module("loha", dict(w, hada_t1=t1, hada_t2=t2), (o_, i_, 3, 3), alpha=1.0)

    def cp(t, wa, wb):
        out = torch.zeros(o_, i_, 3, 3)
        for o in range(o_):
            for i in range(i_):
                for a in range(r):
                    for b in range(r):
                        out[o, i] += t[a, b] * wa[a, o] * wb[b, i]
        return out

    expected = 0.5 * cp(t1, w["hada_w1_a"], w["hada_w1_b"]) * cp(t2, w["hada_w2_a"], w["hada_w2_b"])
    torch.testing.assert_close(network_delta(m, torch.zeros(o_, i_, 3, 3)), expected, rtol=1e-5, atol=1e-6)
    flat = {"hada_w1_a": torch.randn(o_, r, generator=g), "hada_w1_b": torch.randn(r, i_ * 9, generator=g),
            "hada_w2_a": torch.randn(o_, r, generator=g), "hada_w2_b": torch.randn(r, i_ * 9, generator=g)}
    m = module("loha", flat, (o_, i_, 3, 3))
    expected = ((flat["hada_w1_a"] @ flat["hada_w1_b"]) * (flat["hada_w2_a"] @ flat["hada_w2_b"])).reshape(o_, i_, 3, 3)
    torch.testing.assert_close(network_delta(m, torch.zeros(o_, i_, 3, 3)), expected)


def test_lokr_worked_example_and_scale_rule():
    """LoKr (LyCORIS lokr.py, A1111 network_lokr.py): delta = scale * kron(w1, w2), kron(A, B)[i*c + p, j*d + q] =
    A[i, j] B[p, q]. kron([[1, 2], [3, 4]], [[0, 1], [1, 0]]) = [[0,1,0,2],[1,0,2,0],[0,3,0,4],[3,0,4,0]].
    scale = alpha / dim with dim the rows of lokr_w2_b (else lokr_w1_b); with both factors full, dim is unknown and
    alpha is ignored (scale 1)."""
    kron = T([[0, 1, 0, 2], [1, 0, 2, 0], [0, 3, 0, 4], [3, 0, 4, 0]])
    full = module("lokr", {"lokr_w1": T([[1, 2], [3, 4]]), "lokr_w2": T([[0, 1], [1, 0]])}, (4, 4), alpha=8.0)
    assert full.dim is None
    assert torch.equal(network_delta(full, torch.zeros(4, 4)), kron)
    # w2 = w2_a @ w2_b = [[0], [1]] @ [[1, 0]]... written as rank-2 factors: [[0, 1], [1, 0]] @ I
    fact = module("lokr", {"lokr_w1": T([[1, 2], [3, 4]]), "lokr_w2_a": T([[0, 1], [1, 0]]),
                           "lokr_w2_b": T([[1, 0], [0, 1]])}, (4, 4), alpha=1.0)
    assert fact.dim == 2
    assert torch.equal(network_delta(fact, torch.zeros(4, 4)), 0.5 * kron)
    w1f = module("lokr", {"lokr_w1_a": T([[1], [3]]), "lokr_w1_b": T([[1, 2]]), "lokr_w2": T([[0, 1], [1, 0]])},
                 (4, 4), alpha=3.0)  # w1 = [[1, 2], [3, 6]], dim 1
    assert torch.equal(network_delta(w1f, torch.zeros(4, 4)), 3 * torch.kron(T([[1, 2], [3, 6]]), T([[0, 1], [1, 0]])))


def test_lokr_conv_and_t2():
    """A 4-D w2 [c, d, k, k] takes w1 as [a, b, 1, 1]: delta[i*c + p, j*d + q, y, x] = w1[i, j] w2[p, q, y, x];
    lokr_t2 builds w2 = make_weight_cp(t2, w2_a, w2_b) (w2_a [r, c], w2_b [r, d])."""
    g = torch.Generator().manual_seed(3)
    w1, t2 = torch.randn(2, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    w2a, w2b = torch.randn(2, 4, generator=g), torch.randn(2, 5, generator=g)
    m = module("lokr", {"lokr_w1": w1, "lokr_t2": t2, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, (8, 15, 3, 3), alpha=2.0)
    w2 = torch.zeros(4, 5, 3, 3)
    for p in range(4):
        for q in range(5):
            for a in range(2):
                for b in range(2):
                    w2[p, q] += t2[a, b] * w2a[a, p] * w2b[b, q]
    expected = torch.zeros(8, 15, 3, 3)
    for i in range(2):
        for j in range(3):
            expected[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5] = w1[i, j] * w2
    torch.testing.assert_close(network_delta(m, torch.zeros(8, 15, 3, 3)), expected, rtol=1e-5, atol=1e-6)


def test_dora_worked_example():
    """A1111 network.py apply_weight_decompose: W' = W + scale * up @ down; each input column j of W' is rescaled
    to length dora_scale[j]; delta = multiplier * (W'' - W). W = [[3, 0], [4, 1]], up @ down = [[0, 0], [0, 1]]
    -> W' = [[3, 0], [4, 2]], column lengths 5 and 2; dora_scale [1, 2] = [[10, 1]] -> W'' = [[6, 0], [8, 1]],
    delta = [[3, 0], [4, 0]]; at multiplier 0.5 -> [[1.5, 0], [2, 0]]."""
    w = T([[3, 0], [4, 1]])
    m = module("lora", {"lora_up.weight": T([[0], [1]]), "lora_down.weight": T([[0, 1]])}, (2, 2),
               dora=T([[10, 1]]))
    assert torch.equal(network_delta(m, w), T([[3, 0], [4, 0]]))
    assert torch.equal(network_delta(m, w, 0.5), T([[1.5, 0], [2, 0]]))
    m.dora_scale = T([[10], [1]])  # per-output magnitudes (PEFT's convention): refused, not broadcast
    with pytest.raises(NetworkError, match="dora_scale of shape"):
        network_delta(m, w)


def test_four_channel_lora_zero_padded_onto_inpainting_conv_in(inpaint_tiny, tmp_path):
    """A1111 networks.network_apply_weights: a delta with 4 input channels onto a 9-channel conv is zero-padded to
    9 (channels 4..8 = mask and masked-image latent stay exactly as they were)."""
    weight = inpaint_tiny.unet.input_blocks[0][0].weight
    out_c = weight.shape[0]
    g = torch.Generator().manual_seed(4)
    down, up = torch.randn(2, 4, 3, 3, generator=g), torch.randn(out_c, 2, 1, 1, generator=g)
    path = tmp_path / "conv_in.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up,
               "lora_unet_conv_in.alpha": torch.tensor(1.0)}, str(path))
    net = load_network(path, inpaint_tiny)
    before = weight.detach().clone()
    with applied(inpaint_tiny, [(net, 1.0, 0.8)]):
        after = weight.detach().clone()
    expected = (up[:, :, 0, 0] @ down.reshape(2, -1)).reshape(out_c, 4, 3, 3) * 0.5 * 0.8
    torch.testing.assert_close(after[:, :4] - before[:, :4], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(after[:, 4:], before[:, 4:])
    assert torch.equal(weight, before)


def test_loha_lokr_files_merge_as_derived(sd1, tmp_path):
    """LyCORIS keys under kohya names map like LoRA keys and merge W + scale * delta (text q rows included)."""
    g = torch.Generator().manual_seed(6)
    proj = sd1.unet.get_submodule("input_blocks.1.1.proj_in").weight  # SD1: 1x1 conv [C', C, 1, 1]
    o, i = proj.shape[:2]
    w = sd1.text_encoders[0].config.width
    loha = {"hada_w1_a": torch.randn(o, 2, generator=g), "hada_w1_b": torch.randn(2, i, generator=g),
            "hada_w2_a": torch.randn(o, 2, generator=g), "hada_w2_b": torch.randn(2, i, generator=g)}
    lokr = {"lokr_w1": torch.randn(2, 1, generator=g), "lokr_w2_a": torch.randn(w // 2, 3, generator=g),
            "lokr_w2_b": torch.randn(3, w, generator=g)}
    tensors = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}": v for k, v in loha.items()}
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] = torch.tensor(1.0)
    tensors.update({f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{k}": v for k, v in lokr.items()})
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(6.0)
    path = tmp_path / "lyco.safetensors"
    save_file(tensors, str(path))
    net = load_network(path, sd1)
    assert sorted(m.kind for m in net.modules.values()) == ["loha", "lokr"]
    in_proj = sd1.text_encoders[0].transformer.resblocks[0].attn.in_proj_weight
    p0, q0 = proj.detach().clone(), in_proj.detach().clone()
    with applied(sd1, [(net, 0.5, 2.0)]):
        p1, q1 = proj.detach().clone(), in_proj.detach().clone()
    d_loha = 2.0 * 0.5 * (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])
    torch.testing.assert_close(p1 - p0, d_loha.reshape(o, i, 1, 1), rtol=1e-4, atol=1e-5)
    d_lokr = 0.5 * (6.0 / 3) * torch.kron(lokr["lokr_w1"], lokr["lokr_w2_a"] @ lokr["lokr_w2_b"])
    torch.testing.assert_close(q1[:w] - q0[:w], d_lokr, rtol=1e-4, atol=1e-5)
    assert torch.equal(q1[w:], q0[w:])  # k and v rows untouched


# ---------------------------------------------------------------------------------------------------------------
# restore, weight 0, nesting


def test_restore_is_bit_identical_also_after_an_error(sd1, tmp_path):
    path = lora_file(tmp_path, "k.safetensors", "sd1", "kohya", rank=4, alpha=4.0, conv_rank=2)
    net = load_network(path, sd1)
    before = params(sd1)
    with applied(sd1, [(net, 1.0, 1.0), (net, -0.3, 0.7)]) as stats:
        during = params(sd1)
        changed = [k for k in before if not torch.equal(before[k], during[k])]
        assert len(changed) == stats["tensors"] > 100
        assert not any(k.startswith("vae.") for k in changed)
    assert_same(before, sd1)
    with pytest.raises(KeyError, match="boom"), applied(sd1, [(net, 1.0, 1.0)]):
        raise KeyError("boom")
    assert_same(before, sd1)
    with applied(sd1, [(net, 1.0, 1.0)]), pytest.raises(RuntimeError, match="nested"), \
            applied(sd1, [(net, 1.0, 1.0)]):
        pass
    assert_same(before, sd1)
    # an error half-way through the merge (a network mapped onto other shapes) restores what was merged
    wrong = load_network(path, sd1)
    last = list(wrong.modules.values())[-1]
    last.target = replace(last.target, shape=(1, 1))
    with pytest.raises(NetworkError, match="the network was loaded for"), \
            applied(sd1, [(net, 1.0, 1.0), (wrong, 1.0, 1.0)]):
        pass
    assert_same(before, sd1)


def img2img(sd_model, photo, **kw):
    args = {"sd_model": sd_model, "prompt": "a red circle", "negative_prompt": "", "init_images": [photo],
            "sampler_name": "Euler a", "steps": 5, "cfg_scale": 5.0, "seed": 7, "width": 64, "height": 64,
            "denoising_strength": 0.6}
    args.update(kw)
    return np.asarray(process_images(StableDiffusionProcessingImg2Img(**args)).images[0]).tobytes()


def test_img2img_after_a_lora_run_and_at_weight_zero_equals_the_base_image(tiny, astronaut, tmp_path):
    photo = astronaut.resize((64, 64))
    path = lora_file(tmp_path, "tiny.safetensors", "tiny", "kohya", size="full", rank=4, alpha=4.0, conv_rank=4)
    net = load_network(path, tiny)
    base = img2img(tiny, photo)
    with applied(tiny, [(net, 1.0, 1.0)]):
        with_lora = img2img(tiny, photo)
    assert with_lora != base
    assert img2img(tiny, photo) == base
    with applied(tiny, [(net, 0.0, 0.0)]) as stats:
        assert stats["modules"] == 0
        assert img2img(tiny, photo) == base
    with applied(tiny, [(net, 0, 0.0), (net, 0.0, 0)]):
        assert img2img(tiny, photo) == base
    with applied(tiny, [(net, 1.0, 0.0)]):  # text encoder only
        te_only = img2img(tiny, photo)
    assert te_only not in (base, with_lora)
    assert img2img(tiny, photo) == base


# ---------------------------------------------------------------------------------------------------------------
# errors


def save(path: Path, tensors: dict, metadata=None) -> Path:
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
    return path


def base_tensors(sd_model):
    proj = sd_model.unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q").weight
    o, i = proj.shape
    return {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(2, i),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(o, 2)}


def test_error_unknown_keys_are_listed(sd1, tmp_path):
    t = dict(base_tensors(sd1))
    t["lora_unet_down_blocks_0_attentions_0_foo.lora_down.weight"] = torch.ones(2, 2)
    t["something.else"] = torch.ones(1)
    path = save(tmp_path / "unknown.safetensors", t)
    with pytest.raises(NetworkError) as e:
        load_network(path, sd1)
    msg = str(e.value)
    assert str(path) in msg and "2 keys map to no module" in msg
    assert "lora_unet_down_blocks_0_attentions_0_foo.lora_down.weight" in msg and "something.else" in msg


def test_error_wrong_shape_names_file_module_and_shapes(sd1, tmp_path):
    t = base_tensors(sd1)
    key = next(k for k in t if k.endswith("lora_down.weight"))
    t[key] = torch.ones(2, 7)
    path = save(tmp_path / "shape.safetensors", t)
    with pytest.raises(NetworkError, match=rf"{path}.*attn1_to_q.*does not fit the weight"):
        load_network(path, sd1)
    t = base_tensors(sd1)
    t[key] = torch.ones(3, t[key].shape[1])  # rank 3 down, rank 2 up
    path = save(tmp_path / "rank.safetensors", t)
    with pytest.raises(NetworkError, match=rf"{path}.*factors .* do not combine"):
        load_network(path, sd1)


@pytest.mark.parametrize("part,kind", [("oft_blocks", "OFT"), ("diff", "full weight difference"),
                                       ("w_norm", "norm-layer"), ("lora_mystery", "unknown tensor names")])
def test_error_unsupported_network_types(sd1, tmp_path, part, kind):
    t = base_tensors(sd1)
    t["lora_unet_down_blocks_0_attentions_0_proj_in." + part] = torch.ones(2, 2)
    path = save(tmp_path / f"{part}.safetensors", t)
    with pytest.raises(NetworkError, match=rf"{path}.*{kind}"):
        load_network(path, sd1)


def test_error_incomplete_non_finite_extension_and_peft_dora(sd1, tmp_path):
    t = base_tensors(sd1)
    del t[next(k for k in t if k.endswith("lora_up.weight"))]
    path = save(tmp_path / "incomplete.safetensors", t)
    with pytest.raises(NetworkError, match=rf"{path}.*incomplete module"):
        load_network(path, sd1)
    t = base_tensors(sd1)
    key = next(iter(t))
    t[key][0, 1] = float("nan")
    path = save(tmp_path / "nan.safetensors", t)
    with pytest.raises(NetworkError, match=rf"{path}: non-finite values.*{key}"):
        load_network(path, sd1)
    path = tmp_path / "lora.gguf"
    path.write_bytes(b"x")
    with pytest.raises(NetworkError, match="extension '.gguf'"):
        load_network(path, sd1)
    path = save(tmp_path / "dora.safetensors", {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(2, 32),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(32, 2),
        "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.ones(32)})
    with pytest.raises(NetworkError, match="PEFT DoRA"):
        load_network(path, sd1)
    ok = load_network(save(tmp_path / "ok.safetensors", base_tensors(sd1)), sd1)
    with pytest.raises(ValueError, match="te_multiplier=nan"), applied(sd1, [(ok, float("nan"), 1.0)]):
        pass
    with pytest.raises(ValueError, match="dyn_dim=0"), applied(sd1, [(ok, 1.0, 1.0, 0)]):
        pass
    with pytest.raises(ValueError, match=r"expected \(Network, te_multiplier"), applied(sd1, [(ok, 1.0)]):
        pass
    with applied(sd1, [(ok, 1.0, 1.0, 1)]) as stats:  # dyn_dim 1 of rank 2
        assert stats["modules"] == 1


def test_pickle_file_loads_safely_and_hostile_pickle_is_refused(sd1, tmp_path):
    t = base_tensors(sd1)
    net = load_network(save(tmp_path / "lora.pt", t), sd1)
    assert net.name == "lora" and len(net.modules) == 1
    assert net.shorthash() == hashlib.sha256((tmp_path / "lora.pt").read_bytes()).hexdigest()[:12]

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    # the name of print's global depends on who patched builtins.print (Ray's tqdm does, once imported)
    with pytest.raises(NetworkError, match=r"refused: its pickle needs global '([\w.]*\.)?\w*print'"):
        load_network(path, sd1)


# ---------------------------------------------------------------------------------------------------------------
# hashes and the writer


def test_shorthash_is_addnet_hash_of_the_tensor_bytes(sd1, tmp_path):
    """A1111 `addnet_hash_safetensors`: sha256 of the bytes after the 8-byte header length and the header. One
    float32 tensor [1.0] has data bytes 00 00 80 3f (IEEE 754 little-endian)."""
    path = save(tmp_path / "one.safetensors", {"x": torch.tensor([1.0])}, metadata={"anything": "here"})
    assert addnet_hash(path) == hashlib.sha256(struct.pack("<f", 1.0)).hexdigest()
    raw = path.read_bytes()
    assert raw.endswith(b"\x00\x00\x80\x3f")
    t = base_tensors(sd1)
    a = load_network(save(tmp_path / "a.safetensors", t, {"ss_note": "one"}), sd1)
    b = load_network(save(tmp_path / "b.safetensors", t, {"ss_note": "two, longer header"}), sd1)
    assert a.shorthash() == b.shorthash() and len(a.shorthash()) == 12
    data = (tmp_path / "a.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert a.sha256() == hashlib.sha256(data[8 + n:]).hexdigest()
    c = load_network(save(tmp_path / "c.safetensors", t, {"sshs_model_hash": "0123456789abcdef" * 4}), sd1)
    assert c.shorthash() == "0123456789ab"  # kohya's precomputed hash in the metadata wins (A1111 NetworkOnDisk)


def test_make_lora_cli_kohya_metadata_hash_and_no_overwrite(sd1, tmp_path):
    import make_lora

    out = tmp_path / "cli.safetensors"
    assert make_lora.main(["--family", "sd1", "--layout", "kohya", "--rank", "2", "--alpha", "1", str(out)]) == 0
    net = load_network(out, sd1)
    assert net.metadata["sshs_model_hash"] == addnet_hash(out)
    assert {m.alpha for m in net.modules.values()} == {1.0} and {m.dim for m in net.modules.values()} == {2}
    with pytest.raises(SystemExit):
        make_lora.main(["--family", "sd1", str(out)])
    out_pt = tmp_path / "cli.pt"
    assert make_lora.main(["--family", "sd1", "--layout", "peft", "--no-te", str(out_pt)]) == 0
    net = load_network(out_pt, sd1)
    assert {m.target.component for m in net.modules.values()} == {"unet"}
    assert {m.calc_scale() for m in net.modules.values()} == {1.0}
