"""The record of what a pipeline run did: `Plan` (and one `SamplingPass` per sampler run).

`pipeline.img2img` / `txt2img` / `hires_fix` fill it while they run and return it with the images, so the numbers a
reader wants to audit (the start step t_enc, the sigma slice, every model call's noise level, the crop box, the
mask coverage, the seeds) are the ones the run used, not a recomputation. `--explain` (`explain`) prints the plan of
a dry run through the same pipeline with stand-in UNet and VAE.

Glossary: sigma = noise standard deviation in latent units (k-diffusion); t = DDPM timestep in [0, 999] (timestep
samplers DDIM/PLMS/UniPC report t instead of sigma); latent cells = pixels / 8.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingPass:
    """One sampler run (a1111-semantics §6).

    - `sampler`: A1111 name ("DPM++ 2M"); `scheduler`: the schedule's label ("Karras"), None for timestep samplers.
    - `steps`: the length of the schedule that was built; `t_enc`: img2img start index (a1111-semantics §6.2,
      `setup_img2img_steps`), None for txt2img's first pass.
    - `sigmas`: the whole schedule [steps + 1] (k-diffusion samplers); `sigma_sched`: the part that ran (img2img:
      `sigmas[steps - t_enc - 1:]`, t_enc + 2 values, a1111-semantics §6.3); `timesteps`: the DDPM grid that ran
      (timestep samplers, ascending). float32 / int64 tensors on the CPU.
    - `model_calls`: sigma (or timestep) of image 0 at each guided-model call, in call order; second-order sub-steps
      included (one entry per CFG call, each call evaluating cond and uncond rows).
    - `refiner_switch_call`: index of the first call made by the refiner, None when none switched in.
    - `width`, `height`: pixels of this pass.
    """

    sampler: str
    scheduler: str | None
    steps: int
    t_enc: int | None
    sigmas: torch.Tensor | None
    sigma_sched: torch.Tensor | None
    timesteps: torch.Tensor | None
    width: int
    height: int
    model_calls: list[float] = field(default_factory=list)
    refiner_switch_call: int | None = None


@dataclass
class Plan:
    """What one pipeline call (one batch) did.

    - `passes`: the sampler runs (txt2img with the hires fix: the first pass, then the hires pass).
    - `seeds`, `subseeds`: per image of the batch (a1111-semantics §8.1).
    - `crop_region` (x1, y1, x2, y2) and `paste_to` (x, y, w, h) in pixels for "Only masked", else None;
      `blank_mask`: "Only masked" fell back to whole-picture img2img because the mask was blank.
    - `mask_cells`, `latent_cells`: latent cells with a regenerate weight > 0, and all cells (mask coverage =
      their ratio); `mask_mean`: the mean regenerate weight. None without a mask.
    - `blend`: name of the mask blend strategy that ran (`sampling/blends.py`).
    """

    passes: list[SamplingPass]
    seeds: list[int]
    subseeds: list[int]
    crop_region: tuple[int, int, int, int] | None = None
    paste_to: tuple[int, int, int, int] | None = None
    blank_mask: bool = False
    mask_cells: int | None = None
    latent_cells: int | None = None
    mask_mean: float | None = None
    blend: str | None = None

    @property
    def model_calls(self) -> int:
        """Guided-model calls over all passes."""
        return sum(len(p.model_calls) for p in self.passes)

    @property
    def refiner_switched(self) -> bool:
        """True when a refiner took over in any pass (its VAE then decodes)."""
        return any(p.refiner_switch_call is not None for p in self.passes)
