"""torchrun with two CPU processes (gloo): metrics equal a single-process evaluate, rank 0 alone writes, --resume.

Each torchrun run starts two Python processes that import torch, so the file takes about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_modest

from lib.data import make_split
from lib.train import EpochSampler, ShardSampler, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = {"last.pt", "best.pt", "history.json", "curves.png", "predictions.png"}


def _torchrun(args: list[str], cwd: Path = ROOT, script: str | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node=2 --standalone -m lib.train ARGS` on the CPU (gloo)."""
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "LIB_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    target = [script] if script else ["-m", "lib.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *target, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _train_args(data: Path, out: Path, epochs: int) -> list[str]:
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--quiet",
        "--optimizer",
        "adamw",
        "--lr",
        "0.003",
        "--skip-bad-samples",
    ]


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> tuple[Path, str]:
    """2 bg x 2 fg x 6 placements = 24 samples at 32 px (17 train, 7 val: uneven shards), one train bg_fg corrupt."""
    root = write_tiny_modest(tmp_path_factory.mktemp("ddp") / "modest", n_bg=2, n_fg=2, n_place=3, size=32)
    names = [line.split("\t")[1] for line in (root / "file_map.txt").read_text().splitlines()]
    train_rows = make_split(np.zeros(len(names), np.int64), "train", 0.3, "sample", 1)
    seen = set(range(len(train_rows)))  # train positions both ranks reach in epochs 1-3 (one is trimmed each epoch)
    for epoch in (1, 2, 3):
        shards = [EpochSampler(len(train_rows), 1, None, rank, 2) for rank in (0, 1)]
        for shard in shards:
            shard.set_epoch(epoch)
        seen &= {i for shard in shards for i in shard}
    bad = names[int(train_rows[min(seen)])]
    (root / "bg_fg" / f"{bad}.jpeg").write_bytes(b"\xff\xd8 this is not a JPEG")
    return root, bad


@pytest.fixture(scope="module")
def straight_run(ddp_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Three epochs under torchrun, uninterrupted."""
    out = tmp_path_factory.mktemp("straight") / "run"
    done = _torchrun(_train_args(ddp_data[0], out, 3))
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done


def _evaluate_in_process(checkpoint: Path, data: Path, capsys) -> dict:
    from lib.evaluate import main

    capsys.readouterr()
    assert (
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--data",
                str(data),
                "--split",
                "val",
                "--workers",
                "0",
                "--batch-size",
                "5",
            ]
        )
        == 0
    )
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_ddp_validation_metrics_equal_a_single_process_evaluate(straight_run, ddp_data, capsys, monkeypatch):
    out, _ = straight_run
    monkeypatch.setenv("LIB_DEVICE", "cpu")
    last = json.loads((out / "history.json").read_text())[-1]
    single = _evaluate_in_process(out / "last.pt", ddp_data[0], capsys)
    assert last["samples"] == single["samples"] == 7  # shards of 4 and 3: each val sample counted once
    assert last["depth_rmse"] > 0
    for key in (
        "mask_iou",
        "mask_iou_total",
        "mask_dice",
        "depth_rmse",
        "depth_mae",
        "depth_absrel",
        "depth_delta1",
        "depth_ssim",
    ):
        assert last[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_only_rank_zero_writes_logs_and_lists_every_ranks_skipped_sample(straight_run, ddp_data):
    out, done = straight_run
    assert {p.name for p in out.iterdir()} == RUN_FILES  # no second history, no stray temp files
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert load_checkpoint(out / "last.pt")["epoch"] == 3
    assert all(r["skipped"] == [ddp_data[1]] for r in history)  # whichever rank met it
    assert done.stdout.count("epoch   1 |") == 1 and done.stdout.count("done: best epoch") == 1
    assert "x2" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_resume_under_torchrun_continues_like_the_straight_run(straight_run, ddp_data, tmp_path):
    out, _ = straight_run
    first = _torchrun(_train_args(ddp_data[0], tmp_path / "run", 1))
    assert first.returncode == 0, first.stdout + first.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    resumed = _torchrun(_train_args(ddp_data[0], tmp_path / "run", 3) + ["--resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "epoch   1 |" not in resumed.stdout and resumed.stdout.count("epoch   3 |") == 1
    straight = json.loads((out / "history.json").read_text())
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for a, b in zip(straight, history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    wa, wb = load_checkpoint(out / "last.pt")["model"], load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_ranks_make_the_synthetic_demo_data_once(tmp_path):
    """Without a lock, both ranks generated data/synthetic-... and one crashed renaming the other's folder."""
    script = tmp_path / "demo.py"
    script.write_text(
        "import sys\nimport lib.train as train\nfrom lib.errors import run_cli\n"
        "train.DEMO_DATA = dict(size=32, backgrounds=3, foregrounds=2, placements=2, seed=0)\n"
        "sys.exit(run_cli(train.main))\n"
    )
    done = _torchrun(
        ["--epochs", "1", "--image-size", "32", "--workers", "0", "--quiet", "--out", "runs/x"],
        cwd=tmp_path,
        script=str(script),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "data" / "synthetic-32px-3x2x4-seed0" / "file_map.txt").is_file()
    assert load_checkpoint(tmp_path / "runs" / "x" / "last.pt")["epoch"] == 1


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path, monkeypatch):
    """SyncBatchNorm has no CPU kernel: say so before joining the process group (torch would raise mid-epoch)."""
    from lib.errors import UserError
    from lib.train import Config, fit

    monkeypatch.setenv("LIB_DEVICE", "cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--sync-bn needs CUDA GPUs"):
        fit(Config(sync_bn=True, image_size=32, out=str(tmp_path)), tmp_path, progress=False)


def test_epoch_sampler_shards_one_permutation_across_ranks():
    single = list(EpochSampler(11, seed=3, limit=9))
    shards = [EpochSampler(11, seed=3, limit=9, rank=r, world_size=2) for r in range(2)]
    for s in [*shards]:
        s.set_epoch(0)
    parts = [list(s) for s in shards]
    assert [len(p) for p in parts] == [4, 4] == [len(s) for s in shards]
    assert sorted(parts[0] + parts[1]) == sorted(single[:8])  # what one process sees, less the odd one out
    for s in shards:
        s.set_epoch(1)
    assert [list(s) for s in shards] != parts  # a fresh permutation each epoch


def test_shard_sampler_counts_every_sample_once():
    shards = [list(ShardSampler(7, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(7))
