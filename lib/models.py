"""MaskNet and DepthNet: two-image (bg, bg_fg) networks; both return a dict of raw outputs: {"mask": logits} and,
for DepthNet, "depth"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lib.data import denormalize
from lib.errors import UserError

__all__ = [
    "Compare",
    "MaskNet",
    "DepthNet",
    "MODELS",
    "MODEL_SIZE_MULTIPLE",
    "make_model",
    "count_parameters",
    "unwrap_model",
]


def conv_bn_relu(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    """Return conv3x3 (padding = dilation, bias) + BatchNorm + ReLU; keeps H and W."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=dilation, dilation=dilation),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def check_pair(bg: torch.Tensor, bg_fg: torch.Tensor, multiple: int = 1) -> None:
    """Raise UserError unless bg and bg_fg are (B, 3, H, W) of one shape with H, W divisible by `multiple`."""
    if bg.dim() != 4 or bg.shape != bg_fg.shape or bg.shape[1] != 3:
        raise UserError(
            f"expected bg and bg_fg of one shape (B, 3, H, W), got {tuple(bg.shape)} and {tuple(bg_fg.shape)}"
        )
    height, width = bg.shape[-2:]
    if height % multiple or width % multiple:
        near_h, near_w = (max(multiple, round(side / multiple) * multiple) for side in (height, width))
        raise UserError(
            f"image size {height}x{width} does not work with this model: "
            f"both sides must be divisible by {multiple} (nearest: {near_h}x{near_w})"
        )


class Compare(nn.Module):
    """Fixed (not learned) comparison of the pair, fed to the networks next to bg_fg: (B, 6, H, W).

    Channels 0-2: |bg_fg - bg| per colour, what pixel differencing thresholds. Channels 3-5: the same after a
    re-shoot is undone as far as simple rules can: both images box-blurred 3x3 (noise, JPEG), bg's per-channel
    gain matched to bg_fg's (exposure, white balance; medians, so the person barely moves them), and each pixel
    compared with its best match (all three colours at once) within `radius` px of bg (a tripod's shift). A
    network given only the two images must learn these comparisons from data; given them, it starts where
    differencing ends and learns what to trust: the raw difference when bg is the same photo, the tolerant one
    when it was re-shot.
    """

    channels = 6

    def __init__(self, radius: int = 3) -> None:
        super().__init__()
        self.radius = radius

    def forward(self, bg: torch.Tensor, bg_fg: torch.Tensor) -> torch.Tensor:
        """Return (B, 6, H, W) difference features for normalised bg, bg_fg (B, 3, H, W)."""
        bg, bg_fg = denormalize(bg, "bg"), denormalize(bg_fg, "bg_fg")  # [0, 1]
        raw = (bg_fg - bg).abs()  # (B, 3, H, W)
        bg, bg_fg = (F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False) for x in (bg, bg_fg))
        gain = bg_fg.flatten(2).median(dim=2).values / bg.flatten(2).median(dim=2).values.clamp_min(1e-3)  # (B, 3)
        bg = bg * gain.clamp(0.5, 2.0)[..., None, None]
        r = self.radius
        height, width = bg.shape[-2:]
        padded = F.pad(bg, (r, r, r, r), mode="replicate")  # (B, 3, H + 2r, W + 2r)
        tolerant, best = None, None  # the per-channel difference at each pixel's best shift (summed over channels)
        for dy in range(2 * r + 1):
            for dx in range(2 * r + 1):
                diff = (bg_fg - padded[..., dy : dy + height, dx : dx + width]).abs()  # (B, 3, H, W)
                total = diff.sum(dim=1, keepdim=True)  # (B, 1, H, W)
                if best is None:
                    tolerant, best = diff, total
                else:
                    better = total < best
                    tolerant, best = torch.where(better, diff, tolerant), torch.where(better, total, best)
        return torch.cat([raw, tolerant], dim=1)  # (B, 6, H, W)


class MaskNet(nn.Module):
    """Small full-resolution mask network: (bg, bg_fg) (B, 3, H, W) -> mask logits (B, 1, H, W).

    bg_fg's stem also sees the Compare features (the difference, raw and re-shoot tolerant); the body's two
    convolutions are dilated 2 and 4, so each pixel's answer sees 15 x 15 px around it (7 x 7 undilated), enough
    to fill in a figure where it happens to match the background."""

    size_multiple = 1

    def __init__(self) -> None:
        super().__init__()
        self.compare = Compare()
        self.bg_stem = conv_bn_relu(3, 32)
        self.bg_fg_stem = conv_bn_relu(3 + Compare.channels, 32)
        self.body = nn.Sequential(conv_bn_relu(64, 64, dilation=2), conv_bn_relu(64, 64, dilation=4))
        self.head = nn.Conv2d(64, 1, kernel_size=1)

    def forward(self, bg: torch.Tensor, bg_fg: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return {"mask": logits (B, 1, H, W)} for normalised bg, bg_fg (B, 3, H, W); any H, W."""
        check_pair(bg, bg_fg)
        bg_fg_in = torch.cat([bg_fg, self.compare(bg, bg_fg)], dim=1)  # (B, 9, H, W)
        x = torch.cat([self.bg_stem(bg), self.bg_fg_stem(bg_fg_in)], dim=1)  # (B, 64, H, W)
        x = self.body(x)
        return {"mask": self.head(x)}  # (B, 1, H, W)


class Encoder(nn.Module):
    """Residual downsampling block: (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.MaxPool2d(2),
            conv_bn_relu(in_channels, out_channels),
            conv_bn_relu(out_channels, out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return relu(main(x) + shortcut(x)), (B, out, H/2, W/2)."""
        return F.relu(self.main(x) + self.shortcut(x))  # (B, out, H/2, W/2)


class Decoder(nn.Module):
    """Upsampling block: x (B, in, h, w) and skip (B, out, 2h, 2w) -> (B, out, 2h, 2w)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        # The original ends with one more ReLU after the last conv+BN+ReLU; that ReLU is an identity.
        self.refine = nn.Sequential(conv_bn_relu(out_channels, out_channels), conv_bn_relu(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Return refine(upsample(reduce(x)) + skip), shaped like skip."""
        x = self.reduce(x)  # (B, out, h, w)
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)  # (B, out, 2h, 2w)
        return self.refine(x + skip)


class DepthNet(nn.Module):
    """Encoder-decoder with a mask decoder feeding a depth decoder: (bg, bg_fg) -> (mask logits, depth).

    Inputs (B, 3, H, W) with H and W divisible by 32; both outputs (B, 1, H, W); depth has no activation.
    bg_fg's stem also sees the Compare features (the difference, raw and re-shoot tolerant).
    """

    size_multiple = 32

    def __init__(self) -> None:
        super().__init__()
        self.compare = Compare()
        self.bg_stem = nn.Sequential(conv_bn_relu(3, 16), conv_bn_relu(16, 16))
        self.bg_fg_stem = nn.Sequential(conv_bn_relu(3 + Compare.channels, 16), conv_bn_relu(16, 16))
        self.bg_encoder = Encoder(16, 16)
        self.bg_fg_encoder = Encoder(16, 16)
        self.encoder4 = Encoder(32, 64)
        self.encoder5 = Encoder(64, 128)
        self.encoder6 = Encoder(128, 256)
        self.encoder7 = Encoder(256, 512)

        # Numbered attributes (not an nn.ModuleList): checkpoints and the shipped weights are keyed
        # "mask_decoder1.*" ... "depth_decoder5.*", so the names must stay as they are.
        self._add_decoders("mask_decoder", (256, 128, 64, 32, 16))  # mask_decoder1..4
        self.mask_head = nn.Conv2d(16, 1, kernel_size=1)
        self._add_decoders("depth_decoder", (512, 256, 128, 64, 32, 16))  # depth_decoder1..5
        self.depth_head = nn.Conv2d(16, 1, kernel_size=1)

    def _add_decoders(self, prefix: str, widths: tuple[int, ...]) -> None:
        """Register Decoder(widths[i - 1], widths[i]) as `{prefix}{i}` for i = 1 .. len(widths) - 1."""
        for i, (in_channels, out_channels) in enumerate(zip(widths, widths[1:]), start=1):
            setattr(self, f"{prefix}{i}", Decoder(in_channels, out_channels))

    def forward(self, bg: torch.Tensor, bg_fg: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return {"mask": logits, "depth": depth}, each (B, 1, H, W), for normalised bg, bg_fg (B, 3, H, W)."""
        check_pair(bg, bg_fg, self.size_multiple)
        bg_features = self.bg_stem(bg)  # (B, 16, H, W)
        bg_fg_features = self.bg_fg_stem(torch.cat([bg_fg, self.compare(bg, bg_fg)], dim=1))  # (B, 16, H, W)
        x3 = torch.cat([self.bg_encoder(bg_features), self.bg_fg_encoder(bg_fg_features)], dim=1)  # (B, 32, H/2, W/2)
        x4 = self.encoder4(x3)  # (B, 64, H/4, W/4)
        x5 = self.encoder5(x4)  # (B, 128, H/8, W/8)
        x6 = self.encoder6(x5)  # (B, 256, H/16, W/16)

        m1 = self.mask_decoder1(x6, x5)  # (B, 128, H/8, W/8)
        m2 = self.mask_decoder2(m1, x4)  # (B, 64, H/4, W/4)
        m3 = self.mask_decoder3(m2, x3)  # (B, 32, H/2, W/2)
        m4 = self.mask_decoder4(m3, bg_fg_features)  # (B, 16, H, W)
        mask_logits = self.mask_head(m4)  # (B, 1, H, W)

        # Out-of-place sums only: adding onto a ReLU output in place breaks backward.
        x7 = self.encoder7(x6)  # (B, 512, H/32, W/32)
        d1 = self.depth_decoder1(x7, x6)  # (B, 256, H/16, W/16)
        d2 = self.depth_decoder2(d1, x5) + m1  # (B, 128, H/8, W/8)
        d3 = self.depth_decoder3(d2, x4) + m2  # (B, 64, H/4, W/4)
        d4 = self.depth_decoder4(d3, x3) + x3  # (B, 32, H/2, W/2)
        d5 = self.depth_decoder5(d4, bg_fg_features)  # (B, 16, H, W)
        depth = self.depth_head(d5)  # (B, 1, H, W)
        return {"mask": mask_logits, "depth": depth}


MODELS: dict[str, type[nn.Module]] = {"masknet": MaskNet, "depthnet": DepthNet}
MODEL_SIZE_MULTIPLE: dict[str, int] = {name: cls.size_multiple for name, cls in MODELS.items()}


def make_model(name: str) -> nn.Module:
    """Return a new model by name ("masknet" or "depthnet"); UserError on an unknown name."""
    key = str(name).strip().lower()
    if key not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[key]()


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters (trainable or not) in `model`."""
    return sum(p.numel() for p in model.parameters())


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain model inside DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)
