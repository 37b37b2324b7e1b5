"""
YONOS-SR: one-step super-resolution with Stable Diffusion via scale distillation. The method, and nothing else.

Read it in this order: the noise schedule and the v-parameterisation; what the SR U-Net predicts from [z_t, z_l];
DDIM sampling, which with one step is a single line; the SR objective and scale distillation (with why it can help,
and what it cannot change); the rules of the scale chain; `YonosSR`, the bundle a checkpoint holds. Then, for
comparison, the other ways to few steps of the seed papers (progressive and guided distillation, D3SR's diffusion
discriminator) and the autoencoder's losses (the tiny VAE, the decoder fine-tune). Everything is a pure function of
tensors and of one `alphas_cumprod`, the bundle's: no function builds a schedule of its own.

Notation (paper symbol -> name here):
  T = 1000            number of training timesteps, t in {0, ..., T-1}
  alpha_bar_t         alphas_cumprod[t], product of (1 - beta_s) for s <= t
  alpha_t, sigma_t    sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)           (alpha^2 + sigma^2 = 1)
  SNR(t)              alpha_t^2 / sigma_t^2; lambda_t = log SNR(t)
  z_h, z_l            latents of the HR image and of the (bicubic-upsampled) LR image; z_l' the teacher's LR (s/2)
  z_t                 noised HR latent  alpha_t z_h + sigma_t eps
  v                   alpha_t eps - sigma_t z_h          (Salimans & Ho 2022, sec. 4)
  x0_pred, v_pred     the U-Net's estimates of z_h and v

References:
  Noroozi et al., "You Only Need One Step: Fast Super-Resolution with Stable Diffusion via Scale Distillation"
    (YONOS-SR), arXiv 2401.17258
  Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", arXiv 2202.00512
  Song et al., "Denoising Diffusion Implicit Models" (DDIM), arXiv 2010.02502
  Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752
  Esser et al., "Taming Transformers for High-Resolution Image Synthesis", arXiv 2012.09841 (decoder losses)
  Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891 (trailing spacing)
  Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), arXiv 2206.00364
"""
from __future__ import annotations  # the stage rules name YonosSR, which comes after them

import copy
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import check_model_header, config_from_dict, load_checked, read_checkpoint, save_checkpoint
from model import UNet, UNetConfig, add_guidance_embedding
from vae import AutoencoderKL, VAEConfig

T = 1000

# -----------------------------------------------------------------------------
# 1. the noise schedule and the v-parameterization


def make_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = T) -> torch.Tensor:
    """SD's "scaled linear" schedule (LDM configs): sqrt(beta) linear in t; returns alpha_bar_t, (T,) float64."""
    # BEGIN SOLUTION schedule
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)
    # END SOLUTION


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) shaped (B, 1, 1, 1) for broadcasting over latents; t = -1 means t = "clean" (alpha 1)."""
    ab = torch.where(t >= 0, alphas_cumprod.to(t.device)[t.clamp(min=0)], torch.ones((), dtype=alphas_cumprod.dtype,
                                                                                    device=t.device))
    ab = ab.float()[:, None, None, None]
    return ab.sqrt(), (1 - ab).sqrt()


def q_sample(z_0, t, eps, alphas_cumprod):
    """Forward process q(z_t | z_0): z_t = alpha_t z_0 + sigma_t eps (DDPM eq. 4)."""
    # BEGIN SOLUTION schedule
    a, s = alpha_sigma(alphas_cumprod, t)
    return a * z_0 + s * eps
    # END SOLUTION


def v_target(z_0, eps, t, alphas_cumprod):
    """v = alpha_t eps - sigma_t z_0 (Salimans & Ho 2022, eq. 15 region)."""
    # BEGIN SOLUTION schedule
    a, s = alpha_sigma(alphas_cumprod, t)
    return a * eps - s * z_0
    # END SOLUTION


def x0_from_v(z_t, v, t, alphas_cumprod):
    """x0 = alpha_t z_t - sigma_t v."""
    # BEGIN SOLUTION schedule
    a, s = alpha_sigma(alphas_cumprod, t)
    return a * z_t - s * v
    # END SOLUTION


def eps_from_v(z_t, v, t, alphas_cumprod):
    """eps = sigma_t z_t + alpha_t v."""
    # BEGIN SOLUTION schedule
    a, s = alpha_sigma(alphas_cumprod, t)
    return s * z_t + a * v
    # END SOLUTION


def snr(t, alphas_cumprod):
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2, shaped (B, 1, 1, 1)."""
    a, s = alpha_sigma(alphas_cumprod, t)
    return (a / s) ** 2


# -----------------------------------------------------------------------------
# 2. what the SR U-Net predicts


def predict_v(unet, z_t, z_l, t, context, alphas_cumprod, w=None):
    """The SR U-Net's v-prediction for z_t given the LR latent: it sees [z_t, z_l] concatenated on channels (YONOS-SR,
    fig. 2), the timestep, the fixed context (and the guidance weight w, if it was trained by guided distillation to
    take it). What its output means is in its config, and is read here, once, into v; everything after this line
    sees v:
      - v itself (prediction_type "v": SD 2.x-768, the tiny presets);
      - eps (prediction_type "epsilon": SD 1.5 and SD 2.1-base), read exactly through `v_from_eps`;
      - a residual over z_l (lr_prior_std > 0: the small presets, the shipped models), read through
        `lr_preconditioning`."""
    x = torch.cat([z_t, z_l], dim=1)
    out = unet(x, t, context) if w is None else unet(x, t, context, w)
    cfg = getattr(getattr(unet, "module", unet), "config", None)  # through DDP; a stand-in without one predicts v
    if getattr(cfg, "lr_prior_std", 0.0):
        return lr_preconditioning(out, z_t, z_l, t, cfg.lr_prior_std, alphas_cumprod)
    if getattr(cfg, "prediction_type", "v") == "epsilon":
        return v_from_eps(z_t, out, t, alphas_cumprod)
    return out


def prior_std(unet) -> float:
    """The s of lr_preconditioning a U-Net was built with (0: plain v-prediction); looks through a DDP wrapper."""
    return getattr(getattr(getattr(unet, "module", unet), "config", None), "lr_prior_std", 0.0)


def v_from_eps(z_t, eps, t, alphas_cumprod):
    """v = (eps - sigma_t z_t) / alpha_t, the v that an eps-prediction means (from z_t = alpha x0 + sigma eps and
    v = alpha eps - sigma x0). Exact, so an eps-model such as SD 2.1-base computes at step 0 what it was trained
    to; but 1 / alpha_999 = 14.7 (alpha_bar_999 = 0.0047): at t = 999, where one step samples, every error of eps is
    14.7 times larger in v and x0, which is why the v-model is the default start (README, "Training from SD")."""
    a, s = alpha_sigma(alphas_cumprod, t)
    return (eps.float() - s * z_t.float()) / a


def lr_preconditioning(out, z_t, z_l, t, s: float, alphas_cumprod):
    """Ours, for U-Nets trained from scratch on a CPU (the paper uses SD's plain v-prediction): EDM's
    preconditioning (Karras et al. 2022, arXiv 2206.00364, sec. 5) around the LR latent instead of around 0, i.e.
    a prior z_0 ~ N(z_l, s^2 I). The best guess of z_0 from z_t under that prior (a Wiener filter),
        x0_base = z_l + alpha s^2 / (sigma^2 + alpha^2 s^2) (z_t - alpha z_l),
    is z_l itself at t = 999 (up to alpha s^2 = 0.003) and z_t / alpha near t = 0; the network adds c_out F to
    it, with c_out = sigma s / sqrt(sigma^2 + alpha^2 s^2) the prior's posterior std, so it learns the residual
    (z_h - z_l) / s at unit scale, as residual SR does (VDSR, Kim et al. 2016, arXiv 1511.04587; SRDiff, Li et
    al. 2022, arXiv 2104.14951). Returns the v that this x0 means, so the losses and samplers are unchanged."""
    a, sig = alpha_sigma(alphas_cumprod, t)
    z_t, z_l, var = z_t.float(), z_l.float(), sig ** 2 + (a * s) ** 2
    x0 = z_l + (a * s * s / var) * (z_t - a * z_l) + (sig * s / var.sqrt()) * out.float()
    return (a * z_t - x0) / sig


def guided_v(unet, z_t, z_l, t, context, alphas_cumprod, w):
    """Classifier-free guidance on the LR condition (Ho & Salimans 2022, arXiv 2207.12598), in one batched call:
    (1 + w) v(z_t, z_l) - w v(z_t, 0). It is linear, so x0 and eps are guided the same way. The U-Net must have
    been trained with the condition dropped now and then (train.py --cond-drop)."""
    v_cond, v_uncond = predict_v(unet, torch.cat([z_t, z_t]), torch.cat([z_l, torch.zeros_like(z_l)]),
                                 torch.cat([t, t]), context, alphas_cumprod).chunk(2)
    return (1 + w) * v_cond - w * v_uncond


def sample_v(unet, z_t, z_l, t, context, alphas_cumprod, guidance: float = 0.0):
    """v for sampling: plain; guided with two evaluations; or, for a guided-distilled U-Net, one call taking w."""
    if not guidance:
        return predict_v(unet, z_t, z_l, t, context, alphas_cumprod)
    if unet.config.guidance_embedding:
        w = torch.full((z_t.shape[0],), float(guidance), device=z_t.device)
        return predict_v(unet, z_t, z_l, t, context, alphas_cumprod, w)
    return guided_v(unet, z_t, z_l, t, context, alphas_cumprod, guidance)


# -----------------------------------------------------------------------------
# 3. sampling: DDIM with eta = 0


def ddim_timesteps(steps: int, num_train_timesteps: int = T) -> list[int]:
    """"Trailing" spacing (Lin et al. 2023, table 2): the first step is always t = T-1, the noisiest timestep
    training saw. 1 -> [999]; 4 -> [999, 749, 499, 249]. SD's schedule does not reach pure noise there: at t = 999,
    alpha_bar = 0.0047, so a training z_t still holds alpha = 0.068 of z_h, while the sampler starts from noise
    alone (Lin et al.'s zero-terminal-SNR point; the conditioning z_l carries the image anyway)."""
    # BEGIN SOLUTION ddim
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps / steps
    return [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(steps)]
    # END SOLUTION


def ddim_step(z_t, v_pred, t, t_prev, alphas_cumprod):
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with sigma = 0) from t to t_prev in v-form:
    z_prev = alpha_prev x0_pred + sigma_prev eps_pred; t_prev = -1 returns x0_pred itself."""
    # BEGIN SOLUTION ddim
    x0_pred = x0_from_v(z_t, v_pred, t, alphas_cumprod)
    eps_pred = eps_from_v(z_t, v_pred, t, alphas_cumprod)
    return q_sample(x0_pred, t_prev, eps_pred, alphas_cumprod)
    # END SOLUTION


@torch.no_grad()
def ddim_sample(unet, z_l, context, alphas_cumprod, steps: int = 1, noise: torch.Tensor | None = None,
                guidance: float = 0.0):
    """N-step DDIM sampler for the SR model: z_T ~ N(0, I) -> ... -> z_0 = x0_pred of the last step.
    With steps=1 this is a single line: x0_pred = alpha_999 z_T - sigma_999 v_pred."""
    z = torch.randn_like(z_l) if noise is None else noise
    ts = ddim_timesteps(steps)
    for t, t_prev in zip(ts, ts[1:] + [-1]):
        tb = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        v_pred = sample_v(unet, z, z_l, tb, context, alphas_cumprod, guidance).float()
        z = ddim_step(z, v_pred, tb, torch.full_like(tb, t_prev), alphas_cumprod)
    return z


# -----------------------------------------------------------------------------
# 4. the SR objective and scale distillation


def noised(z_h, alphas_cumprod, generator=None):
    """A random timestep per sample, noise, and z_t. Drawn sample by sample from the one generator, so a batch
    split into micro-batches (train.py --grad-accum) draws the same numbers as the whole batch."""
    t, eps = [], []
    for _ in range(z_h.shape[0]):
        t.append(torch.randint(0, T, (1,), device=z_h.device, generator=generator))
        eps.append(torch.randn((1, *z_h.shape[1:]), device=z_h.device, generator=generator))
    t, eps = torch.cat(t), torch.cat(eps)
    return t, q_sample(z_h, t, eps, alphas_cumprod)


def weighted_x0_loss(x0_pred, target, t, alphas_cumprod, prior_std: float = 0.0):
    """omega(lambda_t) ||x0_pred - target||^2 with omega = SNR + 1 ("SNR+1" weighting of Salimans & Ho 2022).
    Since x0_pred - z_0 = -sigma_t (v_pred - v) and SNR + 1 = 1 / sigma_t^2, against z_0 it is exactly the v-MSE.
    For a U-Net read through lr_preconditioning (prior_std = its s > 0), omega is EDM's 1 / c_out^2 instead,
    (sigma^2 + alpha^2 s^2) / (sigma^2 s^2): the same weight on the network's own output at every t (with SNR + 1,
    t near 0 would weigh 1 / s^2 = 25 times more than the high t at which one step samples)."""
    # BEGIN SOLUTION sr_loss
    if prior_std:
        a, sig = alpha_sigma(alphas_cumprod, t)
        w = (sig ** 2 + (a * prior_std) ** 2) / (sig * prior_std) ** 2
    else:
        w = snr(t, alphas_cumprod) + 1
    return (w * (x0_pred.float() - target.float()) ** 2).mean()
    # END SOLUTION


def sr_loss(unet, z_h, z_l, context, alphas_cumprod, generator=None):
    """Plain SR objective (YONOS-SR eq. 1): E ||x0_pred(z_t, z_l, t) - z_h||^2, weighted."""
    # BEGIN SOLUTION sr_loss
    t, z_t = noised(z_h, alphas_cumprod, generator)
    x0_pred = x0_from_v(z_t, predict_v(unet, z_t, z_l, t, context, alphas_cumprod), t, alphas_cumprod)
    return weighted_x0_loss(x0_pred, z_h, t, alphas_cumprod, prior_std(unet))
    # END SOLUTION


def scale_distillation_loss(student, teacher, z_h, z_l, z_l_teacher, context, alphas_cumprod, generator=None):
    """Scale distillation (YONOS-SR eq. 2): the target is not z_h but the frozen teacher's x0_pred g for the same
    z_t and t, where the teacher sees the milder LR y' (scale s/2) of the same HR crop and the student the LR y at
    scale s.

    What it can change. With nested degradations y is (up to rounding) a function of y' (data.degrade_lr), so for a
    perfect teacher g = E[z_h | z_t, y'] the student's optimum is E[g | z_t, y] = E[z_h | z_t, y] (the tower
    property): the plain objective's optimum, at every t. For any student f of (z_t, y),
        E||z_h - f||^2 = E||z_h - g||^2 + E||g - f||^2,
    so the two losses differ by a constant and have the same expected gradient; distillation only removes the
    term z_h - g from each sample's target (a lower-variance minibatch gradient), and a real teacher adds its own
    error to the optimum (the student learns E[g | z_t, y], bias included). Both objectives' optimum "adapts to the
    noise level"; what is true is that g is nearer the optimum than z_h, most of all at large t, where z_t says
    little and z_h - g is large. So it can help when gradient noise is what limits training (few steps, little
    data) and the teacher is good; it cannot make the one-step output (the t = 999 estimate of E[z_h | y]) better
    than the plain objective's optimum, nor sharper (both targets' optimum is a conditional mean)."""
    # BEGIN SOLUTION scale_distillation
    t, z_t = noised(z_h, alphas_cumprod, generator)
    with torch.no_grad():  # the teacher runs forward only; no gradient can reach it
        target = x0_from_v(z_t, predict_v(teacher, z_t, z_l_teacher, t, context, alphas_cumprod), t, alphas_cumprod)
    x0_pred = x0_from_v(z_t, predict_v(student, z_t, z_l, t, context, alphas_cumprod), t, alphas_cumprod)
    return weighted_x0_loss(x0_pred, target, t, alphas_cumprod, prior_std(student))
    # END SOLUTION


# -----------------------------------------------------------------------------
# 5. the rules of the scale chain


def teacher_scale(scale: int) -> int:
    """Scale distillation's chain (YONOS-SR sec. 3.2): the teacher of a x s student works at x s/2."""
    return scale // 2


def distillation_student(teacher: YonosSR, scale: int) -> YonosSR:
    """The student of scale distillation: a copy of the teacher's U-Net (the student starts where the teacher
    is), the teacher's VAE and context, at twice the teacher's scale. The teacher stays frozen."""
    if teacher.scale != teacher_scale(scale) or scale % 2:
        raise ValueError(f"the teacher is a x{teacher.scale} model; a x{scale} student needs a "
                         f"x{teacher_scale(scale)} teacher")
    teacher.requires_grad_(False).eval()
    student = copy.deepcopy(teacher.unet).requires_grad_(True)
    meta = {"stage": "sr", "teacher_scale": teacher.scale, "init": teacher.meta.get("init", "")}
    return YonosSR(student, teacher.vae, teacher.context, scale, meta, teacher.alphas_cumprod)


def plain_start(model: YonosSR, scale: int) -> YonosSR:
    """The plain objective started from another SR model's weights, at any scale: its U-Net (trained on), VAE and
    context. Beside scale distillation from the same model, it isolates what the distillation target changes."""
    meta = {"stage": "sr", "init": model.meta.get("init", ""), "init_scale": model.scale}
    return YonosSR(model.unet.requires_grad_(True), model.vae, model.context, scale, meta, model.alphas_cumprod)


# -----------------------------------------------------------------------------
# 6. the model bundle: everything sample.py needs in one file


class YonosSR(nn.Module):
    """SR U-Net (conv_in widened to take [z_t, z_l]) + VAE + the fixed context + the scale it upsamples by.
    Saved as one safetensors file (whatever the extension): tensors plus a JSON header with the configs,
    so loading never unpickles code."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, context: torch.Tensor, scale: int, meta: dict | None = None,
                 alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        c, u = vae.config.latent_channels, unet.config
        if (u.in_channels, u.out_channels) != (2 * c, c):
            raise ValueError(f"the U-Net takes {u.in_channels} and gives {u.out_channels} channels; with a {c}-channel "
                             f"VAE latent it must take {2 * c} ([z_t, z_l]) and give {c}")
        if not context.is_floating_point() or context.ndim != 3 or context.shape[0] != 1 or \
                context.shape[2] != u.cross_attention_dim:
            raise ValueError(f"context must be (1, tokens, {u.cross_attention_dim}), not {tuple(context.shape)}")
        if isinstance(scale, bool) or not isinstance(scale, int) or not 2 <= scale <= 64:
            raise ValueError(f"scale must be a whole number in 2..64, not {scale!r}")
        self.unet, self.vae, self.scale, self.meta = unet, vae, scale, dict(meta or {})
        self.compiled = False  # runtime.compile_model sets it: upscale.py then keeps tile batches one shape
        self.register_buffer("context", context.detach().clone())
        # THE schedule: every loss, sampler and preconditioning of this model reads this one tensor. A plain
        # attribute, not a buffer, so that casting the model to bf16 never rounds it (it stays float64, on the CPU;
        # alpha_sigma moves what it reads)
        ac = make_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.detach().cpu().to(torch.float64)
        if ac.shape != (T,) or not bool(((ac > 0) & (ac < 1) | (torch.arange(T) == T - 1) & (ac == 0)).all()):
            raise ValueError(f"alphas_cumprod must be {T} values in (0, 1) (the last may be 0)")
        self.alphas_cumprod = ac.clone()

    @property
    def multiple(self) -> int:
        """The padding rule: image sides must be multiples of the VAE factor times 2 per U-Net level below the
        first, so every downsampling halves without remainder."""
        return self.vae.config.factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def noise_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of z_T for images of height x width pixels: one latent cell per factor x factor pixels."""
        f = self.vae.config.factor
        return batch, self.vae.config.latent_channels, height // f, width // f

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent: the posterior mean times the scaling factor."""
        mean, _ = self.vae.encode(x)
        return mean * self.vae.config.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.vae.config.scaling_factor)

    @torch.no_grad()
    def super_resolve(self, x_up: torch.Tensor, steps: int = 1, noise: torch.Tensor | None = None,
                      guidance: float = 0.0) -> torch.Tensor:
        """x_up: the LR image already bicubic-upsampled to the output size, in [-1, 1] -> SR image in [-1, 1]."""
        z_l = self.encode(x_up)
        z_h = ddim_sample(self.unet, z_l, self.context.to(z_l.dtype), self.alphas_cumprod, steps, noise, guidance)
        return self.decode(z_h.to(z_l.dtype)).clamp(-1, 1)

    def save(self, path: str, dtype: torch.dtype | None = None, unet_state: dict | None = None) -> None:
        """One safetensors file with a JSON header (files.save_checkpoint); `dtype=torch.float16` halves it (the
        weights are cast back to fp32 when loaded; the schedule is always kept in float64). `unet_state` replaces
        the U-Net's own weights (train.py: LoRA merged into them)."""
        header = {"unet": asdict(self.unet.config), "vae": asdict(self.vae.config), "scale": self.scale,
                  "meta": self.meta}
        state = self.state_dict()
        if unet_state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("unet.")} | \
                {"unet." + k: v for k, v in unet_state.items()}
        tensors = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in state.items()}
        save_checkpoint(path, tensors | {"alphas_cumprod": self.alphas_cumprod}, header)

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "YonosSR":
        """A file written by save. files.read_checkpoint and check_model_header have checked every header field
        and tensor; the networks are built on the meta device and take the file's weights (one copy in memory)."""
        tensors, header = read_checkpoint(path)
        check_model_header(header, tensors, path)
        with torch.device("meta"):
            unet = UNet(config_from_dict(UNetConfig, header["unet"], f"{path}: unet config"))
            vae = AutoencoderKL(config_from_dict(VAEConfig, header["vae"], f"{path}: vae config"))
        try:
            model = cls(unet, vae, tensors["context"], header["scale"], header.get("meta"),
                        tensors.pop("alphas_cumprod", None))  # older files hold no schedule: SD's
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        load_checked(model, tensors, path, assign=True)
        return model.to(device=device, dtype=dtype).eval()

# -----------------------------------------------------------------------------
# 7. the other ways to few steps, for comparison: progressive and guided distillation, D3SR's discriminator


def drop_condition(z_l: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """Replaces each sample's LR latent by zeros with probability p, so one U-Net learns both the conditional
    and the unconditional prediction that classifier-free guidance mixes (Ho & Salimans 2022)."""
    if not p:
        return z_l
    keep = torch.rand(z_l.shape[0], device=z_l.device, generator=generator) >= p
    return z_l * keep[:, None, None, None].to(z_l.dtype)


def two_step_target(teacher, z_t, z_l, t, t_mid, t_next, context, alphas_cumprod, w=None):
    """Progressive distillation's target (Salimans & Ho 2022, Alg. 2): the x0 with which ONE DDIM step from t
    lands where the teacher's TWO steps t -> t_mid -> t_next land:
        x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t);
    on the last step (t_next = -1, sigma = 0) it is the teacher's result itself."""
    # BEGIN SOLUTION progressive
    z_mid = ddim_step(z_t, predict_v(teacher, z_t, z_l, t, context, alphas_cumprod, w).float(), t, t_mid,
                      alphas_cumprod)
    z_next = ddim_step(z_mid, predict_v(teacher, z_mid, z_l, t_mid, context, alphas_cumprod, w).float(), t_mid,
                       t_next, alphas_cumprod)
    a, s = alpha_sigma(alphas_cumprod, t)
    a_next, s_next = alpha_sigma(alphas_cumprod, t_next)
    return (z_next - (s_next / s) * z_t) / (a_next - (s_next / s) * a)
    # END SOLUTION


def progressive_distillation_loss(student, teacher, z_h, z_l, context, alphas_cumprod, teacher_steps: int,
                                  generator=None, w=None):
    """Salimans & Ho 2022, Alg. 2, on our v-parameterisation and trailing grid: a student step t -> t'' of the
    N/2-step grid matches two teacher steps on the N-step grid, whose every other point is the student's.
    Weight: "truncated SNR", max(SNR, 1) ||x0_pred - x~||^2 (their sec. 4)."""
    grid = torch.tensor(ddim_timesteps(teacher_steps) + [-1], device=z_h.device)
    j = torch.randint(0, teacher_steps // 2, (z_h.shape[0],), device=z_h.device, generator=generator)
    t, t_mid, t_next = grid[2 * j], grid[2 * j + 1], grid[2 * j + 2]
    eps = torch.randn(z_h.shape, device=z_h.device, generator=generator)
    z_t = q_sample(z_h, t, eps, alphas_cumprod)
    with torch.no_grad():
        target = two_step_target(teacher, z_t, z_l, t, t_mid, t_next, context, alphas_cumprod, w)
    x0_pred = x0_from_v(z_t, predict_v(student, z_t, z_l, t, context, alphas_cumprod, w), t, alphas_cumprod)
    weight = snr(t, alphas_cumprod).clamp(min=1)
    return (weight * (x0_pred.float() - target) ** 2).mean()


def guided_distillation_loss(student, teacher, z_h, z_l, context, alphas_cumprod, w_max: float, generator=None,
                             w_zero: float = 0.0):
    """Meng et al. 2023 (arXiv 2210.03142), stage 1: a student that takes w as an input matches, in one call,
    the teacher's guided prediction (1 + w) x0(z_l) - w x0(0) for w ~ U[0, w_max]; SNR+1 weighting as sr_loss.
    w_zero (ours): that share of the samples at w = 0 exactly, which uniform w all but never visits."""
    t, z_t = noised(z_h, alphas_cumprod, generator)
    w = torch.rand(z_h.shape[0], device=z_h.device, generator=generator) * w_max
    if w_zero:
        w = torch.where(torch.rand(w.shape, device=w.device, generator=generator) < w_zero, 0.0, w)
    with torch.no_grad():
        target = x0_from_v(z_t, guided_v(teacher, z_t, z_l, t, context, alphas_cumprod, w[:, None, None, None]).float(),
                           t, alphas_cumprod)
    x0_pred = x0_from_v(z_t, predict_v(student, z_t, z_l, t, context, alphas_cumprod, w), t, alphas_cumprod)
    return weighted_x0_loss(x0_pred, target, t, alphas_cumprod, prior_std(student))


class DiffusionDiscriminator(nn.Module):
    """D3SR's diffusion discriminator (Li et al., arXiv 2410.04224; the paper gives no equations and no code, so
    the details are ours): it judges a latent noised to a random timestep, z_t = alpha_t z + sigma_t eps, with the
    features of a frozen SR U-Net's encoder half and middle block (conditioned on z_l, like the generator), and
    small trainable heads on each level's features and the middle block giving patch logits. Noising at any t
    lets it compare coarse structure (large t) and fine detail (small t) without a teacher; the trunk stays
    frozen, and the generator's gradients flow through it to the input."""

    def __init__(self, unet: UNet, t_range: tuple[int, int] = (0, T - 1)):
        super().__init__()
        self.trunk = copy.deepcopy(unet).requires_grad_(False).eval()
        self.t_range = t_range
        c, g = unet.config.block_out_channels, unet.config.norm_num_groups
        self.heads = nn.ModuleList(nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                                 nn.SiLU(), nn.Conv2d(ch, 1, 1)) for ch in [*c, c[-1]])

    def train(self, mode: bool = True) -> "DiffusionDiscriminator":
        super().train(mode)
        self.trunk.eval()  # frozen: its group norms and attention behave as at inference
        return self

    def forward(self, z: torch.Tensor, z_l: torch.Tensor, context: torch.Tensor, alphas_cumprod,
                generator=None) -> torch.Tensor:
        """z: a clean latent (real or generated) -> (B, N) patch logits of all heads, at one random t per sample."""
        lo, hi = self.t_range
        t = torch.randint(lo, hi + 1, (z.shape[0],), device=z.device, generator=generator)
        z_t = q_sample(z, t, torch.randn(z.shape, device=z.device, generator=generator), alphas_cumprod)
        context = context.expand(z.shape[0], -1, -1)
        mid, _, levels = self.trunk.down(torch.cat([z_t, z_l], 1), self.trunk.embed(t, z.shape[0], z.dtype), context)
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, [*levels, mid])], 1)


def generator_adversarial_loss(disc, fake, z_l, context, alphas_cumprod, generator=None):
    """Non-saturating GAN loss of the generator (Goodfellow et al. 2014), as D3SR uses: softplus(-D(fake)),
    averaged over patches. Non-saturating rather than hinge: its gradient stays strong while the discriminator
    is winning, which it does early here (a one-step regression output is blurry, hence easy to tell)."""
    return F.softplus(-disc(fake, z_l, context, alphas_cumprod, generator)).mean()


def discriminator_adversarial_loss(disc, fake, real, z_l, context, alphas_cumprod, generator=None):
    """The discriminator's side: softplus(-D(real)) + softplus(D(fake)), the generator's output detached."""
    return (F.softplus(-disc(real, z_l, context, alphas_cumprod, generator)).mean()
            + F.softplus(disc(fake.detach(), z_l, context, alphas_cumprod, generator)).mean())


def one_step_prediction(unet, z_l, context, alphas_cumprod, generator=None):
    """The one-step sample as a differentiable function of the U-Net: x0 = alpha_999 z_T - sigma_999 v(z_T, z_l)."""
    z_T = torch.randn(z_l.shape, device=z_l.device, generator=generator)
    t = torch.full((z_l.shape[0],), T - 1, device=z_l.device, dtype=torch.long)
    return x0_from_v(z_T, predict_v(unet, z_T, z_l, t, context, alphas_cumprod), t, alphas_cumprod)


def progressive_student(teacher: YonosSR, teacher_steps: int) -> YonosSR:
    """Progressive distillation's student (Salimans & Ho 2022): a copy of the teacher that samples in half the
    teacher's steps; the checkpoint records that count, and sample.py uses it by default. Rounds chain
    (8 -> 4 -> 2 -> 1) by passing each student as the next teacher."""
    if teacher_steps < 2 or teacher_steps % 2:
        raise ValueError(f"the teacher's step count must be even and at least 2, not {teacher_steps}")
    teacher.requires_grad_(False).eval()
    meta = dict(teacher.meta) | {"stage": "steps", "teacher_steps": teacher_steps, "sampling_steps": teacher_steps // 2}
    return YonosSR(copy.deepcopy(teacher.unet).requires_grad_(True), teacher.vae, teacher.context, teacher.scale, meta,
                   teacher.alphas_cumprod)


def guided_student(teacher: YonosSR, w_max: float) -> YonosSR:
    """Guided distillation's student (Meng et al. 2023): the teacher's U-Net with a zero-initialised embedding of
    the guidance weight w, so it starts as the unguided teacher for every w."""
    teacher.requires_grad_(False).eval()
    unet = add_guidance_embedding(copy.deepcopy(teacher.unet)).requires_grad_(True)
    return YonosSR(unet, teacher.vae, teacher.context, teacher.scale, dict(teacher.meta) | {"stage": "guided",
                                                                                            "w_max": w_max},
                   teacher.alphas_cumprod)


# -----------------------------------------------------------------------------
# 8. the autoencoder: the tiny VAE's loss, and the decoder fine-tune on the frozen one-step U-Net


def vae_loss(vae, x, kl_weight: float = 1e-6):
    """Tiny-VAE objective: L1 + MSE reconstruction + a light KL term (LDM's KL-f autoencoders add LPIPS and a
    GAN at full size). The reconstruction goes through the posterior mean, not a sample: the SR model only
    ever uses the mean, and sampling with the initial unit variance drowns the latent in noise, which a
    light KL term lets the model undo only over thousands of steps (measured: 20 dB after 1,750 steps)."""
    x_rec, mean, logvar = vae(x, sample=False)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    rec = (x_rec - x).abs().mean() + ((x_rec - x) ** 2).mean()
    return rec + kl_weight * kl, {"kl": kl.item()}


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, x: torch.Tensor) -> float:
    """1 / std of the latents (posterior means) of training crops x, so the U-Net sees unit-variance latents:
    how SD's 0.18215 was measured (LDM, sec. 4.3.2 and appendix G)."""
    mean, _ = vae.encode(x)
    return float(1 / mean.std())


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, arXiv 1611.07004) as in the SD autoencoder's training: a realism logit per
    overlapping 70x70 patch at full width; `width` and `layers` shrink it for tiny configs."""

    def __init__(self, width: int = 64, layers: int = 3):
        super().__init__()
        chs = [3] + [width * min(2 ** i, 8) for i in range(layers + 1)]
        self.convs = nn.ModuleList(nn.Conv2d(chs[i], chs[i + 1], 4, stride=2 if i < layers else 1, padding=1)
                                   for i in range(layers + 1))
        self.norms = nn.ModuleList(nn.GroupNorm(1, chs[i + 1]) if i > 0 else nn.Identity() for i in range(layers + 1))
        self.head = nn.Conv2d(chs[-1], 1, 4, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.leaky_relu(norm(conv(x)), 0.2)
        return self.head(x)


def decoder_loss(x_rec, x_h, perceptual=None, disc=None, w_perceptual: float = 1.0, w_gan: float = 0.1):
    """Decoder fine-tune loss (YONOS-SR sec. 3.3), the SD autoencoder's own losses: L1 + LPIPS (when a
    perceptual network is given) + the generator's hinge term -D(x_rec) (when a discriminator is given)."""
    # BEGIN SOLUTION decoder_gan
    loss = (x_rec - x_h).abs().mean()
    if perceptual is not None:
        loss = loss + w_perceptual * perceptual(x_rec, x_h).mean()
    if disc is not None:
        loss = loss - w_gan * disc(x_rec).mean()
    return loss
    # END SOLUTION


def discriminator_loss(disc, x_rec, x_h):
    """Hinge loss for the discriminator (Lim & Ye 2017, arXiv 1705.02894), as in the SD autoencoder."""
    # BEGIN SOLUTION decoder_gan
    return F.relu(1 - disc(x_h)).mean() + F.relu(1 + disc(x_rec.detach())).mean()
    # END SOLUTION


class DecoderStage(nn.Module):
    """What the decoder fine-tune trains (YONOS-SR sec. 3.3): the bundle's post_quant_conv and decoder, as one
    module, so the optimiser and DDP see exactly these parameters; with `with_unet` (ours; the paper tunes the
    decoder alone), the U-Net too, and with `with_encoder` (ours, as OSEDiff tunes it) the encoder that makes z_l.
    forward is the model's one-step SR of the upsampled LR image, before the clamp: a frozen part records nothing
    for backward, so only what is trained learns."""

    def __init__(self, bundle: YonosSR, with_unet: bool = False, with_encoder: bool = False):
        super().__init__()
        self.post_quant_conv, self.decoder = bundle.vae.post_quant_conv, bundle.vae.decoder
        if with_unet:
            self.unet = bundle.unet
        if with_encoder:
            self.encoder, self.quant_conv = bundle.vae.encoder, bundle.vae.quant_conv
        object.__setattr__(self, "bundle", bundle)  # not a submodule: the frozen parts stay outside

    def forward(self, x_up: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = self.bundle
        z_l = b.encode(x_up)
        z_h = one_step_prediction(b.unet, z_l, b.context.to(z_l.dtype), b.alphas_cumprod, generator)
        return b.decode(z_h.to(z_l.dtype))


def decoder_stage(bundle: YonosSR, with_unet: bool = False, with_encoder: bool = False) -> DecoderStage:
    """Freezes the encoder (it makes z_l) and the U-Net (the one-step U-Net is final), unless `with_encoder` or
    `with_unet`, and returns the trainable decoder."""
    bundle.unet.requires_grad_(False).eval()
    bundle.vae.requires_grad_(False).eval()
    head = DecoderStage(bundle, with_unet, with_encoder).requires_grad_(True).train()
    frozen = ([] if with_encoder else [bundle.vae.encoder, bundle.vae.quant_conv]) + ([] if with_unet else [bundle.unet])
    assert not any(p.requires_grad for part in frozen for p in part.parameters())
    return head
