"""
Summarises a study over training seeds: eval.py reports whose models come from runs that differ only in their
seed (folders such as runs/tiny_s0, runs/tiny_s1, ...) become one row per model and step count, with the mean
over training seeds and its min..max, next to bicubic.

  python study.py results/study_x4.json                       # the table, to stdout
  python study.py results/study_x4.json --metric ssim
  python study.py results/guidance_w*.json --guidance-plot results/guidance.png   # w: sharpness vs PSNR

Models are grouped by their path with the seed folder's number replaced by '*' (runs/tiny_s*/x4.pt).
"""
import argparse
import json
import re
import sys

import numpy as np

from files import write_atomic

try:  # plots are optional
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None


def group(model: str) -> str:
    return re.sub(r"_s\d+(?=/)", "_s*", model)


def study_table(report: dict, metric: str = "psnr") -> str:
    """One row per (group, scale, steps): mean over training seeds of the per-seed mean (images and noise seeds)."""
    per_run = {}
    for e in report["summary"]:
        per_run.setdefault((group(e["model"]), e["scale"], e["steps"]), []).append(e[metric])
    lines = [f"| model | scale | steps | training seeds | {metric.upper()} mean (min..max) |", "|---|---|---|---|---|"]
    for (model, scale, steps), values in sorted(per_run.items(), key=lambda kv: (kv[0][1], kv[0][0] != "bicubic",
                                                                                  kv[0][0], kv[0][2])):
        fmt = "{:.2f}" if metric == "psnr" else "{:.4f}"
        spread = f" ({fmt.format(min(values))}..{fmt.format(max(values))})" if len(values) > 1 else ""
        lines.append(f"| {model} | x{scale} | {steps or '-'} | {len(values)} | {fmt.format(np.mean(values))}{spread} |")
    return "\n".join(lines)


def guidance_plot(reports: list[dict], path: str) -> str:
    """Classifier-free guidance weight w against PSNR and sharpness (gradient energy over the HR image's), one
    point per w, the mean over the models of the reports (training seeds): eval.py reports whose model names end in
    "w=W" (no suffix: w = 0). Returns the table it drew."""
    by_w = {}
    for report in reports:
        for e in report["summary"]:
            if e["model"] != "bicubic":
                m = re.search(r"w=([\d.]+)$", e["model"])
                by_w.setdefault(float(m.group(1)) if m else 0.0, []).append((e["psnr"], e["sharpness"]))
    points = [(w, *np.mean(v, axis=0)) for w, v in sorted(by_w.items())]
    if plt is not None:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.plot([p[2] for p in points], [p[1] for p in points], marker="o")
        for w, psnr, sharp in points:
            ax.annotate(f"w={w:g}", (sharp, psnr), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel="sharpness (gradient energy / HR's)", ylabel="PSNR (Y channel)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        write_atomic(path, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)
    return "\n".join(["| w | PSNR | sharpness |", "|---|---|---|"] +
                     [f"| {w:g} | {psnr:.2f} | {sharp:.3f} |" for w, psnr, sharp in points])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="JSON reports written by eval.py")
    p.add_argument("--metric", default="psnr", help="psnr, ssim, sharpness, lpips (default: psnr)")
    p.add_argument("--guidance-plot", default="", help="draw w vs sharpness and PSNR from the reports into this PNG")
    args = p.parse_args(argv)
    try:
        reports = [json.load(open(path, encoding="utf-8")) for path in args.reports]
        if args.guidance_plot:
            print(guidance_plot(reports, args.guidance_plot))
        else:
            print("\n\n".join(study_table(report, args.metric) for report in reports))
    except (OSError, ValueError, KeyError) as e:
        print(f"study.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
