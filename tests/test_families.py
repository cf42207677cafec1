"""Every model family from one checkpoint file (issue 3): detection errors, eps/v resolution, separate VAE files,
precision, parity of UNet / VAE / text conditioning with diffusers, transformers and open_clip, and img2img +
inpainting end to end on a real photo through the Python API and the CLI.

Checkpoints are scripts/make_checkpoint.py's tiny random-weight files in each family's real key layout; the same
configs at full size are in the `slow` tier. Layout detection of every family at both sizes is in
tests/test_make_checkpoint.py (`test_every_family_is_detected_as_itself`).
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import make_checkpoint as mc
from _diffusers_oracle import UNET_PREFIX, diffusers_vae, ldm_original_config
from conftest import _write, rect_mask
from sdcore import cli, families
from sdcore.cli import commands
from sdcore.checkpoint import (TEXT_LAYOUTS, CheckpointError, Detection, detect_family, load_checkpoint,
                               open_state_dict, resolve_prediction, sub_state_dict, v_prediction_probe)
from sdcore.models.unet import UNetModel
from sdcore.processing import StableDiffusionProcessingImg2Img, process_images
from sdcore.prompts import vector_conditioning

TOL = 1e-4  # fp32 max abs difference (issue 3)
FAMILIES = ("sd2", "sd2-v", "sd2-inpaint", "instruct-pix2pix", "sdxl", "sdxl-refiner", "sdxl-inpaint")
SIZE = 64


@pytest.fixture(scope="module")
def tiny(ckpt_dir):
    """family name -> (path, loaded model) of its tiny checkpoint; each file is written and loaded once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = _write(ckpt_dir, family, "safetensors")
            cache[family] = path, load_checkpoint(path)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def photo(astronaut):
    return astronaut.resize((SIZE, SIZE), Image.LANCZOS)


def _link(src: Path, dst: Path) -> Path:
    os.link(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------- detection


def test_unrecognised_checkpoints_list_what_was_looked_for():
    with pytest.raises(CheckpointError) as e:
        detect_family({UNET_PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3)})
    assert all(key in str(e.value) for _, key, _ in TEXT_LAYOUTS)
    shapes = mc.layout_shapes("sd2", "tiny")
    shapes[UNET_PREFIX + "input_blocks.0.0.weight"] = (64, 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"takes 8 channels; known for the sd2 layout: \[4, 9\]"):
        detect_family(shapes)


def test_inconsistent_text_and_unet_widths_raise():
    shapes = mc.layout_shapes("sd2", "tiny")
    shapes["cond_stage_model.model.token_embedding.weight"] = (49408, 128)
    with pytest.raises(CheckpointError, match="context_dim 64 != text encoder width 128"):
        detect_family(shapes)
    shapes = mc.layout_shapes("sdxl", "tiny")
    shapes[UNET_PREFIX + "label_emb.0.0.weight"] = (256, 1601)
    with pytest.raises(CheckpointError, match=r"64 \+ 6 x 256 = 1600"):
        detect_family(shapes)


def test_detection_reads_sdxl_structure_off_full_shapes():
    det = detect_family(mc.layout_shapes("sdxl", "full"))
    assert det.family == families.SDXL and not det.probe_prediction
    assert (det.prediction, det.in_channels) == ("eps", 4)
    assert any("y = pooled + original_size_as_tuple" in r and "1280 + 6 x 256 = 2816" in r for r in det.reasons)
    refiner = detect_family(mc.layout_shapes("sdxl-refiner", "full"))
    assert refiner.family == families.SDXL_REFINER
    assert any("1280 + 5 x 256 = 2560" in r for r in refiner.reasons)


# ------------------------------------------------------------------------------------------------- eps or v


def _sd2_unet_with_output_bias(bias: float) -> UNetModel:
    config = mc.family_config("sd2", "tiny").unet
    model = UNetModel(config, device="meta")
    weights = mc.random_like(model.state_dict(), torch.Generator().manual_seed(3))
    weights["out.2.weight"].zero_()
    weights["out.2.bias"].fill_(bias)
    model.load_state_dict(weights, strict=True, assign=True)
    return model


@pytest.mark.parametrize("bias, expected", [(-0.4, "eps"), (-0.6, "v"), (0.0, "eps"), (-3.0, "v")])
def test_v_probe_hand_values(bias, expected):
    """A1111 is_using_v_parameterization_for_sd2: mean(unet(x) - x), x = 0.5. With a zero output conv the UNet
    returns its bias everywhere, so the mean is exactly bias - 0.5: -0.9 -> eps, -1.1 -> v (threshold -1)."""
    unet = _sd2_unet_with_output_bias(bias)
    assert v_prediction_probe(unet) == pytest.approx(bias - 0.5, abs=1e-6)
    det = detect_family(mc.layout_shapes("sd2", "tiny"))
    fam, why = resolve_prediction(det, unet=unet)
    assert fam.prediction == expected
    assert fam.name == ("sd2-v" if expected == "v" else "sd2")
    assert fam.native_size == (768 if expected == "v" else 512)
    assert "probe" in why[0]


def test_sd2_eps_and_v_files_are_told_apart(tiny):
    _, eps = tiny("sd2")
    _, v = tiny("sd2-v")
    assert (eps.family.name, eps.family.prediction) == ("sd2", "eps")
    assert (v.family.name, v.family.prediction, v.family.native_size) == ("sd2-v", "v", 768)
    assert any("probe" in r and "-2.000 < -1.0" in r for r in v.reasons)
    assert tiny("sd2-inpaint")[1].family.prediction == "eps"  # 9 channels: no probe (A1111)


def test_prediction_override_and_yaml_beside_the_checkpoint(tiny, tmp_path):
    v_path = _link(tiny("sd2-v")[0], tmp_path / "model.safetensors")
    forced = load_checkpoint(v_path, prediction="eps")
    assert (forced.family.name, forced.family.prediction) == ("sd2", "eps")
    assert "prediction 'eps' given explicitly" in forced.reasons
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    parameterization: eps\n    linear_start: 0.00085\n")
    from_yaml = load_checkpoint(v_path)
    assert from_yaml.family.prediction == "eps"
    assert any("model.yaml" in r for r in from_yaml.reasons)
    eps_path = _link(tiny("sd2")[0], tmp_path / "sgm.safetensors")
    (tmp_path / "sgm.yaml").write_text(
        "model:\n  params:\n    denoiser_config:\n      params:\n        scaling_config:\n"
        "          target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling\n")
    assert load_checkpoint(eps_path).family.name == "sd2-v"
    sd1_path = _link(tiny("instruct-pix2pix")[0], tmp_path / "ip2p.safetensors")
    (tmp_path / "ip2p.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert load_checkpoint(sd1_path).family.prediction == "v"  # a yaml applies to any family, as in A1111
    (tmp_path / "ip2p.yaml").write_text("model:\n  params:\n    parameterization: x0\n")
    with pytest.raises(CheckpointError, match="parameterization 'x0'"):
        load_checkpoint(sd1_path)
    with pytest.raises(ValueError, match="prediction='x'"):
        load_checkpoint(sd1_path, prediction="x")
    with pytest.raises(ValueError, match="needs the loaded unet"):
        resolve_prediction(Detection(families.SD2, probe_prediction=True))


# ------------------------------------------------------------------------------------------ VAE file, dtypes


def test_separate_vae_file(tiny, tmp_path, sd1_tiny_path, photo):
    other = sub_state_dict(mc.make_state_dict("sd1", "tiny", seed=9), "first_stage_model.")
    bare = dict(other, **{"loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.9999)})
    torch.save({"state_dict": bare}, tmp_path / "bare.ckpt")
    prefixed = {"first_stage_model." + k: v for k, v in other.items()}
    prefixed["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    mc.write_checkpoint(prefixed, tmp_path / "cut.safetensors", {})
    for name in ("bare.ckpt", "cut.safetensors"):
        sd = load_checkpoint(sd1_tiny_path, vae=tmp_path / name)
        ours = sd.vae.state_dict()
        assert ours.keys() == other.keys() and all(torch.equal(ours[k], other[k]) for k in other)
        assert sd.vae_name == name
        assert sd.vae_shorthash() == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()[:10]
        assert any(name in r for r in sd.reasons)
    assert any("1 tensors outside" in r for r in sd.reasons)
    assert load_checkpoint(sd1_tiny_path).vae_name is None
    # A1111 infotext: "VAE hash" and "VAE" (the file name) after "Model" (a1111-semantics §9.3)
    p = StableDiffusionProcessingImg2Img(sd_model=sd, prompt="x", init_images=[photo], steps=1, width=SIZE,
                                         height=SIZE, seed=1, sampler_name="Euler")
    info = process_images(p).info
    assert f"Model: {sd1_tiny_path.stem}, VAE hash: {sd.vae_shorthash()}, VAE: cut.safetensors" in info
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "none.ckpt")
    with pytest.raises(CheckpointError, match="no LDM AutoencoderKL keys"):
        load_checkpoint(sd1_tiny_path, vae=tmp_path / "none.ckpt")


@pytest.mark.parametrize("file_dtype, compute", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_half_files_load_into_any_compute_dtype(tmp_path, file_dtype, compute):
    state = mc.make_state_dict("sdxl-refiner", "tiny", seed=5, dtype=file_dtype)
    path = tmp_path / "half.safetensors"
    mc.write_checkpoint(state, path, {})
    sd = load_checkpoint(path, dtype=compute)
    name = str(file_dtype).removeprefix("torch.")
    assert sd.file_dtypes == {name: sum(v.is_floating_point() for v in state.values())}
    assert {p.dtype for m in (sd.unet, *sd.text_encoders) for p in m.parameters()} == {compute}
    assert {p.dtype for p in sd.vae.parameters()} == {torch.float32}  # VAE in fp32 by default
    key = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(sd.unet.state_dict()[key], state[UNET_PREFIX + key].to(compute))
    cond = sd.encode_texts(["a cat"], width=SIZE, height=SIZE)
    assert cond["c_crossattn"].dtype == compute and cond["y"].dtype == compute
    assert sum(sd.parameter_counts().values()) == sum(v.numel() for k, v in state.items())


# ------------------------------------------------------------------------------------------------- parity


def diffusers_unet_for(family: families.Family, unet_state_dict: dict):
    """diffusers UNet2DConditionModel via its single-file LDM conversion. diffusers recognises SDXL only by a
    context width of 2048 or 1280 and otherwise configures a "projection" class embedding; reduced SDXL-family
    UNets are configured as SDXL is (addition_embed_type "text_time", 256 features per time id), and diffusers'
    mid block takes its depth from the last level's entry, which is unused by levels without attention."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {UNET_PREFIX + k: v for k, v in unet_state_dict.items()}
    config = sfu.create_unet_diffusers_config_from_ldm(ldm_original_config(family.unet, family.vae), checkpoint)
    if family.vector:
        config.update(class_embed_type=None, addition_embed_type="text_time",
                      addition_time_embed_dim=family.size_embed_dim)
    depth = config["transformer_layers_per_block"]
    if isinstance(depth, list) and 2 ** (len(depth) - 1) not in family.unet.attention_resolutions:
        config["transformer_layers_per_block"] = depth[:-1] + [family.unet.transformer_depth_middle]
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    model.load_state_dict({k: v.clone() for k, v in converted.items()}, strict=True, assign=True)
    return model.eval()


def time_ids(family: families.Family, width: int, height: int, negative: bool) -> list[float]:
    """diffusers' SDXL `add_time_ids`: (h, w, crop top, crop left, target h, target w) for the base model,
    (h, w, crop top, crop left, aesthetic score) for the refiner (StableDiffusionXLImg2ImgPipeline)."""
    if "aesthetic_score" in family.vector:
        return [height, width, 0, 0, 2.5 if negative else 6.0]
    return [height, width, 0, 0, height, width]


@pytest.mark.parametrize("name", ["sd2", "sd2-inpaint", "instruct-pix2pix", "sdxl", "sdxl-refiner", "sdxl-inpaint"])
def test_unet_parity_with_diffusers(tiny, name):
    """Our UNet on the checkpoint's weights vs diffusers' UNet converted from the same LDM keys. For SDXL families
    y = vector_conditioning(pooled, 96 x 64 px) against diffusers' own text_time embedding of the time ids, so the
    size / crop / aesthetic Fourier features and their order are checked too (row 1 as a negative prompt)."""
    _, sd = tiny(name)
    fam = sd.family
    theirs = diffusers_unet_for(fam, sd.unet.state_dict())
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, fam.unet.in_channels, 8, 8, generator=g)
    t = torch.tensor([3.0, 812.37])
    context = torch.randn(2, 77, fam.unet.context_dim, generator=g)
    kwargs, y = {}, None
    if fam.vector:
        pooled = torch.randn(2, fam.text[-1].projection_dim, generator=g)
        y = torch.cat([vector_conditioning(fam, pooled[:1], 96, 64), vector_conditioning(fam, pooled[1:], 96, 64,
                                                                                        is_negative_prompt=True)])
        ids = torch.tensor([time_ids(fam, 96, 64, False), time_ids(fam, 96, 64, True)])
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
    with torch.no_grad():
        ours = sd.unet(x, t, context, y)
        ref = theirs(x, t, context, **kwargs).sample
    err = (ours - ref).abs().max().item()
    print(f"\nunet parity {name}: max|diff| = {err:.2e} (max|out| = {ref.abs().max():.2f})")
    assert err <= TOL and ref.abs().max() > 0.1


@pytest.mark.parametrize("name", FAMILIES)
def test_vae_parity_with_diffusers(tiny, name):
    _, sd = tiny(name)
    theirs = diffusers_vae(sd.vae.state_dict(), sd.family.vae)
    g = torch.Generator().manual_seed(12)
    x = torch.rand(1, 3, 48, 64, generator=g) * 2 - 1
    z = torch.randn(1, 4, 6, 8, generator=g)
    with torch.no_grad():
        errors = [(sd.vae.encode(x).mean - theirs.encode(x).latent_dist.mean).abs().max().item(),
                  (sd.vae.decode(z) - theirs.decode(z).sample).abs().max().item()]
    assert max(errors) <= TOL, errors
    assert sd.family.vae.scale_factor == (0.13025 if name.startswith("sdxl") else 0.18215)


def _ids(sd, text: str, pad: int) -> torch.Tensor:
    """[1, 77]: BOS, the text's ids, EOS, then `pad` (A1111 / open_clip.tokenize layout)."""
    tok = sd.tokenizer
    ids = [tok.sot_token_id] + tok.encode(text) + [tok.eot_token_id]
    return torch.tensor([ids + [pad] * (77 - len(ids))])


def _open_clip_tower(sd_state: dict, prefix: str, config) -> open_clip.transformer.TextTransformer:
    tower = open_clip.transformer.TextTransformer(context_length=77, vocab_size=config.vocab_size,
                                                  width=config.width, heads=config.heads, layers=config.layers,
                                                  output_dim=config.projection_dim, act_layer=torch.nn.GELU,
                                                  output_tokens=True)
    weights = {k: v for k, v in sub_state_dict(sd_state, prefix).items() if k != "logit_scale"}
    tower.load_state_dict(weights, strict=True)
    return tower.eval()


def _penultimate(tower, tokens, normalize: bool) -> torch.Tensor:
    return tower.forward_intermediates(tokens, indices=[tower.transformer.layers - 2],
                                       normalize_intermediates=normalize, output_fmt="NLC",
                                       intermediates_only=True)["text_intermediates"][0]


def test_sd2_text_parity_with_open_clip(tiny):
    """SD2 (ldm FrozenOpenCLIPEmbedder, layer "penultimate"): ln_final(hidden state before the last block), tokens
    padded with 0. A1111 ignores Clip skip for SD2."""
    path, sd = tiny("sd2")
    tower = _open_clip_tower(open_state_dict(path), "cond_stage_model.model.", sd.family.text[0])
    text = "a photo of an astronaut, riding a horse"
    with torch.no_grad():
        ref = _penultimate(tower, _ids(sd, text, pad=0), normalize=True)
        ours = sd.encode_texts([text])
        skipped = sd.encode_texts([text], clip_skip=2)
    assert (ours - ref).abs().max() <= TOL
    assert torch.equal(ours, skipped)


@pytest.fixture(scope="module")
def sdxl_oracle(tiny):
    """CLIP-L as transformers' CLIPTextModel and bigG as open_clip's TextTransformer, from the SDXL file's keys."""
    import transformers

    path, sd = tiny("sdxl")
    raw = open_state_dict(path)
    l_cfg, g_cfg = sd.family.text
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=l_cfg.vocab_size, hidden_size=l_cfg.width, intermediate_size=4 * l_cfg.width,
        num_hidden_layers=l_cfg.layers, num_attention_heads=l_cfg.heads, max_position_embeddings=77,
        hidden_act="quick_gelu", layer_norm_eps=1e-5)).eval()
    weights = {k.removeprefix("text_model."): v for k, v in
               sub_state_dict(raw, "conditioner.embedders.0.transformer.").items()}
    expected = hf.state_dict().keys()
    hf.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=True)
    assert set(weights) - set(expected) <= {"embeddings.position_ids"}
    return sd, hf, _open_clip_tower(raw, "conditioner.embedders.1.model.", g_cfg)


def test_sdxl_conditioning_parity(sdxl_oracle):
    """sgm GeneralConditioner as A1111 drives it: c_crossattn = [CLIP-L hidden_states[-2] (no final LN, EOS
    padding), bigG penultimate (no ln_final, 0 padding)] along channels; y = [bigG pooled (ln_final of the last
    block at the EOS, @ text_projection), Fourier features (diffusers get_timestep_embedding, cos first) of
    (h, w, 0, 0, h, w)]."""
    from diffusers.models.embeddings import get_timestep_embedding

    sd, hf, bigg = sdxl_oracle
    text, width, height = "an astronaut", 96, 64
    with torch.no_grad():
        cond_l = hf(_ids(sd, text, pad=sd.tokenizer.eot_token_id), output_hidden_states=True).hidden_states[-2]
        g_tokens = _ids(sd, text, pad=0)
        cond_g = _penultimate(bigg, g_tokens, normalize=False)
        pooled, _ = bigg(g_tokens)
        sizes = get_timestep_embedding(torch.tensor([height, width, 0, 0, height, width]), 256,
                                       flip_sin_to_cos=True, downscale_freq_shift=0).reshape(1, -1)
        ours = sd.encode_texts([text], width=width, height=height)
    errors = {"c_crossattn": (ours["c_crossattn"] - torch.cat([cond_l, cond_g], dim=-1)).abs().max().item(),
              "y": (ours["y"] - torch.cat([pooled, sizes], dim=1)).abs().max().item()}
    print(f"\nSDXL conditioning parity: {errors}")
    assert max(errors.values()) <= TOL


def test_sdxl_empty_negative_prompt_is_zeroed(tiny):
    """A1111 sd_models_xl: an all-empty negative prompt gets force_zero_embeddings=['txt']: text parts zero, size
    embeddings kept. A non-empty negative prompt, or "" as a positive prompt, is encoded normally."""
    _, sd = tiny("sdxl")
    neg = sd.encode_texts([""], width=SIZE, height=SIZE, is_negative_prompt=True)
    pos = sd.encode_texts([""], width=SIZE, height=SIZE)
    assert not neg["c_crossattn"].any() and not neg["y"][:, :64].any()
    assert torch.equal(neg["y"][:, 64:], pos["y"][:, 64:]) and pos["c_crossattn"].abs().max() > 0.1
    assert sd.encode_texts(["blurry"], is_negative_prompt=True)["c_crossattn"].abs().max() > 0.1
    _, refiner = tiny("sdxl-refiner")
    a = refiner.encode_texts(["blurry"], width=SIZE, height=SIZE)["y"]
    b = refiner.encode_texts(["blurry"], width=SIZE, height=SIZE, is_negative_prompt=True)["y"]
    assert torch.equal(a[:, :-256], b[:, :-256]) and not torch.equal(a[:, -256:], b[:, -256:])  # 6.0 vs 2.5


def test_prompt_schedules_carry_dict_conds():
    """SDXL conds are dicts: schedules index rows per key; AND parts of different token lengths pad c_crossattn by
    repeating the last vector (a1111-semantics §7 step 2) and stack y as it is."""
    from sdcore.prompts import (get_learned_conditioning, get_multicond_learned_conditioning,
                                reconstruct_cond_batch, reconstruct_multicond_batch)

    def encode(texts):  # token count 77 per word; y = [word count, first letter]
        n = max(len(t.split()) for t in texts)
        return {"c_crossattn": torch.stack([torch.full((77 * n, 2), float(len(t.split()))) for t in texts]),
                "y": torch.tensor([[len(t.split()), ord(t.strip()[0])] for t in texts], dtype=torch.float32)}

    c = get_multicond_learned_conditioning(encode, ["a b AND c", "[d:e f:2]"], steps=4)
    conds_list, step0 = reconstruct_multicond_batch(c, 0)
    assert conds_list == [[(0, 1.0), (1, 1.0)], [(2, 1.0)]]
    assert step0["c_crossattn"].shape == (3, 154, 2) and step0["y"].tolist() == [[2, 97], [1, 99], [1, 100]]
    assert step0["c_crossattn"][1].eq(1).all()  # "c" (77 tokens) padded with its own last vector
    assert reconstruct_multicond_batch(c, 3)[1]["y"][2].tolist() == [2, 101]  # "e f" after step 2
    uc = get_learned_conditioning(encode, ["x", "y z"], steps=4)
    assert reconstruct_cond_batch(uc, 0)["y"].tolist() == [[1, 120], [2, 121]]


# ------------------------------------------------------------------------------------------- end to end


def _job(sd, image, **kw):
    args = dict(sd_model=sd, prompt="an astronaut", negative_prompt="", init_images=[image], sampler_name="Euler a",
                steps=3, cfg_scale=7.0, seed=77, width=SIZE, height=SIZE, denoising_strength=0.75)
    args.update(kw)
    return StableDiffusionProcessingImg2Img(**args)


@pytest.mark.parametrize("name", FAMILIES)
def test_img2img_and_inpainting_end_to_end(tiny, photo, name, monkeypatch):
    path, sd = tiny(name)
    seen = []
    original = sd.apply_model

    def spy(x, t, c_crossattn, c_concat=None, y=None):
        seen.append((x.shape, None if c_concat is None else c_concat.shape, None if y is None else y.clone()))
        return original(x, t, c_crossattn, c_concat=c_concat, y=y)

    monkeypatch.setattr(sd, "apply_model", spy)
    extra = {"image_cfg_scale": 1.5} if sd.family.conditioning == "edit" else {}
    out = process_images(_job(sd, photo, **extra))
    assert out.images[0].size == (SIZE, SIZE)
    assert f"Model hash: {hashlib.sha256(path.read_bytes()).hexdigest()[:10]}, Model: {path.stem}," in out.info
    diff = np.abs(np.asarray(out.images[0], np.int16) - np.asarray(photo, np.int16))
    assert diff.mean() > 1.0
    if sd.family.conditioning == "edit":
        # a1111-semantics §7 step 4: rows cond, uncond, uncond; image_cond = image latent, image latent, zeros
        assert "Image CFG scale: 1.5" in out.info
        assert seen[0][0][0] == 3 and seen[0][1] == (3, 4, 8, 8)
    if sd.family.vector:
        ys = seen[0][2]
        assert ys.shape == (2, sd.family.unet.adm_in_channels)
        assert ys[0, :64].abs().max() > 0 and not ys[1, :64].any()  # cond row, then the zeroed empty negative

    box = (16, 20, 40, 52)
    seen.clear()
    p = _job(sd, photo, mask=rect_mask(photo.size, box), mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
             denoising_strength=1.0, negative_prompt="blurry", **extra)
    result = process_images(p)
    out, src = np.asarray(result.images[0]), np.asarray(photo)
    outside = np.ones(src.shape[:2], bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    assert np.array_equal(out[outside], src[outside])
    assert np.abs(out[~outside].astype(int) - src[~outside]).mean() > 1.0
    if sd.family.conditioning == "hybrid":
        assert result.image_conditioning.shape == (1, 5, 8, 8) and seen[0][1] == (2, 5, 8, 8)
        assert "Conditional mask weight: 1.0" in result.info
    if sd.family.vector:
        assert seen[0][2][1, :64].abs().max() > 0  # "blurry" is encoded, not zeroed


@pytest.fixture
def cli_models(tiny, monkeypatch):
    """The CLI's model loader answers from the module's loaded checkpoints (a real load for anything else)."""
    loaded = {str(tiny(name)[0]): tiny(name)[1] for name in FAMILIES}
    real = commands._load_model

    def load(path, device, dtype, vae=None, prediction=None, vae_dtype="float32"):
        if str(path) in loaded and (device, dtype, vae, prediction, vae_dtype) == ("cpu", "float32", None, None,
                                                                                   "float32"):
            return loaded[str(path)]
        return real(path, device, dtype, vae, prediction, vae_dtype)

    monkeypatch.setattr(commands, "_load_model", load)
    return loaded


@pytest.mark.parametrize("name", FAMILIES)
def test_cli_inpainting_every_family(tiny, cli_models, photo, tmp_path, name, capsys):
    path, sd = tiny(name)
    photo.save(tmp_path / "init.png")
    rect_mask(photo.size, (16, 16, 48, 48)).save(tmp_path / "mask.png")
    code = cli.main(["img2img", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--ckpt", str(path),
                     "--prompt", "an astronaut", "--steps", "3", "--seed", "5", "--width", str(SIZE), "--height",
                     str(SIZE), "--outdir", str(tmp_path / "out"), "--no-save-to-dirs"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    written = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in written] == ["00000-5.png"]
    with Image.open(written[0]) as im:
        assert im.size == (SIZE, SIZE)
        info = im.text["parameters"]
    assert f"Model hash: {sd.shorthash()}, Model: {path.stem}," in info and "Seed: 5," in info


def test_cli_info_names_family_reasons_and_hash(tiny, capsys):
    path, sd = tiny("sd2-v")
    assert cli.main(["info", str(path), "--prediction", "eps"]) == 0
    out = capsys.readouterr().out
    assert "family: sd2 (prediction eps" in out and "given explicitly" in out
    assert sd.shorthash() in out and "parameters" in out


# ------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd2", "sdxl-refiner", "sdxl"])
def test_full_size_unet_parity_with_diffusers(name):
    """Full-size UNets (SD2 866 M, refiner 2.26 G, SDXL 2.57 G parameters) with random weights. diffusers' UNet
    shares the weight tensors with ours (neither modifies them), so SDXL fits in about 11 GB."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    start = time.perf_counter()
    fam = mc.family_config(name, "full")
    ours = UNetModel(fam.unet, device="meta")
    weights = mc.random_like(ours.state_dict(), torch.Generator().manual_seed(21))
    ours.load_state_dict(weights, strict=True, assign=True)
    checkpoint = {UNET_PREFIX + k: v for k, v in weights.items()}
    config = sfu.create_unet_diffusers_config_from_ldm(ldm_original_config(fam.unet, fam.vae), checkpoint)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, config), strict=True, assign=True)
    g = torch.Generator().manual_seed(22)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.5])
    context = torch.randn(1, 77, fam.unet.context_dim, generator=g)
    kwargs, y = {}, None
    if fam.vector:
        pooled = torch.randn(1, fam.text[-1].projection_dim, generator=g)
        y = vector_conditioning(fam, pooled, 1024, 768)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled,
                                       "time_ids": torch.tensor([time_ids(fam, 1024, 768, False)])}
    with torch.no_grad():
        err = (ours(x, t, context, y) - theirs(x, t, context, **kwargs).sample).abs().max().item()
    print(f"\nfull-size unet parity {name}: max|diff| = {err:.2e}; {time.perf_counter() - start:.0f} s")
    assert err <= TOL


@pytest.mark.slow
def test_full_size_sdxl_text_parity():
    """Full CLIP-L (transformers) and bigG (open_clip) geometry with random weights, through encode_texts."""
    import transformers

    from sdcore.models.text import TextEncoder, load_tokenizer, open_clip_to_hf
    from sdcore.prompts import encode_family_conditioning

    fam = families.SDXL
    g = torch.Generator().manual_seed(23)
    encoders = []
    for config in fam.text:
        enc = TextEncoder(config, device="meta")
        enc.load_state_dict(mc.random_like(enc.state_dict(), g), strict=True, assign=True)
        encoders.append(enc.eval())
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)).eval()
    hf_weights = {k.removeprefix("text_model."): v for k, v in open_clip_to_hf(encoders[0].state_dict()).items()}
    hf.load_state_dict({k: v for k, v in hf_weights.items() if k in hf.state_dict()}, strict=True)
    bigg = open_clip.transformer.TextTransformer(context_length=77, width=1280, heads=20, layers=32,
                                                 output_dim=1280, act_layer=torch.nn.GELU, output_tokens=True)
    bigg.load_state_dict({k: v for k, v in encoders[1].state_dict().items() if k != "logit_scale"}, strict=True)
    sd = type("M", (), {"tokenizer": load_tokenizer()})()
    text = "a photograph of an astronaut riding a horse"
    with torch.no_grad():
        cond_l = hf(_ids(sd, text, 49407), output_hidden_states=True).hidden_states[-2]
        cond_g = _penultimate(bigg.eval(), _ids(sd, text, 0), normalize=False)
        pooled, _ = bigg(_ids(sd, text, 0))
        ours = encode_family_conditioning(fam, encoders, sd.tokenizer, [text], width=1024, height=1024)
    err = max((ours["c_crossattn"] - torch.cat([cond_l, cond_g], -1)).abs().max().item(),
              (ours["y"][:, :1280] - pooled).abs().max().item())
    print(f"\nfull-size SDXL text parity: max|diff| = {err:.2e}")
    assert err <= TOL
