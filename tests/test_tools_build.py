"""`data_download.py build` / tools.build: a MODEST-format dataset from your own backgrounds and cut-outs."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import data_download  # noqa: E402
from lib.data import ModestDataset  # noqa: E402
from lib.errors import run_cli  # noqa: E402
from lib.models import make_model  # noqa: E402
from lib.predict import predict_pair  # noqa: E402
from lib.train import CHECKPOINT_FORMAT, Config, load_model, save_checkpoint  # noqa: E402
from tools.build import build_dataset, fg_height, inverse_depth_to_uint8  # noqa: E402

SIZE, PLACEMENTS = 48, 2


def _save_model(path: Path, model_name: str) -> Path:
    """An untrained checkpoint as lib.train saves one; depth bias 0.5 so the depth maps are not all 0."""
    torch.manual_seed(0)
    model = make_model(model_name)
    if model_name == "depthnet":
        with torch.no_grad():
            model.depth_head.bias.fill_(0.5)
    cfg = Config(model=model_name, image_size=32, out=str(path.parent))
    save_checkpoint(
        path, {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg), "epoch": 1, "model": model.state_dict()}
    )
    return path


def _cutout(height: int, width: int, colour, margin: int = 3) -> np.ndarray:
    """RGBA: an opaque ellipse with a soft edge, inside a transparent margin (trimmed away by the build)."""
    rgba = np.zeros((height + 2 * margin, width + 2 * margin, 4), np.uint8)
    rgba[..., :3] = 255  # colour under alpha 0 must not leak
    cv2.ellipse(
        rgba,
        (margin + width // 2, margin + height // 2),
        (width // 2, height // 2),
        0,
        0,
        360,
        (*colour, 255),
        -1,
        lineType=cv2.LINE_AA,
    )
    return rgba


def _write_inputs(root: Path) -> tuple[Path, Path]:
    """Two backgrounds (landscape JPEG, portrait gray PNG) and two cut-outs (tall and wide) under root."""
    rng = np.random.default_rng(7)
    bgs, fgs = root / "backgrounds", root / "foregrounds"
    bgs.mkdir(parents=True)
    fgs.mkdir(parents=True)
    cv2.imwrite(str(bgs / "hall.jpg"), rng.integers(20, 230, (60, 80, 3), dtype=np.uint8))
    cv2.imwrite(str(bgs / "stairs.png"), rng.integers(20, 230, (90, SIZE), dtype=np.uint8))  # gray is fine
    cv2.imwrite(str(fgs / "anna.png"), cv2.cvtColor(_cutout(60, 24, (250, 30, 30)), cv2.COLOR_RGBA2BGRA))
    cv2.imwrite(str(fgs / "bob.png"), cv2.cvtColor(_cutout(30, 40, (30, 30, 250)), cv2.COLOR_RGBA2BGRA))
    return bgs, fgs


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("build")
    bgs, fgs = _write_inputs(root)
    ckpt = _save_model(root / "depthnet.pt", "depthnet")
    out = build_dataset(
        bgs, fgs, root / "mine", size=SIZE, placements=PLACEMENTS, depth_model=str(ckpt), seed=3, progress=False
    )
    return out, ckpt, root


def _gray(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert img is not None, path
    return img


def test_the_built_dataset_loads_and_has_the_modest_layout(built):
    out, _, root = built
    n = 2 * 2 * 2 * PLACEMENTS
    dataset = ModestDataset(out)
    assert len(dataset) == n
    sample = dataset[0]
    assert sample["bg"].shape == (3, SIZE, SIZE) and sample["mask"].shape == (1, SIZE, SIZE)
    assert set(sample["mask"].unique().tolist()) == {0, 1}
    names = [line.split("\t")[1] for line in (out / "file_map.txt").read_text().splitlines()]
    assert names[:4] == [f"bg001_fg001_{k:02d}" for k in range(1, 5)] and names[-1] == "bg002_fg002_04"
    for folder, suffix in (("bg_fg", ".jpeg"), ("bg_fg_mask", "_mask.jpeg"), ("bg_fg_depth_map", "_depth_map.jpeg")):
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(f"{m}{suffix}" for m in names)
    assert sorted(p.name for p in (out / "bg").iterdir()) == ["bg001.jpeg", "bg002.jpeg"]
    assert sorted(p.name for p in (out / "fg").iterdir()) == ["fg001.png", "fg002.png"]
    assert sorted(p.name for p in (out / "fg_mask").iterdir()) == ["fg001_mask.png", "fg002_mask.png"]
    fg = cv2.imread(str(out / "fg" / "fg001.png"), cv2.IMREAD_UNCHANGED)
    assert fg.shape[2] == 4 and fg.shape[0] == fg_height(SIZE) == round(108 * SIZE / 224)
    assert cv2.imread(str(out / "fg" / "fg002.png"), cv2.IMREAD_UNCHANGED).shape[0] == fg_height(SIZE)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["backgrounds"] == {"bg001": "hall.jpg", "bg002": "stairs.png"} and meta["samples"] == n
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # the temporary folder is gone


def test_masks_match_the_cutouts_alpha_and_boxes_lie_inside(built):
    out, _, _ = built
    fgs = {f: cv2.imread(str(out / "fg" / f"fg{f:03d}.png"), cv2.IMREAD_UNCHANGED)[..., 3] for f in (1, 2)}
    for line in (out / "bbox.txt").read_text().splitlines():
        name, x, y, w, h = line.split("\t")
        x, y, w, h = map(int, (x, y, w, h))
        stem = name.removesuffix(".jpeg")
        f, k = int(stem[8:11]), int(stem[12:14])
        alpha = fgs[f][:, ::-1] if k > PLACEMENTS else fgs[f]  # the second half is flipped
        assert alpha.shape == (h, w) and 0 <= x <= SIZE - w and 0 <= y <= SIZE - h
        expected = np.zeros((SIZE, SIZE), bool)
        expected[y : y + h, x : x + w] = alpha >= 128
        mask = _gray(out / "bg_fg_mask" / f"{stem}_mask.jpeg") > 127
        assert (mask != expected).mean() < 0.002, stem  # JPEG ringing may flip a pixel at most
        assert mask.sum() == pytest.approx(expected.sum(), abs=2)


def test_backgrounds_are_centre_cropped_and_depth_comes_from_the_model(built):
    out, ckpt, root = built
    hall = cv2.cvtColor(cv2.imread(str(root / "backgrounds" / "hall.jpg")), cv2.COLOR_BGR2RGB)
    crop = cv2.resize(hall[:, 10:70], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    bg = cv2.cvtColor(cv2.imread(str(out / "bg" / "bg001.jpeg")), cv2.COLOR_BGR2RGB)
    assert np.abs(bg.astype(int) - crop).mean() < 6  # JPEG of noise, but the same crop
    model, _ = load_model(ckpt)
    bg_fg = cv2.cvtColor(cv2.imread(str(out / "bg_fg" / "bg001_fg002_03.jpeg")), cv2.COLOR_BGR2RGB)
    _, depth = predict_pair(model, bg, bg_fg, 32)
    stored = _gray(out / "bg_fg_depth_map" / "bg001_fg002_03_depth_map.jpeg").astype(int)
    assert 20 < stored.mean() < 235
    assert np.abs(stored - depth * 255).mean() < 6  # re-running on the JPEG round trip of the inputs


def test_same_seed_same_dataset_and_placeholder_depth(built, tmp_path):
    out, _, root = built
    again = build_dataset(
        root / "backgrounds",
        root / "foregrounds",
        tmp_path / "again",
        size=SIZE,
        placements=PLACEMENTS,
        seed=3,
        progress=False,
    )
    assert (again / "bbox.txt").read_text() == (out / "bbox.txt").read_text()
    assert (again / "bg_fg_mask" / "bg002_fg001_04_mask.jpeg").read_bytes() == (
        out / "bg_fg_mask" / "bg002_fg001_04_mask.jpeg"
    ).read_bytes()
    assert set(np.unique(_gray(again / "bg_fg_depth_map" / "bg002_fg001_04_depth_map.jpeg"))) <= {127, 128, 129}
    assert "placeholder" in json.loads((again / "dataset.json").read_text())["depth"]


def test_inverse_depth_becomes_brighter_farther():
    inverse = np.array([[4.0, 2.0], [1.0, 0.0]])  # MiDaS: bigger = nearer; 0 = infinitely far
    depth = inverse_depth_to_uint8(inverse)
    assert depth.dtype == np.uint8 and depth[0, 0] == 0 and depth[1, 1] == 255
    assert depth[0, 0] < depth[0, 1] < depth[1, 0] < depth[1, 1]


def test_the_command_line_builds_a_dataset(tmp_path):
    bgs, fgs = _write_inputs(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "data_download.py",
            "build",
            "--backgrounds",
            str(bgs),
            "--foregrounds",
            str(fgs),
            "--out",
            str(tmp_path / "out"),
            "--size",
            "32",
            "--placements",
            "1",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote 8 samples to {tmp_path / 'out'} (depth: placeholder")
    assert len(ModestDataset(tmp_path / "out", image_size=32)) == 8


# ---------------------------------------------------------------------------------------------- bad inputs


def _case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Arguments for one bad input and a regex the error line must match."""
    bgs, fgs = _write_inputs(tmp_path)
    extra: list[str] = []
    if case == "cutout_jpeg":
        cv2.imwrite(str(fgs / "carl.jpg"), np.full((40, 20, 3), 128, np.uint8))
        expected = r"carl\.jpg: no alpha channel"
    elif case == "cutout_rgb_png":
        cv2.imwrite(str(fgs / "dora.png"), np.full((40, 20, 3), 128, np.uint8))
        expected = r"dora\.png: no alpha channel"
    elif case == "cutout_opaque":
        cv2.imwrite(str(fgs / "eve.png"), np.full((40, 20, 4), 255, np.uint8))
        expected = r"eve\.png: its alpha channel is opaque everywhere"
    elif case == "cutout_transparent":
        cv2.imwrite(str(fgs / "ghost.png"), np.zeros((40, 20, 4), np.uint8))
        expected = r"ghost\.png: fully transparent"
    elif case == "background_too_small":
        cv2.imwrite(str(bgs / "closet.jpg"), np.full((40, 100, 3), 90, np.uint8))
        expected = rf"closet\.jpg: 100x40 is smaller than --size {SIZE}"
    elif case == "empty_backgrounds":
        for p in bgs.iterdir():
            p.unlink()
        expected = r"backgrounds: no images in the backgrounds folder"
    elif case == "missing_foregrounds":
        fgs = tmp_path / "nowhere"
        expected = r"nowhere: foregrounds folder not found"
    elif case == "not_an_image_file":
        (bgs / "notes.txt").write_text("shopping list")
        expected = r"notes\.txt: not an image file"
    elif case == "corrupt_image":
        (bgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        expected = r"broken\.jpg: not a readable image"
    elif case == "masknet_depth_model":
        extra = ["--depth-model", str(_save_model(tmp_path / "mask.pt", "masknet"))]
        expected = r"mask\.pt: holds a masknet checkpoint, which predicts no depth"
    elif case == "garbage_depth_model":
        (tmp_path / "junk.pt").write_bytes(b"junk")
        extra = ["--depth-model", str(tmp_path / "junk.pt")]
        expected = r"junk\.pt: not a readable checkpoint"
    elif case == "unknown_depth_model":
        extra = ["--depth-model", "no-such-thing"]
        expected = r"--depth-model no-such-thing: neither a checkpoint file nor a torch.hub entry"
    elif case == "out_exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        expected = r"out: already exists"
    else:
        raise AssertionError(case)
    args = [
        "build",
        "--backgrounds",
        str(bgs),
        "--foregrounds",
        str(fgs),
        "--out",
        str(tmp_path / "out"),
        "--size",
        str(SIZE),
        "--placements",
        "1",
        "--quiet",
        *extra,
    ]
    return args, expected


CASES = [
    "cutout_jpeg",
    "cutout_rgb_png",
    "cutout_opaque",
    "cutout_transparent",
    "background_too_small",
    "empty_backgrounds",
    "missing_foregrounds",
    "not_an_image_file",
    "corrupt_image",
    "masknet_depth_model",
    "garbage_depth_model",
    "unknown_depth_model",
    "out_exists",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, case):
    args, expected = _case(tmp_path, case)
    assert run_cli(data_download.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(expected, err[0]), err[0]
    if case != "out_exists":
        assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written


def test_bad_input_through_the_real_command_has_no_traceback(tmp_path):
    args, expected = _case(tmp_path, "cutout_jpeg")
    done = subprocess.run(
        [sys.executable, "data_download.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "carl.jpg: no alpha channel" in done.stderr and str(tmp_path) in done.stderr
