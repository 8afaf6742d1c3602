"""Metrics: hand examples, a numpy reference, and accumulation over batches equal to one concatenated batch."""

import math

import numpy as np
import pytest
import torch

from lib.errors import UserError
from lib.losses import ssim
from lib.metrics import (
    Metrics,
    align_depth,
    classical_mask_baseline,
    depth_absrel,
    depth_absrel_aligned,
    depth_delta1,
    depth_delta1_aligned,
    depth_mae,
    depth_rmse,
    depth_rmse_aligned,
    depth_ssim_per_image,
    mask_dice_per_image,
    mask_iou_per_image,
    mask_iou_total,
    scale_to_truth,
)

BIG = 10.0  # a logit far from the 0.5 threshold


def as_logits(binary):
    """{0, 1} tensor -> logits of +-BIG."""
    return BIG * (2 * binary.float() - 1)


def row(*values):
    """(1, 1, 1, N) float tensor."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


# ---------------------------------------------------------------- mask


def test_iou_and_dice_hand_example():
    preds, target = row(1, 1, 0, 0), row(1, 0, 1, 0)  # intersection 1, union 3, |P| + |T| = 4
    assert mask_iou_per_image(as_logits(preds), target).item() == pytest.approx(1 / 3)
    assert mask_dice_per_image(as_logits(preds), target).item() == pytest.approx(0.5)


def test_empty_vs_empty_counts_one_and_empty_vs_full_zero():
    empty, full = row(0, 0, 0, 0), row(1, 1, 1, 1)
    assert mask_iou_per_image(as_logits(empty), empty).item() == 1.0
    assert mask_dice_per_image(as_logits(empty), empty).item() == 1.0
    assert mask_iou_total(as_logits(empty), empty).item() == 1.0
    assert mask_iou_per_image(as_logits(empty), full).item() == 0.0
    assert mask_iou_per_image(as_logits(full), empty).item() == 0.0


def test_threshold_is_on_probability_one_half():
    logits = row(-0.1, 0.0, 0.1, 3.0)  # sigmoid: < 0.5, 0.5 (not above), > 0.5, > 0.5
    assert mask_iou_per_image(logits, row(0, 0, 1, 1)).item() == 1.0


def numpy_mask_reference(logits, target):
    """Independent per-image IoU, Dice and total IoU with numpy."""
    preds = 1 / (1 + np.exp(-logits.numpy().astype(np.float64))) > 0.5
    truth = target.numpy() > 0.5
    axes = (1, 2, 3)
    inter = (preds & truth).sum(axis=axes)
    union = (preds | truth).sum(axis=axes)
    sizes = preds.sum(axis=axes) + truth.sum(axis=axes)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    dice = np.where(sizes > 0, 2 * inter / np.maximum(sizes, 1), 1.0)
    return iou, dice, inter.sum() / union.sum()


def test_mask_metrics_match_numpy_on_random_masks():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, 16, 16, generator=generator)
    target = (torch.rand(6, 1, 16, 16, generator=generator) > 0.6).float()
    target[0] = 0
    logits[0] = -1  # one empty-empty image
    iou, dice, total = numpy_mask_reference(logits, target)
    np.testing.assert_allclose(mask_iou_per_image(logits, target).numpy(), iou, rtol=1e-12)
    np.testing.assert_allclose(mask_dice_per_image(logits, target).numpy(), dice, rtol=1e-12)
    assert mask_iou_total(logits, target).item() == pytest.approx(total, rel=1e-12)


# ---------------------------------------------------------------- depth


def test_depth_hand_example():
    truth = row(0.5, 0.5, 0.005, 0.2)  # the third pixel is below 0.01: not valid for AbsRel / delta1
    preds = row(0.5, 0.7, 0.9, 0.0)  # ratios: 1 (hit), 1.4 (miss), -, p = 0 (miss)
    assert depth_absrel(preds, truth).item() == pytest.approx((0 + 0.2 / 0.5 + 0.2 / 0.2) / 3)
    assert depth_delta1(preds, truth).item() == pytest.approx(1 / 3)
    assert depth_mae(preds, truth).item() == pytest.approx((0 + 0.2 + 0.895 + 0.2) / 4, rel=1e-6)
    assert depth_rmse(preds, truth).item() == pytest.approx(math.sqrt((0.04 + 0.895**2 + 0.04) / 4), rel=1e-6)


def test_depth_predictions_are_clamped_to_unit_range():
    truth, preds = row(1.0, 0.0, 0.5), row(1.7, -0.4, 0.5)
    assert depth_rmse(preds, truth).item() == 0.0
    assert depth_delta1(preds, truth).item() == 1.0


def test_delta1_boundary_is_strict():
    truth = row(0.4, 0.4)
    preds = row(0.4 * 1.2, 0.4 * 1.3)  # ratio 1.2 counts, 1.3 does not
    assert depth_delta1(preds, truth).item() == pytest.approx(0.5)


def numpy_scaled_depth(preds, depth):
    """Independent reference: per image, the least-squares factor over pixels with g > 0.01, then RMSE and delta1."""
    p = np.clip(preds.numpy().astype(np.float64), 0, 1)
    g = depth.numpy().astype(np.float64)
    scaled = np.empty_like(p)
    for i in range(p.shape[0]):
        v = g[i] > 0.01
        factor, *_ = np.linalg.lstsq(p[i][v].reshape(-1, 1), g[i][v], rcond=None)
        scaled[i] = np.clip(p[i] * factor[0], 0, 1)
    valid = g > 0.01
    with np.errstate(divide="ignore"):
        ratio = np.maximum(scaled[valid] / g[valid], g[valid] / scaled[valid])
    return np.sqrt(((scaled - g) ** 2).mean()), (ratio < 1.25).mean()


def test_scaled_depth_metrics_ignore_one_factor_per_image():
    generator = torch.Generator().manual_seed(1)
    truth = 0.05 + 0.6 * torch.rand(3, 1, 8, 8, generator=generator)
    preds = truth * torch.tensor([0.7, 1.0, 1.4]).view(3, 1, 1, 1)  # right shape, wrong scale in images 0 and 2
    torch.testing.assert_close(scale_to_truth(preds, truth), truth)
    metrics = Metrics()
    metrics.update({"mask": torch.zeros(3, 1, 8, 8), "depth": preds}, {"mask": torch.zeros(3, 1, 8, 8), "depth": truth})
    got = metrics.compute()
    assert got["depth_delta1"] == pytest.approx(1 / 3) and got["depth_rmse"] > 0.05  # the scale errors count here
    assert got["depth_delta1_scaled"] == 1.0 and got["depth_rmse_scaled"] < 1e-6  # and not here
    assert torch.equal(scale_to_truth(torch.zeros(1, 1, 2, 2), truth[:1, :, :2, :2]), torch.zeros(1, 1, 2, 2))


def numpy_aligned_depth(preds, depth):
    """Independent reference: per image, lstsq of [p, 1] -> g over valid pixels; then RMSE, AbsRel, delta1 over
    all valid pixels of the batch."""
    p, g = preds.numpy().astype(np.float64), depth.numpy().astype(np.float64)
    errors, rels, hits = [], [], []
    for pi, gi in zip(p, g):
        valid = gi > 0.01
        design = np.stack([pi[valid], np.ones(valid.sum())], 1)
        (scale, shift), *_ = np.linalg.lstsq(design, gi[valid], rcond=None)
        a = np.clip(scale * pi[valid] + shift, 0, 1)
        errors.append(a - gi[valid])
        rels.append(np.abs(a - gi[valid]) / gi[valid])
        with np.errstate(divide="ignore"):
            hits.append(np.maximum(a / gi[valid], gi[valid] / a) < 1.25)
    errors, rels, hits = np.concatenate(errors), np.concatenate(rels), np.concatenate(hits)
    return np.sqrt((errors**2).mean()), rels.mean(), hits.mean()


def test_aligned_depth_metrics_match_numpy_lstsq():
    generator = torch.Generator().manual_seed(5)
    truth = torch.rand(4, 1, 12, 10, generator=generator)
    truth[truth < 0.1] = 0  # some invalid pixels: left out of the fit and of the metrics
    preds = 3 * torch.randn(4, 1, 12, 10, generator=generator) - 1  # raw, far outside [0, 1]
    preds = preds + 5 * truth  # some signal, so that the fit is not flat
    rmse, absrel, delta1 = numpy_aligned_depth(preds, truth)
    assert depth_rmse_aligned(preds, truth).item() == pytest.approx(rmse, rel=1e-6)
    assert depth_absrel_aligned(preds, truth).item() == pytest.approx(absrel, rel=1e-6)
    assert depth_delta1_aligned(preds, truth).item() == pytest.approx(delta1, rel=1e-9)
    assert 0 < delta1 < 1  # the test case is not degenerate


def test_aligned_depth_undoes_scale_and_shift_by_hand():
    truth = torch.tensor([[0.2, 0.4], [0.6, 0.0]]).view(1, 1, 2, 2)  # one invalid pixel (0)
    preds = 2 * truth + 1
    preds[0, 0, 1, 1] = 50.0  # the invalid pixel's prediction must not enter the fit
    assert depth_absrel_aligned(preds, truth).item() == pytest.approx(0, abs=1e-6)  # float32 rounding
    assert depth_delta1_aligned(preds, truth).item() == 1.0
    assert depth_rmse_aligned(preds, truth).item() == pytest.approx(0, abs=1e-6)
    assert depth_absrel(preds, truth).item() > 0.5  # unaligned, the same prediction is far off
    # a flat prediction cannot be scaled: it becomes the mean valid truth
    torch.testing.assert_close(align_depth(torch.full_like(truth, 3.0), truth), torch.full_like(truth, 0.4))


# ---------------------------------------------------------------- accumulator


def make_batches(sizes=(3, 2, 4), height=16, width=16, seed=0):
    """Random outputs/batches of the given sizes, with one empty-empty mask."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for size in sizes:
        target = (torch.rand(size, 1, height, width, generator=generator) > 0.7).float()
        logits = 4 * torch.randn(size, 1, height, width, generator=generator) + 4 * (target - 0.5)
        depth = torch.rand(size, 1, height, width, generator=generator)
        preds = depth + 0.2 * torch.randn(size, 1, height, width, generator=generator)  # some outside [0, 1]
        pairs.append(({"mask": logits, "depth": preds}, {"mask": target, "depth": depth}))
    pairs[0][1]["mask"][0] = 0
    pairs[0][0]["mask"][0] = -1
    return pairs


def concatenate(pairs):
    """One big (outputs, batch) from a list of them."""
    outputs = {key: torch.cat([o[key] for o, _ in pairs]) for key in pairs[0][0]}
    batch = {key: torch.cat([b[key] for _, b in pairs]) for key in pairs[0][1]}
    return outputs, batch


def test_accumulated_metrics_equal_metrics_on_the_concatenated_batch():
    pairs = make_batches()
    metrics = Metrics()
    for outputs, batch in pairs:
        metrics.update(outputs, batch)
    got = metrics.compute()

    outputs, batch = concatenate(pairs)
    preds, depth = outputs["depth"], batch["depth"]
    iou, dice, total = numpy_mask_reference(outputs["mask"], batch["mask"])
    expected = {
        "samples": 9,
        "mask_iou": iou.mean(),
        "mask_iou_total": total,
        "mask_dice": dice.mean(),
        "depth_rmse": depth_rmse(preds, depth).item(),
        "depth_mae": depth_mae(preds, depth).item(),
        "depth_absrel": depth_absrel(preds, depth).item(),
        "depth_delta1": depth_delta1(preds, depth).item(),
        "depth_ssim": ssim(preds.clamp(0, 1), depth).mean().item(),
    }
    expected["depth_rmse_scaled"], expected["depth_delta1_scaled"] = numpy_scaled_depth(preds, depth)
    aligned = numpy_aligned_depth(preds, depth)
    expected["depth_rmse_aligned"], expected["depth_absrel_aligned"], expected["depth_delta1_aligned"] = aligned
    assert set(got) == set(expected)
    assert got["samples"] == 9
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_depth_metrics_match_numpy():
    outputs, batch = concatenate(make_batches())
    p = np.clip(outputs["depth"].numpy().astype(np.float64), 0, 1)
    g = batch["depth"].numpy().astype(np.float64)
    valid = g > 0.01
    pv, gv = p[valid], g[valid]
    with np.errstate(divide="ignore"):
        ratio = np.maximum(pv / gv, gv / pv)
    preds, depth = outputs["depth"], batch["depth"]
    assert depth_rmse(preds, depth).item() == pytest.approx(np.sqrt(((p - g) ** 2).mean()), rel=1e-5)
    assert depth_mae(preds, depth).item() == pytest.approx(np.abs(p - g).mean(), rel=1e-5)
    assert depth_absrel(preds, depth).item() == pytest.approx((np.abs(pv - gv) / gv).mean(), rel=1e-5)
    assert depth_delta1(preds, depth).item() == pytest.approx((ratio < 1.25).mean(), rel=1e-6)


def test_totals_sum_like_all_reduce():
    pairs = make_batches(sizes=(2, 3, 1, 4))
    whole, first, second = Metrics(), Metrics(), Metrics()
    for index, (outputs, batch) in enumerate(pairs):
        whole.update(outputs, batch)
        (first if index % 2 == 0 else second).update(outputs, batch)
    assert whole.totals.dim() == 1 and whole.totals.dtype == torch.float64
    first.totals += second.totals  # what dist.all_reduce(SUM) does across two ranks
    merged, expected = first.compute(), whole.compute()
    for key in expected:
        assert merged[key] == pytest.approx(expected[key], rel=1e-9), key


def test_reset_and_empty_compute():
    metrics = Metrics()
    outputs, batch = make_batches(sizes=(2,))[0]
    metrics.update(outputs, batch)
    metrics.reset()
    assert metrics.totals.abs().sum().item() == 0
    result = metrics.compute()
    assert result["samples"] == 0 and math.isnan(result["mask_iou"]) and math.isnan(result["depth_rmse"])


def test_mask_only_metrics():
    outputs, batch = make_batches(sizes=(2,))[0]
    metrics = Metrics(with_depth=False)
    metrics.update({"mask": outputs["mask"]}, {"mask": batch["mask"]})
    result = metrics.compute()
    assert set(result) == {"samples", "mask_iou", "mask_iou_total", "mask_dice"}
    with pytest.raises(UserError, match="with_depth=False"):
        Metrics().update({"mask": outputs["mask"]}, batch)


def test_update_accepts_bf16_outputs():
    outputs, batch = make_batches(sizes=(2,))[0]
    got = Metrics()
    got.update({key: value.to(torch.bfloat16).float() for key, value in outputs.items()}, batch)
    low = Metrics()
    low.update({key: value.to(torch.bfloat16) for key, value in outputs.items()}, batch)
    assert low.compute() == got.compute()


def test_depth_ssim_per_image_clamps_predictions():
    truth = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(depth_ssim_per_image(truth + 5, truth), ssim(torch.ones_like(truth), truth))


# ---------------------------------------------------------------- classical baseline


def test_classical_mask_baseline_hand_example():
    bg = torch.zeros(1, 3, 2, 2)
    bg_fg = bg.clone()
    bg_fg[0, 1, 0, 0] = 0.5  # a large change in one channel
    bg_fg[0, :, 1, 1] = 0.05  # a small change in every channel
    mask = classical_mask_baseline(bg, bg_fg, threshold=0.1)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 2, 2)
    assert mask.flatten().tolist() == [True, False, False, False]


def test_no_valid_depth_pixel_gives_nan_in_functions_and_metrics_alike():
    preds, depth = torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, 1, 2, 2)  # no pixel with g > 0.01
    for metric in (depth_absrel, depth_delta1, depth_absrel_aligned, depth_delta1_aligned, depth_rmse_aligned):
        assert math.isnan(metric(preds, depth).item()), metric.__name__
    assert depth_rmse(preds, depth).item() == pytest.approx(0.5)  # over all pixels: defined
    metrics = Metrics()
    metrics.update({"mask": torch.zeros(1, 1, 2, 2), "depth": preds}, {"mask": torch.zeros(1, 1, 2, 2), "depth": depth})
    result = metrics.compute()
    assert result["depth_rmse"] == pytest.approx(0.5) and result["depth_mae"] == pytest.approx(0.5)
    assert all(math.isnan(result[key]) for key in ("depth_absrel", "depth_delta1_scaled", "depth_absrel_aligned"))
