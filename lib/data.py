"""MODEST-format data: read a folder or its zip, split it, and load batches onto the training device.

Layout under the dataset root (or under one top folder of either):
    bg/bg001.jpeg  bg_fg/bg001_fg001_01.jpeg  bg_fg_mask/bg001_fg001_01_mask.jpeg
    bg_fg_depth_map/bg001_fg001_01_depth_map.jpeg  file_map.txt  (bbox.txt, fg/, fg_mask/ unused here)
`file_map.txt`: one sample per line, four names without extension (bg, bg_fg, mask, depth).
Samples come out as uint8 CHW tensors; float conversion and normalisation happen per batch (`normalize`).

The plain path: `ModestDataset` -> a pool of threads in this process (`ThreadLoader`, the default: the JPEG
decoder, zip reads and OpenCV release the GIL, so on a 2-core Colab threads beat worker processes, see
`python -m tools.bench`) or torch DataLoader worker processes (`loader="processes"`) -> `DeviceLoader`, which
moves each batch to the device and normalises it there. The GPU fast path (backgrounds kept on the device,
JPEGs decoded there, batches prepared ahead) lives in lib/fastpath.py; without that file this one still works.
"""

from __future__ import annotations

import collections
import copy
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .augment import Augment, apply_augment, make_augment
from .errors import DataError, UserError
from .modest import FILE_MAP, FOLDERS, parse_file_map, resolve_names
from .zipindex import ZipIndex, find_sorted

try:  # libjpeg-turbo with the GIL released: the fastest JPEG decoder on CPU
    import simplejpeg
except ImportError:  # pragma: no cover - requirements.txt installs it
    simplejpeg = None
try:  # PNGs, and JPEGs when simplejpeg is missing; torchvision (slower to resize) stands in when absent
    import cv2
except ImportError:  # pragma: no cover - albumentations brings it
    cv2 = None

# torchvision >= 0.29 warns that its image codecs move to TorchCodec; they still work, and are only our fallback.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)
_DECODE_ERRORS = (ValueError, RuntimeError) + ((cv2.error,) if cv2 is not None else ())
LOADERS = ("auto", "threads", "processes")
DATA_MODES = ("auto", "cpu", "gpu")
# Measured with `python -m tools.bench` on a 2-core machine, 224 px, augmentation on: threads deliver more
# samples/s than worker processes (and hold one copy of the dataset); see the bench's loader table.
DEFAULT_LOADER = "threads"

# Published MODEST statistics (RGB, on [0,1] images); used for every dataset so checkpoints travel.
BG_MEAN, BG_STD = (0.40086, 0.46599, 0.53281), (0.25451, 0.24249, 0.23615)
BG_FG_MEAN, BG_FG_STD = (0.41221, 0.47368, 0.53431), (0.25699, 0.24577, 0.24217)
# depth is only scaled to [0, 1]: the same function serves it
STATS = {"bg": (BG_MEAN, BG_STD), "bg_fg": (BG_FG_MEAN, BG_FG_STD), "depth": ((0.0,), (1.0,))}
_TABLES: dict[str, np.ndarray] = {}


def normalize(x: torch.Tensor, key: str) -> torch.Tensor:
    """uint8 (B,C,H,W) 0..255, or float in [0,1] -> float32 normalised with `key`'s statistics ("bg", "bg_fg", "depth"),
    on x's device. The one normalisation: loaders, prediction and plots all call it."""
    if x.dtype == torch.uint8:
        if x.device.type == "cpu" and cv2 is not None and x.dim() == 4:  # one table look-up per pixel: same numbers
            return _look_up(x, _table(key))
        x = x.float() / 255.0
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in STATS[key])
    return (x - mean) / std


def denormalize(x: torch.Tensor, key: str) -> torch.Tensor:
    """The inverse of `normalize`, to float [0, 1] images (B,3,H,W)."""
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in STATS[key])
    return x * std + mean


def _table(key: str) -> np.ndarray:
    """`normalize`'s arithmetic applied once to the 256 levels: a (256, 1, C) float32 table for cv2.LUT."""
    if key not in _TABLES:
        levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, len(STATS[key][0]), 256, 1)
        _TABLES[key] = normalize(levels.float() / 255.0, key)[0].permute(1, 2, 0).contiguous().numpy()  # (256, 1, C)
    return _TABLES[key]


def _look_up(x: torch.Tensor, lut: np.ndarray) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W) in channels-last memory, through one 256-entry table per channel
    (`lut` (256, 1, C) float32), one cv2.LUT call per image. Free of copies when x is channels-last (or C is 1)."""
    src = x.permute(0, 2, 3, 1).contiguous().numpy()  # (B, H, W, C)
    out = torch.empty(src.shape, dtype=torch.float32)  # (B, H, W, C)
    dst = out.numpy()
    if src.shape[-1] == 1:
        src, dst, lut = src[..., 0], dst[..., 0], lut[:, :, 0]  # one plane: cv2 wants (H, W) and a (256, 1) table
    for i in range(src.shape[0]):
        cv2.LUT(src[i], lut, dst=dst[i])
    return out.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------------
# Sources: a folder or a zip, seen as a sorted array of member names and `read(i)`.


class FolderSource:
    """The files under a folder, as a sorted numpy array of relative posix paths."""

    def __init__(self, root: Path):
        self.root = root
        names = []
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            rel = os.path.relpath(folder, root).replace(os.sep, "/")
            prefix = "" if rel == "." else rel + "/"
            names.extend(prefix + f for f in files)
        names.sort()
        self.names = np.array([n.encode() for n in names], dtype=f"S{max([len(n.encode()) for n in names] + [1])}")

    def find(self, names: np.ndarray) -> np.ndarray:
        """Indices of `names` (bytes) in `self.names`; -1 where absent."""
        return find_sorted(self.names, names)

    def read(self, i: int) -> bytes:
        """The bytes of file `i`."""
        try:
            return (self.root / self.names[i].decode()).read_bytes()
        except OSError as exc:
            raise DataError(f"{self.where(i)}: cannot read ({exc.strerror})") from None

    def where(self, i: int) -> str:
        """A path a person can open."""
        return str(self.root / self.names[i].decode())


class ZipSource:
    """The members of a zip, read by offset (one descriptor per process; no extraction)."""

    def __init__(self, path: Path):
        self.path = path
        self.index = ZipIndex(path)
        self.names = self.index.names

    def find(self, names: np.ndarray) -> np.ndarray:
        """Indices of `names` (bytes) among the members; -1 where absent."""
        return self.index.find(names)

    def read(self, i: int) -> bytes:
        """The bytes of member `i`."""
        return self.index.read(i)

    def where(self, i: int) -> str:
        """The zip and the member, as a person would name them."""
        return f"{self.path}:{self.names[i].decode()}"


def open_source(root: str | os.PathLike) -> tuple[FolderSource | ZipSource, str]:
    """Open a MODEST dataset folder or zip; return the source and the prefix under which `file_map.txt` lives."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{path}: dataset not found (expected a MODEST folder or .zip)")
    if path.is_dir():
        source: FolderSource | ZipSource = FolderSource(path)
        if len(source.names) == 0:
            raise DataError(f"{path}: the folder is empty (expected a MODEST dataset with {FILE_MAP})")
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise DataError(f"{path}: neither a folder nor a zip file")
        source = ZipSource(path)
    if source.find([FILE_MAP.encode()])[0] >= 0:
        return source, ""
    names, i = source.names, 0
    while i < len(names):  # one step per top-level folder: is file_map.txt directly inside it?
        top = names[i].split(b"/", 1)[0]
        if source.find([top + b"/" + FILE_MAP.encode()])[0] >= 0:
            return source, top.decode() + "/"
        i = max(i + 1, int(np.searchsorted(names, top + b"0")))  # b"0" sorts right after b"/"
    raise DataError(f"{path}: no {FILE_MAP} found (not a MODEST-format dataset)")


# ----------------------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, gray: bool, where: str) -> np.ndarray:
    """JPEG/PNG bytes -> HxWx3 (or HxW if `gray`) uint8; DataError naming `where` if it cannot be decoded."""
    try:
        if simplejpeg is not None and data[:2] == b"\xff\xd8":
            return simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB")[..., 0 if gray else slice(None)]
        if cv2 is None:
            return _decode_with_torchvision(data, gray)
        buf = np.frombuffer(data, np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError("not an image")
        return img if gray else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    except _DECODE_ERRORS as exc:
        raise DataError(
            f"{where}: not a readable image ({str(exc).splitlines()[0] if str(exc) else 'corrupt'})"
        ) from None


def _decode_with_torchvision(data: bytes, gray: bool) -> np.ndarray:
    """The fallback decoder (no simplejpeg, no OpenCV): torchvision's libjpeg/libpng."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    if not data:
        raise ValueError("empty file")
    img = tv_decode(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.GRAY if gray else ImageReadMode.RGB
    )
    return img[0].numpy() if gray else img.permute(1, 2, 0).numpy()  # (H, W) or (H, W, 3)


def resize(img: np.ndarray, size: int | tuple[int, int], mask: bool = False) -> np.ndarray:
    """Resize an HxW(xC) uint8 or float32 image to `size` (one side, or (height, width)): area when shrinking;
    when enlarging, bilinear, or nearest for a `mask`. The one resize on the CPU: data, prediction, tools.

    A shrunk mask (0/255) is the share of each new pixel the figure covers, so the loader's "> 127" makes a
    pixel foreground when the figure covers most of it: the same footprint the area-shrunk photos show.
    (Nearest sampling would keep whichever source pixel sits at the sample point: a label up to a pixel off.)
    """
    height, width = (size, size) if isinstance(size, int) else size
    if img.shape[:2] == (height, width):
        return img
    if cv2 is None:
        out = resize_tensor(_chw(img).unsqueeze(0), size, mask)[0].permute(1, 2, 0).numpy()  # (height, width, C)
        return out[:, :, 0] if img.ndim == 2 else out
    if height * width < img.shape[0] * img.shape[1]:
        mode = cv2.INTER_AREA
    else:
        mode = cv2.INTER_NEAREST if mask else cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=mode)


def resize_tensor(x: torch.Tensor, size: int | tuple[int, int], mask: bool = False) -> torch.Tensor:
    """Resize (B, C, H, W) to `size` on its device, as `resize` does (area when shrinking); keeps uint8 uint8."""
    height, width = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == (height, width):
        return x
    shrink = height * width < x.shape[-2] * x.shape[-1]
    if mask and not shrink:
        return F.interpolate(x, size=(height, width), mode="nearest")
    mode = "area" if shrink else "bilinear"
    y = F.interpolate(x.float(), size=(height, width), mode=mode, **({} if shrink else {"align_corners": False}))
    return y.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y  # (B, C, height, width)


# ----------------------------------------------------------------------------------------------------------
# The dataset


class ModestDataset(Dataset):
    """MODEST-format samples as dicts of uint8 CHW tensors (views of the decoded HWC images): bg (3), bg_fg (3),
    mask (1, 0/1), depth (1, 0..255), name.

    reshoot: None, or a re-shoot level (train, mild, strong; see lib.augment) applied to bg alone; with
    `reshoot_seed`, each sample's draw comes from (reshoot_seed, its row in the file map) only (evaluation).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "all",
        image_size: int | None = None,
        augment: bool = False,
        val_fraction: float = 0.3,
        split_by: str = "sample",
        seed: int = 1,
        reshoot: str | None = None,
        reshoot_seed: int | None = None,
    ):
        if split not in ("all", "train", "val"):
            raise UserError(f"split must be all, train or val, not {split!r}")
        if split_by not in ("sample", "background"):
            raise UserError(f"split_by must be sample or background, not {split_by!r}")
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"val_fraction must be between 0 and 1, not {val_fraction}")
        if image_size is not None and image_size < 8:
            raise UserError(f"image_size must be at least 8, not {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        self.split = split
        self.source, self.prefix = open_source(self.root)
        i = self.source.find(np.array([(self.prefix + FILE_MAP).encode()]))[0]
        where = self.source.where(i)
        names, lines = parse_file_map(self.source.read(i), where)  # (N, 4) bytes names, their line numbers
        members = {
            kind: resolve_names(kind, names[:, col], lines, self.prefix, self.source.find, where)
            for col, kind in enumerate(FOLDERS)
        }
        bg_members, self.bg_ids = np.unique(members["bg"], return_inverse=True)
        self.bg_members = bg_members  # (n_bg,) member index of each background
        self.sample_members = np.stack([members["bg_fg"], members["mask"], members["depth"]], 1)  # (N, 3)
        self.sample_names = names[:, 1]
        self.val_fraction, self.split_by, self.seed = val_fraction, split_by, seed
        self.rows = make_split(self.bg_ids, split, val_fraction, split_by, seed)
        self.augment = make_augment(augment, reshoot, reshoot_seed)
        self.catch_errors = False  # set by the loaders: errors travel back as records, raised in the main process
        self._bg_cache: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
        self._bg_cache_pid = os.getpid()

    def subset(
        self, split: str, augment: bool = False, reshoot: str | None = None, reshoot_seed: int | None = None
    ) -> ModestDataset:
        """The same dataset seen through another split; shares the index (nothing is read again)."""
        if split not in ("all", "train", "val"):
            raise UserError(f"split must be all, train or val, not {split!r}")
        view = copy.copy(self)
        view.split = split
        view.rows = make_split(self.bg_ids, split, self.val_fraction, self.split_by, self.seed)
        view.augment = make_augment(augment, reshoot, reshoot_seed)
        view._bg_cache = {}
        return view

    def __len__(self) -> int:
        return len(self.rows)

    def _background(self, bg_id: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Decoded (and resized) background, decoded once per process; also its original (H, W)."""
        if self._bg_cache_pid != os.getpid():
            self._bg_cache, self._bg_cache_pid = {}, os.getpid()
        hit = self._bg_cache.get(bg_id)
        if hit is None:
            hit = self._bg_cache[bg_id] = self._decode_background(bg_id)
        return hit

    def _decode_background(self, bg_id: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Background `bg_id` read, decoded and resized (to image_size, if set); also its original (H, W)."""
        member = int(self.bg_members[bg_id])
        img = decode_image(self.source.read(member), gray=False, where=self.source.where(member))
        return (resize(img, self.image_size) if self.image_size else img), img.shape[:2]

    def check_size(self, row: int, col: int, shape: tuple[int, int], bg_shape: tuple[int, int]) -> None:
        """DataError naming the file when image `col` (0 bg_fg, 1 mask, 2 depth) of `row` differs from its background's size."""
        if tuple(shape) != tuple(bg_shape):
            member = int(self.sample_members[row, col])
            raise DataError(
                f"{self.source.where(member)}: size {shape[1]}x{shape[0]} does not match its background's "
                f"{bg_shape[1]}x{bg_shape[0]} ({self.source.where(int(self.bg_members[self.bg_ids[row]]))})"
            )

    def _load_others(self, row: int, bg_shape: tuple[int, int], datas: list | None = None) -> list[np.ndarray]:
        """bg_fg (HxWx3), mask (HxW, 0/1) and depth (HxW) of `row`: read (or taken from `datas`), decoded, checked, resized."""
        arrays = []
        for col, gray in ((0, False), (1, True), (2, True)):
            member = int(self.sample_members[row, col])
            data = self.source.read(member) if datas is None else datas[col]
            img = decode_image(data, gray=gray, where=self.source.where(member))
            self.check_size(row, col, img.shape[:2], bg_shape)
            arrays.append(resize(img, self.image_size, mask=col == 1) if self.image_size else img)
        arrays[1] = (arrays[1] > 127).astype(np.uint8)
        return arrays

    def load(self, index: int) -> dict:
        """Sample `index` of this split; DataError naming the file when an image is unreadable or mis-sized."""
        row = int(self.rows[index])
        bg, bg_shape = self._background(int(self.bg_ids[row]))
        bg_fg, mask, depth = self._load_others(row, bg_shape)
        cached = bg
        if self.augment is not None:
            bg, bg_fg, mask, depth = apply_augment(self.augment, bg, bg_fg, mask, depth, key=row)
        if np.may_share_memory(bg, cached):  # samples are views (`_chw`): never hand out the cache's memory
            bg = bg.copy()
        return {
            "bg": _chw(bg),
            "bg_fg": _chw(bg_fg),
            "mask": _chw(mask),
            "depth": _chw(depth),
            "name": self.sample_names[row].decode(),
        }

    def __getitem__(self, index: int) -> dict:
        if not self.catch_errors:
            return self.load(index)
        try:
            return self.load(index)
        except DataError as exc:
            return {"error": str(exc), "name": self.sample_names[int(self.rows[index])].decode()}


def _chw(img: np.ndarray) -> torch.Tensor:
    """HxW or HxWxC uint8 -> CxHxW tensor sharing the image's HWC memory (a view: nothing is transposed here;
    `collate_samples` copies it once, straight into a channels-last batch)."""
    if img.ndim == 2:
        img = img[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # (C, H, W), strides (1, W*C, C)


def stack_channels_last(images: list[torch.Tensor]) -> torch.Tensor:
    """(C, H, W) tensors of one size -> (B, C, H, W) in channels-last memory, one copy per image.

    The layout the model runs in (`Config.channels_last`) and the one the HWC decoders and albumentations
    produce: samples from `_chw` are copied as plain memory, and nobody transposes the batch afterwards.
    Tensors of other ranks are stacked as torch.stack does."""
    if images[0].dim() != 3:
        return torch.stack(images)
    c, h, w = images[0].shape
    out = torch.empty((len(images), h, w, c), dtype=images[0].dtype)  # (B, H, W, C)
    for i, image in enumerate(images):
        if image.shape != (c, h, w):
            raise UserError(
                f"cannot batch images of sizes {tuple(images[0].shape)} and {tuple(image.shape)}; "
                "set image_size (--image-size) to bring them to one size"
            )
        out[i].copy_(image.permute(1, 2, 0))
    return out.permute(0, 3, 1, 2)  # (B, C, H, W) view, channels-last strides


def make_split(bg_ids: np.ndarray, split: str, val_fraction: float, split_by: str, seed: int) -> np.ndarray:
    """Sample rows of `split`, deterministic for `seed`.

    split_by="sample": a random permutation of all samples (torch.randperm with `seed`, as
    `torch.utils.data.random_split` draws it), the first (1 - val_fraction) train, the rest val.
    split_by="background": whole backgrounds go to one side, so val measures unseen rooms.
    """
    n = len(bg_ids)
    if split == "all":
        return np.arange(n, dtype=np.int64)
    generator = torch.Generator().manual_seed(seed)
    if split_by == "sample":
        perm = torch.randperm(n, generator=generator).numpy()
        n_train = n - int(np.floor(n * val_fraction))
        rows = perm[:n_train] if split == "train" else perm[n_train:]
        return np.sort(rows)
    n_bg = int(bg_ids.max()) + 1
    if n_bg < 2:
        raise UserError("split_by='background' needs at least two backgrounds")
    perm = torch.randperm(n_bg, generator=generator).numpy()
    n_val = min(n_bg - 1, max(1, int(round(n_bg * val_fraction))))
    val_bgs = np.zeros(n_bg, bool)
    val_bgs[perm[:n_val]] = True
    return np.flatnonzero(val_bgs[bg_ids] == (split == "val")).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Loaders


def collate_samples(samples: list[dict]) -> dict:
    """Stack good samples into a batch; samples that failed to load travel in batch['errors'] as (name, message)."""
    good = [s for s in samples if "error" not in s]
    batch: dict = {"errors": [(s["name"], s["error"]) for s in samples if "error" in s]}
    batch["name"] = [s["name"] for s in good]
    for key in ("bg", "bg_fg", "mask", "depth"):
        batch[key] = stack_channels_last([s[key] for s in good]) if good else None  # (B, C, H, W) uint8, channels last
    return batch


def _seed_worker(worker_id: int) -> None:
    """Give each worker its own augmentation stream (forked workers would otherwise repeat one another)."""
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    if dataset is not None and getattr(dataset, "augment", None) is not None:
        dataset.augment.set_random_seed(torch.initial_seed() % 2**32)


def _pin(batch: dict) -> dict:
    """Page-locked copies of a batch's tensors (so the host-to-device copies can be asynchronous)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) and k != "files" else v for k, v in batch.items()}


class ThreadLoader:
    """DataLoader-like batches assembled by a pool of threads in this process: same order, bounded prefetch.

    Decoding (simplejpeg, OpenCV) and zip reads release the GIL, so on few cores threads beat worker
    processes: nothing is pickled between processes and the dataset exists once. Each batch is made by one
    thread with its own copy of the augmentation pipeline, seeded from (a seed drawn from torch's RNG when
    iteration starts, the batch's number): the batches do not depend on thread timing, and a resumed run
    repeats exactly. Errors in a worker thread are raised in the caller; data errors travel as records.
    """

    def __init__(
        self,
        dataset,
        *,
        batch_size: int,
        shuffle: bool = False,
        sampler=None,
        drop_last: bool = False,
        num_workers: int = 2,
        prefetch: int | None = None,
        collate_fn: Callable[[list[dict]], dict] = collate_samples,
        pin_memory: bool = False,
        to_device: Callable[[dict], dict] | None = None,
    ):
        if num_workers < 1:
            raise UserError(f"ThreadLoader needs at least one worker thread, not {num_workers}")
        self.dataset = dataset
        self.sampler = (
            sampler if sampler is not None else (RandomSampler(dataset) if shuffle else SequentialSampler(dataset))
        )
        self.batch_sampler = BatchSampler(self.sampler, batch_size, drop_last)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.num_workers = num_workers
        self.prefetch = prefetch if prefetch is not None else num_workers + 2  # batches queued or in the making
        self.collate_fn, self.pin_memory = collate_fn, pin_memory
        self.to_device = to_device  # applied to each batch in its thread (on the CPU, the float conversion goes here)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict]:
        base_seed = int(torch.empty((), dtype=torch.int64).random_().item())  # as DataLoader draws its base seed
        local = threading.local()
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="modest-loader")
        pending: collections.deque = collections.deque()
        try:
            for number, indices in enumerate(self.batch_sampler):
                pending.append(pool.submit(self._make_batch, local, base_seed, number, indices))
                if len(pending) >= self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # also on break / exceptions: drop queued work, let running batches finish in the background
            for future in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _make_batch(self, local: threading.local, base_seed: int, number: int, indices: list[int]) -> dict:
        dataset = getattr(local, "dataset", None)
        if dataset is None:
            dataset = local.dataset = _thread_copy(self.dataset)
        augment = getattr(dataset, "augment", None)
        if augment is not None:
            augment.set_random_seed(int(np.random.SeedSequence([base_seed % 2**63, number]).generate_state(1)[0]))
        batch = self.collate_fn([dataset[i] for i in indices])
        if self.pin_memory:
            batch = _pin(batch)
        return self.to_device(batch) if self.to_device is not None else batch


def _thread_copy(dataset):
    """A view of `dataset` for one thread: shares the index and sources, owns its augmentation's random state."""
    if getattr(dataset, "augment", None) is None:
        return dataset
    view = copy.copy(dataset)
    view.augment = copy.deepcopy(dataset.augment)
    return view


class DeviceLoader:
    """Wraps a loader of uint8 batches (DataLoader or ThreadLoader): moves them to `device`, normalises them there.

    Yields dicts with `bg`, `bg_fg` float (B,3,H,W) normalised; `mask` float (B,1,H,W) in {0,1};
    `depth` float (B,1,H,W) in [0,1]; `name` list. A sample that fails to load raises DataError naming
    its file, unless `skip_bad_samples`, in which case it is left out and listed in `self.skipped`.
    """

    data_mode = "cpu"  # decoding and augmentation run in the loader's workers (lib/fastpath.py has "gpu")

    def __init__(
        self,
        loader,
        device: torch.device | str,
        skip_bad_samples: bool = False,
        *,
        dataset: ModestDataset | None = None,
        prepared_in_loader: bool = False,
    ):
        self.loader = loader
        self.device = torch.device(device)
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[tuple[str, str]] = []
        self._dataset = dataset
        self.prepared_in_loader = prepared_in_loader  # the loader's threads already ran `to_device`
        self.ahead = 0  # batches prepared ahead by a background thread: the fast path's (lib/fastpath.py)

    @property
    def dataset(self) -> ModestDataset:
        """The underlying dataset."""
        return self._dataset if self._dataset is not None else self.loader.dataset

    @property
    def sampler(self):
        """The underlying sampler (DistributedSampler.set_epoch goes here)."""
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        self.skipped = []
        batches = self._batches()
        try:
            for batch in batches:
                if batch["errors"]:
                    if not self.skip_bad_samples:
                        raise DataError(batch["errors"][0][1] + " (use --skip-bad-samples to leave bad samples out)")
                    self.skipped.extend(batch["errors"])
                if batch["name"]:
                    yield {k: v for k, v in batch.items() if k != "errors"}
        finally:  # on an error or an early stop too: a background thread, if any, is stopped and joined here
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def _batches(self) -> Iterator[dict]:
        """The loader's batches after `to_device` (run here, or already in the loader's threads)."""
        for batch in self.loader:
            yield batch if self.prepared_in_loader else self.to_device(batch)

    def to_device(self, batch: dict) -> dict:
        """uint8 CPU batch -> float batch on the device (non-blocking copies from pinned memory); errors ride along."""
        out = {"errors": batch["errors"], "name": batch["name"]}
        if not batch["name"]:
            return out
        for key in ("bg", "bg_fg", "depth"):
            out[key] = normalize(batch[key].to(self.device, non_blocking=True), key)  # (B, C, H, W) float32
        out["mask"] = batch["mask"].to(self.device, non_blocking=True).float()
        return out


def default_device() -> torch.device:
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def usable_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_workers() -> int:
    """One worker per CPU core the process may use, at most 8."""
    return max(1, min(8, usable_cores()))


def check_loader_args(batch_size: int, loader: str, data_mode: str, workers: int) -> None:
    """UserError for a bad batch size, loader kind, data mode or worker count."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    if loader not in LOADERS:
        raise UserError(f"loader must be one of {', '.join(LOADERS)}, not {loader!r}")
    if data_mode not in DATA_MODES:
        raise UserError(f"data_mode must be one of {', '.join(DATA_MODES)}, not {data_mode!r}")
    if workers < 0:
        raise UserError(f"num_workers must be 0 or more, not {workers}")


def make_batches(
    source: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    sampler,
    drop_last: bool,
    workers: int,
    loader: str,
    collate_fn: Callable[[list[dict]], dict],
    pin_memory: bool,
) -> ThreadLoader | DataLoader:
    """The loader of uint8 batches: a ThreadLoader ("threads" with workers) or a DataLoader (else)."""
    shuffle = shuffle and sampler is None  # an explicit sampler decides the order
    kind = DEFAULT_LOADER if loader == "auto" else loader
    common = dict(batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last)
    common.update(num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory)
    if kind == "threads" and workers > 0:
        return ThreadLoader(source, **common)
    return DataLoader(
        source,
        **common,
        persistent_workers=False,  # fresh workers per epoch, seeded from the torch RNG: a resumed run repeats exactly
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_seed_worker,
    )


def make_loader(
    dataset: ModestDataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    skip_bad_samples: bool = False,
    sampler=None,
    drop_last: bool = False,
    loader: str = "auto",
    data_mode: str = "auto",
    decode: str = "auto",
    ahead: int | None = None,
) -> DeviceLoader:
    """A DeviceLoader over `dataset` (shuffled or not, or with an explicit sampler).

    loader: "threads" (a pool of threads in this process), "processes" (DataLoader workers), "auto" (DEFAULT_LOADER);
    with num_workers=0 samples load in the calling thread either way.
    data_mode: "cpu" (decode and augment in the workers), "gpu" (lib/fastpath.py: backgrounds on the device, flip,
    re-shoot and jitter batched there), "auto" (gpu on CUDA when lib/fastpath.py is present, else cpu). A re-shoot
    seeded per sample (`ModestDataset(reshoot_seed=...)`, evaluation) always runs in cpu mode, the same everywhere.
    decode, ahead: the fast path's (see lib.fastpath.make_fast_loader); ahead=None is 2 on CUDA, else 0.
    """
    device = torch.device(device) if device is not None else default_device()
    workers = default_workers() if num_workers is None else num_workers
    check_loader_args(batch_size, loader, data_mode, workers)
    if ahead is not None and ahead < 0:
        raise UserError(f"ahead must be 0 or more batches, not {ahead}")
    wanted = data_mode == "gpu" or bool(ahead) or decode not in ("auto", "cpu")
    batching = dict(
        batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last, workers=workers, loader=loader
    )
    per_sample = isinstance(dataset.augment, Augment) and dataset.augment.sample_seed is not None
    if per_sample and data_mode == "gpu":
        raise UserError("a re-shoot seeded per sample (evaluation) runs in cpu mode; leave data_mode='gpu' out")
    if (wanted or device.type == "cuda") and not per_sample:
        try:
            from . import fastpath
        except ImportError:  # the fast path was deleted: the plain path serves, unless it was asked for by name
            if wanted:
                raise UserError("data_mode='gpu', decode and ahead need lib/fastpath.py, which is absent") from None
        else:
            return fastpath.make_fast_loader(
                dataset,
                device=device,
                skip_bad_samples=skip_bad_samples,
                data_mode=data_mode,
                decode=decode,
                ahead=ahead,
                **batching,
            )
    dataset.catch_errors = True
    inner = make_batches(dataset, collate_fn=collate_samples, pin_memory=device.type == "cuda", **batching)
    # on the CPU the float conversion is work: spread it over the loader's threads
    in_threads = isinstance(inner, ThreadLoader) and device.type == "cpu"
    device_loader = DeviceLoader(
        inner, device, skip_bad_samples=skip_bad_samples, dataset=dataset, prepared_in_loader=in_threads
    )
    if in_threads:
        inner.to_device = device_loader.to_device
    return device_loader


def make_loaders(
    root: str | os.PathLike,
    *,
    batch_size: int,
    image_size: int | None = None,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    augment: bool = True,
    reshoot: bool = False,
    split_by: str = "sample",
    seed: int = 1,
    val_fraction: float = 0.3,
    skip_bad_samples: bool = False,
    loader: str = "auto",
    data_mode: str = "auto",
    decode: str = "auto",
    ahead: int | None = None,
) -> tuple[DeviceLoader, DeviceLoader]:
    """(train_loader, val_loader) over a MODEST folder or zip; batches arrive on `device`, normalised (see `make_loader`).

    reshoot: re-shoot bg in training (the "train" level of lib.augment), as a phone on a tripod would.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    dataset = ModestDataset(root, "all", image_size, False, val_fraction, split_by, seed)
    train_set, val_set = dataset.subset("train", augment, "train" if reshoot else None), dataset.subset("val")
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        skip_bad_samples=skip_bad_samples,
        loader=loader,
        data_mode=data_mode,
        decode=decode,
        ahead=ahead,
    )
    return make_loader(train_set, shuffle=True, drop_last=len(train_set) > batch_size, **common), make_loader(
        val_set, shuffle=False, **common
    )
