"""sdcore.models.unet: parity with diffusers' UNet2DConditionModel (converted by diffusers' own LDM single-file
functions) on random LDM-layout weights, plus hand-derived checks of the timestep embedding and config handling."""
from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from _diffusers_oracle import diffusers_unet, make_checkpoint, random_weights
from sdcore.families import SD1_UNET, SD2_UNET, SDXL_UNET
from sdcore.models.unet import GroupNorm32, UNetModel, attention_heads, timestep_embedding

TOL = 1e-4  # fp32 max abs difference; outputs are O(1)

CONFIGS = {
    "sd1": make_checkpoint.family_config("sd1", "tiny").unet,
    "sd1-inpaint": make_checkpoint.family_config("sd1-inpaint", "tiny").unet,
    # SD2 geometry: fixed head width, Linear proj_in/proj_out
    "sd2-like": replace(SD2_UNET, model_channels=64, num_head_channels=16, context_dim=64),
    # SDXL geometry: 3 levels, no attention at level 0 (depth 0), depth 2 elsewhere, label_emb for y
    "sdxl-like": replace(SDXL_UNET, model_channels=32, num_head_channels=16, transformer_depth=(0, 2, 2),
                         transformer_depth_middle=2, context_dim=64, adm_in_channels=48),
}
TIMESTEPS = {"continuous": torch.tensor([3.0, 812.37]), "integer": torch.tensor([0, 999])}


def _inputs(config, generator, size=(16, 24)):
    x = torch.randn(2, config.in_channels, *size, generator=generator)
    context = torch.randn(2, 77, config.context_dim, generator=generator)
    y = torch.randn(2, config.adm_in_channels, generator=generator) if config.adm_in_channels else None
    return x, context, y


def _max_errors(ours, theirs, config, generator, size=(16, 24)):
    x, context, y = _inputs(config, generator, size)
    errors = {}
    with torch.no_grad():
        for kind, t in TIMESTEPS.items():
            a = ours(x, t, context, y)
            b = theirs(x, t, context, class_labels=y).sample
            assert a.shape == b.shape == (2, config.out_channels, *size)
            errors[kind] = ((a - b).abs().max().item(), a.abs().max().item())
    return errors


def _random_model(name, seed, size=(8, 8)):
    """A UNet of CONFIGS[name] with seeded random weights, and inputs (x, context, y) of latent `size`."""
    config = CONFIGS[name]
    model = UNetModel(config, device="meta")
    random_weights(model, seed=seed)
    return model, _inputs(config, torch.Generator().manual_seed(seed + 1), size)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    config = CONFIGS[request.param]
    ours = UNetModel(config, device="meta").eval()
    weights = random_weights(ours, seed=1)
    return request.param, config, ours, diffusers_unet(weights, config)


def test_parity_with_diffusers(pair):
    name, config, ours, theirs = pair
    errors = _max_errors(ours, theirs, config, torch.Generator().manual_seed(2))
    print(f"\nunet parity {name}: " + ", ".join(f"{k} max|diff|={e:.2e} (max|out|={m:.2f})"
                                               for k, (e, m) in errors.items()))
    for kind, (err, scale) in errors.items():
        assert err <= TOL, (name, kind, err)
        assert scale > 0.1


def test_parity_detects_a_changed_weight(pair):
    """The comparison above is sensitive: scaling one cross-attention key projection by 1.01 shows up."""
    name, config, ours, theirs = pair
    block = next(m for m in ours.modules() if hasattr(m, "attn2"))
    x, context, y = _inputs(config, torch.Generator().manual_seed(3))
    t = TIMESTEPS["continuous"]
    with torch.no_grad():
        before = (ours(x, t, context, y) - theirs(x, t, context, class_labels=y).sample).abs().max()
        original = block.attn2.to_k.weight.clone()
        block.attn2.to_k.weight.mul_(1.01)
        after = (ours(x, t, context, y) - theirs(x, t, context, class_labels=y).sample).abs().max()
        block.attn2.to_k.weight.copy_(original)
    assert before <= TOL < after


def test_continuous_timesteps_are_not_rounded():
    model, (x, context, _) = _random_model("sd1", seed=4)
    with torch.no_grad():
        a = model(x, torch.tensor([400.0, 400.0]), context)
        b = model(x, torch.tensor([400.5, 400.5]), context)
    assert (a - b).abs().max() > 1e-4


def test_timestep_embedding_hand_values():
    """LDM util.py `timestep_embedding`: freqs_i = 10000**(-i/half), [cos(t f), sin(t f)]; dim 4 -> f = (1, 0.01)."""
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 2.5]), 4)
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                             [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)],
                             [math.cos(2.5), math.cos(0.025), math.sin(2.5), math.sin(0.025)]])
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)
    odd = timestep_embedding(torch.tensor([7]), 5)
    assert odd.shape == (1, 5) and odd[0, 4] == 0
    torch.testing.assert_close(odd[0, :4], timestep_embedding(torch.tensor([7.0]), 4)[0])
    with pytest.raises(ValueError, match="timesteps"):
        timestep_embedding(torch.zeros(2, 1), 4)


def test_groupnorm32_computes_in_float32():
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, 4, 4) * 50 + 300).bfloat16()
    out = norm.bfloat16()(x)
    expected = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), 1e-5).bfloat16()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_attention_heads():
    """SD1: 8 heads of width C/8; SD2/SDXL: heads of width 64 (LDM openaimodel.py)."""
    assert attention_heads(SD1_UNET, 320) == (8, 40)
    assert attention_heads(SD1_UNET, 1280) == (8, 160)
    assert attention_heads(SD2_UNET, 320) == (5, 64)
    assert attention_heads(SDXL_UNET, 1280) == (20, 64)
    with pytest.raises(ValueError, match="num_heads=7"):
        attention_heads(replace(SD1_UNET, num_heads=7), 320)


def test_module_tree_matches_ldm_names():
    sd1 = UNetModel(SD1_UNET, device="meta").state_dict()
    assert sd1["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"].shape == (320, 320)
    assert sd1["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sd1["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (2560, 320)
    assert sd1["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert sd1["input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    assert sd1["input_blocks.4.0.skip_connection.weight"].shape == (640, 320, 1, 1)
    assert sd1["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd1["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd1["out.2.weight"].shape == (4, 320, 3, 3)
    assert "input_blocks.10.1.norm.weight" not in sd1  # no attention at ds 8
    sd2 = UNetModel(SD2_UNET, device="meta").state_dict()
    assert sd2["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    xl = UNetModel(SDXL_UNET, device="meta").state_dict()
    assert xl["label_emb.0.0.weight"].shape == (1280, 2816) and "label_emb.0.2.weight" in xl
    assert "input_blocks.1.1.norm.weight" not in xl
    assert "input_blocks.7.1.transformer_blocks.9.norm3.weight" in xl
    assert "middle_block.1.transformer_blocks.9.attn2.to_k.weight" in xl
    assert len(xl) == 1680


def test_meta_build_has_no_buffers_and_loads_with_assign():
    model = UNetModel(CONFIGS["sdxl-like"], device="meta")
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())
    random_weights(model, seed=6)
    assert not any(p.is_meta for p in model.parameters())


def test_bf16_close_to_fp32():
    model, (x, context, _) = _random_model("sd1", seed=7)
    t = torch.tensor([10.5, 700.0])
    with torch.no_grad():
        ref = model(x, t, context)
        low = model.to(torch.bfloat16)(x, t, context)
    assert low.dtype == torch.float32  # output in the input's dtype
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_inputs_raise():
    model, (x, context, y) = _random_model("sdxl-like", seed=9)
    t = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"x must be \[B, 4"):
        model(x[:, :3], t, context, y)
    # sides not divisible by 2**(levels-1) run as in A1111 (upsampled features resized to the skip connection)
    assert model(x[:, :, :6], t, context, y).shape == (2, 4, 6, x.shape[3])
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:1], context, y)
    with pytest.raises(ValueError, match="context"):
        model(x, t, context[..., :8], y)
    with pytest.raises(ValueError, match="adm_in_channels=48"):
        model(x, t, context, None)
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, context, y[:, :5])
    with pytest.raises(ValueError, match="transformer_depth"):
        UNetModel(replace(SD1_UNET, transformer_depth=(1, 1)), device="meta")
    with pytest.raises(ValueError, match="num_classes"):
        UNetModel(replace(SD1_UNET, adm_in_channels=16), device="meta")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd1-inpaint"])
def test_full_size_parity_with_diffusers(family):
    start = time.perf_counter()
    config = make_checkpoint.family_config(family, "full").unet
    ours = UNetModel(config, device="meta").eval()
    theirs = diffusers_unet(random_weights(ours, seed=11), config)
    errors = _max_errors(ours, theirs, config, torch.Generator().manual_seed(12), size=(32, 32))
    print(f"\nunet parity {family} full: " + ", ".join(f"{k} max|diff|={e:.2e} (max|out|={m:.2f})"
                                                   for k, (e, m) in errors.items())
          + f"; {time.perf_counter() - start:.0f} s")
    for kind, (err, _) in errors.items():
        assert err <= TOL, (family, kind, err)
