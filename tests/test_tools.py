"""tools/: shipped-weights export, the shipped weights themselves, and the quality harness's own arithmetic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.data import ModestDataset
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


@pytest.fixture(scope="module")
def unseen_scenes(tmp_path_factory) -> Path:
    """8 synthetic samples of rooms and figures no training run used (seed 4242), at the weights' 64 px."""
    from lib.synthetic import make_synthetic_dataset

    out = tmp_path_factory.mktemp("unseen") / "set"
    return make_synthetic_dataset(out, size=64, backgrounds=2, foregrounds=2, placements=1, seed=4242, progress=False)


@pytest.mark.parametrize("model_name", ["masknet", "depthnet"])
def test_shipped_weights_load_and_find_the_person(model_name, unseen_scenes):
    path = WEIGHTS / f"{model_name}.pt"
    if not path.exists():
        pytest.skip(f"{path} not shipped")
    assert path.stat().st_size < 30e6
    model, state = load_model(path)
    dataset = ModestDataset(unseen_scenes)
    ious = []
    for i in range(len(dataset)):
        sample = dataset[i]
        bg, bg_fg = (sample[k].permute(1, 2, 0).numpy() for k in ("bg", "bg_fg"))  # (H, W, 3) uint8
        mask, depth = predict_pair(model, bg, bg_fg, state["config"]["image_size"])
        assert (depth is None) == (model_name == "masknet")
        pred, truth = mask > 0.5, sample["mask"][0].numpy() > 0
        ious.append((pred & truth).sum() / max((pred | truth).sum(), 1))
    assert np.mean(ious) > 0.5, ious  # an untrained DepthNet scores 0.0 here, the demo 0.75


def test_blob_alpha_is_one_piece_and_fills_part_of_its_box():
    import cv2

    alpha = quality.make_blob_alpha(np.random.default_rng(3), 120, 80)
    assert set(np.unique(alpha)) == {0, 255}
    assert cv2.connectedComponents(alpha)[0] == 2  # background + one piece
    assert 0.2 < (alpha > 0).mean() < 0.8


def test_summary_gives_mean_and_sample_spread_over_seeds(tmp_path):
    rows = [
        dict(
            model="masknet",
            role="test",
            set=f"test-synthetic-s{s}",
            reshoot="none",
            train_seed=seed,
            mask_iou=v,
            baseline_mask_iou=0.5,
        )  # fmt: skip
        for seed, pair in zip((1, 2, 3), ((0.5, 0.7), (0.7, 0.7), (0.8, 0.8)))
        for s, v in zip((101, 102), pair)
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = quality.summary([path])
    # per seed, the family's mean: 0.6, 0.7, 0.8 -> mean 0.7, sample standard deviation 0.1
    assert "| masknet | test-synthetic (test) | as shot | 3 | 0.700 ± 0.100 | 0.500 ± 0.000 |" in table


def test_predict_without_a_checkpoint_uses_the_shipped_depthnet(tmp_path, unseen_scenes):
    import cv2

    from lib.predict import main

    if not (WEIGHTS / "depthnet.pt").exists():
        pytest.skip("weights/depthnet.pt not shipped")
    sample = ModestDataset(unseen_scenes)[0]
    for key in ("bg", "bg_fg"):
        rgb = sample[key].permute(1, 2, 0).numpy()
        cv2.imwrite(str(tmp_path / f"{key}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    main(["--bg", str(tmp_path / "bg.png"), "--bg-fg", str(tmp_path / "bg_fg.png"), "--out", str(tmp_path / "out")])
    written = cv2.imread(str(tmp_path / "out" / "bg_fg_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert written.shape == (64, 64) and 0 < (written > 127).mean() < 0.5
    assert (tmp_path / "out" / "bg_fg_depth.png").exists()  # DepthNet: depth too
    main(
        ["--weights", "masknet", "--bg", str(tmp_path / "bg.png"), "--bg-fg", str(tmp_path / "bg_fg.png")]
        + ["--out", str(tmp_path / "out2")]
    )
    assert not (tmp_path / "out2" / "bg_fg_depth.png").exists()  # MaskNet: no depth


def test_score_writes_one_line_per_set_of_the_role_and_background(tmp_path, unseen_scenes):
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / f"tune-synthetic-s{quality.TUNE_SEED}").symlink_to(unseen_scenes)  # only the tuning set
    ckpt = _save_model(tmp_path / "best.pt", "masknet", 64)
    out = tmp_path / "scores.jsonl"
    quality.score(tmp_path / "sets", ckpt, out, role="tune")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["set"], r["role"], r["reshoot"]) for r in lines] == [
        (f"tune-synthetic-s{quality.TUNE_SEED}", "tune", reshoot) for reshoot in quality.RESHOOTS
    ]
    assert all(r["samples"] == 8 and 0 <= r["mask_iou"] <= 1 and "baseline_mask_iou" in r for r in lines)
    assert lines[0]["baseline_mask_iou"] > lines[1]["baseline_mask_iou"]  # the re-shoot hurts differencing


def test_reference_depths_match_numpy_lstsq(tmp_path, unseen_scenes):
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / f"tune-synthetic-s{quality.TUNE_SEED}").symlink_to(unseen_scenes)
    results = {
        r["answer"]: r["depth_delta1_aligned"]
        for r in quality.reference_depths(unseen_scenes, tmp_path / "sets", "tune")
    }
    depth = np.stack([s["depth"][0].numpy() / 255.0 for s in ModestDataset(unseen_scenes, image_size=64)])  # (N, H, W)

    def delta1(answers):
        hits = total = 0
        for answer, truth in zip(answers, depth):
            valid = truth > 0.01
            a, g = answer[valid], truth[valid]
            (s, t), *_ = np.linalg.lstsq(np.stack([a, np.ones_like(a)], 1), g, rcond=None)
            aligned = np.clip(s * a + t, 0, 1)
            hits += (np.maximum(aligned / g, g / np.maximum(aligned, 1e-12)) < 1.25).sum()
            total += valid.sum()
        return hits / total

    means = np.array([truth[truth > 0.01].mean() for truth in depth])
    constant = (np.maximum(means[:, None, None] / depth, depth / means[:, None, None]) < 1.25)[depth > 0.01].mean()
    assert results["constant"] == pytest.approx(constant, abs=1e-9)
    assert results["training mean depth map"] == pytest.approx(
        delta1(np.broadcast_to(depth.mean(0), depth.shape)), abs=1e-6
    )
    assert results["truth, rows averaged (peeks)"] == pytest.approx(
        delta1(np.broadcast_to(depth.mean(2, keepdims=True), depth.shape)), abs=1e-6
    )
    assert results["constant"] < results["training mean depth map"] < results["truth, blurred 3x3 (peeks)"] <= 1
