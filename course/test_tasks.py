"""
The graded tests of the course tasks (course/README.md), one pytest marker per task:

  python -m pytest course/test_tasks.py -m attention      # one task
  python course/grade.py                                  # all of them, as a table and results.json

Tasks are independent: the `others` fixture replaces every other task's functions by reference implementations
(diffusers' where diffusers has the same thing, else the formula; REFERENCES in course/implementations.py), so a
task's tests fail only because of that task's own code. CPU only, tiny sizes.

The tests grade the property, not the arithmetic: every tolerance follows from float32 error for its inputs
(`close`), and with COURSE_ALTERNATIVE=1 each task's tests run against a second correct implementation written
differently from the solution (ALTERNATIVES, in course/implementations.py), which must pass them all
(course/check.py and make test do): a test that only accepts the solution's exact arithmetic fails there.
"""
import copy
import os

import pytest
import torch
import torch.nn as nn
from diffusers import DDIMScheduler

import model
import upscale
import yonos
from implementations import (ALTERNATIVES, REFERENCES, REF_Q, REF_V, REF_X0, diffusers_resnet, ref_alphas_cumprod,
                             ref_attention_forward, ref_color_fix, ref_ddim_step, ref_ddim_timesteps, ref_decoder_loss,
                             ref_discriminator_loss, ref_scale_distillation_loss, ref_sr_loss, ref_timestep_embedding,
                             ref_two_step_target, ref_wavelet_low)
from model import UNET_PRESETS, Attention, ResnetBlock, UNet, UNetConfig


# -----------------------------------------------------------------------------
# the harness: the other tasks on their references, the float32 tolerance, tiny networks


@pytest.fixture
def others(request, monkeypatch):
    """Every task but the one under test (the test's marker) runs on its reference implementation; with
    COURSE_ALTERNATIVE=1, the task under test runs on its second implementation (ALTERNATIVES)."""
    mine = {m.name for m in request.node.iter_markers()} & set(REFERENCES)
    for task, refs in REFERENCES.items():
        if task not in mine:
            for owner, name, ref in refs:
                monkeypatch.setattr(owner, name, ref)
        elif os.environ.get("COURSE_ALTERNATIVE") == "1":
            for owner, name, alt in ALTERNATIVES[task]:
                monkeypatch.setattr(owner, name, alt)
    return mine


EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: the relative error of one float32 rounding


def close(got: torch.Tensor, want: torch.Tensor, terms: float, scale: float | None = None) -> bool:
    """got == want up to the float32 error of a computation with `terms` roundings of numbers of magnitude `scale`
    (default: want's largest): each costs at most EPS32 of it, and the reference rounds too (x4 to spare). Two
    correct implementations that order the arithmetic differently always land within it; a wrong formula misses
    by orders of magnitude (a swapped sign, a missing factor, the wrong timestep)."""
    scale = float(want.abs().max()) if scale is None else scale
    return bool(((got.float() - want.float()).abs() <= 4 * terms * EPS32 * max(scale, 1.0)).all())


AC = ref_alphas_cumprod()


def tiny_unet(seed=0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNET_PRESETS["tiny"])


class LinearV(nn.Module):
    """A stand-in for the SR U-Net: v = a 1x1 convolution of [z_t, z_l]; enough to test losses and gradients."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(8, 4, 1)

    def forward(self, x, t, context, w=None):
        return self.conv(x)


# -----------------------------------------------------------------------------
# task 1: attention


@pytest.mark.attention
def test_attention_output_shape(others):
    attn = Attention(32, 4)
    assert attn(torch.randn(2, 10, 32)).shape == (2, 10, 32)


@pytest.mark.attention
def test_attention_matches_the_written_out_formula(others):
    torch.manual_seed(0)
    attn, x = Attention(32, 4, bias=True), torch.randn(2, 10, 32)
    with torch.no_grad():
        # projections over 32 channels, dot products over 8, softmax sums over 10 keys, the output projection
        assert close(attn(x), ref_attention_forward(attn, x), terms=32 + 8 + 10 + 32)


@pytest.mark.attention
def test_cross_attention_reads_a_context_of_another_length_and_width(others):
    torch.manual_seed(0)
    attn, x, ctx = Attention(32, 2, context_dim=24), torch.randn(3, 16, 32), torch.randn(3, 7, 24)
    with torch.no_grad():
        out = attn(x, ctx)
        assert out.shape == (3, 16, 32) and close(out, ref_attention_forward(attn, x, ctx), terms=24 + 16 + 7 + 32)


@pytest.mark.attention
def test_attention_gradients_reach_queries_keys_and_values(others):
    attn = Attention(16, 2)
    attn(torch.randn(1, 5, 16)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())


# -----------------------------------------------------------------------------
# task 2: resnet


@pytest.mark.resnet
@pytest.mark.parametrize("cin,cout,temb", [(32, 32, 64), (16, 32, 64), (32, 16, None)],
                         ids=["same_width", "shortcut", "no_time_embedding"])
def test_resnet_block_matches_diffusers(others, cin, cout, temb):
    torch.manual_seed(0)
    block = ResnetBlock(cin, cout, temb, 8, 1e-5).eval()
    x, t = torch.randn(2, cin, 6, 6), torch.randn(2, temb) if temb else None
    with torch.no_grad():
        # two 3x3 convolutions over 32 channels (288 products each), two group norms over 4 channels x 36 pixels
        assert close(block(x, t), diffusers_resnet(block)(x, t), terms=2 * 288 + 2 * 144)


@pytest.mark.resnet
def test_resnet_block_uses_the_time_embedding(others):
    torch.manual_seed(0)
    block, x = ResnetBlock(16, 16, 32, 8, 1e-5), torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert not torch.allclose(block(x, torch.zeros(1, 32)), block(x, torch.ones(1, 32)))


# -----------------------------------------------------------------------------
# task 3: timestep_embedding


@pytest.mark.timestep_embedding
def test_timestep_embedding_matches_diffusers(others):
    t = torch.tensor([0, 1, 17, 500, 999])
    # the phase t * freq of up to 999 radians carries float32's relative error: a few EPS32 * t (6e-6 seen at 999)
    got, want = model.timestep_embedding(t, 32), ref_timestep_embedding(t, 32)
    assert bool(((got - want).abs() <= 4 * EPS32 * (t.float()[:, None] + 1)).all())


@pytest.mark.timestep_embedding
def test_timestep_embedding_shape_and_t0(others):
    e = model.timestep_embedding(torch.tensor([0, 3]), 64)
    assert e.shape == (2, 64) and torch.allclose(e[0, :32], torch.ones(32)) and torch.allclose(e[0, 32:], torch.zeros(32))


@pytest.mark.timestep_embedding
def test_timestep_embedding_separates_nearby_timesteps(others):
    e = model.timestep_embedding(torch.arange(1000), 32)
    assert (e[1:] - e[:-1]).norm(dim=1).min() > 1e-3


# -----------------------------------------------------------------------------
# task 4: schedule (alphas_cumprod, q_sample, v) and its conversions


@pytest.mark.schedule
def test_alphas_cumprod_is_sds_scaled_linear_schedule(others):
    ac = yonos.make_alphas_cumprod()
    assert ac.shape == (1000,) and ac.dtype == torch.float64 and (ac - ref_alphas_cumprod()).abs().max() < 1e-6
    assert abs(float(ac[-1]) - 0.0047) < 1e-4 and bool((ac[1:] < ac[:-1]).all())


@pytest.mark.schedule
def test_q_sample_and_v_match_diffusers(others):
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    z0, eps, t = torch.randn(4, 4, 5, 5), torch.randn(4, 4, 5, 5), torch.tensor([0, 10, 500, 999])
    # two products and a sum of N(0, 1) numbers, after square roots of alpha_bar (diffusers takes them in fp32)
    assert close(yonos.q_sample(z0, t, eps, AC), sched.add_noise(z0, eps, t), terms=8)
    assert close(yonos.v_target(z0, eps, t, AC), sched.get_velocity(z0, eps, t), terms=8)


@pytest.mark.schedule
def test_x0_and_eps_from_v_invert_the_forward_process(others):
    z0, eps, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.tensor([1, 400, 999])
    z_t, v = REF_Q(z0, t, eps, AC), REF_V(z0, eps, t, AC)
    # the forward process and back: two rounds of two products and a sum
    assert close(yonos.x0_from_v(z_t, v, t, AC), z0, terms=16)
    assert close(yonos.eps_from_v(z_t, v, t, AC), eps, terms=16)


@pytest.mark.schedule
def test_q_sample_at_t_minus_one_is_the_clean_latent(others):
    z0 = torch.randn(2, 4, 3, 3)
    assert torch.allclose(yonos.q_sample(z0, torch.tensor([-1, -1]), torch.randn_like(z0), AC), z0)


# -----------------------------------------------------------------------------
# task 5: ddim


@pytest.mark.ddim
@pytest.mark.parametrize("steps", [1, 2, 4, 10])
def test_ddim_timesteps_are_trailing(others, steps):
    assert yonos.ddim_timesteps(steps) == ref_ddim_timesteps(steps) and yonos.ddim_timesteps(steps)[0] == 999


@pytest.mark.ddim
def test_ddim_step_matches_diffusers(others):
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True)
    sched.set_timesteps(4)
    z, v = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    for t, t_prev in zip([999, 749, 499, 249], [749, 499, 249, -1]):
        expected = sched.step(v, t, z, eta=0.0).prev_sample
        got = yonos.ddim_step(z, v, torch.tensor([t]), torch.tensor([t_prev]), AC)
        assert close(got, expected, terms=32), t  # x0, eps and the re-noising: a dozen roundings, diffusers' fp32


@pytest.mark.ddim
def test_ddim_last_step_returns_the_x0_prediction(others):
    z, v, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([999, 249])
    assert close(yonos.ddim_step(z, v, t, torch.tensor([-1, -1]), AC), REF_X0(z, v, t, AC), terms=16)


@pytest.mark.ddim
def test_ddim_timesteps_rejects_bad_counts(others):
    with pytest.raises(ValueError):
        yonos.ddim_timesteps(0)


# -----------------------------------------------------------------------------
# task 6: sr_loss


@pytest.mark.sr_loss
def test_weighted_x0_loss_is_the_v_mse(others):
    z0, eps, t = torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4), torch.randint(0, 1000, (8,))
    z_t, v = REF_Q(z0, t, eps, AC), REF_V(z0, eps, t, AC)
    v_pred = v + 0.3 * torch.randn_like(v)
    loss = yonos.weighted_x0_loss(REF_X0(z_t, v_pred, t, AC), z0, t, AC)
    assert loss.ndim == 0 and torch.allclose(loss, ((v_pred - v) ** 2).mean(), rtol=1e-3)


@pytest.mark.sr_loss
def test_sr_loss_matches_its_reference_and_reaches_the_network(others):
    net, z_h, z_l, ctx = LinearV(), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(1, 8, 32)
    g = lambda: torch.Generator().manual_seed(0)
    loss = yonos.sr_loss(net, z_h, z_l, ctx, AC, g())
    # a mean of 288 weighted squares: each term's rounding adds up, relative to the loss
    assert close(loss, ref_sr_loss(net, z_h, z_l, ctx, AC, g()), terms=288 + 16, scale=loss.item())
    loss.backward()
    assert net.conv.weight.grad.abs().sum() > 0


@pytest.mark.sr_loss
def test_weighted_x0_loss_with_a_prior_std_weighs_the_network_output_evenly(others):
    """prior_std = s > 0: an x0 error of c_out * d (c_out = sigma s / sqrt(sigma^2 + alpha^2 s^2), what the network's
    output d moves x0 by in yonos.lr_preconditioning) costs mean(d^2) at every t."""
    t, d, s = torch.randint(0, 1000, (8,)), torch.randn(8, 4, 4, 4), 0.2
    a, sig = yonos.alpha_sigma(AC, t)
    err = sig * s / (sig ** 2 + (a * s) ** 2).sqrt() * d
    z0 = torch.randn(8, 4, 4, 4)
    assert torch.allclose(yonos.weighted_x0_loss(z0 + err, z0, t, AC, s), (d ** 2).mean(), rtol=1e-3)


@pytest.mark.sr_loss
def test_weighted_x0_loss_is_zero_for_a_perfect_prediction(others):
    z0, t = torch.randn(2, 4, 3, 3), torch.tensor([5, 995])
    assert yonos.weighted_x0_loss(z0.clone(), z0, t, AC).item() == 0.0


# -----------------------------------------------------------------------------
# task 7: scale_distillation


@pytest.mark.scale_distillation
def test_scale_distillation_loss_matches_its_reference(others):
    student, teacher = LinearV(0), LinearV(1)
    z_h, z_l, z_lt, ctx = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(1, 8, 32)
    g = lambda: torch.Generator().manual_seed(0)
    got = yonos.scale_distillation_loss(student, teacher, z_h, z_l, z_lt, ctx, AC, g())
    want = ref_scale_distillation_loss(student, teacher, z_h, z_l, z_lt, ctx, AC, g())
    assert close(got, want, terms=288 + 32, scale=float(want))  # 288 weighted squares, two x0 predictions


@pytest.mark.scale_distillation
def test_scale_distillation_loss_is_zero_for_a_copy_given_the_same_input(others):
    teacher = LinearV(1)
    z_h, z_l, ctx = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(1, 8, 32)
    assert yonos.scale_distillation_loss(copy.deepcopy(teacher), teacher, z_h, z_l, z_l, ctx, AC).item() < 1e-10


@pytest.mark.scale_distillation
def test_scale_distillation_trains_only_the_student(others):
    student, teacher = LinearV(0), LinearV(1)
    z = torch.randn(2, 4, 6, 6)
    yonos.scale_distillation_loss(student, teacher, z, z, torch.randn_like(z), torch.randn(1, 8, 32), AC).backward()
    assert teacher.conv.weight.grad is None and student.conv.weight.grad.abs().sum() > 0


@pytest.mark.scale_distillation
def test_teacher_and_student_see_the_same_noisy_latent_and_timestep(others):
    seen = []

    class Spy(LinearV):
        def forward(self, x, t, context, w=None):
            seen.append((x[:, :4].clone(), t.clone(), x[:, 4:].clone()))
            return super().forward(x, t, context)
    z_h, z_l, z_lt = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    yonos.scale_distillation_loss(Spy(0), Spy(1), z_h, z_l, z_lt, torch.randn(1, 8, 32), AC)
    (zt_a, t_a, l_a), (zt_b, t_b, l_b) = seen
    assert torch.equal(zt_a, zt_b) and torch.equal(t_a, t_b)
    assert {bool(torch.equal(l_a, z_lt)), bool(torch.equal(l_b, z_lt))} == {True, False}  # the teacher's LR is z_l'


# -----------------------------------------------------------------------------
# task 8: widen_conv_in


@pytest.mark.widen_conv_in
def test_widen_conv_in_keeps_the_function_for_any_extra_input(others):
    unet = UNet(UNetConfig(block_out_channels=(32, 64), attn_levels=(True, False), layers_per_block=1,
                           num_heads=(4, 4), cross_attention_dim=24, norm_num_groups=8)).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(1, 7, 24)
    with torch.no_grad():
        before = unet(x, t, ctx)
        model.widen_conv_in(unet, 8)
        for extra in (torch.zeros(2, 4, 8, 8), 100 * torch.randn(2, 4, 8, 8)):
            assert torch.equal(unet(torch.cat([x, extra], 1), t, ctx), before)


@pytest.mark.widen_conv_in
def test_widen_conv_in_updates_shape_and_config(others):
    unet = tiny_unet()
    model.widen_conv_in(unet, 12)
    assert unet.conv_in.weight.shape == (32, 12, 3, 3) and unet.config.in_channels == 12
    assert unet.conv_in.weight[:, 8:].abs().max() == 0


@pytest.mark.widen_conv_in
def test_widen_conv_in_refuses_to_shrink(others):
    with pytest.raises(ValueError):
        model.widen_conv_in(tiny_unet(), 4)


# -----------------------------------------------------------------------------
# task 9: decoder_gan (the decoder fine-tune's losses)


class Patch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 1, 4, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.decoder_gan
def test_decoder_loss_is_l1_plus_perceptual_minus_gan(others):
    x_rec, x_h, disc = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), Patch()
    perceptual = lambda a, b: ((a - b) ** 2).mean((1, 2, 3))
    assert torch.allclose(yonos.decoder_loss(x_rec, x_h), (x_rec - x_h).abs().mean())
    got = yonos.decoder_loss(x_rec, x_h, perceptual, disc, 0.5, 0.1)
    # means over 384 pixels and 2 x 4 x 4 patch logits (a 4x4 convolution over 3 channels)
    assert close(got, ref_decoder_loss(x_rec, x_h, perceptual, disc, 0.5, 0.1), terms=384 + 48)


@pytest.mark.decoder_gan
def test_discriminator_hinge_loss(others):
    x_rec, x_h, disc = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), Patch()
    assert torch.allclose(yonos.discriminator_loss(disc, x_rec, x_h), ref_discriminator_loss(disc, x_rec, x_h))


@pytest.mark.decoder_gan
def test_discriminator_loss_does_not_train_the_generator(others):
    x_rec = torch.rand(2, 3, 8, 8, requires_grad=True)
    yonos.discriminator_loss(Patch(), x_rec, torch.rand(2, 3, 8, 8)).backward()
    assert x_rec.grad is None


@pytest.mark.decoder_gan
def test_the_gan_term_pushes_the_decoder_towards_real(others):
    x_rec, disc = torch.rand(1, 3, 8, 8, requires_grad=True), Patch()
    yonos.decoder_loss(x_rec, x_rec.detach(), None, disc, w_gan=1.0).backward()
    step = -x_rec.grad  # a small step against the gradient raises the discriminator's score
    assert disc(x_rec + 1e-2 * step).mean() > disc(x_rec).mean()


# -----------------------------------------------------------------------------
# task 10: color_fix


@pytest.mark.color_fix
def test_wavelet_low_matches_the_reference_and_keeps_constants(others):
    x = torch.rand(1, 3, 40, 40)
    # five levels of a 9-tap blur of values in [0, 1]
    assert close(upscale.wavelet_low(x), ref_wavelet_low(x), terms=5 * 9)
    c = torch.full((1, 3, 20, 20), 0.3)
    assert close(upscale.wavelet_low(c), c, terms=5 * 9)


@pytest.mark.color_fix
def test_color_fix_removes_a_colour_cast(others):
    torch.manual_seed(0)
    x_up = torch.rand(1, 3, 64, 64) * 1.2 - 0.6
    sr = x_up + 0.1 * torch.randn(1, 3, 64, 64) + torch.tensor([0.3, -0.2, 0.1])[None, :, None, None]
    fixed = upscale.color_fix(sr, x_up)
    assert (fixed - x_up).mean((0, 2, 3)).abs().max() < 0.01 and close(fixed, ref_color_fix(sr, x_up), terms=2 * 5 * 9 + 3)


@pytest.mark.color_fix
def test_color_fix_keeps_the_range(others):
    out = upscale.color_fix(torch.ones(1, 3, 16, 16), -torch.ones(1, 3, 16, 16) * 0.9 + 1.8)
    assert out.max() <= 1 and out.min() >= -1


# -----------------------------------------------------------------------------
# task 11: progressive (the two-step target of progressive distillation)


@pytest.mark.progressive
def test_progressive_target_matches_its_reference(others):
    teacher, z_t, z_l, ctx = LinearV(2), torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5), torch.randn(1, 8, 32)
    t, t_mid, t_next = torch.tensor([999, 499]), torch.tensor([749, 249]), torch.tensor([499, -1])
    with torch.no_grad():
        got = yonos.two_step_target(teacher, z_t, z_l, t, t_mid, t_next, ctx, AC)
        # two DDIM steps (two dozen roundings), then a division by (alpha'' - sigma''/sigma alpha) >= 0.49 here
        assert close(got, ref_two_step_target(teacher, z_t, z_l, t, t_mid, t_next, ctx, AC), terms=2 * 48)


@pytest.mark.progressive
def test_one_step_with_the_target_lands_on_the_teachers_two_steps(others):
    teacher, z_t, z_l, ctx = LinearV(3), torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5), torch.randn(1, 8, 32)
    t, t_mid, t_next = torch.tensor([749]), torch.tensor([624]), torch.tensor([499])
    with torch.no_grad():
        x = yonos.two_step_target(teacher, z_t, z_l, t, t_mid, t_next, ctx, AC)
        z_mid = ref_ddim_step(z_t, yonos.predict_v(teacher, z_t, z_l, t, ctx, AC), t, t_mid, AC)
        two = ref_ddim_step(z_mid, yonos.predict_v(teacher, z_mid, z_l, t_mid, ctx, AC), t_mid, t_next, AC)
        a, s = yonos.alpha_sigma(AC, t)
        one = REF_Q(x, t_next, (z_t - a * x) / s, AC)
    assert close(one, two, terms=2 * 48)


@pytest.mark.progressive
def test_last_step_target_is_the_teachers_result(others):
    teacher, z_t, z_l, ctx = LinearV(4), torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5), torch.randn(1, 8, 32)
    t, t_mid, t_next = torch.tensor([249]), torch.tensor([124]), torch.tensor([-1])
    with torch.no_grad():
        z_mid = ref_ddim_step(z_t, yonos.predict_v(teacher, z_t, z_l, t, ctx, AC), t, t_mid, AC)
        two = ref_ddim_step(z_mid, yonos.predict_v(teacher, z_mid, z_l, t_mid, ctx, AC), t_mid, t_next, AC)
        assert close(yonos.two_step_target(teacher, z_t, z_l, t, t_mid, t_next, ctx, AC), two, terms=2 * 48)
