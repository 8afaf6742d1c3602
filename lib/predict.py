"""Predict the mask (and depth) of your own photos with a trained checkpoint.

    python -m lib.predict --bg room.jpg --bg-fg room_with_me.jpg          # the shipped weights in weights/
    python -m lib.predict --checkpoint runs/demo/best.pt --bg room.jpg --bg-fg room_with_me.jpg
    python -m lib.predict --checkpoint runs/demo/best.pt --bg room.jpg --bg-fg shots/        # one room, many shots
    python -m lib.predict --checkpoint runs/demo/best.pt --bg photos/bg --bg-fg photos/bg_fg --out predictions

Inputs: take two photos from the same spot, one of the empty scene (bg) and one with the person (bg_fg);
both must have the same size. --bg and --bg-fg are each an image file or a folder of images
(.jpg .jpeg .png .bmp .webp .tif .tiff). A single --bg file serves every bg_fg image. With a --bg folder,
each bg_fg image pairs with the bg image of the same name (`bg/kitchen.jpg` with `bg_fg/kitchen.png`), or
else with the bg whose name is the longest prefix of it followed by "_" (`bg/kitchen.jpg` with
`bg_fg/kitchen_1.jpg`, `bg_fg/kitchen_2.jpg`; a MODEST folder's `bg/` and `bg_fg/` pair this way too).

Outputs, for each bg_fg image NAME, in --out (default `predictions/`), all at the input's size:
    NAME_mask.png           the mask, 8-bit, 0 or 255 (probability > 0.5)
    NAME_depth.png          DepthNet only: depth as 16-bit PNG, value / 65535 = the model's depth in [0, 1]
                            (the dataset's depth-map scale, brighter = farther)
    NAME_depth_preview.png  DepthNet only: the depth colour-mapped (magma) for viewing
    NAME_figure.png         bg | bg_fg | mask | depth side by side
Any input size works: the images are resized to the checkpoint's training size (square, as in training;
without one, DepthNet rounds each side to a multiple of 32) and the outputs resized back.

From a notebook: `model, state = lib.train.load_model(path)`, then
`predict_pair(model, bg_rgb, bg_fg_rgb, state["config"]["image_size"])` with HxWx3 uint8 RGB arrays
(lib.plots.plot_prediction draws the result).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from .data import default_device, normalize, resize
from .errors import UserError, run_cli
from .models import MODEL_SIZE_MULTIPLE, unwrap_model

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
WEIGHTS = (
    Path(__file__).resolve().parent.parent / "weights"
)  # shipped weights: weights/README.md says how they were made


# ---------------------------------------------------------------------------------------------- library


def model_input_size(height: int, width: int, image_size: int | None, multiple: int) -> tuple[int, int]:
    """(H, W) the model sees: image_size square when given, else the input's sides rounded to `multiple`."""
    if image_size:
        return image_size, image_size
    return tuple(max(multiple, int(round(side / multiple)) * multiple) for side in (height, width))


def _model_multiple(model: torch.nn.Module) -> int:
    return int(getattr(unwrap_model(model), "size_multiple", 1))


def _check_rgb(name: str, img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise UserError(f"{name} must be an HxWx3 uint8 RGB image, got shape {img.shape} {img.dtype}")


@torch.no_grad()
def predict_images(
    model: torch.nn.Module, bg: torch.Tensor, bg_fg: torch.Tensor, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (B, 3, H, W) bg, bg_fg -> (mask probabilities (B, 1, H, W), depth (B, 1, H, W) in [0, 1] or None), float32
    on `device` (default: the model's). The one prediction: predict_samples, predict_batch and the widgets call it."""
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    bg, bg_fg = (normalize(x.to(device), key).to(param.dtype) for x, key in ((bg, "bg"), (bg_fg, "bg_fg")))
    model.eval()
    outputs = model(bg, bg_fg)  # {"mask": logits (B, 1, H, W), "depth": (B, 1, H, W) for DepthNet}
    depth = outputs["depth"].float().clamp(0, 1) if "depth" in outputs else None
    return torch.sigmoid(outputs["mask"].float()), depth


def predict_samples(model: torch.nn.Module, samples: Sequence[dict], device: torch.device | str = "cpu"):
    """Run `model` on uint8 sample dicts; return (samples, mask probabilities (B,1,H,W), depth (B,1,H,W) or None) on the CPU."""
    bg, bg_fg = (torch.stack([s[key] for s in samples]) for key in ("bg", "bg_fg"))  # (B, 3, H, W) uint8
    probs, depth = predict_images(model, bg, bg_fg, device)
    return list(samples), probs.cpu(), depth.cpu() if depth is not None else None


def predict_batch(
    model: torch.nn.Module,
    bg_rgbs: Sequence[np.ndarray],
    bg_fg_rgbs: Sequence[np.ndarray],
    image_size: int | None,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """predict_pair for N pairs of one size at once: (mask probabilities (N, H, W), depth (N, H, W) or None), float32."""
    for name, img in [("bg", i) for i in bg_rgbs] + [("bg_fg", i) for i in bg_fg_rgbs]:
        _check_rgb(name, np.asarray(img))
    shapes = {np.shape(i) for i in list(bg_rgbs) + list(bg_fg_rgbs)}
    if len(bg_rgbs) != len(bg_fg_rgbs) or not bg_rgbs:
        raise UserError(f"expected as many bg as bg_fg images (at least one), got {len(bg_rgbs)} and {len(bg_fg_rgbs)}")
    if len(shapes) > 1:
        (h1, w1, _), (h2, w2, _) = sorted(shapes)[:2]
        raise UserError(
            f"bg and bg_fg images must all be one size, got {w1}x{h1} and {w2}x{h2}: "
            "take both photos with the same camera and size"
        )
    height, width = np.shape(bg_rgbs[0])[:2]
    size = model_input_size(height, width, image_size, _model_multiple(model))

    def batch(images) -> torch.Tensor:  # HxWx3 uint8 photos -> (N, 3, h, w) uint8 at the model's size
        return torch.from_numpy(np.stack([resize(np.asarray(i), size) for i in images])).permute(0, 3, 1, 2)

    probs, depth = predict_images(model, batch(bg_rgbs), batch(bg_fg_rgbs), device)

    def back(x: torch.Tensor) -> np.ndarray:  # (N, 1, h, w) in [0, 1] -> (N, H, W) float32 at the input size
        maps = x[:, 0].cpu().numpy()
        return np.stack([np.clip(resize(m, (height, width)), 0, 1) for m in maps]).astype(np.float32)

    return back(probs), back(depth) if depth is not None else None


def predict_pair(
    model: torch.nn.Module,
    bg_rgb: np.ndarray,
    bg_fg_rgb: np.ndarray,
    image_size: int | None,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(mask probability HxW float32 in [0, 1], depth HxW float32 in [0, 1] or None) for one HxWx3 uint8 RGB pair.

    The pair is resized to the model's size (`image_size` square; None: sides rounded to the model's multiple)
    and the outputs are resized back to the input's HxW.
    """
    bg_rgb, bg_fg_rgb = np.asarray(bg_rgb), np.asarray(bg_fg_rgb)
    _check_rgb("bg", bg_rgb)
    _check_rgb("bg_fg", bg_fg_rgb)
    if bg_rgb.shape != bg_fg_rgb.shape:
        raise UserError(
            f"bg is {bg_rgb.shape[1]}x{bg_rgb.shape[0]} but bg_fg is {bg_fg_rgb.shape[1]}x{bg_fg_rgb.shape[0]}: "
            "take both photos with the same camera and size"
        )
    mask_probs, depth = predict_batch(model, [bg_rgb], [bg_fg_rgb], image_size, device)
    return mask_probs[0], None if depth is None else depth[0]


def mask_to_png(mask_prob: np.ndarray) -> np.ndarray:
    """HxW probabilities -> HxW uint8 mask, 255 where > 0.5, else 0."""
    return np.where(mask_prob > 0.5, 255, 0).astype(np.uint8)


def depth_to_uint16(depth: np.ndarray) -> np.ndarray:
    """HxW depth in [0, 1] -> HxW uint16 (0..65535)."""
    return np.rint(np.clip(depth, 0, 1) * 65535).astype(np.uint16)


def colour_depth(depth: np.ndarray) -> np.ndarray:
    """HxW depth in [0, 1] -> HxWx3 uint8 RGB through the magma colour map (brighter = farther)."""
    from matplotlib import colormaps

    from .plots import DEPTH_CMAP

    return (colormaps[DEPTH_CMAP](np.clip(depth, 0, 1))[..., :3] * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- files


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (gray and RGBA are converted); UserError naming the file if unreadable."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected an image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise UserError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _write_png(path: Path, img: np.ndarray) -> None:
    """Write an 8/16-bit gray or RGB array as PNG (RGB given as RGB)."""
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - PNG encoding of uint8/uint16 arrays does not fail
        raise UserError(f"{path}: could not encode the PNG")
    path.write_bytes(buf.tobytes())


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted; UserError if there are none."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not files:
        raise UserError(f"{folder}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def find_pairs(bg: str | os.PathLike, bg_fg: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(bg file, bg_fg file) pairs from two files or folders (see the module docstring for the naming rule)."""
    bg, bg_fg = Path(bg), Path(bg_fg)
    for path, option in ((bg, "--bg"), (bg_fg, "--bg-fg")):
        if not path.exists():
            raise UserError(f"{path}: not found ({option})")
    shots = _images_in(bg_fg) if bg_fg.is_dir() else [bg_fg]
    stems = [p.stem for p in shots]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise UserError(f"{bg_fg}: more than one image named {twice[0]} (outputs are named after it)")
    if not bg.is_dir():
        return [(bg, shot) for shot in shots]
    rooms = {p.stem: p for p in _images_in(bg)}
    pairs = []
    for shot in shots:
        room = rooms.get(shot.stem)
        if room is None:
            prefixes = [stem for stem in rooms if shot.stem.startswith(stem + "_")]
            room = rooms[max(prefixes, key=len)] if prefixes else None
        if room is None:
            raise UserError(
                f"{shot}: no background for it in {bg} (expected {shot.stem}.jpg or a name that "
                f"starts it followed by '_')"
            )
        pairs.append((room, shot))
    return pairs


def predict_files(
    model: torch.nn.Module,
    image_size: int | None,
    bg_path: Path,
    bg_fg_path: Path,
    out: Path,
    device: torch.device | str | None = None,
    figure: bool = True,
) -> list[Path]:
    """Predict one pair of image files and write the outputs into `out`; return the files written."""
    bg, bg_fg = read_rgb(bg_path), read_rgb(bg_fg_path)
    if bg.shape != bg_fg.shape:
        raise UserError(
            f"{bg_fg_path}: {bg_fg.shape[1]}x{bg_fg.shape[0]} but its background {bg_path} is "
            f"{bg.shape[1]}x{bg.shape[0]}; bg and bg_fg must be the same size"
        )
    mask_prob, depth = predict_pair(model, bg, bg_fg, image_size, device)
    out.mkdir(parents=True, exist_ok=True)
    name = bg_fg_path.stem
    written = [out / f"{name}_mask.png"]
    _write_png(written[-1], mask_to_png(mask_prob))
    if depth is not None:
        written.append(out / f"{name}_depth.png")
        _write_png(written[-1], depth_to_uint16(depth))
        written.append(out / f"{name}_depth_preview.png")
        _write_png(written[-1], colour_depth(depth))
    if figure:
        import matplotlib.pyplot as plt

        from .plots import plot_prediction

        fig = plot_prediction(bg, bg_fg, mask_prob, depth, title=name)
        written.append(out / f"{name}_figure.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------- command line


def default_weights(model_name: str) -> Path:
    """The shipped checkpoint of `model_name` (weights/masknet.pt or weights/depthnet.pt); UserError if absent."""
    path = WEIGHTS / f"{model_name}.pt"
    if not path.is_file():
        raise UserError(f"{path}: no shipped weights here; train your own (python -m lib.train) and pass --checkpoint")
    return path


def build_parser() -> argparse.ArgumentParser:
    """The predict command's arguments."""
    p = argparse.ArgumentParser(
        prog="python -m lib.predict",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    p.add_argument(
        "--checkpoint", help="best.pt or last.pt from lib.train (default: the shipped weights, see --weights)"
    )
    p.add_argument(
        "--weights",
        choices=("masknet", "depthnet"),
        default="depthnet",
        help="without --checkpoint: which shipped model in weights/ to use (depthnet: mask and depth, the better "
        "mask on the tuning set; masknet: mask only, 0.2 MB)",
    )
    p.add_argument("--bg", required=True, help="the empty scene: an image file, or a folder of them")
    p.add_argument("--bg-fg", required=True, help="the scene with the person: an image file, or a folder of them")
    p.add_argument("--out", default="predictions", help="folder for the outputs (default predictions/)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--no-figure", action="store_true", help="skip the side-by-side figure")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m lib.predict`."""
    from .train import load_model

    args = build_parser().parse_args(argv)
    pairs = find_pairs(args.bg, args.bg_fg)
    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU here (try cpu)")
    model, state = load_model(args.checkpoint or default_weights(args.weights), device)
    cfg = state["config"]
    image_size = cfg.get("image_size")
    multiple = MODEL_SIZE_MULTIPLE[cfg["model"]]
    out = Path(args.out)
    for bg_path, bg_fg_path in pairs:
        written = predict_files(model, image_size, bg_path, bg_fg_path, out, device, figure=not args.no_figure)
        print(f"{bg_fg_path.name}: " + ", ".join(str(p) for p in written))
    size = f"{image_size}x{image_size}" if image_size else f"native size (multiple of {multiple})"
    print(f"done: {len(pairs)} pair(s) through {cfg['model']} at {size} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
