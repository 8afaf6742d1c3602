"""Losses: hand-computed values on perfect / half / worst inputs, SSIM against skimage, the named registry."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from lib.errors import UserError
from lib.losses import (
    DEFAULT_LOSS,
    LOSSES,
    BCELoss,
    CombinedLoss,
    DiceLoss,
    LovaszHingeLoss,
    RMSELoss,
    SSILoss,
    SSIMLoss,
    bce_loss,
    dice_loss,
    fit_scale_shift,
    lovasz_hinge_loss,
    make_loss,
    rmse_loss,
    ssi_loss,
    ssim,
    ssim_loss,
    valid_losses,
)

C1 = 0.01**2


def half_mask():
    """Target (1, 1, 2, 4): left half 1, right half 0."""
    return torch.tensor([[[[1.0, 1, 0, 0], [1, 1, 0, 0]]]])


# ---------------------------------------------------------------- BCE


def test_bce_at_zero_logits_is_log2():
    assert bce_loss(torch.zeros(1, 1, 2, 4), half_mask()).item() == pytest.approx(math.log(2))


def test_bce_perfect_half_worst():
    target = half_mask()
    confident = 20 * (2 * target - 1)  # +20 where target is 1, -20 where 0
    assert bce_loss(confident, target).item() == pytest.approx(math.log1p(math.exp(-20)), abs=1e-8)
    half_wrong = confident.clone()
    half_wrong[..., 0, :] *= -1  # first row wrong: cost 20 + log1p(e^-20); second row right: log1p(e^-20)
    assert bce_loss(half_wrong, target).item() == pytest.approx(10 + math.log1p(math.exp(-20)), rel=1e-6)
    assert bce_loss(-confident, target).item() == pytest.approx(20 + math.log1p(math.exp(-20)), rel=1e-6)


# ---------------------------------------------------------------- RMSE


def test_rmse_perfect_half_worst():
    target = half_mask()
    assert rmse_loss(target, target).item() == pytest.approx(1e-4)  # sqrt(eps)
    half_off = target.clone()
    half_off[..., 0, :] = 1 - half_off[..., 0, :]  # half the pixels off by 1
    assert rmse_loss(half_off, target).item() == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert rmse_loss(1 - target, target).item() == pytest.approx(1.0, abs=1e-6)
    pred, target = torch.full((1, 1, 2, 2), 0.3), torch.full((1, 1, 2, 2), 0.1)
    assert rmse_loss(pred, target).item() == pytest.approx(0.2, abs=1e-6)


def test_rmse_gradient_is_finite_at_zero_error():
    pred = torch.full((1, 1, 2, 2), 0.5, requires_grad=True)
    rmse_loss(pred, pred.detach()).backward()
    assert torch.isfinite(pred.grad).all()


# ---------------------------------------------------------------- SSIM


def skimage_ssim(pred, target):
    """Reference SSIM per image, (B, C, H, W) -> (B,), via skimage."""
    return np.array(
        [
            structural_similarity(
                p.numpy(),
                t.numpy(),
                channel_axis=0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1.0,
            )
            for p, t in zip(pred.double(), target.double())
        ]
    )


@pytest.mark.parametrize("channels, height, width", [(1, 32, 32), (1, 24, 40), (3, 20, 20)])
def test_ssim_matches_skimage(channels, height, width):
    generator = torch.Generator().manual_seed(channels * height + width)
    target = torch.rand(3, channels, height, width, generator=generator)
    noise = 0.3 * torch.randn(3, channels, height, width, generator=generator)
    pred = (target + noise * torch.tensor([0.1, 1.0, 3.0]).view(3, 1, 1, 1)).clamp(0, 1)  # close, noisy, unrelated
    np.testing.assert_allclose(ssim(pred, target).numpy(), skimage_ssim(pred, target), atol=1e-3)


def test_ssim_hand_values():
    ones, zeros = torch.ones(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    torch.testing.assert_close(ssim(ones * 0.3, ones * 0.3), torch.ones(2))  # identical -> 1
    # constant 0 vs constant 1: means 0 and 1, no variance -> C1 / (1 + C1)
    torch.testing.assert_close(ssim(zeros, ones), torch.full((2,), C1 / (1 + C1)))
    assert ssim_loss(ones, ones).item() == pytest.approx(0.0, abs=1e-6)
    assert ssim_loss(zeros, ones).item() == pytest.approx(1 - C1 / (1 + C1), abs=1e-6)


def test_ssim_small_image_uses_a_smaller_window():
    image = torch.rand(1, 1, 6, 9)
    assert ssim(image, image).item() == pytest.approx(1.0, abs=1e-5)


def test_ssim_stays_float32_under_autocast():
    pred, target = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    expected = ssim(pred, target)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = ssim(pred, target)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- Dice


def test_dice_perfect_half_worst():
    target = half_mask()  # 4 of 8 pixels
    assert dice_loss(target, target, from_logits=False).item() == pytest.approx(0.0, abs=1e-7)
    all_on = torch.ones_like(target)  # intersection 4, cardinality 8 + 4
    assert dice_loss(all_on, target, from_logits=False).item() == pytest.approx(1 - 9 / 13)
    assert dice_loss(1 - target, target, from_logits=False).item() == pytest.approx(1 - 1 / 9)
    assert dice_loss(1 - target, target, from_logits=False, smooth=0.0).item() == pytest.approx(1.0)


def test_dice_from_logits_equals_dice_on_probabilities():
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    expected = dice_loss(torch.sigmoid(logits), target, from_logits=False)
    torch.testing.assert_close(dice_loss(logits, target), expected)


def test_dice_matches_numpy_reference_on_random_masks():
    generator = torch.Generator().manual_seed(3)
    probs = torch.rand(4, 1, 16, 16, generator=generator)
    target = (torch.rand(4, 1, 16, 16, generator=generator) > 0.7).float()
    p, t = probs.numpy().astype(np.float64), target.numpy().astype(np.float64)
    expected = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert dice_loss(probs, target, from_logits=False).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- Lovasz hinge


def test_lovasz_is_one_minus_iou_where_the_hinge_errors_are_zero_or_one():
    """Logits +-1 on pixels predicted right (error 0), 0 on the wrong ones (error 1): the loss is then exactly 1 - IoU
    of the foreground predicted with those pixels flipped, computed here with numpy, image by image."""
    rng = np.random.default_rng(4)
    truth = rng.random((5, 1, 12, 10)) < 0.3
    wrong = rng.random((5, 1, 12, 10)) < 0.2
    truth[3], wrong[4] = False, False  # an image without foreground; one predicted perfectly
    wrong[3, 0, 0, 0] = True  # the empty image gets one false positive (else 1 - IoU is 0 / 0)
    logits = np.where(wrong, 0.0, np.where(truth, 1.0, -1.0))
    predicted = truth ^ wrong
    expected = np.mean([1 - (p & t).sum() / (p | t).sum() for p, t in zip(predicted, truth)])
    got = lovasz_hinge_loss(torch.tensor(logits), torch.tensor(truth, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_lovasz_perfect_worst_and_its_gradient_points_the_right_way():
    target = torch.cat([half_mask()] * 2)  # (2, 1, 2, 4)
    sign = 2 * target - 1
    assert lovasz_hinge_loss(3 * sign, target).item() == 0.0  # right with a margin above 1
    assert lovasz_hinge_loss(torch.zeros_like(target), target).item() == pytest.approx(1.0)  # every error 1: IoU 0
    assert lovasz_hinge_loss(-sign, target).item() == pytest.approx(2.0)  # every pixel wrong by a margin of 1
    logits = torch.zeros_like(target, requires_grad=True)
    lovasz_hinge_loss(logits, target).backward()
    assert (logits.grad * sign <= 0).all() and (logits.grad * sign < 0).any()  # raise foreground, lower background


def test_modules_equal_functions():
    logits, target = torch.randn(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    assert BCELoss()(logits, target) == bce_loss(logits, target)
    assert DiceLoss()(logits, target) == dice_loss(logits, target)
    assert RMSELoss()(logits, target) == rmse_loss(logits, target)
    assert SSIMLoss()(logits, target) == ssim_loss(logits, target)
    assert LovaszHingeLoss()(logits, target > 0.5) == lovasz_hinge_loss(logits, target > 0.5)
    assert SSILoss()(logits, target) == ssi_loss(logits, target)


# ---------------------------------------------------------------- scale-and-shift invariant depth loss


def numpy_ssi(pred, target, scales=4, alpha=0.5):
    """Reference ssi_loss: per-image np.linalg.lstsq for (s, t), then the aligned MAE and gradient terms by loops."""
    pred, target = pred[:, 0].astype(np.float64), target[:, 0].astype(np.float64)
    valid = target > 0.01
    residual = np.zeros_like(target)
    for b in range(len(pred)):
        p, g = pred[b][valid[b]], target[b][valid[b]]
        (s, t), *_ = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), g, rcond=None)
        residual[b] = np.where(valid[b], s * pred[b] + t - target[b], 0.0)
    loss = np.abs(residual).sum() / valid.sum()
    for k in range(scales):
        r, v = residual[:, :: 2**k, :: 2**k], valid[:, :: 2**k, :: 2**k]
        total = 0.0
        for b, y, x in np.ndindex(*r.shape):
            if x + 1 < r.shape[2] and v[b, y, x] and v[b, y, x + 1]:
                total += abs(r[b, y, x + 1] - r[b, y, x])
            if y + 1 < r.shape[1] and v[b, y, x] and v[b, y + 1, x]:
                total += abs(r[b, y + 1, x] - r[b, y, x])
        loss += alpha * total / v.sum()
    return loss


def test_ssi_loss_matches_numpy_lstsq_and_loops():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 1, 12, 16), torch.rand(3, 1, 12, 16)
    target[0, 0, :3] = 0  # no depth there: left out of the fit and of both terms
    expected = numpy_ssi(pred.numpy(), target.numpy())
    assert ssi_loss(pred, target).item() == pytest.approx(expected, rel=1e-5)


def test_ssi_loss_ignores_scale_and_shift_but_not_shape():
    torch.manual_seed(1)
    target = torch.rand(2, 1, 16, 16) * 0.8 + 0.1
    assert ssi_loss(3.0 * target - 0.7, target).item() == pytest.approx(0, abs=1e-5)
    pred = torch.randn(2, 1, 16, 16)
    assert ssi_loss(5 * pred + 2, target).item() == pytest.approx(ssi_loss(pred, target).item(), rel=1e-4)
    assert ssi_loss(pred, target).item() > 0.1


def test_fit_scale_shift_of_a_flat_prediction_is_the_mean_and_gradients_flow():
    target = torch.tensor([[[[0.2, 0.4], [0.6, 0.0]]]])  # the 0 is no depth
    scale, shift = fit_scale_shift(torch.full_like(target, 0.3), target, target > 0.01)
    assert scale.item() == 0 and shift.item() == pytest.approx(0.4)
    pred = torch.randn(2, 1, 8, 8, requires_grad=True)
    ssi_loss(pred, torch.rand(2, 1, 8, 8)).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


# ---------------------------------------------------------------- named combinations


def make_example():
    """Outputs and batch where every term has a known value: BCE = ln 2, RMSE = 0.5, Dice = 1 - 9/13 ... ."""
    mask = torch.cat([half_mask()] * 2)  # (2, 1, 2, 4)
    outputs = {"mask": torch.zeros(2, 1, 2, 4), "depth": torch.full((2, 1, 2, 4), 0.5)}
    batch = {"mask": mask, "depth": torch.zeros(2, 1, 2, 4)}
    return outputs, batch


def test_bce_rmse_reads_mask_and_depth_from_the_right_keys():
    outputs, batch = make_example()
    loss, parts = make_loss("bce_rmse", "depthnet")(outputs, batch)
    assert set(parts) == {"bce", "rmse"}
    assert parts["bce"].item() == pytest.approx(math.log(2))  # mask logits 0 vs mask target
    assert parts["rmse"].item() == pytest.approx(0.5, abs=1e-6)  # depth 0.5 vs depth 0
    assert loss.item() == pytest.approx(math.log(2) + 2 * 0.5, abs=1e-6)  # the original recipe: BCE + 2 x RMSE


def test_every_named_loss_is_the_weighted_sum_of_its_parts():
    torch.manual_seed(0)
    batch = {"mask": (torch.rand(2, 1, 16, 16) > 0.5).float(), "depth": torch.rand(2, 1, 16, 16)}
    for name, weights in LOSSES.items():
        outputs = {key: torch.randn(2, 1, 16, 16, requires_grad=True) for key in ("mask", "depth")}
        loss, parts = make_loss(name, "depthnet")(outputs, batch)
        assert set(parts) == set(weights), name
        assert all(not value.requires_grad and value.dim() == 0 for value in parts.values())
        expected = sum(weights[term] * parts[term] for term in weights)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6), name
        loss.backward()
        touched = {key for key, value in outputs.items() if value.grad is not None}
        assert touched == {CombinedLoss(weights).keys[term] for term in weights}, name


def test_required_names_and_defaults():
    required = {"bce", "dice", "bce_dice", "bce_rmse", "bce_ssim", "bce_rmse_ssim", "dice_rmse", "bce_dice_rmse_ssim"}
    assert required <= set(LOSSES)
    assert DEFAULT_LOSS == {"masknet": "bce", "depthnet": "bce_rmse"}
    assert valid_losses("masknet") == ["bce", "dice", "bce_dice", "bce_lovasz"]
    for model_name, name in DEFAULT_LOSS.items():
        make_loss(name, model_name)


def test_registry_rejects_depth_loss_for_masknet():
    with pytest.raises(UserError, match="bce, dice, bce_dice"):
        make_loss("bce_rmse", "masknet")


def test_registry_rejects_unknown_names():
    with pytest.raises(UserError, match="unknown loss 'mse'"):
        make_loss("mse", "depthnet")
    with pytest.raises(UserError, match="unknown model"):
        make_loss("bce", "unet")


def test_depth_loss_without_depth_output_raises_user_error():
    outputs, batch = make_example()
    del outputs["depth"]
    with pytest.raises(UserError, match="depth"):
        CombinedLoss(LOSSES["bce_rmse"])(outputs, batch)


def test_losses_are_float32_for_bf16_outputs():
    outputs, batch = make_example()
    outputs = {key: value.to(torch.bfloat16) for key, value in outputs.items()}
    loss, parts = make_loss("bce_dice_rmse_ssim", "depthnet")(outputs, batch)
    assert loss.dtype == torch.float32
    assert parts["bce"].item() == pytest.approx(math.log(2))
