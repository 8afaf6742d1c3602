"""MODEST reading from folders and zips, splits, binarisation, the plain loaders (threads, processes), augmentation."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from conftest import assert_same_batches, corrupt_tiny_modest, load_batches, write_tiny_modest, zip_folder

from lib.augment import _hsv_to_rgb, _rgb_to_hsv, apply_augment, jitter_batch, make_train_augment
from lib.data import (
    BG_MEAN,
    BG_STD,
    ModestDataset,
    ThreadLoader,
    make_loader,
    make_loaders,
    make_split,
    normalize,
    resize,
    resize_tensor,
    stack_channels_last,
)
from lib.errors import DataError, UserError
from lib.zipindex import ZipIndex

ROOT = Path(__file__).resolve().parents[1]


def _equal_samples(a: ModestDataset, b: ModestDataset) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["name"] == y["name"]
        for key in ("bg", "bg_fg", "mask", "depth"):
            assert torch.equal(x[key], y[key]), (i, key)


@pytest.mark.parametrize("top", [None, "MODEST"])
def test_folder_and_zip_read_identically(tiny_modest, tmp_path, top):
    zip_path = zip_folder(tiny_modest, tmp_path / "modest.zip", top=top)
    _equal_samples(ModestDataset(tiny_modest), ModestDataset(zip_path))


def test_deflated_zip_reads_too(tiny_modest, tmp_path):
    zip_path = tmp_path / "deflated.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(tiny_modest.rglob("*")):
            z.write(path, path.relative_to(tiny_modest).as_posix())
    _equal_samples(ModestDataset(tiny_modest), ModestDataset(zip_path))


def test_sample_format(tiny_modest):
    sample = ModestDataset(tiny_modest)[0]
    assert sample["bg"].shape == (3, 64, 64) and sample["bg"].dtype == torch.uint8
    assert sample["bg_fg"].shape == (3, 64, 64)
    assert sample["mask"].shape == (1, 64, 64) and set(sample["mask"].unique().tolist()) == {0, 1}
    assert sample["depth"].shape == (1, 64, 64) and sample["depth"].max() > 200  # brighter = farther, as stored
    assert sample["name"] == "bg001_fg001_01"
    box = (sample["mask"][0] == 1).nonzero()
    assert (box.max(0).values - box.min(0).values + 1).tolist() == [32, 16]  # the exact rectangle


def test_mask_binarised_at_128(tmp_path):
    root = write_tiny_modest(tmp_path / "d", n_bg=1, n_fg=1, n_place=1)
    mask = np.zeros((64, 64, 1), np.uint8)
    mask[:, :32] = 140  # JPEG-ish grey just above the threshold
    mask[:, 32:] = 110
    (root / "bg_fg_mask" / "bg001_fg001_01_mask.jpeg").write_bytes(
        simplejpeg.encode_jpeg(mask, quality=100, colorspace="GRAY")
    )
    out = ModestDataset(root)[0]["mask"][0]
    assert out[:, :30].min() == 1 and out[:, 34:].max() == 0


def test_image_size_resizes_all_four(tiny_modest):
    sample = ModestDataset(tiny_modest, image_size=32)[3]
    assert [tuple(sample[k].shape[1:]) for k in ("bg", "bg_fg", "mask", "depth")] == [(32, 32)] * 4
    assert set(sample["mask"].unique().tolist()) <= {0, 1}


def test_shrunk_mask_is_the_majority_of_each_new_pixel():
    # A blob with ragged edges, shrunk 3x: a new pixel is foreground when most of its 9 source pixels are
    # (what the area-shrunk photo shows there), on the CPU (OpenCV) and the device (torch) paths alike.
    # Nearest sampling would take one of the 9 and differ along the edges.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:60, :60]
    radius = 18 + 4 * np.sin(np.arctan2(yy - 30, xx - 30) * 5) + rng.uniform(-1, 1, (60, 60))
    mask = np.where(np.hypot(yy - 30, xx - 30) < radius, 255, 0).astype(np.uint8)  # (60, 60)
    majority = mask.reshape(20, 3, 20, 3).mean((1, 3)) > 127.5  # (20, 20)
    cpu = resize(mask, 20, mask=True) > 127
    device = resize_tensor(torch.from_numpy(mask)[None, None], 20, mask=True)[0, 0].numpy() > 127
    nearest = mask[1::3, 1::3] > 127
    assert (cpu == majority).all() and (device == majority).all()
    assert (nearest != majority).sum() > 0  # the case is one where the two rules disagree
    big = resize(mask, 120, mask=True)  # enlarging stays binary (nearest)
    assert set(np.unique(big).tolist()) == {0, 255}


def test_splits_are_deterministic_disjoint_and_complete(tiny_modest):
    train = ModestDataset(tiny_modest, "train", seed=1)
    val = ModestDataset(tiny_modest, "val", seed=1)
    assert len(train) + len(val) == 24 and len(val) == int(24 * 0.3)
    assert not set(train.rows) & set(val.rows)
    assert np.array_equal(train.rows, ModestDataset(tiny_modest, "train", seed=1).rows)
    assert not np.array_equal(train.rows, ModestDataset(tiny_modest, "train", seed=2).rows)


def test_sample_split_matches_random_split():
    """split_by='sample' draws the permutation torch.utils.data.random_split draws for the same seed."""
    n = 1000
    subsets = torch.utils.data.random_split(range(n), [0.7, 0.3], generator=torch.Generator().manual_seed(1))
    bg_ids = np.zeros(n, np.int64)
    assert sorted(subsets[0].indices) == make_split(bg_ids, "train", 0.3, "sample", 1).tolist()
    assert sorted(subsets[1].indices) == make_split(bg_ids, "val", 0.3, "sample", 1).tolist()


def test_background_split_keeps_rooms_on_one_side(tiny_modest):
    train = ModestDataset(tiny_modest, "train", split_by="background")
    val = ModestDataset(tiny_modest, "val", split_by="background")
    train_bgs, val_bgs = set(train.bg_ids[train.rows]), set(val.bg_ids[val.rows])
    assert train_bgs and val_bgs and not train_bgs & val_bgs
    assert len(train) + len(val) == 24


def test_missing_file_is_named_with_its_line(tmp_path):
    root = write_tiny_modest(tmp_path / "d", n_bg=1, n_fg=1, n_place=2)
    (root / "bg_fg_depth_map" / "bg001_fg001_03_depth_map.jpeg").unlink()
    with pytest.raises(DataError, match=r"file_map.txt line 3: depth file bg_fg_depth_map/bg001_fg001_03_depth_map"):
        ModestDataset(root)


def test_malformed_line_is_named(tmp_path):
    root = write_tiny_modest(tmp_path / "d", n_bg=1, n_fg=1, n_place=1)
    with open(root / "file_map.txt", "a") as f:
        f.write("\n  bg001 bg001_fg001_01\n")  # blank lines are fine; two names are not
    with pytest.raises(DataError, match=r"file_map.txt line 4: expected 4 names"):
        ModestDataset(root)


def test_other_whitespace_is_tolerated(tmp_path):
    root = write_tiny_modest(tmp_path / "d", n_bg=1, n_fg=1, n_place=1)
    text = (root / "file_map.txt").read_text().replace("\t", "   ")
    (root / "file_map.txt").write_text(text.replace("\n", "\r\n"))
    assert len(ModestDataset(root)) == 2


@pytest.mark.parametrize("case", ["missing", "empty", "not_zip", "no_file_map", "truncated_zip"])
def test_bad_dataset_paths(tmp_path, tiny_modest, case):
    path = tmp_path / "x"
    if case == "empty":
        path.mkdir()
    elif case == "not_zip":
        path.write_text("hello")
    elif case == "no_file_map":
        path = tmp_path / "x.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("bg/bg001.jpeg", b"123")
    elif case == "truncated_zip":
        data = zip_folder(tiny_modest, tmp_path / "full.zip").read_bytes()
        path = tmp_path / "x.zip"
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=str(path.name)):
        ModestDataset(path)


def test_zip_index_matches_zipfile_and_caches(tiny_modest, tmp_path):
    zip_path = zip_folder(tiny_modest, tmp_path / "m.zip")
    index = ZipIndex(zip_path)
    assert (tmp_path / "m.zip.index.npz").exists()
    with zipfile.ZipFile(zip_path) as z:
        assert [n.decode() for n in index.names] == sorted(z.namelist())
        for i in range(0, len(index), 7):
            assert index.read(i) == z.read(index.names[i].decode())
            assert index.check_crc(i)
    again = ZipIndex(zip_path)
    assert np.array_equal(again.offsets, index.offsets)


def test_zip64_members_are_found(tmp_path):
    path = tmp_path / "z64.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("big.bin", "w", force_zip64=True) as f:
            f.write(b"a" * 1000)
        z.writestr("after.txt", b"hello")
    index = ZipIndex(path, cache=False)
    assert index.read(int(index.find([b"after.txt"])[0])) == b"hello"
    assert index.read(int(index.find([b"big.bin"])[0])) == b"a" * 1000


def test_corrupt_image_mid_epoch_names_the_file_or_is_skipped(tmp_path):
    torch.manual_seed(0)  # the shuffled, drop_last train loader must not depend on earlier tests' RNG use
    root = write_tiny_modest(tmp_path / "d", n_bg=2, n_fg=1, n_place=2)
    bad = root / "bg_fg" / "bg002_fg001_02.jpeg"
    bad.write_bytes(b"this is not a jpeg")
    loaders = make_loaders(root, batch_size=4, num_workers=0, device="cpu", augment=False, val_fraction=0.25)
    with pytest.raises(DataError, match="bg002_fg001_02.jpeg: not a readable image"):
        for loader in loaders:
            for _ in loader:
                pass
    train, val = make_loaders(root, batch_size=3, num_workers=1, device="cpu", skip_bad_samples=True, val_fraction=0.25)
    seen = [name for loader in (train, val) for batch in loader for name in batch["name"]]
    skipped = train.skipped + val.skipped
    assert [name for name, _ in skipped] == ["bg002_fg001_02"]
    assert len(seen) == 7 and "bg002_fg001_02" not in seen


def test_mismatched_sizes_are_reported(tmp_path):
    root = write_tiny_modest(tmp_path / "d", n_bg=1, n_fg=1, n_place=1)
    small = np.zeros((48, 64), np.uint8)[:, :, None]
    (root / "bg_fg_mask" / "bg001_fg001_02_mask.jpeg").write_bytes(simplejpeg.encode_jpeg(small, colorspace="GRAY"))
    with pytest.raises(DataError, match=r"bg001_fg001_02_mask.jpeg: size 64x48 does not match"):
        ModestDataset(root)[1]


def test_grayscale_background_is_converted(tmp_path):
    root = write_tiny_modest(tmp_path / "d", n_bg=1, n_fg=1, n_place=1)
    gray = np.full((64, 64, 1), 90, np.uint8)
    (root / "bg" / "bg001.jpeg").write_bytes(simplejpeg.encode_jpeg(gray, colorspace="GRAY"))
    assert ModestDataset(root)[0]["bg"].shape == (3, 64, 64)


def test_bad_arguments():
    with pytest.raises(UserError, match="split"):
        ModestDataset("/nonexistent", split="test")
    with pytest.raises(UserError, match="batch_size"):
        make_loaders("/nonexistent", batch_size=0)


def test_loader_batches_are_normalised_floats(tiny_modest):
    train, val = make_loaders(tiny_modest, batch_size=5, num_workers=2, device="cpu", image_size=32)
    batch = next(iter(val))
    assert batch["bg"].dtype == torch.float32 and batch["bg"].shape == (5, 3, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert 0.0 <= batch["depth"].min() and batch["depth"].max() <= 1.0
    raw = val.dataset[0]["bg"].float() / 255
    expected = (raw - torch.tensor(BG_MEAN).view(3, 1, 1)) / torch.tensor(BG_STD).view(3, 1, 1)
    torch.testing.assert_close(batch["bg"][0], expected)
    assert sum(len(b["name"]) for b in train) == len(train.dataset) - len(train.dataset) % 5  # drop_last


@pytest.mark.parametrize("loader", ["threads", "processes"])
def test_cpu_batches_arrive_channels_last_with_the_same_numbers(tiny_modest, loader):
    """Samples keep the decoders' HWC memory; the batch is channels-last from the first copy on, as the model runs."""
    dataset = ModestDataset(tiny_modest, image_size=32)
    batch = next(iter(make_loader(dataset, batch_size=9, shuffle=False, num_workers=2, device="cpu", loader=loader)))
    for key in ("bg", "bg_fg"):
        assert batch[key].is_contiguous(memory_format=torch.channels_last), key
        raw = torch.stack([dataset[i][key] for i in range(9)])  # (9, 3, 32, 32) uint8
        torch.testing.assert_close(batch[key], normalize(raw, key), rtol=0, atol=1e-5)
    assert torch.equal(batch["mask"], torch.stack([dataset[i]["mask"] for i in range(9)]).float())


def test_stack_channels_last_keeps_values_and_rejects_mixed_sizes():
    images = [torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8) for _ in range(4)]
    images[1] = images[1].permute(1, 2, 0).contiguous().permute(2, 0, 1)  # HWC memory, as `_chw` hands them out
    out = stack_channels_last(images)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, torch.stack(images))
    with pytest.raises(UserError, match=r"\(3, 5, 7\) and \(3, 5, 6\)"):
        stack_channels_last([images[0], images[0][:, :, :6]])


def test_samples_never_share_memory_with_the_background_cache(tiny_modest):
    dataset = ModestDataset(tiny_modest)
    first = dataset[0]["bg"].clone()
    dataset[0]["bg"].zero_()  # a caller writing into its sample must not change what the next one reads
    assert torch.equal(dataset[0]["bg"], first) and first.max() > 0


# ---------------------------------------------------------------- augmentation


def _pair(seed: int):
    rng = np.random.default_rng(seed)
    bg = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    bg_fg, mask = bg.copy(), np.zeros((48, 40), np.uint8)
    bg_fg[10:30, 5:15] = rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)
    mask[10:30, 5:15] = 1
    depth = np.tile(np.arange(40, dtype=np.uint8) * 6, (48, 1))
    depth[mask == 1] = 3
    return bg, bg_fg, mask, depth


@pytest.mark.parametrize("seed", range(12))
def test_augmentation_keeps_four_images_aligned_and_shares_the_photometric_draw(seed):
    bg, bg_fg, mask, depth = _pair(seed)
    aug = make_train_augment(p_flip=0.5, p_color=1.0, seed=seed)
    a_bg, a_bg_fg, a_mask, a_depth = apply_augment(aug, bg, bg_fg, mask, depth)
    flipped = not np.array_equal(a_mask, mask)
    assert np.array_equal(a_mask, mask[:, ::-1] if flipped else mask)
    assert np.array_equal(a_depth, depth[:, ::-1] if flipped else depth)
    outside = a_mask == 0
    assert np.array_equal(a_bg[outside], a_bg_fg[outside])  # one draw: unchanged pixels stay identical
    assert not np.array_equal(a_bg, bg[:, ::-1] if flipped else bg)  # and the colours did change


def test_augmentation_flips_half_the_time():
    bg, bg_fg, mask, depth = _pair(0)
    aug = make_train_augment(seed=3)
    flips = sum(not np.array_equal(apply_augment(aug, bg, bg_fg, mask, depth)[2], mask) for _ in range(200))
    assert 70 < flips < 130


def test_hsv_round_trip():
    rgb = torch.rand(2, 3, 9, 9)
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(rgb)), rgb, atol=1e-5, rtol=0)


def test_gpu_jitter_shares_the_draw_and_is_identity_at_p0():
    bg = torch.rand(4, 3, 16, 16)
    bg_fg = bg.clone()
    bg_fg[:, :, 4:8, 4:8] = torch.rand(4, 3, 4, 4)
    out_bg, out_bg_fg = jitter_batch(bg, bg_fg, p=1.0, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[4:8, 4:8] = False
    torch.testing.assert_close(out_bg[:, :, keep], out_bg_fg[:, :, keep])
    assert (out_bg - bg).abs().max() > 0.01
    same_bg, _ = jitter_batch(bg, bg_fg, p=0.0)
    torch.testing.assert_close(same_bg, bg, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the loaders of the plain path


@pytest.mark.parametrize("image_size", [None, 32])
def test_thread_loader_yields_what_the_process_loader_yields(tiny_modest, image_size):
    dataset = ModestDataset(tiny_modest, image_size=image_size)
    threads = load_batches(dataset, loader="threads", data_mode="cpu")
    assert (
        type(make_loader(dataset, batch_size=5, shuffle=False, num_workers=2, device="cpu", loader="threads").loader)
        is ThreadLoader
    )
    assert_same_batches(threads, load_batches(dataset, loader="processes", data_mode="cpu"))
    assert_same_batches(threads, load_batches(dataset, loader="processes", data_mode="cpu", num_workers=0))
    assert sum(len(b["name"]) for b in threads) == len(dataset)


def test_thread_loader_augmentation_repeats_for_a_seed_whatever_the_thread_count(tiny_modest):
    train = ModestDataset(tiny_modest).subset("train", augment=True)

    def run(workers: int) -> list[dict]:
        torch.manual_seed(7)
        return load_batches(train, loader="threads", data_mode="cpu", shuffle=True, num_workers=workers)

    one, two = run(1), run(2)
    assert_same_batches(one, two)
    plain = {n: i for i, n in enumerate(train.sample_names[train.rows].astype(str))}
    assert sorted(n for b in one for n in b["name"]) == sorted(plain)  # shuffled, every sample once
    torch.manual_seed(8)
    other = load_batches(train, loader="threads", data_mode="cpu", shuffle=True, num_workers=2)
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


@pytest.mark.parametrize("loader", ["threads", "processes"])
def test_bad_file_is_named_or_skipped_in_every_loader(tmp_path, loader):
    root = corrupt_tiny_modest(tmp_path, "bg_fg/bg001_fg001_03.jpeg")
    dataset = ModestDataset(root)
    with pytest.raises(DataError, match="bg001_fg001_03.jpeg"):
        load_batches(dataset, loader=loader, data_mode="cpu")
    dev = make_loader(
        dataset, batch_size=5, shuffle=False, num_workers=2, device="cpu", loader=loader, skip_bad_samples=True
    )
    names = [n for b in dev for n in b["name"]]
    assert len(names) == len(dataset) - 1 and "bg001_fg001_03" not in names
    assert [name for name, _ in dev.skipped] == ["bg001_fg001_03"]


def test_cpu_float_conversion_by_table_equals_the_arithmetic():
    """normalize on a CPU uint8 batch (one cv2.LUT per image) gives the float path's numbers exactly."""
    every = torch.arange(256, dtype=torch.uint8)
    x = {
        "bg": every.view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous(),
        "bg_fg": every.flip(0).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous(),
        "depth": every.view(1, 1, 16, 16).expand(2, 1, 16, 16).contiguous(),
    }
    for key, batch in x.items():
        fast = normalize(batch, key)
        slow = normalize(batch.float() / 255.0, key)
        assert fast.dtype == torch.float32 and torch.equal(fast, slow), key
    expected = (every.float() - BG_MEAN[1] * 255) / (BG_STD[1] * 255)
    torch.testing.assert_close(normalize(x["bg"], "bg")[0, 1].flatten(), expected)
    assert torch.equal(normalize(x["depth"], "depth")[0, 0].flatten(), every.float() / 255.0)


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


def test_missing_albumentations_is_reported_only_when_the_cpu_pipeline_runs(monkeypatch):
    import lib.augment as augment

    monkeypatch.setattr(augment, "A", None)
    aug = augment.make_train_augment()
    aug.set_random_seed(3)  # fit seeds it: fine
    with pytest.raises(UserError, match="albumentations"):
        augment.apply_augment(aug, *(np.zeros((4, 4, 3), np.uint8),) * 2, *(np.zeros((4, 4), np.uint8),) * 2)


@pytest.mark.slow
def test_plain_path_loads_and_trains_without_the_fast_path(tiny_modest):
    """lib/fastpath.py can be deleted: with its import blocked, make_loaders serves batches and a model trains."""
    code = f"""
import sys
sys.modules["lib.fastpath"] = None  # as if the file were deleted: importing it raises ImportError
import torch
from lib.data import make_loaders
from lib.errors import UserError
from lib.losses import make_loss
from lib.models import make_model
train_loader, val_loader = make_loaders({str(tiny_modest)!r}, batch_size=4, image_size=32, num_workers=2, device="cpu")
model = make_model("masknet")
loss_fn = make_loss("bce", "masknet")
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for step, batch in zip(range(2), train_loader):
    outputs = model(batch["bg"], batch["bg_fg"])
    loss, parts = loss_fn(outputs, batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
assert sum(len(b["name"]) for b in val_loader) == len(val_loader.dataset)
try:
    make_loaders({str(tiny_modest)!r}, batch_size=4, device="cpu", data_mode="gpu")
except UserError as exc:
    assert "fastpath" in str(exc)
else:
    raise AssertionError("data_mode='gpu' without lib/fastpath.py must fail")
assert "lib.fastpath" not in [m for m, v in sys.modules.items() if v is not None]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_make_loaders_reshoots_the_training_bg_only_when_asked(tiny_modest):
    from lib.augment import Augment

    train, val = make_loaders(tiny_modest, batch_size=4, num_workers=0, device="cpu", image_size=32, reshoot=True)
    assert isinstance(train.dataset.augment, Augment) and train.dataset.augment.reshoot.level == "train"
    assert train.dataset.augment.shared is not None  # the shared flip and jitter stay
    assert val.dataset.augment is None  # validation sees the pairs as they are
    plain, _ = make_loaders(tiny_modest, batch_size=4, num_workers=0, device="cpu", image_size=32)
    assert not isinstance(plain.dataset.augment, Augment)  # the default keeps the original augmentation
    batch = next(iter(train))
    assert batch["bg"].shape == (4, 3, 32, 32) and torch.isfinite(batch["bg"]).all()
