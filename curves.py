"""
Training curves: the loss and the validation PSNR of one or more runs against the step, from the
`<out>.log.jsonl` files train.py writes. Use it to compare your run with the reference runs in the README.

  python curves.py runs/tiny/x4.pt.log.jsonl runs/tiny/x4_plain.pt.log.jsonl --out runs/tiny/curves.png
  python curves.py runs/tiny/*.log.jsonl

The loss is smoothed (a moving average over --smooth logged points); validation PSNR (Y channel, held-out
crops) is drawn as logged, with the bicubic input's PSNR of the same crops dashed. Needs matplotlib.
"""
import argparse
import json
import os
import sys

import numpy as np

from files import write_atomic

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


def smooth(values: list[float], k: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if k <= 1 or len(v) < k:
        return v
    return np.convolve(v, np.ones(k) / k, mode="valid")


def plot(logs: dict[str, list[dict]], path: str, k: int) -> None:
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (name, rows) in enumerate(logs.items()):
        color = f"C{i % 10}"
        steps = [r["step"] for r in rows]
        loss = smooth([r["loss"] for r in rows], k)
        ax_loss.plot(steps[len(steps) - len(loss):], loss, color=color, label=name)
        val = [r for r in rows if "val_psnr" in r]
        if val:
            ax_val.plot([r["step"] for r in val], [r["val_psnr"] for r in val], "o-", color=color, label=name)
            if "val_psnr_bicubic" in val[0]:
                ax_val.axhline(val[0]["val_psnr_bicubic"], color=color, linestyle="--", linewidth=1)
    ax_loss.set(xlabel="step", ylabel=f"loss (moving average of {k})", yscale="log", title="training loss")
    ax_val.set(xlabel="step", ylabel="PSNR (Y), dB", title="validation (dashed: the bicubic input)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


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
        logs = {n if names.count(n) == 1 else os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), n):
                read_log(path) for n, path in zip(names, args.logs)}
        plot(logs, args.out, args.smooth)
    except (OSError, ValueError) as e:
        p.error(str(e).splitlines()[0])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
