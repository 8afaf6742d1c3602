"""Figures as pure matplotlib: every function returns a Figure and trains nothing. All the project's figures live here."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

DEPTH_CMAP = "magma"  # brighter = farther, as in MODEST
OVERLAY_RGBA = (1.0, 0.15, 0.1, 0.45)  # predicted mask drawn over bg_fg: translucent red
TRUE_EDGE = "cyan"  # outline of the true mask on the overlay
ERROR_CMAP = "inferno"
DEPTH_ERROR_MAX = 0.25  # top of the depth error colour scale (depth in [0, 1]); most errors are well below 1


def _image(x: torch.Tensor) -> np.ndarray:
    """CHW uint8 (or float in [0,1]) tensor -> HWC/HW numpy for imshow."""
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    x = x.clamp(0, 1).numpy()
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def plot_samples(samples: Sequence[dict], title: str | None = None) -> Figure:
    """A grid of dataset samples (uint8 dicts): bg | bg_fg | mask | depth, one row each."""
    columns = ("bg", "bg_fg", "mask", "depth")
    fig, axes = plt.subplots(len(samples), 4, figsize=(8, 2.1 * len(samples)), squeeze=False)
    for row, sample in enumerate(samples):
        for col, key in enumerate(columns):
            ax = axes[row, col]
            cmap = {"mask": "gray", "depth": DEPTH_CMAP}.get(key)
            img = sample[key].float() if key == "mask" else sample[key]  # masks are 0/1, not 0..255
            ax.imshow(_image(img), cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(key)
        axes[row, 0].set_ylabel(sample.get("name", ""), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_predictions(samples: Sequence[dict], mask_probs: torch.Tensor, depth: torch.Tensor | None = None) -> Figure:
    """bg | bg_fg | true mask | predicted mask | true depth | predicted depth, one row per sample."""
    columns = ["bg", "bg_fg", "true mask", "predicted mask"] + (
        ["true depth", "predicted depth"] if depth is not None else []
    )
    fig, axes = plt.subplots(len(samples), len(columns), figsize=(2 * len(columns), 2.1 * len(samples)), squeeze=False)
    for row, sample in enumerate(samples):
        panels = [
            (sample["bg"], None),
            (sample["bg_fg"], None),
            (sample["mask"].float(), "gray"),
            (mask_probs[row], "gray"),
        ]
        if depth is not None:
            panels += [(sample["depth"], DEPTH_CMAP), (depth[row], DEPTH_CMAP)]
        for col, (img, cmap) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(_image(img), cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(history: Sequence[dict]) -> Figure:
    """Loss (train and val), mask IoU and, when present, depth RMSE by epoch."""
    epochs = [r["epoch"] for r in history]
    with_depth = bool(history) and "depth_rmse" in history[0]
    fig, axes = plt.subplots(1, 3 if with_depth else 2, figsize=(12 if with_depth else 8, 3.2))
    axes[0].plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    axes[0].set_title("loss"), axes[0].legend()
    axes[1].plot(epochs, [r["mask_iou"] for r in history], "o-", color="tab:green")
    axes[1].set_title("val mask IoU")
    if with_depth:
        axes[2].plot(epochs, [r["depth_rmse"] for r in history], "o-", color="tab:red")
        axes[2].set_title("val depth RMSE")
    for ax in axes:
        ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_prediction(
    bg_rgb: np.ndarray,
    bg_fg_rgb: np.ndarray,
    mask_prob: np.ndarray,
    depth: np.ndarray | None = None,
    title: str | None = None,
) -> Figure:
    """bg | bg_fg | predicted mask | predicted depth (when given), side by side; returns a Figure."""
    panels = [("bg", bg_rgb, None), ("bg_fg", bg_fg_rgb, None), ("mask probability", mask_prob, "gray")]
    if depth is not None:
        panels.append(("predicted depth", depth, DEPTH_CMAP))
    aspect = bg_rgb.shape[1] / bg_rgb.shape[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * aspect * len(panels), 2.9), squeeze=False)
    for ax, (name, img, cmap) in zip(axes[0], panels):
        ax.imshow(img, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_browser_sample(
    sample: dict,
    mask_prob: torch.Tensor,
    depth: torch.Tensor | None = None,
    overlay: bool = True,
    error_map: bool = False,
) -> Figure:
    """One sample in a row: bg_fg (predicted mask overlaid), true | predicted mask, true | predicted depth, error map.

    `sample` holds uint8 CHW tensors (mask 0/1); `mask_prob` (1, H, W) in [0, 1]; `depth` (1, H, W) in [0, 1] or None
    (MaskNet). The error map is |predicted - true| depth, or |probability - true| mask without depth.
    """
    true_mask = sample["mask"].float()  # (1, H, W) in {0, 1}
    hit = (mask_prob >= 0.5).float()
    union = float(((hit + true_mask) > 0).sum())
    iou = float((hit * true_mask).sum()) / union if union else 1.0
    panels = [
        ("bg_fg + predicted mask" if overlay else "bg_fg", sample["bg_fg"], None, 1.0),
        ("true mask", true_mask, "gray", 1.0),
        (f"predicted mask (IoU {iou:.2f})", mask_prob, "gray", 1.0),
    ]
    if depth is not None:
        true_depth = sample["depth"].float() / 255.0  # (1, H, W) in [0, 1]
        rmse = float(((depth - true_depth) ** 2).mean().sqrt())
        panels += [
            ("true depth", true_depth, DEPTH_CMAP, 1.0),
            (f"predicted depth (RMSE {rmse:.3f})", depth, DEPTH_CMAP, 1.0),
        ]
        if error_map:
            panels.append(("depth error |pred - true|", (depth - true_depth).abs(), ERROR_CMAP, DEPTH_ERROR_MAX))
    elif error_map:
        panels.append(("mask error |prob - true|", (mask_prob - true_mask).abs(), ERROR_CMAP, 1.0))

    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6), squeeze=False)
    for ax, (title, img, cmap, vmax) in zip(axes[0], panels):
        shown = ax.imshow(_image(img), cmap=cmap, vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    if error_map:
        fig.colorbar(shown, ax=axes[0, -1], fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    if overlay:
        ax = axes[0, 0]
        layer = np.zeros((*hit.shape[-2:], 4), dtype=np.float32)  # (H, W, RGBA)
        layer[hit[0].numpy() > 0] = OVERLAY_RGBA
        ax.imshow(layer)
        if true_mask.any():
            ax.contour(true_mask[0].numpy(), levels=[0.5], colors=TRUE_EDGE, linewidths=0.8)
    fig.suptitle(sample.get("name", ""), fontsize=9)
    fig.tight_layout()
    return fig
