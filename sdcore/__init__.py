"""sdcore: a minimal, readable PyTorch implementation of Stable Diffusion img2img and inpainting.

Public API (DESIGN.md): `load_checkpoint`, `StableDiffusionProcessingImg2Img`, `process_images`, `Processed`,
`Options`.
"""
from .checkpoint import CheckpointError, StableDiffusionModel, load_checkpoint
from .processing import Options, Processed, StableDiffusionProcessingImg2Img, process_images

__all__ = ["CheckpointError", "Options", "Processed", "StableDiffusionModel", "StableDiffusionProcessingImg2Img",
           "load_checkpoint", "process_images"]
