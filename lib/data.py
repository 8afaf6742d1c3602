"""MODEST-format data: read a folder or its zip, split it, and load batches onto the training device.

Layout under the dataset root (or under one top folder of either):
    bg/bg001.jpeg  bg_fg/bg001_fg001_01.jpeg  bg_fg_mask/bg001_fg001_01_mask.jpeg
    bg_fg_depth_map/bg001_fg001_01_depth_map.jpeg  file_map.txt  (bbox.txt, fg/, fg_mask/ unused here)
`file_map.txt`: one sample per line, four names without extension (bg, bg_fg, mask, depth).
Samples come out as uint8 CHW tensors; float conversion and normalisation happen per batch on the device.

Two ways to fill batches (`make_loader(loader=...)`): a pool of threads in this process (the default:
the JPEG decoder, zip reads and OpenCV release the GIL, so on a 2-core Colab threads beat worker processes,
see `python -m lib.bench`), or torch DataLoader worker processes.
Two places to do the per-sample work (`make_loader(data_mode=...)`): "cpu" decodes and augments
(albumentations) in the workers; "gpu" (the default on CUDA) has the workers send only the three
per-sample images (or their JPEG bytes, decoded in one batched call by the GPU's JPEG decoder on
A100/H100-class cards) and a background index, while the backgrounds stay decoded on the device and the
flip and the photometric jitter run as batched tensor operations there.
On CUDA a background thread makes the next batches ready on the device, on its own stream
(`make_loader(ahead=...)`), so the training thread only queues the model's work.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .augment import Augment, apply_augment, flip_batch, jitter_batch, make_augment, reshoot_batch
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
DECODES = ("auto", "cpu", "device")
# Measured with `python -m lib.bench` on a 2-core machine, 224 px, augmentation on: threads deliver more
# samples/s than worker processes (and hold one copy of the dataset); see the bench's loader table.
DEFAULT_LOADER = "threads"

# Published MODEST statistics (RGB, on [0,1] images); used for every dataset so checkpoints travel.
BG_MEAN, BG_STD = (0.40086, 0.46599, 0.53281), (0.25451, 0.24249, 0.23615)
BG_FG_MEAN, BG_FG_STD = (0.41221, 0.47368, 0.53431), (0.25699, 0.24577, 0.24217)
STATS = {"bg": (BG_MEAN, BG_STD), "bg_fg": (BG_FG_MEAN, BG_FG_STD)}


def normalize(x: torch.Tensor, key: str) -> torch.Tensor:
    """uint8 (B,3,H,W) 0..255 -> float32 normalised with `key`'s statistics ("bg" or "bg_fg"), on x's device."""
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in STATS[key])
    return (x.float() / 255.0 - mean) / std


def denormalize(x: torch.Tensor, key: str) -> torch.Tensor:
    """The inverse of `normalize`, to float [0, 1] images (B,3,H,W)."""
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in STATS[key])
    return x * std + mean


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


def resize(img: np.ndarray, size: int, mask: bool = False) -> np.ndarray:
    """Resize to size x size: area when shrinking; when enlarging, bilinear, or nearest for a `mask`.

    A shrunk mask (0/255) is the share of each new pixel the figure covers, so the loader's "> 127" makes a
    pixel foreground when the figure covers most of it: the same footprint the area-shrunk photos show.
    (Nearest sampling would keep whichever source pixel sits at the sample point: a label up to a pixel off.)
    """
    if img.shape[0] == size and img.shape[1] == size:
        return img
    if cv2 is None:
        out = _resize_tensor(_chw(img).unsqueeze(0), size, mask)[0].permute(1, 2, 0).numpy()  # (size, size, C)
        return out[:, :, 0] if img.ndim == 2 else out
    if img.shape[0] > size:
        mode = cv2.INTER_AREA
    else:
        mode = cv2.INTER_NEAREST if mask else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=mode)


def _resize_tensor(x: torch.Tensor, size: int, mask: bool = False) -> torch.Tensor:
    """Resize uint8 (B, C, H, W) to size x size on its device, as `resize` does (area when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    if mask and x.shape[-2] < size:
        return F.interpolate(x, size=(size, size), mode="nearest")
    mode = "area" if x.shape[-2] > size else "bilinear"
    y = F.interpolate(x.float(), size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return y.round_().clamp_(0, 255).to(torch.uint8)  # (B, C, size, size)


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
        self.bg_shapes: np.ndarray | None = None  # (n_bg, 2) original sizes, set by `load_backgrounds` (GPU mode)
        self.bg_errors: dict[int, str] = {}  # backgrounds that could not be read, by id (GPU mode)

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

    # ------------------------------------------------------------------ GPU mode: backgrounds by index

    def load_backgrounds(self) -> torch.Tensor | None:
        """Every background decoded (and resized) once: (n_bg, 3, H, W) uint8, or None when their sizes differ.

        Also sets `bg_shapes` (original sizes, for the size check) and `bg_errors` (unreadable ones; their
        samples then fail, as they do in CPU mode). A background that cannot be read stays black in the table.
        """
        n_bg = len(self.bg_members)
        shapes = np.zeros((n_bg, 2), np.int64)
        images: list[np.ndarray | None] = []
        errors: dict[int, str] = {}
        for bg_id in range(n_bg):
            try:
                img, shapes[bg_id] = self._decode_background(bg_id)
            except DataError as exc:
                errors[bg_id] = str(exc)
                img = None
            images.append(img)
        self.bg_shapes, self.bg_errors = shapes, errors
        sizes = {img.shape for img in images if img is not None}
        if len(sizes) > 1:
            return None
        shape = sizes.pop() if sizes else (self.image_size or 1, self.image_size or 1, 3)
        table = torch.zeros((n_bg, 3, shape[0], shape[1]), dtype=torch.uint8)  # (n_bg, 3, H, W)
        for bg_id, img in enumerate(images):
            if img is not None:
                table[bg_id] = _chw(img)
        return table

    def load_for_device(self, index: int, encoded: bool = False) -> dict:
        """Sample `index` for GPU mode: `bg_id`, `row` and bg_fg/mask/depth uint8 CHW (no augmentation), or with
        `encoded` their file bytes as `files` (decoded later, in one batched call on the GPU)."""
        row = int(self.rows[index])
        bg_id = int(self.bg_ids[row])
        if self.bg_shapes is None:
            self.load_backgrounds()
        if bg_id in self.bg_errors:
            raise DataError(self.bg_errors[bg_id])
        sample = {"bg_id": bg_id, "row": row, "name": self.sample_names[row].decode()}
        if encoded:
            sample["files"] = [self.source.read(int(member)) for member in self.sample_members[row]]
            return sample
        bg_fg, mask, depth = self._load_others(row, tuple(self.bg_shapes[bg_id]))
        sample.update(bg_fg=_chw(bg_fg), mask=_chw(mask), depth=_chw(depth))
        return sample

    def members_are_jpeg(self) -> bool:
        """True when every bg_fg, mask and depth file of this split is named .jpg/.jpeg (the GPU decoder's format)."""
        names = np.unique(self.sample_members[self.rows].ravel())
        lower = np.char.lower(self.source.names[names])
        return bool(np.all(np.char.endswith(lower, b".jpeg") | np.char.endswith(lower, b".jpg")))


class DeviceSamples(Dataset):
    """A ModestDataset as GPU mode reads it (`load_for_device`); failures become error records like ModestDataset's."""

    def __init__(self, dataset: ModestDataset, encoded: bool = False):
        self.dataset, self.encoded = dataset, encoded

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset.load_for_device(index, self.encoded)
        except DataError as exc:
            return {"error": str(exc), "name": self.dataset.sample_names[int(self.dataset.rows[index])].decode()}


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


def collate_device_samples(samples: list[dict]) -> dict:
    """GPU-mode batch: `bg_id` and `row` (B,) int64, then bg_fg/mask/depth stacked uint8 or, for encoded samples,
    `files` (all their bytes in one uint8 tensor) and `file_sizes` (B, 3); failures travel in batch['errors']."""
    good = [s for s in samples if "error" not in s]
    batch: dict = {"errors": [(s["name"], s["error"]) for s in samples if "error" in s]}
    batch["name"] = [s["name"] for s in good]
    batch["bg_id"] = torch.tensor([s["bg_id"] for s in good], dtype=torch.int64)  # (B,)
    batch["row"] = torch.tensor([s["row"] for s in good], dtype=torch.int64)  # (B,)
    if good and "files" in good[0]:
        files = [f for s in good for f in s["files"]]
        batch["file_sizes"] = torch.tensor([len(f) for f in files], dtype=torch.int64).view(len(good), 3)  # (B, 3)
        buf = bytearray().join(files)  # one copy; no per-file tensors to pickle or pin
        batch["files"] = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)
        return batch
    for key in ("bg_fg", "mask", "depth"):
        batch[key] = torch.stack([s[key] for s in good]) if good else None  # (B, C, H, W) uint8
    return batch


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
        finish: Callable[[dict], dict] | None = None,
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
        self.finish = finish  # applied to each batch in its thread (the CPU device's float conversion goes here)

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
        return self.finish(batch) if self.finish is not None else batch


def _thread_copy(dataset):
    """A view of `dataset` for one thread: shares the index and sources, owns its augmentation's random state."""
    if getattr(dataset, "augment", None) is None:
        return dataset
    view = copy.copy(dataset)
    view.augment = copy.deepcopy(dataset.augment)
    return view


class DeviceLoader:
    """Wraps a loader of uint8 batches (DataLoader or ThreadLoader): moves them to `device`, converts and normalises there.

    Yields dicts with `bg`, `bg_fg` float (B,3,H,W) normalised; `mask` float (B,1,H,W) in {0,1};
    `depth` float (B,1,H,W) in [0,1]; `name` list. A sample that fails to load raises DataError naming
    its file, unless `skip_bad_samples`, in which case it is left out and listed in `self.skipped`.

    GPU mode (`backgrounds`, a (n_bg, 3, H, W) uint8 table, given): batches carry `bg_id` instead of bg
    pixels and the backgrounds are gathered on the device; bg_fg/mask/depth arrive decoded, or as JPEG bytes
    that `decode_on_device` decodes in one batched call (falling back to the CPU decoder for a batch the
    device decoder rejects, so bad files are still named). With `augment`, the flip (the same for all four
    images of a sample) and the photometric jitter (one draw per sample, shared by bg and bg_fg) run here
    as batched tensor operations, drawn from a generator on the device seeded from torch's RNG per epoch;
    with `reshoot` (a level of lib.augment), bg is re-shot between the two (`reshoot_batch`).
    """

    def __init__(
        self,
        loader,
        device: torch.device | str,
        skip_bad_samples: bool = False,
        *,
        dataset: ModestDataset | None = None,
        backgrounds: torch.Tensor | None = None,
        augment: bool = False,
        decode_on_device: bool = False,
        ahead: int = 0,
        reshoot: str | None = None,
    ):
        if ahead < 0:
            raise UserError(f"ahead must be 0 or more batches, not {ahead}")
        self.loader = loader
        self.ahead = ahead  # batches a background thread prepares on the device while the model trains (0: inline)
        self.device = torch.device(device)
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[tuple[str, str]] = []
        self._dataset = dataset
        self.backgrounds = backgrounds.to(self.device) if backgrounds is not None else None  # (n_bg, 3, H, W) uint8
        self.augment = augment and backgrounds is not None
        self.reshoot = reshoot if backgrounds is not None else None
        self.decode_on_device = decode_on_device
        self.decode_fallbacks = 0  # batches the device decoder rejected (decoded on the CPU instead)
        self._decode_stream = None
        self.generator: torch.Generator | None = None
        self._mean = {key: torch.tensor(m, device=self.device).view(1, 3, 1, 1) * 255 for key, (m, _) in STATS.items()}
        self._std = {key: torch.tensor(sd, device=self.device).view(1, 3, 1, 1) * 255 for key, (_, sd) in STATS.items()}
        self._luts = None
        if (
            self.device.type == "cpu" and cv2 is not None
        ):  # uint8 -> float as one table look-up per pixel (same numbers)
            levels = torch.arange(256, dtype=torch.float32).view(1, 1, 256, 1)  # (1, 1, 256, 1)
            tables = {key: ((levels - self._mean[key]) / self._std[key])[0] for key in ("bg", "bg_fg")}  # (3, 256, 1)
            tables["depth"] = (levels / 255.0)[0]  # (1, 256, 1)
            self._luts = {key: t.permute(1, 2, 0).contiguous().numpy() for key, t in tables.items()}  # (256, 1, C)

    @property
    def dataset(self) -> ModestDataset:
        """The underlying dataset."""
        return self._dataset if self._dataset is not None else self.loader.dataset

    @property
    def sampler(self):
        """The underlying sampler (DistributedSampler.set_epoch goes here)."""
        return self.loader.sampler

    @property
    def data_mode(self) -> str:
        """'gpu' when backgrounds live on the device and augmentation runs there, else 'cpu'."""
        return "gpu" if self.backgrounds is not None else "cpu"

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        self.skipped = []
        if self.augment or self.reshoot:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        batches = self._prepare_ahead() if self.ahead else (self.prepare(batch) for batch in self.loader)
        try:
            for batch in batches:
                if batch["errors"]:
                    if not self.skip_bad_samples:
                        raise DataError(batch["errors"][0][1] + " (use --skip-bad-samples to leave bad samples out)")
                    self.skipped.extend(batch["errors"])
                if batch["name"]:
                    yield batch["ready"]
        finally:  # on an error or an early stop too: the background thread, if any, is stopped and joined here
            batches.close()

    def prepare(self, batch: dict) -> dict:
        """A loader batch made ready for the step: decoded (GPU mode's JPEG bytes), on the device, augmented and
        normalised under batch['ready'] (unless a loader thread did that already); errors stay for `__iter__`."""
        if "files" in batch:
            batch = self.decode_batch(batch)
        return self.finish_batch(batch) if "ready" not in batch else batch

    def _prepare_ahead(self) -> Iterator[dict]:
        """`prepare`d batches from a background thread, up to `self.ahead` ahead, in the loader's order.

        On CUDA the thread works on its own stream and each batch carries an event that the consumer's stream
        waits for, so the main thread only queues the model's kernels: it never blocks in the decoder (nvJPEG
        synchronises its stream per call) and the batch's transfers, decoding, jitter and normalisation
        overlap the previous step. The order of the work, and so every random draw, is the inline path's.
        """
        ready: queue.Queue = queue.Queue(self.ahead)
        stop = threading.Event()
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def hand_over(item: tuple) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            batches = iter(self.loader)
            try:
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    for batch in batches:
                        batch = self.prepare(batch)
                        event = side.record_event() if side is not None else None
                        if not hand_over(("batch", batch, event)):
                            return
                hand_over(("end", None, None))
            except BaseException as exc:  # raised again in the consumer
                hand_over(("error", exc, None))
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()

        thread = threading.Thread(target=work, name="modest-device-batches", daemon=True)
        thread.start()
        try:
            while True:
                kind, item, event = ready.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                if event is not None:
                    main = torch.cuda.current_stream(self.device)
                    main.wait_event(event)
                    for t in item.get("ready", {}).values():
                        if isinstance(t, torch.Tensor):
                            t.record_stream(main)  # made on the side stream, used on this one
                yield item
        finally:  # also when the consumer stops early: let the thread leave, then wait for it
            stop.set()
            while thread.is_alive():
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()

    def finish_batch(self, batch: dict) -> dict:
        """The batch with `to_device`'s result under batch['ready'] (run by `prepare`, or ahead in a CPU loader
        thread); errors stay for `__iter__` to handle."""
        if batch["name"]:
            batch = {"errors": batch["errors"], "name": batch["name"], "ready": self.to_device(batch)}
        return batch

    def to_device(self, batch: dict) -> dict:
        """uint8 CPU batch -> float batch on the device (non-blocking copies from pinned memory)."""
        out = {"name": batch["name"]}
        if "bg_id" in batch:
            return self._gpu_mode_to_device(batch, out)
        if self._luts is not None:  # on the CPU: one cv2.LUT pass per image plane instead of three torch passes
            for key in ("bg", "bg_fg", "depth"):
                out[key] = _look_up(batch[key], self._luts[key])
            out["mask"] = batch["mask"].float()
            return out
        for key in ("bg", "bg_fg"):
            x = batch[key].to(self.device, non_blocking=True).float()  # (B, 3, H, W)
            out[key] = x.sub_(self._mean[key]).div_(self._std[key])  # in place: the same numbers as (x - mean) / std
        out["mask"] = batch["mask"].to(self.device, non_blocking=True).float()
        out["depth"] = batch["depth"].to(self.device, non_blocking=True).float() / 255.0
        return out

    def _gpu_mode_to_device(self, batch: dict, out: dict) -> dict:
        ids = batch["bg_id"].to(self.device, non_blocking=True)
        bg = self.backgrounds.index_select(0, ids)  # (B, 3, H, W) uint8
        bg_fg, mask, depth = (batch[key].to(self.device, non_blocking=True) for key in ("bg_fg", "mask", "depth"))
        if self.augment or self.reshoot:
            if self.augment:
                bg, bg_fg, mask, depth = flip_batch([bg, bg_fg, mask, depth], 0.5, self.generator)
            pair = bg.float().div_(255.0), bg_fg.float().div_(255.0)
            if self.reshoot:  # after the flip, before the shared jitter: the CPU path's order up to the flip
                pair = reshoot_batch(*pair, mask, self.reshoot, generator=self.generator)
            if self.augment:
                pair = jitter_batch(*pair, p=0.5, generator=self.generator)
            for key, x in zip(("bg", "bg_fg"), pair):
                out[key] = (x * 255.0 - self._mean[key]) / self._std[key]  # (B, 3, H, W)
        else:
            for key, x in (("bg", bg), ("bg_fg", bg_fg)):
                out[key] = (x.float() - self._mean[key]) / self._std[key]  # as the CPU mode computes it
        out["mask"] = mask.float()
        out["depth"] = depth.float() / 255.0
        return out

    def decode_batch(self, batch: dict) -> dict:
        """Decode a batch's JPEG bytes (on the device when `decode_on_device`, else or on failure on the CPU), check
        each image against its background's size, resize to the dataset's image_size; bad samples join batch['errors']."""
        dataset = self.dataset
        n = len(batch["name"])
        sizes = batch["file_sizes"].view(-1).tolist()
        chunks = list(torch.split(batch["files"], sizes)) if n else []
        images = self._decode_on_device(chunks, n) if self.decode_on_device and n else None
        rows, bg_ids = batch["row"].tolist(), batch["bg_id"].tolist()
        errors, keep, parts = list(batch["errors"]), [], {"bg_fg": [], "mask": [], "depth": []}
        for i in range(n):
            row, bg_shape = rows[i], tuple(int(v) for v in dataset.bg_shapes[bg_ids[i]])
            try:
                if images is None:  # the CPU decoder names the bad file
                    datas = [chunks[3 * i + col].numpy().tobytes() for col in range(3)]
                    tensors = [_chw(a) for a in dataset._load_others(row, bg_shape, datas)]
                else:
                    tensors = images[i]
                    for col, t in enumerate(tensors):
                        dataset.check_size(row, col, tuple(t.shape[-2:]), bg_shape)
            except DataError as exc:
                errors.append((batch["name"][i], str(exc)))
                continue
            keep.append(i)
            for key, t in zip(parts, tensors):
                parts[key].append(t)
        out = {"errors": errors, "name": [batch["name"][i] for i in keep]}
        out["bg_id"] = batch["bg_id"][keep] if len(keep) < n else batch["bg_id"]
        for key, is_mask in (("bg_fg", False), ("mask", True), ("depth", False)):
            out[key] = self._stack(parts[key], is_mask, dataset.image_size, images is not None) if keep else None
        if keep and images is not None:
            out["mask"] = (out["mask"] > 127).to(torch.uint8)  # the CPU decoder's binarisation, after the resize
        return out

    def _decode_on_device(self, chunks: list[torch.Tensor], n: int) -> list[list[torch.Tensor]] | None:
        """[[bg_fg (3,H,W), mask (1,H,W), depth (1,H,W)] per sample] decoded on the device, or None if the decoder fails.

        On CUDA the decoder runs with a side stream current, so its outputs never come from memory that kernels
        queued on the training stream still read (nvJPEG does not wait for the caller's stream); the training
        stream then waits for the side stream, and the outputs are marked as used there.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        side = None
        if self.device.type == "cuda":
            if self._decode_stream is None:
                self._decode_stream = torch.cuda.Stream(self.device)
            side = self._decode_stream
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                rgb = decode_jpeg(chunks[0::3], mode=ImageReadMode.RGB, device=self.device)
                gray = decode_jpeg(chunks[1::3] + chunks[2::3], mode=ImageReadMode.GRAY, device=self.device)
        except RuntimeError:
            self.decode_fallbacks += 1
            return None
        if side is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(side)
            for t in [*rgb, *gray]:
                t.record_stream(main)
        return [[rgb[i], gray[i], gray[n + i]] for i in range(n)]

    def _stack(self, images: list[torch.Tensor], mask: bool, size: int | None, resize_here: bool) -> torch.Tensor:
        """(B, C, H, W) uint8 on the device from per-sample CHW tensors (resized to `size` when decoded here)."""
        if not resize_here:  # the CPU decoder already resized
            return torch.stack(images).to(self.device, non_blocking=True)
        if size is None or len({tuple(t.shape) for t in images}) == 1:
            x = torch.stack(images)  # (B, C, H, W)
            return _resize_tensor(x, size, mask) if size else x
        return torch.cat([_resize_tensor(t.unsqueeze(0), size, mask) for t in images])


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


_DEVICE_DECODE_OK: dict[str, bool] = {}


def device_decoder_works(device: torch.device) -> bool:
    """True when torchvision's batched JPEG decoder runs on `device` (a CUDA device); probed once per device."""
    key = str(device)
    if key not in _DEVICE_DECODE_OK:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

            probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
            out = decode_jpeg([probe, probe], mode=ImageReadMode.RGB, device=device)
            _DEVICE_DECODE_OK[key] = len(out) == 2 and out[0].shape == (3, 16, 16) and out[0].device.type == "cuda"
        except Exception:  # no torchvision, a build without nvJPEG, a driver problem: decode on the CPU
            _DEVICE_DECODE_OK[key] = False
    return _DEVICE_DECODE_OK[key]


def resolve_data_mode(data_mode: str, device: torch.device) -> str:
    """'cpu' or 'gpu' for `data_mode` on `device` ('auto': gpu on CUDA)."""
    if data_mode not in DATA_MODES:
        raise UserError(f"data_mode must be one of {', '.join(DATA_MODES)}, not {data_mode!r}")
    if data_mode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return data_mode


def resolve_decode(decode: str, device: torch.device, dataset: ModestDataset) -> bool:
    """Whether GPU mode decodes JPEGs on the device ('auto': CUDA cards of compute capability 8.0+, the ones with
    hardware JPEG decoders, when every file is a JPEG and a probe decode works)."""
    if decode not in DECODES:
        raise UserError(f"decode must be one of {', '.join(DECODES)}, not {decode!r}")
    if decode == "cpu":
        return False
    if device.type != "cuda":
        if decode == "device":
            raise UserError(f"decode='device' needs a CUDA device, not {device}")
        return False
    if decode == "device":
        if not device_decoder_works(device):
            raise UserError("decode='device': torchvision's GPU JPEG decoder does not work here; use decode='cpu'")
        return True
    return (
        torch.cuda.get_device_capability(device) >= (8, 0)
        and dataset.members_are_jpeg()
        and device_decoder_works(device)
    )


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
    data_mode: "cpu" (decode and augment in the workers), "gpu" (backgrounds kept decoded on the device and sent
    by index; flip, re-shoot and jitter batched on the device; runs on any device), "auto" (gpu on CUDA, else
    cpu). A re-shoot seeded per sample (`ModestDataset(reshoot_seed=...)`) always runs in cpu mode.
    decode: where GPU mode decodes JPEGs: "device" (batched nvJPEG), "cpu", "auto" (see `resolve_decode`).
    ahead: batches prepared on the device by a background thread while the model trains (None: 2 on CUDA, else 0).
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    if loader not in LOADERS:
        raise UserError(f"loader must be one of {', '.join(LOADERS)}, not {loader!r}")
    device = torch.device(device) if device is not None else default_device()
    workers = default_workers() if num_workers is None else num_workers
    if workers < 0:
        raise UserError(f"num_workers must be 0 or more, not {workers}")
    mode = resolve_data_mode(data_mode, device)
    shared, reshoot = dataset.augment, None
    if isinstance(shared, Augment):
        shared, reshoot = shared.shared, shared.reshoot
        if dataset.augment.sample_seed is not None:
            mode = "cpu"  # a re-shoot seeded per sample (evaluation) is drawn on the CPU, the same on every device
    backgrounds = dataset.load_backgrounds() if mode == "gpu" else None
    if mode == "gpu" and backgrounds is None:
        if data_mode == "gpu":
            raise UserError("data_mode='gpu' needs backgrounds of one size; set image_size")
        mode = "cpu"
    encoded = mode == "gpu" and resolve_decode(decode, device, dataset)
    dataset.catch_errors = True
    source = DeviceSamples(dataset, encoded) if mode == "gpu" else dataset
    collate = collate_device_samples if mode == "gpu" else collate_samples
    pin = device.type == "cuda" and not encoded
    kind = DEFAULT_LOADER if loader == "auto" else loader
    shuffle = shuffle and sampler is None  # an explicit sampler decides the order
    if kind == "threads" and workers > 0:
        inner = ThreadLoader(
            source,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin,
        )
    else:
        inner = DataLoader(
            source,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin,
            drop_last=drop_last,
            persistent_workers=False,  # fresh workers per epoch, seeded from the torch RNG: a resumed run repeats exactly
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=_seed_worker,
        )
    device_loader = DeviceLoader(
        inner,
        device,
        skip_bad_samples=skip_bad_samples,
        dataset=dataset,
        backgrounds=backgrounds,
        augment=mode == "gpu" and shared is not None,
        decode_on_device=encoded,
        ahead=(2 if device.type == "cuda" else 0) if ahead is None else ahead,
        reshoot=reshoot.level if mode == "gpu" and reshoot is not None else None,
    )
    if isinstance(inner, ThreadLoader) and device.type == "cpu" and mode == "cpu":
        inner.finish = device_loader.finish_batch  # on the CPU the float conversion is work: spread it over the threads
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
    train_set = dataset.subset("train", augment, "train" if reshoot else None)
    val_set = dataset.subset("val")
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
