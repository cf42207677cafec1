"""The README's main job: img2img and inpainting on a real photo with the bundled default checkpoint.

Photo: scikit-image's `astronaut` (public domain, NASA), shipped inside the scikit-image package. Writes, into a new
numbered folder under --outdir (nothing existing is overwritten): the input, the mask, the img2img result, the
inpainting result, an X/Y/Z grid of samplers x steps (with its .json sidecar), and the same seed's txt2img "a red
star" without and with the bundled star LoRA (`<lora:sdcore-tiny-star-lora:1>`), and prints their paths.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sdcore  # noqa: E402
from sdcore import xyz  # noqa: E402
from sdcore.cli import DEFAULT_CKPT  # noqa: E402

XYZ_SAMPLERS = "Euler a,Euler,DPM++ 2M,Heun,DPM++ SDE,DDIM"  # the README's X/Y/Z grid
XYZ_STEPS = "4,8,16,32"
STAR_LORA = Path(sdcore.__file__).parent / "weights" / "sdcore-tiny-star-lora.safetensors"  # weights/README.md


def next_free_dir(root: Path) -> Path:
    """root/NNNNN, one past the highest existing number (created exclusively)."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        d = root / f"{n:05d}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            n += 1


def run_and_save(p, path: Path) -> None:
    """Run job `p`, save its first image at `path` with the infotext as PNG "parameters", print both."""
    processed = sdcore.process_images(p, disable_progress=True)
    info = PngInfo()
    info.add_text("parameters", processed.info)
    processed.images[0].save(path, pnginfo=info)
    print(f"{path.stem}: {path}\n  {processed.info}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--outdir", type=Path, default=Path("outputs/demo"))
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    if not args.ckpt.is_file():
        ap.error(f"--ckpt: {args.ckpt} does not exist (the bundled model is sdcore/weights/sdcore-tiny.safetensors)")
    sd = sdcore.load_checkpoint(args.ckpt)
    size = sd.family.native_size
    photo = Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS)
    mask = np.zeros((size, size), np.uint8)
    a, b = size // 4, size // 2
    mask[a:a + b, a:a + b] = 255  # a centred square: regenerate here
    mask_img = Image.fromarray(mask, "L")
    out = next_free_dir(args.outdir)
    photo.save(out / "input.png")
    mask_img.save(out / "mask.png")

    # img2img at rising denoising strength: the photo gives way to what the prompt asks for. DPM++ 2M uses the
    # karras schedule, which starts low strengths at a lower sigma than the uniform one (20 steps at 0.2: t_enc 4,
    # sigma_sched[0] = sigmas[15] = 0.184 karras vs 0.596 uniform, a1111-semantics §13), so the photo stays visible
    # there.
    jobs = {f"img2img-{d:.2f}": dict(prompt="a yellow circle", sampler_name="DPM++ 2M", denoising_strength=d)
            for d in (0.2, 0.35, 0.5)}
    jobs["inpaint"] = dict(prompt="a red circle", sampler_name="Euler a", mask=mask_img, denoising_strength=0.9,
                           inpainting_fill=1, mask_blur=1, inpaint_full_res=False)
    for name, kw in jobs.items():
        p = sdcore.StableDiffusionProcessingImg2Img(sd_model=sd, init_images=[photo],
                                                    steps=args.steps, cfg_scale=7.0, seed=args.seed, width=size,
                                                    height=size, **kw)
        run_and_save(p, out / f"{name}.png")
    # A1111's X/Y/Z plot (`sdcore xyz`): samplers x steps of img2img at strength 0.5, the same seed in every cell
    # (the README's grid; its sidecar .json holds every cell's infotext).
    p = sdcore.StableDiffusionProcessingImg2Img(sd_model=sd, init_images=[photo], prompt="a yellow circle",
                                                denoising_strength=0.5, cfg_scale=7.0, seed=args.seed, width=size,
                                                height=size)
    plot = xyz.xyz_plot(p, xyz.parse_axis("sampler", XYZ_SAMPLERS), xyz.parse_axis("steps", XYZ_STEPS))
    grid = xyz.save_plot(plot, grid_path=out / "xyz_samplers_steps.png")[0]
    print(f"xyz: {grid}\n  {XYZ_SAMPLERS} x steps {XYZ_STEPS}")
    # The star LoRA teaches the tiny model a shape it cannot draw: the same seed without and with it.
    for name, tag in (("lora-base", ""), ("lora-star", f" <lora:{STAR_LORA.stem}:1>")):
        p = sdcore.StableDiffusionProcessingTxt2Img(
            sd_model=sd, prompt="a red star" + tag, sampler_name="DPM++ 2M", scheduler="karras", steps=args.steps,
            cfg_scale=6.0, seed=args.seed, width=size, height=size,
            opts=sdcore.Options(lora_dir=str(STAR_LORA.parent)))
        run_and_save(p, out / f"{name}.png")
    print(f"input: {out / 'input.png'}\nmask: {out / 'mask.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
