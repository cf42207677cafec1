"""Tests for the issue-14 metrics of scripts/eval_tiny.py (corner speck, red area, position words) and the stage-2
training helpers of scripts/train_tiny.py, on hand-made inputs whose answer is known by construction."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import eval_tiny  # noqa: E402
import tiny_data  # noqa: E402
import train_tiny  # noqa: E402


def _plain(rgb, n=1):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (n, 64, 64, 3)).copy()


def test_corner_speck_is_zero_on_plain_images():
    assert np.array_equal(eval_tiny.corner_speck(_plain((10, 200, 30), 3)), np.zeros(3))


@pytest.mark.parametrize("corner", eval_tiny.CORNERS)
def test_corner_speck_measures_a_hand_made_speck(corner):
    """A 2 x 2 speck (140, 90, 100) in a (100, 100, 100) image: deviation max(|40|, |-10|, |0|) = 40 at its own
    corner, 0 at the other three."""
    image = _plain((100, 100, 100))[0]
    rows = slice(0, 2) if corner.startswith("top") else slice(62, 64)
    cols = slice(0, 2) if corner.endswith("left") else slice(62, 64)
    image[rows, cols] = (140, 90, 100)
    for other in eval_tiny.CORNERS:
        assert eval_tiny.corner_speck(image, other)[0] == (40.0 if other == corner else 0.0)


def test_corner_speck_neighbourhood_is_the_median_of_the_band():
    """Pixels outside the 8 x 8 block do not count; inside the band a minority of outliers does not move the
    median: a speck of +30 over a band with 10 outlying pixels still reads 30."""
    image = _plain((50, 50, 50))[0]
    image[:56, :] = 255  # outside the bottom-right 8 x 8 block
    image[56, 56:] = 0  # 8 of the band's 55 pixels
    image[-3:, -3:] = 80
    assert eval_tiny.corner_speck(image)[0] == 30.0


def test_corner_speck_rejects_bad_arguments():
    with pytest.raises(ValueError, match="corner"):
        eval_tiny.corner_speck(_plain((0, 0, 0)), "middle")
    with pytest.raises(ValueError, match="size"):
        eval_tiny.corner_speck(_plain((0, 0, 0)), size=8, context=8)
    with pytest.raises(ValueError, match="uint8"):
        eval_tiny.corner_speck(np.zeros((1, 64, 64, 3), np.float32))


def test_plain_images_have_no_corner_speck():
    images = eval_tiny.plain_images(16)
    assert images.shape == (16, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(eval_tiny.corner_speck(images[:8]), np.zeros(8))  # flat colours: exactly 0
    assert eval_tiny.corner_speck(images[8:]).max() <= 24  # named backgrounds: +-12 jitter per channel, one colour


def test_red_area_counts_nearest_palette_red():
    images = _plain(tiny_data.PALETTE["blue"], 2)
    images[0, :10, :10] = (200, 40, 40)  # nearest palette colour red: 100 pixels
    images[1, :5, :4] = tiny_data.PALETTE["orange"]  # orange is not red
    assert eval_tiny.red_area(images).tolist() == [100, 0]


@pytest.mark.parametrize("word,centre,expected", [
    ("left", (10.0, 32.0), True), ("left", (40.0, 5.0), False), ("right", (40.0, 5.0), True),
    ("top", (32.5, 20.0), True), ("top", (20.0, 40.0), False), ("bottom", (20.0, 40.0), True),
    ("bottom", None, False), ("left", (32.0, 32.0), False), ("right", (32.0, 32.0), False),
])
def test_position_followed(word, centre, expected):
    assert eval_tiny.position_followed(centre, word) is expected


def test_position_followed_on_drawn_scenes():
    """The detector's centre of a drawn shape at a named ninth is in the half each of its words names."""
    for position, words in (("left", ["left"]), ("top right", ["top", "right"]), ("bottom left", ["bottom", "left"])):
        cx, cy = (f * 64 for f in tiny_data.POSITIONS[position])
        cover = tiny_data.shape_mask("circle", cx, cy, 9)[..., None]
        image = np.round(np.full((64, 64, 3), 240.0) * (1 - cover) + np.array([220, 30, 30]) * cover)
        centre = tiny_data.detect_scene(image.astype(np.uint8)).centre
        assert all(eval_tiny.position_followed(centre, w) for w in words)
    with pytest.raises(ValueError, match="word"):
        eval_tiny.position_followed((1.0, 1.0), "centre")


def test_edge_weights_mean_one_and_corner_heaviest():
    w = train_tiny.edge_weights(64, band=4, gain=4.0)
    assert w.shape == (64, 64) and abs(float(w.mean()) - 1.0) < 1e-6
    assert float(w[-1, -1]) / float(w[32, 32]) == pytest.approx(9.0)  # 1 + 2 gain against 1
    assert float(w[32, -1]) / float(w[32, 32]) == pytest.approx(5.0)  # 1 + gain


def test_colour_multipliers_weight_only_the_colour_word():
    from sdcore.models.text import load_tokenizer

    tok = load_tokenizer()
    tokens = train_tiny.caption_tokens(tok, ["a purple cross at the top", ""])
    m = train_tiny.colour_multipliers(tokens, torch.tensor([1.4, 0.6]))
    assert tokens[0, 2] == tok.encode("purple")[0]
    assert m[0, 2] == pytest.approx(1.4) and (m[0, :2] == 1).all() and (m[0, 3:] == 1).all()
    assert (m[1] == 1).all()  # the empty caption carries no emphasis


def test_colour_multipliers_match_prompt_parsing():
    """Training's multipliers are what sdcore's prompt parser gives "a (red:1.3) circle" at inference."""
    from sdcore.models.text import load_tokenizer
    from sdcore.prompts import tokenize_line

    tok = load_tokenizer()
    chunk = tokenize_line("a (red:1.3) circle", tok)[0][0]
    m = train_tiny.colour_multipliers(train_tiny.caption_tokens(tok, ["a red circle"]), torch.tensor([1.3]))
    assert train_tiny.caption_tokens(tok, ["a red circle"])[0].tolist() == list(chunk.tokens)
    assert torch.allclose(m[0], torch.tensor(chunk.multipliers, dtype=torch.float32))


def test_corner_loss_counts_only_the_four_corner_blocks():
    """An error of 0.5 on every pixel of one 8 x 8 corner block (and on nothing else in a 4 x 4 interior patch) out
    of four pooled blocks: L1 = 0.5 / 4, MSE = 0.25 / 4; errors outside the corner blocks do not count."""
    x = torch.zeros(2, 3, 32, 40)
    rec = x.clone()
    rec[..., -8:, -8:] = 0.5  # the bottom-right block of every image and channel
    rec[..., 12:16, 12:16] = 9.0  # interior: ignored
    assert float(train_tiny.corner_loss(rec, x, 8)) == pytest.approx(0.5 / 4 + 0.25 / 4)
    assert float(train_tiny.corner_loss(x, x, 8)) == 0.0
    rec2 = x.clone()
    rec2[..., 0, 0] = -1.0  # one pixel of the top-left block of 64 pixels: |d| = d^2 = 1
    assert float(train_tiny.corner_loss(rec2, x, 8)) == pytest.approx(2 * 1 / (4 * 64))


def test_corner_loss_rejects_bad_arguments():
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same"):
        train_tiny.corner_loss(x, torch.zeros(1, 3, 16, 8), 4)
    with pytest.raises(ValueError, match="block"):
        train_tiny.corner_loss(x, x, 17)


@pytest.mark.parametrize("size", [32, 48, 64, 80])
def test_corners_batch_sizes_range_and_flat_images(size):
    x = train_tiny.corners_batch(seed=0, step=3, batch=6, size=size, flat=2)
    assert x.shape == (6, 3, size, size) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    flat = x[-2:].flatten(2)
    assert torch.equal(flat.amax(2), flat.amin(2))  # one colour per image
    assert not torch.equal(x[0].flatten(1).amax(1), x[0].flatten(1).amin(1))  # a photo crop is not plain
    assert torch.equal(x, train_tiny.corners_batch(seed=0, step=3, batch=6, size=size, flat=2))  # from seed, step


def test_corners_batch_crop_cuts_scenes_without_resampling():
    """crop=True: the scenes are exact sub-windows of the 64 px scenes (pixel values of the drawing, no bilinear
    mixing), the photo crops and the stream of draws before them are unchanged; sizes above 64 are refused."""
    rng = train_tiny.step_rng(0, 7, 3)
    full = [train_tiny.tiny_data.photo_crop(rng, "train", size=32) for _ in range(2)]
    scenes = []
    for _ in range(2):
        scenes.append(train_tiny.tiny_data.sample_scene(rng)[0])
        y, x = rng.integers(0, 64 - 32 + 1, 2)
        scenes[-1] = scenes[-1][y:y + 32, x:x + 32]
    want = train_tiny.to_tensor(np.stack(full + scenes))
    got = train_tiny.corners_batch(seed=0, step=3, batch=6, size=32, flat=2, crop=True)
    assert torch.equal(got[:4], want)
    plain = train_tiny.corners_batch(seed=0, step=3, batch=6, size=32, flat=2)
    assert torch.equal(plain[:2], got[:2]) and not torch.equal(plain[2:4], got[2:4])
    with pytest.raises(ValueError, match="size=80"):
        train_tiny.corners_batch(seed=0, step=3, batch=6, size=80, flat=2, crop=True)


def _params(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_fresh_decoder_keeps_the_encoder_and_reinitialises_the_decoder_from_the_seed():
    from sdcore.models.vae import AutoencoderKL

    torch.manual_seed(123)
    vae = AutoencoderKL(train_tiny.tiny_family().vae)
    before = _params(vae)
    vae = train_tiny.fresh_decoder(vae, seed=0)
    after = _params(vae)
    kept = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    renewed = [k for k in before if k.startswith(("decoder.", "post_quant_conv.")) and k.endswith("weight")
               and "norm" not in k]
    assert kept and renewed and set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in kept)
    assert all(not torch.equal(before[k], after[k]) for k in renewed)
    again = _params(train_tiny.fresh_decoder(AutoencoderKL(train_tiny.tiny_family().vae), seed=0))
    assert all(torch.equal(after[k], again[k]) for k in renewed)  # the new decoder comes from the seed alone


def _tiny_unet_workdir(tmp_path, n=4):
    """A workdir holding phase latents' two files for `n` random scenes (so phase unet can run without a VAE)."""
    tmp_path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    torch.save(dict(mean=torch.randn(n, 4, 8, 8, generator=g), std=torch.full((n, 4, 8, 8), 0.01),
                    caption_ids=torch.arange(n) % 2, scale_factor=0.2086), tmp_path / "latents.pt")
    torch.save(dict(hidden=torch.randn(2, 77, 128, generator=g)), tmp_path / "text.pt")
    return tmp_path


def test_unet_phase_continues_the_base_unet(tmp_path):
    """With --base, phase unet starts from the base checkpoint's UNet (model and EMA): after one step at a learning
    rate of 1e-12 its EMA is the base UNet; without --base it starts from a fresh initialisation."""
    from safetensors.torch import load_file

    base = ROOT / "sdcore" / "weights" / "sdcore-tiny.safetensors"
    common = ["unet", "--unet-steps", "1", "--unet-batch", "2", "--unet-lr", "1e-12", "--unet-warmup", "1",
              "--save-every", "1", "--unet-res-blocks", "2"]  # the bundled UNet's two ResBlocks per level
    train_tiny.main(common + ["--workdir", str(_tiny_unet_workdir(tmp_path / "a")), "--base", str(base)])
    train_tiny.main(common + ["--workdir", str(_tiny_unet_workdir(tmp_path / "b"))])
    prefix = "model.diffusion_model."
    want = {k[len(prefix):]: v.float() for k, v in load_file(str(base)).items() if k.startswith(prefix)}
    continued = torch.load(tmp_path / "a" / "unet_state.pt", weights_only=True)["ema"]
    fresh = torch.load(tmp_path / "b" / "unet_state.pt", weights_only=True)["ema"]
    assert set(continued) == set(want)
    assert all(torch.allclose(continued[k], want[k], atol=1e-6) for k in want)
    assert not torch.allclose(fresh["out.2.weight"], want["out.2.weight"])


def test_corner_sheet_places_each_bottom_right_crop():
    a = np.zeros((2, 64, 64, 3), np.uint8)
    a[:, -16:, -16:] = 200
    b = a.copy()
    b[1, -1, -1] = (255, 0, 0)  # a one-pixel speck in the second image of the second row
    sheet = np.asarray(eval_tiny.corner_sheet([a, b], crop=16, gap=2, zoom=1))
    assert sheet.shape == (34, 34, 3)
    assert (sheet[:16, :16] == 200).all() and (sheet[16:18] == 255).all()  # a cell, then the white gap
    assert tuple(sheet[33, 33]) == (255, 0, 0) and tuple(sheet[33, 15]) == (200, 200, 200)
    with pytest.raises(ValueError, match="same number"):
        eval_tiny.corner_sheet([a, a[:1]])


def test_corner_gain_ramp():
    at = train_tiny.corner_gain_at
    assert at(0, 100, 5.0, (0.0, 0.0)) == 5.0 and at(99, 100, 5.0, (0.0, 0.0)) == 5.0  # constant
    assert at(39, 100, 5.0, (0.4, 0.7)) == 0.0
    assert at(55, 100, 5.0, (0.4, 0.7)) == pytest.approx(2.5)
    assert at(70, 100, 5.0, (0.4, 0.7)) == 5.0 and at(99, 100, 5.0, (0.4, 0.7)) == 5.0
    assert at(49, 100, 5.0, (0.5, 0.5)) == 0.0 and at(50, 100, 5.0, (0.5, 0.5)) == 5.0  # a step at 50 %
    with pytest.raises(ValueError, match="ramp"):
        at(0, 100, 5.0, (0.7, 0.4))


def test_cfg_sweep_passes_each_scale_and_reads_colour_and_shape(monkeypatch):
    """A txt2img stand-in draws the prompted red circle at CFG >= 5 and a green square below: the sweep's keys
    name each scale, and its shares are those of the detector on the drawn images (1 at 5 and 7, 0 at 3)."""
    scales_seen = []

    def fake_txt2img(sd, prompts, seeds, steps=20, cfg_scale=6.0):
        scales_seen.append(cfg_scale)
        colour, shape = ("red", "circle") if cfg_scale >= 5 else ("green", "square")
        cover = tiny_data.shape_mask(shape, 32, 32, 20)[..., None]
        rgb = np.array(tiny_data.PALETTE[colour])
        image = np.round(np.full((64, 64, 3), 240.0) * (1 - cover) + rgb * cover).astype(np.uint8)
        return np.stack([image] * len(prompts))

    monkeypatch.setattr(eval_tiny, "eval_prompts", lambda: [("red", "circle")] * 3)
    monkeypatch.setattr(eval_tiny, "txt2img", fake_txt2img)
    out = eval_tiny.eval_cfg_sweep(None, [3, 5, 7.5])
    assert scales_seen == [3, 5, 7.5]
    assert out == {"prompt_colour_acc_cfg3": 0.0, "prompt_shape_acc_cfg3": 0.0,
                   "prompt_colour_acc_cfg5": 1.0, "prompt_shape_acc_cfg5": 1.0,
                   "prompt_colour_acc_cfg7.5": 1.0, "prompt_shape_acc_cfg7.5": 1.0}
    for bad, match in (([], "at least one"), ([0.5], "0.5"), ([float("nan")], "nan")):
        with pytest.raises(ValueError, match=match):
            eval_tiny.eval_cfg_sweep(None, bad)


def test_cfg_sweep_cli_rejects_a_scale_below_one_before_loading(capsys):
    with pytest.raises(SystemExit) as e:
        eval_tiny.main(["--ckpt", "/nonexistent.safetensors", "--cfg-sweep", "6", "0"])
    assert e.value.code == 2 and "--cfg-sweep: scales: CFG scale 0.0 is not a finite number >= 1" in capsys.readouterr().err


def test_constant_latent_speck_decodes_an_edgeless_latent():
    """A decoder stand-in that shows its latent as a grey image with one cell-sized pixel block changed at the
    bottom right gives exactly that change; one that paints nothing gives 0; the latent it receives is constant."""
    seen = []

    class Vae:
        def encode(self, x):
            return type("P", (), {"mode": lambda self: x[:, :1, ::8, ::8] * 0 + x.mean()})()

        def decode(self, z):
            seen.append(z)
            image = torch.zeros(z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8)
            image[..., -1, -1] = speck
            return image

    colours = np.array([[10, 20, 30], [200, 100, 0]], np.uint8)
    speck = 0.0
    assert eval_tiny.constant_latent_speck(Vae(), colours, 32).tolist() == [0.0, 0.0]
    speck = 0.5  # sRGB 127.5 * 1.5 = 191.25 -> 191 against the grey 128 of the rest
    assert eval_tiny.constant_latent_speck(Vae(), colours, 64).tolist() == [63.0, 63.0]
    assert seen[-1].shape == (2, 1, 8, 8) and bool((seen[-1] == seen[-1][..., :1, :1]).all())
    with pytest.raises(ValueError, match="size=60"):
        eval_tiny.constant_latent_speck(Vae(), colours, 60)


def test_interior_speck_sees_the_centre_not_the_corners():
    image = _plain((40, 80, 120), n=2)
    image[0, 31:34, 31:34] = (40, 80, 200)  # the 3 x 3 pixels centred on pixel (32, 32) of a 64 px image
    image[1, -3:, -3:] = (255, 255, 255)  # a corner speck only
    assert eval_tiny.interior_speck(image).tolist() == [80.0, 0.0]
    assert eval_tiny.corner_speck(image).tolist() == [0.0, 215.0]


def test_unet_res_blocks_exports_a_checkpoint_that_loads_as_tiny(tmp_path):
    """--unet-res-blocks 1 trains and exports a UNet with one ResBlock per level (stage 1's, against TINY's two);
    the loader reads that from the file's shapes and still detects family "tiny"."""
    from sdcore import load_checkpoint

    work = _tiny_unet_workdir(tmp_path / "w")
    out = tmp_path / "rb1.safetensors"
    common = ["--workdir", str(work), "--unet-res-blocks", "1"]
    train_tiny.main(["unet", "--unet-steps", "1", "--unet-batch", "2", "--unet-warmup", "1", "--save-every", "1"]
                    + common)
    train_tiny.main(["export", "--out", str(out)] + common)
    model = load_checkpoint(out)
    assert model.family.name == "tiny" and model.family.unet.num_res_blocks == 1
    trained = torch.load(work / "unet_state.pt", weights_only=True)["ema"]
    assert torch.equal(model.unet.state_dict()["input_blocks.3.0.in_layers.2.weight"].float(),
                       trained["input_blocks.3.0.in_layers.2.weight"].half().float())


def test_vae_sizes_cycle_with_flat_images_and_the_ramped_corner_loss(tmp_path, monkeypatch):
    """Phase vae with --vae-sizes draws corners_batch images at the listed sizes in turn (--corner-flat plain ones)
    and adds corner_gain_at(step) x corner_loss: with corner_loss fixed at 1 the logged loss exceeds the plain
    VAE loss by exactly the ramp's gain (0 before the ramp's start, the full gain after its end)."""
    seen, logged = [], []
    batch = train_tiny.corners_batch

    def recording_batch(seed, step, n, size, flat):
        seen.append((size, flat))
        return batch(seed, step, n, size, flat)

    monkeypatch.setattr(train_tiny, "corners_batch", recording_batch)
    monkeypatch.setattr(train_tiny, "corner_loss", lambda rec, x, block: torch.tensor(1.0))
    monkeypatch.setattr(train_tiny, "append_log", lambda path, row: logged.append(row))
    train_tiny.main(["vae", "--workdir", str(tmp_path), "--no-bf16", "--vae-sizes", "32,48", "--vae-batch", "3",
                     "--corner-flat", "1", "--corner-gain", "2", "--corner-ramp", "0.5,0.5", "--vae-steps", "20",
                     "--save-every", "100"])
    assert seen == [(32, 1), (48, 1)] * 10
    by_step = {row["step"]: row for row in logged}  # a row every 10 steps: step 0 (gain 0) and step 10 (gain 2)
    plain = {s: by_step[s]["l1"] + by_step[s]["mse"] for s in (0, 10)}
    assert by_step[0]["loss"] == pytest.approx(plain[0], abs=1e-3)
    assert by_step[10]["loss"] == pytest.approx(plain[10] + 2.0, abs=1e-3)


def test_mix_photos_swaps_in_photo_latents_under_the_empty_caption():
    x0 = torch.full((400, 4, 2, 2), 7.0)
    ids = torch.arange(1, 401)
    mean, std = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    x0_in, ids_in = x0.clone(), ids.clone()
    out, out_ids = train_tiny.mix_photos(x0, ids, (mean, std), 0.5, 0.25, torch.Generator().manual_seed(0))
    photo = out_ids == 0
    assert torch.equal(x0, x0_in) and torch.equal(ids, ids_in)  # inputs kept
    assert 0.18 < photo.float().mean() < 0.32  # p = 0.25 of 400 draws
    assert torch.equal(out_ids[~photo], ids[~photo]) and (out[~photo] == 7.0).all()
    # photo rows: scale 0.5 x (mean of one crop + std 0 x eps), mean of crop k is k everywhere
    assert set(out[photo].flatten().tolist()) <= {0.0, 0.5, 1.0} and len(set(out[photo][:, 0, 0, 0].tolist())) == 3
    again = train_tiny.mix_photos(x0, ids, (mean, std), 0.5, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out) and torch.equal(again[1], out_ids)
    none = train_tiny.mix_photos(x0, ids, (mean, std), 0.5, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(none[0], x0) and torch.equal(none[1], ids)


def test_corners_phase_starts_from_corner_from_state(tmp_path):
    """--corner-from: phase corners starts from that state file's EMA decoder (after one step at lr 1e-12 its EMA is
    the file's), not from the --base decoder; the encoder stays the base's."""
    from safetensors.torch import load_file

    base = ROOT / "sdcore" / "weights" / "sdcore-tiny.safetensors"
    source = {k: v + 0.01 for k, v in train_tiny.DecoderOnly(train_tiny.base_module(
        type("A", (), {"base": str(base)})(), "first_stage_model.",
        train_tiny.AutoencoderKL(train_tiny.tiny_family().vae))).state_dict().items()}
    torch.save(dict(ema=source), tmp_path / "earlier.pt")
    train_tiny.main(["corners", "--base", str(base), "--workdir", str(tmp_path / "w"), "--no-bf16",
                     "--corner-from", str(tmp_path / "earlier.pt"), "--corner-steps", "1", "--corner-lr", "1e-12",
                     "--corner-warmup", "1", "--corner-sizes", "32", "--decoder-batch", "2", "--corner-flat", "1",
                     "--save-every", "1"])
    ema = torch.load(tmp_path / "w" / "corners_state.pt", weights_only=True)["ema"]
    assert set(ema) == set(source)
    assert all(torch.allclose(ema[k], source[k], atol=1e-6) for k in source)
    want = load_file(str(base))["first_stage_model.decoder.conv_out.weight"].float()
    assert not torch.allclose(ema["decoder.conv_out.weight"], want, atol=1e-3)


def test_distill_loss_counts_everything_but_the_corner_blocks():
    """An error of 0.5 on a 4 x 4 interior patch of a 32 x 32 image counts over the 32*32 - 4*8*8 = 768 pixels
    outside the corner blocks (L1 = 0.5 * 16 / 768, MSE = 0.25 * 16 / 768); errors inside a corner block do not."""
    held = torch.zeros(2, 3, 32, 32)
    rec = held.clone()
    rec[..., 12:16, 12:16] = 0.5
    rec[..., -8:, -8:] = 9.0  # the bottom-right block: left to corner_loss
    assert float(train_tiny.distill_loss(rec, held, 8)) == pytest.approx((0.5 + 0.25) * 16 / 768)
    assert float(train_tiny.distill_loss(held, held, 8)) == 0.0
    blocks = train_tiny.corner_blocks(32, 8)
    assert int(blocks.sum()) == 4 * 64 and bool(blocks[0, 31]) and not bool(blocks[8, 0])
    with pytest.raises(ValueError, match="same"):
        train_tiny.distill_loss(rec, torch.zeros(2, 3, 32, 16), 8)
    with pytest.raises(ValueError, match="block"):
        train_tiny.corner_blocks(16, 17)


def test_corners_phase_distills_from_its_starting_decoder(tmp_path):
    """--corner-distill: the loss is the weight x distill_loss against the decoder the run starts from (so 0 at the
    first step, where both are the same) plus the corner loss; the plain reconstruction terms are gone."""
    import csv

    base = ROOT / "sdcore" / "weights" / "sdcore-tiny.safetensors"
    train_tiny.main(["corners", "--base", str(base), "--workdir", str(tmp_path / "w"), "--no-bf16",
                     "--corner-distill", "3", "--corner-steps", "11", "--corner-lr", "1e-3", "--corner-gain", "2",
                     "--corner-warmup", "1", "--corner-sizes", "32", "--decoder-batch", "2", "--corner-flat", "1",
                     "--save-every", "100"])
    rows = list(csv.DictReader(open(tmp_path / "w" / "corners_log.csv")))
    assert "l1" not in rows[0] and float(rows[0]["keep"]) == 0.0
    assert float(rows[0]["loss"]) == pytest.approx(2 * float(rows[0]["corner"]), rel=1e-5)
    assert float(rows[1]["keep"]) > 0  # the student has moved away from its teacher after 10 steps at lr 1e-3
    assert float(rows[1]["loss"]) == pytest.approx(3 * float(rows[1]["keep"]) + 2 * float(rows[1]["corner"]),
                                                    rel=1e-5)


def _recipe_commands(workdir: Path) -> list[list[str]]:
    """The train_tiny.py argument lists of scripts/train_tiny_recipe.sh, with $W and $OUT filled in."""
    import shlex

    text = (ROOT / "scripts" / "train_tiny_recipe.sh").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if '"${T[@]}"' not in line or line.lstrip().startswith("#"):
            continue
        line = line.split('"${T[@]}"', 1)[1]
        line = line.replace("$W", str(workdir)).replace("$OUT", str(workdir / "out.safetensors"))
        commands.append(shlex.split(line))
    return commands


def test_recipe_script_runs_the_phases_in_order_with_parsed_options(tmp_path, monkeypatch):
    """Every train_tiny.py command of the recipe script parses, and the phases and the options the card names
    arrive: latents from the VAE file in fp32, two ResBlocks in unet, joint and the exports, the photo share in
    joint, the final export from the one workdir that holds the UNet and joint states."""
    seen = []
    for name in ("train_vae", "encode_dataset", "train_unet", "export", "train_joint", "train_corners"):
        monkeypatch.setattr(train_tiny, name, lambda args, name=name: seen.append((name, args)))
    for argv in _recipe_commands(tmp_path):
        train_tiny.main(argv)
    assert [n for n, _ in seen] == ["train_vae", "export", "encode_dataset", "train_unet", "export", "train_joint",
                                    "train_corners", "export"]
    args = [a for _, a in seen]
    assert [a.unet_res_blocks for a in args[3:6] + args[7:]] == [2, 2, 2, 2]
    assert args[2].base.endswith("vae.safetensors") and not args[2].bf16
    assert args[5].photo_p == 0.15 and args[5].joint_steps == 800 and args[5].base.endswith("unet.safetensors")
    corners = args[6]
    assert corners.base.endswith("vae.safetensors") and not corners.bf16 and corners.corner_from is None
    assert (corners.corner_steps, corners.corner_distill, corners.corner_lr, corners.corner_gain) == (2600, 5.0, 1e-3, 10)
    assert corners.corner_sizes == "32,48,64,80" and corners.corner_block == 8 and corners.corner_flat == 2
    assert args[7].out == str(tmp_path / "out.safetensors") and args[7].base.endswith("unet.safetensors")
    # one workdir: the final export finds the unet, joint and corners states
    assert len({a.workdir for a in args[2:]}) == 1


def test_plot_curves_one_panel_per_phase_log(tmp_path):
    from PIL import Image

    logs = [("a", "unet", "step,loss,mse"), ("a", "corners", "step,l1,mse,corner"), ("b", "joint", "step,loss,mse"),
            ("b", "unet", "step,loss,mse")]
    for folder, name, header in logs:
        work = tmp_path / folder
        rows = [header] + [",".join([str(10 * i)] + ["%g" % (1.0 / (i + 1))] * (header.count(",")))
                           for i in range(30)]
        work.mkdir(exist_ok=True)
        (work / f"{name}_log.csv").write_text("\n".join(rows) + "\n")
    eval_tiny.plot_curves([tmp_path / "a"], tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size == (1000, 360)  # two panels of 5 x 3.6 in at 100 dpi
    eval_tiny.plot_curves([tmp_path / "a", tmp_path / "b"], tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").size == (2000, 360)  # unet twice, joint, corners
    with pytest.raises(ValueError, match="no train_tiny.py log"):
        eval_tiny.plot_curves([tmp_path / "empty"], tmp_path / "e.png")
