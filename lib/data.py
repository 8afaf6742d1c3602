"""MODEST-format data: read a folder or its zip, split it, and load batches onto the training device.

Layout under the dataset root (or under one top folder of either):
    bg/bg001.jpeg  bg_fg/bg001_fg001_01.jpeg  bg_fg_mask/bg001_fg001_01_mask.jpeg
    bg_fg_depth_map/bg001_fg001_01_depth_map.jpeg  file_map.txt  (bbox.txt, fg/, fg_mask/ unused here)
`file_map.txt`: one sample per line, four names without extension (bg, bg_fg, mask, depth).
Samples come out as uint8 CHW tensors; float conversion and normalisation happen per batch on the device.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import apply_augment, make_train_augment
from .errors import DataError, UserError
from .zipindex import ZipIndex, find_sorted

try:  # libjpeg-turbo with the GIL released: the fastest JPEG decoder on CPU
    import simplejpeg
except ImportError:  # pragma: no cover - requirements.txt installs it
    simplejpeg = None

# Published MODEST statistics (RGB, on [0,1] images); used for every dataset so checkpoints travel.
BG_MEAN, BG_STD = (0.40086, 0.46599, 0.53281), (0.25451, 0.24249, 0.23615)
BG_FG_MEAN, BG_FG_STD = (0.41221, 0.47368, 0.53431), (0.25699, 0.24577, 0.24217)
FOLDERS = {"bg": "bg/", "bg_fg": "bg_fg/", "mask": "bg_fg_mask/", "depth": "bg_fg_depth_map/"}
EXTENSIONS = (".jpeg", ".jpg", ".png")
FILE_MAP = "file_map.txt"


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
        return find_sorted(self.names, names)

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
        buf = np.frombuffer(data, np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError("not an image")
        return img if gray else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    except (ValueError, RuntimeError, cv2.error) as exc:
        raise DataError(f"{where}: not a readable image ({str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None


def resize(img: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize to size x size: nearest for masks; area when shrinking, bilinear when enlarging otherwise."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    if nearest:
        mode = cv2.INTER_NEAREST
    else:
        mode = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=mode)


# ----------------------------------------------------------------------------------------------------------
# The dataset


class ModestDataset(Dataset):
    """MODEST-format samples as dicts of uint8 CHW tensors: bg (3), bg_fg (3), mask (1, 0/1), depth (1, 0..255), name."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "all",
        image_size: int | None = None,
        augment: bool = False,
        val_fraction: float = 0.3,
        split_by: str = "sample",
        seed: int = 1,
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
        names, lines = self._read_file_map()
        members = {kind: self._resolve(kind, names[:, col], lines) for col, kind in enumerate(FOLDERS)}
        bg_members, self.bg_ids = np.unique(members["bg"], return_inverse=True)
        self.bg_members = bg_members  # (n_bg,) member index of each background
        self.sample_members = np.stack([members["bg_fg"], members["mask"], members["depth"]], 1)  # (N, 3)
        self.sample_names = names[:, 1]
        self.val_fraction, self.split_by, self.seed = val_fraction, split_by, seed
        self.rows = make_split(self.bg_ids, split, val_fraction, split_by, seed)
        self.augment = make_train_augment() if augment else None
        self.catch_errors = False  # set by the loaders: errors travel back as records, raised in the main process
        self._bg_cache: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
        self._bg_cache_pid = os.getpid()

    def subset(self, split: str, augment: bool = False) -> "ModestDataset":
        """The same dataset seen through another split; shares the index (nothing is read again)."""
        if split not in ("all", "train", "val"):
            raise UserError(f"split must be all, train or val, not {split!r}")
        view = copy.copy(self)
        view.split = split
        view.rows = make_split(self.bg_ids, split, self.val_fraction, self.split_by, self.seed)
        view.augment = make_train_augment() if augment else None
        view._bg_cache = {}
        return view

    def __len__(self) -> int:
        return len(self.rows)

    def _read_file_map(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) bytes names and their 1-based line numbers; DataError naming the line when malformed."""
        i = self.source.find(np.array([(self.prefix + FILE_MAP).encode()]))[0]
        where = self.source.where(i)
        try:
            text = self.source.read(i).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not a text file ({exc.reason})") from None
        rows, lines = [], []
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4:
                raise DataError(f"{where} line {number}: expected 4 names (bg, bg_fg, mask, depth), found {len(fields)}")
            rows.append(fields)
            lines.append(number)
        if not rows:
            raise DataError(f"{where}: no samples listed")
        width = max(len(f) for row in rows for f in row)
        return np.array(rows, dtype=f"S{width}"), np.array(lines, dtype=np.int64)

    def _resolve(self, kind: str, names: np.ndarray, lines: np.ndarray) -> np.ndarray:
        """Member indices of `names` in FOLDERS[kind] with any image extension; DataError on the first missing."""
        found = np.full(len(names), -1, dtype=np.int64)
        base = np.char.add((self.prefix + FOLDERS[kind]).encode(), names)
        for ext in EXTENSIONS:
            todo = found < 0
            if not todo.any():
                break
            found[todo] = self.source.find(np.char.add(base[todo], ext.encode()))
        missing = np.flatnonzero(found < 0)
        if len(missing):
            first = missing[0]
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            file_map = self.source.where(self.source.find(np.array([(self.prefix + FILE_MAP).encode()]))[0])
            raise DataError(
                f"{file_map} line {lines[first]}: {kind} file {FOLDERS[kind]}{names[first].decode()}.jpeg not found{more}"
            )
        return found

    def _background(self, bg_id: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Decoded (and resized) background, decoded once per process; also its original (H, W)."""
        if self._bg_cache_pid != os.getpid():
            self._bg_cache, self._bg_cache_pid = {}, os.getpid()
        hit = self._bg_cache.get(bg_id)
        if hit is None:
            member = int(self.bg_members[bg_id])
            img = decode_image(self.source.read(member), gray=False, where=self.source.where(member))
            shape = img.shape[:2]
            if self.image_size:
                img = resize(img, self.image_size)
            hit = self._bg_cache[bg_id] = (img, shape)
        return hit

    def load(self, index: int) -> dict:
        """Sample `index` of this split; DataError naming the file when an image is unreadable or mis-sized."""
        row = int(self.rows[index])
        bg, bg_shape = self._background(int(self.bg_ids[row]))
        arrays = []
        for col, gray in ((0, False), (1, True), (2, True)):
            member = int(self.sample_members[row, col])
            img = decode_image(self.source.read(member), gray=gray, where=self.source.where(member))
            if img.shape[:2] != bg_shape:
                raise DataError(
                    f"{self.source.where(member)}: size {img.shape[1]}x{img.shape[0]} does not match its background's "
                    f"{bg_shape[1]}x{bg_shape[0]} ({self.source.where(int(self.bg_members[self.bg_ids[row]]))})"
                )
            arrays.append(resize(img, self.image_size, nearest=gray and col == 1) if self.image_size else img)
        bg_fg, mask, depth = arrays
        mask = (mask > 127).astype(np.uint8)
        if self.augment is not None:
            bg, bg_fg, mask, depth = apply_augment(self.augment, bg, bg_fg, mask, depth)
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
    """HxW or HxWxC uint8 -> contiguous CxHxW tensor."""
    if img.ndim == 2:
        img = img[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


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
        batch[key] = torch.stack([s[key] for s in good]) if good else None  # (B, C, H, W) uint8
    return batch


def _seed_worker(worker_id: int) -> None:
    """Give each worker its own augmentation stream (forked workers would otherwise repeat one another)."""
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    if dataset is not None and getattr(dataset, "augment", None) is not None:
        dataset.augment.set_random_seed(torch.initial_seed() % 2**32)


class DeviceLoader:
    """Wraps a DataLoader of uint8 batches: moves them to `device`, converts and normalises there.

    Yields dicts with `bg`, `bg_fg` float (B,3,H,W) normalised; `mask` float (B,1,H,W) in {0,1};
    `depth` float (B,1,H,W) in [0,1]; `name` list. A sample that fails to load raises DataError naming
    its file, unless `skip_bad_samples`, in which case it is left out and listed in `self.skipped`.
    """

    def __init__(self, loader: DataLoader, device: torch.device | str, skip_bad_samples: bool = False):
        self.loader = loader
        self.device = torch.device(device)
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[tuple[str, str]] = []
        self._mean = {
            key: torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255 for key, mean in (("bg", BG_MEAN), ("bg_fg", BG_FG_MEAN))
        }
        self._std = {key: torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255 for key, std in (("bg", BG_STD), ("bg_fg", BG_FG_STD))}

    @property
    def dataset(self) -> ModestDataset:
        """The underlying dataset."""
        return self.loader.dataset

    @property
    def sampler(self):
        """The underlying sampler (DistributedSampler.set_epoch goes here)."""
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        self.skipped = []
        for batch in self.loader:
            if batch["errors"]:
                if not self.skip_bad_samples:
                    raise DataError(batch["errors"][0][1] + " (use --skip-bad-samples to leave bad samples out)")
                self.skipped.extend(batch["errors"])
            if batch["bg"] is None:
                continue
            yield self.to_device(batch)

    def to_device(self, batch: dict) -> dict:
        """uint8 CPU batch -> float batch on the device (non-blocking copies from pinned memory)."""
        out = {"name": batch["name"]}
        for key in ("bg", "bg_fg"):
            x = batch[key].to(self.device, non_blocking=True).float()  # (B, 3, H, W)
            out[key] = (x - self._mean[key]) / self._std[key]
        out["mask"] = batch["mask"].to(self.device, non_blocking=True).float()
        out["depth"] = batch["depth"].to(self.device, non_blocking=True).float() / 255.0
        return out


def default_device() -> torch.device:
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_workers() -> int:
    """One worker per CPU core the process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


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
) -> DeviceLoader:
    """A DeviceLoader over `dataset` (shuffled or not, or with an explicit sampler)."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    device = torch.device(device) if device is not None else default_device()
    workers = default_workers() if num_workers is None else num_workers
    if workers < 0:
        raise UserError(f"num_workers must be 0 or more, not {workers}")
    dataset.catch_errors = True
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_samples,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=False,  # fresh workers per epoch, seeded from the torch RNG: a resumed run repeats exactly
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_seed_worker,
    )
    return DeviceLoader(loader, device, skip_bad_samples=skip_bad_samples)


def make_loaders(
    root: str | os.PathLike,
    *,
    batch_size: int,
    image_size: int | None = None,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    augment: bool = True,
    split_by: str = "sample",
    seed: int = 1,
    val_fraction: float = 0.3,
    skip_bad_samples: bool = False,
) -> tuple[DeviceLoader, DeviceLoader]:
    """(train_loader, val_loader) over a MODEST folder or zip; batches arrive on `device`, normalised."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    dataset = ModestDataset(root, "all", image_size, False, val_fraction, split_by, seed)
    train_set, val_set = dataset.subset("train", augment), dataset.subset("val")
    common = dict(batch_size=batch_size, num_workers=num_workers, device=device, skip_bad_samples=skip_bad_samples)
    return make_loader(train_set, shuffle=True, drop_last=len(train_set) > batch_size, **common), make_loader(
        val_set, shuffle=False, **common
    )
