"""Augmentation: one random draw per sample, applied alike to bg, bg_fg, mask and depth.

The mask lives in what changed between bg and bg_fg, so the two photos must receive the SAME
photometric change (the original drew independent parameters for each and blurred that signal).
The CPU path is albumentations with `additional_targets`; `jitter_batch` is the same recipe as a
batched tensor operation for the GPU, applied after collation.

The re-shoot (`make_reshoot`, `reshoot_batch`) is the exception: capture differences between the two photos,
applied to bg alone, so that the model learns to ignore them; mask and depth stay aligned with bg_fg.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

from .errors import UserError

try:  # the CPU pipeline; the GPU path (`jitter_batch`, `flip_batch`) needs only torch
    import albumentations as A
    import cv2
except ImportError:  # pragma: no cover - requirements.txt installs it
    A = cv2 = None

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


def apply_augment(
    augment: A.Compose, bg: np.ndarray, bg_fg: np.ndarray, mask: np.ndarray, depth: np.ndarray, key: int | None = None
):
    """Apply one draw of `augment` to the four HWC uint8 arrays; return them in the same order.

    `key` (the sample's row) seeds a per-sample re-shoot (`Augment` with `sample_seed`); ignored otherwise.
    """
    if key is not None and isinstance(augment, Augment):
        augment.seed_sample(key)
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


# ---------------------------------------------------------------------------------------------------------
# Re-shot background: capture perturbations applied to bg alone (the BackgroundMattingV2 lesson)
#
# A background photo taken separately from the one with the person differs by a small camera move, exposure,
# white balance, sensor noise, blur and JPEG. Perturbing bg alone (mask and depth stay aligned with bg_fg)
# teaches the model to ignore those differences instead of marking every pixel that changed.


@dataclasses.dataclass(frozen=True)
class ReshootLevel:
    """The ranges of one re-shoot strength; every draw is uniform in [-limit, limit] (shift: whole pixels)."""

    shift: int = 0  # px, per axis
    rotate: float = 0.0  # degrees
    scale: float = 0.0  # relative: 0.01 is a zoom in [0.99, 1.01]
    exposure: float = 0.0  # relative gain shared by the three channels
    white_balance: float = 0.0  # relative gain per channel
    noise: float = 0.0  # sigma of Gaussian sensor noise, in [0, 1] units
    jpeg: tuple[int, int] = (100, 100)  # quality range of the recompression (100: none)
    p_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # of a 3x3 Gaussian


# mild is the evaluation definition of issue 14; strong is about twice mild
RESHOOT_LEVELS = {
    "mild": ReshootLevel(shift=2, exposure=0.12, white_balance=0.05, noise=3 / 255, jpeg=(80, 80)),
    "strong": ReshootLevel(
        shift=4, rotate=1.0, scale=0.01, exposure=0.20, white_balance=0.08, noise=6 / 255, jpeg=(60, 80), p_blur=0.3
    ),
}
RESHOOT_CHOICES = ("none", "mild", "strong", "train")  # "train": what training draws from, see TRAIN_* below
TRAIN_UNTOUCHED = 0.6  # share of training samples whose bg is left as it is (pixel-exact pairs exist too)
TRAIN_STRENGTHS = (0.25, 0.5, 0.75, 1.0)  # fractions of `strong`, drawn uniformly for the other samples
TRAIN_SHADOW = 0.5  # probability of a soft shadow of the person on the floor in bg_fg
SHADOW_DARKNESS = (0.2, 0.5)  # the shadow multiplies the floor by 1 - darkness at its centre
SHADOW_WIDTH = (1.0, 1.6)  # half-width of the shadow / half-width of the person
SHADOW_FLATNESS = (0.12, 0.3)  # the ellipse's half-height / half-width
SHADOW_MIN_HALF_HEIGHT = 2.0  # px: a visible band even under a thin figure
SHADOW_OFFSET = 0.3  # the shadow's centre moves sideways by up to this share of its half-width (the light's side)


def scale_level(level: ReshootLevel, strength: float) -> ReshootLevel:
    """`level` with every range scaled by `strength` in [0, 1] (JPEG quality moves towards 100, blur gets rarer)."""
    lo, hi = level.jpeg
    return ReshootLevel(
        shift=int(round(level.shift * strength)),
        rotate=level.rotate * strength,
        scale=level.scale * strength,
        exposure=level.exposure * strength,
        white_balance=level.white_balance * strength,
        noise=level.noise * strength,
        jpeg=(int(round(100 - (100 - lo) * strength)), int(round(100 - (100 - hi) * strength))),
        p_blur=level.p_blur * strength,
        blur_sigma=level.blur_sigma,
    )


def resolve_reshoot_levels(name: str) -> tuple[list[ReshootLevel], float, float]:
    """(the levels a sample draws from uniformly, probability that it is re-shot at all, shadow probability)."""
    if name == "train":
        return [scale_level(RESHOOT_LEVELS["strong"], s) for s in TRAIN_STRENGTHS], 1 - TRAIN_UNTOUCHED, TRAIN_SHADOW
    if name in RESHOOT_LEVELS:
        return [RESHOOT_LEVELS[name]], 1.0, 0.0
    raise UserError(f"re-shoot level must be one of {', '.join(RESHOOT_CHOICES[1:])}, not {name!r}")


def make_level_transforms(level: ReshootLevel) -> list:
    """albumentations transforms for one level, on a float image in [0, 1]: camera move, exposure, white balance,
    blur, sensor noise (then back to uint8 and the JPEG recompression)."""
    shift = (-level.shift, level.shift)
    return [
        A.ToFloat(max_value=255),  # noise and gains in float: one rounding at the end, as the GPU path does
        A.Affine(
            translate_px={"x": shift, "y": shift},
            rotate=(-level.rotate, level.rotate),
            scale=(1 - level.scale, 1 + level.scale),
            interpolation=cv2.INTER_LINEAR,
            border_mode=cv2.BORDER_REFLECT,  # grid_sample's "reflection" with align_corners=False
            p=1.0,
        ),
        A.MultiplicativeNoise(multiplier=(1 - level.exposure, 1 + level.exposure), per_channel=False, p=1.0),
        A.MultiplicativeNoise(multiplier=(1 - level.white_balance, 1 + level.white_balance), per_channel=True, p=1.0),
        A.GaussianBlur(blur_limit=(3, 3), sigma_limit=level.blur_sigma, p=level.p_blur),
        A.GaussNoise(std_range=(level.noise, level.noise), mean_range=(0.0, 0.0), per_channel=True, p=1.0),
        A.FromFloat(dtype="uint8", max_value=255),
        A.ImageCompression(quality_range=level.jpeg, p=1.0 if level.jpeg[0] < 100 else 0.0),
    ]


class Reshoot:
    """A re-shot background: capture perturbations on bg alone, and (level "train") a soft shadow on bg_fg.

    Call it with HWC uint8 bg, bg_fg and HW mask (0/1); returns (bg, bg_fg). mask and depth never change.
    """

    def __init__(self, level: str, seed: int | None = None):
        if A is None:  # pragma: no cover - requirements.txt installs it
            raise UserError("the re-shoot on the CPU needs albumentations (pip install albumentations)")
        self.level = level
        levels, p_reshoot, self.p_shadow = resolve_reshoot_levels(level)
        choices = [A.Compose(make_level_transforms(lv)) for lv in levels]
        self.bg_transform = A.Compose([A.OneOf(choices, p=p_reshoot)], seed=seed)
        self.rng = np.random.default_rng(seed)

    def set_random_seed(self, seed: int | None) -> None:
        """Seed the draws (None: fresh entropy)."""
        self.bg_transform.set_random_seed(seed)
        self.rng = np.random.default_rng(seed)

    def _uniform(self, n: int) -> torch.Tensor:
        """n floats in [0, 1) from this re-shoot's generator."""
        return torch.from_numpy(self.rng.random(n)).float()

    def __call__(self, bg: np.ndarray, bg_fg: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bg = self.bg_transform(image=bg)["image"]
        if self.p_shadow > 0 and self.rng.random() < self.p_shadow:
            darkness, width, flatness, offset = (float(v) for v in draw_shadow_params(1, self._uniform))
            factor = shadow_factor(mask, darkness, width, flatness, offset)  # (H, W)
            if factor is not None:
                bg_fg = np.clip(bg_fg * factor[..., None] + 0.5, 0, 255).astype(np.uint8)  # rounded
        return bg, bg_fg


def make_reshoot(level: str, seed: int | None = None) -> Reshoot:
    """The re-shoot of `level` (mild, strong or train) for HWC uint8 images; see `Reshoot`."""
    return Reshoot(level, seed)


def apply_reshoot(reshoot: Reshoot, bg: np.ndarray, bg_fg: np.ndarray, mask: np.ndarray):
    """One draw of `reshoot`: (bg re-shot, bg_fg with the shadow if one was drawn); mask is read, never changed."""
    return reshoot(bg, bg_fg, mask)


def draw_shadow_params(batch: int, uniform) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(darkness, width, flatness, offset), each (batch,), from `uniform(n)` giving n floats in [0, 1)."""
    u = uniform(4 * batch).view(4, batch)

    def between(row: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * row

    return (
        between(u[0], *SHADOW_DARKNESS),
        between(u[1], *SHADOW_WIDTH),
        between(u[2], *SHADOW_FLATNESS),
        between(u[3], -SHADOW_OFFSET, SHADOW_OFFSET),
    )


def shadow_factor(mask: np.ndarray, darkness: float, width: float, flatness: float, offset: float) -> np.ndarray | None:
    """The CPU path's `cast_shadow` for one HW mask: (H, W) float32 factors to multiply bg_fg by, or None where no
    shadow fits (numpy: small torch ops are slow in loader threads on few cores)."""
    m = mask.reshape(mask.shape[:2]) > 0
    height, width_px = m.shape
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if len(rows) == 0 or rows[-1] >= height - 1:
        return None
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width_px, dtype=np.float32)[None, :]
    feet = m & (ys >= bottom - 0.1 * (bottom - top + 1))
    centre_x = float((feet * xs).sum() / max(feet.sum(), 1))
    half_w = max((right - left + 1) * 0.5 * width, 1.0)
    half_h = max(half_w * flatness, SHADOW_MIN_HALF_HEIGHT)
    dx = (xs - (centre_x + offset * half_w)) / half_w
    dy = (ys - bottom - 0.5 * half_h) / half_h  # centred a little below the feet: on the floor, not under the shoes
    alpha = np.clip((1.0 - np.sqrt(dx * dx + dy * dy)) / 0.7, 0, 1)
    alpha = alpha * alpha * (3 - 2 * alpha) * ~m
    return (1 - darkness * alpha).astype(np.float32)


def cast_shadow(
    bg_fg: torch.Tensor,
    mask: torch.Tensor,
    darkness: torch.Tensor,
    width: torch.Tensor,
    flatness: torch.Tensor,
    offset: torch.Tensor,
) -> torch.Tensor:
    """bg_fg (B, 3, H, W) in [0, 1] darkened by a soft ellipse centred under the mask's lowest pixels; masked
    pixels are never touched, nor images whose mask is empty or reaches the bottom row (no floor in sight)."""
    batch, _, height, width_px = bg_fg.shape
    device = bg_fg.device
    m = mask[:, 0] > 0  # (B, H, W)
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width_px, device=device, dtype=torch.float32)
    rows, cols = m.any(2), m.any(1)  # (B, H), (B, W)
    bottom = torch.where(rows, ys, torch.full_like(ys, -1)).amax(1)  # (B,)
    top = torch.where(rows, ys, torch.full_like(ys, height)).amin(1)
    left = torch.where(cols, xs, torch.full_like(xs, width_px)).amin(1)
    right = torch.where(cols, xs, torch.full_like(xs, -1)).amax(1)
    fits = rows.any(1) & (bottom < height - 1)
    # the feet: the lowest tenth of the figure; the shadow is centred under them
    feet = m & (ys.view(1, -1, 1) >= (bottom - 0.1 * (bottom - top + 1)).view(-1, 1, 1))  # (B, H, W)
    centre_x = (feet * xs.view(1, 1, -1)).sum((1, 2)) / feet.sum((1, 2)).clamp_min(1)
    half_w = ((right - left + 1) * 0.5 * width.to(device)).clamp_min(1.0)
    half_h = (half_w * flatness.to(device)).clamp_min(SHADOW_MIN_HALF_HEIGHT)
    dx = (xs.view(1, 1, -1) - (centre_x + offset.to(device) * half_w).view(-1, 1, 1)) / half_w.view(-1, 1, 1)
    dy = (ys.view(1, -1, 1) - (bottom + 0.5 * half_h).view(-1, 1, 1)) / half_h.view(-1, 1, 1)
    r = torch.sqrt(dx * dx + dy * dy)  # (B, H, W)
    alpha = ((1.0 - r) / 0.7).clamp(0, 1)
    alpha = alpha * alpha * (3 - 2 * alpha)  # smoothstep: a soft penumbra instead of a blurred disc
    alpha = alpha * (~m) * fits.view(-1, 1, 1)
    return bg_fg * (1 - darkness.to(device).view(-1, 1, 1) * alpha).unsqueeze(1)  # (B, 3, H, W)


class Augment:
    """A sample's augmentation with the re-shoot: bg re-shot first (capture), then the shared pipeline on all four.

    With `sample_seed`, the re-shoot of a sample is drawn from (sample_seed, its key) alone (evaluation: the same
    perturbation for a sample whatever the batch size, workers or order); otherwise from the seeded stream.
    """

    def __init__(self, shared, reshoot: Reshoot | None, sample_seed: int | None = None):
        self.shared, self.reshoot, self.sample_seed = shared, reshoot, sample_seed

    def set_random_seed(self, seed: int | None) -> None:
        """Seed both parts (None: fresh entropy)."""
        seeds = [None, None] if seed is None else np.random.SeedSequence(seed % 2**63).generate_state(2).tolist()
        if self.shared is not None:
            self.shared.set_random_seed(seeds[0])
        if self.reshoot is not None and self.sample_seed is None:
            self.reshoot.set_random_seed(seeds[1])

    def seed_sample(self, key: int) -> None:
        """Draw the next re-shoot from (sample_seed, key), when this augmentation is seeded per sample."""
        if self.reshoot is not None and self.sample_seed is not None:
            self.reshoot.set_random_seed(int(np.random.SeedSequence([self.sample_seed, key]).generate_state(1)[0]))

    def __call__(self, *, image, bg_fg, mask, depth) -> dict:
        if self.reshoot is not None:
            image, bg_fg = self.reshoot(image, bg_fg, mask)
        if self.shared is not None:
            return self.shared(image=image, bg_fg=bg_fg, mask=mask, depth=depth)
        return {"image": image, "bg_fg": bg_fg, "mask": mask, "depth": depth}


def make_augment(augment: bool, reshoot: str | None = None, reshoot_seed: int | None = None):
    """A dataset's augmentation: None, the shared pipeline (`make_train_augment`), or an `Augment` with the re-shoot
    of level `reshoot` (seeded per sample from `reshoot_seed` when given)."""
    if reshoot in (None, "none"):
        return make_train_augment() if augment else None
    return Augment(make_train_augment() if augment else None, make_reshoot(reshoot), reshoot_seed)


def _level_table(levels: list[ReshootLevel], device: torch.device) -> torch.Tensor:
    """(K, 11) float table of the levels' ranges, one row per level (for per-sample gathers on the device)."""
    rows = [
        [lv.shift, lv.rotate, lv.scale, lv.exposure, lv.white_balance, lv.noise, *lv.jpeg, lv.p_blur, *lv.blur_sigma]
        for lv in levels
    ]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def _move(bg: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor):
    """bg (B, 3, H, W) moved as albumentations' Affine does: zoom and rotation (degrees) about the centre, then a
    shift of (tx, ty) px; bilinear, borders reflected."""
    batch, _, height, width = bg.shape
    ys = torch.arange(height, device=bg.device, dtype=torch.float32).view(1, -1, 1) - (height - 1) / 2
    xs = torch.arange(width, device=bg.device, dtype=torch.float32).view(1, 1, -1) - (width - 1) / 2
    theta = torch.deg2rad(angle).view(-1, 1, 1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    u = xs - tx.view(-1, 1, 1)  # (B, 1, W): output pixel relative to the centre, shift undone
    v = ys - ty.view(-1, 1, 1)  # (B, H, 1)
    z = zoom.view(-1, 1, 1)
    src_x = (cos * u + sin * v) / z + (width - 1) / 2  # (B, H, W): the source pixel, rotation and zoom undone
    src_y = (-sin * u + cos * v) / z + (height - 1) / 2
    grid = torch.stack([(2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1], -1)  # (B, H, W, 2)
    return F.grid_sample(bg, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _blur3(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable 3x3 Gaussian of x (B, C, H, W) with one sigma per sample (0: unchanged); borders as OpenCV's."""
    w = torch.where(sigma > 0, torch.exp(-0.5 / sigma.clamp_min(1e-6) ** 2), torch.zeros_like(sigma))
    side, centre = (w / (1 + 2 * w)).view(-1, 1, 1, 1), (1 / (1 + 2 * w)).view(-1, 1, 1, 1)
    p = F.pad(x, (1, 1, 0, 0), mode="reflect")  # OpenCV's BORDER_REFLECT_101
    x = centre * x + side * (p[..., :-2] + p[..., 2:])
    p = F.pad(x, (0, 0, 1, 1), mode="reflect")
    return centre * x + side * (p[..., :-2, :] + p[..., 2:, :])


def _recompress(bg: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """bg (B, 3, H, W) in [0, 1] through JPEG at each sample's quality (100: untouched), wherever bg lives."""
    out = bg.clone()
    pixels = (bg * 255.0).round_().clamp_(0, 255).to(torch.uint8)  # (B, 3, H, W)
    for q in torch.unique(quality).tolist():
        if q >= 100:
            continue
        index = (quality == q).nonzero().flatten().tolist()
        try:  # batched, on the tensors' device (torchvision >= 0.19 encodes CUDA tensors)
            encoded = encode_jpeg([pixels[i] for i in index], quality=int(q))
            decoded = decode_jpeg([e.cpu() for e in encoded], device=bg.device)  # the decoder reads host bytes
        except (TypeError, RuntimeError):  # older torchvision: one image at a time, on the CPU
            decoded = [decode_jpeg(encode_jpeg(pixels[i].cpu(), quality=int(q))).to(bg.device) for i in index]
        out[index] = torch.stack(decoded).float() / 255.0  # (n, 3, H, W)
    return out


def reshoot_batch(
    bg: torch.Tensor,
    bg_fg: torch.Tensor,
    mask: torch.Tensor,
    level: str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU path's `Reshoot`: float (B, 3, H, W) bg and bg_fg in [0, 1], mask (B, 1, H, W); returns (bg re-shot,
    bg_fg with the shadow where drawn). One draw per sample from the same ranges as the CPU path; runs wherever
    the tensors are, drawing on the generator's device."""
    levels, p_reshoot, p_shadow = resolve_reshoot_levels(level)
    batch, device = bg.shape[0], bg.device
    draw_on = generator.device if generator is not None else torch.device("cpu")

    def uniform(n: int) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=draw_on).to(device)

    u = uniform(14 * batch).view(14, batch)
    on = u[0] < p_reshoot  # (B,)
    table = _level_table(levels, device)[(u[1] * len(levels)).long().clamp_max(len(levels) - 1)]  # (B, 11)
    shift, rotate, scale, exposure, balance, noise, q_lo, q_hi, p_blur, s_lo, s_hi = table.T * on
    signed = u[2:9] * 2 - 1  # (7, B) in [-1, 1]
    tx = (u[2] * (2 * shift + 1)).floor().clamp_max(2 * shift) - shift  # whole pixels in [-shift, shift]
    ty = (u[3] * (2 * shift + 1)).floor().clamp_max(2 * shift) - shift
    out = _move(bg, tx, ty, signed[2] * rotate, 1 + signed[3] * scale)
    gains = (1 + signed[4] * exposure).view(-1, 1, 1, 1) * (1 + (u[9:12].T * 2 - 1) * balance.view(-1, 1)).view(
        batch, 3, 1, 1
    )  # (B, 3, 1, 1): exposure times white balance
    out = (out * gains).clamp(0, 1)
    sigma = torch.where(u[12] < p_blur, s_lo + (s_hi - s_lo) * u[13], torch.zeros_like(s_lo))
    out = _blur3(out, sigma)
    grain = torch.randn(out.shape, generator=generator, device=draw_on).to(device)  # (B, 3, H, W)
    out = (out + grain * noise.view(-1, 1, 1, 1)).clamp(0, 1)
    quality = torch.where(on, (q_lo + uniform(batch) * (q_hi - q_lo + 1)).floor().clamp_max(q_hi), 100)
    out = _recompress(out, quality.long())
    out = torch.where(on.view(-1, 1, 1, 1), out, bg)  # untouched samples stay bit-exact
    if p_shadow > 0:
        shade = uniform(batch) < p_shadow
        darkness, width, flatness, offset = draw_shadow_params(batch, uniform)
        bg_fg = cast_shadow(bg_fg, mask, darkness * shade, width, flatness, offset)
    return out, bg_fg
