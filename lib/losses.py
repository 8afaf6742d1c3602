"""Mask and depth losses: pure functions, small modules over them, and named combinations.

Every function computes in float32 (inputs are cast with .float(), autocast is off inside SSIM),
so losses stay accurate when the forward pass ran under torch.autocast.
Mask terms only ever see outputs["mask"] vs batch["mask"]; depth terms only outputs["depth"] vs batch["depth"].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lib.errors import UserError

__all__ = [
    "bce_loss",
    "rmse_loss",
    "ssim",
    "ssim_loss",
    "dice_loss",
    "lovasz_hinge_loss",
    "fit_scale_shift",
    "ssi_loss",
    "BCELoss",
    "RMSELoss",
    "SSIMLoss",
    "DiceLoss",
    "LovaszHingeLoss",
    "SSILoss",
    "CombinedLoss",
    "LOSSES",
    "DEFAULT_LOSS",
    "make_loss",
    "valid_losses",
]


DEPTH_VALID_MIN = 0.01  # truth at or below this is "no depth": AbsRel, delta1, the aligned fit and ssi skip it

# ---------------------------------------------------------------- pure functions


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of logits (B, 1, H, W), any real, against target (B, 1, H, W) in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def rmse_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """sqrt(mean squared error + eps) of pred vs target, both (B, 1, H, W); eps keeps the gradient finite at 0."""
    return torch.sqrt(F.mse_loss(pred.float(), target.float()) + eps)


def gaussian_window(window_size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Return a normalised 1-D gaussian window (window_size,) that sums to 1."""
    coords = torch.arange(window_size, dtype=dtype, device=device) - (window_size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Per-image SSIM (B,) of pred vs target (B, C, H, W) with values spanning `data_range`; 1 means identical.

    Computed in float32 (float64 if an input is float64). Gaussian window, C1=(0.01*L)^2, C2=(0.03*L)^2,
    population (co)variances, 'valid' filtering, mean over channels and positions: matches skimage's
    structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L).
    Images smaller than the window use the largest odd window that fits.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"ssim expects two (B, C, H, W) tensors of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    window_size = min(window_size, *pred.shape[-2:])
    window_size -= 1 - window_size % 2  # keep it odd
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    with torch.autocast(device_type=pred.device.type, enabled=False):
        dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
        x, y = pred.to(dtype), target.to(dtype)
        stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
        groups = stacked.shape[1]
        window = gaussian_window(window_size, sigma, device=x.device, dtype=dtype)
        rows = window.view(1, 1, -1, 1).repeat(groups, 1, 1, 1)  # (5C, 1, k, 1)
        cols = window.view(1, 1, 1, -1).repeat(groups, 1, 1, 1)  # (5C, 1, 1, k)
        blurred = F.conv2d(F.conv2d(stacked, rows, groups=groups), cols, groups=groups)  # (B, 5C, H-k+1, W-k+1)
        mu_x, mu_y, xx, yy, xy = blurred.chunk(5, dim=1)  # each (B, C, H-k+1, W-k+1)
        var_x = xx - mu_x * mu_x
        var_y = yy - mu_y * mu_y
        cov_xy = xy - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
            (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
        )
        return ssim_map.flatten(1).mean(dim=1)  # (B,)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """1 - mean SSIM of pred vs target (B, C, H, W); 0 for identical images, up to 2 (SSIM can be negative)."""
    return 1 - ssim(pred, target, **kwargs).mean()


def dice_loss(
    logits_or_probs: torch.Tensor, target: torch.Tensor, from_logits: bool = True, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss in [0, 1] over the whole batch: 1 - (2*sum(p*t) + smooth) / (sum(p) + sum(t) + smooth).

    logits_or_probs (B, 1, H, W): logits if from_logits else probabilities in [0, 1]; target (B, 1, H, W) in [0, 1].
    """
    probs = torch.sigmoid(logits_or_probs.float()) if from_logits else logits_or_probs.float()
    target = target.float()
    intersection = (probs * target).sum()
    cardinality = probs.sum() + target.sum()
    return 1 - (2 * intersection + smooth) / (cardinality + smooth)


def lovasz_hinge_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge (Berman, Triki and Blaschko, CVPR 2018), per image, averaged over the batch: a convex surrogate
    of 1 - IoU of the foreground, for logits (B, 1, H, W) and a binary target (B, 1, H, W).

    Each pixel's hinge error is 1 - logit * (+1 foreground, -1 background); sorted from largest, the errors are
    weighted by how much each one, added in turn, raises 1 - IoU. Where the errors are exactly 0 (right, margin
    at least 1) or 1 (logit 0), the loss is 1 - IoU of the foreground with those pixels wrong.
    All images at once: one sort of (B, H*W); an image without foreground gives its largest hinge error.
    """
    logits, target = logits.float().flatten(1), target.float().flatten(1)  # (B, N)
    errors = 1.0 - logits * (2.0 * target - 1.0)
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    truth = target.gather(1, order)  # (B, N), the targets in error order
    foreground = truth.sum(1, keepdim=True)
    jaccard = 1.0 - (foreground - truth.cumsum(1)) / (foreground + (1.0 - truth).cumsum(1))  # 1 - IoU after k errors
    weights = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], 1)  # its increments
    return (F.relu(errors_sorted) * weights).sum(1).mean()


def fit_scale_shift(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the scale s (B,) and shift t (B,) that minimise sum((s pred + t - target)^2) over `valid` pixels;
    pred, target (B, 1, H, W) in one float dtype, valid (B, 1, H, W) bool. Differentiable in pred.

    A flat prediction (no scale to fit) gets s = 0, t = the mean valid target; no valid pixel: s = 1, t = 0.
    """
    weight = valid.to(pred.dtype)
    n = weight.flatten(1).sum(1)  # (B,)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (x * weight).flatten(1).sum(1) / n.clamp_min(1)  # (B,), over valid pixels

    mean_p, mean_g = mean(pred), mean(target)
    centred = pred - mean_p.view(-1, 1, 1, 1)  # centred first: float32 sums of p^2 would cancel
    var_p, cov = mean(centred * centred), mean(centred * (target - mean_g.view(-1, 1, 1, 1)))
    flat = var_p <= 1e-9 * mean(pred * pred).clamp_min(1e-30)  # a constant prediction leaves only rounding
    scale = torch.where(flat, torch.zeros_like(var_p), cov / torch.where(flat, torch.ones_like(var_p), var_p))
    shift = mean_g - scale * mean_p
    scale = torch.where(n > 0, scale, torch.ones_like(scale))
    shift = torch.where(n > 0, shift, torch.zeros_like(shift))
    return scale, shift


def ssi_loss(pred: torch.Tensor, target: torch.Tensor, scales: int = 4, alpha: float = 0.5) -> torch.Tensor:
    """Scale-and-shift-invariant depth loss of MiDaS (Ranftl et al., TPAMI 2020), in depth space, scalar >= 0.

    pred (B, 1, H, W) raw, target (B, 1, H, W) in [0, 1]. Per image, s and t are fitted by least squares over
    valid pixels (target > DEPTH_VALID_MIN); the loss is the mean |s pred + t - target| over valid pixels plus
    `alpha` times the gradient-matching term: the mean |d/dx r| + |d/dy r| of the residual r = s pred + t - target
    at `scales` scales (each half the last), so edges must sit where the truth has them. A photo shows the room's
    shape, not its size: this is what the aligned metrics (`depth_delta1_aligned`) score.
    """
    pred, target = pred.float(), target.float()
    valid = target > DEPTH_VALID_MIN
    scale, shift = fit_scale_shift(pred, target, valid)
    weight = valid.float()
    residual = (pred * scale.view(-1, 1, 1, 1) + shift.view(-1, 1, 1, 1) - target) * weight  # (B, 1, H, W)
    loss = residual.abs().sum() / weight.sum().clamp_min(1)
    for k in range(scales):
        r, w = residual[..., :: 2**k, :: 2**k], weight[..., :: 2**k, :: 2**k]  # (B, 1, H / 2^k, W / 2^k)
        dx = (r[..., :, 1:] - r[..., :, :-1]).abs() * w[..., :, 1:] * w[..., :, :-1]
        dy = (r[..., 1:, :] - r[..., :-1, :]).abs() * w[..., 1:, :] * w[..., :-1, :]
        loss = loss + alpha * (dx.sum() + dy.sum()) / w.sum().clamp_min(1)
    return loss


# ---------------------------------------------------------------- modules


class BCELoss(nn.Module):
    """Module form of bce_loss: logits (B, 1, H, W) vs target (B, 1, H, W) in [0, 1] -> scalar."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the mean binary cross-entropy."""
        return bce_loss(logits, target)


class RMSELoss(nn.Module):
    """Module form of rmse_loss: pred vs target (B, 1, H, W) -> scalar >= 0."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return sqrt(MSE + eps)."""
        return rmse_loss(pred, target, eps=self.eps)


class SSIMLoss(nn.Module):
    """Module form of ssim_loss: pred vs target (B, C, H, W) in a range of width data_range -> scalar in [0, 2]."""

    def __init__(self, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> None:
        super().__init__()
        self.window_size, self.sigma, self.data_range = window_size, sigma, data_range

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return 1 - mean SSIM."""
        return ssim_loss(pred, target, window_size=self.window_size, sigma=self.sigma, data_range=self.data_range)


class DiceLoss(nn.Module):
    """Module form of dice_loss: logits (or probabilities) (B, 1, H, W) vs target in [0, 1] -> scalar in [0, 1]."""

    def __init__(self, from_logits: bool = True, smooth: float = 1.0) -> None:
        super().__init__()
        self.from_logits, self.smooth = from_logits, smooth

    def forward(self, logits_or_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the soft Dice loss."""
        return dice_loss(logits_or_probs, target, from_logits=self.from_logits, smooth=self.smooth)


class LovaszHingeLoss(nn.Module):
    """Module form of lovasz_hinge_loss: logits (B, 1, H, W) vs a binary target (B, 1, H, W) -> scalar."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the per-image Lovasz hinge, averaged."""
        return lovasz_hinge_loss(logits, target)


class SSILoss(nn.Module):
    """Module form of ssi_loss: raw pred vs target (B, 1, H, W) in [0, 1] -> scalar >= 0."""

    def __init__(self, scales: int = 4, alpha: float = 0.5) -> None:
        super().__init__()
        self.scales, self.alpha = scales, alpha

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the aligned mean absolute error plus alpha x gradient matching."""
        return ssi_loss(pred, target, scales=self.scales, alpha=self.alpha)


# ---------------------------------------------------------------- named combinations

# term name -> (output/batch key it reads, factory). Mask terms read "mask", depth terms read "depth".
TERMS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "bce": ("mask", BCELoss),
    "dice": ("mask", DiceLoss),
    "lovasz": ("mask", LovaszHingeLoss),
    "rmse": ("depth", RMSELoss),
    "ssim": ("depth", SSIMLoss),
    "ssi": ("depth", SSILoss),
}

# loss name -> {term: weight}. "bce_rmse" is the original recipe: BCE(mask) + 2 x RMSE(depth).
LOSSES: dict[str, dict[str, float]] = {
    "bce": {"bce": 1.0},
    "dice": {"dice": 1.0},
    "bce_dice": {"bce": 1.0, "dice": 1.0},
    "bce_rmse": {"bce": 1.0, "rmse": 2.0},
    "bce_ssim": {"bce": 1.0, "ssim": 1.0},
    "bce_rmse_ssim": {"bce": 1.0, "rmse": 2.0, "ssim": 1.0},
    "dice_rmse": {"dice": 1.0, "rmse": 2.0},
    "bce_dice_rmse": {"bce": 1.0, "dice": 1.0, "rmse": 2.0},
    "bce_dice_rmse_ssim": {"bce": 1.0, "dice": 1.0, "rmse": 2.0, "ssim": 1.0},
    "bce_lovasz": {"bce": 1.0, "lovasz": 1.0},
    "bce_lovasz_rmse": {"bce": 1.0, "lovasz": 1.0, "rmse": 2.0},
    "bce_lovasz_rmse_ssi": {"bce": 1.0, "lovasz": 1.0, "rmse": 2.0, "ssi": 4.0},
}

DEFAULT_LOSS: dict[str, str] = {"masknet": "bce", "depthnet": "bce_rmse"}


class CombinedLoss(nn.Module):
    """Weighted sum of mask and depth terms: (outputs, batch) -> (loss scalar, {term: detached scalar})."""

    def __init__(self, weights: dict[str, float], name: str = "") -> None:
        super().__init__()
        self.name = name or "_".join(weights)
        self.weights = dict(weights)
        self.keys = {term: TERMS[term][0] for term in weights}
        self.terms = nn.ModuleDict({term: TERMS[term][1]() for term in weights})

    def forward(
        self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (sum of weight * term, parts) where parts holds each unweighted term, detached."""
        total = None
        parts: dict[str, torch.Tensor] = {}
        for term, module in self.terms.items():
            key = self.keys[term]
            if key not in outputs:
                raise UserError(f"loss {self.name!r} needs a {key!r} output; the model returned only {sorted(outputs)}")
            value = module(outputs[key], batch[key])
            parts[term] = value.detach()
            weighted = self.weights[term] * value
            total = weighted if total is None else total + weighted
        return total, parts

    def extra_repr(self) -> str:
        """Show the weights in print(loss_fn)."""
        return " + ".join(f"{w:g} x {t}({self.keys[t]})" for t, w in self.weights.items())


def valid_losses(model_name: str) -> list[str]:
    """Return the loss names that fit a model: mask-only losses for masknet, all of them for depthnet."""
    if model_name == "depthnet":
        return list(LOSSES)
    return [name for name, weights in LOSSES.items() if all(TERMS[t][0] == "mask" for t in weights)]


def make_loss(name: str, model_name: str) -> CombinedLoss:
    """Return loss_fn(outputs, batch) -> (loss, parts) for a named loss; UserError if it does not fit the model."""
    model_key = str(model_name).strip().lower()
    if model_key not in DEFAULT_LOSS:
        raise UserError(f"unknown model {model_name!r}; choose one of: {', '.join(DEFAULT_LOSS)}")
    key = str(name).strip().lower()
    choices = valid_losses(model_key)
    if key not in choices:
        if key in LOSSES:
            reason = f"loss {name!r} needs a depth output, which {model_key} does not have;"
        else:
            reason = f"unknown loss {name!r};"
        raise UserError(f"{reason} for {model_key} choose one of: {', '.join(choices)}")
    return CombinedLoss(LOSSES[key], name=key)
