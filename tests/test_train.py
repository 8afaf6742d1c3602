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
    torch.save({"format": "bgfg-mask-depth/1", "config": {"model": "masknet"}}, bad)  # before Compare
    with pytest.raises(UserError, match=r"x.pt: written before the models took the Compare input .* retrain"):
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


def _cli_config(*argv: str) -> Config:
    from lib.train import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(list(argv)))


def test_no_arguments_give_the_demo_exactly_as_before():
    """`python -m lib.train` alone: the Config the demo had before recipes had names (literal values)."""
    import dataclasses

    demo = dataclasses.asdict(_cli_config())
    assert (demo.pop("recipe"), demo.pop("reshoot"), demo.pop("device")) == ("demo", True, "auto")
    assert demo == dict(
        model="depthnet",
        data="synthetic",
        epochs=5,
        batch_size=8,
        image_size=64,
        lr=2e-3,
        momentum=0.9,
        weight_decay=1e-4,
        optimizer="adamw",
        scheduler="onecycle",
        loss="bce_lovasz_rmse_ssi",
        workers=None,
        split_by="sample",
        val_fraction=0.3,
        seed=1,
        augment=True,
        amp=True,
        channels_last=True,
        compile=False,
        sync_bn=False,
        skip_bad_samples=False,
        loader="auto",
        data_mode="auto",
        ahead=None,
        max_train_samples=None,
        log_every=20,
        out="runs/demo",
    )


def test_command_line_recipes():
    """Synthetic data: the demo; modest or a path: the original; --recipe chooses; flags override either."""
    from lib.train import make_config

    assert _cli_config("--model", "masknet").loss == "bce_lovasz"
    original = _cli_config("--data", "some/folder")
    assert (original.recipe, original.optimizer, original.lr, original.weight_decay, original.epochs) == (
        "original",
        "sgd",
        0.1,
        1e-8,
        12,
    )
    assert (original.batch_size, original.image_size, original.loss, original.reshoot) == (32, 224, "bce_rmse", False)
    assert _cli_config("--data", "modest").recipe == "original"
    assert _cli_config("--recipe", "original").data == "modest"
    assert _cli_config("--recipe", "demo", "--data", "x").batch_size == 8
    assert _cli_config("--data", "some/folder", "--weight-decay", "1e-4").weight_decay == 1e-4
    assert _cli_config("--optimizer", "sgd").weight_decay == 1e-8  # the demo's AdamW decay does not follow to SGD
    assert _cli_config("--image-size", "128", "--epochs", "12").image_size == 128
    assert _cli_config("--no-reshoot").reshoot is False and _cli_config("--data", "x", "--reshoot").reshoot is True
    assert make_config("demo", model="masknet", epochs=2) == _cli_config("--model", "masknet", "--epochs", "2")
    with pytest.raises(UserError, match="no setting named epoch"):
        make_config("demo", epoch=3)
    with pytest.raises(UserError, match="unknown recipe 'fast'"):
        make_config("fast")


def test_recipe_is_printed_and_saved(small_modest, tmp_path, capsys):
    from lib.train import make_config

    cfg = make_config("demo", epochs=1, image_size=32, workers=0, out=str(tmp_path))
    fit(cfg, small_modest, progress=False)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("recipe demo (changed: epochs=1, image_size=32): depthnet") and "adamw lr 0.002" in first
    assert load_checkpoint(tmp_path / "last.pt")["config"]["recipe"] == "demo"


def test_the_notebook_loop_reproduces_fit(small_modest, tmp_path):
    """The parts a notebook calls one by one give fit's numbers (demo recipe, two epochs, thread loader)."""
    import math

    import lib.train as train
    from lib.data import make_loaders
    from lib.losses import make_loss
    from lib.models import make_model

    cfg = train.make_config("demo", epochs=2, image_size=32, workers=2, out=str(tmp_path / "fit"), device="cpu")
    expected = fit(cfg, small_modest, progress=False)

    out = tmp_path / "notebook"
    device = torch.device("cpu")
    train.seed_everything(cfg.seed)
    model = make_model(cfg.model).to(device, memory_format=torch.channels_last)  # built as the notebooks build it
    train_loader, val_loader = make_loaders(
        small_modest,
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        num_workers=cfg.workers,
        device=device,
        augment=cfg.augment,
        reshoot=cfg.reshoot,
        split_by=cfg.split_by,
        seed=cfg.seed,
    )
    loss_fn = make_loss(cfg.loss, cfg.model)
    optimizer = train.make_optimizer(cfg, model)
    scheduler = train.make_scheduler(cfg, optimizer, len(train_loader))
    history, best, start = train.resume_run(out, model, optimizer, scheduler)
    assert (history, best, start) == ([], math.inf, 1)
    for epoch in range(start, cfg.epochs + 1):
        result = train.train_one_epoch(
            model, train_loader, loss_fn, optimizer, device, scheduler=scheduler, channels_last=True
        )
        val = train.evaluate(model, val_loader, loss_fn, device, channels_last=True)
        record = train.make_epoch_record(epoch, result, val)
        history.append(record)
        improved = record["val_loss"] < best
        best = min(best, record["val_loss"])
        train.save_epoch(out, cfg, epoch, model, optimizer, scheduler, None, history, best, improved)
        print(train.format_epoch(record, improved))
    assert len(history) == len(expected) == 2
    for a, b in zip(expected, history):
        for key in ("train_loss", "val_loss", "lr", "mask_iou", "depth_rmse"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    assert json.loads((out / "history.json").read_text()) == history
    assert train.resume_run(out, make_model("depthnet"), optimizer)[2] == 3  # a finished run: the loop is empty
    with pytest.raises(UserError, match="last.pt: holds a depthnet checkpoint, but --model is masknet"):
        train.resume_run(out, make_model("masknet"), optimizer)


@pytest.mark.parametrize("model", ["masknet", "depthnet"])
def test_resume_from_the_command_line_needs_only_out(small_modest, tmp_path, monkeypatch, model):
    """`python -m lib.train --out RUN --resume` takes the model, the recipe and the data from the checkpoint."""
    from lib.train import main

    monkeypatch.setenv("LIB_DEVICE", "cpu")
    out = str(tmp_path / "run")
    tiny = [
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--quiet",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
    ]
    assert main(["--model", model, "--data", str(small_modest), "--out", out, "--epochs", "1", *tiny]) == 0
    assert main(["--out", out, "--resume", "--epochs", "2", "--quiet"]) == 0
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 2 and state["config"]["model"] == model
    assert (state["config"]["recipe"], state["config"]["data"]) == ("original", str(small_modest))
    assert state["config"]["batch_size"] == 8 and state["config"]["image_size"] == 32
    with pytest.raises(UserError, match=r"trained with --lr 0\.001, not 0\.5; a resumed run keeps its recipe"):
        main(["--out", out, "--resume", "--epochs", "3", "--lr", "0.5", "--quiet"])
    with pytest.raises(UserError, match="follows recipe original, not demo"):
        main(["--out", out, "--resume", "--epochs", "3", "--recipe", "demo", "--quiet"])


def test_a_kill_between_best_and_last_leaves_a_run_whose_best_is_the_best(small_modest, tmp_path, monkeypatch):
    """Kill an epoch that improved between its two checkpoint writes, resume: best.pt holds the best epoch."""
    import lib.train as train

    val_losses = {1: 3.0, 2: 1.0, 3: 2.0}  # epoch 2 improves; epoch 3, after the resume, does not
    real_record, real_save = train.make_epoch_record, train.save_checkpoint

    def record(epoch, result, val, lr=None):
        return {**real_record(epoch, result, val, lr), "val_loss": val_losses[epoch]}

    writes: list[str] = []

    def save_then_die(path, state):
        if state["epoch"] == 2 and len([w for w in writes if w.startswith("2:")]) == 1:
            raise KeyboardInterrupt  # the second write of epoch 2, in whichever order the files come
        writes.append(f"{state['epoch']}:{path.name}")
        real_save(path, state)

    monkeypatch.setattr(train, "make_epoch_record", record)
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    cfg = _cfg(tmp_path, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, small_modest, progress=False)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["best_val_loss"] <= last["best_val_loss"]  # last.pt never claims a best that is not on disk
    history = fit(cfg, small_modest, resume=True, progress=False)
    assert [r["val_loss"] for r in history] == [3.0, 1.0, 2.0]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2


def test_progress_in_a_log_file_is_one_line_per_epoch(small_modest, tmp_path, monkeypatch):
    """stderr redirected to a file gets no progress bar redraws; stdout gets one line per epoch."""
    from lib.train import interactive_output, main

    class Terminal:
        def isatty(self):
            return True

    assert interactive_output(Terminal()) and not interactive_output(open(tmp_path / "f", "w"))
    monkeypatch.setenv("LIB_DEVICE", "cpu")
    args = ["--data", str(small_modest), "--out", str(tmp_path / "run"), "--epochs", "2", "--image-size", "32"]
    with open(tmp_path / "stderr.log", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        assert main([*args, "--batch-size", "4", "--workers", "0", "--optimizer", "adamw", "--lr", "1e-3"]) == 0
    text = (tmp_path / "stderr.log").read_text()
    assert text.count("\r") == 0 and text.count("\n") <= 2, text[:500]


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
