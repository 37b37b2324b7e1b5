"""
Tests for the scripts end to end: training (the whole tiny chain, DDP, resume, the SD path), sample.py, eval.py,
the other distillations, D3SR's discriminator, bench.py, study.py and the course build. The library's own tests
are in test_yonos.py. CPU only, offline, tiny configs; slow checks are marked `slow` and run only with
`pytest -m slow`.
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
from scipy import linalg
from skimage import data as skdata
from skimage.metrics import structural_similarity

import eval as ev
import metrics
import sample
import train
import upscale
from conftest import AC, HERE, TINY_SD2, make_hub_cache, photo, run_script, tiny_sr_unet, write_photos
from data import SRPairs, degrade, to_tensor
from model import add_guidance_embedding
from vae import AutoencoderKL
from yonos import (DiffusionDiscriminator, YonosSR, alpha_sigma, discriminator_adversarial_loss,
                   generator_adversarial_loss, one_step_prediction, ddim_step, ddim_timesteps, drop_condition,
                   guided_distillation_loss, guided_v, predict_v, progressive_distillation_loss, q_sample,
                   two_step_target)

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


def test_decoder_stage_trains_only_the_decoder(tiny_chain):
    before, after = YonosSR.load(str(tiny_chain / "x4.pt")), YonosSR.load(str(tiny_chain / "x4_dec.pt"))
    for part in ("unet", "vae.encoder", "vae.quant_conv"):
        a, b = before.get_submodule(part).state_dict(), after.get_submodule(part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    a, b = before.vae.decoder.state_dict(), after.vae.decoder.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_chain, tmp_path):
    kw = dict(data=str(tiny_chain / "photos"), scale=2, vae=str(tiny_chain / "vae.pt"), save_every=2, val_data="")
    full = train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "full.pt"), steps=4, **kw))
    train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "part.pt"), steps=2, **kw))  # "interrupted" after step 2
    resumed = train.main(tiny_cfg(tiny_chain, out=str(tmp_path / "part.pt"), steps=4, resume=True, **kw))
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = YonosSR.load(str(tmp_path / "part.pt")).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def _ddp_worker(rank, tmp, vae_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    cfg = train.TrainConfig(config="tiny", data=f"{tmp}/photos", scale=2, vae=vae_path, crop=32, batch_size=2,
                            steps=3, warmup=1, quiet=True, out=f"{tmp}/ddp.pt")
    model = train.main(cfg)
    save_file({k: v.contiguous() for k, v in model.unet.state_dict().items()}, f"{tmp}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_ddp_two_cpu_processes_end_with_identical_weights(tiny_chain, tmp_path):
    write_photos(tmp_path / "photos")
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path), str(tiny_chain / "vae.pt")), nprocs=2)
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
# sample.py: any size, any colour mode, bad inputs, tiling, seeds


def psnr_of(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2)))


def run_sample(args, capsys):
    try:
        code = sample.main([str(a) for a in args])
    except SystemExit as e:  # argparse's errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_odd_size_gives_exact_scale(tmp_path, random_ckpt, capsys):
    photo(37, 53).save(tmp_path / "odd.png")
    code, out, err = run_sample([tmp_path / "odd.png", "--ckpt", random_ckpt], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "odd_x4.png").size == (148, 212) and "odd_x4.png" in out


def write_modes(folder) -> dict:
    """One file per colour mode and format users throw at an upscaler; returns name -> expected output mode."""
    os.makedirs(folder, exist_ok=True)
    expected = {}
    for mode, want in [("RGB", "RGB"), ("RGBA", "RGBA"), ("L", "RGB"), ("P", "RGB"), ("LA", "RGBA")]:
        photo(20, 12, mode).save(os.path.join(folder, f"{mode}.png"))
        expected[f"{mode}.png"] = want
    p = photo(20, 12, "RGB").convert("P")
    p.info["transparency"] = 0
    p.save(os.path.join(folder, "P_transparent.png"), transparency=0)
    expected["P_transparent.png"] = "RGBA"
    Image.fromarray((np.arange(240, dtype=np.uint16).reshape(12, 20) * 250)).save(os.path.join(folder, "I16.png"))
    expected["I16.png"] = "RGB"
    photo(20, 12, "CMYK").save(os.path.join(folder, "cmyk.jpg"))
    expected["cmyk.jpg"] = "RGB"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    photo(20, 12, "RGB").save(os.path.join(folder, "rotated.jpg"), exif=exif)
    expected["rotated.jpg"] = "RGB"
    return expected


def test_sample_reads_every_colour_mode(tmp_path, random_ckpt, capsys):
    expected = write_modes(tmp_path / "in")
    assert Image.open(tmp_path / "in" / "I16.png").mode.startswith("I")
    code, out, err = run_sample([tmp_path / "in", "--out", tmp_path / "out", "--ckpt", random_ckpt], capsys)
    assert code == 0, err
    for name, mode in expected.items():
        img = Image.open(tmp_path / "out" / (os.path.splitext(name)[0] + "_x4.png"))
        assert img.mode == mode, name
        assert img.size == ((48, 80) if name == "rotated.jpg" else (80, 48)), name
    rgba = Image.open(tmp_path / "out" / "RGBA_x4.png")
    src_alpha = np.asarray(Image.open(tmp_path / "in" / "RGBA.png").getchannel("A").resize((80, 48), Image.BICUBIC))
    assert np.array_equal(np.asarray(rgba.getchannel("A")), src_alpha)


def test_sample_bad_inputs_give_one_line_errors(tmp_path, random_ckpt, capsys):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    photo(40, 40).save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:200])
    photo(1, 1).save(tmp_path / "tiny.png")
    photo(64, 64).save(tmp_path / "large.png")
    os.makedirs(tmp_path / "nothing_here")
    cases = [("missing.png", "no such file"), ("empty.png", "cannot read"), ("text.png", "cannot read"),
             ("truncated.png", "cannot read"), ("tiny.png", "too small"), ("large.png", "larger than the limit")]
    for name, msg in cases:
        code, out, err = run_sample([tmp_path / name, "--ckpt", random_ckpt, "--max-pixels", "4000"], capsys)
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and name in lines[0] and msg in lines[0], (name, err)
    code, _, err = run_sample([tmp_path / "nothing_here", "--ckpt", random_ckpt], capsys)
    assert code == 2 and "no images" in err
    code, _, err = run_sample([tmp_path / "good.png", "--ckpt", tmp_path / "text.png"], capsys)
    assert code == 2 and "not a yonos checkpoint" in err
    for bad, msg in [(["--tile", "10"], "multiple of 4"), (["--tile", "16", "--overlap", "16"], "--overlap must be"),
                     (["--steps", "0"], "--steps: must be at least 1")]:
        code, _, err = run_sample([tmp_path / "good.png", "--ckpt", random_ckpt, *bad], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, (bad, err)
    # in a batch, one bad file does not stop the others
    code, out, err = run_sample([tmp_path / "text.png", tmp_path / "good.png", "--ckpt", random_ckpt,
                                 "--out", tmp_path / "batch"], capsys)
    assert code == 1 and (tmp_path / "batch" / "good_x4.png").exists() and "1 of 2 images done" in out
    assert not [p for p in os.listdir(tmp_path / "batch") if ".tmp" in p]


def test_sample_never_overwrites_without_force(tmp_path, random_ckpt, capsys):
    photo(16, 16).save(tmp_path / "a.png")
    code, _, err = run_sample([tmp_path / "a.png", "--out", tmp_path / "a.png", "--ckpt", random_ckpt], capsys)
    assert code == 1 and "is an input" in err
    (tmp_path / "a_x4.png").write_bytes(b"keep")
    code, _, err = run_sample([tmp_path / "a.png", "--ckpt", random_ckpt], capsys)
    assert code == 1 and "--force" in err and (tmp_path / "a_x4.png").read_bytes() == b"keep"
    code, _, err = run_sample([tmp_path / "a.png", "--ckpt", random_ckpt, "--force"], capsys)
    assert code == 0 and Image.open(tmp_path / "a_x4.png").size == (64, 64)


def test_sample_same_seed_same_output(random_ckpt):
    model, img = YonosSR.load(random_ckpt), photo(24, 20)
    a, b = upscale.upscale(img, model, seed=1), upscale.upscale(img, model, seed=1)
    c = upscale.upscale(img, model, seed=2)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


def test_tile_defaults_come_from_the_checkpoint(random_ckpt, tmp_path):
    """The tile: the checkpoint's meta.tile, else its training crop's latent size, else 64; the overlap: half the
    tile, 1/16 for models that add a residual to the LR latent. meta.tile survives a save in fp16."""
    model = YonosSR.load(random_ckpt)
    f = model.vae.config.factor
    assert model.unet.config.lr_prior_std == 0 and "train_crop" not in model.meta and "tile" not in model.meta
    assert upscale.tile_settings(model) == (64, 32)
    model.meta["train_crop"] = 24 * f
    assert upscale.tile_settings(model) == (24, 12)
    model.meta["tile"] = 40
    assert upscale.tile_settings(model) == (40, 20) and upscale.tile_settings(model, 16, 4) == (16, 4)
    model.save(str(tmp_path / "t.pt"), torch.float16)
    assert YonosSR.load(str(tmp_path / "t.pt")).meta["tile"] == 40
    shipped = {s: YonosSR.load(os.path.join(HERE, "assets", f"yonos_x{s}.pt")) for s in (2, 4, 8)}
    assert {s: upscale.tile_settings(m) for s, m in shipped.items()} == {2: (64, 4), 4: (32, 2), 8: (64, 4)}


def test_tiles_in_batches_equal_tiles_one_by_one(random_ckpt):
    model = YonosSR.load(random_ckpt)
    g = torch.Generator().manual_seed(0)
    x_up, noise = torch.rand(1, 3, 48, 40, generator=g) * 2 - 1, torch.randn(1, 4, 24, 20, generator=g)  # f=2
    batched = upscale.super_resolve_tiled(model, x_up, noise, 2, 8, 4)  # 5x4 tiles, all in one batch
    one_by_one = upscale.super_resolve_tiled(model, x_up, noise, 2, 8, 4, cells_per_batch=1)
    assert batched.shape == x_up.shape and (batched - one_by_one).abs().max() < 1e-5


def test_tiled_output_agrees_with_untiled_on_the_shipped_model():
    """Tiling changes the output by no more than another noise seed does (the model's own sampling spread:
    measured 1.6/255 mean, 8/255 99th percentile for the shipped x4 on this crop; 48-cell tiles overlapping by
    16: 0.4 and 2; the default 32-cell tiles overlapping by 2: 0.7 and 4)."""
    model = YonosSR.load(sample.SHIPPED[4])
    img = Image.fromarray(skdata.chelsea()).crop((150, 80, 198, 128))  # 48x48 -> 192x192: 96x96 latent cells
    whole = np.asarray(upscale.upscale(img, model, tile=0), dtype=np.float64)
    other_seed = np.asarray(upscale.upscale(img, model, tile=0, seed=1), dtype=np.float64)
    spread = np.abs(whole - other_seed)
    for tiled in (np.asarray(upscale.upscale(img, model, tile=48, overlap=16), dtype=np.float64),  # 3x3 tiles
                  np.asarray(upscale.upscale(img, model), dtype=np.float64)):  # the defaults
        diff = np.abs(whole - tiled)
        assert diff.mean() < 1.5 * spread.mean() and np.percentile(diff, 99) < 1.5 * np.percentile(spread, 99)
        assert psnr_of(tiled, whole) > 30


# -----------------------------------------------------------------------------
# eval.py: metrics against hand-computed values, scikit-image and scipy; LPIPS and FID with random weights;
# the report files


def test_psnr_y_matches_hand_computed_value():
    hr = np.full((20, 20, 3), 100, np.uint8)
    sr = hr + np.uint8(10)  # +10 on R, G and B moves Y by 10 * (65.481 + 128.553 + 24.966) / 255
    dy = 10 * 219.0 / 255
    assert metrics.psnr_y(sr, hr, 2) == pytest.approx(20 * np.log10(255 / dy), abs=1e-9)
    sr[0, 0] = 0  # inside the border: ignored
    assert metrics.psnr_y(sr, hr, 2) == pytest.approx(20 * np.log10(255 / dy), abs=1e-9)


def test_ssim_y_matches_scikit_image():
    hr = skdata.astronaut()[100:180, 100:200]
    sr = np.clip(hr + np.random.default_rng(0).normal(0, 12, hr.shape), 0, 255).astype(np.uint8)
    ya, yb = metrics.rgb_to_y(sr)[4:-4, 4:-4], metrics.rgb_to_y(hr)[4:-4, 4:-4]
    expected = structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255)
    assert metrics.ssim_y(sr, hr, 4) == pytest.approx(expected, abs=1e-9) and 0.3 < expected < 0.95
    assert metrics.ssim_y(hr, hr, 4) == pytest.approx(1.0)


def write_random_lpips(folder) -> "metrics.LPIPS":
    """Random LPIPS weights in the published layout: torchvision's VGG16 file and the lpips package's heads."""
    torch.manual_seed(0)
    ref = metrics.LPIPS()
    vgg = {k: v for k, v in ref.state_dict().items() if k.startswith("features.")}
    vgg |= {"classifier.0.weight": torch.zeros(2, 2)}  # torchvision's file has the classifier too
    for lin in ref.lins:
        torch.nn.init.uniform_(lin.weight, 0, 1)
    os.makedirs(folder, exist_ok=True)
    torch.save(vgg, os.path.join(folder, "vgg16-397923af.pth"))
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(ref.lins)}, os.path.join(folder, "vgg.pth"))
    return ref


def test_lpips_loads_published_layout_with_random_weights(tmp_path):
    ref = write_random_lpips(tmp_path)
    lpips = metrics.LPIPS.load(str(tmp_path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d = lpips(x, y)
    assert torch.equal(d, ref(x, y)) and (d > 0).all() and lpips(x, x).abs().max() < 1e-6
    assert (lpips(x, (x + 0.6 * torch.randn_like(x)).clamp(-1, 1)) > d).all()
    with pytest.raises(FileNotFoundError, match="weights not found"):
        metrics.LPIPS.load(str(tmp_path / "nowhere"))


def test_frechet_distance_matches_the_scipy_formula():
    """pytorch-fid computes Tr((S_a S_b)^(1/2)) with scipy.linalg.sqrtm; ours uses a symmetric eigen-decomposition."""
    g = np.random.default_rng(0)
    for n, d in [(200, 16), (12, 32)]:  # full-rank and rank-deficient covariances
        a = g.normal(size=(n, d)) @ g.normal(size=(d, d))
        b = g.normal(size=(n, d)) * 1.5 + 0.3
        sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
        assert abs(metrics.frechet_distance(a, b) - ref) < 1e-6 * max(1, abs(ref))
    tol = 1e-6 * np.trace(np.cov(a, rowvar=False))  # square roots of round-off-sized eigenvalues of a rank-deficient S
    assert abs(metrics.frechet_distance(a, a)) < tol and abs(metrics.frechet_distance(a, a + 2.0) - 4 * d) < tol
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(a[:1], b)


def write_random_inception(folder) -> "metrics.InceptionV3":
    """Random InceptionV3 weights in pytorch-fid's published layout (plus its unused 1008-way classifier)."""
    torch.manual_seed(0)
    ref = metrics.InceptionV3()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.5, 1.5)
    state = ref.state_dict() | {"fc.weight": torch.randn(1008, 2048), "fc.bias": torch.zeros(1008)}
    torch.save(state, os.path.join(folder, metrics.InceptionV3.WEIGHTS))
    return ref.eval()


def test_fid_network_loads_published_layout_and_scores_with_random_weights(tmp_path, random_ckpt, capsys):
    ref = write_random_inception(tmp_path)
    net = metrics.InceptionV3.load(str(tmp_path))  # a folder; a file path works too
    x = torch.rand(2, 3, 64, 80) * 2 - 1
    feats = net(x)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and torch.equal(feats, ref(x))
    assert torch.equal(metrics.InceptionV3.load(os.path.join(tmp_path, metrics.InceptionV3.WEIGHTS))(x), feats)
    with pytest.raises(FileNotFoundError, match="weights not found"):
        metrics.InceptionV3.load(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "hr")
    for i in range(2):
        photo(40, 36, seed=i).save(tmp_path / "hr" / f"{i}.png")
    code = ev.main([random_ckpt, "--data", str(tmp_path / "hr"), "--fid", str(tmp_path),
                    "--out", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert code == 0 and "| FID |" in out and "FID skipped" not in out
    report = json.load(open(tmp_path / "res.json"))
    fids = {(e["model"], e["steps"]): e["fid"] for e in report["summary"]}
    assert len(fids) == 2 and all(np.isfinite(v) and v > 0 for v in fids.values())
    # the bicubic row's FID is the distance between its set and the HR set, recomputed here
    hrs, bics = zip(*[ev.prepare(str(tmp_path / "hr" / f"{i}.png"), 4) for i in range(2)])
    f = lambda imgs: np.stack([net(to_tensor(Image.fromarray(im))[None])[0].detach().numpy() for im in imgs])
    expected = metrics.frechet_distance(f([ev.bicubic_up(lr, 4) for lr in bics]), f(hrs))
    assert abs(fids["bicubic", 0] - expected) < 1e-3 * expected


def test_metric_weights_load_by_hub_repo_id_from_a_local_cache(tmp_path):
    """--lpips and --fid also take a Hub repo id; offline, it resolves from the local Hub cache layout."""
    snap = tmp_path / "cache" / "models--org--metrics" / "snapshots" / ("0" * 40)
    os.makedirs(snap)
    os.makedirs(tmp_path / "cache" / "models--org--metrics" / "refs")
    (tmp_path / "cache" / "models--org--metrics" / "refs" / "main").write_text("0" * 40)
    write_random_inception(snap)
    write_random_lpips(snap)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    code = ("import eval; print(type(eval.InceptionV3.load('org/metrics')).__name__, type(eval.LPIPS.load('org/metrics')).__name__);"
            "eval.InceptionV3.load('org/absent')")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True)
    assert r.stdout.split() == ["InceptionV3", "LPIPS"] and "weights not found" in r.stderr, r.stderr[-2000:]


def test_eval_reports_table_files_and_plot(tmp_path, random_ckpt, capsys):
    os.makedirs(tmp_path / "hr")
    for i in range(2):
        photo(40, 36, seed=i).save(tmp_path / "hr" / f"{i}.png")
    code = ev.main([random_ckpt, "--data", str(tmp_path / "hr"), "--steps", "1,2", "--seeds", "0,1",
                    "--out", str(tmp_path / "res")])
    out = capsys.readouterr().out
    assert code == 0 and "| bicubic | x4 | - |" in out and "LPIPS skipped" in out
    report = json.load(open(tmp_path / "res.json"))
    bicubic = [e for e in report["summary"] if e["model"] == "bicubic"][0]
    hr, lr = ev.prepare(str(tmp_path / "hr" / "0.png"), 4)
    assert hr.shape == (36, 40, 3) and lr.size == (10, 9)
    expected = np.mean([metrics.psnr_y(ev.bicubic_up(lr, 4), hr, 4)
                        for hr, lr in [ev.prepare(str(tmp_path / "hr" / f"{i}.png"), 4) for i in range(2)]])
    assert bicubic["psnr"] == pytest.approx(expected)
    assert {(e["steps"], e["seeds"]) for e in report["summary"] if e["model"] == "rand_x4.pt +colour fix"} == {(1, 2), (2, 2)}
    assert len(report["rows"]) == 2 + 2 * 2 * 2
    with open(tmp_path / "res.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert Image.open(tmp_path / "res.png").size[0] > 100
    code = ev.main([random_ckpt, "--data", str(tmp_path / "hr"), "--figure", str(tmp_path / "fig.png")])
    assert code == 0 and Image.open(tmp_path / "fig.png").size == (4 * 36 + 3 * 4, 36 + 24)  # 4 panels of 9*4 px


def test_color_fix_removes_a_colour_cast_and_keeps_detail():
    torch.manual_seed(0)
    x_up = torch.rand(1, 3, 64, 64) * 1.2 - 0.6
    detail = 0.2 * torch.randn(1, 3, 64, 64)
    sr = x_up + detail + torch.tensor([0.3, -0.2, 0.1])[None, :, None, None]  # a cast + new high frequencies
    fixed = upscale.color_fix(sr, x_up)
    assert (fixed - x_up).mean((0, 2, 3)).abs().max() < 0.01  # the cast is gone
    assert torch.allclose(upscale.color_fix(x_up, x_up), x_up, atol=1e-6)
    assert ((fixed - x_up) - (detail - upscale.wavelet_low(detail))).abs().mean() < 0.02  # the detail stays


def test_shipped_model_output_on_the_example_is_unchanged():
    """Refactors must not change what users get: the shipped x4 model's default output on assets/example.png
    equals the stored one (assets/example_x4.png, regenerated only when the shipped model changes). Measured
    bit-identical here; the tolerance only admits a last-bit rounding flip on another CPU."""
    got = np.asarray(upscale.upscale(Image.open(os.path.join(HERE, "assets", "example.png")),
                                     YonosSR.load(sample.SHIPPED[4])), dtype=np.int16)
    want = np.asarray(Image.open(os.path.join(HERE, "assets", "example_x4.png")), dtype=np.int16)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1 and (got == want).mean() > 0.999


def test_compiled_model_gives_the_eager_output_with_static_tile_batches(random_ckpt):
    """--compile's code path on a CPU: torch.compile with the eager backend (inductor's CUDA graphs need a GPU,
    and on a CPU compile() only returns a note). Tile batches are padded to one shape, so one graph serves all."""
    img = photo(40, 36)
    eager = np.asarray(upscale.upscale(img, YonosSR.load(random_ckpt), tile=8, overlap=2), dtype=np.int16)
    model = YonosSR.load(random_ckpt)
    assert "CUDA" in model.compile() and not model.compiled  # the default on a CPU: a note, not an error
    assert model.compile(backend="eager") is None and model.compiled
    compiled = np.asarray(upscale.upscale(img, model, tile=8, overlap=2), dtype=np.int16)
    assert compiled.shape == eager.shape and np.abs(compiled - eager).max() <= 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3  # U-Net, encode, decode: no recompiles


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
        z_mid = ddim_step(z_t, predict_v(teacher, z_t, z_l, t, ctx), t, t_mid, AC)
        two_steps = ddim_step(z_mid, predict_v(teacher, z_mid, z_l, t_mid, ctx), t_mid, t_next, AC)
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
        v_c, v_u = predict_v(teacher, z_t, z_l, t, ctx), predict_v(teacher, z_t, torch.zeros_like(z_l), t, ctx)
        assert torch.allclose(guided_v(teacher, z_t, z_l, t, ctx, 2.0), 3 * v_c - 2 * v_u, atol=1e-5)
    z_h = torch.randn(2, 4, 8, 8)
    assert guided_distillation_loss(student, teacher, z_h, z_l, ctx, AC, 0.0,
                                    torch.Generator().manual_seed(0)).item() < 1e-10
    assert guided_distillation_loss(student, teacher, z_h, z_l, ctx, AC, 4.0,
                                    torch.Generator().manual_seed(0)).item() > 0
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


def test_readme_reading_guide_points_at_the_code():
    """The README's table paper -> function -> file:line: every row must name the line that defines the function
    (the failure message gives the right lines, so the table is quick to mend when code moves)."""
    import re
    rows = re.findall(r"^\|[^|\n]*\|[^|\n]*\| `(\w+)` \| `(\w+\.py):(\d+)` \|$", open(os.path.join(HERE, "README.md"),
                                                                                     encoding="utf-8").read(), re.M)
    assert len(rows) >= 20
    wrong = []
    for fn, path, line in rows:
        lines = open(os.path.join(HERE, path), encoding="utf-8").read().split("\n")
        actual = [i for i, text in enumerate(lines, 1) if re.match(rf"(def|class) {fn}\b", text)]
        if actual != [int(line)]:
            wrong.append(f"{fn}: {path}:{line} should be {path}:{actual}")
    assert not wrong, "; ".join(wrong)


def periodic_amplitude(y: np.ndarray, period: float) -> float:
    """The amplitude, in grey levels, of the component of period `period` pixels of y's column profile and row
    profile (the larger): a grid or tile seam is aligned across the image, so averaging the rows (columns) keeps
    it while the image's own detail, in no fixed phase, averages out."""
    amps = []
    for profile in (y.mean(axis=0), y.mean(axis=1)):
        n, k = len(profile), round(len(profile) / period)
        amps.append((1 if k == n // 2 else 2) * abs(np.fft.rfft(profile - profile.mean())[k]) / n)
    return max(amps)


@pytest.mark.parametrize("scale", [2, 4, 8])
@pytest.mark.parametrize("kind", ["gradient", "saturated_photo"])
def test_shipped_model_adds_no_periodic_pattern(kind, scale):
    """No grid, seam or blotch: what each shipped model adds to the bicubic image has no component above half a
    grey level at the tile stride, the tile size or the VAE's period (on a smooth colour gradient and on sklearn's
    saturated flower)."""
    from sklearn.datasets import load_sample_image
    if kind == "gradient":
        yy, xx = np.mgrid[0:96, 0:96] / 95.0
        lr = Image.fromarray((np.stack([xx, yy, 1 - xx * yy], -1) * 200 + 25).astype(np.uint8))
    else:
        lr = Image.fromarray(load_sample_image("flower.jpg")[150:246, 200:296])
    lr = lr.resize((384 // scale, 384 // scale), Image.BICUBIC)  # the same 384-px output at every scale
    model = YonosSR.load(sample.SHIPPED[scale])
    added = metrics.rgb_to_y(np.asarray(upscale.upscale(lr, model))) - \
        metrics.rgb_to_y(np.asarray(ev.bicubic_up(lr, scale)))
    f = model.vae.config.factor
    tile, overlap = upscale.tile_settings(model)
    for period in (f, tile * f, (tile - overlap) * f):
        assert periodic_amplitude(added, period) < 0.5, (kind, period)
        # the check can fail: vertical stripes of 2 grey levels at that period, a faint grid, are caught
        stripes = 2.0 * (np.cos(2 * np.pi * np.arange(added.shape[1]) / period)[None, :] > 0)
        assert periodic_amplitude(added + stripes, period) > 0.5, (kind, period)


# -----------------------------------------------------------------------------
# bench.py and study.py: the measuring scripts' code paths, at CPU size


def test_bench_training_reports_each_batch_and_memory_layout_on_a_tiny_config(tmp_path):
    import bench
    out = tmp_path / "train.json"
    res = bench.main(["--train", "--train-config", "tiny", "--train-crop", "32", "--train-batch", "1,2",
                      "--repeats", "1", "--out", str(out)])
    combos = {(r["batch"], r["grad_checkpointing"], r["channels_last"]) for r in res["runs"]}
    assert combos == {(b, g, c) for b in (1, 2) for g in (False, True) for c in (False, True)}
    assert all(r["steps_per_s"] > 0 and r["samples_per_s"] == pytest.approx(r["batch"] * r["steps_per_s"])
               for r in res["runs"])
    assert json.load(open(out)) == json.loads(json.dumps(res))


@pytest.mark.slow
def test_bench_models_times_ours_against_diffusers_at_sd_size():
    import bench
    res = bench.main(["--latent", "8", "--e2e-latent", "8", "--e2e-steps", "1", "--repeats", "1"])
    for part in ("unet_fp32", "decode_fp32"):
        assert res[part]["ours_s"] > 0 and res[part]["diffusers_s"] > 0
    assert res["e2e"]["runs"][1]["total_s"] > 0


def test_study_tables_group_training_seeds_and_plot_guidance(tmp_path):
    import study
    rows = [{"model": "bicubic", "scale": 4, "steps": 0, "psnr": 20.0, "ssim": 0.5, "sharpness": 0.6}]
    for seed, psnr in ((0, 21.0), (1, 23.0)):
        rows.append({"model": f"runs/tiny_s{seed}/x4.pt", "scale": 4, "steps": 1, "psnr": psnr, "ssim": 0.6,
                     "sharpness": 0.7})
    table = study.study_table({"summary": rows})
    assert "| runs/tiny_s*/x4.pt | x4 | 1 | 2 | 22.00 (21.00..23.00) |" in table
    reports = []
    for w, sharp in ((0, 0.7), (2, 0.9)):
        report = {"summary": [{"model": "bicubic", "psnr": 20.0, "sharpness": 0.6}] +
                  [{"model": f"runs/tiny_s{s}/x4_cfg.pt" + (f" w={w}" if w else ""), "psnr": 22.0 - w + s,
                    "sharpness": sharp} for s in (0, 1)]}
        reports.append(tmp_path / f"w{w}.json")
        reports[-1].write_text(json.dumps(report))
    assert study.main([*map(str, reports), "--guidance-plot", str(tmp_path / "g.png")]) == 0
    assert os.path.getsize(tmp_path / "g.png") > 0
    points = study.guidance_plot([json.load(open(r)) for r in reports], str(tmp_path / "g2.png"))
    assert "| 0 | 22.50 | 0.700 |" in points and "| 2 | 20.50 | 0.900 |" in points


def test_course_build_blanks_regions_keeps_line_numbers_and_refuses_bad_markers():
    sys.path.insert(0, os.path.join(HERE, "course"))
    from build import blank_out
    src = "def f(x):\n    # BEGIN SOLUTION ddim\n    y = x + 1\n    return y\n    # END SOLUTION\n\n\ndef g():\n    return 2\n"
    out, tasks = blank_out(src, "m.py", {"ddim"})
    assert tasks == ["ddim"] and len(out.split("\n")) == len(src.split("\n"))
    assert out.split("\n")[2].strip().startswith('raise NotImplementedError("ddim: your code here')
    assert out.split("\n")[7:] == src.split("\n")[7:]  # the rest, byte for byte, at the same line numbers
    assert blank_out(out, "m.py", {"ddim"}) == (out, tasks)  # idempotent
    for bad, words in [(src.replace("    # END SOLUTION\n", ""), "never ended"),
                       (src.replace("    # BEGIN SOLUTION ddim\n", ""), "without a BEGIN"),
                       (src.replace("    y = x + 1\n", "    # BEGIN SOLUTION ddim\n"), "cannot nest"),
                       (src, "not a task")]:
        with pytest.raises(ValueError, match=words) as e:
            blank_out(bad, "m.py", {"ddim"} if words != "not a task" else {"schedule"})
        assert "\n" not in str(e.value)
