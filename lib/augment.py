"""Augmentation: one random draw per sample, applied alike to bg, bg_fg, mask and depth.

The mask lives in what changed between bg and bg_fg, so the two photos must receive the SAME
photometric change (the original drew independent parameters for each and blurred that signal).
The CPU path is albumentations with `additional_targets`; `jitter_batch` is the same recipe as a
batched tensor operation for the GPU, applied after collation.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import UserError

try:  # the CPU pipeline; the GPU path (`jitter_batch`, `flip_batch`) needs only torch
    import albumentations as A
except ImportError:  # pragma: no cover - requirements.txt installs it
    A = None

HUE_SHIFT = 20  # OpenCV hue units (0..180), as albumentations' HueSaturationValue
SAT_SHIFT = 30  # 0..255 units
VAL_SHIFT = 20  # 0..255 units
BRIGHTNESS = 0.2  # fraction of the full range
CONTRAST = 0.2  # relative


class MissingAlbumentations:
    """Stands in for the CPU pipeline where albumentations is not installed: the GPU path still knows augmentation
    was asked for; the CPU path raises a UserError saying what to install."""

    def set_random_seed(self, seed: int | None) -> None:
        """Nothing to seed."""

    def __call__(self, **images):
        raise UserError(
            "augmentation on the CPU needs albumentations (pip install albumentations); "
            "or augment on the device (data_mode='gpu'), or turn augmentation off"
        )


def make_train_augment(p_flip: float = 0.5, p_color: float = 0.5, seed: int | None = None) -> A.Compose:
    """The training pipeline: horizontal flip of all four images, shared HSV and brightness/contrast on bg and bg_fg."""
    if A is None:
        return MissingAlbumentations()
    return A.Compose(
        [
            A.HorizontalFlip(p=p_flip),
            A.HueSaturationValue(HUE_SHIFT, SAT_SHIFT, VAL_SHIFT, p=p_color),
            A.RandomBrightnessContrast(BRIGHTNESS, CONTRAST, p=p_color),
        ],
        additional_targets={"bg_fg": "image", "depth": "mask"},
        seed=seed,
    )


def apply_augment(augment: A.Compose, bg: np.ndarray, bg_fg: np.ndarray, mask: np.ndarray, depth: np.ndarray):
    """Apply one draw of `augment` to the four HWC uint8 arrays; return them in the same order."""
    out = augment(image=bg, bg_fg=bg_fg, mask=mask, depth=depth)
    return out["image"], out["bg_fg"], out["mask"], out["depth"]


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] -> HSV with hue in [0,1)."""
    r, g, b = rgb.unbind(1)
    maxc, _ = rgb.max(1)
    minc, _ = rgb.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue, sat, maxc], 1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) HSV (hue in [0,1)) -> RGB in [0,1]."""
    h, s, v = hsv.unbind(1)
    k = torch.stack([(5.0 + h * 6.0) % 6.0, (3.0 + h * 6.0) % 6.0, (1.0 + h * 6.0) % 6.0], 1)  # (B, 3, H, W)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def jitter_batch(bg: torch.Tensor, bg_fg: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None):
    """Shared photometric jitter for float (B,3,H,W) images in [0,1]: one draw per sample, same for bg and bg_fg.

    Mirrors `make_train_augment`'s HueSaturationValue and RandomBrightnessContrast, each applied with
    probability `p`. Runs wherever the tensors are (the GPU path of the loader).
    """
    batch, device = bg.shape[0], bg.device
    draw_on = generator.device if generator is not None else torch.device("cpu")  # a CUDA generator: no host copy

    def draw(limit: float, prob: float) -> torch.Tensor:
        u = torch.rand(batch, 2, generator=generator, device=draw_on)
        value = (u[:, 0] * 2 - 1) * limit * (u[:, 1] < prob)
        return value.to(device).view(batch, 1, 1, 1)

    hue, sat, val = draw(HUE_SHIFT / 180.0, p), draw(SAT_SHIFT / 255.0, p), draw(VAL_SHIFT / 255.0, p)
    bright, contrast = draw(BRIGHTNESS, p), draw(CONTRAST, p)
    both = torch.cat([bg, bg_fg], 0)  # (2B, 3, H, W)
    shifts = [torch.cat([t, t], 0) for t in (hue, sat, val, bright, contrast)]
    hsv = _rgb_to_hsv(both)
    h = (hsv[:, :1] + shifts[0]) % 1.0
    s = (hsv[:, 1:2] + shifts[1]).clamp(0, 1)
    v = (hsv[:, 2:] + shifts[2]).clamp(0, 1)
    out = _hsv_to_rgb(torch.cat([h, s, v], 1))
    out = (out * (1 + shifts[4]) + shifts[3]).clamp(0, 1)
    return out[:batch], out[batch:]


def flip_batch(
    images: list[torch.Tensor], p: float = 0.5, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Flip (B, C, H, W) tensors left-right, the same samples in every tensor (one draw per sample, probability `p`).

    The GPU path's HorizontalFlip: bg, bg_fg, mask and depth of a sample stay aligned. Draws on the
    generator's device (a CUDA generator keeps the draw on the GPU, no host sync).
    """
    batch, device = images[0].shape[0], images[0].device
    draw_on = generator.device if generator is not None else torch.device("cpu")
    flip = (torch.rand(batch, generator=generator, device=draw_on) < p).to(device).view(batch, 1, 1, 1)  # (B, 1, 1, 1)
    return [torch.where(flip, x.flip(-1), x) for x in images]
