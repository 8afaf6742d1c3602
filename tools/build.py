"""Build a MODEST-format dataset from your own background photos and person cut-outs.

    python data_download.py build --backgrounds my/rooms --foregrounds my/people --out data/mine \\
        [--size 224] [--placements 20] [--depth-model runs/demo/best.pt] [--seed 0]

The MODEST recipe:
- backgrounds (any image files): centre-cropped to a square, then resized to `size` x `size`. A background
  whose shorter side is below `size` is an error (it would have to be enlarged).
- foregrounds: cut-outs with transparency (PNG/WebP/TIFF with an alpha channel), trimmed to their visible
  pixels and resized, keeping their aspect, to a fixed height: 108 px at size 224, proportional otherwise
  (narrowed further if they would be wider than the image).
- every cut-out is pasted on every background at `placements` random positions fully inside the image, plus
  `placements` more with the cut-out flipped left-right: samples `bgBBB_fgFFF_01 .. _PP` unflipped and
  `_PP+1 .. _2P` flipped, as MODEST numbers them (`--placements` at most 49).
- masks come from the alpha channel (alpha >= 128 -> 255); bg_fg, masks and depth maps are JPEGs like MODEST's.
- written: bg/, fg/ (the resized RGBA cut-outs), fg_mask/, bg_fg/, bg_fg_mask/, bg_fg_depth_map/,
  file_map.txt, bbox.txt (name, x, y, width, height of each pasted cut-out) and dataset.json (what came from
  where: original file names, arguments, the depth model). Everything is written into a hidden temporary
  folder beside --out and renamed into place at the end, so --out is either complete or absent.

Depth maps (8-bit, brighter = farther, as in MODEST) come from the model named by --depth-model:
- a DepthNet checkpoint of ours (`runs/x/best.pt`): run on each (bg, bg_fg) pair; its depth output in [0, 1]
  becomes 0..255. This is the tested path.
- a torch.hub entry `owner/repo:entry`, e.g. `intel-isl/MiDaS:MiDaS_small` (needs internet, e.g. on Colab;
  NOT tested here: the build machine has no internet). MiDaS predicts relative inverse depth from the bg_fg
  image alone; it is clipped below at 2% of its maximum, inverted (1 / x) and scaled to 0..255 per image,
  so 255 is the farthest point of each image. For intel-isl/MiDaS the repo's own `transforms` are used;
  other repos get ImageNet-normalised 384 px input and must follow the same inverse-depth convention.
- none: the depth maps are a flat placeholder (every pixel 128) and dataset.json says so. Fine for MaskNet,
  which never reads depth; useless for training DepthNet's depth head.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from lib.data import resize
from lib.errors import UserError
from lib.predict import IMAGE_EXTENSIONS
from lib.synthetic import encode_jpeg, encode_png, fg_height, paste_figure

ALPHA_EXTENSIONS = (".png", ".webp", ".tif", ".tiff")
IGNORED_FILES = {"thumbs.db", "desktop.ini"}
PLACEHOLDER_DEPTH = 128
HUB_ENTRY = re.compile(r"^[\w.-]+/[\w.-]+:[\w.-]+$")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DepthFn = Callable[[np.ndarray, list[np.ndarray]], list[np.ndarray]]  # (bg, [bg_fg, ...]) -> [depth uint8 HxW, ...]


# ---------------------------------------------------------------------------------------------- inputs


def list_images(folder: str | os.PathLike, what: str) -> list[Path]:
    """The image files in `folder`, sorted; UserError for a missing/empty folder or a file that is not an image."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: {what} folder not found")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (--{what} takes a folder of images)")
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.lower() in IGNORED_FILES or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserError(
                f"{path}: not an image file ({', '.join(IMAGE_EXTENSIONS)}); move it out of the {what} folder"
            )
        files.append(path)
    if not files:
        raise UserError(f"{folder}: no images in the {what} folder")
    return files


def _read(path: Path, flags: int) -> np.ndarray:
    """cv2-decode a file; UserError naming it when it cannot be read or decoded."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    if img is None:
        raise UserError(f"{path}: not a readable image")
    return img


def load_background(path: Path, size: int) -> np.ndarray:
    """A background photo centre-cropped to a square and resized to size x size, RGB uint8."""
    img = cv2.cvtColor(_read(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    height, width = img.shape[:2]
    side = min(height, width)
    if side < size:
        raise UserError(
            f"{path}: {width}x{height} is smaller than --size {size} (its shorter side must be at least {size})"
        )
    top, left = (height - side) // 2, (width - side) // 2
    square = img[top : top + side, left : left + side]
    return resize(square, size) if side != size else square.copy()


def load_cutout(path: Path, size: int) -> np.ndarray:
    """A cut-out with alpha, trimmed to its visible pixels and resized to fg_height(size) tall; RGBA uint8."""
    img = _read(path, cv2.IMREAD_UNCHANGED)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 4:
        raise UserError(
            f"{path}: no alpha channel; a cut-out must be an image with transparency "
            f"(e.g. a PNG whose background is transparent)"
        )
    rgba = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    alpha = rgba[..., 3]
    if not (alpha >= 128).any():
        raise UserError(f"{path}: fully transparent, nothing to paste")
    if (alpha == 255).all():
        raise UserError(
            f"{path}: its alpha channel is opaque everywhere, so it is not a cut-out (make the background transparent)"
        )
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    rgba = rgba[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height = fg_height(size)
    width = max(1, round(height * rgba.shape[1] / rgba.shape[0]))
    if width > size:  # a very wide cut-out: fit the width instead
        height, width = max(1, round(size * rgba.shape[0] / rgba.shape[1])), size
    return _resize_rgba(rgba, height, width)


def _resize_rgba(rgba: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize straight-alpha RGBA through premultiplied colour (no dark fringes at the edges)."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    premult = np.concatenate([rgba[..., :3].astype(np.float32) * alpha, rgba[..., 3:].astype(np.float32)], axis=2)
    small = resize(premult, (height, width))
    a = small[..., 3:]
    rgb = np.where(a > 0, small[..., :3] * 255.0 / np.maximum(a, 1e-6), 0)
    out = np.concatenate([rgb, a], axis=2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- depth models


def _depthnet_depth(path: Path, device: torch.device) -> tuple[DepthFn, str]:
    """Depth from one of our DepthNet checkpoints, run on (bg, bg_fg)."""
    from lib.predict import predict_batch
    from lib.train import load_model

    model, state = load_model(path, device)
    cfg = state["config"]
    if cfg["model"] != "depthnet":
        raise UserError(
            f"{path}: holds a {cfg['model']} checkpoint, which predicts no depth; use a depthnet checkpoint"
        )

    def depth_fn(bg: np.ndarray, bg_fgs: list[np.ndarray]) -> list[np.ndarray]:
        _, depth = predict_batch(model, [bg] * len(bg_fgs), bg_fgs, cfg["image_size"], device)
        return [np.rint(d * 255).astype(np.uint8) for d in depth]

    return depth_fn, f"DepthNet checkpoint {path} (epoch {state['epoch']}, {cfg['image_size']} px): depth output x 255"


def inverse_depth_to_uint8(inverse: np.ndarray) -> np.ndarray:
    """Relative inverse depth (bigger = nearer, e.g. MiDaS) -> uint8 depth, brighter = farther, 0..255 per image."""
    inverse = np.asarray(inverse, dtype=np.float64)
    top = float(inverse.max())
    if not np.isfinite(top) or top <= 0:
        return np.zeros(inverse.shape, np.uint8)
    depth = 1.0 / np.maximum(inverse, top * 0.02)  # at most 50x the nearest point: keeps the far end finite
    low, high = depth.min(), depth.max()
    scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
    return np.rint(scaled * 255).astype(np.uint8)


def _hub_depth(entry: str, device: torch.device) -> tuple[DepthFn, str]:  # pragma: no cover - needs internet
    """Depth from a torch.hub model of the MiDaS kind, run on bg_fg alone (untested here: no internet)."""
    repo, name = entry.split(":")
    try:
        model = torch.hub.load(repo, name, trust_repo=True).to(device).eval()
        transform = None
        if repo.lower() == "intel-isl/midas":
            transforms = torch.hub.load(repo, "transforms", trust_repo=True)
            transform = transforms.small_transform if "small" in name.lower() else transforms.dpt_transform
    except Exception as exc:  # network, missing entry, import errors inside the hub repo
        raise UserError(
            f"--depth-model {entry}: torch.hub could not load it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); it needs internet"
        ) from None

    def prepare(img: np.ndarray) -> torch.Tensor:
        if transform is not None:
            return transform(img).to(device)  # (1, 3, h, w)
        x = cv2.resize(img, (384, 384), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1))[None].to(device)  # (1, 3, 384, 384)

    @torch.no_grad()
    def depth_fn(bg: np.ndarray, bg_fgs: list[np.ndarray]) -> list[np.ndarray]:
        maps = []
        for img in bg_fgs:
            pred = model(prepare(img))
            pred = pred if pred.dim() == 4 else pred.unsqueeze(1)  # (1, 1, h, w)
            pred = torch.nn.functional.interpolate(
                pred.float(), size=img.shape[:2], mode="bicubic", align_corners=False
            )
            maps.append(inverse_depth_to_uint8(pred[0, 0].cpu().numpy()))
        return maps

    return depth_fn, f"torch.hub {entry} on bg_fg: relative inverse depth, inverted and scaled to 0..255 per image"


def make_depth_fn(spec: str | None, device: torch.device | str | None = None) -> tuple[DepthFn, str]:
    """The depth function a --depth-model names (a checkpoint file or a hub entry); None: the flat placeholder."""
    from lib.data import default_device

    if spec is None:

        def placeholder(bg: np.ndarray, bg_fgs: list[np.ndarray]) -> list[np.ndarray]:
            return [np.full(img.shape[:2], PLACEHOLDER_DEPTH, np.uint8) for img in bg_fgs]

        return placeholder, f"placeholder: no --depth-model, every pixel {PLACEHOLDER_DEPTH} (no depth information)"
    device = torch.device(device) if device is not None else default_device()
    path = Path(spec).expanduser()
    if path.is_file():
        return _depthnet_depth(path, device)
    if HUB_ENTRY.match(spec) and not path.exists():
        return _hub_depth(spec, device)
    raise UserError(
        f"--depth-model {spec}: neither a checkpoint file nor a torch.hub entry like intel-isl/MiDaS:MiDaS_small"
    )


# ---------------------------------------------------------------------------------------------- the dataset


def _check_args(size: int, placements: int, seed: int, n_bg: int, n_fg: int) -> None:
    if not 32 <= size <= 4096:
        raise UserError(f"--size must be between 32 and 4096, not {size}")
    if not 1 <= placements <= 49:
        raise UserError(
            f"--placements must be between 1 and 49 (samples are numbered _01.._{2 * 49}), not {placements}"
        )
    if seed < 0:
        raise UserError(f"--seed must be 0 or more, not {seed}")
    for count, what in ((n_bg, "backgrounds"), (n_fg, "foregrounds")):
        if count > 999:
            raise UserError(f"at most 999 {what} (names are bg001..bg999), found {count}")


def build_dataset(
    backgrounds: str | os.PathLike,
    foregrounds: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int = 224,
    placements: int = 20,
    depth_model: str | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Path:
    """Write a MODEST-format dataset built from the images in `backgrounds` and the cut-outs in `foregrounds`."""
    out = Path(out)
    bg_files, fg_files = list_images(backgrounds, "backgrounds"), list_images(foregrounds, "foregrounds")
    _check_args(size, placements, seed, len(bg_files), len(fg_files))
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"{out}: already exists; remove it or choose another --out")
    bgs = [load_background(p, size) for p in bg_files]  # every input checked before anything is written
    cutouts = [load_cutout(p, size) for p in fg_files]
    depth_fn, depth_note = make_depth_fn(depth_model, device)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for folder in ("bg", "fg", "fg_mask", "bg_fg", "bg_fg_mask", "bg_fg_depth_map"):
            (tmp / folder).mkdir(parents=True)
        for f, cutout in enumerate(cutouts, 1):
            (tmp / "fg" / f"fg{f:03d}.png").write_bytes(encode_png(cutout))
            (tmp / "fg_mask" / f"fg{f:03d}_mask.png").write_bytes(
                encode_png(np.where(cutout[..., 3] >= 128, 255, 0).astype(np.uint8))
            )
        file_map, bbox = [], []
        bar = tqdm(
            total=len(bgs) * len(cutouts) * 2 * placements,
            unit="sample",
            desc="build",
            disable=not progress,
            dynamic_ncols=True,
        )
        with bar:
            for b, bg in enumerate(bgs, 1):
                (tmp / "bg" / f"bg{b:03d}.jpeg").write_bytes(encode_jpeg(bg))
                for f, cutout in enumerate(cutouts, 1):
                    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(b, f)))
                    h, w = cutout.shape[:2]
                    names, boxes, bg_fgs, masks = [], [], [], []
                    for k in range(1, 2 * placements + 1):
                        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
                        bg_fg, mask = paste_figure(bg, cutout, x, y, flip=k > placements)
                        names.append(f"bg{b:03d}_fg{f:03d}_{k:02d}")
                        boxes.append((x, y, w, h))
                        bg_fgs.append(bg_fg)
                        masks.append(mask)
                    depths = depth_fn(bg, bg_fgs)
                    for name, (x, y, w_, h_), bg_fg, mask, depth in zip(names, boxes, bg_fgs, masks, depths):
                        (tmp / "bg_fg" / f"{name}.jpeg").write_bytes(encode_jpeg(bg_fg))
                        (tmp / "bg_fg_mask" / f"{name}_mask.jpeg").write_bytes(encode_jpeg(mask))
                        (tmp / "bg_fg_depth_map" / f"{name}_depth_map.jpeg").write_bytes(encode_jpeg(depth))
                        file_map.append(f"bg{b:03d}\t{name}\t{name}_mask\t{name}_depth_map\n")
                        bbox.append(f"{name}.jpeg\t{x}\t{y}\t{w_}\t{h_}\n")
                    bar.update(len(names))
        (tmp / "file_map.txt").write_text("".join(file_map))
        (tmp / "bbox.txt").write_text("".join(bbox))
        meta = {
            "format": "modest",
            "generator": "tools.build",
            "size": size,
            "placements": placements,
            "seed": seed,
            "samples": len(file_map),
            "fg_height": fg_height(size),
            "depth": depth_note,
            "depth_model": depth_model,
            "backgrounds": {f"bg{i:03d}": p.name for i, p in enumerate(bg_files, 1)},
            "foregrounds": {f"fg{i:03d}": p.name for i, p in enumerate(fg_files, 1)},
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def describe(out: Path) -> str:
    """One line about a built dataset: samples and where its depth maps came from."""
    meta = json.loads((out / "dataset.json").read_text())
    return f"wrote {meta['samples']:,} samples to {out} (depth: {meta['depth']})"
