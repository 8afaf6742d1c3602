"""Measure the data path and the training step, side by side with the original (2020) pipeline, on one machine.

    python -m tools.bench                          # on this machine's best device; on a CPU, about 2-3 minutes
    python -m tools.bench --json                   # ... and one JSON object on the last line
    python -m tools.bench --device cuda --workers 2 --compile   # a Colab-like GPU run (2 loader workers)
    taskset -c 0,1 python -m tools.bench --device cuda --workers 2   # ... on a big machine: 2 cores, as on Colab
    python -m tools.bench --zip-index-test         # also: open the index of a 1.2M-member zip (cold, cached, RSS)
    python -m tools.bench --epoch-memory-test      # also: host memory over one epoch of 280,000 samples (Linux)

Data: the synthetic twin of MODEST at 224 px (20 bg x 20 fg x 10 placements, each also mirrored = 8,000 samples,
a stored zip written once under data/, ~170 MB), or --data PATH (a MODEST folder or zip). Sections:
  loader      samples/s of the training loader alone (augmentation on): ours with threads and with worker
              processes, in CPU mode and (on CUDA) GPU mode, against SEED-STYLE, a copy of the original
              pipeline: PIL per file from an extracted folder, albumentations per image with independent draws,
              Normalize + ToTensorV2, a torch DataLoader with the same number of workers. Then the CPU work
              per sample on one thread, stage by stage (read, decode, augment, collate + float; seed-style),
              and the samples/s that work allows on this machine's cores.
  model step  samples/s of one SGD step on random batches: DepthNet and MaskNet, fp32 vs AMP (CUDA), eager vs
              torch.compile (--compile), channels_last on CUDA.
  end to end  samples/s of `train_one_epoch` with our loader (the training recipe), the time one epoch of
              280,000 samples would take; on CUDA also with each batch prepared between steps, with worker
              processes decoding on the CPU, and the seed recipe (fp32, seed-style loader).
  memory      peak host RSS (this process and its largest child) and peak GPU memory.
  epoch memory (--epoch-memory-test) host memory of the training loader (threads, then worker processes)
              sampled through one whole epoch of a 400,000-sample synthetic MODEST zip (100 x 100 x 40 at
              32 px, ~1.2 GB, written once under the system's temp folder): does it stay flat?
Speeds are measurements of this run on this machine (other load on it shows in `load_average`), never targets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lib.data import (
    BG_FG_MEAN,
    BG_FG_STD,
    BG_MEAN,
    BG_STD,
    ModestDataset,
    default_device,
    default_workers,
    make_loader,
    simplejpeg,
    usable_cores,
)
from lib.errors import UserError, run_cli

EPOCH_SAMPLES = 280_000  # one epoch of the original 70/30 split of MODEST's 400,000 samples
BENCH_DATA = dict(size=224, backgrounds=20, foregrounds=20, placements=10, seed=0)  # 8,000 samples, ~170 MB
# Published MODEST target statistics, as the original normalised its targets (a defect kept in the baseline).
MASK_MEAN, MASK_STD = 0.05207, 0.21686
DEPTH_MEAN, DEPTH_STD = 0.2981, 0.11561
ZIP_TEST_MEMBERS = 1_200_000
MEMORY_TEST_DATA = dict(size=32, backgrounds=100, foregrounds=100, placements=20, seed=0)  # MODEST's 400,000 samples


# ---------------------------------------------------------------------------------------------- the baseline


class SeedStyleDataset(Dataset):
    """BASELINE ONLY, a copy of the original (2020) data pipeline, kept to measure against; do not train with it.

    Per sample: PIL `Image.open` of four files from an extracted folder (the background too, every time),
    then one albumentations pipeline per image: HueSaturationValue + RandomBrightnessContrast drawn
    independently for bg and bg_fg, Normalize with the published statistics (the targets too, as the
    original did) and ToTensorV2. Returns float CHW tensors.
    """

    def __init__(self, root: str | os.PathLike, files: list[tuple[str, str, str, str]], image_size: int | None = None):
        try:
            import albumentations as A
            from albumentations.pytorch import ToTensorV2
        except ImportError:
            raise UserError("the seed-style baseline needs albumentations (pip install albumentations)") from None
        self.root, self.files = Path(root), files
        resize = [A.Resize(image_size, image_size)] if image_size else []
        color = [A.HueSaturationValue(), A.RandomBrightnessContrast()]
        self.bg_transform = A.Compose(resize + color + [A.Normalize(BG_MEAN, BG_STD), ToTensorV2()])
        self.bg_fg_transform = A.Compose(resize + color + [A.Normalize(BG_FG_MEAN, BG_FG_STD), ToTensorV2()])
        self.mask_transform = A.Compose(resize + [A.Normalize(MASK_MEAN, MASK_STD), ToTensorV2()])
        self.depth_transform = A.Compose(resize + [A.Normalize(DEPTH_MEAN, DEPTH_STD), ToTensorV2()])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        bg, bg_fg, mask, depth = (np.array(Image.open(self.root / name)) for name in self.files[index])
        return {
            "bg": self.bg_transform(image=bg)["image"],
            "bg_fg": self.bg_fg_transform(image=bg_fg)["image"],
            "mask": self.mask_transform(image=mask)["image"],
            "depth": self.depth_transform(image=depth)["image"],
        }


def extract_for_baseline(
    dataset: ModestDataset, rows: np.ndarray, out: Path
) -> tuple[Path, list[tuple[str, str, str, str]]]:
    """The files of `rows` as the original read them: extracted into `out` (once), listed as (bg, bg_fg, mask, depth)."""
    source = dataset.source
    members = np.concatenate([dataset.bg_members[dataset.bg_ids[rows]][:, None], dataset.sample_members[rows]], 1)
    if not hasattr(source, "index"):  # already a folder
        return source.root, [tuple(source.names[m].decode() for m in row) for row in members]
    files = []
    for row in members:
        names = []
        for m in row:
            name = source.names[m].decode()
            path = out / name
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(source.read(int(m)))
                os.replace(tmp, path)
            names.append(name)
        files.append(tuple(names))
    return out, files


# ---------------------------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def cuda_flags(fast: bool):
    """fast: cudnn autotuning and TF32, as `fit` sets them; else PyTorch's defaults (what the original ran with)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = fast
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default too
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_loader(loader, samples: int, device: torch.device) -> dict:
    """samples/s of iterating `loader` after its first batch (first_batch_s: startup), over about `samples` samples."""
    start = time.perf_counter()
    it = iter(loader)
    count = 0
    try:
        first = next(it)
        _sync(device)
        first_s = time.perf_counter() - start
        t0 = time.perf_counter()
        for batch in it:
            count += batch["bg"].shape[0]
            if count >= samples:
                break
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        del it
    if count == 0:  # one batch held everything: time that one instead
        count, seconds = first["bg"].shape[0], first_s
    out = {"samples_per_s": round(count / max(seconds, 1e-9), 1), "samples": count, "first_batch_s": round(first_s, 2)}
    if getattr(loader, "decode_on_device", False):
        out["device_decode_fallbacks"] = loader.decode_fallbacks
    return out


def _random_batch(batch: int, size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "bg": torch.randn(batch, 3, size, size, generator=g).to(device),
        "bg_fg": torch.randn(batch, 3, size, size, generator=g).to(device),
        "mask": (torch.rand(batch, 1, size, size, generator=g) > 0.9).float().to(device),
        "depth": torch.rand(batch, 1, size, size, generator=g).to(device),
    }


def _make_step(
    model, loss_fn, optimizer, device, amp_dtype, channels_last: bool, sync_loss: bool = False
) -> Callable[[dict], None]:
    """One SGD step on a batch of float tensors already on the device (fp16 gets a GradScaler)."""
    from lib.train import train_step

    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def step(batch: dict) -> None:
        loss, _ = train_step(
            model, batch, loss_fn, optimizer, device, scaler=scaler, amp_dtype=amp_dtype, channels_last=channels_last
        )
        if sync_loss:
            loss.item()  # the original logged the loss every batch: one host sync per step

    return step


def _make_training(model_name: str, device: torch.device, amp: bool, channels_last: bool, compile_model: bool):
    from lib.losses import DEFAULT_LOSS, make_loss
    from lib.models import make_model
    from lib.train import autocast_dtype

    torch.manual_seed(0)
    model = make_model(model_name).to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-8)
    loss_fn = make_loss(DEFAULT_LOSS[model_name], model_name)
    amp_dtype = autocast_dtype(device, amp)
    train_model = torch.compile(model) if compile_model else model
    return model, train_model, optimizer, loss_fn, amp_dtype


def measure_step(
    model_name: str,
    size: int,
    batch: int,
    device: torch.device,
    *,
    amp: bool,
    compile_model: bool,
    channels_last: bool,
    warmup: int,
    iters: int,
) -> dict:
    """samples/s of training steps on one random batch kept on the device (warmup steps, compile included, not timed)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, train_model, optimizer, loss_fn, amp_dtype = _make_training(
        model_name, device, amp, channels_last, compile_model
    )
    step = _make_step(train_model, loss_fn, optimizer, device, amp_dtype, channels_last)
    data = _random_batch(batch, size, device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(data)
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        step(data)
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {
        "model": model_name,
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "compiled": compile_model,
        "channels_last": channels_last,
        "batch_size": batch,
        "samples_per_s": round(batch * iters / seconds, 1),
        "warmup_s": round(warm_s, 1),
    }
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return out


def measure_ours_end_to_end(
    dataset: ModestDataset,
    model_name: str,
    samples: int,
    batch: int,
    workers: int,
    device: torch.device,
    compile_model: bool,
    ahead: int | None = None,
    data_mode: str = "auto",
    decode: str = "auto",
    loader: str = "auto",
) -> dict:
    """`train_one_epoch` over `samples` training samples with the default loader (or the `loader`, `data_mode`,
    `decode` and `ahead` given) and the training recipe."""
    from lib.train import EpochSampler, train_one_epoch

    channels_last = device.type == "cuda"
    model, train_model, optimizer, loss_fn, amp_dtype = _make_training(
        model_name, device, True, channels_last, compile_model
    )
    train_set = dataset.subset("train", augment=True)

    def run(limit: int) -> dict:
        sampler = EpochSampler(len(train_set), 1, limit)
        batches = make_loader(
            train_set,
            batch_size=batch,
            shuffle=False,
            sampler=sampler,
            num_workers=workers,
            device=device,
            drop_last=True,
            ahead=ahead,
            data_mode=data_mode,
            decode=decode,
            loader=loader,
        )
        result = train_one_epoch(
            train_model,
            batches,
            loss_fn,
            optimizer,
            device,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
            log_every=50,
        )
        result["loader"] = type(batches.loader).__name__
        result["data_mode"] = batches.data_mode
        result["decode_on_device"] = getattr(batches, "decode_on_device", False)
        result["ahead"] = batches.ahead
        return result

    t0 = time.perf_counter()
    run(min(len(train_set), 2 * batch))  # warm up: cudnn autotuning, compilation, first decodes
    warm_s = time.perf_counter() - t0
    result = run(min(len(train_set), max(samples, batch)))
    rate = result["samples"] / result["seconds"]
    return {
        "model": model_name,
        "recipe": "ours",
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "compiled": compile_model,
        "channels_last": channels_last,
        "loader": result["loader"],
        "data_mode": result["data_mode"],
        "decode_on_device": result["decode_on_device"],
        "ahead": result["ahead"],
        "workers": workers,
        "batch_size": batch,
        "samples": result["samples"],
        "samples_per_s": round(rate, 1),
        "epoch_280k_min": round(EPOCH_SAMPLES / rate / 60, 1),
        "warmup_s": round(warm_s, 1),
    }


def measure_seed_end_to_end(
    root: Path,
    files: list,
    size: int | None,
    model_name: str,
    samples: int,
    batch: int,
    workers: int,
    device: torch.device,
) -> dict:
    """The original recipe end to end: seed-style loader, fp32, no channels_last, the loss read back every step."""
    _, train_model, optimizer, loss_fn, amp_dtype = _make_training(model_name, device, False, False, False)
    step = _make_step(train_model, loss_fn, optimizer, device, None, False, sync_loss=True)
    loader = DataLoader(
        SeedStyleDataset(root, files, size),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    count, t0, start = 0, None, time.perf_counter()
    for i, cpu_batch in enumerate(loader):
        step({k: v.to(device) for k, v in cpu_batch.items()})
        if i == 1:  # two warm-up steps (worker startup, cudnn), then time
            _sync(device)
            t0 = time.perf_counter()
        elif i > 1:
            count += batch
            if count >= samples:
                break
    _sync(device)
    if t0 is None or count == 0:
        raise UserError("too few samples for the seed-style end-to-end run (needs at least 3 batches)")
    rate = count / (time.perf_counter() - t0)
    return {
        "model": model_name,
        "recipe": "seed",
        "precision": "fp32",
        "compiled": False,
        "channels_last": False,
        "loader": "seed-style DataLoader",
        "workers": workers,
        "batch_size": batch,
        "samples": count,
        "samples_per_s": round(rate, 1),
        "epoch_280k_min": round(EPOCH_SAMPLES / rate / 60, 1),
        "warmup_s": round(t0 - start, 1),
    }


@contextlib.contextmanager
def one_thread():
    """torch and OpenCV on one thread each, restored afterwards: per-sample costs without parallel speed-ups."""
    import cv2

    saved = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        cv2.setNumThreads(saved[1])


def measure_cpu_stages(train_set: ModestDataset, samples: int, batch: int, seed_dataset: Dataset | None = None) -> dict:
    """Milliseconds per sample of each CPU stage of our loader on one thread (read, decode, augment, collate + float),
    and of one seed-style sample; what the loader could reach if its threads scaled perfectly over the cores."""
    from lib.augment import apply_augment
    from lib.data import collate_samples

    n = min(samples, len(train_set))
    rows = [int(train_set.rows[i]) for i in range(n)]
    loader = make_loader(train_set, batch_size=batch, shuffle=False, num_workers=0, device="cpu")

    def per_sample(fn: Callable[[int], object], count: int = n) -> float:
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        return (time.perf_counter() - start) / count * 1e3

    def read(row: int) -> list[bytes]:
        return [train_set.source.read(int(member)) for member in train_set.sample_members[row]]  # bg_fg, mask, depth

    with one_thread():
        backgrounds = [train_set._background(int(train_set.bg_ids[r])) for r in rows]  # decoded once per run, not timed
        datas = [read(r) for r in rows]  # also warms the OS file cache: "read" times warm reads
        stages = {"read": per_sample(lambda i: read(rows[i]))}
        stages["decode"] = per_sample(lambda i: train_set._load_others(rows[i], backgrounds[i][1], datas[i]))
        others = [train_set._load_others(r, backgrounds[i][1], datas[i]) for i, r in enumerate(rows)]
        stages["augment"] = (
            per_sample(lambda i: apply_augment(train_set.augment, backgrounds[i][0], *others[i]))
            if train_set.augment is not None
            else 0.0
        )
        loaded = [train_set.load(i) for i in range(min(n, batch))]
        stages["collate_and_float"] = per_sample(lambda i: loader.to_device(collate_samples(loaded)), 5) / len(loaded)
        seed_ms = per_sample(lambda i: seed_dataset[i], min(n, len(seed_dataset))) if seed_dataset is not None else None
    total = sum(stages.values())
    cores = usable_cores()
    result = {
        "ms_per_sample": {k: round(v, 3) for k, v in stages.items()},
        "total_ms": round(total, 3),
        "cores": cores,
        "ceiling_samples_per_s": round(cores * 1e3 / total, 1),
    }
    if seed_ms is not None:
        result["seed_style_ms"] = round(seed_ms, 3)
        result["ceiling_vs_seed"] = round(seed_ms / total, 1)
    return result


# ---------------------------------------------------------------------------------------------- zip index


def write_many_member_zip(path: Path, members: int = ZIP_TEST_MEMBERS) -> Path:
    """A stored ZIP64 zip of `members` one-byte files named like MODEST's (bg_fg/, bg_fg_mask/, bg_fg_depth_map/)."""
    data, crc = b"x", zlib.crc32(b"x")
    tmp = path.with_name(path.name + ".partial")
    central, offset = [], 0
    kinds = (("bg_fg/", ""), ("bg_fg_mask/", "_mask"), ("bg_fg_depth_map/", "_depth_map"))
    with open(tmp, "wb") as f:
        for i in range(members):
            folder, suffix = kinds[i % 3]
            n = i // 3
            name = (
                f"modest/{folder}bg{n // 4000 + 1:03d}_fg{n // 40 % 100 + 1:03d}_{n % 40 + 1:02d}{suffix}.jpeg".encode()
            )
            f.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 33, crc, 1, 1, len(name), 0) + name + data)
            central.append(
                struct.pack(
                    "<4sHHHHHHIIIHHHHHII",
                    b"PK\x01\x02",
                    20,
                    20,
                    0,
                    0,
                    0,
                    33,
                    crc,
                    1,
                    1,
                    len(name),
                    0,
                    0,
                    0,
                    0,
                    0o644 << 16,
                    offset,
                )
                + name
            )
            offset += 30 + len(name) + 1
        cd = b"".join(central)
        f.write(cd)
        end = offset + len(cd)
        f.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, members, members, len(cd), offset))
        f.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1))
        f.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    os.replace(tmp, path)
    return path


_OPEN_INDEX = """
import json, os, resource, sys, time
def rss():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) // 1024 for k, v in (l.split(":", 1) for l in f) if k in ("VmRSS", "VmHWM")}
from lib.zipindex import ZipIndex
before = rss()
t = time.perf_counter()
index = ZipIndex(sys.argv[1], cache=sys.argv[2] == "1")
seconds = time.perf_counter() - t
after = rss()
print(json.dumps({"seconds": seconds, "members": len(index), "rss_mb": after["VmRSS"], "peak_rss_mb": after["VmHWM"],
                  "index_rss_mb": after["VmRSS"] - before["VmRSS"], "baseline_rss_mb": before["VmRSS"]}))
"""


def zip_index_test(folder: Path, members: int = ZIP_TEST_MEMBERS) -> dict:
    """Open the index of a `members`-member zip in fresh processes: parsed cold (no cache), first open (writes the
    cache), cached; seconds and resident memory of each."""
    from lib.zipindex import _cache_paths

    path = folder / f"bench-{members}-members.zip"
    built_s = None
    if not path.exists():
        t = time.perf_counter()
        write_many_member_zip(path, members)
        built_s = round(time.perf_counter() - t, 1)
    for cache in _cache_paths(path):
        cache.unlink(missing_ok=True)
    root = Path(__file__).resolve().parents[1]

    def open_once(use_cache: bool) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _OPEN_INDEX, str(path), "1" if use_cache else "0"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        record = json.loads(out.stdout.strip().splitlines()[-1])
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in record.items()}

    result = {
        "members": members,
        "zip_mb": round(path.stat().st_size / 2**20),
        "built_s": built_s,
        "cold_no_cache": open_once(False),
        "first_open_writes_cache": open_once(True),
        "cached": open_once(True),
    }
    return result


# ---------------------------------------------------------------------------------------------- epoch memory


def _memory_mb(pid: int) -> float:
    """Proportional set size of process `pid` in MB (its private pages plus its share of pages shared with
    others, so forked workers add up right; Linux /proc); resident size where PSS is not available; 0 if gone."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return 0.0


def _child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def measure_epoch_memory(dataset: ModestDataset, kind: str, batch: int, workers: int, every: int = 100) -> dict:
    """One epoch of the training loader (augmentation on, CPU device) over `dataset`; host memory (PSS) of this
    process and of its loader processes sampled every `every` batches and at the last one. MB; `growth_mb`:
    last sample minus the first."""
    if not Path("/proc/self/status").exists():
        raise UserError("the epoch memory test reads /proc (Linux only)")
    me = os.getpid()
    loader = make_loader(dataset, batch_size=batch, shuffle=True, num_workers=workers, device="cpu", loader=kind)
    trace, samples, start = [], 0, time.perf_counter()

    def sample() -> None:
        kids = [_memory_mb(k) for k in _child_pids(me)]
        trace.append(
            {
                "samples": samples,
                "self_mb": round(_memory_mb(me)),
                "children_mb": round(sum(kids)),
                "largest_child_mb": round(max(kids, default=0.0)),
                "processes": 1 + len(kids),
            }
        )

    last = len(loader) - 1
    for i, b in enumerate(loader):
        samples += b["bg"].shape[0]
        if i % every == 0 or i == last:  # the last one while the workers still run
            sample()
    seconds = time.perf_counter() - start
    total = [t["self_mb"] + t["children_mb"] for t in trace]
    return {
        "loader": kind,
        "workers": workers,
        "batch_size": batch,
        "samples": samples,
        "seconds": round(seconds, 1),
        "first_mb": total[0],
        "peak_mb": max(total),
        "last_mb": total[-1],
        "growth_mb": total[-1] - total[0],
        "largest_child_mb": max(t["largest_child_mb"] for t in trace),
        "trace": trace,
    }


def epoch_memory_test(
    folder: Path,
    workers: int,
    batch: int = 64,
    data: dict | None = None,
    kinds: Sequence[str] = ("threads", "processes"),
    progress: bool = False,
) -> dict:
    """`measure_epoch_memory` for each loader kind on a 400,000-sample synthetic zip (MEMORY_TEST_DATA; written once)."""
    from lib.synthetic import make_synthetic_dataset

    d = dict(MEMORY_TEST_DATA if data is None else data)
    name = f"bench-memory-{d['size']}px-{d['backgrounds']}x{d['foregrounds']}x{2 * d['placements']}-seed{d['seed']}.zip"
    t = time.perf_counter()
    path = make_synthetic_dataset(folder / name, as_zip=True, progress=progress, **d)
    written_s = time.perf_counter() - t
    dataset = ModestDataset(path, "all", d["size"])
    train = dataset.subset("train", augment=True)
    result = {
        "data": str(path),
        "zip_mb": round(path.stat().st_size / 2**20),
        "ready_s": round(written_s, 1),
        "samples_in_data": len(dataset),
        "train_samples": len(train),
    }
    for kind in kinds:
        result[kind] = measure_epoch_memory(train, kind, batch, workers)
    return result


# ---------------------------------------------------------------------------------------------- the run


def machine_info(device: torch.device) -> dict:
    """What this ran on: date, OS, CPU, cores, GPU, library versions, decoders present, load average."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": usable_cores(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "simplejpeg": getattr(simplejpeg, "__version__", None) if simplejpeg is not None else None,
        "albumentations": _version("albumentations"),
        "opencv": _version("cv2"),
        "pillow": _version("PIL"),
        "device": str(device),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_capability=list(torch.cuda.get_device_capability(device)),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
        )
    return info


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", "present")


def peak_rss_mb() -> dict:
    """Peak resident memory of this process and of its largest child (loader workers), MB."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit / 2**20
    return {"self_mb": round(own), "largest_child_mb": round(kids)}


def bench_data(data: str | None, progress: bool) -> Path:
    """--data, or the synthetic bench set (generated once under data/)."""
    if data:
        return Path(data)
    try:
        from lib.synthetic import make_synthetic_dataset
    except ImportError as exc:
        raise UserError(
            f"writing the synthetic bench set needs {exc.name} (pip install -r requirements.txt), or pass --data PATH"
        ) from None

    d = BENCH_DATA
    path = (
        Path("data")
        / f"bench-synthetic-{d['size']}px-{d['backgrounds']}x{d['foregrounds']}x{2 * d['placements']}-seed{d['seed']}.zip"
    )
    return make_synthetic_dataset(path, as_zip=True, progress=progress, **d)


def _try(results: dict | list, key: str | None, fn: Callable[[], dict], label: str) -> dict | None:
    """Run one measurement; a failure is recorded (and the bench goes on)."""
    try:
        value = fn()
    except Exception as exc:  # a missing package, an unsupported mode: report it, measure the rest
        value = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    if isinstance(results, dict):
        results[key] = value
    else:
        results.append({"name": label, **value})
    return value


def run_bench(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    """All sections; returns the report dict."""
    device = torch.device(args.device) if args.device != "auto" else default_device()
    if device.type == "mps":
        device = torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else default_workers()
    size = args.size
    batch = args.batch_size or (64 if cuda else 32)
    loader_samples = args.samples or (4096 if cuda else 768)
    e2e_samples = args.samples or (4096 if cuda else 32)
    e2e_batch = min(batch, e2e_samples) if cuda else min(8, batch, e2e_samples)
    step_batch = min(batch, 64) if cuda else min(4, batch)
    warmup, iters = (5, 20) if cuda else (1, 2)
    report: dict = {"machine": machine_info(device)}
    m = report["machine"]
    log(f"tools.bench  {m['date']}  {m['platform']}")
    log(f"  cpu: {m['cpu']} ({m['cores']} cores)  torch {m['torch']}  torchvision {m['torchvision']}")
    log(
        f"  device: {device}"
        + (f" = {m['gpu']} (capability {m['gpu_capability']}, {m['gpu_memory_gb']} GB)" if cuda else "")
    )
    log(
        f"  decoders: simplejpeg {m['simplejpeg']}, opencv {m['opencv']}, pillow {m['pillow']}; albumentations {m['albumentations']}"
        f"; load average {m['load_average']}"
    )

    root = bench_data(args.data, progress=not args.json)
    dataset = ModestDataset(root, "all", size)
    native = dataset.load(0)["bg"].shape[-1] if size is None else size
    report["settings"] = {
        "data": str(root),
        "samples_in_data": len(dataset),
        "image_size": size or native,
        "workers": workers,
        "batch_size": batch,
        "loader_samples": loader_samples,
        "step_batch_size": step_batch,
        "e2e_batch_size": e2e_batch,
        "e2e_samples": e2e_samples,
        "compile": args.compile,
    }
    log(f"  data: {root} ({len(dataset):,} samples at {size or native} px); {workers} loader workers, batch {batch}")

    # ---- loader
    train_set = dataset.subset("train", augment=True)
    loaders: dict = {}
    configs = [
        ("ours threads, cpu mode", "threads", "cpu", "cpu"),
        ("ours processes, cpu mode", "processes", "cpu", "cpu"),
    ]
    if cuda:
        configs += [
            ("ours threads, gpu mode, cpu decode", "threads", "gpu", "cpu"),
            ("ours threads, gpu mode, gpu decode", "threads", "gpu", "device"),
            ("ours processes, gpu mode, cpu decode", "processes", "gpu", "cpu"),
        ]
    for name, kind, mode, decode in configs:
        _try(
            loaders,
            name,
            lambda: measure_loader(
                make_loader(
                    train_set,
                    batch_size=batch,
                    shuffle=True,
                    num_workers=workers,
                    device=device,
                    loader=kind,
                    data_mode=mode,
                    decode=decode,
                ),
                loader_samples,
                device,
            ),
            name,
        )
    default = make_loader(train_set, batch_size=batch, shuffle=True, num_workers=workers, device=device)
    default_name = (
        f"ours {type(default.loader).__name__.replace('ThreadLoader', 'threads').replace('DataLoader', 'processes')}, "
        f"{default.data_mode} mode"
        + (f", {'gpu' if default.decode_on_device else 'cpu'} decode" if default.data_mode == "gpu" else "")
    )
    del default
    rng = np.random.default_rng(0)
    n_seed = min(len(dataset), max(loader_samples, e2e_samples) + 4 * batch)
    rows = np.sort(rng.choice(len(dataset), n_seed, replace=False))
    extracted: dict = {}

    def seed_loader() -> dict:
        folder = Path("data") / "bench-extracted" / hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
        extracted["root"], extracted["files"] = extract_for_baseline(dataset, rows, folder)
        seed = DataLoader(
            SeedStyleDataset(extracted["root"], extracted["files"], size),
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            pin_memory=cuda,
        )
        return measure_loader(seed, loader_samples, torch.device("cpu"))

    _try(loaders, "seed-style (PIL + per-image albumentations, DataLoader)", seed_loader, "seed")
    report["loader"] = loaders
    report["default_loader"] = default_name
    seed_rate = loaders["seed-style (PIL + per-image albumentations, DataLoader)"].get("samples_per_s")
    log("")
    log(
        f"loader only, augmentation on, {workers} workers, batch {batch}, {loader_samples} samples (samples/s, x seed-style)"
    )
    for name, r in loaders.items():
        mark = "  <- default" if name == default_name else ""
        if "error" in r:
            log(f"  {name:<44} n/a ({r['error']})")
        else:
            speedup = f"{r['samples_per_s'] / seed_rate:6.1f}x" if seed_rate else "     -"
            log(f"  {name:<44} {r['samples_per_s']:>9.1f} {speedup}   first batch {r['first_batch_s']:.1f} s{mark}")
    if seed_rate and "samples_per_s" in loaders.get(default_name, {}):
        report["loader_speedup_vs_seed"] = round(loaders[default_name]["samples_per_s"] / seed_rate, 1)

    def stages() -> dict:
        seed_set = SeedStyleDataset(extracted["root"], extracted["files"], size) if "root" in extracted else None
        return measure_cpu_stages(train_set, min(loader_samples, 256), batch, seed_set)

    _try(report, "cpu_stages", stages, "cpu_stages")
    c = report["cpu_stages"]
    if "error" not in c:
        parts = " | ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in c["ms_per_sample"].items())
        log(
            f"  CPU work per sample, one thread (ms): {parts} | total {c['total_ms']:.2f}"
            + (f"; seed-style {c['seed_style_ms']:.2f}" if "seed_style_ms" in c else "")
        )
        log(
            f"  -> at most {c['ceiling_samples_per_s']:,.0f} samples/s on {c['cores']} cores if the threads scaled perfectly"
            + (f" ({c['ceiling_vs_seed']}x the seed-style work per sample)" if "ceiling_vs_seed" in c else "")
        )

    # ---- model step
    steps: list = []
    precisions = [False, True] if cuda else [False]
    compiles = [False, True] if args.compile else [False]
    for model_name in args.models:
        for amp in precisions:
            for compile_model in compiles:
                label = f"{model_name} {'amp' if amp else 'fp32'} {'compiled' if compile_model else 'eager'}"
                with cuda_flags(True):
                    _try(
                        steps,
                        None,
                        lambda: measure_step(
                            model_name,
                            size or native,
                            step_batch,
                            device,
                            amp=amp,
                            compile_model=compile_model,
                            channels_last=cuda,
                            warmup=warmup,
                            iters=iters,
                        ),
                        label,
                    )
    report["model_step"] = steps
    log("")
    log(
        f"model step (forward + backward + SGD) on {device}, batch {step_batch}, {size or native} px"
        + ("" if cuda else "; AMP n/a on CPU")
    )
    for r in steps:
        if "error" in r:
            log(f"  {r['name']:<34} n/a ({r['error']})")
        else:
            mem = f"   peak GPU {r['peak_gpu_mb']} MB" if "peak_gpu_mb" in r else ""
            log(
                f"  {r['name']:<34} {r['samples_per_s']:>9.1f} samples/s  ({r['precision']}, warm-up {r['warmup_s']} s){mem}"
            )

    # ---- end to end
    e2e: dict = {}
    with cuda_flags(True):
        _try(
            e2e,
            "ours",
            lambda: measure_ours_end_to_end(
                dataset, args.models[0], e2e_samples, e2e_batch, workers, device, args.compile
            ),
            "ours",
        )
        if cuda:  # the same with each batch prepared in the training thread, between steps
            _try(
                e2e,
                "ours, batches prepared inline",
                lambda: measure_ours_end_to_end(
                    dataset, args.models[0], e2e_samples, e2e_batch, workers, device, args.compile, ahead=0
                ),
                "inline",
            )
            # and with worker processes decoding on the CPU (the fastest loader alone on the H200; the training
            # thread then shares Python's lock with the preparing thread only)
            _try(
                e2e,
                "ours, worker processes, CPU decode",
                lambda: measure_ours_end_to_end(
                    dataset,
                    args.models[0],
                    e2e_samples,
                    e2e_batch,
                    workers,
                    device,
                    args.compile,
                    loader="processes",
                    decode="cpu",
                ),
                "processes",
            )
    if cuda or args.seed_end_to_end:

        def seed_e2e() -> dict:
            if "root" not in extracted:
                raise UserError("the seed-style loader did not run")
            return measure_seed_end_to_end(
                extracted["root"], extracted["files"], size, args.models[0], e2e_samples, e2e_batch, workers, device
            )

        with cuda_flags(False):
            _try(e2e, "seed", seed_e2e, "seed")
    report["end_to_end"] = e2e
    log("")
    log(f"end to end ({args.models[0]}, train_one_epoch, batch {e2e_batch}, {e2e_samples} samples)")
    width = max((len(name) for name in e2e), default=0)
    for name, r in e2e.items():
        if "error" in r:
            log(f"  {name:<{width}} n/a ({r['error']})")
        else:
            how = f"{r['precision']}, {r['loader']}" + (f", {r['data_mode']} mode" if "data_mode" in r else "")
            how += f", {'gpu' if r['decode_on_device'] else 'cpu'} decode" if r.get("data_mode") == "gpu" else ""
            how += f", {r['ahead']} batches prepared ahead" if r.get("ahead") else ""
            log(
                f"  {name:<{width}} {r['samples_per_s']:>9.1f} samples/s -> one epoch of {EPOCH_SAMPLES:,} samples: "
                f"{r['epoch_280k_min']:.1f} min  ({how})"
            )
    if "samples_per_s" in e2e.get("seed", {}) and "samples_per_s" in e2e.get("ours", {}):
        report["end_to_end_speedup_vs_seed"] = round(e2e["ours"]["samples_per_s"] / e2e["seed"]["samples_per_s"], 1)
        log(f"  ours / seed: {report['end_to_end_speedup_vs_seed']}x")
    ours = e2e.get("ours", {})
    step = next(
        (
            r
            for r in steps
            if "samples_per_s" in r
            and "samples_per_s" in ours
            and r["model"] == ours["model"]
            and r["precision"] == ours["precision"]
            and r["compiled"] == ours["compiled"]
            and r["batch_size"] == ours["batch_size"]
        ),
        None,
    )
    if step is not None:  # the share of the bare step's speed that training with real data keeps
        report["end_to_end_vs_step"] = round(ours["samples_per_s"] / step["samples_per_s"], 3)
        log(f"  ours / model step alone ({step['name']}): {100 * report['end_to_end_vs_step']:.0f}%")

    # ---- memory
    memory = {"peak_rss": peak_rss_mb()}
    if cuda:
        memory["peak_gpu_mb"] = round(
            max([r.get("peak_gpu_mb", 0) for r in steps] + [torch.cuda.max_memory_allocated(device) / 2**20])
        )
    report["memory"] = memory
    log("")
    log(
        f"memory: peak RSS {memory['peak_rss']['self_mb']} MB (this process), {memory['peak_rss']['largest_child_mb']} MB "
        f"(largest child)" + (f"; peak GPU {memory['peak_gpu_mb']} MB" if cuda else "")
    )

    folder = Path(tempfile.gettempdir())
    z = (
        _optional_section(report, "zip_index", "zip index", lambda: zip_index_test(folder), log)
        if args.zip_index_test
        else None
    )
    if z is not None:
        log(
            f"zip index of {z['members']:,} members ({z['zip_mb']} MB zip"
            + (f", written in {z['built_s']} s" if z["built_s"] else "")
            + ")"
        )
        for key in ("cold_no_cache", "first_open_writes_cache", "cached"):
            r = z[key]
            log(f"  {key:<24} {r['seconds']:>6.2f} s   +{r['index_rss_mb']} MB RSS (process {r['rss_mb']} MB)")
    e = (
        _optional_section(
            report,
            "epoch_memory",
            "epoch memory",
            lambda: epoch_memory_test(folder, workers, progress=not args.json),
            log,
        )
        if args.epoch_memory_test
        else None
    )
    if e is not None:
        kinds = [k for k in ("threads", "processes") if k in e]
        log(
            f"host memory over one epoch: {e['train_samples']:,} training samples of {e['data']} "
            f"({e['samples_in_data']:,} samples, {e['zip_mb']} MB), CPU device, batch {e[kinds[0]]['batch_size']}, "
            f"{workers} workers"
        )
        for kind in kinds:
            m = e[kind]
            log(
                f"  {kind:<10} first {m['first_mb']} MB, peak {m['peak_mb']} MB, last {m['last_mb']} MB "
                f"(growth {m['growth_mb']:+d} MB; largest worker {m['largest_child_mb']} MB; {m['seconds']} s)"
            )
    return report


def _optional_section(
    report: dict, key: str, title: str, fn: Callable[[], dict], log: Callable[[str], None]
) -> dict | None:
    """Run an optional section into report[key] after a blank line; its result, or None after logging why it failed."""
    _try(report, key, fn, key)
    log("")
    if "error" in report[key]:
        log(f"{title}: n/a ({report[key]['error']})")
        return None
    return report[key]


def build_parser() -> argparse.ArgumentParser:
    """The bench's arguments."""
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument(
        "--size", type=int, default=224, help="image side, a multiple of 32 (default 224; 0: the data's own size)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples per loader and end-to-end measurement (default 768 loader / 32 end to end on CPU, 4096 on CUDA)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: CUDA if present")
    p.add_argument("--data", default=None, help="a MODEST folder or zip (default: the synthetic bench set under data/)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: one per core, at most 8)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CUDA, 32 on CPU")
    p.add_argument("--models", default="depthnet,masknet", help="comma-separated; the first one runs end to end")
    p.add_argument("--compile", action="store_true", help="also torch.compile (minutes on CPU)")
    p.add_argument("--seed-end-to-end", action="store_true", help="also the seed recipe end to end on CPU")
    p.add_argument("--zip-index-test", action="store_true", help="also open the index of a 1.2M-member zip in /tmp")
    p.add_argument(
        "--epoch-memory-test",
        action="store_true",
        help="also host memory over one epoch of a 400,000-sample zip in /tmp (Linux; minutes)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m tools.bench`."""
    args = build_parser().parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models or any(m not in ("depthnet", "masknet") for m in args.models):
        raise UserError(f"--models must list depthnet and/or masknet, not {','.join(args.models)!r}")
    if args.size == 0:
        args.size = None
    elif args.size < 32 or args.size % 32:
        raise UserError(f"--size must be a multiple of 32 (DepthNet's inputs), not {args.size}")
    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples must be at least 1, not {args.samples}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 or more, not {args.workers}")
    report = run_bench(args, log=lambda line: print(line, flush=True))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
