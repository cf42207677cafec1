"""Prompts -> conditioning tensors, with A1111's prompt syntax (spec section 11).

Written from the behaviour described in the spec and A1111 `modules/prompt_parser.py`, `modules/sd_hijack_clip.py`
and `modules/sd_emphasis.py` (v1.10.1); the schedule grammar is parsed by a small hand-written recursive-descent
parser instead of lark.

Syntax, in the order it is applied:
1. Composable diffusion (11.1): `a cat AND a dog:0.5` -> AND parts with weights, each its own conditioning,
   combined in the CFG sum (`get_multicond_prompt_list`).
2. Prompt editing (11.3): `[from:to:when]`, `[to:when]`, `[from::when]`, alternation `[a|b]` -> one text per range
   of sampling steps (`get_learned_conditioning_prompt_schedules`).
3. Emphasis (11.2): `(a)` x1.1, `[a]` /1.1, `(a:1.3)`, escapes `\\(`; `BREAK` -> per-token multipliers and chunk
   breaks (`parse_prompt_attention`).
4. CLIP (11.4): 75-token chunks (BOS + 75 + EOS = 77 ids) with comma backtracking, each encoded separately and
   concatenated -> [B, 77*k, C] (`encode_prompts`). Textual-inversion embeddings (§20, `sdcore.embeddings`) are
   found by name here and their vectors replace the name's token embeddings.
5. Per family (`encode_family_conditioning`): SD1/SD2 -> that tensor; SDXL -> {"c_crossattn": both encoders'
   outputs side by side, "y": pooled text + size/crop/aesthetic embeddings} (A1111 `sd_models_xl.py`).

Glossary: B = number of prompts, k = chunks per prompt, C = text-encoder width (768 for SD1), T = 77*k tokens.
"step" in schedules counts sampler model calls from 1 (`end_at_step`); `reconstruct_*` take the 0-based call index.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from sdcore.embeddings import Embedding, EmbeddingLookup, as_lookup, embedding_keys
from sdcore.families import Family
from sdcore.models.text import TextEncoder
from sdcore.models.unet import timestep_embedding

CHUNK_LENGTH = 75  # prompt tokens per chunk; + BOS + EOS = 77 = CLIP's context length (a1111-semantics §11.4)
COMMA_PADDING_BACKTRACK = 20  # A1111 option `comma_padding_backtrack` default (a1111-semantics §11.4)
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")  # A1111 `sd_emphasis.options` names (a1111-semantics §11.4)
ROUND_MULTIPLIER = 1.1  # `(text)` (a1111-semantics §11.2)
SQUARE_MULTIPLIER = 1 / 1.1  # `[text]`

# --------------------------------------------------------------------------------------------- 11.2 emphasis

_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
# `:w)` closing a round bracket with an explicit weight; A1111 allows spaces around w.
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_SPECIAL = "\\()[]:"


def _short(text: str, limit: int = 60) -> str:
    """repr of text, cut to `limit` characters for error messages."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _plain_pieces(text: str) -> list[list]:
    """A run of plain text; each whole-word BREAK becomes the chunk-break marker ["BREAK", -1]."""
    pieces: list[list] = []
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            pieces.append(["BREAK", -1.0])
        pieces.append([part, 1.0])
    return pieces


def parse_prompt_attention(text: str) -> list[list]:
    """Split a prompt into [text, weight] pieces (A1111 `prompt_parser.parse_prompt_attention`, a1111-semantics §11.2).

    `(x)` multiplies x's weight by 1.1, `[x]` by 1/1.1, `(x:w)` by w (w = `[+-]?[.\\d]+`, spaces allowed);
    brackets nest multiplicatively; an unclosed `(`/`[` applies to the rest of the prompt; a stray `)`/`]` is text;
    `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters and any other backslash is dropped; a whole-word
    `BREAK` in plain text becomes ["BREAK", -1] (a chunk break; it is multiplied like any piece, so inside
    brackets it stops being a break, as in A1111). Adjacent pieces with equal weights are merged; an empty prompt
    gives [["", 1.0]].

    Example: "a (b:1.2) [c]" -> [["a ", 1.0], ["b", 1.2], [" ", 1.0], ["c", 0.9090909090909091]].
    Returns a new list of [str, float] lists. Raises TypeError if text is not a str, ValueError if an explicit
    weight such as `(a:1.2.3)` is not a number, or if a weight is not finite (`(a:999...9)` with 309+ digits, or
    thousands of nested brackets multiplying past 1.8e308; A1111 would carry inf/NaN into the conditioning).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    pieces: list[list] = []
    round_open: list[int] = []  # index into `pieces` where each open bracket starts
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    i = 0
    while i < len(text):
        c = text[i]
        weight_close = _WEIGHT_CLOSE.match(text, i) if c == ":" else None
        if c == "\\":
            escaped = text[i + 1:i + 2]
            literal = escaped if escaped and escaped in "()[]\\" else ""
            pieces.append([literal, 1.0])
            i += 1 + len(literal)
        elif c == "(":
            round_open.append(len(pieces))
            i += 1
        elif c == "[":
            square_open.append(len(pieces))
            i += 1
        elif weight_close and round_open:
            try:
                factor = float(weight_close[1])
            except ValueError:
                raise ValueError(f"prompt {text!r}: emphasis weight {weight_close[1]!r} at position {i} is not a "
                                 "number") from None
            if not math.isfinite(factor):
                raise ValueError(f"prompt {_short(text)}: emphasis weight at position {i} is not a finite number "
                                 f"({factor})")
            multiply_from(round_open.pop(), factor)
            i = weight_close.end()
        elif c == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
            i += 1
        elif c == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
            i += 1
        else:
            if weight_close:
                end = weight_close.end()
            elif c in _SPECIAL:
                end = i + 1
            else:
                end = i + 1
                while end < len(text) and text[end] not in _SPECIAL:
                    end += 1
            pieces.extend(_plain_pieces(text[i:end]))
            i = end
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    if not pieces:
        return [["", 1.0]]
    for piece in pieces:
        if not math.isfinite(piece[1]):
            raise ValueError(f"prompt {_short(text)}: nested emphasis multiplies the weight of {_short(piece[0])} "
                             f"to {piece[1]}; weights must be finite")
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged


# ---------------------------------------------------------------------------------------- 11.3 prompt editing


@dataclass(frozen=True)
class _Scheduled:
    """`[before:after:when]`; `when` is the number's source text (its "." decides fraction vs step)."""

    before: tuple
    after: tuple
    when: str


@dataclass(frozen=True)
class _Alternate:
    """`[a|b|...]`: option (step - 1) mod k at each step."""

    options: tuple


# lark `common.SIGNED_NUMBER` (what A1111's grammar uses for `when`), with the optional spaces and the closing "]".
_WHEN_CLOSE = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_NOT_PLAIN = "\\[]():|"


class _ScheduleParser:
    """Recursive descent over A1111's prompt-editing grammar (prompt_parser.py, lark):

        start:     (prompt | stray)*          stray = one of  [ ] ( ) :  that starts no construct (top level only)
        prompt:    (emphasized | scheduled | alternate | plain)*
        emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"   (kept as text)
        scheduled: "[" [prompt ":"] prompt ":" NUMBER "]"      (spaces allowed around NUMBER)
        alternate: "[" prompt ("|" prompt)+ "]"
        plain:     characters other than \\ [ ] ( ) : |, or a backslash and the next character

    A construct that does not close is not one: its opening character is stray text at the top level and ends
    the enclosing construct (which then fails) inside. A "|" outside an alternate, or a backslash at the end,
    has no parse: `parse` returns None and the prompt is used unscheduled, as in A1111.

    Known divergence: lark's Earley parser resolves some ambiguous malformed prompts differently. When a
    schedule's closing "]" is directly followed by two or more stray bracket/colon characters (`[a:b:5]))`,
    `x [a:b:5]]] y`, `[a:b:5]::`), A1111 reads the whole construct as plain text; this parser keeps the schedule.
    A fuzz comparison against A1111's grammar run by lark found no other difference.
    """

    def __init__(self, text: str):
        self.text = text

    def parse(self) -> tuple | None:
        nodes: list = []
        i = 0
        while i < len(self.text):
            items, j = self._prompt(i)
            if j > i:
                nodes.extend(items)
                i = j
            elif self.text[i] in "[]():":
                nodes.append(self.text[i])
                i += 1
            else:
                return None
        return tuple(nodes)

    def _prompt(self, i: int) -> tuple[list, int]:
        nodes: list = []
        text = self.text
        while i < len(text):
            c = text[i]
            if c == "(":
                found = self._round(i)
            elif c == "[":
                found = self._square(i)
            else:
                found = self._plain(i)
            if found is None:
                break
            node, i = found
            nodes.extend(node)
        return nodes, i

    def _plain(self, i: int) -> tuple[list, int] | None:
        text, j = self.text, i
        while j < len(text):
            if text[j] == "\\" and j + 1 < len(text) and text[j + 1] != "\n":
                j += 2
            elif text[j] not in _NOT_PLAIN:
                j += 1
            else:
                break
        return ([text[i:j]], j) if j > i else None

    def _at(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def _round(self, i: int) -> tuple[list, int] | None:
        first, j = self._prompt(i + 1)
        if self._at(j) == ")":
            return ["(", *first, ")"], j + 1
        if self._at(j) == ":":
            second, k = self._prompt(j + 1)
            if self._at(k) == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        return None

    def _square(self, i: int) -> tuple[list, int] | None:
        first, j = self._prompt(i + 1)
        after_first = self._at(j)
        if after_first == "]":
            return ["[", *first, "]"], j + 1
        if after_first == "|":
            options = [tuple(first)]
            while self._at(j) == "|":
                option, j = self._prompt(j + 1)
                options.append(tuple(option))
            return ([_Alternate(tuple(options))], j + 1) if self._at(j) == "]" else None
        if after_first != ":":
            return None
        when = _WHEN_CLOSE.match(self.text, j + 1)
        if when:  # [to:when]
            return [_Scheduled((), tuple(first), when[1])], when.end()
        second, k = self._prompt(j + 1)
        when = _WHEN_CLOSE.match(self.text, k + 1) if self._at(k) == ":" else None
        if when:  # [from:to:when]
            return [_Scheduled(tuple(first), tuple(second), when[1])], when.end()
        return None


@dataclass(frozen=True)
class _StepRule:
    """How a `when` number becomes a step (a1111-semantics §11.3)."""

    steps: int
    int_offset: int
    float_offset: float
    old: bool

    def step_of(self, when: str) -> int:
        value = float(when)
        if self.old:
            value = value * self.steps if value < 1 else value
        elif "." in when:
            value = (value - self.float_offset) * self.steps
        else:
            value = value - self.int_offset
        if not math.isfinite(value):  # `[a:b:1e999]`: A1111's int(inf) raises OverflowError; +inf never switches
            return self.steps if value > 0 else -1
        return min(self.steps, int(value))


def _switch_steps(nodes: Sequence, rule: _StepRule, out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = rule.step_of(node.when)
            if when >= 1:
                out.add(when)
            _switch_steps(node.before, rule, out)
            _switch_steps(node.after, rule, out)
        elif isinstance(node, _Alternate):
            out.update(range(1, rule.steps + 1))
            for option in node.options:
                _switch_steps(option, rule, out)


def _text_at(nodes: Sequence, step: int, rule: _StepRule) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, _Scheduled):
            parts.append(_text_at(node.before if step <= rule.step_of(node.when) else node.after, step, rule))
        elif isinstance(node, _Alternate):
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, rule))
        else:
            parts.append(node)
    return "".join(parts)


MAX_BRACKET_DEPTH = 100  # the recursive schedule parser's limit (Python's stack); A1111's is lark's


def _bracket_depth(text: str) -> int:
    """The most brackets open at once ( "(" "[" +1, ")" "]" -1, never below 0, backslash pairs skipped): an upper
    bound of `_ScheduleParser`'s recursion depth in constructs."""
    depth = deepest = i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 1
        elif c in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]":
            depth = max(0, depth - 1)
        i += 1
    return deepest


def _check_steps(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; allowed: an int >= 1")


def get_learned_conditioning_prompt_schedules(prompts: Sequence[str], steps: int, hires_steps: int | None = None,
                                              use_old_scheduling: bool = False) -> list[list[tuple[int, str]]]:
    """Prompt editing: for each prompt, [(end_at_step, text), ...] sorted by step, last end_at_step = steps
    (A1111 `prompt_parser.get_learned_conditioning_prompt_schedules`, a1111-semantics §11.3).

    `when` of `[from:to:when]`: with a "." it is a fraction of the steps, `int((when - off) * steps)`, else a step
    number `when - off_int`; off = 0, off_int = 0 for the base pass; for a hires pass (`hires_steps` given) off =
    1.0 and off_int = `steps` and the schedule spans `hires_steps`. Clipped to `min(steps, .)`; a switch point
    only if >= 1; a `when` beyond float range (`1e999`) counts as +-inf (A1111 raises OverflowError). The text
    uses `from` while step <= when. `use_old_scheduling`: when < 1 is a fraction, else a step (base steps; hires
    offsets ignored). Alternation `[a|b]` adds every step 1..steps and picks option
    (step - 1) mod k. A prompt the grammar cannot parse (e.g. a "|" outside brackets) is [(steps, prompt)].

    Example (steps 20): "a [b:c:0.5] d" -> [(10, "a b d"), (20, "a c d")].
    Raises ValueError for steps/hires_steps that are not ints >= 1 or a prompt with more than MAX_BRACKET_DEPTH
    (100) brackets open at once (the parser is recursive), TypeError for non-str prompts.
    """
    _check_steps("steps", steps)
    if hires_steps is not None:
        _check_steps("hires_steps", hires_steps)
    if hires_steps is None or use_old_scheduling:
        rule = _StepRule(steps, 0, 0.0, use_old_scheduling)
    else:
        rule = _StepRule(hires_steps, steps, 1.0, False)
    cache: dict[str, list[tuple[int, str]]] = {}
    result = []
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        if prompt not in cache:
            if _bracket_depth(prompt) > MAX_BRACKET_DEPTH:
                raise ValueError(f"prompt {_short(prompt)}: more than {MAX_BRACKET_DEPTH} brackets open at once; "
                                 "nest ( and [ less deeply")
            tree = _ScheduleParser(prompt).parse()
            if tree is None:
                cache[prompt] = [(rule.steps, prompt)]
            else:
                points = {rule.steps}
                _switch_steps(tree, rule, points)
                cache[prompt] = [(s, _text_at(tree, s, rule)) for s in sorted(points)]
        result.append(list(cache[prompt]))
    return result


# ---------------------------------------------------------------------------------------------------- 11.1 AND

_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def get_multicond_prompt_list(prompts: Sequence[str]) -> tuple[list[list[tuple[int, float]]], list[str],
                                                                     dict[str, int]]:
    """Composable diffusion: split each prompt on the word AND (A1111 `get_multicond_prompt_list`, a1111-semantics §11.1).

    Each part may end in `:weight` (default 1.0; trailing spaces dropped, other whitespace kept). Returns
    (per-prompt [(index into flat list, weight), ...], flat list of unique part texts, text -> index).
    Example: ["a cat AND a dog:0.5"] -> ([[(0, 1.0), (1, 0.5)]], ["a cat", " a dog"], {...}).
    Raises TypeError for non-str prompts, ValueError for a weight beyond float range (309+ digits; A1111 would
    multiply the guidance by inf).
    """
    indexes: list[list[tuple[int, float]]] = []
    flat: list[str] = []
    index_of: dict[str, int] = {}
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        parts = []
        for part in _AND.split(prompt):
            text, weight = _PART_WEIGHT.match(part).groups()
            value = float(weight) if weight is not None else 1.0
            if not math.isfinite(value):
                raise ValueError(f"prompt {_short(prompt)}: AND weight of part {_short(text)} is not a finite "
                                 f"number ({value})")
            if text not in index_of:
                index_of[text] = len(flat)
                flat.append(text)
            parts.append((index_of[text], value))
        indexes.append(parts)
    return indexes, flat, index_of


# ------------------------------------------------------------------------------------- 11.4 chunks, encoding


@dataclass(frozen=True)
class PromptChunkFix:
    """Textual inversion: `embedding`'s vectors go to rows offset + 1 ... offset + n of the chunk's 77 (after BOS);
    `offset` counts the chunk's prompt tokens before it (A1111 `PromptChunkFix`, a1111-semantics §20)."""

    offset: int
    embedding: Embedding


@dataclass
class PromptChunk:
    """One CLIP input: 77 token ids (BOS, 75 prompt/padding tokens, EOS), one emphasis multiplier per id, and the
    embeddings placed in it (`fixes`; their rows hold token id 0, as in A1111)."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[PromptChunkFix] = field(default_factory=list)


@dataclass(frozen=True)
class _Ids:
    bos: int
    eos: int
    comma: int | None


def _special_ids(tokenizer) -> _Ids:
    for name in ("encode", "sot_token_id", "eot_token_id", "encoder"):
        if not hasattr(tokenizer, name):
            raise TypeError(f"tokenizer must be open_clip's SimpleTokenizer (sdcore.models.text.load_tokenizer()); "
                            f"{type(tokenizer).__name__} has no {name!r}")
    return _Ids(tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.encoder.get(",</w>"))


def _check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis={emphasis!r}; allowed: {EMPHASIS_MODES}")


def empty_chunk(tokenizer) -> PromptChunk:
    """[BOS, EOS x 76] with multipliers 1.0: the empty prompt, and the filler for shorter prompts in a batch."""
    ids = _special_ids(tokenizer)
    return PromptChunk([ids.bos] + [ids.eos] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2))


def tokenize_line(line: str, tokenizer, emphasis: str = "Original",
                  comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
                  embeddings: Mapping[str, Embedding] | EmbeddingLookup | None = None
                  ) -> tuple[list[PromptChunk], int]:
    """One prompt -> 77-token chunks (A1111 `TextConditionalModel.tokenize_line`, a1111-semantics §11.4).

    Emphasis pieces are tokenised separately (no BOS/EOS) and laid out 75 per chunk, each token carrying its
    piece's weight. When a chunk is full and the next token is not a comma, the tokens after the chunk's last
    comma move to the next chunk if that comma is within `comma_padding_backtrack` tokens of the end (0 = off).
    A BREAK marker closes the current chunk. Chunks are padded with EOS, then wrapped in BOS ... EOS (multiplier
    1.0 there). emphasis "None" skips parsing (brackets and BREAK are plain text).

    Textual inversion (`embeddings`, a1111-semantics §20): where the tokens of an emphasis piece spell an embedding's
    name (longest name first), its n vectors take n token places (id 0, the piece's weight) instead of the name's
    tokens, recorded as a `PromptChunkFix`; if they do not fit in the current chunk, the chunk is closed (padded)
    and they start the next one. As in A1111, the comma backtrack moves tokens but not fixes: an embedding in the
    moved tail keeps its vectors in the closed chunk (over its padding) and leaves id-0 tokens in the new one.

    Returns (chunks, token_count); token_count counts 75 per closed chunk plus the last chunk's real length
    (A1111's display count).
    Raises ValueError for an unknown emphasis mode or a negative comma_padding_backtrack, and as
    `EmbeddingLookup.build` for embedding names.
    """
    _check_emphasis(emphasis)
    if isinstance(comma_padding_backtrack, bool) or not isinstance(comma_padding_backtrack, int) \
            or comma_padding_backtrack < 0:
        raise ValueError(f"comma_padding_backtrack={comma_padding_backtrack!r}; allowed: an int >= 0")
    ids = _special_ids(tokenizer)
    lookup = as_lookup(embeddings, tokenizer)
    parsed = [[line, 1.0]] if emphasis == "None" else parse_prompt_attention(line)
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1  # position in `chunk` of its last comma

    def close_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        padding = CHUNK_LENGTH - len(chunk.tokens)
        chunks.append(PromptChunk([ids.bos] + chunk.tokens + [ids.eos] * padding + [ids.eos],
                                  [1.0] + chunk.multipliers + [1.0] * padding + [1.0], chunk.fixes))
        chunk = PromptChunk()
        last_comma = -1

    for text, weight in parsed:
        if text == "BREAK" and weight == -1:
            close_chunk()
            continue
        tokens = tokenizer.encode(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == ids.comma:
                last_comma = len(chunk.tokens)
            elif (comma_padding_backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                  and CHUNK_LENGTH - last_comma <= comma_padding_backtrack):
                moved = PromptChunk(chunk.tokens[last_comma + 1:], chunk.multipliers[last_comma + 1:])
                del chunk.tokens[last_comma + 1:], chunk.multipliers[last_comma + 1:]
                close_chunk()
                chunk = moved
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()
            embedding, name_length = lookup.find(tokens, position) if lookup else (None, 0)
            if embedding is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            n = embedding.n_vectors
            if len(chunk.tokens) + n > CHUNK_LENGTH:  # never split between chunks
                close_chunk()
            chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
            chunk.tokens += [0] * n
            chunk.multipliers += [weight] * n
            position += name_length
    if chunk.tokens or not chunks:
        close_chunk(is_last=True)
    return chunks, token_count


def get_target_prompt_token_count(token_count: int) -> int:
    """Token budget shown by A1111's counter: `ceil(max(n, 1) / 75) * 75` (0, 1, 75 -> 75; 76 -> 150)."""
    return math.ceil(max(token_count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, emphasis: str = "Original") -> torch.Tensor:
    """Weight encoder outputs by token multipliers (A1111 `sd_emphasis`, a1111-semantics §11.4).

    z: [B, 77, C] one chunk for the batch; multipliers: [B, 77]. "No norm": `z * m`; "Ignore" and "None": z
    unchanged. "Original": `w = z * m`, then A1111's mean restoration `w * (mean(z) / mean(w))`, both means over
    the whole [B, 77, C] tensor (one scalar each), with A1111's operations in z's dtype, so a float32 result is
    A1111's to the bit (for a float16/bfloat16 z, A1111's float32 multipliers promote w and the means to float32;
    sdcore stays in z's dtype), except in one case:

    **sdcore deviates:** the restoration is skipped for the chunk (the result is `w`, as "No norm") when a mean
    vanishes, i.e. `|mean(z)| <= eps * mean(|z|)` or `|mean(w)| <= eps * mean(|w|)` (eps = `torch.finfo(z.dtype)
    .eps`, one rounding unit: such a mean is rounding noise, not a property of the prompt), or when A1111's result
    is not finite. Below that floor A1111 multiplies by noise: 0/x gives all-zero conditioning, x/0 inf, 0/0 NaN, a
    tiny/tiny ratio an arbitrary scale. This happens with encoders whose features have mean 0 by construction,
    e.g. a final LayerNorm without bias (the bundled tiny model: mean(z) is 0.0 or ~5e-9 against mean(|z|) 0.8).
    Wherever A1111's result is finite and both means are above the floor, the result is A1111's exactly.

    All multipliers 1 -> z unchanged in every mode (A1111's ratio is then exactly 1, or its mean is below the
    floor). Returns z itself or a new tensor (z is never modified).
    """
    _check_emphasis(emphasis)
    if emphasis in ("Ignore", "None") or bool((multipliers == 1).all()):
        return z
    weighted = z * multipliers.to(z.dtype)[..., None]  # (B, 77, C)
    if emphasis == "No norm":
        return weighted
    before, after = z.mean(), weighted.mean()  # A1111: one scalar each, in z's dtype
    restored = weighted * (before / after)
    eps = torch.finfo(z.dtype).eps
    if (bool(before.abs() > eps * z.abs().mean()) and bool(after.abs() > eps * weighted.abs().mean())
            and bool(torch.isfinite(restored).all())):
        return restored
    return weighted


def _chunk_tokens(chunks: Sequence[PromptChunk], ids: _Ids, pad_token: str, device) -> torch.Tensor:
    """[B, 77] ids; for open_clip ("zero") padding every id after the first EOS becomes 0 (A1111 `process_tokens`)."""
    tokens = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)
    if pad_token == "zero":
        for row, chunk in enumerate(chunks):
            tokens[row, chunk.tokens.index(ids.eos) + 1:] = 0
    elif pad_token != "eos":
        raise ValueError(f"TextConfig.pad_token={pad_token!r}; allowed: 'eos', 'zero'")
    return tokens


def _spliced_token_embeds(text_encoder: TextEncoder, tokens: torch.Tensor, chunks: Sequence[PromptChunk],
                          embedding_key: str | None) -> torch.Tensor:
    """The encoder's input embeddings [B, 77, W] with each fix's vectors in rows offset+1 ... offset+n, cast to the
    embedding table's dtype and device (A1111 `EmbeddingsWithFixes.forward`, a1111-semantics §20)."""
    embeds = text_encoder.token_embedding(tokens)  # (B, 77, W)
    width = text_encoder.config.width
    rows = []
    for row, chunk in zip(embeds, chunks):
        for fix in chunk.fixes:
            vectors = fix.embedding.vectors_for(embedding_key, width).to(row.dtype).to(row.device)
            n = min(row.shape[0] - fix.offset - 1, vectors.shape[0])
            row = torch.cat([row[:fix.offset + 1], vectors[:n], row[fix.offset + 1 + n:]])
        rows.append(row)
    return torch.stack(rows)


def encode_prompts_with_pooled(text_encoder: TextEncoder, tokenizer, prompts: Sequence[str], clip_skip: int = 1,
                               emphasis: str = "Original",
                               comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
                               embeddings: Mapping[str, Embedding] | EmbeddingLookup | None = None,
                               embedding_key: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`encode_prompts`, also returning the first chunk's pooled output [B, P] (None if the encoder has no
    projection), which is what A1111 passes on for SDXL (`TextConditionalModel.forward`)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of str, got {prompts!r}")
    ids = _special_ids(tokenizer)
    lookup = as_lookup(embeddings, tokenizer)
    cache: dict[str, list[PromptChunk]] = {}
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = tokenize_line(prompt, tokenizer, emphasis, comma_padding_backtrack, lookup)[0]
    batch = [cache[p] for p in prompts]
    for fix in (fix for chunks in batch for chunk in chunks for fix in chunk.fixes):  # errors before any encoding
        fix.embedding.vectors_for(embedding_key, text_encoder.config.width)
    device = text_encoder.positional_embedding.device
    empty = empty_chunk(tokenizer)
    zs, pooled = [], None
    for index in range(max(len(chunks) for chunks in batch)):
        chunks = [c[index] if index < len(c) else empty for c in batch]
        tokens = _chunk_tokens(chunks, ids, text_encoder.config.pad_token, device)
        if any(chunk.fixes for chunk in chunks):
            embeds = _spliced_token_embeds(text_encoder, tokens, chunks, embedding_key)
            out = text_encoder(tokens, clip_skip=clip_skip, token_embeds=embeds)
        else:
            out = text_encoder(tokens, clip_skip=clip_skip)
        multipliers = torch.tensor([c.multipliers for c in chunks], device=device)
        zs.append(apply_emphasis(out.hidden, multipliers, emphasis))
        pooled = out.pooled if index == 0 else pooled
    return torch.cat(zs, dim=1), pooled


def encode_prompts(text_encoder: TextEncoder, tokenizer, prompts: Sequence[str], clip_skip: int = 1,
                   emphasis: str = "Original", comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
                   embeddings: Mapping[str, Embedding] | EmbeddingLookup | None = None,
                   embedding_key: str | None = None) -> torch.Tensor:
    """Prompts -> cross-attention conditioning [B, 77*k, C] (A1111 `TextConditionalModel.forward`, a1111-semantics §11.4).

    Each prompt is chunked by `tokenize_line` (emphasis, BREAK, comma backtrack); k = the most chunks of any
    prompt, shorter prompts get empty chunks ([BOS, EOS x 76]). Chunk i of every prompt is encoded as one batch
    by `text_encoder(tokens [B, 77], clip_skip)` (pad after EOS per `TextConfig.pad_token`), weighted by
    `apply_emphasis`, and the chunks are concatenated along tokens. Prompt editing and AND are not handled here
    (see `get_multicond_learned_conditioning`); the texts must already be plain prompts.

    text_encoder: a `TextEncoder`; tokenizer: `sdcore.models.text.load_tokenizer()`; clip_skip: 1 = off, N = A1111
    "Clip skip" (SD1); emphasis: one of EMPHASIS_MODES. Output dtype/device = the encoder's.
    embeddings: textual-inversion embeddings by name (`sdcore.embeddings.load_embeddings_dir(...)`, any
    Mapping[str, Embedding], or an EmbeddingLookup); None or empty = none, and the output is then exactly what it is
    without the argument. Where a prompt names one, its vectors (cast to the encoder's dtype) replace the token
    embeddings of its places in the chunk before the positional embedding is added (A1111 `EmbeddingsWithFixes`);
    emphasis weights them like any token. embedding_key: which vectors this encoder takes (`embeddings.
    embedding_keys`: None for SD1/SD2, "clip_l"/"clip_g" for SDXL's encoders).
    Raises TypeError for a bad prompts list or tokenizer, ValueError for a bad emphasis or clip_skip, or for an
    embedding named in a prompt whose kind or width does not fit this encoder (`Embedding.vectors_for`).
    """
    return encode_prompts_with_pooled(text_encoder, tokenizer, prompts, clip_skip, emphasis,
                                      comma_padding_backtrack, embeddings, embedding_key)[0]


# ------------------------------------------------------------------------------- conditioning of a model family

# A1111 options `sdxl_refiner_high_aesthetic_score` / `sdxl_refiner_low_aesthetic_score` (prompt / negative prompt)
# and `sdxl_crop_top` / `sdxl_crop_left`.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
CROP_TOP_LEFT = (0, 0)


def vector_scalars(name: str, width: int, height: int, is_negative_prompt: bool = False) -> tuple[float, ...]:
    """The numbers one sgm vector embedder sees (A1111 `sd_models_xl.get_learned_conditioning`):
    "original_size_as_tuple" and "target_size_as_tuple" -> (height, width) in pixels, "crop_coords_top_left" ->
    (0, 0), "aesthetic_score" -> 6.0 (2.5 for the negative prompt). Raises ValueError for another name."""
    table = {"original_size_as_tuple": (height, width), "crop_coords_top_left": CROP_TOP_LEFT,
             "target_size_as_tuple": (height, width),
             "aesthetic_score": (NEGATIVE_AESTHETIC_SCORE if is_negative_prompt else AESTHETIC_SCORE,)}
    if name not in table:
        raise ValueError(f"vector input {name!r}; allowed: 'pooled', {sorted(table)}")
    return tuple(float(v) for v in table[name])


def vector_conditioning(family: Family, pooled: torch.Tensor, width: int, height: int,
                        is_negative_prompt: bool = False) -> torch.Tensor:
    """SDXL's "vector" conditioning y [N, adm_in_channels] (float32, on pooled's device).

    Concatenates, in `family.vector` order (sgm `GeneralConditioner`, embedders with a 2-D output): "pooled" = the
    bigG pooled text [N, P], then for each scalar input `vector_scalars(...)` embedded by sgm's
    `ConcatTimestepEmbedderND`: every number v -> `timestep_embedding(v, size_embed_dim)` = [cos(v f), sin(v f)],
    f_i = 10000^(-i/128), concatenated (a (h, w) pair -> 512 values). SDXL base: 1280 + 3 x 512 = 2816; refiner:
    1280 + 2 x 512 + 256 = 2560. The same for every row.
    """
    parts = []
    for name in family.vector:
        if name == "pooled":
            parts.append(pooled.float())
            continue
        values = torch.tensor(vector_scalars(name, width, height, is_negative_prompt), device=pooled.device)
        emb = timestep_embedding(values, family.size_embed_dim).reshape(1, -1)  # (1, n * size_embed_dim)
        parts.append(emb.expand(pooled.shape[0], -1))
    return torch.cat(parts, dim=1)


def encode_family_conditioning(family: Family, text_encoders: Sequence[TextEncoder], tokenizer, texts: Sequence[str],
                               clip_skip: int = 1, emphasis: str = "Original", width: int | None = None,
                               height: int | None = None, is_negative_prompt: bool = False,
                               embeddings: Mapping[str, Embedding] | EmbeddingLookup | None = None):
    """Plain texts -> the conditioning `family`'s UNet takes (A1111 `get_learned_conditioning` per model type).

    - No vector conditioning (SD1, SD2, inpainting, instruct-pix2pix): `encode_prompts` with the one encoder,
      [N, 77*k, C]. `clip_skip` applies to encoders whose conditioning is the last layer (SD1); A1111 ignores
      its "Clip skip" setting for SD2's penultimate-layer OpenCLIP (and so does this function).
    - SDXL: each encoder runs `encode_prompts_with_pooled` (its own chunks and emphasis; clip skip ignored, as
      A1111 does without `sdxl_clip_l_skip`); c_crossattn = their outputs concatenated along channels
      ([N, 77*k, 768 + 1280] for the base, [N, 77*k, 1280] for the refiner); y = `vector_conditioning` of the last
      encoder's pooled output at `width` x `height` (pixels; default the family's native size). If
      `is_negative_prompt` and every text is empty, the text parts (c_crossattn and pooled) are zeros, as sgm's
      `force_zero_embeddings=['txt']` in A1111. Returns {"c_crossattn": ..., "y": ...} in the encoders' dtype.
    - `embeddings`: textual inversion, see `encode_prompts`; each encoder takes the vectors of its
      `embeddings.embedding_keys(family)` entry (SDXL embeddings need clip_l and clip_g; the refiner uses clip_g).
    Raises ValueError/TypeError as `encode_prompts` does.
    """
    lookup = as_lookup(embeddings, tokenizer)
    keys = embedding_keys(family)
    if not family.vector:
        encoder = text_encoders[0]
        skip = clip_skip if encoder.config.layer == "last" else 1
        return encode_prompts(encoder, tokenizer, texts, clip_skip=skip, emphasis=emphasis, embeddings=lookup,
                              embedding_key=keys[0])
    zs, pooled = [], None
    for encoder, key in zip(text_encoders, keys):
        z, p = encode_prompts_with_pooled(encoder, tokenizer, texts, clip_skip=1, emphasis=emphasis,
                                          embeddings=lookup, embedding_key=key)
        zs.append(z)
        pooled = p if p is not None else pooled
    if pooled is None:
        raise ValueError(f"family {family.name}: vector conditioning needs a text encoder with a projection")
    crossattn = torch.cat(zs, dim=-1)  # (N, 77k, sum of widths)
    if is_negative_prompt and all(text == "" for text in texts):
        crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
    size = family.native_size
    y = vector_conditioning(family, pooled, width or size, height or size, is_negative_prompt)
    return {"c_crossattn": crossattn, "y": y.to(crossattn.dtype)}


# -------------------------------------------------------------------------- conditioning for the sampler loop


@dataclass(frozen=True)
class ScheduledPromptConditioning:
    """The conditioning [T, C] of one text (or a dict of rows, see `_row`), used for model calls up to `end_at_step`
    (1-based, inclusive)."""

    end_at_step: int
    cond: Cond


@dataclass(frozen=True)
class ComposableScheduledPromptConditioning:
    """One AND part of a prompt: its prompt-editing schedule and its CFG weight."""

    schedules: list[ScheduledPromptConditioning]
    weight: float = 1.0


@dataclass(frozen=True)
class MulticondLearnedConditioning:
    """All prompts of a batch: `batch[i]` = the AND parts of image i (A1111 `MulticondLearnedConditioning`)."""

    batch: list[list[ComposableScheduledPromptConditioning]]


Cond = torch.Tensor | dict[str, torch.Tensor]
Encode = Callable[[list[str]], Cond]
"""texts -> [N, T, C] or {"c_crossattn": [N, T, C], "y": [N, adm]}, e.g.
`lambda texts: encode_prompts(text_encoder, tokenizer, texts, clip_skip, emphasis)`."""


def _row(conds: Cond, i: int) -> Cond:
    """Row i of a conditioning batch: [T, C], or a dict of each entry's row i ({"c_crossattn": [T, C], "y": [adm]})."""
    return {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]


def get_learned_conditioning(encode: Encode, prompts: Sequence[str], steps: int, hires_steps: int | None = None,
                             use_old_scheduling: bool = False) -> list[list[ScheduledPromptConditioning]]:
    """Encode every text of each prompt's schedule (one `encode` call per distinct prompt, so the texts of one
    schedule share T). Use it directly for negative prompts (no AND). A1111 `get_learned_conditioning`."""
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    cache: dict[str, list[ScheduledPromptConditioning]] = {}
    result = []
    for prompt, schedule in zip(prompts, schedules):
        if prompt not in cache:
            conds = encode([text for _, text in schedule])
            cache[prompt] = [ScheduledPromptConditioning(end, _row(conds, i)) for i, (end, _) in enumerate(schedule)]
        result.append(cache[prompt])
    return result


def get_multicond_learned_conditioning(encode: Encode, prompts: Sequence[str], steps: int,
                                       hires_steps: int | None = None, use_old_scheduling: bool = False
                                       ) -> MulticondLearnedConditioning:
    """Split prompts on AND (`get_multicond_prompt_list`), schedule and encode each part once
    (`get_learned_conditioning`). A1111 `get_multicond_learned_conditioning`."""
    indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(encode, flat, steps, hires_steps, use_old_scheduling)
    return MulticondLearnedConditioning(
        [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in parts] for parts in indexes])


def _entry_at(schedules: Sequence[ScheduledPromptConditioning], step: int) -> Cond:
    """The first entry with step <= end_at_step; the first entry if there is none (as A1111 does)."""
    for entry in schedules:
        if step <= entry.end_at_step:
            return entry.cond
    return schedules[0].cond


def _stack_padded(tensors: Sequence[Cond]) -> Cond:
    """Stack [T_i, C] tensors, repeating each one's last vector up to the longest T (A1111 `stack_conds`).
    Dict rows are stacked per key: [T_i, C] entries padded so, vectors ([adm], SDXL's "y") stacked as they are."""
    if isinstance(tensors[0], dict):
        return {k: _stack_padded([t[k] for t in tensors]) if tensors[0][k].ndim == 2
                else torch.stack([t[k] for t in tensors]) for k in tensors[0]}
    length = max(t.shape[0] for t in tensors)
    return torch.stack([torch.cat([t, t[-1:].expand(length - t.shape[0], -1)]) for t in tensors])


def reconstruct_cond_batch(c: Sequence[Sequence[ScheduledPromptConditioning]], step: int) -> Cond:
    """Conditioning [B, T, C] (dict conds: {"c_crossattn": [B, T, C], "y": [B, adm]}) for 0-based model call
    `step`: per prompt the first schedule entry with step <= end_at_step (a1111-semantics §11.3; so with [a|b] calls 0 and 1
    both use a). For the uncond (no AND)."""
    return _stack_padded([_entry_at(schedules, step) for schedules in c])


def reconstruct_multicond_batch(c: MulticondLearnedConditioning, step: int
                                ) -> tuple[list[list[tuple[int, float]]], Cond]:
    """(conds_list, tensor) for 0-based model call `step` (a1111-semantics §7 step 2, A1111 `reconstruct_multicond_batch`).

    tensor: [N, T, C], one row per AND part of every image, in order; parts with fewer tokens are padded by
    repeating their last vector (dict conds: a dict with "c_crossattn" so and "y" [N, adm]).
    conds_list[i] = [(row in tensor, weight), ...] for image i, as used by the CFG sum
    `out_i = uncond_i + sum_k (x_out[row_k] - uncond_i) * weight_k * cond_scale` (a1111-semantics §7 step 8).
    """
    tensors: list[Cond] = []
    conds_list = []
    for parts in c.batch:
        rows = []
        for part in parts:
            rows.append((len(tensors), part.weight))
            tensors.append(_entry_at(part.schedules, step))
        conds_list.append(rows)
    return conds_list, _stack_padded(tensors)
