"""
Measures super-resolution checkpoints against the bicubic baseline on a folder of HR images.

  python eval.py assets/yonos_x4.pt --data photos/test --steps 1,2,4 --seeds 0,1 --out runs/eval/x4
  python eval.py runs/vae.pt --data photos/val               # a VAE file: its reconstruction vs bicubic
  python eval.py assets/yonos_x4_real.pt --protocol web      # LR inputs as people have them (below)
  python eval.py assets/yonos_x4.pt --lr-jpeg 75 --lr-noise 2    # one such input kind

Degrade -> super-resolve -> score -> report. Each HR image, cut to a multiple of the scale, is degraded (bicubic,
rounded to 8 bits like a real LR file), super-resolved at each step count and noise seed (upscale.py, as sample.py
does) and scored (metrics.py): PSNR and SSIM on the Y channel with a border of `scale` pixels cropped, the SR
convention; sharpness (gradient energy over the HR image's: below 1 is blurrier); blockiness (metrics.blockiness:
how much the LR's JPEG block edges, 8 x scale pixels apart, show in the output; about 0 is none); LPIPS with
--lpips, FID with --fid. Writes <out>.json, <out>.csv and, with matplotlib, <out>.png (metric vs steps). Checkpoints
and the output folder are checked before the long work; an image that cannot be scored is reported and left out.

The degraded-input protocol (--protocol web, fixed; or one kind with --lr-jpeg/--lr-noise): the 8-bit bicubic LR
of each HR image, then Gaussian noise of std SIGMA (8-bit units, every channel, seeded by the image's index), then
a JPEG round trip at quality Q through Pillow (4:2:0), as a camera or web page saves it (data.web_lr). The kinds:
clean; JPEG q95, q75, q50; q75 and q50 with noise 2. The bicubic baseline upsamples the same degraded LR.

References: Noroozi et al., YONOS-SR, arXiv 2401.17258.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import bicubic_lr, list_images, open_image, to_image, to_tensor, upsample, web_lr
from files import check_outputs, json_text, read_checkpoint, write_atomic, write_figure
from metrics import LPIPS, InceptionV3, blockiness, frechet_distance, gradient_energy, psnr_y, ssim_y
from runtime import pick_dtype
from upscale import tile_settings, upscale
from vae import AutoencoderKL
from yonos import YonosSR

try:  # plots are optional
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

METRICS = ("psnr", "ssim", "sharpness", "blockiness", "lpips", "fid")
WEB = [("clean", 0, 0.0), ("q95", 95, 0.0), ("q75", 75, 0.0), ("q50", 50, 0.0), ("q75+n2", 75, 2.0),
       ("q50+n2", 50, 2.0)]  # --protocol web: (name, JPEG quality or 0, noise std in 8-bit units)
SEED_MAX = 2 ** 31 - 1


def number(s: str) -> int:  # for the options that count things
    if int(s) < 1:
        raise ValueError(f"expected a positive whole number, not {s}")
    return int(s)


def load_model(path: str, dtype: torch.dtype = torch.float32) -> YonosSR | AutoencoderKL:
    """Any of our model files: an SR model (YonosSR, cast to `dtype`), or a stand-alone VAE (from train.py --stage
    vae)."""
    _, header = read_checkpoint(path)
    return YonosSR.load(path, "cpu", dtype) if "unet" in header else AutoencoderKL.load(path).eval()

# -----------------------------------------------------------------------------
# degrade


def prepare(path: str, scale: int, crop: int = 0, jpeg: int = 0, noise: float = 0.0,
            seed: int = 0) -> tuple[np.ndarray, Image.Image]:
    """HR (a centre crop of `crop` pixels if given, cut to a multiple of the scale) as uint8 RGB, and its 8-bit
    bicubic LR image, degraded by the protocol's noise and JPEG (data.web_lr) when given."""
    img, _ = open_image(path)
    if crop:
        left, top = max(0, (img.width - crop) // 2), max(0, (img.height - crop) // 2)
        img = img.crop((left, top, min(img.width, left + crop), min(img.height, top + crop)))
    w, h = img.width - img.width % scale, img.height - img.height % scale
    if min(w, h) < 2 * scale + 11:  # the scored region (inside the border) must hold SSIM's 11x11 window
        raise ValueError(f"{path}: {img.width}x{img.height} is too small to score at x{scale}")
    hr = img.crop((0, 0, w, h))
    return np.asarray(hr), web_lr(to_image(bicubic_lr(to_tensor(hr)[None], scale)[0]), jpeg, noise, seed)


def bicubic_up(lr: Image.Image, scale: int) -> np.ndarray:
    """The baseline: the same bicubic upsampling the model gets as its input, rounded to 8 bits."""
    return np.asarray(to_image(upsample(to_tensor(lr)[None], (lr.height * scale, lr.width * scale))[0]))


# -----------------------------------------------------------------------------
# super-resolve and score


def evaluate(models: dict, files: list[str], steps: list[int], seeds: list[int], lpips: LPIPS | None = None,
             crop: int = 0, tile: int | None = None, fix_colors: bool = True, vae_scale: int = 4,
             fid: InceptionV3 | None = None, guidance: float = 0.0, say=print,
             inputs: list[tuple[str, int, float]] = (("clean", 0, 0.0),)) -> tuple[list[dict], list[str]]:
    """One row per (model or 'bicubic', input kind, steps, seed, image) with its scores, and the list of failures.
    `models` maps a name to a YonosSR, or to an AutoencoderKL whose reconstruction is scored next to bicubic at
    `vae_scale`. `inputs` are the LR kinds (name, JPEG quality, noise std) of the degraded-input protocol. With
    `fid`, every row also holds the FID of its set (model, steps, seed) against the HR images."""
    rows, failed = [], []
    for kind, jpeg, noise in inputs:
        got, bad = evaluate_kind(models, files, steps, seeds, lpips, crop, tile, fix_colors, vae_scale, fid, guidance,
                                 say, jpeg, noise)
        rows += [r | {"input": kind} for r in got] if len(inputs) > 1 or kind != "clean" else got
        failed += bad
    return rows, sorted(set(failed))


def evaluate_kind(models, files, steps, seeds, lpips, crop, tile, fix_colors, vae_scale, fid, guidance, say,
                  jpeg: int = 0, noise: float = 0.0) -> tuple[list[dict], list[str]]:
    """evaluate() for one kind of LR input."""
    rows, failed, feats, hr_feats, scales_done = [], [], {}, {}, set()
    inception = lambda img: fid(to_tensor(Image.fromarray(img))[None])[0].numpy()

    def add(name, n, seed, path, sr, hr, scale):  # score: PSNR, SSIM, sharpness, blockiness (and LPIPS, FID)
        rows.append({"model": name, "steps": n, "seed": seed, "image": os.path.basename(path), "scale": scale,
                     "psnr": psnr_y(sr, hr, scale), "ssim": ssim_y(sr, hr, scale),
                     "sharpness": gradient_energy(sr) / max(gradient_energy(hr), 1e-9),
                     "blockiness": blockiness(sr, scale)})
        if lpips is not None:
            with torch.no_grad():
                rows[-1]["lpips"] = lpips(to_tensor(Image.fromarray(sr))[None], to_tensor(Image.fromarray(hr))[None]).item()
        if fid is not None:
            with torch.no_grad():
                feats.setdefault((name, scale, n, seed), []).append(inception(sr))
                hr_feats.setdefault((scale, path), inception(hr))

    for name, model in models.items():
        sr_model = isinstance(model, YonosSR)
        s = model.scale if sr_model else vae_scale
        for i, path in enumerate(files):
            try:
                hr, lr = prepare(path, s, crop, jpeg, noise, seed=i)
                if not sr_model:  # a VAE: its reconstruction bounds every SR model that decodes through it
                    f = model.config.factor
                    hr = hr[:hr.shape[0] // f * f, :hr.shape[1] // f * f]
                if s not in scales_done:
                    add("bicubic", 0, 0, path, bicubic_up(lr, s)[:hr.shape[0], :hr.shape[1]], hr, s)
                if not sr_model:
                    with torch.no_grad():
                        rec = model.decode(model.encode(to_tensor(Image.fromarray(hr))[None])[0])
                    add(name + " (reconstruction)", 0, 0, path, np.asarray(to_image(rec[0])), hr, s)
                    continue
                for n in steps:
                    for seed in seeds:
                        t0 = time.time()
                        sr = np.asarray(upscale(lr, model, n, seed, tile, fix_colors=fix_colors, guidance=guidance))
                        add(name + (" +colour fix" if fix_colors else "") + (f" w={guidance:g}" if guidance else ""),
                            n, seed, path, sr, hr, s)
                        say(f"{name} x{s} steps {n} seed {seed} {os.path.basename(path)}: PSNR {rows[-1]['psnr']:.2f} "
                            f"SSIM {rows[-1]['ssim']:.4f} ({time.time() - t0:.1f}s)")
            except ValueError as e:
                failed.append(str(e).splitlines()[0] if path in str(e) else f"{path}: {e}")
                rows = [r for r in rows if not (r["image"] == os.path.basename(path) and r["scale"] == s)]
                say(f"skipping {failed[-1]}")
        scales_done.add(s)
    for (name, scale, n, seed), fake in feats.items():
        value = frechet_distance(np.stack(fake), np.stack([v for (sc, _), v in hr_feats.items() if sc == scale]))
        for r in rows:
            if (r["model"], r["scale"], r["steps"], r["seed"]) == (name, scale, n, seed):
                r["fid"] = value
    return rows, failed


# -----------------------------------------------------------------------------
# report


def summarize(rows: list[dict]) -> list[dict]:
    """Mean over images, then mean and spread (min..max) over seeds, per (model, scale, steps)."""
    out = []
    kinds = list(dict.fromkeys(r.get("input", "") for r in rows))
    keys = sorted({(r["model"], r["scale"], r["steps"], r.get("input", "")) for r in rows},
                  key=lambda k: (k[1], kinds.index(k[3]), k[0] != "bicubic", k))
    for model, scale, n, kind in keys:
        sel = [r for r in rows if (r["model"], r["scale"], r["steps"], r.get("input", "")) == (model, scale, n, kind)]
        seeds = sorted({r["seed"] for r in sel})
        entry = {"model": model, "scale": scale, "steps": n, "images": len({r["image"] for r in sel}), "seeds": len(seeds)}
        if kind:
            entry["input"] = kind
        bicubic = [r for r in rows if (r["model"], r["scale"], r.get("input", "")) == ("bicubic", scale, kind)]
        if model != "bicubic" and bicubic:  # on how many images it beats bicubic (mean over seeds), in PSNR
            ref = {r["image"]: r["psnr"] for r in bicubic}
            mine = {im: np.mean([r["psnr"] for r in sel if r["image"] == im]) for im in ref}
            entry["wins"] = int(sum(mine[im] > ref[im] for im in ref if im in mine))
        for m in METRICS:
            if m in sel[0]:
                per_seed = [np.mean([r[m] for r in sel if r["seed"] == s]) for s in seeds]
                entry |= {m: float(np.mean(per_seed)), f"{m}_min": float(min(per_seed)), f"{m}_max": float(max(per_seed))}
        out.append(entry)
    return out


def table(summary: list[dict]) -> str:
    metrics = [m for m in METRICS if m in summary[0]]
    fmt = lambda m, v: "-" if v is None else f"{v:.2f}" if m in ("psnr", "fid") else f"{v:.4f}"
    kinds = any("input" in e for e in summary)
    lines = ["| model | scale | " + "input | " * kinds + "steps | seeds | " + " | ".join(
        m.upper() + " (Y)" * (m in ("psnr", "ssim")) for m in metrics) + " | wins |",
        "|---|---|" + "---|" * kinds + "---|---|" + "---|" * (len(metrics) + 1)]
    for e in summary:
        cells = [fmt(m, e[m]) + (f" ({fmt(m, e[m + '_min'])}..{fmt(m, e[m + '_max'])})" if e["seeds"] > 1 else "")
                 for m in metrics]
        wins = f"{e['wins']}/{e['images']}" if "wins" in e else ""
        lines.append(f"| {e['model']} | x{e['scale']} | " + (f"{e.get('input', '')} | " if kinds else "") +
                     f"{e['steps'] or '-'} | {e['seeds']} | " + " | ".join(cells) + f" | {wins} |")
    return "\n".join(lines)


def per_image_table(rows: list[dict], metric: str = "psnr") -> str:
    """metric per image (mean over seeds) for each (model, steps), and on how many images it beats the bicubic
    row above it (rows come sorted by scale, bicubic first)."""
    images = list(dict.fromkeys(r["image"] for r in rows))
    kinds = any("input" in r for r in rows)
    lines, bicubic = ["| model | scale | " + "input | " * kinds + "steps | " + " | ".join(images) + " | beats bicubic |",
                      "|---|---|---|" + "---|" * kinds + "---|" * (len(images) + 1)], []
    for model, scale, n, kind in dict.fromkeys((r["model"], r["scale"], r["steps"], r.get("input", "")) for r in rows):
        vals = [[r[metric] for r in rows if (r["model"], r["scale"], r["steps"], r.get("input", ""), r["image"]) ==
                 (model, scale, n, kind, im)] for im in images]
        means = [float(np.mean(v)) if v else None for v in vals]
        bicubic = means if model == "bicubic" else bicubic
        wins = sum(m is not None and b is not None and m > b for m, b in zip(means, bicubic))
        lines.append(f"| {model} | x{scale} | " + (f"{kind} | " if kinds else "") + f"{n or '-'} | " +
                     " | ".join(f"{m:.2f}" if m is not None else "" for m in means)
                     + (f" | {wins}/{len(images)} |" if model != "bicubic" else " | |"))
    return "\n".join(lines)


def plot(summary: list[dict], path: str, metric: str = "psnr") -> bool:
    """metric vs steps (log scale), one line per checkpoint, bicubic as a dashed line; False if no matplotlib."""
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for model, kind in dict.fromkeys((e["model"], e.get("input", "")) for e in summary):
        pts = sorted((e["steps"], e[metric], e["scale"]) for e in summary if (e["model"], e.get("input", "")) ==
                     (model, kind))
        bicubic, model = model == "bicubic", f"{model} {kind}".strip()
        if bicubic:
            for _, v, s in pts:
                ax.axhline(v, linestyle="--", color="gray", linewidth=1)
                ax.annotate(f"bicubic x{s}", (1, v), fontsize=8, color="gray")
        elif pts[0][0] > 0:  # VAE reconstructions have no steps
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} (x{pts[0][2]})")
    ax.set(xscale="log", xlabel="DDIM steps", ylabel=f"{metric.upper()} (Y channel)" if metric != "lpips" else "LPIPS")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_figure(path, fig)
    return True


def figure(models: list[YonosSR], image: str, path: str, box: int = 96, steps: int = 1, fix_colors: bool = True,
           jpeg: int = 0, noise: float = 0.0, one_row: bool = False, names: list[str] | None = None):
    """One row per model: LR input | bicubic | yonos | HR on a centre crop of `image` (`box` LR pixels of the x4
    row a side, the same HR region in every row), with the Y-PSNR of the crop under bicubic and yonos. With
    `one_row` (models of one scale): LR | bicubic | each model | HR. `jpeg`/`noise`: the LR degraded as --lr-jpeg and
    --lr-noise do."""
    rows = []
    for k, model in enumerate(models):
        s = model.scale
        hr, lr = prepare(image, s, jpeg=jpeg, noise=noise)
        b = min(box * 4 // s, lr.width, lr.height)
        left, top = (lr.width - b) // 2, (lr.height - b) // 2
        lr, hr = lr.crop((left, top, left + b, top + b)), Image.fromarray(hr).crop((left * s, top * s, (left + b) * s,
                                                                                     (top + b) * s))
        bic, sr = bicubic_up(lr, s), np.asarray(upscale(lr, model, steps=steps, fix_colors=fix_colors))
        db = lambda x: f"{psnr_y(x, np.asarray(hr), s):.2f} dB"
        kind = f", JPEG q{jpeg}" * bool(jpeg) + f", noise {noise:g}" * bool(noise)
        name = names[k] if names else "yonos"
        rows.append([(f"x{s} LR input{kind}", lr.resize(hr.size, Image.NEAREST)), (f"bicubic, {db(bic)}", bic),
                     (f"{name}, {steps} step, {db(sr)}", sr), ("HR", hr)])
    if one_row:
        rows = [rows[0][:2] + [r[2] for r in rows] + rows[0][3:]]
    w, pad = max(r[-1][1].width for r in rows), 24
    canvas = Image.new("RGB", (len(rows[0]) * (w + 4) - 4, len(rows) * (w + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for i, (label, img) in enumerate(row):
            img = (Image.fromarray(img) if isinstance(img, np.ndarray) else img).convert("RGB").resize((w, w))
            canvas.paste(img, (i * (w + 4), r * (w + pad) + pad))
            draw.text((i * (w + 4) + 4, r * (w + pad) + 5), label, fill="black")
    write_atomic(path, lambda f: canvas.save(f, format="PNG"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    err = lambda msg: print(f"eval.py: error: {msg}", file=sys.stderr) or 2
    p.error = lambda msg: sys.exit(err(msg))  # one line, no usage
    p.add_argument("ckpts", nargs="+", help="checkpoints to evaluate (each at its own scale)")
    p.add_argument("--data", default="photos/test", help="folder of HR images (default: photos/test)")
    p.add_argument("--steps", default="1", help="comma-separated DDIM step counts (default: 1)")
    p.add_argument("--seeds", default="0", help="comma-separated noise seeds (default: 0)")
    p.add_argument("--protocol", choices=("clean", "web"), default="clean", help="clean: the bicubic LR (default); "
                   "web: each image also as JPEG q95/q75/q50 and q75/q50 with noise 2 (see above)")
    p.add_argument("--lr-jpeg", type=int, default=0, help="one degraded kind instead: a JPEG round trip of the LR at "
                   "this quality, 1..100 (default: 0, none)")
    p.add_argument("--lr-noise", type=float, default=0.0, help="with it, or alone: Gaussian noise of this std (8-bit "
                   "units) on the LR before the JPEG (default: 0)")
    p.add_argument("--lpips", default="", help="folder/Hub repo with vgg16-397923af.pth and vgg.pth (default: no LPIPS)")
    p.add_argument("--fid", default="", help=f"{InceptionV3.WEIGHTS} or a folder/Hub repo with it (default: no FID)")
    p.add_argument("--limit", type=number, default=None, help="use the first N images only")
    p.add_argument("--vae-scale", type=number, default=4, help="for VAE files: the bicubic scale to compare with")
    p.add_argument("--color-fix", action=argparse.BooleanOptionalAction, default=True, help="as sample.py (default: on)")
    p.add_argument("--tile", type=int, default=None, help="latent tile size, as sample.py (default: the one the "
                   "checkpoint records, else its training crop)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight, as sample.py")
    p.add_argument("--crop", type=int, default=0, help="evaluate on a centre crop of N HR pixels (default: whole)")
    p.add_argument("--figure", default="", help="instead: LR | bicubic | yonos | HR of --data's first image, a row each")
    p.add_argument("--figure-row", action="store_true", help="with --figure, models of one scale: one row, LR | bicubic "
                   "| each model | HR (the LR degraded by --lr-jpeg/--lr-noise if given)")
    p.add_argument("--figure-image", default="", help="with --figure: this image of --data instead of the first")
    p.add_argument("--dtype", default="fp32", help="the SR models' precision: fp32 (default: the reference), bf16, "
                   "fp16 or auto (what sample.py uses: bf16 on a CPU with native bf16)")
    p.add_argument("--threads", type=number, default=None, help="CPU threads (default: what torch picks)")
    p.add_argument("--out", default="runs/eval/eval", help="writes OUT.json, OUT.csv, OUT.png (default: runs/eval/eval)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # everything that can fail fast does so before the long work
        try:
            steps, seeds = [number(s) for s in args.steps.split(",")], [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ValueError("--steps takes comma-separated positive whole numbers (e.g. 1,2,4), --seeds whole "
                             "numbers") from None
        if any(not 0 <= s <= SEED_MAX for s in seeds) or any(n > 1000 for n in steps):
            raise ValueError(f"--seeds must be in 0..{SEED_MAX} and --steps in 1..1000")
        if not 0 <= args.lr_jpeg <= 100 or not 0 <= args.lr_noise <= 255 or args.crop < 0:
            raise ValueError("--lr-jpeg must be in 0..100, --lr-noise in 0..255 and --crop at least 0")
        inputs = WEB if args.protocol == "web" else [("clean", 0, 0.0)]
        if args.lr_jpeg or args.lr_noise:
            inputs = [(f"q{args.lr_jpeg}" * bool(args.lr_jpeg) + "+" * bool(args.lr_jpeg and args.lr_noise)
                       + f"n{args.lr_noise:g}" * bool(args.lr_noise), args.lr_jpeg, args.lr_noise)]
        files = list_images(args.data)[:args.limit] if os.path.isdir(args.data) else []
        if not files:
            raise ValueError(f"{args.data}: no images here (make the photos with: python data.py --export-photos photos)")
        outputs = [args.figure] if args.figure else [args.out + ext for ext in (".json", ".csv", ".png")]
        check_outputs(outputs, files + args.ckpts)
        data = os.path.realpath(args.data) + os.sep
        if any(os.path.realpath(o).startswith(data) for o in outputs):
            raise ValueError(f"{outputs[0]}: is inside --data {args.data}, where it would become one of the photos "
                             "scored; write it elsewhere")
        names = [os.path.basename(c) for c in args.ckpts]  # the file name, or the path where names repeat
        models = {n if names.count(n) == 1 else c: load_model(c, pick_dtype(args.dtype, torch.device("cpu")))
                  for n, c in zip(names, args.ckpts)}
        for name, m in models.items():
            if isinstance(m, YonosSR):
                try:
                    tile_settings(m, args.tile)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        if args.figure:
            if not all(isinstance(m, YonosSR) for m in models.values()):
                raise ValueError("--figure needs SR models, not VAE files")
            if args.figure_row and len({m.scale for m in models.values()}) > 1:
                raise ValueError("--figure-row needs models of one scale")
            image = next((f for f in files if os.path.basename(f) == args.figure_image), None) if args.figure_image \
                else files[0]
            if image is None:
                raise ValueError(f"--figure-image {args.figure_image}: not in {args.data}")
            figure(list(models.values()), image, args.figure, steps=steps[0], fix_colors=args.color_fix,
                   jpeg=args.lr_jpeg, noise=args.lr_noise, one_row=args.figure_row,
                   names=list(models) if args.figure_row else None)
            return print(f"wrote {args.figure}") or 0
        os.makedirs(folder := os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{folder}: cannot write there")
        lpips = LPIPS.load(args.lpips) if args.lpips else None
        fid = InceptionV3.load(args.fid) if args.fid else None
    except (FileNotFoundError, ValueError, OSError) as e:
        return err(str(e).splitlines()[0])
    if lpips is None:
        print("note: LPIPS skipped (pass --lpips DIR with vgg16-397923af.pth and vgg.pth to include it)")
    if fid is None:
        print(f"note: FID skipped (pass --fid with {InceptionV3.WEIGHTS} to include it)")
    rows, failed = evaluate(models, files, steps, seeds, lpips, args.crop, args.tile, args.color_fix, args.vae_scale, fid,
                            args.guidance, inputs=inputs)
    if not rows:
        return err("no image could be scored: " + "; ".join(failed))
    summary = summarize(rows)
    print(table(summary) + "\n\nPSNR (Y) per image, mean over seeds:\n" + per_image_table(rows))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    try:
        write_atomic(args.out + ".json", json_text({"rows": rows, "summary": summary, "failed": failed}))
        write_atomic(args.out + ".csv", "\n".join([",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols)
                                                                   for r in rows]) + "\n")
        made = plot(summary, args.out + ".png")
    except OSError as e:
        return err(str(e).splitlines()[0])
    print(f"wrote {args.out}.json, {args.out}.csv" + (f", {args.out}.png" if made else " (no matplotlib: no plot)"))
    if failed:
        print(f"eval.py: {len(failed)} image(s) could not be scored: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
