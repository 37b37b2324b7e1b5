"""
A training run's plumbing, kept out of train.py's loop: what the run holds (optimiser, precision, EMA), its files,
its lock, resuming, interrupts, DDP, and the memory plan checked before the first step.

  Run          what train.py's train_step works with: the trained module (DDP-wrapped), AdamW (`optimizer`), the
               precision (`Precision`: autocast, fp16's GradScaler), the EMA (`EMA`), a discriminator and its
               optimiser; how it is saved (--out and <out>.state) and resumed

  RunFiles     --out (the model), <out>.state (for --resume), <out>.log.jsonl, <out>.lock while it runs: nothing that
               exists is touched before this run's first save, every write is atomic (files.write_atomic), a save
               of non-finite weights is refused (the last good files stay), and --resume refuses a run whose
               model-defining options differ from the saved run's
  Interrupts   SIGINT / SIGTERM: save the step reached and stop; a second signal stops at once
  DDP          setup_distributed, wrap, StepSampler (which samples each process and step sees), quiet_worker
  memory_plan  an upper bound of what one optimiser step allocates, refused before any work if it cannot fit

References: PyTorch DistributedDataParallel (Li et al., arXiv 2006.15704); Micikevicius et al., Mixed Precision
Training, arXiv 1710.03740; Dettmers et al., 8-bit Optimizers via Block-wise Quantization, arXiv 2110.02861.
"""
import contextlib
import json
import math
import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from data import list_images
from files import Lock, check_outputs, load_state, remove_stale_temps, write_atomic
from model import merged_state_dict
from runtime import available_memory, resolve_device
from yonos import YonosSR


def fail(msg: str):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f"train.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# the options that define what a run trains: --resume refuses to continue a run saved with other values
IDENTITY = ("stage", "config", "scale", "pretrained", "vae", "teacher", "init", "unet", "with_unet", "with_encoder",
            "teacher_steps", "degradation", "crop", "batch_size", "grad_accum", "seed", "cond_drop", "w_max",
            "lora_rank", "lora_alpha", "ema", "adv_weight", "gan_weight", "mse_weight", "lpips")

# -----------------------------------------------------------------------------
# the run's files


class RunFiles:
    """--out, <out>.state and <out>.log.jsonl of one run, and <out>.lock while it runs. Nothing that exists is
    touched before the first save of this run; every write is atomic (files.write_atomic); none of them may be a
    file the run reads (a teacher, the model being fine-tuned, a training photo: files.check_outputs)."""

    def __init__(self, cfg, rank: int, reads: list[str]):
        self.out, self.state, self.log, self.lock_path = (cfg.out, cfg.out + ".state", cfg.out + ".log.jsonl",
                                                          cfg.out + ".lock")
        self.rank, self.rows, self.kept, self.saved, self.lock = rank, [], "", False, None
        self.identity = {k: getattr(cfg, k) for k in IDENTITY if hasattr(cfg, k)}
        if rank:
            return
        try:
            check_outputs([self.out, self.state, self.log, self.lock_path], reads)
        except ValueError as e:
            fail(str(e))
        if cfg.resume and not os.path.isfile(self.state):
            fail(f"--resume: no {self.state} to resume from")
        if not cfg.resume and not cfg.overwrite and any(os.path.exists(p) for p in (self.out, self.state)):
            fail(f"{self.out} exists; pass --resume to continue its run or --overwrite to replace it")
        try:
            self.lock = Lock(self.lock_path, "another train.py")
        except ValueError as e:
            fail(str(e))
        for p in (self.out, self.state, self.log):
            remove_stale_temps(p)  # left by a writer killed mid-save

    def release(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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

    def save(self, model_file, state: dict) -> bool:
        """Writes the model (`model_file(path)`) and the resume state, unless a weight is NaN or infinite: then the
        last good files are kept and False is returned (the caller stops)."""
        if self.rank:
            return True
        tensors = [v for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
        if not all(bool(torch.isfinite(v).all()) for v in tensors):
            return False
        model_file(self.out)
        write_atomic(self.state, lambda f: torch.save(state | {"identity": self.identity}, f))
        self.saved = True
        self.write_log()
        return True

    def load(self, device) -> dict:
        """The resume state, after checking it belongs to a run with this run's model-defining options."""
        try:
            state = load_state(self.state, device)
        except ValueError as e:
            fail(str(e))
        if not isinstance(state, dict) or "step" not in state or not isinstance(state["step"], int):
            fail(f"{self.state}: not a resume state written by train.py")
        saved = state.get("identity", {})
        if not isinstance(saved, dict) or state.get("stage", self.identity["stage"]) != self.identity["stage"]:
            fail(f"{self.state}: not a resume state of a --stage {self.identity['stage']} run")
        changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {self.identity[k]!r}" for k in saved
                   if k in self.identity and saved[k] != self.identity[k]]
        if changed:
            fail(f"{self.state}: not a resume state of this run: it was saved with other options "
                 f"({'; '.join(changed[:3])}); rerun with the saved ones, or start a new --out")
        return state


def reads_of(cfg) -> list[str]:
    """The files a run reads, which none of its outputs may be: its checkpoints and its photos."""
    files = [cfg.teacher, cfg.unet, cfg.vae, cfg.init]
    for folder in (cfg.data, cfg.val_data):
        if folder and os.path.isdir(folder):
            files += list_images(folder)
    return [f for f in files if f]


# -----------------------------------------------------------------------------
# interrupts


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


def quiet_worker(worker_id: int) -> None:
    """A data-loading worker ignores SIGINT and SIGTERM: the main process handles them (saves, then stops the
    workers), so a signal to the whole process group (Ctrl-C, systemd, kill -TERM -PGID) never kills the data
    pipeline under a run that is still saving."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_requested(stop: Interrupts, world: int, device) -> bool:
    """Whether any process got SIGINT/SIGTERM (all ranks must stop at the same step)."""
    flag = torch.tensor([float(stop.signal is not None)], device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# -----------------------------------------------------------------------------
# distributed: the same code runs alone, under torchrun, or in 2 CPU processes (tests)


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


def no_sync(module: nn.Module, sync: bool):
    """DDP's no_sync for the micro-batches of --grad-accum before the last: their gradients add up locally and are
    averaged across processes once, with the last one's."""
    if sync or not isinstance(module, nn.parallel.DistributedDataParallel):
        return torch.enable_grad()
    return module.no_sync()


class StepSampler(torch.utils.data.Sampler):
    """Sample numbers for steps start..steps-1 on this rank: sample k of step s is s*B*world + rank*B + k (B = the
    step's whole batch, all its micro-batches), so every process sees different crops, a resumed run sees exactly
    the crops it would have seen, and --grad-accum N with batch b sees the samples of one batch of N*b."""

    def __init__(self, start: int, steps: int, batch: int, rank: int, world: int):
        self.start, self.steps, self.batch, self.rank, self.world = start, steps, batch, rank, world

    def __iter__(self):
        for s in range(self.start, self.steps):
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self):
        return (self.steps - self.start) * self.batch


# -----------------------------------------------------------------------------
# what a run holds: AdamW, the precision, the EMA


def optimizer(params, lr: float, device: torch.device, kind: str = "adamw", note=print, **kw) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel on CUDA; or bitsandbytes' 8-bit AdamW (Dettmers et al. 2021, arXiv 2110.02861),
    whose moments take a quarter of the memory, where that package is installed (never required)."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes
            return bitsandbytes.optim.AdamW8bit(params, lr=lr, **kw)
        except ImportError:
            note("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes); using AdamW")
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda", **kw)


class Precision:
    """bf16 or fp16 autocast, or fp32. fp16 (for GPUs without bf16, such as a T4) keeps a GradScaler: the loss is
    scaled up so small gradients survive fp16, gradients are unscaled before clipping, and a step whose gradients
    overflowed is skipped and the scale lowered (Micikevicius et al. 2018, arXiv 1710.03740)."""

    def __init__(self, name: str, device: torch.device):
        if name == "auto":
            name = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        self.device, self.name = device, name
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.name != "fp32" else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, opt, params, clip: float) -> float:
        """Clips and steps; returns the gradient norm before clipping (inf or nan: the step was skipped)."""
        if self.scaler:
            self.scaler.unscale_(opt)
        norm = float(nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
        if self.scaler:
            self.scaler.step(opt)  # skips the update by itself when the gradients hold inf or nan
            self.scaler.update()
        elif math.isfinite(norm):
            opt.step()
        return norm


class EMA:
    """An exponential moving average of the trained parameters: after optimiser step t,
        ema <- d_t ema + (1 - d_t) theta,   d_t = min(decay, (1 + t) / (10 + t)),
    the warm-up of d_t so early weights, far from the end, are forgotten fast (as diffusers' EMAModel). The average
    is what --out holds (`swap` exchanges it with the live weights for saving and validating)."""

    def __init__(self, params: list[nn.Parameter], decay: float):
        self.decay, self.shadow = decay, [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, params: list[nn.Parameter], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.shadow, params):
            e.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def swap(self, params: list[nn.Parameter]) -> None:
        """Exchanges the average and the live weights in place, one tensor at a time (no second copy of the model)."""
        for e, p in zip(self.shadow, params):
            live = p.detach().clone()
            p.copy_(e)
            e.copy_(live)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("the EMA holds another set of parameters")
        self.shadow = [s.to(e.device, e.dtype) for s, e in zip(state["shadow"], self.shadow)]


# -----------------------------------------------------------------------------
# a run: what train_step works with, and how it is saved and resumed


class Run:
    """The trained module (DDP-wrapped), its optimiser, precision, EMA and discriminator, and the run's files."""

    def __init__(self, cfg, stage, files: RunFiles, rank: int, world: int, device, note):
        self.cfg, self.stage, self.files, self.rank, self.world, self.device = cfg, stage, files, rank, world, device
        self.model, self.disc = wrap(stage.trained, world, device), wrap(stage.disc, world, device)
        self.params = [p for p in stage.trained.parameters() if p.requires_grad]
        self.opt = optimizer(self.params, cfg.lr, device, cfg.optimizer, note, weight_decay=cfg.weight_decay)
        self.disc_params = [p for p in stage.disc.parameters() if p.requires_grad] if stage.disc else []
        self.opt_d = optimizer(self.disc_params, cfg.lr, device, betas=(0.5, 0.9)) if stage.disc else None
        for p in self.disc_params:  # the generator's loss reads the discriminator but does not train it
            p.requires_grad_(False)
        self.precision = Precision(cfg.precision, device)
        self.disc_precision = Precision(self.precision.name, device)
        self.ema = EMA(self.params, cfg.ema) if cfg.ema else None
        self.names = [n for n, p in stage.trained.named_parameters() if p.requires_grad]

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.cfg.seed * 7919 + step * self.world + self.rank)

    def diverged(self, why: str):
        last = f"the last good checkpoint is {self.cfg.out}" if self.files.saved or self.cfg.resume else \
            "nothing was written"
        print(f"train.py: error: {why}; stopping ({last})", file=sys.stderr)
        raise SystemExit(1)

    def discriminator_step(self, disc_steps: list) -> float:
        """The discriminator's step on the micro-batches' detached outputs, after the generator's."""
        for p in self.disc_params:
            p.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        total = 0.0
        for d in disc_steps:
            with self.disc_precision.autocast():
                loss_d = d() / len(disc_steps)
            self.disc_precision.backward(loss_d)
            total += loss_d.item()
        self.disc_precision.step(self.opt_d, self.disc_params, 0.0)
        for p in self.disc_params:
            p.requires_grad_(False)
        return total

    @contextlib.contextmanager
    def saved_weights(self):
        """Within it, the trained module holds what --out holds: the EMA weights if kept, else the live ones."""
        if self.ema is not None:
            self.ema.swap(self.params)
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.swap(self.params)

    def state(self, step: int) -> dict:
        """The resume state: the trained parameters (only the adapters and conv_in with LoRA), the optimiser, the
        step, the EMA, the GradScaler and the discriminator."""
        model = self.stage.trained.state_dict()
        if self.cfg.lora_rank:
            model = {k: v for k, v in model.items() if k in self.names}
        state = {"model": model, "optimizer": self.opt.state_dict(), "step": step, "stage": self.cfg.stage,
                 "scale": self.cfg.scale}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        if self.stage.disc is not None:
            state |= {"disc": self.stage.disc.state_dict(), "optimizer_d": self.opt_d.state_dict()}
        return state

    def save(self, step: int) -> None:
        """--out (the EMA weights if kept, LoRA merged) and <out>.state; a non-finite weight stops the run and keeps
        the last good files."""
        if self.rank:
            return
        bundle = self.stage.bundle
        if isinstance(bundle, YonosSR):
            bundle.meta["step"] = step
            # the HR crop the U-Net was trained on: sample.py tiles at its latent size by default (attention and
            # group norm see the whole tile, and a small model trained on small crops degrades on larger tiles)
            if self.cfg.stage == "sr" or "train_crop" not in bundle.meta:
                bundle.meta["train_crop"] = self.cfg.crop
            if self.cfg.ema:
                bundle.meta["ema"] = self.cfg.ema

        def model_file(path):
            with self.saved_weights():
                if isinstance(bundle, YonosSR) and self.cfg.lora_rank:
                    bundle.save(path, unet_state=merged_state_dict(bundle.unet))
                else:
                    bundle.save(path)
        if not self.files.save(model_file, self.state(step)):
            self.diverged(f"the weights are not finite at step {step}")

    def resume(self) -> int:
        """Loads <out>.state (after runs.RunFiles.load has checked it is this run's); returns the step to go on from."""
        state = self.files.load(self.device)
        try:
            self.stage.trained.load_state_dict(state["model"], strict=not self.cfg.lora_rank)
            if self.cfg.lora_rank and set(state["model"]) != set(self.names):
                raise ValueError("it holds other adapters")
            self.opt.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if self.precision.scaler is not None:
                self.precision.scaler.load_state_dict(state["scaler"])
            if self.stage.disc is not None:
                self.stage.disc.load_state_dict(state["disc"])
                self.opt_d.load_state_dict(state["optimizer_d"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            fail(f"{self.files.state}: does not fit this run ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        self.files.resume(state["step"])
        return state["step"]


# -----------------------------------------------------------------------------
# memory: an upper bound of one step, before any work


def activation_bytes(unet_config, vae_config, crop: int, element: int, checkpointing: bool) -> float:
    """Bytes of the activations one training sample keeps for the backward pass of the U-Net at `crop` pixels: per
    level, each resnet's ~8 saved tensors and each transformer block's ~12 (plus its attention scores, as if
    materialised), the up path's concatenations; with gradient checkpointing, the levels' inputs and one level
    at a time. An upper bound (measured peaks in README, "Training from SD")."""
    u, f = unet_config, vae_config.factor
    cells = (crop // f) ** 2
    per_level = []
    for i, ch in enumerate(u.block_out_channels):
        n = cells / 4 ** i
        resnets = (2 * u.layers_per_block + 1) * 8 * ch * n * 1.5  # down and up resnets, the up ones wider
        attn = (2 * u.layers_per_block + 1) * (12 * ch * n + 2 * u.num_heads[i] * n * n) if u.attn_levels[i] else 0
        per_level.append(resnets + attn)
    mid = 3 * 8 * u.block_out_channels[-1] * cells / 4 ** (len(u.block_out_channels) - 1)
    if checkpointing:
        saved = sum(2 * ch * cells / 4 ** i for i, ch in enumerate(u.block_out_channels)) + max(per_level) + mid
    else:
        saved = sum(per_level) + mid
    return saved * element


def memory_plan(trained: nn.Module, frozen, unet_config, vae_config, batch: int, crop: int, element: int,
                checkpointing: bool, adam_bytes: int = 8, ema: bool = False, device: torch.device | None = None) -> dict:
    """The bytes one optimiser step allocates (measured at SD size, results/README.md: within 5% below the peak for
    full fine-tuning at batch 1, 30-40% above it for LoRA at batch 4): every model's weights, the trained parameters'
    gradients, AdamW's two moments (`adam_bytes` a parameter: 8, or 2 for 8-bit AdamW) and the EMA copy, one
    micro-batch's images and activations (`element` bytes each: 2 under bf16/fp16; frozen networks forward only: the
    VAE, the teacher, at their widest point), the rest in fp32."""
    params = [p for p in trained.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in params)
    held = {id(p): p for m in frozen for p in m.parameters()}
    held.update({id(p): p for p in trained.parameters() if not p.requires_grad})
    weights = sum(p.numel() * 4 for p in held.values()) + n_trained * 4
    images = batch * 3 * crop ** 2 * 4 * 3
    act = batch * activation_bytes(unet_config, vae_config, crop, element, checkpointing) if unet_config else 0
    vae_peak = batch * 6 * max(vae_config.block_out_channels) * crop ** 2 * element if vae_config else 0
    total = weights + n_trained * (4 + adam_bytes + (4 if ema else 0)) + images + max(act, vae_peak)
    return {"bytes": int(total), "available": available_memory(device), "trained": n_trained}
