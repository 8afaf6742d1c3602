"""tools/: shipped-weights export, the shipped weights themselves, and the quality harness's own arithmetic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.predict import WEIGHTS, predict_pair
from lib.train import load_model
from tests.test_predict import _save_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import export_weights  # noqa: E402
import quality  # noqa: E402


@pytest.mark.parametrize("model_name", ["masknet", "depthnet"])
def test_exported_weights_load_and_predict_like_the_checkpoint(tmp_path, model_name):
    src = _save_model(tmp_path / "best.pt", model_name, 32)
    slim = export_weights.export_weights(src, tmp_path / "w.pt")
    assert all(v.dtype == torch.float16 for v in slim["model"].values() if v.is_floating_point())
    assert "optimizer" not in slim and "rng" not in slim
    assert (tmp_path / "w.pt").stat().st_size < src.stat().st_size * 0.6
    full, _ = load_model(src)
    half, state = load_model(tmp_path / "w.pt")
    assert state["config"]["model"] == model_name
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    bg_fg = bg.copy()
    bg_fg[10:30, 20:30] = (250, 30, 30)
    a, b = predict_pair(full, bg, bg_fg, 32), predict_pair(half, bg, bg_fg, 32)
    assert np.abs(a[0] - b[0]).max() < 0.02  # fp16 weights: the same mask probabilities, nearly


@pytest.mark.parametrize("model_name", ["masknet", "depthnet"])
def test_shipped_weights_load_and_predict_one_pair(model_name):
    path = WEIGHTS / f"{model_name}.pt"
    if not path.exists():
        pytest.skip(f"{path} not shipped")
    model, state = load_model(path)
    assert path.stat().st_size < 30e6
    size = state["config"]["image_size"]
    rng = np.random.default_rng(1)
    bg = (rng.random((size, size, 3)) * 60 + 100).astype(np.uint8)
    bg_fg = bg.copy()
    bg_fg[size // 4 : size - 4, size // 3 : size // 2] = (200, 40, 40)  # a person-sized block on a plain room
    mask, depth = predict_pair(model, bg, bg_fg, size)
    truth = np.zeros(mask.shape, bool)
    truth[size // 4 : size - 4, size // 3 : size // 2] = True
    pred = mask > 0.5
    assert (pred & truth).sum() / max((pred | truth).sum(), 1) > 0.5  # it finds the pasted block
    assert (depth is None) == (model_name == "masknet")


def test_blob_alpha_is_one_piece_and_fills_part_of_its_box():
    import cv2

    alpha = quality.make_blob_alpha(np.random.default_rng(3), 120, 80)
    assert set(np.unique(alpha)) == {0, 255}
    assert cv2.connectedComponents(alpha)[0] == 2  # background + one piece
    assert 0.2 < (alpha > 0).mean() < 0.8


def test_summary_gives_mean_and_sample_spread(tmp_path):
    rows = [
        dict(model="masknet", role="test", set="s", reshoot="none", mask_iou=v, baseline_mask_iou=0.5)
        for v in (0.6, 0.7, 0.8)
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = quality.summary([path])
    assert "| masknet | s (test) | as shot | 3 | 0.700 ± 0.100 | 0.500 ± 0.000 |" in table
