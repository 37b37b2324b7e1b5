"""
Super-resolving whole images with a YonosSR model: padding, overlapping latent tiles, the colour fix, all in a
band of rows at a time, so memory is bounded by the tile, not by the image.

`upscale(image, model)` takes a PIL image of any size and mode and returns it `model.scale` times larger;
`upscale_rows` yields the same output a band of rows at a time (sample.py streams those into a PNG file). The
method itself (one DDIM step on [z_t, z_l]) is `YonosSR.super_resolve` in yonos.py; this file is what it takes to
apply it to real pictures: upsample the LR image to the output size a band at a time, pad to what the VAE and
U-Net can halve, run the model on tiles of the size it was trained on (blended with smooth weights, so no seam
shows), and take the lowest frequencies from the bicubic input (StableSR's wavelet colour fix). sample.py and
eval.py both use it.

References:
  Noroozi et al., YONOS-SR, arXiv 2401.17258
  Wang et al., "Exploiting Diffusion Prior for Real-World Image Super-Resolution" (StableSR), arXiv 2305.07015
"""
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import to_tensor, upsample
from yonos import YonosSR

# -----------------------------------------------------------------------------
# the colour fix

LEVELS = 5  # wavelet levels of the colour fix: dilations 1..16


def wavelet_low(x: torch.Tensor, levels: int = LEVELS) -> torch.Tensor:
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


HALO = 2 ** LEVELS - 1  # rows of context the colour fix reads on each side: 1 + 2 + 4 + 8 + 16

# -----------------------------------------------------------------------------
# tiles and their noise


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
    """(tile, overlap) in latent cells, filling in the defaults and checking them. The tile: the one the checkpoint
    records (meta.tile: the shipped x2 and x8 record twice their training crop, chosen on photos/val), else the
    latent size of the model's training crops (recorded by train.py), else 64 (SD's 512-px crops); 0: never tile.
    The overlap: half the tile, but a model that predicts a residual over the LR latent (lr_prior_std > 0, the
    shipped ones) overlaps by 1/16 of the tile: what it adds is small, so neighbouring tiles differ little where they
    meet, and a thin overlap is what keeps the x4 of a 512-px photo fast on two CPU cores (README, "Tiles and
    speed"). Attention and group norm look at the whole tile, so the tile size changes the output. A bad value is a
    ValueError naming the option."""
    if tile is None:
        tile = model.meta.get("tile")
    if tile is None:
        crop = model.meta.get("train_crop")
        tile = crop // model.vae.config.factor if crop else 64
    step = model.multiple // model.vae.config.factor  # every U-Net level must halve a tile without remainder
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0 or tile % step:
        raise ValueError(f"--tile must be 0 or a positive multiple of {step} for this model, not {tile}")
    if overlap is None:
        overlap = max(1, tile // 16) if model.unet.config.lr_prior_std else tile // 2
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or (tile and overlap >= tile):
        raise ValueError(f"--overlap must be in 0..{max(tile - 1, 0)} for --tile {tile}, not {overlap}")
    return tile, overlap


NOISE_BLOCK = 32  # latent cells a side of one independently seeded block of the initial noise z_T


def block_noise(seed: int, channels: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """The initial noise z_T on latent rows y0..y1 and columns x0..x1 of an image, (1, C, y1-y0, x1-x0). An
    image's noise is cut into NOISE_BLOCK-cell blocks, each drawn from a generator seeded by (seed, block row,
    block column), so any region can be made on its own and is the same whoever asks for it: overlapping tiles
    agree where they meet, and no tile needs the whole image's noise in memory."""
    B, rows = NOISE_BLOCK, []
    for by in range(y0 // B, (y1 - 1) // B + 1):
        blocks = [torch.randn(channels, B, B, generator=torch.Generator().manual_seed(
            ((seed * 1_000_003 + by) * 1_000_003 + bx) % 2 ** 63)) for bx in range(x0 // B, (x1 - 1) // B + 1)]
        rows.append(torch.cat(blocks, 2))
    z, oy, ox = torch.cat(rows, 1), y0 // B * B, x0 // B * B
    return z[None, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox]


class Upsampled:
    """The model's input: the LR image (1, C, h, w) bicubic-upsampled `scale` times, then padded at the bottom and
    right to (height, width) by reflection (by repetition where the padding is larger than the image), made a band
    of rows at a time from the few LR rows each band needs; the same values as upsampling the whole image at once."""

    def __init__(self, lr: torch.Tensor, scale: int, height: int, width: int):
        self.lr, self.s = lr, scale
        self.H, self.W = lr.shape[-2] * scale, lr.shape[-1] * scale
        reflect = height - self.H < self.H and width - self.W < self.W
        pad = lambda i, n: torch.where(i < n, i, 2 * n - 2 - i) if reflect else i.clamp(max=n - 1)
        self.row, self.col = pad(torch.arange(height), self.H), pad(torch.arange(width), self.W)

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows a..b of the padded, upsampled image, its whole width: (1, C, b - a, width)."""
        src = self.row[a:b]
        lo, hi = int(src.min()), int(src.max()) + 1
        # the LR rows these need, with 3 rows to spare: bicubic reads 2 on each side, so the crop's own edges
        # (where it clamps) are never read for these rows, unless they are the image's edges anyway
        la, lb = max(0, lo // self.s - 3), min(self.lr.shape[-2], -(-hi // self.s) + 3)
        band = upsample(self.lr[..., la:lb, :], ((lb - la) * self.s, self.W))
        return band[..., src - la * self.s, :][..., self.col]


def memory_plan(model: YonosSR, width: int, height: int, tile: int, overlap: int, in_memory: bool = True,
                workers: int | None = None) -> dict:
    """What upscaling a width x height input will take, before any work: the output size, the tiles and batches,
    and an upper bound of the bytes it will allocate beyond what is in use (the tile batches in flight with their
    activations, the bands of rows held, and the output image when it is kept in memory rather than streamed to a
    file; the model is loaded already). The
    activations are bounded per network, level by level, from the configs: every tensor a level keeps (the U-Net's
    skips) plus four working tensors at the widest point, and attention's score matrices as if materialised."""
    f, s, c = model.vae.config.factor, model.scale, model.vae.config.latent_channels
    m = model.multiple
    H, W = height * s, width * s
    Hp, Wp = H + -H % m, W + -W % m
    h, w = Hp // f, Wp // f
    th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
    tiles = len(tile_starts(h, th, overlap)) * len(tile_starts(w, tw, overlap))
    per_batch = max(1, 64 * 64 // (th * tw))
    cells = per_batch * th * tw
    u, v = model.unet.config, model.vae.config
    levels = len(u.block_out_channels)
    at = lambda i: cells / 4 ** i  # latent cells of the batch at U-Net level i
    skips = sum((u.layers_per_block + 1) * ch * at(i) for i, ch in enumerate(u.block_out_channels))
    work = max(8 * ch * at(i) for i, ch in enumerate(u.block_out_channels))
    attn = max([at(i) ** 2 / per_batch * heads for i, (a, heads) in enumerate(zip(u.attn_levels, u.num_heads))
                if a] + [at(levels - 1) ** 2 / per_batch * u.num_heads[-1]])
    pixels = cells * f * f  # pixels of the batch at the image's resolution
    vae_levels = len(v.block_out_channels)
    vae = max(6 * ch * pixels / 4 ** i for i, ch in enumerate(v.block_out_channels)) + (cells ** 2 / per_batch)
    element = torch.finfo(model.context.dtype).bits // 8
    batch = (max(skips + work + attn, vae) + 2 * (3 * pixels + c * cells)) * element
    workers = workers or (torch.get_num_threads() if model.context.device.type == "cpu" else 1)
    in_flight = min(workers + 1, -(-tiles // per_batch))
    bands = 4 * (th * f + 2 * 128 + 4 * HALO) * Wp * 4  # running sums, colour-fix rows, input bands (fp32)
    # measured on the shipped x4 (sample.py, outputs 512 to 2560 px wide, peak RSS): what the bands really cost is
    # 5-10x their own size (the interpolation's and the colour fix's temporaries, per-thread allocator arenas), and
    # 40-50 MB more go to the worker pool whatever the size; x12 and 64 MB bound both, the batches get x2 of slack
    total = 2 * in_flight * batch + 12 * bands + 64 * 2 ** 20 + (H * W * 4 if in_memory else 0)
    return {"output": (W, H), "tiles": tiles, "batches": -(-tiles // per_batch), "bytes": int(total)}


# -----------------------------------------------------------------------------
# a whole picture, a band of rows at a time


def bands_of_sr(model: YonosSR, src: Upsampled, seed: int, steps: int, guidance: float, tile: int, overlap: int,
                height: int, width: int, cells_per_batch: int = 64 * 64):
    """The blended SR output (before the colour fix) of the padded image, top to bottom: yields (first row, rows
    (1, 3, n, width)). Tiles are made row of tiles by row of tiles, in batches of up to `cells_per_batch` latent
    cells (one 64x64 SD tile's worth); each tile runs encode -> DDIM -> decode on its own pixels and its own slice of
    the image's noise (block_noise), and rows that no later tile touches are handed on and forgotten. On a CPU the
    batches run two or more at a time, one torch thread each (one per --threads): small convolutions use two cores
    better that way than split across both; the output is the same. At most workers + 1 batches are in flight."""
    f, c = model.vae.config.factor, model.vae.config.latent_channels
    h, w = height // f, width // f
    th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
    boxes = [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]
    per_batch = max(1, cells_per_batch // (th * tw))
    window = blend_window(th * f, tw * f, overlap * f // 2).to(src.lr.device)
    dtype, device = model.context.dtype, model.context.device
    cpu = device.type == "cpu" and not model.compiled  # compiled graphs: one shape, one layout, one thread
    memory_format = torch.channels_last if cpu else torch.contiguous_format
    model.to(memory_format=memory_format)
    batches = [boxes[i:i + per_batch] for i in range(0, len(boxes), per_batch)]
    workers = torch.get_num_threads() if cpu and len(batches) > 1 else 1
    inputs = {}  # tile row -> (x_up, noise) of its band, made once for all its tiles

    def batch_inputs(group):
        for y in {y for y, _ in group} - set(inputs):
            inputs[y] = (src.rows(y * f, (y + th) * f).to(dtype), block_noise(seed, c, y, y + th, 0, w).to(dtype))
        if model.compiled:  # every batch the same shape, so compiled graphs are reused: repeat the last tile
            group = group + group[-1:] * (per_batch - len(group))
        x_up = torch.cat([inputs[y][0][..., x * f:(x + tw) * f] for y, x in group]).contiguous(memory_format=memory_format)
        noise = torch.cat([inputs[y][1][..., x:x + tw] for y, x in group]).to(device)
        return x_up.to(device), noise

    def run(x_up, noise):
        return model.super_resolve(x_up, steps, noise, guidance)

    out = torch.zeros(1, 3, 0, width)  # rows r0.. of the running sums
    weight = torch.zeros(1, 1, 0, width)
    r0, last_y = 0, 0
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    if pool:
        torch.set_num_threads(1)
    try:
        pending = deque()
        todo = iter(batches)
        while True:
            while len(pending) < workers + 1 and (group := next(todo, None)) is not None:
                args = batch_inputs(group)
                pending.append((group, pool.submit(run, *args) if pool else run(*args)))
                for y in [y for y in inputs if y < group[0][0]]:  # bands no later tile reads
                    del inputs[y]
            if not pending:
                break
            group, sr = pending.popleft()
            sr = (sr.result() if pool else sr).float().cpu()
            if not torch.isfinite(sr).all():
                raise ValueError("the model produced non-finite values (NaN/Inf): its checkpoint is damaged")
            for k, (y, x) in enumerate(group):
                if y > last_y:  # every later tile starts at or below y: the rows above it are final
                    done = y * f - r0
                    yield r0, out[..., :done, :] / weight[..., :done, :]
                    out, weight, r0, last_y = out[..., done:, :], weight[..., done:, :], y * f, y
                end = (y + th) * f - r0
                if end > out.shape[2]:
                    grow = end - out.shape[2]
                    out = torch.cat([out, torch.zeros(1, 3, grow, width)], 2)
                    weight = torch.cat([weight, torch.zeros(1, 1, grow, width)], 2)
                rows, cols = slice(y * f - r0, end), slice(x * f, (x + tw) * f)
                out[..., rows, cols] += sr[k:k + 1] * window
                weight[..., rows, cols] += window
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
            torch.set_num_threads(workers)
    yield r0, out / weight


def color_fixed(bands, src: Upsampled, height: int, chunk: int = 128):
    """The colour fix (`color_fix`) applied to a stream of SR bands (first row, rows) of an image `height` rows
    tall, as if to the whole image: each output band is fixed together with HALO rows of context above and below
    (replicate padding only at the image's own edges), so the result is that of the whole-image colour fix."""
    buf, b0, done = None, 0, 0  # buf holds SR rows b0..; rows done.. have not been handed on yet
    for start, rows in bands:
        buf = rows if buf is None else torch.cat([buf, rows], 2)
        end = start + rows.shape[2]
        while end - done >= chunk + HALO or (end == height and done < height):
            stop = end if end == height else end - HALO
            lo, hi = max(0, done - HALO), min(height, stop + HALO)
            fixed = color_fix(buf[..., lo - b0:hi - b0, :], src.rows(lo, hi).float())
            yield done, fixed[..., done - lo:stop - lo, :]
            done = stop
            keep = max(0, done - HALO) - b0  # the rows above that the next band's context still needs
            buf, b0 = buf[..., keep:, :], b0 + keep


def prepare(image: Image.Image, model: YonosSR, tile: int | None, overlap: int | None):
    """What upscale_rows needs to know of an image: the LR tensor, its alpha (or None), the output size, the padded
    size, and the checked (tile, overlap)."""
    tile, overlap = tile_settings(model, tile, overlap)
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    s, m, f = model.scale, model.multiple, model.vae.config.factor
    H, W = image.height * s, image.width * s
    Hp, Wp = H + -H % m, W + -W % m
    if model.compiled and tile:  # no image smaller than a tile: tiles keep one shape
        Hp, Wp = max(Hp, tile * f), max(Wp, tile * f)
    lr = to_tensor(image.convert("RGB"))[None]
    return lr, alpha, (H, W), (Hp, Wp), tile, overlap


@torch.no_grad()
def upscale_rows(image: Image.Image, model: YonosSR, steps: int = 1, seed: int = 0, tile: int | None = None,
                 overlap: int | None = None, fix_colors: bool = True, guidance: float = 0.0):
    """The output of `upscale`, top to bottom: yields uint8 arrays (rows, width, 3), or 4 channels for an input
    with alpha. Memory: the model, one band of tiles and a few hundred rows of the output, whatever the image size
    (with tile 0, the whole image is one tile)."""
    lr, alpha, (H, W), (Hp, Wp), tile, overlap = prepare(image, model, tile, overlap)
    src = Upsampled(lr, model.scale, Hp, Wp)
    bands = bands_of_sr(model, src, seed, steps, guidance, tile, overlap, Hp, Wp)
    if fix_colors:
        bands = color_fixed(bands, src, Hp)
    for start, rows in bands:
        n = min(rows.shape[2], H - start)
        if n <= 0:
            continue
        a = ((rows[0, :, :n, :W].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        yield a if alpha is None else np.concatenate([a, alpha_rows(alpha, model.scale, start, start + n)[..., None]], 2)


def alpha_rows(alpha: Image.Image, s: int, a: int, b: int) -> np.ndarray:
    """Rows a..b of the alpha channel upscaled s times by Pillow's bicubic resize, from the LR rows they need (3
    rows to spare on each side, so Pillow's clipping at the box's edges never reaches them): the same bytes as
    resizing the whole channel."""
    la, lb = max(0, a // s - 3), min(alpha.height, -(-b // s) + 3)
    band = alpha.resize((alpha.width * s, (lb - la) * s), Image.BICUBIC, box=(0, la, alpha.width, lb))
    return np.asarray(band)[a - la * s:b - la * s]


def upscale(image: Image.Image, model: YonosSR, steps: int = 1, seed: int = 0, tile: int | None = None,
            overlap: int | None = None, fix_colors: bool = True, guidance: float = 0.0) -> Image.Image:
    """PIL image (any mode) -> PIL image `model.scale` times larger. RGBA keeps its alpha, upscaled bicubically;
    other modes come back as RGB. `tile` and `overlap` are in latent cells (None: `tile_settings`' defaults;
    tile 0: never tile); `fix_colors` applies `color_fix` against the bicubic upsampling; `guidance` is the
    classifier-free guidance weight on the LR condition (yonos.sample_v). A model that produces
    NaN or Inf (a damaged checkpoint) raises ValueError rather than returning a black image. Holds the output in
    memory (3 or 4 bytes a pixel); sample.py streams `upscale_rows` to disk instead."""
    rows = np.concatenate(list(upscale_rows(image, model, steps, seed, tile, overlap, fix_colors, guidance)))
    out = Image.fromarray(rows, "RGBA" if rows.shape[2] == 4 else "RGB")
    if "icc_profile" in image.info:
        out.info["icc_profile"] = image.info["icc_profile"]
    return out
