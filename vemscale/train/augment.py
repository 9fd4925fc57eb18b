"""Every augmentation of the engine, in torch on batched tensors, so it runs on the worker's device.

One module for fine-tuning and pre-training (RETINA reconstruction, MoCo views):
- geometry: flips, quarter turns, rotation by any angle, random resized crop, as one affine map per sample
  (`affine_params`). Maps that only flip and turn by quarters are applied as exact pixel moves
  (`move_pixels`); any other map is resampled in one `grid_sample` call (bilinear for images, nearest for
  labels). Fine-tuning moves image and labels alike (`geometric_pair`); pre-training moves input and target
  alike (`geometric`).
- intensity: brightness/contrast (`brightness_contrast`, the one implementation both use), Gaussian blur,
  Gaussian noise, coarse dropout (`degrade`: the network's input only).
Random numbers are drawn on the generator's device and moved to the data's, so a CPU generator drives GPU
batches. Images enter as floats; pre-training's in [0, 1] (B, C, H, W), `Normalize` maps them to the
network's input scale.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from vemscale.config import Strict

Range = tuple[float, float]
BCMode = Literal["mean", "albumentations", "torchvision"]


class RetinaAugmentConfig(Strict):
    """Pre-training augmentations (RETINA / MoCo recipes); probabilities are per sample."""

    # geometric: input and target alike
    flips: bool = True  # random horizontal and vertical flips
    rot90: bool = True  # random multiples of 90 degrees
    rotate_degrees: float = Field(0.0, ge=0, le=180)  # plus a uniform angle in +-value (reflection at borders)
    p_rotate: float = Field(1.0, ge=0, le=1)  # how often that angle is drawn (albumentations Rotate: p)
    padding: Literal["reflection", "zeros"] = "reflection"  # outside the image: mirrored, or 0 (torchvision fill)
    p_resized_crop: float = Field(1.0, ge=0, le=1)
    crop_scale: Range = (0.08, 1.0)  # area fraction of the patch
    crop_ratio: Range = (0.5, 1.5)  # aspect ratio w/h (log-uniform)
    # degradations: input only (values on the [0, 1] intensity scale)
    p_brightness_contrast: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.3, ge=0)  # additive shift uniform in +-value
    contrast: float = Field(0.3, ge=0, lt=1)  # factor uniform in 1 +- value, around the image mean
    # brightness/contrast semantics: "mean" scales around the image mean; "albumentations" is
    # RandomBrightnessContrast with brightness_by_max: alpha * x + beta (contrast around 0); "torchvision" is
    # ColorJitter: x * b and a blend with the image mean by c, in random order, b, c uniform in 1 +- value
    brightness_contrast: BCMode = "mean"
    p_noise: float = Field(0.5, ge=0, le=1)
    noise_std: Range = (0.01, 0.05)  # sigma drawn uniformly in this range, unless noise_var is set
    noise_var: Range | None = None  # variance drawn uniformly (albumentations GaussNoise var_limit / 255^2)
    noise_log_var: bool = False  # with noise_var: log-uniform variance (CEM500K's GaussNoise)
    p_blur: float = Field(0.5, ge=0, le=1)
    blur_sigma: Range = (0.1, 2.0)  # pixels, unless blur_kernel is set
    # albumentations GaussianBlur with sigma_limit 0: a kernel size drawn in this range (even sizes rounded
    # up), OpenCV's kernel of that size (fixed tables up to 7, else sigma 0.3 ((k - 1) / 2 - 1) + 0.8)
    blur_kernel: tuple[int, int] | None = None
    # the order of the degradations (each clipped to [0, 1], as on 8-bit images)
    order: tuple[str, ...] = ("brightness_contrast", "blur", "noise", "dropout")
    p_dropout: float = Field(0.5, ge=0, le=1)
    dropout_holes: tuple[int, int] = (1, 32)  # number of holes, uniform in [lo, hi]
    dropout_size: int = Field(16, gt=0)  # square holes of this side
    dropout_fill: float = 0.0

    @model_validator(mode="after")
    def _ranges(self) -> "RetinaAugmentConfig":
        for name in ("crop_scale", "crop_ratio", "noise_std", "blur_sigma", "dropout_holes"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be [lo, hi] with 0 <= lo <= hi, got {[lo, hi]}")
        if not (0 < self.crop_scale[0] and self.crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must lie in (0, 1], got {list(self.crop_scale)}")
        if self.crop_ratio[0] <= 0:
            raise ValueError("crop_ratio must be positive")
        if self.blur_sigma[1] > 10:
            raise ValueError("blur_sigma above 10 pixels is not supported")
        if self.noise_var is not None and not 0 <= self.noise_var[0] <= self.noise_var[1]:
            raise ValueError(f"noise_var must be [lo, hi] with 0 <= lo <= hi, got {list(self.noise_var)}")
        if self.noise_log_var and (self.noise_var is None or self.noise_var[0] <= 0):
            raise ValueError("noise_log_var needs noise_var with a positive lower bound")
        if self.blur_kernel is not None:
            lo, hi = self.blur_kernel
            if not (3 <= lo <= hi <= 31 and lo % 2 and hi % 2):
                raise ValueError(f"blur_kernel must be odd sizes 3 <= lo <= hi <= 31, got {list(self.blur_kernel)}")
        steps = {"brightness_contrast", "blur", "noise", "dropout"}
        if sorted(self.order) != sorted(steps):
            raise ValueError(f"order must list each of {sorted(steps)} once, got {list(self.order)}")
        return self


class AugmentConfig(Strict):
    """Fine-tuning augmentations: flips, rot90 (square crops), rotation, resized crop, brightness/contrast."""

    flips: bool = True
    rot90: bool = True
    rotate_degrees: float = Field(0.0, ge=0, le=180)  # a uniform angle in +-value (reflection at borders)
    p_rotate: float = Field(1.0, ge=0, le=1)
    p_resized_crop: float = Field(0.0, ge=0, le=1)  # RandomResizedCrop inside the sampled crop
    crop_scale: Range = (0.08, 1.0)
    crop_ratio: Range = (0.5, 1.5)
    # "mean": brightness in units of the normalised image's std, contrast around the image mean, unclipped;
    # "albumentations": RandomBrightnessContrast on the [0, 1] image (alpha x + beta), clipped to [0, 1]
    brightness_contrast: Literal["mean", "albumentations"] = "mean"
    p_brightness_contrast: float = Field(1.0, ge=0, le=1)
    brightness: float = 0.1  # additive shift uniform in +-value
    contrast: float = 0.1  # multiplicative factor uniform in 1 +- value
    p_foreground_crop: float = Field(0.0, ge=0, le=1)  # crops around a labelled pixel (CropNonEmptyMaskIfExists)


def _rand(shape: tuple[int, ...], gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device).to(device)


def _uniform(b: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * _rand((b,), gen, device)


def _coin(b: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return _rand((b,), gen, device) < p


def _randint(lo: int, hi: int, shape: tuple[int, ...], gen: torch.Generator, device) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=gen, device=gen.device).to(device)


# ---------- geometry ----------

def affine_params(b: int, cfg: RetinaAugmentConfig, gen: torch.Generator, device) -> torch.Tensor:
    """Per-sample (B, 2, 3) maps from output to input coordinates in [-1, 1]: crop, rotation, flips."""
    one = torch.ones(b, device=device)
    sx, sy, cx, cy = one.clone(), one.clone(), 0 * one, 0 * one
    quarter = torch.zeros(b, device=device)
    if cfg.rot90:
        quarter = _randint(0, 4, (b,), gen, device).float()
    if cfg.p_resized_crop > 0:
        area = _uniform(b, *cfg.crop_scale, gen, device)
        logr = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), gen, device)
        w = torch.sqrt(area * logr.exp()).clamp(max=1.0)
        h = torch.sqrt(area / logr.exp()).clamp(max=1.0)
        use = _coin(b, cfg.p_resized_crop, gen, device)
        sx, sy = torch.where(use, w, one), torch.where(use, h, one)
        # the crop's extent in the input: a quarter turn swaps its width and height, so the centre's range must
        # follow, or a non-square crop leaves the image and reflected pixels enter input and target alike
        odd = quarter % 2 == 1
        ex, ey = torch.where(odd, sy, sx), torch.where(odd, sx, sy)
        cx = (_rand((b,), gen, device) * 2 - 1) * (1 - ex)
        cy = (_rand((b,), gen, device) * 2 - 1) * (1 - ey)
    angle = quarter * (math.pi / 2)
    if cfg.rotate_degrees > 0:
        extra = _uniform(b, -cfg.rotate_degrees, cfg.rotate_degrees, gen, device) * (math.pi / 180)
        if cfg.p_rotate < 1:  # (no coin at p 1: a seed gives the same crops as before p_rotate existed)
            extra = torch.where(_coin(b, cfg.p_rotate, gen, device), extra, torch.zeros_like(extra))
        angle = angle + extra
    if cfg.flips:
        sx = sx * torch.where(_coin(b, 0.5, gen, device), -1.0, 1.0)
        sy = sy * torch.where(_coin(b, 0.5, gen, device), -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # round so that right angles give exact 0/1 entries (exact pixel permutations when there is no crop)
    cos, sin = torch.where(cos.abs() < 1e-6, 0.0, cos), torch.where(sin.abs() < 1e-6, 0.0, sin)
    row0 = torch.stack([cos * sx, -sin * sy, cx], dim=1)
    row1 = torch.stack([sin * sx, cos * sy, cy], dim=1)
    return torch.stack([row0, row1], dim=1)


def is_pixel_move(theta: torch.Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Whether every map only flips and turns by quarters (entries 0/+-1, no shift, same size; quarter turns
    need a square image): then `move_pixels` applies it exactly."""
    lin = theta[:, :, :2]
    square_or_unturned = in_hw[0] == in_hw[1] or bool((lin[:, 0, 1] == 0).all() and (lin[:, 1, 0] == 0).all())
    return (tuple(in_hw) == tuple(out_hw) and square_or_unturned and bool((theta[:, :, 2] == 0).all())
            and bool(((lin == 0) | (lin.abs() == 1)).all()))


def move_pixels(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply flip/quarter-turn maps (`is_pixel_move`) to x (B, ..., H, W) as an exact gather of pixels: what
    `grid_sample` computes at pixel centres, without its rounding."""
    h, w = x.shape[-2:]
    lin = theta[:, :, :2].to(torch.float64).cpu()
    xs = (2 * torch.arange(w, dtype=torch.float64) + 1) / w - 1
    ys = (2 * torch.arange(h, dtype=torch.float64) + 1) / h - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    xin = lin[:, 0, 0].view(-1, 1, 1) * xx + lin[:, 0, 1].view(-1, 1, 1) * yy
    yin = lin[:, 1, 0].view(-1, 1, 1) * xx + lin[:, 1, 1].view(-1, 1, 1) * yy
    col = torch.round(((xin + 1) * w - 1) / 2).long()
    row = torch.round(((yin + 1) * h - 1) / 2).long()
    index = (row * w + col).view(x.shape[0], 1, h * w).to(x.device)
    flat = x.reshape(x.shape[0], -1, h * w)
    return flat.gather(2, index.expand(-1, flat.shape[1], -1)).view(x.shape)


def _resample(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int], mode: str, padding: str) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)


def geometric(x: torch.Tensor, cfg: RetinaAugmentConfig, gen: torch.Generator, out_size: int | None = None) -> torch.Tensor:
    """Random resized crop + rotation + flips of x (B, C, H, W), resampled to out_size (default H)."""
    b, c, h, w = x.shape
    size = (out_size or h, out_size or h)
    theta = affine_params(b, cfg, gen, x.device)
    if is_pixel_move(theta, (h, w), size):
        return move_pixels(x, theta)
    return _resample(x, theta, size, "bilinear", cfg.padding)


def geometric_pair(img: torch.Tensor, lab: torch.Tensor, cfg: AugmentConfig,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flips, quarter turns (square crops only), rotation and resized crop of img (B,C,H,W)
    and its labels lab (B,H,W): bilinear for the image, nearest for the labels, reflection at the borders."""
    b, c, h, w = img.shape
    geo = RetinaAugmentConfig(flips=cfg.flips, rot90=cfg.rot90 and h == w, rotate_degrees=cfg.rotate_degrees,
                              p_rotate=cfg.p_rotate, p_resized_crop=cfg.p_resized_crop, crop_scale=cfg.crop_scale,
                              crop_ratio=cfg.crop_ratio)
    theta = affine_params(b, geo, gen, img.device)
    if is_pixel_move(theta, (h, w), (h, w)):
        return move_pixels(img, theta), move_pixels(lab, theta).long()
    img = _resample(img, theta, (h, w), "bilinear", "reflection")
    lab = _resample(lab.unsqueeze(1).to(img.dtype), theta, (h, w), "nearest", "reflection")
    return img, lab.squeeze(1).round().long()


# ---------- intensity ----------

def brightness_contrast(x: torch.Tensor, mode: BCMode, p: float, brightness: float, contrast: float,
                        gen: torch.Generator, clip: bool = True) -> torch.Tensor:
    """Per-sample brightness/contrast of x (B, C, H, W) with probability p; `clip` keeps [0, 1].

    "mean": (x - mean) * alpha + mean + beta; "albumentations": alpha * x + beta; "torchvision": ColorJitter's
    brightness factor and contrast blend in random order; alpha in 1 +- contrast, beta in +-brightness."""
    b, dev = x.shape[0], x.device
    use = _coin(b, p, gen, dev).view(-1, 1, 1, 1)
    alpha = _uniform(b, 1 - contrast, 1 + contrast, gen, dev).view(-1, 1, 1, 1).to(x.dtype)
    beta = _uniform(b, -brightness, brightness, gen, dev).view(-1, 1, 1, 1).to(x.dtype)
    if mode == "albumentations":
        y = x * alpha + beta
    elif mode == "torchvision":
        bright = _uniform(b, 1 - brightness, 1 + brightness, gen, dev).view(-1, 1, 1, 1).to(x.dtype)
        first = _coin(b, 0.5, gen, dev).view(-1, 1, 1, 1)  # ColorJitter's random order

        def blend(z: torch.Tensor) -> torch.Tensor:
            return ((z - z.mean(dim=(1, 2, 3), keepdim=True)) * alpha + z.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)

        y = torch.where(first, blend((x * bright).clamp(0, 1)), (blend(x) * bright).clamp(0, 1))
    else:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        y = (x - mean) * alpha + mean + beta
    out = torch.where(use, y, x)
    return out.clamp(0, 1) if clip else out


def intensity(img: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Fine-tuning's brightness/contrast: of a normalised batch, unclipped ("mean"), or of a [0, 1] batch
    clipped to [0, 1] ("albumentations")."""
    return brightness_contrast(img, cfg.brightness_contrast, cfg.p_brightness_contrast, cfg.brightness, cfg.contrast,
                               gen, clip=cfg.brightness_contrast == "albumentations")


# ---------- degradations (pre-training input) ----------

# OpenCV's fixed kernels for sigma <= 0 and ksize <= 7 (getGaussianKernel's small_gaussian_tab)
OPENCV_SMALL_KERNELS = {3: (0.25, 0.5, 0.25), 5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
                        7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125)}


def opencv_kernel(k: int) -> torch.Tensor:
    """cv2.getGaussianKernel(k, 0): a fixed table for k <= 7, else sigma = 0.3 ((k - 1) / 2 - 1) + 0.8."""
    if k in OPENCV_SMALL_KERNELS:
        return torch.tensor(OPENCV_SMALL_KERNELS[k], dtype=torch.float64)
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _separable_blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-sample separable blur of x (B, C, H, W) with 1D kernels k (B, 2r+1), reflection at the borders."""
    b, c, h, w = x.shape
    radius = (k.shape[1] - 1) // 2
    k = k.to(x.dtype).repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    pad = min(radius, h - 1, w - 1)
    if pad < radius:  # tiny images: pad what reflection allows, then replicate
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
        y = F.pad(y, (radius - pad,) * 4, mode="replicate")
    else:
        y = F.pad(y, (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (sigma <= 0: unchanged), cut at 3 sigma."""
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp(min=1e-3).to(x.dtype).view(-1, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    delta = (t == 0).to(x.dtype).expand_as(k)
    return _separable_blur(x, torch.where((sigma > 0).view(-1, 1), k, delta))


def _kernel_blur(x: torch.Tensor, ksize: torch.Tensor) -> torch.Tensor:
    """albumentations GaussianBlur with sigma 0: per sample, OpenCV's kernel of size ksize (0: unchanged)."""
    radius = max(1, int(ksize.max()) // 2)
    rows = []
    for k in ksize.tolist():
        row = torch.zeros(2 * radius + 1, dtype=torch.float64)
        if k:
            row[radius - k // 2: radius + k // 2 + 1] = opencv_kernel(int(k))
        else:
            row[radius] = 1.0
        rows.append(row)
    return _separable_blur(x, torch.stack(rows).to(x.device))


def coarse_dropout(x: torch.Tensor, cfg: RetinaAugmentConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill 1..32 (cfg) square holes per selected sample with cfg.dropout_fill; returns (x, holes per sample)."""
    b, c, h, w = x.shape
    lo, hi = cfg.dropout_holes
    n = _randint(lo, hi + 1, (b,), gen, x.device)
    n = torch.where(_coin(b, cfg.p_dropout, gen, x.device), n, torch.zeros_like(n))
    if hi == 0 or not bool((n > 0).any()):
        return x, n
    s = min(cfg.dropout_size, h, w)
    y0 = _randint(0, h - s + 1, (b, hi), gen, x.device)
    x0 = _randint(0, w - s + 1, (b, hi), gen, x.device)
    active = torch.arange(hi, device=x.device).view(1, -1) < n.view(-1, 1)  # (B, K)
    ys = torch.arange(h, device=x.device).view(1, 1, -1)
    xs = torch.arange(w, device=x.device).view(1, 1, -1)
    rows = ((ys >= y0.unsqueeze(-1)) & (ys < (y0 + s).unsqueeze(-1)) & active.unsqueeze(-1)).to(x.dtype)
    cols = ((xs >= x0.unsqueeze(-1)) & (xs < (x0 + s).unsqueeze(-1))).to(x.dtype)
    mask = torch.einsum("bkh,bkw->bhw", rows, cols) > 0
    return torch.where(mask.unsqueeze(1), torch.full_like(x, cfg.dropout_fill), x), n


def noise_std(b: int, cfg: RetinaAugmentConfig, gen: torch.Generator, device) -> torch.Tensor:
    """Per-sample noise sigma on the [0, 1] scale (0 where no noise is drawn)."""
    if cfg.noise_var is not None and cfg.noise_log_var:
        lo, hi = cfg.noise_var
        std = _uniform(b, math.log(lo), math.log(hi), gen, device).exp().sqrt()
    elif cfg.noise_var is not None:
        std = _uniform(b, *cfg.noise_var, gen, device).sqrt()
    else:
        std = _uniform(b, *cfg.noise_std, gen, device)
    return torch.where(_coin(b, cfg.p_noise, gen, device), std, torch.zeros_like(std))


def blur_sigma(b: int, cfg: RetinaAugmentConfig, gen: torch.Generator, device) -> torch.Tensor:
    """Per-sample blur sigma (0 where no blur is drawn)."""
    sigma = _uniform(b, *cfg.blur_sigma, gen, device)
    return torch.where(_coin(b, cfg.p_blur, gen, device), sigma, torch.zeros_like(sigma))


def blur_ksize(b: int, cfg: RetinaAugmentConfig, gen: torch.Generator, device) -> torch.Tensor:
    """Per-sample kernel size as albumentations GaussianBlur draws it (0 where no blur is drawn): uniform in
    [lo, hi], an even size rounded up, so (3, 7) gives 3, 5, 7 with p 0.2, 0.4, 0.4."""
    lo, hi = cfg.blur_kernel  # type: ignore[misc]
    k = _randint(lo, hi + 1, (b,), gen, device)
    k = k + (k % 2 == 0).long()
    return torch.where(_coin(b, cfg.p_blur, gen, device), k, torch.zeros_like(k))


def degrade(x: torch.Tensor, cfg: RetinaAugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Brightness/contrast, blur, noise and coarse dropout of x (B, C, H, W) in [0, 1], in `cfg.order`, each
    clipped to [0, 1] (as the references' 8-bit images are)."""
    b, dev = x.shape[0], x.device
    for step in cfg.order:
        if step == "brightness_contrast" and cfg.p_brightness_contrast > 0:
            x = brightness_contrast(x, cfg.brightness_contrast, cfg.p_brightness_contrast, cfg.brightness,
                                    cfg.contrast, gen)
        elif step == "blur" and cfg.p_blur > 0 and cfg.blur_kernel is not None:
            ksize = blur_ksize(b, cfg, gen, dev)
            if bool((ksize > 0).any()):
                x = _kernel_blur(x, ksize).clamp(0, 1)
        elif step == "blur" and cfg.p_blur > 0:
            sigma = blur_sigma(b, cfg, gen, dev)
            if bool((sigma > 0).any()):
                x = _gaussian_blur(x, sigma).clamp(0, 1)
        elif step == "noise" and cfg.p_noise > 0:
            std = noise_std(b, cfg, gen, dev)
            x = (x + torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(dev) * std.view(-1, 1, 1, 1)).clamp(0, 1)
        elif step == "dropout" and cfg.p_dropout > 0:
            x, _ = coarse_dropout(x, cfg, gen)
    return x


class Normalize:
    """(x - mean) / std per channel for images in [0, 1], and its inverse (for previews)."""

    def __init__(self, mean: list[float], std: list[float], device) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


def retina_pair(x: torch.Tensor, cfg: RetinaAugmentConfig, gen: torch.Generator, norm: Normalize) -> tuple[torch.Tensor, torch.Tensor]:
    """RETINA's (input, target): target = normalize(geometric(x)); input = normalize(degrade(that image))."""
    clean = geometric(x, cfg, gen)
    return norm(degrade(clean, cfg, gen)), norm(clean)


def two_views(x: torch.Tensor, cfg: RetinaAugmentConfig, gen: torch.Generator, norm: Normalize) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's two independently augmented views of each image (geometric then degradations)."""
    return tuple(norm(degrade(geometric(x, cfg, gen), cfg, gen)) for _ in range(2))  # type: ignore[return-value]
