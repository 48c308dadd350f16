"""images.py: the tensor presets (eval, train augmentation) and test-time views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_fer.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalPreset,
    TrainPreset,
    train_preset,
    tta_views,
)


# --------------------------------------------------------------------------------------------
# Presets


def uint8_batch(b: int = 4, s: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("image_size", [32, 48, 64, 224])
def test_eval_preset_shape_dtype_layout(image_size):
    out = EvalPreset(image_size=image_size)(uint8_batch())
    assert out.shape == (4, 3, image_size, image_size) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    plain = EvalPreset(image_size=image_size, channels_last=False)(uint8_batch())
    assert plain.is_contiguous() and torch.allclose(plain, out)


def test_eval_preset_range_is_imagenet_normalised():
    black = torch.zeros(1, 48, 48, dtype=torch.uint8)
    white = torch.full((1, 48, 48), 255, dtype=torch.uint8)
    preset = EvalPreset(image_size=64)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(preset(black)[0, :, 10, 10], (0 - mean) / std, atol=1e-5)
    assert torch.allclose(preset(white)[0, :, 10, 10], (1 - mean) / std, atol=1e-5)
    out = preset(uint8_batch())
    assert out.min() >= ((0 - mean) / std).min() - 1e-5 and out.max() <= ((1 - mean) / std).max() + 1e-5


def test_eval_preset_is_deterministic_and_keeps_native_size_exact():
    x = uint8_batch()
    preset = EvalPreset(image_size=48, channels_last=False)
    assert torch.equal(preset(x), preset(x))
    gray = preset(x)[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert torch.allclose(gray * 255, x.float(), atol=1e-3)  # no resampling at the decode size


def test_eval_preset_rejects_float_input():
    with pytest.raises(TypeError, match="uint8"):
        EvalPreset(image_size=48)(torch.zeros(1, 48, 48))


def test_eval_preset_downscale_is_antialiased():
    stripes = torch.zeros(1, 96, 96, dtype=torch.uint8)
    stripes[:, :, ::2] = 255  # 1-px stripes: a naive 2x downscale picks all-black or all-white
    out = EvalPreset(image_size=48, channels_last=False)(stripes)[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert abs(out.mean().item() - 0.5) < 0.05 and out.std().item() < 0.1


@pytest.mark.parametrize("name", ["standard", "photo", "flip_rotate", "none"])
def test_train_presets(name):
    preset = train_preset(name, image_size=64)
    x = uint8_batch(8)
    gen = torch.Generator().manual_seed(1)
    out = preset(x, torch.Generator().manual_seed(1)) if isinstance(preset, TrainPreset) else preset(x)
    assert out.shape == (8, 3, 64, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()
    if isinstance(preset, TrainPreset):
        assert torch.equal(out, preset(x, gen))  # the generator makes it reproducible
        assert not torch.equal(out, preset(x, torch.Generator().manual_seed(2)))


def test_unknown_train_preset_names_the_choices():
    with pytest.raises(ValueError, match="standard, photo, flip_rotate, none"):
        train_preset("fancy", image_size=64)


def test_low_resolution_copies_lose_fine_detail_and_keep_the_mean():
    """low_res=1: every face downscaled to 12-28 px and back: 1-px stripes are gone, the mean stays."""
    stripes = torch.zeros(16, 48, 48, dtype=torch.uint8)
    stripes[:, :, ::2] = 255
    plain = TrainPreset(image_size=48, channels_last=False, hflip=0.0, rotation=0.0)
    blurred = TrainPreset(image_size=48, channels_last=False, hflip=0.0, rotation=0.0, low_res=1.0)
    a, b = plain(stripes, torch.Generator().manual_seed(0)), blurred(stripes, torch.Generator().manual_seed(0))
    assert a.std().item() > 1.5 and b.std().item() < 0.5 * a.std().item()
    assert abs(a.mean().item() - b.mean().item()) < 0.1


def test_photometric_changes_exposure_per_image_within_range():
    gray = torch.full((64, 48, 48), 128, dtype=torch.uint8)
    gray[:, :24] = 64
    preset = TrainPreset(image_size=48, channels_last=False, hflip=0.0, rotation=0.0, photometric=0.3)
    out = preset(gray, torch.Generator().manual_seed(0))[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    means = out.mean(dim=(1, 2))
    assert means.std().item() > 0.03  # faces differ in brightness from one another
    assert out.min().item() >= -1e-5 and out.max().item() <= 1 + 1e-5  # still within 0..255


def test_tta_views():
    x = uint8_batch(2)
    assert len(tta_views(x, "none")) == 1
    plain, flipped = tta_views(x, "flip")
    assert torch.equal(flipped, x.flip(-1)) and torch.equal(plain, x)
    crops = tta_views(x, "tencrop")
    assert len(crops) == 10 and all(c.shape == (2, 43, 43) for c in crops)
    with pytest.raises(ValueError, match="none, flip, tencrop"):
        tta_views(x, "twelvecrop")


def test_tta_views_are_flips_and_crops():
    x = torch.randint(0, 256, (2, 48, 48), dtype=torch.uint8)
    assert len(tta_views(x, "none")) == 1
    plain, mirror = tta_views(x, "flip")
    assert torch.equal(mirror, torch.from_numpy(np.ascontiguousarray(x.numpy()[:, :, ::-1])))
    views = tta_views(x, "tencrop")
    assert len(views) == 10 and all(v.shape == (2, 43, 43) for v in views)
    assert torch.equal(views[0], x[:, :43, :43]) and torch.equal(views[3], x[:, 5:, 5:])
    assert torch.equal(views[4], x[:, 2:45, 2:45])
    assert torch.equal(views[5], torch.flip(views[0], dims=(-1,)))
    with pytest.raises(ValueError, match="choose one of"):
        tta_views(x, "fivecrop")
