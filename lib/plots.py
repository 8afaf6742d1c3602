"""Figures as pure matplotlib: every function returns a Figure and trains nothing."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .data import normalize

DEPTH_CMAP = "magma"  # brighter = farther, as in MODEST


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


@torch.no_grad()
def predict_samples(model: torch.nn.Module, samples: Sequence[dict], device="cpu"):
    """Run `model` on uint8 sample dicts; return (samples, mask probabilities (B,1,H,W), depth (B,1,H,W) or None)."""
    model.eval()
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    bg, bg_fg = (normalize(torch.stack([s[key] for s in samples]).to(device), key).to(dtype) for key in ("bg", "bg_fg"))
    outputs = model(bg, bg_fg)  # bg, bg_fg: (B, 3, H, W)
    probs = torch.sigmoid(outputs["mask"].float()).cpu()
    depth = outputs["depth"].float().clamp(0, 1).cpu() if "depth" in outputs else None
    return list(samples), probs, depth


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
