"""Evaluate a checkpoint on any MODEST-format folder or zip; the last stdout line is one JSON object.

python -m lib.evaluate --checkpoint runs/demo/best.pt --data data/heldout --split all --baseline
python -m lib.evaluate --checkpoint runs/demo/best.pt --data data/heldout --reshoot mild --baseline  # bg re-shot
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .augment import RESHOOT_LEVELS
from .data import ModestDataset, default_device, denormalize, make_loader
from .errors import UserError, run_cli
from .metrics import DELTA1_RATIO, DEPTH_VALID_MIN, classical_mask_baseline, count_mask_overlap, iou_from_counts
from .models import MODEL_SIZE_MULTIPLE
from .train import autocast_dtype, evaluate, load_model

BASELINE_THRESHOLDS = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3)


class BaselineScores:
    """Adds up, batch by batch, what the no-learning answers score: the classical mask "pixels where |bg_fg - bg|
    is large" at each threshold, and (with depth) one constant depth, the mean true depth of everything seen."""

    def __init__(self, thresholds: Sequence[float] = BASELINE_THRESHOLDS, with_depth: bool = False):
        self.thresholds, self.with_depth = tuple(thresholds), with_depth
        self.iou_sums: torch.Tensor | None = None  # (T,) per-image IoU summed, one per threshold
        self.depth_counts: torch.Tensor | None = None  # (256,) pixels per depth level (the files are 8-bit)
        self.samples = 0

    @torch.no_grad()
    def update(self, batch: dict) -> None:
        """Add one normalised loader batch."""
        bg, bg_fg = denormalize(batch["bg"], "bg"), denormalize(batch["bg_fg"], "bg_fg")  # (B, 3, H, W) in [0, 1]
        target = batch["mask"] > 0.5
        per_threshold = []
        for t in self.thresholds:
            inter, union, _ = count_mask_overlap(classical_mask_baseline(bg, bg_fg, t), target)
            per_threshold.append(iou_from_counts(inter, union).sum())
        values = torch.stack(per_threshold)  # (T,)
        self.iou_sums = values if self.iou_sums is None else self.iou_sums + values
        if self.with_depth:
            levels = (batch["depth"] * 255).round().long().clamp(0, 255).flatten()  # back to the file's 8-bit levels
            counts = torch.bincount(levels, minlength=256)
            self.depth_counts = counts if self.depth_counts is None else self.depth_counts + counts
        self.samples += batch["bg"].shape[0]

    def tap(self, loader) -> Iterator[dict]:
        """Yield `loader`'s batches, adding each up on the way (one pass serves the model and the baselines)."""
        for batch in loader:
            self.update(batch)
            yield batch

    def compute(self) -> dict[str, float]:
        """baseline_mask_iou (mean per-image IoU at the best threshold), baseline_threshold, and with depth
        baseline_depth_rmse and baseline_depth_delta1 of the constant mean true depth; {} if nothing was seen."""
        if self.iou_sums is None:
            return {}
        ious = (self.iou_sums / max(self.samples, 1)).tolist()
        best = max(range(len(self.thresholds)), key=lambda i: ious[i])
        result = {"baseline_mask_iou": ious[best], "baseline_threshold": self.thresholds[best]}
        if self.with_depth and self.depth_counts is not None:
            counts = self.depth_counts.double().cpu()
            values = torch.arange(256, dtype=torch.float64) / 255.0
            constant = float((counts * values).sum() / counts.sum())
            result["baseline_depth_rmse"] = float(((counts * (values - constant) ** 2).sum() / counts.sum()).sqrt())
            valid = values > DEPTH_VALID_MIN
            ratio = torch.maximum(values / constant, constant / values.clamp_min(1e-12)) if constant > 0 else values
            hits = counts[valid & (ratio < DELTA1_RATIO)].sum()
            result["baseline_depth_delta1"] = float(hits / counts[valid].sum()) if counts[valid].sum() > 0 else math.nan
        return result


@torch.no_grad()
def evaluate_baseline(loader, thresholds: Sequence[float] = BASELINE_THRESHOLDS) -> dict[str, float]:
    """Mean per-image IoU of the classical mask "pixels where |bg_fg - bg| is large", at its best threshold.

    Picking the threshold on the evaluated data itself flatters the baseline; the learned model gets no such help.
    """
    scores = BaselineScores(thresholds)
    for batch in loader:
        scores.update(batch)
    return scores.compute()


def build_parser() -> argparse.ArgumentParser:
    """The evaluate command's arguments."""
    p = argparse.ArgumentParser(
        prog="python -m lib.evaluate", description="Evaluate a checkpoint on MODEST-format data."
    )
    p.add_argument("--checkpoint", required=True, help="best.pt or last.pt from lib.train")
    p.add_argument("--data", required=True, help="a MODEST folder or zip")
    p.add_argument(
        "--split",
        choices=("all", "val", "train"),
        default="all",
        help="default all; val/train use the checkpoint's split settings",
    )
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's size")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: one per core, at most 8)")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also score the no-learning answers on the same pairs: the classical |bg_fg - bg| mask at its best "
        "threshold (baseline_mask_iou), and for a depth model one constant depth, the mean true depth over the "
        "evaluated set (baseline_depth_rmse, baseline_depth_delta1)",
    )
    p.add_argument(
        "--reshoot",
        default="none",
        choices=("none", *RESHOOT_LEVELS),
        help="score with bg re-shot: mild = shifted up to 2 px, exposure up to 12%%, white balance up to 5%% per "
        "channel, noise sigma 3/255, JPEG 80; strong = about twice that (see lib/augment.py)",
    )
    p.add_argument(
        "--reshoot-seed",
        type=int,
        default=0,
        help="each sample's re-shoot is drawn from (this seed, its row in the file map): the same for any batch "
        "size, worker count or device",
    )
    p.add_argument("--skip-bad-samples", action="store_true", help="leave out unreadable samples")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m lib.evaluate`."""
    args = build_parser().parse_args(argv)
    if args.split not in ("all", "val", "train"):
        raise UserError(f"--split must be all, val or train, not {args.split!r}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {args.batch_size}")
    device = default_device()
    model, state = load_model(args.checkpoint, device)
    cfg = state["config"]
    size = args.image_size or cfg["image_size"]
    multiple = MODEL_SIZE_MULTIPLE[cfg["model"]]
    if size is not None and size % multiple:
        raise UserError(f"--image-size {size} does not work for {cfg['model']}: use a multiple of {multiple}")
    reshoot = None if args.reshoot == "none" else args.reshoot
    dataset = ModestDataset(
        args.data,
        args.split,
        size,
        False,
        cfg["val_fraction"],
        cfg["split_by"],
        cfg["seed"],
        reshoot=reshoot,
        reshoot_seed=args.reshoot_seed,
    )
    loader = make_loader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
        device=device,
        skip_bad_samples=args.skip_bad_samples,
    )
    amp_dtype = autocast_dtype(device, cfg.get("amp", True))
    baseline = BaselineScores(with_depth=True) if args.baseline else None
    bar = tqdm(total=len(loader), desc="evaluate", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
    with bar:
        batches = baseline.tap(loader) if baseline is not None else loader
        result = evaluate(model, batches, None, device, amp_dtype=amp_dtype, progress=bar)
    if baseline is not None:
        scores = baseline.compute()
        if "depth_rmse" not in result:  # a mask-only model: no depth answer to compare with
            scores = {k: v for k, v in scores.items() if not k.startswith("baseline_depth")}
        result.update(scores)
    result.update(
        model=cfg["model"],
        checkpoint=str(args.checkpoint),
        data=str(args.data),
        split=args.split,
        image_size=size,
        reshoot=args.reshoot,
        reshoot_seed=args.reshoot_seed if reshoot else None,
        epoch=state["epoch"],
    )
    if loader.skipped:
        result["skipped"] = [name for name, _ in loader.skipped]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
