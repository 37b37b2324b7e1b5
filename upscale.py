"""
Super-resolving whole images with a YonosSR model: padding, overlapping latent tiles, the colour fix.

`upscale(image, model)` takes a PIL image of any size and mode and returns it `model.scale` times larger. The
method itself (one DDIM step on [z_t, z_l]) is `YonosSR.super_resolve` in yonos.py; this file is what it takes
to apply it to real pictures: pad to what the VAE and U-Net can halve, run the model on tiles of the size it was
trained on (blended with smooth weights, so memory stays bounded and no seam shows), and take the lowest
frequencies from the bicubic input (StableSR's wavelet colour fix). sample.py and eval.py both use it.

References:
  Noroozi et al., YONOS-SR, arXiv 2401.17258
  Wang et al., "Exploiting Diffusion Prior for Real-World Image Super-Resolution" (StableSR), arXiv 2305.07015
"""
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from PIL import Image

from data import to_image, to_tensor, upsample
from yonos import YonosSR

# -----------------------------------------------------------------------------
# the colour fix


def wavelet_low(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Low-frequency part of (B, C, H, W): the a-trous wavelet blur (3x3 binomial kernel at dilations 1..16)."""
    # BEGIN SOLUTION color_fix
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    k = k.expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2 ** i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), k, dilation=d, groups=x.shape[1])
    return x
    # END SOLUTION


def color_fix(sr: torch.Tensor, x_up: torch.Tensor) -> torch.Tensor:
    """Keeps the SR image's high frequencies and takes the low ones (colour, smooth shading) from the bicubic
    input, as StableSR's wavelet colour fix (Wang et al. 2023, arXiv 2305.07015): it removes the colour casts
    a small or briefly trained VAE leaves."""
    # BEGIN SOLUTION color_fix
    return (sr - wavelet_low(sr) + wavelet_low(x_up)).clamp(-1, 1)
    # END SOLUTION


# -----------------------------------------------------------------------------
# tiles


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering 0..n with at least `overlap` shared between neighbours."""
    if n <= tile:
        return [0]
    stride = max(1, tile - overlap)
    return sorted(set(list(range(0, n - tile, stride)) + [n - tile]))


def blend_window(h: int, w: int, ramp: int) -> torch.Tensor:
    """(1, 1, h, w) weights rising smoothly from the tile's edges over `ramp` pixels (smoothstep), 1 inside;
    overlapping tiles are averaged with them, so no seam has a hard edge."""
    def ramp1d(n):
        d = torch.minimum(torch.arange(n) + 0.5, n - torch.arange(n) - 0.5) / max(ramp, 1)
        d = d.clamp(0, 1)
        return (d * d * (3 - 2 * d)).clamp(min=1e-3)
    return (ramp1d(h)[:, None] * ramp1d(w)[None, :])[None, None]


def tile_settings(model: YonosSR, tile: int | None = None, overlap: int | None = None) -> tuple[int, int]:
    """(tile, overlap) in latent cells, filling in the defaults. The tile: the one the checkpoint records
    (meta.tile: the shipped x2 and x8 record twice their training crop, chosen on photos/val), else the latent size
    of the model's training crops (recorded by train.py), else 64 (SD's 512-px crops). The overlap: half the
    tile, but a model that predicts a residual over the LR latent (lr_prior_std > 0, the shipped ones) overlaps
    by 1/16 of the tile: what it adds is small, so neighbouring tiles differ little where they meet, and a thin
    overlap is what keeps the x4 of a 512-px photo within a minute on two CPU cores (README, "The shipped
    models"). Attention and group norm look at the whole tile, so the tile size changes the output (README,
    "Tiles and speed on a CPU")."""
    if tile is None:
        tile = model.meta.get("tile")
    if tile is None:
        crop = model.meta.get("train_crop")
        tile = crop // model.vae.config.factor if crop else 64
    if overlap is None:
        overlap = max(1, tile // 16) if model.unet.config.lr_prior_std else tile // 2
    return tile, overlap


@torch.no_grad()
def super_resolve_tiled(model: YonosSR, x_up: torch.Tensor, noise: torch.Tensor, steps: int,
                        tile: int | None, overlap: int, cells_per_batch: int = 64 * 64,
                        guidance: float = 0.0) -> torch.Tensor:
    """x_up (1, 3, H, W) -> SR (1, 3, H, W), whole or in overlapping latent tiles of `tile` cells. Each tile runs
    encode -> DDIM -> decode on its own pixels and its slice of one global noise tensor, so overlapping tiles
    agree where they meet; outputs are blended with `blend_window`. Small tiles go through the model in
    batches of up to `cells_per_batch` latent cells (one 64x64 SD tile's worth), so memory stays bounded. On a
    CPU the batches run two or more at a time, one torch thread each (one per --threads): small convolutions
    use two cores better that way than split across both; the output is the same."""
    f = model.vae.config.factor
    h, w = noise.shape[-2:]
    # channels_last: oneDNN's convolutions are ~10% faster in it on a CPU (measured on the shipped models)
    cpu = x_up.device.type == "cpu" and not model.compiled  # compiled graphs: one shape, one layout, one thread
    memory_format = torch.channels_last if cpu else torch.contiguous_format
    model.to(memory_format=memory_format)
    if not tile or (h <= tile and w <= tile):
        return model.super_resolve(x_up, steps, noise, guidance)
    out = torch.zeros_like(x_up, dtype=torch.float32)
    weight = torch.zeros((1, 1, *x_up.shape[-2:]), dtype=torch.float32, device=x_up.device)
    th, tw = min(tile, h), min(tile, w)
    window = blend_window(th * f, tw * f, overlap * f // 2).to(x_up.device)
    boxes = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
    per_batch = max(1, cells_per_batch // (th * tw))

    def run(i):
        group = boxes[i:i + per_batch]
        if model.compiled:  # every batch the same shape, so compiled graphs are reused: repeat the last tile
            group = group + group[-1:] * (per_batch - len(group))
        pixels = [(slice(y * f, (y + th) * f), slice(x * f, (x + tw) * f)) for y, x in group]
        batch = torch.cat([x_up[..., py, px] for py, px in pixels]).contiguous(memory_format=memory_format)
        sr = model.super_resolve(batch, steps, torch.cat([noise[..., y:y + th, x:x + tw] for y, x in group]), guidance)
        return pixels[:len(boxes[i:i + per_batch])], sr

    starts = range(0, len(boxes), per_batch)
    workers = torch.get_num_threads() if cpu and len(starts) > 1 else 1
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    if pool:
        torch.set_num_threads(1)
    try:
        for pixels, sr in (pool.map(run, starts) if pool else map(run, starts)):  # in order: the same sums
            for k, (py, px) in enumerate(pixels):
                out[..., py, px] += sr[k].float() * window
                weight[..., py, px] += window
    finally:
        if pool:
            pool.shutdown()
            torch.set_num_threads(workers)
    return (out / weight).to(x_up.dtype)


# -----------------------------------------------------------------------------
# a whole picture


@torch.no_grad()
def upscale(image: Image.Image, model: YonosSR, steps: int = 1, seed: int = 0, tile: int | None = None,
            overlap: int | None = None, fix_colors: bool = True, guidance: float = 0.0) -> Image.Image:
    """PIL image (any mode) -> PIL image `model.scale` times larger. RGBA keeps its alpha, upscaled bicubically;
    other modes come back as RGB. `tile` and `overlap` are in latent cells (None: `tile_settings`' defaults;
    tile 0: never tile); `fix_colors` applies `color_fix` against the bicubic upsampling; `guidance` is the
    classifier-free guidance weight on the LR condition (yonos.sample_v). A model that produces
    NaN or Inf (a damaged checkpoint) raises ValueError rather than returning a black image."""
    tile, overlap = tile_settings(model, tile, overlap)
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    device, dtype = model.context.device, model.context.dtype
    s = model.scale
    W, H = image.width * s, image.height * s
    x_up = upsample(to_tensor(image.convert("RGB"))[None].to(device), (H, W))
    # pad (reflect) to the model's multiple, then crop back
    m = model.multiple
    ph, pw = -H % m, -W % m
    if model.compiled and tile:  # no image smaller than a tile: tiles keep one shape
        ph, pw = max(ph, tile * model.vae.config.factor - H), max(pw, tile * model.vae.config.factor - W)
    if ph or pw:
        mode = "reflect" if ph < H and pw < W else "replicate"
        x_up = F.pad(x_up, (0, pw, 0, ph), mode=mode)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(model.noise_shape(1, x_up.shape[2], x_up.shape[3]), generator=g).to(device)
    sr = super_resolve_tiled(model, x_up.to(dtype), noise.to(dtype), steps, tile, overlap, guidance=guidance)
    if not torch.isfinite(sr).all():
        raise ValueError("the model produced non-finite values (NaN/Inf): its checkpoint is damaged")
    if fix_colors:
        sr = color_fix(sr.float(), x_up.float())
    sr = sr[..., :H, :W]
    out = to_image(sr[0])
    if alpha is not None:
        out.putalpha(alpha.resize((W, H), Image.BICUBIC))
    return out
