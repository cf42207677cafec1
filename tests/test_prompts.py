"""Prompt syntax and CLIP chunking against hand-derived vectors (spec section 13 "Prompt parsing" and 11.1-11.4)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sdcore.families import CLIP_L, OPENCLIP_H
from sdcore.models.text import TextEncoder, load_tokenizer
from sdcore.prompts import (CHUNK_LENGTH, MulticondLearnedConditioning, apply_emphasis, empty_chunk,
                            encode_prompts, encode_prompts_with_pooled, get_learned_conditioning,
                            get_learned_conditioning_prompt_schedules, get_multicond_learned_conditioning,
                            get_multicond_prompt_list, get_target_prompt_token_count, parse_prompt_attention,
                            reconstruct_cond_batch, reconstruct_multicond_batch, tokenize_line)

BOS, EOS, COMMA, A = 49406, 49407, 267, 320  # a1111-semantics §11.4; 'a</w>' = 256 + ord('a') - ord('!') (tests/test_text.py)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _approx(pieces):
    return [[text, pytest.approx(weight, rel=1e-6)] for text, weight in pieces]


# ------------------------------------------------------------------------------------------ a1111-semantics §13, 11.2

@pytest.mark.parametrize("prompt, expected", [
    ("(a:1.2)", [["a", 1.2]]),
    ("[a]", [["a", 0.9090909]]),
    ("((a))", [["a", 1.21]]),
    ("[[a]]", [["a", 0.8264463]]),
    ("\\(x\\)", [["(x)", 1.0]]),
    ("(a:1.2", [["a:1.2", 1.1]]),
    ("(a) (b:0.5) c", [["a", 1.1], [" ", 1.0], ["b", 0.5], [" c", 1.0]]),
    ("(a [b] c)", [["a ", 1.1], ["b", 1.0], [" c", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.573], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55], [", sun, ", 1.1],
      ["sky", 1.4641], [".", 1.1]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]),
    ("(a:-1)", [["a", -1.0]]),
    ("", [["", 1.0]]),
])
def test_parse_prompt_attention_spec13(prompt, expected):
    """a1111-semantics §13 "Prompt parsing" (parse_prompt_attention vectors)."""
    assert parse_prompt_attention(prompt) == _approx(expected)


@pytest.mark.parametrize("prompt, expected", [
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),  # equal weights merge (11.2)
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("a) b] c", [["a) b] c", 1.0]]),  # stray closers are text
    ("[a", [["a", 1 / 1.1]]),  # unclosed [ applies to the rest
    ("(a: 1.5 ) b", [["a", 1.5], [" b", 1.0]]),  # spaces around an explicit weight
    ("c:1.5) d", [["c:1.5) d", 1.0]]),  # a weight close with no open bracket is text
    ("a\\b \\\\", [["ab \\", 1.0]]),  # a lone backslash is dropped, \\ is one backslash
    ("x BREAK", [["x", 1.0], ["BREAK", -1.0], ["", 1.0]]),
    ("aBREAK b", [["aBREAK b", 1.0]]),  # BREAK must be a whole word
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),  # multiplied like any piece
])
def test_parse_prompt_attention_rules(prompt, expected):
    """Further cases derived from the rules of a1111-semantics §11.2."""
    assert parse_prompt_attention(prompt) == _approx(expected)


def test_parse_prompt_attention_exact_floats():
    """Multipliers are applied innermost first, so (((house:1.3)) is 1.3*1.1*1.1 in that order (a1111-semantics §11.2)."""
    pieces = dict((t, w) for t, w in parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5)"))
    assert pieces["house"] == 1.3 * 1.1 * 1.1
    assert parse_prompt_attention("[a]")[0][1] == 1 / 1.1


def test_parse_prompt_attention_errors():
    with pytest.raises(ValueError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")
    with pytest.raises(TypeError):
        parse_prompt_attention(None)


# ------------------------------------------------------------------------------------------ a1111-semantics §13, 11.3

def _schedule(prompt, steps, **kw):
    return [list(entry) for entry in get_learned_conditioning_prompt_schedules([prompt], steps, **kw)[0]]


@pytest.mark.parametrize("prompt, steps, kw, expected", [
    ("a [b:c:0.5] d", 20, {}, [[10, "a b d"], [20, "a c d"]]),
    ("[a:b:0.25]", 20, {}, [[5, "a"], [20, "b"]]),
    ("a [b::0.5]", 20, {}, [[10, "a b"], [20, "a "]]),
    ("[a:b:1.0]", 20, {}, [[20, "a"]]),
    ("[a:b:0]", 20, {}, [[20, "b"]]),
    ("[a:b:25]", 20, {}, [[20, "a"]]),
    ("a [b:c:10] d", 20, {}, [[10, "a b d"], [20, "a c d"]]),
    ("a [b:3]", 10, {}, [[3, "a "], [10, "a b"]]),
    ("a[b:[c:d:2]:1]e", 10, {}, [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("[a:b:0.5]", 20, {"hires_steps": 10}, [[10, "b"]]),
    ("[a:b:1.5]", 20, {"hires_steps": 10}, [[5, "a"], [10, "b"]]),
    ("[a:b:0.5]", 20, {"use_old_scheduling": True}, [[10, "a"], [20, "b"]]),
    ("[a:b:5]", 20, {"use_old_scheduling": True}, [[5, "a"], [20, "b"]]),
])
def test_schedules_spec13(prompt, steps, kw, expected):
    """a1111-semantics §13 "Prompt parsing", schedule vectors."""
    assert _schedule(prompt, steps, **kw) == expected


def test_alternation_spec13():
    """a1111-semantics §13: `[fe|]male` alternates female/male for steps 1..10."""
    assert _schedule("[fe|]male", 10) == [[s, "female" if s % 2 else "male"] for s in range(1, 11)]
    assert _schedule("[a|b|c]", 4) == [[1, "a"], [2, "b"], [3, "c"], [4, "a"]]


@pytest.mark.parametrize("prompt, expected", [
    ("test", [[10, "test"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),  # spaces before the number
    ("a [b:3 ]", [[3, "a "], [10, "a b"]]),  # and after
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),  # emphasis inside is kept as text
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),  # whitespace of from/to is kept
    ("a [unbalanced", [[10, "a [unbalanced"]]),  # stray bracket at top level
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),  # ".5" has a "." -> fraction
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a:b:-3]", [[10, "b"]]),  # when < 1: not a switch point, and step <= when never holds
    ("[a:b:1e1]", [[10, "a"]]),  # lark SIGNED_NUMBER: 1e1 = 10, no "." -> a step
    ("a | b [c:d:3]", [[10, "a | b [c:d:3]"]]),  # "|" outside brackets: no parse -> unscheduled
    ("(a|b) [c:d:3]", [[10, "(a|b) [c:d:3]"]]),
    ("x [a:(b:3]", [[10, "x [a:(b:3]"]]),  # no valid schedule, text unchanged
    ("\\[a:b:3\\]", [[10, "\\[a:b:3\\]"]]),  # escaped brackets are plain text
    ("[a|(b:1.1)]", [[s, "a" if s % 2 else "(b:1.1)"] for s in range(1, 11)]),
    ("[a|[b:c:5]]", [[s, "a" if s % 2 else ("b" if s <= 5 else "c")] for s in range(1, 11)]),
    ("([a:b:4])", [[4, "(a)"], [10, "(b)"]]),
])
def test_schedules_grammar(prompt, expected):
    """Cases derived by hand from the grammar and `when` rules of a1111-semantics §11.3 (10 steps)."""
    assert _schedule(prompt, 10) == expected


def test_schedules_integer_hires_offset_and_batch():
    """a1111-semantics §11.3: integer `when` in a hires pass is `when - base steps`; results follow the prompt order."""
    assert _schedule("[a:b:25]", 20, hires_steps=10) == [[5, "a"], [10, "b"]]
    out = get_learned_conditioning_prompt_schedules(["x", "[a:b:2]", "x"], 4)
    assert out == [[(4, "x")], [(2, "a"), (4, "b")], [(4, "x")]]
    with pytest.raises(ValueError, match="steps"):
        get_learned_conditioning_prompt_schedules(["x"], 0)
    with pytest.raises(ValueError, match="hires_steps"):
        get_learned_conditioning_prompt_schedules(["x"], 10, hires_steps=1.5)


# ------------------------------------------------------------------------------------------ a1111-semantics §13, 11.1

def test_and_spec13():
    """a1111-semantics §13: `a cat AND a dog:0.5` -> "a cat" (1.0), " a dog" (0.5)."""
    indexes, flat, index_of = get_multicond_prompt_list(["a cat AND a dog:0.5"])
    assert flat == ["a cat", " a dog"]
    assert indexes == [[(0, 1.0), (1, 0.5)]]
    assert index_of == {"a cat": 0, " a dog": 1}


def test_and_rules():
    """a1111-semantics §11.1: word-bounded AND, weights with spaces and signs, texts deduplicated exactly (" x" != "x")."""
    indexes, flat, _ = get_multicond_prompt_list(["x AND y : -2 AND x", "ANDROID AND  x", "a:b"])
    assert flat == ["x", " y", " x", "ANDROID", "  x", "a:b"]
    assert indexes == [[(0, 1.0), (1, -2.0), (2, 1.0)], [(3, 1.0), (4, 1.0)], [(5, 1.0)]]
    assert get_multicond_prompt_list(["a AND b:.5 "])[0] == [[(0, 1.0), (1, 0.5)]]


# ------------------------------------------------------------------------------------------ a1111-semantics §13, 11.4

@pytest.mark.parametrize("n_tokens, n_chunks", [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_counts(tokenizer, n_tokens, n_chunks):
    """a1111-semantics §13: 0, 1, 75 tokens -> one 77-token chunk; 76 -> two; 151 -> three ("a" is one token)."""
    chunks, count = tokenize_line(" ".join(["a"] * n_tokens), tokenizer)
    assert len(chunks) == n_chunks
    assert count == n_tokens
    assert get_target_prompt_token_count(count) == 75 * n_chunks
    for chunk in chunks:
        assert len(chunk.tokens) == len(chunk.multipliers) == 77
        assert chunk.tokens[0] == BOS and chunk.tokens[-1] == EOS
    assert [t for c in chunks for t in c.tokens].count(A) == n_tokens


def test_empty_prompt_chunk(tokenizer):
    """a1111-semantics §11.4: empty prompt -> [BOS, EOS x 76], multipliers 1."""
    chunks, _ = tokenize_line("", tokenizer)
    assert chunks[0].tokens == [BOS] + [EOS] * 76 == empty_chunk(tokenizer).tokens
    assert chunks[0].multipliers == [1.0] * 77


def test_comma_backtrack(tokenizer):
    """a1111-semantics §11.4: 70 x "a", ",", 10 x "(b)": the chunk fills at 71 + 4 b's; the comma is 5 <= 20 from the end,
    so the 4 b's move to the next chunk (with their 1.1 multipliers). Without backtracking they stay."""
    prompt = " ".join(["a"] * 70) + ", " + " ".join(["(b)"] * 10)
    b = tokenizer.encode("b")[0]
    chunks, _ = tokenize_line(prompt, tokenizer)
    assert len(chunks) == 2
    assert chunks[0].tokens == [BOS] + [A] * 70 + [COMMA] + [EOS] * 5
    assert chunks[1].tokens == [BOS] + [b] * 10 + [EOS] * 66
    assert chunks[1].multipliers[1:11] == pytest.approx([1.1] * 10)
    assert chunks[0].multipliers == [1.0] * 77
    off, _ = tokenize_line(prompt, tokenizer, comma_padding_backtrack=0)
    assert off[0].tokens == [BOS] + [A] * 70 + [COMMA] + [b] * 4 + [EOS]
    assert off[1].tokens == [BOS] + [b] * 6 + [EOS] * 70


def test_comma_too_far_back(tokenizer):
    """A comma 25 tokens before the end is beyond the backtrack distance 20: no relocation (a1111-semantics §11.4)."""
    chunks, _ = tokenize_line(" ".join(["a"] * 50) + ", " + " ".join(["b"] * 30), tokenizer)
    assert chunks[0].tokens[51] == COMMA and len([t for t in chunks[0].tokens if t == EOS]) == 1
    near, _ = tokenize_line(" ".join(["a"] * 50) + ", " + " ".join(["b"] * 30), tokenizer,
                            comma_padding_backtrack=25)
    assert near[0].tokens[52:] == [EOS] * 25


def test_break(tokenizer):
    """a1111-semantics §11.4: BREAK closes the chunk; inside brackets it is a weighted word instead (11.2)."""
    chunks, count = tokenize_line("a BREAK a", tokenizer)
    assert [c.tokens[:3] for c in chunks] == [[BOS, A, EOS], [BOS, A, EOS]]
    assert count == 76
    assert len(tokenize_line("(a BREAK a)", tokenizer)[0]) == 1
    assert len(tokenize_line("a BREAK a", tokenizer, emphasis="None")[0]) == 1
    assert len(tokenize_line("BREAK a", tokenizer)[0]) == 2  # an empty first chunk, as in A1111


def test_emphasis_none_keeps_brackets(tokenizer):
    """emphasis "None": no parsing, brackets are tokenised (a1111-semantics §11.4)."""
    plain, _ = tokenize_line("(a)", tokenizer, emphasis="None")
    parsed, _ = tokenize_line("(a)", tokenizer)
    assert parsed[0].tokens[:3] == [BOS, A, EOS] and parsed[0].multipliers[1] == pytest.approx(1.1)
    assert plain[0].tokens[1:4] == tokenizer.encode("(a)") and set(plain[0].multipliers) == {1.0}


@pytest.fixture(scope="module")
def tiny_encoder():
    config = replace(CLIP_L, width=32, layers=2, heads=2)
    encoder = TextEncoder(config).reset_parameters(torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():  # a trained ln_final has a bias; without one mean(z) would be ~0
        encoder.ln_final.bias.copy_(torch.randn(32, generator=torch.Generator().manual_seed(1)))
    return encoder


def _hand_tokens(ids_list):
    return torch.tensor([[BOS] + ids + [EOS] * (76 - len(ids)) for ids in ids_list])


@torch.no_grad()
def test_emphasis_original_mean_restoration(tiny_encoder, tokenizer):
    """a1111-semantics §11.4 "Original": z *= m per token, then z *= mean(z_before) / mean(z_after) with both means over the
    whole (B, 77, C) chunk tensor, checked against that computation by hand."""
    cat = tokenizer.encode("cat")
    prompts = ["(a:1.5) cat", "[cat]"]
    z = tiny_encoder(_hand_tokens([[A] + cat, cat])).hidden
    m = torch.ones(2, 77)
    m[0, 1] = 1.5
    m[1, 1:1 + len(cat)] = 1 / 1.1
    weighted = z * m[..., None]
    expected = weighted * (z.mean() / weighted.mean())
    got = encode_prompts(tiny_encoder, tokenizer, prompts)
    assert got.shape == (2, 77, 32)
    assert (got - expected).abs().max() <= 1e-6
    assert got.mean() == pytest.approx(z.mean().item(), rel=1e-5)
    # per-prompt normalisation would differ: the mean is over the batch
    alone = encode_prompts(tiny_encoder, tokenizer, prompts[:1])
    assert (alone[0] - got[0]).abs().max() > 1e-4
    assert (encode_prompts(tiny_encoder, tokenizer, prompts, emphasis="No norm") - weighted).abs().max() <= 1e-6
    assert torch.equal(encode_prompts(tiny_encoder, tokenizer, prompts, emphasis="Ignore"), z)
    none = encode_prompts(tiny_encoder, tokenizer, ["(a:1.5) cat"], emphasis="None")
    assert torch.equal(none, tiny_encoder(_hand_tokens([tokenizer.encode("(a:1.5) cat")])).hidden)


@torch.no_grad()
def test_encode_chunks_and_batch_padding(tiny_encoder, tokenizer):
    """a1111-semantics §11.4: chunks concatenate to (B, 77k, C); a shorter prompt gets empty chunks; clip_skip passes on."""
    long = " ".join(["a"] * 76)
    got = encode_prompts(tiny_encoder, tokenizer, ["cat", long], clip_skip=2)
    assert got.shape == (2, 154, 32)
    first = tiny_encoder(_hand_tokens([tokenizer.encode("cat"), [A] * 75]), clip_skip=2).hidden
    second = tiny_encoder(_hand_tokens([[], [A]]), clip_skip=2).hidden
    assert torch.equal(got[:, :77], first) and torch.equal(got[:, 77:], second)
    assert encode_prompts(tiny_encoder, tokenizer, [" ".join(["a"] * 151)]).shape == (1, 231, 32)


@torch.no_grad()
def test_zero_padding_and_pooled(tokenizer):
    """a1111-semantics §11.4: open_clip encoders (pad_token "zero") get id 0 after the first EOS; pooled = first chunk's."""
    config = replace(OPENCLIP_H, width=32, layers=2, heads=2, projection_dim=8)
    encoder = TextEncoder(config).reset_parameters(torch.Generator().manual_seed(1)).eval()
    tokens = _hand_tokens([[A, A]])
    tokens[0, 4:] = 0
    ref = encoder(tokens)
    hidden, pooled = encode_prompts_with_pooled(encoder, tokenizer, ["a a" + " a" * 80])
    assert hidden.shape == (1, 154, 32) and pooled.shape == (1, 8)
    single, pooled1 = encode_prompts_with_pooled(encoder, tokenizer, ["a a"])
    assert torch.equal(single, ref.hidden) and torch.equal(pooled1, ref.pooled)


def test_apply_emphasis_does_not_modify_input():
    z = torch.randn(1, 77, 4, generator=torch.Generator().manual_seed(0))
    before = z.clone()
    apply_emphasis(z, torch.full((1, 77), 2.0))
    assert torch.equal(z, before)
    assert torch.equal(apply_emphasis(torch.zeros(1, 77, 4), torch.ones(1, 77)), torch.zeros(1, 77, 4))
    with pytest.raises(ValueError, match="emphasis"):
        apply_emphasis(z, torch.ones(1, 77), "Strong")


def test_encode_prompts_errors(tiny_encoder, tokenizer):
    with pytest.raises(TypeError, match="prompts"):
        encode_prompts(tiny_encoder, tokenizer, "a cat")
    with pytest.raises(TypeError, match="tokenizer"):
        encode_prompts(tiny_encoder, object(), ["a cat"])
    with pytest.raises(ValueError, match="emphasis"):
        encode_prompts(tiny_encoder, tokenizer, ["a"], emphasis="original")
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompts(tiny_encoder, tokenizer, ["a"], clip_skip=0)


# ------------------------------------------------------------------------------- sampling-time conditioning

def _fake_encode(log):
    """texts -> [N, T, 1] where every vector is a distinct code of the text; T = 77 * (1 + len(text) // 10)."""
    def encode(texts):
        log.append(list(texts))
        length = 77 * (1 + max(len(t) for t in texts) // 10)
        codes = torch.tensor([float(sum(map(ord, t)) + len(t)) for t in texts])
        return codes[:, None, None].expand(-1, length, 1).clone()
    return encode


def _code(text):
    return float(sum(map(ord, text)) + len(text))


def test_reconstruct_alternation_call_index():
    """a1111-semantics §11.3: call j uses the first entry with j <= end_at_step, so [a|b] gives a, a, b, a, b, ..."""
    log = []
    c = get_learned_conditioning(_fake_encode(log), ["[a|b]"], 4)
    assert log == [["a", "b", "a", "b"]]
    picked = [reconstruct_cond_batch(c, j)[0, 0, 0].item() for j in range(5)]
    assert picked == [_code("a"), _code("a"), _code("b"), _code("a"), _code("b")]
    assert reconstruct_cond_batch(c, 9)[0, 0, 0].item() == _code("a")  # past the end: first entry (A1111)


def test_reconstruct_multicond_and_weights_and_padding():
    """a1111-semantics §7 step 2 / 11.1: one row per AND part, conds_list = (row, weight); shorter T padded with the last
    vector."""
    log = []
    prompts = ["cat AND [dog:wolf:2]:0.5", "a much longer prompt text"]
    c = get_multicond_learned_conditioning(_fake_encode(log), prompts, 4)
    assert isinstance(c, MulticondLearnedConditioning)
    assert log == [["cat"], [" dog", " wolf"], ["a much longer prompt text"]]  # trailing spaces dropped
    conds_list, tensor = reconstruct_multicond_batch(c, 1)
    assert conds_list == [[(0, 1.0), (1, 0.5)], [(2, 1.0)]]
    assert tensor.shape == (3, 231, 1)
    assert tensor[:, -1, 0].tolist() == [_code("cat"), _code(" dog"), _code("a much longer prompt text")]
    assert reconstruct_multicond_batch(c, 2)[1][1, 0, 0].item() == _code(" dog")  # 2 <= end_at_step 2
    assert reconstruct_multicond_batch(c, 3)[1][1, 0, 0].item() == _code(" wolf")


@torch.no_grad()
def test_learned_conditioning_with_encoder(tiny_encoder, tokenizer):
    """The encoder entry point plugs into the schedule structure: each schedule text encoded as in
    encode_prompts."""
    def encode(texts):
        return encode_prompts(tiny_encoder, tokenizer, texts)
    c = get_learned_conditioning(encode, ["a [cat:dog:0.5]"], 10)
    assert [e.end_at_step for e in c[0]] == [5, 10]
    assert torch.equal(c[0][1].cond, encode_prompts(tiny_encoder, tokenizer, ["a cat", "a dog"])[1])
    assert CHUNK_LENGTH == 75
