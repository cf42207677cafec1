"""The KL autoencoder (VAE) of Stable Diffusion, with the module names of the LDM checkpoints.

Source of every formula and name: CompVis/stable-diffusion `ldm/models/autoencoder.py` (`AutoencoderKL`),
`ldm/modules/diffusionmodules/model.py` (`Encoder`, `Decoder`, `ResnetBlock`, `AttnBlock`, `Downsample`,
`Upsample`, `Normalize`, `nonlinearity`) and `ldm/modules/distributions/distributions.py`
(`DiagonalGaussianDistribution`). Parameter names equal the keys under `first_stage_model.`.

Glossary: B batch, H/W pixels, h/w latent cells (H / 2**(levels-1), 8x smaller for SD), z latent channels.
The SD scale factor (0.18215) is applied by the caller, never here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdcore.families import VAEConfig

GROUPS = 32


def _norm(channels: int, device=None, dtype=None) -> nn.GroupNorm:
    """LDM model.py `Normalize`: GroupNorm(32, C, eps=1e-6, affine) in the input dtype."""
    return nn.GroupNorm(GROUPS, channels, eps=1e-6, device=device, dtype=dtype)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int | None = None,
          device=None, dtype=None) -> nn.Conv2d:
    padding = kernel // 2 if padding is None else padding
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, device=device, dtype=dtype)


class ResnetBlock(nn.Module):
    """`nin_shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))` (LDM model.py `ResnetBlock`, temb_channels=0).

    `nin_shortcut` is a 1x1 conv present only when the channel count changes.
    x: [B, C_in, H, W] -> [B, C_out, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = _norm(in_channels, **kw)
        self.conv1 = _conv(in_channels, out_channels, 3, **kw)
        self.norm2 = _norm(out_channels, **kw)
        self.conv2 = _conv(out_channels, out_channels, 3, **kw)
        if in_channels != out_channels:
            self.nin_shortcut = _conv(in_channels, out_channels, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, q/k/v/proj_out as 1x1 convs (LDM model.py `AttnBlock`).

    Softmax scale 1/sqrt(C). x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm = _norm(channels, **kw)
        self.q = _conv(channels, channels, 1, **kw)
        self.k = _conv(channels, channels, 1, **kw)
        self.v = _conv(channels, channels, 1, **kw)
        self.proj_out = _conv(channels, channels, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head of width C. Contiguous, so that torch's CPU flash kernel runs in
        # O(H*W) memory; strided q/k/v make it materialise the (H*W)^2 scores (sdcore.resources)
        q, k, v = (t(x_norm).flatten(2).transpose(1, 2)[:, None].contiguous() for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right and bottom by one zero, then a 3x3 conv with stride 2, no padding (LDM model.py `Downsample`).

    The asymmetric pad (0, 1, 0, 1) is LDM's. x: [B, C, H, W] -> [B, C, H/2, W/2] for even H, W.
    """

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = _conv(channels, channels, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv (LDM model.py `Upsample`). x: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = _conv(channels, channels, 3, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), optional `downsample` / `upsample` (LDM's nn.Module() bags)."""


class _Mid(nn.Module):
    """`block_1`, `attn_1`, `block_2` at the lowest resolution (LDM model.py `Encoder.mid` / `Decoder.mid`)."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, device=device, dtype=dtype)
        self.attn_1 = AttnBlock(channels, device=device, dtype=dtype)
        self.block_2 = ResnetBlock(channels, channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """LDM model.py `Encoder` with double_z=True and no attention outside the middle block (SD's attn_resolutions=[]).

    Keys: conv_in, down.N.block.M, down.N.downsample.conv (all levels but the last), mid.*, norm_out, conv_out.
    x: [B, in_channels, H, W] -> moments [B, 2*z_channels, H/2**(L-1), W/2**(L-1)] (L = len(ch_mult)).
    """

    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.conv_in = _conv(config.in_channels, config.ch, 3, **kw)
        self.down = nn.ModuleList()
        block_in = config.ch
        for level, mult in enumerate(config.ch_mult):
            block_out = config.ch * mult
            stage = _Level()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, **kw))
                block_in = block_out
            if level != len(config.ch_mult) - 1:
                stage.downsample = Downsample(block_in, **kw)
            self.down.append(stage)
        self.mid = _Mid(block_in, **kw)
        self.norm_out = _norm(block_in, **kw)
        self.conv_out = _conv(block_in, 2 * config.z_channels, 3, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """LDM model.py `Decoder` (no tanh, no attention outside the middle block).

    `up` is indexed like the encoder's `down` (up.0 is the full-resolution level) but run from the last index to
    0, as LDM builds it with `self.up.insert(0, up)`. Each level has num_res_blocks + 1 ResnetBlocks and, except
    level 0, an `upsample`. z: [B, z_channels, h, w] -> [B, out_ch, h*2**(L-1), w*2**(L-1)].
    """

    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        block_in = config.ch * config.ch_mult[-1]
        self.conv_in = _conv(config.z_channels, block_in, 3, **kw)
        self.mid = _Mid(block_in, **kw)
        levels = []
        for level in reversed(range(len(config.ch_mult))):
            block_out = config.ch * config.ch_mult[level]
            stage = _Level()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, **kw))
                block_in = block_out
            if level != 0:
                stage.upsample = Upsample(block_in, **kw)
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, **kw)
        self.conv_out = _conv(block_in, config.out_ch, 3, **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """The encoder's posterior N(mean, exp(logvar)) per latent cell (LDM distributions.py).

    Args:
        moments: [B, 2*z, h, w]; the first z channels are the mean, the rest the log-variance.
    Fields: mean, logvar (clamped to [-30, 20] as LDM does), std = exp(logvar / 2), var = exp(logvar); all
    [B, z, h, w] in moments' dtype.
    """

    def __init__(self, moments: torch.Tensor):
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise ValueError(f"moments must be [B, 2*z, h, w], got {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """`mean + std * eps`, eps ~ N(0, I) drawn from `generator` (on the mean's device). -> [B, z, h, w].

        The generator is required: package code never draws from the global torch RNG. Raises TypeError otherwise.
        """
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.sample_from(eps)

    def sample_from(self, eps: torch.Tensor) -> torch.Tensor:
        """`mean + std * eps` for a given N(0, I) draw `eps` [B, z, h, w] (the reparameterisation of Kingma &
        Welling 2014). Raises ValueError when eps's shape differs from the mean's."""
        if eps.shape != self.mean.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} differs from the posterior's {tuple(self.mean.shape)}")
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The mean, [B, z, h, w]."""
        return self.mean


class AutoencoderKL(nn.Module):
    """SD's VAE: `encode` pixels to a DiagonalGaussianDistribution, `decode` unscaled latents to pixels.

    Keys: encoder.*, decoder.*, quant_conv (1x1, 2z -> 2*embed_dim), post_quant_conv (1x1, embed_dim -> z).
    Parameters are created on `device`/`dtype` ("meta" + `load_state_dict(assign=True)` loads without init).
    Source: LDM autoencoder.py `AutoencoderKL.encode` / `decode`.
    """

    def __init__(self, config: VAEConfig, device=None, dtype=None):
        super().__init__()
        if config.ch % GROUPS:
            raise ValueError(f"VAE ch={config.ch} must be a multiple of {GROUPS} (GroupNorm groups)")
        kw = dict(device=device, dtype=dtype)
        self.config = config
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = _conv(2 * config.z_channels, 2 * config.embed_dim, 1, **kw)
        self.post_quant_conv = _conv(config.embed_dim, config.z_channels, 1, **kw)

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each axis: 2 ** (levels - 1) (8 for SD)."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def check_pixels(self, x: torch.Tensor) -> None:
        """ValueError unless x is [B, in_channels, H, W] with H and W divisible by `downscale` (what `encode` takes)."""
        f = self.downscale
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x must be [B, {self.config.in_channels}, H, W] with H, W divisible by {f}, "
                             f"got {tuple(x.shape)}")

    def check_latent(self, z: torch.Tensor) -> None:
        """ValueError unless z is [B, embed_dim, h, w] (what `decode` takes)."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"z must be [B, {self.config.embed_dim}, h, w], got {tuple(z.shape)}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x: [B, in_channels, H, W] in [-1, 1], H and W divisible by `downscale` -> posterior over
        [B, embed_dim, H/downscale, W/downscale]. Raises ValueError on a wrong shape."""
        self.check_pixels(x)
        dtype = self.quant_conv.weight.dtype
        return DiagonalGaussianDistribution(
            self.quant_conv(self.encoder(x.to(dtype))).contiguous(memory_format=torch.contiguous_format))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, embed_dim, h, w] unscaled latent (already divided by scale_factor) -> [B, out_ch, h*f, w*f],
        roughly in [-1, 1] (not clipped). Raises ValueError on a wrong shape."""
        self.check_latent(z)
        dtype = self.post_quant_conv.weight.dtype
        return self.decoder(self.post_quant_conv(z.to(dtype))).contiguous(memory_format=torch.contiguous_format)
