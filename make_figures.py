"""Regenerate the figures in images/ from the default synthetic dataset and a finished demo run; trains nothing.

python -m lib.train            # once, first: the CPU demo run, written to runs/demo
python make_figures.py         # images/dataset_grid.png, curves.png, predictions.png, widget.png
python make_figures.py --run runs/demo --out images/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib.pyplot as plt  # noqa: E402

from lib.data import ModestDataset  # noqa: E402
from lib.errors import run_cli  # noqa: E402
from lib.plots import plot_curves, plot_predictions, plot_samples  # noqa: E402
from lib.predict import predict_samples  # noqa: E402
from lib.train import load_model, resolve_data  # noqa: E402
from lib.widgets import make_browser, pick_samples  # noqa: E402

PREDICTION_SAMPLES = 6  # rows of predictions.png
GRID_SAMPLES = 4  # rows of dataset_grid.png
WIDGET_SAMPLE = 0  # validation sample shown in widget.png
DPI = 110


def save_figure(fig, path: Path) -> Path:
    """Write `fig` as a PNG without a version stamp (so unchanged figures stay byte-identical) and close it."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def make_dataset_grid(data: str, out: Path) -> Path:
    """dataset_grid.png: a few samples drawn at random (the same ones every time)."""
    dataset = ModestDataset(resolve_data(data, progress=False))
    return save_figure(plot_samples(pick_samples(dataset, GRID_SAMPLES)), out / "dataset_grid.png")


def make_run_figures(run: Path, out: Path) -> list[Path]:
    """curves.png, predictions.png and widget.png from a finished run folder (history.json + best.pt)."""
    history = json.loads((run / "history.json").read_text())
    model, checkpoint = load_model(run / "best.pt")
    cfg = checkpoint["config"]
    dataset = ModestDataset(
        resolve_data(cfg["data"], progress=False, size=cfg["image_size"]),
        "val",
        cfg["image_size"],
        val_fraction=cfg["val_fraction"],
        split_by=cfg["split_by"],
        seed=cfg["seed"],
    )
    samples = pick_samples(dataset, PREDICTION_SAMPLES)
    written = [
        save_figure(plot_curves(history), out / "curves.png"),
        save_figure(plot_predictions(*predict_samples(model, samples)), out / "predictions.png"),
    ]
    browser = make_browser(model, dataset)
    browser.index.value, browser.overlay.value, browser.error_map.value = (
        min(WIDGET_SAMPLE, len(dataset) - 1),
        True,
        True,
    )
    written.append(save_figure(browser.make_figure(), out / "widget.png"))
    return written


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    p = argparse.ArgumentParser(
        prog="python make_figures.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", default="runs/demo", help="a finished run folder (history.json, best.pt)")
    p.add_argument("--out", default="images", help="where the PNGs go")
    p.add_argument("--data", default="synthetic", help="dataset shown in dataset_grid.png: synthetic, modest or a path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write the four figures; one line and exit code 1 if the run folder is not there."""
    args = build_parser().parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    missing = [name for name in ("history.json", "best.pt") if not (run / name).is_file()]
    if missing:
        print(
            f"{run}: no finished run ({' and '.join(missing)} missing); run `python -m lib.train` first",
            file=sys.stderr,
        )
        return 1
    out.mkdir(parents=True, exist_ok=True)
    written = [make_dataset_grid(args.data, out), *make_run_figures(run, out)]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # run_cli also turns Ctrl-C into exit code 130
