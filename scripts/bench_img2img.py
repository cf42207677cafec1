"""End-to-end img2img / inpainting speed: the bundled tiny model (default) or full size against diffusers (--full).

Default (issue 6 item 5): checkpoint load, then `process_images` for img2img and inpainting at the tiny model's
native 64 px, 20 steps (Euler a; d = 0.75 -> 16 model calls with CFG), median of --repeats runs, each printed
against the issue's bound (10 s) and goal (2 s).

--full (issue 12 items 1, 2, 5): the same random-weight full-size SD1.5 checkpoint written as an fp16
file (scripts/make_checkpoint.py, as users download them) goes through sdcore's `process_images` and diffusers'
`StableDiffusionImg2ImgPipeline` / `StableDiffusionInpaintPipeline`, assembled from local parts only: UNet and VAE
by diffusers' own single-file conversion (`diffusers.loaders.single_file_utils`, via tests/_diffusers_oracle.py),
transformers' `CLIPTextModel` holding the file's `cond_stage_model.transformer.*` tensors, a `CLIPTokenizer` whose
vocabulary is written from open_clip's BPE file, `EulerDiscreteScheduler` with SD1.5's betas, no safety checker.
Cases: 512x512 img2img (20 steps, strength 0.75, Euler, CFG 7), inpainting with the 9-channel model (mask = the
central square), each at fp32 and at bf16 compute (UNet and text encoder; the VAE runs in fp32 on both sides:
diffusers' VAE gets its input cast by a forward pre-hook, as its pipelines would pass bf16 tensors to it).
Per case and side: wall time of load (the file evicted from the page cache first, posix_fadvise DONTNEED, and
compared with a cold read of the same file), text encoder, VAE encode, sampling (first UNet call start to last
UNet call end), VAE decode, total, model calls, overhead (total - UNet - VAE - text encoder time); the RSS the
side's model occupies, and the peak RSS of the whole process (load and run): each side runs in its own process
(`--child`), `--repeats` times, the order alternating, medians reported. `--nchw` adds sdcore with
`channels_last=False`. Ratios sdcore/diffusers. sdcore's model hash (sha256 of the file, for the infotext) is counted in its total.
--sdxl adds a 1024x1024 SDXL img2img at bf16 with VAE tiling (time per step, peak RSS), sdcore only.
--json FILE writes every figure as one JSON object. Not a test: the numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]
import sdcore  # noqa: E402
from sdcore.cli import DEFAULT_CKPT  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "a photograph of an astronaut riding a horse"


def tiny_main(args) -> int:
    """The tiny model's img2img and inpainting times against the issue-6 bound and goal, per --dtypes; with fp32
    and bf16 both, the bf16/fp32 time ratio and the PSNR of the bf16 image against the fp32 one (same seeds)."""
    print(f"checkpoint {args.ckpt.name}; {args.threads} threads; CPU flags {' '.join(cpu_flags()) or '-'}; "
          f"{args.steps} steps, Euler a")
    print(f"{'job':14s} {'median s':>9s} {'min s':>7s}  vs 10 s bound  vs 2 s goal")
    medians, images = {}, {}
    for dname in args.dtypes:
        t0 = time.perf_counter()
        sd = sdcore.load_checkpoint(args.ckpt, dtype=DTYPES[dname])
        print(f"{dname}: load {time.perf_counter() - t0:.2f} s")
        size = sd.family.native_size
        photo = Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS)
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
        jobs = {"img2img": {}, "inpaint": {"mask": Image.fromarray(mask, "L"), "inpaint_full_res": False}}
        for name, kw in jobs.items():
            times, outs = [], []
            for r in range(args.repeats + 1):  # the first run warms up kernels and is not counted
                p = sdcore.StableDiffusionProcessingImg2Img(sd_model=sd, prompt="a red circle", init_images=[photo],
                                                            sampler_name="Euler a", steps=args.steps, seed=r,
                                                            width=size, height=size, **kw)
                t0 = time.perf_counter()
                outs.append(np.asarray(sdcore.process_images(p, disable_progress=True).images[0]))
                if r:
                    times.append(time.perf_counter() - t0)
            med = medians[name, dname] = statistics.median(times)
            images[name, dname] = np.stack(outs)
            print(f"{name + ' ' + dname:14s} {med:9.3f} {min(times):7.3f}  {med / 10:12.3f}x  {med / 2:10.3f}x")
    if {"fp32", "bf16"} <= set(args.dtypes):
        for name in ("img2img", "inpaint"):
            print(f"{name}: bf16 / fp32 time {medians[name, 'bf16'] / medians[name, 'fp32']:.3f}x; PSNR of bf16 "
                  f"against fp32 images (same seeds): {psnr(images[name, 'bf16'], images[name, 'fp32']):.2f} dB")
    return 0


# ---------------------------------------------------------------------------------------------------- memory, files

def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, `echo 5 > /proc/PID/clear_refs`); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache, so the next read is cold (clean pages only; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_read_seconds(path: Path) -> float:
    """Seconds to read the whole file in 16 MiB blocks right after evicting it."""
    evict(path)
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def make_file(workdir: Path, family: str) -> Path:
    """The full-size random checkpoint of `family` as an fp16 .safetensors (written once, then reused)."""
    path = workdir / f"bench-{family}-full-fp16.safetensors"
    if not path.exists():
        import make_checkpoint
        make_checkpoint.main([str(path), "--family", family, "--size", "full", "--dtype", "fp16"])
    return path


# ---------------------------------------------------------------------------------------------------- phase timing

class PhaseClock:
    """Wall time spent inside the UNet, VAE encoder/decoder and text encoder(s), from forward hooks; the first
    UNet call's start and the last one's end bound the sampling phase."""

    def __init__(self, unet, encoder, decoder, text_encoders):
        self.spent = {"unet": 0.0, "encode": 0.0, "decode": 0.0, "text": 0.0}
        self.calls = 0
        self.first_unet = self.last_unet = None
        self._open: dict[int, float] = {}
        self.handles = []
        for name, module in [("unet", unet), ("encode", encoder), ("decode", decoder)] + \
                [("text", m) for m in text_encoders]:
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            now = time.perf_counter()
            self._open[id(module)] = now
            if name == "unet":
                self.calls += 1
                self.first_unet = self.first_unet or now
        return hook

    def _post(self, name):
        def hook(module, args, out):
            now = time.perf_counter()
            self.spent[name] += now - self._open.pop(id(module))
            if name == "unet":
                self.last_unet = now
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def run_timed(fn, clock: PhaseClock) -> dict:
    reset_peak_rss()
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    image = fn()
    total = time.perf_counter() - t0
    s = clock.spent
    return {"total": total, "text": s["text"], "encode": s["encode"], "decode": s["decode"], "unet": s["unet"],
            "sampling": (clock.last_unet - clock.first_unet) if clock.calls else 0.0, "calls": clock.calls,
            "overhead": total - s["unet"] - s["encode"] - s["decode"] - s["text"],
            "peak_rss": _status_mib("VmHWM"), "work_rss": _status_mib("VmHWM") - before, "image": image}


# ---------------------------------------------------------------------------------------------------- sdcore side

def sdcore_side(path: Path, dtype: torch.dtype, inpaint: bool, photo, mask, steps: int,
                vae_tiling: bool | None = None, channels_last: bool | None = None):
    """Load `path` with sdcore, then a function running the case through `process_images` and its clock;
    `vae_tiling`: `Options.vae_tiling` (None = automatic); `channels_last`: as `load_checkpoint`'s."""
    from sdcore.checkpoint import load_checkpoint
    sd = load_checkpoint(path, dtype=dtype, channels_last=channels_last)
    clock = PhaseClock(sd.unet, sd.vae.encoder, sd.vae.decoder, sd.text_encoders)
    size = photo.size[0]
    kw = dict(mask=mask, inpainting_fill=1, inpaint_full_res=False) if inpaint else {}

    def run():
        p = sdcore.StableDiffusionProcessingImg2Img(
            sd_model=sd, prompt=PROMPT, negative_prompt="", init_images=[photo], sampler_name="Euler",
            steps=steps, denoising_strength=0.75, cfg_scale=7.0, seed=1, width=size, height=size,
            opts=sdcore.Options(vae_tiling=vae_tiling), **kw)
        return np.asarray(sdcore.process_images(p, disable_progress=True).images[0])
    return sd, run, clock


# ---------------------------------------------------------------------------------------------------- diffusers side

def clip_tokenizer(workdir: Path):
    """transformers' CLIPTokenizer over CLIP's BPE vocabulary, written from open_clip's bundled merges file (the
    49408-entry vocabulary: 256 byte symbols, the same with `</w>`, the 48894 merges, the two special tokens)."""
    import importlib.util

    import transformers
    from open_clip.tokenizer import bytes_to_unicode
    d = workdir / "clip-tokenizer"
    if not (d / "vocab.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        bpe = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / \
            "bpe_simple_vocab_16e6.txt.gz"
        with gzip.open(bpe) as f:
            merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)


def _cast_inputs(module, dtype):
    """A forward pre-hook casting floating positional inputs to `dtype` (mixed-dtype pipelines on the CPU)."""
    def hook(mod, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return module.register_forward_pre_hook(hook)


def diffusers_side(path: Path, dtype: torch.dtype, inpaint: bool, photo, mask, steps: int, workdir: Path):
    """Load `path` into diffusers' pipeline parts (see the module docstring), then a function running the case."""
    import diffusers
    import transformers
    from _diffusers_oracle import diffusers_unet, diffusers_vae
    from safetensors.torch import load_file

    from sdcore.families import FAMILIES
    family = FAMILIES["sd1-inpaint" if inpaint else "sd1"]
    state = load_file(str(path))
    unet_sd = {k[len("model.diffusion_model."):]: v.to(dtype) for k, v in state.items()
               if k.startswith("model.diffusion_model.")}
    vae_sd = {k[len("first_stage_model."):]: v.float() for k, v in state.items() if k.startswith("first_stage_model.")}
    te_prefix = "cond_stage_model.transformer.text_model."  # transformers 5: CLIPTextModel has no text_model.
    te_sd = {k[len(te_prefix):]: v.to(dtype) for k, v in state.items()
             if k.startswith(te_prefix) and not k.endswith("position_ids")}
    del state
    unet = diffusers_unet(unet_sd, family.unet, family.vae)
    vae = diffusers_vae(vae_sd, family.vae)
    del unet_sd, vae_sd
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                         hidden_act="quick_gelu", projection_dim=768)
    with torch.device("meta"):
        text_encoder = transformers.CLIPTextModel(config)
    missing, unexpected = text_encoder.load_state_dict(te_sd, strict=False, assign=True)
    if unexpected or not set(missing) <= {"embeddings.position_ids"}:
        raise RuntimeError(f"text encoder keys: missing {missing}, unexpected {unexpected}")
    text_encoder.embeddings.position_ids = torch.arange(77)[None]
    text_encoder.eval()
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 num_train_timesteps=1000, steps_offset=1)
    cls = diffusers.StableDiffusionInpaintPipeline if inpaint else diffusers.StableDiffusionImg2ImgPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(workdir), unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:  # the pipeline hands the VAE bf16 tensors and the UNet fp32 ones: cast at the edges
        _cast_inputs(vae.encoder, torch.float32)
        _cast_inputs(vae.post_quant_conv, torch.float32)
        _cast_inputs(unet, dtype)
    clock = PhaseClock(unet, vae.encoder, vae.decoder, [text_encoder])
    kw = dict(mask_image=mask) if inpaint else {}

    def run():
        out = pipe(prompt=PROMPT, negative_prompt="", image=photo, strength=0.75, num_inference_steps=steps,
                   guidance_scale=7.0, generator=torch.Generator().manual_seed(1), **kw)
        return np.asarray(out.images[0])
    return pipe, run, clock


# ---------------------------------------------------------------------------------------------------- cases

def measure(side: str, path: Path, dtype, inpaint, photo, mask, steps, workdir, vae_tiling=None) -> dict:
    gc.collect()
    evict(path)
    rss0 = _status_mib("VmRSS")
    t0 = time.perf_counter()
    if side.startswith("sdcore"):
        model, run, clock = sdcore_side(path, dtype, inpaint, photo, mask, steps, vae_tiling,
                                        channels_last=False if side == "sdcore-nchw" else None)
    else:
        model, run, clock = diffusers_side(path, dtype, inpaint, photo, mask, steps, workdir)
    load = time.perf_counter() - t0
    model_rss = _status_mib("VmRSS") - rss0
    with torch.inference_mode():
        result = run_timed(run, clock)
    clock.close()
    result.update(load=load, model_rss=model_rss)
    del model, run, clock
    gc.collect()
    return result


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


FIELDS = ["load", "text", "encode", "sampling", "decode", "total", "overhead", "calls", "model_rss", "process_peak"]
GOALS = {"total": 0.9, "process_peak": 1.0}


def print_case(name: str, r: dict) -> None:
    s, d, n = r["sdcore"], r["diffusers"], r.get("sdcore-nchw")
    print(f"\n{name} (median of {s['runs']} runs per side, each in its own process)")
    print(f"  {'':16s} {'sdcore':>10s} {'diffusers':>10s} {'ratio':>7s}" + ("  sdcore-nchw  ratio" if n else ""))
    for f in FIELDS:
        unit = "MiB" if "rss" in f or "peak" in f else ("" if f == "calls" else "s")
        ratio = s[f] / d[f] if d[f] else float("nan")
        goal = GOALS.get(f)
        mark = "" if goal is None else (f"  goal <= {goal}x: " + ("met" if ratio <= goal else "MISSED"))
        extra = f"  {n[f]:10.2f} {n[f] / d[f] if d[f] else float('nan'):6.3f}" if n else ""
        print(f"  {f + (' ' + unit if unit else ''):16s} {s[f]:10.2f} {d[f]:10.2f} {ratio:7.3f}{extra}{mark}")
    print(f"  overhead share of total: sdcore {s['overhead'] / s['total']:.1%} (goal <= 5 %), "
          f"diffusers {d['overhead'] / d['total']:.1%}; per model call: sdcore {s['unet'] / s['calls']:.2f} s, "
          f"diffusers {d['unet'] / d['calls']:.2f} s ({s['unet'] / s['calls'] / (d['unet'] / d['calls']):.3f}x)"
          + (f"; sdcore-nchw {n['unet'] / n['calls']:.2f} s; PSNR nchw vs channels-last image "
             f"{r['psnr_nchw_vs_channels_last']:.1f} dB" if n else ""))


def case_inputs():
    """The 512 px astronaut photo and the inpainting mask (the central 256 px square)."""
    photo = Image.fromarray(data.astronaut()).resize((512, 512), Image.LANCZOS)
    mask_np = np.zeros((512, 512), np.uint8)
    mask_np[128:384, 128:384] = 255
    return photo, Image.fromarray(mask_np, "L")


def child_main(spec: dict) -> int:
    """One side of one case in this (fresh) process: its figures as JSON on the last stdout line, the image as
    .npy beside the checkpoint."""
    photo, mask = case_inputs()
    path, workdir = Path(spec["path"]), Path(spec["workdir"])
    res = measure(spec["side"], path, DTYPES[spec["dtype"]], spec["kind"] == "inpaint", photo, mask, spec["steps"],
                  workdir)
    np.save(workdir / f"image-{spec['side']}-{spec['kind']}-{spec['dtype']}.npy", res.pop("image"))
    print(json.dumps(res, default=float))
    return 0


def measure_in_child(side: str, kind: str, dname: str, path: Path, args) -> dict:
    """`child_main` in a new process; adds its whole-life peak RSS (wait4 ru_maxrss: load and run, imports
    included) as `process_peak`, so neither side inherits the other's allocator state."""
    spec = {"side": side, "kind": kind, "dtype": dname, "path": str(path), "workdir": str(args.workdir),
            "steps": args.steps}
    proc = subprocess.Popen([sys.executable, __file__, "--threads", str(args.threads), "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{side} {kind} {dname}: child failed (exit {os.waitstatus_to_exitcode(status)})")
    res = json.loads(out.strip().splitlines()[-1])
    res["process_peak"] = usage.ru_maxrss / 1024
    res["image"] = np.load(args.workdir / f"image-{side}-{kind}-{dname}.npy")
    return res


def median_run(runs: list[dict]) -> dict:
    """Per field, the median over repeated runs of one side (the image of the first run)."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "image"}
    out["image"] = runs[0]["image"]
    out["runs"] = len(runs)
    return out


def full_main(args) -> int:
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    files = {"img2img": make_file(workdir, "sd1"), "inpaint": make_file(workdir, "sd1-inpaint")}
    sides = ["sdcore", "diffusers"] + (["sdcore-nchw"] if args.nchw else [])
    out: dict = {"threads": args.threads, "steps": args.steps, "loadavg": os.getloadavg(), "repeats": args.repeats,
                 "cpu_flags": cpu_flags(), "cases": {}}
    for kind in args.cases:
        path = files[kind]
        out["cold_read_" + kind] = cold_read_seconds(path)
        print(f"{path.name}: {path.stat().st_size / 1e9:.2f} GB, cold read {out['cold_read_' + kind]:.2f} s")
        images = {}
        for dname in args.dtypes:
            name = f"{kind} {dname}"
            runs: dict[str, list] = {side: [] for side in sides}
            for r in range(args.repeats):
                order = sides if r % 2 == 0 else sides[::-1]  # alternate, so drifting load hits every side alike
                for side in order:
                    runs[side].append(measure_in_child(side, kind, dname, path, args))
                    print(f"  {name} {side} run {r + 1}: " + ", ".join(f"{k} {runs[side][-1][k]:.2f}"
                                                                     for k in FIELDS), flush=True)
            res = {side: median_run(v) for side, v in runs.items()}
            images[dname] = res["sdcore"].pop("image")
            for side in sides[1:]:
                image = res[side].pop("image")
                if side == "sdcore-nchw":
                    res["psnr_nchw_vs_channels_last"] = psnr(image, images[dname])
            res["sdcore"]["load_vs_cold_read"] = res["sdcore"]["load"] / out["cold_read_" + kind]
            res["loadavg"] = os.getloadavg()
            out["cases"][name] = res
            print_case(name, res)
            print(f"  sdcore load / cold read: {res['sdcore']['load_vs_cold_read']:.2f}x (goal <= 1.5x); "
                  f"load average {res['loadavg'][0]:.2f}")
        if {"fp32", "bf16"} <= set(images):
            out[f"psnr_bf16_vs_fp32_{kind}"] = psnr(images["bf16"], images["fp32"])
            ratio = out["cases"][f"{kind} bf16"]["sdcore"]["total"] / out["cases"][f"{kind} fp32"]["sdcore"]["total"]
            out[f"bf16_vs_fp32_time_{kind}"] = ratio
            print(f"\n{kind}: sdcore bf16 / fp32 wall {ratio:.3f}x (goal <= 0.45x); PSNR of the bf16 image "
                  f"against fp32: {out[f'psnr_bf16_vs_fp32_{kind}']:.2f} dB")
    if args.sdxl:
        out["sdxl"] = sdxl_case(workdir, args)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=float))
        os.replace(tmp, args.json)
    return 0


def sdxl_case(workdir: Path, args) -> dict:
    """1024x1024 SDXL img2img at bf16 with VAE tiling: time per model call and peak RSS (sdcore only)."""
    path = make_file(workdir, "sdxl")
    photo = Image.fromarray(data.astronaut()).resize((1024, 1024), Image.LANCZOS)
    res = measure("sdcore", path, torch.bfloat16, False, photo, None, args.sdxl_steps, workdir, vae_tiling=True)
    res.pop("image")
    res["per_call"] = res["unet"] / max(res["calls"], 1)
    print(f"\nSDXL 1024x1024 bf16, VAE tiling, {args.sdxl_steps} steps x 0.75: {res['calls']} UNet calls, "
          f"{res['per_call']:.1f} s per call (batch 2 with CFG), total {res['total']:.1f} s, "
          f"peak RSS {res['peak_rss']:.0f} MiB (model {res['model_rss']:.0f} MiB)")
    return res


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of an n x n matmul in `dtype` on this CPU with the current thread count (one warm-up call)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def cpu_flags() -> list[str]:
    """The CPU's vector extensions that decide bf16 speed (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return [f for f in flags.split(":")[1].split() if f in wanted]


def probe() -> int:
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16, n=256, repeats=2)
    print(f"CPU flags: {' '.join(cpu_flags()) or '-'}; {torch.get_num_threads()} threads; matmul fp32 "
          f"{fp32:.1f} GFLOP/s, bf16 {bf16:.2f} GFLOP/s ({bf16 / fp32:.3f}x fp32)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="tiny mode: the checkpoint")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=None,
                    help="tiny mode: timed runs after one warm-up (default 5); --full: runs per side, each in a new "
                    "process, alternating the order (default 1)")
    ap.add_argument("--nchw", action="store_true",
                    help="--full: also sdcore with channels_last=False (the layout's effect, same run)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--full", action="store_true", help="full-size SD1.5 against diffusers")
    ap.add_argument("--cases", nargs="+", default=["img2img", "inpaint"], choices=["img2img", "inpaint"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES),
                    help="compute dtypes (default fp32 only: bf16 needs a CPU with AVX512-BF16 or AMX, or a GPU; "
                    "without them torch's CPU bf16 matmul runs ~75x slower than fp32, see --probe)")
    ap.add_argument("--probe", action="store_true", help="print fp32 and bf16 matmul GFLOP/s of this CPU and exit")
    ap.add_argument("--sdxl", action="store_true", help="also the 1024 px SDXL bf16 case (needs ~16 GB)")
    ap.add_argument("--sdxl-steps", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sdcore-bench")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child_main(json.loads(args.child))
    if args.repeats is None:
        args.repeats = 1 if args.full else 5
    if args.probe:
        return probe()
    return full_main(args) if args.full else tiny_main(args)


if __name__ == "__main__":
    sys.exit(main())
