"""
Image-quality metrics for super-resolution: PSNR and SSIM on the Y channel (the SR convention), LPIPS, and FID.

PSNR/SSIM work on uint8 RGB arrays, as the numbers papers report are computed on saved 8-bit images. LPIPS and
FID are networks whose weights cannot ship with the code: `LPIPS.load` and `InceptionV3.load` read them from a
file, a folder or a Hub repo id in their published layouts (torchvision's VGG16 + the lpips package's heads;
pytorch-fid's InceptionV3), never downloading unasked. Both are written here in plain PyTorch (no torchvision).

References:
  Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity" (SSIM), IEEE TIP 2004
  Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric" (LPIPS), arXiv 1801.03924
  Simonyan & Zisserman, "Very Deep Convolutional Networks" (VGG16), arXiv 1409.1556
  Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium" (FID),
    arXiv 1706.08500; Szegedy et al., "Rethinking the Inception Architecture" (InceptionV3), arXiv 1512.00567
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from files import fetch_weights, load_tensors_only

# -----------------------------------------------------------------------------
# PSNR and SSIM on the Y channel


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> Y of YCbCr, ITU-R BT.601 studio range [16, 235], float64 (as MATLAB's rgb2ycbcr)."""
    rgb = img.astype(np.float64) / 255.0
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR in dB between two uint8 RGB images on the Y channel, `border` pixels cropped on each side."""
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
    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels inside the border, got {a.shape[1]}x{a.shape[0]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a ** 2
    var_b = _gaussian_filter(b * b) - mu_b ** 2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def gradient_energy(img: np.ndarray) -> float:
    """Mean magnitude of the Y channel's finite-difference gradient: a plain sharpness measure (blur lowers it)."""
    y = rgb_to_y(img)
    return float(np.hypot(np.diff(y, axis=1)[:-1, :], np.diff(y, axis=0)[:, :-1]).mean())


# -----------------------------------------------------------------------------
# LPIPS (VGG16)


def blockiness(img: np.ndarray, scale: int = 1, block: int = 8) -> float:
    """How much a JPEG's block grid shows in an image upscaled `scale` times from that JPEG: the mean |dY| across the
    block edges (the `scale` pixel steps nearest each edge, at every 8 * scale pixels, columns and rows) over the
    mean |dY| of the whole image, minus 1. Phase-locked: a JPEG's blocks start at its corner, so the edges are at
    known places, while an image's own edges fall in no fixed phase and average out: about 0 for an image without a
    grid (the HR photo, a bicubic upscale of a clean LR), positive as blocks show. The window spans one period of an
    upscaler's own sub-pixel pattern, so that pattern cancels. (Our first measure, the amplitude of the grid's
    Fourier component, is never below the content's noise floor: on 384-px crops it scored clean bicubic upscales,
    which have no grid, above JPEG q50 ones; test_sample_eval checks this one rises with compression.)"""
    y = rgb_to_y(img)
    period, offsets = block * scale, np.arange(-((scale - 1) // 2), scale // 2 + 1)
    excess = []
    for d in (np.abs(np.diff(y, axis=1)).mean(axis=0), np.abs(np.diff(y, axis=0)).mean(axis=1)):
        edges = np.arange(period - 1, len(d), period)  # d[e]: the step from pixel e to e + 1, across a block edge
        idx = (edges[:, None] + offsets[None]).ravel()
        idx = idx[idx < len(d)]
        excess.append(d[idx].mean() / max(d.mean(), 1e-9) - 1 if len(idx) else 0.0)
    return float(np.mean(excess))


def vgg16_features() -> nn.ModuleList:
    """torchvision's vgg16().features up to relu5_3, module for module, so its weights load by index
    (`features.0.weight`, ...): 13 3x3 convolutions with ReLUs, max-pooling between the five stages."""
    layers, cin = [], 3
    for stage, (cout, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        if stage:
            layers.append(nn.MaxPool2d(2))
        for _ in range(convs):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
            cin = cout
    return nn.ModuleList(layers)


LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices in vgg16_features() of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 backbone (Zhang et al. 2018, eq. 1): unit-normalised features of five layers,
    squared differences weighted per channel by learned linear heads, averaged over space, summed over layers.

    `LPIPS.load(folder)` reads torchvision's `vgg16-397923af.pth` and the lpips package's `vgg.pth` as published
    (weights only, no code)."""

    WEIGHTS = ("vgg16-397923af.pth", "vgg.pth")

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        # ImageNet statistics in [-1, 1] units (lpips ScalingLayer)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five feature maps LPIPS compares, for images in [-1, 1]."""
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x)
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
        """Reads the VGG16 weights and the linear heads from a folder or a Hub repo holding both."""
        if os.path.isfile(spec):
            raise FileNotFoundError(f"weights not found: {spec} is a file; LPIPS needs the folder (or Hub repo) "
                                    f"holding {' and '.join(cls.WEIGHTS)}")
        vgg, lin = (read_pth(fetch_weights(spec, name)) for name in cls.WEIGHTS)
        state = {k: v for k, v in vgg.items() if k.startswith("features.")}
        state |= {f"lins.{k[3]}.weight": v for k, v in lin.items() if k.endswith("model.1.weight")}
        model = cls()
        load_metric_weights(model, state | {"shift": model.shift, "scale": model.scale}, spec)
        return model.eval().requires_grad_(False)


def read_pth(path: str) -> dict:
    """A published .pth weights file, read without unpickling code."""
    state = load_tensors_only(path, "cpu", "a plain weights file")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a dictionary of weights")
    return state


def load_metric_weights(model: nn.Module, state: dict, spec: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{spec}: weights of another network ({str(e).splitlines()[0][:100]})") from None


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


def pool3(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 average pool: padded zeros do not count (the FID graph differs here from torchvision)."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


ROW7, COL7 = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
ROW3, COL3 = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))


class InceptionA(nn.Module):
    """35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1, concatenated."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv(cin, 48, 1), BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv(64, 96, 3, padding=1), BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(pool3(x))], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17: strided 3x3 | 1x1-3x3-strided 3x3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv(64, 96, 3, padding=1), BasicConv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    """17x17: factorised 7x7 convolutions (1x7 then 7x1), once and twice."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = BasicConv(cin, c7, 1), BasicConv(c7, c7, **ROW7)
        self.branch7x7_3 = BasicConv(c7, 192, **COL7)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv(cin, c7, 1), BasicConv(c7, c7, **COL7)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = BasicConv(c7, c7, **ROW7), BasicConv(c7, c7, **COL7)
        self.branch7x7dbl_5 = BasicConv(c7, 192, **ROW7)
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(d)))
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(pool3(x))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8: 1x1-strided 3x3 | 1x1-1x7-7x1-strided 3x3 | max pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv(cin, 192, 1), BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, **ROW7)
        self.branch7x7x3_3 = BasicConv(192, 192, **COL7)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """8x8: 3x3 convolutions split into parallel 1x3 and 3x1 halves."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the FID graph's last block max-pools (pytorch-fid keeps this quirk)
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv(384, 384, **ROW3), BasicConv(384, 384, **COL3)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv(cin, 448, 1), BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv(384, 384, **ROW3), BasicConv(384, 384, **COL3)
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
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
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 299 -> 147
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))  # 147 -> 71
        x = F.max_pool2d(x, 3, 2)  # 71 -> 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)  # 35 -> 17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)  # 17 -> 8
        x = self.Mixed_7c(self.Mixed_7b(x))
        return x.mean((2, 3))

    @classmethod
    def load(cls, spec: str) -> "InceptionV3":
        """From the weights file, a folder holding it, or a Hub repo id holding it."""
        state = read_pth(fetch_weights(spec, cls.WEIGHTS))
        model = cls()
        load_metric_weights(model, {k: v for k, v in state.items() if not k.startswith("fc.")}, spec)
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
