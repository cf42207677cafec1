"""sdcore: a minimal, readable PyTorch implementation of Stable Diffusion img2img and inpainting.

Public API (DESIGN.md): `load_checkpoint`, `StableDiffusionProcessingImg2Img`, `process_images`, `Processed`,
`Options`, `StableDiffusionProcessingTxt2Img`. They are imported on first use, so `import sdcore.families` stays light.
"""
__all__ = sorted(["CheckpointError", "StableDiffusionModel", "load_checkpoint", "Options", "Processed",
                  "StableDiffusionProcessingImg2Img", "process_images", "StableDiffusionProcessingTxt2Img"])


def __getattr__(name: str):
    """The public API, imported on first use."""
    # lazy: `import sdcore` must not import torch (so `import sdcore.families` stays light)
    if name == "CheckpointError":
        from .checkpoint import CheckpointError
        return CheckpointError
    if name == "StableDiffusionModel":
        from .checkpoint import StableDiffusionModel
        return StableDiffusionModel
    if name == "load_checkpoint":
        from .checkpoint import load_checkpoint
        return load_checkpoint
    if name == "Options":
        from .processing import Options
        return Options
    if name == "Processed":
        from .processing import Processed
        return Processed
    if name == "StableDiffusionProcessingImg2Img":
        from .processing import StableDiffusionProcessingImg2Img
        return StableDiffusionProcessingImg2Img
    if name == "process_images":
        from .processing import process_images
        return process_images
    if name == "StableDiffusionProcessingTxt2Img":
        from .processing import StableDiffusionProcessingTxt2Img
        return StableDiffusionProcessingTxt2Img
    raise AttributeError(f"module 'sdcore' has no attribute {name!r}")
