"""Tests for sdcore/rng.py. Vectors cite docs/a1111-semantics.md sections ("a1111-semantics §N")."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from sdcore import rng
from sdcore.rng import ImageRNG, PhiloxGenerator

SHAPE = (4, 8, 8)  # (C, H, W) latent cells of a 64x64 image


def cpu_randn(seed: int, shape, draws: int = 1) -> list[torch.Tensor]:
    """Oracle (a1111-semantics §13): successive `torch.randn(shape, generator=G)` with `G = torch.Generator().manual_seed(seed)`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(draws)]


# ---------------------------------------------------------------------------------------------------------------
# Seeds (a1111-semantics §1, 8.1)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1, "", None, "not a number", "-1"])
def test_get_fixed_seed_randomises_spec1(value):
    expected = random.Random(5).randrange(4294967294)
    assert rng.get_fixed_seed(value, random.Random(5)) == expected


def test_get_fixed_seed_keeps_given_seeds_and_the_global_random_state():
    state = random.getstate()
    assert rng.get_fixed_seed(1234) == 1234
    assert rng.get_fixed_seed("77") == 77
    assert rng.get_fixed_seed(7.0) == 7
    assert 0 <= rng.get_fixed_seed(-1) < 4294967294
    assert random.getstate() == state
    with pytest.raises(ValueError, match="whole number"):
        rng.get_fixed_seed(7.5)
    with pytest.raises(TypeError, match="seed"):
        rng.get_fixed_seed([1])


def test_seed_lists_spec13():
    seeds, subseeds = rng.seed_lists(1000, 7, 0.0, batch_size=2, n_iter=2)
    assert seeds == [1000, 1001, 1002, 1003]
    assert seeds[1 * 2:2 * 2] == [1002, 1003]  # iteration 1
    seeds, subseeds = rng.seed_lists(1000, 7, 0.3, batch_size=2, n_iter=2)
    assert seeds == [1000] * 4 and subseeds == [7, 8, 9, 10]
    with pytest.raises(ValueError, match="n_iter"):
        rng.seed_lists(1, 1, 0, 1, 0)


# ---------------------------------------------------------------------------------------------------------------
# slerp (a1111-semantics §8.2, 13)
# ---------------------------------------------------------------------------------------------------------------

def test_slerp_vectors_spec13():
    low = torch.tensor([[[1.0], [0.0]]])  # shape (1, 2, 1): the vector runs along H (dim 1)
    high = torch.tensor([[[0.0], [1.0]]])
    half = rng.slerp(0.5, low, high)
    assert torch.allclose(half.flatten(), torch.tensor([0.70711, 0.70711]), atol=1e-5)
    assert torch.allclose(rng.slerp(0.0, low, high), low, atol=1e-7)
    assert torch.allclose(rng.slerp(1.0, low, high), high, atol=1e-7)


def test_slerp_nearly_parallel_uses_swapped_linear_weights():
    # mean(dot) > 0.9995 -> low*val + high*(1-val) (A1111 quirk, a1111-semantics §8.2), not the slerp's low*(1-val) +
    # high*val.
    low = torch.tensor([[[1.0], [0.0]]])
    high = torch.tensor([[[1.0], [0.01]]])
    out = rng.slerp(0.3, low, high)
    assert torch.allclose(out, 0.3 * low + 0.7 * high, atol=1e-7)


def test_slerp_normalises_along_dim1_per_channel_and_column():
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(2, 5, 3, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, generator=g,
                                                                                     dtype=torch.float64)
    val = 0.3
    out = rng.slerp(val, low, high)
    for c in range(2):
        for w in range(3):
            a, b = low[c, :, w], high[c, :, w]
            omega = math.acos(float((a / a.norm()) @ (b / b.norm())))
            expected = (math.sin((1 - val) * omega) * a + math.sin(val * omega) * b) / math.sin(omega)
            assert torch.allclose(out[c, :, w], expected, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        rng.slerp(0.5, low, high[:, :4])


# ---------------------------------------------------------------------------------------------------------------
# Philox "NV" (a1111-semantics §8.3, 13)
# ---------------------------------------------------------------------------------------------------------------

def test_philox4x32_10_known_answers():
    # Random123 (D. E. Shaw Research) kat_vectors, "philox4x32 10": counter[4] key[2] -> output[4].
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        out = rng._philox4x32(np.array(counter, dtype=np.uint64)[:, None], np.array(key, dtype=np.uint64))
        assert tuple(int(v) for v in out[:, 0]) == expected


def test_philox_randn_spec13_vectors():
    g = PhiloxGenerator(0)
    first = g.randn((3, 4))
    assert first.dtype == np.float32 and first.shape == (3, 4)
    np.testing.assert_allclose(first, [[-0.9246624, -0.42534396, -2.6438458, 0.14518388],
                                       [-0.12086651, -0.5797257, -0.6228513, -0.32838714],
                                       [-1.074542, -0.3631441, -1.6710504, 2.265505]], atol=1e-6)
    assert g.offset == 1
    np.testing.assert_allclose(g.randn((4,)), [0.18082589, -0.5522627, 0.9238134, -0.73497033], atol=1e-6)
    np.testing.assert_allclose(PhiloxGenerator(1).randn((4,)), [-0.29627782, 2.676448, -0.1408464, -0.84409505],
                               atol=1e-6)


def test_philox_matches_cuda_reference_values():
    # CUDA `torch.randn((3, 4), generator=cuda seed 0)` as printed in A1111's modules/rng_philox.py docstring
    # (a1111-semantics §8.3: the numpy path differs from CUDA by <= 2e-7).
    cuda = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
            [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
            [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
    np.testing.assert_allclose(PhiloxGenerator(0).randn((3, 4)), cuda, atol=3e-7)


def test_philox_is_standard_normal():
    z = PhiloxGenerator(123).randn((200_000,)).astype(np.float64)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


# ---------------------------------------------------------------------------------------------------------------
# ImageRNG (a1111-semantics §8.2, 13)
# ---------------------------------------------------------------------------------------------------------------

def test_cpu_initial_noise_and_later_draws_match_torch_generators_spec13():
    seeds = [1000, 1001]
    r = ImageRNG(SHAPE, seeds, source="CPU")
    streams = [cpu_randn(s, SHAPE, draws=3) for s in seeds]
    for k in range(3):
        x = r.next()
        assert x.shape == (2, *SHAPE) and x.dtype == torch.float32
        assert torch.equal(x, torch.stack([streams[0][k], streams[1][k]]))


def test_batch_independence():
    pair = ImageRNG(SHAPE, [5, 9]).next()
    alone = ImageRNG(SHAPE, [9]).next()
    assert torch.equal(pair[1], alone[0])
    assert not torch.equal(pair[0], pair[1])


def test_gpu_source_on_a_cpu_device_is_the_cpu_stream():
    assert torch.equal(ImageRNG(SHAPE, [3], source="GPU", device="cpu").next(), torch.stack(cpu_randn(3, SHAPE)))


def test_nv_source_is_philox():
    r = ImageRNG((3, 2, 2), [0, 1], source="NV")
    gens = [PhiloxGenerator(0), PhiloxGenerator(1)]
    for _ in range(2):
        expected = torch.stack([torch.from_numpy(g.randn((3, 2, 2))) for g in gens])
        assert torch.equal(r.next(), expected)


def test_eta_noise_seed_delta_spec13():
    # ENSD 31337: the initial noise comes from seed 1000; later draws from a generator seeded 32337.
    r = ImageRNG(SHAPE, [1000], source="CPU", eta_noise_seed_delta=31337)
    first, second, third = r.next(), r.next(), r.next()
    assert torch.equal(first[0], cpu_randn(1000, SHAPE)[0])
    later = cpu_randn(32337, SHAPE, draws=2)
    assert torch.equal(second[0], later[0]) and torch.equal(third[0], later[1])


def test_subseed_slerp_spec82():
    r = ImageRNG(SHAPE, [1000, 1000], subseeds=[7], subseed_strength=0.3)
    x = r.next()
    main = cpu_randn(1000, SHAPE)[0]
    assert torch.equal(x[0], rng.slerp(0.3, main, cpu_randn(7, SHAPE)[0]))
    assert torch.equal(x[1], rng.slerp(0.3, main, cpu_randn(0, SHAPE)[0]))  # subseed list too short -> 0
    # Strength 0 ignores the subseeds.
    assert torch.equal(ImageRNG(SHAPE, [1000], subseeds=[7], subseed_strength=0.0).next()[0], main)
    # The per-seed generator continues after its first draw.
    assert torch.equal(r.next()[0], cpu_randn(1000, SHAPE, draws=2)[1])


def test_seed_resize_from_smaller_spec13():
    # 512x512 target (64^2 latent) from 256x256 (32^2): dx = dy = 16, pasted at [16:48, 16:48].
    shape = (4, 64, 64)
    x = ImageRNG(shape, [42], seed_resize_from_h=256, seed_resize_from_w=256).next()[0]
    full, second = cpu_randn(42, shape, draws=2)
    small = cpu_randn(42, (4, 32, 32))[0]
    assert torch.equal(x[:, 16:48, 16:48], small)
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[16:48, 16:48] = False
    assert torch.equal(x[:, outside], full[:, outside])


def test_seed_resize_from_larger_spec13():
    # From 768x768 (96^2) into 64^2: dx = dy = -16, the window [16:80] of the large noise fills all.
    shape = (4, 64, 64)
    r = ImageRNG(shape, [42], seed_resize_from_h=768, seed_resize_from_w=768)
    x = r.next()[0]
    assert torch.equal(x, cpu_randn(42, (4, 96, 96))[0][:, 16:80, 16:80])
    # The per-seed generator made one full-size draw (the pasted-over canvas); the next draw is its second.
    assert torch.equal(r.next()[0], cpu_randn(42, shape, draws=2)[1])


def test_seed_resize_with_subseed_and_non_square_window():
    shape = (4, 8, 12)
    x = ImageRNG(shape, [5], subseeds=[6], subseed_strength=0.5, seed_resize_from_h=32,
                 seed_resize_from_w=128).next()[0]
    noise = rng.slerp(0.5, cpu_randn(5, (4, 4, 16))[0], cpu_randn(6, (4, 4, 16))[0])
    # dy = (8-4)//2 = 2 (pasted at rows 2..5), dx = (12-16)//2 = -2 (columns 2..13 of the noise fill all 12).
    assert torch.equal(x[:, 2:6, :], noise[:, :, 2:14])
    assert torch.equal(x[:, :2, :], cpu_randn(5, shape)[0][:, :2, :])


def test_centre_paste_odd_differences_spec82():
    # a1111-semantics §8.2 formula with odd size differences (floor division):
    # growing 3 -> 6: dx = (6 - 3)//2 = 1, the noise lands at [1:4]; shrinking 7 -> 4: dx = (4 - 7)//2 = -2, the
    # window is w0 + 2 dx = 3 wide, read from [2:5] of the noise and written to [0:3], so index 3 keeps the target.
    noise, target = torch.arange(9.0).reshape(1, 3, 3), torch.full((1, 6, 6), -1.0)
    out = rng.centre_paste(noise, target)
    assert torch.equal(out[:, 1:4, 1:4], noise)
    assert int((out == -1).sum()) == 36 - 9 and torch.equal(target, torch.full((1, 6, 6), -1.0))
    noise, target = torch.arange(49.0).reshape(1, 7, 7), torch.full((1, 4, 4), -1.0)
    out = rng.centre_paste(noise, target)
    assert torch.equal(out[:, 0:3, 0:3], noise[:, 2:5, 2:5])
    assert bool((out[:, 3, :] == -1).all()) and bool((out[:, :, 3] == -1).all())


def test_seed_resize_to_the_same_size_is_the_plain_path():
    plain = ImageRNG(SHAPE, [11]).next()
    same = ImageRNG(SHAPE, [11], seed_resize_from_h=64, seed_resize_from_w=64).next()
    disabled = ImageRNG(SHAPE, [11], seed_resize_from_h=-1, seed_resize_from_w=256).next()
    assert torch.equal(plain, same) and torch.equal(plain, disabled)


def test_randn_local_is_a_fresh_first_draw():
    assert torch.equal(rng.randn_local(9, (2, 3)), cpu_randn(9, (2, 3))[0])
    np.testing.assert_array_equal(rng.randn_local(9, (2, 3), source="NV").numpy(), PhiloxGenerator(9).randn((2, 3)))


def test_image_rng_rejects_bad_arguments():
    with pytest.raises(ValueError, match="source"):
        ImageRNG(SHAPE, [1], source="cuda")
    with pytest.raises(ValueError, match="shape"):
        ImageRNG((4, 8), [1])
    with pytest.raises(ValueError, match="seeds"):
        ImageRNG(SHAPE, [])
    with pytest.raises(TypeError, match="seeds"):
        ImageRNG(SHAPE, [1.5])
    with pytest.raises(ValueError, match="subseed_strength"):
        ImageRNG(SHAPE, [1], subseed_strength=1.5)
    with pytest.raises(ValueError, match="seed_resize"):
        ImageRNG(SHAPE, [1], seed_resize_from_h=4, seed_resize_from_w=64)
