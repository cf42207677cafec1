"""sdcore.models.vae: parity with diffusers' AutoencoderKL (converted by diffusers' own LDM single-file functions)
on random LDM-layout weights; DiagonalGaussianDistribution per LDM distributions.py."""
from __future__ import annotations

import time

import pytest
import torch

from _diffusers_oracle import diffusers_vae, make_checkpoint, random_weights
from sdcore.families import VAEConfig
from sdcore.models.vae import AutoencoderKL, DiagonalGaussianDistribution

TOL = 1e-4  # fp32 max abs difference


@pytest.fixture(scope="module")
def tiny_pair():
    config = make_checkpoint.family_config("sd1", "tiny").vae
    ours = AutoencoderKL(config, device="meta").eval()
    return config, ours, diffusers_vae(random_weights(ours, seed=1), config)


def _compare(ours, theirs, generator, pixels=(64, 48)):
    x = torch.rand(2, 3, *pixels, generator=generator) * 2 - 1
    f = ours.downscale
    z = torch.randn(2, 4, pixels[0] // f, pixels[1] // f, generator=generator)
    with torch.no_grad():
        p, q = ours.encode(x), theirs.encode(x).latent_dist
        decoded, expected = ours.decode(z), theirs.decode(z).sample
        sample = p.sample(torch.Generator().manual_seed(5))
        expected_sample = q.sample(torch.Generator().manual_seed(5))
    assert p.mean.shape == (2, 4, pixels[0] // f, pixels[1] // f) and decoded.shape == x.shape
    return {"mean": ((p.mean - q.mean).abs().max().item(), p.mean.abs().max().item()),
            "logvar": ((p.logvar - q.logvar).abs().max().item(), p.logvar.abs().max().item()),
            "sample": ((sample - expected_sample).abs().max().item(), sample.abs().max().item()),
            "decode": ((decoded - expected).abs().max().item(), decoded.abs().max().item())}


def _report(name, errors):
    print(f"\nvae parity {name}: " + ", ".join(f"{k} max|diff|={e:.2e} (max|val|={m:.2f})"
                                              for k, (e, m) in errors.items()))


def test_parity_with_diffusers(tiny_pair):
    config, ours, theirs = tiny_pair
    errors = _compare(ours, theirs, torch.Generator().manual_seed(2))
    _report("sd1 tiny", errors)
    for kind, (err, scale) in errors.items():
        assert err <= TOL, (kind, err)
        assert scale > 0.1, kind


def test_parity_detects_a_changed_weight(tiny_pair):
    """Scaling the decoder's mid attention value projection by 1.01 breaks decode parity."""
    config, ours, theirs = tiny_pair
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    weight = ours.decoder.mid.attn_1.v.weight
    with torch.no_grad():
        original = weight.clone()
        weight.mul_(1.01)
        err = (ours.decode(z) - theirs.decode(z).sample).abs().max()
        weight.copy_(original)
    assert err > TOL


def test_module_tree_matches_ldm_names():
    sd = AutoencoderKL(VAEConfig(), device="meta").state_dict()
    assert sd["encoder.down.0.downsample.conv.weight"].shape == (128, 128, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in sd
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)  # up.0 = full resolution
    assert sd["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert sd["decoder.up.1.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1) and sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)


def test_downsample_pads_right_and_bottom():
    """LDM model.py Downsample: F.pad(x, (0, 1, 0, 1)) then a stride-2 valid conv; with a kernel that picks the
    top-left tap, output[i, j] = x[2i, 2j] (an even-index subsample, not centred)."""
    from sdcore.models.vae import Downsample

    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1
        down.conv.bias.zero_()
        x = torch.arange(16.0).reshape(1, 1, 4, 4)
        assert torch.equal(down(x), x[:, :, ::2, ::2])
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1  # bottom-right tap: x[2i+2, 2j+2], zero past the last row/column
        assert torch.equal(down(x)[0, 0], torch.tensor([[10.0, 0.0], [0.0, 0.0]]))


def test_diagonal_gaussian():
    """LDM distributions.py: mean/logvar halves, logvar clamped to [-30, 20], std = exp(logvar / 2),
    sample = mean + std * randn(generator)."""
    mean = torch.tensor([0.5, -1.0]).reshape(1, 2, 1, 1)
    logvar = torch.tensor([100.0, -100.0]).reshape(1, 2, 1, 1)
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert torch.equal(dist.mode(), mean)
    assert dist.logvar.flatten().tolist() == [20.0, -30.0]
    torch.testing.assert_close(dist.std.flatten(), torch.tensor([20.0, -30.0]).mul(0.5).exp())
    eps = torch.randn(1, 2, 1, 1, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(dist.sample(torch.Generator().manual_seed(9)), mean + dist.std * eps)
    with pytest.raises(ValueError, match="moments"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        dist.sample(None)


def test_bad_inputs_raise(tiny_pair):
    _, ours, _ = tiny_pair
    with pytest.raises(ValueError, match="divisible by 8"):
        ours.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"x must be \[B, 3"):
        ours.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"z must be \[B, 4"):
        ours.decode(torch.zeros(1, 3, 8, 8))


def test_bf16_close_to_fp32(tiny_pair):
    config, ours, _ = tiny_pair
    model = AutoencoderKL(config, device="meta")
    model.load_state_dict(ours.state_dict(), assign=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model.decode(z)
        low = model.to(torch.bfloat16).decode(z)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.slow
def test_full_size_parity_with_diffusers():
    start = time.perf_counter()
    config = make_checkpoint.family_config("sd1", "full").vae
    ours = AutoencoderKL(config, device="meta").eval()
    theirs = diffusers_vae(random_weights(ours, seed=6), config)
    errors = _compare(ours, theirs, torch.Generator().manual_seed(7), pixels=(128, 96))
    _report(f"sd1 full ({time.perf_counter() - start:.0f} s)", errors)
    for kind, (err, _) in errors.items():
        assert err <= TOL, (kind, err)
