# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DepthNet: the person's mask and the scene's depth from two photos
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bgfg-depth/modest-masknet/blob/main/notebooks/depthnet.ipynb)
#
# - **What:** trains DepthNet (7.1M parameters) to predict, from a museum room `bg` and the same room with a person
#   pasted in `bg_fg`, the person's `mask` and the scene's `depth` map; then shows curves, predictions and a browser.
# - **How long:** `RECIPE = "original"` (MODEST at 224 px): about 20 minutes per epoch on a Colab T4 (4 hours for 12;
#   an estimate from 3.8 min per epoch on an H200), plus ~5 minutes to fetch the data once onto your Drive.
# - **Quick run:** set `RECIPE = "demo"` below: the five-minute synthetic demo of `python -m lib.train`, even on a CPU.
#   "Run all" is safe to repeat: after a disconnect it continues the run saved on your Drive.
#
# What a run looks like (the demo run, made by `python -m lib.train && python make_figures.py`):
#
# ![validation curves of the demo run](../images/curves.png)
# ![predictions of the demo run on validation samples](../images/predictions.png)

# %% [markdown]
# ## Setup
#
# On Colab this fetches the code (or updates an earlier copy) and its requirements, keeping Colab's own PyTorch and
# widgets; elsewhere it only makes `lib` importable from the repository root. Safe to run twice.

# %%
import os
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/bgfg-depth/modest-masknet"  # your fork? put its https address here
if "google.colab" in sys.modules:  # on Colab: fetch or update the code, then its requirements (Colab's torch is kept)
    clone = Path("/content") / REPO_URL.rsplit("/", 1)[1]
    git_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # a wrong URL fails at once instead of asking for a password
    if (clone / ".git").is_dir():
        if subprocess.run(["git", "-C", str(clone), "pull", "-q", "--ff-only"], env=git_env).returncode:
            print(f"could not update {clone} (git pull --ff-only failed): using it as it is")
    elif subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, str(clone)], env=git_env).returncode:
        raise RuntimeError(f"cannot clone {REPO_URL}: edit REPO_URL at the top of this cell, then run it again")
    os.chdir(clone)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"], check=True)
ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "lib" / "train.py").is_file()), None)
if ROOT is None:
    raise RuntimeError("open this notebook from the repository (its root or notebooks/ folder)")
os.chdir(ROOT)  # data/ and runs/ mean the same here as for `python -m lib.train`
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# %%
import torch
from IPython.display import Markdown
from tqdm.auto import tqdm

from lib.colab import (
    check_runtime,
    default_out,
    describe_device,
    load_trained,
    mount_drive,
    plan_run,
    resolve_notebook_data,
    start_history,
)
from lib.data import ModestDataset, default_device, make_loaders
from lib.losses import DEFAULT_LOSS, make_loss
from lib.models import count_parameters, make_model
from lib.plots import plot_curves, plot_prediction, plot_predictions, plot_samples
from lib.predict import predict_samples
from lib.train import (
    autocast_dtype,
    evaluate,
    format_epoch,
    make_config,
    make_epoch_record,
    make_optimizer,
    make_scheduler,
    save_epoch,
    seed_everything,
    train_one_epoch,
)
from lib.widgets import LiveFigure, choose_pair, make_browser, make_metrics_table, pick_samples, show_figure

print(describe_device())

# %% [markdown]
# ## Parameters
#
# Everything a run depends on. Edit them here, or pass them to papermill to run the notebook headless:
# `papermill notebooks/depthnet.ipynb out.ipynb -p RECIPE demo -p EPOCHS 1`.

# %% tags=["parameters"]
RECIPE = "original"  # "original": the 2020 recipe on MODEST (GPU); "demo": the five-minute synthetic demo (any CPU)
DATA = None  # None: the recipe's ("modest" or "synthetic"); or the path of a MODEST folder/zip (e.g. on Drive)
EPOCHS = None  # passes over the training split; None: the recipe's (12 original, 5 demo)
BATCH_SIZE = None  # samples per step; None: the recipe's (32 original, 8 demo)
IMAGE_SIZE = None  # side in pixels; None: the recipe's (224 original, 64 demo); 96 trains several times faster
LR = None  # learning rate; None: the recipe's (0.1 with SGD original, 2e-3 with AdamW demo)
OPTIMIZER = None  # "sgd" or "adamw"; None: the recipe's
WORKERS = None  # data loading threads; None: one per CPU core (at most 8)
MOUNT_DRIVE = True  # on Colab, keep the data and the run on Google Drive so that a disconnect loses nothing
DOWNLOAD = None  # fetch MODEST (6.6 GB) when it is missing; None: on Colab only (never by surprise on your machine)
OUT = None  # run folder (checkpoints, history); None: MyDrive/modest-runs/depthnet on Drive, else runs/depthnet
RESUME = "auto"  # "auto": continue OUT's run if there is one; True: must continue; False: start (refused over a run)
TRAIN = True  # False: skip training and show OUT's best.pt, else the shipped weights/depthnet.pt
UPLOAD = False  # True: under "Your own photos", upload two photos on Colab (waits for you); False: a validation pair

# %% [markdown]
# ## Run folder and recipe
#
# The recipe is printed and saved in every checkpoint. On a Colab CPU runtime the original recipe stops here with
# advice rather than running for days.

# %%
device = default_device()
check_runtime(RECIPE, device)
drive = mount_drive(MOUNT_DRIVE)
out = Path(OUT) if OUT else default_out("depthnet", drive)
chosen = dict(
    data=DATA, epochs=EPOCHS, batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, lr=LR, optimizer=OPTIMIZER, workers=WORKERS
)  # None: the recipe's
cfg = make_config(RECIPE, model="depthnet", out=str(out), **{k: v for k, v in chosen.items() if v is not None})
cfg, resume = plan_run(out, cfg, RESUME if TRAIN else "auto")  # not training: load its history to show
status = ("continuing its run" if TRAIN else "showing its run") if resume else "new run"
print(f"recipe {RECIPE}: {cfg}\nrun folder: {out} ({status})")

# %% [markdown]
# ## Data
#
# Each sample is four aligned images: the empty room `bg`, the room with a person `bg_fg`, the person's `mask` and
# the `depth` map of `bg_fg` (brighter = farther). The split is the original one: 70/30 by sample, seed 1. On Colab,
# MODEST is kept once on your Drive (`MyDrive/modest-data/`, or your own copy in MyDrive) and copied to the
# runtime's disk for speed; after a disconnect it is copied again, not downloaded.

# %%
data_root = resolve_notebook_data(cfg.data, drive=drive, download=DOWNLOAD, image_size=cfg.image_size)
val_set = ModestDataset(data_root, "val", cfg.image_size, False, cfg.val_fraction, cfg.split_by, cfg.seed)
print(f"{data_root}: {len(val_set):,} validation samples")
show_figure(plot_samples(pick_samples(val_set, 4), title="validation samples"))

# %% [markdown]
# ## Model
#
# Two stems (one per image) feed a shared residual encoder; a mask decoder and a depth decoder climb back to full
# resolution, and the mask decoder's features feed the depth decoder. `forward` returns raw outputs: mask logits
# and depth. The bg_fg stem also sees `Compare`'s fixed features: |bg_fg - bg| (what pixel differencing
# thresholds) and the same difference made tolerant of a re-shot background (blurred, gain matched, best match
# within 3 px), so the network starts where differencing ends and learns when to trust which.

# %%
seed_everything(cfg.seed)  # as python -m lib.train does: the same recipe gives the same run
channels_last = cfg.channels_last and device.type in ("cuda", "cpu")  # measured faster on both
model = make_model(cfg.model).to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
bg = bg_fg = torch.zeros(2, 3, cfg.image_size, cfg.image_size, device=device)  # (B, 3, H, W)
with torch.no_grad():
    outputs = model.eval()(bg, bg_fg)  # {'mask': logits, 'depth'}: (B, 1, H, W) each
print(
    f"DepthNet: {count_parameters(model):,} parameters; bg, bg_fg {tuple(bg.shape)} -> "
    f"mask logits {tuple(outputs['mask'].shape)}, depth {tuple(outputs['depth'].shape)}"
)

# %% [markdown]
# ## Train
#
# The parts, built here so you can swap any of them: the loaders, the loss function (for DepthNet BCE on the mask
# plus RMSE on the depth; the demo adds the Lovász hinge on the mask and MiDaS's scale-and-shift-invariant loss on
# the depth, which scores the room's shape rather than its size), the optimizer and its schedule. A run that
# finished already skips the loop; one cut off by a disconnect continues from `OUT/last.pt`.

# %%
train_loader, val_loader = make_loaders(
    data_root,
    batch_size=cfg.batch_size,
    image_size=cfg.image_size,
    num_workers=cfg.workers,
    device=device,
    augment=cfg.augment,
    reshoot=cfg.reshoot,
    split_by=cfg.split_by,
    seed=cfg.seed,
)
loss_name = cfg.loss or DEFAULT_LOSS[cfg.model]
loss_fn = make_loss(loss_name, cfg.model)
optimizer = make_optimizer(cfg, model)
scheduler = make_scheduler(cfg, optimizer, len(train_loader))
amp_dtype = autocast_dtype(device, cfg.amp)  # bf16/fp16 on a GPU, fp32 elsewhere
scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
history, best_val_loss, start_epoch = start_history(out, resume, model, optimizer, scheduler, scaler)
print(f"loss {loss_name}, {type(optimizer).__name__} lr {cfg.lr}, epochs {start_epoch}..")

# %% [markdown]
# The epoch loop: train, evaluate, save (`best.pt` when the validation loss improves, then `last.pt`), redraw the
# curves. Validation IoU thresholds the mask at probability 0.5; RMSE is on depth in [0, 1].

# %%
curves = LiveFigure()
last_epoch = cfg.epochs if TRAIN else 0  # TRAIN = False: no epochs, straight to the results
for epoch in range(start_epoch, last_epoch + 1):
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(total=len(train_loader) + len(val_loader), desc=f"epoch {epoch}/{cfg.epochs}", leave=False)
    train = train_one_epoch(
        model,
        train_loader,
        loss_fn,
        optimizer,
        device,
        scheduler=scheduler,
        scaler=scaler,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        progress=bar,
    )
    val = evaluate(model, val_loader, loss_fn, device, amp_dtype=amp_dtype, channels_last=channels_last, progress=bar)
    bar.close()
    record = make_epoch_record(epoch, train, val, lr)
    history.append(record)
    improved = record["val_loss"] < best_val_loss
    best_val_loss = min(best_val_loss, record["val_loss"])
    save_epoch(out, cfg, epoch, model, optimizer, scheduler, scaler, history, best_val_loss, improved)
    print(format_epoch(record, improved))
    curves.update(plot_curves(history))
if TRAIN and start_epoch > cfg.epochs:
    print(f"{out} holds a finished run ({cfg.epochs} epochs): raise EPOCHS to train on, or set OUT for a new run")

# %% [markdown]
# ## Curves
#
# The whole run, resumed parts included.

# %%
if history:
    show_figure(plot_curves(history))

# %% [markdown]
# ## Predictions
#
# The best checkpoint (or, when no run exists, the shipped `weights/depthnet.pt`) on a few validation samples.

# %%
model, checkpoint = load_trained(out, "depthnet", device)
if model is not None:
    show_figure(plot_predictions(*predict_samples(model, pick_samples(val_set, 6), device)))

# %% [markdown]
# ## Browse the validation set
#
# Move the slider to pick a sample; toggle the predicted mask over `bg_fg` and the depth error map.
#
# ![the browser](../images/widget.png)

# %%
browser = make_browser(model, val_set, device) if model is not None else None
browser

# %% [markdown]
# ## Your own photos
#
# With `UPLOAD = True` on Colab, upload a photo of an empty scene ("1/2") and then the same scene with a person in it
# ("2/2"); otherwise a validation pair stands in. `python -m lib.predict` does the same from the command line.

# %%
from lib.predict import predict_pair

if model is not None:
    bg_rgb, bg_fg_rgb = choose_pair(val_set, upload=UPLOAD)  # (H, W, 3) uint8 each
    mask_prob, depth_map = predict_pair(model, bg_rgb, bg_fg_rgb, checkpoint["config"]["image_size"], device)
    show_figure(plot_prediction(bg_rgb, bg_fg_rgb, mask_prob, depth_map))

# %% [markdown]
# ## Metrics
#
# The best epoch (lowest validation loss, the one in `best.pt`) next to the last.

# %%
Markdown(make_metrics_table(history))
