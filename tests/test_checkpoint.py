"""checkpoint.py: opening files safely, family detection from shapes, strict loading with listed key errors."""
from __future__ import annotations

import pickle

import pytest
import torch
from make_checkpoint import make_state_dict, write_checkpoint

from sdcore import families
from sdcore.checkpoint import CheckpointError, detect_family, load_checkpoint, open_state_dict


def shapes_of(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def sd1_sd():
    return make_state_dict("sd1", "tiny", seed=0)


def test_detect_sd1_reduced_reads_config_off_shapes(sd1_sd):
    det = detect_family(shapes_of(sd1_sd))
    assert det.family.name == "sd1"
    u = det.family.unet
    assert (u.in_channels, u.model_channels, u.channel_mult, u.num_res_blocks) == (4, 32, (1, 2, 4, 4), 2)
    assert u.attention_resolutions == (4, 2, 1) and u.transformer_depth == (1, 1, 1, 1)
    assert u.context_dim == 64 and not u.use_linear_in_transformer and u.num_heads == 8
    assert any("reduced-size" in r for r in det.reasons)


def test_detect_inpaint_by_nine_input_channels():
    det = detect_family(shapes_of(make_state_dict("sd1-inpaint", "tiny", seed=0)))
    assert det.family.name == "sd1-inpaint" and det.family.unet.in_channels == 9
    assert det.family.conditioning == "hybrid"
    assert any("9 channels" in r for r in det.reasons)


def test_detect_full_sd1_from_empty_tensors():
    # Full-size SD1.5 layout built on the meta device: detection reads only names and shapes.
    from sdcore.models.unet import UNetModel
    from sdcore.models.vae import AutoencoderKL
    from sdcore.models.text import TextEncoder, open_clip_to_hf

    f = families.SD1
    shapes = {"model.diffusion_model." + k: tuple(v.shape)
              for k, v in UNetModel(f.unet, device="meta").state_dict().items()}
    shapes.update({"first_stage_model." + k: tuple(v.shape)
                   for k, v in AutoencoderKL(f.vae, device="meta").state_dict().items()})
    text = open_clip_to_hf({k: torch.empty(v.shape) for k, v in
                            TextEncoder(f.text[0], device="meta").state_dict().items()})
    shapes.update({"cond_stage_model.transformer." + k: tuple(v.shape) for k, v in text.items()})
    det = detect_family(shapes)
    assert det.family == families.SD1


def test_unrecognised_checkpoint_lists_what_was_looked_for():
    with pytest.raises(CheckpointError, match="model.diffusion_model"):
        detect_family({"foo.weight": (3, 3)})
    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    with pytest.raises(CheckpointError, match="cond_stage_model.transformer.text_model"):
        detect_family(shapes)


def test_safetensors_and_ckpt_load_the_same_weights(sd1_tiny_path, sd1_tiny_ckpt_path):
    a, b = load_checkpoint(sd1_tiny_path), load_checkpoint(sd1_tiny_ckpt_path)
    for ma, mb in ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoders[0], b.text_encoders[0])):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the file's alphas_cumprod is used, and known extras were dropped by rule
    assert torch.allclose(a.alphas_cumprod[[0, 999]], torch.tensor([0.99915, 0.0046601]), atol=1e-6)
    assert any("EMA" in r or "DDPM" in r for r in a.reasons)


def test_loaded_weights_equal_the_file(sd1_tiny_path):
    sd = load_checkpoint(sd1_tiny_path)
    raw = open_state_dict(sd1_tiny_path)
    ours = sd.unet.state_dict()
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(ours[key], raw["model.diffusion_model." + key])


def test_channels_last_is_the_cpu_default_and_only_changes_the_layout(sd1_tiny_path):
    default, cl, nchw = (load_checkpoint(sd1_tiny_path, channels_last=v) for v in (None, True, False))
    convs = [n for n, p in nchw.unet.named_parameters() if p.ndim == 4]
    assert convs
    for model, channels_last in ((default, True), (nchw, False)):
        for name, p in model.unet.named_parameters():
            if p.ndim == 4:
                assert p.is_contiguous(memory_format=torch.channels_last) == channels_last or p.shape[-1] == 1, name
                assert p.is_contiguous() != channels_last or p.shape[-1] == 1, name  # 1x1 kernels are both
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in cl.vae.parameters() if p.ndim == 4)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, nchw.family.unet.context_dim, generator=g)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        a, b = cl.unet(x, t, context=c), nchw.unet(x, t, context=c)
        assert a.is_contiguous() and torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        img = cl.vae.decode(x[:1])
        assert img.is_contiguous() and torch.allclose(img, nchw.vae.decode(x[:1]), atol=1e-5, rtol=1e-4)
        moments = cl.vae.encode(img.clamp(-1, 1)).mean
        assert moments.is_contiguous()
        assert torch.allclose(moments, nchw.vae.encode(img.clamp(-1, 1)).mean, atol=1e-5, rtol=1e-4)
    # the same values as the file either way (the layout is not a conversion)
    key = convs[0]
    assert torch.equal(cl.unet.state_dict()[key], nchw.unet.state_dict()[key])


def test_fp16_file_loads_into_requested_dtype(tmp_path):
    path = tmp_path / "half.safetensors"
    write_checkpoint(make_state_dict("sd1", "tiny", seed=1, dtype=torch.float16), path, metadata={})
    sd = load_checkpoint(path, dtype=torch.float32)
    assert next(sd.unet.parameters()).dtype == torch.float32
    assert next(sd.vae.parameters()).dtype == torch.float32


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path, sd1_sd):
    bad = dict(sd1_sd)
    del bad["model.diffusion_model.out.2.bias"]
    bad["model.diffusion_model.extra.weight"] = torch.zeros(1)
    bad["first_stage_model.quant_conv.bias"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    write_checkpoint(bad, path, metadata={})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "out.2.bias" in msg and "extra.weight" in msg
    assert "UNet" in msg
    bad2 = dict(sd1_sd)
    bad2["first_stage_model.quant_conv.bias"] = torch.zeros(3)
    path2 = tmp_path / "bad2.safetensors"
    write_checkpoint(bad2, path2, metadata={})
    with pytest.raises(CheckpointError, match=r"quant_conv.bias: file \(3,\) vs model \(8,\)"):
        load_checkpoint(path2)


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /tmp/sdcore-pwned",))


def test_hostile_pickle_is_refused_not_executed(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_checkpoint(path)
    import os
    assert not os.path.exists("/tmp/sdcore-pwned")


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "model.bin2").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extension"):
        load_checkpoint(tmp_path / "model.bin2")
