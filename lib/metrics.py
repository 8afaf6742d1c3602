"""Mask IoU/Dice and depth RMSE/MAE/AbsRel/delta1/SSIM: per-batch sums added up on the device, reduced once.

Depth also gets RMSE and delta1 after one least-squares scale per image (`depth_rmse_scaled`,
`depth_delta1_scaled`): how right the depth's shape is when the room's absolute size, which a single
photo only hints at, is set aside. The MiDaS / Depth Anything convention goes further: one least-squares
scale AND shift per image, in depth space, over valid pixels (`align_depth`), then AbsRel, delta1 and RMSE
over valid pixels (`depth_absrel_aligned`, `depth_delta1_aligned`, `depth_rmse_aligned`): what a model can
know from one photo once the room's scale and offset are set aside.
"""

from __future__ import annotations

import math

import torch

from lib.errors import UserError
from lib.losses import DEPTH_VALID_MIN, fit_scale_shift, ssim

__all__ = [
    "DEPTH_VALID_MIN",
    "DELTA1_RATIO",
    "mask_intersection_union",
    "count_mask_overlap",
    "mask_iou_per_image",
    "mask_dice_per_image",
    "mask_iou_total",
    "depth_rmse",
    "depth_mae",
    "depth_absrel",
    "depth_delta1",
    "scale_to_truth",
    "align_depth",
    "depth_aligned_sums",
    "depth_metric_from_sums",
    "DEPTH_RATIOS",
    "depth_absrel_aligned",
    "depth_delta1_aligned",
    "depth_rmse_aligned",
    "depth_ssim_per_image",
    "classical_mask_baseline",
    "Metrics",
]

DELTA1_RATIO = 1.25  # delta1: share of valid pixels with max(p/g, g/p) below this


# ---------------------------------------------------------------- mask


def binarize(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Return sigmoid(logits) > threshold as bool, same shape."""
    return torch.sigmoid(logits.float()) > threshold


def count_mask_overlap(preds: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image counts (B,): |P & T|, |P | T|, |P| + |T| for bool masks P = preds, T = truth (B, 1, H, W)."""
    preds, truth = preds.flatten(1), truth.flatten(1)  # (B, HW)
    intersection = (preds & truth).sum(dim=1)
    union = (preds | truth).sum(dim=1)
    total = preds.sum(dim=1) + truth.sum(dim=1)
    return intersection, union, total


def mask_intersection_union(
    logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image counts (B,): |P & T|, |P | T|, |P| + |T| for P = sigmoid(logits) > threshold, T = target > 0.5."""
    return count_mask_overlap(binarize(logits, threshold), target > 0.5)


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums, except on mps, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def iou_from_counts(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """IoU (B,) from pixel counts (B,); 1 where the union is empty."""
    iou = intersection.to(sum_dtype(intersection.device)) / union.clamp_min(1)
    return torch.where(union > 0, iou, torch.ones_like(iou))


def dice_from_counts(intersection: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Dice (B,) from pixel counts (B,), total = |P| + |T|; 1 where both masks are empty."""
    dice = 2 * intersection.to(sum_dtype(intersection.device)) / total.clamp_min(1)
    return torch.where(total > 0, dice, torch.ones_like(dice))


def mask_iou_per_image(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU (B,) in [0, 1] of thresholded logits (B, 1, H, W) vs target (B, 1, H, W) in {0, 1}; empty vs empty = 1."""
    intersection, union, _ = mask_intersection_union(logits, target, threshold)
    return iou_from_counts(intersection, union)


def mask_dice_per_image(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Dice (B,) in [0, 1] of thresholded logits (B, 1, H, W) vs target (B, 1, H, W) in {0, 1}; empty vs empty = 1."""
    intersection, _, total = mask_intersection_union(logits, target, threshold)
    return dice_from_counts(intersection, total)


def mask_iou_total(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Scalar in [0, 1]: total intersection / total union over all images of the batch (1 if both are empty)."""
    intersection, union, _ = mask_intersection_union(logits, target, threshold)
    return iou_from_counts(intersection.sum(), union.sum())


# ---------------------------------------------------------------- depth


def depth_sums(preds: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sums (6,) over a batch of depth preds and target (B, 1, H, W): preds clamped to [0, 1], target in [0, 1].

    [pixels, squared error, absolute error, AbsRel over valid, valid pixels (target > 0.01), delta1 hits];
    float64 (float32 on mps) unless `dtype` says otherwise.
    """
    dtype = dtype or sum_dtype(target.device)
    pred = preds.detach().float().clamp(0, 1)
    truth = target.detach().float()
    error = pred - truth
    valid = truth > DEPTH_VALID_MIN
    safe_truth = torch.where(valid, truth, torch.ones_like(truth))
    ratio = torch.maximum(pred / safe_truth, safe_truth / pred.clamp_min(1e-12))  # p = 0 gives a huge ratio
    hits = valid & (ratio < DELTA1_RATIO)
    absrel = torch.where(valid, error.abs() / safe_truth, torch.zeros_like(truth))
    return torch.stack(
        [
            torch.full((), float(truth.numel()), dtype=dtype, device=truth.device),  # a fill, not a host copy
            error.square().sum(dtype=dtype),
            error.abs().sum(dtype=dtype),
            absrel.sum(dtype=dtype),
            valid.sum().to(dtype),
            hits.sum().to(dtype),
        ]
    )


def scale_to_truth(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """preds (B, 1, H, W) clamped to [0, 1], each image times the one factor s that minimises
    sum((s p - g)^2) over its pixels with g > 0.01, clamped to [0, 1] again (an all-zero prediction stays 0)."""
    pred = preds.detach().float().clamp(0, 1)
    truth = target.detach().float()
    valid = (truth > DEPTH_VALID_MIN).float()
    num = (pred * truth * valid).flatten(1).sum(1)  # (B,)
    den = (pred * pred * valid).flatten(1).sum(1)  # (B,)
    factor = torch.where(den > 0, num / den.clamp_min(1e-12), torch.ones_like(den))
    return (pred * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def align_depth(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """preds (B, 1, H, W), raw, each image mapped to s * p + t with the scale s and shift t that minimise
    sum((s p + t - g)^2) over its pixels with g > 0.01, then clamped to [0, 1] like the truth (B, 1, H, W).

    A constant prediction (no scale to fit) gets s = 0, t = the mean valid truth; no valid pixel: s = 1, t = 0.
    """
    dtype = sum_dtype(target.device)
    pred, truth = preds.detach().to(dtype), target.detach().to(dtype)
    scale, shift = fit_scale_shift(pred, truth, truth > DEPTH_VALID_MIN)  # (B,) each
    aligned = pred * scale.view(-1, 1, 1, 1) + shift.view(-1, 1, 1, 1)  # (B, 1, H, W)
    return aligned.clamp(0, 1).to(torch.float32)


def depth_aligned_sums(preds: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sums (4,) over a batch after `align_depth`, all over valid pixels (g > 0.01): [valid pixels, squared error,
    AbsRel, delta1 hits]; preds raw (B, 1, H, W), target in [0, 1] (B, 1, H, W)."""
    dtype = dtype or sum_dtype(target.device)
    aligned = align_depth(preds, target)
    truth = target.detach().float()
    valid = truth > DEPTH_VALID_MIN
    safe_truth = torch.where(valid, truth, torch.ones_like(truth))
    error = torch.where(valid, aligned - truth, torch.zeros_like(truth))
    ratio = torch.maximum(aligned / safe_truth, safe_truth / aligned.clamp_min(1e-12))
    return torch.stack(
        [
            valid.sum().to(dtype),
            error.square().sum(dtype=dtype),
            (error.abs() / safe_truth).sum(dtype=dtype),
            (valid & (ratio < DELTA1_RATIO)).sum().to(dtype),
        ]
    )


# The names of what `depth_sums` and `depth_aligned_sums` return, in their order.
DEPTH_SUM_FIELDS = ("pixels", "squared_error", "absolute_error", "absrel_sum", "valid_pixels", "delta1_hits")
ALIGNED_SUM_FIELDS = ("valid_pixels", "aligned_squared_error", "aligned_absrel_sum", "aligned_delta1_hits")

# Every depth metric is one sum over another (its square root for the RMSEs): name -> (numerator, denominator,
# root). The pure functions below and `Metrics.compute` both read this table, so they cannot disagree.
DEPTH_RATIOS = {
    "depth_rmse": ("squared_error", "pixels", True),
    "depth_mae": ("absolute_error", "pixels", False),
    "depth_absrel": ("absrel_sum", "valid_pixels", False),
    "depth_delta1": ("delta1_hits", "valid_pixels", False),
    "depth_ssim": ("ssim_sum", "samples", False),
    "depth_rmse_scaled": ("scaled_squared_error", "pixels", True),
    "depth_delta1_scaled": ("scaled_delta1_hits", "valid_pixels", False),
    "depth_rmse_aligned": ("aligned_squared_error", "valid_pixels", True),
    "depth_absrel_aligned": ("aligned_absrel_sum", "valid_pixels", False),
    "depth_delta1_aligned": ("aligned_delta1_hits", "valid_pixels", False),
}


def depth_metric_from_sums(name: str, sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar: the depth metric `name` (a key of DEPTH_RATIOS) from named 0-d sums; nan when its denominator is 0."""
    numerator, denominator, root = DEPTH_RATIOS[name]
    value = sums[numerator] / sums[denominator]  # 0 / 0 = nan: a denominator is 0 only where its numerator is
    return value.sqrt() if root else value


def _depth_metric_of_batch(name: str, preds: torch.Tensor, target: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """Scalar: the depth metric `name` over one batch, from `depth_aligned_sums` if `aligned`, else `depth_sums`."""
    if aligned:
        sums = dict(zip(ALIGNED_SUM_FIELDS, depth_aligned_sums(preds, target)))
    else:
        sums = dict(zip(DEPTH_SUM_FIELDS, depth_sums(preds, target)))
    return depth_metric_from_sums(name, sums)


def depth_rmse(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar >= 0: sqrt of the mean squared error over all pixels, preds clamped to [0, 1], target (B, 1, H, W)."""
    return _depth_metric_of_batch("depth_rmse", preds, target)


def depth_mae(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar >= 0: mean absolute error over all pixels, preds clamped to [0, 1], target (B, 1, H, W)."""
    return _depth_metric_of_batch("depth_mae", preds, target)


def depth_absrel(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar >= 0: mean |p - g| / g over pixels with g > 0.01 (preds clamped to [0, 1]); nan if there are none."""
    return _depth_metric_of_batch("depth_absrel", preds, target)


def depth_delta1(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar in [0, 1]: share of pixels with g > 0.01 where max(p/g, g/p) < 1.25 (preds clamped to [0, 1])."""
    return _depth_metric_of_batch("depth_delta1", preds, target)


def depth_absrel_aligned(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar >= 0: mean |a - g| / g over pixels with g > 0.01, a = `align_depth(preds, target)`; nan if none."""
    return _depth_metric_of_batch("depth_absrel_aligned", preds, target, aligned=True)


def depth_delta1_aligned(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar in [0, 1]: share of pixels with g > 0.01 where max(a/g, g/a) < 1.25, a = `align_depth(preds, target)`."""
    return _depth_metric_of_batch("depth_delta1_aligned", preds, target, aligned=True)


def depth_rmse_aligned(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Scalar >= 0: sqrt of the mean squared error over pixels with g > 0.01, a = `align_depth(preds, target)`."""
    return _depth_metric_of_batch("depth_rmse_aligned", preds, target, aligned=True)


def depth_ssim_per_image(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM (B,) in [-1, 1] of preds clamped to [0, 1] vs target (B, 1, H, W) in [0, 1]."""
    return ssim(preds.detach().float().clamp(0, 1), target.detach().float(), data_range=1.0)


# ---------------------------------------------------------------- baseline


def classical_mask_baseline(bg: torch.Tensor, bg_fg: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Mask (B, 1, H, W) bool: max over channels of |bg_fg - bg| > threshold, for un-normalised images in [0, 1]."""
    return (bg_fg.float() - bg.float()).abs().amax(dim=-3, keepdim=True) > threshold  # (B, 1, H, W)


# ---------------------------------------------------------------- accumulator

MASK_FIELDS = ("samples", "iou_sum", "dice_sum", "intersection", "union")
# One totals vector: `depth_sums`, SSIM, the scaled error and hits, then `depth_aligned_sums` less its valid pixels.
DEPTH_FIELDS = DEPTH_SUM_FIELDS + ("ssim_sum", "scaled_squared_error", "scaled_delta1_hits") + ALIGNED_SUM_FIELDS[1:]


class Metrics:
    """Accumulate mask (and depth) metric sums over batches in one device tensor; compute() reads it once.

    `totals` is a 1-D float64 tensor (float32 on mps) of sums; all_reduce it (SUM) across ranks before compute().
    """

    def __init__(self, device: torch.device | str | None = None, with_depth: bool = True) -> None:
        self.with_depth = with_depth
        self.fields = MASK_FIELDS + (DEPTH_FIELDS if with_depth else ())
        self.totals = self._zeros(torch.device(device) if device is not None else torch.device("cpu"))

    def _zeros(self, device: torch.device) -> torch.Tensor:
        """Return a zero totals vector on `device`."""
        return torch.zeros(len(self.fields), dtype=sum_dtype(device), device=device)

    def reset(self) -> None:
        """Zero the totals (keeps their device)."""
        self.totals = self._zeros(self.totals.device)

    @torch.no_grad()
    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        """Add one batch: outputs["mask"] logits (B, 1, H, W) vs batch["mask"], depth if with_depth; no host sync."""
        logits, target = outputs["mask"], batch["mask"]
        if self.totals.device != logits.device:
            self.totals = self.totals.to(logits.device, sum_dtype(logits.device))
        dtype = self.totals.dtype
        intersection, union, total = mask_intersection_union(logits, target)
        iou = iou_from_counts(intersection, union).to(dtype)  # (B,)
        dice = dice_from_counts(intersection, total).to(dtype)  # (B,)
        samples = torch.ones_like(iou).sum()
        parts = [torch.stack([samples, iou.sum(), dice.sum(), intersection.sum().to(dtype), union.sum().to(dtype)])]
        if self.with_depth:
            if "depth" not in outputs:
                raise UserError("Metrics(with_depth=True) needs outputs['depth']; use with_depth=False for MaskNet")
            preds, depth = outputs["depth"], batch["depth"]
            parts.append(depth_sums(preds, depth, dtype=dtype))
            parts.append(depth_ssim_per_image(preds, depth).sum().to(dtype).view(1))
            parts.append(depth_sums(scale_to_truth(preds, depth), depth, dtype=dtype)[[1, 5]])
            parts.append(depth_aligned_sums(preds, depth, dtype=dtype)[1:])  # its valid pixels: valid_pixels
        self.totals += torch.cat(parts)

    def compute(self) -> dict[str, float]:
        """Return the metrics over everything seen since reset(); one device-to-host read. nan where undefined."""
        totals = self.totals.double().cpu()  # the one device-to-host read
        t = dict(zip(self.fields, totals.tolist()))
        samples = t["samples"]

        def ratio(num: float, den: float, empty: float = math.nan) -> float:
            """num / den, or `empty` when den is 0."""
            return num / den if den > 0 else empty

        result = {
            "samples": int(round(samples)),
            "mask_iou": ratio(t["iou_sum"], samples),
            "mask_iou_total": ratio(t["intersection"], t["union"], 1.0 if samples else math.nan),
            "mask_dice": ratio(t["dice_sum"], samples),
        }
        if self.with_depth:
            sums = dict(zip(self.fields, totals))
            result.update({name: depth_metric_from_sums(name, sums).item() for name in DEPTH_RATIOS})
        return result
