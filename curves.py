"""
Training curves: the loss and the validation PSNR of one or more runs against the step, from the
`<out>.log.jsonl` files train.py writes. Use it to compare your run with the reference runs in the README.

  python curves.py runs/tiny/x4.pt.log.jsonl runs/tiny/x4_plain.pt.log.jsonl --out runs/tiny/curves.png
  python curves.py runs/tiny/*.log.jsonl

The loss is smoothed (a moving average over --smooth logged points); validation PSNR (Y channel, held-out
crops) is drawn as logged, with the bicubic input's PSNR of the same crops dashed. Needs matplotlib.

Losses of different objectives are not comparable: a scale-distilled run's loss is its distance to the teacher's x0,
a plain run's to z_h, which holds noise no model can predict (README, "Why scale distillation can help"), so the
distilled curve lies lower without its model being better. Each curve's label says which target it measures (read
from the run's model file); compare models by the validation PSNR panel.
"""
import argparse
import json
import os
import sys

import numpy as np

from files import check_outputs, read_header, write_figure

try:  # a test-time dependency; the one-line error below says so when it is missing
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None


def read_log(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{n}: not a JSON line (is it a train.py log?)") from None
    if not rows or "step" not in rows[0]:
        raise ValueError(f"{path}: no training log lines")
    return rows


def target_of(log_path: str) -> str:
    """What the run's loss measures, from its model file's header: the teacher's x0 (scale distillation), z_h (the
    plain objective), or the run's stage."""
    try:
        meta = read_header(log_path.removesuffix(".log.jsonl")).get("meta", {})
    except (OSError, ValueError):
        return "?"
    stage = meta.get("stage", "?")
    if stage == "sr":
        return "vs the teacher's x0" if meta.get("teacher") else "vs z_h"
    return {"steps": "vs two teacher steps", "guided": "vs the guided teacher", "vae": "reconstruction",
            "decoder": "decoder: L1 (+LPIPS, GAN)"}.get(stage, stage)


def smooth(values: list[float], k: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if k <= 1 or len(v) < k:
        return v
    return np.convolve(v, np.ones(k) / k, mode="valid")


def plot(logs: dict[str, list[dict]], path: str, k: int, targets: dict | None = None) -> None:
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (name, rows) in enumerate(logs.items()):
        color = f"C{i % 10}"
        steps = [r["step"] for r in rows]
        loss = smooth([r["loss"] for r in rows], k)
        label = f"{name} ({targets[name]})" if targets and name in targets else name
        ax_loss.plot(steps[len(steps) - len(loss):], loss, color=color, label=label)
        val = [r for r in rows if "val_psnr" in r]
        if val:
            ax_val.plot([r["step"] for r in val], [r["val_psnr"] for r in val], "o-", color=color, label=name)
            if "val_psnr_bicubic" in val[0]:
                ax_val.axhline(val[0]["val_psnr_bicubic"], color=color, linestyle="--", linewidth=1)
    ax_loss.set(xlabel="step", ylabel=f"loss (moving average of {k})", yscale="log",
                title="training loss, each against its own target")
    ax_val.set(xlabel="step", ylabel="PSNR (Y), dB", title="validation (dashed: the bicubic input)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_figure(path, fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="curves.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: sys.exit(print(f"curves.py: error: {msg}", file=sys.stderr) or 2)
    p.add_argument("logs", nargs="+", help="<out>.log.jsonl files written by train.py")
    p.add_argument("--out", default="runs/curves.png", help="the PNG to write (default: runs/curves.png)")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window for the loss (default: 5)")
    args = p.parse_args(argv)
    if plt is None:
        p.error("needs matplotlib (pip install matplotlib)")
    try:
        names = [os.path.basename(path).removesuffix(".log.jsonl") for path in args.logs]
        # the file name, or folder/name where names repeat (the same recipe with several seeds)
        keys = [n if names.count(n) == 1 else os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), n)
                for n, path in zip(names, args.logs)]
        logs = {key: read_log(path) for key, path in zip(keys, args.logs)}
        check_outputs([args.out], list(args.logs))
        plot(logs, args.out, args.smooth, {key: target_of(path) for key, path in zip(keys, args.logs)})
    except (OSError, ValueError) as e:
        p.error(str(e).splitlines()[0])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
