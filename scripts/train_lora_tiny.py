"""Train, evaluate and show the bundled tiny model's "star" LoRA (issue 10, item 6).

The tiny model (weights/README.md) knows four shapes; "a red star" gives it a small blob. This script teaches it a
fifth shape word with a low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
every Linear / 1x1 Conv2d inside the UNet's SpatialTransformers (proj_in, proj_out, attn1/attn2 to_q, to_k, to_v,
to_out.0, ff.net.0.proj, ff.net.2: the modules kohya's `networks/lora.py` targets in SD1's Transformer2DModel) gets
W' = W + (alpha / rank) * up @ down, with W frozen and only up [out, rank] and down [rank, in] trained; optionally
(`--te-rank`) the text encoder's q/k/v/out projections and MLP too (kohya's CLIPAttention / CLIPMLP targets).

Training data (scripts/tiny_data.py): star scenes drawn like the base shapes (all 8 colours, plain named or photo
backgrounds, with and without a position; `tiny_data.sample_scene(rng, shapes=("star",))`), mixed with scenes of the
four base shapes so that the LoRA keeps them. Loss, timesteps, Min-SNR-5 weights and the 10 % empty captions are
train_tiny.py's. Every random draw comes from --seed and the step number, with one thread, so a rerun (or a resumed
run: the state is saved to a temporary file and renamed every --save-every steps) gives the same file.

The file is written in kohya's key layout (`lora_unet_<diffusers module path with _>.lora_down.weight`,
`.lora_up.weight`, `.alpha`; `lora_te_text_model_encoder_layers_N_...`), as A1111's Lora extension and
`sdcore.networks` read it. The UNet's LDM names are mapped to diffusers names by `ldm_to_diffusers_unet_name`:
with B = num_res_blocks + 1 blocks per level (3 for SD1 and the bundled tiny UNet, 2 for a one-ResBlock tiny UNet),
input_blocks.{1 + B*i + j}.1 <-> down_blocks.{i}.attentions.{j}, middle_block.1 <-> mid_block.attentions.0,
output_blocks.{B*i + j}.1 <-> up_blocks.{i}.attentions.{j} (diffusers' `convert_ldm_unet_checkpoint`, which reads
layers_per_block from the config). A1111's `convert_diffusers_name_to_compvis` hard-codes SD1's B = 3 and would map
a one-ResBlock UNet wrongly (up_blocks.1.attentions.0 -> output_blocks.3 instead of 2); a loader must take B from
the model.

Usage:
  python scripts/train_lora_tiny.py [--workdir runs/tiny_lora] [--out sdcore/weights/sdcore-tiny-star-lora.safetensors]
  python scripts/train_lora_tiny.py --eval [--lora FILE] [--seeds 50]     (the card's metric)
  python scripts/train_lora_tiny.py --gallery [--gallery-out docs/gallery/lora_star.png]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_data  # noqa: E402
import train_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "sdcore" / "weights" / "sdcore-tiny.safetensors"
LORA = ROOT / "sdcore" / "weights" / "sdcore-tiny-star-lora.safetensors"
GALLERY = ROOT / "docs" / "gallery" / "lora_star.png"
CONCEPT = "star"

# LDM names of the UNet modules trained (inside a SpatialTransformer at input_blocks.N.1, middle_block.1 or
# output_blocks.N.1): kohya's SD1 targets, i.e. every Linear and 1x1 Conv2d of diffusers' Transformer2DModel.
UNET_TARGET = re.compile(r"^(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\."
                         r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
                         r"|ff\.net\.0\.proj|ff\.net\.2))$")
# open_clip text-transformer module -> transformers (CLIPTextModel) module, per resblock (models/text.py rules).
TE_PARTS = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
            "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


@dataclass(frozen=True)
class LoraTrainConfig:
    """Hyper-parameters of one run (the defaults made the shipped file)."""

    seed: int = 0
    rank: int = 8  # kohya network_dim; 8 x (in + out) per module keeps the file under 1 MB in fp16
    alpha: float = 8.0  # kohya network_alpha; scale alpha / rank = 1
    te_rank: int = 0  # 0: UNet only (the frozen random text encoder already tells "star" from the other words)
    te_alpha: float = 4.0
    steps: int = 1350
    batch: int = 32
    lr: float = 3e-3  # AdamW on the factors only; LoRA tolerates ~10x a full fine-tune's rate
    warmup: int = 50
    weight_decay: float = 0.0
    star_fraction: float = 0.75  # of each batch; the rest replays base-shape scenes so the four shapes stay
    n_star: int = 1800  # distinct star scenes (encoded once; each step draws a fresh latent sample and noise)
    n_base: int = 900  # distinct base-shape scenes
    star_photo_p: float = 0.1  # photo backgrounds among star captions without a background (base data: 0.25);
    # the pixel detector cannot read shapes on photos, and the trained model draws photos about as often as this
    uncond_p: float = 0.1  # empty captions, as in train_tiny (keeps classifier-free guidance calibrated)
    min_snr_gamma: float = 5.0
    ema: float = 0.995  # EMA of the factors (exported)
    save_every: int = 100


# ---- key names ----------------------------------------------------------------------------------------------------

def ldm_to_diffusers_unet_name(name: str, num_res_blocks: int) -> str:
    """LDM UNet module name -> diffusers `UNet2DConditionModel` module name, for SpatialTransformer modules.

    With B = num_res_blocks + 1 (the ResBlocks of a level plus its Downsample / Upsample slot):
    input_blocks.{1 + B*i + j}.1.X -> down_blocks.{i}.attentions.{j}.X (j < num_res_blocks),
    middle_block.1.X -> mid_block.attentions.0.X, output_blocks.{B*i + j}.1.X -> up_blocks.{i}.attentions.{j}.X
    (j <= num_res_blocks). X (proj_in, transformer_blocks.0.attn1.to_q, ff.net.2, ...) is the same in both layouts.
    Source: diffusers `loaders/single_file_utils.py` `convert_ldm_unet_checkpoint` (layers_per_block =
    num_res_blocks); A1111's `networks.py` `convert_diffusers_name_to_compvis` is the inverse for SD1 only (B = 3).
    Raises ValueError for any other name.
    """
    b = num_res_blocks + 1
    m = re.match(r"^input_blocks\.(\d+)\.1\.(.+)$", name)
    if m and int(m[1]) >= 1 and (int(m[1]) - 1) % b < num_res_blocks:
        i, j = divmod(int(m[1]) - 1, b)
        return f"down_blocks.{i}.attentions.{j}.{m[2]}"
    m = re.match(r"^middle_block\.1\.(.+)$", name)
    if m:
        return f"mid_block.attentions.0.{m[1]}"
    m = re.match(r"^output_blocks\.(\d+)\.1\.(.+)$", name)
    if m:
        i, j = divmod(int(m[1]), b)
        return f"up_blocks.{i}.attentions.{j}.{m[2]}"
    raise ValueError(f"name={name!r} is not a SpatialTransformer module of an LDM UNet with "
                     f"num_res_blocks={num_res_blocks} (input_blocks.N.1.*, middle_block.1.*, output_blocks.N.1.*)")


def kohya_unet_key(name: str, num_res_blocks: int) -> str:
    """LDM UNet module name -> kohya LoRA module key, e.g. input_blocks.1.1.proj_in -> lora_unet_down_blocks_0_
    attentions_0_proj_in (kohya `networks/lora.py`: prefix "lora_unet" + "_" + diffusers name with "." -> "_")."""
    return "lora_unet_" + ldm_to_diffusers_unet_name(name, num_res_blocks).replace(".", "_")


def kohya_te_key(layer: int, part: str) -> str:
    """(open_clip resblock index, TE_PARTS key) -> kohya key, e.g. (0, "attn.q") ->
    lora_te_text_model_encoder_layers_0_self_attn_q_proj (transformers CLIPTextModel names, kohya prefix lora_te)."""
    if part not in TE_PARTS:
        raise ValueError(f"part={part!r}; allowed: {sorted(TE_PARTS)}")
    return f"lora_te_text_model_encoder_layers_{layer}_" + TE_PARTS[part].replace(".", "_")


# ---- the low-rank factors -----------------------------------------------------------------------------------------

class LoraDelta(torch.nn.Module):
    """A parametrization W -> W + (alpha / rank) * (up @ down).view(W.shape) for a Linear [out, in] or a 1x1 Conv2d
    [out, in, 1, 1] weight, or for `rows` (a slice of the output rows) of a packed weight such as
    MultiheadAttention's in_proj_weight [3W, W]. (A forward hook adding up(down(x)) was not measurably faster on
    this CPU: the frozen weight's gradient costs about as much as the extra activations.)

    down [rank, in] is initialised as kohya does (`kaiming_uniform_(a=sqrt(5))`, from `generator`), up [out, rank]
    to zero, so the adapted model starts equal to the base.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator,
                 rows: tuple[int, int] | None = None, device=None, dtype=torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank}; allowed: an integer >= 1")
        self.down = torch.nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        torch.nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.rank, self.alpha, self.rows = rank, float(alpha), rows

    def delta(self) -> torch.Tensor:
        return (self.alpha / self.rank) * (self.up @ self.down)  # [out, in]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        d = self.delta()
        if self.rows is None:
            return weight + d.view(weight.shape)
        lo, hi = self.rows
        return torch.cat([weight[:lo], weight[lo:hi] + d, weight[hi:]])


class PackedDelta(torch.nn.Module):
    """Several LoraDelta on disjoint row ranges of one weight (the q, k, v parts of in_proj_weight)."""

    def __init__(self, parts: list[LoraDelta]):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            weight = part(weight)
        return weight


def unet_targets(unet: torch.nn.Module) -> list[str]:
    """LDM names of the UNet modules the LoRA adapts (UNET_TARGET), in module order."""
    names = [n for n, m in unet.named_modules() if UNET_TARGET.match(n)]
    for n in names:
        m = unet.get_submodule(n)
        if not (isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1))):
            raise TypeError(f"{n} is a {type(m).__name__}, not a Linear or 1x1 Conv2d")
    if not names:
        raise ValueError("the UNet has no SpatialTransformer modules to adapt")
    return names


def attach(unet: torch.nn.Module, te: torch.nn.Module | None, cfg: LoraTrainConfig, num_res_blocks: int,
           generator: torch.Generator) -> dict[str, LoraDelta]:
    """Register LoraDelta parametrizations on the UNet targets and, if cfg.te_rank, the text encoder's
    in_proj_weight (q, k, v rows), out_proj, c_fc and c_proj. Returns {kohya key: LoraDelta}; the base weights are
    frozen (requires_grad False), never changed, and kept in `module.parametrizations.<name>.original`;
    `detach_all` removes the parametrizations again.
    """
    unet.requires_grad_(False)
    deltas: dict[str, LoraDelta] = {}
    for name in unet_targets(unet):
        module = unet.get_submodule(name)
        out_f, in_f = module.weight.shape[:2]
        d = LoraDelta(out_f, in_f, cfg.rank, cfg.alpha, generator, device=module.weight.device)
        parametrize.register_parametrization(module, "weight", d)
        deltas[kohya_unet_key(name, num_res_blocks)] = d
    if te is not None and cfg.te_rank:
        te.requires_grad_(False)
        for layer, block in enumerate(te.transformer.resblocks):
            width = block.attn.out_proj.weight.shape[0]
            qkv = []
            for k, part in enumerate("qkv"):
                d = LoraDelta(width, width, cfg.te_rank, cfg.te_alpha, generator, rows=(k * width, (k + 1) * width))
                qkv.append(d)
                deltas[kohya_te_key(layer, f"attn.{part}")] = d
            parametrize.register_parametrization(block.attn, "in_proj_weight", PackedDelta(qkv))
            for part in ("attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
                module = block.get_submodule(part)
                out_f, in_f = module.weight.shape
                d = LoraDelta(out_f, in_f, cfg.te_rank, cfg.te_alpha, generator)
                parametrize.register_parametrization(module, "weight", d)
                deltas[kohya_te_key(layer, part)] = d
    return deltas


def detach_all(*modules: torch.nn.Module) -> None:
    """Remove every parametrization, leaving the original (unchanged) weights."""
    for root in modules:
        for module in list(root.modules()):
            if parametrize.is_parametrized(module):
                for tensor_name in list(module.parametrizations.keys()):
                    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)


def kohya_state_dict(deltas: dict[str, LoraDelta], conv_keys: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{kohya key: LoraDelta} -> the file's tensors: <key>.lora_down.weight [rank, in] (or [rank, in, 1, 1] for
    the 1x1 convolutions in `conv_keys`), <key>.lora_up.weight [out, rank] (or [out, rank, 1, 1]), <key>.alpha (a
    0-dim tensor, as kohya writes it)."""
    out = {}
    for key, d in deltas.items():
        down, up = d.down.detach(), d.up.detach()
        if key in conv_keys:
            down, up = down[:, :, None, None], up[:, :, None, None]
        out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(d.alpha, dtype=dtype)
    return out


# ---- data ---------------------------------------------------------------------------------------------------------

def make_scenes(seed: int, n: int, shapes: tuple[str, ...], stream: int, photo_p: float = 0.25
                ) -> tuple[np.ndarray, list[str]]:
    """`n` scenes from `tiny_data.sample_scene(rng, photo_p, shapes=shapes)` with rng = default_rng([seed, 20,
    stream]): (uint8 [n, 64, 64, 3], captions)."""
    rng = np.random.default_rng([seed, 20, stream])
    pairs = [tiny_data.sample_scene(rng, photo_p, shapes=shapes) for _ in range(n)]
    return np.stack([im for im, _ in pairs]), [sc.caption() for _, sc in pairs]


@torch.no_grad()
def prepare_data(sd, cfg: LoraTrainConfig, path: Path) -> dict:
    """Encode the training scenes once (VAE posterior mean and std; every step draws a fresh latent sample, as
    train_tiny does) and tokenize their captions; cached at `path` (written atomically) with its CPU seconds."""
    if path.exists():
        return torch.load(path, weights_only=True)
    t0 = time.process_time()
    star_images, star_captions = make_scenes(cfg.seed, cfg.n_star, (CONCEPT,), 0, cfg.star_photo_p)
    base_images, base_captions = make_scenes(cfg.seed, cfg.n_base, tiny_data.SHAPES, 1)
    images = np.concatenate([star_images, base_images])
    means, stds = [], []
    for i in range(0, len(images), 256):
        posterior = sd.vae.encode(train_tiny.to_tensor(images[i:i + 256]).to(sd.device, sd.vae_dtype))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    texts = [""] + sorted(set(star_captions + base_captions))
    index = {t: i for i, t in enumerate(texts)}
    data = dict(mean=torch.cat(means), std=torch.cat(stds),
                caption_ids=torch.tensor([index[c] for c in star_captions + base_captions]),
                n_star=torch.tensor(cfg.n_star), tokens=train_tiny.caption_tokens(sd.tokenizer, texts),
                texts=json.dumps(texts), cpu_seconds=torch.tensor(time.process_time() - t0, dtype=torch.float64))
    train_tiny.save_state(path, **data)
    return data


# ---- training -----------------------------------------------------------------------------------------------------

def load_tiny(ckpt: Path = CKPT, device="cpu", dtype=torch.float32):
    from sdcore.checkpoint import load_checkpoint

    sd = load_checkpoint(ckpt, device=device, dtype=dtype)
    if sd.family.name != "tiny":
        raise SystemExit(f"{ckpt} is detected as family {sd.family.name!r}, not 'tiny'")
    return sd


class Interrupted(RuntimeError):
    """`train(..., stop_at=N)` stopped after saving the state of step N (a simulated interruption, for tests)."""


def train(cfg: LoraTrainConfig, workdir: Path, out: Path, ckpt: Path = CKPT, device="cpu",
          log=print, stop_at: int | None = None) -> dict:
    """Run (or resume, from `workdir`) training and write the LoRA to `out` (atomically). Returns a summary with
    the CPU seconds (time.process_time, summed over resumed runs) of data preparation and training.

    Raises SystemExit when `workdir` holds the state of another configuration, Interrupted after step `stop_at`."""
    workdir.mkdir(parents=True, exist_ok=True)
    sd = load_tiny(ckpt, device)
    unet, te = sd.unet.train(), sd.text_encoders[0]
    data = prepare_data(sd, cfg, workdir / "data.pt")
    nrb = sd.family.unet.num_res_blocks
    deltas = attach(unet, te, cfg, nrb, torch.Generator().manual_seed(cfg.seed))
    params = [p for d in deltas.values() for p in d.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    state_path = workdir / "lora_state.pt"
    start, cpu_before = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        if state["config"] != json.dumps(asdict(cfg)):
            raise SystemExit(f"{state_path} was made with another configuration; use another --workdir")
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
            for e, v in zip(ema, state["ema"]):
                e.copy_(v)
        opt.load_state_dict(state["opt"])
        start, cpu_before = int(state["step"]), float(state["cpu_seconds"])
        log(f"resumed at step {start} ({cpu_before / 60:.2f} CPU-minutes so far)")

    scale = sd.family.vae.scale_factor
    alphas = sd.alphas_cumprod.double().cpu()
    snr = alphas / (1 - alphas)
    weights = (torch.clamp(snr, max=cfg.min_snr_gamma) / snr).float()
    sqrt_a, sqrt_1ma = alphas.sqrt().float(), (1 - alphas).sqrt().float()
    mean, std, caption_ids, tokens = data["mean"], data["std"], data["caption_ids"], data["tokens"]
    n_star, n_all = int(data["n_star"]), mean.shape[0]
    frozen_hidden = None
    if not cfg.te_rank:
        with torch.no_grad():
            frozen_hidden = torch.cat([te(tokens[i:i + 128].to(sd.device)).hidden for i in range(0, len(tokens), 128)])

    t0 = time.process_time()
    for step in range(start, cfg.steps):
        gen = train_tiny.step_generator(cfg.seed, 21, step)
        n_s = round(cfg.batch * cfg.star_fraction)
        idx = torch.cat([torch.randint(0, n_star, (n_s,), generator=gen),
                         torch.randint(n_star, n_all, (cfg.batch - n_s,), generator=gen)])
        x0 = train_tiny.posterior_latents(mean, std, idx, scale, gen)
        ids = train_tiny.drop_captions(caption_ids, idx, cfg.uncond_p, gen)
        t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = train_tiny.q_sample(x0, t, eps, sqrt_a, sqrt_1ma)
        context = frozen_hidden[ids] if frozen_hidden is not None else te(tokens[ids].to(sd.device)).hidden
        pred = unet(xt.to(sd.device), t.float().to(sd.device), context=context).float().cpu()
        per_sample = (pred - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        lr = train_tiny.lr_at(step, cfg.steps, cfg.lr, warmup=cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        if step % 50 == 0 or step + 1 == cfg.steps:
            log(f"step {step:5d}  loss {loss.item():.4f}  mse {per_sample.mean().item():.4f}  lr {lr:.2e}  "
                f"cpu {(cpu_before + time.process_time() - t0) / 60:.2f} min")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            train_tiny.save_state(state_path, params=[p.detach() for p in params], ema=ema, opt=opt.state_dict(),
                                  step=step + 1, cpu_seconds=cpu_before + time.process_time() - t0,
                                  config=json.dumps(asdict(cfg)))
        if stop_at is not None and step + 1 == stop_at:
            detach_all(unet, te)
            raise Interrupted(f"stopped after step {stop_at}; the state is in {state_path}")
    train_cpu = cpu_before + time.process_time() - t0
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    conv_keys = {kohya_unet_key(n, nrb) for n in unet_targets(unet)
                 if isinstance(unet.get_submodule(n), torch.nn.Conv2d)}
    tensors = kohya_state_dict(deltas, conv_keys, torch.float16)
    detach_all(unet, te)
    summary = dict(data_cpu_minutes=round(float(data["cpu_seconds"]) / 60, 2),
                   train_cpu_minutes=round(train_cpu / 60, 2),
                   total_cpu_minutes=round((float(data["cpu_seconds"]) + train_cpu) / 60, 2),
                   modules=len(deltas), tensors=len(tensors))
    write_lora(out, tensors, cfg, summary)
    summary["file_bytes"] = out.stat().st_size
    return summary


def write_lora(out: Path, tensors: dict[str, torch.Tensor], cfg: LoraTrainConfig, summary: dict) -> None:
    """Write the safetensors file atomically (temporary name beside it, then os.replace), with kohya's `ss_*`
    metadata keys that A1111 displays and this run's configuration."""
    from safetensors.torch import save_file

    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
                "ss_network_alpha": str(cfg.alpha), "ss_output_name": out.stem, "ss_base_model_version": "sd_v1",
                "ss_training_comment": f"sdcore tiny model '{CONCEPT}' LoRA, scripts/train_lora_tiny.py",
                "sdcore_train_config": json.dumps(asdict(cfg)), "sdcore_train_summary": json.dumps(summary)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # package data: readable like the tiny model (the temporary file may be created 0600)
    os.replace(tmp, out)


# ---- applying the file (for evaluation) -------------------------------------------------------------------------

@contextlib.contextmanager
def merged(sd, lora_path: Path | None, multiplier: float = 1.0):
    """Apply the LoRA file to `sd` for the duration of the block; no-op when `lora_path` is None.

    Uses `sdcore.networks` (`load_network`, `applied`) when it exists; otherwise `own_merge` (this script's own
    kohya-layout merge). Yields the name of the route taken.
    """
    if lora_path is None:
        yield "none"
        return
    try:
        from sdcore import networks
    except ImportError:
        networks = None
    if networks is not None:
        net = networks.load_network(lora_path, sd)
        with networks.applied(sd, [(net, multiplier, multiplier)]):
            yield "sdcore.networks"
        return
    with own_merge(sd, lora_path, multiplier):
        yield "own_merge"


@contextlib.contextmanager
def own_merge(sd, lora_path: Path, multiplier: float = 1.0):
    """This script's merge of a kohya file written by `write_lora`: W += multiplier * alpha / rank * up @ down for
    every module, by inverting `kohya_unet_key` / `kohya_te_key` over the model's own module names (any key left
    over is an error); the original weights are copied back afterwards."""
    from safetensors.torch import load_file

    tensors = load_file(str(lora_path))
    nrb = sd.family.unet.num_res_blocks
    te = sd.text_encoders[0]
    targets: dict[str, tuple[torch.nn.Module, str, tuple[int, int] | None]] = {}
    for name in unet_targets(sd.unet):
        targets[kohya_unet_key(name, nrb)] = (sd.unet.get_submodule(name), "weight", None)
    for layer, block in enumerate(te.transformer.resblocks):
        width = block.attn.out_proj.weight.shape[0]
        for k, part in enumerate("qkv"):
            targets[kohya_te_key(layer, f"attn.{part}")] = (block.attn, "in_proj_weight", (k * width, (k + 1) * width))
        for part in ("attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            targets[kohya_te_key(layer, part)] = (block.get_submodule(part), "weight", None)
    keys = sorted({k.split(".", 1)[0] for k in tensors})
    unknown = [k for k in keys if k not in targets]
    if unknown:
        raise ValueError(f"{lora_path}: LoRA keys that match no module of the tiny model: {unknown}")
    backups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one copy per tensor (q, k, v share in_proj_weight)
    try:
        with torch.no_grad():
            for key in keys:
                module, attr, rows = targets[key]
                weight = getattr(module, attr)
                down = tensors[f"{key}.lora_down.weight"].flatten(1).to(weight.device, torch.float32)
                up = tensors[f"{key}.lora_up.weight"].flatten(1).to(weight.device, torch.float32)
                alpha = float(tensors[f"{key}.alpha"])
                delta = (multiplier * alpha / down.shape[0] * (up @ down)).to(weight.dtype)
                backups.setdefault(id(weight), (weight, weight.detach().clone()))
                view = weight if rows is None else weight[rows[0]:rows[1]]
                view += delta.view(view.shape)
        yield
    finally:
        with torch.no_grad():
            for weight, original in backups.values():
                weight.copy_(original)


# ---- evaluation ---------------------------------------------------------------------------------------------------

def eval_prompts(n: int) -> list[str]:
    """"a {colour} star" for seeds 0..n-1, the colour cycling through tiny_data.PALETTE."""
    colours = list(tiny_data.PALETTE)
    return [f"a {colours[i % len(colours)]} {CONCEPT}" for i in range(n)]


def txt2img(sd, prompts: list[str], seed: int = 0, batch_size: int = 10) -> np.ndarray:
    """txt2img through `sdcore.process_images` with eval_tiny.txt2img's settings (DPM++ 2M Karras, 20 steps, CFG 6,
    64 x 64), image i with seed `seed + i`: uint8 [N, 64, 64, 3]."""
    import sdcore

    if len(prompts) % batch_size:
        raise ValueError(f"len(prompts)={len(prompts)} must be a multiple of batch_size={batch_size}")
    p = sdcore.StableDiffusionProcessingTxt2Img(
        sd_model=sd, prompt=prompts, seed=seed, batch_size=batch_size, n_iter=len(prompts) // batch_size,
        sampler_name="DPM++ 2M", scheduler="karras", steps=20, cfg_scale=6.0, width=64, height=64,
        do_not_save_samples=True)
    processed = sdcore.process_images(p, disable_progress=True)
    if processed.seeds != list(range(seed, seed + len(prompts))):
        raise RuntimeError(f"unexpected seeds {processed.seeds}")
    return np.stack([np.asarray(im.convert("RGB")) for im in processed.images])


def star_rate(images: np.ndarray) -> float:
    return float(np.mean([tiny_data.detect_star(im) for im in images]))


def large_scenes(seed: int, n: int, shapes: tuple[str, ...], photo: bool) -> np.ndarray:
    """`n` scenes without a position (the kind "a {colour} star" asks for), on plain named backgrounds or (photo)
    on photo crops of the held-out split: uint8 [n, 64, 64, 3]."""
    rng = np.random.default_rng([seed, 22, int(photo), len(shapes)])
    out = []
    while len(out) < n:
        image, scene = tiny_data.sample_scene(rng, photo_background_p=1.0 if photo else 0.0, photo_split="eval",
                                              shapes=shapes)
        if scene.position is None and scene.photo_background == photo:
            out.append(image)
    return np.stack(out)


def eval_detector(sd, n: int = 200, seed: int = 4321) -> dict:
    """How `tiny_data.detect_star` reads VAE reconstructions (decode(encode(x).mode()), what a generated image can
    be at best) of true scenes without a position: stars and the four base shapes, plain and photo backgrounds."""
    import eval_tiny

    out = {}
    for label, shapes in (("stars", (CONCEPT,)), ("base_shapes", tiny_data.SHAPES)):
        for photo in (False, True):
            recon = eval_tiny.vae_roundtrip(sd.vae, large_scenes(seed, n, shapes, photo))
            out[f"detector_{label}_{'photo' if photo else 'plain'}_read_as_star"] = star_rate(recon)
    return out


def evaluate(sd, lora_path: Path, n: int = 50, base_shapes: bool = True) -> dict:
    """The card's metric: share of `n` seeds (0..n-1) whose "a {colour} star" image `tiny_data.detect_star` reads
    as a star, without and with the LoRA at weight 1; also the colour accuracy (tiny_data.detect_scene) and, with
    `base_shapes`, eval_tiny's 50 "a {colour} {shape}" prompts' shape accuracy with and without the LoRA."""
    prompts = eval_prompts(n)
    colours = [p.split()[1] for p in prompts]
    out: dict = {"seeds": n}
    for label, path in (("base", None), ("lora", lora_path)):
        t = time.time()
        with merged(sd, path) as route:
            images = txt2img(sd, prompts)
            out[f"{label}_star_rate"] = star_rate(images)
            out[f"{label}_colour_acc"] = float(np.mean([tiny_data.detect_scene(im).colour == c
                                                        for im, c in zip(images, colours)]))
            if base_shapes:
                import eval_tiny

                pairs = eval_tiny.eval_prompts()
                shapes = txt2img(sd, [f"a {c} {s}" for c, s in pairs])
                out[f"{label}_base_shape_acc"] = float(np.mean([tiny_data.detect_scene(im).shape == s
                                                                for im, (_, s) in zip(shapes, pairs)]))
                out[f"{label}_base_shapes_read_as_star"] = star_rate(shapes)
        if path is not None:
            out["route"] = route
        out[f"{label}_seconds"] = round(time.time() - t, 1)
    return out


# ---- gallery ------------------------------------------------------------------------------------------------------

def gallery(sd, lora_path: Path, out: Path, seeds: int = 8, zoom: int = 2) -> Path:
    """A PNG with the base model's "a {colour} star" images (top row) and the LoRA's (bottom row), same seeds
    0..seeds-1, each 64 px image enlarged `zoom` x (nearest), a label column on the left. Written atomically."""
    from PIL import Image, ImageDraw

    prompts = eval_prompts(seeds)
    rows = []
    for path in (None, lora_path):
        with merged(sd, path):
            rows.append(txt2img(sd, prompts, batch_size=seeds))
    cell = 64 * zoom
    label_w = 60
    sheet = Image.new("RGB", (label_w + cell * seeds, cell * 2), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (images, label) in enumerate(zip(rows, ("base", "+ LoRA"))):
        draw.text((6, r * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        for c, im in enumerate(images):
            sheet.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (label_w + c * cell, r * cell))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--eval", action="store_true", help="print the metric of --lora (50 seeds, with and without)")
    mode.add_argument("--gallery", action="store_true", help="write the base-vs-LoRA image to --gallery-out")
    ap.add_argument("--ckpt", type=Path, default=CKPT)
    ap.add_argument("--lora", type=Path, default=LORA, help="the LoRA file to evaluate / show")
    ap.add_argument("--out", type=Path, default=LORA, help="where training writes the LoRA")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "tiny_lora")
    ap.add_argument("--gallery-out", type=Path, default=GALLERY)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None, help="also write the --eval metrics here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 or 2; 1 is fastest on a shared CPU)")
    for f in LoraTrainConfig.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    if args.threads not in (1, 2):
        ap.error(f"--threads {args.threads}; allowed: 1 or 2")
    torch.set_num_threads(args.threads)
    if args.eval or args.gallery:
        sd = load_tiny(args.ckpt)
        if args.gallery:
            print(f"wrote {gallery(sd, args.lora, args.gallery_out)}")
            return
        metrics = evaluate(sd, args.lora, args.seeds)
        metrics.update(eval_detector(sd))
        print(json.dumps(metrics, indent=1))
        if args.json:
            args.json.write_text(json.dumps(metrics, indent=1) + "\n")
        return
    cfg = LoraTrainConfig(**{k: getattr(args, k) for k in LoraTrainConfig.__dataclass_fields__})
    summary = train(cfg, args.workdir, args.out, args.ckpt)
    print(json.dumps(summary, indent=1))
    print(f"training CPU time: {summary['total_cpu_minutes']:.2f} minutes (data {summary['data_cpu_minutes']:.2f}, "
          f"steps {summary['train_cpu_minutes']:.2f}); wrote {args.out} ({summary['file_bytes'] / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
