"""Extra-network tags in prompts, `<lora:name:te:unet:dyn>`, parsed as A1111 parses them (a1111-semantics §21).

Reference: A1111 `modules/extra_networks.py` (`re_extra_net`, `ExtraNetworkParams`, `parse_prompt`,
`parse_prompts`) and `extensions-builtin/Lora/extra_networks_lora.py` (`ExtraNetworkLora.activate`: the
multipliers, the "Lora hashes" infotext value). No torch here: the CLI checks tags and files before a model loads.

Rules, with examples:
- A tag is `<` + a word (letters, digits, `_`) + `:` + anything but `>` + `>`; it is cut out of the prompt (nothing
  takes its place: "a cat <lora:x:0.5>, red" -> "a cat , red"). Its text is split on `:`; an item with exactly one
  `=` is named (`te=0.5`), the others are positional.
- A batch uses the tags of its first prompt only (A1111 `parse_prompts`); every prompt of the batch loses its own.
  The negative prompt is not parsed (A1111 leaves its text as it is).
- LoRA: name = first positional; te = positional 2 (default 1.0), then `te=`; unet = positional 3 (default te), then
  `unet=`; dyn = positional 4 (default None), then `dyn=`. `<lora:x>` -> (1, 1); `<lora:x:0.5>` -> (0.5, 0.5);
  `<lora:x:0.5:0.8>` -> (0.5, 0.8); `<lora:x:unet=0.2>` -> (1, 0.2).
- Tags of other types (`<hypernet:...>`, `<lyco:...>` in old A1111) are cut out too and reported as unsupported.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111 `re_extra_net`
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # A1111 `networks.list_available_networks`
SUPPORTED_TYPES = ("lora",)


@dataclass(frozen=True)
class ExtraNetworkParams:
    """One tag's items (its text split on ":"), as positional items and named (`key=value`) items."""

    items: tuple[str, ...]
    positional: tuple[str, ...] = field(init=False)
    named: dict[str, str] = field(init=False, compare=False)

    def __post_init__(self):
        positional, named = [], {}
        for item in self.items:
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        object.__setattr__(self, "positional", tuple(positional))
        object.__setattr__(self, "named", named)


def parse_prompt(prompt: str) -> tuple[str, dict[str, list[ExtraNetworkParams]]]:
    """(the prompt without its tags, {tag type: [params of each tag, in order]}) (A1111 `parse_prompt`)."""
    found: dict[str, list[ExtraNetworkParams]] = {}

    def cut(m: re.Match) -> str:
        found.setdefault(m.group(1), []).append(ExtraNetworkParams(tuple(m.group(2).split(":"))))
        return ""

    return EXTRA_NETWORK_TAG.sub(cut, prompt), found


def parse_prompts(prompts: list[str]) -> tuple[list[str], dict[str, list[ExtraNetworkParams]]]:
    """Every prompt without its tags, and the first prompt's tags: what one batch activates (A1111 `parse_prompts`)."""
    stripped, data = [], None
    for prompt in prompts:
        text, found = parse_prompt(prompt)
        stripped.append(text)
        if data is None:
            data = found
    return stripped, data or {}


@dataclass(frozen=True)
class LoraRequest:
    """One `<lora:...>` tag: the network's name (a file stem in the LoRA folder) and its multipliers."""

    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    dyn_dim: int | None = None


def _number(text: str, what: str, tag: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"prompt: {tag}: {what}={text!r} is not a {'number' if kind is float else 'whole number'}"
                         ) from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"prompt: {tag}: {what}={text!r}; allowed: a finite number")
    return value


def lora_request(params: ExtraNetworkParams) -> LoraRequest:
    """A `<lora:...>` tag's name and multipliers (A1111 `ExtraNetworkLora.activate`). Raises ValueError naming the
    tag for a missing name, a multiplier that is not a finite number, or a dyn that is not a whole number."""
    tag = "<lora:" + ":".join(params.items) + ">"
    if not params.positional or not params.positional[0]:
        raise ValueError(f"prompt: {tag}: no network name; allowed: <lora:name[:te[:unet[:dyn]]]>")
    pos = params.positional
    te = _number(pos[1], "te", tag) if len(pos) > 1 else 1.0
    te = _number(params.named["te"], "te", tag) if "te" in params.named else te
    unet = _number(pos[2], "unet", tag) if len(pos) > 2 else te
    unet = _number(params.named["unet"], "unet", tag) if "unet" in params.named else unet
    dyn = _number(pos[3], "dyn", tag, int) if len(pos) > 3 else None
    dyn = _number(params.named["dyn"], "dyn", tag, int) if "dyn" in params.named else dyn
    return LoraRequest(pos[0], te, unet, dyn)


def batch_networks(prompts: list[str]) -> tuple[list[str], list[LoraRequest]]:
    """A batch's prompts without tags and the LoRAs its first prompt asks for. Raises ValueError for a tag type
    sdcore does not run (named, with the supported ones) or a malformed `<lora:...>` tag."""
    stripped, data = parse_prompts(prompts)
    unknown = sorted(set(data) - set(SUPPORTED_TYPES))
    if unknown:
        raise ValueError(f"prompt: extra network type(s) {unknown} not supported; allowed: "
                         + ", ".join(f"<{t}:...>" for t in SUPPORTED_TYPES))
    return stripped, [lora_request(p) for p in data.get("lora", [])]


def all_lora_requests(prompts: list[str]) -> list[LoraRequest]:
    """Every `<lora:...>` tag of all prompts (for checking names before a model loads)."""
    out = []
    for prompt in prompts:
        out += batch_networks([prompt])[1]
    return out


def available_loras(lora_dir: str | Path | None) -> dict[str, Path]:
    """{name (file stem): path} of the LoRA files in `lora_dir` and its subfolders (A1111 lists them recursively;
    the first file found wins a repeated stem, in sorted path order)."""
    if lora_dir is None:
        return {}
    out: dict[str, Path] = {}
    for path in sorted(Path(lora_dir).rglob("*")):
        if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
            out.setdefault(path.stem, path)
    return out


def find_lora(name: str, lora_dir: str | Path | None, what: str = "--lora-dir") -> Path:
    """The file of LoRA `name`. Raises ValueError naming the name, the folder and the names available there."""
    if lora_dir is None:
        raise ValueError(f"prompt: <lora:{name}>: no LoRA folder given; set {what}")
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        raise ValueError(f"{what}: {lora_dir} is not a folder")
    found = available_loras(lora_dir)
    if name not in found:
        shown = ", ".join(sorted(found)[:20]) or "none"
        raise ValueError(f"prompt: <lora:{name}>: no LoRA named {name!r} in {what} {lora_dir}; available: {shown}")
    return found[name]


def lora_hashes_value(names_and_hashes: list[tuple[str, str]]) -> str | None:
    """A1111's "Lora hashes" infotext value: "name: hash, name: hash", ":" and "," removed from each name; None
    when empty (the key is then left out)."""
    parts = [f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in names_and_hashes if h and name]
    return ", ".join(parts) or None
