"""The GPU fast path (lib/fastpath.py), run on the CPU: GPU data mode, device decode, batches prepared ahead."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_batches, corrupt_tiny_modest, load_batches

from lib.augment import flip_batch
from lib.data import BG_FG_MEAN, BG_FG_STD, BG_MEAN, BG_STD, ModestDataset, ThreadLoader, make_loader
from lib.errors import DataError, UserError
from lib.fastpath import DeviceSamples, FastLoader, collate_device_samples, load_backgrounds

KEYS = ("bg", "bg_fg", "mask", "depth")


def _denormalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)  # (B, 3, H, W) in [0, 1]


@pytest.mark.parametrize("loader", ["threads", "processes"])
def test_bad_file_is_named_or_skipped_in_gpu_mode(tmp_path, loader):
    root = corrupt_tiny_modest(tmp_path, "bg_fg/bg001_fg001_03.jpeg")
    dataset = ModestDataset(root)
    with pytest.raises(DataError, match="bg001_fg001_03.jpeg"):
        load_batches(dataset, loader=loader, data_mode="gpu")
    dev = make_loader(
        dataset,
        batch_size=5,
        shuffle=False,
        num_workers=2,
        device="cpu",
        loader=loader,
        data_mode="gpu",
        skip_bad_samples=True,
    )
    names = [n for b in dev for n in b["name"]]
    assert len(names) == len(dataset) - 1 and "bg001_fg001_03" not in names
    assert [name for name, _ in dev.skipped] == ["bg001_fg001_03"]


def test_decode_on_the_device_needs_cuda(tiny_modest):
    with pytest.raises(UserError, match="CUDA"):
        make_loader(
            ModestDataset(tiny_modest), batch_size=4, shuffle=False, device="cpu", data_mode="gpu", decode="device"
        )
    with pytest.raises(UserError, match="decode"):
        make_loader(ModestDataset(tiny_modest), batch_size=4, shuffle=False, device="cpu", decode="fpga")


def test_bad_background_fails_its_samples_in_gpu_mode(tmp_path):
    root = corrupt_tiny_modest(tmp_path, "bg/bg002.jpeg")
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
def test_batches_prepared_ahead_are_the_inlineload_batches(tiny_modest, mode, kind):
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
    assert_same_batches(run(2), inline)
    assert_same_batches(run(1), inline)
    assert sum(len(b["name"]) for b in inline) == len(train)
    assert make_loader(train, batch_size=5, shuffle=False, num_workers=0, device="cpu").ahead == 0  # the CPU default
    assert not _prep_threads()


def test_batches_prepared_ahead_stop_early_and_raise_errors(tmp_path):
    root = corrupt_tiny_modest(tmp_path, "bg_fg/bg002_fg001_01.jpeg")
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
        list(FastLoader(Broken(), "cpu", ahead=1))
    with pytest.raises(UserError, match="ahead"):
        FastLoader([], "cpu", ahead=-1)
    assert not _prep_threads()


# ---------------------------------------------------------------- GPU mode, run on the CPU


@pytest.mark.parametrize("loader", ["threads", "processes"])
@pytest.mark.parametrize("image_size", [None, 32])
def test_gpu_mode_without_augmentation_equals_cpu_mode_exactly(tiny_modest, loader, image_size):
    dataset = ModestDataset(tiny_modest, image_size=image_size)
    gpu = make_loader(dataset, batch_size=5, shuffle=False, num_workers=2, device="cpu", loader=loader, data_mode="gpu")
    assert gpu.data_mode == "gpu" and tuple(gpu.backgrounds.shape) == (3, 3, image_size or 64, image_size or 64)
    assert_same_batches(list(gpu), load_batches(dataset, loader=loader, data_mode="cpu"))


@pytest.mark.parametrize("image_size", [None, 32])
def test_encoded_batches_decode_to_the_same_samples(tiny_modest, image_size):
    """The GPU decode path (JPEG bytes collated, decoded after collation): CPU fallback exact, torchvision close."""
    dataset = ModestDataset(tiny_modest, image_size=image_size)
    reference = load_batches(dataset, data_mode="gpu")
    backgrounds, shapes, _ = load_backgrounds(dataset)
    for on_device in (False, True):  # True: torchvision's batched decode_jpeg, here on the CPU
        inner = ThreadLoader(
            DeviceSamples(dataset, encoded=True), batch_size=5, num_workers=2, collate_fn=collate_device_samples
        )
        batches = list(
            FastLoader(
                inner, "cpu", dataset=dataset, backgrounds=backgrounds, bg_shapes=shapes, decode_on_device=on_device
            )
        )
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
    root = corrupt_tiny_modest(tmp_path, "bg_fg_depth_map/bg002_fg001_02_depth_map.jpeg")
    dataset = ModestDataset(root)
    inner = ThreadLoader(
        DeviceSamples(dataset, encoded=True), batch_size=3, num_workers=2, collate_fn=collate_device_samples
    )
    loader = FastLoader(
        inner,
        "cpu",
        dataset=dataset,
        backgrounds=load_backgrounds(dataset)[0],
        bg_shapes=load_backgrounds(dataset)[1],
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
    loader = FastLoader([], "cpu", backgrounds=backgrounds, augment=True)
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
    plain = {n: b for b in load_batches(dataset, data_mode="cpu", batch_size=1) for n in b["name"]}
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
