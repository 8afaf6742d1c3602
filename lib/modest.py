"""The MODEST format's text files, without torch (so data_download.py starts fast): parsing `file_map.txt`."""
from __future__ import annotations

import numpy as np

from .errors import DataError

FILE_MAP = "file_map.txt"


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
