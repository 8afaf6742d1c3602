"""The MODEST format without torch (so data_download.py starts fast): parsing `file_map.txt`, finding its files."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import DataError

FILE_MAP = "file_map.txt"
FOLDERS = {
    "bg": "bg/",
    "bg_fg": "bg_fg/",
    "mask": "bg_fg_mask/",
    "depth": "bg_fg_depth_map/",
}  # file_map column -> folder
EXTENSIONS = (".jpeg", ".jpg", ".png")


def parse_file_map(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) bytes names (bg, bg_fg, mask, depth) and their 1-based line numbers; DataError naming the line when malformed.

    Fields may be separated by tabs or any other whitespace; blank lines are skipped.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not a text file ({exc.reason})") from None
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise DataError(f"{where} line {number}: expected 4 names (bg, bg_fg, mask, depth), found {len(fields)}")
        rows.append([f.encode() for f in fields])
        lines.append(number)
    if not rows:
        raise DataError(f"{where}: no samples listed")
    width = max(len(f) for row in rows for f in row)
    return np.array(rows, dtype=f"S{width}"), np.array(lines, dtype=np.int64)


def resolve_names(
    kind: str, names: np.ndarray, lines: np.ndarray, prefix: str, find: Callable[[np.ndarray], np.ndarray], where: str
) -> np.ndarray:
    """Where `find` places prefix + FOLDERS[kind] + each name + the first image extension present; DataError naming
    `where` and the file_map line of the first missing file. `find` maps bytes paths to indices, -1 where absent."""
    uniq, inverse = np.unique(names, return_inverse=True)  # 100 backgrounds are listed 400,000 times
    found = np.full(len(uniq), -1, dtype=np.int64)
    base = np.char.add((prefix + FOLDERS[kind]).encode(), uniq)
    for ext in EXTENSIONS:
        todo = found < 0
        if not todo.any():
            break
        found[todo] = find(np.char.add(base[todo], ext.encode()))
    found = found[inverse.reshape(-1)]
    missing = np.flatnonzero(found < 0)
    if len(missing):
        first = missing[0]
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(
            f"{where} line {lines[first]}: {kind} file {FOLDERS[kind]}{names[first].decode()}.jpeg not found{more}"
        )
    return found
