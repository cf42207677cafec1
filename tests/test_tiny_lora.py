"""The tiny model's "star" LoRA (issue 10 item 6): the star shape and its detector (scripts/tiny_data.py), the kohya
key names of scripts/train_lora_tiny.py against diffusers' own LDM -> diffusers conversion, training determinism and
resumption, and the shipped file: layout, exact restore, and stars on a few seeds."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_data  # noqa: E402
import train_lora_tiny as tl  # noqa: E402

CKPT = ROOT / "sdcore" / "weights" / "sdcore-tiny.safetensors"
LORA = ROOT / "sdcore" / "weights" / "sdcore-tiny-star-lora.safetensors"


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return tl.load_tiny(CKPT)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- the shape and the detector -----------------------------------------------------------------------------------

@pytest.mark.parametrize("radius", [10.0, 15.5, 21.0])
def test_star_area_and_box_match_pentagram_geometry(radius):
    # area of the 10-gon with vertices alternating at R and r = R cos72/cos36, 36 degrees apart: 10 * (R r sin36) / 2;
    # bounding box: width 2 R sin72, height R (1 + cos36), centred on (cx, cy)
    r = radius * math.cos(math.radians(72)) / math.cos(math.radians(36))
    area = 5 * radius * r * math.sin(math.radians(36))
    cover = tiny_data.shape_mask("star", 32.0, 32.0, radius, size=128)
    assert cover.sum() == pytest.approx(area, rel=0.02)  # as test_tiny_data: 4x supersampled edges
    cols, rows = np.nonzero(cover.sum(axis=0) > 0)[0], np.nonzero(cover.sum(axis=1) > 0)[0]
    assert cols.max() + 1 - cols.min() == pytest.approx(2 * radius * math.sin(math.radians(72)), abs=1.5)
    assert rows.max() + 1 - rows.min() == pytest.approx(radius * (1 + math.cos(math.radians(36))), abs=1.5)
    assert (rows.min() + rows.max() + 1) / 2 == pytest.approx(32.0, abs=1.0)


def test_star_scenes_use_star_radii_and_leave_base_draws_unchanged():
    for seed in range(5):
        a = tiny_data.sample_scene(np.random.default_rng(seed))
        b = tiny_data.sample_scene(np.random.default_rng(seed), shapes=tiny_data.SHAPES)
        assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    rng = np.random.default_rng(3)
    scenes = [tiny_data.sample_scene(rng, shapes=("star",)) for _ in range(40)]
    assert {sc.shape for _, sc in scenes} == {"star"}
    assert all(sc.caption().startswith(f"a {sc.colour} star") for _, sc in scenes)
    assert {sc.position is None for _, sc in scenes} == {True, False}
    with pytest.raises(ValueError, match="shapes="):
        tiny_data.sample_scene(rng, shapes=("hexagon",))


def test_radial_harmonics_against_the_analytic_pentagram_profile():
    # r(theta) of the pentagram, by intersecting each ray with the edge from an inner vertex (radius r) to the next
    # outer vertex (radius R): an independent derivation of the profile the mask-based estimate must reproduce
    big, radius = 256, 100.0
    inner = radius * math.cos(math.radians(72)) / math.cos(math.radians(36))
    theta = np.arange(3600) * 2 * np.pi / 3600
    folded = np.abs(np.mod(theta, 2 * np.pi / 5) - np.pi / 5)  # 0 at an inner vertex, 36 deg at an outer one
    ix, ox, oy = inner, radius * math.cos(math.pi / 5), radius * math.sin(math.pi / 5)
    # point t*(cos f, sin f) on the line through (ix, 0) and (ox, oy): t = ix*oy / (oy cos f - (ox - ix) sin f)
    r = ix * oy / (oy * np.cos(folded) - (ox - ix) * np.sin(folded))
    analytic = 2 * np.abs(np.fft.rfft(r))[1:9] / np.abs(np.fft.rfft(r))[0]
    centre = big / 2 - (1 - math.cos(math.pi / 5)) / 2 * radius  # radial_harmonics uses the centroid: the star's centre
    mask = tiny_data.shape_mask("star", big / 2, centre, radius, size=big) > 0.5
    assert tiny_data.radial_harmonics(mask) == pytest.approx(analytic, abs=0.01)
    assert analytic[4] == pytest.approx(0.380, abs=0.005) and np.delete(analytic, [4]).max() < 1e-6
    circle = tiny_data.shape_mask("circle", 128, 128, 100, size=big) > 0.5
    assert np.abs(tiny_data.radial_harmonics(circle)).max() < 0.01
    square = tiny_data.radial_harmonics(tiny_data.shape_mask("square", 128, 128, 100, size=big) > 0.5)
    assert square[3] > 0.1 and np.delete(square, [3, 7]).max() < 0.01  # 4-fold: only k = 4, 8
    assert not tiny_data.radial_harmonics(np.zeros((8, 8), bool)).any()
    with pytest.raises(ValueError, match="mask must be bool"):
        tiny_data.radial_harmonics(np.zeros((8, 8)))


def drawn(shape: str, colour: str, background: str, radius: float) -> np.ndarray:
    cover = tiny_data.shape_mask(shape, 32.0, 32.0, radius)[..., None]
    image = np.asarray(tiny_data.PALETTE[background], np.float32) * (1 - cover) \
        + np.asarray(tiny_data.PALETTE[colour], np.float32) * cover
    return np.round(image).astype(np.uint8)


def test_detect_star_on_drawn_stars_and_the_four_base_shapes(tiny):
    colours = list(tiny_data.PALETTE)
    stars = [drawn("star", colours[i], colours[(i + 3) % 8], 15 + i) for i in range(8)]
    others = [drawn(s, colours[i], colours[(i + 5) % 8], 12 + 2 * i) for s in tiny_data.SHAPES for i in range(5)]
    assert all(tiny_data.detect_star(im) for im in stars)
    assert not any(tiny_data.detect_star(im) for im in others)
    # after the VAE round trip (what a generated image can be at best): loose bounds, see the LoRA card
    import eval_tiny

    assert np.mean([tiny_data.detect_star(im) for im in eval_tiny.vae_roundtrip(tiny.vae, np.stack(stars))]) >= 0.75
    assert not any(tiny_data.detect_star(im) for im in eval_tiny.vae_roundtrip(tiny.vae, np.stack(others)))
    assert not tiny_data.detect_star(np.full((64, 64, 3), 90, np.uint8))


# ---- key names ----------------------------------------------------------------------------------------------------

def test_diffusers_names_hand_derived():
    # tiny: 1 ResBlock per level, so B = 2 blocks per level; SD1: 2 ResBlocks, B = 3 (A1111's 1 + 3i + j, 3i + j)
    name = tl.ldm_to_diffusers_unet_name
    assert name("input_blocks.3.1.proj_in", 1) == "down_blocks.1.attentions.0.proj_in"
    assert name("input_blocks.5.1.transformer_blocks.0.attn2.to_k", 1) == \
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k"
    assert name("output_blocks.2.1.proj_out", 1) == "up_blocks.1.attentions.0.proj_out"
    assert name("output_blocks.5.1.proj_out", 1) == "up_blocks.2.attentions.1.proj_out"
    assert name("middle_block.1.transformer_blocks.0.ff.net.2", 1) == \
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    assert name("input_blocks.4.1.proj_in", 2) == "down_blocks.1.attentions.0.proj_in"
    assert name("output_blocks.3.1.proj_in", 2) == "up_blocks.1.attentions.0.proj_in"
    assert tl.kohya_unet_key("input_blocks.1.1.transformer_blocks.0.attn1.to_out.0", 1) == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert tl.kohya_te_key(1, "attn.q") == "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    assert tl.kohya_te_key(0, "mlp.c_proj") == "lora_te_text_model_encoder_layers_0_mlp_fc2"
    with pytest.raises(ValueError, match="input_blocks.2.1"):
        name("input_blocks.2.1.proj_in", 1)  # the tiny UNet's Downsample slot
    with pytest.raises(ValueError, match="part="):
        tl.kohya_te_key(0, "attn.in_proj")


def test_diffusers_names_match_diffusers_own_conversion(tiny):
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(ROOT / "tests"))
    from _diffusers_oracle import diffusers_unet

    model = diffusers_unet(tiny.unet.state_dict(), tiny.family.unet, tiny.family.vae)
    targets = tl.unet_targets(tiny.unet)
    blocks = tiny.family.unet.num_res_blocks
    # 3 levels x (blocks down + blocks + 1 up) + the middle SpatialTransformers, each (proj_in, proj_out,
    # 2 x 4 attention, 2 ff)
    assert len(targets) == (3 * (2 * blocks + 1) + 1) * 12
    for name in targets:
        theirs = model.get_submodule(tl.ldm_to_diffusers_unet_name(name, blocks)).weight
        assert torch.equal(theirs, tiny.unet.get_submodule(name).weight), name


# ---- training -----------------------------------------------------------------------------------------------------

SMALL = tl.LoraTrainConfig(steps=4, batch=4, n_star=6, n_base=3, save_every=1, rank=2, alpha=1.0, te_rank=2,
                           warmup=1)


def load_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_training_is_deterministic_and_resumable(tmp_path):
    torch.set_num_threads(1)
    a = tl.train(SMALL, tmp_path / "a", tmp_path / "a.safetensors", log=lambda *_: None)
    # the bundled UNet's 16 SpatialTransformers x 12 modules, the text encoder's 2 layers x 6
    assert a["modules"] == 16 * 12 + 2 * 6 and a["tensors"] == 3 * a["modules"]
    with pytest.raises(tl.Interrupted):
        tl.train(SMALL, tmp_path / "b", tmp_path / "b.safetensors", log=lambda *_: None, stop_at=2)
    assert not (tmp_path / "b.safetensors").exists()
    tl.train(SMALL, tmp_path / "b", tmp_path / "b.safetensors", log=lambda *_: None)
    ta, tb = load_tensors(tmp_path / "a.safetensors"), load_tensors(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert any(k.endswith("lora_up.weight") and ta[k].abs().max() > 0 for k in ta)  # it did learn something
    with pytest.raises(SystemExit, match="another configuration"):
        tl.train(tl.LoraTrainConfig(steps=5, batch=4, n_star=6, n_base=3), tmp_path / "b", tmp_path / "c.safetensors")


def test_exported_factors_reproduce_the_trained_forward(tmp_path, tiny):
    """The file's layout (conv factors [r, in, 1, 1], alpha, q/k/v rows of in_proj_weight) merged into the weights
    gives the same UNet and text-encoder outputs as the parametrized modules the factors were trained in."""
    torch.set_num_threads(1)
    path = tmp_path / "l.safetensors"
    tl.train(tl.LoraTrainConfig(steps=3, batch=4, n_star=6, n_base=3, rank=2, alpha=1.0, te_rank=2, lr=0.05,
                                warmup=1, ema=0.0), tmp_path / "w", path, log=lambda *_: None)
    tensors = load_tensors(path)
    te = tiny.text_encoders[0]
    deltas = tl.attach(tiny.unet, te, SMALL, tiny.family.unet.num_res_blocks, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for key, d in deltas.items():
            d.down.copy_(tensors[f"{key}.lora_down.weight"].flatten(1).float())
            d.up.copy_(tensors[f"{key}.lora_up.weight"].flatten(1).float())
            d.alpha = float(tensors[f"{key}.alpha"])
    tokens = torch.randint(0, 49406, (2, 77))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        context = te(tokens).hidden
        expected = (context, tiny.unet(x, t, context=context))
    tl.detach_all(tiny.unet, te)
    before = state(tiny.unet), state(te)
    with tl.own_merge(tiny, path), torch.no_grad():
        context = te(tokens).hidden
        got = (context, tiny.unet(x, t, context=context))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    for b, module in zip(before, (tiny.unet, te)):
        after = state(module)
        assert all(torch.equal(after[k], b[k]) for k in b)


# ---- the shipped file ---------------------------------------------------------------------------------------------

def test_shipped_lora_layout_and_size(tiny):
    from safetensors import safe_open

    assert LORA.stat().st_size < 2_000_000
    tensors = load_tensors(LORA)
    modules = {k.split(".", 1)[0] for k in tensors}
    expected = {tl.kohya_unet_key(n, tiny.family.unet.num_res_blocks) for n in tl.unet_targets(tiny.unet)}
    assert {m for m in modules if m.startswith("lora_unet_")} == expected
    assert all(m.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for m in modules)
    with safe_open(str(LORA), "pt") as f:
        meta = f.metadata()
    rank = int(meta["ss_network_dim"])
    assert 4 <= rank <= 16
    for m in modules:
        assert {k.split(".", 1)[1] for k in tensors if k.split(".", 1)[0] == m} == \
            {"lora_down.weight", "lora_up.weight", "alpha"}
        conv = m.endswith(("proj_in", "proj_out"))
        assert tensors[f"{m}.lora_down.weight"].dim() == tensors[f"{m}.lora_up.weight"].dim() == (4 if conv else 2)
        assert tensors[f"{m}.alpha"].dim() == 0


def test_shipped_lora_draws_stars_and_restores_the_model(tiny):
    """8 seeds of "a {colour} star" through process_images: the LoRA at weight 1 gives stars, the base does not
    (loose bounds on 8 seeds; the card's 50-seed numbers come from `train_lora_tiny.py --eval`). After the run
    every weight is bit-identical to before."""
    before = state(tiny.unet), state(tiny.text_encoders[0])
    prompts = tl.eval_prompts(8)
    base = tl.txt2img(tiny, prompts, batch_size=8)
    with tl.merged(tiny, LORA):
        lora = tl.txt2img(tiny, prompts, batch_size=8)
    assert tl.star_rate(lora) >= 5 / 8
    assert tl.star_rate(base) <= 1 / 8
    for b, module in zip(before, (tiny.unet, tiny.text_encoders[0])):
        after = state(module)
        assert all(torch.equal(after[k], b[k]) for k in b)


def test_own_merge_agrees_with_sdcore_networks(tiny):
    """This script's merge (used when sdcore.networks is missing) and sdcore.networks change the same weights by
    the same amounts."""
    networks = pytest.importorskip("sdcore.networks")
    net = networks.load_network(LORA, tiny)
    base = state(tiny.unet)
    with networks.applied(tiny, [(net, 1.0, 1.0)]):
        theirs, theirs_te = state(tiny.unet), state(tiny.text_encoders[0])
    with tl.own_merge(tiny, LORA):
        ours, ours_te = state(tiny.unet), state(tiny.text_encoders[0])
    assert {k for k in base if not torch.equal(theirs[k], base[k])} == \
        {n + ".weight" for n in tl.unet_targets(tiny.unet)}
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)
    for k in theirs_te:
        torch.testing.assert_close(ours_te[k], theirs_te[k], rtol=0, atol=1e-6)
