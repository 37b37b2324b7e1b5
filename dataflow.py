"""
Draws the method's data flow from real tensors (assets/dataflow.png, the README's second picture):

  python dataflow.py                              # the shipped x2 (teacher) and x4 (student), a held-out crop
  python dataflow.py --image photos/val/graf1.png --out runs/dataflow.png

One HR crop x_h -> its LR at the student's scale s and the teacher's s/2 -> both bicubic-upsampled -> their latents
z_l, z_l' (a few channels) -> z_t at t = 999, 500, 100 -> the teacher's and the student's x0-predictions for the
same z_t (decoded) and the scale-distillation loss between them; and the one-step sampling path: z_T ~ N(0, I),
one DDIM step, decode. Every number comes from yonos.py's functions on the shipped models (`flow` returns them,
walkthrough.ipynb uses it). Needs matplotlib.

References: Noroozi et al., YONOS-SR, arXiv 2401.17258 (fig. 2).
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

from data import degrade_lr, open_image, to_tensor, upsample
from files import check_outputs, write_figure
from yonos import YonosSR, ddim_sample, predict_v, q_sample, weighted_x0_loss, x0_from_v

HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def flow(teacher: YonosSR, student: YonosSR, x_h: torch.Tensor, ts=(999, 500, 100), seed: int = 0) -> dict:
    """The tensors of one scale-distillation step and of one-step sampling for an HR crop x_h (1, 3, H, W) in
    [-1, 1]: the LR images, the latents, z_t at each t (the same eps), both x0-predictions and the weighted loss."""
    s, ac = student.scale, student.alphas_cumprod
    lr, lr_teacher = degrade_lr(x_h, [s, s // 2])
    x_up, x_up_teacher = upsample(lr, x_h.shape[-2:]), upsample(lr_teacher, x_h.shape[-2:])
    z_h, z_l, z_l_teacher = student.encode(x_h), student.encode(x_up), student.encode(x_up_teacher)
    eps = torch.randn(z_h.shape, generator=torch.Generator().manual_seed(seed))
    out = {"x_h": x_h, "lr": lr, "lr_teacher": lr_teacher, "x_up": x_up, "x_up_teacher": x_up_teacher, "z_h": z_h,
           "z_l": z_l, "z_l_teacher": z_l_teacher, "steps": []}
    for t in ts:
        tb = torch.tensor([t])
        z_t = q_sample(z_h, tb, eps, ac)  # the same z_t and t for teacher and student
        x0_teacher = x0_from_v(z_t, predict_v(teacher.unet, z_t, z_l_teacher, tb, teacher.context, ac), tb, ac)
        x0_student = x0_from_v(z_t, predict_v(student.unet, z_t, z_l, tb, student.context, ac), tb, ac)
        loss = weighted_x0_loss(x0_student, x0_teacher, tb, ac, student.unet.config.lr_prior_std)
        out["steps"].append({"t": t, "z_t": z_t, "x0_teacher": x0_teacher, "x0_student": x0_student,
                             "loss": float(loss), "decoded_teacher": student.decode(x0_teacher).clamp(-1, 1),
                             "decoded_student": student.decode(x0_student).clamp(-1, 1)})
    z_T = torch.randn(z_h.shape, generator=torch.Generator().manual_seed(seed + 1))
    z_sr = ddim_sample(student.unet, z_l, student.context, ac, 1, z_T)  # one DDIM step: t = 999 -> x0
    out |= {"z_T": z_T, "z_sr": z_sr, "sr": student.decode(z_sr).clamp(-1, 1)}
    return out


def image(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1] for imshow."""
    return ((x[0].permute(1, 2, 0).float().clamp(-1, 1) + 1) / 2).numpy()


def latent(z: torch.Tensor, channels=(0, 4, 8)) -> np.ndarray:
    """Three latent channels as an RGB picture, each stretched to its own 1st..99th percentile. For the shipped
    models' shortcut VAE, channels 0, 4 and 8 carry R, G and B of one pixel of each 2x2 block."""
    a = z[0, list(channels)].float().numpy()
    lo, hi = np.percentile(a, 1, axis=(1, 2), keepdims=True), np.percentile(a, 99, axis=(1, 2), keepdims=True)
    return np.clip((a - lo) / np.maximum(hi - lo, 1e-6), 0, 1).transpose(1, 2, 0)


def draw(f: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s, n = f["x_h"].shape[-1] // f["lr"].shape[-1], len(f["steps"])
    cols = max(5, 2 * n)
    fig, axes = plt.subplots(4, cols, figsize=(2.1 * cols, 10.4), dpi=100)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.01, hspace=0.62, wspace=0.06)
    for ax in axes.flat:
        ax.axis("off")
    near = lambda x, k: image(torch.nn.functional.interpolate(x, scale_factor=k, mode="nearest"))
    rows = [
        [("HR crop $x_h$", image(f["x_h"])), (f"LR at x{s} (student)", near(f["lr"], s)),
         (f"LR at x{s // 2} (teacher)", near(f["lr_teacher"], s // 2)), ("bicubic up: $x_l$", image(f["x_up"])),
         ("bicubic up: $x_l'$", image(f["x_up_teacher"]))],
        [("$z_h = E(x_h)$", latent(f["z_h"])), ("$z_l = E(x_l)$", latent(f["z_l"])),
         ("$z_l' = E(x_l')$", latent(f["z_l_teacher"]))] +
        [(f"$z_t$, t = {st['t']}", latent(st["z_t"])) for st in f["steps"]],
        sum(([(f"t = {st['t']}: teacher's $\\hat x_0$", image(st["decoded_teacher"])),
              (f"t = {st['t']}: student's $\\hat x_0$", image(st["decoded_student"]))] for st in f["steps"]), []),
        [("noise $z_T \\sim N(0, I)$", latent(f["z_T"])), ("one DDIM step: $\\hat z_h$", latent(f["z_sr"])),
         ("decoded: the SR output", image(f["sr"])), ("bicubic", image(f["x_up"])), ("HR", image(f["x_h"]))],
    ]
    for ax_row, row in zip(axes, rows):
        for ax, (title, img) in zip(ax_row, row):
            ax.imshow(img)
            ax.set_title(title, fontsize=9)
    for i, st in enumerate(f["steps"]):
        ax = axes[2, 2 * i + 1]
        ax.text(0.5, -0.08, f"loss {st['loss']:.3f}", transform=ax.transAxes, ha="center", va="top", fontsize=9)
    notes = ["1. data: one HR crop, degraded at the student's scale and at half of it, one draw (data.degrade_lr)",
             "2. latents: the frozen VAE encoder (3 of 12 channels); z_t = alpha_t z_h + sigma_t eps (yonos.q_sample)",
             "3. scale distillation: teacher (sees z_l') and student (sees z_l), the same z_t and t; loss = "
             "omega_t ||x0_student - x0_teacher||^2",
             "4. sampling: z_T -> x0 = alpha_999 z_T - sigma_999 v(z_T, z_l), one step -> VAE decoder (yonos.ddim_sample)"]
    for ax_row, note in zip(axes, notes):
        fig.text(0.01, ax_row[0].get_position().y1 + 0.032, note, fontsize=10.5, fontweight="bold")
    write_figure(path, fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dataflow.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: sys.exit(print(f"dataflow.py: error: {msg}", file=sys.stderr) or 2)
    p.add_argument("--teacher", default=os.path.join(HERE, "assets", "yonos_x2.pt"), help="the x s/2 model")
    p.add_argument("--student", default=os.path.join(HERE, "assets", "yonos_x4.pt"), help="the x s model")
    p.add_argument("--image", default="photos/test/EveningGlow.png", help="the photo whose centre crop is the HR "
                   "image (default: the held-out photo of the README's figure; python data.py --export-photos photos)")
    p.add_argument("--crop", type=int, default=128, help="HR crop side in pixels (default: 128)")
    p.add_argument("--out", default=os.path.join(HERE, "assets", "dataflow.png"), help="the PNG to write")
    args = p.parse_args(argv)
    try:
        check_outputs([args.out], [args.teacher, args.student, args.image])
        teacher, student = YonosSR.load(args.teacher), YonosSR.load(args.student)
        if teacher.scale * 2 != student.scale:
            raise ValueError(f"the teacher is x{teacher.scale}, the student x{student.scale}: a teacher works at half")
        img = np.asarray(open_image(args.image)[0])
        c = args.crop - args.crop % student.multiple
        if c < student.multiple or min(img.shape[:2]) < c:
            raise ValueError(f"--crop must be at least {student.multiple} and fit in {args.image}")
        top, left = (img.shape[0] - c) // 2, (img.shape[1] - c) // 2
        x_h = to_tensor(Image.fromarray(img[top:top + c, left:left + c]))[None]
        draw(flow(teacher, student, x_h), args.out)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"dataflow.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
