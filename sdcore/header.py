"""What a checkpoint holds, from its header alone and without importing torch: the fast path of `sdcore info`.

`read_header(path)` gives every tensor's name, shape and dtype:
- `.safetensors`: the JSON header, through `safetensors.safe_open(framework="numpy")` (no tensor is read);
- zip `.ckpt`/`.pt`/`.pth`/`.bin` (torch >= 1.6): only the archive's `data.pkl` is unpickled, by `_HeaderUnpickler`,
  which knows the few globals a state dict's pickle names (torch's tensor rebuild function, the typed storage
  classes, OrderedDict, PyTorch Lightning's checkpoint callback) as inert records and refuses every other one. The
  storages themselves (`data/N` entries) are never opened.
It returns None where only torch can answer (a legacy non-zip pickle, a global outside that list, a header the
safetensors library rejects): the caller then takes the full path, `load_checkpoint(..., device="meta")`, whose
errors name the problem. `describe(path)` is what `sdcore info` prints, read this way.

Memory: the header and the key list, whatever the file's size (torch's import alone is ~800 MB of resident memory
with the CUDA build these machines pin, which is why this path exists).
"""
from __future__ import annotations

import collections
import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from .detection import (UNET, VAE, CheckpointError, _read_config, decide_prediction, detect_family, drop_known_extras,
                        has_vae_parts, read_vae_config, sub_state_dict, vae_file_entries)
from .files import checkpoint_path_problem

# safetensors header dtype -> torch dtype name (safetensors format spec `Dtype`)
SAFETENSORS_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                           "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn",
                           "F8_E5M2": "float8_e5m2"}
# torch's typed storage classes, as a zip pickle names them (`torch.HalfStorage`) -> the tensor dtype name
STORAGE_DTYPE_NAMES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                       "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                       "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
HASH_BLOCK = 1 << 20  # bytes read at a time while hashing


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header describes it: `shape` (a tuple of ints) and `dtype` (torch's name, "float16")."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _NeedsTorch(Exception):
    """This file can only be read by torch's own unpickler."""


class _Inert:
    """Stands in for an allowed non-tensor object of a checkpoint pickle (Lightning callbacks); nothing runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _rebuild_tensor(storage: str, offset, size, stride, *rest) -> TensorInfo:
    """Stand-in for torch's `_utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, ...)`."""
    return TensorInfo(tuple(int(d) for d in size), storage)


def _rebuild_parameter(data, *rest):
    """Stand-in for torch's `_utils._rebuild_parameter(data, requires_grad, hooks)`: the tensor itself."""
    return data


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles a zip checkpoint's `data.pkl` into dicts of TensorInfo; any global outside the list -> _NeedsTorch."""

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPE_NAMES:
            return STORAGE_DTYPE_NAMES[name]
        if module == "pytorch_lightning.callbacks.model_checkpoint" and name == "ModelCheckpoint":
            return _Inert
        raise _NeedsTorch(f"{module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel): the storage's dtype name is all a header needs
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage" and isinstance(pid[1], str):
            return pid[1]
        raise _NeedsTorch(f"persistent id {pid!r}")


def _safetensors_header(path: Path) -> dict[str, TensorInfo]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="numpy") as f:
        for k in f.keys():
            piece = f.get_slice(k)
            dtype = SAFETENSORS_DTYPE_NAMES.get(piece.get_dtype())
            if dtype is None:
                raise _NeedsTorch(f"dtype {piece.get_dtype()}")  # the full path names the dtype and what is allowed
            out[k] = TensorInfo(tuple(piece.get_shape()), dtype)
    return out


def _zip_pickle_header(path: Path) -> dict[str, TensorInfo]:
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(names) != 1:
            raise _NeedsTorch("no single data.pkl")
        with z.open(names[0]) as f:
            obj = _HeaderUnpickler(f).load()
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise _NeedsTorch("not a state dict")
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, TensorInfo)}


def read_header(path: str | Path) -> dict[str, TensorInfo] | None:
    """{name: TensorInfo} of every tensor of a checkpoint file, read without torch and without tensor data; None when
    this file needs torch's reader (see the module docstring). Raises CheckpointError for a path that is not a file."""
    path = Path(path)
    problem = checkpoint_path_problem(path)
    if problem:
        raise CheckpointError(f"--ckpt: {problem}")
    try:
        if path.suffix.lower() == ".safetensors":
            header = _safetensors_header(path)
        elif zipfile.is_zipfile(path):
            header = _zip_pickle_header(path)
        else:
            return None
    except (_NeedsTorch, Exception):  # the full path reports what is wrong, in its own words
        return None
    return header or None


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, streamed in HASH_BLOCK pieces (memory does not grow with the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def dtype_counts(header: dict[str, TensorInfo]) -> dict[str, int]:
    """{dtype name: number of floating-point tensors}, as `checkpoint.dtype_counts` counts a state dict."""
    counts: dict[str, int] = {}
    for v in header.values():
        if v.dtype in FLOAT_DTYPES:
            counts[v.dtype] = counts.get(v.dtype, 0) + 1
    return counts


@dataclass
class Description:
    """What `sdcore info` prints: the family (prediction decided), why, and per component (unet, vae,
    text_encoder.<prefix>) the parameter count and the file dtypes; `file_dtypes` over the whole file."""

    family: object
    reasons: list[str]
    parameter_counts: dict[str, int]
    component_file_dtypes: dict[str, dict[str, int]]
    file_dtypes: dict[str, int]
    sha256: str = field(repr=False, default="")


def describe(path: str | Path, vae: str | Path | None = None, prediction: str | None = None) -> Description | None:
    """`load_checkpoint(path, device="meta")`'s family, reasons, parameter counts and dtypes, read off the header alone.

    Follows the loader's checks that need only names and shapes (`detect_family`, alphas_cumprod's shape, stray keys,
    a separate VAE file's geometry). Returns None (the caller then loads on the meta device, which checks every key
    strictly and words every error) when: a file needs torch's reader; the SD2 eps/v probe must run; the VAE is
    incomplete; or any check fails. Parameter counts are the tensors' element counts per component, which equal the
    modules' once the strict load accepts the keys.
    """
    path = Path(path)
    raw = read_header(path)
    if raw is None:
        return None
    try:
        return _describe(path, raw, vae, prediction)
    except (CheckpointError, KeyError, IndexError, ValueError):
        return None


def _describe(path: Path, raw: dict[str, TensorInfo], vae, prediction) -> Description | None:
    sd, dropped = drop_known_extras(raw)
    detection = detect_family({k: v.shape for k, v in sd.items()})
    fam = detection.family
    reasons = detection.reasons + [f"dropped {n} tensors: {why}" for why, n in dropped.items()]
    alphas = sd.pop("alphas_cumprod", None)
    if alphas is not None and alphas.shape != (1000,):
        return None
    if alphas is None:
        reasons.append("no alphas_cumprod in the file: SD scaled-linear schedule (0.00085..0.012, 1000 steps)")
    known = (UNET, VAE) + fam.text_prefixes
    if any(not k.startswith(known) for k in sd):
        return None
    yaml_path = path.with_suffix(".yaml")
    if detection.probe_prediction and prediction is None and not yaml_path.is_file():
        return None
    fam, why = decide_prediction(detection, prediction, yaml_path)
    reasons += why
    vae_sd = sub_state_dict(sd, VAE)
    if vae is not None:
        vae_sd, vae_config, vae_why = _vae_file(Path(vae), fam.vae)
        if vae_sd is None:
            return None
        fam, reasons = replace(fam, vae=vae_config), reasons + vae_why
    elif not has_vae_parts(vae_sd, prefix=""):
        return None
    parts = {"unet": sub_state_dict(sd, UNET), "vae": vae_sd}
    for prefix in fam.text_prefixes:
        parts["text_encoder." + prefix.rstrip(".")] = sub_state_dict(sd, prefix)
    return Description(
        family=fam, reasons=reasons, file_dtypes=dtype_counts(sd),
        parameter_counts={name: sum(v.numel for v in part.values()) for name, part in parts.items()},
        component_file_dtypes={name: dtype_counts(part) for name, part in parts.items()})


def _vae_file(path: Path, base):
    """A separate VAE file's (bare-key header, config, reasons) as `checkpoint.load_vae_file` reads it, or
    (None, None, None) when the full path must answer."""
    raw = read_header(path)
    if raw is None:
        return None, None, None
    sd, reasons = vae_file_entries(raw, path)
    if not has_vae_parts(sd, prefix=""):
        return None, None, None
    config = _read_config(f"VAE file {path}", read_vae_config, {k: v.shape for k, v in sd.items()}, base, "")
    return sd, config, reasons
