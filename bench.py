"""
Speed, measured in one run on one machine with the same random weights:
  1. our U-Net forward vs diffusers' UNet2DConditionModel at the SD 2.1-base config,
  2. our VAE decode vs diffusers' AutoencoderKL,
  3. end-to-end sampling: encode + N x (one U-Net step) + decode for N in {1, 4, 200}, against the sum of parts.

  python bench.py --latent 64 --repeats 3        # SD 2.1-base at 512x512 output (64x64 latent)
  python bench.py --latent 32 --e2e-latent 32    # quicker

Needs diffusers (a test-only dependency). fp32, CPU unless --device says otherwise.
"""
import argparse
import json
import statistics
import time

import torch

from model import UNET_PRESETS, UNet, widen_conv_in
from vae import VAE_PRESETS, AutoencoderKL
from yonos import YonosSR


def timed_pair(fa, fb, repeats: int) -> tuple[float, float]:
    """Median wall times of two functions measured alternately (a b, b a, ...), after one warm-up call each,
    so drifts in machine load hit both alike."""
    fa(), fb()
    ta, tb = [], []
    for r in range(repeats):
        for fn, out in ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def timed(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=64, help="latent side for parts 1-2 (default: 64, i.e. 512 px)")
    p.add_argument("--e2e-latent", type=int, default=32, help="latent side for part 3 (default: 32, i.e. 256 px)")
    p.add_argument("--e2e-steps", default="1,4,200", help="step counts for part 3 (default: 1,4,200)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement; the median is kept")
    p.add_argument("--skip-e2e", action="store_true", help="only parts 1-2")
    p.add_argument("--out", default="", help="also write the numbers as JSON here")
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL as RefVAE, UNet2DConditionModel
    torch.manual_seed(0)
    cfg = UNET_PRESETS["sd21"]
    ref = UNet2DConditionModel(**cfg.to_diffusers()).eval()
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    h = args.latent
    x, t, ctx = torch.randn(1, 4, h, h), torch.tensor([999]), torch.randn(1, 77, cfg.cross_attention_dim)
    res = {"threads": torch.get_num_threads(), "latent": h}
    res["unet_ours_s"], res["unet_diffusers_s"] = timed_pair(lambda: ours(x, t, ctx), lambda: ref(x, t, ctx),
                                                             args.repeats)
    res["unet_ratio"] = res["unet_ours_s"] / res["unet_diffusers_s"]
    print(f"U-Net forward {h}x{h} latent: ours {res['unet_ours_s']:.2f}s, diffusers {res['unet_diffusers_s']:.2f}s, "
          f"ratio {res['unet_ratio']:.3f}")
    ref = None  # free its memory before the VAE
    ref_vae = RefVAE(**VAE_PRESETS["sd"].to_diffusers()).eval()
    vae = AutoencoderKL(VAE_PRESETS["sd"]).eval()
    vae.load_state_dict(ref_vae.state_dict())
    z = torch.randn(1, 4, h, h)
    res["decode_ours_s"], res["decode_diffusers_s"] = timed_pair(lambda: vae.decode(z), lambda: ref_vae.decode(z),
                                                                 args.repeats)
    res["decode_ratio"] = res["decode_ours_s"] / res["decode_diffusers_s"]
    print(f"VAE decode {h * 8}x{h * 8}: ours {res['decode_ours_s']:.2f}s, diffusers {res['decode_diffusers_s']:.2f}s, "
          f"ratio {res['decode_ratio']:.3f}")
    ref_vae = None
    if not args.skip_e2e:
        e = args.e2e_latent
        model = YonosSR(widen_conv_in(ours, 8), vae, ctx, 4).eval()
        x_up, zl = torch.rand(1, 3, e * 8, e * 8) * 2 - 1, torch.randn(1, 4, e, e)
        parts = {"encode": timed(lambda: model.encode(x_up), args.repeats),
                 "unet_step": timed(lambda: model.unet(torch.cat([zl, zl], 1), t, ctx), args.repeats),
                 "decode": timed(lambda: model.decode(zl), args.repeats)}
        res["e2e"] = {"latent": e, "parts": parts, "runs": {}}
        for n in map(int, args.e2e_steps.split(",")):
            total = timed(lambda: model.super_resolve(x_up, steps=n), 1 if n > 8 else args.repeats)
            expected = parts["encode"] + n * parts["unet_step"] + parts["decode"]
            res["e2e"]["runs"][n] = {"total_s": total, "parts_sum_s": expected, "ratio": total / expected}
            print(f"end to end {e * 8}x{e * 8}, {n} step(s): {total:.2f}s; encode + {n} x U-Net + decode = "
                  f"{expected:.2f}s (ratio {total / expected:.3f})")
        runs = res["e2e"]["runs"]
        if 1 in runs and 200 in runs:
            print(f"one step vs 200 steps: {runs[200]['total_s'] / runs[1]['total_s']:.1f}x faster")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
