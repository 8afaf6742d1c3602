"""Evaluate a checkpoint on any MODEST-format folder or zip; the last stdout line is one JSON object.

python -m lib.evaluate --checkpoint runs/demo/best.pt --data data/heldout --split all --baseline
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from .data import ModestDataset, default_device, denormalize, make_loader
from .errors import UserError, run_cli
from .metrics import classical_mask_baseline, count_mask_overlap, iou_from_counts
from .models import MODEL_SIZE_MULTIPLE
from .train import autocast_dtype, evaluate, load_model

BASELINE_THRESHOLDS = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3)


@torch.no_grad()
def evaluate_baseline(loader, thresholds: Sequence[float] = BASELINE_THRESHOLDS) -> dict[str, float]:
    """Mean per-image IoU of the classical mask "pixels where |bg_fg - bg| is large", at its best threshold.

    Picking the threshold on the evaluated data itself flatters the baseline; the learned model gets no such help.
    """
    sums = None
    count = 0
    for batch in loader:
        bg, bg_fg = denormalize(batch["bg"], "bg"), denormalize(batch["bg_fg"], "bg_fg")  # (B, 3, H, W) in [0, 1]
        target = batch["mask"] > 0.5
        per_threshold = []
        for t in thresholds:
            inter, union, _ = count_mask_overlap(classical_mask_baseline(bg, bg_fg, t), target)
            per_threshold.append(iou_from_counts(inter, union).sum())
        values = torch.stack(per_threshold)
        sums = values if sums is None else sums + values
        count += batch["bg"].shape[0]
    if sums is None:
        return {}
    ious = (sums / max(count, 1)).tolist()
    best = max(range(len(thresholds)), key=lambda i: ious[i])
    return {"baseline_mask_iou": ious[best], "baseline_threshold": thresholds[best]}


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
    p.add_argument("--baseline", action="store_true", help="also score the classical |bg_fg - bg| mask")
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
    dataset = ModestDataset(args.data, args.split, size, False, cfg["val_fraction"], cfg["split_by"], cfg["seed"])
    loader = make_loader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
        device=device,
        skip_bad_samples=args.skip_bad_samples,
    )
    amp_dtype = autocast_dtype(device, cfg.get("amp", True))
    result = evaluate(model, loader, None, device, amp_dtype=amp_dtype)
    if args.baseline:
        result.update(evaluate_baseline(loader))
    result.update(
        model=cfg["model"],
        checkpoint=str(args.checkpoint),
        data=str(args.data),
        split=args.split,
        image_size=size,
        epoch=state["epoch"],
    )
    if loader.skipped:
        result["skipped"] = [name for name, _ in loader.skipped]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
