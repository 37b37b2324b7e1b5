"""
Super-resolves images with a YONOS-SR checkpoint, in one DDIM step by default.

  python sample.py img.png                      # -> img_x4.png beside it, with the shipped model
  python sample.py photos/ --out results/       # every image in a folder
  python sample.py img.png --steps 4 --seed 1   # more sampling steps, another noise draw

Any size: the input is padded (reflect) to what the VAE and U-Net need and cropped back; images larger than
a tile (by default the model's training crop) go through overlapping latent tiles blended with smooth weights,
so memory stays bounded. The output's low frequencies come from the bicubic input (colour fix; --no-color-fix
turns it off).
In a notebook: `from sample import upscale, load_model; upscale(Image.open(p), load_model())`.

References: Noroozi et al., YONOS-SR, arXiv 2401.17258.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image

from data import list_images, open_image, resize, to_image, to_tensor
from yonos import YonosSR

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "assets", "yonos_tiny_x4.pt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(path: str = DEFAULT_CKPT, device: str = "cpu", dtype: str = "fp32") -> YonosSR:
    return YonosSR.load(path).to(device=device, dtype=DTYPES[dtype]).eval()


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


def wavelet_low(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Low-frequency part of (B, C, H, W): the a-trous wavelet blur (3x3 binomial kernel at dilations 1..16)."""
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    k = k.expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2 ** i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), k, dilation=d, groups=x.shape[1])
    return x


def color_fix(sr: torch.Tensor, x_up: torch.Tensor) -> torch.Tensor:
    """Keeps the SR image's high frequencies and takes the low ones (colour, smooth shading) from the bicubic
    input, as StableSR's wavelet colour fix (Wang et al. 2023, arXiv 2305.07015): it removes the colour casts
    a small or briefly trained VAE leaves."""
    return (sr - wavelet_low(sr) + wavelet_low(x_up)).clamp(-1, 1)


def tile_settings(model: YonosSR, tile: int | None = None, overlap: int | None = None) -> tuple[int, int]:
    """(tile, overlap) in latent cells, filling in the defaults: the latent size of the model's training crops
    (recorded by train.py), else 64 (SD's 512-px crops), overlapping by half. Attention and group norm look at
    the whole tile: a model run on tiles much larger than it was trained on drifts (the shipped tiny model,
    trained on 16-cell latents, loses 0.5 dB Y-PSNR on chelsea and 2 dB on flower at 64-cell tiles; README,
    "Tiles")."""
    if tile is None:
        crop = model.meta.get("train_crop")
        tile = crop // model.vae.config.factor if crop else 64
    return tile, tile // 2 if overlap is None else overlap


@torch.no_grad()
def super_resolve_tiled(model: YonosSR, x_up: torch.Tensor, noise: torch.Tensor, steps: int,
                        tile: int | None, overlap: int, cells_per_batch: int = 64 * 64) -> torch.Tensor:
    """x_up (1, 3, H, W) -> SR (1, 3, H, W), whole or in overlapping latent tiles of `tile` cells. Each tile runs
    encode -> DDIM -> decode on its own pixels and its slice of one global noise tensor, so overlapping tiles
    agree where they meet; outputs are blended with `blend_window`. Small tiles go through the model in
    batches of up to `cells_per_batch` latent cells (one 64x64 SD tile's worth), so memory stays bounded."""
    f = model.vae.config.factor
    h, w = noise.shape[-2:]
    if not tile or (h <= tile and w <= tile):
        return model.super_resolve(x_up, steps, noise)
    out = torch.zeros_like(x_up, dtype=torch.float32)
    weight = torch.zeros((1, 1, *x_up.shape[-2:]), dtype=torch.float32, device=x_up.device)
    th, tw = min(tile, h), min(tile, w)
    window = blend_window(th * f, tw * f, overlap * f // 2).to(x_up.device)
    boxes = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
    per_batch = max(1, cells_per_batch // (th * tw))
    for i in range(0, len(boxes), per_batch):
        group = boxes[i:i + per_batch]
        pixels = [(slice(y * f, (y + th) * f), slice(x * f, (x + tw) * f)) for y, x in group]
        sr = model.super_resolve(torch.cat([x_up[..., py, px] for py, px in pixels]), steps,
                                 torch.cat([noise[..., y:y + th, x:x + tw] for y, x in group]))
        for k, (py, px) in enumerate(pixels):
            out[..., py, px] += sr[k].float() * window
            weight[..., py, px] += window
    return (out / weight).to(x_up.dtype)


@torch.no_grad()
def upscale(image: Image.Image, model: YonosSR, steps: int = 1, seed: int = 0, tile: int | None = None,
            overlap: int | None = None, fix_colors: bool = True) -> Image.Image:
    """PIL image (any mode) -> PIL image `model.scale` times larger. RGBA keeps its alpha, upscaled bicubically;
    other modes come back as RGB. `tile` and `overlap` are in latent cells (None: `tile_settings`' defaults;
    tile 0: never tile); `fix_colors` applies `color_fix` against the bicubic upsampling."""
    tile, overlap = tile_settings(model, tile, overlap)
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    device, dtype = model.context.device, model.context.dtype
    s, f = model.scale, model.vae.config.factor
    W, H = image.width * s, image.height * s
    x = to_tensor(image.convert("RGB"))[None].to(device)
    x_up = resize(x, (H, W)).clamp(-1, 1)
    # pad (reflect) to what the VAE and every U-Net level can halve without remainder, then crop back
    m = f * 2 ** (len(model.unet.config.block_out_channels) - 1)
    ph, pw = -H % m, -W % m
    if ph or pw:
        mode = "reflect" if ph < H and pw < W else "replicate"
        x_up = F.pad(x_up, (0, pw, 0, ph), mode=mode)
    g = torch.Generator().manual_seed(seed)
    shape = (1, model.vae.config.latent_channels, x_up.shape[2] // f, x_up.shape[3] // f)
    noise = torch.randn(shape, generator=g).to(device)
    sr = super_resolve_tiled(model, x_up.to(dtype), noise.to(dtype), steps, tile, overlap)
    if fix_colors:
        sr = color_fix(sr.float(), x_up.float())
    sr = sr[..., :H, :W]
    out = to_image(sr[0])
    if alpha is not None:
        out.putalpha(alpha.resize((W, H), Image.BICUBIC))
    return out


# -----------------------------------------------------------------------------
# command line


def output_path(src: str, args, n_inputs: int, scale: int) -> str:
    name = os.path.splitext(os.path.basename(src))[0] + f"_x{scale}.png"
    if args.out and (n_inputs > 1 or os.path.isdir(args.out) or args.out.endswith(os.sep)):
        return os.path.join(args.out, name)
    return args.out or os.path.join(os.path.dirname(src), name)


def save_png(img: Image.Image, path: str) -> None:
    """Atomic: a temp file in the same folder, renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="model checkpoint (default: the shipped tiny x4 model)")
    p.add_argument("--steps", type=int, default=1, help="DDIM steps (default: 1, the point of YONOS-SR)")
    p.add_argument("--out", default="", help="output file (one input) or folder (default: <name>_x<scale>.png "
                                             "beside each input)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--tile", type=int, default=None, help="tile size in latent cells; 0: never tile (default: the "
                   "latent size of the model's training crops, 16 for the shipped model, 64 for SD-based ones)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in latent cells (default: half the tile)")
    p.add_argument("--color-fix", action=argparse.BooleanOptionalAction, default=True,
                   help="take the low frequencies (colours, smooth shading) from the bicubic input, as StableSR's "
                        "wavelet colour fix; --no-color-fix shows the model's raw output (default: on)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="model precision (default: fp32)")
    p.add_argument("--max-pixels", type=int, default=4_000_000,
                   help="refuse inputs with more pixels than this (default: 4,000,000; memory grows with the output)")
    args = p.parse_args(argv)
    err = lambda msg: print(f"sample.py: error: {msg}", file=sys.stderr)
    if args.steps < 1 or args.steps > 1000:
        err(f"--steps must be in 1..1000, not {args.steps}")
        return 2
    files = []
    for src in args.inputs:
        if os.path.isdir(src):
            found = list_images(src)
            if not found:
                err(f"{src}: no images in this folder")
                return 2
            files += found
        else:
            files.append(src)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model = load_model(args.ckpt, device, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        err(str(e).splitlines()[0])
        return 2
    tile, overlap = tile_settings(model, args.tile, args.overlap)
    cell = 2 ** (len(model.unet.config.block_out_channels) - 1)  # every U-Net level halves the tile
    if tile < 0 or tile % cell:
        err(f"--tile must be 0 or a positive multiple of {cell} for this model, not {tile}")
        return 2
    if overlap < 0 or (tile and overlap >= tile):
        err(f"--overlap must be in 0..{tile - 1} for --tile {tile}")
        return 2
    failed, inputs = [], {os.path.abspath(f) for f in files}
    for src in files:
        dst = output_path(src, args, len(files), model.scale)
        try:
            if os.path.abspath(dst) in inputs:
                raise ValueError(f"{dst}: is an input; refusing to overwrite it")
            if os.path.exists(dst) and not args.force:
                raise ValueError(f"{dst}: exists (pass --force to overwrite)")
            rgb, alpha = open_image(src, args.max_pixels)
            if alpha is not None:
                rgb.putalpha(alpha)
            t0 = time.time()
            out = upscale(rgb, model, args.steps, args.seed, tile, overlap, args.color_fix)
            save_png(out, dst)
            print(f"{src} ({rgb.width}x{rgb.height}) -> {dst} ({out.width}x{out.height}, {time.time() - t0:.1f}s)")
        except (ValueError, OSError) as e:
            err(str(e).splitlines()[0])
            failed.append(src)
    if len(files) > 1:
        failures = f"; failed: {', '.join(failed)}" if failed else ""
        print(f"{len(files) - len(failed)} of {len(files)} images done{failures}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
