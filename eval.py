"""
Measures super-resolution checkpoints against the bicubic baseline on a folder of HR images.

  python eval.py assets/yonos_tiny_x4.pt --data photos/test --steps 1,2,4 --seeds 0,1 --out results/x4
  python eval.py runs/vae.pt --data photos/test --out results/vae     # a VAE file: reconstruction vs bicubic

Each HR image is cropped to a multiple of the scale, degraded deterministically (bicubic, antialiased, then
rounded to 8 bits like a real LR file), super-resolved at every requested step count and seed, and compared
with the HR image: PSNR and SSIM on the Y channel of YCbCr (ITU-R BT.601) with a border of `scale` pixels
cropped, the usual SR convention; LPIPS (VGG) when --lpips names its weights and FID (InceptionV3) when --fid
does (a file, a folder or a Hub repo id; each is skipped with a note when not given). Writes <out>.json, <out>.csv and,
if matplotlib is installed, <out>.png (metric vs steps, one line per checkpoint).

References:
  Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity" (SSIM), IEEE TIP 2004
  Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric" (LPIPS), arXiv 1801.03924
  Simonyan & Zisserman, "Very Deep Convolutional Networks" (VGG16), arXiv 1409.1556
  Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium" (FID),
    arXiv 1706.08500; Szegedy et al., "Rethinking the Inception Architecture" (InceptionV3), arXiv 1512.00567
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data import bicubic_lr, list_images, open_image, resize, to_image, to_tensor
from model import read_checkpoint
from vae import AutoencoderKL

# -----------------------------------------------------------------------------
# PSNR and SSIM on the Y channel


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> Y of YCbCr, ITU-R BT.601 studio range [16, 235], float64 (as MATLAB's rgb2ycbcr)."""
    rgb = img.astype(np.float64) / 255.0
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    a, b = rgb_to_y(sr), rgb_to_y(hr)
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian, 11x11 window, 'valid' region only (no padding at the borders)."""
    k = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    x = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, x)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), 0, x)


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """SSIM (Wang et al. 2004, eq. 13) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255."""
    a, b = rgb_to_y(sr), rgb_to_y(hr)
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a ** 2
    var_b = _gaussian_filter(b * b) - mu_b ** 2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


# -----------------------------------------------------------------------------
# perceptual metrics' weights (LPIPS, FID): from a file, a folder or the Hub; never downloaded unasked


def fetch_weights(spec: str, filename: str) -> str:
    """Local path of `filename` given a file, a folder holding it, or a Hub repo id (org/name) holding it
    (through huggingface_hub: its cache and HF_HUB_OFFLINE apply)."""
    if os.path.isfile(spec):
        return spec
    if os.path.isdir(spec) or os.path.exists(spec) or spec.count("/") != 1:
        path = os.path.join(spec, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights not found: {path}")
        return path
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(spec, filename)
    except Exception as e:  # missing repo or file, offline and not cached, ...
        raise FileNotFoundError(f"weights not found: {filename} in {spec} ({type(e).__name__})") from None


# -----------------------------------------------------------------------------
# LPIPS (VGG16), no torchvision


VGG16_CONVS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
               (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]
LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices in VGG16 `features` after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 backbone: unit-normalised features of five layers, squared differences,
    weighted per channel by the learned linear heads, averaged over space, summed over layers.

    Keys follow torchvision's vgg16 (`features.{i}.weight`) and the lpips package (`lin{k}.model.1.weight`),
    so `LPIPS.load(folder)` reads `vgg16-397923af.pth` and `vgg.pth` as published (weights only, no code)."""

    def __init__(self):
        super().__init__()
        self.features = nn.ModuleDict()
        i = 0
        for spec in VGG16_CONVS:
            if spec == "M":
                i += 1
                continue
            self.features[str(i)] = nn.Conv2d(*spec, 3, padding=1)
            i += 2  # conv, relu
        chans = (64, 128, 256, 512, 512)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chans)
        # ImageNet statistics in [-1, 1] units (lpips ScalingLayer)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, out, i = (x - self.shift) / self.scale, [], 0
        for spec in VGG16_CONVS:
            if spec == "M":
                x = F.max_pool2d(x, 2)
                i += 1
                continue
            x = F.relu(self.features[str(i)](x))
            if i + 1 in LPIPS_TAPS:
                out.append(x)
            i += 2
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y in [-1, 1], (B, 3, H, W) -> (B,) distances."""
        d = 0
        for lin, fx, fy in zip(self.lins, self.taps(x), self.taps(y)):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + lin((fx - fy) ** 2).mean((2, 3))
        return d.flatten()

    @classmethod
    def load(cls, spec: str) -> "LPIPS":
        """Reads torchvision's VGG16 weights and the lpips linear heads from a folder or a Hub repo holding both."""
        if os.path.isfile(spec):
            raise FileNotFoundError(f"weights not found: {spec} is a file; LPIPS needs the folder (or Hub repo) "
                                    "holding vgg16-397923af.pth and vgg.pth")
        paths = {name: fetch_weights(spec, name) for name in ("vgg16-397923af.pth", "vgg.pth")}
        vgg = torch.load(paths["vgg16-397923af.pth"], map_location="cpu", weights_only=True)
        lin = torch.load(paths["vgg.pth"], map_location="cpu", weights_only=True)
        state = {k: v for k, v in vgg.items() if k.startswith("features.")}
        state |= {f"lins.{k[3]}.weight": v for k, v in lin.items() if k.endswith("model.1.weight")}
        model = cls()
        model.load_state_dict(state | {"shift": model.shift, "scale": model.scale}, strict=True)
        return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# FID: Frechet distance between Gaussians fitted to InceptionV3 pool features of two image sets


class BasicConv(nn.Module):
    """conv (no bias) -> batch norm -> ReLU; torchvision's names (`conv`, `bn`)."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def chain(block: nn.Module, names: str, x: torch.Tensor) -> torch.Tensor:
    for name in names.split():
        x = getattr(block, name)(x)
    return x


def pool3(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 average pool: padded zeros do not count (the FID graph differs here from torchvision)."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):  # 35x35: 1x1 | 5x5 | two 3x3 | pool
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv(cin, 48, 1), BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv(64, 96, 3, padding=1), BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(self, "branch5x5_1 branch5x5_2", x),
                          chain(self, "branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3", x),
                          self.branch_pool(pool3(x))], 1)


class InceptionB(nn.Module):  # 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv(64, 96, 3, padding=1), BasicConv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), chain(self, "branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3", x),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):  # 17x17: factorised 7x7 convolutions (1x7 then 7x1)
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = BasicConv(cin, c7, 1), BasicConv(c7, c7, **row)
        self.branch7x7_3 = BasicConv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv(cin, c7, 1), BasicConv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = BasicConv(c7, c7, **row), BasicConv(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv(c7, 192, **row)
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), chain(self, "branch7x7_1 branch7x7_2 branch7x7_3", x),
                          chain(self, " ".join(f"branch7x7dbl_{i}" for i in range(1, 6)), x),
                          self.branch_pool(pool3(x))], 1)


class InceptionD(nn.Module):  # 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv(cin, 192, 1), BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([chain(self, "branch3x3_1 branch3x3_2", x),
                          chain(self, "branch7x7x3_1 branch7x7x3_2 branch7x7x3_3 branch7x7x3_4", x),
                          F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):  # 8x8: 3x3 convolutions split into parallel 1x3 and 3x1
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the FID graph's last block max-pools (pytorch-fid keeps this quirk)
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch3x3_2a, self.branch3x3_2b = BasicConv(384, 384, **row), BasicConv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv(cin, 448, 1), BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv(384, 384, **row), BasicConv(384, 384, **col)
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = chain(self, "branch3x3dbl_1 branch3x3dbl_2", x)
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else pool3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The InceptionV3 graph of the original TensorFlow FID code (Heusel et al. 2017, arXiv 1706.08500), with the
    parameter names of pytorch-fid's port, so `InceptionV3.load` reads its published
    `pt_inception-2015-12-05-6726825d.pth` (weights only; the 1008-way classifier is not needed and skipped).
    forward: images in [-1, 1], any size -> (B, 2048) pool features, after a bilinear resize to 299x299."""

    WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = chain(self, "Conv2d_1a_3x3 Conv2d_2a_3x3 Conv2d_2b_3x3", x)
        x = chain(self, "Conv2d_3b_1x1 Conv2d_4a_3x3", F.max_pool2d(x, 3, 2))
        x = F.max_pool2d(x, 3, 2)
        x = chain(self, "Mixed_5b Mixed_5c Mixed_5d Mixed_6a Mixed_6b Mixed_6c Mixed_6d Mixed_6e", x)  # 35 -> 17
        x = chain(self, "Mixed_7a Mixed_7b Mixed_7c", x)  # 17 -> 8
        return x.mean((2, 3))

    @classmethod
    def load(cls, spec: str) -> "InceptionV3":
        """From the weights file, a folder holding it, or a Hub repo id holding it."""
        state = torch.load(fetch_weights(spec, cls.WEIGHTS), map_location="cpu", weights_only=True)
        model = cls()
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
        return model.eval().requires_grad_(False)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets a (N, D) and b (M, D): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
    Tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), a symmetric
    PSD matrix, so no general matrix square root (scipy) is needed. Meaningful with thousands of images;
    with fewer than D the covariances are rank-deficient and the number is mostly noise."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 images in each set")
    a, b = a.astype(np.float64), b.astype(np.float64)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ sb @ root_a).clip(min=0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


# -----------------------------------------------------------------------------
# the evaluation


def prepare(path: str, scale: int, crop: int = 0) -> tuple[np.ndarray, Image.Image]:
    """HR (a centre crop of `crop` pixels if given, cut to a multiple of the scale) as uint8 RGB, and its 8-bit
    bicubic LR image."""
    img, _ = open_image(path)
    if crop:
        left, top = max(0, (img.width - crop) // 2), max(0, (img.height - crop) // 2)
        img = img.crop((left, top, min(img.width, left + crop), min(img.height, top + crop)))
    w, h = img.width - img.width % scale, img.height - img.height % scale
    hr = img.crop((0, 0, w, h))
    lr = to_image(bicubic_lr(to_tensor(hr)[None], scale)[0])
    return np.asarray(hr), lr


def bicubic_up(lr: Image.Image, scale: int) -> np.ndarray:
    """The baseline: the same bicubic upsampling the model gets as its input, rounded to 8 bits."""
    x = resize(to_tensor(lr)[None], (lr.height * scale, lr.width * scale))
    return np.asarray(to_image(x[0]))


def evaluate(ckpts: list[str], data: str, steps: list[int], seeds: list[int], lpips: LPIPS | None = None,
             limit: int | None = None, crop: int = 0, tile: int | None = None, fix_colors: bool = True,
             vae_scale: int = 4, fid: InceptionV3 | None = None, say=print) -> list[dict]:
    """One row per (checkpoint or 'bicubic', steps, seed, image) with psnr, ssim (and lpips). With `fid`, every
    row also holds the FID of its set (same model, steps and seed, all images) against the HR images. A VAE-only
    checkpoint gets its reconstruction scored, next to bicubic at `vae_scale`."""
    from sample import load_model, upscale
    files = list_images(data)[:limit]
    if not files:
        raise FileNotFoundError(f"{data}: no images")
    rows, feats, hr_feats = [], {}, {}

    def inception(img: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return fid(to_tensor(Image.fromarray(img))[None])[0].numpy()

    def score(name, n, seed, path, sr, hr, scale):
        row = {"model": name, "steps": n, "seed": seed, "image": os.path.basename(path), "scale": scale,
               "psnr": psnr_y(sr, hr, scale), "ssim": ssim_y(sr, hr, scale)}
        if lpips is not None:
            with torch.no_grad():
                row["lpips"] = lpips(to_tensor(Image.fromarray(sr))[None], to_tensor(Image.fromarray(hr))[None]).item()
        if fid is not None:
            feats.setdefault((name, scale, n, seed), []).append(inception(sr))
            if (scale, row["image"]) not in hr_feats:
                hr_feats[scale, row["image"]] = inception(hr)
        rows.append(row)

    scales_done = set()
    for ckpt in ckpts:
        if "unet" not in read_checkpoint(ckpt)[1]:  # a VAE file: its reconstruction bounds every SR model on it
            vae = AutoencoderKL.load(ckpt).eval()
            for path in files:
                hr, lr = prepare(path, vae_scale, crop)
                hr = hr[:hr.shape[0] - hr.shape[0] % vae.config.factor, :hr.shape[1] - hr.shape[1] % vae.config.factor]
                if vae_scale not in scales_done:
                    score("bicubic", 0, 0, path, bicubic_up(lr, vae_scale)[:hr.shape[0], :hr.shape[1]], hr, vae_scale)
                with torch.no_grad():
                    rec = vae.decode(vae.encode(to_tensor(Image.fromarray(hr))[None])[0])
                score(os.path.basename(ckpt) + " (reconstruction)", 0, 0, path, np.asarray(to_image(rec[0])), hr,
                      vae_scale)
            scales_done.add(vae_scale)
            continue
        model = load_model(ckpt)
        s = model.scale
        for path in files:
            hr, lr = prepare(path, s, crop)
            if s not in scales_done:
                score("bicubic", 0, 0, path, bicubic_up(lr, s), hr, s)
            for n in steps:
                for seed in seeds:
                    t0 = time.time()
                    sr = np.asarray(upscale(lr, model, steps=n, seed=seed, tile=tile, fix_colors=fix_colors))
                    score(os.path.basename(ckpt) + (" +colour fix" if fix_colors else ""), n, seed, path, sr, hr, s)
                    say(f"{os.path.basename(ckpt)} x{s} steps {n} seed {seed} {os.path.basename(path)}: "
                        f"PSNR {rows[-1]['psnr']:.2f} SSIM {rows[-1]['ssim']:.4f} ({time.time() - t0:.1f}s)")
        scales_done.add(s)
    for (name, scale, n, seed), fake in feats.items():
        real = [v for (sc, _), v in hr_feats.items() if sc == scale]
        value = frechet_distance(np.stack(fake), np.stack(real))
        for r in rows:
            if (r["model"], r["scale"], r["steps"], r["seed"]) == (name, scale, n, seed):
                r["fid"] = value
    return rows


METRICS = ("psnr", "ssim", "lpips", "fid")


def summarize(rows: list[dict]) -> list[dict]:
    """Mean over images, then mean and spread (min..max) over seeds, per (model, scale, steps)."""
    out = []
    keys = sorted({(r["model"], r["scale"], r["steps"]) for r in rows}, key=lambda k: (k[1], k[0] != "bicubic", k))
    for model, scale, n in keys:
        sel = [r for r in rows if (r["model"], r["scale"], r["steps"]) == (model, scale, n)]
        seeds = sorted({r["seed"] for r in sel})
        entry = {"model": model, "scale": scale, "steps": n, "images": len({r["image"] for r in sel}), "seeds": len(seeds)}
        for m in METRICS:
            if m in sel[0]:
                per_seed = [np.mean([r[m] for r in sel if r["seed"] == s]) for s in seeds]
                entry |= {m: float(np.mean(per_seed)), f"{m}_min": float(min(per_seed)), f"{m}_max": float(max(per_seed))}
        out.append(entry)
    return out


def table(summary: list[dict]) -> str:
    metrics = [m for m in METRICS if m in summary[0]]
    lines = ["| model | scale | steps | seeds | " + " | ".join(m.upper() + " (Y)" * (m in ("psnr", "ssim")) for m in metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for e in summary:
        cells = []
        for m in metrics:
            fmt = "{:.2f}" if m in ("psnr", "fid") else "{:.4f}"
            spread = f" ({fmt.format(e[m + '_min'])}..{fmt.format(e[m + '_max'])})" if e["seeds"] > 1 else ""
            cells.append(fmt.format(e[m]) + spread)
        steps = "-" if e["steps"] == 0 else e["steps"]
        lines.append(f"| {e['model']} | x{e['scale']} | {steps} | {e['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_image_table(rows: list[dict], metric: str = "psnr") -> str:
    """metric per image (mean over seeds) for each (model, steps): the numbers behind the averages."""
    images = list(dict.fromkeys(r["image"] for r in rows))
    keys = list(dict.fromkeys((r["model"], r["scale"], r["steps"]) for r in rows))
    lines = ["| model | scale | steps | " + " | ".join(images) + " |", "|---|---|---|" + "---|" * len(images)]
    for model, scale, n in keys:
        cells = []
        for im in images:
            vals = [r[metric] for r in rows if (r["model"], r["scale"], r["steps"], r["image"]) == (model, scale, n, im)]
            cells.append(f"{np.mean(vals):.2f}" if vals else "")
        lines.append(f"| {model} | x{scale} | {'-' if n == 0 else n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], path: str, metric: str = "psnr") -> bool:
    """metric vs steps (log scale), one line per checkpoint, bicubic as a dashed line; False if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for model in dict.fromkeys(e["model"] for e in summary):
        pts = sorted((e["steps"], e[metric], e["scale"]) for e in summary if e["model"] == model)
        if pts[0][0] == 0 and model != "bicubic":  # VAE reconstructions have no steps
            continue
        if model == "bicubic":
            for _, v, s in pts:
                ax.axhline(v, linestyle="--", color="gray", linewidth=1)
                ax.annotate(f"bicubic x{s}", (1, v), fontsize=8, color="gray")
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} (x{pts[0][2]})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("DDIM steps")
    ax.set_ylabel(f"{metric.upper()} (Y channel)" if metric != "lpips" else "LPIPS")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def figure(ckpt: str, image: str, path: str, box: int = 96, steps: int = 1, fix_colors: bool = True) -> None:
    """LR input | bicubic | yonos | HR, side by side, on a centre crop of `image` (`box` LR pixels a side), with
    the Y-PSNR of the crop under bicubic and yonos."""
    from PIL import ImageDraw
    from sample import load_model, upscale
    model = load_model(ckpt)
    s = model.scale
    hr, lr = prepare(image, s)
    box = min(box, lr.width, lr.height)
    left, top = (lr.width - box) // 2, (lr.height - box) // 2
    lr = lr.crop((left, top, left + box, top + box))
    hr = Image.fromarray(hr).crop((left * s, top * s, (left + box) * s, (top + box) * s))
    bic, sr = bicubic_up(lr, s), np.asarray(upscale(lr, model, steps=steps, fix_colors=fix_colors))
    db = lambda x: f"{psnr_y(x, np.asarray(hr), s):.2f} dB"
    panels = [("LR input (nearest)", lr.resize(hr.size, Image.NEAREST)), (f"bicubic, {db(bic)}", Image.fromarray(bic)),
              (f"yonos, {steps} step, {db(sr)}", Image.fromarray(sr)), ("HR", hr)]
    w, h, pad = hr.width, hr.height, 24
    canvas = Image.new("RGB", (4 * w + 3 * 4, h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, img) in enumerate(panels):
        canvas.paste(img.convert("RGB"), (i * (w + 4), pad))
        draw.text((i * (w + 4) + 4, 5), label, fill="black")
    tmp = path + ".tmp.png"
    canvas.save(tmp)
    os.replace(tmp, path)


def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="checkpoints to evaluate (each at its own scale)")
    p.add_argument("--data", default="photos/test", help="folder of HR images (default: photos/test)")
    p.add_argument("--steps", default="1", help="comma-separated DDIM step counts (default: 1)")
    p.add_argument("--seeds", default="0", help="comma-separated noise seeds (default: 0)")
    p.add_argument("--lpips", default="", help="folder or Hub repo id with vgg16-397923af.pth and vgg.pth (LPIPS); "
                                               "default: skip")
    p.add_argument("--fid", default="", help=f"{InceptionV3.WEIGHTS} (pytorch-fid's InceptionV3), or a folder or Hub "
                                             "repo id holding it; default: skip. Needs many images to mean much")
    p.add_argument("--limit", type=int, default=None, help="use the first N images only")
    p.add_argument("--vae-scale", type=int, default=4, help="for VAE files: the bicubic scale to compare with")
    p.add_argument("--color-fix", action=argparse.BooleanOptionalAction, default=True,
                   help="as sample.py: with its colour fix (default), or the model's raw output (--no-color-fix)")
    p.add_argument("--tile", type=int, default=None, help="latent tile size as in sample.py (default: the model's "
                                                          "training crop; 0: never tile)")
    p.add_argument("--crop", type=int, default=0, help="evaluate on a centre crop of N HR pixels (default: whole)")
    p.add_argument("--figure", default="", help="instead of the table: write LR | bicubic | yonos | HR for the first "
                                                "image of --data to this PNG (first checkpoint)")
    p.add_argument("--out", default="results/eval", help="writes OUT.json, OUT.csv, OUT.png (default: results/eval)")
    args = p.parse_args(argv)
    err = lambda msg: print(f"eval.py: error: {msg}", file=sys.stderr)
    try:
        steps = [int(s) for s in args.steps.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        err("--steps and --seeds take comma-separated whole numbers, e.g. 1,2,4")
        return 2
    if args.figure:
        files = list_images(args.data)
        if not files:
            err(f"{args.data}: no images")
            return 2
        figure(args.ckpts[0], files[0], args.figure, steps=steps[0], fix_colors=args.color_fix)
        print(f"wrote {args.figure}")
        return 0
    lpips = fid = None
    try:
        lpips = LPIPS.load(args.lpips) if args.lpips else None
        fid = InceptionV3.load(args.fid) if args.fid else None
    except (FileNotFoundError, RuntimeError) as e:  # RuntimeError: a file of the wrong network
        err(str(e).splitlines()[0])
        return 2
    if lpips is None:
        print("note: LPIPS skipped (pass --lpips DIR with vgg16-397923af.pth and vgg.pth to include it)")
    if fid is None:
        print(f"note: FID skipped (pass --fid with {InceptionV3.WEIGHTS} to include it)")
    try:
        rows = evaluate(args.ckpts, args.data, steps, seeds, lpips, args.limit, args.crop, args.tile,
                        args.color_fix, args.vae_scale, fid)
    except (FileNotFoundError, ValueError) as e:
        err(str(e).splitlines()[0])
        return 2
    summary = summarize(rows)
    print(table(summary))
    print("\nPSNR (Y) per image, mean over seeds:\n" + per_image_table(rows))
    write_atomic(args.out + ".json", json.dumps({"rows": rows, "summary": summary}, indent=1))
    cols = list(rows[0].keys())
    write_atomic(args.out + ".csv", "\n".join([",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]) + "\n")
    made = plot(summary, args.out + ".png")
    print(f"wrote {args.out}.json, {args.out}.csv" + (f", {args.out}.png" if made else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
