"""Training loop, checkpoints, resume (in process and after SIGKILL), evaluate command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_modest

from lib.errors import UserError
from lib.train import Config, fit, load_checkpoint, load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_modest(tmp_path_factory) -> Path:
    """4 bg x 2 fg x 6 placements = 48 samples at 64 px."""
    return write_tiny_modest(tmp_path_factory.mktemp("small") / "modest", n_bg=4, n_fg=2, n_place=3)


def _cfg(out: Path, **kw) -> Config:
    base = dict(
        model="depthnet",
        epochs=2,
        batch_size=8,
        image_size=32,
        lr=1e-3,
        optimizer="adamw",
        workers=0,
        out=str(out),
        log_every=2,
    )
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("model", ["masknet", "depthnet"])
def test_two_epoch_fit_lowers_the_loss_and_writes_the_run(small_modest, tmp_path, model):
    history = fit(_cfg(tmp_path, model=model, epochs=3, lr=3e-3), small_modest, progress=False)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    keys = {
        "epoch",
        "train_loss",
        "val_loss",
        "lr",
        "seconds",
        "samples_per_s",
        "mask_iou",
        "mask_iou_total",
        "mask_dice",
    }
    if model == "depthnet":
        keys |= {"depth_rmse", "depth_mae", "depth_absrel", "depth_delta1", "depth_ssim"}
    assert keys <= set(history[0])
    assert json.loads((tmp_path / "history.json").read_text()) == history
    for name in ("last.pt", "best.pt", "curves.png", "predictions.png"):
        assert (tmp_path / name).stat().st_size > 0
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 3 and state["config"]["model"] == model and state["config"]["image_size"] == 32
    assert {"model", "optimizer", "scheduler", "scaler", "history", "rng", "best_val_loss"} <= set(state)


def test_resume_continues_as_if_never_interrupted(small_modest, tmp_path, monkeypatch):
    import lib.train as train

    straight = fit(_cfg(tmp_path / "a", epochs=3, scheduler="onecycle"), small_modest, progress=False)
    real = train.write_history

    def interrupt_after_first_epoch(path, history):
        real(path, history)
        if len(history) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "write_history", interrupt_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tmp_path / "b", epochs=3, scheduler="onecycle"), small_modest, progress=False)
    monkeypatch.setattr(train, "write_history", real)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed = fit(_cfg(tmp_path / "b", epochs=3, scheduler="onecycle"), small_modest, resume=True, progress=False)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    wa = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="onecycle schedule was planned for 3 epochs"):
        fit(_cfg(tmp_path / "b", epochs=5, scheduler="onecycle"), small_modest, resume=True, progress=False)


def test_resume_refuses_the_other_model_and_finished_runs(small_modest, tmp_path):
    fit(_cfg(tmp_path, model="masknet", epochs=1), small_modest, progress=False)
    with pytest.raises(UserError, match="holds a masknet checkpoint"):
        fit(_cfg(tmp_path, model="depthnet", epochs=2), small_modest, resume=True, progress=False)
    with pytest.raises(UserError, match="already trained 1 of 1"):
        fit(_cfg(tmp_path, model="masknet", epochs=1), small_modest, resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_modest, tmp_path, monkeypatch):
    import lib.train as train

    fit(_cfg(tmp_path, epochs=1), small_modest, progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    real = train.make_loss

    def exploding(name, model_name):
        loss_fn = real(name, model_name)
        return lambda outputs, batch: (loss_fn(outputs, batch)[0] * float("nan"), {})

    monkeypatch.setattr(train, "make_loss", exploding)
    with pytest.raises(UserError, match="lower --lr"):
        fit(_cfg(tmp_path, epochs=3), small_modest, resume=True, progress=False)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_bad_config_values_are_named():
    from lib.train import validate_config

    for kw, word in [
        ({"epochs": -1}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"image_size": 48}, "--image-size"),
        ({"model": "unet"}, "--model"),
        ({"loss": "bce_rmse", "model": "masknet"}, "--loss"),
        ({"lr": 0}, "--lr"),
    ]:
        with pytest.raises(UserError, match=word):
            validate_config(Config(**kw))


def test_checkpoint_that_is_not_one(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="x.pt: not a readable checkpoint"):
        load_model(bad)
    torch.save({"weights": 1}, bad)
    with pytest.raises(UserError, match="not a checkpoint written by lib.train"):
        load_model(bad)


def _run(args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


def test_evaluate_prints_one_json_line(small_modest, tmp_path):
    fit(_cfg(tmp_path, epochs=1), small_modest, progress=False)
    done = _run(
        [
            "-m",
            "lib.evaluate",
            "--checkpoint",
            str(tmp_path / "best.pt"),
            "--data",
            str(small_modest),
            "--split",
            "val",
            "--baseline",
            "--workers",
            "0",
        ]
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["samples"] == int(48 * 0.3) and 0 <= result["mask_iou"] <= 1
    assert {"depth_rmse", "depth_delta1", "baseline_mask_iou", "image_size"} <= set(result)
    assert result["image_size"] == 32


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_resumable_run(small_modest, tmp_path):
    out = tmp_path / "run"
    args = [
        "-m",
        "lib.train",
        "--data",
        str(small_modest),
        "--out",
        str(out),
        "--epochs",
        "6",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--quiet",
        "--lr",
        "0.001",
        "--optimizer",
        "adamw",
    ]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.3)  # somewhere in a later epoch, possibly inside a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(out / "last.pt")  # never torn
    done_epochs = state["epoch"]
    assert 1 <= done_epochs <= 6
    resumed = _run(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 7))
    assert load_checkpoint(out / "last.pt")["epoch"] == 6
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_sigterm_finishes_cleanly_and_says_how_to_resume(small_modest, tmp_path):
    out = tmp_path / "run"
    args = [
        "-m",
        "lib.train",
        "--data",
        str(small_modest),
        "--out",
        str(out),
        "--epochs",
        "50",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--quiet",
    ]
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "MPLBACKEND": "Agg"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "--resume" in stderr and "Traceback" not in stderr
    assert load_checkpoint(out / "last.pt")["epoch"] >= 1


def test_resume_cleanup_removes_temp_files_of_dead_writers_only(tmp_path):
    from lib.train import remove_stale_temp_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / f".best.pt.{dead.pid}.tmp").write_bytes(b"torn")
    (tmp_path / ".history.json.tmp").write_text("[")
    live = tmp_path / f".last.pt.{os.getppid()}.tmp"  # a running process (our parent) may still be writing it
    live.write_bytes(b"in progress")
    (tmp_path / "last.pt").write_bytes(b"kept")
    remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "last.pt"])


def test_command_line_recipes():
    """No arguments: the CPU demo's recipe; a path: the original recipe; flags override either."""
    from lib.train import DEMO, build_parser, config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(list(argv)))

    demo = cfg()
    assert {k: getattr(demo, k) for k in DEMO} == DEMO and demo.loss == "bce_lovasz_rmse"
    original = cfg("--data", "some/folder")
    assert (original.optimizer, original.lr, original.weight_decay, original.epochs) == ("sgd", 0.1, 1e-8, 12)
    assert cfg("--data", "some/folder", "--weight-decay", "1e-4").weight_decay == 1e-4
    assert cfg("--optimizer", "sgd").weight_decay == 1e-8  # the demo's AdamW decay does not follow a switch to SGD
    assert cfg("--image-size", "128", "--epochs", "12").image_size == 128


def test_synthetic_data_is_rendered_at_the_run_size(tmp_path, monkeypatch):
    """`--image-size 128` on the synthetic set renders 128 px scenes (not 64 px ones enlarged); no size: the demo's."""
    import simplejpeg

    import lib.train as train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "DEMO_DATA", dict(size=32, backgrounds=2, foregrounds=1, placements=1, seed=0))
    for size, expect in ((64, 64), (None, 32)):
        root = train.resolve_data("synthetic", progress=False, size=size)
        assert root.name == f"synthetic-{expect}px-2x1x2-seed0"
        bg = simplejpeg.decode_jpeg((root / "bg" / "bg001.jpeg").read_bytes())
        assert bg.shape == (expect, expect, 3)


@pytest.mark.parametrize("steps", [1, 2, 5, 7, 210])
def test_onecycle_schedule_works_for_any_number_of_steps(steps):
    """OneCycleLR divides by zero when its warm-up ends exactly at the first step (0.2 x 5 steps); we plan around it."""
    from lib.train import make_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(Config(scheduler="onecycle", epochs=1, lr=0.1), optimizer, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert sched.per_step and max(lrs) <= 0.1 + 1e-12
    if steps >= 5:
        assert max(lrs) > 0.05 and lrs[0] < max(lrs) and lrs[-1] < 0.01  # warms up, peaks near lr, anneals
