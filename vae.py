"""
The Stable Diffusion autoencoder (AutoencoderKL) in plain PyTorch, with diffusers' parameter names.

encode(x) gives the mean and log-variance of the latent posterior for an image x in [-1, 1];
decode(z) maps an unscaled latent back to an image. The U-Net works on z * scaling_factor (SD: 0.18215),
which the caller applies; the factor lives in VAEConfig. It reuses model.py's blocks.

References:
  Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752
  Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv 1312.6114
"""
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import (build_pretrained, check_positive_ints, config_from_dict, load_checked, read_checkpoint,
                   save_checkpoint)
from model import Attention, Downsample, ResnetBlock, Upsample

# -----------------------------------------------------------------------------
# config


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)  # one level per factor 2: 4 levels -> 8x downsampling
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # 1 / std of SD's latents (LDM configs); the tiny VAE measures its own
    # ours, after DC-AE's residual autoencoding (Chen et al. 2024, arXiv 2410.10733): the encoder adds the pixels
    # rearranged into channels (space-to-channel) to its output, the decoder the inverse, so the networks learn
    # residuals and a fresh VAE is already an exact rearrangement; needs latent_channels = in_channels * factor^2
    shortcut: bool = False

    def __post_init__(self):
        check_positive_ints("VAEConfig", in_channels=self.in_channels, out_channels=self.out_channels,
                            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                            latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups)
        if len(self.block_out_channels) > 8 or self.layers_per_block > 16 or max(self.block_out_channels) > 8192:
            raise ValueError(f"VAEConfig: block_out_channels and layers_per_block: at most 8 levels, 16 layers and 8192 "
                             f"channels (SD has 4, 2, 512), not {len(self.block_out_channels)}, {self.layers_per_block}, "
                             f"{max(self.block_out_channels)}")
        if any(ch % self.norm_num_groups for ch in self.block_out_channels):
            raise ValueError(f"VAEConfig: channels {self.block_out_channels} do not split into "
                             f"{self.norm_num_groups} norm groups")
        if not 0 < self.scaling_factor < 1e6:
            raise ValueError(f"VAEConfig: scaling_factor must be positive and finite, not {self.scaling_factor}")
        if self.shortcut and not (self.latent_channels == self.in_channels * self.factor ** 2 == self.out_channels
                                  * self.factor ** 2):
            raise ValueError(f"VAEConfig: a shortcut needs latent_channels = in/out_channels x {self.factor ** 2}")

    def to_diffusers(self) -> dict:
        """The keyword arguments of diffusers' AutoencoderKL for the same network (tests, bench.py)."""
        if self.shortcut:
            raise ValueError("diffusers' AutoencoderKL has no space-to-channel shortcut")
        n = len(self.block_out_channels)
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                    block_out_channels=list(self.block_out_channels), layers_per_block=self.layers_per_block,
                    latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
                    scaling_factor=self.scaling_factor)

    @property
    def factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @staticmethod
    def from_diffusers(d: dict) -> "VAEConfig":
        """Reads a diffusers vae/config.json (a dict)."""
        for key, ok in [("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True),
                        ("mid_block_add_attention", True)]:
            if d.get(key, ok) != ok:
                raise ValueError(f"unsupported VAE: {key}={d[key]!r} (SD uses {ok!r})")
        return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                         block_out_channels=tuple(d["block_out_channels"]),
                         layers_per_block=d.get("layers_per_block", 2),
                         latent_channels=d.get("latent_channels", 4), norm_num_groups=d.get("norm_num_groups", 32),
                         scaling_factor=d.get("scaling_factor", 0.18215))


VAE_PRESETS = {
    "sd": VAEConfig(),
    # downsamples by 2, not 8: the tiny VAE's reconstruction bounds everything after it, and trained from
    # scratch on a CPU an f=4 one stayed far below bicubic x4 (README, "The tiny VAE")
    "tiny": VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, scaling_factor=1.0),
    # the shipped models: 8 latent channels per 2x2 pixels, i.e. 2/3 of the pixel values instead of 1/3; with the
    # same training it reconstructed the val photos 1.0 dB better than 4 channels (README, "The VAE")
    "small": VAEConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=12, norm_num_groups=16,
                       scaling_factor=1.0, shortcut=True),
}

# legacy names some Hub VAE files still use for the mid-block attention (diffusers < 0.14)
LEGACY_RENAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}

# -----------------------------------------------------------------------------
# blocks


class VAEAttention(Attention):
    """Single-head self-attention over the H*W positions of a feature map, GroupNorm first, residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__(ch, heads=1, bias=True)
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        h = super().forward(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution (diffusers UNetMidBlock2D)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Level(nn.Module):
    """Resnets then an optional resampler (diffusers DownEncoderBlock2D / UpDecoderBlock2D)."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, sampler: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6)
                                      for i in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)] if sampler == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if sampler == "up" else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in [*self.resnets, *self.downsamplers, *self.upsamplers]:
            x = m(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g,
                                                "down" if i < n - 1 else None) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:  # (B, C, H, W) -> (B, C', H/2, W/2) per level but the last
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g,
                                              "up" if i < n - 1 else None) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:  # (B, C, h, w) -> (B, C', 2h, 2w) per level but the last
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# -----------------------------------------------------------------------------
# autoencoder


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg = replace(cfg)  # a copy: train.py measures and stores the scaling factor in it
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        if cfg.shortcut:  # the residual branches start at zero: encode and decode begin as exact rearrangements
            for conv in (self.encoder.conv_out, self.decoder.conv_out):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
            nn.init.zeros_(self.quant_conv.bias)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> mean, logvar, each (B, 4, H/f, W/f); logvar clamped as in LDM."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        if self.config.shortcut:
            mean = mean + F.pixel_unshuffle(x, self.config.factor)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) unscaled latent -> (B, 3, h*f, w*f), roughly in [-1, 1]."""
        x = self.decoder(self.post_quant_conv(z))
        return x + F.pixel_shuffle(z, self.config.factor) if self.config.shortcut else x

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction through a sampled latent (the training path); returns (x_rec, mean, logvar)."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return self.decode(z), mean, logvar

    @classmethod
    def from_pretrained(cls, repo_or_path: str, subfolder: str = "vae", revision: str | None = None,
                        variant: str | None = None, **hub_kwargs) -> "AutoencoderKL":
        """Loads a diffusers-layout VAE from a Hub repo id or a local folder (see files.fetch_pretrained); legacy
        attention names are renamed."""
        return build_pretrained(cls, VAEConfig, repo_or_path, subfolder, revision, variant, LEGACY_RENAMES,
                                **hub_kwargs)

    def save(self, path: str) -> None:
        """A stand-alone VAE file (the output of `train.py --stage vae`)."""
        save_checkpoint(path, self.state_dict(), {"vae": asdict(self.config)})

    @classmethod
    def load(cls, path: str) -> "AutoencoderKL":
        tensors, header = read_checkpoint(path)
        return cls.from_checkpoint(tensors, header, path)

    @classmethod
    def from_checkpoint(cls, tensors: dict, header: dict, path: str) -> "AutoencoderKL":
        """The VAE of a checkpoint already read (a VAE file, or the VAE inside an SR model file)."""
        if "vae" not in header:
            raise ValueError(f"{path}: holds no VAE")
        with torch.device("meta"):
            model = cls(config_from_dict(VAEConfig, header["vae"], f"{path}: vae config"))
        load_checked(model, {k.removeprefix("vae."): v for k, v in tensors.items() if not k.startswith("unet.")
                             and k != "context"}, path, assign=True)
        return model
