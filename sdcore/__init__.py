"""sdcore: a minimal, readable PyTorch implementation of Stable Diffusion img2img and inpainting."""
