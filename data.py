"""
Data for super-resolution: HR image folders, random crops, degradations, and the (LR at s, LR at s/2) pair
that scale distillation feeds to the student and the teacher.

Every LR image is upsampled back to the HR size with bicubic interpolation before it reaches the model
(YONOS-SR, fig. 2), so the VAE latents of LR and HR have the same shape.

Run as a script, it exports the offline photos that ship with scikit-image and scikit-learn into a
train/test split (the tiny recipe's data): python data.py --export-photos photos/

References:
  Noroozi et al., YONOS-SR, arXiv 2401.17258 (fig. 2: the LR/LR' input pipeline)
  Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data", arXiv 2107.10833
"""
import io
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 64_000_000  # larger inputs are refused rather than risking an out-of-memory crash

# -----------------------------------------------------------------------------
# reading and converting images


def list_images(folder: str) -> list[str]:
    """Image files under `folder`, recursively, sorted (DIV2K and plain folders alike)."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    return sorted(out)


def open_image(path: str, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, Image.Image | None]:
    """Reads any common image file as (RGB image, alpha channel or None), EXIF orientation applied.
    Grayscale, palette, CMYK and 16-bit files are converted; a bad file raises ValueError naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"{path}: {im.width}x{im.height} is larger than the limit of {max_pixels:,} pixels")
            im.load()
            im = ImageOps.exif_transpose(im)
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for empty, truncated and non-image files
        raise ValueError(f"{path}: cannot read as an image ({type(e).__name__})") from None
    if im.width < 2 or im.height < 2:
        raise ValueError(f"{path}: {im.width}x{im.height} is too small to super-resolve")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(a / (256.0 if a.max() > 255 else 1.0), 0, 255).astype(np.uint8))
    alpha = None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        alpha = im.getchannel("A")
    return im.convert("RGB"), alpha


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> (C, H, W) float tensor in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    a = a[..., None] if a.ndim == 2 else a
    return a.permute(2, 0, 1) / 127.5 - 1


def to_image(x: torch.Tensor) -> Image.Image:
    """(C, H, W) tensor in [-1, 1] -> PIL image (RGB, or L for one channel), rounded to 8 bits."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)


# -----------------------------------------------------------------------------
# degradations


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of (B, C, H, W); antialiased when shrinking, like PIL's and MATLAB's imresize."""
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def bicubic_lr(x_h: torch.Tensor, scale: float) -> torch.Tensor:
    """HR (B, C, H, W) -> LR (B, C, H/s, W/s), bicubic antialiased: the classic SR degradation."""
    H, W = x_h.shape[-2:]
    return resize(x_h, (round(H / scale), round(W / scale))).clamp(-1, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.device)
    C = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip through Pillow, per image."""
    out = []
    for img in x:
        buf = io.BytesIO()
        to_image(img).save(buf, format="JPEG", quality=quality)
        out.append(to_tensor(Image.open(buf)).to(x))
    return torch.stack(out)


def realesrgan_lr(x_h: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    """A Real-ESRGAN-style second-order degradation (Wang et al. 2021, sec. 3): twice blur -> random resize
    -> Gaussian noise -> JPEG, then a final bicubic resize to H/s. Ranges follow the paper's first order,
    narrowed for the second, in the spirit of its config (the exact numbers are ours)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()
    H, W = x_h.shape[-2:]
    x = x_h
    # (max blur sigma, resize range relative to the HR size for the first order and to the LR size for the
    #  second, max noise level in 8-bit units); JPEG quality in [30, 95] both times
    for blur, (lo, hi), noise, base in [(3.0, (0.15, 1.5), 30, H), (1.5, (0.3, 1.2), 25, H / scale)]:
        x = gaussian_blur(x, u(0.2, blur))
        h = max(4, round(base * u(lo, hi)))
        x = resize(x, (h, max(4, round(h * W / H))))
        x = x + torch.randn(x.shape, generator=g).to(x) * u(1, noise) / 127.5
        x = jpeg(x.clamp(-1, 1), int(u(30, 95)))
    return resize(x, (round(H / scale), round(W / scale))).clamp(-1, 1)


def degrade(x_h: torch.Tensor, scale: float, kind: str = "bicubic", g: torch.Generator | None = None) -> torch.Tensor:
    """HR (B, C, H, W) -> the LR image at 1/scale, bicubic-upsampled back to H x W (the model's input)."""
    if kind == "bicubic":
        lr = bicubic_lr(x_h, scale)
    elif kind == "realesrgan":
        lr = realesrgan_lr(x_h, scale, g if g is not None else torch.Generator().manual_seed(0))
    else:
        raise ValueError(f"unknown degradation {kind!r} (bicubic or realesrgan)")
    return resize(lr, tuple(x_h.shape[-2:])).clamp(-1, 1)


# -----------------------------------------------------------------------------
# datasets


class SRPairs(torch.utils.data.Dataset):
    """Random HR crops of the images in `folder`, each with its degraded inputs for the student (scale s)
    and, for scale distillation, for the teacher (scale s/2), made from the same crop.

    Item k is a pure function of (seed, k): any step of training can be re-made exactly (used by --resume),
    with any number of workers. Files that cannot be read, or are smaller than the crop, are skipped with
    a warning naming them, when the dataset is built, never mid-epoch."""

    def __init__(self, folder: str, crop: int, scale: int, teacher_scale: int | None = None,
                 degradation: str = "bicubic", seed: int = 0):
        self.crop, self.scale, self.teacher_scale, self.degradation, self.seed = crop, scale, teacher_scale, degradation, seed
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such folder")
        self.files = []
        for path in list_images(folder):
            try:
                with Image.open(path) as im:
                    size = im.size
            except Exception:
                warnings.warn(f"skipping {path}: cannot read as an image")
                continue
            if min(size) < crop:
                warnings.warn(f"skipping {path}: {size[0]}x{size[1]} is smaller than the {crop}px crop")
                continue
            self.files.append(path)
        if not self.files:
            raise FileNotFoundError(f"{folder}: no usable images (png/jpg/webp/bmp/tif, at least {crop}px a side)")

    def __len__(self) -> int:
        return 2 ** 62  # indexed by sample number, not by file: see StepSampler in train.py

    def __getitem__(self, k: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        img, _ = open_image(self.files[torch.randint(len(self.files), (), generator=g).item()])
        x = to_tensor(img)
        top = torch.randint(x.shape[1] - self.crop + 1, (), generator=g).item()
        left = torch.randint(x.shape[2] - self.crop + 1, (), generator=g).item()
        x = x[:, top:top + self.crop, left:left + self.crop]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(2)
        x = torch.rot90(x, int(torch.randint(4, (), generator=g)), dims=(1, 2))
        # a random order of the colour channels: small photo sets then still cover every hue
        x = x[torch.randperm(3, generator=g)][None]
        out = {"hr": x[0], "lr": degrade(x, self.scale, self.degradation, g)[0]}
        if self.teacher_scale:
            out["lr_teacher"] = degrade(x, self.teacher_scale, self.degradation, g)[0]
        return out


def center_crops(folder: str, crop: int, limit: int | None = None) -> torch.Tensor:
    """The held-out validation set: one centre crop per image, (N, 3, crop, crop)."""
    crops = []
    for path in list_images(folder)[:limit]:
        try:
            x = to_tensor(open_image(path)[0])
        except ValueError as e:
            warnings.warn(f"skipping {e}")
            continue
        if min(x.shape[1:]) >= crop:
            top, left = (x.shape[1] - crop) // 2, (x.shape[2] - crop) // 2
            crops.append(x[:, top:top + crop, left:left + crop])
    if not crops:
        raise FileNotFoundError(f"{folder}: no images of at least {crop}px a side for validation")
    return torch.stack(crops)


# -----------------------------------------------------------------------------
# the offline photos of the tiny recipe

# (name, source) pairs; the test photos played no part in training
TRAIN_PHOTOS = ["astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
                "camera", "brick", "grass", "gravel", "coins", "moon", "stereo_motorcycle", "page"]
TEST_PHOTOS = ["chelsea", "sklearn:china", "sklearn:flower"]


def export_photos(out: str) -> None:
    """Writes the scikit-image/scikit-learn sample photos as PNGs into out/train and out/test."""
    from skimage import data as skdata
    for split, names in [("train", TRAIN_PHOTOS), ("test", TEST_PHOTOS)]:
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for name in names:
            if name.startswith("sklearn:"):
                from sklearn.datasets import load_sample_image
                a = load_sample_image(name.split(":")[1] + ".jpg")
            else:
                a = getattr(skdata, name)()
            if isinstance(a, tuple):  # stereo_motorcycle: (left, right, disparity); we keep the left view
                a = a[0]
            path = os.path.join(out, split, name.split(":")[-1] + ".png")
            Image.fromarray(np.asarray(a)).save(path + ".tmp", format="PNG")
            os.replace(path + ".tmp", path)
            print(f"{path}  {a.shape[1]}x{a.shape[0]}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--export-photos":
        sys.exit("usage: python data.py --export-photos OUT_DIR   (writes OUT_DIR/train and OUT_DIR/test)")
    export_photos(sys.argv[2])
