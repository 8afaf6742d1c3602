"""Random access into a (possibly huge, ZIP64) zip without `zipfile`: one numpy index, reads by offset.

Python's `zipfile` builds one ZipInfo object per member: for MODEST's 1.2M members that is ~8 s and
~650 MB in every process that opens it. Here the central directory is parsed once into numpy arrays
(cached beside the zip, or under ~/.cache when that folder is read-only), and each process reads
members with `os.pread` on its own file descriptor (safe across fork and across threads).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"
_CACHE_VERSION = 1


class ZipIndex:
    """The members of one zip as numpy arrays (`names`, `offsets`, `csizes`, `usizes`, `methods`, `crcs`)."""

    def __init__(self, path: str | os.PathLike, cache: bool = True):
        self.path = Path(path)
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise DataError(f"{self.path}: cannot open ({exc.strerror})") from None
        self.file_size = stat.st_size
        key = f"{stat.st_size}:{int(stat.st_mtime)}"
        arrays = _load_cache(self.path, key) if cache else None
        if arrays is None:
            arrays = _parse_central_directory(self.path, self.file_size)
            if cache:
                _save_cache(self.path, key, arrays)
        self.names: np.ndarray = arrays["names"]  # (N,) bytes, sorted
        self.offsets: np.ndarray = arrays["offsets"]  # (N,) int64 local-header offsets
        self.csizes: np.ndarray = arrays["csizes"]
        self.usizes: np.ndarray = arrays["usizes"]
        self.methods: np.ndarray = arrays["methods"]
        self.crcs: np.ndarray = arrays["crcs"]
        self._fd: int | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"], state["_pid"], state["_lock"] = None, -1, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def find(self, names: np.ndarray) -> np.ndarray:
        """Member indices of `names` (bytes array); -1 where a name is absent. Vectorised."""
        return find_sorted(self.names, names)

    def _descriptor(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:  # first use, or we are a forked worker
            with self._lock:
                if self._fd is None or self._pid != pid:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    self._pid = pid
        return self._fd

    def read(self, i: int) -> bytes:
        """Bytes of member `i`, decompressed; DataError naming the member when it is damaged."""
        fd = self._descriptor()
        offset, csize = int(self.offsets[i]), int(self.csizes[i])
        head = os.pread(fd, 30 + 256 + csize, offset)  # header + typical name/extra + data: one read
        if len(head) < 30 or head[:4] != _LOCAL:
            raise self._member_error(i, "is damaged (bad local header); re-download the zip")
        name_len, extra_len = struct.unpack_from("<HH", head, 26)
        start = 30 + name_len + extra_len
        data = head[start : start + csize]
        if len(data) < csize:
            data += os.pread(fd, csize - len(data), offset + start + len(data))
        if len(data) < csize:
            raise self._member_error(i, "is truncated; the zip is incomplete")
        method = int(self.methods[i])
        if method == 8:
            try:
                data = zlib.decompress(data, -15)
            except zlib.error as exc:
                raise self._member_error(i, f"is corrupt ({exc})") from None
        elif method != 0:
            raise self._member_error(i, f"uses unsupported compression method {method}")
        return data

    def _member_error(self, i: int, problem: str) -> DataError:
        """A DataError naming the zip and member `i` (the name is decoded only when something went wrong)."""
        return DataError(f"{self.path}: member {self.names[i].decode('utf-8', 'replace')} {problem}")

    def check_crc(self, i: int) -> bool:
        """True when member `i`'s bytes match the CRC-32 the zip records."""
        return (zlib.crc32(self.read(i)) & 0xFFFFFFFF) == int(self.crcs[i])

    def close(self) -> None:
        """Close this process's descriptor."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


def find_sorted(sorted_names: np.ndarray, names) -> np.ndarray:
    """Positions of `names` (bytes) in the sorted bytes array `sorted_names`; -1 where absent."""
    query = np.asarray(names, dtype=bytes)
    if len(sorted_names) == 0 or len(query) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    width = sorted_names.dtype.itemsize
    too_long = np.char.str_len(query) > width if query.dtype.itemsize > width else np.zeros(len(query), bool)
    query = query.astype(sorted_names.dtype)  # names longer than any member are masked out above
    pos = np.minimum(np.searchsorted(sorted_names, query), len(sorted_names) - 1)
    return np.where((sorted_names[pos] == query) & ~too_long, pos, -1).astype(np.int64)


def _find_eocd(path: Path, file_size: int, f) -> tuple[int, int, int]:
    """(entry count, central directory size, central directory offset), ZIP64 aware."""
    tail_len = min(file_size, 65536 + 22)
    f.seek(file_size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(_EOCD)
    if pos < 0 or len(tail) - pos < 22:
        raise DataError(f"{path}: not a zip file, or truncated (no end-of-central-directory record)")
    _, _, _, _, count, cd_size, cd_offset, _ = struct.unpack_from("<4sHHHHIIH", tail, pos)
    eocd_abs = file_size - tail_len + pos
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        loc = tail.rfind(_EOCD64_LOCATOR, 0, pos)
        if loc < 0:
            raise DataError(f"{path}: damaged ZIP64 zip (no ZIP64 locator)")
        (eocd64_offset,) = struct.unpack_from("<Q", tail, loc + 8)
        f.seek(eocd64_offset)
        rec = f.read(56)
        if rec[:4] != _EOCD64:
            raise DataError(f"{path}: damaged ZIP64 zip (bad ZIP64 end record)")
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", rec, 32)
        eocd_abs = eocd64_offset
    if cd_offset + cd_size > eocd_abs:
        raise DataError(f"{path}: truncated or corrupt zip (central directory out of range)")
    return count, cd_size, cd_offset


def _parse_central_directory(path: Path, file_size: int) -> dict[str, np.ndarray]:
    """Read the central directory into numpy arrays sorted by name."""
    with open(path, "rb") as f:
        count, cd_size, cd_offset = _find_eocd(path, file_size, f)
        f.seek(cd_offset)
        cd = f.read(cd_size)
    if len(cd) != cd_size:
        raise DataError(f"{path}: truncated zip (central directory cut short)")
    buf = np.frombuffer(cd, dtype=np.uint8)
    starts = _entry_starts(path, buf, count)
    u16 = lambda at: buf[starts[:, None] + at + np.arange(2)].view("<u2").ravel().astype(np.int64)  # noqa: E731
    u32 = lambda at: buf[starts[:, None] + at + np.arange(4)].view("<u4").ravel().astype(np.int64)  # noqa: E731
    methods, crcs, csizes, usizes = u16(10), u32(16), u32(20), u32(24)
    name_lens, offsets = u16(28), u32(42)
    for i in np.flatnonzero((csizes == 0xFFFFFFFF) | (usizes == 0xFFFFFFFF) | (offsets == 0xFFFFFFFF)):
        usizes[i], csizes[i], offsets[i] = _zip64_extra(cd, int(starts[i]), usizes[i], csizes[i], offsets[i])
    width = max(1, int(name_lens.max(initial=1)))
    cols = np.arange(width)
    padded = np.concatenate([buf, np.zeros(width, np.uint8)])
    grid = np.lib.stride_tricks.sliding_window_view(padded, width)[starts + 46]  # (N, width) name bytes
    grid[cols >= name_lens[:, None]] = 0  # NUL padding is what numpy's S dtype strips
    names_arr = np.ascontiguousarray(grid).view(f"S{width}").ravel()
    keep = (name_lens == 0) | (buf[starts + 46 + np.maximum(name_lens - 1, 0)] != ord("/"))  # no folder entries
    order = np.argsort(names_arr[keep], kind="stable")
    pick = lambda a: a[keep][order]  # noqa: E731
    if np.any(pick(offsets) + 30 > file_size):
        raise DataError(f"{path}: truncated zip (members beyond the end of the file)")
    return {
        "names": pick(names_arr),
        "offsets": pick(offsets),
        "csizes": pick(csizes),
        "usizes": pick(usizes),
        "methods": pick(methods).astype(np.uint16),
        "crcs": pick(crcs).astype(np.uint32),
    }


def _entry_starts(path: Path, buf: np.ndarray, count: int) -> np.ndarray:
    """Offsets of the `count` central-directory entries (vectorised signature scan, checked as a chain)."""
    sig = np.flatnonzero((buf[:-3] == 0x50) & (buf[1:-2] == 0x4B) & (buf[2:-1] == 1) & (buf[3:] == 2))
    sig = sig[sig + 46 <= len(buf)]
    if len(sig) == count and (count == 0 or sig[0] == 0):
        lens = [buf[sig[:, None] + at + np.arange(2)].view("<u2").ravel().astype(np.int64) for at in (28, 30, 32)]
        nxt = sig + 46 + lens[0] + lens[1] + lens[2]
        if np.array_equal(nxt[:-1], sig[1:]):
            return sig.astype(np.int64)
    # A name that happens to contain the signature: walk the chain record by record instead.
    starts = np.empty(count, dtype=np.int64)
    data, pos = buf.tobytes(), 0
    for i in range(count):
        if pos + 46 > len(data) or data[pos : pos + 4] != _CENTRAL:
            raise DataError(f"{path}: corrupt zip (central directory entry {i} is damaged)")
        starts[i] = pos
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        pos += 46 + name_len + extra_len + comment_len
    return starts


def _zip64_extra(cd: bytes, start: int, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Replace 0xFFFFFFFF fields with their ZIP64 extra-field values (in the order the spec gives)."""
    name_len, extra_len = struct.unpack_from("<HH", cd, start + 28)
    extra = cd[start + 46 + name_len : start + 46 + name_len + extra_len]
    at = 0
    while at + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, at)
        if tag == 1:
            fields = extra[at + 4 : at + 4 + size]
            k = 0
            values = []
            for current in (usize, csize, offset):
                if current == 0xFFFFFFFF:
                    values.append(struct.unpack_from("<Q", fields, k)[0])
                    k += 8
                else:
                    values.append(current)
            return values[0], values[1], values[2]
        at += 4 + size
    return usize, csize, offset


def _cache_paths(path: Path) -> list[Path]:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return [path.with_name(path.name + ".index.npz"), Path.home() / ".cache" / "modest" / f"{digest}.index.npz"]


def _load_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    for cache in _cache_paths(path):
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) != key or int(z["version"]) != _CACHE_VERSION:
                    continue
                return {k: z[k] for k in ("names", "offsets", "csizes", "usizes", "methods", "crcs")}
        except (OSError, KeyError, ValueError, EOFError, zlib.error):
            continue
    return None


def _save_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    for cache in _cache_paths(path):
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), version=np.array(_CACHE_VERSION), **arrays)
            os.replace(tmp, cache)
            return
        except OSError:
            tmp.unlink(missing_ok=True)
