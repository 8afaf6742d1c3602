"""Train MaskNet or DepthNet on MODEST-format data; safe across interruptions.

    python -m lib.train                       # the demo: synthetic data, DepthNet, CPU-friendly, runs/demo
    python -m lib.train --model depthnet --data modest --image-size 224 --epochs 12 --out /content/drive/MyDrive/run
    python -m lib.train --out runs/x --resume # continue runs/x/last.pt as if never interrupted
    torchrun --nproc_per_node=2 -m lib.train ...   # DistributedDataParallel, ranks from torchrun's variables

Under torchrun, --batch-size is per process (global batch = batch_size x processes; --lr is not scaled) and
each epoch's shuffled train split is dealt out across the ranks; the train loss is averaged over every rank's
samples, and validation is sharded without padding and reduced, giving the numbers one process evaluating the
saved checkpoint gets. Rank 0 alone writes files and prints. --sync-bn (SyncBatchNorm) needs CUDA.

Every epoch writes RUN/last.pt (and RUN/best.pt when validation loss improves) atomically, plus
history.json, curves.png and predictions.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from .data import ModestDataset, default_device, make_loader
from .errors import UserError, run_cli
from .losses import DEFAULT_LOSS, make_loss, valid_losses
from .metrics import Metrics
from .models import MODEL_SIZE_MULTIPLE, MODELS, as_outputs, count_parameters, make_model, unwrap_model

CHECKPOINT_FORMAT = "bgfg-mask-depth/1"
DEMO_DATA = dict(size=64, backgrounds=100, foregrounds=12, placements=1, seed=0)  # 2,400 samples, 100 rooms


@dataclasses.dataclass
class Config:
    """Everything a run needs; saved into every checkpoint (defaults: the original recipe)."""

    model: str = "depthnet"
    data: str = "synthetic"
    epochs: int = 12
    batch_size: int = 32
    image_size: int | None = 224
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-8
    optimizer: str = "sgd"  # sgd | adamw
    scheduler: str = "none"  # none | onecycle | cosine
    loss: str | None = None  # None: DEFAULT_LOSS[model]
    workers: int | None = None
    split_by: str = "sample"
    val_fraction: float = 0.3
    seed: int = 1
    augment: bool = True
    amp: bool = True  # bf16 where supported, else fp16 + GradScaler; CUDA only
    channels_last: bool = True  # CUDA and CPU (measured faster on both); not MPS
    compile: bool = False
    sync_bn: bool = False
    skip_bad_samples: bool = False
    loader: str = "auto"  # threads (default) | processes: who fills batches
    data_mode: str = "auto"  # cpu | gpu (auto: gpu on CUDA): where decoding and augmentation run
    ahead: int | None = None  # batches prepared on the device by a background thread (None: 2 on CUDA, else 0)
    max_train_samples: int | None = None  # per epoch; None = the whole train split
    log_every: int = 20
    out: str = "runs/demo"


# ---------------------------------------------------------------------------------------------- interruption


class _Signals:
    """SIGTERM behaves like Ctrl-C; both wait while a checkpoint is being written."""

    def __init__(self) -> None:
        self.saving = False
        self.pending: int | None = None

    def install(self) -> None:
        """Route SIGTERM and SIGINT here (main thread only); `restore` puts the previous handlers back."""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.saving:
            self.pending = signum
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def protect(self):
        """Hold signals off while the block runs; act on them afterwards."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
            if self.pending is not None:
                self.pending = None
                raise KeyboardInterrupt


SIGNALS = _Signals()


# ---------------------------------------------------------------------------------------------- distributed


@dataclasses.dataclass
class Dist:
    """Where this process stands in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when torchrun's variables are set (nccl on CUDA, gloo otherwise)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    info = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


class ShardSampler(Sampler):
    """Every `world_size`-th index from `rank`, in order, no padding: sharded evaluation counts each sample once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(Sampler):
    """A fresh permutation each epoch from (seed, epoch), optionally capped: resumable.

    Under torchrun every rank draws the same permutation, cuts it to a multiple of `world_size` and takes
    every `world_size`-th index from `rank`: the ranks together see what one process would (less < world_size).
    """

    def __init__(self, length: int, seed: int, limit: int | None = None, rank: int = 0, world_size: int = 1):
        self.length, self.seed, self.limit, self.epoch = length, seed, limit, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.length, generator=g)
        total = len(self) * self.world_size
        return iter(perm[:total][self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        capped = self.length if self.limit is None else min(self.limit, self.length)
        return capped // self.world_size


# ---------------------------------------------------------------------------------------------- steps


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 on CUDA cards that support it, fp16 on older ones, None (fp32) elsewhere or when amp is off."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _inputs(batch: dict, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return batch["bg"].contiguous(memory_format=fmt), batch["bg_fg"].contiguous(memory_format=fmt)


def train_step(
    model: nn.Module,
    batch: dict,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, dict]:
    """One optimisation step on a device batch; returns (loss, outputs) without reading them on the host."""
    bg, bg_fg = _inputs(batch, channels_last)
    with _autocast(device, amp_dtype):
        outputs = as_outputs(model(bg, bg_fg))
    loss, _ = loss_fn(outputs, batch)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, outputs


def train_one_epoch(
    model: nn.Module,
    loader,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    scheduler=None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    log_every: int = 20,
    progress=None,
) -> dict[str, float]:
    """One pass over `loader`; returns {'train_loss', 'samples', 'seconds'}. Reads the device only every `log_every` steps."""
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    iou_metrics = Metrics(device, with_depth=False)
    samples, start = 0, time.perf_counter()
    for step, batch in enumerate(loader, 1):
        loss, outputs = train_step(
            model, batch, loss_fn, optimizer, device, scaler=scaler, amp_dtype=amp_dtype, channels_last=channels_last
        )
        if scheduler is not None and getattr(scheduler, "per_step", False):
            scheduler.step()
        n = batch["bg"].shape[0]
        samples += n
        loss_sum += loss.detach().double() * n
        if step % log_every == 0 or step == len(loader):
            running = loss_sum.item() / samples  # the one host sync per log interval
            if not math.isfinite(running) and not dist.is_initialized():  # under DDP all ranks stop together, below
                raise NonFiniteLoss(running)
            if progress is not None:
                iou_metrics.update(outputs, batch)  # no_grad inside; reads only outputs["mask"]
                progress.set_postfix(
                    loss=f"{running:.4f}", iou=f"{iou_metrics.compute()['mask_iou']:.3f}", refresh=False
                )
        if progress is not None:
            progress.update(1)
    totals = torch.stack([loss_sum, torch.tensor(float(samples), device=device, dtype=torch.float64)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_total, count = totals.tolist()
    if not math.isfinite(loss_total):
        raise NonFiniteLoss(loss_total)
    return {"train_loss": loss_total / max(count, 1), "samples": int(count), "seconds": time.perf_counter() - start}


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    loss_fn: Callable | None,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    with_depth: bool | None = None,
    progress=None,
) -> dict[str, float]:
    """Loss and every metric over `loader`, accumulated on the device and reduced once (across ranks too)."""
    model.eval()
    metrics: Metrics | None = None
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for batch in loader:
        bg, bg_fg = _inputs(batch, channels_last)
        with _autocast(device, amp_dtype):
            outputs = as_outputs(model(bg, bg_fg))
        outputs = {k: v.float() for k, v in outputs.items()}
        if metrics is None:
            metrics = Metrics(device, with_depth="depth" in outputs if with_depth is None else with_depth)
        metrics.update(outputs, batch)
        if loss_fn is not None:
            loss_sum += loss_fn(outputs, batch)[0].double() * batch["bg"].shape[0]
        if progress is not None:
            progress.update(1)
    if metrics is None:  # an empty shard: contribute zeros with the right layout
        metrics = Metrics(device, with_depth=(with_depth if with_depth is not None else _has_depth(model)))
    if dist.is_initialized():
        dist.all_reduce(metrics.totals)
        dist.all_reduce(loss_sum)
    result = metrics.compute()
    if loss_fn is not None:
        result = {"val_loss": loss_sum.item() / max(result["samples"], 1), **result}
    return result


def _has_depth(model: nn.Module) -> bool:
    return isinstance(unwrap_model(model), MODELS["depthnet"])


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` atomically: temp file in the same folder, fsync, rename (never a torn file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with SIGNALS.protect():
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def remove_stale_temp_files(out: Path) -> None:
    """Delete temp files that a killed writer left in a run folder (a SIGKILL skips `save_checkpoint`'s cleanup)."""
    for tmp in out.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and _process_alive(int(pid)) and int(pid) != os.getpid():
            continue  # another live process is writing it
        tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def load_checkpoint(path: str | os.PathLike, map_location="cpu", expect_model: str | None = None) -> dict:
    """Read one of our checkpoints; UserError naming the file if it is not one (or is for the other model)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise UserError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint written by lib.train")
    model_name = state["config"]["model"]
    if expect_model is not None and model_name != expect_model:
        raise UserError(f"{path}: holds a {model_name} checkpoint, but --model is {expect_model}")
    return state


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint holds, weights loaded, in eval mode; also return the checkpoint."""
    state = load_checkpoint(path)
    model = make_model(state["config"]["model"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- fit


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (the original recipe) or AdamW."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"unknown optimizer {cfg.optimizer!r} (choose sgd or adamw)")


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """None, OneCycle (stepped per batch) or cosine (per epoch)."""
    if cfg.scheduler == "none":
        return None
    if cfg.scheduler == "onecycle":
        total = cfg.epochs * max(1, steps_per_epoch)
        warm = 0.2 if 0.2 * total != 1 else 0.3  # OneCycleLR divides by zero when its warm-up ends at step 0 (5 steps)
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total, pct_start=warm)
        sched.per_step = True
        return sched
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    raise UserError(f"unknown scheduler {cfg.scheduler!r} (choose none, onecycle or cosine)")


def validate_config(cfg: Config) -> None:
    """UserError for arguments that cannot work, naming the argument."""
    if cfg.model not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}, not {cfg.model!r}")
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be at least 1, not {cfg.epochs}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {cfg.batch_size}")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise UserError(f"--lr must be a positive number, not {cfg.lr}")
    multiple = MODEL_SIZE_MULTIPLE[cfg.model]
    if cfg.image_size is not None and (cfg.image_size < 32 or cfg.image_size % multiple):
        raise UserError(
            f"--image-size {cfg.image_size} does not work for {cfg.model}: use a multiple of {max(multiple, 1)} of at least 32"
        )
    if cfg.workers is not None and cfg.workers < 0:
        raise UserError(f"--workers must be 0 or more, not {cfg.workers}")
    if cfg.ahead is not None and cfg.ahead < 0:
        raise UserError(f"--ahead must be 0 or more, not {cfg.ahead}")
    if cfg.split_by not in ("sample", "background"):
        raise UserError(f"--split-by must be sample or background, not {cfg.split_by!r}")
    if cfg.max_train_samples is not None and cfg.max_train_samples < 1:
        raise UserError(f"--max-train-samples must be at least 1, not {cfg.max_train_samples}")
    name = cfg.loss or DEFAULT_LOSS[cfg.model]
    if name not in valid_losses(cfg.model):
        raise UserError(f"--loss {name!r} does not fit {cfg.model}: choose one of {', '.join(valid_losses(cfg.model))}")


def fit(
    cfg: Config, data_root: str | os.PathLike | None = None, resume: bool = False, progress: bool = True
) -> list[dict]:
    """Train per `cfg` and return the history (one dict per epoch). Data from `data_root`, else from cfg.data through
    `resolve_data` (the synthetic set rendered at cfg.image_size, MODEST downloaded, or a path)."""
    from tqdm.auto import tqdm

    validate_config(cfg)
    device = torch.device(os.environ.get("LIB_DEVICE") or default_device())
    if cfg.sync_bn and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type != "cuda":
        raise UserError(f"--sync-bn needs CUDA GPUs (SyncBatchNorm has no {device.type} implementation); leave it out")
    ddp = init_distributed(device)
    if ddp.enabled and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    state = None
    if resume:
        state = load_checkpoint(out / "last.pt", expect_model=cfg.model)
        saved = Config(**state["config"])
        cfg = dataclasses.replace(
            saved,
            epochs=cfg.epochs,
            out=cfg.out,
            workers=cfg.workers,
            ahead=cfg.ahead,
            skip_bad_samples=cfg.skip_bad_samples,
            log_every=cfg.log_every,
        )
        if saved.scheduler == "onecycle" and cfg.epochs != saved.epochs:
            raise UserError(
                f"{out / 'last.pt'}: its onecycle schedule was planned for {saved.epochs} epochs; "
                f"resume with --epochs {saved.epochs}"
            )
        if state["epoch"] >= cfg.epochs:
            raise UserError(
                f"{out / 'last.pt'}: already trained {state['epoch']} of {cfg.epochs} epochs; raise --epochs to go on"
            )
        if ddp.rank == 0:
            remove_stale_temp_files(out)
    root = data_root if data_root is not None else resolve_data(cfg.data, progress and ddp.is_main, cfg.image_size)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    dataset = ModestDataset(root, "all", cfg.image_size, False, cfg.val_fraction, cfg.split_by, cfg.seed)
    train_set, val_set = dataset.subset("train", cfg.augment), dataset.subset("val")
    if len(train_set) == 0 or len(val_set) == 0:
        raise UserError(f"{root}: too few samples to split into train and val ({len(dataset)})")
    train_sampler = EpochSampler(len(train_set), cfg.seed, cfg.max_train_samples, ddp.rank, ddp.world_size)
    val_sampler = ShardSampler(len(val_set), ddp.rank, ddp.world_size) if ddp.enabled else None
    common = dict(
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        device=device,
        skip_bad_samples=cfg.skip_bad_samples,
        loader=cfg.loader,
        data_mode=cfg.data_mode,
        ahead=cfg.ahead,
    )
    train_loader = make_loader(
        train_set, shuffle=False, sampler=train_sampler, drop_last=len(train_sampler) > cfg.batch_size, **common
    )
    val_loader = make_loader(val_set, shuffle=False, sampler=val_sampler, **common)

    model = make_model(cfg.model)
    if cfg.sync_bn and ddp.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = cfg.channels_last and device.type in ("cuda", "cpu")
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, len(train_loader))
    amp_dtype = autocast_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    loss_fn = make_loss(cfg.loss or DEFAULT_LOSS[cfg.model], cfg.model)
    history: list[dict] = []
    best = math.inf
    start_epoch = 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, best, start_epoch = state["history"], state["best_val_loss"], state["epoch"] + 1
        _set_rng_state(state["rng"])
    train_model = model
    if ddp.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    log = print if ddp.is_main else (lambda *a, **k: None)
    if ddp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log(
            f"{cfg.model}: {count_parameters(model):,} parameters | {len(train_set):,} train / {len(val_set):,} val samples "
            f"at {cfg.image_size or 'native'} px | device {device}{' x' + str(ddp.world_size) if ddp.enabled else ''}"
            f"{' ' + str(amp_dtype).replace('torch.', '') if amp_dtype else ''} | {out}",
            flush=True,
        )
    SIGNALS.install()
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            train_sampler.set_epoch(epoch)
            if (
                train_set.augment is not None
            ):  # in-process loading; worker processes and the thread loader reseed from the torch RNG
                train_set.augment.set_random_seed(cfg.seed * 100_003 + epoch + 7919 * ddp.rank)
            bar = tqdm(
                total=len(train_loader) + len(val_loader),
                desc=f"epoch {epoch}/{cfg.epochs}",
                leave=False,
                disable=not (progress and ddp.is_main),
                dynamic_ncols=True,
            )
            lr = optimizer.param_groups[0]["lr"]
            train = train_one_epoch(
                train_model,
                train_loader,
                loss_fn,
                optimizer,
                device,
                scheduler=scheduler,
                scaler=scaler,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
                log_every=cfg.log_every,
                progress=bar,
            )
            if scheduler is not None and not getattr(scheduler, "per_step", False):
                scheduler.step()
            if ddp.enabled:  # each rank's BatchNorm statistics are its own: evaluate rank 0's, the ones saved
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)
            val = evaluate(
                model, val_loader, loss_fn, device, amp_dtype=amp_dtype, channels_last=channels_last, progress=bar
            )
            bar.close()
            skipped = train_loader.skipped + val_loader.skipped
            if ddp.enabled:  # every rank's skipped samples, listed by rank 0
                gathered: list = [None] * ddp.world_size
                dist.all_gather_object(gathered, skipped)
                skipped = [item for part in gathered for item in part]
            record = {
                "epoch": epoch,
                "train_loss": train["train_loss"],
                "val_loss": val.pop("val_loss"),
                "lr": lr,
                "seconds": round(train["seconds"], 2),
                "samples_per_s": round(train["samples"] / train["seconds"], 1),
                **val,
            }
            if skipped:
                record["skipped"] = [name for name, _ in skipped]
            history.append(record)
            improved = record["val_loss"] < best
            best = min(best, record["val_loss"])
            if ddp.is_main:
                ckpt = {
                    "format": CHECKPOINT_FORMAT,
                    "config": dataclasses.asdict(cfg),
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "history": history,
                    "best_val_loss": best,
                    "rng": _rng_state(),
                }
                save_checkpoint(out / "last.pt", ckpt)
                if improved:
                    save_checkpoint(out / "best.pt", ckpt)
                write_history(out / "history.json", history)
                log(_summary(record, improved), flush=True)
                if skipped:
                    log(
                        f"  skipped {len(skipped)} bad sample(s) this epoch: " + "; ".join(m for _, m in skipped[:5]),
                        flush=True,
                    )
        if ddp.is_main:
            write_figures(out, history, model, val_set, device, channels_last)
    except NonFiniteLoss as exc:
        raise UserError(
            f"the training loss became {exc.args[0]} in epoch {epoch}; try a lower --lr (now {cfg.lr}). "
            f"{out / 'last.pt'} keeps the last good epoch"
        ) from None
    except KeyboardInterrupt:
        if ddp.is_main:
            done = history[-1]["epoch"] if history else 0
            print(
                f"\ninterrupted in epoch {epoch}; {out / 'last.pt'} holds epoch {done}. "
                f"Resume with: python -m lib.train --out {out} --resume",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        SIGNALS.restore()
        if ddp.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return history


def write_history(path: Path, history: list[dict]) -> None:
    """history.json, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(history, indent=1) + "\n")
    os.replace(tmp, path)


def _summary(record: dict, improved: bool) -> str:
    parts = [
        f"epoch {record['epoch']:>3}",
        f"train {record['train_loss']:.4f}",
        f"val {record['val_loss']:.4f}",
        f"IoU {record['mask_iou']:.4f}",
    ]
    if "depth_rmse" in record:
        parts += [f"RMSE {record['depth_rmse']:.4f}", f"d1 {record['depth_delta1']:.3f}"]
    parts += [f"{record['samples_per_s']:.0f} samples/s", f"{record['seconds']:.0f}s"]
    return " | ".join(parts) + (" *best" if improved else "")


def write_figures(
    out: Path, history: list[dict], model: nn.Module, val_set: ModestDataset, device, channels_last: bool
) -> None:
    """curves.png and predictions.png for a run folder."""
    import matplotlib.pyplot as plt

    from .plots import plot_curves, plot_predictions, predict_samples

    fig = plot_curves(history)
    fig.savefig(out / "curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    samples = [val_set[i] for i in range(min(6, len(val_set)))]
    fig = plot_predictions(*predict_samples(model, samples, device))
    fig.savefig(out / "predictions.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- command line


def resolve_data(data: str, progress: bool = True, size: int | None = None) -> Path:
    """'synthetic' (generated once under data/), 'modest' (downloaded once under data/) or a path.

    The synthetic set is rendered at `size` px (the run's image size; default DEMO_DATA's), so a larger run
    learns from sharper scenes instead of enlarged 64 px ones.
    """
    if data == "synthetic":
        from .synthetic import make_synthetic_dataset

        d = dict(DEMO_DATA, size=size or DEMO_DATA["size"])
        folder = (
            Path("data")
            / f"synthetic-{d['size']}px-{d['backgrounds']}x{d['foregrounds']}x{2 * d['placements']}-seed{d['seed']}"
        )
        with _one_at_a_time(Path("data")):
            return make_synthetic_dataset(folder, progress=progress, **d)
    if data == "modest":
        from .download import download_modest

        with _one_at_a_time(Path("data")):
            return download_modest("data", progress=progress).path
    return Path(data)


@contextlib.contextmanager
def _one_at_a_time(folder: Path):
    """Under torchrun, one process at a time makes or downloads the data; the others then find it done."""
    try:
        import fcntl
    except ImportError:  # Windows: no torchrun multi-process data race to guard
        yield
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_parser() -> argparse.ArgumentParser:
    """The train command's arguments (defaults: the CPU demo on synthetic data)."""
    p = argparse.ArgumentParser(
        prog="python -m lib.train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", default=None, help="masknet or depthnet (default depthnet; on --resume, the checkpoint's)"
    )
    p.add_argument("--data", default="synthetic", help="synthetic, modest, or a MODEST folder/zip")
    p.add_argument("--epochs", type=int, default=None, help="default 12; 5 for the synthetic demo")
    p.add_argument("--batch-size", type=int, default=None, help="default 32; 8 for the synthetic demo")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize to this side (the synthetic set is rendered at it); default 224, 64 for the demo",
    )
    p.add_argument("--lr", type=float, default=None, help="default 0.1 (SGD)")
    p.add_argument("--optimizer", default=None, help="sgd (the original recipe) or adamw")
    p.add_argument("--scheduler", default=None, help="none, onecycle or cosine")
    p.add_argument("--weight-decay", type=float, default=None, help="default 1e-8 (SGD); 1e-4 for the synthetic demo")
    p.add_argument(
        "--loss",
        default=None,
        help="default bce (masknet) / bce_rmse (depthnet); for the synthetic demo bce_lovasz / bce_lovasz_rmse",
    )
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: one per core, at most 8)")
    p.add_argument("--split-by", default="sample", help="sample (the original 70/30) or background (unseen rooms)")
    p.add_argument("--max-train-samples", type=int, default=None, help="cap the samples per epoch")
    p.add_argument("--out", default="runs/demo", help="run folder (on Colab: a Drive folder)")
    p.add_argument("--resume", action="store_true", help="continue OUT/last.pt")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-amp", action="store_true", help="fp32 even on CUDA")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    p.add_argument("--skip-bad-samples", action="store_true", help="leave out unreadable samples and list them")
    p.add_argument("--loader", default="auto", help="threads (the default) or processes")
    p.add_argument(
        "--data-mode", default="auto", help="cpu or gpu: where decoding and augmentation run (auto: gpu on CUDA)"
    )
    p.add_argument(
        "--ahead",
        type=int,
        default=None,
        help="batches a background thread prepares on the device during the step (default 2 on CUDA, 0 elsewhere; 0: between steps)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


DEMO = dict(epochs=5, batch_size=8, image_size=64, optimizer="adamw", lr=2e-3, scheduler="onecycle", weight_decay=1e-4)
DEMO_LOSS = {"depthnet": "bce_lovasz_rmse", "masknet": "bce_lovasz"}  # the Lovasz hinge lifts IoU within minutes


def config_from_args(args: argparse.Namespace) -> Config:
    """Config from parsed arguments; the synthetic demo gets its CPU-friendly recipe unless told otherwise."""
    model = args.model or "depthnet"
    base = dict(DEMO, loss=DEMO_LOSS.get(model)) if args.data == "synthetic" else {}
    given = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "scheduler": args.scheduler,
        "loss": args.loss,
    }
    base.update({k: v for k, v in given.items() if v is not None})
    if base.get("optimizer") == "sgd" and "weight_decay" in base and args.data == "synthetic":
        base["weight_decay"] = Config.weight_decay
    if args.weight_decay is not None:
        base["weight_decay"] = args.weight_decay
    return Config(
        model=model,
        data=args.data,
        workers=args.workers,
        split_by=args.split_by,
        seed=args.seed,
        amp=not args.no_amp,
        augment=not args.no_augment,
        compile=args.compile,
        sync_bn=args.sync_bn,
        skip_bad_samples=args.skip_bad_samples,
        loader=args.loader,
        data_mode=args.data_mode,
        ahead=args.ahead,
        max_train_samples=args.max_train_samples,
        out=args.out,
        **base,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m lib.train`."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    validate_config(cfg)
    if args.resume:
        saved = load_checkpoint(Path(cfg.out) / "last.pt", expect_model=args.model)["config"]
        cfg = dataclasses.replace(cfg, model=saved["model"], epochs=args.epochs or saved["epochs"])
    history = fit(
        cfg, resume=args.resume, progress=not args.quiet
    )  # fit resolves the data (the saved run's, on resume)
    if history and int(os.environ.get("RANK", "0")) == 0:
        best = min(history, key=lambda r: r["val_loss"])
        print(
            f"done: best epoch {best['epoch']} (val loss {best['val_loss']:.4f}, IoU {best['mask_iou']:.4f}"
            + (f", RMSE {best['depth_rmse']:.4f}" if "depth_rmse" in best else "")
            + f") -> {cfg.out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # run_cli also turns Ctrl-C into exit code 130


# ---------------------------------------------------------------------------------------------- notebook API (stub for merge)
# Minimal versions of the names the notebooks call; the integrator keeps the training helper's versions.

RECIPES = {
    "original": dict(data="modest"),  # the 2020 recipe: Config's defaults on MODEST
    "demo": dict(DEMO, data="synthetic"),  # the five-minute CPU demo, as `python -m lib.train` runs it
}


def make_config(recipe: str = "demo", **overrides) -> Config:
    """The Config of a named recipe ('original' or 'demo'), with `overrides` (Config fields) applied."""
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r} (choose {' or '.join(RECIPES)})")
    base = dict(RECIPES[recipe])
    if recipe == "demo":
        base["loss"] = DEMO_LOSS[overrides.get("model", Config.model)]
    return Config(**{**base, **overrides})


def resume_run(out, model, optimizer, scheduler=None, scaler=None) -> tuple[list[dict], float, int]:
    """Load OUT/last.pt into the given objects; return (history, best_val_loss, start_epoch)."""
    state = load_checkpoint(Path(out) / "last.pt")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["history"], state["best_val_loss"], state["epoch"] + 1


def save_epoch(out, cfg, epoch, model, optimizer, scheduler, scaler, history, best_val_loss, improved) -> None:
    """Checkpoint one finished epoch: best.pt first (when improved), then last.pt, then history.json."""
    out = Path(out)
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(cfg),
        "epoch": epoch,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": history,
        "best_val_loss": best_val_loss,
        "rng": _rng_state(),
    }
    if improved:
        save_checkpoint(out / "best.pt", state)
    save_checkpoint(out / "last.pt", state)
    write_history(out / "history.json", history)


def make_epoch_record(epoch: int, train: dict, val: dict, lr: float) -> dict:
    """One history entry from `train_one_epoch`'s and `evaluate`'s results."""
    val = dict(val)
    return {
        "epoch": epoch,
        "train_loss": train["train_loss"],
        "val_loss": val.pop("val_loss"),
        "lr": lr,
        "seconds": round(train["seconds"], 2),
        "samples_per_s": round(train["samples"] / max(train["seconds"], 1e-9), 1),
        **val,
    }


def format_epoch(record: dict, improved: bool) -> str:
    """The one line printed per epoch."""
    return _summary(record, improved)
