"""Shared fixtures: a tiny hand-made MODEST-format dataset whose contents the tests know exactly."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

SIZE = 64


def write_tiny_modest(
    root: Path, n_bg: int = 3, n_fg: int = 2, n_place: int = 2, size: int = SIZE, seed: int = 0
) -> Path:
    """Write a MODEST-layout folder: noisy rooms, a solid rectangle 'person', exact masks and depth."""
    rng = np.random.default_rng(seed)
    for folder in ("bg", "bg_fg", "bg_fg_mask", "bg_fg_depth_map"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lines, boxes = [], []
    for b in range(1, n_bg + 1):
        bg = rng.integers(40, 200, (size, size, 3), dtype=np.uint8)
        (root / "bg" / f"bg{b:03d}.jpeg").write_bytes(simplejpeg.encode_jpeg(bg, quality=95))
        ramp = np.linspace(60, 250, size).astype(np.uint8)[:, None].repeat(size, 1)  # farther towards the top
        for f in range(1, n_fg + 1):
            for k in range(1, 2 * n_place + 1):
                h, w = size // 2, size // 4
                y, x = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
                bg_fg, mask, depth = bg.copy(), np.zeros((size, size), np.uint8), ramp.copy()
                bg_fg[y : y + h, x : x + w] = (255, 20, 20)
                mask[y : y + h, x : x + w] = 255
                depth[y : y + h, x : x + w] = 30
                name = f"bg{b:03d}_fg{f:03d}_{k:02d}"
                (root / "bg_fg" / f"{name}.jpeg").write_bytes(simplejpeg.encode_jpeg(bg_fg, quality=95))
                (root / "bg_fg_mask" / f"{name}_mask.jpeg").write_bytes(
                    simplejpeg.encode_jpeg(mask[:, :, None], quality=95, colorspace="GRAY")
                )
                (root / "bg_fg_depth_map" / f"{name}_depth_map.jpeg").write_bytes(
                    simplejpeg.encode_jpeg(depth[:, :, None], quality=95, colorspace="GRAY")
                )
                lines.append(f"bg{b:03d}\t{name}\t{name}_mask\t{name}_depth_map")
                boxes.append(f"{name}.jpeg\t{x}\t{y}\t{w}\t{h}")
    (root / "file_map.txt").write_text("\n".join(lines) + "\n")
    (root / "bbox.txt").write_text("\n".join(boxes) + "\n")
    return root


def zip_folder(folder: Path, zip_path: Path, top: str | None = None) -> Path:
    """Zip `folder` (stored, like our zips) with its tree at the root or under `top/`."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                rel = path.relative_to(folder).as_posix()
                z.write(path, f"{top}/{rel}" if top else rel)
    return zip_path


@pytest.fixture(scope="session")
def tiny_modest(tmp_path_factory) -> Path:
    """A 3 bg x 2 fg x 4 placements (24 samples) 64 px MODEST folder, shared read-only by tests."""
    return write_tiny_modest(tmp_path_factory.mktemp("tiny") / "modest")


def load_batches(dataset, **kw) -> list[dict]:
    """Every batch of a make_loader over `dataset` (5 per batch, in order, 2 workers, CPU), as a list."""
    from lib.data import make_loader

    kw = {"batch_size": 5, "shuffle": False, "num_workers": 2, "device": "cpu", **kw}
    return list(make_loader(dataset, **kw))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    """The same names in the same order, and equal bg, bg_fg, mask and depth."""
    assert [x["name"] for x in a] == [y["name"] for y in b]
    for x, y in zip(a, b):
        for key in ("bg", "bg_fg", "mask", "depth"):
            assert torch.equal(x[key], y[key]), key


def corrupt_tiny_modest(tmp_path: Path, member: str) -> Path:
    """A small MODEST folder (2 rooms x 1 figure x 4) with `member` overwritten by bytes no decoder reads."""
    root = write_tiny_modest(tmp_path / "bad", n_bg=2, n_fg=1, n_place=2)
    (root / member).write_bytes(b"\xff\xd8 not really a jpeg")
    return root
