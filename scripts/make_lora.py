"""Write a random-weight LoRA file in a real key layout, and benchmark loading and merging one.

Layouts (a1111-semantics §19):
- `kohya`: kohya-ss sd-scripts `networks/lora.py` names: `lora_unet_<module>` (SD1/SD2/tiny: diffusers' UNet path,
  as kohya trains on diffusers' UNet; SDXL: the sgm/LDM path, as kohya's SDXL UNet has those names), `lora_te_`
  (`lora_te1_` / `lora_te2_` for SDXL) with transformers' CLIP names; tensors `.lora_down.weight`,
  `.lora_up.weight`, `.alpha` (0-d), and kohya's metadata (`ss_network_dim`, `ss_network_alpha`,
  `ss_base_model_version`, `sshs_model_hash` = the "addnet" hash of the tensor data).
- `peft`: diffusers' `save_lora_weights` layout: `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`,
  `text_encoder.` / `text_encoder_2.`; alpha and per-module ranks in the `lora_adapter_metadata` JSON (PEFT
  LoraConfig fields), written only when some module's scale is not 1.

Targets are what kohya trains: every Linear / Conv2d inside each SpatialTransformer (proj_in, proj_out,
attn1/attn2 to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2) and each text encoder's q/k/v/out projections and
fc1/fc2; with `--conv-rank` > 0 (kohya `conv_dim`, "LoCon") also every Linear / Conv2d inside each ResBlock
(in_layers.2, emb_layers.1, out_layers.3, skip_connection), Downsample and Upsample. 3x3 convs get `conv_rank` /
`conv_alpha`, linears and 1x1 convs `rank` / `alpha` (kohya `create_modules`). Values: down ~ N(0, 1/fan_in),
up ~ N(0, 1/rank), so up @ down has the magnitude of a weight and alpha/rank sets the strength.

Usage:
    python scripts/make_lora.py --family sd1 --size tiny --layout kohya --rank 4 --alpha 2 lora.safetensors
    python scripts/make_lora.py --family sdxl --size tiny --layout kohya --rank 8 --conv-rank 4 xl.safetensors
    python scripts/make_lora.py --bench            # full-size SD1.5, rank 128, all layers: load + merge time, RSS

Never overwrites a file (written to a temporary name, then linked: `sdcore.images.write_new_file`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_checkpoint import DTYPES, SIZES, family_config

from sdcore.families import Family
from sdcore.models.text import TextEncoder
from sdcore.models.unet import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    UNetModel,
    Upsample,
)
from sdcore.networks import unet_diffusers_names

LAYOUTS = ("kohya", "peft")
SUFFIXES = (".safetensors", ".pt")
TEXT_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class LoraTarget:
    """One module a LoRA adapts: where (component "unet" or text encoder index), its names, its weight shape."""

    component: str | int
    ldm: str  # sdcore module path (UNet) or transformers CLIP path (text)
    diffusers: str  # diffusers path (UNet) or transformers CLIP path (text)
    shape: tuple[int, ...]  # the weight's shape (O, I) or (O, I, k, k)


def unet_targets(unet: UNetModel, conv: bool) -> list[LoraTarget]:
    """kohya's UNet targets (module docstring), in module order."""
    to_diffusers = {ldm: d for d, ldm in unet_diffusers_names(unet).items()}
    classes = (SpatialTransformer,) + ((ResBlock, Downsample, Upsample) if conv else ())
    out = []
    for name, block in unet.named_modules():
        if not isinstance(block, classes):
            continue
        for sub, m in block.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                path = f"{name}.{sub}"
                out.append(LoraTarget("unet", path, to_diffusers[path], tuple(m.weight.shape)))
    return out


def text_targets(encoders: list[TextEncoder]) -> list[LoraTarget]:
    """q/k/v/out projections and fc1/fc2 of every layer of every text encoder (transformers' names)."""
    out = []
    for index, encoder in enumerate(encoders):
        w = encoder.config.width
        inner = encoder.transformer.resblocks[0].mlp.c_fc.weight.shape[0]
        shapes = {"mlp.fc1": (inner, w), "mlp.fc2": (w, inner)}
        for layer in range(encoder.config.layers):
            for part in TEXT_PARTS:
                path = f"text_model.encoder.layers.{layer}.{part}"
                out.append(LoraTarget(index, path, path, shapes.get(part, (w, w))))
    return out


def model_targets(family: Family, conv: bool) -> list[LoraTarget]:
    """Targets of a family's modules, built on the meta device (no memory)."""
    unet = UNetModel(family.unet, device="meta")
    encoders = [TextEncoder(config, device="meta") for config in family.text]
    return unet_targets(unet, conv) + text_targets(encoders)


def is_sdxl(family: Family) -> bool:
    return len(family.text) == 2


def kohya_name(target: LoraTarget, sdxl: bool) -> str:
    """kohya module key: lora_unet_ + (SDXL: LDM path, else diffusers path), lora_te_ / lora_te1_ / lora_te2_ +
    transformers path; dots as underscores (kohya `create_modules`)."""
    if target.component == "unet":
        return "lora_unet_" + (target.ldm if sdxl else target.diffusers).replace(".", "_")
    prefix = f"lora_te{target.component + 1}_" if sdxl else "lora_te_"
    return prefix + target.diffusers.replace(".", "_")


PEFT_COMPONENTS = {"unet": "unet", 0: "text_encoder", 1: "text_encoder_2"}


def make_lora_state_dict(family: Family, layout: str, rank: int, alpha: float, conv_rank: int = 0,
                         conv_alpha: float | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                         text: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a random LoRA for `family` in `layout` ("kohya" or "peft").

    rank / alpha: for linears and 1x1 convs; conv_rank / conv_alpha (default alpha): for 3x3 convs, 0 = no conv
    layers (ResBlocks, Down/Upsample skipped). `text`: include the text encoders. One `torch.Generator(seed)` draws
    down then up for each target in order, so equal arguments give equal bytes. Raises ValueError on bad arguments;
    for "peft" a conv_alpha different from alpha (PEFT would need an alpha_pattern).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; allowed: {LAYOUTS}")
    if rank < 1 or conv_rank < 0:
        raise ValueError(f"rank={rank}, conv_rank={conv_rank}; allowed: rank >= 1, conv_rank >= 0")
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    if layout == "peft" and conv_rank and conv_alpha != alpha:
        raise ValueError("peft layout: conv_alpha must equal alpha (one lora_alpha per component)")
    generator = torch.Generator().manual_seed(seed)
    sdxl = is_sdxl(family)
    tensors: dict[str, torch.Tensor] = {}
    peft_modules: dict[str, dict[str, int]] = {}
    for target in model_targets(family, conv=conv_rank > 0):
        if target.component != "unet" and not text:
            continue
        out_f, in_f = target.shape[:2]
        kernel = target.shape[2:]
        big = kernel not in ((), (1, 1))
        r, a = (conv_rank, conv_alpha) if big else (rank, alpha)
        fan_in = in_f * (kernel[0] * kernel[1] if kernel else 1)
        down = torch.randn((r, in_f) + kernel, generator=generator) * fan_in ** -0.5
        up = torch.randn((out_f, r) + ((1, 1) if kernel else ()), generator=generator) * r ** -0.5
        if layout == "kohya":
            key = kohya_name(target, sdxl)
            tensors[f"{key}.lora_down.weight"] = down.to(dtype)
            tensors[f"{key}.lora_up.weight"] = up.to(dtype)
            tensors[f"{key}.alpha"] = torch.tensor(float(a), dtype=dtype)
        else:
            component = PEFT_COMPONENTS[target.component]
            key = f"{component}.{target.diffusers}"
            tensors[f"{key}.lora_A.weight"] = down.to(dtype)
            tensors[f"{key}.lora_B.weight"] = up.to(dtype)
            peft_modules.setdefault(component, {})[target.diffusers] = r
    if layout == "kohya":
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                    "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
                    "ss_v2": str(family.name.startswith("sd2")), "sdcore.random_weights": "true"}
        if conv_rank:
            metadata["ss_network_args"] = json.dumps({"conv_dim": conv_rank, "conv_alpha": conv_alpha})
        metadata["sshs_model_hash"] = addnet_hash_of(tensors)
        return tensors, metadata
    metadata = {"format": "pt", "sdcore.random_weights": "true"}
    if alpha != rank or any(r != rank for m in peft_modules.values() for r in m.values()):
        config = {}
        for component, modules in peft_modules.items():
            config.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                           f"{component}.target_modules": sorted(modules),
                           f"{component}.rank_pattern": {k: r for k, r in modules.items() if r != rank},
                           f"{component}.alpha_pattern": {}})
        metadata["lora_adapter_metadata"] = json.dumps(config, indent=2, sort_keys=True)
    return tensors, metadata


def addnet_hash_of(tensors: dict[str, torch.Tensor]) -> str:
    """kohya's `sshs_model_hash`: sha256 of the tensor-data bytes of the safetensors serialisation (everything after
    the 8-byte header length and the header; independent of the metadata)."""
    from safetensors.torch import save

    blob = save(tensors)
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def write_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> Path:
    """Write `.safetensors` (with `metadata`) or `.pt` (torch.save of the dict) atomically; never overwrites
    (FileExistsError). Returns the path."""
    from sdcore.images import write_new_file

    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"output path {str(path)!r} must end with one of {SUFFIXES}")

    def write(tmp: Path) -> None:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, tmp)

    return write_new_file(path, write)


# ---------------------------------------------------------------------------------------------------------------
# Benchmark


def _rss_kib(field_name: str) -> int:
    """VmRSS or VmHWM (peak) of this process in KiB, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def random_model(family: Family, dtype: torch.dtype, seed: int = 0):
    """A StableDiffusionModel of `family` with random UNet and text-encoder weights made directly in `dtype`
    (one tensor at a time: no float32 copy of the whole model; the scales of make_checkpoint.random_like) and a
    VAE on the meta device (unused here)."""
    from sdcore.checkpoint import StableDiffusionModel
    from sdcore.models.vae import AutoencoderKL

    generator = torch.Generator().manual_seed(seed)
    unet = UNetModel(family.unet, device="meta", dtype=dtype).to_empty(device="cpu")
    encoders = [TextEncoder(config, device="cpu", dtype=dtype) for config in family.text]
    for module in [unet] + encoders:
        for name, p in module.named_parameters():  # make_checkpoint.random_like's scales, one tensor at a time
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise.mul_(p[0].numel() ** -0.5))
            else:
                p.copy_(noise.mul_(0.1).add_(1.0 if p.ndim == 1 and name.endswith("weight") else 0.0))
        module.eval().requires_grad_(False)
    return StableDiffusionModel(family=family, unet=unet, vae=AutoencoderKL(family.vae, device="meta"),
                                text_encoders=encoders, tokenizer=None, alphas_cumprod=torch.zeros(1000),
                                device=torch.device("cpu"), dtype=dtype, vae_dtype=torch.float32)


def _params_digest(sd_model) -> str:
    digest = hashlib.sha256()
    for module in [sd_model.unet] + list(sd_model.text_encoders):
        for p in module.parameters():
            digest.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def bench(rank: int = 128, dtype: torch.dtype = torch.float16, family_name: str = "sd1", size: str = "full",
          file_dtype: torch.dtype = torch.float16) -> dict[str, float]:
    """Load + merge + restore a random kohya LoRA of `rank` (attention, ff and conv layers, conv_rank = rank) on a
    random `family_name` model of `size` in `dtype`; returns the timings (s), the peak RSS above the baseline
    (MiB, VmHWM after reset), the file size and the backup size, and checks the restore is bit-exact."""
    from sdcore.networks import applied, load_network

    torch.set_num_threads(1)
    family = family_config(family_name, size)
    model = random_model(family, dtype)
    with tempfile.TemporaryDirectory() as folder:
        tensors, metadata = make_lora_state_dict(family, "kohya", rank, rank / 2, conv_rank=rank,
                                                 conv_alpha=rank / 2, dtype=file_dtype)
        path = write_lora(tensors, metadata, Path(folder) / "bench.safetensors")
        n_values = sum(t.numel() for t in tensors.values())
        del tensors
        before = _params_digest(model)
        baseline = _rss_kib("VmRSS")
        peak_reset = _reset_peak()
        t0 = time.perf_counter()
        net = load_network(path, model)
        t1 = time.perf_counter()
        with applied(model, [(net, 1.0, 1.0)]) as stats:
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        peak = _rss_kib("VmHWM") if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        restored = _params_digest(model) == before
        file_mib = path.stat().st_size / 2 ** 20
    return {"family": family_name, "size": size, "rank": rank, "model_dtype": str(dtype), "file_mib": file_mib,
            "lora_values_m": n_values / 1e6, "modules": len(net.modules), "merged": stats["modules"],
            "load_s": t1 - t0, "merge_s": t2 - t1, "restore_s": t3 - t2,
            "backup_mib": stats["backup_bytes"] / 2 ** 20, "baseline_rss_mib": baseline / 1024,
            "peak_rss_above_baseline_mib": (peak - baseline) / 1024, "peak_rss_mib": peak / 1024,
            "restore_bit_exact": restored}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, nargs="?", help="file to create: *.safetensors or *.pt (never overwritten)")
    parser.add_argument("--family", default="sd1", help="model family (make_checkpoint names; default sd1)")
    parser.add_argument("--size", default="tiny", choices=SIZES, help="tiny or full (default tiny)")
    parser.add_argument("--layout", default="kohya", choices=LAYOUTS, help="key layout (default kohya)")
    parser.add_argument("--rank", type=int, default=4, help="rank of linear and 1x1-conv modules (default 4)")
    parser.add_argument("--alpha", type=float, default=None, help="alpha (default: rank, i.e. scale 1)")
    parser.add_argument("--conv-rank", type=int, default=0, help="rank of 3x3 convs; 0 = no ResBlock layers")
    parser.add_argument("--conv-alpha", type=float, default=None, help="alpha of 3x3 convs (default --alpha)")
    parser.add_argument("--no-te", action="store_true", help="UNet only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator (default 0)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the tensors")
    parser.add_argument("--bench", action="store_true",
                        help="benchmark load + merge of a full-size SD1.5 LoRA of --rank (default 128) in fp16")
    args = parser.parse_args(argv)
    if args.bench:
        result = bench(rank=args.rank if args.rank != 4 else 128)
        print(json.dumps(result, indent=2))
        return 0 if result["restore_bit_exact"] else 1
    if args.output is None:
        parser.error("output path required (or --bench)")
    if args.output.exists():
        parser.error(f"{args.output} exists; make_lora never overwrites a file")
    try:
        family = family_config(args.family, args.size)
        alpha = float(args.rank if args.alpha is None else args.alpha)
        tensors, metadata = make_lora_state_dict(family, args.layout, args.rank, alpha, args.conv_rank,
                                                 args.conv_alpha, args.seed, DTYPES[args.dtype], not args.no_te)
        path = write_lora(tensors, metadata, args.output)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    count = sum(v.numel() for v in tensors.values())
    print(f"wrote {path}: {args.layout} layout, {len(tensors)} tensors, {count / 1e6:.2f} M values ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
