"""Textual-inversion embeddings (issue 10 items 4 and 5; a1111-semantics §20).

The oracle for the conditioning is A1111's own mechanism written out by hand: the 77 token ids of each chunk are
spelled out from the prompt (BOS, one id per word, id 0 where an embedding's vectors go, EOS padding), a forward hook
on the text encoder's `token_embedding` overwrites the rows the vectors go to (what A1111 `EmbeddingsWithFixes` does
to the embedding layer's output), the encoder runs on those ids, and emphasis multiplies by hand. sdcore's path
(`prompts.tokenize_line` -> `PromptChunkFix` -> `TextEncoder(token_embeds=...)`) shares none of that code.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import _write
from sdcore import load_checkpoint
from sdcore.checkpoint import CheckpointError
from sdcore.embeddings import (Embedding, EmbeddingDatabase, EmbeddingLookup, embedding_keys, embeddings_used,
                               embeddings_used_by_prompts, load_embedding, load_embeddings_dir, ti_hashes)
from sdcore.families import CLIP_L, SD1, SD2, SDXL, SDXL_REFINER
from sdcore.models.text import TextEncoder, load_tokenizer
from sdcore.pipeline import TextOptions, encode_conds
from sdcore.prompts import encode_prompts, tokenize_line, vector_conditioning

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "sdcore" / "weights" / "sdcore-tiny.safetensors"
BOS, EOS, A, COMMA = 49406, 49407, 320, 267  # CLIP ids of <start>, <end>, "a", "," (a1111-semantics §11.4)
TOL = 1e-6


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    """The bundled tiny model: one CLIP-L-layout text encoder of width 128."""
    return load_checkpoint(TINY)


def vecs(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def emb(name: str, n: int, width: int = 128, seed: int = 0) -> Embedding:
    return Embedding(name, {"*": vecs(n, width, seed)})


def chunk(ids: list[int], pad: str = "eos") -> list[int]:
    """77 ids: BOS, the prompt's ids, EOS padding (open_clip "zero" padding: 0 after the first EOS)."""
    return [BOS] + ids + [EOS] * (76 - len(ids)) if pad == "eos" else [BOS] + ids + [EOS] + [0] * (75 - len(ids))


@torch.no_grad()
def oracle(encoder: TextEncoder, rows: list[list[int]], splices=(), clip_skip: int = 1):
    """encoder(ids) with a forward hook on token_embedding writing `vectors` at rows start.. of batch row b, for each
    (b, start, vectors) in `splices` (A1111 `EmbeddingsWithFixes.forward`)."""
    def hook(module, args, out):
        out = out.clone()
        for b, start, v in splices:
            out[b, start:start + v.shape[0]] = v.to(out.dtype)
        return out

    handle = encoder.token_embedding.register_forward_hook(hook)
    try:
        return encoder(torch.tensor(rows), clip_skip=clip_skip)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------- files


def test_every_file_format(tmp_path):
    """A1111 `load_from_file`: string_to_param (.pt, also as the original trainer's pickled ParameterDict), a
    one-tensor .bin (diffusers concept, 1-D = one vector) and .safetensors ("emb_params", kohya), SDXL
    {clip_l, clip_g} in .safetensors and .pt. Name = file stem; vectors float32, equal to what was written;
    sha256 of the file's bytes, short hash its first 12 hex digits."""
    a1111 = vecs(2, 768, 1)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": a1111.requires_grad_()}, "name": "other",
                "step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, tmp_path / "a1111-style.pt")
    trainer = vecs(3, 768, 2)
    torch.save({"string_to_token": {"*": 265},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(trainer)})},
               tmp_path / "OldTrainer.pt")
    concept = vecs(1, 768, 3)[0]
    torch.save({"<cat-toy>": concept}, tmp_path / "cat-toy.bin")
    kohya = vecs(4, 1024, 4).half()
    save_file({"emb_params": kohya}, tmp_path / "kohya.v2.safetensors")
    clip_l, clip_g = vecs(8, 768, 5), vecs(8, 1280, 6)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "sdxl.safetensors")
    torch.save({"clip_g": clip_g, "clip_l": clip_l}, tmp_path / "sdxl-pickle.PT")

    expected = {"a1111-style.pt": {"*": a1111}, "OldTrainer.pt": {"*": trainer}, "cat-toy.bin": {"*": concept[None]},
                "kohya.v2.safetensors": {"*": kohya.float()}, "sdxl.safetensors": {"clip_l": clip_l, "clip_g": clip_g},
                "sdxl-pickle.PT": {"clip_l": clip_l, "clip_g": clip_g}}
    for file, vectors in expected.items():
        e = load_embedding(tmp_path / file)
        assert e.name == file.rsplit(".", 1)[0] and e.path == tmp_path / file
        assert sorted(e.vectors) == sorted(vectors)
        for key, v in vectors.items():
            assert e.vectors[key].dtype == torch.float32 and torch.equal(e.vectors[key], v.detach())
        assert e.sha256 == hashlib.sha256((tmp_path / file).read_bytes()).hexdigest()
        assert e.shorthash() == e.sha256[:12] and len(e.shorthash()) == 12
    assert load_embedding(tmp_path / "sdxl.safetensors").n_vectors == 8
    assert load_embedding(tmp_path / "sdxl.safetensors").is_sdxl
    assert not load_embedding(tmp_path / "cat-toy.bin").is_sdxl
    assert load_embedding(tmp_path / "kohya.v2.safetensors").name == "kohya.v2"  # only the last extension goes


class NotAllowed:
    pass


def test_bad_files_are_errors_naming_the_file(tmp_path):
    def fails(name: str, match: str):
        with pytest.raises(ValueError, match=match) as info:
            load_embedding(tmp_path / name)
        assert name in str(info.value)

    torch.save({"string_to_param": {"*": vecs(1, 8, 0), "#": vecs(1, 8, 1)}}, tmp_path / "two.pt")
    fails("two.pt", "exactly one tensor")
    save_file({"a": vecs(1, 8, 0), "b": vecs(1, 8, 1)}, tmp_path / "two.safetensors")
    fails("two.safetensors", "not a textual-inversion embedding")
    save_file({"clip_l": vecs(2, 8, 0), "clip_g": vecs(3, 8, 1)}, tmp_path / "counts.safetensors")
    fails("counts.safetensors", "different numbers of vectors")
    save_file({"clip_l": vecs(2, 8, 0), "clip_g": vecs(2, 8, 1), "x": vecs(2, 8, 1)}, tmp_path / "extra.safetensors")
    fails("extra.safetensors", "also found")
    save_file({"emb_params": torch.zeros(1, 2, 8)}, tmp_path / "cube.safetensors")
    fails("cube.safetensors", "float tensor")
    save_file({"emb_params": torch.full((1, 8), float("nan"))}, tmp_path / "nan.safetensors")
    fails("nan.safetensors", "NaN")
    save_file({"emb_params": torch.zeros(76, 8)}, tmp_path / "long.safetensors")
    fails("long.safetensors", "1 to 75 vectors")
    save_file({"emb_params": torch.zeros(2, 8, dtype=torch.int32)}, tmp_path / "int.safetensors")
    fails("int.safetensors", "float tensor")
    torch.save([vecs(1, 8, 0)], tmp_path / "list.pt")
    fails("list.pt", "holds a list")
    torch.save({"string_to_param": {"*": vecs(1, 8, 0)}, "evil": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="NotAllowed.*not allowed"):
        load_embedding(tmp_path / "evil.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x01" * 32)
    fails("garbage.safetensors", "not a readable .safetensors")
    (tmp_path / "notes.txt").write_text("x")
    fails("notes.txt", "allowed: .pt, .bin, .safetensors")
    fails("missing.pt", "does not exist")


def test_embeddings_dir(tmp_path):
    """Sub-folders are searched; names sorted case-insensitively (A1111's order); empty files and other extensions
    are listed in `ignored`; a duplicate name or an unreadable file is an error naming the file(s)."""
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    save_file({"emb_params": vecs(1, 8, 0)}, tmp_path / "Zeta.safetensors")
    torch.save({"string_to_param": {"*": vecs(2, 8, 1)}}, tmp_path / "sub" / "alpha.pt")
    torch.save({"x": vecs(1, 8, 2)}, tmp_path / "sub" / "deeper" / "beta.bin")
    (tmp_path / "alpha.preview.png").write_bytes(b"\x89PNG")
    (tmp_path / "readme.txt").write_text("notes")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)  # followed links are searched once, never in circles
    (tmp_path / "sub" / "deeper" / "same.bin").symlink_to(tmp_path / "sub" / "deeper" / "beta.bin")
    db = load_embeddings_dir(tmp_path)
    assert isinstance(db, EmbeddingDatabase) and list(db) == ["alpha", "beta", "Zeta"] and len(db) == 3
    assert db["alpha"].n_vectors == 2 and dict(db)["beta"].path == tmp_path / "sub" / "deeper" / "beta.bin"
    assert {p.name: reason for p, reason in db.ignored.items()} == {
        "alpha.preview.png": "an image (embeddings stored in images are not read)",
        "readme.txt": "not an embedding file (.pt, .bin, .safetensors)", "empty.pt": "empty file",
        "loop": "a link to a folder already searched",
        "same.bin": f"the same file as {tmp_path / 'sub' / 'deeper' / 'beta.bin'}"}
    save_file({"emb_params": vecs(1, 8, 3)}, tmp_path / "sub" / "Zeta.safetensors")
    with pytest.raises(ValueError, match="two embeddings are named 'Zeta'"):
        load_embeddings_dir(tmp_path)
    (tmp_path / "sub" / "Zeta.safetensors").unlink()
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="broken.pt"):
        load_embeddings_dir(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_embeddings_dir(tmp_path / "nope")


def test_lookup_longest_name_first_and_ambiguous_names(tokenizer):
    """A1111 `ids_lookup`: names are matched on their token ids, longest first; CLIP lower-cases, so "Style" and
    "style" are the same ids: sdcore refuses the pair (A1111 would keep whichever registered first)."""
    short, long = emb("sdc-style", 1, 8), emb("sdc-style-2", 3, 8)
    lookup = EmbeddingLookup.build({"sdc-style": short, "sdc-style-2": long}, tokenizer)
    ids = tokenizer.encode("sdc-style-2 sdc-style a")  # [sdc, -, style, -, 2, sdc, -, style, a]
    assert lookup.find(ids, 0) == (long, 5) and lookup.find(ids, 5) == (short, 3) and lookup.find(ids, 8) == (None, 0)
    with pytest.raises(ValueError, match="same tokens"):
        EmbeddingLookup.build({"Style": emb("Style", 1, 8), "style": emb("style", 1, 8)}, tokenizer)
    with pytest.raises(ValueError, match="no tokens"):
        EmbeddingLookup.build({" ": emb(" ", 1, 8)}, tokenizer)


# ----------------------------------------------------------------------------------------- token placement


def test_tokenize_line_places_vectors_after_bos_with_the_piece_weight(tokenizer):
    """a1111-semantics §20: the name's tokens give way to n id-0 places carrying the piece's emphasis weight; the fix
    offset counts prompt tokens before it (row = offset + 1, after BOS). Matching is within an emphasis piece and
    on token ids (case does not matter)."""
    e2, e3 = emb("myemb", 2, 8), emb("sdc-style", 3, 8)
    db = {"myemb": e2, "sdc-style": e3}
    (c,), count = tokenize_line("a MyEmb a", tokenizer, embeddings=db)
    assert c.tokens == chunk([A, 0, 0, A]) and c.multipliers == [1.0] * 77 and count == 4
    assert [(f.offset, f.embedding) for f in c.fixes] == [(1, e2)]
    (c,), _ = tokenize_line("(myemb:1.3) (sdc-style) a", tokenizer, embeddings=db)
    assert c.tokens[:8] == [BOS, 0, 0, 0, 0, 0, A, EOS]
    assert c.multipliers[:8] == pytest.approx([1, 1.3, 1.3, 1.1, 1.1, 1.1, 1, 1], abs=1e-12)
    assert [(f.offset, f.embedding) for f in c.fixes] == [(0, e2), (2, e3)]
    (c,), _ = tokenize_line("sdc-(style)", tokenizer, embeddings=db)  # the name is cut by a bracket: plain text
    assert c.fixes == [] and c.tokens[1:4] == tokenizer.encode("sdc-") + tokenizer.encode("style")
    assert tokenize_line("a MyEmb a", tokenizer) == tokenize_line("a MyEmb a", tokenizer, embeddings={})


def test_embedding_straddling_token_75_moves_to_the_next_chunk(tokenizer):
    """sd_hijack_clip.tokenize_line: 74 words + a 2-vector embedding: 74 + 2 > 75, so the first chunk is closed
    with one EOS of padding and the vectors open the second chunk (rows 1-2). 73 words + 2 vectors fit exactly."""
    e2 = emb("myemb", 2, 8)
    chunks, count = tokenize_line("a " * 74 + "myemb a", tokenizer, embeddings={"myemb": e2})
    assert [c.tokens for c in chunks] == [chunk([A] * 74), chunk([0, 0, A])] and count == 75 + 3
    assert chunks[0].fixes == [] and [(f.offset, f.embedding) for f in chunks[1].fixes] == [(0, e2)]
    (fit,), _ = tokenize_line("a " * 73 + "myemb", tokenizer, embeddings={"myemb": e2})
    assert fit.tokens == chunk([A] * 73 + [0, 0]) and fit.fixes[0].offset == 73


def test_comma_backtrack_keeps_the_fix_in_the_closed_chunk(tokenizer):
    """A1111's comma backtrack moves tokens and multipliers to the next chunk, not fixes. 60 words, ",", a 2-vector
    embedding (offset 61) and 13 words: at the 13th word the chunk is full (75) and its comma 15 <= 20 tokens back,
    so the 14 tokens after the comma (2 places + 12 words) move on; the fix stays with the first chunk, whose rows
    62-63 (padding by then) get the vectors, and the second chunk starts with two id-0 tokens without vectors."""
    e2 = emb("myemb", 2, 8)
    chunks, _ = tokenize_line("a " * 60 + ", myemb " + "a " * 13, tokenizer, embeddings={"myemb": e2})
    assert [c.tokens for c in chunks] == [chunk([A] * 60 + [COMMA]), chunk([0, 0] + [A] * 13)]
    assert [(f.offset, f.embedding) for f in chunks[0].fixes] == [(61, e2)] and chunks[1].fixes == []


# ---------------------------------------------------------------------------------------- the conditioning


@torch.no_grad()
def test_conditioning_matches_hand_placed_vectors(tiny, tokenizer):
    """Bundled tiny model (width 128), a batch of three prompts, emphasis "No norm": multi-vector embeddings, two in
    one prompt, an emphasised one, and a prompt without any; each row's vectors at the hand-computed rows."""
    encoder = tiny.text_encoders[0]
    e2, e3 = emb("myemb", 2, 128, seed=1), emb("sdc-style", 3, 128, seed=2)
    db = EmbeddingDatabase.of([e2, e3])
    prompts = ["a myemb a", "(myemb:1.3) sdc-style a", "a cat"]
    got = encode_prompts(encoder, tokenizer, prompts, emphasis="No norm", embeddings=db)
    rows = [chunk([A, 0, 0, A]), chunk([0, 0, 0, 0, 0, A]), chunk([A] + tokenizer.encode("cat"))]
    splices = [(0, 2, e2.vectors["*"]), (1, 1, e2.vectors["*"]), (1, 3, e3.vectors["*"])]
    z = oracle(encoder, rows, splices).hidden
    m = torch.ones(3, 77)
    m[1, 1:3] = 1.3
    expected = z * m[..., None]
    err = (got - expected).abs().max().item()
    print(f"\nTI hand-placed vectors, tiny model: max |diff| = {err:.2e}")
    assert got.shape == (3, 77, 128) and err <= TOL
    # the vectors matter: the same prompt read as plain words gives another conditioning
    assert (encode_prompts(encoder, tokenizer, prompts[:1]) - got[:1]).abs().max() > 1e-2
    # through the model and the pipeline's conditioning path
    assert torch.equal(tiny.encode_texts(prompts, emphasis="No norm", embeddings=db), got)
    conds = encode_conds(tiny, prompts[:1], [""], 20, TextOptions(emphasis="No norm", embeddings=db), 64, 64)
    alone = tiny.encode_texts(prompts[:1], emphasis="No norm", embeddings=db)
    assert torch.equal(conds.cond(0)["c_crossattn"], alone)  # (batch of 1: float32 batching differs by ~1e-6)


@torch.no_grad()
def test_chunk_overflow_conditioning(tiny, tokenizer):
    """The straddling embedding of `test_embedding_straddling_token_75_moves_to_the_next_chunk`, encoded: chunk 1 is
    the 74 words alone, chunk 2 has the vectors at rows 1-2; the other prompt of the batch gets an empty chunk."""
    encoder = tiny.text_encoders[0]
    e2 = emb("myemb", 2, 128, seed=3)
    got = encode_prompts(encoder, tokenizer, ["a " * 74 + "myemb a", "a"], embeddings={"myemb": e2})
    first = oracle(encoder, [chunk([A] * 74), chunk([A])]).hidden
    second = oracle(encoder, [chunk([0, 0, A]), chunk([])], [(0, 1, e2.vectors["*"])]).hidden
    err = (got - torch.cat([first, second], dim=1)).abs().max().item()
    print(f"\nTI chunk overflow: max |diff| = {err:.2e}")
    assert got.shape == (2, 154, 128) and err <= TOL
    backtracked = encode_prompts(encoder, tokenizer, ["a " * 60 + ", myemb " + "a " * 13], embeddings={"myemb": e2})
    first = oracle(encoder, [chunk([A] * 60 + [COMMA])], [(0, 62, e2.vectors["*"])]).hidden
    second = oracle(encoder, [chunk([0, 0] + [A] * 13)]).hidden
    assert (backtracked - torch.cat([first, second], dim=1)).abs().max() <= TOL


@torch.no_grad()
def test_emphasis_original_weights_the_embedding(tokenizer):
    """`(myemb:1.3)` with emphasis "Original" on an encoder whose features have a mean (ln_final bias): z * m over
    the embedding's rows, then the whole chunk rescaled by mean(z) / mean(z * m) (a1111-semantics §11.4)."""
    encoder = TextEncoder(replace(CLIP_L, width=32, layers=2, heads=2))
    encoder.reset_parameters(torch.Generator().manual_seed(0)).eval()
    encoder.ln_final.bias.copy_(torch.randn(32, generator=torch.Generator().manual_seed(1)))
    e3 = emb("myemb", 3, 32, seed=4)
    got = encode_prompts(encoder, tokenizer, ["a (myemb:1.3), a"], embeddings={"myemb": e3})
    z = oracle(encoder, [chunk([A, 0, 0, 0, COMMA, A])], [(0, 2, e3.vectors["*"])]).hidden
    m = torch.ones(1, 77)
    m[0, 2:5] = 1.3
    weighted = z * m[..., None]
    expected = weighted * (z.mean() / weighted.mean())
    err = (got - expected).abs().max().item()
    print(f"\nTI emphasis Original: max |diff| = {err:.2e}")
    assert err <= TOL and (got - z).abs().max() > 1e-3


@torch.no_grad()
def test_prompts_without_embeddings_are_bit_identical(tiny):
    """Default None, an empty mapping, and a database whose names the prompts do not contain: the same tensors as
    before embeddings existed (no fixes -> the encoder is called exactly as without the argument)."""
    texts = ["a red circle, (blue:1.2) [square]", "cat " * 80, ""]
    before = tiny.encode_texts(texts)
    db = EmbeddingDatabase.of([emb("myemb", 2, 128), emb("sdc-style", 3, 768)])
    for embeddings in (None, {}, db):
        assert torch.equal(tiny.encode_texts(texts, embeddings=embeddings), before)
    base = encode_conds(tiny, texts[:2], texts[1:], 20, TextOptions(), 64, 64)
    with_db = encode_conds(tiny, texts[:2], texts[1:], 20, TextOptions(embeddings=db), 64, 64)
    for step in (0, 19):
        assert torch.equal(base.cond(step)["c_crossattn"], with_db.cond(step)["c_crossattn"])
        assert torch.equal(base.uncond(step)["c_crossattn"], with_db.uncond(step)["c_crossattn"])


def test_wrong_width_or_kind_is_an_error(tiny):
    """An embedding of another width, or of the other kind (SDXL vs one tensor), is reported with its name and both
    widths before anything is encoded; A1111 would leave it out at load and read its name as plain words."""
    sd15 = Embedding("sd15-emb", {"*": vecs(2, 768, 0)})
    with pytest.raises(ValueError, match=r"'sd15-emb'.*width 768.*width 128"):
        tiny.encode_texts(["a sd15-emb"], embeddings={"sd15-emb": sd15})
    xl = Embedding("xl-emb", {"clip_l": vecs(1, 768, 0), "clip_g": vecs(1, 1280, 1)})
    with pytest.raises(ValueError, match="'xl-emb' is an SDXL embedding"):
        tiny.encode_texts(["xl-emb"], embeddings={"xl-emb": xl})
    with pytest.raises(ValueError, match="one-tensor embedding"):
        sd15.vectors_for("clip_l", 768)
    assert tiny.encode_texts(["a"], embeddings={"sd15-emb": sd15}).shape == (1, 77, 128)  # unused: no error


def test_embedding_keys():
    assert embedding_keys(SD1) == (None,) and embedding_keys(SD2) == (None,)
    assert embedding_keys(SDXL) == ("clip_l", "clip_g") and embedding_keys(SDXL_REFINER) == ("clip_g",)


@torch.no_grad()
def test_sdxl_dual_embedding(ckpt_dir, tokenizer):
    """Reduced SDXL (CLIP-L and bigG, both 64 wide): clip_l's vectors go into CLIP-L's chunk, clip_g's into bigG's
    (zero padding after EOS); c_crossattn = both hidden states side by side; y = bigG's pooled output of the spliced
    input + size embeddings. The refiner (bigG only) takes clip_g."""
    sdxl = load_checkpoint(_write(ckpt_dir, "sdxl", "safetensors"))
    e = Embedding("xlemb", {"clip_l": vecs(2, 64, 7), "clip_g": vecs(2, 64, 8)})
    got = sdxl.encode_texts(["a xlemb"], width=64, height=64, embeddings={"xlemb": e})
    clip_l, big_g = sdxl.text_encoders
    hidden_l = oracle(clip_l, [chunk([A, 0, 0])], [(0, 2, e.vectors["clip_l"])]).hidden
    out_g = oracle(big_g, [chunk([A, 0, 0], pad="zero")], [(0, 2, e.vectors["clip_g"])])
    expected_y = vector_conditioning(sdxl.family, out_g.pooled, 64, 64)
    err_c = (got["c_crossattn"] - torch.cat([hidden_l, out_g.hidden], dim=-1)).abs().max().item()
    err_y = (got["y"] - expected_y).abs().max().item()
    print(f"\nTI SDXL dual: c_crossattn max |diff| = {err_c:.2e}, y = {err_y:.2e}")
    assert err_c <= TOL and err_y <= TOL
    swapped = Embedding("xlemb", {"clip_l": e.vectors["clip_g"], "clip_g": e.vectors["clip_l"]})
    assert (sdxl.encode_texts(["a xlemb"], width=64, height=64, embeddings={"xlemb": swapped})["c_crossattn"]
            - got["c_crossattn"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs an embedding with both clip_l and clip_g"):
        sdxl.encode_texts(["a one"], embeddings={"one": emb("one", 1, 64)})
    real_size = Embedding("big", {"clip_l": vecs(1, 768, 0), "clip_g": vecs(1, 1280, 1)})
    with pytest.raises(ValueError, match=r"'big'.*width 768.*clip_l text encoder's width 64"):
        sdxl.encode_texts(["big"], embeddings={"big": real_size})

    refiner = load_checkpoint(_write(ckpt_dir, "sdxl-refiner", "safetensors"))
    got = refiner.encode_texts(["a xlemb"], width=64, height=64, embeddings={"xlemb": e})
    (g,) = refiner.text_encoders
    out = oracle(g, [chunk([A, 0, 0], pad="zero")], [(0, 2, e.vectors["clip_g"])])
    assert (got["c_crossattn"] - out.hidden).abs().max() <= TOL
    assert (got["y"] - vector_conditioning(refiner.family, out.pooled, 64, 64)).abs().max() <= TOL


def test_text_encoder_token_embeds_shape_is_checked(tiny):
    encoder = tiny.text_encoders[0]
    with pytest.raises(ValueError, match="token_embeds.shape"):
        encoder(torch.tensor([chunk([A])]), token_embeds=torch.zeros(1, 77, 64))


# ------------------------------------------------------------------------------------------------ TI hashes


def test_embeddings_used_and_ti_hashes(tmp_path, tokenizer):
    """The embeddings a batch's conditioning uses: the prompts' (AND parts, every prompt-editing text over the
    steps) first, then the negative prompts'; each once. "TI hashes" = "name: first 12 hex of the file's sha256",
    ":" and "," taken out of the name (A1111 `TextConditionalModel.forward`)."""
    for name, seed in (("myemb", 0), ("sdc-style", 1), ("neg", 2), ("unused", 3), ("odd,na:me", 4)):
        save_file({"emb_params": vecs(1, 8, seed)}, tmp_path / f"{name}.safetensors")
    db = load_embeddings_dir(tmp_path)
    short = {name: hashlib.sha256((tmp_path / f"{name}.safetensors").read_bytes()).hexdigest()[:12] for name in db}
    used = embeddings_used_by_prompts(["a [myemb:cat:0.5] AND sdc-style:0.7"], ["neg, myemb odd,na:me"],
                                      tokenizer, db, steps=20)
    assert [e.name for e in used] == ["myemb", "sdc-style", "neg", "odd,na:me"]
    assert ti_hashes(used) == (f"myemb: {short['myemb']}, sdc-style: {short['sdc-style']}, neg: {short['neg']}, "
                               f"oddname: {short['odd,na:me']}")
    # with 1 step, [myemb:cat:0.5] switches at int(0.5 * 1) = 0: only "a cat" is ever encoded
    assert [e.name for e in embeddings_used_by_prompts(["a [myemb:cat:0.5]"], [""], tokenizer, db, steps=1)] == []
    # chunk by chunk, then text by text: the second chunk's embedding comes after the first chunks'
    order = embeddings_used(["a " * 80 + "myemb", "neg"], tokenizer, db)
    assert [e.name for e in order] == ["neg", "myemb"]
    assert ti_hashes([]) is None and ti_hashes([emb("mem", 1, 8)]) is None  # no file, no hash: left out
