"""Tensor presets: batched uint8 faces -> normalised model input, on the model's device.

The second of the two image stages, shared by training, labelling and evaluation so that every
path sees the same pixels (the first, `decode`, turns files into small uint8 faces on CPU tasks):
`EvalPreset` / `TrainPreset` (batched torch, CPU or GPU) take uint8 (B, S, S) to float
(B, 3, N, N) at `image_size`, ImageNet-normalised, with augmentation for training. Resizing and
augmenting happen in one `grid_sample`, so a GPU receives 48x48 bytes, never 224x224 floats.
Test-time views (`tta_views`) are cut from the uint8 faces before the preset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ray_fer.config import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Tensor presets


@dataclass(frozen=True, kw_only=True)
class EvalPreset:
    """uint8 (B, S, S) -> normalised float (B, 3, image_size, image_size); deterministic."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels_last: bool = True

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = _to_float(pixels)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False, antialias=x.shape[-1] > self.image_size,
            )
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Gray floats in 0..255 (B, 1, N, N) -> ImageNet-normalised (B, 3, N, N) in the model's
        memory layout, written in one pass (a third of the time of subtract, divide, re-layout)."""
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((x.shape[0], 3, *x.shape[-2:]), device=x.device, dtype=x.dtype, memory_format=layout)
        # (x / 255 - mean) / std; the gray channel broadcasts to three
        return torch.addcmul(-mean / std, x, 1.0 / (255.0 * std), out=out)


@dataclass(frozen=True, kw_only=True)
class TrainPreset(EvalPreset):
    """EvalPreset plus batched random augmentation: flip, rotation, scale, shift, erasing.

    One random affine matrix per image (flip folded in) drives a single `grid_sample` that also
    resizes to image_size, so augmentation costs one pass over the output pixels on CPU or GPU.
    """

    hflip: float = 0.5  # probability of a horizontal flip
    rotation: float = 10.0  # max rotation in degrees, either way
    scale: float = 0.0  # max relative zoom, either way
    translate: float = 0.0  # max shift as a fraction of the side, either way
    erasing: float = 0.0  # probability of erasing one random rectangle (random erasing)
    # probability of a low-resolution copy: the face downscaled to LOW_RES_SIDES (one side per
    # batch) and back, as a small face in a photo or a soft focus gives it
    low_res: float = 0.0
    # strength of random gamma (exp(+-s)), contrast (1 +- s) and brightness (+-s/4 of the range)
    # per image, as exposure and lighting vary between photos; 0: off
    photometric: float = 0.0

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _to_float(pixels)
        b = x.shape[0]
        dev = x.device

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.rand(b, generator=generator, device=dev) * (high - low) + low

        angle = uniform(-self.rotation, self.rotation) * (math.pi / 180.0)
        zoom = uniform(1.0 - self.scale, 1.0 + self.scale)
        flip = torch.where(torch.rand(b, generator=generator, device=dev) < self.hflip, -1.0, 1.0)
        tx = uniform(-self.translate, self.translate) * 2.0  # grid coordinates span [-1, 1]
        ty = uniform(-self.translate, self.translate) * 2.0
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, tx], dim=1), torch.stack([sin * flip, cos, ty], dim=1)], dim=1
        )
        grid = F.affine_grid(theta, [b, 1, self.image_size, self.image_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.low_res > 0:
            x = _low_resolution(x, self.low_res, generator)
        if self.photometric > 0:
            x = _photometric(x, self.photometric, generator)
        out = self._normalise(x)
        if self.erasing > 0:
            out = _random_erase(out, self.erasing, generator)
        return out


def _to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S) -> float (B, 1, S, S) in 0..255; `_normalise` scales it (resizing is linear)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(1)
    return pixels.float()


LOW_RES_SIDES = (12, 28)  # side range of the low-resolution copies, in pixels (FER2013 faces are 48)


def _low_resolution(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """A random subset of the images (probability p) downscaled to one random side and back up."""
    b, _, h, w = x.shape
    chosen = torch.rand(b, generator=generator, device=x.device) < p
    if not bool(chosen.any()):
        return x
    low, high = LOW_RES_SIDES
    side = int(low + torch.randint(0, high - low + 1, (1,), generator=generator, device=x.device).item())
    if side >= min(h, w):
        return x
    small = F.interpolate(x[chosen], size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    x = x.clone()
    x[chosen] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return x


def _photometric(x: torch.Tensor, s: float, generator: torch.Generator | None) -> torch.Tensor:
    """Per image: gamma exp(+-s), contrast 1 +- s about the image's mean, brightness +-s/4 of the
    range; values stay in 0..255."""
    b = x.shape[0]
    rand = lambda: torch.rand(b, 1, 1, 1, generator=generator, device=x.device) * 2 - 1  # noqa: E731
    gamma, contrast, shift = torch.exp(rand() * s), 1 + rand() * s, rand() * (s / 4) * 255
    y = 255.0 * (x.clamp(0, 255) / 255.0) ** gamma
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    return ((y - mean) * contrast + mean + shift).clamp(0, 255)


def _random_erase(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Zero one rectangle (2%..25% of the area, aspect 0.3..3.3) in a random subset of images."""
    b, _, h, w = x.shape
    dev = x.device
    rand = lambda: torch.rand(b, generator=generator, device=dev)  # noqa: E731
    area = (0.02 + rand() * 0.23) * h * w
    aspect = torch.exp(math.log(0.3) + rand() * (math.log(3.3) - math.log(0.3)))
    eh = torch.sqrt(area * aspect).clamp(1, h)
    ew = torch.sqrt(area / aspect).clamp(1, w)
    top = rand() * (h - eh)
    left = rand() * (w - ew)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    inside = (
        (ys >= top.view(b, 1, 1)) & (ys < (top + eh).view(b, 1, 1))
        & (xs >= left.view(b, 1, 1)) & (xs < (left + ew).view(b, 1, 1))
    )
    chosen = (rand() < p).view(b, 1, 1)
    mask = (inside & chosen).unsqueeze(1)
    return x.masked_fill(mask, 0.0)


def train_preset(name: str, *, image_size: int, channels_last: bool = True) -> EvalPreset:
    """The named training presets: "standard" (flip, rotation, zoom, shift, erasing), "photo"
    (standard with more zoom and shift, as a detector's boxes vary, plus low-resolution copies and
    random gamma, contrast and brightness, as real photos differ from FER2013's faces),
    "flip_rotate" (flip and rotation, as the seed project) and "none"."""
    if name == "standard":
        return TrainPreset(image_size=image_size, channels_last=channels_last,
                           rotation=15.0, scale=0.15, translate=0.1, erasing=0.25)
    if name == "photo":
        return TrainPreset(image_size=image_size, channels_last=channels_last, rotation=15.0, scale=0.2,
                           translate=0.12, erasing=0.25, low_res=0.3, photometric=0.3)
    if name == "flip_rotate":
        return TrainPreset(image_size=image_size, channels_last=channels_last, rotation=10.0)
    if name == "none":
        return EvalPreset(image_size=image_size, channels_last=channels_last)
    raise ValueError(f"unknown augmentation preset {name!r}; choose one of: standard, photo, flip_rotate, none")


# --------------------------------------------------------------------------------------------
# Test-time augmentation

TTA_MODES = ("none", "flip", "tencrop")
TENCROP_FRACTION = 0.9  # crop side / image side: a 10% shift and 1.1x zoom, inside the training augmentation


def check_tta(mode: str) -> None:
    """Refuse an unknown test-time augmentation where the user gave it, naming the choices."""
    if mode not in TTA_MODES:
        raise UserError(f"unknown --tta {mode!r}; choose one of: {', '.join(TTA_MODES)}")


def tta_views(pixels: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The test-time views of a uint8 batch (B, S, S); each goes through the same EvalPreset.

    "none": the batch itself; "flip": it and its mirror image; "tencrop": the four corner crops and
    the centre crop of side TENCROP_FRACTION * S, and their mirror images (as the best FER2013
    results use). The TTA prediction is the mean of the model's probabilities over the views.
    """
    if mode == "none":
        return [pixels]
    if mode == "flip":
        return [pixels, torch.flip(pixels, dims=(-1,))]
    if mode == "tencrop":
        side = pixels.shape[-1]
        crop = max(1, round(side * TENCROP_FRACTION))
        far, mid = side - crop, (side - crop) // 2
        crops = [pixels[..., y:y + crop, x:x + crop] for y, x in ((0, 0), (0, far), (far, 0), (far, far), (mid, mid))]
        return crops + [torch.flip(c, dims=(-1,)) for c in crops]
    raise ValueError(f"unknown test-time augmentation {mode!r}; choose one of: {', '.join(TTA_MODES)}")
