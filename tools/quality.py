"""Measure mask and depth quality honestly: evaluation sets no choice is made on, several training seeds.

    python tools/quality.py sets                      # build the evaluation sets under data/quality/64px (once)
    python tools/quality.py run --seeds 1 2 3         # train the demo per seed and model, evaluate everything
    python tools/quality.py score weights/masknet.pt --out benchmarks/...jsonl   # one checkpoint, every test set
    python tools/quality.py summary benchmarks/quality-*.jsonl   # mean and spread per (model, set, re-shoot)
    python tools/quality.py references --out benchmarks/...jsonl   # aligned delta1 of reference depth answers

Three roles of data:
- training: what `python -m lib.train` generates (synthetic rooms, seed 0);
- tuning: `tune-synthetic` (seed 7, unseen rooms), the one set recipes were chosen on;
- test: `test-synthetic-s101..s103` (fresh seeds, unseen rooms and figures) and two sets on real photographs,
  built from scikit-learn's two sample photographs (china.jpg, flower.jpg), which training never sees:
  `test-photos-people` (procedural person cut-outs pasted on crops of the photos) and `test-photos-objects`
  (irregular pieces cut out of the photos, pasted on crops of them). No choice is made on the test sets.
Each checkpoint is scored on each set as shot (`--reshoot none`) and with the background re-shot
(`--reshoot mild`), next to pixel differencing at its best threshold on the same pairs (`--baseline`).
Raw output: one JSON object per line (the last line `python -m lib.evaluate` prints, plus run facts).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.errors import UserError, run_cli  # noqa: E402
from lib.synthetic import fg_height, make_figure, make_synthetic_dataset  # noqa: E402
from tools.build import build_dataset  # noqa: E402

SIZE = 64  # the demo's image size: each checkpoint is scored at its own size
TEST_SEEDS = (101, 102, 103)
TUNE_SEED = 7
SYNTHETIC_SET = dict(backgrounds=20, foregrounds=10, placements=2)  # 800 samples, unseen rooms
PHOTO_BACKGROUNDS = 40  # square crops of the two photographs
PHOTO_CUTOUTS = 10
RESHOOTS = ("none", "mild")


def load_photos() -> list[np.ndarray]:
    """scikit-learn's two sample photographs as RGB uint8 arrays (never used for training or tuning)."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise UserError("the photo sets need scikit-learn (pip install scikit-learn)") from None
    return [np.ascontiguousarray(img) for img in load_sample_images().images]


def make_photo_backgrounds(folder: Path, photos: list[np.ndarray], count: int, seed: int) -> None:
    """Write `count` random square crops (side 40-100% of the short side, random flip) of the photos as PNGs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        cv2.imwrite(str(folder / f"photo{i:03d}.png"), cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2BGR))


def make_person_cutouts(folder: Path, count: int, seed: int) -> None:
    """Write `count` procedural person cut-outs (RGBA PNGs), drawn with seeds training never uses."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rgba = make_figure(np.random.default_rng([seed, i]), fg_height(224))
        cv2.imwrite(str(folder / f"person{i:03d}.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))


def make_blob_alpha(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random blob filling most of an (height, width) box: uint8 alpha, 0 or 255, one piece."""
    noise = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), min(height, width) / 12)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bump = 1 - ((yy / height - 0.5) ** 2 + (xx / width - 0.5) ** 2) * 3  # favour the centre
    field = noise - noise.mean() + 0.02 * bump
    alpha = np.where(field > np.quantile(field, 0.45), 255, 0).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(alpha)
    if count > 1:  # keep the largest piece
        alpha = np.where(labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])), 255, 0).astype(np.uint8)
    return alpha


def make_photo_cutouts(folder: Path, photos: list[np.ndarray], count: int, seed: int) -> None:
    """Write `count` blob-shaped pieces cut out of the photographs (RGBA PNGs), each from a random spot."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = int(rng.integers(150, 260)), int(rng.integers(90, 220))
        y, x = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        rgba = np.dstack([photo[y : y + h, x : x + w], make_blob_alpha(rng, h, w)])
        cv2.imwrite(str(folder / f"object{i:03d}.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))


def evaluation_sets(root: Path) -> dict[str, tuple[str, Path]]:
    """{name: (role, path)} of every evaluation set under `root`."""
    sets = {f"tune-synthetic-s{TUNE_SEED}": ("tune", root / f"tune-synthetic-s{TUNE_SEED}")}
    for seed in TEST_SEEDS:
        sets[f"test-synthetic-s{seed}"] = ("test", root / f"test-synthetic-s{seed}")
    sets["test-photos-people"] = ("test", root / "test-photos-people")
    sets["test-photos-objects"] = ("test", root / "test-photos-objects")
    return sets


def build_sets(root: Path, size: int = SIZE) -> None:
    """Build every evaluation set that is missing under `root`, at `size` px."""
    sets = evaluation_sets(root)
    for name, (_, path) in sets.items():
        if "synthetic" in name:
            seed = int(path.name.rsplit("-s", 1)[1])
            make_synthetic_dataset(path, size=size, seed=seed, progress=False, **SYNTHETIC_SET)
    photos = load_photos()
    sources = root / "sources"
    if not (sources / "backgrounds").is_dir():
        make_photo_backgrounds(sources / "backgrounds", photos, PHOTO_BACKGROUNDS, seed=2024)
        make_person_cutouts(sources / "people", PHOTO_CUTOUTS, seed=9001)
        make_photo_cutouts(sources / "objects", photos, PHOTO_CUTOUTS, seed=9002)
    for kind in ("people", "objects"):
        out = root / f"test-photos-{kind}"
        if not out.exists():
            build_dataset(
                sources / "backgrounds", sources / kind, out, size=SIZE, placements=2, seed=11, progress=False
            )
    for name, (role, path) in sets.items():
        print(f"{role:5} {name:22} {path}")


def machine() -> str:
    """One line about this machine, for the raw output."""
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def evaluate_json(argv: list[str]) -> dict:
    """Run `python -m lib.evaluate` in this process (no start-up per call); return its last-line JSON object."""
    from lib.evaluate import main as evaluate_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluate_main(argv)
    return json.loads(out.getvalue().strip().splitlines()[-1])


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run that trained all its epochs."""
    import torch

    last = run_dir / "last.pt"
    if not last.exists():
        return False
    state = torch.load(last, map_location="cpu", weights_only=False)
    return state["epoch"] >= state["config"]["epochs"]


def sets_of_role(root: Path, role: str = "all") -> dict[str, tuple[str, Path]]:
    """The evaluation sets of `role` (tune, test or all) under `root`; UserError if one has not been built."""
    sets = {name: (r, path) for name, (r, path) in evaluation_sets(root).items() if role in ("all", r)}
    missing = [str(path) for _, path in sets.values() if not path.exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{missing[0]}: evaluation set not found{more}; run `python tools/quality.py sets` first")
    return sets


def run(
    root: Path, seeds: list[int], models: list[str], out: Path, runs: Path, extra: list[str], role: str = "all"
) -> None:
    """Train the demo per (model, seed) unless its run exists, then score it on every set of `role`."""
    sets_of_role(root, role)  # fail before training, not after
    for model in models:
        for seed in seeds:
            run_dir = runs / f"{model}-s{seed}"
            train_seconds = None
            if not finished(run_dir):
                start = time.perf_counter()
                cmd = [sys.executable, "-m", "lib.train", "--model", model, "--seed", str(seed)]
                subprocess.run([*cmd, "--out", str(run_dir), "--quiet", *extra], cwd=ROOT, check=True)
                train_seconds = round(time.perf_counter() - start, 1)
            command = ["python -m lib.train", "--model", model, "--seed", str(seed), *extra]
            facts = dict(train_seed=seed, train_command=" ".join(command), train_seconds=train_seconds)
            score(root, run_dir / "best.pt", out, role, facts, label=f"{model} s{seed}")


def score(
    root: Path, checkpoint: Path, out: Path, role: str = "test", facts: dict | None = None, label: str | None = None
) -> None:
    """Evaluate one checkpoint on every set of `role`, as shot and re-shot, next to differencing; append one JSON
    line per (set, background) to `out`, with `facts` (default: the checkpoint as shipped weights, train seed 0)."""
    facts = facts if facts is not None else dict(train_seed=0, weights=str(checkpoint))
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, (set_role, path) in sets_of_role(root, role).items():
        for reshoot in RESHOOTS:
            result = evaluate_json(
                ["--checkpoint", str(checkpoint), "--data", str(path), "--baseline", "--reshoot", reshoot]
            )
            result.update(set=name, role=set_role, reshoot=reshoot, machine=machine(), **facts)
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(
                f"{label or checkpoint} {name:22} reshoot {reshoot:5} IoU {result['mask_iou']:.3f} "
                f"(differencing {result['baseline_mask_iou']:.3f})",
                flush=True,
            )


def reference_depths(train: Path, root: Path, role: str = "all", samples: int = 2400) -> list[dict]:
    """Aligned depth scores of answers that bound what a model can reach, per synthetic set: one constant; the mean
    depth map of `train` (what a model that ignores the photo learns); and two that peek at the truth: each row
    of the true depth replaced by its mean (the floor's ramp, no objects), and the truth box-blurred 3 x 3 (right
    everywhere but at edges)."""
    import torch
    import torch.nn.functional as F

    from lib.data import ModestDataset, make_loader
    from lib.metrics import ALIGNED_SUM_FIELDS, depth_aligned_sums, depth_metric_from_sums

    def load(path: Path):
        return make_loader(ModestDataset(path, image_size=SIZE), batch_size=64, shuffle=False, num_workers=0)

    total, seen = None, 0
    for batch in load(train):
        total = batch["depth"].sum(0) if total is None else total + batch["depth"].sum(0)  # (1, H, W)
        seen += len(batch["depth"])
        if seen >= samples:
            break
    mean_map = total / seen
    answers = {
        "constant": lambda d: torch.zeros_like(d),
        "training mean depth map": lambda d: mean_map.expand_as(d),
        "truth, rows averaged (peeks)": lambda d: d.mean(3, keepdim=True).expand_as(d),
        "truth, blurred 3x3 (peeks)": lambda d: F.avg_pool2d(d, 3, 1, 1, count_include_pad=False),
    }
    results = []
    for name, (set_role, path) in sets_of_role(root, role).items():
        if "synthetic" not in name:
            continue  # the photo sets have no depth truth
        sums = {answer: torch.zeros(len(ALIGNED_SUM_FIELDS), dtype=torch.float64) for answer in answers}
        for batch in load(path):
            for answer, predict in answers.items():
                sums[answer] += depth_aligned_sums(predict(batch["depth"]), batch["depth"], dtype=torch.float64)
        for answer, values in sums.items():
            delta1 = depth_metric_from_sums("depth_delta1_aligned", dict(zip(ALIGNED_SUM_FIELDS, values))).item()
            results.append(dict(set=name, role=set_role, answer=answer, depth_delta1_aligned=delta1, train=str(train)))
    return results


def mean_spread(values: list[float]) -> str:
    """'mean ± standard deviation' over seeds (± 0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def family(name: str) -> str:
    """The set family a set belongs to: test-synthetic-s101..s103 -> test-synthetic; others are their own."""
    return re.sub(r"-s\d+$", "", name) if name.startswith("test-synthetic") else name


def over_seeds(by_seed: dict[int, list[dict]], key: str) -> str:
    """'mean ± spread' over training seeds of each seed's mean `key`; empty if some result lacks it."""
    if any(key not in r for rs in by_seed.values() for r in rs):
        return ""
    return mean_spread([statistics.mean(r[key] for r in rs) for rs in by_seed.values()])


def summary(paths: list[Path]) -> str:
    """A markdown table per model, set family and background (as shot / re-shot): mask IoU next to differencing,
    depth (where the set has depth) next to the mean depth, as mean ± standard deviation over training seeds, each
    seed's value being its mean over the family's sets."""
    runs: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            runs[(r["model"], r["role"], family(r["set"]), r["reshoot"])][r.get("train_seed", 0)].append(r)
    rows = [
        "| model | set (role) | background | seeds | mask IoU | differencing IoU | depth RMSE | mean-depth RMSE "
        "| depth delta1 | delta1 aligned | AbsRel aligned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (model, role, name, reshoot), by_seed in sorted(runs.items()):
        has_depth = not name.startswith("test-photos")  # the photo sets have no depth truth (flat placeholder maps)
        keys = ("depth_rmse", "baseline_depth_rmse", "depth_delta1", "depth_delta1_aligned", "depth_absrel_aligned")
        depth = [over_seeds(by_seed, k) if has_depth else "" for k in keys]
        rows.append(
            f"| {model} | {name} ({role}) | {'re-shot' if reshoot != 'none' else 'as shot'} | {len(by_seed)} "
            f"| {over_seeds(by_seed, 'mask_iou')} | {over_seeds(by_seed, 'baseline_mask_iou')} | {' | '.join(depth)} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python tools/quality.py`."""
    p = argparse.ArgumentParser(prog="python tools/quality.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sets", help="build the evaluation sets")
    s.add_argument("--root", type=Path, default=None, help="default data/quality/SIZEpx")
    s.add_argument("--size", type=int, default=SIZE, help="image side of every set (a checkpoint's own size)")
    r = sub.add_parser("run", help="train the demo per seed and model, evaluate on every set")
    r.add_argument("--root", type=Path, default=ROOT / "data" / "quality" / f"{SIZE}px")
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    r.add_argument("--models", nargs="+", default=["masknet", "depthnet"], choices=["masknet", "depthnet"])
    r.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality")
    r.add_argument("--out", type=Path, required=True, help="JSON lines file to append to (benchmarks/...)")
    r.add_argument("--role", choices=["all", "tune", "test"], default="all", help="score only the sets of this role")
    r.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more lib.train arguments")
    c = sub.add_parser("score", help="evaluate one checkpoint (e.g. weights/masknet.pt) on every set")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--root", type=Path, default=ROOT / "data" / "quality" / f"{SIZE}px")
    c.add_argument("--out", type=Path, required=True, help="JSON lines file to append to (benchmarks/...)")
    c.add_argument("--role", choices=["all", "tune", "test"], default="test", help="score only the sets of this role")
    f = sub.add_parser("references", help="aligned delta1 of reference depth answers on the synthetic sets")
    f.add_argument(
        "--train", default="synthetic", help="training data, as lib.train's --data: synthetic (the demo's) or a path"
    )
    f.add_argument("--root", type=Path, default=ROOT / "data" / "quality" / f"{SIZE}px")
    f.add_argument("--out", type=Path, required=True, help="JSON lines file to append to (benchmarks/...)")
    m = sub.add_parser("summary", help="mean and spread per model, set and background")
    m.add_argument("files", type=Path, nargs="+")
    args = p.parse_args(argv)
    if args.command == "sets":
        build_sets(args.root or ROOT / "data" / "quality" / f"{args.size}px", args.size)
    elif args.command == "run":
        extra = [a for a in args.train_args if a != "--"]
        run(args.root, args.seeds, args.models, args.out, args.runs, extra, args.role)
    elif args.command == "score":
        score(args.root, args.checkpoint, args.out, args.role)
    elif args.command == "references":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from lib.train import resolve_data

        with open(args.out, "a") as f:
            for result in reference_depths(resolve_data(args.train, progress=False), args.root):
                result["machine"] = machine()
                f.write(json.dumps(result) + "\n")
                print(f"{result['set']:22} {result['answer']:30} delta1 aligned {result['depth_delta1_aligned']:.3f}")
    else:
        print(summary(args.files))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
