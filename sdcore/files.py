"""What a path given as a checkpoint is, without importing torch (the CLI checks paths before it loads anything)."""
from __future__ import annotations

from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def checkpoint_path_problem(path: Path) -> str | None:
    """None if `path` is an existing file; else why it cannot be loaded as a checkpoint: a folder (a diffusers folder
    is recognised by its model_index.json or unet/ subfolder, a plain folder lists the checkpoint files in it) or
    "no such file". The text follows "<argument>: "."""
    allowed = "sdcore loads single-file checkpoints (.safetensors, .ckpt)"
    if path.is_dir():
        marker = next((m for m, ok in (("model_index.json", (path / "model_index.json").is_file()),
                                       ("unet/ subfolder", (path / "unet").is_dir())) if ok), None)
        if marker:
            return (f"{path} is a folder; {allowed}; this looks like a diffusers folder ({marker}): convert it to a "
                    "single file or pass the original single-file checkpoint")
        try:
            inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
        except OSError:
            inside = []
        return f"{path} is a folder; {allowed}" + (f"; checkpoint files in it: {', '.join(inside[:5])}" if inside
                                                   else "")
    if not path.is_file():
        return f"no such file: {path}"
    return None
