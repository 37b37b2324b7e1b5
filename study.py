"""
Summarises a study over training seeds: eval.py reports whose models come from runs that differ only in their
seed (folders such as runs/tiny_s0, runs/tiny_s1, ...) become one row per model and step count, with the mean
over training seeds and its min..max, next to bicubic.

  python study.py results/study_x4.json                       # the table, to stdout
  python study.py results/study_x4.json --metric ssim
  python study.py results/guidance_w*.json --guidance-plot results/guidance.png   # w: sharpness vs PSNR
  python study.py --variance assets/yonos_x2.pt assets/yonos_x4.pt --out results/variance_x4   # what distillation changes
  python study.py --fair results/distill_fair   # the fair test's table, learning curves and verdict (experiments.sh)
  python study.py --guided runs/guided/x2_cfg.pt runs/guided/x2_guided.pt --out results/guided_w   # the student by w

Models are grouped by their path with the seed folder's number replaced by '*' (runs/tiny_s*/x4.pt).

--variance TEACHER STUDENT measures, per timestep bucket, on training crops, what scale distillation can change
(README, "Why scale distillation can help"): how far the two regression targets are apart, omega_t ||z_h - g||^2
with g the teacher's x0 (the part of the plain target's noise that distillation removes), and the variance of each
objective's minibatch gradient at the same student weights (its trace: the mean squared distance of a minibatch's
gradient from the mean gradient), next to the squared norm of that mean gradient. Writes OUT.json, OUT.txt, OUT.png.

--guided TEACHER STUDENT scores a guided-distilled student against its classifier-free-guided teacher for each w
(one step, --data's 128-px centre crops, one noise draw for all): the teacher guided with w (two calls), the
student given w, the student with its guidance embedding's value at w = 0 subtracted (so at w = 0 it runs without
it), and how far the student is from its target (the teacher's guided output). Writes OUT.json, OUT.txt.
"""
import argparse
import json
import re
import sys

import numpy as np
import torch

from files import check_outputs, json_text, write_atomic, write_figure

try:  # plots are optional
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None


def group(model: str) -> str:
    """runs/tiny_s1/x4.pt -> runs/tiny_s*/x4.pt, runs/fair/s2/x4.pt -> runs/fair/s*/x4.pt: one row per recipe."""
    return re.sub(r"(?<=[_/])s\d+(?=/)", "s*", model)


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
        write_figure(path, fig)
    return "\n".join(["| w | PSNR | sharpness |", "|---|---|---|"] +
                     [f"| {w:g} | {psnr:.2f} | {sharp:.3f} |" for w, psnr, sharp in points])


ARMS = {"x4_distilled": "(a) scale distillation from x2", "x4_plain_from_x2": "(b) plain objective from the x2's "
        "weights", "x4_plain_scratch": "(c) plain objective from scratch"}


def arm_of(model: str) -> str | None:
    return next((a for a in ARMS if f"/{a}.pt" in model or model.startswith(f"{a}.pt")), None)


def fair_summary(prefix: str) -> tuple[dict, str]:
    """The fair test (experiments.sh part fair) from its reports: PREFIX_whole.json (one step, the held-out photos
    whole), PREFIX_steps.json (DDIM 1..64 on their 64-px centre crops (one tile)), PREFIX_teacher.json (the x2 teacher and
    bicubic x2 on photos/val and photos/test) and the runs' logs in PREFIX_logs/s*/ (validation PSNR along the way).
    Per arm: the mean over training seeds and its min..max."""
    import glob

    def load(name: str) -> dict:  # PREFIX_NAME.json, or its parts PREFIX_NAME_*.json (models scored as they finished)
        paths = sorted(glob.glob(f"{prefix}_{name}.json") + glob.glob(f"{prefix}_{name}_*.json"))
        if not paths:
            raise FileNotFoundError(f"{prefix}_{name}.json")
        reports = [json.load(open(path, encoding="utf-8")) for path in paths]
        return {"summary": [e for i, r in enumerate(reports) for e in r["summary"] if e["model"] != "bicubic" or not i]}
    whole, steps, teacher = load("whole"), load("steps"), load("teacher")
    out = {"arms": ARMS, "teacher": {}, "one_step_whole": {}, "steps_crops": {}, "curves": {}}
    for e in teacher["summary"]:
        out["teacher"][e["model"] + (f" on {e['input']}" if e.get("input") else "")] = e["psnr"]
    for key, report in (("one_step_whole", whole), ("steps_crops", steps)):
        per = {}
        for e in report["summary"]:
            arm = "bicubic" if e["model"] == "bicubic" else arm_of(e["model"])
            if arm:
                per.setdefault(arm, {}).setdefault(e["steps"], []).append({m: e[m] for m in ("psnr", "ssim")})
        out[key] = {arm: {n: {m: [v[m] for v in vals] for m in ("psnr", "ssim")} for n, vals in by.items()}
                    for arm, by in per.items()}
    for arm in ARMS:
        curves = []
        for log in sorted(glob.glob(f"{prefix}_logs/s*/{arm}.pt.log.jsonl")):
            rows = [json.loads(line) for line in open(log, encoding="utf-8") if "val_psnr" in line]
            curves.append({r["step"]: r["val_psnr"] for r in rows})
            if rows:
                out["val_bicubic"] = rows[0].get("val_psnr_bicubic")
        if curves:
            common = sorted(set.intersection(*(set(c) for c in curves)))
            out["curves"][arm] = {s: [c[s] for c in curves] for s in common}
    fmt = lambda v, d=2: f"{np.mean(v):.{d}f} ({min(v):.{d}f}..{max(v):.{d}f})" if len(v) > 1 else f"{v[0]:.{d}f}"
    lines = ["The x2 teacher against bicubic x2 on photos/val (one step, whole photos, PSNR-Y):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in out["teacher"].items()]
    lines += ["", "One step, the 14 held-out photos whole, default settings: PSNR-Y / SSIM-Y, mean over training seeds "
              "(min..max):", "", "| x4 | seeds | PSNR | SSIM |", "|---|---|---|---|"]
    for arm, by in out["one_step_whole"].items():
        v = by[1] if 1 in by else by[0]
        lines.append(f"| {ARMS.get(arm, arm)} | {len(v['psnr'])} | {fmt(v['psnr'])} | {fmt(v['ssim'], 3)} |")
    ns = sorted({n for by in out["steps_crops"].values() for n in by if n})
    lines += ["", "DDIM steps, 64-px centre crops of the held-out photos, raw output: PSNR-Y, mean over seeds "
              "(min..max):", "", "| x4 | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in ns) + " |",
              "|---|" + "---|" * len(ns)]
    for arm, by in out["steps_crops"].items():
        cells = [fmt(by[n]["psnr"]) if n in by else fmt(by[0]["psnr"]) for n in ns]
        lines.append(f"| {ARMS.get(arm, arm)} | " + " | ".join(cells) + " |")
    if out["curves"]:
        steps_logged = sorted({s for arm in ARMS for s in out["curves"].get(arm, {})})
        lines += ["", f"Validation PSNR-Y along the way (photos/val centre crops; bicubic {out.get('val_bicubic') or 0:.2f}), "
                  "mean over seeds:", "",
                  "| x4 | " + " | ".join(str(s) for s in steps_logged) + " |", "|---|" + "---|" * len(steps_logged)]
        for arm in ARMS:
            c = out["curves"].get(arm, {})
            lines.append(f"| {ARMS[arm]} | " + " | ".join(f"{np.mean(c[s]):.2f}" if s in c else "" for s in steps_logged)
                         + " |")
    return out, "\n".join(lines)


def fair_plot(out: dict, path: str) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(ARMS):
        c = out["curves"].get(arm, {})
        if c:
            st = sorted(c)
            ax1.plot(st, [np.mean(c[s]) for s in st], "o-", color=f"C{i}", label=ARMS[arm])
            ax1.fill_between(st, [min(c[s]) for s in st], [max(c[s]) for s in st], color=f"C{i}", alpha=0.15)
        by = out["steps_crops"].get(arm, {})
        ns = sorted(n for n in by if n)
        if ns:
            ax2.errorbar(ns, [np.mean(by[n]["psnr"]) for n in ns],
                         yerr=[[np.mean(by[n]["psnr"]) - min(by[n]["psnr"]) for n in ns],
                               [max(by[n]["psnr"]) - np.mean(by[n]["psnr"]) for n in ns]],
                         marker="o", capsize=3, color=f"C{i}", label=ARMS[arm])
    bic = out["steps_crops"].get("bicubic", {})
    if bic:
        ax2.axhline(np.mean(next(iter(bic.values()))["psnr"]), color="gray", linestyle="--", label="bicubic")
    if out.get("val_bicubic"):
        ax1.axhline(out["val_bicubic"], color="gray", linestyle="--", label="bicubic")
    ax1.set(xlabel="training step", ylabel="validation PSNR-Y (dB)", title="learning curves (min..max shaded)")
    ax2.set(xscale="log", xlabel="DDIM steps", ylabel="PSNR-Y (dB)", title="held-out crops, by sampling steps")
    finish(fig, (ax1, ax2), path)


def finish(fig, axes, path: str) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_figure(path, fig)


BUCKETS = [(0, 100), (100, 300), (300, 500), (500, 700), (700, 900), (900, 1000)]


def variance_study(teacher, student, data, batch: int = 8, draws: int = 16, seed: int = 0) -> list[dict]:
    """Per timestep bucket: the targets' distance omega ||z_h - g||^2 and each objective's minibatch gradient
    variance at the student's weights. The same crops, t and eps for both objectives in each draw."""
    from yonos import predict_v, q_sample, weighted_x0_loss, x0_from_v
    ac, s = student.alphas_cumprod, student.unet.config.lr_prior_std
    params = [p for p in student.unet.parameters()]
    student.unet.requires_grad_(True)
    rows, k = [], 0
    for lo, hi in BUCKETS:
        dist, grads = [], {"plain": [], "distilled": []}
        for d in range(draws):
            items = [data[k + i] for i in range(batch)]
            k += batch
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            with torch.no_grad():
                z_h, z_l, z_lt = (student.encode(torch.stack([it[key] for it in items])) for key in ("hr", "lr", "lr_teacher"))
                t = torch.randint(lo, hi, (batch,), generator=g)
                z_t = q_sample(z_h, t, torch.randn(z_h.shape, generator=g), ac)
                target = x0_from_v(z_t, predict_v(teacher.unet, z_t, z_lt, t, teacher.context, ac), t, ac)
                dist.append(float(weighted_x0_loss(target, z_h, t, ac, s)))
            for name, goal in (("plain", z_h), ("distilled", target)):
                x0 = x0_from_v(z_t, predict_v(student.unet, z_t, z_l, t, student.context, ac), t, ac)
                grad = torch.autograd.grad(weighted_x0_loss(x0, goal, t, ac, s), params)
                grads[name].append(torch.cat([q.flatten() for q in grad]))
        row = {"t": [lo, hi], "target_distance": float(np.mean(dist))}
        for name, gs in grads.items():
            gs = torch.stack(gs)
            mean = gs.mean(0)
            row[f"grad_var_{name}"] = float(((gs - mean) ** 2).sum(1).mean())
            row[f"grad_mean_sq_{name}"] = float((mean ** 2).sum())
        rows.append(row)
    return rows


def variance_report(rows: list[dict], title: str) -> str:
    lines = [f"{title}", "| t | omega ||z_h - g||^2 | gradient variance, plain | distilled | ratio | ||mean gradient||^2, "
             "plain | distilled |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['t'][0]}..{r['t'][1] - 1} | {r['target_distance']:.4f} | {r['grad_var_plain']:.4g} | "
                     f"{r['grad_var_distilled']:.4g} | {r['grad_var_plain'] / max(r['grad_var_distilled'], 1e-30):.2f} | "
                     f"{r['grad_mean_sq_plain']:.4g} | {r['grad_mean_sq_distilled']:.4g} |")
    return "\n".join(lines)


def variance_plot(results: dict, path: str) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, rows) in enumerate(results.items()):
        mid = [sum(r["t"]) / 2 for r in rows]
        ax1.plot(mid, [r["target_distance"] for r in rows], "o-", color=f"C{i}", label=name)
        ax2.plot(mid, [r["grad_var_plain"] for r in rows], "o--", color=f"C{i}", label=f"{name}: plain")
        ax2.plot(mid, [r["grad_var_distilled"] for r in rows], "o-", color=f"C{i}", label=f"{name}: distilled")
    ax1.set(xlabel="t", ylabel="omega_t ||z_h - g||^2", title="how far apart the two targets are", yscale="log")
    ax2.set(xlabel="t", ylabel="trace of the gradient covariance", title="minibatch gradient variance", yscale="log")
    finish(fig, (ax1, ax2), path)


def guided_study(teacher, student, paths: list[str], ws=(0.0, 0.5, 1.0, 2.0, 4.0), crop: int = 128) -> list[dict]:
    """Per w: PSNR-Y against HR of the teacher guided with w, of the student, of the student without its guidance
    embedding's offset at w = 0, and the student's PSNR against the teacher's output (its distillation target).
    Raw outputs (no colour fix), one step, the same noise for all (upscale's seed 0)."""
    import copy
    from eval import prepare
    from metrics import psnr_y
    from model import timestep_embedding
    from upscale import upscale
    centred = copy.deepcopy(student)
    emb, c0 = centred.unet.guidance_embedding, centred.unet.config.block_out_channels[0]
    with torch.no_grad():  # G(w) - G(0): the same layers, the constant G(0) taken off linear_2's bias
        emb.linear_2.bias -= emb.linear_2(torch.nn.functional.silu(emb.linear_1(timestep_embedding(torch.zeros(1), c0))))[0]
    crops = [prepare(path, teacher.scale, crop=crop) for path in paths]
    run = lambda model, lr, w: np.asarray(upscale(lr, model, fix_colors=False, guidance=w))
    rows = []
    for w in ws:
        row = {"teacher": [], "student": [], "student_centred": [], "student_vs_teacher": []}
        for hr, lr in crops:
            out = {name: run(m, lr, w) for name, m in (("teacher", teacher), ("student", student),
                                                       ("student_centred", centred))}
            for name, x in out.items():
                row[name].append(psnr_y(x, hr, teacher.scale))
            row["student_vs_teacher"].append(psnr_y(out["student"], out["teacher"], teacher.scale))
        rows.append({"w": w} | {k: float(np.mean(v)) for k, v in row.items()})
    return rows


def guided_report(rows: list[dict], title: str) -> str:
    lines = [title, "| w | teacher, guided (2 calls) | student | student, G(w) - G(0) | student vs its target |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['w']:g} | {r['teacher']:.2f} | {r['student']:.2f} | {r['student_centred']:.2f} | "
              f"{r['student_vs_teacher']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="*", help="JSON reports written by eval.py")
    p.add_argument("--variance", nargs="+", default=[], metavar="CKPT", help="TEACHER STUDENT [TEACHER STUDENT ...]: "
                   "the variance study of each pair (see above)")
    p.add_argument("--fair", default="", metavar="PREFIX", help="summarise the fair test from PREFIX_whole.json, "
                   "PREFIX_steps.json, PREFIX_teacher.json and PREFIX_logs/ into PREFIX.json, PREFIX.txt, PREFIX.png")
    p.add_argument("--guided", nargs=2, default=[], metavar="CKPT", help="TEACHER STUDENT: a guided-distilled "
                   "student by w against its teacher (see above; --data default photos/val there)")
    p.add_argument("--data", default="photos/train", help="--variance: the crops' photos (default: photos/train)")
    p.add_argument("--draws", type=int, default=16, help="--variance: minibatches per timestep bucket (default: 16)")
    p.add_argument("--out", default="results/variance", help="--variance: writes OUT.json, OUT.txt, OUT.png")
    p.add_argument("--metric", default="psnr", help="psnr, ssim, sharpness, lpips (default: psnr)")
    p.add_argument("--guidance-plot", default="", help="draw w vs sharpness and PSNR from the reports into this PNG")
    args = p.parse_args(argv)
    if args.variance:
        return variance_main(args)
    if args.guided:
        return guided_main(args)
    if args.fair:
        try:
            out, text = fair_summary(args.fair)
        except (OSError, ValueError, KeyError) as e:
            print(f"study.py: error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        print(text)
        write_atomic(args.fair + ".json", json_text(out))
        write_atomic(args.fair + ".txt", text + "\n")
        if plt is not None:
            fair_plot(out, args.fair + ".png")
        return 0
    if not args.reports:
        p.error("give eval.py reports, or --variance TEACHER STUDENT")
    try:
        reports = [json.load(open(path, encoding="utf-8")) for path in args.reports]
        if args.guidance_plot:
            check_outputs([args.guidance_plot], args.reports)
            print(guidance_plot(reports, args.guidance_plot))
        else:
            print("\n\n".join(study_table(report, args.metric) for report in reports))
    except (OSError, ValueError, KeyError) as e:
        print(f"study.py: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


def variance_main(args) -> int:
    from data import SRPairs
    from yonos import YonosSR
    try:
        if len(args.variance) % 2 or args.draws < 2:
            raise ValueError("--variance takes pairs TEACHER STUDENT, and --draws at least 2")
        check_outputs([args.out + e for e in (".json", ".txt", ".png")], args.variance)
        torch.manual_seed(0)
        results, text = {}, []
        for teacher_path, student_path in zip(args.variance[::2], args.variance[1::2]):
            teacher, student = YonosSR.load(teacher_path), YonosSR.load(student_path)
            if teacher.scale * 2 != student.scale:
                raise ValueError(f"{teacher_path} is x{teacher.scale}, {student_path} x{student.scale}: not a pair")
            data = SRPairs(args.data, student.meta.get("train_crop", 64), student.scale, teacher.scale, seed=12345,
                           say=lambda m: None)
            name = f"x{teacher.scale} -> x{student.scale}"
            results[name] = variance_study(teacher, student, data, draws=args.draws)
            text.append(variance_report(results[name], f"{name} ({teacher_path} -> {student_path})"))
            print(text[-1] + "\n")
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"study.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    write_atomic(args.out + ".json", json_text(results))
    write_atomic(args.out + ".txt", "\n\n".join(text) + "\n")
    if plt is not None:
        variance_plot(results, args.out + ".png")
    return 0



def guided_main(args) -> int:
    import glob
    import os
    from yonos import YonosSR
    try:
        check_outputs([args.out + e for e in (".json", ".txt")], args.guided)
        teacher, student = (YonosSR.load(path) for path in args.guided)
        if not student.unet.config.guidance_embedding or teacher.scale != student.scale:
            raise ValueError(f"{args.guided[1]} is not a guided-distilled student of {args.guided[0]}")
        data = "photos/val" if args.data == "photos/train" else args.data
        paths = sorted(f for f in glob.glob(os.path.join(data, "*")) if os.path.isfile(f))
        if not paths:
            raise ValueError(f"no images in {data}")
        rows = guided_study(teacher, student, paths)
    except (OSError, ValueError) as e:
        print(f"study.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    text = guided_report(rows, f"{args.guided[1]} against {args.guided[0]}, one step, {data} 128-px centre crops, PSNR-Y")
    print(text)
    write_atomic(args.out + ".json", json_text({"teacher": args.guided[0], "student": args.guided[1], "rows": rows}))
    write_atomic(args.out + ".txt", text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
