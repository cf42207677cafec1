"""Textual-inversion embeddings: the files, their names, and which ones a prompt uses (a1111-semantics §20).

An embedding is a few learned vectors in a text encoder's input space. Writing its name in a prompt puts those vectors
where the name's tokens stood, in place of the tokens' own embedding rows, before the positional embedding is added
(A1111 `modules/sd_hijack.py` `EmbeddingsWithFixes`). Where the vectors go is decided while the prompt is cut into
75-token chunks (`sdcore.prompts.tokenize_line`, A1111 `modules/sd_hijack_clip.py` `tokenize_line`); this module
holds the files and the name lookup (A1111 `modules/textual_inversion/textual_inversion.py` `Embedding`,
`EmbeddingDatabase.load_from_file`, `load_from_dir`, `register_embedding_by_name`, `find_embedding_at_position`) and
the "TI hashes" infotext (`sd_hijack_clip.TextConditionalModel.forward`, `modules/hashes.py`).

Glossary: n = vectors of an embedding (tokens it takes in a chunk, 1..75), W = text-encoder width (768 CLIP-L,
1024 OpenCLIP-H, 1280 OpenCLIP-bigG). Vectors are float32 on the CPU once loaded; they are cast to the text encoder's
dtype and device where they are spliced in.

File formats (A1111 `load_from_file`, v1.10.1):
- `.pt` / `.bin`, A1111 and the original textual-inversion trainer: a dict with "string_to_param" = {token: [n, W]}
  (exactly one entry; old files pickled it as a `torch.nn.ParameterDict`, read here through an inert stand-in);
- `.pt` / `.bin` / `.safetensors` with a single tensor ("diffusers concept" `{"<cat-toy>": [W]}`, kohya's
  `{"emb_params": [n, W]}`): a 1-D tensor is one vector;
- SDXL: `{"clip_l": [n, 768], "clip_g": [n, 1280]}` (both required, the same n).
Pickles are read by `sdcore.checkpoint.read_pickle_object` (torch's weights-only unpickler: nothing in the file runs).
Embeddings stored inside PNG/WEBP images (A1111's "sd-ti-embedding" chunk) are not read.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdcore.families import Family

SINGLE = "*"  # key of a one-tensor embedding (SD1, SD2); A1111's own files store their tensor under "*"
SDXL_KEYS = ("clip_l", "clip_g")  # A1111 `EmbeddingsWithFixes.textual_inversion_key` of SDXL's CLIP-L and bigG
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")  # what A1111 `load_from_file` reads besides images
IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")  # A1111 reads embeddings hidden in these; sdcore does not
MAX_VECTORS = 75  # = prompts.CHUNK_LENGTH: an embedding is never split between chunks, so it must fit in one
HASH_BLOCK = 1 << 20  # bytes read at a time for the file's sha256 (A1111 `hashes.calculate_sha256` reads 1 MB blocks)


class ParameterDictStandIn:
    """Inert stand-in for `torch.nn.modules.container.ParameterDict`, which the original textual-inversion code
    pickled as "string_to_param" (A1111 `modules/safe.py` allows that global by name; `load_from_file` then reads its
    `_parameters`). Only the pickled state is kept: `_parameters` = {token: tensor}. No torch module is built."""

    def __init__(self, *args, **kwargs):  # whatever the pickle passes is ignored
        self._parameters: dict = {}

    def __setstate__(self, state):
        self._parameters = dict(state.get("_parameters") or {}) if isinstance(state, dict) else {}


PICKLE_STAND_INS = ((ParameterDictStandIn, "torch.nn.modules.container.ParameterDict"),)


@dataclass(frozen=True, eq=False)
class Embedding:
    """One textual-inversion embedding.

    name: what a prompt writes to use it; the file name without its extension (A1111 `os.path.splitext`), e.g.
        "easynegative" for `embeddings/easynegative.safetensors`.
    vectors: {"*": [n, W]} for a one-tensor embedding (SD1, SD2), {"clip_l": [n, 768], "clip_g": [n, 1280]} for SDXL;
        float tensors, n in 1..75, finite.
    path: the file it came from (None when built in memory).
    sha256: hex sha256 of the file's bytes (A1111 `hashes.sha256(filename, "textual_inversion/" + name)`), or None.
    Raises ValueError for keys, shapes or values outside those.
    """

    name: str
    vectors: dict[str, torch.Tensor]
    path: Path | None = None
    sha256: str | None = None

    def __post_init__(self):
        where = f"embedding {self.name!r}" + (f" ({self.path})" if self.path else "")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{where}: name must be a non-empty str")
        keys = set(self.vectors) if isinstance(self.vectors, Mapping) else None
        if keys not in ({SINGLE}, set(SDXL_KEYS)):
            raise ValueError(f"{where}: vectors keys {sorted(keys) if keys else keys}; allowed: [{SINGLE!r}] (one "
                             f"tensor) or {list(SDXL_KEYS)} (SDXL)")
        counts = set()
        for key, vec in self.vectors.items():
            if not isinstance(vec, torch.Tensor) or vec.ndim != 2 or not vec.is_floating_point():
                raise ValueError(f"{where}: vectors[{key!r}] must be a float tensor [n, W], got "
                                 f"{getattr(vec, 'dtype', type(vec).__name__)} {tuple(getattr(vec, 'shape', ()))}")
            if not 1 <= vec.shape[0] <= MAX_VECTORS or vec.shape[1] < 1:
                raise ValueError(f"{where}: vectors[{key!r}] has shape {tuple(vec.shape)}; allowed: 1 to "
                                 f"{MAX_VECTORS} vectors (a prompt chunk holds {MAX_VECTORS} tokens) of width >= 1")
            if not bool(torch.isfinite(vec).all()):
                raise ValueError(f"{where}: vectors[{key!r}] holds NaN or infinite values")
            counts.add(vec.shape[0])
        if len(counts) != 1:
            raise ValueError(f"{where}: clip_l and clip_g have different numbers of vectors "
                             f"({self.vectors['clip_l'].shape[0]} and {self.vectors['clip_g'].shape[0]})")

    @property
    def n_vectors(self) -> int:
        """Tokens the embedding takes in a chunk (A1111 `Embedding.vectors`; clip_g's count for SDXL)."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def is_sdxl(self) -> bool:
        """True for an embedding with clip_l and clip_g vectors."""
        return SINGLE not in self.vectors

    def describe(self) -> str:
        """The shapes, e.g. "1 tensor [2, 768]" or "SDXL clip_l [8, 768], clip_g [8, 1280]"."""
        if self.is_sdxl:
            return "SDXL " + ", ".join(f"{k} {list(self.vectors[k].shape)}" for k in SDXL_KEYS)
        return f"1 tensor {list(self.vectors[SINGLE].shape)}"

    def shorthash(self) -> str | None:
        """The first 12 hex digits of the file's sha256, as A1111 writes in "TI hashes" (`Embedding.set_hash`);
        None without a file."""
        return self.sha256[:12] if self.sha256 else None

    def vectors_for(self, key: str | None, width: int) -> torch.Tensor:
        """The vectors [n, W] one text encoder splices in.

        key: None for the one text encoder of SD1/SD2 (takes one-tensor embeddings), "clip_l" / "clip_g" for SDXL's
            encoders (take the SDXL embedding's entry; `embedding_keys`).
        width: the encoder's W.
        Raises ValueError naming the embedding, its width and the encoder's when they differ, or when the kind does
        not fit (an SDXL embedding on SD1/SD2, a one-tensor embedding on SDXL). A1111 instead leaves such an
        embedding out of its database at load (`expected_shape`), so its name stays plain text in the prompt.
        """
        if key is not None and key not in SDXL_KEYS:
            raise ValueError(f"embedding key {key!r}; allowed: None, {SDXL_KEYS}")
        where = f"embedding {self.name!r}" + (f" ({self.path})" if self.path else "")
        if key is None and self.is_sdxl:
            raise ValueError(f"{where} is an SDXL embedding ({self.describe()}); this model's text encoder (width "
                             f"{width}) takes a one-tensor embedding")
        if key is not None and not self.is_sdxl:
            raise ValueError(f"{where} is a one-tensor embedding ({self.describe()}); an SDXL text encoder ({key}, "
                             f"width {width}) needs an embedding with both clip_l and clip_g vectors")
        vec = self.vectors[SINGLE if key is None else key]
        if vec.shape[1] != width:
            name = "the text encoder" if key is None else f"the {key} text encoder"
            raise ValueError(f"{where}: width {vec.shape[1]} ({self.describe()}) does not match {name}'s width "
                             f"{width}; it was trained for another model family")
        return vec


def embedding_keys(family: Family) -> tuple[str | None, ...]:
    """The embedding key of each of `family`'s text encoders, in order (A1111 `sd_hijack.hijack`): SDXL families
    (vector conditioning) -> "clip_l" for CLIP-L (transformers layout), "clip_g" for bigG (open_clip layout): base
    ("clip_l", "clip_g"), refiner ("clip_g",); other families -> None (SD1, SD2: one-tensor embeddings)."""
    if not family.vector:
        return (None,) * len(family.text)
    return tuple("clip_l" if config.layout == "hf" else "clip_g" for config in family.text)


# ----------------------------------------------------------------------------------------------------- files


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (A1111 `hashes.calculate_sha256`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_matrix(value, where: str, what: str) -> torch.Tensor:
    """A float tensor [W] or [n, W] -> float32 [n, W] on the CPU, a copy (not the file's memory map)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: {what} is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point() or value.ndim not in (1, 2):
        raise ValueError(f"{where}: {what} is a {value.dtype} tensor of shape {tuple(value.shape)}; allowed: a float "
                         "tensor [W] (one vector) or [n, W]")
    matrix = value.detach().reshape(1, -1) if value.ndim == 1 else value.detach()
    return matrix.to(device="cpu", dtype=torch.float32).clone()  # A1111: `.to(devices.device, dtype=torch.float32)`


def embedding_vectors(data, where: str) -> dict[str, torch.Tensor]:
    """The vectors of a loaded file's contents, by A1111 `load_from_file`'s rules in its order: "string_to_param"
    (one entry), then {"clip_l", "clip_g"} (SDXL), then a dict holding one tensor. Raises ValueError otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: holds a {type(data).__name__}; allowed: a dict (see sdcore.embeddings)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # ParameterDict (stand-in) of the original trainer
        if not isinstance(params, dict) or len(params) != 1:
            found = list(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"{where}: string_to_param must hold exactly one tensor, found {found}")
        (token, value), = params.items()
        return {SINGLE: _as_matrix(value, where, f"string_to_param[{token!r}]")}
    if "clip_l" in data and "clip_g" in data:
        extra = sorted(set(data) - set(SDXL_KEYS))
        if extra:
            raise ValueError(f"{where}: an SDXL embedding holds clip_l and clip_g only, also found {extra}")
        return {key: _as_matrix(data[key], where, key) for key in SDXL_KEYS}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(data) == 1 and len(tensors) == 1:
        (key, value), = tensors.items()
        return {SINGLE: _as_matrix(value, where, repr(key))}
    raise ValueError(f"{where}: not a textual-inversion embedding (keys {sorted(map(str, data))[:10]}); allowed: "
                     "'string_to_param' with one tensor, 'clip_l' + 'clip_g' (SDXL), or exactly one tensor "
                     "(e.g. 'emb_params')")


def load_embedding(path: str | Path) -> Embedding:
    """Read one embedding file (A1111 `EmbeddingDatabase.load_from_file`); formats in the module docstring.

    The name is the file name without its extension (`Path("a/easynegative.pt")` -> "easynegative"); vectors become
    float32 on the CPU; `sha256` is the file's. Raises ValueError (a `CheckpointError` for unreadable files) naming
    the file: missing, an extension other than .pt/.bin/.safetensors, an unreadable or refused pickle, a corrupt
    safetensors file, contents that are not an embedding, or vectors `Embedding` rejects.
    """
    from sdcore import checkpoint  # checkpoint imports prompts, which imports this module

    path = Path(path)
    where = f"embedding file {path}"
    if not path.is_file():
        raise ValueError(f"{where}: " + ("is a folder" if path.is_dir() else "does not exist"))
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise ValueError(f"{where}: extension {path.suffix!r}; allowed: {', '.join(EMBEDDING_SUFFIXES)}"
                         + (" (embeddings stored in images are not supported)" if suffix in IMAGE_SUFFIXES else ""))
    if suffix == ".safetensors":
        data = checkpoint.open_state_dict(path, what="embedding")
    else:
        data = checkpoint.read_pickle_object(path, "embedding", stand_ins=PICKLE_STAND_INS)
    vectors = embedding_vectors(data, where)
    return Embedding(os.path.splitext(path.name)[0], vectors, path=path, sha256=file_sha256(path))


@dataclass(frozen=True, eq=False)
class EmbeddingDatabase(Mapping):
    """Embeddings by name (a read-only Mapping[str, Embedding]), in A1111's order (name, case-insensitive), plus the
    files of the folder that were not loaded and why (`ignored`: path -> reason)."""

    embeddings: dict[str, Embedding] = field(default_factory=dict)
    ignored: dict[Path, str] = field(default_factory=dict)

    def __post_init__(self):
        for name, embedding in self.embeddings.items():
            if not isinstance(embedding, Embedding) or embedding.name != name:
                raise ValueError(f"EmbeddingDatabase: entry {name!r} must be an Embedding named {name!r}, got "
                                 f"{getattr(embedding, 'name', type(embedding).__name__)!r}")

    def __getitem__(self, name: str) -> Embedding:
        return self.embeddings[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.embeddings)

    def __len__(self) -> int:
        return len(self.embeddings)

    @classmethod
    def of(cls, embeddings: Iterable[Embedding]) -> EmbeddingDatabase:
        """A database of these embeddings; raises ValueError if two share a name."""
        found: dict[str, Embedding] = {}
        for embedding in embeddings:
            if embedding.name in found:
                raise ValueError(f"two embeddings are named {embedding.name!r}: {found[embedding.name].path} and "
                                 f"{embedding.path}; rename one (a prompt could not tell them apart)")
            found[embedding.name] = embedding
        return cls({name: found[name] for name in sorted(found, key=str.lower)})


def load_embeddings_dir(directory: str | Path) -> EmbeddingDatabase:
    """Every embedding under `directory` (A1111 `--embeddings-dir`, `EmbeddingDatabase.load_from_dir`).

    Walks the folder and its sub-folders (following links, as A1111's `os.walk(..., followlinks=True)`, each folder
    and file once) in sorted order; loads each .pt/.bin/.safetensors file (any case) with `load_embedding`; empty
    files and files with other extensions (images, previews, text) are listed in `ignored` with the reason, as
    A1111 passes them over (A1111 also reads embeddings stored in images: sdcore does not). Returns an
    EmbeddingDatabase, a Mapping name -> Embedding sorted by lower-cased name.

    **sdcore deviates:** A1111 prints an unreadable file's error and goes on, and when two files give the same name
    the one loaded last wins (file-system order). Here both raise ValueError naming the file(s).
    Raises ValueError if `directory` is not a folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"embeddings folder {directory}: " + ("is a file" if directory.exists() else
                                                                "does not exist"))
    loaded, ignored, searched, files_seen = [], {}, set(), {}
    for root, dirs, files in os.walk(directory, followlinks=True):
        searched.add(os.path.realpath(root))
        for name in list(dirs):  # a link back to a folder already searched would make the walk endless
            if os.path.realpath(Path(root) / name) in searched:
                dirs.remove(name)
                ignored[Path(root) / name] = "a link to a folder already searched"
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            suffix = os.path.splitext(name)[1].lower()
            if suffix not in EMBEDDING_SUFFIXES:
                ignored[path] = ("an image (embeddings stored in images are not read)" if suffix in IMAGE_SUFFIXES
                                 else "not an embedding file (.pt, .bin, .safetensors)")
            elif path.stat().st_size == 0:
                ignored[path] = "empty file"
            elif os.path.realpath(path) in files_seen:
                ignored[path] = f"the same file as {files_seen[os.path.realpath(path)]}"
            else:
                files_seen[os.path.realpath(path)] = path
                loaded.append(load_embedding(path))
    database = EmbeddingDatabase.of(loaded)
    return EmbeddingDatabase(database.embeddings, ignored)


# ------------------------------------------------------------------------------------------- names in prompts


@dataclass(frozen=True)
class EmbeddingLookup:
    """Embeddings by the token ids of their names (A1111 `EmbeddingDatabase.ids_lookup`): first id -> ((ids,
    embedding), ...), longest ids first, so "cat-toy-2" wins over "cat-toy" where both match."""

    by_first_id: dict[int, tuple[tuple[tuple[int, ...], Embedding], ...]]

    @classmethod
    def build(cls, embeddings: Mapping[str, Embedding], tokenizer) -> EmbeddingLookup:
        """Tokenise every name with the prompt tokenizer (A1111 `register_embedding_by_name`: `tokenize([name])`).
        Raises ValueError for a name that gives no tokens, or two names that give the same tokens (CLIP lower-cases:
        "Style" and "style" are one word to it)."""
        by_ids: dict[tuple[int, ...], Embedding] = {}
        for name, embedding in embeddings.items():
            if not isinstance(embedding, Embedding):
                raise TypeError(f"embeddings[{name!r}] must be an Embedding, got {type(embedding).__name__}")
            ids = tuple(tokenizer.encode(embedding.name))
            if not ids:
                raise ValueError(f"embedding {embedding.name!r} ({embedding.path}): its name has no tokens, so no "
                                 "prompt can use it; rename the file")
            if ids in by_ids:
                raise ValueError(f"embeddings {by_ids[ids].name!r} ({by_ids[ids].path}) and {embedding.name!r} "
                                 f"({embedding.path}) have the same tokens {list(ids)}; a prompt cannot tell them "
                                 "apart, rename one")
            by_ids[ids] = embedding
        table: dict[int, list] = {}
        for ids, embedding in by_ids.items():
            table.setdefault(ids[0], []).append((ids, embedding))
        return cls({first: tuple(sorted(entries, key=lambda e: len(e[0]), reverse=True))
                    for first, entries in table.items()})

    def find(self, tokens: Sequence[int], offset: int) -> tuple[Embedding | None, int]:
        """(embedding, number of name tokens) whose name's ids start at tokens[offset], or (None, 0)
        (A1111 `find_embedding_at_position`)."""
        for ids, embedding in self.by_first_id.get(tokens[offset], ()):
            if tuple(tokens[offset:offset + len(ids)]) == ids:
                return embedding, len(ids)
        return None, 0


def as_lookup(embeddings: Mapping[str, Embedding] | EmbeddingLookup | None, tokenizer) -> EmbeddingLookup | None:
    """`embeddings` as an EmbeddingLookup (built with `tokenizer`); None for None or an empty mapping."""
    if embeddings is None or isinstance(embeddings, EmbeddingLookup):
        return embeddings
    if not isinstance(embeddings, Mapping):
        raise TypeError(f"embeddings must be a Mapping[str, Embedding] (e.g. load_embeddings_dir(...)), an "
                        f"EmbeddingLookup or None, got {type(embeddings).__name__}")
    return EmbeddingLookup.build(embeddings, tokenizer) if embeddings else None


def embeddings_used(texts: Sequence[str], tokenizer, embeddings, emphasis: str = "Original",
                    comma_padding_backtrack: int | None = None) -> list[Embedding]:
    """The embeddings plain `texts` (no AND, no prompt editing) use, each once, in A1111's order of discovery
    (`TextConditionalModel.forward`: chunk by chunk, within a chunk text by text, then left to right)."""
    from sdcore import prompts  # prompts imports this module

    lookup = as_lookup(embeddings, tokenizer)
    if lookup is None:
        return []
    backtrack = prompts.COMMA_PADDING_BACKTRACK if comma_padding_backtrack is None else comma_padding_backtrack
    batch = [prompts.tokenize_line(text, tokenizer, emphasis, backtrack, embeddings=lookup)[0] for text in texts]
    used: dict[str, Embedding] = {}
    for index in range(max((len(chunks) for chunks in batch), default=0)):
        for chunks in batch:
            for fix in chunks[index].fixes if index < len(chunks) else ():
                used.setdefault(fix.embedding.name, fix.embedding)
    return list(used.values())


def embeddings_used_by_prompts(prompts: Sequence[str], negative_prompts: Sequence[str], tokenizer, embeddings,
                               steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False,
                               emphasis: str = "Original", comma_padding_backtrack: int | None = None
                               ) -> list[Embedding]:
    """The embeddings a batch's conditioning uses, each once: those of the prompts (split on AND, every text of
    their prompt-editing schedules over `steps`), then those only the negative prompts use (schedules, no AND), as
    `pipeline.encode_conds` encodes them. This is the list behind the infotext's "TI hashes" (`ti_hashes`)."""
    from sdcore import prompts as p  # prompts imports this module

    lookup = as_lookup(embeddings, tokenizer)
    _, parts, _ = p.get_multicond_prompt_list(prompts)
    seen: dict[str, Embedding] = {}
    for group in (parts, list(negative_prompts)):
        schedules = p.get_learned_conditioning_prompt_schedules(group, steps, hires_steps, use_old_scheduling)
        texts = [text for schedule in schedules for _, text in schedule]
        for embedding in embeddings_used(texts, tokenizer, lookup, emphasis, comma_padding_backtrack):
            seen.setdefault(embedding.name, embedding)
    return list(seen.values())


def ti_hashes(used: Iterable[Embedding]) -> str | None:
    """The infotext value of "TI hashes" (A1111 `TextConditionalModel.forward` with the default option
    `textual_inversion_add_hashes_to_infotext`): "name: shorthash" per embedding, ":" and "," removed from the
    name, joined by ", "; embeddings without a file hash are left out, as A1111 does; None when none is left.
    Example: [easynegative (sha256 c74b4e81...)] -> "easynegative: c74b4e810b03".

    A1111 builds the value once per text-encoder call, putting the newest call's names first, so its string can
    repeat a name (negative and positive prompt, or SDXL's two encoders); sdcore lists each embedding once, in the
    order given (`embeddings_used_by_prompts`: the prompts' first), which is A1111's order without the repeats.
    """
    entries = {}
    for embedding in used:
        if embedding.shorthash():
            entries.setdefault(embedding.name, f"{embedding.name.replace(':', '').replace(',', '')}: "
                                               f"{embedding.shorthash()}")
    return ", ".join(entries.values()) or None
