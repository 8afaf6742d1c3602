"""The validation-set browser (driven through its controls), its figure, and the notebooks' metrics table."""

from __future__ import annotations

import base64
import hashlib
import sys
import types

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from lib.data import ModestDataset
from lib.models import make_model
from lib.plots import plot_browser_sample
from lib.widgets import Browser, LiveFigure, choose_pair, make_browser, make_metrics_table


@pytest.fixture(scope="module")
def val_set(tiny_modest):
    return ModestDataset(tiny_modest, "val", 64)


def shown(browser: Browser) -> str:
    """A fingerprint of the PNG the browser's Output widget holds now."""
    (output,) = browser.output.outputs
    png = base64.b64decode(output["data"]["image/png"])
    assert png.startswith(b"\x89PNG") and png == browser.png
    return hashlib.sha256(png).hexdigest()


@pytest.mark.parametrize("name", ["masknet", "depthnet"])
def test_browser_controls_change_the_picture(name, val_set):
    torch.manual_seed(0)
    browser = make_browser(make_model(name), val_set)
    assert browser.index.max == len(val_set) - 1 and browser.overlay.value and not browser.error_map.value
    views = [shown(browser)]
    browser.index.value = 1
    views.append(shown(browser))
    browser.overlay.value = False
    views.append(shown(browser))
    browser.error_map.value = True
    views.append(shown(browser))
    assert len(set(views)) == 4, "every control change must redraw something different"
    browser.index.value, browser.overlay.value, browser.error_map.value = 0, True, False
    assert shown(browser) == views[0], "the same view must draw the same picture"
    assert browser.predictions == 2, "one model call per sample shown, then the cache"
    assert plt.get_fignums() == [], "the browser must not leave figures open"


def test_browser_caches_predictions_per_index(val_set):
    calls = []
    model = make_model("masknet")
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    browser = make_browser(model, val_set)
    for index in (1, 2, 1, 0, 2):
        browser.index.value = index
    browser.error_map.value = True
    assert calls == [1, 1, 1], "one sample per call, each index predicted once"


@pytest.mark.parametrize("with_depth", [False, True])
@pytest.mark.parametrize("overlay", [False, True])
@pytest.mark.parametrize("error_map", [False, True])
def test_plot_browser_sample_panels(val_set, with_depth, overlay, error_map):
    sample = val_set[0]
    mask_prob = sample["mask"].float() * 0.9  # (1, H, W): right everywhere
    depth = sample["depth"].float() / 255 if with_depth else None
    fig = plot_browser_sample(sample, mask_prob, depth, overlay=overlay, error_map=error_map)
    titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
    colorbars = len(fig.axes) - len(titles)
    plt.close(fig)
    assert len(titles) == 3 + 2 * with_depth + error_map
    assert colorbars == error_map
    assert titles[0] == ("bg_fg + predicted mask" if overlay else "bg_fg")
    assert "IoU 1.00" in titles[2]
    if with_depth:
        assert "RMSE 0.000" in titles[4]
    if error_map:
        assert titles[-1].startswith("depth error" if with_depth else "mask error")


def test_metrics_table_reports_best_and_last_epoch():
    history = [
        {"epoch": 1, "train_loss": 0.9, "val_loss": 0.5, "mask_iou": 0.6, "depth_rmse": 0.2, "samples_per_s": 10.0},
        {"epoch": 2, "train_loss": 0.7, "val_loss": 0.4, "mask_iou": 0.7, "depth_rmse": 0.15, "samples_per_s": 11.0},
        {"epoch": 3, "train_loss": 0.6, "val_loss": 0.45, "mask_iou": 0.75, "depth_rmse": 0.16, "samples_per_s": 12.0},
    ]
    lines = make_metrics_table(history).splitlines()
    assert lines[0] == "| metric | best (epoch 2) | last (epoch 3) |"
    assert "| mask IoU | 0.7000 | 0.7500 |" in lines
    assert "| depth RMSE | 0.1500 | 0.1600 |" in lines
    assert not any("depth MAE" in line for line in lines)
    assert make_metrics_table([]).startswith("_no epochs")


# ---------------------------------------------------------------------------------------------- Colab's ipywidgets


def widget_tree(widget) -> list:
    """`widget` and every widget it contains."""
    return [widget, *[w for child in getattr(widget, "children", ()) for w in widget_tree(child)]]


def test_browser_uses_only_core_widgets(val_set):
    """Core controls only (in ipywidgets 7.7, Colab's, and 8.x): they render without a custom widget manager."""
    import ipywidgets

    core = {"@jupyter-widgets/controls", "@jupyter-widgets/output", "@jupyter-widgets/base"}
    in_7_7 = {"VBox", "HBox", "IntSlider", "ToggleButton", "Output"}  # all present in ipywidgets 7.7.1
    browser = make_browser(make_model("masknet"), val_set)
    for widget in widget_tree(browser):
        cls = ipywidgets.VBox if isinstance(widget, Browser) else type(widget)
        assert cls.__name__ in in_7_7 and getattr(ipywidgets, cls.__name__) is cls, cls.__name__
        assert widget._model_module in core and widget._view_module in core, cls.__name__


def test_notebook_progress_bar_builds_with_this_ipywidgets():
    """tqdm.auto's notebook bar is ipywidgets' FloatProgress + HTML: it must build with the installed version."""
    from tqdm.notebook import tqdm as notebook_tqdm

    bar = notebook_tqdm(total=3, desc="epoch 1/1", leave=False)
    bar.update(2)
    bar.set_postfix(loss="0.5")
    bar.close()
    assert bar.n == 2 and type(bar.container).__name__ in ("TqdmHBox", "HBox")


# ---------------------------------------------------------------------------------------------- notebook helpers


@pytest.fixture
def fake_colab(monkeypatch):
    """A stub google.colab whose files.upload hands out the queued answers (then {}: nothing chosen)."""
    answers: list[dict] = []
    package = types.ModuleType("google.colab")
    package.files = types.SimpleNamespace(upload=lambda: answers.pop(0) if answers else {})
    package.drive = types.SimpleNamespace(mount=lambda path: None)
    monkeypatch.setitem(sys.modules, "google.colab", package)
    return answers


def test_choose_pair_never_waits_unless_asked(val_set, fake_colab):
    fake_colab.append({"never.png": b""})
    bg_rgb, bg_fg_rgb = choose_pair(val_set)
    assert fake_colab, "UPLOAD = False must not open the upload dialog"
    assert np.array_equal(bg_rgb, val_set[0]["bg"].permute(1, 2, 0).numpy())
    assert bg_fg_rgb.shape == (64, 64, 3)


def test_choose_pair_uploads_two_photos_in_order(val_set, fake_colab, tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    for name, value in (("empty.png", 10), ("person.png", 200)):
        Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(name)
        fake_colab.append({name: b""})
    bg_rgb, bg_fg_rgb = choose_pair(val_set, upload=True)
    assert bg_rgb.shape == (40, 50, 3) and bg_rgb.max() == 10 and bg_fg_rgb.min() == 200
    printed = capsys.readouterr().out
    assert printed.index("1/2: the empty scene") < printed.index("2/2: the same scene with the person")


def test_choose_pair_falls_back_when_nothing_is_chosen(val_set, fake_colab, capsys):
    bg_rgb, _ = choose_pair(val_set, upload=True)
    assert np.array_equal(bg_rgb, val_set[0]["bg"].permute(1, 2, 0).numpy())
    assert "validation pair" in capsys.readouterr().out


def test_live_figure_draws_once_then_updates_in_place(monkeypatch):
    import IPython.display

    shown, updated = [], []
    handle = types.SimpleNamespace(update=lambda image: updated.append(image.data))
    monkeypatch.setattr(IPython.display, "display", lambda image, display_id: shown.append(image.data) or handle)
    live = LiveFigure()
    for points in ([1, 2], [1, 2, 3]):
        fig = plt.figure()
        fig.add_subplot().plot(points)
        live.update(fig)
    assert len(shown) == 1 and len(updated) == 1 and shown[0] != updated[0] and live.draws == 2
    assert plt.get_fignums() == []
