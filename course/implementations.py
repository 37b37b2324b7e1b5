"""
The course's other correct implementations of every task (course/README.md), which course/test_tasks.py grades
with: REFERENCES, the plain ones (diffusers' where diffusers has the same thing, else the formula) that stand in
for every task but the one under test, so a task's tests fail only because of its own code; and ALTERNATIVES, a
second correct implementation of each task written differently from the solution (COURSE_ALTERNATIVE=1 grades
them), so a test that only accepts the solution's exact arithmetic fails there.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D

import model
import upscale
import yonos
from model import Attention, ResnetBlock

# -----------------------------------------------------------------------------
# reference implementations of every task, for the parts around the one being graded


def ref_attention_forward(self, x, context=None):
    """softmax(q k^T / sqrt(d)) v, written out."""
    context = x if context is None else context
    B, N, C = x.shape
    split = lambda a: a.view(B, -1, self.heads, C // self.heads).transpose(1, 2).float()
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    h = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // self.heads), dim=-1) @ v
    return self.to_out[0](h.to(x.dtype).transpose(1, 2).reshape(B, N, C))


def diffusers_resnet(block: ResnetBlock) -> ResnetBlock2D:
    """diffusers' ResnetBlock2D holding the same weights as ours."""
    temb = block.time_emb_proj.in_features if block.time_emb_proj is not None else None
    ref = ResnetBlock2D(in_channels=block.conv1.in_channels, out_channels=block.conv1.out_channels, temb_channels=temb,
                        groups=block.norm1.num_groups, eps=block.norm1.eps)
    ref.load_state_dict(block.state_dict())
    return ref.eval()


def ref_resnet_forward(self, x, temb=None):
    return diffusers_resnet(self)(x, temb)


def ref_timestep_embedding(t, dim, max_period=10000.0):
    return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=max_period)


def ref_widen_conv_in(unet, in_channels=8):
    old = unet.conv_in
    new = nn.Conv2d(in_channels, old.out_channels, 3, padding=1)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in, unet.config.in_channels = new, in_channels
    return unet


def ref_alphas_cumprod(beta_start=0.00085, beta_end=0.012, steps=1000):
    return DDIMScheduler(beta_start=beta_start, beta_end=beta_end, beta_schedule="scaled_linear",
                         num_train_timesteps=steps).alphas_cumprod.double()


def REF_Q(z_0, t, eps, ac):  # q_sample
    a, s = yonos.alpha_sigma(ac, t)
    return a * z_0 + s * eps


def REF_V(z_0, eps, t, ac):  # v_target
    a, s = yonos.alpha_sigma(ac, t)
    return a * eps - s * z_0


def REF_X0(z_t, v, t, ac):  # x0_from_v
    a, s = yonos.alpha_sigma(ac, t)
    return a * z_t - s * v


def REF_EPS(z_t, v, t, ac):  # eps_from_v
    a, s = yonos.alpha_sigma(ac, t)
    return s * z_t + a * v


def ref_ddim_timesteps(steps, num_train_timesteps=1000):
    sched = DDIMScheduler(timestep_spacing="trailing", num_train_timesteps=num_train_timesteps)
    sched.set_timesteps(steps)
    return sched.timesteps.tolist()


def ref_ddim_step(z_t, v_pred, t, t_prev, ac):
    return REF_Q(REF_X0(z_t, v_pred, t, ac), t_prev, REF_EPS(z_t, v_pred, t, ac), ac)


def ref_weighted_x0_loss(x0_pred, target, t, ac, prior_std=0.0):
    a, s = yonos.alpha_sigma(ac, t)
    w = (s ** 2 + (a * prior_std) ** 2) / (s * prior_std) ** 2 if prior_std else yonos.snr(t, ac) + 1
    return (w * (x0_pred.float() - target.float()) ** 2).mean()


def ref_sr_loss(unet, z_h, z_l, context, ac, generator=None):
    t, z_t = yonos.noised(z_h, ac, generator)
    x0 = REF_X0(z_t, yonos.predict_v(unet, z_t, z_l, t, context, ac), t, ac)
    return ref_weighted_x0_loss(x0, z_h, t, ac, yonos.prior_std(unet))


def ref_scale_distillation_loss(student, teacher, z_h, z_l, z_l_teacher, context, ac, generator=None):
    t, z_t = yonos.noised(z_h, ac, generator)
    with torch.no_grad():
        target = REF_X0(z_t, yonos.predict_v(teacher, z_t, z_l_teacher, t, context, ac), t, ac)
    return ref_weighted_x0_loss(REF_X0(z_t, yonos.predict_v(student, z_t, z_l, t, context, ac), t, ac), target, t, ac,
                                yonos.prior_std(student))


def ref_decoder_loss(x_rec, x_h, perceptual=None, disc=None, w_perceptual=1.0, w_gan=0.1):
    loss = (x_rec - x_h).abs().mean()
    if perceptual is not None:
        loss = loss + w_perceptual * perceptual(x_rec, x_h).mean()
    return loss - w_gan * disc(x_rec).mean() if disc is not None else loss


def ref_discriminator_loss(disc, x_rec, x_h):
    return F.relu(1 - disc(x_h)).mean() + F.relu(1 + disc(x_rec.detach())).mean()


def ref_two_step_target(teacher, z_t, z_l, t, t_mid, t_next, context, ac, w=None):
    z_mid = ref_ddim_step(z_t, yonos.predict_v(teacher, z_t, z_l, t, context, ac, w).float(), t, t_mid, ac)
    z_next = ref_ddim_step(z_mid, yonos.predict_v(teacher, z_mid, z_l, t_mid, context, ac, w).float(), t_mid, t_next, ac)
    a, s = yonos.alpha_sigma(ac, t)
    a2, s2 = yonos.alpha_sigma(ac, t_next)
    return (z_next - s2 / s * z_t) / (a2 - s2 / s * a)


def ref_wavelet_low(x, levels=5):
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype) / 16
    for i in range(levels):
        d = 2 ** i
        x = F.conv2d(F.pad(x, (d,) * 4, mode="replicate"), k.expand(x.shape[1], 1, 3, 3), dilation=d, groups=x.shape[1])
    return x


def ref_color_fix(sr, x_up):
    return (sr - ref_wavelet_low(sr) + ref_wavelet_low(x_up)).clamp(-1, 1)


REFERENCES = {  # task -> [(module or class, attribute, reference)]
    "attention": [(Attention, "forward", ref_attention_forward)],
    "resnet": [(ResnetBlock, "forward", ref_resnet_forward)],
    "timestep_embedding": [(model, "timestep_embedding", ref_timestep_embedding)],
    "widen_conv_in": [(model, "widen_conv_in", ref_widen_conv_in)],
    "schedule": [(yonos, "make_alphas_cumprod", ref_alphas_cumprod), (yonos, "q_sample", REF_Q),
                 (yonos, "v_target", REF_V), (yonos, "x0_from_v", REF_X0), (yonos, "eps_from_v", REF_EPS)],
    "ddim": [(yonos, "ddim_timesteps", ref_ddim_timesteps), (yonos, "ddim_step", ref_ddim_step)],
    "sr_loss": [(yonos, "weighted_x0_loss", ref_weighted_x0_loss), (yonos, "sr_loss", ref_sr_loss)],
    "scale_distillation": [(yonos, "scale_distillation_loss", ref_scale_distillation_loss)],
    "decoder_gan": [(yonos, "decoder_loss", ref_decoder_loss), (yonos, "discriminator_loss", ref_discriminator_loss)],
    "progressive": [(yonos, "two_step_target", ref_two_step_target)],
    "color_fix": [(upscale, "wavelet_low", ref_wavelet_low), (upscale, "color_fix", ref_color_fix)],
}


# -----------------------------------------------------------------------------
# second correct implementations, written differently from the solutions (COURSE_ALTERNATIVE=1 grades them)


def alt_attention_forward(self, x, context=None):
    """einsum, q scaled before the product, softmax by hand (the row maximum subtracted)."""
    ctx = x if context is None else context
    B, N, C = x.shape
    h, d = self.heads, C // self.heads
    q = self.to_q(x).reshape(B, N, h, d) * d ** -0.5
    k, v = self.to_k(ctx).reshape(B, ctx.shape[1], h, d), self.to_v(ctx).reshape(B, ctx.shape[1], h, d)
    scores = torch.einsum("bnhd,bmhd->bhnm", q.float() if self.upcast else q, k.float() if self.upcast else k)
    weights = (scores - scores.amax(-1, keepdim=True)).exp()
    weights = weights / weights.sum(-1, keepdim=True)
    return self.to_out[0](torch.einsum("bhnm,bmhd->bnhd", weights.to(v.dtype), v).reshape(B, N, C))


def alt_resnet_forward(self, x, temb=None):
    """The shortcut first, F.group_norm on the module's own parameters, SiLU written as h * sigmoid(h)."""
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    norm = lambda n, h: F.group_norm(h, n.num_groups, n.weight, n.bias, n.eps)
    h = norm(self.norm1, x)
    h = self.conv1(h * torch.sigmoid(h))
    if self.time_emb_proj is not None:
        h = h + self.time_emb_proj(temb * torch.sigmoid(temb)).unsqueeze(-1).unsqueeze(-1)
    h = norm(self.norm2, h)
    return skip + self.conv2(h * torch.sigmoid(h))


def alt_timestep_embedding(t, dim, max_period=10000.0):
    """1 / max_period ** (i / half) and torch.outer: the same numbers, other float32 roundings (up to ~6e-6 at
    t = 999, which a tolerance of 1e-6 would wrongly fail)."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    args = torch.outer(t.float(), 1.0 / max_period ** (i / half))
    return torch.cat([args.cos(), args.sin()], dim=1)


def alt_alphas_cumprod(beta_start=0.00085, beta_end=0.012, steps=1000):
    """numpy, the square root of beta spaced linearly, the running product."""
    root = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), steps)
    return torch.from_numpy(np.cumprod(1.0 - root * root))


def alt_coefficients(ac, t):
    """sqrt(alpha_bar) and sqrt(1 - alpha_bar) in float64 before the cast, gathered with index_select."""
    ab = torch.where(t >= 0, ac.index_select(0, t.clamp(min=0)), torch.ones((), dtype=ac.dtype))
    return ab.sqrt().float().view(-1, 1, 1, 1), (1 - ab).sqrt().float().view(-1, 1, 1, 1)


def alt_q_sample(z_0, t, eps, ac):
    a, s = alt_coefficients(ac, t)
    return torch.addcmul(a * z_0, s, eps)


def alt_v_target(z_0, eps, t, ac):
    a, s = alt_coefficients(ac, t)
    return torch.addcmul(-s * z_0, a, eps)


def alt_x0_from_v(z_t, v, t, ac):
    a, s = alt_coefficients(ac, t)
    return torch.addcmul(a * z_t, -s, v)


def alt_eps_from_v(z_t, v, t, ac):
    a, s = alt_coefficients(ac, t)
    return torch.addcmul(s * z_t, a, v)


def alt_ddim_timesteps(steps, num_train_timesteps=1000):
    """numpy's arange from T down by T/N, rounded, minus one."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}")
    return [int(v) - 1 for v in np.round(num_train_timesteps - np.arange(steps) * (num_train_timesteps / steps))]


def alt_ddim_step(z_t, v_pred, t, t_prev, ac):
    """eps recovered from x0 and z_t, (z_t - alpha x0) / sigma, rather than read off v."""
    a, s = yonos.alpha_sigma(ac, t)
    a_prev, s_prev = yonos.alpha_sigma(ac, t_prev)
    x0 = a * z_t - s * v_pred
    return a_prev * x0 + s_prev * ((z_t - a * x0) / s)


def alt_weighted_x0_loss(x0_pred, target, t, ac, prior_std=0.0):
    """SNR + 1 written as 1 / sigma^2; EDM's weight as 1 / s^2 + SNR."""
    a, s = yonos.alpha_sigma(ac, t)
    w = 1 / s ** 2 if not prior_std else 1 / prior_std ** 2 + (a / s) ** 2
    return ((x0_pred.float() - target.float()).pow(2) * w).mean()


def alt_sr_loss(unet, z_h, z_l, context, ac, generator=None):
    t, z_t = yonos.noised(z_h, ac, generator)
    a, s = yonos.alpha_sigma(ac, t)
    x0 = a * z_t - s * yonos.predict_v(unet, z_t, z_l, t, context, ac)
    return alt_weighted_x0_loss(x0, z_h, t, ac, yonos.prior_std(unet))


def alt_scale_distillation_loss(student, teacher, z_h, z_l, z_l_teacher, context, ac, generator=None):
    t, z_t = yonos.noised(z_h, ac, generator)
    a, s = yonos.alpha_sigma(ac, t)
    x0 = lambda net, lr: a * z_t - s * yonos.predict_v(net, z_t, lr, t, context, ac)
    with torch.no_grad():
        target = x0(teacher, z_l_teacher)
    return alt_weighted_x0_loss(x0(student, z_l), target, t, ac, yonos.prior_std(student))


def alt_widen_conv_in(unet, in_channels=8):
    """The old kernel concatenated with zeros, as new Parameters."""
    old = unet.conv_in
    if in_channels < old.in_channels:
        raise ValueError("cannot shrink conv_in")
    new = nn.Conv2d(in_channels, old.out_channels, 3, padding=1)
    zeros = torch.zeros(old.out_channels, in_channels - old.in_channels, 3, 3, dtype=old.weight.dtype)
    new.weight = nn.Parameter(torch.cat([old.weight.detach(), zeros], 1))
    new.bias = nn.Parameter(old.bias.detach().clone())
    unet.conv_in, unet.config.in_channels = new, in_channels
    return unet


def alt_decoder_loss(x_rec, x_h, perceptual=None, disc=None, w_perceptual=1.0, w_gan=0.1):
    terms = [F.l1_loss(x_rec, x_h)]
    if perceptual is not None:
        terms.append(w_perceptual * perceptual(x_rec, x_h).mean())
    if disc is not None:
        terms.append(-w_gan * disc(x_rec).mean())
    return sum(terms)


def alt_discriminator_loss(disc, x_rec, x_h):
    return (1 - disc(x_h)).clamp(min=0).mean() + (1 + disc(x_rec.detach())).clamp(min=0).mean()


def alt_wavelet_low(x, levels=5):
    """The 3x3 binomial kernel as two 1-D passes [1, 2, 1] / 4, along rows then columns."""
    k, C = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype) / 4, x.shape[1]
    for i in range(levels):
        d = 2 ** i
        x = F.pad(x, (d, d, d, d), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, 3).repeat(C, 1, 1, 1), dilation=(1, d), groups=C)
        x = F.conv2d(x, k.view(1, 1, 3, 1).repeat(C, 1, 1, 1), dilation=(d, 1), groups=C)
    return x


def alt_color_fix(sr, x_up):
    return (sr + (alt_wavelet_low(x_up) - alt_wavelet_low(sr))).clamp(-1, 1)


def alt_two_step_target(teacher, z_t, z_l, t, t_mid, t_next, context, ac, w=None):
    """The same target with numerator and denominator multiplied by sigma_t."""
    z_mid = yonos.ddim_step(z_t, yonos.predict_v(teacher, z_t, z_l, t, context, ac, w).float(), t, t_mid, ac)
    z_next = yonos.ddim_step(z_mid, yonos.predict_v(teacher, z_mid, z_l, t_mid, context, ac, w).float(), t_mid,
                             t_next, ac)
    a, s = yonos.alpha_sigma(ac, t)
    a2, s2 = yonos.alpha_sigma(ac, t_next)
    return (s * z_next - s2 * z_t) / (s * a2 - s2 * a)


ALTERNATIVES = {  # task -> [(module or class, attribute, a second correct implementation)]
    "attention": [(Attention, "forward", alt_attention_forward)],
    "resnet": [(ResnetBlock, "forward", alt_resnet_forward)],
    "timestep_embedding": [(model, "timestep_embedding", alt_timestep_embedding)],
    "widen_conv_in": [(model, "widen_conv_in", alt_widen_conv_in)],
    "schedule": [(yonos, "make_alphas_cumprod", alt_alphas_cumprod), (yonos, "q_sample", alt_q_sample),
                 (yonos, "v_target", alt_v_target), (yonos, "x0_from_v", alt_x0_from_v),
                 (yonos, "eps_from_v", alt_eps_from_v)],
    "ddim": [(yonos, "ddim_timesteps", alt_ddim_timesteps), (yonos, "ddim_step", alt_ddim_step)],
    "sr_loss": [(yonos, "weighted_x0_loss", alt_weighted_x0_loss), (yonos, "sr_loss", alt_sr_loss)],
    "scale_distillation": [(yonos, "scale_distillation_loss", alt_scale_distillation_loss)],
    "decoder_gan": [(yonos, "decoder_loss", alt_decoder_loss), (yonos, "discriminator_loss", alt_discriminator_loss)],
    "progressive": [(yonos, "two_step_target", alt_two_step_target)],
    "color_fix": [(upscale, "wavelet_low", alt_wavelet_low), (upscale, "color_fix", alt_color_fix)],
}
