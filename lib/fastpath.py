"""The GPU fast path: backgrounds kept decoded on the device, JPEGs decoded there, batches prepared ahead.

Delete this file and lib/data.py's plain path still loads and trains (make_loader then stays on the CPU path).
What it does, and the numbers that keep it (tools/bench.py on an NVIDIA H200, 224 px, batch 64, augmentation on;
benchmarks/h200-2026-11-25.txt and h200-2026-11-26.txt):
- "gpu" data mode: the workers send only the three per-sample images (or their JPEG bytes) and a background
  index; the backgrounds stay decoded on the device, and the flip and the photometric jitter run there as batched
  tensor operations. Loader alone 5,807-6,607 samples/s against 2,041 (threads) / 2,512 (processes) in CPU mode;
  DepthNet end to end 1,203-1,242 samples/s against 1,053 in CPU mode.
- device decode: nvJPEG decodes a batch's JPEGs in one call (cards of compute capability 8.0+): loader 6,607
  against 5,807 samples/s with CPU decoding.
- batches prepared ahead: a background thread makes the next batches ready on its own CUDA stream, so the
  training thread only queues the model's work: end to end 1,170/1,211 against 1,130 inline, 1,242 against 1,075.
On a CPU none of this pays (the data path is CPU work either way), so make_loader uses it only on CUDA or when
asked for by name (data_mode="gpu", decode, ahead); the tests run it on the CPU, where it gives the same batches.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import Augment, flip_batch, jitter_batch, reshoot_batch
from .data import (
    DeviceLoader,
    ModestDataset,
    ThreadLoader,
    _chw,
    collate_samples,
    make_batches,
    normalize,
    resize_tensor,
)
from .errors import DataError, UserError

DECODES = ("auto", "cpu", "device")


def load_backgrounds(dataset: ModestDataset) -> tuple[torch.Tensor | None, np.ndarray, dict[int, str]]:
    """Every background decoded (and resized) once: a (n_bg, 3, H, W) uint8 table, or None when their sizes differ;
    also their original sizes (n_bg, 2), for the size check, and the unreadable ones by id (their samples then
    fail, as they do in CPU mode; such a background stays black in the table)."""
    n_bg = len(dataset.bg_members)
    shapes = np.zeros((n_bg, 2), np.int64)
    images: list[np.ndarray | None] = []
    errors: dict[int, str] = {}
    for bg_id in range(n_bg):
        try:
            img, shapes[bg_id] = dataset._decode_background(bg_id)
        except DataError as exc:
            errors[bg_id] = str(exc)
            img = None
        images.append(img)
    sizes = {img.shape for img in images if img is not None}
    if len(sizes) > 1:
        return None, shapes, errors
    shape = sizes.pop() if sizes else (dataset.image_size or 1, dataset.image_size or 1, 3)
    table = torch.zeros((n_bg, 3, shape[0], shape[1]), dtype=torch.uint8)  # (n_bg, 3, H, W)
    for bg_id, img in enumerate(images):
        if img is not None:
            table[bg_id] = _chw(img)
    return table, shapes, errors


def members_are_jpeg(dataset: ModestDataset) -> bool:
    """True when every bg_fg, mask and depth file of the split is named .jpg/.jpeg (the GPU decoder's format)."""
    names = np.unique(dataset.sample_members[dataset.rows].ravel())
    lower = np.char.lower(dataset.source.names[names])
    return bool(np.all(np.char.endswith(lower, b".jpeg") | np.char.endswith(lower, b".jpg")))


class DeviceSamples(Dataset):
    """A ModestDataset as GPU mode reads it: `bg_id`, `row` and bg_fg/mask/depth uint8 CHW (no augmentation), or
    with `encoded` their file bytes as `files`; failures become error records, as ModestDataset's do."""

    def __init__(
        self,
        dataset: ModestDataset,
        encoded: bool = False,
        bg_shapes: np.ndarray | None = None,
        bg_errors: dict[int, str] | None = None,
    ):
        if bg_shapes is None:
            _, bg_shapes, bg_errors = load_backgrounds(dataset)
        self.dataset, self.encoded = dataset, encoded
        self.bg_shapes, self.bg_errors = bg_shapes, bg_errors or {}

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> dict:
        """Sample `index` of the split, for GPU mode; DataError naming the file when it cannot be used."""
        d = self.dataset
        row = int(d.rows[index])
        bg_id = int(d.bg_ids[row])
        if bg_id in self.bg_errors:
            raise DataError(self.bg_errors[bg_id])
        sample = {"bg_id": bg_id, "row": row, "name": d.sample_names[row].decode()}
        if self.encoded:
            sample["files"] = [d.source.read(int(member)) for member in d.sample_members[row]]
            return sample
        bg_fg, mask, depth = d._load_others(row, tuple(self.bg_shapes[bg_id]))
        sample.update(bg_fg=_chw(bg_fg), mask=_chw(mask), depth=_chw(depth))
        return sample

    def __getitem__(self, index: int) -> dict:
        try:
            return self.load(index)
        except DataError as exc:
            return {"error": str(exc), "name": self.dataset.sample_names[int(self.dataset.rows[index])].decode()}


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


class FastLoader(DeviceLoader):
    """A DeviceLoader with the fast path's parts (each optional): GPU mode, device decode, batches prepared ahead.

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
        *args,
        backgrounds: torch.Tensor | None = None,
        bg_shapes: np.ndarray | None = None,
        augment: bool = False,
        decode_on_device: bool = False,
        ahead: int = 0,
        reshoot: str | None = None,
        **plain,
    ):
        if ahead < 0:
            raise UserError(f"ahead must be 0 or more batches, not {ahead}")
        super().__init__(*args, **plain)  # loader, device, skip_bad_samples, dataset, prepared_in_loader
        self.ahead = ahead  # batches a background thread prepares on the device while the model trains (0: inline)
        self.backgrounds = backgrounds.to(self.device) if backgrounds is not None else None  # (n_bg, 3, H, W) uint8
        self.bg_shapes = bg_shapes  # (n_bg, 2) original sizes of the backgrounds
        self.augment = augment and backgrounds is not None
        self.reshoot = reshoot if backgrounds is not None else None
        self.decode_on_device = decode_on_device
        self.decode_fallbacks = 0  # batches the device decoder rejected (decoded on the CPU instead)
        self._decode_stream = None
        self.generator: torch.Generator | None = None

    @property
    def data_mode(self) -> str:
        """'gpu' when backgrounds live on the device and augmentation runs there, else 'cpu'."""
        return "gpu" if self.backgrounds is not None else "cpu"

    def __iter__(self) -> Iterator[dict]:
        if self.augment or self.reshoot:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        return super().__iter__()

    def _batches(self) -> Iterator[dict]:
        """The inline batches, or the same made `self.ahead` ahead by a background thread."""
        return self._batches_ahead() if self.ahead else super()._batches()

    def to_device(self, batch: dict) -> dict:
        """A loader batch made ready for the step: GPU mode's JPEG bytes decoded, on the device, augmented and
        normalised; errors ride along."""
        if "files" in batch:
            batch = self.decode_batch(batch)
        if "bg_id" not in batch:
            return super().to_device(batch)
        out = {"errors": batch["errors"], "name": batch["name"]}
        if batch["name"]:
            out.update(self._gpu_mode_to_device(batch))
        return out

    def _batches_ahead(self) -> Iterator[dict]:
        """`to_device`'s batches from a background thread, up to `self.ahead` ahead, in the loader's order.

        On CUDA the thread works on its own stream and each batch carries an event that the consumer's stream
        waits for, so the main thread only queues the model's kernels: it never blocks in the decoder (nvJPEG
        synchronises its stream per call) and the batch's transfers, decoding, jitter and normalisation
        overlap the previous step. The order of the work, and so every random draw, is the inline path's.
        """
        ready: queue.Queue = queue.Queue(self.ahead)
        stop = threading.Event()
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        batches = super()._batches()  # the inline stream: made, batch by batch, in the thread below

        def hand_over(item: tuple) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    for batch in batches:
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
                    for t in item.values():
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

    def _gpu_mode_to_device(self, batch: dict) -> dict:
        """bg gathered from the table, the flip and the jitter batched, all normalised on the device."""
        out = {}
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
            bg, bg_fg = pair  # float in [0, 1]
        out["bg"], out["bg_fg"] = normalize(bg, "bg"), normalize(bg_fg, "bg_fg")  # (B, 3, H, W)
        out["mask"] = mask.float()
        out["depth"] = normalize(depth, "depth")
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
            row, bg_shape = rows[i], tuple(int(v) for v in self.bg_shapes[bg_ids[i]])
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
            return resize_tensor(x, size, mask) if size else x
        return torch.cat([resize_tensor(t.unsqueeze(0), size, mask) for t in images])


_DEVICE_DECODE_OK: dict[str, bool] = {}


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
        and members_are_jpeg(dataset)
        and device_decoder_works(device)
    )


def make_fast_loader(
    dataset: ModestDataset,
    *,
    device: torch.device,
    skip_bad_samples: bool = False,
    data_mode: str = "auto",
    decode: str = "auto",
    ahead: int | None = None,
    **batching,
) -> FastLoader:
    """make_loader's fast path (its arguments, checked there; `batching` goes to make_batches).

    GPU mode when data_mode is "gpu", or "auto" on CUDA; decode: where GPU mode decodes JPEGs, "device" (batched nvJPEG), "cpu", "auto" (see `resolve_decode`);
    ahead: batches prepared on the device by a background thread while the model trains (None: 2 on CUDA, else 0)."""
    if decode not in DECODES:
        raise UserError(f"decode must be one of {', '.join(DECODES)}, not {decode!r}")
    gpu = data_mode == "gpu" or (data_mode == "auto" and device.type == "cuda")
    backgrounds, bg_shapes, bg_errors = load_backgrounds(dataset) if gpu else (None, None, None)
    if gpu and backgrounds is None:
        if data_mode == "gpu":
            raise UserError("data_mode='gpu' needs backgrounds of one size; set image_size")
        gpu = False
    encoded = gpu and resolve_decode(decode, device, dataset)
    shared, reshoot = dataset.augment, None
    if isinstance(shared, Augment):
        shared, reshoot = shared.shared, shared.reshoot
    dataset.catch_errors = True
    source = DeviceSamples(dataset, encoded, bg_shapes, bg_errors) if gpu else dataset
    collate_fn = collate_device_samples if gpu else collate_samples
    inner = make_batches(source, collate_fn=collate_fn, pin_memory=device.type == "cuda" and not encoded, **batching)
    in_threads = isinstance(inner, ThreadLoader) and device.type == "cpu" and not gpu
    fast = FastLoader(
        inner,
        device,
        skip_bad_samples,
        dataset=dataset,
        prepared_in_loader=in_threads,
        backgrounds=backgrounds,
        bg_shapes=bg_shapes,
        augment=gpu and shared is not None,
        reshoot=reshoot.level if gpu and reshoot is not None else None,
        decode_on_device=encoded,
        ahead=(2 if device.type == "cuda" else 0) if ahead is None else ahead,
    )
    if in_threads:  # on the CPU the float conversion is work: spread it over the loader's threads
        inner.to_device = fast.to_device
    return fast
