"""data_download.py and tools/download.py against a real HTTP server on 127.0.0.1 (gdown does the downloading)."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib.errors import DataError, run_cli  # noqa: E402
from tools import download  # noqa: E402

ZIP_NAME = download.REGISTRY["modest"]["filename"]
CHUNK = importlib.import_module("gdown.download").CHUNK_SIZE  # gdown reads and writes 512 KB at a time
TOP = "modest_museum_dataset"

# The page Google Drive serves instead of a file whose download quota is spent (its text, trimmed).
QUOTA_PAGE = """<!DOCTYPE html><html><head><meta http-equiv="content-type" content="text/html; charset=utf-8"/>
<title>Google Drive - Quota exceeded</title></head><body><div class="uc-main"><div id="uc-text">
<p class="uc-error-caption">Sorry, you can&#39;t view or download this file at this time.</p>
<p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. Please try accessing the file again later. If the file you are trying to access is particularly large or is shared with many people, it may take up to 24 hours to be able to view or download the file. If you still can't access a file after 24 hours, contact your domain administrator.</p>
</div></div></body></html>
"""


# ----------------------------------------------------------------------------------------------------------
# A tiny MODEST-format zip and a server that can drop a connection halfway


def write_modest_folder(root: Path, n_bg: int = 2, n_fg: int = 2, n_place: int = 2, size: int = 16) -> Path:
    """A MODEST-layout folder of tiny noisy JPEGs with file_map.txt and bbox.txt."""
    rng = np.random.default_rng(0)
    for folder in ("bg", "bg_fg", "bg_fg_mask", "bg_fg_depth_map"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lines, boxes = [], []
    for b in range(1, n_bg + 1):
        (root / "bg" / f"bg{b:03d}.jpeg").write_bytes(
            simplejpeg.encode_jpeg(rng.integers(0, 255, (size, size, 3), np.uint8))
        )
        for f in range(1, n_fg + 1):
            for k in range(1, 2 * n_place + 1):
                name = f"bg{b:03d}_fg{f:03d}_{k:02d}"
                gray = lambda: rng.integers(0, 255, (size, size, 1), np.uint8)  # noqa: E731
                (root / "bg_fg" / f"{name}.jpeg").write_bytes(
                    simplejpeg.encode_jpeg(rng.integers(0, 255, (size, size, 3), np.uint8))
                )
                (root / "bg_fg_mask" / f"{name}_mask.jpeg").write_bytes(
                    simplejpeg.encode_jpeg(gray(), colorspace="GRAY")
                )
                (root / "bg_fg_depth_map" / f"{name}_depth_map.jpeg").write_bytes(
                    simplejpeg.encode_jpeg(gray(), colorspace="GRAY")
                )
                lines.append(f"bg{b:03d}\t{name}\t{name}_mask\t{name}_depth_map")
                boxes.append(f"{name}.jpeg\t1\t2\t3\t4")
    (root / "file_map.txt").write_text("\n".join(lines) + "\n")
    (root / "bbox.txt").write_text("\n".join(boxes) + "\n")
    (root / "fg").mkdir(exist_ok=True)
    for f in range(1, n_fg + 1):  # noise PNGs: they make the zip bigger than gdown's 512 KB chunks
        Image.fromarray(rng.integers(0, 255, (400, 400, 4), np.uint8)).save(
            root / "fg" / f"fg{f:03d}.png", compress_level=1
        )
    return root


def zip_bytes(folder: Path, top: str | None = TOP) -> bytes:
    """The folder as zip bytes, under `top/` like the real MODEST zip; JPEGs stored, text deflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                rel = path.relative_to(folder).as_posix()
                kind = zipfile.ZIP_DEFLATED if path.suffix == ".txt" else zipfile.ZIP_STORED
                z.write(path, f"{top}/{rel}" if top else rel, compress_type=kind)
    return buf.getvalue()


def flip_member_byte(data: bytes, member: str) -> bytes:
    """A copy of zip `data` with one byte flipped inside `member`'s stored data (the central directory intact)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo(member)
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


class Server:
    """Serves `files` on 127.0.0.1 with Range support; `cut[path] = n` drops the next full answer after n bytes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.log: list[tuple[str, str | None]] = []  # (path, Range header)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                outer.log.append((path, self.headers.get("Range")))
                data = outer.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                etag = f'"{hashlib.sha1(data).hexdigest()[:16]}"'
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and self.headers.get("If-Range", etag) == etag:
                    start, status = int(rng.split("=")[1].split("-")[0]), 206
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if data.startswith(b"<!DOCTYPE") else "application/zip")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = data[start:]
                if status == 200 and path in outer.cut:
                    body = body[: outer.cut.pop(path)]  # then the connection closes: a dropped transfer
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # gdown closes its first answer when it resumes with a Range request

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def requests(self, path: str) -> list[str | None]:
        """The Range headers of the requests for `path` so far (None: a plain request)."""
        return [r for p, r in self.log if p == path]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_modest_folder(tmp_path_factory.mktemp("modest") / TOP)


@pytest.fixture(scope="module")
def good_zip(folder) -> bytes:
    return zip_bytes(folder)


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def no_gdown_cookies(monkeypatch, tmp_path_factory):
    """gdown saves Google cookies under ~/.cache; keep them in a scratch folder."""
    gdown_module = importlib.import_module("gdown.download")  # `gdown.download` is also the function's name
    monkeypatch.setattr(
        gdown_module, "DEFAULT_COOKIES_FILE", str(tmp_path_factory.mktemp("gdown") / "cookies.txt"), raising=False
    )


def cli(*args: str, url: str | None = None) -> subprocess.CompletedProcess:
    """Run `python data_download.py ...` from the repository root, as a user would."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop(download.URL_ENV, None)
    if url is not None:
        env[download.URL_ENV] = url
    return subprocess.run(
        [sys.executable, "data_download.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(res: subprocess.CompletedProcess) -> str:
    """Non-zero exit and exactly one `error: ...` line on stderr, no traceback; returns that line."""
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


# ----------------------------------------------------------------------------------------------------------
# Downloading


def test_download_verifies_then_rerun_is_a_noop(server, good_zip, tmp_path):
    server.files["/modest.zip"] = good_zip
    url = server.url + "/modest.zip"
    res = cli("modest", "--out", str(tmp_path), "--quiet", url=url)
    assert res.returncode == 0, res.stderr
    final = tmp_path / ZIP_NAME
    assert final.read_bytes() == good_zip
    stamp = json.loads((tmp_path / f"{ZIP_NAME}.verified.json").read_text())
    assert stamp["size"] == len(good_zip) and stamp["samples"] == 16 and stamp["checks"]["crc"].startswith("all")
    assert stamp["sha256"] == hashlib.sha256(good_zip).hexdigest()
    assert not list(tmp_path.glob("*.part"))
    assert server.requests("/modest.zip") == [None]

    again = cli("modest", "--out", str(tmp_path), "--quiet", url=url)
    assert again.returncode == 0 and "already verified" in again.stdout
    assert server.requests("/modest.zip") == [None]  # no second request


def test_interrupted_download_resumes_on_rerun(server, good_zip, tmp_path):
    server.files["/modest.zip"] = good_zip
    server.cut["/modest.zip"] = len(good_zip) // 2
    kept = len(good_zip) // 2 // CHUNK * CHUNK  # gdown writes whole chunks: the broken last one is fetched again
    assert kept > 0
    url = server.url + "/modest.zip"
    first = cli("modest", "--out", str(tmp_path), "--retries", "0", "--quiet", url=url)
    line = assert_one_line_error(first)
    assert "resume" in line and "kept in" in line
    partials = list(tmp_path.glob(f"{ZIP_NAME}.part*.part"))  # gdown's temporary file
    assert len(partials) == 1 and partials[0].stat().st_size == kept
    assert not (tmp_path / ZIP_NAME).exists() and not (tmp_path / f"{ZIP_NAME}.verified.json").exists()

    second = cli("modest", "--out", str(tmp_path), "--retries", "0", "--quiet", url=url)
    assert second.returncode == 0, second.stderr
    assert server.requests("/modest.zip") == [None, None, f"bytes={kept}-"]  # continued, not started over
    assert (tmp_path / ZIP_NAME).read_bytes() == good_zip
    assert not list(tmp_path.glob("*.part"))


def test_dropped_connection_is_resumed_within_one_run(server, good_zip, tmp_path):
    server.files["/modest.zip"] = good_zip
    server.cut["/modest.zip"] = CHUNK + 1000
    got = download.download_modest(tmp_path, url=server.url + "/modest.zip", retries=1, progress=False)
    assert got.action == "downloaded and verified" and got.path.read_bytes() == good_zip
    assert server.requests("/modest.zip") == [None, f"bytes={CHUNK}-"]


def test_corrupt_download_is_rejected_and_not_kept(server, good_zip, tmp_path):
    member = f"{TOP}/bg_fg/bg001_fg002_03.jpeg"
    server.files["/modest.zip"] = flip_member_byte(good_zip, member)
    url = server.url + "/modest.zip"
    line = assert_one_line_error(cli("modest", "--out", str(tmp_path), "--quiet", url=url))
    assert f"{ZIP_NAME}.part" in line and member in line and "CRC" in line
    assert not list(tmp_path.iterdir())  # no zip, no stamp, no partial
    assert_one_line_error(cli("modest", "--out", str(tmp_path), "--quiet", url=url))
    assert len(server.requests("/modest.zip")) == 2  # not treated as done: fetched again


def test_truncated_download_is_rejected(server, good_zip, tmp_path):
    server.files["/modest.zip"] = good_zip[:-100]  # the end of the central directory is missing
    line = assert_one_line_error(cli("modest", "--out", str(tmp_path), "--quiet", url=server.url + "/modest.zip"))
    assert f"{ZIP_NAME}.part" in line and "truncated" in line
    assert not (tmp_path / ZIP_NAME).exists() and not list(tmp_path.glob("*.json"))


def test_drive_quota_page_gives_the_workaround(server, tmp_path):
    server.files["/uc"] = QUOTA_PAGE.encode()
    line = assert_one_line_error(cli("modest", "--out", str(tmp_path), "--quiet", url=server.url + "/uc?id=x"))
    assert "too many users" in line.lower() and "Make a copy" in line
    assert f"--from /content/drive/MyDrive/{ZIP_NAME}" in line
    assert not list(tmp_path.iterdir())  # the web page is not kept as if it were the zip


def test_drive_quota_through_gdowns_drive_path(server, tmp_path, monkeypatch, capsys):
    """The registry's real Drive URL, answered by our server: gdown itself raises FileURLRetrievalError."""
    import requests

    import data_download

    server.files["/uc"] = QUOTA_PAGE.encode()
    real_request = requests.Session.request

    def to_local(self, method, url, *args, **kwargs):
        if "drive.google.com" in url or "drive.usercontent.google.com" in url:
            url = server.url + "/uc?" + url.split("?", 1)[1]
        return real_request(self, method, url, *args, **kwargs)

    pages = []
    monkeypatch.setattr(requests.Session, "request", to_local)
    monkeypatch.setattr(download, "_reject_web_page", lambda part, url: pages.append(part))
    monkeypatch.delenv(download.URL_ENV, raising=False)
    assert run_cli(data_download.main, ["modest", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "too many users" in err.lower() and download.REGISTRY["modest"]["drive_id"] in err
    assert server.requests("/uc") == [None] and not pages  # gdown read the page itself: nothing was downloaded


def test_network_failures_are_one_line(server, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/modest.zip"
    line = assert_one_line_error(cli("modest", "--out", str(tmp_path), "--retries", "0", "--quiet", url=dead))
    assert "cannot reach 127.0.0.1" in line
    line = assert_one_line_error(
        cli("modest", "--out", str(tmp_path), "--retries", "0", "--quiet", url=server.url + "/missing.zip")
    )
    assert "404" in line


# ----------------------------------------------------------------------------------------------------------
# Verifying, --from, extracting


def test_verify_folder_and_zip(folder, good_zip, tmp_path):
    res = cli("verify", str(folder), "--quiet")
    assert res.returncode == 0 and "16 samples" in res.stdout, res.stderr
    path = tmp_path / "any_name.zip"
    path.write_bytes(good_zip)
    res = cli("verify", str(path), "--quick", "--quiet")
    assert res.returncode == 0 and "16 samples" in res.stdout, res.stderr
    assert json.loads((tmp_path / "any_name.zip.verified.json").read_text())["checks"]["crc"] == "all 54 members"


def test_verify_rejects_damaged_zip_and_drops_its_stamp(good_zip, tmp_path):
    path = tmp_path / "modest.zip"
    path.write_bytes(good_zip)
    assert cli("verify", str(path), "--quiet").returncode == 0
    path.write_bytes(flip_member_byte(good_zip, f"{TOP}/bg/bg002.jpeg"))
    line = assert_one_line_error(cli("verify", str(path), "--quiet"))
    assert str(path) in line and "bg/bg002.jpeg" in line
    assert not (tmp_path / "modest.zip.verified.json").exists()


def test_verify_folder_reports_missing_and_truncated_files(folder, tmp_path):
    import shutil

    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "bg_fg_mask" / "bg002_fg001_04_mask.jpeg").unlink()
    line = assert_one_line_error(cli("verify", str(copy), "--quiet"))
    assert "file_map.txt line 12" in line and "bg002_fg001_04_mask" in line
    with pytest.raises(DataError, match="bg_fg/bg001_fg001_01.jpeg: not a whole JPEG"):
        copy2 = shutil.copytree(folder, tmp_path / "copy2")
        jpeg = copy2 / "bg_fg" / "bg001_fg001_01.jpeg"
        jpeg.write_bytes(jpeg.read_bytes()[:-10])
        download.verify_folder(copy2, progress=False)


def test_expected_size_and_sha256_are_enforced(good_zip, tmp_path):
    path = tmp_path / "m.zip"
    path.write_bytes(good_zip)
    with pytest.raises(DataError, match="expected"):
        download.verify_zip(path, expected_size=len(good_zip) + 1, progress=False)
    with pytest.raises(DataError, match="sha256"):
        download.verify_zip(path, expected_sha256="0" * 64, progress=False)
    report = download.verify_zip(
        path, expected_size=len(good_zip), expected_sha256=hashlib.sha256(good_zip).hexdigest(), progress=False
    )
    assert report.checks["sha256"] == "as expected" and report.prefix == f"{TOP}/"


def test_from_local_path_copies_or_uses_in_place(good_zip, tmp_path):
    src = tmp_path / "drive" / ZIP_NAME
    src.parent.mkdir()
    src.write_bytes(good_zip)
    out = tmp_path / "data"
    res = cli("modest", "--out", str(out), "--from", str(src), "--quiet")
    assert res.returncode == 0 and "copied and verified" in res.stdout, res.stderr
    assert (out / ZIP_NAME).read_bytes() == good_zip and (out / f"{ZIP_NAME}.verified.json").exists()
    assert "already verified" in cli("modest", "--out", str(out), "--from", str(src), "--quiet").stdout

    res = cli("modest", "--from", str(src), "--in-place", "--quiet")
    assert res.returncode == 0 and f"verified in place: {src}" in res.stdout, res.stderr
    assert (src.parent / f"{ZIP_NAME}.verified.json").exists()

    bad = tmp_path / "bad.zip"
    bad.write_bytes(good_zip[: len(good_zip) // 2])
    line = assert_one_line_error(cli("modest", "--out", str(tmp_path / "other"), "--from", str(bad), "--quiet"))
    assert "truncated" in line and f"{bad} itself is damaged" in line
    assert not list((tmp_path / "other").iterdir())  # neither the copy nor a stamp


def test_extract_is_atomic_and_verifiable(good_zip, tmp_path):
    src = tmp_path / ZIP_NAME
    src.write_bytes(good_zip)
    res = cli("modest", "--out", str(tmp_path), "--from", str(src), "--in-place", "--extract", "--quiet")
    assert res.returncode == 0 and f"extracted to {tmp_path / TOP}" in res.stdout, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [TOP]  # no temporary folder left
    assert cli("verify", str(tmp_path / TOP), "--quiet").returncode == 0
    assert (
        "already extracted"
        in cli("modest", "--out", str(tmp_path), "--from", str(src), "--in-place", "--extract", "--quiet").stdout
    )


def test_extract_stops_on_a_damaged_member_and_leaves_nothing(good_zip, tmp_path):
    src = tmp_path / "m.zip"
    src.write_bytes(flip_member_byte(good_zip, f"{TOP}/bg_fg_depth_map/bg002_fg002_04_depth_map.jpeg"))
    with pytest.raises(DataError, match="CRC mismatch"):
        download.extract_zip(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / TOP).exists()


# ----------------------------------------------------------------------------------------------------------
# synthetic


@pytest.mark.skipif(not (ROOT / "lib" / "synthetic.py").exists(), reason="lib/synthetic.py not written yet")
def test_synthetic_command_writes_a_verifiable_dataset(tmp_path):
    res = cli(
        "synthetic",
        "--out",
        str(tmp_path / "syn"),
        "--size",
        "32",
        "--backgrounds",
        "2",
        "--foregrounds",
        "2",
        "--placements",
        "1",
        "--workers",
        "1",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    assert "wrote 8 samples" in res.stdout
    path = res.stdout.strip().split(" to ", 1)[1]
    assert cli("verify", path, "--quiet").returncode == 0
    res = cli(
        "synthetic",
        "--out",
        str(tmp_path / "syn"),
        "--size",
        "32",
        "--backgrounds",
        "2",
        "--foregrounds",
        "1",
        "--placements",
        "1",
        "--workers",
        "1",
        "--zip",
        "--quiet",
    )
    assert res.returncode == 0 and "wrote 4 samples" in res.stdout, res.stderr
    path = res.stdout.strip().split(" to ", 1)[1]
    assert path.endswith(".zip") and cli("verify", path, "--quiet").returncode == 0
