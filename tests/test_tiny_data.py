"""Tests for the tiny model's data (scripts/tiny_data.py), its text features, and the committed checkpoint."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import tiny_data  # noqa: E402

CKPT = ROOT / "sdcore" / "weights" / "sdcore-tiny.safetensors"


def test_scenes_are_deterministic_and_captioned():
    a = [tiny_data.sample_scene(np.random.default_rng(5)) for _ in range(3)]
    b = [tiny_data.sample_scene(np.random.default_rng(5)) for _ in range(3)]
    for (im_a, sc_a), (im_b, sc_b) in zip(a, b):
        assert im_a.dtype == np.uint8 and im_a.shape == (64, 64, 3)
        assert np.array_equal(im_a, im_b) and sc_a == sc_b
    captions = set(tiny_data.all_captions())
    rng = np.random.default_rng(0)
    for _ in range(200):
        _, scene = tiny_data.sample_scene(rng)
        assert scene.caption() in captions
        assert scene.background != scene.colour
        assert not (scene.photo_background and scene.background is not None)
    assert "a red circle at the top left on a blue background" in captions
    assert "a red circle" in captions


@pytest.mark.parametrize("shape,area", [
    ("circle", math.pi),  # pi r^2
    ("square", 4.0),  # (2r)^2
    ("triangle", 2.0),  # base 2r, height 2r
    ("cross", 4.0 * 5 / 9),  # a 3x3 grid of (2r/3)-squares minus the four corners
])
def test_shape_areas_match_geometry(shape, area):
    r = 15.0
    cover = tiny_data.shape_mask(shape, 32.0, 32.0, r)
    assert cover.min() >= 0 and cover.max() <= 1
    assert cover.sum() == pytest.approx(area * r * r, rel=0.02)


def test_shape_mask_rejects_unknown_shape():
    with pytest.raises(ValueError, match="shape='hexagon'"):
        tiny_data.shape_mask("hexagon", 32, 32, 10)


def test_detector_reads_true_scenes():
    rng = np.random.default_rng(11)
    pairs = [tiny_data.sample_scene(rng, photo_background_p=0.0) for _ in range(150)]
    dets = [tiny_data.detect_scene(im) for im, _ in pairs]
    assert np.mean([d.colour == s.colour for d, (_, s) in zip(dets, pairs)]) >= 0.98
    assert np.mean([d.shape == s.shape for d, (_, s) in zip(dets, pairs)]) >= 0.97


def test_detector_finds_nothing_on_a_plain_image():
    image = np.full((64, 64, 3), 90, np.uint8)
    det = tiny_data.detect_scene(image)
    assert det.colour is None and det.shape is None and det.object_fraction == 0.0
    with pytest.raises(ValueError, match="uint8"):
        tiny_data.detect_scene(image.astype(np.float32))


def test_photo_splits_are_disjoint():
    assert "grace_hopper" not in tiny_data.photo_names("train")
    assert "grace_hopper" in tiny_data.photo_names("eval")
    with pytest.raises(ValueError, match="held out"):
        tiny_data._split_region("grace_hopper", "train")
    photo = tiny_data.load_photo("astronaut")
    train, held = tiny_data._split_region("astronaut", "train"), tiny_data._split_region("astronaut", "eval")
    assert train.shape[1] + held.shape[1] == photo.shape[1] and train.shape[1] == int(512 * 0.75)
    assert np.array_equal(np.concatenate([train, held], axis=1), photo)
    crops = tiny_data.eval_photo_crops(4)
    assert crops.shape == (4, 64, 64, 3) and crops.dtype == np.uint8
    with pytest.raises(ValueError, match="split="):
        tiny_data.photo_names("test")


def test_training_text_features_equal_inference_encoding():
    """The UNet is trained on exactly what `encode_prompts` gives at inference (77 tokens, EOS padding)."""
    from sdcore.models.text import load_tokenizer
    from sdcore.prompts import encode_prompts
    from train_tiny import caption_tokens, make_text_encoder

    te, tok = make_text_encoder(0), load_tokenizer()
    caps = ["", "a red circle", "a blue cross at the top left on a yellow background"]
    tokens = caption_tokens(tok, caps)
    assert tokens.shape == (3, 77)
    assert tokens[0, 0] == 49406 and (tokens[0, 1:] == 49407).all()
    assert torch.equal(te(tokens).hidden, encode_prompts(te, tok, caps))


@pytest.mark.skipif(not CKPT.exists(), reason="sdcore/weights/sdcore-tiny.safetensors not committed yet")
def test_committed_checkpoint_loads_as_tiny():
    from sdcore.checkpoint import load_checkpoint
    from sdcore.families import TINY

    assert CKPT.stat().st_size <= 60e6
    sd = load_checkpoint(CKPT)
    assert sd.family.name == "tiny"
    assert sd.family.unet == TINY.unet and sd.family.vae == TINY.vae
    assert sd.family.text[0].width == TINY.text[0].width and sd.family.text[0].layers == TINY.text[0].layers
    assert sd.alphas_cumprod.shape == (1000,)
    # Trained, not random: the VAE reconstructs synthetic scenes (eval_tiny.py measures >= 25 dB on 256 scenes).
    rng = np.random.default_rng(3)
    scenes = np.stack([tiny_data.sample_scene(rng, photo_background_p=0.0)[0] for _ in range(8)])
    x = torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = sd.vae.encode(x).mode()
        rec = sd.vae.decode(z).clamp(-1, 1)
    psnr = 10 * math.log10(4.0 / float((rec - x).pow(2).mean()))
    assert psnr >= 22.0
    # scale_factor makes the scaled latents of training scenes roughly unit variance
    assert 0.5 <= float((z * TINY.vae.scale_factor).std()) <= 1.5


def test_scene_radius_and_emphasis_weight():
    """sample_scene records the radius it drew (inside radius_range); emphasis_weight maps that range linearly onto
    EMPHASIS_RANGE (0.5 at the smallest, 1.0 in the middle, 1.5 at the largest)."""
    rng = np.random.default_rng(11)
    for _ in range(50):
        _, scene = tiny_data.sample_scene(rng)
        low, high = tiny_data.radius_range(scene.shape, scene.position)
        assert low <= scene.radius <= high
        assert 0.5 <= tiny_data.emphasis_weight(scene) <= 1.5
    base = tiny_data.Scene("red", "circle", None, None, False)
    assert base == tiny_data.Scene("red", "circle", None, None, False, 17.0)  # the radius is not compared
    from dataclasses import replace
    assert tiny_data.emphasis_weight(replace(base, radius=12.0)) == pytest.approx(0.5)
    assert tiny_data.emphasis_weight(replace(base, radius=16.0)) == pytest.approx(1.0)
    assert tiny_data.emphasis_weight(replace(base, position="left", radius=11.0)) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="radius"):
        tiny_data.emphasis_weight(base)
    with pytest.raises(ValueError, match="shape"):
        tiny_data.radius_range("hexagon", None)
