"""Thread loader, GPU-mode data path (run on the CPU), and the bench command end to end on a tiny dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_modest

from lib.data import (
    ModestDataset,
    make_loader,
)
from lib.errors import UserError
from tools.bench import measure_ours_end_to_end

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("bg", "bg_fg", "mask", "depth")


def _batches(dataset, **kw) -> list[dict]:
    kw = {"batch_size": 5, "shuffle": False, "num_workers": 2, "device": "cpu", **kw}
    return list(make_loader(dataset, **kw))


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert [x["name"] for x in a] == [y["name"] for y in b]
    for x, y in zip(a, b):
        for key in KEYS:
            assert torch.equal(x[key], y[key]), key


def _denormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)  # (B, 3, H, W) in [0, 1]


# ---------------------------------------------------------------- bench


def test_many_member_zip_is_a_valid_zip64_that_the_index_reads(tmp_path):
    from lib.zipindex import ZipIndex
    from tools.bench import write_many_member_zip

    path = write_many_member_zip(tmp_path / "many.zip", 300)
    with zipfile.ZipFile(path) as z:
        assert len(z.namelist()) == 300 and z.testzip() is None
        names = sorted(z.namelist())
    index = ZipIndex(path, cache=False)
    assert [n.decode() for n in index.names] == names
    assert index.read(5) == b"x" and index.check_crc(299)


def test_bench_runs_end_to_end_and_prints_json(tmp_path):
    data = write_tiny_modest(tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "lib.bench", "--samples", "16", "--size", "64", "--data", str(data), "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert {"machine", "settings", "loader", "default_loader", "model_step", "end_to_end", "memory"} <= set(report)
    assert report["machine"]["date"] and report["machine"]["cpu"] and report["machine"]["device"] == "cpu"
    loaders = report["loader"]
    assert {"ours threads, cpu mode", "ours processes, cpu mode"} <= set(loaders)
    assert all(r["samples_per_s"] > 0 for r in loaders.values()), loaders
    assert report["default_loader"] in loaders
    assert {r["name"] for r in report["model_step"]} == {"depthnet fp32 eager", "masknet fp32 eager"}
    assert all(r["samples_per_s"] > 0 for r in report["model_step"])
    ours = report["end_to_end"]["ours"]
    assert ours["samples"] == 16 and ours["samples_per_s"] > 0 and ours["epoch_280k_min"] > 0
    assert report["memory"]["peak_rss"]["self_mb"] > 0
    assert "loader only" in out.stdout and "end to end" in out.stdout  # the table came first
    seed = [k for k in loaders if k.startswith("seed")]
    assert seed and "samples_per_s" in loaders[seed[0]]
    stages = report["cpu_stages"]  # per-sample CPU work, stage by stage, and what it allows
    assert set(stages["ms_per_sample"]) == {"read", "decode", "augment", "collate_and_float"}, stages
    assert all(v > 0 for v in stages["ms_per_sample"].values()) and stages["seed_style_ms"] > 0
    assert stages["total_ms"] == pytest.approx(sum(stages["ms_per_sample"].values()), abs=0.01)
    assert stages["ceiling_samples_per_s"] == pytest.approx(stages["cores"] * 1e3 / stages["total_ms"], rel=0.01)
    assert "CPU work per sample" in out.stdout


@pytest.mark.parametrize("loader, expected", [("processes", "DataLoader"), ("threads", "ThreadLoader")])
def test_end_to_end_measures_the_loader_it_is_given(tiny_modest, loader, expected):
    dataset = ModestDataset(tiny_modest, image_size=64)
    r = measure_ours_end_to_end(
        dataset, "masknet", 8, 4, 2, torch.device("cpu"), False, data_mode="gpu", decode="cpu", loader=loader
    )
    assert r["loader"] == expected and r["data_mode"] == "gpu" and r["decode_on_device"] is False
    assert r["samples"] == 8 and r["samples_per_s"] > 0


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux /proc")
def test_epoch_memory_test_follows_every_loader_process_through_an_epoch(tmp_path):
    from tools.bench import epoch_memory_test

    small = dict(size=32, backgrounds=4, foregrounds=3, placements=5, seed=0)  # 120 samples
    r = epoch_memory_test(tmp_path, workers=2, batch=8, data=small)
    assert r["samples_in_data"] == 120 and r["train_samples"] == 84 and Path(r["data"]).exists()
    for kind, processes in (("threads", 1), ("processes", 3)):
        m = r[kind]
        assert m["samples"] == 84, kind  # the whole epoch, every sample once
        assert m["trace"][-1]["samples"] == 84 and all(t["processes"] == processes for t in m["trace"]), m["trace"]
        assert m["first_mb"] == m["trace"][0]["self_mb"] + m["trace"][0]["children_mb"] > 0
        assert m["peak_mb"] >= max(m["first_mb"], m["last_mb"]) and m["growth_mb"] == m["last_mb"] - m["first_mb"]
    assert r["threads"]["largest_child_mb"] == 0 < r["processes"]["largest_child_mb"]
    again = epoch_memory_test(tmp_path, workers=1, batch=8, data=small, kinds=("threads",))
    assert again["data"] == r["data"] and "processes" not in again  # the zip is written once


def test_bench_rejects_bad_arguments():
    from tools.bench import main

    with pytest.raises(UserError, match="--size"):
        main(["--size", "50"])
    with pytest.raises(UserError, match="--models"):
        main(["--models", "unet"])
