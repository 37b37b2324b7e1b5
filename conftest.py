"""Test helpers and fixtures shared by test_yonos.py and test_hostile.py (CPU only, offline, tiny configs)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model import UNET_PRESETS, UNet
from vae import VAE_PRESETS, AutoencoderKL
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
