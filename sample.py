"""
Super-resolves images with a YONOS-SR checkpoint, in one DDIM step by default.

  python sample.py img.png                      # -> img_x4.png beside it, with the shipped x4 model
  python sample.py img.png --scale 8            # the shipped x8 model (2, 4 or 8)
  python sample.py photos/ --out results/       # every image in a folder (subfolders mirrored under --out)
  python sample.py img.png --steps 4 --seed 1   # more sampling steps, another noise draw
  python sample.py img.png --ckpt x4.pt         # your own model from train.py

Any size: the input is padded to what the VAE and U-Net need and cropped back; large images go through
overlapping latent tiles of the model's training size, so memory stays bounded (upscale.py). The output's low
frequencies come from the bicubic input (colour fix; --no-color-fix shows the model's raw output).
In Python: `from upscale import upscale; from yonos import YonosSR; upscale(Image.open(p), YonosSR.load(ckpt))`.

References: Noroozi et al., YONOS-SR, arXiv 2401.17258.
"""
import argparse
import os
import sys
import time

import torch

from data import list_images, open_image
from files import write_atomic
from upscale import tile_settings, upscale
from yonos import YonosSR, resolve_device

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = {s: os.path.join(HERE, "assets", f"yonos_x{s}.pt") for s in (2, 4, 8)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def positive(s: str) -> int:
    try:
        value = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: sys.exit(print(f"sample.py: error: {msg}", file=sys.stderr) or 2)  # one line, no usage
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--scale", type=int, choices=sorted(SHIPPED), default=4,
                   help="which shipped model to use, assets/yonos_x{2,4,8}.pt where that file exists "
                        "(only x4 ships today; default: 4; ignored with --ckpt)")
    p.add_argument("--ckpt", default="", help="model checkpoint from train.py (default: the shipped model of --scale)")
    p.add_argument("--steps", type=positive, default=None,
                   help="DDIM steps (default: 1, the point of YONOS-SR, or the count a model was distilled for)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w on the LR image: "
                   "(1+w) v(z_l) - w v(0), sharper and less faithful as w grows; needs a model trained with "
                   "--cond-drop or distilled with --stage guided (default: 0, no guidance)")
    p.add_argument("--out", default="", help="output file (one input) or folder (default: <name>_x<scale>.png "
                                             "beside each input)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--tile", type=int, default=None, help="tile size in latent cells; 0: never tile (default: the "
                   "tile the checkpoint records, else the latent size of its training crops; 64 for SD-based models)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in latent cells (default: 1/16 of the tile "
                   "for models that add a residual to the LR latent, as the shipped ones; half the tile for others)")
    p.add_argument("--color-fix", action=argparse.BooleanOptionalAction, default=True,
                   help="take the low frequencies (colours, smooth shading) from the bicubic input, as StableSR's "
                        "wavelet colour fix; --no-color-fix shows the model's raw output (default: on)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="model precision (default: fp32)")
    p.add_argument("--compile", action="store_true", help="compile the U-Net and VAE with CUDA graphs (CUDA only: a "
                   "one-time cost of a minute or more, then each image is much faster; a note and eager elsewhere)")
    p.add_argument("--threads", type=positive, default=None, help="CPU threads (default: what torch picks)")
    p.add_argument("--max-pixels", type=positive, default=4_000_000,
                   help="refuse inputs with more pixels than this (default: 4,000,000; memory grows with the output)")
    return p.parse_args(argv)


def plan(inputs: list[str], out: str, scale: int) -> list[tuple[str, str]]:
    """(input, output) pairs. Outputs go beside their inputs, or under --out (a folder's subfolders mirrored).
    A folder's files that are outputs of an earlier run (<name>_x<scale>.png next to <name>.*) are skipped;
    two inputs that would write one output are an error before any work."""
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
    plan, seen = [], {}
    for src, sub in pairs:
        name = os.path.splitext(os.path.basename(src))[0] + f"_x{scale}.png"
        dst = os.path.normpath(os.path.join(out, sub, name) if many and out else out or
                               os.path.join(os.path.dirname(src), name))
        if os.path.abspath(dst) in seen:
            raise ValueError(f"{seen[os.path.abspath(dst)]} and {src} would both be written to {dst}; "
                             "rename one or run them separately")
        seen[os.path.abspath(dst)] = src
        plan.append((src, dst))
    return plan


def main(argv=None) -> int:
    args = parse_args(argv)
    err = lambda msg: print(f"sample.py: error: {msg}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.ckpt or SHIPPED[args.scale]
    if not args.ckpt and not os.path.exists(ckpt):
        err(f"no x{args.scale} model is shipped yet ({os.path.relpath(ckpt)}): train one (README, \"Your first hour\") "
            f"and pass it with --ckpt")
        return 2
    try:
        device = resolve_device(args.device)
        model = YonosSR.load(ckpt, device, DTYPES[args.dtype])
        tile, overlap = tile_settings(model, args.tile, args.overlap)
        if tile < 0 or tile % (model.multiple // model.vae.config.factor):
            raise ValueError(f"--tile must be 0 or a positive multiple of "
                             f"{model.multiple // model.vae.config.factor} for this model, not {tile}")
        if overlap < 0 or (tile and overlap >= tile):
            raise ValueError(f"--overlap must be in 0..{tile - 1} for --tile {tile}")
        jobs = plan(args.inputs, args.out, model.scale)
        note = model.compile() if args.compile else None
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
    inputs = {os.path.abspath(src) for src, _ in jobs}
    failed = []
    for src, dst in jobs:
        try:
            if os.path.abspath(dst) in inputs:
                raise ValueError(f"{dst}: is an input; refusing to overwrite it")
            if os.path.exists(dst) and not args.force:
                raise ValueError(f"{dst}: exists (pass --force to overwrite)")
            rgb, alpha = open_image(src, args.max_pixels)
            if alpha is not None:
                rgb.putalpha(alpha)
            t0 = time.time()
            out = upscale(rgb, model, steps, args.seed, tile, overlap, args.color_fix, args.guidance)
            write_atomic(dst, lambda f: out.save(f, format="PNG"))
            print(f"{src} ({rgb.width}x{rgb.height}) -> {dst} ({out.width}x{out.height}, {time.time() - t0:.1f}s)")
        except (ValueError, OSError) as e:
            err(str(e).splitlines()[0])
            failed.append(src)
    if len(jobs) > 1:
        failures = f"; failed: {', '.join(failed)}" if failed else ""
        print(f"{len(jobs) - len(failed)} of {len(jobs)} images done{failures}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
