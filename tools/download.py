"""Getting MODEST-format data onto disk, verified: gdown download (resumable), copy from a mounted Drive, extract.

Nothing reaches a final path before it is complete and verified: downloads and copies land in
`<name>.zip.part`, are verified, then renamed; extraction fills a hidden temporary folder, then renames it.
A verified zip gets a small stamp beside it (`<name>.zip.verified.json`: size, mtime, what was checked) so
the next run is a no-op; a file whose size or mtime changed is verified again.

Resume (gdown 6.5, `gdown/download.py`): with `resume=True`, gdown writes into `<output>XXXXXXXX.part` (the
output's name + 8 random characters + `.part`, beside the output) and, on the next call, reuses the one such
file it finds: it sends its usual first request, then re-requests with `Range: bytes=<partial size>-` (and
`If-Range` with the ETag/Last-Modified of that first answer, so a changed file is never spliced onto old
bytes) and appends, checking the 206 Content-Range. When complete it renames the temporary file to
`output`. `retries=N` resumes the same way inside one call. It writes whole 512 KB chunks, so a dropped
connection keeps all but the last partial chunk. An already existing `output` is "skipped" unverified, so
we never hand gdown a finished file: we check for it ourselves first. gdown 5.x (Colab's preinstalled one)
resumes with the same file names but has no retries/timeout/hasher and does not check the 206 answer;
verification catches a bad splice there (the zip is then deleted and fetched afresh).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from tqdm.auto import tqdm

from lib.errors import DataError, UserError
from lib.modest import FILE_MAP, FOLDERS, parse_file_map, resolve_names
from lib.zipindex import ZipIndex, find_sorted

# The one place that says where MODEST lives. `size`/`sha256` describe the exact zip on Drive; they are
# not published and cannot be learnt without downloading 6.6 GB, so they are None (= unknown) and
# verification relies on the structural checks (central directory, file_map.txt, every listed file
# present) and the CRC-32 of every member. Fill them in from a verified download (the `modest` command
# prints the sha256 of what it downloaded) to also pin the exact file.
REGISTRY: dict[str, dict] = {
    "modest": {
        # github.com/rvk007/MODEST-Museum-Dataset README, "Link to Dataset" (the project's own copy).
        # The dataset authors' copy, github.com/shan18/MODEST-Museum-Dataset README, is
        # 15cmtEneHL-Nx8aRE59cfp35Au6qufvIh (use it with MODEST_URL=https://drive.google.com/uc?id=...).
        "drive_id": "1zvkjI7s4fi1Q6HH6d0NiimFO_X4YqhNj",
        "filename": "modest_museum_dataset.zip",  # unzips to modest_museum_dataset/ (the original notebooks)
        "size": None,  # exact bytes unknown; published: "6.6 GB"
        "sha256": None,  # unknown
        "approx_bytes": 6_600_000_000,  # for the free-space check only
        "images": 1_200_100,  # 100 bg + 400,000 x (bg_fg, mask, depth)
        "samples": 400_000,  # lines of file_map.txt
    },
}
URL_ENV = "MODEST_URL"  # overrides where the MODEST bytes come from (a mirror, or a local server in tests)

QUICK_SAMPLE = 1000
STAMP_VERSION = 1
_COPY_CHUNK = 8 << 20


class DownloadFailed(UserError):
    """The network (or Google Drive) did not deliver the file; any partial download is kept for resume."""


class DriveRefused(DownloadFailed):
    """Google Drive refused to serve the file (download quota, permissions); the message says what to do."""


@dataclass
class VerifyReport:
    """What verification found and checked for one zip or folder."""

    path: Path
    kind: str  # "zip" or "folder"
    prefix: str  # where file_map.txt lives inside: "" or "top/"
    samples: int  # lines of file_map.txt
    files: int  # zip members, or files the file map resolves to in a folder
    checks: dict = field(default_factory=dict)  # what was checked, e.g. {"crc": "all 1,200,102 members"}
    sha256: str | None = None  # of the whole zip, when computed

    def describe(self) -> str:
        """One line: samples, files, and the checks that passed."""
        what = "; ".join(f"{k}: {v}" for k, v in self.checks.items())
        return f"{self.samples:,} samples, {self.files:,} files ({what})"


@dataclass
class Fetched:
    """The outcome of `get_modest`: the verified zip, what was done to get it, and its report (None if no-op)."""

    path: Path
    action: str  # "already verified", "verified", "downloaded and verified", "copied and verified", "verified in place"
    report: VerifyReport | None
    stamp: Path | None


# ----------------------------------------------------------------------------------------------------------
# Getting the MODEST zip


def modest_url(url: str | None = None) -> str:
    """Where MODEST is fetched from: `url`, else $MODEST_URL, else the Drive id in REGISTRY."""
    return url or os.environ.get(URL_ENV) or f"https://drive.google.com/uc?id={REGISTRY['modest']['drive_id']}"


def get_modest(
    out: str | os.PathLike = "data",
    *,
    from_path: str | os.PathLike | None = None,
    in_place: bool = False,
    url: str | None = None,
    quick: bool = False,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> Fetched:
    """A verified MODEST zip: one already verified, else taken from `from_path` (copied or in place), else downloaded."""
    if from_path is None:
        if in_place:
            raise UserError("--in-place needs --from PATH (the zip to use where it is)")
        return download_modest(out, url=url, quick=quick, retries=retries, timeout=timeout, progress=progress)
    src = Path(from_path).expanduser()
    if not src.is_file():
        raise UserError(f"{src}: no such file (for --from, give the path of the MODEST zip, e.g. on a mounted Drive)")
    entry = REGISTRY["modest"]
    if in_place:
        return _finish_existing(src, entry, quick=quick, progress=progress, action="verified in place")
    final = Path(out).expanduser() / entry["filename"]
    done = _already_verified(final, quick)
    if done is not None:
        return done
    part = _part_path(final)
    digest = copy_file(src, part, progress=progress)
    return _promote(
        part,
        final,
        entry,
        quick=quick,
        progress=progress,
        sha256=digest,
        action="copied and verified",
        hint=f"deleted the copy: {src} itself is damaged, get another copy of it",
    )


def download_modest(
    out: str | os.PathLike = "data",
    *,
    url: str | None = None,
    quick: bool = False,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> Fetched:
    """Download the MODEST zip into `out` with gdown (resuming a partial one), verify it, and stamp it."""
    entry = REGISTRY["modest"]
    source = modest_url(url)
    out = Path(out).expanduser()
    final = out / entry["filename"]
    done = _already_verified(final, quick)
    if done is not None:
        return done
    if final.exists():  # there, but not (or no longer) stamped: verify it rather than fetch it again
        return _finish_existing(final, entry, quick=quick, progress=progress, action="verified")
    part = _part_path(final)
    digest = None
    if not part.exists():  # a finished download waiting for verification skips the network
        out.mkdir(parents=True, exist_ok=True)
        if url is None and URL_ENV not in os.environ:  # the real dataset: make sure 6.6 GB fit first
            _check_free_space(out, (entry["size"] or entry["approx_bytes"]) - _partial_size(part))
        digest = fetch_url(source, part, retries=retries, timeout=timeout, progress=progress)
    return _promote(
        part,
        final,
        entry,
        quick=quick,
        progress=progress,
        sha256=digest,
        action="downloaded and verified",
        hint="deleted it, run the same command again to download it afresh",
    )


def fetch_url(url: str, part: Path, *, retries: int = 3, timeout: float = 60.0, progress: bool = True) -> str | None:
    """Download `url` to `part` with gdown (resumable); return its sha256 (None on gdown 5). DownloadFailed on failure."""
    import gdown  # imported here: only downloads need it (and its requests/bs4)
    import requests

    if retries < 0:
        raise UserError(f"retries must be 0 or more, not {retries}")
    _keep_largest_partial(part)
    hasher = hashlib.sha256()
    # gdown 5.x (Colab's preinstalled one) has no retries/timeout/hasher: pass what this gdown takes.
    supported = inspect.signature(gdown.download).parameters
    extra = {k: v for k, v in {"retries": retries, "timeout": timeout, "hasher": hasher}.items() if k in supported}
    gdown_failure = getattr(gdown.exceptions, "DownloadError", OSError)  # gdown 6
    try:
        gdown.download(url=url, output=str(part), quiet=not progress, resume=True, **extra)
    except gdown.exceptions.FileURLRetrievalError as exc:
        raise _drive_refused(str(exc)) from None
    except (gdown_failure, requests.exceptions.RequestException, OSError) as exc:
        raise DownloadFailed(_explain_failure(exc, url, part)) from None
    if not part.is_file():  # gdown 5 returns None instead of raising when it cannot pick a partial file
        raise DownloadFailed(f"gdown did not write {part}; remove the {part.name}*.part files beside it and run again")
    _reject_web_page(part, url)
    return hasher.hexdigest() if "hasher" in extra else None


def copy_file(src: Path, part: Path, *, progress: bool = True) -> str:
    """Copy `src` to `part` with a progress bar, continuing a shorter `part`; return the sha256 of the copy."""
    total = src.stat().st_size
    have = part.stat().st_size if part.is_file() else 0
    if have > total:
        part.unlink()
        have = 0
    part.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(part.parent, total - have)
    hasher = hashlib.sha256()
    try:
        with (
            open(src, "rb") as fin,
            open(part, "ab") as fout,
            tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=f"copy {src.name}", disable=not progress
            ) as bar,
        ):
            with open(part, "rb") as done:  # the bytes copied by an earlier, interrupted run
                for block in iter(lambda: done.read(_COPY_CHUNK), b""):
                    hasher.update(block)
            fin.seek(have)
            for block in iter(lambda: fin.read(_COPY_CHUNK), b""):
                fout.write(block)
                hasher.update(block)
                bar.update(len(block))
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as exc:
        raise UserError(f"copying {src} to {part} failed ({exc.strerror or exc}); run again to continue") from None
    return hasher.hexdigest()


def _part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


def _partial_size(part: Path) -> int:
    """Bytes already on disk for `part`: the file itself, or gdown's temporary `<part>XXXXXXXX.part`."""
    sizes = [p.stat().st_size for p in [part, *_gdown_partials(part)] if p.is_file()]
    return max(sizes, default=0)


def _gdown_partials(part: Path) -> list[Path]:
    """gdown's temporary files for output `part`: its name + 8 random characters + '.part' (gdown 5 and 6)."""
    if not part.parent.is_dir():
        return []
    return sorted(
        p for p in part.parent.iterdir() if p.name.startswith(part.name) and p.name.endswith(".part") and p != part
    )


def _keep_largest_partial(part: Path) -> None:
    """gdown refuses to resume when several partial files exist: keep the largest (most progress)."""
    partials = _gdown_partials(part)
    if len(partials) > 1:
        keep = max(partials, key=lambda p: p.stat().st_size)
        for p in partials:
            if p != keep:
                p.unlink()


def _already_verified(final: Path, quick: bool) -> Fetched | None:
    """A Fetched for `final` if its stamp still matches it (and checked at least as much as asked)."""
    stamp = read_stamp(final)
    if stamp is None or (not quick and not stamp.get("checks", {}).get("crc", "").startswith("all")):
        return None
    return Fetched(final, "already verified", None, stamp_path(final))


def _finish_existing(path: Path, entry: dict, *, quick: bool, progress: bool, action: str) -> Fetched:
    """Verify a zip where it is and stamp it; a failure removes any old stamp and is raised."""
    done = _already_verified(path, quick)
    if done is not None:
        return done
    try:
        report = verify_zip(
            path, quick=quick, expected_size=entry["size"], expected_sha256=entry["sha256"], progress=progress
        )
    except DataError as exc:
        stamp_path(path).unlink(missing_ok=True)
        raise DataError(f"{exc}; delete it (or use another copy) and run again") from None
    return Fetched(path, action, report, write_stamp(path, report))


def _promote(
    part: Path, final: Path, entry: dict, *, quick: bool, progress: bool, sha256: str | None, action: str, hint: str
) -> Fetched:
    """Verify the finished `part`; on success rename it to `final` and stamp it, on failure delete it (`hint` says so)."""
    try:
        report = verify_zip(
            part,
            quick=quick,
            expected_size=entry["size"],
            expected_sha256=entry["sha256"],
            known_sha256=sha256,
            progress=progress,
        )
    except DataError as exc:
        part.unlink(missing_ok=True)
        raise DataError(f"{exc}; {hint}") from None
    os.replace(part, final)
    report.path = final
    return Fetched(final, action, report, write_stamp(final, report))


def _check_free_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need > 0 and free < need:
        raise UserError(f"{folder}: needs about {_human(need)} free, only {_human(free)} left")


# ----------------------------------------------------------------------------------------------------------
# Failures as one line


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _drive_refused(message: str) -> DriveRefused:
    """The one-line message for Google's refusal, with the manual workaround through one's own Drive."""
    entry = REGISTRY["modest"]
    text = _one_line(message)
    if "too many users" in text.lower():
        why = "Google Drive refused the download: too many users have downloaded this file recently (its quota)"
    else:  # gdown: "Failed to retrieve file url: <why> You may still be able to access the file from the browser..."
        inner = text.split("file url:", 1)[-1].split(" You may still be able", 1)[0].strip()
        why = f"Google Drive would not hand out the file ({inner[:300]})"
    return DriveRefused(
        f"{why}. Workaround: open https://drive.google.com/file/d/{entry['drive_id']}/view, "
        f"'Make a copy' (or 'Add shortcut to Drive') into your own Drive, mount Drive in Colab "
        f"(from google.colab import drive; drive.mount('/content/drive')), then run "
        f"`python data_download.py modest --from /content/drive/MyDrive/{entry['filename']}`; "
        f"or try again in a few hours"
    )


def _explain_failure(exc: BaseException, url: str, part: Path) -> str:
    """One line: what went wrong with the download, and where the bytes received so far are kept."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    host = urlparse(url).netloc or url
    text = _one_line(str(exc))
    import requests

    if "did not honor the requested byte range" in text:
        partial = _gdown_partials(part)
        where = partial[0] if partial else part
        return f"{host} would not continue the partial download {where}; delete it and run again to start over"
    if isinstance(cause, requests.exceptions.HTTPError) and cause.response is not None:
        what = f"{host} answered {cause.response.status_code} {cause.response.reason} for {url}"
    elif isinstance(cause, requests.exceptions.ChunkedEncodingError):
        what = f"the connection to {host} dropped mid-transfer"
    elif isinstance(cause, requests.exceptions.Timeout):
        what = f"{host} stopped answering (timeout)"
    elif isinstance(cause, requests.exceptions.ConnectionError) and "incomplete" not in text.lower():
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(cause))
        what = f"cannot reach {host} ({errno.group(0) if errno else type(cause).__name__})"
    elif isinstance(exc, OSError) and not isinstance(exc, requests.exceptions.RequestException):
        what = f"cannot write the download in {part.parent} ({exc.strerror or exc})"
    else:
        what = f"download from {host} broke off ({text.split('.')[0]})"
    have = _partial_size(part)
    if have:
        partial = _gdown_partials(part)
        return f"{what}; {_human(have)} received so far are kept in {partial[0] if partial else part}; run the same command again to resume"
    return f"{what}; nothing was downloaded, run the same command again to retry"


def _reject_web_page(part: Path, url: str) -> None:
    """A server can answer with a web page instead of the zip (Google's refusals): recognise it, say so, remove it."""
    with open(part, "rb") as f:
        head = f.read(512).lstrip().lower()
    if not head.startswith((b"<!doctype html", b"<html")):
        return
    with open(part, "rb") as f:
        text = f.read(2 << 20).decode("utf-8", "replace")
    part.unlink()
    try:
        from gdown.download import get_url_from_gdrive_confirmation  # gdown's own parser of Drive's pages
        from gdown.exceptions import FileURLRetrievalError

        get_url_from_gdrive_confirmation(text)
    except FileURLRetrievalError as exc:
        if "Cannot retrieve the public link" not in str(exc):  # gdown's fallback when the page is not Drive's
            raise _drive_refused(str(exc)) from None
    except ImportError:
        if "too many users" in text.lower():
            raise _drive_refused("Too many users have viewed or downloaded this file recently") from None
    title = re.search(r"<title>([^<]*)</title>", text, re.IGNORECASE)
    page = f': "{_one_line(title.group(1))[:100]}"' if title else ""
    raise DownloadFailed(f"{urlparse(url).netloc or url} sent a web page instead of the zip ({url}){page}")


# ----------------------------------------------------------------------------------------------------------
# Verification


def verify_path(
    path: str | os.PathLike, *, quick: bool = False, progress: bool = True
) -> tuple[VerifyReport, Path | None]:
    """Verify a MODEST zip (stamped when it passes) or folder; return the report and the stamp written (if any)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return verify_folder(path, quick=quick, progress=progress), None
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    entry = next((e for e in REGISTRY.values() if path.name in (e["filename"], e["filename"] + ".part")), None)
    try:
        report = verify_zip(
            path,
            quick=quick,
            expected_size=entry["size"] if entry else None,
            expected_sha256=entry["sha256"] if entry else None,
            progress=progress,
        )
    except DataError:
        stamp_path(path).unlink(missing_ok=True)
        raise
    return report, write_stamp(path, report)


def verify_zip(
    path: str | os.PathLike,
    *,
    quick: bool = False,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    known_sha256: str | None = None,
    sample: int = QUICK_SAMPLE,
    progress: bool = True,
) -> VerifyReport:
    """Check a MODEST zip: size, central directory, file_map.txt and every name in it, CRC of all (or `sample`) members.

    `known_sha256` is the file's hash when the caller already has it (computed while downloading).
    Raises DataError naming the file on the first failing check.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror})") from None
    checks: dict = {}
    if expected_size is not None:
        if size != expected_size:
            raise DataError(f"{path}: {size:,} bytes, expected {expected_size:,} (incomplete, or a different file)")
        checks["size"] = f"{size:,} bytes as expected"
    index = ZipIndex(path, cache=False)  # parse the central directory afresh: that is part of the check
    checks["central directory"] = f"{len(index):,} members"
    prefix = _find_prefix(index.names, path)
    where = f"{path}:{prefix}{FILE_MAP}"
    names, lines = parse_file_map(index.read(int(index.find(np.array([(prefix + FILE_MAP).encode()]))[0])), where)
    for col, kind in enumerate(FOLDERS):
        resolve_names(kind, names[:, col], lines, prefix, index.find, where)
    checks["file_map"] = f"{len(names):,} samples, every listed file present"
    members = np.arange(len(index))
    if quick and len(members) > sample:
        members = np.sort(np.random.default_rng().choice(len(index), sample, replace=False))
    _check_crcs(index, members, path, progress)
    checks["crc"] = (
        f"all {len(index):,} members" if len(members) == len(index) else f"random {len(members):,} of {len(index):,}"
    )
    index.close()
    sha256 = known_sha256
    if expected_sha256 is not None:
        if sha256 is None:
            sha256 = hash_file(path, progress=progress)
        if sha256 != expected_sha256.lower():
            raise DataError(
                f"{path}: sha256 {sha256} differs from the expected {expected_sha256} (a different or damaged file)"
            )
        checks["sha256"] = "as expected"
    return VerifyReport(path, "zip", prefix, len(names), len(index), checks, sha256)


def verify_folder(
    path: str | os.PathLike, *, quick: bool = False, sample: int = QUICK_SAMPLE, progress: bool = True
) -> VerifyReport:
    """Check a MODEST folder: file_map.txt, every name in it present, and each such file a whole JPEG/PNG (or a sample)."""
    path = Path(path)
    prefix = _find_prefix(None, path)
    root = path / prefix
    try:
        text = (root / FILE_MAP).read_bytes()
    except OSError as exc:
        raise DataError(f"{root / FILE_MAP}: cannot read ({exc.strerror})") from None
    names, lines = parse_file_map(text, str(root / FILE_MAP))
    listing = []
    for folder in FOLDERS.values():
        try:
            with os.scandir(root / folder) as it:
                listing.extend((folder + e.name).encode() for e in it)
        except OSError:
            pass  # reported below as the first missing file
    listing.sort()
    present = np.array(listing, dtype=f"S{max([len(n) for n in listing] + [1])}")

    def find(paths: np.ndarray) -> np.ndarray:
        return find_sorted(present, paths)

    files = [
        present[resolve_names(kind, names[:, col], lines, "", find, str(root / FILE_MAP))]
        for col, kind in enumerate(FOLDERS)
    ]
    files = np.unique(np.concatenate(files))
    checks = {"file_map": f"{len(names):,} samples, every listed file present"}
    todo = files
    if quick and len(files) > sample:
        todo = np.sort(np.random.default_rng().choice(files, sample, replace=False))
    bad = [
        name
        for name in tqdm(todo, desc=f"check {path.name}", unit="file", disable=not progress)
        if not _whole_image(root / name.decode())
    ]
    if bad:
        more = f" ({len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{root / bad[0].decode()}: not a whole JPEG/PNG (empty, truncated or corrupt){more}")
    checks["images"] = (
        f"all {len(files):,} whole JPEG/PNG"
        if len(todo) == len(files)
        else f"random {len(todo):,} of {len(files):,} whole JPEG/PNG"
    )
    return VerifyReport(path, "folder", prefix, len(names), len(files), checks)


def count_samples(path: str | os.PathLike) -> int:
    """Lines of file_map.txt in a MODEST zip or folder."""
    path = Path(path)
    if path.is_dir():
        file_map = path / _find_prefix(None, path) / FILE_MAP
        return len(parse_file_map(file_map.read_bytes(), str(file_map))[0])
    index = ZipIndex(path)
    member = _find_prefix(index.names, path) + FILE_MAP
    return len(parse_file_map(index.read(int(index.find(np.array([member.encode()]))[0])), f"{path}:{member}")[0])


def hash_file(path: Path, *, progress: bool = True) -> str:
    """sha256 of a file, with a progress bar."""
    hasher = hashlib.sha256()
    with (
        open(path, "rb") as f,
        tqdm(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not progress
        ) as bar,
    ):
        for block in iter(lambda: f.read(_COPY_CHUNK), b""):
            hasher.update(block)
            bar.update(len(block))
    return hasher.hexdigest()


def _find_prefix(names: np.ndarray | None, where: Path) -> str:
    """Where file_map.txt lives: "" (the root) or "top/" (the first top folder holding it, as lib/data.py reads)."""
    target = FILE_MAP.encode()
    if names is None:  # a folder
        if (where / FILE_MAP).is_file():
            return ""
        for top in sorted(p.name for p in where.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (where / top / FILE_MAP).is_file():
                return top + "/"
    else:
        if find_sorted(names, [target])[0] >= 0:
            return ""
        i = 0
        while i < len(names):  # one step per top-level folder
            top = names[i].split(b"/", 1)[0]
            if find_sorted(names, [top + b"/" + target])[0] >= 0:
                return top.decode("utf-8", "replace") + "/"
            i = max(i + 1, int(np.searchsorted(names, top + b"0")))  # b"0" sorts right after b"/"
    raise DataError(f"{where}: no {FILE_MAP} at the root or under a top folder (not a MODEST-format dataset)")


def _check_crcs(index: ZipIndex, members: np.ndarray, path: Path, progress: bool) -> None:
    """CRC-32 of `members` against the central directory; DataError naming the first damaged member."""
    bad: list[tuple[int, str]] = []
    done = 0
    with tqdm(
        total=int(index.usizes[members].sum()), unit="B", unit_scale=True, desc=f"CRC {path.name}", disable=not progress
    ) as bar:
        for k, i in enumerate(members):
            try:
                if not index.check_crc(int(i)):
                    bad.append((int(i), "CRC mismatch"))
            except DataError as exc:
                bad.append((int(i), str(exc).rsplit(": ", 1)[-1]))
            except OSError as exc:
                raise DataError(f"{path}: read error ({exc.strerror or exc})") from None
            if k % 256 == 255 or k == len(members) - 1:
                update = int(index.usizes[members[done : k + 1]].sum())
                bar.update(update)
                done = k + 1
    if bad:
        i, why = bad[0]
        more = f" ({len(bad) - 1} more damaged)" if len(bad) > 1 else ""
        raise DataError(f"{path}: member {index.names[i].decode('utf-8', 'replace')} is damaged ({why}){more}")


def _whole_image(path: Path) -> bool:
    """True if the file starts and ends like a complete JPEG or PNG (cheap: reads 64 bytes at each end)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
            tail = f.read(64)
    except OSError:
        return False
    if head[:3] == b"\xff\xd8\xff":
        return b"\xff\xd9" in tail
    if head == b"\x89PNG\r\n\x1a\n":
        return b"IEND" in tail
    return False


# ----------------------------------------------------------------------------------------------------------
# Stamps


def stamp_path(zip_path: str | os.PathLike) -> Path:
    """Where the verification stamp of `zip_path` lives: `<zip>.verified.json` beside it."""
    zip_path = Path(zip_path)
    return zip_path.with_name(zip_path.name + ".verified.json")


def write_stamp(zip_path: str | os.PathLike, report: VerifyReport) -> Path | None:
    """Record that `zip_path`, at its current size and mtime, passed `report`'s checks; None if it cannot be written."""
    zip_path = Path(zip_path)
    stat = zip_path.stat()
    stamp = {
        "version": STAMP_VERSION,
        "file": zip_path.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "samples": report.samples,
        "members": report.files,
        "prefix": report.prefix,
        "checks": report.checks,
        "sha256": report.sha256,
    }
    target = stamp_path(zip_path)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(stamp, indent=1) + "\n")
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        return None
    return target


def read_stamp(zip_path: str | os.PathLike) -> dict | None:
    """The stamp of `zip_path` if it exists and still matches the file's size and mtime, else None."""
    zip_path = Path(zip_path)
    try:
        stamp = json.loads(stamp_path(zip_path).read_text())
        stat = zip_path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("version") != STAMP_VERSION:
        return None
    if stamp.get("size") != stat.st_size or stamp.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return stamp


# ----------------------------------------------------------------------------------------------------------
# Extraction


def extract_zip(zip_path: str | os.PathLike, out: str | os.PathLike, *, progress: bool = True) -> tuple[Path, bool]:
    """Extract a MODEST zip into `out/<top folder or zip stem>` atomically; return (folder, whether it was extracted now).

    Members go into a hidden temporary folder beside the target (each checked against its CRC), which is
    renamed into place at the end, so the target either does not exist or is complete.
    """
    zip_path, out = Path(zip_path), Path(out).expanduser()
    index = ZipIndex(zip_path)
    if len(index) == 0:
        raise DataError(f"{zip_path}: the zip is empty")
    top = index.names[0].split(b"/", 1)[0]
    single_top = bool(np.char.startswith(index.names, top + b"/").all())  # everything under one folder
    name = top.decode() if single_top else zip_path.name.split(".")[0]
    target = out / name
    if target.exists():
        return target, False
    out.mkdir(parents=True, exist_ok=True)
    _check_free_space(out, int(index.usizes.sum()))
    tmp = out / f".{name}.extracting"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run: ours, incomplete
    tmp.mkdir()
    members = [n.decode("utf-8") for n in index.names]
    for member in members:
        parts = member.split("/")
        if member.startswith("/") or "\\" in member or ".." in parts or ":" in parts[0]:
            raise DataError(f"{zip_path}: refusing to extract the unsafe member name {member!r}")
    for folder in sorted({os.path.dirname(m) for m in members} - {""}):
        (tmp / folder).mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=int(index.usizes.sum()), unit="B", unit_scale=True, desc=f"extract {zip_path.name}", disable=not progress
    ) as bar:
        for i, member in enumerate(members):
            data = index.read(i)
            if zlib.crc32(data) & 0xFFFFFFFF != int(index.crcs[i]):
                raise DataError(
                    f"{zip_path}: member {member} is damaged (CRC mismatch); extraction stopped, nothing was put in place"
                )
            with open(tmp / member, "wb") as f:
                f.write(data)
            bar.update(len(data))
    index.close()
    os.replace(tmp / name if single_top else tmp, target)
    if single_top:
        tmp.rmdir()
    return target, True


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
