"""Thread loader, GPU-mode data path (run on the CPU), and the bench command end to end on a tiny dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_modest

from lib.augment import flip_batch
from lib.bench import measure_ours_end_to_end
from lib.data import (
    BG_FG_MEAN,
    BG_FG_STD,
    BG_MEAN,
    BG_STD,
    DeviceLoader,
    DeviceSamples,
    ModestDataset,
    ThreadLoader,
    collate_device_samples,
    make_loader,
)
from lib.errors import DataError, UserError

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


# ---------------------------------------------------------------- thread loader


@pytest.mark.parametrize("image_size", [None, 32])
def test_thread_loader_yields_what_the_process_loader_yields(tiny_modest, image_size):
    dataset = ModestDataset(tiny_modest, image_size=image_size)
    threads = _batches(dataset, loader="threads", data_mode="cpu")
    assert (
        type(make_loader(dataset, batch_size=5, shuffle=False, num_workers=2, device="cpu", loader="threads").loader)
        is ThreadLoader
    )
    _assert_same(threads, _batches(dataset, loader="processes", data_mode="cpu"))
    _assert_same(threads, _batches(dataset, loader="processes", data_mode="cpu", num_workers=0))
    assert sum(len(b["name"]) for b in threads) == len(dataset)


def test_thread_loader_augmentation_repeats_for_a_seed_whatever_the_thread_count(tiny_modest):
    train = ModestDataset(tiny_modest).subset("train", augment=True)

    def run(workers: int) -> list[dict]:
        torch.manual_seed(7)
        return _batches(train, loader="threads", data_mode="cpu", shuffle=True, num_workers=workers)

    one, two = run(1), run(2)
    _assert_same(one, two)
    plain = {n: i for i, n in enumerate(train.sample_names[train.rows].astype(str))}
    assert sorted(n for b in one for n in b["name"]) == sorted(plain)  # shuffled, every sample once
    torch.manual_seed(8)
    other = _batches(train, loader="threads", data_mode="cpu", shuffle=True, num_workers=2)
    assert [b["name"] for b in other] != [b["name"] for b in one]


def test_thread_loader_raises_worker_errors_and_stops_early_cleanly():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            if i == 17:
                raise ValueError("boom")
            return {
                "name": str(i),
                "bg": torch.zeros(1),
                "bg_fg": torch.zeros(1),
                "mask": torch.zeros(1),
                "depth": torch.zeros(1),
            }

    loader = ThreadLoader(Broken(), batch_size=4, num_workers=2)
    assert len(loader) == 10
    with pytest.raises(ValueError, match="boom"):
        list(loader)
    it = iter(loader)
    assert next(it)["name"] == ["0", "1", "2", "3"]
    it.close()  # leaving early must not hang or leak errors
    with pytest.raises(UserError):
        ThreadLoader(Broken(), batch_size=4, num_workers=0)


def _corrupt(tmp_path: Path, member: str) -> Path:
    root = write_tiny_modest(tmp_path / "bad", n_bg=2, n_fg=1, n_place=2)
    (root / member).write_bytes(b"\xff\xd8 not really a jpeg")
    return root


@pytest.mark.parametrize("mode", ["cpu", "gpu"])
@pytest.mark.parametrize("loader", ["threads", "processes"])
def test_bad_file_is_named_or_skipped_in_every_loader(tmp_path, mode, loader):
    root = _corrupt(tmp_path, "bg_fg/bg001_fg001_03.jpeg")
    dataset = ModestDataset(root)
    with pytest.raises(DataError, match="bg001_fg001_03.jpeg"):
        _batches(dataset, loader=loader, data_mode=mode)
    dev = make_loader(
        dataset,
        batch_size=5,
        shuffle=False,
        num_workers=2,
        device="cpu",
        loader=loader,
        data_mode=mode,
        skip_bad_samples=True,
    )
    names = [n for b in dev for n in b["name"]]
    assert len(names) == len(dataset) - 1 and "bg001_fg001_03" not in names
    assert [name for name, _ in dev.skipped] == ["bg001_fg001_03"]


def test_bad_background_fails_its_samples_in_gpu_mode(tmp_path):
    root = _corrupt(tmp_path, "bg/bg002.jpeg")
    dev = make_loader(
        ModestDataset(root),
        batch_size=5,
        shuffle=False,
        num_workers=2,
        device="cpu",
        loader="threads",
        data_mode="gpu",
        skip_bad_samples=True,
    )
    names = [n for b in dev for n in b["name"]]
    assert names and all(n.startswith("bg001") for n in names)
    assert len(dev.skipped) == 4 and all("bg002.jpeg" in message for _, message in dev.skipped)


# ---------------------------------------------------------------- batches prepared ahead in a background thread


def _prep_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "modest-device-batches"]


@pytest.mark.parametrize("kind", ["threads", "processes"])
@pytest.mark.parametrize("mode", ["cpu", "gpu"])
def test_batches_prepared_ahead_are_the_inline_batches(tiny_modest, mode, kind):
    """Same batches, same augmentation draws, in the same order, whether a background thread prepares them or not."""
    train = ModestDataset(tiny_modest).subset("all", augment=True)

    def run(ahead: int) -> list[dict]:
        torch.manual_seed(3)
        loader = make_loader(
            train, batch_size=5, shuffle=True, num_workers=2, device="cpu", data_mode=mode, ahead=ahead, loader=kind
        )
        assert loader.ahead == ahead
        return list(loader)

    inline = run(0)
    _assert_same(run(2), inline)
    _assert_same(run(1), inline)
    assert sum(len(b["name"]) for b in inline) == len(train)
    assert make_loader(train, batch_size=5, shuffle=False, num_workers=0, device="cpu").ahead == 0  # the CPU default
    assert not _prep_threads()


def test_batches_prepared_ahead_stop_early_and_raise_errors(tmp_path):
    root = _corrupt(tmp_path, "bg_fg/bg002_fg001_01.jpeg")
    dataset = ModestDataset(root)
    loader = make_loader(dataset, batch_size=2, shuffle=False, num_workers=2, device="cpu", data_mode="gpu", ahead=2)
    it = iter(loader)
    assert next(it)["name"] == ["bg001_fg001_01", "bg001_fg001_02"]
    it.close()  # leaving early: the thread stops and is joined
    assert not _prep_threads()
    with pytest.raises(DataError, match="bg002_fg001_01.jpeg") as raised:
        list(loader)
    assert raised.tb is not None and not _prep_threads()  # stopped at once, not when the traceback is dropped
    loader.skip_bad_samples = True
    names = [n for b in loader for n in b["name"]]
    assert len(names) == len(dataset) - 1 and [name for name, _ in loader.skipped] == ["bg002_fg001_01"]

    class Broken:  # an error inside the loader itself reaches the consumer as it is
        def __iter__(self):
            raise ValueError("boom")
            yield

    with pytest.raises(ValueError, match="boom"):
        list(DeviceLoader(Broken(), "cpu", ahead=1))
    with pytest.raises(UserError, match="ahead"):
        DeviceLoader([], "cpu", ahead=-1)
    assert not _prep_threads()


# ---------------------------------------------------------------- GPU mode, run on the CPU


@pytest.mark.parametrize("loader", ["threads", "processes"])
@pytest.mark.parametrize("image_size", [None, 32])
def test_gpu_mode_without_augmentation_equals_cpu_mode_exactly(tiny_modest, loader, image_size):
    dataset = ModestDataset(tiny_modest, image_size=image_size)
    gpu = make_loader(dataset, batch_size=5, shuffle=False, num_workers=2, device="cpu", loader=loader, data_mode="gpu")
    assert gpu.data_mode == "gpu" and tuple(gpu.backgrounds.shape) == (3, 3, image_size or 64, image_size or 64)
    _assert_same(list(gpu), _batches(dataset, loader=loader, data_mode="cpu"))


def test_cpu_float_conversion_by_table_equals_the_arithmetic():
    every = torch.arange(256, dtype=torch.uint8)
    batch = {
        "name": ["a", "b"],
        "bg": every.view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous(),
        "bg_fg": every.flip(0).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous(),
        "mask": (every % 2).view(1, 1, 16, 16).expand(2, 1, 16, 16).contiguous(),
        "depth": every.view(1, 1, 16, 16).expand(2, 1, 16, 16).contiguous(),
    }
    loader = DeviceLoader([], "cpu")
    assert loader._luts is not None
    fast = loader.to_device(batch)
    loader._luts = None
    slow = loader.to_device(batch)
    for key in KEYS:
        assert fast[key].dtype == torch.float32 and torch.equal(fast[key], slow[key]), key
    expected = (every.float() - BG_MEAN[1] * 255) / (BG_STD[1] * 255)
    torch.testing.assert_close(fast["bg"][0, 1].flatten(), expected)


def test_default_loader_is_threads_with_workers_and_inline_without(tiny_modest):
    dataset = ModestDataset(tiny_modest)
    assert type(make_loader(dataset, batch_size=4, shuffle=False, num_workers=2, device="cpu").loader) is ThreadLoader
    assert (
        type(make_loader(dataset, batch_size=4, shuffle=False, num_workers=0, device="cpu").loader)
        is torch.utils.data.DataLoader
    )
    assert (
        type(make_loader(dataset, batch_size=4, shuffle=False, num_workers=2, device="cpu", loader="processes").loader)
        is torch.utils.data.DataLoader
    )


def test_auto_mode_is_cpu_on_the_cpu(tiny_modest):
    assert (
        make_loader(ModestDataset(tiny_modest), batch_size=4, shuffle=False, num_workers=0, device="cpu").data_mode
        == "cpu"
    )
    with pytest.raises(UserError, match="data_mode"):
        make_loader(ModestDataset(tiny_modest), batch_size=4, shuffle=False, device="cpu", data_mode="tpu")
    with pytest.raises(UserError, match="loader"):
        make_loader(ModestDataset(tiny_modest), batch_size=4, shuffle=False, device="cpu", loader="fibers")
    with pytest.raises(UserError, match="CUDA"):
        make_loader(
            ModestDataset(tiny_modest), batch_size=4, shuffle=False, device="cpu", data_mode="gpu", decode="device"
        )


@pytest.mark.parametrize("image_size", [None, 32])
def test_encoded_batches_decode_to_the_same_samples(tiny_modest, image_size):
    """The GPU decode path (JPEG bytes collated, decoded after collation): CPU fallback exact, torchvision close."""
    dataset = ModestDataset(tiny_modest, image_size=image_size)
    reference = _batches(dataset, data_mode="gpu")
    backgrounds = dataset.load_backgrounds()
    for on_device in (False, True):  # True: torchvision's batched decode_jpeg, here on the CPU
        inner = ThreadLoader(
            DeviceSamples(dataset, encoded=True), batch_size=5, num_workers=2, collate_fn=collate_device_samples
        )
        batches = list(DeviceLoader(inner, "cpu", dataset=dataset, backgrounds=backgrounds, decode_on_device=on_device))
        assert [b["name"] for b in batches] == [b["name"] for b in reference]
        for got, want in zip(batches, reference):
            assert torch.equal(got["bg"], want["bg"])
            if on_device:  # another libjpeg build and a torch resize: within a few grey levels
                torch.testing.assert_close(got["bg_fg"], want["bg_fg"], atol=0.1, rtol=0)
                assert (got["mask"] != want["mask"]).float().mean() < 0.01
                torch.testing.assert_close(got["depth"], want["depth"], atol=0.03, rtol=0)
            else:
                for key in KEYS:
                    assert torch.equal(got[key], want[key]), key


def test_encoded_batches_name_a_bad_file(tmp_path):
    root = _corrupt(tmp_path, "bg_fg_depth_map/bg002_fg001_02_depth_map.jpeg")
    dataset = ModestDataset(root)
    inner = ThreadLoader(
        DeviceSamples(dataset, encoded=True), batch_size=3, num_workers=2, collate_fn=collate_device_samples
    )
    loader = DeviceLoader(
        inner,
        "cpu",
        dataset=dataset,
        backgrounds=dataset.load_backgrounds(),
        decode_on_device=True,
        skip_bad_samples=True,
    )
    names = [n for b in loader for n in b["name"]]
    assert len(names) == len(dataset) - 1
    assert "bg002_fg001_02_depth_map.jpeg" in loader.skipped[0][1]


def test_gpu_mode_flip_keeps_the_four_aligned_and_shares_the_jitter():
    """Hand-made batch: bg_fg is bg with a patch; after the device-side flip and jitter, bg and bg_fg must still
    differ exactly where the (flipped) mask says, and mask and depth must flip with them."""
    n, h, w = 16, 8, 12
    gen = torch.Generator().manual_seed(0)
    backgrounds = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=gen)
    ids = torch.arange(n) % 2
    bg_fg = backgrounds[ids].clone()
    mask = torch.zeros(n, 1, h, w, dtype=torch.uint8)
    mask[:, :, 2:6, 1:4] = 1  # left of centre: a flip moves it
    bg_fg[:, :, 2:6, 1:4] = torch.tensor([250, 10, 10], dtype=torch.uint8).view(3, 1, 1)
    depth = torch.arange(w, dtype=torch.uint8).mul(20).expand(n, 1, h, w).clone()
    batch = {
        "name": [str(i) for i in range(n)],
        "errors": [],
        "bg_id": ids,
        "bg_fg": bg_fg,
        "mask": mask,
        "depth": depth,
    }
    loader = DeviceLoader([], "cpu", backgrounds=backgrounds, augment=True)
    loader.generator = torch.Generator().manual_seed(3)
    out = loader.to_device(batch)
    flipped = out["mask"].flip(-1).eq(mask.float()).flatten(1).all(1) & ~out["mask"].eq(mask.float()).flatten(1).all(1)
    assert 2 <= int(flipped.sum()) <= n - 2  # some flipped, some not
    for i in range(n):
        want_mask = mask[i].flip(-1) if flipped[i] else mask[i]
        assert torch.equal(out["mask"][i], want_mask.float())
        assert torch.equal(out["depth"][i], (depth[i].flip(-1) if flipped[i] else depth[i]).float() / 255)
    bg = _denormalise(out["bg"], BG_MEAN, BG_STD)
    fg = _denormalise(out["bg_fg"], BG_FG_MEAN, BG_FG_STD)
    outside = out["mask"].eq(0).expand(-1, 3, -1, -1)
    torch.testing.assert_close(bg[outside], fg[outside], atol=1e-4, rtol=0)  # one draw for both, same flip
    assert (bg - fg).abs().amax(1, keepdim=True)[out["mask"].bool()].mean() > 0.1  # the person still stands out
    raw = backgrounds[ids].float() / 255
    raw = torch.where(flipped.view(n, 1, 1, 1), raw.flip(-1), raw)
    changed = (bg - raw).abs().flatten(1).amax(1) > 0.02
    assert int(changed.sum()) >= 2  # the jitter ran


def test_gpu_mode_augmentation_on_real_batches_keeps_mask_and_depth_aligned(tiny_modest):
    dataset = ModestDataset(tiny_modest)
    plain = {n: b for b in _batches(dataset, data_mode="cpu", batch_size=1) for n in b["name"]}
    torch.manual_seed(0)
    loader = make_loader(
        dataset.subset("all", augment=True), batch_size=6, shuffle=False, num_workers=2, device="cpu", data_mode="gpu"
    )
    assert loader.augment
    flips = 0
    for b in loader:
        for i, name in enumerate(b["name"]):
            ref = plain[name]
            flip = not torch.equal(b["mask"][i], ref["mask"][0])
            flips += flip
            turn = (lambda x: x.flip(-1)) if flip else (lambda x: x)
            assert torch.equal(b["mask"][i], turn(ref["mask"][0]))
            assert torch.equal(b["depth"][i], turn(ref["depth"][0]))
    assert 0 < flips < len(dataset)


def test_flip_batch_flips_the_same_samples_in_every_tensor():
    x = torch.arange(40 * 6, dtype=torch.float32).view(40, 1, 1, 6)
    a, b, c = flip_batch([x, x * 2, x.to(torch.uint8)], 0.5, torch.Generator().manual_seed(1))
    flipped = (a != x).flatten(1).any(1)
    assert 10 < int(flipped.sum()) < 30
    assert torch.equal(b, a * 2) and torch.equal(c, a.to(torch.uint8))
    assert torch.equal(a[flipped], x[flipped].flip(-1)) and torch.equal(a[~flipped], x[~flipped])


def test_missing_albumentations_is_reported_only_when_the_cpu_pipeline_runs(monkeypatch):
    import lib.augment as augment

    monkeypatch.setattr(augment, "A", None)
    aug = augment.make_train_augment()
    aug.set_random_seed(3)  # fit seeds it: fine
    with pytest.raises(UserError, match="albumentations"):
        augment.apply_augment(aug, *(np.zeros((4, 4, 3), np.uint8),) * 2, *(np.zeros((4, 4), np.uint8),) * 2)


# ---------------------------------------------------------------- bench


def test_many_member_zip_is_a_valid_zip64_that_the_index_reads(tmp_path):
    from lib.bench import write_many_member_zip
    from lib.zipindex import ZipIndex

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
    from lib.bench import epoch_memory_test

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
    from lib.bench import main

    with pytest.raises(UserError, match="--size"):
        main(["--size", "50"])
    with pytest.raises(UserError, match="--models"):
        main(["--models", "unet"])
