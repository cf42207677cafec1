"""scripts/make_checkpoint.py: LDM layout, determinism, value scales, schedule buffers, file formats, no overwrite."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import make_checkpoint as mc  # noqa: E402
from sdcore.models.unet import UNetModel  # noqa: E402
from sdcore.models.vae import AutoencoderKL  # noqa: E402

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model.transformer."


@pytest.fixture(scope="module")
def tiny_sd1():
    return mc.make_state_dict("sd1", "tiny", seed=0)


def _sub(state_dict, prefix):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def test_tiny_loads_strictly_into_our_modules(tiny_sd1):
    config = mc.family_config("sd1", "tiny")
    UNetModel(config.unet, device="meta").load_state_dict(_sub(tiny_sd1, UNET), strict=True, assign=True)
    AutoencoderKL(config.vae, device="meta").load_state_dict(_sub(tiny_sd1, VAE), strict=True, assign=True)
    from sdcore.models.text import TextEncoder, hf_to_open_clip
    TextEncoder(config.text[0], device="meta").load_state_dict(
        hf_to_open_clip(_sub(tiny_sd1, TEXT)), strict=True, assign=True)
    prefixes = (UNET, VAE, TEXT + "text_model.")
    others = {k for k in tiny_sd1 if not k.startswith(prefixes)}
    assert others == set(mc.ldm_ddpm_buffers())


def test_tiny_has_the_full_key_structure():
    """Same keys as the real SD1.5 layout (only widths differ), so loaders see an SD1 checkpoint."""
    for family in ("sd1", "sd1-inpaint"):
        tiny, full = mc.family_config(family, "tiny"), mc.family_config(family, "full")
        assert UNetModel(tiny.unet, device="meta").state_dict().keys() == \
            UNetModel(full.unet, device="meta").state_dict().keys()
        assert AutoencoderKL(tiny.vae, device="meta").state_dict().keys() == \
            AutoencoderKL(full.vae, device="meta").state_dict().keys()
        assert tiny.unet.num_heads == 8


def test_full_sd15_sizes():
    """Known SD1.5 counts: UNet 686 tensors / 859,520,964 parameters, VAE 248 / 83,653,863 (v1-5-pruned)."""
    config = mc.family_config("sd1", "full")
    unet = UNetModel(config.unet, device="meta").state_dict()
    vae = AutoencoderKL(config.vae, device="meta").state_dict()
    assert (len(unet), sum(t.numel() for t in unet.values())) == (686, 859_520_964)
    assert (len(vae), sum(t.numel() for t in vae.values())) == (248, 83_653_863)
    inpaint = UNetModel(mc.family_config("sd1-inpaint", "full").unet, device="meta").state_dict()
    assert inpaint["input_blocks.0.0.weight"].shape == (320, 9, 3, 3)


def test_every_tensor_random_with_sensible_scale(tiny_sd1):
    buffers = mc.ldm_ddpm_buffers()
    for name, t in tiny_sd1.items():
        if name in buffers or name.endswith("position_ids"):
            continue
        assert t.dtype == torch.float32, name
        if t.numel() > 1:
            assert t.std() > 0, f"{name} is constant"
        if t.ndim == 1 and name.endswith("weight"):
            assert (t - 1).abs().max() < 0.6, name
        elif t.ndim >= 2:
            assert 0.3 < t.std() * t[0].numel() ** 0.5 < 3, name
    assert tiny_sd1[UNET + "out.2.weight"].abs().min() > 0  # LDM zero-inits it; random here
    assert torch.equal(tiny_sd1[TEXT + "text_model.embeddings.position_ids"], torch.arange(77)[None])


def test_deterministic_per_seed(tiny_sd1):
    again = mc.make_state_dict("sd1", "tiny", seed=0)
    other = mc.make_state_dict("sd1", "tiny", seed=1)
    assert all(torch.equal(again[k], v) for k, v in tiny_sd1.items())
    assert not torch.equal(other[UNET + "out.2.weight"], tiny_sd1[UNET + "out.2.weight"])


def test_schedule_buffers_match_spec():
    """a1111-semantics §13 "Model sigmas": alphas_cumprod[0] = 0.99915, [999] = 0.0046601; DDPM identities of
    ddpm.py register_schedule."""
    b = mc.ldm_ddpm_buffers()
    ac = b["alphas_cumprod"]
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    assert ac[0].item() == pytest.approx(0.99915, abs=1e-5)
    assert ac[999].item() == pytest.approx(0.0046601, rel=1e-4)
    assert b["betas"][0].item() == pytest.approx(0.00085, rel=1e-6)
    assert b["betas"][-1].item() == pytest.approx(0.012, rel=1e-6)
    assert b["alphas_cumprod_prev"][0] == 1 and torch.equal(b["alphas_cumprod_prev"][1:], ac[:-1])
    assert torch.allclose(b["sqrt_alphas_cumprod"] ** 2, ac)
    assert b["model_ema.decay"].item() == pytest.approx(0.9999)
    assert b["model_ema.num_updates"].dtype == torch.int32


def test_dtype_cast_keeps_integers():
    sd = mc.make_state_dict("sd1-inpaint", "tiny", seed=3, dtype=torch.float16)
    assert sd[UNET + "input_blocks.0.0.weight"].shape[1] == 9
    assert {v.dtype for k, v in sd.items() if not k.endswith(("num_updates", "position_ids"))} == {torch.float16}
    assert sd["model_ema.num_updates"].dtype == torch.int32


def test_write_formats_round_trip_and_never_overwrite(tmp_path, tiny_sd1):
    from safetensors.torch import load_file
    small = {k: v for k, v in tiny_sd1.items() if not k.startswith(UNET)}
    st, ckpt = tmp_path / "a.safetensors", tmp_path / "a.ckpt"
    mc.write_checkpoint(small, st, {"family": "sd1"})
    mc.write_checkpoint(small, ckpt, {})
    loaded = load_file(st)
    loaded_ckpt = torch.load(ckpt, weights_only=True)["state_dict"]
    for k, v in small.items():
        assert torch.equal(loaded[k], v) and torch.equal(loaded_ckpt[k], v)
    before = st.read_bytes()
    with pytest.raises(FileExistsError, match="a.safetensors"):
        mc.write_checkpoint({"x": torch.zeros(1)}, st, {})
    assert st.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "a.safetensors"]  # no temporary left
    with pytest.raises(ValueError, match="must end with"):
        mc.write_checkpoint(small, tmp_path / "a.bin", {})


def test_cli(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert mc.main(["--family", "sd1", "--size", "tiny", "--seed", "5", "--dtype", "bf16", str(out)]) == 0
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["seed"] == "5"
        assert f.get_tensor(UNET + "out.2.weight").dtype == torch.bfloat16
    with pytest.raises(SystemExit) as err:
        mc.main(["--size", "tiny", str(out)])
    assert err.value.code == 2 and "exists" in capsys.readouterr().err


def test_bad_arguments():
    with pytest.raises(ValueError, match="family='sd9'"):
        mc.make_state_dict("sd9", "tiny", 0)
    with pytest.raises(ValueError, match="size='huge'"):
        mc.make_state_dict("sd1", "huge", 0)


def test_alphas_cumprod_agrees_with_the_schedules_module():
    from sdcore.sampling.denoisers import sd_alphas_cumprod
    assert torch.equal(mc.ldm_ddpm_buffers()["alphas_cumprod"], sd_alphas_cumprod())


def test_tiny_config_is_what_the_loader_reads():
    """Head counts are not in the weights: sdcore.checkpoint reads the rest off the shapes and takes heads from the
    family (UNet) or width / 64 (CLIP); the tiny config must agree with it."""
    from sdcore.checkpoint import detect_family
    config = mc.family_config("sd1-inpaint", "tiny")
    shapes = {k: tuple(v.shape) for k, v in mc.make_state_dict("sd1-inpaint", "tiny", seed=0).items()}
    assert shapes == mc.layout_shapes("sd1-inpaint", "tiny")
    detected = detect_family(shapes).family
    assert detected.name == "sd1-inpaint"
    assert (detected.unet, detected.vae, detected.text) == (config.unet, config.vae, config.text)


FAMILIES = sorted(set(mc.EXTRA_KEYS) - {"tiny"})


@pytest.mark.parametrize("size", mc.SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_detected_as_itself(family, size):
    """Full and tiny layouts of every family read back as that family with the same configs (SD2 eps/v share a
    layout: the probe tells them apart, see test_sd2_files_pass_the_v_probe_as_their_family)."""
    from sdcore.checkpoint import detect_family
    config = mc.family_config(family, size)
    detection = detect_family(mc.layout_shapes(family, size))
    assert detection.family.name == {"sd2-v": "sd2"}.get(family, family)
    assert detection.probe_prediction == (family in ("sd2", "sd2-v"))
    assert (detection.family.unet, detection.family.vae, detection.family.text) == (config.unet, config.vae,
                                                                                    config.text)


def test_real_key_layouts():
    """Prefixes and tensors of the real files: SD2 open_clip text with text_projection and logit_scale; SDXL
    CLIP-L (transformers) + bigG (open_clip) under conditioner.embedders; refiner bigG alone at index 0; sgm files
    without DDPM buffers; known full-size shapes (sd_xl_base_1.0: label_emb [1280, 2816], context 2048)."""
    sd2 = mc.layout_shapes("sd2", "full")
    assert sd2["cond_stage_model.model.text_projection"] == (1024, 1024)
    assert sd2["cond_stage_model.model.logit_scale"] == ()
    assert sd2["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert sd2["alphas_cumprod"] == (1000,)
    xl = mc.layout_shapes("sdxl", "full")
    assert xl["conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight"] == (768, 768)
    assert "conditioner.embedders.0.transformer.text_projection.weight" not in xl
    assert xl["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert xl["conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"] == (5120, 1280)
    assert xl["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert xl["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert not any(k.startswith(("alphas_cumprod", "model_ema", "cond_stage_model")) for k in xl)
    refiner = mc.layout_shapes("sdxl-refiner", "full")
    assert refiner["conditioner.embedders.0.model.ln_final.weight"] == (1280,)
    assert refiner["model.diffusion_model.label_emb.0.0.weight"] == (1536, 2560)
    assert not any(k.startswith("conditioner.embedders.1.") for k in refiner)
    assert mc.layout_shapes("instruct-pix2pix", "full")["model.diffusion_model.input_blocks.0.0.weight"] == \
        (320, 8, 3, 3)
    assert mc.layout_shapes("sdxl-inpaint", "tiny")["model.diffusion_model.input_blocks.0.0.weight"][1] == 9


def test_tiny_sdxl_widths():
    """Context = CLIP-L width + bigG width; y = pooled projection + 6 numbers x 256 (base) / 5 x 256 (refiner)."""
    xl = mc.family_config("sdxl", "tiny")
    assert xl.unet.context_dim == 128 and xl.unet.adm_in_channels == 64 + 6 * 256
    assert xl.unet.transformer_depth == (0, 2, 2) and xl.unet.transformer_depth_middle == 2
    refiner = mc.family_config("sdxl-refiner", "tiny")
    assert refiner.unet.context_dim == 64 and refiner.unet.adm_in_channels == 64 + 5 * 256
    assert refiner.unet.transformer_depth == (4, 2, 2, 4)  # levels 0 and 3 have no attention: unused entries


@pytest.mark.parametrize("family, expected", [("sd2", 0.0), ("sd2-v", -2.0)])
def test_sd2_files_pass_the_v_probe_as_their_family(family, expected):
    """calibrate_v_probe shifts the output bias so A1111's probe lands on PROBE_TARGETS (eps >= -1 > v)."""
    from sdcore.checkpoint import v_prediction_probe
    config = mc.family_config(family, "tiny")
    sd = mc.make_state_dict(family, "tiny", seed=4)
    model = UNetModel(config.unet, device="meta")
    model.load_state_dict(_sub(sd, UNET), strict=True, assign=True)
    assert v_prediction_probe(model) == pytest.approx(expected, abs=1e-4)
