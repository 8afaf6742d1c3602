"""Train MaskNet or DepthNet on MODEST-format data; safe across interruptions.

    python -m lib.train                       # recipe demo: synthetic data, DepthNet, CPU-friendly, runs/demo
    python -m lib.train --recipe original --out /content/drive/MyDrive/run   # the 2020 recipe on MODEST, 224 px
    python -m lib.train --out runs/x --resume # continue runs/x/last.pt with its own settings, as if never interrupted
    torchrun --nproc_per_node=2 -m lib.train ...   # DistributedDataParallel, ranks from torchrun's variables

The recipes (RECIPES below: `original`, `demo`) hold the settings; flags change one of them. Without --recipe,
synthetic data (the default) gets `demo`, and `--data modest` or a path gets `original`.

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

from .data import LOADERS, ModestDataset, default_device, make_loader, make_loaders
from .errors import UserError, run_cli
from .losses import DEFAULT_LOSS, make_loss, valid_losses
from .metrics import Metrics
from .models import MODEL_SIZE_MULTIPLE, MODELS, count_parameters, make_model, unwrap_model

CHECKPOINT_FORMAT = "bgfg-mask-depth/2"  # /2: the models see lib.models.Compare (Dec 2026)
DEMO_DATA = dict(size=64, backgrounds=100, foregrounds=12, placements=1, seed=0)  # 2,400 samples, 100 rooms


@dataclasses.dataclass
class Config:
    """Everything a run needs; saved into every checkpoint (defaults: the original recipe; see RECIPES)."""

    recipe: str = "custom"  # the RECIPES entry make_config started from ("custom": built by hand)
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
    reshoot: bool = False  # re-shoot bg in training (lib.augment's "train" level); the original recipe does not
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
    device: str = "auto"  # auto (LIB_DEVICE, else cuda, mps, cpu) | cpu | cuda | mps


# The named recipes, the one place their settings live. A dict value is per model (loss) or per optimizer
# (weight decay); make_config picks the entry for the run. Every other setting: Config's default.
RECIPES: dict[str, dict] = {
    "original": dict(  # the 2020 recipe: SGD on MODEST at 224 px
        data="modest",
        epochs=12,
        batch_size=32,
        image_size=224,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-8,
        scheduler="none",
        loss={"masknet": "bce", "depthnet": "bce_rmse"},
        reshoot=False,
    ),
    "demo": dict(  # five minutes on a laptop CPU: synthetic 64 px scenes, AdamW with a one-cycle schedule
        data="synthetic",
        epochs=5,
        batch_size=8,
        image_size=64,
        optimizer="adamw",
        lr=2e-3,
        weight_decay={"adamw": 1e-4, "sgd": 1e-8},  # AdamW's decay would be far too strong for SGD
        scheduler="onecycle",
        # Lovasz hinge: IoU within minutes; ssi (scale-and-shift invariant): the room's shape, not its size
        loss={"masknet": "bce_lovasz", "depthnet": "bce_lovasz_rmse_ssi"},
        reshoot=True,
    ),
}
# Settings that say how and where a run executes, not what it learns: a resumed run may change them.
RUN_SETTINGS = ("epochs", "out", "data", "workers", "ahead", "skip_bad_samples", "log_every", "loader", "data_mode")
RUN_SETTINGS += ("compile", "device")


def make_config(recipe: str = "demo", **overrides) -> Config:
    """The Config of a named recipe (see RECIPES), with `overrides` (Config field names) applied."""
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    fields = {f.name for f in dataclasses.fields(Config)} - {"recipe"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"make_config: no setting named {', '.join(unknown)} (Config has {', '.join(sorted(fields))})")
    settings = {**RECIPES[recipe], **overrides}
    model = settings.get("model", Config.model)
    optimizer = settings.get("optimizer", Config.optimizer)
    for key, value in settings.items():
        if isinstance(value, dict):
            settings[key] = value[model] if model in value else value.get(optimizer, getattr(Config, key))
    return Config(recipe=recipe, **settings)


def format_recipe(cfg: Config) -> str:
    """One line: the recipe's name, what was changed from it, and the settings that shape the run."""
    changed = ""
    if cfg.recipe in RECIPES:
        base = make_config(cfg.recipe, model=cfg.model)
        diff = [f"{f}={getattr(cfg, f)}" for f in RECIPES[cfg.recipe] if getattr(cfg, f) != getattr(base, f)]
        changed = f" (changed: {', '.join(diff)})" if diff else ""
    return (
        f"recipe {cfg.recipe}{changed}: {cfg.model} on {cfg.data} | {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"{cfg.image_size or 'native'} px | {cfg.optimizer} lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, "
        f"scheduler {cfg.scheduler} | loss {cfg.loss or DEFAULT_LOSS[cfg.model]} | reshoot {'on' if cfg.reshoot else 'off'}"
        f" | seed {cfg.seed}"
    )


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
        outputs = model(bg, bg_fg)
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
    """One pass over `loader`, then one step of a per-epoch `scheduler`; returns {'train_loss', 'samples', 'seconds',
    'lr'} (lr: at the first step). Reads the device only every `log_every` steps."""
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    _reseed_augment(loader)
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
    seconds = time.perf_counter() - start
    if scheduler is not None and not getattr(scheduler, "per_step", False):
        scheduler.step()
    return {"train_loss": loss_total / max(count, 1), "samples": int(count), "seconds": seconds, "lr": lr}


def _reseed_augment(loader) -> None:
    """Seed in-process augmentation from torch's RNG, once per epoch.

    Worker threads and processes reseed from torch's RNG themselves; augmentation in this process would
    otherwise keep its own random state, which no checkpoint holds: a resumed run would draw differently.
    """
    seed = int(torch.randint(2**31 - 1, ()).item())  # drawn always, so the RNG stream is the same for any loader
    augment = getattr(getattr(loader, "dataset", None), "augment", None)
    if augment is not None and hasattr(augment, "set_random_seed"):
        augment.set_random_seed(seed + 7919 * (dist.get_rank() if dist.is_initialized() else 0))


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
            outputs = model(bg, bg_fg)
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
    if isinstance(state, dict) and state.get("format") == "bgfg-mask-depth/1":
        raise UserError(
            f"{path}: written before the models took the Compare input (format /1); retrain it with lib.train"
        )
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


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for `--device`: auto is $LIB_DEVICE if set, else cuda, then mps, then cpu."""
    if name == "auto":
        return torch.device(os.environ.get("LIB_DEVICE") or default_device())
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU here (leave --device out to use the best available)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(
            "--device mps: this torch has no usable Apple GPU (leave --device out to use the best available)"
        )
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, not {name!r}")
    return torch.device(name)


def interactive_output(stream=None) -> bool:
    """True when a progress bar can redraw in place: a terminal, or a Jupyter kernel (not a log file)."""
    stream = sys.stderr if stream is None else stream
    if "IPython" in sys.modules:
        from IPython import get_ipython

        shell = get_ipython()
        if getattr(shell, "kernel", None) is not None:  # Jupyter and Colab kernels; not the terminal IPython
            return True
    return hasattr(stream, "isatty") and stream.isatty()


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random: the model's initial weights and the first epoch's draws follow from it."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _model_name(model: nn.Module) -> str:
    inner = unwrap_model(model)
    return next((name for name, cls in MODELS.items() if isinstance(inner, cls)), type(inner).__name__)


def config_from_checkpoint(state: dict) -> Config:
    """The Config a checkpoint was trained with (settings added since it was written take their defaults)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in state["config"].items() if k in known})


def resume_run(
    out: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None, scaler=None
) -> tuple[list[dict], float, int]:
    """Load OUT/last.pt into the objects (and the RNGs) and return (history, best_val_loss, start_epoch);
    ([], inf, 1) when there is none. UserError naming the file when it holds the other model."""
    path = Path(out) / "last.pt"
    if not path.is_file():
        return [], math.inf, 1
    state = load_checkpoint(path, expect_model=_model_name(model))
    if not dist.is_initialized() or dist.get_rank() == 0:
        remove_stale_temp_files(path.parent)
    unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return state["history"], state["best_val_loss"], state["epoch"] + 1


def make_epoch_record(epoch: int, train: dict, val: dict, lr: float | None = None) -> dict:
    """One history entry from `train_one_epoch`'s and `evaluate`'s results (lr: default, the epoch's first)."""
    return {
        "epoch": epoch,
        "train_loss": train["train_loss"],
        "val_loss": val["val_loss"],
        "lr": train["lr"] if lr is None else lr,
        "seconds": round(train["seconds"], 2),
        "samples_per_s": round(train["samples"] / max(train["seconds"], 1e-9), 1),
        **{k: v for k, v in val.items() if k != "val_loss"},
    }


def save_epoch(
    out: str | os.PathLike,
    cfg: Config,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    history: list[dict],
    best_val_loss: float,
    improved: bool,
) -> None:
    """Checkpoint the epoch: best.pt (when `improved`), then last.pt, then history.json, each atomically."""
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
    # best.pt first: last.pt claims this epoch's best, so a kill between the two must leave the older last.pt,
    # whose resume redoes the epoch and writes best.pt again
    if improved:
        save_checkpoint(out / "best.pt", state)
    save_checkpoint(out / "last.pt", state)
    write_history(out / "history.json", history)


def format_epoch(record: dict, improved: bool) -> str:
    """One line for an epoch: losses, IoU (and depth RMSE, delta1), speed, and *best when it improved."""
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


def _check_resume(cfg: Config, state: dict, path: Path) -> Config:
    """The resumed run's Config: the checkpoint's recipe, with only RUN_SETTINGS taken from `cfg`."""
    saved = config_from_checkpoint(state)
    if cfg.model != saved.model:
        raise UserError(f"{path}: holds a {saved.model} checkpoint, but --model is {cfg.model}")
    for field in dataclasses.fields(Config):
        mine, theirs = getattr(cfg, field.name), getattr(saved, field.name)
        if field.name in (*RUN_SETTINGS, "recipe") or field.name not in state["config"]:
            continue  # the recipe's name is a label; settings newer than the checkpoint have nothing to compare
        if mine != theirs:
            flag = "--" + field.name.replace("_", "-")
            raise UserError(
                f"{path}: the run was trained with {flag} {theirs}, not {mine}; a resumed run keeps its recipe "
                "(leave the flag out, or start a new run with another --out)"
            )
    if saved.scheduler == "onecycle" and cfg.epochs != saved.epochs:
        raise UserError(
            f"{path}: its onecycle schedule was planned for {saved.epochs} epochs; resume with --epochs {saved.epochs}"
        )
    if state["epoch"] >= cfg.epochs:
        raise UserError(f"{path}: already trained {state['epoch']} of {cfg.epochs} epochs; raise --epochs to go on")
    return dataclasses.replace(saved, **{name: getattr(cfg, name) for name in RUN_SETTINGS})


def fit(
    cfg: Config, data_root: str | os.PathLike | None = None, resume: bool = False, progress: bool = True
) -> list[dict]:
    """Train per `cfg` and return the history (one dict per epoch). Data from `data_root`, else from cfg.data through
    `resolve_data` (the synthetic set rendered at cfg.image_size, MODEST downloaded, or a path).

    The epoch loop is the one a notebook writes from the same parts (make_loaders, make_model, make_loss,
    make_optimizer, make_scheduler, resume_run, train_one_epoch, evaluate, make_epoch_record, save_epoch,
    format_epoch); what fit adds is torchrun, torch.compile, signals and the closing figures.
    """
    from tqdm.auto import tqdm

    validate_config(cfg)
    device = resolve_device(cfg.device)
    if cfg.sync_bn and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type != "cuda":
        raise UserError(f"--sync-bn needs CUDA GPUs (SyncBatchNorm has no {device.type} implementation); leave it out")
    ddp = init_distributed(device)
    if ddp.enabled and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    if resume:
        cfg = _check_resume(cfg, load_checkpoint(out / "last.pt", expect_model=cfg.model), out / "last.pt")
    bars = progress and ddp.is_main and interactive_output()  # in a log file, the epoch lines are the progress
    root = data_root if data_root is not None else resolve_data(cfg.data, bars, cfg.image_size)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = make_model(cfg.model)  # right after seeding, before the loaders: as the notebooks build it
    if cfg.sync_bn and ddp.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = cfg.channels_last and device.type in ("cuda", "cpu")
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    loader_settings = dict(
        num_workers=cfg.workers,
        device=device,
        skip_bad_samples=cfg.skip_bad_samples,
        loader=cfg.loader,
        data_mode=cfg.data_mode,
        ahead=cfg.ahead,
    )
    train_loader, val_loader = make_loaders(
        root,
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        augment=cfg.augment,
        reshoot=cfg.reshoot,
        split_by=cfg.split_by,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        **loader_settings,
    )
    train_set, val_set = train_loader.dataset, val_loader.dataset
    if len(train_set) == 0 or len(val_set) == 0:
        raise UserError(f"{root}: too few samples to split into train and val ({len(train_set) + len(val_set)})")
    if ddp.enabled or cfg.max_train_samples is not None:
        # torchrun: every rank takes its share of one permutation per (seed, epoch); a cap: that many per epoch
        sampler = EpochSampler(len(train_set), cfg.seed, cfg.max_train_samples, ddp.rank, ddp.world_size)
        train_loader = make_loader(
            train_set,
            batch_size=cfg.batch_size,
            shuffle=False,
            sampler=sampler,
            drop_last=len(sampler) > cfg.batch_size,
            **loader_settings,
        )
    if ddp.enabled:
        val_sampler = ShardSampler(len(val_set), ddp.rank, ddp.world_size)
        val_loader = make_loader(
            val_set, batch_size=cfg.batch_size, shuffle=False, sampler=val_sampler, **loader_settings
        )

    loss_fn = make_loss(cfg.loss or DEFAULT_LOSS[cfg.model], cfg.model)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, len(train_loader))
    amp_dtype = autocast_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    history, best, start_epoch = resume_run(out, model, optimizer, scheduler, scaler) if resume else ([], math.inf, 1)
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
        log(format_recipe(cfg), flush=True)
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
            if isinstance(train_loader.sampler, EpochSampler):
                train_loader.sampler.set_epoch(epoch)
            bar = tqdm(
                total=len(train_loader) + len(val_loader),
                desc=f"epoch {epoch}/{cfg.epochs}",
                leave=False,
                disable=not bars,
                dynamic_ncols=True,
            )
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
            if ddp.enabled:  # each rank's BatchNorm statistics are its own: evaluate rank 0's, the ones saved
                for buffer in model.buffers():
                    dist.broadcast(buffer, 0)
            val = evaluate(
                model, val_loader, loss_fn, device, amp_dtype=amp_dtype, channels_last=channels_last, progress=bar
            )
            bar.close()
            record = make_epoch_record(epoch, train, val)
            skipped = train_loader.skipped + val_loader.skipped
            if ddp.enabled:  # every rank's skipped samples, listed by rank 0
                gathered: list = [None] * ddp.world_size
                dist.all_gather_object(gathered, skipped)
                skipped = [item for part in gathered for item in part]
            if skipped:
                record["skipped"] = [name for name, _ in skipped]
            history.append(record)
            improved = record["val_loss"] < best
            best = min(best, record["val_loss"])
            if ddp.is_main:
                save_epoch(out, cfg, epoch, model, optimizer, scheduler, scaler, history, best, improved)
                log(format_epoch(record, improved), flush=True)
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


def write_figures(
    out: Path, history: list[dict], model: nn.Module, val_set: ModestDataset, device, channels_last: bool
) -> None:
    """curves.png and predictions.png for a run folder."""
    import matplotlib.pyplot as plt

    from .plots import plot_curves, plot_predictions
    from .predict import predict_samples

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
        from tools.download import download_modest  # a tool: imported only when asked for

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


def _recipe_default(field: str) -> str:
    """'demo 5, original 12': a setting's value in each recipe, for --help."""
    values = []
    for name, recipe in RECIPES.items():
        value = recipe.get(field, getattr(Config, field))
        if isinstance(value, dict):
            value = " / ".join(f"{v} ({k})" for k, v in value.items())
        values.append(f"{name} {value}")
    return "default: the recipe's: " + "; ".join(values)


def build_parser() -> argparse.ArgumentParser:
    """The train command's arguments; a setting left out comes from the recipe (or, on --resume, from the run)."""
    p = argparse.ArgumentParser(
        prog="python -m lib.train",
        description=__doc__.split("\n")[0],
        epilog="Settings not given come from the recipe (see RECIPES in lib/train.py); with --resume, from the run.",
    )
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default=None,
        help="named settings (default: demo for synthetic data, original for modest or a path; on --resume, the run's)",
    )
    p.add_argument("--model", choices=list(MODELS), default=None, help="default depthnet; on --resume, the run's")
    p.add_argument(
        "--data", default=None, help="synthetic, modest, or a MODEST folder/zip (default: the recipe's, else synthetic)"
    )
    p.add_argument("--epochs", type=int, default=None, help=_recipe_default("epochs"))
    p.add_argument("--batch-size", type=int, default=None, help=_recipe_default("batch_size"))
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize to this side (the synthetic set is rendered at it); " + _recipe_default("image_size"),
    )
    p.add_argument("--lr", type=float, default=None, help=_recipe_default("lr"))
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help=_recipe_default("optimizer"))
    p.add_argument(
        "--scheduler", choices=("none", "onecycle", "cosine"), default=None, help=_recipe_default("scheduler")
    )
    p.add_argument("--weight-decay", type=float, default=None, help=_recipe_default("weight_decay"))
    p.add_argument("--loss", choices=valid_losses("depthnet"), default=None, help=_recipe_default("loss"))
    p.add_argument(
        "--reshoot",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=_recipe_default("reshoot"),
    )
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: one per core, at most 8)")
    p.add_argument(
        "--split-by",
        choices=("sample", "background"),
        default=None,
        help="sample (the original 70/30; the default) or background (unseen rooms)",
    )
    p.add_argument("--max-train-samples", type=int, default=None, help="cap the samples per epoch (default: all)")
    p.add_argument("--out", default=None, help=f"run folder (default {Config.out}; on Colab: a Drive folder)")
    p.add_argument("--resume", action="store_true", help="continue OUT/last.pt with the run's own settings")
    p.add_argument("--seed", type=int, default=None, help=f"default {Config.seed}")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda", "mps"),
        default=None,
        help="default auto: $LIB_DEVICE if set, else cuda, then mps, then cpu",
    )
    p.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="fp32 even on CUDA")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="no augmentation")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under torchrun")
    p.add_argument(
        "--skip-bad-samples", action="store_true", default=None, help="leave out unreadable samples and list them"
    )
    p.add_argument(
        "--loader", choices=LOADERS, default=None, help="who fills batches: threads (auto's choice) or processes"
    )
    p.add_argument(
        "--data-mode",
        choices=("auto", "cpu", "gpu"),
        default=None,
        help="where decoding and augmentation run (default auto: gpu on CUDA, else cpu)",
    )
    p.add_argument(
        "--ahead",
        type=int,
        default=None,
        help="batches a background thread prepares on the device during the step (default 2 on CUDA, 0 elsewhere; 0: between steps)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (in a log file there are none anyway)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    """Config from parsed arguments: the recipe (or, on --resume, the run's checkpoint) with the flags given on top."""
    fields = {f.name for f in dataclasses.fields(Config)} - {"recipe"}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if not args.resume:
        recipe = args.recipe or ("demo" if args.data in (None, "synthetic") else "original")
        return make_config(recipe, **given)
    path = Path(args.out or Config.out) / "last.pt"
    saved = config_from_checkpoint(load_checkpoint(path, expect_model=args.model))
    if args.recipe is not None and args.recipe != saved.recipe:
        raise UserError(
            f"{path}: the run follows recipe {saved.recipe}, not {args.recipe}; leave --recipe out to resume it"
        )
    return dataclasses.replace(saved, **given)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m lib.train`."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    validate_config(cfg)
    held = [p for p in (Path(cfg.out) / "best.pt", Path(cfg.out) / "last.pt") if p.exists()]
    if held and not args.resume:  # never replace a run's checkpoints by starting over it
        raise UserError(
            f"{held[0]}: {cfg.out} holds a run; continue it with --resume, or start a new one with another --out"
        )
    history = fit(cfg, resume=args.resume, progress=not args.quiet)  # fit resolves the data (the run's, on resume)
    if history and int(os.environ.get("RANK", "0")) == 0:
        best = min(history, key=lambda r: r["val_loss"])
        print(
            f"done: best epoch {best['epoch']} (val loss {best['val_loss']:.4f}, IoU {best['mask_iou']:.4f}"
            + (f", RMSE {best['depth_rmse']:.4f}" if "depth_rmse" in best else "")
            + f") -> {cfg.out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # run_cli also turns Ctrl-C into exit code 130 (and reads --debug itself)
