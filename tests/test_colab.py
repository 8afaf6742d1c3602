"""The notebooks' Colab flows with a stub `google.colab`: Drive-kept MODEST, run planning, runtime check, weights,
and the setup cell's clone/update against a local git repository."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jupytext
import pytest
import torch

import lib.colab as colab
from lib.errors import UserError
from lib.models import make_model
from lib.train import make_config, make_optimizer, save_epoch
from tools.download import REGISTRY, DriveRefused

ROOT = Path(__file__).resolve().parent.parent
NAME = REGISTRY["modest"]["filename"]


@pytest.fixture
def fake_colab(monkeypatch):
    """A stub google.colab (drive.mount, files.upload) in sys.modules; `calls` records what was called."""
    calls = {"mount": [], "upload": []}
    drive = types.SimpleNamespace(mount=lambda path: calls["mount"].append(path))
    files = types.SimpleNamespace(upload=lambda: calls["upload"].pop(0) if calls["upload"] else {})
    package = types.ModuleType("google.colab")
    package.drive, package.files = drive, files
    monkeypatch.setitem(sys.modules, "google.colab", package)
    return calls


@pytest.fixture(scope="module")
def modest_zip(tmp_path_factory, tiny_modest) -> Path:
    """The tiny MODEST folder zipped under the real zip's name (what Drive would hold)."""
    folder = tmp_path_factory.mktemp("zip")
    base = shutil.make_archive(str(folder / "modest_museum_dataset"), "zip", tiny_modest.parent, tiny_modest.name)
    return Path(base)


# ---------------------------------------------------------------------------------------------- data via Drive


def test_drive_copy_is_found_then_copied_locally(tmp_path, modest_zip, monkeypatch):
    drive, local = tmp_path / "MyDrive", tmp_path / "local"
    drive.mkdir()
    shutil.copy(modest_zip, drive / f"Copy of {NAME}")  # what Drive's 'Make a copy' names it
    import tools.download as download

    monkeypatch.setattr(download, "fetch_url", lambda *a, **k: pytest.fail("downloaded although Drive holds a copy"))
    got = colab.prepare_modest_on_colab(drive, local=local, progress=False)
    assert got == local / NAME and got.read_bytes() == modest_zip.read_bytes()


def test_download_lands_on_drive_once_and_a_reconnect_only_copies(tmp_path, modest_zip, monkeypatch):
    import tools.download as download

    fetched = []

    def fake_fetch(url, part, **kwargs):
        fetched.append(url)
        shutil.copy(modest_zip, part)

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    monkeypatch.setattr(download, "_check_free_space", lambda folder, need: None)
    drive, local = tmp_path / "MyDrive", tmp_path / "local"
    drive.mkdir()
    first = colab.prepare_modest_on_colab(drive, local=local, progress=False)
    assert (drive / colab.DRIVE_DATA / NAME).is_file() and first == local / NAME
    shutil.rmtree(local)  # a disconnect: the runtime's disk is new, Drive is kept
    again = colab.prepare_modest_on_colab(drive, local=local, progress=False)
    assert again.is_file() and len(fetched) == 1, "after a reconnect nothing is downloaded again"


def test_drive_quota_message_says_what_to_do_in_the_notebook(tmp_path, monkeypatch):
    import tools.download as download

    def refuse(out, **kwargs):
        raise download._drive_refused("Too many users have viewed or downloaded this file recently.")

    monkeypatch.setattr(download, "download_modest", refuse)
    drive = tmp_path / "MyDrive"
    drive.mkdir()
    with pytest.raises(DriveRefused) as caught:
        colab.prepare_modest_on_colab(drive, local=tmp_path / "local", progress=False)
    message = str(caught.value)
    assert "\n" not in message and "Make a copy" in message and "run all again" in message
    assert "python " not in message and "--from" not in message, "a notebook user gets no shell command"


def test_modest_off_colab_never_downloads_by_surprise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import lib.train as train

    monkeypatch.setattr(train, "resolve_data", lambda *a, **k: pytest.fail("a download started"))
    with pytest.raises(UserError) as caught:
        colab.resolve_notebook_data("modest", drive=None)
    assert "DOWNLOAD = True" in str(caught.value) and 'RECIPE = "demo"' in str(caught.value)
    with pytest.raises(UserError, match="no such file"):
        colab.resolve_notebook_data(str(tmp_path / "missing"), drive=None)


# ---------------------------------------------------------------------------------------------- runs


def make_run(out: Path, epochs_done: int, cfg) -> None:
    model = make_model(cfg.model)
    optimizer = make_optimizer(cfg, model)
    history = []
    for epoch in range(1, epochs_done + 1):
        history.append({"epoch": epoch, "val_loss": 1.0 / epoch, "train_loss": 1.0})
        save_epoch(out, cfg, epoch, model, optimizer, None, None, history, 1.0 / epoch, True)


def test_plan_run_auto_starts_then_continues(tmp_path):
    out = tmp_path / "run"
    cfg = make_config("demo", model="masknet", out=str(out), epochs=3)
    assert colab.plan_run(out, cfg, "auto") == (cfg, False)
    make_run(out, 2, cfg)
    planned, resume = colab.plan_run(out, dataclasses.replace(cfg, lr=1.0), "auto")
    assert resume and planned.lr == cfg.lr, "a resumed run keeps its saved recipe"
    model = make_model("masknet")
    history, best, start = colab.start_history(out, resume, model, make_optimizer(planned, model))
    assert start == 3 and len(history) == 2 and best == 0.5


def test_plan_run_refuses_to_start_over_a_run(tmp_path):
    out = tmp_path / "run"
    cfg = make_config("demo", model="masknet", out=str(out))
    make_run(out, 1, cfg)
    before = (out / "best.pt").read_bytes()
    with pytest.raises(UserError) as caught:
        colab.plan_run(out, cfg, False)
    assert 'RESUME = "auto"' in str(caught.value) and "OUT" in str(caught.value)
    assert (out / "best.pt").read_bytes() == before
    with pytest.raises(UserError, match="nothing to resume"):
        colab.plan_run(tmp_path / "empty", cfg, True)


def test_check_runtime_stops_the_original_recipe_on_a_colab_cpu(fake_colab):
    with pytest.raises(UserError, match="Change runtime type"):
        colab.check_runtime("original", torch.device("cpu"))
    colab.check_runtime("demo", torch.device("cpu"))
    colab.check_runtime("original", torch.device("cuda"))


def test_check_runtime_does_nothing_off_colab():
    colab.check_runtime("original", torch.device("cpu"))


def test_load_trained_prefers_the_run_then_the_shipped_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(colab, "WEIGHTS", tmp_path / "weights")
    cfg = make_config("demo", model="masknet", out=str(tmp_path / "run"))
    assert colab.load_trained(tmp_path / "run", "masknet") == (None, None)
    assert capsys.readouterr().out.count("\n") == 1
    make_run(tmp_path / "shipped", 1, cfg)
    (tmp_path / "weights").mkdir()
    shutil.copy(tmp_path / "shipped" / "best.pt", tmp_path / "weights" / "masknet.pt")
    model, checkpoint = colab.load_trained(tmp_path / "run", "masknet")
    assert model is not None and checkpoint["epoch"] == 1
    make_run(tmp_path / "run", 2, cfg)
    _, checkpoint = colab.load_trained(tmp_path / "run", "masknet")
    assert checkpoint["epoch"] == 2


def test_mount_drive_mounts_once(fake_colab, monkeypatch, tmp_path):
    monkeypatch.setattr(colab, "DRIVE", tmp_path / "drive")
    assert colab.mount_drive(True) == tmp_path / "drive" / "MyDrive"
    assert fake_colab["mount"] == [str(tmp_path / "drive")]
    assert colab.mount_drive(False) is None


# ---------------------------------------------------------------------------------------------- setup cell


def setup_cell(name: str = "masknet") -> str:
    nb = jupytext.read(ROOT / "notebooks" / f"{name}.py")
    return next(c.source for c in nb.cells if c.cell_type == "code" and "REPO_URL" in c.source)


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.parametrize("name", ["masknet", "depthnet"])
def test_setup_cell_clones_then_updates_and_names_a_wrong_url(name, tmp_path, fake_colab, monkeypatch):
    origin = tmp_path / "origin" / "modest-masknet"
    (origin / "lib").mkdir(parents=True)
    (origin / "lib" / "train.py").write_text("")
    (origin / "requirements.txt").write_text("")
    git("init", "-q", "-b", "main", cwd=origin)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", "--allow-empty", cwd=origin)
    git("add", "-A", cwd=origin)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two", cwd=origin)
    content = tmp_path / "content"
    content.mkdir()
    source = setup_cell(name).replace('Path("/content")', f"Path({str(content)!r})")
    source = source.replace(f'"{colab.repo_url()}"', f'"file://{origin}"', 1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(source, {})
    clone = content / "modest-masknet"
    assert Path.cwd() == clone and (clone / "lib" / "train.py").is_file()
    (origin / "NEW").write_text("x")
    git("add", "-A", cwd=origin)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "three", cwd=origin)
    exec(source, {})  # run twice: updates the clone
    assert (clone / "NEW").is_file()
    wrong = source.replace(f"file://{origin}", f"file://{tmp_path}/nowhere/other")
    with pytest.raises(RuntimeError, match="edit REPO_URL"):
        exec(wrong, {})
    assert '"GIT_TERMINAL_PROMPT": "0"' in source, "git must never ask for a password in a notebook"


def test_a_zip_on_drive_given_as_data_is_trained_from_local_disk(tmp_path, modest_zip, monkeypatch):
    monkeypatch.setattr(colab, "DRIVE", tmp_path / "drive")
    monkeypatch.setattr(colab, "LOCAL_DATA", tmp_path / "local")
    mine = tmp_path / "drive" / "MyDrive" / "datasets" / "mine.zip"
    mine.parent.mkdir(parents=True)
    shutil.copy(modest_zip, mine)
    got = colab.resolve_notebook_data(str(mine), drive=tmp_path / "drive" / "MyDrive", progress=False)
    assert got == tmp_path / "local" / NAME and got.read_bytes() == mine.read_bytes()


def test_a_dropped_download_is_resumed_within_the_cell(tmp_path, modest_zip, monkeypatch):
    """gdown 5 (Colab's) does not retry inside one call: prepare_modest_on_colab tries again, then gives up."""
    import tools.download as download

    tries = []

    def flaky_fetch(url, part, **kwargs):
        tries.append(url)
        if len(tries) < 3:
            raise download.DownloadFailed("the connection dropped mid-transfer")
        shutil.copy(modest_zip, part)

    monkeypatch.setattr(download, "fetch_url", flaky_fetch)
    monkeypatch.setattr(download, "_check_free_space", lambda folder, need: None)
    (tmp_path / "MyDrive").mkdir()
    got = colab.prepare_modest_on_colab(tmp_path / "MyDrive", local=tmp_path / "local", progress=False)
    assert got.is_file() and len(tries) == 3
    tries.clear()
    (tmp_path / "Other").mkdir()
    with pytest.raises(download.DownloadFailed):
        colab.prepare_modest_on_colab(tmp_path / "Other", local=tmp_path / "local2", attempts=2, progress=False)
    assert len(tries) == 2
