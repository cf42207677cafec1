"""The record of what a pipeline run did: `Plan` (and one `SamplingPass` per sampler run).

`pipeline.img2img` / `txt2img` / `hires_fix` fill it while they run and return it with the images, so the numbers a
reader wants to audit (the start step t_enc, the sigma slice, every model call's noise level, the crop box, the
mask coverage, the seeds) are the ones the run used, not a recomputation. `--explain` (`explain`) prints the plan of
a dry run through the same pipeline with stand-in UNet and VAE.

Glossary: sigma = noise standard deviation in latent units (k-diffusion); t = DDPM timestep in [0, 999] (timestep
samplers DDIM/PLMS/UniPC report t instead of sigma); latent cells = pixels / 8.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import StableDiffusionModel
from .models.vae import DiagonalGaussianDistribution
from .sampling.samplers import SAMPLERS

SECOND_ORDER = {s.name for s in SAMPLERS if s.second_order}


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
    - `start_timestep`: timestep samplers' img2img start, the DDPM timestep whose noise level the init latent gets
      (`grid[t_enc]`, a1111-semantics §6.4); None otherwise.
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
    start_timestep: int | None = None


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
    - `vae_tiling`: the VAE ran in tiles (`models/vae_tiling.py`); `vae_tiling_reason`: why, or why not
      (`resources.vae_tiling_choice`: asked for, turned off, or the automatic estimate against the memory available).
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
    vae_tiling: bool = False
    vae_tiling_reason: str | None = None

    @property
    def model_calls(self) -> int:
        """Guided-model calls over all passes."""
        return sum(len(p.model_calls) for p in self.passes)

    @property
    def refiner_switched(self) -> bool:
        """True when a refiner took over in any pass (its VAE then decodes)."""
        return any(p.refiner_switch_call is not None for p in self.passes)


# -- dry runs: the pipeline with stand-ins for the UNet and the VAE
# -----------------------------------------------------

def stand_in_model(model: StableDiffusionModel) -> tuple[StableDiffusionModel, list[int]]:
    """A copy of `model` for dry runs, and the list its UNet appends to.

    The UNet is replaced by one that returns zeros (eps = 0, so denoised = x) and appends the number of rows of each
    call to the list; the VAE by one that returns zero latents and zero pixels of the right shapes. The text
    encoders stay (prompt schedules and token counts are real); `path` is dropped so no file is hashed. Nothing of
    the size of the model's activations is allocated: latents and images only.
    """
    rows: list[int] = []
    out_channels = model.family.unet.out_channels
    factor = 2 ** (len(model.family.vae.ch_mult) - 1)
    vae_config = model.family.vae

    class RecordingUNet(torch.nn.Module):
        def forward(self, x, timesteps, context=None, y=None):
            rows.append(x.shape[0])
            return x.new_zeros(x.shape[0], out_channels, *x.shape[2:])

    class ZeroVAE(torch.nn.Module):
        def encode(self, x):
            b, _, h, w = x.shape
            return DiagonalGaussianDistribution(x.new_zeros(b, 2 * vae_config.embed_dim, h // factor, w // factor))

        def decode(self, z):
            b, _, h, w = z.shape
            return z.new_zeros(b, vae_config.out_ch, h * factor, w * factor)

    return dataclasses.replace(model, unet=RecordingUNet(), vae=ZeroVAE(), path=None), rows


@dataclass
class DryRun:
    """A job run with `stand_in_model` (`processing.dry_run`): the job `p` (holding the stand-in), its
    `processed` result (`processed.plans`: one Plan per batch) and `unet_rows`, the rows of every UNet call in order.
    The properties read the first batch's plan."""

    p: Any
    processed: Any
    unet_rows: list[int]

    @property
    def plan(self) -> Plan:
        return self.processed.plans[0]

    @property
    def steps(self) -> int:
        return self.plan.passes[0].steps

    @property
    def t_enc(self) -> int | None:
        return self.plan.passes[0].t_enc

    @property
    def sigma_sched(self) -> torch.Tensor | None:
        return self.plan.passes[0].sigma_sched

    @property
    def passes(self) -> list[list[tuple[int, float]]]:
        """(UNet rows, sigma or timestep) of each model call, one list per pass of the first batch."""
        rows, out = iter(self.rows_per_call()), []
        for record in self.plan.passes:
            out.append([(next(rows), s) for s in record.model_calls])
        return out

    @property
    def unet_calls(self) -> list[tuple[int, float]]:
        return [c for calls in self.passes for c in calls]

    @property
    def hr_steps(self) -> int | None:
        return self.plan.passes[1].steps if len(self.plan.passes) > 1 else None

    @property
    def hr_t_enc(self) -> int | None:
        return self.plan.passes[1].t_enc if len(self.plan.passes) > 1 else None

    def rows_per_call(self) -> list[int]:
        """UNet rows of each guided-model call (two UNet calls when cond and uncond token lengths differ)."""
        calls = [len(r.model_calls) for plan in self.processed.plans for r in plan.passes]
        if len(self.unet_rows) == sum(calls):
            return list(self.unet_rows)
        return [sum(self.unet_rows) // max(sum(calls), 1)] * sum(calls)


def _numbers(values, fmt: str = "{:.4f}") -> str:
    return ", ".join(fmt.format(float(v)) for v in values)


def _calls_lines(dry: DryRun, name: str, record: SamplingPass, calls: list[tuple[int, float]]) -> list[str]:
    n_batches = len(dry.processed.plans)
    rows = sum(r for r, _ in calls)
    note = " (DPM adaptive: the count depends on the model's outputs)" if record.sampler == "DPM adaptive" else ""
    lines = [f"{name}model calls: {len(calls)} per batch x {n_batches} batch(es); UNet rows per batch: {rows} "
             f"(batch {len(dry.plan.seeds)} x 2 for cond + uncond in each call){note}"]
    if record.timesteps is not None:
        lines.append(f"{name}model call timesteps: {_numbers([t for _, t in calls], '{:.0f}')}")
    elif calls:
        lines.append(f"{name}model call sigmas: {_numbers([s for _, s in calls])}")
    return lines


def explain(dry: DryRun, header: list[str] | None = None) -> str:
    """The plan of a dry run as text (`sdcore ... --explain`): steps and t_enc, the sigma slice (or timestep grid),
    the model calls, mask coverage, crop region, seeds. Every number is read from the Plan the pipeline returned."""
    p, processed, plan = dry.p, dry.processed, dry.plan
    first = plan.passes[0]
    h, w = p.height // 8, p.width // 8
    lines = list(header or []) + [f"model: {p.sd_model.family.name}; size {p.width}x{p.height} px = latent "
                                  f"{w}x{h} cells"]
    timestep = first.timesteps is not None
    scheduler = "" if timestep else f"; scheduler: {first.scheduler or 'Uniform'}"
    order = " (second order: two model calls per step)" if first.sampler in SECOND_ORDER else ""
    lines.append(f"sampler: {first.sampler}{scheduler}{order}")
    if first.t_enc is None:
        lines.append(f"steps: {first.steps} from pure noise")
        if first.sigma_sched is not None:
            lines.append(f"sigmas ({len(first.sigma_sched)} values): {_numbers(first.sigma_sched)}")
    else:
        fix = " (img2img-fix-steps)" if p.opts.img2img_fix_steps else ""
        lines.append(f"steps: {p.steps}, denoising strength {p.denoising_strength} -> a schedule of {first.steps} "
                     f"steps{fix}, t_enc = {first.t_enc}")
        if timestep:
            lines.append(f"timesteps: noise level of t = {first.start_timestep}, then the sampler walks "
                         f"{_numbers(reversed(first.timesteps), '{:.0f}')}")
        else:
            lines.append(f"sigma slice: the last {first.t_enc + 1} steps, {len(first.sigma_sched)} values (noise "
                         f"added at the first): {_numbers(first.sigma_sched)}")
    passes = dry.passes
    lines += _calls_lines(dry, "first pass " if len(passes) == 2 else "", first, passes[0])
    if len(passes) == 2:
        hr = plan.passes[1]
        lines.append(f"hires pass: {p.hr_upscaler or 'Latent'} to {hr.width}x{hr.height} px, "
                     f"{p.hr_second_pass_steps or p.steps} steps at denoising strength {p.denoising_strength} -> a "
                     f"schedule of {hr.steps} steps, t_enc = {hr.t_enc}")
        lines += _calls_lines(dry, "hires pass ", hr, passes[1])
    if plan.mask_cells is not None:
        lines.append(f"mask coverage: {plan.mask_cells} of {plan.latent_cells} latent cells regenerated "
                     f"({plan.mask_cells / plan.latent_cells:.4f}); mean regenerate weight {plan.mask_mean:.4f}")
        lines.append(f"masked content: {['fill', 'original', 'latent noise', 'latent nothing'][p.inpainting_fill]}; "
                     f"mask blend: {plan.blend}")
    elif first.t_enc is not None and len(passes) == 1:
        lines.append("mask: none (every latent cell regenerated)")
    if plan.paste_to is not None:
        x, y, pw, ph = plan.paste_to
        x1, y1, x2, y2 = plan.crop_region
        lines.append(f"inpaint area: only masked; crop region (x1, y1, x2, y2) = ({x1}, {y1}, {x2}, {y2}), "
                     f"processed at {p.width}x{p.height}, pasted back at {pw}x{ph}")
    elif plan.mask_cells is not None:
        lines.append("inpaint area: whole picture")
    if plan.vae_tiling_reason is not None:
        lines.append(f"VAE: {'tiled' if plan.vae_tiling else 'untiled'} ({plan.vae_tiling_reason})")
    for comment in processed.comments.values():
        lines.append(f"note: {comment}")
    seeds = ", ".join(f"{s}" + (f" (variation {v} at {p.subseed_strength})" if p.subseed_strength else "")
                      for s, v in zip(processed.seeds, processed.subseeds))
    lines.append(f"seeds ({len(processed.seeds)} images): {seeds}")
    return "\n".join(lines)
