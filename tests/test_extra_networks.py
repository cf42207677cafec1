"""`<lora:...>` tags in prompts (sdcore/extra_networks.py), against A1111's rules written out by hand
(modules/extra_networks.py `parse_prompt` / `parse_prompts`, extensions-builtin/Lora/extra_networks_lora.py)."""
from __future__ import annotations

import pytest

from sdcore import extra_networks as en
from sdcore.extra_networks import LoraRequest


def test_tags_are_cut_out_and_split_on_colons():
    text, data = en.parse_prompt("a cat <lora:x:0.5>, red <lora:y> <hypernet:h:2>")
    assert text == "a cat , red  "
    assert [p.items for p in data["lora"]] == [("x", "0.5"), ("y",)]
    assert [p.items for p in data["hypernet"]] == [("h", "2")]


def test_named_items_have_exactly_one_equals_sign():
    p = en.ExtraNetworkParams(("x", "te=0.5", "a=b=c", "0.7"))
    assert p.positional == ("x", "a=b=c", "0.7") and p.named == {"te": "0.5"}


@pytest.mark.parametrize("tag, expected", [
    ("<lora:x>", LoraRequest("x", 1.0, 1.0, None)),
    ("<lora:x:0.5>", LoraRequest("x", 0.5, 0.5, None)),          # unet defaults to te
    ("<lora:x:0.5:0.8>", LoraRequest("x", 0.5, 0.8, None)),
    ("<lora:x:0.5:0.8:16>", LoraRequest("x", 0.5, 0.8, 16)),
    ("<lora:x:unet=0.2>", LoraRequest("x", 1.0, 0.2, None)),
    ("<lora:x:te=0.3>", LoraRequest("x", 0.3, 0.3, None)),        # unet follows te when te is named too
    ("<lora:x:0.5:te=0.9:unet=0>", LoraRequest("x", 0.9, 0.0, None)),
    ("<lora:x:dyn=8:0.4>", LoraRequest("x", 0.4, 0.4, 8)),
    ("<lora:x:-1.5>", LoraRequest("x", -1.5, -1.5, None)),
])
def test_lora_multipliers_follow_a1111(tag, expected):
    stripped, requests = en.batch_networks([f"a {tag} cat"])
    assert stripped == ["a  cat"] and requests == [expected]


def test_a_batch_uses_its_first_prompts_tags_and_every_prompt_loses_its_own():
    stripped, requests = en.batch_networks(["one <lora:a:0.5>", "two <lora:b>", "three"])
    assert stripped == ["one ", "two ", "three"]
    assert requests == [LoraRequest("a", 0.5, 0.5)]
    assert en.batch_networks(["plain", "two <lora:b>"])[1] == []
    assert [r.name for r in en.all_lora_requests(["one <lora:a:0.5>", "two <lora:b>"])] == ["a", "b"]


@pytest.mark.parametrize("prompt, needle", [
    ("<lora:x:abc>", "te='abc' is not a number"),
    ("<lora:x:1:nan>", "unet='nan'; allowed: a finite number"),
    ("<lora:x:1:1:1.5>", "dyn='1.5' is not a whole number"),
    ("<lora:te=1>", "no network name"),
    ("<hypernet:h:1>", "['hypernet'] not supported"),
])
def test_bad_tags_are_clear_errors(prompt, needle):
    with pytest.raises(ValueError, match="prompt: ") as e:
        en.batch_networks([prompt])
    assert needle in str(e.value)


def test_files_are_found_by_stem_and_an_unknown_name_lists_the_available(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.safetensors", "sub/a.pt", "notes.txt", "c.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    assert en.available_loras(tmp_path) == {"a": tmp_path / "sub/a.pt", "b": tmp_path / "b.safetensors",
                                            "c": tmp_path / "c.ckpt"}
    assert en.find_lora("a", tmp_path) == tmp_path / "sub/a.pt"
    with pytest.raises(ValueError, match=r"no LoRA named 'zz' in --lora-dir .*; available: a, b, c"):
        en.find_lora("zz", tmp_path)
    with pytest.raises(ValueError, match="no LoRA folder given; set --lora-dir"):
        en.find_lora("a", None)
    with pytest.raises(ValueError, match="is not a folder"):
        en.find_lora("a", tmp_path / "missing")


def test_lora_hashes_value_drops_colons_and_commas_from_names():
    assert en.lora_hashes_value([("my:lo,ra", "0123456789ab"), ("b", "ffffffffffff")]) == \
        "mylora: 0123456789ab, b: ffffffffffff"
    assert en.lora_hashes_value([]) is None
