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
# - **How long:** on MODEST at 224 px, about 20 minutes per epoch on a Colab T4 (4 hours for 12; an estimate from
#   3.8 min per epoch measured on an H200), plus ~5 minutes to download.
# - **Quick run:** set `DATA = "synthetic"`, `IMAGE_SIZE = 64`, `EPOCHS = 2`, `OPTIMIZER = "adamw"`, `LR = 2e-3` below
#   (under 10 minutes even on a 2-core CPU), or keep MODEST and set `MAX_TRAIN_SAMPLES = 20_000`.

# %% [markdown]
# ## Setup
#
# On Colab this fetches the code and its requirements (Colab's own PyTorch is kept); elsewhere it only makes `lib`
# importable from the repository root. Safe to run twice.

# %%
import os
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/bgfg-depth/modest-masknet"  # written from lib/colab.py by `python -m lib.colab`
if "google.colab" in sys.modules:  # on Colab: fetch the code once, then its requirements (Colab's torch is kept)
    clone = Path("/content") / REPO_URL.rsplit("/", 1)[1]
    if not clone.is_dir():
        subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, str(clone)], check=True)
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

from lib.colab import default_out, describe_device, mount_drive
from lib.data import ModestDataset, default_device
from lib.models import count_parameters, make_model
from lib.plots import plot_curves, plot_predictions, plot_samples, predict_samples
from lib.train import Config, fit, load_model, resolve_data
from lib.widgets import choose_pair, make_browser, make_metrics_table, pick_samples, show_figure

print(describe_device())

# %% [markdown]
# ## Parameters
#
# Everything a run depends on. Edit them here, or pass them to papermill to run the notebook headless:
# `papermill notebooks/depthnet.ipynb out.ipynb -p DATA synthetic -p EPOCHS 1 -p IMAGE_SIZE 64`.

# %% tags=["parameters"]
DATA = "modest"  # "modest": download the real dataset (6.6 GB) once; "synthetic": the small generated set; or a MODEST folder/zip
EPOCHS = 12  # passes over the training split (the original recipe)
BATCH_SIZE = 32  # samples per step
IMAGE_SIZE = 224  # side in pixels, a multiple of 32 for DepthNet; 96 or 64 trains several times faster
LR = 0.1  # learning rate: 0.1 suits SGD (the original recipe), about 2e-3 suits adamw
OPTIMIZER = "sgd"  # "sgd" (momentum 0.9) or "adamw"
MAX_TRAIN_SAMPLES = None  # cap on training samples per epoch (e.g. 20_000 for a quick look); None: the whole split
WORKERS = None  # data loading threads; None: one per CPU core (at most 8)
MOUNT_DRIVE = True  # on Colab, keep the run on Google Drive so that a disconnect does not lose it
OUT = None  # run folder (checkpoints, history, figures); None: Drive's MyDrive/modest-runs/depthnet, else runs/depthnet
RESUME = False  # True: continue OUT/last.pt after a disconnect instead of starting over

# %%
drive = mount_drive(MOUNT_DRIVE)
out = Path(OUT) if OUT else default_out("depthnet", drive)
device = default_device()
print(f"run folder: {out}")

# %% [markdown]
# ## Data
#
# Each sample is four aligned images: the empty room `bg`, the room with a person `bg_fg`, the person's `mask` and
# the `depth` map of `bg_fg` (brighter = farther). The split is the original one: 70/30 by sample, seed 1.

# %%
data_root = resolve_data(DATA, size=IMAGE_SIZE)  # synthetic: rendered at IMAGE_SIZE
dataset = ModestDataset(data_root, image_size=IMAGE_SIZE)
val_set = dataset.subset("val")
print(f"{data_root}: {len(dataset):,} samples, {len(dataset.subset('train')):,} train / {len(val_set):,} val")
show_figure(plot_samples(pick_samples(val_set, 4), title="validation samples"))

# %% [markdown]
# ## Model
#
# Two stems (one per image) feed a shared residual encoder; a mask decoder and a depth decoder climb back to full
# resolution, and the mask decoder's features feed the depth decoder. `forward` returns raw outputs: mask logits
# and depth.

# %%
model = make_model("depthnet")
bg = bg_fg = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)  # (B, 3, H, W)
with torch.no_grad():
    mask_logits, depth = model.eval()(bg, bg_fg)  # (B, 1, H, W) each
print(
    f"DepthNet: {count_parameters(model):,} parameters; bg, bg_fg {tuple(bg.shape)} -> "
    f"mask logits {tuple(mask_logits.shape)}, depth {tuple(depth.shape)}"
)

# %% [markdown]
# ## Train
#
# `fit` runs the whole loop: it checkpoints every epoch to `last.pt` (and `best.pt` when the validation loss
# improves), so after a disconnect set `RESUME = True` and run again. The loss is BCE on the mask plus 2 x RMSE on
# the depth.

# %%
cfg = Config(
    model="depthnet",
    data=DATA,
    epochs=EPOCHS,
    batch_size=BATCH_SIZE,
    image_size=IMAGE_SIZE,
    lr=LR,
    optimizer=OPTIMIZER,
    workers=WORKERS,
    max_train_samples=MAX_TRAIN_SAMPLES,
    out=str(out),
)
history = fit(cfg, data_root, resume=RESUME)

# %% [markdown]
# ## Curves
#
# Validation IoU thresholds the mask at probability 0.5; RMSE is on depth in [0, 1].

# %%
show_figure(plot_curves(history))

# %% [markdown]
# ## Predictions
#
# The best checkpoint on a few validation samples (the same ones every run).

# %%
model, checkpoint = load_model(out / "best.pt", device)
samples = pick_samples(val_set, 6)
show_figure(plot_predictions(*predict_samples(model, samples, device)))

# %% [markdown]
# ## Browse the validation set
#
# Move the slider to pick a sample; toggle the predicted mask over `bg_fg` and the depth error map.

# %%
browser = make_browser(model, val_set, device)
browser

# %% [markdown]
# ## Your own photos
#
# On Colab, upload a photo of an empty scene and then the same scene with a person in it; elsewhere (and when no
# file is chosen) a validation pair stands in. `python -m lib.predict` does the same from the command line.

# %%
from lib.predict import plot_prediction, predict_pair

bg_rgb, bg_fg_rgb = choose_pair(val_set)  # (H, W, 3) uint8 each: uploaded on Colab, else a validation pair
mask_prob, depth_map = predict_pair(model, bg_rgb, bg_fg_rgb, checkpoint["config"]["image_size"], device)
show_figure(plot_prediction(bg_rgb, bg_fg_rgb, mask_prob, depth_map))

# %% [markdown]
# ## Metrics
#
# The best epoch (lowest validation loss, the one in `best.pt`) next to the last.

# %%
Markdown(make_metrics_table(history))
