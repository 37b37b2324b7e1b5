"""
Speed, measured in one run on one machine:
  1. our U-Net forward vs diffusers' UNet2DConditionModel at the SD 2.1-base config, the same random weights,
     fp32 (and bf16 autocast on CUDA);
  2. our VAE decode vs diffusers' AutoencoderKL, likewise;
  3. end to end, one image through upscale(): x4 of a (latent*8/4)-px input, one step, eager (and compiled
     with CUDA graphs on CUDA), plus encode + N x (one U-Net step) + decode for N in --e2e-steps;
  --data: the training data pipeline (data.SRPairs) in samples/s on one thread;
  --train: training steps/s and peak GPU memory of the SR stage (train.py's step without the data loader) at
     SD 2.1-base size, per batch size, with and without gradient checkpointing and channels_last.

  python bench.py --latent 64 --repeats 5                  # SD 2.1-base at 512x512 (64x64 latent), CPU
  python bench.py --device cuda --out bench_gpu.json       # on a GPU: CUDA-event timing, bf16, --compile
  python bench.py --data                                   # data loading only (no diffusers needed)
  python bench.py --train --device cuda --out train_gpu.json   # training throughput, 512px crops, batch 4 and 8

Timing: a warm-up call, then the median of --repeats; on CUDA each call is timed with CUDA events after a
synchronize, so queued kernels are counted; ours and diffusers' calls alternate so drifts in load hit both.
Parts 1-2 need diffusers (a test-only dependency).
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from data import SRPairs, bicubic_lr, list_images, open_image, upsample
from files import write_atomic
from model import UNET_PRESETS, UNet, widen_conv_in
from upscale import upscale
from vae import VAE_PRESETS, AutoencoderKL
from runtime import compile_model, resolve_device
from yonos import YonosSR, make_alphas_cumprod, sr_loss

try:
    from diffusers import AutoencoderKL as RefVAE, UNet2DConditionModel
except ImportError:  # only parts 1-2 need it
    RefVAE = UNet2DConditionModel = None


def timer(device: torch.device):
    """time(fn) -> seconds of one call: CUDA events on a GPU (the kernels, not just their launch), else wall time."""
    def cuda_time(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000

    def wall_time(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return cuda_time if device.type == "cuda" else wall_time


def timed(fns: list, repeats: int, device: torch.device) -> list[float]:
    """Median time of each function, after one warm-up call each, the functions called in turn (a b, b a, ...)."""
    time_one = timer(device)
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(repeats):
        order = list(range(len(fns)))[::1 if r % 2 == 0 else -1]
        for i in order:
            times[i].append(time_one(fns[i]))
    return [statistics.median(t) for t in times]


@torch.no_grad()
def bench_models(args, device: torch.device) -> dict:
    if UNet2DConditionModel is None:
        raise SystemExit("bench.py: error: parts 1-2 need diffusers (pip install -r requirements-dev.txt); "
                         "--data needs nothing more")
    torch.manual_seed(0)
    cfg, h = UNET_PRESETS["sd21"], args.latent
    ref = UNet2DConditionModel(**cfg.to_diffusers()).eval().to(device)
    ours = UNet(cfg).eval().to(device)
    ours.load_state_dict(ref.state_dict())
    x, t = torch.randn(1, 4, h, h, device=device), torch.tensor([999], device=device)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, device=device)
    res = {"device": str(device), "threads": torch.get_num_threads(), "latent": h}
    precisions = ["fp32"] + (["bf16"] if device.type == "cuda" else [])
    for prec in precisions:
        cast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16")

        def run(model, *a):
            with cast():
                return model(*a)
        a, b = timed([lambda: run(ours, x, t, ctx), lambda: run(ref, x, t, ctx)], args.repeats, device)
        res[f"unet_{prec}"] = {"ours_s": a, "diffusers_s": b, "ratio": a / b}
        print(f"U-Net forward {h}x{h} latent, {prec}: ours {a * 1e3:.1f} ms, diffusers {b * 1e3:.1f} ms, ratio {a / b:.3f}")
    del ref
    ref_vae = RefVAE(**VAE_PRESETS["sd"].to_diffusers()).eval().to(device)
    vae = AutoencoderKL(VAE_PRESETS["sd"]).eval().to(device)
    vae.load_state_dict(ref_vae.state_dict())
    z = torch.randn(1, 4, h, h, device=device)
    for prec in precisions:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
            a, b = timed([lambda: vae.decode(z), lambda: ref_vae.decode(z)], args.repeats, device)
        res[f"decode_{prec}"] = {"ours_s": a, "diffusers_s": b, "ratio": a / b}
        print(f"VAE decode {h * 8}x{h * 8}, {prec}: ours {a * 1e3:.1f} ms, diffusers {b * 1e3:.1f} ms, ratio {a / b:.3f}")
    del ref_vae
    if not args.skip_e2e:
        res["e2e"] = bench_end_to_end(args, widen_conv_in(ours, 8), vae, ctx, device)
    return res


@torch.no_grad()
def bench_end_to_end(args, unet: UNet, vae: AutoencoderKL, ctx, device) -> dict:
    """One image through upscale() (one step, x4), eager and compiled; and the sum-of-parts check."""
    e = args.e2e_latent
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = YonosSR(unet, vae, ctx[:1].cpu(), 4, {"train_crop": e * 8}).to(device=device, dtype=dtype).eval()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (e * 2, e * 2, 3), dtype=np.uint8))
    out = {"latent": e, "output_px": e * 8, "dtype": str(dtype).removeprefix("torch.")}
    out["upscale_eager_s"] = timed([lambda: upscale(img, model, fix_colors=False)], args.repeats, device)[0]
    print(f"one step x4 {e * 2}px -> {e * 8}px ({out['dtype']}), eager: {out['upscale_eager_s'] * 1e3:.1f} ms")
    x_up, zl = torch.rand(1, 3, e * 8, e * 8, device=device, dtype=dtype) * 2 - 1, torch.randn(
        1, 4, e, e, device=device, dtype=dtype)
    t = torch.tensor([999], device=device)
    parts = dict(zip(("encode", "unet_step", "decode"), timed(
        [lambda: model.encode(x_up), lambda: model.unet(torch.cat([zl, zl], 1), t, model.context),
         lambda: model.decode(zl)], args.repeats, device)))
    out |= {"parts": parts, "runs": {}}
    for n in map(int, args.e2e_steps.split(",")):
        total = timed([lambda: model.super_resolve(x_up, steps=n)], 1 if n > 8 else args.repeats, device)[0]
        expected = parts["encode"] + n * parts["unet_step"] + parts["decode"]
        out["runs"][n] = {"total_s": total, "parts_sum_s": expected, "ratio": total / expected}
        print(f"end to end {e * 8}x{e * 8}, {n} step(s): {total * 1e3:.1f} ms; encode + {n} x U-Net + decode = "
              f"{expected * 1e3:.1f} ms (ratio {total / expected:.3f})")
    if args.compile:
        note = compile_model(model)
        if note:
            print(note)
        else:
            t0 = time.perf_counter()
            upscale(img, model, fix_colors=False)
            out["compile_s"] = time.perf_counter() - t0
            out["upscale_compiled_s"] = timed([lambda: upscale(img, model, fix_colors=False)], args.repeats, device)[0]
            print(f"one step x4, compiled (first call {out['compile_s']:.0f} s): {out['upscale_compiled_s'] * 1e3:.1f} ms")
    return out


def div2k_like(folder: str, n: int = 20, size=(2040, 1356)) -> list[str]:
    """n PNGs of DIV2K's size, cut and enlarged from the corpus photos when there are any (else smooth
    random textures), so decoding costs what real photos cost."""
    sources = list_images("photos/train") if os.path.isdir("photos/train") else []
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        if sources:
            img = open_image(sources[i % len(sources)])[0].resize(size, Image.BICUBIC)
        else:
            small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.BICUBIC)
        paths.append(os.path.join(folder, f"{i:04d}.png"))
        img.save(paths[-1])
    return paths


def bench_data(args) -> dict:
    """SRPairs on 20 DIV2K-size PNGs, one process, one thread: time to the first sample and samples/s."""
    torch.set_num_threads(1)
    res = {}
    with tempfile.TemporaryDirectory() as folder:
        div2k_like(folder)
        for crop, kind, teacher, n in [(64, "bicubic", None, 3000), (64, "bicubic", 2, 3000),
                                       (512, "bicubic", None, 200), (512, "realesrgan", None, 50)]:
            t0 = time.perf_counter()
            data = SRPairs(folder, crop, 4, teacher, kind, seed=0, say=lambda msg: None)
            data[0]
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for k in range(1, n + 1):
                data[k]
            rate = n / (time.perf_counter() - t0)
            name = f"crop{crop}_{kind}" + ("_with_teacher_lr" if teacher else "")
            res[name] = {"first_sample_s": first, "samples_per_s": rate}
            print(f"SRPairs crop {crop}, x4, {kind}{' + teacher LR' if teacher else ''}: first sample after "
                  f"{first:.1f} s, then {rate:.0f} samples/s (1 thread)")
    return res


def bench_training(args, device: torch.device) -> dict:
    """Steps/s and peak memory of the SR stage's step as train.py takes it: the frozen VAE encodes the HR crop and
    the upsampled LR, sr_loss (bf16 autocast on CUDA), backward, gradient clipping, AdamW (fused on CUDA).
    Random weights and images: the speed does not depend on them. The data loader is left out (see --data)."""
    unet_name, vae_name = {"sd": ("sd21", "sd"), "tiny": ("tiny", "tiny"), "small": ("small", "small")}[args.train_config]
    vae = AutoencoderKL(VAE_PRESETS[vae_name]).to(device).eval().requires_grad_(False)
    c = vae.config.latent_channels
    ac = make_alphas_cumprod().to(device)
    cuda, res = device.type == "cuda", {"device": str(device), "config": args.train_config, "crop": args.train_crop,
                                       "runs": []}
    for batch in map(int, args.train_batch.split(",")):
        for checkpointing in (False, True):
            for channels_last in (False, True):
                torch.manual_seed(0)
                unet = UNet(replace(UNET_PRESETS[unet_name], in_channels=2 * c, out_channels=c)).to(device).train()
                unet.gradient_checkpointing = checkpointing
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                unet.to(memory_format=fmt)
                opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=cuda)
                ctx = torch.randn(1, 77 if args.train_config == "sd" else 8, unet.config.cross_attention_dim,
                                  device=device)
                hr = torch.rand(batch, 3, args.train_crop, args.train_crop, device=device) * 2 - 1
                lr_up = upsample(bicubic_lr(hr, 4), hr.shape[-2:])  # the student's input, as data.SRPairs makes it

                def step():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                        with torch.no_grad():
                            z_h, z_l = (vae.encode(x)[0].to(memory_format=fmt) * vae.config.scaling_factor
                                        for x in (hr, lr_up))
                        loss = sr_loss(unet, z_h, z_l, ctx, ac)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
                    opt.step()
                row = {"batch": batch, "grad_checkpointing": checkpointing, "channels_last": channels_last}
                try:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    step_s = timed([step], args.repeats, device)[0]
                    row |= {"steps_per_s": 1 / step_s, "samples_per_s": batch / step_s}
                    if cuda:
                        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                res["runs"].append(row)
                del unet, opt
                if cuda:
                    torch.cuda.empty_cache()
                mem = f", peak {row['peak_memory_gb']:.1f} GiB" if "peak_memory_gb" in row else ""
                speed = f"{row['steps_per_s']:.2f} steps/s{mem}" if "steps_per_s" in row else row["error"]
                print(f"train {args.train_config}, {args.train_crop}px crops, batch {batch}, grad checkpointing "
                      f"{'on' if checkpointing else 'off'}, channels_last {'on' if channels_last else 'off'}: {speed}")
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--latent", type=int, default=64, help="latent side for parts 1-2 (default: 64, i.e. 512 px)")
    p.add_argument("--e2e-latent", type=int, default=64, help="output latent side for part 3 (default: 64: 512 px)")
    p.add_argument("--e2e-steps", default="1,4", help="step counts for part 3 (default: 1,4)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement; the median is kept")
    p.add_argument("--skip-e2e", action="store_true", help="only parts 1-2")
    p.add_argument("--compile", action="store_true", help="part 3 also compiled (CUDA graphs; CUDA only)")
    p.add_argument("--data", action="store_true", help="only the data pipeline benchmark")
    p.add_argument("--train", action="store_true", help="only the training throughput benchmark")
    p.add_argument("--train-config", choices=("sd", "small", "tiny"), default="sd",
                   help="model size for --train (default: sd, i.e. SD 2.1-base's U-Net and the SD VAE)")
    p.add_argument("--train-crop", type=int, default=512, help="HR crop side for --train (default: 512)")
    p.add_argument("--train-batch", default="4,8", help="batch sizes for --train (default: 4,8)")
    p.add_argument("--out", default="", help="also write the numbers as JSON here")
    args = p.parse_args(argv)
    if args.data:
        res = bench_data(args)
    else:
        try:
            device = resolve_device(args.device)
        except ValueError as e:
            raise SystemExit(f"bench.py: error: {e}")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        res = bench_training(args, device) if args.train else bench_models(args, device)
    if args.out:
        write_atomic(args.out, json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
