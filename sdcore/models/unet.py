"""The Stable Diffusion denoising UNet, with the module names of the LDM checkpoints.

Source of every formula and name: CompVis/stable-diffusion `ldm/modules/diffusionmodules/openaimodel.py`
(`UNetModel`, `ResBlock`, `Downsample`, `Upsample`, `TimestepEmbedSequential`), `ldm/modules/attention.py`
(`SpatialTransformer`, `BasicTransformerBlock`, `CrossAttention`, `FeedForward`, `GEGLU`) and
`ldm/modules/diffusionmodules/util.py` (`timestep_embedding`, `GroupNorm32`); SDXL's `label_emb` and per-level
`transformer_depth` from Stability-AI/generative-models `sgm/modules/diffusionmodules/openaimodel.py`.
Parameter names equal the keys under `model.diffusion_model.` so a checkpoint loads with `strict=True`.

Glossary: B batch, C channels, h/w latent cells (pixels / 8), T context tokens (77 per prompt chunk),
D context width (UNetConfig.context_dim), E time-embedding width (4 * model_channels).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdcore.families import UNetConfig

GROUPS = 32  # LDM `normalization(channels)` = GroupNorm32(32, channels)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """`torch.channels_last` when the 4-D `x` is laid out channels-last (and not also plain contiguous, as a
    tensor with one channel or one cell is), else `torch.contiguous_format`."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: `cat([cos(t * f), sin(t * f)])`.

    Frequencies `f_i = max_period ** (-i / (dim // 2))`, i = 0 .. dim//2 - 1; an odd `dim` gets a zero last column.
    Source: LDM `ldm/modules/diffusionmodules/util.py` `timestep_embedding` (cos first, then sin).

    Args:
        timesteps: [B] DDPM timesteps, any real dtype; continuous values such as 412.7 are allowed.
        dim: embedding width (the UNet uses model_channels).
    Returns:
        [B, dim] float32.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C, eps=1e-5) computed in float32 and cast back to the input dtype (LDM util.py `GroupNorm32`)."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__(GROUPS, channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _conv3x3(c_in: int, c_out: int, stride: int = 1, *, device=None, dtype=None) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, device=device, dtype=dtype)


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding (LDM openaimodel.py `ResBlock`, use_scale_shift_norm=False).

    `out = skip_connection(x) + out_layers(in_layers(x) + emb_layers(emb)[:, :, None, None])`.
    Keys: in_layers.0 (norm), in_layers.2 (conv), emb_layers.1 (Linear), out_layers.0 (norm), out_layers.3 (conv),
    skip_connection (1x1 conv when the channel count changes, else Identity with no keys).
    x: [B, C_in, h, w], emb: [B, E] -> [B, C_out, h, w].
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_layers = nn.Sequential(GroupNorm32(channels, **kw), nn.SiLU(), _conv3x3(channels, out_channels, **kw))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels, **kw))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels, **kw), nn.SiLU(), nn.Dropout(0.0),
                                        _conv3x3(out_channels, out_channels, **kw))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1, **kw)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (self-attention when context is None).

    LDM attention.py `CrossAttention`: to_q/to_k/to_v without bias, to_out.0 Linear with bias, softmax scale
    1/sqrt(dim_head) (the default of `scaled_dot_product_attention`).
    x: [B, N, query_dim], context: [B, T, context_dim] | None -> [B, N, query_dim].
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False, **kw)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **kw)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **kw)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim, **kw), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, _ = q.shape
        # (B, N, heads*dh) -> (B, heads, N, dh)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, heads*dh)
        return self.to_out(out)


class GEGLU(nn.Module):
    """`a * gelu(g)` where `[a, g] = proj(x).chunk(2)` (LDM attention.py `GEGLU`; Shazeer 2020, GLU variants).

    x: [B, N, dim_in] -> [B, N, dim_out].
    """

    def __init__(self, dim_in: int, dim_out: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width (LDM attention.py `FeedForward`, glu=True): keys net.0.proj, net.2.

    x: [B, N, dim] -> [B, N, dim].
    """

    def __init__(self, dim: int, mult: int = 4, device=None, dtype=None):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner, device=device, dtype=dtype), nn.Dropout(0.0),
                                 nn.Linear(inner, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each residual (LDM `BasicTransformerBlock`).

    x: [B, N, dim], context: [B, T, D] -> [B, N, dim].
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.attn1 = CrossAttention(dim, heads, dim_head, **kw)
        self.ff = FeedForward(dim, **kw)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, **kw)
        self.norm1 = nn.LayerNorm(dim, **kw)
        self.norm2 = nn.LayerNorm(dim, **kw)
        self.norm3 = nn.LayerNorm(dim, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the h*w latent cells, conditioned on text (LDM attention.py `SpatialTransformer`).

    `norm` is GroupNorm(32, C, eps=1e-6) in the input dtype (not GroupNorm32). `proj_in`/`proj_out` are 1x1 convs
    (SD1) or Linear layers applied after flattening (SD2/SDXL, `use_linear`); both map C <-> heads * dim_head.
    x: [B, C, h, w], context: [B, T, D] -> [B, C, h, w].
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6, **kw)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner, **kw)
            self.proj_out = nn.Linear(inner, channels, **kw)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1, **kw)
            self.proj_out = nn.Conv2d(inner, channels, 1, **kw)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, **kw) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # Tokens contiguous (B, h*w, C'): free views in and out when x is channels_last, else one copy each way
        # instead of a copy in every LayerNorm and strided residual adds in every block.
        x = x.flatten(2).transpose(1, 2).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=memory_format_of(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    """3x3 conv with stride 2, padding 1 (LDM openaimodel.py `Downsample`, conv_resample=True). Key: `op`.

    x: [B, C, h, w] -> [B, C, ceil(h/2), ceil(w/2)].
    """

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.op = _conv3x3(channels, channels, stride=2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling then a 3x3 conv (LDM openaimodel.py `Upsample`). Key: `conv`.

    x: [B, C, h, w] -> [B, C, 2h, 2w].
    """

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = _conv3x3(channels, channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that passes `emb` to ResBlocks and `context` to SpatialTransformers (LDM openaimodel.py)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def attention_heads(config: UNetConfig, channels: int) -> tuple[int, int]:
    """(heads, dim_head) of the SpatialTransformer at a level with `channels` channels.

    SD1 fixes the head count (`num_heads`, dim_head = channels // num_heads); SD2/SDXL fix the head width
    (`num_head_channels`, heads = channels // num_head_channels). Source: LDM openaimodel.py `UNetModel.__init__`.
    Raises ValueError when neither is set or the channels do not divide.
    """
    if config.num_head_channels != -1:
        width = config.num_head_channels
        if width <= 0 or channels % width:
            raise ValueError(f"num_head_channels={width} must be positive and divide the level width {channels}")
        return channels // width, width
    if config.num_heads <= 0 or channels % config.num_heads:
        raise ValueError(f"num_heads={config.num_heads} must be positive and divide the level width {channels}")
    return config.num_heads, channels // config.num_heads


def _check_config(config: UNetConfig) -> None:
    levels = len(config.channel_mult)
    if len(config.transformer_depth) < levels:
        raise ValueError(f"transformer_depth={config.transformer_depth} needs one entry per level "
                         f"(channel_mult={config.channel_mult})")
    if config.model_channels % GROUPS:
        raise ValueError(f"model_channels={config.model_channels} must be a multiple of {GROUPS} (GroupNorm groups)")
    if (config.adm_in_channels > 0) != (config.num_classes is not None):
        raise ValueError(f"adm_in_channels={config.adm_in_channels} and num_classes={config.num_classes!r} must be "
                         "set together (SDXL: num_classes='sequential')")
    if config.num_classes not in (None, "sequential"):
        raise ValueError(f"num_classes={config.num_classes!r} is not supported; allowed: None, 'sequential'")


class UNetModel(nn.Module):
    """The LDM denoising UNet (eps or v prediction is the caller's interpretation of the output).

    Module tree (LDM openaimodel.py `UNetModel`): time_embed.{0,2}; label_emb.0.{0,2} (SDXL); input_blocks.0.0
    (conv_in), then per level `num_res_blocks` x [ResBlock, SpatialTransformer if the level has attention] and a
    Downsample (`op`) except on the last level; middle_block.{0: ResBlock, 1: SpatialTransformer, 2: ResBlock};
    output_blocks per level in reverse, `num_res_blocks + 1` x [ResBlock over the concatenated skip, transformer],
    with an Upsample (`conv`) closing every level but level 0; out.{0: GroupNorm32, 2: conv}.

    A level has attention when its downsampling factor is in `attention_resolutions` and its `transformer_depth`
    is > 0 (SDXL level 0 has neither). Parameters are created on `device`/`dtype` (use "meta" then
    `load_state_dict(assign=True)` to load without initialising); no buffers are computed here.
    """

    def __init__(self, config: UNetConfig, device=None, dtype=None):
        super().__init__()
        _check_config(config)
        kw = dict(device=device, dtype=dtype)
        self.config = config
        mc = config.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim, **kw), nn.SiLU(), nn.Linear(emb_dim, emb_dim, **kw))
        if config.num_classes == "sequential":
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(config.adm_in_channels, emb_dim, **kw), nn.SiLU(), nn.Linear(emb_dim, emb_dim, **kw)))

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = attention_heads(config, ch)
            return SpatialTransformer(ch, heads, dim_head, depth, config.context_dim,
                                      config.use_linear_in_transformer, **kw)

        def has_attention(level: int, ds: int) -> bool:
            return ds in config.attention_resolutions and config.transformer_depth[level] > 0

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(_conv3x3(config.in_channels, mc, **kw))])
        skip_channels = [mc]
        ch, ds = mc, 1
        last = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, **kw)]
                ch = mult * mc
                if has_attention(level, ds):
                    layers.append(transformer(ch, config.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, **kw)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, **kw), transformer(ch, config.transformer_depth_middle),
            ResBlock(ch, emb_dim, ch, **kw))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, **kw)]
                ch = mc * mult
                if has_attention(level, ds):
                    layers.append(transformer(ch, config.transformer_depth[level]))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch, **kw))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch, **kw), nn.SiLU(), _conv3x3(mc, config.out_channels, **kw))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the UNet target (eps for SD1, v for SD2-v) for latents `x` at DDPM timesteps `timesteps`.

        Args:
            x: [B, in_channels, h, w] latents (with c_in scaling already applied by the denoiser; inpainting
                models get the 5 extra c_concat channels concatenated here). Any h, w >= 1; when they are not
                divisible by 2 ** (levels - 1) the upsampled features are resized to the skip connections.
            timesteps: [B] timesteps, float (continuous t in [0, 999]) or int.
            context: [B, T, context_dim] cross-attention conditioning.
            y: [B, adm_in_channels] SDXL vector conditioning; required iff config.adm_in_channels > 0.
        Returns:
            [B, out_channels, h, w] in x's dtype.
        Raises:
            ValueError on a wrong channel count, spatial size, batch size or a missing/unexpected `y`.
        """
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, h, w], got {tuple(x.shape)}")
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape [{x.shape[0]}], got {tuple(timesteps.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be [{x.shape[0]}, T, {cfg.context_dim}], got {tuple(context.shape)}")
        if (y is not None) != (cfg.adm_in_channels > 0):
            raise ValueError(f"y must be given iff adm_in_channels > 0 (adm_in_channels={cfg.adm_in_channels}, "
                             f"y is {'set' if y is not None else 'None'})")
        if y is not None and y.shape != (x.shape[0], cfg.adm_in_channels):
            raise ValueError(f"y must be [{x.shape[0]}, {cfg.adm_in_channels}], got {tuple(y.shape)}")

        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        h = x.to(dtype)
        context = context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                # Latent sides not divisible by 2**(levels-1): Downsample rounds up, Upsample doubles, so resize
                # to the skip's size as A1111 does (modules/sd_hijack_unet.py, cat), letting any multiple of 8 px run.
                h = F.interpolate(h, skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h).to(x.dtype, memory_format=torch.contiguous_format)
