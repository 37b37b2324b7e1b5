"""
Super-resolves images with a YONOS-SR checkpoint, in one DDIM step by default.

  python sample.py img.png                      # -> img_x4.png beside it, with the shipped x4 model
  python sample.py photo.jpg --real             # the shipped x4 for real photos (JPEG, noise): see below
  python sample.py img.png --scale 8            # the shipped x8 model (2, 4 or 8)
  python sample.py photos/ --out results/       # every image in a folder (subfolders mirrored under --out)
  python sample.py img.png --out big.jpg        # the format follows the extension (png, jpg, webp, bmp, tif)
  python sample.py img.png --steps 4 --seed 1   # more sampling steps, another noise draw
  python sample.py img.png --ckpt x4.pt         # your own model from train.py

Which model: --real for photos as phones, cameras and the web give them (JPEG files, visible noise or
compression blocks); the default for clean images (PNG/lossless sources, renders, images that were only resized).

Any size: the input is upsampled and padded a band of rows at a time, the model runs on overlapping latent tiles
of its training size, and a PNG output is written as its rows are made, so memory stays bounded by the tile, not the
image (upscale.py); before each image it says what it will need, and refuses, in one line, what would not fit. The
output's low frequencies come from the bicubic input (colour fix; --no-color-fix shows the model's raw output).
In Python: `from upscale import upscale; from yonos import YonosSR; upscale(Image.open(p), YonosSR.load(ckpt))`.

References: Noroozi et al., YONOS-SR, arXiv 2401.17258.
"""
import argparse
import io
import os
import sys
import time

import torch

from data import FORMATS, list_images, open_image
from files import check_outputs, write_atomic, write_png
from runtime import available_memory, compile_model, current_rss, pick_dtype, resolve_device
from upscale import memory_plan, tile_settings, upscale, upscale_rows
from yonos import YonosSR

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = {s: os.path.join(HERE, "assets", f"yonos_x{s}.pt") for s in (2, 4, 8)}
SHIPPED_REAL = {s: os.path.join(HERE, "assets", f"yonos_x{s}_real.pt") for s in (4,)}
WRITERS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
           ".tiff": "TIFF"}
SEED_MAX = 2 ** 31 - 1


def whole(low: int, high: int | None = None):
    """An argparse type: a whole number in low..high."""
    def parse(s: str) -> int:
        try:
            value = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, not {value}" if high is not None else
                                             f"must be at least {low}, not {value}")
        return value
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: sys.exit(print(f"sample.py: error: {msg}", file=sys.stderr) or 2)  # one line, no usage
    p.add_argument("inputs", nargs="+", help="image files or folders of images (PNG, JPEG, WebP, BMP, TIFF, "
                                             "recognised by content)")
    p.add_argument("--scale", type=int, choices=sorted(SHIPPED), default=4,
                   help="which shipped model to use, assets/yonos_x{2,4,8}.pt (default: 4; ignored with --ckpt)")
    p.add_argument("--real", action="store_true", help="the shipped model trained for real photos (JPEG, noise, "
                   "slight blur), assets/yonos_x4_real.pt (x4 only): for photos from phones, cameras and the web")
    p.add_argument("--ckpt", default="", help="model checkpoint from train.py (default: the shipped model of --scale)")
    p.add_argument("--steps", type=whole(1, 1000), default=None,
                   help="DDIM steps (default: 1, the point of YONOS-SR, or the count a model was distilled for)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w on the LR image: "
                   "(1+w) v(z_l) - w v(0), sharper and less faithful as w grows; needs a model trained with "
                   "--cond-drop or distilled with --stage guided (default: 0, no guidance)")
    p.add_argument("--out", default="", help="output file (one input; its extension picks the format: png, jpg, "
                   "webp, bmp, tif) or folder (default: <name>_x<scale>.png beside each input)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (never an input)")
    p.add_argument("--seed", type=whole(0, SEED_MAX), default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--tile", type=int, default=None, help="tile size in latent cells; 0: never tile, one pass over "
                   "the whole image (memory grows with it) (default: the tile the checkpoint records, else the latent "
                   "size of its training crops; 64 for SD-based models)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in latent cells (default: 1/16 of the tile "
                   "for models that add a residual to the LR latent, as the shipped ones; half the tile for others)")
    p.add_argument("--color-fix", action=argparse.BooleanOptionalAction, default=True,
                   help="take the low frequencies (colours, smooth shading) from the bicubic input, as StableSR's "
                        "wavelet colour fix; --no-color-fix shows the model's raw output (default: on)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="model precision (default: auto, bf16 on a GPU or CPU that computes it natively, else fp32)")
    p.add_argument("--compile", action="store_true", help="compile the U-Net and VAE with CUDA graphs (CUDA only: a "
                   "one-time cost of a minute or more, then each image is much faster; a note and eager elsewhere)")
    p.add_argument("--threads", type=whole(1), default=None, help="CPU threads (default: what torch picks)")
    p.add_argument("--max-pixels", type=whole(1), default=100_000_000,
                   help="refuse an input whose output would have more pixels than this, before reading it (default: "
                        "100,000,000, e.g. a 2500x2500 photo at x4; time and the file grow with it)")
    return p.parse_args(argv)


def plan(inputs: list[str], out: str, scale: int) -> list[tuple[str, str]]:
    """(input, output) pairs. Outputs go beside their inputs, or under --out (a folder's subfolders mirrored).
    A folder's files that are outputs of an earlier run (<name>_x<scale>.png next to <name>.*) are skipped;
    two inputs that would write one output, an output that is an input or a link, or an output format we do not
    write, are errors before any work (files.check_outputs)."""
    pairs = []
    for src in inputs:
        if os.path.isdir(src):
            found = list_images(src)
            stems = {os.path.splitext(f)[0] for f in found}
            found = [f for f in found if not (f.endswith(f"_x{scale}.png") and f[:-len(f"_x{scale}.png")] in stems)]
            if not found:
                raise ValueError(f"{src}: no images in this folder")
            pairs += [(f, os.path.relpath(os.path.dirname(f), src)) for f in found]
        else:
            pairs.append((src, "."))
    many = len(pairs) > 1 or (out and (os.path.isdir(out) or out.endswith(os.sep)))
    jobs = []
    for src, sub in pairs:
        name = os.path.splitext(os.path.basename(src))[0] + f"_x{scale}.png"
        dst = os.path.normpath(os.path.join(out, sub, name) if many and out else out or
                               os.path.join(os.path.dirname(src), name))
        if os.path.splitext(dst)[1].lower() not in WRITERS:
            raise ValueError(f"{dst}: cannot write this format (the extension picks it: "
                             f"{', '.join(sorted(WRITERS))})")
        jobs.append((src, dst))
    try:
        check_outputs([dst for _, dst in jobs], [src for src, _ in jobs])
    except ValueError as e:  # name the two inputs when two of them would write one output
        dsts = [os.path.realpath(dst) for _, dst in jobs]
        clash = next((i for i, d in enumerate(dsts) if dsts.index(d) != i), None)
        if clash is None:
            raise
        raise ValueError(f"{jobs[dsts.index(dsts[clash])][0]} and {jobs[clash][0]} would both be written to "
                         f"{jobs[clash][1]}; rename one or run them separately") from e
    return jobs


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding it (data.open_image checks the rest)."""
    from PIL import Image
    try:
        im = Image.open(path, formats=FORMATS)
    except Exception:
        return open_image(path)[0].size  # fails where Image.open failed, with data.open_image's one-line message
    with im:
        try:
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
        except Exception:  # a damaged EXIF block: open_image will say what is wrong
            turned = False
        return im.size[::-1] if turned else im.size


def upscale_one(src: str, dst: str, model: YonosSR, args, steps: int, tile: int, overlap: int, say) -> None:
    """One image: checks the plan against --max-pixels and the memory there is, says it, then works. A PNG is
    written as its rows are made; other formats are kept in memory and saved at the end."""
    w, h = image_size(src)
    stream = os.path.splitext(dst)[1].lower() == ".png"
    need = memory_plan(model, w, h, tile, overlap, in_memory=not stream)
    W, H = need["output"]
    if W * H > args.max_pixels:
        raise ValueError(f"{src}: the x{model.scale} output would be {W}x{H} = {W * H:,} pixels, larger than the limit "
                         f"of --max-pixels {args.max_pixels:,}")
    free, now = available_memory(model.context.device), current_rss()
    if need["bytes"] > free:
        raise ValueError(f"{src}: needs about {need['bytes'] / 2 ** 20:,.0f} MB more, {free / 2 ** 20:,.0f} MB are free; "
                         f"use a smaller --tile, a PNG output, or a smaller image (--max-pixels)")
    say(f"{src}: {w}x{h} -> {W}x{H}, x{model.scale}, {steps} step(s), {need['tiles']} tiles in {need['batches']} "
        f"batches, needs about {(now + need['bytes']) / 2 ** 20:,.0f} MB in all ({now / 2 ** 20:,.0f} MB in use now)")
    rgb, alpha = open_image(src, max(args.max_pixels // model.scale ** 2, 1))
    if alpha is not None:
        rgb.putalpha(alpha)
    icc = rgb.info.get("icc_profile")
    t0 = time.time()
    settings = (steps, args.seed, tile, overlap, args.color_fix, args.guidance)
    if stream:
        write_atomic(dst, lambda f: write_png(f, W, H, upscale_rows(rgb, model, *settings), icc))
    else:
        out = upscale(rgb, model, *settings)
        fmt = WRITERS[os.path.splitext(dst)[1].lower()]
        if fmt == "JPEG" and out.mode == "RGBA":
            say(f"note: {dst}: JPEG has no alpha channel; it is dropped")
            out = out.convert("RGB")
        extra = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
        buf = io.BytesIO()  # Pillow's JPEG and TIFF writers seek, which a file being written atomically cannot
        out.save(buf, format=fmt, **extra, **({"icc_profile": icc} if icc else {}))
        write_atomic(dst, buf.getvalue())
    say(f"{src} ({w}x{h}) -> {dst} ({W}x{H}, {time.time() - t0:.1f}s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    err = lambda msg: print(f"sample.py: error: {msg}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    shipped = SHIPPED_REAL if args.real else SHIPPED
    ckpt = args.ckpt or shipped.get(args.scale, "")
    if not args.ckpt and not os.path.exists(ckpt):
        kind = "real-photo " if args.real else ""
        err(f"no x{args.scale} {kind}model is shipped ({os.path.relpath(ckpt) if ckpt else 'scale ' + str(args.scale)}):"
            f" train one (README, \"Your first hour\") and pass it with --ckpt")
        return 2
    try:
        device = resolve_device(args.device)
        model = YonosSR.load(ckpt, device, pick_dtype(args.dtype, device))
        tile, overlap = tile_settings(model, args.tile, args.overlap)
        jobs = plan(args.inputs, args.out, model.scale)
        check_outputs([dst for _, dst in jobs], [src for src, _ in jobs] + [ckpt])
        note = compile_model(model) if args.compile else None
        for folder in {os.path.dirname(os.path.abspath(dst)) for _, dst in jobs}:  # before any work, not after it
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise ValueError(f"{folder}: cannot write there")
    except (FileNotFoundError, ValueError, OSError) as e:
        err(str(e).splitlines()[0])
        return 2
    if note:
        print(note)
    steps = args.steps or model.meta.get("sampling_steps", 1)
    failed = []
    for src, dst in jobs:
        try:
            if os.path.exists(dst) and not args.force:
                raise ValueError(f"{dst}: exists (pass --force to overwrite)")
            upscale_one(src, dst, model, args, steps, tile, overlap, print)
        except (ValueError, OSError) as e:
            err(str(e).splitlines()[0])
            failed.append(src)
        except MemoryError:
            err(f"{src}: ran out of memory; use a smaller --tile or a smaller image")
            failed.append(src)
    if len(jobs) > 1:
        failures = f"; failed: {', '.join(failed)}" if failed else ""
        print(f"{len(jobs) - len(failed)} of {len(jobs)} images done{failures}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
