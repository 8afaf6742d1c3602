"""ipywidgets on top of lib.plots (the validation-set browser), and the notebooks' display and upload helpers."""

from __future__ import annotations

import base64
import io
from collections import OrderedDict
from collections.abc import Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .plots import plot_browser_sample
from .predict import predict_samples

CACHE_SIZE = 64  # predictions kept per browser (one sample each)


def pick_samples(dataset, count: int, seed: int = 0) -> list[dict]:
    """`count` samples of `dataset` drawn at random with `seed` (the same ones every time), in index order."""
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return [dataset[i] for i in sorted(picks.tolist())]


def choose_pair(val_set, upload: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(bg, bg_fg) as HxWx3 uint8 RGB: with `upload` on Colab, two photos the user picks, else val_set[0]'s pair."""
    from .colab import in_colab
    from .predict import read_rgb

    sample = val_set[0]
    bg_rgb, bg_fg_rgb = (sample[key].permute(1, 2, 0).numpy() for key in ("bg", "bg_fg"))  # (H, W, 3) uint8
    if not (upload and in_colab()):
        return bg_rgb, bg_fg_rgb
    from google.colab import files  # only exists on Colab

    chosen = []
    for prompt in UPLOAD_PROMPTS:
        print(prompt, flush=True)  # files.upload shows no title: say which photo this is
        chosen.append(list(files.upload().keys()))
    if not all(chosen):
        print("no photo chosen: a validation pair stands in")
        return bg_rgb, bg_fg_rgb
    return read_rgb(chosen[0][0]), read_rgb(chosen[1][0])


UPLOAD_PROMPTS = ("1/2: the empty scene (bg)", "2/2: the same scene with the person (bg_fg)")


class LiveFigure:
    """One figure in the notebook output that is redrawn in place (e.g. the curves after each epoch)."""

    def __init__(self) -> None:
        self.handle = None
        self.draws = 0

    def update(self, fig: Figure) -> None:
        """Show `fig` in place of the previous one, and close it."""
        from IPython.display import Image, display

        try:
            image = Image(data=figure_png(fig))
        finally:
            plt.close(fig)
        if self.handle is None:
            self.handle = display(image, display_id=True)  # None outside IPython: then nothing to update
        else:
            self.handle.update(image)
        self.draws += 1


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The PNG bytes of `fig` (the figure is left open)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def show_figure(fig: Figure) -> None:
    """Display `fig` in the notebook as a PNG and close it: one image, whatever matplotlib backend is active."""
    from IPython.display import Image, display

    try:
        display(Image(data=figure_png(fig)))
    finally:
        plt.close(fig)


class Browser(widgets.VBox):
    """Browse a dataset's samples with the model's predictions: a sample slider and two toggles over one image.

    Controls are attributes so code (and tests) can drive them: `index` (IntSlider), `overlay` and `error_map`
    (ToggleButton), `output` (Output holding the rendered PNG); `png` holds the last rendering's bytes.
    """

    def __init__(self, model: torch.nn.Module, dataset, device: torch.device | str = "cpu"):
        if len(dataset) == 0:
            raise ValueError("the dataset to browse is empty")
        self.model, self.dataset, self.device = model, dataset, torch.device(device)
        self._cache: OrderedDict[int, tuple[dict, torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.predictions = 0  # model calls so far (one sample each)
        self.index = widgets.IntSlider(
            value=0, min=0, max=len(dataset) - 1, description="sample", continuous_update=False
        )
        self.overlay = widgets.ToggleButton(value=True, description="mask overlay", tooltip="predicted mask on bg_fg")
        self.error_map = widgets.ToggleButton(value=False, description="error map", tooltip="|predicted - true|")
        self.output = widgets.Output()
        self.png = b""
        for control in (self.index, self.overlay, self.error_map):
            control.observe(self._on_change, names="value")
        super().__init__([widgets.HBox([self.index, self.overlay, self.error_map]), self.output])
        self.render()

    def predict(self, index: int) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """(sample, mask probability (1, H, W), depth (1, H, W) or None) for one sample; cached per index."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        sample = self.dataset[index]
        if "error" in sample:  # a loader set catch_errors: show the problem rather than a blank panel
            raise ValueError(sample["error"])
        _, probs, depth = predict_samples(self.model, [sample], self.device)
        self.predictions += 1
        entry = (sample, probs[0], depth[0] if depth is not None else None)
        self._cache[index] = entry
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return entry

    def make_figure(self) -> Figure:
        """The current view as a Figure (the caller closes it)."""
        sample, mask_prob, depth = self.predict(self.index.value)
        return plot_browser_sample(sample, mask_prob, depth, overlay=self.overlay.value, error_map=self.error_map.value)

    def render(self) -> None:
        """Draw the current view into `output` (as one PNG; no figure is left open)."""
        fig = self.make_figure()
        try:
            self.png = figure_png(fig)
        finally:
            plt.close(fig)
        data = {"image/png": base64.b64encode(self.png).decode("ascii"), "text/plain": f"<sample {self.index.value}>"}
        self.output.outputs = ({"output_type": "display_data", "data": data, "metadata": {}},)

    def _on_change(self, change) -> None:
        self.render()


def make_browser(model: torch.nn.Module, dataset, device: torch.device | str = "cpu") -> Browser:
    """An interactive browser over `dataset` (use the validation split) showing `model`'s predictions."""
    return Browser(model, dataset, device)


METRIC_NAMES = {
    "val_loss": "val loss",
    "train_loss": "train loss",
    "mask_iou": "mask IoU",
    "mask_dice": "mask Dice",
    "depth_rmse": "depth RMSE",
    "depth_mae": "depth MAE",
    "depth_absrel": "depth AbsRel",
    "depth_delta1": "depth delta<1.25",
    "depth_ssim": "depth SSIM",
    "depth_rmse_scaled": "depth RMSE, one scale per image fitted",
    "depth_delta1_scaled": "depth delta<1.25, one scale per image fitted",
    "depth_absrel_aligned": "depth AbsRel, scale and shift per image fitted",
    "depth_delta1_aligned": "depth delta<1.25, scale and shift per image fitted",
    "samples_per_s": "train samples/s",
    "seconds": "train seconds",
}


def make_metrics_table(history: Sequence[dict]) -> str:
    """A Markdown table of the best (lowest val loss) and last epochs' metrics from a fit history."""
    if not history:
        return "_no epochs trained yet_"
    best = min(history, key=lambda r: r["val_loss"])
    last = history[-1]
    rows = [f"| metric | best (epoch {best['epoch']}) | last (epoch {last['epoch']}) |", "|---|---:|---:|"]
    for key, label in METRIC_NAMES.items():
        if key in last:
            digits = 1 if key in ("samples_per_s", "seconds") else 4
            rows.append(f"| {label} | {best[key]:.{digits}f} | {last[key]:.{digits}f} |")
    return "\n".join(rows)
