"""Test helpers and fixtures shared by the test files (CPU only, offline, tiny configs): small photos and
checkpoints, tiny SD repos in diffusers layout, laid out as a Hub cache, random LPIPS weights."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as RefVAE, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig as RefConfig, CLIPTextModel

import metrics
from model import UNET_PRESETS, UNet, UNetConfig
from vae import VAE_PRESETS, AutoencoderKL, VAEConfig
from yonos import YonosSR

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)


def write_photos(folder, n=4, size=64, seed=0):
    """Small random-texture 'photos' (smooth gradients + blobs), enough to train a few steps on."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a = np.stack([np.sin(6 * xx * rng.uniform(1, 3) + c) * np.cos(5 * yy * rng.uniform(1, 3)) for c in range(3)], -1)
        a = ((a + 1) * 127.5 + rng.normal(0, 8, a.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).save(os.path.join(folder, f"img{i}.png"))
    return str(folder)


def photo(w=37, h=53, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(a, "RGBA")
    if mode == "RGBA":
        return img
    return img.convert("LA" if mode == "LA" else "RGB").convert(mode)  # P from RGB, so it has no transparency


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    """A random tiny x4 model: fast, enough to check shapes, modes and error handling."""
    path = str(tmp_path_factory.mktemp("ckpt") / "rand_x4.pt")
    torch.manual_seed(0)
    YonosSR(UNet(UNET_PRESETS["tiny"]), AutoencoderKL(VAE_PRESETS["tiny"]), torch.randn(1, 8, 32), 4).save(path)
    return path


def run_script(args, env=None, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or HERE,
                          env={**os.environ, **(env or {})}, timeout=600)


# the hostile-input tests' helpers (test_hostile.py, test_hostile_runs.py)


def one_line(err: str) -> str:
    """The one line of a refusal (asserting there is exactly one and no traceback)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def temps(folder) -> list[str]:
    """Temporary files an atomic write left behind (there must be none)."""
    return [p for p in os.listdir(folder) if p.endswith(".tmp") or ".tmp" in p]


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    """A random tiny VAE file, for the tiny x2 runs of train.py."""
    path = str(tmp_path_factory.mktemp("vae") / "vae.pt")
    torch.manual_seed(0)
    AutoencoderKL(VAE_PRESETS["tiny"]).save(path)
    return path


def train_args(tmp_path, vae_file, *extra, steps=4):
    """train.py's arguments for a tiny x2 run on tmp_path/photos into tmp_path/x2.pt."""
    return [os.path.join(HERE, "train.py"), "--config", "tiny", "--vae", vae_file, "--data", str(tmp_path / "photos"),
            "--crop", "32", "--batch-size", "2", "--steps", str(steps), "--out", str(tmp_path / "x2.pt"), *extra]


# two tiny U-Nets, one per SD family: conv projection + one head count (SD 1.x),
# linear projection + per-level heads + upcast attention (SD 2.x)
TINY_SD1 = UNetConfig(block_out_channels=(32, 64), attn_levels=(True, False), layers_per_block=2,
                      num_heads=(4, 4), cross_attention_dim=24, norm_num_groups=8)
TINY_SD2 = UNetConfig(block_out_channels=(32, 64, 64), attn_levels=(True, True, False), layers_per_block=1,
                      num_heads=(2, 4, 8), cross_attention_dim=40, norm_num_groups=8,
                      use_linear_projection=True, upcast_attention=True)
TINY_VAE = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)


def tiny_clip_config(act: str) -> dict:
    return dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act=act)


VOCAB = 1000


def write_tokenizer(folder, pad: str):
    """A CLIP tokenizer folder as SD repos hold it (vocab.json, merges.txt, special_tokens_map.json)."""
    os.makedirs(folder, exist_ok=True)
    vocab = {"!": 0, **{f"w{i}</w>": i for i in range(1, VOCAB - 2)}, "<|startoftext|>": VOCAB - 2,
             "<|endoftext|>": VOCAB - 1}
    json.dump(vocab, open(os.path.join(folder, "vocab.json"), "w"))
    open(os.path.join(folder, "merges.txt"), "w").write("#version: 0.2\n")
    json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}, open(os.path.join(folder, "special_tokens_map.json"), "w"))


def make_tiny_sd_repo(root, family: str = "sd2", unet_cfg: UNetConfig | None = None, seed: int = 0,
                      prediction_type: str | None = None):
    """A random tiny SD repo in diffusers layout (unet/ vae/ text_encoder/ tokenizer/, and scheduler/ saying
    `prediction_type` when given), written by diffusers' and transformers' own save_pretrained."""
    torch.manual_seed(seed)
    unet_cfg = unet_cfg or (TINY_SD2 if family == "sd2" else TINY_SD1)
    act, pad = ("gelu", "!") if family == "sd2" else ("quick_gelu", "<|endoftext|>")
    clip = tiny_clip_config(act) | {"hidden_size": unet_cfg.cross_attention_dim}
    UNet2DConditionModel(**unet_cfg.to_diffusers()).save_pretrained(os.path.join(root, "unet"))
    RefVAE(**TINY_VAE.to_diffusers()).save_pretrained(os.path.join(root, "vae"))
    CLIPTextModel(RefConfig(**clip)).save_pretrained(os.path.join(root, "text_encoder"))
    write_tokenizer(os.path.join(root, "tokenizer"), pad)
    if prediction_type:
        from diffusers import DDIMScheduler  # SD's own schedule: scaled linear from 0.00085 to 0.012
        DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, prediction_type=prediction_type).save_pretrained(
            os.path.join(root, "scheduler"))
    return root


def make_hub_cache(cache, repo_id: str, family: str = "sd2", **kw) -> str:
    """Lays a repo out as huggingface_hub's cache does: models--org--name/refs/main -> snapshots/<sha>/."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    base = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    make_tiny_sd_repo(os.path.join(base, "snapshots", sha), family, **kw)
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    open(os.path.join(base, "refs", "main"), "w").write(sha)
    return str(cache)


# SD's schedule written out here rather than by make_alphas_cumprod, so the tests that only use it do not depend on
# the course task that implements it (test_schedule_matches_sd checks make_alphas_cumprod itself)
AC = torch.cumprod(1.0 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, dim=0)


def tiny_sr_unet(seed=0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNET_PRESETS["tiny"])


def write_random_lpips(folder) -> metrics.LPIPS:
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
