"""`sdcore img2img | inpaint | info | samplers`: a thin command line over the Python API.

Every processing flag maps to one field of `StableDiffusionProcessingImg2Img` (A1111 name with dashes). Bad values
exit with status 2 and one line naming the argument; nothing is written then.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CKPT = Path(__file__).resolve().parent.parent / "weights" / "sdcore-tiny.safetensors"

IMG2IMG_HELP = """\
img2img: noise the init image's latent to the level set by --denoising-strength, then denoise it with the prompt.
  denoising strength d in [0, 1]: the sampler runs only the last t_enc + 1 of --steps steps, where
  t_enc = int(min(d, 0.999) * steps) (A1111); e.g. 20 steps at 0.75 -> 16 model calls (x2 for second-order
  samplers, x2 rows for CFG). d = 0 keeps the image, d = 1 starts from (almost) pure noise.
inpainting (--mask, white = regenerate): the masked-content mode --inpainting-fill sets what the masked area starts
  from: 0 fill (blurred surroundings), 1 original (the init image), 2 latent noise, 3 latent nothing (zeros).
  Outside the mask the original pixels are pasted back through the blurred mask.
"""


def _add_processing_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--prompt", default="", help="text prompt (A1111 syntax: (emphasis:1.2), [a:b:0.5], BREAK, AND)")
    ap.add_argument("--negative-prompt", default="", help="negative prompt (the CFG unconditional branch)")
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint .safetensors/.ckpt (LDM layout); "
                    "default: the bundled tiny model")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps before the denoising-strength cut")
    ap.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=-1, help="seed; -1 = random (resolved and written to the infotext)")
    ap.add_argument("--sampler", dest="sampler_name", default="Euler a", help="sampler name (see `sdcore samplers`)")
    ap.add_argument("--scheduler", default=None, help="schedule type (automatic, karras, exponential, ...)")
    ap.add_argument("--width", type=int, default=None, help="output width in pixels (multiple of 8; default: model's)")
    ap.add_argument("--height", type=int, default=None, help="output height in pixels (multiple of 8)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--n-iter", type=int, default=1)
    ap.add_argument("--outdir", type=Path, default=Path("outputs/img2img-images"), help="where PNGs are written")
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, mps")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def _add_img2img_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("init", type=Path, help="init image file")
    ap.add_argument("--mask", type=Path, default=None, help="mask image (white = regenerate); same size as init")
    ap.add_argument("--denoising-strength", type=float, default=0.75, help="in [0, 1]")
    ap.add_argument("--resize-mode", type=int, default=0, help="0 just resize, 1 crop and resize, 2 resize and fill, "
                    "3 just resize (latent upscale)")
    ap.add_argument("--mask-blur", type=int, default=4, help="Gaussian sigma of the mask blur, pixels")
    ap.add_argument("--inpainting-fill", type=int, default=1, help="0 fill, 1 original, 2 latent noise, 3 latent "
                    "nothing")
    ap.add_argument("--inpaint-full-res", action="store_true", help='"Only masked": process a crop around the mask')
    ap.add_argument("--inpaint-full-res-padding", type=int, default=32, help="pixels around the mask's bbox")
    ap.add_argument("--inpainting-mask-invert", type=int, default=0, choices=[0, 1])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sdcore", description="Stable Diffusion img2img and inpainting (A1111 semantics)")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("img2img", "inpaint"):
        sp = sub.add_parser(name, help="img2img / inpainting of an image file", description=IMG2IMG_HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_img2img_flags(sp)
        _add_processing_flags(sp)
    info = sub.add_parser("info", help="what a checkpoint is, and why")
    info.add_argument("ckpt", type=Path, nargs="?", default=DEFAULT_CKPT)
    sub.add_parser("samplers", help="list sampler names, aliases and default schedulers")
    return ap


def _open_image(path: Path, arg: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{arg}: cannot read image {path} ({e.__class__.__name__}: {e})") from e


def run_img2img(args) -> int:
    import torch

    from .checkpoint import load_checkpoint
    from .processing import StableDiffusionProcessingImg2Img, process_images

    if not 0 <= args.denoising_strength <= 1:
        raise ValueError(f"--denoising-strength: {args.denoising_strength}; must be in [0, 1]")
    for flag, v in (("--width", args.width), ("--height", args.height)):
        if v is not None and (v < 8 or v % 8):
            raise ValueError(f"{flag}: {v}; must be a positive multiple of 8")
    from .sampling.samplers import find_sampler

    find_sampler(args.sampler_name)
    init = _open_image(args.init, "init")
    mask = _open_image(args.mask, "--mask") if args.mask else None
    if mask is not None and mask.size != init.size:
        raise ValueError(f"--mask: size {mask.size[0]}x{mask.size[1]} differs from the init image's "
                         f"{init.size[0]}x{init.size[1]}")
    sd = load_checkpoint(args.ckpt, device=args.device, dtype=getattr(torch, args.dtype))
    size = sd.family.native_size
    p = StableDiffusionProcessingImg2Img(
        sd_model=sd, outpath_samples=str(args.outdir), prompt=args.prompt, negative_prompt=args.negative_prompt,
        init_images=[init], mask=mask, denoising_strength=args.denoising_strength, resize_mode=args.resize_mode,
        sampler_name=args.sampler_name, scheduler=args.scheduler, steps=args.steps, cfg_scale=args.cfg_scale,
        seed=args.seed, width=args.width or size, height=args.height or size, batch_size=args.batch_size,
        n_iter=args.n_iter, mask_blur=args.mask_blur, inpainting_fill=args.inpainting_fill,
        inpaint_full_res=args.inpaint_full_res, inpaint_full_res_padding=args.inpaint_full_res_padding,
        inpainting_mask_invert=args.inpainting_mask_invert)
    processed = process_images(p)
    for path in processed.paths:
        print(path)
    return 0


def run_info(args) -> int:
    from .checkpoint import load_checkpoint

    sd = load_checkpoint(args.ckpt)
    print(f"file: {args.ckpt}")
    print(f"family: {sd.family.name} (prediction {sd.family.prediction}, native {sd.family.native_size} px)")
    for r in sd.reasons:
        print(f"  because: {r}")
    for name, m in (("unet", sd.unet), ("vae", sd.vae), ("text", sd.text_encoders[0])):
        params = list(m.parameters())
        print(f"{name}: {sum(p.numel() for p in params):,} parameters, dtype {params[0].dtype}")
    print(f"model hash (sha256[:10]): {sd.shorthash()}")
    return 0


def run_samplers(args) -> int:
    from .sampling.samplers import SAMPLERS

    for s in SAMPLERS:
        print(f"{s.name:20s} aliases: {', '.join(s.aliases) or '-':30s} scheduler: {s.scheduler or 'uniform'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    run = {"img2img": run_img2img, "inpaint": run_img2img, "info": run_info, "samplers": run_samplers}[args.command]
    try:
        return run(args)
    except (ValueError, TypeError, NotImplementedError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"sdcore: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
