"""
Tests for train.py end to end: every stage of the tiny chain through train.main, DDP on two CPU processes, exact
resume, the SD path from a local Hub cache, the other distillations (progressive, guided), D3SR's diffusion
discriminator and the `make tiny` recipe. The library is tested in test_yonos.py, using a model in
test_sample_eval.py. CPU only, offline, tiny configs; slow checks are marked `slow` and run only with `pytest -m slow`.
"""
import copy
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data as skdata

import runs
import train
import upscale
from conftest import (AC, HERE, TINY_SD2, make_hub_cache, photo, run_script, tiny_sr_unet, write_photos,
                      write_random_lpips)
from data import SRPairs, degrade, to_tensor
from model import add_guidance_embedding, add_lora, merged_state_dict
from vae import AutoencoderKL
from yonos import (DiffusionDiscriminator, YonosSR, alpha_sigma, ddim_sample, ddim_step, ddim_timesteps, decoder_stage,
                   discriminator_adversarial_loss, drop_condition, generator_adversarial_loss, guided_distillation_loss,
                   guided_v, one_step_prediction, predict_v, progressive_distillation_loss, q_sample, two_step_target)

warnings.filterwarnings("ignore")
torch.set_num_threads(2)


# -----------------------------------------------------------------------------
# training: the whole tiny chain, DDP, resume, the SD path


def tiny_cfg(tmp, **kw) -> train.TrainConfig:
    base = dict(config="tiny", data=str(tmp / "photos"), val_data=str(tmp / "photos"), crop=32, batch_size=2,
                steps=2, warmup=1, log_every=1, val_every=2, save_every=2, quiet=True)
    return train.TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def tiny_chain(tmp_path_factory):
    """vae -> x2 -> x4 (distilled) -> x8 (distilled) -> decoder, a few steps each through train.main."""
    tmp = tmp_path_factory.mktemp("chain")
    write_photos(tmp / "photos")
    out = lambda name: str(tmp / name)
    train.main(tiny_cfg(tmp, stage="vae", out=out("vae.pt"), steps=3))
    train.main(tiny_cfg(tmp, scale=2, vae=out("vae.pt"), out=out("x2.pt")))
    train.main(tiny_cfg(tmp, scale=4, teacher=out("x2.pt"), out=out("x4.pt")))
    train.main(tiny_cfg(tmp, scale=8, teacher=out("x4.pt"), out=out("x8.pt")))
    write_random_lpips(tmp / "lpips")
    train.main(tiny_cfg(tmp, stage="decoder", unet=out("x4.pt"), out=out("x4_dec.pt"), gan_weight=0.1,
                        lpips=str(tmp / "lpips")))
    return tmp


def test_small_presets_chain_trains_and_its_fresh_models_start_at_the_bicubic_input(tmp_path):
    """The shipped models' presets (shortcut VAE, preconditioned U-Net) through train.main: vae -> x2 -> x4
    (distilled) -> decoder; after two steps each the one-step output is still within a small distance of the
    bicubic input, as the parameterisation promises (a plain v-model starts far from it)."""
    write_photos(tmp_path / "photos")
    out = lambda name: str(tmp_path / name)
    small = lambda **kw: tiny_cfg(tmp_path, config="small", **kw)
    train.main(small(stage="vae", out=out("vae.pt")))
    train.main(small(scale=2, vae=out("vae.pt"), out=out("x2.pt")))
    train.main(small(scale=4, teacher=out("x2.pt"), out=out("x4.pt")))
    train.main(small(stage="decoder", unet=out("x4.pt"), out=out("x4_dec.pt")))
    x = to_tensor(Image.fromarray(skdata.astronaut()[100:132, 180:212]))[None]
    for name in ("x2.pt", "x4_dec.pt"):
        model = YonosSR.load(out(name)).eval()
        assert model.unet.config.lr_prior_std == 0.2 and model.vae.config.shortcut
        x_up, noise = degrade(x, model.scale), torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(0))
        near = (model.super_resolve(x_up, noise=noise) - x_up).abs().mean()
        model.unet.config.lr_prior_std = 0.0  # the same weights read as a plain v-model
        plain = (model.super_resolve(x_up, noise=noise) - x_up).abs().mean()
        assert near < 0.25 * plain, (name, near, plain)


def test_tiny_chain_checkpoints_load_and_sample(tiny_chain):
    vae = AutoencoderKL.load(str(tiny_chain / "vae.pt"))
    assert vae.config.scaling_factor != 1.0  # measured on training crops
    for name, scale in [("x2.pt", 2), ("x4.pt", 4), ("x8.pt", 8), ("x4_dec.pt", 4)]:
        model = YonosSR.load(str(tiny_chain / name)).eval()
        assert model.scale == scale
        x_up = degrade(torch.rand(1, 3, 32, 32) * 2 - 1, scale)
        out = model.super_resolve(x_up, steps=2)
        assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
        rows = [json.loads(line) for line in open(tiny_chain / (name + ".log.jsonl"))]
        assert rows[-1]["step"] == 2 and "val_psnr" in rows[-1]
    assert YonosSR.load(str(tiny_chain / "x8.pt")).meta["teacher"] == "x4.pt"


def assert_moved(before: YonosSR, after: YonosSR, **moved: bool):
    """Which of the model's parts (unet, or the VAE's decoder, encoder, quant_conv) training changed."""
    for part, want in moved.items():
        a = before.get_submodule(part if part == "unet" else "vae." + part).state_dict()
        b = after.get_submodule(part if part == "unet" else "vae." + part).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a) == want, part


def assert_decoder_stage_option(tiny_chain, tmp_path, **option):
    """A decoder-stage option (--with-unet, --with-encoder, --mse-weight): refused on another stage, and it defines
    the run: a decoder-stage run without it does not resume with it (exit 2)."""
    with pytest.raises(SystemExit):
        train.main(tiny_cfg(tiny_chain, scale=2, vae=str(tiny_chain / "vae.pt"), out=str(tmp_path / "no.pt"), **option))
    dec = dict(stage="decoder", unet=str(tiny_chain / "x4.pt"), out=str(tmp_path / "dec.pt"))
    train.main(tiny_cfg(tiny_chain, **dec))
    with pytest.raises(SystemExit) as e:
        train.main(tiny_cfg(tiny_chain, **dec, **option, resume=True, steps=4))
    assert e.value.code == 2


def test_decoder_stage_trains_only_the_decoder(tiny_chain):
    before, after = YonosSR.load(str(tiny_chain / "x4.pt")), YonosSR.load(str(tiny_chain / "x4_dec.pt"))
    assert_moved(before, after, unet=False, decoder=True, encoder=False, quant_conv=False)


def test_decoder_stage_with_unet_trains_the_one_step_model_end_to_end(tiny_chain, tmp_path):
    """--with-unet: the head's forward on the upsampled LR is the model's one-step SR (the same noise, before the
    clamp), and training moves the U-Net and the decoder, never the encoder."""
    before = YonosSR.load(str(tiny_chain / "x4.pt")).eval()
    head = decoder_stage(YonosSR.load(str(tiny_chain / "x4.pt")), with_unet=True).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z_l = before.encode(x)
    noise = torch.randn(z_l.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = before.decode(ddim_sample(before.unet, z_l, before.context, before.alphas_cumprod, 1, noise))
        got = head(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert {n.split(".")[0] for n, p in head.named_parameters() if p.requires_grad} == \
        {"unet", "post_quant_conv", "decoder"}
    train.main(tiny_cfg(tiny_chain, stage="decoder", unet=str(tiny_chain / "x4.pt"), out=str(tmp_path / "e2e.pt"),
                        with_unet=True))
    after = YonosSR.load(str(tmp_path / "e2e.pt"))
    assert after.meta["decoder_with_unet"] is True
    assert_moved(before, after, unet=True, decoder=True, encoder=False, quant_conv=False)
    assert_decoder_stage_option(tiny_chain, tmp_path, with_unet=True)


def test_decoder_stage_with_encoder_trains_what_makes_the_lr_latent(tiny_chain, tmp_path):
    """--with-encoder: the encoder and quant_conv learn too (the U-Net only with --with-unet); the head's forward
    is still the one-step SR; the option belongs to the decoder stage and a resume must match it."""
    head = decoder_stage(YonosSR.load(str(tiny_chain / "x4.pt")), with_encoder=True)
    assert {n.split(".")[0] for n, p in head.named_parameters() if p.requires_grad} == \
        {"encoder", "quant_conv", "post_quant_conv", "decoder"}
    before = YonosSR.load(str(tiny_chain / "x4.pt"))
    cfg = dict(stage="decoder", unet=str(tiny_chain / "x4.pt"), out=str(tmp_path / "enc.pt"), with_encoder=True)
    train.main(tiny_cfg(tiny_chain, **cfg))
    after = YonosSR.load(str(tmp_path / "enc.pt"))
    assert after.meta["decoder_with_encoder"] is True
    assert_moved(before, after, unet=False, decoder=True, encoder=True, quant_conv=True)
    assert_decoder_stage_option(tiny_chain, tmp_path, with_encoder=True)


def test_decoder_stage_mse_weight_adds_the_squared_error_of_the_same_output(tiny_chain, tmp_path):
    """--mse-weight W: the decoder stage's loss is the paper's L1 plus W x the mean squared error of the same one-step
    output (the same noise draw); the option belongs to the decoder stage and a resume must match it."""
    x_h = torch.rand(2, 3, 32, 32) * 2 - 1
    batch, loss = {"hr": x_h, "lr": degrade(x_h, 4)}, {}
    for w in (0.0, 10.0):
        cfg = tiny_cfg(tiny_chain, stage="decoder", unet=str(tiny_chain / "x4.pt"), with_unet=True, mse_weight=w)
        stage = train.decoder_fine_tune_stage(cfg.resolve(), torch.device("cpu"), print, print)
        stage.trained.eval()
        loss[w] = stage.loss(stage.trained, batch, torch.Generator().manual_seed(5), 0, None)[0]
    with torch.no_grad():
        x_rec = stage.trained(batch["lr"], torch.Generator().manual_seed(5))
    mse = ((x_rec - x_h) ** 2).mean()
    assert mse > 1e-4
    torch.testing.assert_close(loss[10.0].detach(), loss[0.0].detach() + 10 * mse, rtol=1e-5, atol=1e-6)
    assert_decoder_stage_option(tiny_chain, tmp_path, mse_weight=1.0)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_chain, tmp_path):
    kw = dict(data=str(tiny_chain / "photos"), scale=2, vae=str(tiny_chain / "vae.pt"), save_every=2, val_data="")
    full = train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "full.pt"), steps=4, **kw))
    train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "part.pt"), steps=2, **kw))  # "interrupted" after step 2
    resumed = train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "part.pt"), steps=4, resume=True, **kw))
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = YonosSR.load(str(tmp_path / "part.pt")).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def _ddp_worker(rank, tmp, vae_path, lora_rank=0):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    cfg = train.TrainConfig(config="tiny", data=f"{tmp}/photos", scale=2, vae=vae_path, crop=32, batch_size=2,
                            steps=3, warmup=1, quiet=True, out=f"{tmp}/ddp.pt", lora_rank=lora_rank)
    model = train.main(cfg)  # rank 0 returns the file it wrote (merged), the others their live U-Net: merge both
    save_file({k: v.contiguous() for k, v in merged_state_dict(model.unet).items()}, f"{tmp}/rank{rank}.safetensors")
    dist.destroy_process_group()


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_ddp_two_cpu_processes_end_with_identical_weights(tiny_chain, tmp_path, lora_rank):
    """Two gloo processes, full fine-tuning and LoRA (whose adapters DDP synchronises; the file holds them merged)."""
    write_photos(tmp_path / "photos")
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path), str(tiny_chain / "vae.pt"), lora_rank), nprocs=2)
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    start = YonosSR.load(str(tmp_path / "ddp.pt")).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], start[k]) for k in a)  # rank 0 saved what it trained


def test_train_from_sd_layout_hub_cache_runs_every_stage(tmp_path):
    """--pretrained <repo id> through huggingface_hub's cache, offline: x2 from SD, x4 distilled, decoder."""
    cache = make_hub_cache(tmp_path / "hub", "org/tiny-sd", "sd2")
    write_photos(tmp_path / "photos", size=40)
    env = {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    common = ["--data", str(tmp_path / "photos"), "--crop", "32", "--batch-size", "2", "--steps", "2", "--quiet",
              "--threads", "1"]
    for args in (["--pretrained", "org/tiny-sd", "--scale", "2", "--out", str(tmp_path / "x2.pt")],
                 ["--teacher", str(tmp_path / "x2.pt"), "--scale", "4", "--out", str(tmp_path / "x4.pt")],
                 ["--stage", "decoder", "--unet", str(tmp_path / "x4.pt")]):
        r = run_script([os.path.join(HERE, "train.py"), *args, *common], env)
        assert r.returncode == 0, r.stderr[-2000:]
    model = YonosSR.load(str(tmp_path / "x4_dec.pt"))
    assert model.unet.config.in_channels == 8 and model.context.shape == (1, 77, TINY_SD2.cross_attention_dim)
    assert model.meta["init"] == "org/tiny-sd"


def test_train_bad_arguments_give_one_line_errors(tmp_path):
    for args, msg in [(["--stage", "vae"], "VAEs only"),
                      (["--config", "tiny", "--data", str(tmp_path)], "needs --vae"),
                      (["--stage", "decoder"], "needs --unet"),
                      (["--config", "tiny", "--vae", str(tmp_path / "none.pt"), "--data", str(tmp_path)],
                       "no such checkpoint")]:
        r = run_script([os.path.join(HERE, "train.py"), *args])
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


# -----------------------------------------------------------------------------
# progressive and guided distillation (Salimans & Ho 2022; Meng et al. 2023)


class ConstantX0(torch.nn.Module):
    """A 'U-Net' whose x0 prediction is a fixed latent c for every z_t and t: DDIM with it is exactly two-step
    consistent (two steps land where one step does), the case in which a copied student has nothing to learn."""

    def __init__(self, c):
        super().__init__()
        self.c = torch.nn.Parameter(c)

    def forward(self, x, t, context, w=None):
        a, s = alpha_sigma(AC, t)
        return (a * x[:, :4] - self.c) / s  # v such that x0 = a z_t - s v = c


def test_progressive_target_is_the_teachers_two_steps_in_one():
    """One student DDIM step t -> t'' with x0 = x~ lands exactly where the teacher's two steps land."""
    teacher = tiny_sr_unet(0).eval()
    z_t, z_l, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(1, 8, 32)
    grid = ddim_timesteps(8) + [-1]  # three student steps of the 4-step grid, the last one included
    t_next = torch.tensor([grid[2], grid[4], -1])
    t_mid = torch.tensor([grid[1], grid[3], grid[5]])
    t = torch.tensor([grid[0], grid[2], grid[4]])
    with torch.no_grad():
        target = two_step_target(teacher, z_t, z_l, t, t_mid, t_next, ctx, AC)
        z_mid = ddim_step(z_t, predict_v(teacher, z_t, z_l, t, ctx, AC), t, t_mid, AC)
        two_steps = ddim_step(z_mid, predict_v(teacher, z_mid, z_l, t_mid, ctx, AC), t_mid, t_next, AC)
    a, s = alpha_sigma(AC, t)
    eps = (z_t - a * target) / s  # the DDIM step of a model whose x0 is the target
    one_step = q_sample(target, t_next, eps, AC)
    assert two_steps.std() > 0.1 and (one_step - two_steps).abs().max() < 1e-4
    assert torch.allclose(target[2], two_steps[2])  # last step: the target is the teacher's result itself


def test_progressive_loss_zero_for_a_consistent_teacher_and_grad_only_to_student():
    c = torch.randn(2, 4, 8, 8)
    teacher, z_h, z_l, ctx = ConstantX0(c.clone()), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(1, 8, 32)
    student = copy.deepcopy(teacher)
    g = lambda: torch.Generator().manual_seed(0)
    for n in (2, 4, 8):
        assert progressive_distillation_loss(student, teacher, z_h, z_l, ctx, AC, n, g()).item() < 1e-8
    teacher, student = tiny_sr_unet(0), tiny_sr_unet(1)
    loss = progressive_distillation_loss(student, teacher, z_h, z_l, ctx, AC, 4, g())
    loss.backward()
    assert loss.item() > 0 and all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_guidance_embedding_starts_as_the_unguided_model_and_guided_loss_is_zero_at_w_0():
    teacher = tiny_sr_unet(0).eval()
    student = add_guidance_embedding(copy.deepcopy(teacher))
    x, t, ctx = torch.randn(2, 8, 8, 8), torch.tensor([3, 900]), torch.randn(1, 8, 32)
    with torch.no_grad():
        for w in (0.0, 1.0, 7.5):
            assert torch.equal(student(x, t, ctx, torch.full((2,), w)), teacher(x, t, ctx))
        z_t, z_l = x[:, :4], x[:, 4:]
        v_c, v_u = predict_v(teacher, z_t, z_l, t, ctx, AC), predict_v(teacher, z_t, torch.zeros_like(z_l), t, ctx, AC)
        assert torch.allclose(guided_v(teacher, z_t, z_l, t, ctx, AC, 2.0), 3 * v_c - 2 * v_u, atol=1e-5)
    z_h = torch.randn(2, 4, 8, 8)
    assert guided_distillation_loss(student, teacher, z_h, z_l, ctx, AC, 0.0,
                                    torch.Generator().manual_seed(0)).item() < 1e-10
    assert guided_distillation_loss(student, teacher, z_h, z_l, ctx, AC, 4.0,
                                    torch.Generator().manual_seed(0)).item() > 0
    assert guided_distillation_loss(student, teacher, z_h, z_l, ctx, AC, 4.0, torch.Generator().manual_seed(0),
                                    w_zero=1.0).item() < 1e-10  # --w-zero 1: every sample at w = 0, the fresh target
    assert torch.equal(drop_condition(z_l, 0.0), z_l) and drop_condition(z_l, 0.999999).abs().max() == 0


def test_progressive_and_guided_stages_chain_and_sample(tiny_chain, tmp_path):
    out = lambda name: str(tmp_path / name)
    kw = dict(data=str(tiny_chain / "photos"), val_data="")
    train.main(tiny_cfg(tiny_chain, scale=2, vae=str(tiny_chain / "vae.pt"), cond_drop=0.5, out=out("x2g.pt"), **kw))
    guided = train.main(tiny_cfg(tiny_chain, stage="guided", teacher=out("x2g.pt"), w_max=3.0, out=out("x2w.pt"), **kw))
    assert guided.unet.config.guidance_embedding and guided.meta["w_max"] == 3.0
    four = train.main(tiny_cfg(tiny_chain, stage="steps", teacher=out("x2w.pt"), teacher_steps=8, out=out("x2w4.pt"), **kw))
    two = train.main(tiny_cfg(tiny_chain, stage="steps", teacher=out("x2w4.pt"), out=out("x2w2.pt"), **kw))
    assert (four.meta["sampling_steps"], two.meta["sampling_steps"]) == (4, 2)
    model = YonosSR.load(out("x2w2.pt"))
    img = photo(16, 16)
    a, b = upscale.upscale(img, model, steps=2, guidance=2.0), upscale.upscale(img, model, steps=2)
    assert a.size == (32, 32) and not np.array_equal(np.asarray(a), np.asarray(b))


# -----------------------------------------------------------------------------
# D3SR's diffusion discriminator


def test_diffusion_discriminator_trunk_stays_frozen_generator_gets_gradients_resume_is_exact(tiny_chain, tmp_path):
    kw = dict(data=str(tiny_chain / "photos"), val_data="", scale=4, teacher=str(tiny_chain / "x2.pt"), adv_weight=0.5,
              adv_start=1, save_every=2)
    full = train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "full.pt"), steps=4, **kw))
    train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "part.pt"), steps=2, **kw))
    resumed = train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "part.pt"), steps=4, resume=True, **kw))
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    d_full, d_part = (torch.load(tmp_path / f"{n}.pt.state", weights_only=True)["disc"] for n in ("full", "part"))
    assert all(torch.equal(d_full[k], d_part[k]) for k in d_full)
    teacher = YonosSR.load(str(tiny_chain / "x2.pt")).unet.state_dict()
    assert all(torch.equal(d_full["trunk." + k], v) for k, v in teacher.items())  # frozen, bit-identical
    rows = [json.loads(line) for line in open(tmp_path / "full.pt.log.jsonl")]
    assert "loss_adv" not in rows[0] and "loss_adv" in rows[-1] and "loss_d" in rows[-1]  # --adv-start 1
    # the adversarial term's gradient reaches the generator through the frozen trunk
    model = YonosSR.load(str(tiny_chain / "x2.pt"))
    disc = DiffusionDiscriminator(model.unet)
    z_l = torch.randn(2, 4, 16, 16)
    adv = generator_adversarial_loss(disc, one_step_prediction(model.unet, z_l, model.context, AC), z_l,
                                     model.context, AC)
    model.unet.requires_grad_(True)
    adv.backward()
    assert all(p.grad is None for p in disc.trunk.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.unet.parameters() if p.grad is not None) > 0


def test_diffusion_discriminator_learns_to_tell_real_from_generated_on_held_out_crops(tiny_chain, tmp_path):
    torch.manual_seed(0)
    model = YonosSR.load(str(tiny_chain / "x2.pt"))
    disc = DiffusionDiscriminator(model.unet, (0, 500))
    opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=1e-3)
    write_photos(tmp_path / "held_out", n=4, seed=7)
    train_data, test_data = (SRPairs(str(f), 32, 2, say=lambda m: None) for f in (tiny_chain / "photos",
                                                                                 tmp_path / "held_out"))

    def latents(data, k0):
        batch = [data[k0 + k] for k in range(8)]
        with torch.no_grad():
            z_h, z_l = model.encode(torch.stack([b["hr"] for b in batch])), model.encode(torch.stack([b["lr"] for b in batch]))
            return z_h, z_l, one_step_prediction(model.unet, z_l, model.context, AC)

    def accuracy(data) -> float:
        with torch.no_grad():
            z_h, z_l, fake = latents(data, 10 ** 6)
            g = torch.Generator().manual_seed(0)
            real_ok = (disc(z_h, z_l, model.context, AC, g) > 0).float().mean()
            fake_ok = (disc(fake, z_l, model.context, AC, g) < 0).float().mean()
        return float(real_ok + fake_ok) / 2
    before = accuracy(test_data)
    for step in range(40):
        z_h, z_l, fake = latents(train_data, 8 * step)
        loss = discriminator_adversarial_loss(disc, fake, z_h, z_l, model.context, AC)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy(test_data)
    assert after > 0.7 and after > before, (before, after)


# -----------------------------------------------------------------------------
# the `make tiny` recipe (README, "Your first hour") at a few steps


def test_make_tiny_recipe_runs_end_to_end_at_a_few_steps(tmp_path):
    """tiny.sh (make tiny) at CI size: every stage runs, the reports are written, assets/ and results/ untouched."""
    write_photos(tmp_path / "train", n=4, size=64)
    write_photos(tmp_path / "val", n=2, size=64, seed=1)
    watched = {p: os.path.getmtime(p) for d in ("assets", "results") for p in
               (os.path.join(HERE, d, f) for f in os.listdir(os.path.join(HERE, d)))}
    env = {**os.environ, "PY": sys.executable, "DATA": str(tmp_path / "train"), "VAL": str(tmp_path / "val"),
           "VAE_STEPS": "3", "SR_STEPS": "3", "DEC_STEPS": "2", "EVAL_STEPS": "1,2", "EVAL_CROP": "48"}
    r = subprocess.run(["bash", os.path.join(HERE, "tiny.sh"), str(tmp_path / "run")], env=env, cwd=HERE,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert all(f"{i}/6" in r.stdout for i in range(1, 7)) and "total" in r.stdout
    for name in ("x4_dec.pt", "eval.json", "eval.png", "curves.png"):
        assert os.path.getsize(tmp_path / "run" / name) > 0, name
    report = json.load(open(tmp_path / "run" / "eval.json"))
    assert {e["steps"] for e in report["summary"]} == {0, 1, 2}
    assert watched == {p: os.path.getmtime(p) for p in watched}


# -----------------------------------------------------------------------------
# SD-size training on one consumer GPU: LoRA, gradient accumulation, EMA, fp16, the parameterisation read


def test_a_fresh_lora_unet_is_bit_identical_to_its_base_and_merging_is_exact():
    base = tiny_sr_unet(0).eval()
    lora = copy.deepcopy(base)
    params = add_lora(lora, rank=4)
    x, t, ctx = torch.randn(2, 8, 16, 16), torch.tensor([3, 900]), torch.randn(1, 8, 32)
    with torch.no_grad():
        assert torch.equal(lora(x, t, ctx), base(x, t, ctx))  # B = 0: the adapters add exactly nothing
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
        merged = tiny_sr_unet(1).eval()
        merged.load_state_dict(merged_state_dict(lora))  # the file format: the U-Net's own names, no adapters
        assert (merged(x, t, ctx) - lora(x, t, ctx)).abs().max() < 1e-5
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith("conv_in.") for n in trained)
    assert any(n.startswith("conv_in.") for n in trained)


def test_lora_training_changes_only_attention_projections_and_conv_in_and_resumes(tiny_chain, tmp_path):
    """--lora-rank with scale distillation: the saved x4 differs from its x2 teacher only in the merged attention
    projections and conv_in; .state holds only the adapters and conv_in; a resumed run ends where one run ends."""
    kw = dict(data=str(tiny_chain / "photos"), val_data="", scale=4, teacher=str(tiny_chain / "x2.pt"), lora_rank=2,
              lr=1e-2, save_every=2)
    full = train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "full.pt"), steps=4, **kw))
    train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "part.pt"), steps=2, **kw))
    resumed = train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "part.pt"), steps=4, resume=True, **kw))
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    teacher = YonosSR.load(str(tiny_chain / "x2.pt")).unet.state_dict()
    student = YonosSR.load(str(tmp_path / "full.pt")).unet.state_dict()
    changed = {k for k in teacher if not torch.equal(teacher[k], student[k])}
    adapted = lambda k: k.startswith("conv_in.") or any(f".{n}.weight" in k for n in ("to_q", "to_k", "to_v", "to_out.0"))
    assert changed and all(adapted(k) for k in changed) and any(k.startswith("conv_in.") for k in changed)
    state = torch.load(tmp_path / "full.pt.state", weights_only=True)["model"]
    assert all(".lora_" in k or k.startswith("conv_in.") for k in state)


def test_grad_accum_2_with_batch_b_is_the_update_of_one_batch_of_2b(tiny_chain, tmp_path):
    kw = dict(data=str(tiny_chain / "photos"), val_data="", scale=2, vae=str(tiny_chain / "vae.pt"), steps=2,
              warmup=1, lr=1e-3)
    one = train.main(tiny_cfg(tiny_chain, batch_size=4, out=str(tmp_path / "one.pt"), **kw)).unet.state_dict()
    two = train.main(tiny_cfg(tiny_chain, batch_size=2, grad_accum=2, out=str(tmp_path / "two.pt"), **kw)).unet.state_dict()
    start = train.new_sr_model(tiny_cfg(tiny_chain, **kw).resolve(), print, print).unet.state_dict()
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-4  # it trained
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-3 * moved  # float rounding only
    other = train.main(tiny_cfg(tiny_chain, batch_size=2, out=str(tmp_path / "b2.pt"), **kw)).unet.state_dict()
    assert max(float((one[k] - other[k]).abs().max()) for k in one) > 0.01 * moved  # a batch of b is another update


def test_ema_follows_its_formula_and_its_average_is_what_out_holds_and_resumes_exactly(tiny_chain, tmp_path):
    p = torch.nn.Parameter(torch.zeros(3))
    ema, expect = runs.EMA([p], 0.9), torch.zeros(3)
    for step in range(5):
        with torch.no_grad():
            p.add_(1.0)
        ema.update([p], step)
        d = min(0.9, (1 + step) / (10 + step))
        expect = d * expect + (1 - d) * p.detach()
    assert torch.allclose(ema.shadow[0], expect)
    kw = dict(data=str(tiny_chain / "photos"), val_data="", scale=2, vae=str(tiny_chain / "vae.pt"), ema=0.5, lr=1e-2,
              save_every=2)
    full = train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "full.pt"), steps=4, **kw))
    train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "part.pt"), steps=2, **kw))
    train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "part.pt"), steps=4, resume=True, **kw))
    saved = {n: YonosSR.load(str(tmp_path / f"{n}.pt")).unet.state_dict() for n in ("full", "part")}
    assert all(torch.equal(saved["full"][k], saved["part"][k]) for k in saved["full"])
    state = torch.load(tmp_path / "full.pt.state", weights_only=True)
    raw = {k.removeprefix("unet."): v for k, v in state["model"].items()}
    names = [n for n, q in full.unet.named_parameters()]
    assert len(state["ema"]["shadow"]) == len(names)
    assert all(torch.equal(saved["full"][n], e) for n, e in zip(names, state["ema"]["shadow"]))  # --out: the EMA
    assert any(not torch.equal(raw[n], saved["full"][n]) for n in names)  # .state: the raw weights


def test_fp16_with_a_gradscaler_runs_on_a_cpu_and_skips_a_step_with_inf_gradients(tiny_chain, tmp_path):
    prec = runs.Precision("fp16", torch.device("cpu"))
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    with prec.autocast():
        loss = (w.half() * torch.tensor([1.0, 2, 3, float("inf")]).half()).sum()
    prec.backward(loss)
    scale = prec.scaler.get_scale()
    norm = prec.step(opt, [w], 1.0)
    assert not np.isfinite(norm) and torch.equal(w.detach(), torch.ones(4)) and prec.scaler.get_scale() < scale
    model = train.main(tiny_cfg(tiny_chain, data=str(tiny_chain / "photos"), val_data="", scale=2, precision="fp16",
                                vae=str(tiny_chain / "vae.pt"), out=str(tmp_path / "fp16.pt")))
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert "scaler" in torch.load(tmp_path / "fp16.pt.state", weights_only=True)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_x0_at_step_0_is_what_diffusers_derives_under_the_repos_own_prediction_type(prediction, tmp_path):
    """An SD-layout repo whose scheduler says epsilon or v_prediction: at step 0 (conv_in widened with zeros), the x0
    yonos derives at t = 100, 500, 999 equals diffusers' DDIMScheduler's pred_original_sample for the same U-Net."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from yonos import predict_v, x0_from_v
    cache = make_hub_cache(tmp_path / "hub", "org/tiny-sd", "sd2", prediction_type=prediction)
    os.environ["HF_HUB_CACHE"] = cache
    try:
        cfg = train.TrainConfig(pretrained="org/tiny-sd", quiet=True).resolve()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            import huggingface_hub.constants as hc
            mp.setattr(hc, "HF_HUB_OFFLINE", True)
            mp.setattr(hc, "HF_HUB_CACHE", cache)
            model = train.new_sr_model(cfg, print, print).eval()
    finally:
        del os.environ["HF_HUB_CACHE"]
    snapshot = os.path.join(cache, "models--org--tiny-sd", "snapshots", os.listdir(os.path.join(
        cache, "models--org--tiny-sd", "snapshots"))[0])
    ref = UNet2DConditionModel.from_pretrained(snapshot, subfolder="unet").eval()
    sched = DDIMScheduler.from_pretrained(snapshot, subfolder="scheduler")
    sched.set_timesteps(1000)
    assert model.unet.config.prediction_type == ("v" if prediction == "v_prediction" else "epsilon")
    g = torch.Generator().manual_seed(0)
    z_t, z_l = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    for t in (100, 500, 999):
        tb = torch.tensor([t])
        with torch.no_grad():
            ours = x0_from_v(z_t, predict_v(model.unet, z_t, z_l, tb, model.context, model.alphas_cumprod), tb,
                             model.alphas_cumprod)
            out = ref(z_t, tb, encoder_hidden_states=model.context).sample
        theirs = sched.step(out, t, z_t).pred_original_sample
        assert (ours - theirs).abs().max() < 1e-4 * max(1.0, float(theirs.abs().max())), (prediction, t)


def test_the_sd_path_with_lora_through_a_local_hub_cache(tmp_path):
    cache = make_hub_cache(tmp_path / "hub", "org/tiny-sd", "sd2", prediction_type="v_prediction")
    write_photos(tmp_path / "photos", size=40)
    env = {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    common = ["--data", str(tmp_path / "photos"), "--crop", "32", "--batch-size", "2", "--steps", "2", "--quiet",
              "--threads", "1", "--lora-rank", "4", "--grad-checkpointing", "--grad-accum", "2", "--ema", "0.9"]
    for args in (["--pretrained", "org/tiny-sd", "--scale", "2", "--out", str(tmp_path / "x2.pt")],
                 ["--teacher", str(tmp_path / "x2.pt"), "--scale", "4", "--out", str(tmp_path / "x4.pt")]):
        r = run_script([os.path.join(HERE, "train.py"), *args, *common], env)
        assert r.returncode == 0, r.stderr[-2000:]
    model = YonosSR.load(str(tmp_path / "x4.pt"))
    assert model.unet.config.prediction_type == "v" and model.meta["lora_rank"] == 4 and model.scale == 4
    assert upscale.upscale(photo(16, 16), model).size == (64, 64)


# -----------------------------------------------------------------------------
# the data: teacher and student LR from one degradation draw


@pytest.mark.parametrize("kind", ["photo", "realesrgan"])
def test_the_teachers_and_students_lr_come_from_one_degradation_draw(kind):
    """degrade_lr: the student's LR (x4) is exactly the teacher's (x2) resized, rounded and finished at its own size
    by the draw's finish (the photo chain's JPEG, with its one quality and block phase, or nothing): one blur, noise
    and JPEG draw for both, as scale distillation's nesting needs. The draw is replayed from the same seed to get
    that finish. Two separate draws are far apart."""
    from data import CHAINS, degrade_lr, quantize, resize, working_scale
    hr = to_tensor(Image.fromarray(skdata.astronaut()[100:228, 180:308]))[None]
    compressed = 0
    for seed in range(6):
        student, teacher = degrade_lr(hr, [4, 2], kind, torch.Generator().manual_seed(seed))
        assert student.shape[-1] == 32 and teacher.shape[-1] == 64
        g = torch.Generator().manual_seed(seed)
        _, finish = CHAINS[kind](hr, working_scale(4, g), g)  # the same draw, replayed
        down = quantize(resize(teacher, (32, 32)).clamp(-1, 1))
        assert float((quantize(finish(down)) - student).abs().max()) < 1e-6, seed
        compressed += int(float((finish(down) - down).abs().max()) > 1e-6)
        other = degrade_lr(hr, [4], kind, torch.Generator().manual_seed(seed + 100))[0]
        assert (other - student).pow(2).mean() > 1e-3, seed
    assert (kind == "realesrgan") == (compressed == 0), compressed  # the photo chain's finish did compress (p = 0.8)
    item = SRPairs(str(write_photos(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"nest_{kind}"), n=2, size=96)),
                   64, 4, 2, kind, seed=0, say=lambda m: None)[3]
    assert set(item) == {"hr", "lr", "lr_teacher"}


def test_jpeg_with_a_phase_is_a_crop_of_a_larger_jpeg():
    """data.jpeg(crop, q, phase): the crop at (a, b) of a JPEG-compressed image, compressed on its own with the phase
    (a % 16, b % 16), is that crop of the whole JPEG once past its first macroblock (whose hidden pixels it cannot
    know), so the photo chain's blocks sit where a crop of a real JPEG has them; at phase 0 they start at the
    crop's corner, and elsewhere they do not."""
    from data import jpeg
    x = to_tensor(Image.fromarray(skdata.astronaut()[200:264, 200:264]))[None]
    whole = jpeg(x, 40)
    for a, b in [(5, 9), (16, 3), (27, 30)]:
        crop = jpeg(x[..., a:, b:], 40, (a % 16, b % 16))
        ia, ib = 16 - a % 16 + 2, 16 - b % 16 + 2  # past the first macroblock and chroma's 2-px upsampling reach
        assert float((crop - whole[..., a:, b:])[..., ia:, ib:].abs().max()) < 1e-6, (a, b)  # measured: 0
        assert float((jpeg(x[..., a:, b:], 40) - whole[..., a:, b:])[..., ia:, ib:].abs().mean()) > 2 / 127.5, (a, b)


def test_one_schedule_the_bundles_reaches_the_preconditioning_the_losses_and_the_sampler(tmp_path):
    """A model built with another schedule (here SD's betas rescaled to zero terminal SNR, the course's extension)
    keeps it in its file, and train.py's losses, lr_preconditioning and the sampler all read that one tensor."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
    from model import UNET_PRESETS, UNet
    from vae import VAE_PRESETS
    from yonos import make_alphas_cumprod, sr_loss
    betas = 1 - make_alphas_cumprod() / torch.cat([torch.ones(1, dtype=torch.float64), make_alphas_cumprod()[:-1]])
    ac = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)  # alpha_bar_999 = 0: pure noise at t = 999
    torch.manual_seed(0)
    model = YonosSR(UNet(UNET_PRESETS["small"]), AutoencoderKL(VAE_PRESETS["small"]), torch.randn(1, 8, 32), 2,
                    alphas_cumprod=ac)
    model.save(str(tmp_path / "zsnr.pt"))
    loaded = YonosSR.load(str(tmp_path / "zsnr.pt"))
    assert torch.equal(loaded.alphas_cumprod, ac) and float(loaded.alphas_cumprod[-1]) == 0
    write_photos(tmp_path / "photos")
    cfg = tiny_cfg(tmp_path, config="small", init=str(tmp_path / "zsnr.pt"), scale=2).resolve()
    stage = train.sr_stage(cfg, torch.device("cpu"), print, print)
    batch = {k: v[None] for k, v in SRPairs(str(tmp_path / "photos"), 32, 2, say=lambda m: None)[0].items()}
    with torch.no_grad():
        got = stage.loss(stage.trained, batch, torch.Generator().manual_seed(0), 0, None)[0]
        z_h, z_l = stage.bundle.encode(batch["hr"]), stage.bundle.encode(batch["lr"])
        mine = sr_loss(stage.trained, z_h, z_l, stage.bundle.context, ac, torch.Generator().manual_seed(0))
        sd = sr_loss(stage.trained, z_h, z_l, stage.bundle.context, make_alphas_cumprod(),
                     torch.Generator().manual_seed(0))
    assert torch.equal(got, mine) and not torch.isclose(got, sd)
    z_t, t = torch.randn_like(z_h), torch.tensor([999])
    v = predict_v(stage.trained, z_t, z_l, t, stage.bundle.context, ac)  # at t = 999 alpha = 0: x0 = -v
    assert torch.allclose(-v, z_l + 0.2 * stage.trained(torch.cat([z_t, z_l], 1), t, stage.bundle.context), atol=1e-5)
    x_up = degrade(batch["hr"], 2)
    noise = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(1))
    out = loaded.super_resolve(x_up, 1, noise)
    loaded.alphas_cumprod = make_alphas_cumprod()
    assert not torch.equal(out, loaded.super_resolve(x_up, 1, noise))  # the sampler read the file's schedule
