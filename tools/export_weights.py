"""Shrink a training checkpoint into shipped weights: the model in fp16, its config and history, nothing else.

    python tools/export_weights.py runs/weights-masknet/best.pt weights/masknet.pt

The result loads like any checkpoint (`lib.train.load_model`, `python -m lib.predict`, `python -m lib.evaluate`);
the fp16 tensors are widened back to fp32 when loaded. Written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.errors import run_cli  # noqa: E402
from lib.train import load_checkpoint, save_checkpoint  # noqa: E402

KEPT = ("format", "config", "epoch", "history", "best_val_loss")


def export_weights(src: Path, dest: Path) -> dict:
    """Write `src`'s model as fp16 with its config and history to `dest`; return what was written."""
    state = load_checkpoint(src)
    model = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    slim = {k: state[k] for k in KEPT if k in state} | {"model": model, "exported_from": str(src)}
    save_checkpoint(dest, slim)
    return slim


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python tools/export_weights.py`."""
    p = argparse.ArgumentParser(prog="python tools/export_weights.py", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="best.pt from python -m lib.train")
    p.add_argument("dest", type=Path, help="where to write, e.g. weights/masknet.pt")
    args = p.parse_args(argv)
    slim = export_weights(args.checkpoint, args.dest)
    size = args.dest.stat().st_size / 1e6
    print(f"{args.dest}: {slim['config']['model']} epoch {slim['epoch']}, {size:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
