"""lib.predict: your own (bg, bg_fg) photos through a saved checkpoint, any size in, same size out; clear errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lib.errors import UserError
from lib.models import make_model
from lib.predict import find_pairs, main, model_input_size, predict_pair, predict_samples
from lib.train import CHECKPOINT_FORMAT, Config, load_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _save_model(path: Path, model_name: str, image_size: int | None) -> Path:
    """An untrained checkpoint saved as lib.train saves one; heads set so the outputs are not all one value."""
    torch.manual_seed(0)
    model = make_model(model_name)
    head = model.mask_head if model_name == "depthnet" else model.head
    with torch.no_grad():
        head.weight.mul_(200.0)  # logits far from 0: masks with both 0 and 255
        if model_name == "depthnet":
            model.depth_head.bias.fill_(0.5)  # depth inside (0, 1)
    cfg = Config(model=model_name, image_size=image_size, out=str(path.parent))
    save_checkpoint(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "config": dataclasses.asdict(cfg),
            "epoch": 1,
            "model": model.state_dict(),
            "optimizer": None,
            "scheduler": None,
            "scaler": None,
            "history": [],
            "best_val_loss": float("inf"),
            "rng": None,
        },
    )
    return path


@pytest.fixture(scope="module")
def depthnet_ckpt(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("ckpt") / "depthnet.pt", "depthnet", 32)


@pytest.fixture(scope="module")
def masknet_ckpt(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("ckpt") / "masknet.pt", "masknet", None)


def _photo(path: Path, width: int, height: int, seed: int, person: bool = False, gray: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    img = rng.integers(30, 220, (height, width, 3), dtype=np.uint8)
    if person:
        img[height // 4 : 3 * height // 4, width // 3 : width // 2] = (40, 40, 230)
    if gray:
        img = img[..., 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def test_depthnet_outputs_have_the_input_size_and_the_right_types(depthnet_ckpt, tmp_path, capsys):
    bg = _photo(tmp_path / "in" / "room.jpg", 100, 75, 1)
    bg_fg = _photo(tmp_path / "in" / "room_me.png", 100, 75, 1, person=True)
    assert (
        main(
            ["--checkpoint", str(depthnet_ckpt), "--bg", str(bg), "--bg-fg", str(bg_fg), "--out", str(tmp_path / "out")]
        )
        == 0
    )
    assert "done: 1 pair(s) through depthnet at 32x32" in capsys.readouterr().out
    mask = _read(tmp_path / "out" / "room_me_mask.png")
    assert mask.shape == (75, 100) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}  # thresholded (an untrained model may give one value only)
    depth = _read(tmp_path / "out" / "room_me_depth.png")
    assert depth.shape == (75, 100) and depth.dtype == np.uint16 and depth.max() > 255  # really 16-bit
    preview = _read(tmp_path / "out" / "room_me_depth_preview.png")
    assert preview.shape == (75, 100, 3) and preview.dtype == np.uint8
    figure = _read(tmp_path / "out" / "room_me_figure.png")
    assert figure.ndim == 3 and figure.shape[1] > figure.shape[0]  # side by side


def test_masknet_without_a_training_size_runs_at_native_size_and_writes_no_depth(masknet_ckpt, tmp_path):
    bg = _photo(tmp_path / "bg.png", 37, 23, 2, gray=True)  # grayscale input is fine
    bg_fg = _photo(tmp_path / "bg_fg.png", 37, 23, 2, person=True)
    assert (
        main(
            [
                "--checkpoint",
                str(masknet_ckpt),
                "--bg",
                str(bg),
                "--bg-fg",
                str(bg_fg),
                "--out",
                str(tmp_path / "out"),
                "--no-figure",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bg_fg_mask.png"]
    assert _read(tmp_path / "out" / "bg_fg_mask.png").shape == (23, 37)


def test_predict_pair_matches_the_training_normalisation(depthnet_ckpt):
    """At the model's own size, predict_pair gives what the training code's predict_samples gives."""
    model, _ = load_model(depthnet_ckpt)
    rng = np.random.default_rng(3)
    bg = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    bg_fg = bg.copy()
    bg_fg[8:24, 10:18] = 250
    mask_prob, depth = predict_pair(model, bg, bg_fg, 32, "cpu")
    assert mask_prob.shape == depth.shape == (32, 32) and mask_prob.dtype == depth.dtype == np.float32
    chw = lambda a: torch.from_numpy(a).permute(2, 0, 1).contiguous()  # noqa: E731
    _, probs, depths = predict_samples(model, [{"bg": chw(bg), "bg_fg": chw(bg_fg)}])
    np.testing.assert_allclose(mask_prob, probs[0, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(depth, depths[0, 0].numpy(), atol=1e-5)
    assert 0 < depth.mean() < 1


@pytest.mark.parametrize("size", [(75, 100), (33, 47), (224, 160)])
def test_odd_sizes_round_trip(depthnet_ckpt, masknet_ckpt, size):
    for ckpt, image_size in ((depthnet_ckpt, None), (depthnet_ckpt, 32), (masknet_ckpt, None)):
        model, _ = load_model(ckpt)
        img = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
        mask_prob, depth = predict_pair(model, img, img, image_size)
        assert mask_prob.shape == size and 0 <= mask_prob.min() <= mask_prob.max() <= 1
        assert depth is None or depth.shape == size


def test_model_input_size():
    assert model_input_size(75, 100, 224, 32) == (224, 224)
    assert model_input_size(75, 100, None, 32) == (64, 96)
    assert model_input_size(10, 17, None, 32) == (32, 32)
    assert model_input_size(75, 100, None, 1) == (75, 100)


def test_folders_pair_by_name_or_name_prefix(tmp_path):
    for name in ("kitchen.jpg", "hall.png", "hall_big.png"):
        _photo(tmp_path / "bg" / name, 8, 8, 0)
    for name in ("kitchen.png", "kitchen_2.jpg", "hall_1.jpg", "hall_big_3.jpg"):
        _photo(tmp_path / "bg_fg" / name, 8, 8, 0)
    (tmp_path / "bg_fg" / ".DS_Store").write_bytes(b"junk")
    pairs = {fg.name: bg.name for bg, fg in find_pairs(tmp_path / "bg", tmp_path / "bg_fg")}
    assert pairs == {
        "kitchen.png": "kitchen.jpg",
        "kitchen_2.jpg": "kitchen.jpg",
        "hall_1.jpg": "hall.png",
        "hall_big_3.jpg": "hall_big.png",
    }
    one = find_pairs(tmp_path / "bg" / "hall.png", tmp_path / "bg_fg")  # one background, every shot
    assert len(one) == 4 and {bg.name for bg, _ in one} == {"hall.png"}
    _photo(tmp_path / "bg_fg" / "garden.jpg", 8, 8, 0)
    with pytest.raises(UserError, match=r"garden.jpg: no background for it in"):
        find_pairs(tmp_path / "bg", tmp_path / "bg_fg")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "lib.predict", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_writes_outputs_and_errors_are_one_line(depthnet_ckpt, tmp_path):
    bg = _photo(tmp_path / "bg.jpg", 64, 48, 4)
    bg_fg = _photo(tmp_path / "bg_fg.jpg", 64, 48, 4, person=True)
    done = _cli(
        "--checkpoint", str(depthnet_ckpt), "--bg", str(bg), "--bg-fg", str(bg_fg), "--out", str(tmp_path / "out")
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "bg_fg_depth.png").is_file()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    done = _cli("--checkpoint", str(garbage), "--bg", str(bg), "--bg-fg", str(bg_fg))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {garbage}: not a readable checkpoint")


@pytest.mark.parametrize("case", ["missing", "not_an_image", "sizes_differ", "empty_folder", "not_a_checkpoint"])
def test_errors_name_the_file(depthnet_ckpt, tmp_path, case):
    bg = _photo(tmp_path / "bg.jpg", 40, 30, 5)
    bg_fg = _photo(tmp_path / "bg_fg.jpg", 40, 30, 5, person=True)
    ckpt = depthnet_ckpt
    if case == "missing":
        bg_fg, expected = tmp_path / "nope.jpg", r"nope.jpg: not found \(--bg-fg\)"
    elif case == "not_an_image":
        bg_fg = tmp_path / "notes.jpg"
        bg_fg.write_text("these are my notes, not a photo")
        expected = r"notes.jpg: not a readable image"
    elif case == "sizes_differ":
        bg_fg = _photo(tmp_path / "bigger.jpg", 41, 30, 5)
        expected = r"bigger.jpg: 41x30 but its background .*bg.jpg is 40x30"
    elif case == "empty_folder":
        bg_fg = tmp_path / "empty"
        bg_fg.mkdir()
        expected = r"empty: no images found"
    else:
        ckpt = tmp_path / "weights.pt"
        torch.save({"state_dict": {}}, ckpt)
        expected = r"weights.pt: not a checkpoint written by lib.train"
    with pytest.raises(UserError, match=expected):
        main(["--checkpoint", str(ckpt), "--bg", str(bg), "--bg-fg", str(bg_fg), "--out", str(tmp_path / "out")])
