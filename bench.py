"""
Speed, measured in one run on one machine:
  1. our U-Net forward vs diffusers' UNet2DConditionModel at the SD 2.1-base config, the same random weights,
     fp32 (and bf16 autocast on CUDA);
  2. our VAE decode vs diffusers' AutoencoderKL, likewise;
  3. end to end, one image through upscale(): x4 of a (latent*8/4)-px input, one step, eager (and compiled
     with CUDA graphs on CUDA), plus encode + N x (one U-Net step) + decode for N in --e2e-steps;
  --data: the training data pipeline (data.SRPairs) in samples/s on one thread;
  --train: training steps/s and peak GPU memory of the SR stage (train.py's step without the data loader) at
     SD 2.1-base size, per batch size, with and without gradient checkpointing and channels_last;
  --memory: the peak memory of one SD 2.1-size training step at 512 px for x2 (plain) and x4 (distillation, the
     frozen teacher held too), full fine-tuning and LoRA r=16, gradient checkpointing off and on, batch 1 and 4, in
     bf16: peak allocated by torch on CUDA; peak resident memory of a fresh subprocess on a CPU, with train.py's
     memory plan beside it;
  --upscale: the shipped x4 on a 512-px photo (2048-px output) as sample.py runs it, fp32 and --dtype auto: the
     time, the model's FLOPs per output pixel (counted), the GFLOP/s achieved and the matmul peak of this machine.

  python bench.py --latent 64 --repeats 5                  # SD 2.1-base at 512x512 (64x64 latent), CPU
  python bench.py --device cuda --out bench_gpu.json       # on a GPU: CUDA-event timing, bf16, --compile
  python bench.py --data                                   # data loading only (no diffusers needed)
  python bench.py --train --device cuda --out train_gpu.json   # training throughput, 512px crops, batch 4 and 8
  python bench.py --memory --device cuda --out memory_gpu.json # which recipe fits which GPU (README)
  python bench.py --upscale --out results/upscale_cpu.json     # the CPU speed of sample.py against the peak

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
from yonos import YonosSR, sr_loss

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
    ac = YonosSR(UNet(replace(UNET_PRESETS["tiny"], in_channels=2 * c, out_channels=c)), vae,
                 torch.zeros(1, 1, 32), 4).alphas_cumprod.to(device)  # a bundle's schedule: SD's
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


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n matmul in `dtype`: this machine's practical peak, what a convolution can hope for."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed([lambda: a @ b], repeats, device)[0] / 1e9


def bench_upscale(args) -> dict:
    """sample.py's work on a 512-px photo at x4 (upscale_rows, the shipped model, default tiles), fp32 and the
    --dtype auto choice, on this CPU; the FLOPs of one tile batch counted by torch (FlopCounterMode: convolutions and
    matmuls) times the batches, against the matmul peak."""
    from torch.utils.flop_counter import FlopCounterMode
    from runtime import pick_dtype
    from upscale import bands_of_sr, memory_plan, prepare, tile_settings, upscale_rows, Upsampled
    torch.set_num_threads(args.threads or torch.get_num_threads())
    path = args.image if args.image else None
    img = open_image(path)[0] if path else None
    if img is None:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    img = img.crop((0, 0, min(512, img.width), min(512, img.height)))
    res = {"threads": torch.get_num_threads(), "input": list(img.size), "runs": {}}
    cpu = torch.device("cpu")
    for name, dtype in [("fp32", torch.float32), ("auto", pick_dtype("auto", cpu))]:
        model = YonosSR.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "yonos_x4.pt"),
                             dtype=dtype)
        tile, overlap = tile_settings(model)
        plan = memory_plan(model, img.width, img.height, tile, overlap, in_memory=False)
        lr, _, _, (Hp, Wp), _, _ = prepare(img, model, tile, overlap)
        src = Upsampled(lr, model.scale, Hp, Wp)
        x_up = src.rows(0, tile * model.vae.config.factor)[..., :tile * model.vae.config.factor].to(dtype)
        per_batch = max(1, 64 * 64 // (tile * tile))
        with FlopCounterMode(display=False) as counter:  # one tile batch: encode, one U-Net step, decode
            model.super_resolve(x_up.repeat(per_batch, 1, 1, 1), 1)
        flops = counter.get_total_flops() * plan["batches"]
        t0 = time.perf_counter()
        for _ in upscale_rows(img, model, tile=tile, overlap=overlap):
            pass
        seconds = time.perf_counter() - t0
        peak = matmul_peak(cpu, dtype)
        res["runs"][name] = {"dtype": str(dtype).removeprefix("torch."), "seconds": seconds, "tflop": flops / 1e12,
                             "mflop_per_output_pixel": flops / (img.width * img.height * 16) / 1e6,
                             "gflops_achieved": flops / seconds / 1e9, "matmul_peak_gflops": peak,
                             "fraction_of_peak": flops / seconds / 1e9 / peak, "tiles": plan["tiles"]}
        r = res["runs"][name]
        print(f"x4 {img.width}x{img.height} -> {img.width * 4}x{img.height * 4}, {r['dtype']}: {seconds:.1f} s, "
              f"{r['tflop']:.2f} TFLOP ({r['mflop_per_output_pixel']:.2f} MFLOP per output pixel), "
              f"{r['gflops_achieved']:.0f} GFLOP/s achieved, matmul peak {peak:.0f} GFLOP/s "
              f"({100 * r['fraction_of_peak']:.0f}%)")
    return res


MEMORY_SCRIPT = """
import json, resource, sys, torch, runtime, bench
args, limit = json.loads(sys.argv[1]), int(sys.argv[2])
if limit:  # a cap on this process's memory, so a step that does not fit fails here, not the machine's other work
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
before = runtime.current_rss()
print(json.dumps(bench.memory_step(**args) | {"peak_rss_bytes": runtime.peak_rss(), "baseline_rss_bytes": before}))
"""


def memory_step(stage: str, lora: int, checkpointing: bool, batch: int, crop: int, device: str, config: str) -> dict:
    """One SD-size training step as train.py takes it (bf16 autocast, AdamW): x2 is the plain objective; x4 is scale
    distillation, with the frozen teacher's U-Net held and run too. Returns the peak memory where torch reports it
    (CUDA) and train.py's memory plan for the same run."""
    from model import add_lora
    from runs import memory_plan
    from yonos import scale_distillation_loss
    device = torch.device(device)
    unet_name, vae_name = {"sd": ("sd21", "sd"), "small": ("small", "small"), "tiny": ("tiny", "tiny")}[config]
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_PRESETS[vae_name]).to(device).eval().requires_grad_(False)
    c = vae.config.latent_channels
    cfg = replace(UNET_PRESETS[unet_name], in_channels=2 * c, out_channels=c)
    with torch.device(device):
        unet = UNet(cfg).train()
        teacher = UNet(cfg).eval().requires_grad_(False) if stage == "x4" else None
    if lora:
        add_lora(unet, lora)
    unet.gradient_checkpointing = checkpointing
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    ctx = torch.randn(1, 77 if config == "sd" else 8, cfg.cross_attention_dim, device=device)
    ac = YonosSR(unet, vae, ctx[:, :1].cpu(), 2).alphas_cumprod.to(device)  # the bundle's schedule, as train.py
    hr = torch.rand(batch, 3, crop, crop, device=device) * 2 - 1
    lr_up = upsample(bicubic_lr(hr, 4 if stage == "x4" else 2), hr.shape[-2:])
    lr_teacher = upsample(bicubic_lr(hr, 2), hr.shape[-2:])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # the second step holds AdamW's moments too
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                z = [vae.encode(x)[0] * vae.config.scaling_factor for x in (hr, lr_up, lr_teacher)]
            loss = sr_loss(unet, z[0], z[1], ctx, ac) if teacher is None else \
                scale_distillation_loss(unet, teacher, z[0], z[1], z[2], ctx, ac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    plan = memory_plan(unet, (vae,) + ((teacher,) if teacher else ()), cfg, vae.config, batch, crop, 2, checkpointing,
                       device=device)
    out = {"stage": stage, "lora_rank": lora, "grad_checkpointing": checkpointing, "batch": batch, "crop": crop,
           "trained_parameters": sum(p.numel() for p in params), "plan_bytes": plan["bytes"]}
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def bench_memory(args, device: torch.device) -> dict:
    """memory_step for every combination, each in a fresh subprocess (so one's peak never hides another's), skipping
    on a CPU those whose plan exceeds the memory there is (said in the row)."""
    import subprocess
    import sys
    from runtime import available_memory
    rows = []
    for stage in args.stages.split(","):
        for lora in map(int, args.lora_ranks.split(",")):
            for checkpointing in [{"off": False, "on": True}[c] for c in args.checkpointing.split(",")]:
                for batch in map(int, args.train_batch.split(",")):
                    job = dict(stage=stage, lora=lora, checkpointing=checkpointing, batch=batch, crop=args.train_crop,
                               device=str(device), config=args.train_config)
                    limit = 0 if device.type == "cuda" else int(available_memory(device) * 0.8)
                    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, json.dumps(job), str(limit)],
                                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
                    if r.returncode:
                        why = (r.stderr.strip().splitlines() or ["failed"])[-1][:200]
                        oom = "memory" in why.lower() or "alloc" in why.lower()
                        row = job | {"error": f"did not fit in {limit / 2 ** 30:.0f} GiB" if oom and limit else why}
                    else:
                        row = json.loads(r.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    peak = row.get("peak_allocated_bytes", row.get("peak_rss_bytes"))
                    what = "allocated" if "peak_allocated_bytes" in row else "resident"
                    print(f"{stage}, {f'LoRA r={lora}' if lora else 'full'}, checkpointing {'on' if checkpointing else 'off'}, "
                          f"batch {batch}: " + (f"peak {what} {peak / 2 ** 30:.1f} GiB, plan {row['plan_bytes'] / 2 ** 30:.1f}"
                                                f" GiB" if peak else row.get("error", "")), flush=True)
    return {"device": str(device), "config": args.train_config, "crop": args.train_crop, "rows": rows,
            "available_bytes": available_memory(device)}


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
    p.add_argument("--memory", action="store_true", help="only the training memory table (see above)")
    p.add_argument("--upscale", action="store_true", help="only the CPU upscale speed against the matmul peak")
    p.add_argument("--image", default="", help="--upscale: the photo (its top-left 512 px; default: random pixels)")
    p.add_argument("--threads", type=int, default=0, help="--upscale: CPU threads (default: torch's)")
    p.add_argument("--train-config", choices=("sd", "small", "tiny"), default="sd",
                   help="model size for --train (default: sd, i.e. SD 2.1-base's U-Net and the SD VAE)")
    p.add_argument("--train-crop", type=int, default=512, help="HR crop side for --train (default: 512)")
    p.add_argument("--train-batch", default="4,8", help="batch sizes for --train (default: 4,8; give 1,4 for --memory)")
    p.add_argument("--stages", default="x2,x4", help="--memory: x2 (plain), x4 (distillation) or both (default)")
    p.add_argument("--lora-ranks", default="0,16", help="--memory: 0 = full fine-tuning (default: 0,16)")
    p.add_argument("--checkpointing", default="off,on", help="--memory: gradient checkpointing off, on or both "
                   "(default: off,on)")
    p.add_argument("--out", default="", help="also write the numbers as JSON here")
    args = p.parse_args(argv)
    lists = {"--stages": (args.stages, {"x2", "x4"}), "--checkpointing": (args.checkpointing, {"off", "on"}),
             "--lora-ranks": (args.lora_ranks, None), "--train-batch": (args.train_batch, None)}
    for flag, (value, allowed) in lists.items():
        items = value.split(",")
        if not all(i in allowed if allowed else i.isdigit() and (int(i) > 0 or flag == "--lora-ranks") for i in items):
            raise SystemExit(f"bench.py: error: {flag} {value}: a comma-separated list of "
                             + (", ".join(sorted(allowed)) if allowed else "whole numbers"))
    if args.data:
        res = bench_data(args)
    elif args.upscale:
        res = bench_upscale(args)
    else:
        try:
            device = resolve_device(args.device)
        except ValueError as e:
            raise SystemExit(f"bench.py: error: {e}")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        res = bench_memory(args, device) if args.memory else bench_training(args, device) if args.train else \
            bench_models(args, device)
    if args.out:
        write_atomic(args.out, json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
