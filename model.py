"""
The Stable Diffusion U-Net and the CLIP text encoder that gives its one fixed context, in plain PyTorch.

Parameter names are diffusers' (UNet2DConditionModel) and transformers' (CLIPTextModel), so the public
SD checkpoints on the Hugging Face Hub load with load_state_dict(strict=True) and no key converter.
The building blocks (ResnetBlock, Attention, Downsample, Upsample) are reused by vae.py.

References:
  Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752
  Ronneberger et al., "U-Net", arXiv 1505.04597; Vaswani et al., "Attention Is All You Need", arXiv 1706.03762
  Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), arXiv 2103.00020
"""
import json
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from files import build_pretrained, check_positive_ints, fetch_pretrained, load_checked

# -----------------------------------------------------------------------------
# configs


@dataclass
class UNetConfig:
    in_channels: int = 4            # 4 latent channels; 8 once widen_conv_in adds the LR latent
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    attn_levels: tuple = (True, True, True, False)  # which levels have cross-attention (up blocks mirror it)
    layers_per_block: int = 2
    num_heads: tuple = (8, 8, 8, 8)  # heads per level; diffusers calls this `attention_head_dim` (a misnomer)
    cross_attention_dim: int = 768   # width of the text context: 768 for SD 1.x, 1024 for SD 2.x
    use_linear_projection: bool = False  # SD 2.x: Linear proj_in/proj_out; SD 1.x: 1x1 Conv
    upcast_attention: bool = False   # SD 2.1 computes attention in fp32 (matters only under fp16/bf16)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    guidance_embedding: bool = False  # ours (guided distillation): the guidance weight w as an input, like t
    lr_prior_std: float = 0.0  # ours: > 0 reads the output as a residual over the LR latent (yonos.lr_preconditioning)
    prediction_type: str = "v"  # what the output means: "v", or "epsilon" (SD 1.5, SD 2.1-base; yonos.predict_v)

    def __post_init__(self):
        """Checks what the constructor relies on, so a bad config is one clear error, not a crash inside it."""
        n = len(self.block_out_channels)
        check_positive_ints("UNetConfig", in_channels=self.in_channels, out_channels=self.out_channels,
                            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                            num_heads=self.num_heads, cross_attention_dim=self.cross_attention_dim,
                            norm_num_groups=self.norm_num_groups)
        if len(self.attn_levels) != n or len(self.num_heads) != n:
            raise ValueError(f"UNetConfig: attn_levels and num_heads need one entry per level ({n})")
        for ch, heads, attn in zip(self.block_out_channels, self.num_heads, self.attn_levels):
            if ch % self.norm_num_groups:
                raise ValueError(f"UNetConfig: {ch} channels do not split into {self.norm_num_groups} norm groups")
            if (attn or ch == self.block_out_channels[-1]) and ch % heads:
                raise ValueError(f"UNetConfig: {ch} channels do not split into {heads} attention heads")
        if not self.norm_eps > 0:
            raise ValueError(f"UNetConfig: norm_eps must be positive, not {self.norm_eps}")
        if not 0 <= self.lr_prior_std < 1e3:
            raise ValueError(f"UNetConfig: lr_prior_std must be 0 (off) or a positive std, not {self.lr_prior_std}")
        if self.prediction_type not in ("v", "epsilon"):
            raise ValueError(f"UNetConfig: prediction_type must be v or epsilon, not {self.prediction_type!r}")
        if n > 8 or self.layers_per_block > 16 or max(self.block_out_channels) > 8192:
            raise ValueError("UNetConfig: at most 8 levels, 16 layers per block and 8192 channels (SD has 4, 2, 1280)")

    def to_diffusers(self) -> dict:
        """The keyword arguments of diffusers' UNet2DConditionModel for the same network (tests, bench.py)."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attn_levels],
                    up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attn_levels)],
                    block_out_channels=list(self.block_out_channels), layers_per_block=self.layers_per_block,
                    attention_head_dim=list(self.num_heads), cross_attention_dim=self.cross_attention_dim,
                    use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
                    norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps)

    @staticmethod
    def from_diffusers(d: dict) -> "UNetConfig":
        """Reads a diffusers unet/config.json (a dict)."""
        down, up = d["down_block_types"], d["up_block_types"]
        attn = tuple(t.startswith("CrossAttn") for t in down)
        if tuple(t.startswith("CrossAttn") for t in reversed(up)) != attn:
            raise ValueError(f"unsupported U-Net: up blocks {up} do not mirror down blocks {down}")
        for key, ok in [("mid_block_type", "UNetMidBlock2DCrossAttn"), ("act_fn", "silu"),
                        ("resnet_time_scale_shift", "default"), ("class_embed_type", None),
                        ("addition_embed_type", None), ("time_embedding_type", "positional")]:
            if d.get(key, ok) != ok:
                raise ValueError(f"unsupported U-Net: {key}={d[key]!r} (SD uses {ok!r})")
        if d.get("transformer_layers_per_block", 1) not in (1, [1] * len(down)):
            raise ValueError("unsupported U-Net: transformer_layers_per_block must be 1 (as in SD 1.x/2.x)")
        # diffusers: num_attention_heads defaults to attention_head_dim, which in SD configs holds the heads
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(down)
        return UNetConfig(
            in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d["block_out_channels"]), attn_levels=attn,
            layers_per_block=d.get("layers_per_block", 2), num_heads=heads,
            cross_attention_dim=d.get("cross_attention_dim", 768),
            use_linear_projection=d.get("use_linear_projection", False),
            upcast_attention=d.get("upcast_attention", False),
            norm_num_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5))


UNET_PRESETS = {
    "sd15": UNetConfig(),
    "sd21": UNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024,
                       use_linear_projection=True, upcast_attention=True),
    # a few MB: trains from scratch on a laptop CPU, used by the tests and the shipped default model
    "tiny": UNetConfig(in_channels=8, block_out_channels=(32, 64, 64), attn_levels=(False, True, True),
                       layers_per_block=1, num_heads=(2, 4, 4), cross_attention_dim=32, norm_num_groups=16),
    # the shipped models: 1.5x wider, for the 12-channel latents of VAE_PRESETS["small"], and reading its output as
    # a residual over the LR latent (yonos.lr_preconditioning; 0.2: the residual's std, 0.11 at x2 to 0.26 at x8)
    "small": UNetConfig(in_channels=24, out_channels=12, block_out_channels=(48, 96, 96),
                        attn_levels=(False, True, True), layers_per_block=1, num_heads=(2, 4, 4),
                        cross_attention_dim=32, norm_num_groups=16, lr_prior_std=0.2),
}


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # SD 1.x (OpenAI CLIP); SD 2.x (OpenCLIP) uses "gelu"
    layer_norm_eps: float = 1e-5

    @staticmethod
    def from_transformers(d: dict) -> "CLIPTextConfig":
        """Reads a transformers text_encoder/config.json (a dict)."""
        names = CLIPTextConfig.__dataclass_fields__
        return CLIPTextConfig(**{k: d[k] for k in names if k in d})


# -----------------------------------------------------------------------------
# building blocks (shared with vae.py)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017, sec. 3.5), cos half first as in SD."""
    # BEGIN SOLUTION timestep_embedding
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B,) -> (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    # END SOLUTION


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, the timestep embedding added in between (diffusers ResnetBlock2D)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # BEGIN SOLUTION resnet
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h
        # END SOLUTION


class Attention(nn.Module):
    """Multi-head attention, softmax(q k^T / sqrt(d)) v, through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False,
                 upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a dropout: no weights

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # BEGIN SOLUTION attention
        context = x if context is None else context
        B, N, C = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (a.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for a in (q, k, v))  # (B, nh, N, hs)
        if self.upcast:  # SD 2.1: the logits overflow in fp16
            q, k, v = q.float(), k.float(), v.float()
        h = F.scaled_dot_product_attention(q, k, v).to(x.dtype)
        h = h.transpose(1, 2).reshape(B, N, C)  # (B, nh, N, hs) -> (B, N, C)
        return self.to_out[0](h)
        # END SOLUTION


class Downsample(nn.Module):
    """Strided 3x3 conv. The U-Net pads 1 on each side; the VAE encoder pads only right and bottom."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to a given size, for odd skip sizes) then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


# -----------------------------------------------------------------------------
# U-Net


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, GEGLU feed-forward; pre-LayerNorm, residual each."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        # ff.net.0.proj, ff.net.2: GEGLU (Shazeer 2020, arXiv 2002.05202) with 4x width
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([nn.Module(), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])
        self.ff.net[0].proj = nn.Linear(dim, 2 * 4 * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        h, gate = self.ff.net[0].proj(self.norm3(x)).chunk(2, dim=-1)
        return x + self.ff.net[2](h * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """diffusers Transformer2DModel: GroupNorm, project in, one TransformerBlock over the H*W tokens, out."""

    def __init__(self, ch: int, heads: int, cfg: UNetConfig):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(ch, heads, cfg.cross_attention_dim, cfg.upcast_attention)])
        self.proj_out = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        h = self.transformer_blocks[0](h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, HW, C) -> (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class UNetBlock(nn.Module):
    """One U-Net level: resnets, each followed by a spatial transformer if the level has attention,
    then an optional down/upsampler. Covers diffusers' (CrossAttn)DownBlock2D and (CrossAttn)UpBlock2D:
    an empty ModuleList adds no keys."""

    def __init__(self, in_chs: list, out_ch: int, temb_ch: int, heads: int, has_attn: bool,
                 sampler: str | None, cfg: UNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(c, out_ch, temb_ch, g, eps) for c in in_chs])
        self.attentions = nn.ModuleList([SpatialTransformer(out_ch, heads, cfg) for _ in in_chs] if has_attn else [])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if sampler == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if sampler == "up" else [])


class UNet(nn.Module):
    """eps/v-prediction U-Net of Stable Diffusion: unet(x, t, context) with x (B, C, h, w), t (B,), context (B, S, D)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg = replace(cfg)  # a copy: widen_conv_in edits it, the presets must not change
        self.gradient_checkpointing = False
        ch = cfg.block_out_channels
        n, L, temb_ch = len(ch), cfg.layers_per_block, 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(ch[0], temb_ch)
        self.time_embedding.linear_2 = nn.Linear(temb_ch, temb_ch)
        if cfg.guidance_embedding:  # see add_guidance_embedding
            self.guidance_embedding = nn.Module()
            self.guidance_embedding.linear_1 = nn.Linear(ch[0], temb_ch)
            self.guidance_embedding.linear_2 = nn.Linear(temb_ch, temb_ch)

        self.down_blocks = nn.ModuleList()
        for i in range(n):
            in_ch = ch[max(i - 1, 0)]
            self.down_blocks.append(UNetBlock([in_ch] + [ch[i]] * (L - 1), ch[i], temb_ch, cfg.num_heads[i],
                                              cfg.attn_levels[i], "down" if i < n - 1 else None, cfg))
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList(
            [ResnetBlock(ch[-1], ch[-1], temb_ch, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2)])
        self.mid_block.attentions = nn.ModuleList([SpatialTransformer(ch[-1], cfg.num_heads[-1], cfg)])

        # every up resnet takes the previous output concatenated with one skip from the down path
        self.up_blocks = nn.ModuleList()
        skips = [ch[0]] + sum(([ch[i]] * L + ([ch[i]] if i < n - 1 else []) for i in range(n)), [])
        prev = ch[-1]
        for i, level in enumerate(reversed(range(n))):
            in_chs = []
            for j in range(L + 1):
                in_chs.append((prev if j == 0 else ch[level]) + skips.pop())
            self.up_blocks.append(UNetBlock(in_chs, ch[level], temb_ch, cfg.num_heads[level],
                                            cfg.attn_levels[level], "up" if level > 0 else None, cfg))
            prev = ch[level]
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _level(self, block: UNetBlock, x, temb, context, skips=(), size=None):
        """One level. Down: returns the output and every intermediate (the skips). Up: each resnet
        first takes one skip, last one first; the upsampler goes to `size`, the next skip's size."""
        outs = []
        for i, resnet in enumerate(block.resnets):
            if skips:
                x = torch.cat([x, skips[-1 - i]], dim=1)
            x = resnet(x, temb)
            if len(block.attentions):
                x = block.attentions[i](x, context)
            outs.append(x)
        for down in block.downsamplers:
            x = down(x)
            outs.append(x)
        for up in block.upsamplers:
            x = up(x, size)
        return x, outs

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def embed(self, t: torch.Tensor, batch: int, dtype: torch.dtype, w: torch.Tensor | None = None) -> torch.Tensor:
        """The timestep embedding (plus the guidance weight's, for a guided-distilled U-Net): (B, 4*C0)."""
        t = t.expand(batch) if t.ndim == 0 else t  # one timestep per sample
        temb = timestep_embedding(t, self.config.block_out_channels[0]).to(dtype)
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(temb)))
        if self.config.guidance_embedding:
            w = torch.zeros(batch, device=t.device) if w is None else w.expand(batch)
            # w in [0, ~10] through the same sinusoids as t in [0, 1000): scaled by 100 to use their range
            wemb = timestep_embedding(100 * w, self.config.block_out_channels[0]).to(dtype)
            temb = temb + self.guidance_embedding.linear_2(F.silu(self.guidance_embedding.linear_1(wemb)))
        return temb

    def down(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        """The encoder half and the middle block: (mid-block output, skips for the up path, each level's output)."""
        x = self.conv_in(x)
        skips, levels = [x], []
        for block in self.down_blocks:  # (B, C_i, h, w) -> (B, C_i, h/2, w/2) per level
            x, outs = self._run(self._level, block, x, temb, context)
            skips += outs
            levels.append(x)
        mid = self.mid_block
        x = mid.resnets[0](x, temb)
        x = mid.attentions[0](x, context)
        return mid.resnets[1](x, temb), skips, levels

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                w: torch.Tensor | None = None) -> torch.Tensor:
        """w: the guidance weight per sample, for a U-Net with a guidance embedding (guided distillation)."""
        temb = self.embed(t, x.shape[0], x.dtype, w)
        context = context.expand(x.shape[0], -1, -1) if context.shape[0] == 1 else context
        x, skips, _ = self.down(x, temb, context)
        for block in self.up_blocks:  # (B, C_i, h, w) -> (B, C_i, 2h, 2w) per level
            n = len(block.resnets)
            used, skips = tuple(skips[-n:]), skips[:-n]
            x, _ = self._run(self._level, block, x, temb, context, used, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    @classmethod
    def from_pretrained(cls, repo_or_path: str, subfolder: str = "unet", revision: str | None = None,
                        variant: str | None = None, **hub_kwargs) -> "UNet":
        """Loads a diffusers-layout U-Net from a Hub repo id or a local folder (see `files.fetch_pretrained`)."""
        return build_pretrained(cls, UNetConfig, repo_or_path, subfolder, revision, variant, **hub_kwargs)


def widen_conv_in(unet: UNet, in_channels: int = 8) -> UNet:
    """Grows conv_in so the U-Net also takes the LR image's latent, concatenated with z_t on channels.

    The new input channels get zero weights: the widened U-Net computes exactly the pretrained function
    at step 0, whatever the LR latent holds, and learns to use it during fine-tuning (as SD's own x4
    upscaler and depth models were made from the base model)."""
    # BEGIN SOLUTION widen_conv_in
    old = unet.conv_in
    if in_channels < old.in_channels:
        raise ValueError(f"conv_in has {old.in_channels} channels already; cannot shrink to {in_channels}")
    new = nn.Conv2d(in_channels, old.out_channels, 3, padding=1).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.config.in_channels = in_channels
    return unet
    # END SOLUTION


# -----------------------------------------------------------------------------
# LoRA: low-rank adapters on a frozen U-Net (Hu et al. 2021, arXiv 2106.09685)


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) B A x with W, b frozen and only A (r x in) and B (out x r) trained. B starts at
    zero, so a fresh adapter computes exactly the base layer; alpha / r keeps the update's scale the same whatever
    the rank (the paper's sec. 4.1). `base` keeps the original's weight and bias, so merging is W + (alpha/r) B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False).to(base.weight.device, base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False).to(base.weight.device, base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear's own init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_B.weight @ self.lora_A.weight).to(self.base.weight.dtype)


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection of the U-Net's transformer blocks


def add_lora(unet: UNet, rank: int, alpha: float | None = None, targets: tuple = LORA_TARGETS) -> list[nn.Parameter]:
    """Wraps every Linear of the U-Net whose name ends in one of `targets` in a LoRALinear of rank `rank` (alpha
    defaults to the rank, scale 1), freezes the rest of the U-Net but its conv_in (widened for z_l, so it has new
    weights to learn in full), and returns the parameters to train: the adapters' A and B, and conv_in's."""
    unet.requires_grad_(False)
    wrapped = 0
    for name, module in list(unet.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full.endswith(targets):
                setattr(module, child_name, LoRALinear(child, rank, float(alpha or rank)))
                wrapped += 1
            elif isinstance(child, nn.ModuleList) and any(f"{full}.{i}".endswith(targets) for i in range(len(child))):
                for i, item in enumerate(child):
                    if isinstance(item, nn.Linear) and f"{full}.{i}".endswith(targets):
                        child[i] = LoRALinear(item, rank, float(alpha or rank))
                        wrapped += 1
    if not wrapped:
        raise ValueError(f"add_lora: no Linear layer of this U-Net ends in {targets}")
    unet.conv_in.requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]


def merged_state_dict(unet: nn.Module) -> dict:
    """The U-Net's weights under their usual names (diffusers'), every LoRA adapter merged into its base layer, so a
    model file written with it is the file format without LoRA: sample.py and the tests never know. Tensor by tensor,
    each moved to the CPU at once, so merging never needs a second copy of the U-Net on the GPU."""
    out = {key.replace(".base.", "."): v.detach().cpu() for key, v in unet.state_dict().items()
           if ".lora_A." not in key and ".lora_B." not in key}
    for name, module in unet.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.weight"] = module.merged_weight().detach().cpu()
    return out


def add_guidance_embedding(unet: UNet) -> UNet:
    """Gives the U-Net a second embedding, of the guidance weight w, added to the timestep embedding (Meng et al.
    2023, arXiv 2210.03142, sec. 4.1: the guided-distillation student takes w as an input). Its last layer starts
    at zero, so the new U-Net computes exactly the old function for every w, as widen_conv_in does for z_l."""
    if unet.config.guidance_embedding:
        return unet
    ch0, temb_ch = unet.config.block_out_channels[0], unet.time_embedding.linear_2.out_features
    ref = unet.time_embedding.linear_1.weight
    unet.guidance_embedding = nn.Module()
    unet.guidance_embedding.linear_1 = nn.Linear(ch0, temb_ch).to(ref.device, ref.dtype)
    unet.guidance_embedding.linear_2 = nn.Linear(temb_ch, temb_ch).to(ref.device, ref.dtype)
    nn.init.zeros_(unet.guidance_embedding.linear_2.weight)
    nn.init.zeros_(unet.guidance_embedding.linear_2.bias)
    unet.config.guidance_embedding = True
    return unet


# -----------------------------------------------------------------------------
# CLIP text encoder: only ever run on the empty prompt


class CLIPLayer(nn.Module):
    """Pre-LayerNorm transformer layer with causal self-attention (transformers CLIPEncoderLayer)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.act = cfg.num_attention_heads, cfg.hidden_act
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d))
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, cfg.intermediate_size)
        self.mlp.fc2 = nn.Linear(cfg.intermediate_size, d)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        a = self.self_attn
        h = self.layer_norm1(x)
        q, k, v = (p(h).view(B, N, self.heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, N, C)
        x = x + a.out_proj(h)
        h = self.mlp.fc1(self.layer_norm2(x))
        # quick_gelu x*sigmoid(1.702x) is OpenAI CLIP's approximation (SD 1.x); OpenCLIP (SD 2.x) uses exact gelu
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return x + self.mlp.fc2(h)


class TextEncoder(nn.Module):
    """transformers' CLIPTextModel: token + position embeddings, causal layers, final LayerNorm."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        tm = self.text_model = nn.Module()
        tm.embeddings = nn.Module()
        tm.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        tm.embeddings.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        tm.encoder = nn.Module()
        tm.encoder.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        tm.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, S) token ids -> (B, S, D) last hidden state, the context SD pipelines give the U-Net."""
        tm = self.text_model
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(pos)[None]
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)


def empty_prompt_ids(bos: int, eos: int, pad: int, length: int = 77) -> torch.Tensor:
    """Token ids of the empty prompt: start, end, then padding to the full length.
    An empty prompt has no words, so no tokenizer (BPE) library is needed; only the three special ids."""
    return torch.tensor([[bos, eos] + [pad] * (length - 2)])


def special_token_ids(tokenizer_dir: str) -> tuple[int, int, int]:
    """(bos, eos, pad) ids from a tokenizer folder: names from special_tokens_map.json or
    tokenizer_config.json, ids from vocab.json or tokenizer.json (both layouts are on the Hub)."""
    def read(name):
        path = os.path.join(tokenizer_dir, name)
        return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else None
    special = read("special_tokens_map.json") or read("tokenizer_config.json")
    vocab = read("vocab.json")
    if vocab is None and (tj := read("tokenizer.json")):
        vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj.get("added_tokens", [])}}
    if not special or not vocab:
        raise FileNotFoundError(f"{tokenizer_dir}: needs special_tokens_map.json or tokenizer_config.json, "
                                "and vocab.json or tokenizer.json")
    name = lambda t: special[t]["content"] if isinstance(special[t], dict) else special[t]
    return vocab[name("bos_token")], vocab[name("eos_token")], vocab[name("pad_token")]


@torch.no_grad()
def load_empty_prompt_context(repo_or_path: str, revision: str | None = None, **hub_kwargs) -> torch.Tensor:
    """The (1, 77, D) context the SR U-Net always sees: SD's own text encoder run once on "".

    The special ids come from the repo's tokenizer files: SD 1.x pads with the end token
    <|endoftext|>, SD 2.x with "!" (id 0)."""
    config, state = fetch_pretrained(repo_or_path, "text_encoder", "model", revision, None,
                                     extra=("tokenizer/*.json",), **hub_kwargs)
    # transformers < 5 saved CLIPTextModel under "text_model." with a position_ids buffer; 5.x saves neither
    state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()
             if not k.endswith("position_ids")}
    with torch.device("meta"):
        enc = TextEncoder(CLIPTextConfig.from_transformers(config))
    load_checked(enc, state, f"{repo_or_path}/text_encoder", assign=True)
    bos, eos, pad = special_token_ids(os.path.join(config["_folder"], "..", "tokenizer"))
    return enc.eval()(empty_prompt_ids(bos, eos, pad, enc.config.max_position_embeddings))
