"""sdcore: a minimal, readable PyTorch implementation of Stable Diffusion img2img and inpainting.

Public API (DESIGN.md): `load_checkpoint`, `StableDiffusionProcessingImg2Img`, `process_images`, `Processed`,
`Options`, `StableDiffusionProcessingTxt2Img`. They are imported on first use, so `import sdcore.families` stays light.
"""
import importlib

_API = {
    "CheckpointError": "checkpoint", "StableDiffusionModel": "checkpoint", "load_checkpoint": "checkpoint",
    "Options": "processing", "Processed": "processing", "StableDiffusionProcessingImg2Img": "processing",
    "process_images": "processing", "StableDiffusionProcessingTxt2Img": "processing",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'sdcore' has no attribute {name!r}")
