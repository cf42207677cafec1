"""LoRA tags and embedding names in prompts, end to end (issue 10 items 2-4): process_images and the CLI merge the
batch's networks, restore the weights exactly, write A1111's "Lora hashes" / "TI hashes" and reproduce from the
infotext. The LoRA is a random kohya-layout file for the bundled tiny model (scripts/make_lora.py)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from make_lora import addnet_hash_of, make_lora_state_dict, write_lora
from PIL import Image
from safetensors.torch import save_file

from sdcore import StableDiffusionProcessingImg2Img, cli, load_checkpoint, process_images
from sdcore.cli import DEFAULT_CKPT
from sdcore.processing import Options


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(DEFAULT_CKPT)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("loras")
    tensors, metadata = make_lora_state_dict(tiny.family, "kohya", rank=4, alpha=4.0, seed=3)
    # large enough to change the picture: random factors scaled up
    tensors = {k: v * 4 if k.endswith("lora_up.weight") else v for k, v in tensors.items()}
    metadata["sshs_model_hash"] = addnet_hash_of(tensors)  # kohya's hash of what is written (A1111 reads it first)
    write_lora(tensors, metadata, folder / "rand.safetensors")
    return folder


@pytest.fixture(scope="module")
def photo():
    return Image.effect_mandelbrot((64, 64), (-2, -1.5, 1, 1.5), 100).convert("RGB")


def run(tiny, photo, prompt, lora_dir=None, embeddings_dir=None, **kw):
    p = StableDiffusionProcessingImg2Img(
        sd_model=tiny, init_images=[photo], prompt=prompt, seed=7, steps=8, width=64, height=64,
        denoising_strength=0.6, sampler_name="Euler a", opts=Options(lora_dir=lora_dir and str(lora_dir),
                                                                      embeddings_dir=embeddings_dir and str(embeddings_dir)), **kw)
    return process_images(p)


def pixels(processed):
    return [im.tobytes() for im in processed.images]


def state(tiny):
    return {f"{name}.{k}": v.clone() for name, m in tiny.components().items() for k, v in m.state_dict().items()}


def test_weight_zero_is_the_base_image_and_weights_are_restored_exactly(tiny, photo, lora_dir):
    before = state(tiny)
    base = run(tiny, photo, "a red circle")
    zero = run(tiny, photo, "a red circle <lora:rand:0>", lora_dir)
    assert pixels(zero) == pixels(base)
    with_lora = run(tiny, photo, "a red circle <lora:rand:1>", lora_dir)
    assert pixels(with_lora) != pixels(base)
    after = state(tiny)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert pixels(run(tiny, photo, "a red circle")) == pixels(base)  # the same model object serves the next run


def test_te_and_unet_multipliers_act_separately(tiny, photo, lora_dir):
    base = pixels(run(tiny, photo, "a red circle"))
    te_only = pixels(run(tiny, photo, "a red circle <lora:rand:1:0>", lora_dir))
    unet_only = pixels(run(tiny, photo, "a red circle <lora:rand:0:1>", lora_dir))
    both = pixels(run(tiny, photo, "a red circle <lora:rand:1:1>", lora_dir))
    assert len({tuple(base), tuple(te_only), tuple(unet_only), tuple(both)}) == 4


def test_infotext_keeps_the_tag_and_records_the_file_hash(tiny, photo, lora_dir):
    out = run(tiny, photo, "a red circle <lora:rand:0.7>", lora_dir)
    text = out.infotexts[0]
    assert text.startswith("a red circle <lora:rand:0.7>\n")
    data = (lora_dir / "rand.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    addnet = hashlib.sha256(data[8 + n:]).hexdigest()[:12]  # A1111 hashes a .safetensors LoRA's tensor bytes
    assert f'Lora hashes: "rand: {addnet}"' in text


def test_a_batch_uses_its_first_prompts_tags(tiny, photo, lora_dir):
    listed = run(tiny, photo, ["a red circle <lora:rand:1>", "a red circle"], lora_dir, batch_size=2)
    both = run(tiny, photo, "a red circle <lora:rand:1>", lora_dir, batch_size=2)
    assert pixels(listed) == pixels(both)


def test_disable_extra_networks_cuts_the_tags_and_applies_nothing(tiny, photo, lora_dir):
    base = run(tiny, photo, "a red circle")
    off = run(tiny, photo, "a red circle <lora:rand:1>", lora_dir, disable_extra_networks=True)
    assert pixels(off) == pixels(base) and "Lora hashes" not in off.infotexts[0]


def test_unknown_name_lists_what_is_there(tiny, photo, lora_dir):
    with pytest.raises(ValueError, match=r"no LoRA named 'nope' .*available: rand"):
        run(tiny, photo, "<lora:nope:1> a red circle", lora_dir)


def test_cli_writes_hashes_and_reproduces_from_the_infotext(tmp_path, photo, lora_dir, capsys):
    photo.save(tmp_path / "in.png")
    emb_dir = tmp_path / "emb"
    emb_dir.mkdir()
    save_file({"emb_params": torch.randn(2, 128, generator=torch.Generator().manual_seed(0))},
              emb_dir / "shiny.safetensors")
    argv = ["img2img", str(tmp_path / "in.png"), "--prompt", "a shiny red circle <lora:rand:0.8:0.5>", "--steps", "6",
            "--seed", "3", "--lora-dir", str(lora_dir), "--embeddings-dir", str(emb_dir), "--no-save-to-dirs"]
    assert cli.main([*argv, "--outdir", str(tmp_path / "a")]) == 0
    first = next((tmp_path / "a").glob("*.png"))
    text = Image.open(first).info["parameters"]
    assert 'Lora hashes: "rand: ' in text
    emb_hash = hashlib.sha256((emb_dir / "shiny.safetensors").read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "shiny: {emb_hash}"' in text
    again = ["img2img", str(tmp_path / "in.png"), "--from-infotext", str(first), "--lora-dir", str(lora_dir),
             "--embeddings-dir", str(emb_dir), "--no-save-to-dirs", "--outdir", str(tmp_path / "b")]
    assert cli.main(again) == 0
    second = next((tmp_path / "b").glob("*.png"))
    assert Image.open(second).tobytes() == Image.open(first).tobytes()
    assert Image.open(second).info["parameters"] == text
    capsys.readouterr()
    assert cli.main([*argv[:3], "a <lora:typo>", "--lora-dir", str(lora_dir), "--outdir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "no LoRA named 'typo'" in err and "available: rand" in err and not (tmp_path / "c").exists()
