"""The re-shoot: bg alone is perturbed (labels stay aligned), the CPU and GPU paths agree in distribution, the
evaluation's draws are per sample and reproducible, and the switch reaches the recipes."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from lib.augment import (
    RESHOOT_LEVELS,
    TRAIN_UNTOUCHED,
    apply_reshoot,
    cast_shadow,
    make_reshoot,
    reshoot_batch,
    shadow_factor,
)
from lib.data import ModestDataset, make_loader

SIZE = 48


def make_scenes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n photo-like (smooth, textured, mid-grey: gains do not clip) HWC uint8 images and HW masks of a 'person'
    standing above the bottom edge."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    masks = np.zeros((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        noise = rng.normal(0, 1, (SIZE, SIZE, 3)).astype(np.float32)
        texture = cv2.GaussianBlur(noise, (0, 0), 1.5)
        texture = texture / texture.std() * 0.12 + rng.uniform(0.35, 0.6, 3)
        images[i] = np.clip(texture * 255 + 0.5, 0, 255).astype(np.uint8)
        top, left = rng.integers(4, 16), rng.integers(4, 30)
        masks[i, top : top + 24, left : left + 10] = 1
    return images, masks


def run_cpu(level: str, images: np.ndarray, masks: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The CPU path over a stack of samples: (bg, bg_fg) stacks, bg_fg starting as a copy of bg."""
    reshoot = make_reshoot(level, seed=seed)
    pairs = [apply_reshoot(reshoot, img, img.copy(), m) for img, m in zip(images, masks)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def run_gpu(level: str, images: np.ndarray, masks: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The GPU path (`reshoot_batch`, here on CPU tensors) over the same stack, back to HWC uint8."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    m = torch.from_numpy(masks)[:, None]  # (N, 1, H, W)
    bg, bg_fg = reshoot_batch(x, x.clone(), m, level, generator=torch.Generator().manual_seed(seed))

    def back(t: torch.Tensor) -> np.ndarray:
        return (t * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)

    return back(bg), back(bg_fg)


def estimate_shift(before: np.ndarray, after: np.ndarray, reach: int = 6) -> tuple[int, int]:
    """(dx, dy) in whole pixels: the move with the highest normalised cross-correlation of the grey interiors
    (sign: after = before moved by +d)."""
    a, b = before.astype(np.float64).mean(-1), after.astype(np.float64).mean(-1)
    inner = b[reach:-reach, reach:-reach]
    inner = (inner - inner.mean()) / inner.std()
    best, best_score = (0, 0), -np.inf
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            crop = a[reach - dy : SIZE - reach - dy, reach - dx : SIZE - reach - dx]
            score = (inner * (crop - crop.mean())).sum() / crop.std()
            if score > best_score:
                best, best_score = (dx, dy), score
    return best


def statistics(images: np.ndarray, bg: np.ndarray) -> dict[str, np.ndarray]:
    """Per sample: the per-channel mean ratio after/before, the mean absolute change, |shift| per axis, untouched."""
    before, after = images.astype(np.float64), bg.astype(np.float64)
    shifts = np.array([estimate_shift(x, y) for x, y in zip(images, bg)])  # (N, 2)
    return {
        "ratio": after.mean((1, 2)) / before.mean((1, 2)),  # (N, 3)
        "change": np.abs(after - before).mean((1, 2, 3)),  # (N,)
        "shift": np.abs(shifts),  # (N, 2)
        "untouched": np.all(after == before, axis=(1, 2, 3)),  # (N,)
    }


# ----------------------------------------------------------------------------------------------- labels aligned


@pytest.mark.parametrize("level", ["mild", "strong", "train"])
@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_reshoot_moves_bg_only_and_the_shadow_never_touches_the_person(level, path):
    images, masks = make_scenes(40, seed=1)
    masks_before = masks.copy()
    bg, bg_fg = (run_cpu if path == "cpu" else run_gpu)(level, images, masks, seed=2)
    assert np.array_equal(masks, masks_before)  # read, never written
    moved = (bg != images).any(axis=(1, 2, 3)).mean()
    if level == "train":  # the share TRAIN_UNTOUCHED is left as shot (40 samples: a binomial's sd is about 0.08)
        assert moved == pytest.approx(1 - TRAIN_UNTOUCHED, abs=0.2)
    else:
        assert moved > 0.99
    person = masks.astype(bool)
    assert np.array_equal(bg_fg[person], images[person])  # masked pixels of bg_fg: never touched
    shaded = (bg_fg != images).any(axis=(1, 2, 3))
    if level == "train":
        assert 0.2 < shaded.mean() < 0.8  # the shadow comes with some probability
        assert np.all(bg_fg <= images)  # and only darkens
    else:
        assert not shaded.any()  # the evaluation levels leave bg_fg as it is


def test_shadow_sits_under_the_feet_and_skips_figures_cut_by_the_bottom_edge():
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 12:18] = 1  # feet on row 23
    factor = shadow_factor(mask, darkness=0.5, width=1.0, flatness=0.3, offset=0.0)
    dark = factor < 1
    rows = np.flatnonzero(dark.any(1))
    assert 20 <= rows.min() and rows.max() <= 26  # a flat ellipse around the feet' row
    assert factor[24, 15] == pytest.approx(0.5, abs=0.05)  # darkest just under the feet, by `darkness`
    assert not dark[mask == 1].any()
    mask[24:, 12:18] = 1  # now the figure reaches the bottom row: no floor in sight
    assert shadow_factor(mask, 0.5, 1.0, 0.3, 0.0) is None
    # the torch version (GPU path) computes the same factors
    x = torch.ones(1, 3, 32, 32)
    params = [torch.tensor([v]) for v in (0.5, 1.0, 0.3, 0.0)]
    mask[24:] = 0
    y = cast_shadow(x, torch.from_numpy(mask)[None, None], *params)
    np.testing.assert_allclose(y[0, 0].numpy(), shadow_factor(mask, 0.5, 1.0, 0.3, 0.0), atol=1e-6)


def test_reshoot_in_the_dataset_leaves_bg_fg_mask_and_depth_as_they_are(tiny_modest):
    plain = ModestDataset(tiny_modest, image_size=32)
    shot = ModestDataset(tiny_modest, image_size=32, reshoot="strong", reshoot_seed=0)
    for i in range(6):
        a, b = plain[i], shot[i]
        for key in ("bg_fg", "mask", "depth"):
            assert torch.equal(a[key], b[key]), key
        assert not torch.equal(a["bg"], b["bg"])


# --------------------------------------------------------------------------------------- CPU and GPU agree


@pytest.mark.parametrize("level", ["mild", "strong", "train"])
def test_cpu_and_gpu_paths_have_the_same_statistics(level):
    images, masks = make_scenes(300, seed=3)
    cpu = statistics(images, run_cpu(level, images, masks, seed=4)[0])
    gpu = statistics(images, run_gpu(level, images, masks, seed=5)[0])
    for stats in (cpu, gpu):
        touched = ~stats["untouched"]
        # the definition, measured: ratio spread = exposure and white balance, uniform; |shift| of a uniform integer
        if level != "train":
            spec = RESHOOT_LEVELS[level]
            spread = np.sqrt((spec.exposure**2 + spec.white_balance**2) / 3)
            standard_error = spread / np.sqrt(len(images))
            assert stats["ratio"].mean() == pytest.approx(1.0, abs=4 * standard_error)
            assert stats["ratio"].std() == pytest.approx(spread, rel=0.15)
            expected_shift = np.abs(np.arange(-spec.shift, spec.shift + 1)).mean()
            assert stats["shift"].mean() == pytest.approx(expected_shift, abs=0.15)
            assert stats["shift"].max() == spec.shift
            assert touched.all()
        else:
            assert stats["untouched"].mean() == pytest.approx(TRAIN_UNTOUCHED, abs=0.07)
    assert cpu["ratio"].std() == pytest.approx(gpu["ratio"].std(), rel=0.15)
    assert cpu["change"].mean() == pytest.approx(gpu["change"].mean(), rel=0.1)
    assert cpu["shift"].mean() == pytest.approx(gpu["shift"].mean(), abs=0.2)
    # and the same share of samples at each |shift|, per axis
    for k in range(int(max(cpu["shift"].max(), gpu["shift"].max())) + 1):
        assert (cpu["shift"] == k).mean() == pytest.approx((gpu["shift"] == k).mean(), abs=0.07)


def test_gpu_path_leaves_untouched_samples_bit_exact_and_moves_content_like_albumentations():
    images, masks = make_scenes(1, seed=6)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    # the same move both ways: shift (+3, -2) px, no rotation or zoom
    import albumentations as A

    from lib.augment import _move

    cpu = A.Affine(translate_px={"x": (3, 3), "y": (-2, -2)}, border_mode=cv2.BORDER_REFLECT, p=1)(image=images[0])
    gpu = _move(x, torch.tensor([3.0]), torch.tensor([-2.0]), torch.zeros(1), torch.ones(1))
    gpu = (gpu[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(cpu["image"][4:-4, 4:-4], gpu[4:-4, 4:-4])  # the interior: identical pixels
    assert estimate_shift(images[0], gpu) == (3, -2)


# ------------------------------------------------------------------------------------- evaluation: seeded


def test_per_sample_draws_do_not_depend_on_batch_size_workers_or_order(tiny_modest):
    def bgs(batch_size: int, workers: int, loader: str = "threads") -> torch.Tensor:
        dataset = ModestDataset(tiny_modest, image_size=32, reshoot="mild", reshoot_seed=11)
        batches = make_loader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=workers, device="cpu", loader=loader
        )
        return torch.cat([b["bg"] for b in batches])

    first = bgs(4, 0)
    assert torch.equal(first, bgs(7, 2))
    assert torch.equal(first, bgs(5, 2, loader="processes"))
    dataset = ModestDataset(tiny_modest, image_size=32, reshoot="mild", reshoot_seed=11)
    assert torch.equal(dataset[5]["bg"], dataset[5]["bg"])  # the same sample twice, any order
    other = ModestDataset(tiny_modest, image_size=32, reshoot="mild", reshoot_seed=12)
    assert not torch.equal(dataset[5]["bg"], other[5]["bg"])


def test_gpu_mode_training_loader_reshoots_bg_on_the_device(tiny_modest):
    dataset = ModestDataset(tiny_modest, image_size=32).subset("train", augment=False, reshoot="strong")
    loader = make_loader(dataset, batch_size=6, shuffle=False, num_workers=0, device="cpu", data_mode="gpu")
    assert loader.data_mode == "gpu" and loader.reshoot == "strong" and not loader.augment
    plain = make_loader(
        ModestDataset(tiny_modest, image_size=32).subset("train"),
        batch_size=6,
        shuffle=False,
        num_workers=0,
        device="cpu",
        data_mode="gpu",
    )
    for a, b in zip(loader, plain):
        assert not torch.equal(a["bg"], b["bg"])
        for key in ("bg_fg", "mask", "depth"):
            assert torch.equal(a[key], b[key]), key


def test_evaluate_reshoot_is_reproducible_and_hurts_differencing(tiny_modest, tmp_path, capsys):
    from lib.evaluate import main
    from lib.train import Config, fit

    cfg = Config(model="depthnet", epochs=1, batch_size=8, image_size=32, workers=0, out=str(tmp_path), lr=1e-3)
    cfg.optimizer, cfg.max_train_samples = "adamw", 8
    fit(cfg, tiny_modest, progress=False)

    def run(*extra: str) -> dict:
        capsys.readouterr()
        argv = ["--checkpoint", str(tmp_path / "last.pt"), "--data", str(tiny_modest), "--baseline", *extra]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    clean = run("--workers", "0")
    mild = run("--reshoot", "mild", "--batch-size", "5", "--workers", "0")
    again = run("--reshoot", "mild", "--batch-size", "7", "--workers", "2")
    assert set(mild) == set(again)
    for key, value in mild.items():  # the same pairs; only the summation order of the model's numbers differs
        assert again[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    assert mild["baseline_mask_iou"] < clean["baseline_mask_iou"] - 0.1  # noisy rooms: a 1 px move hurts
    assert clean["reshoot"] == "none" and mild["reshoot"] == "mild"
    # the constant mean depth: an answer with no learning, scored like the model
    assert 0 < clean["baseline_depth_rmse"] < 1 and 0 <= clean["baseline_depth_delta1"] <= 1
    assert {"depth_absrel_aligned", "depth_delta1_aligned", "depth_rmse_aligned"} <= set(clean)


# ---------------------------------------------------------------------------------------------- the switch


def test_the_switch_is_on_for_the_demo_and_off_for_the_original_recipe():
    from lib.train import build_parser, config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(list(argv)))

    assert cfg().reshoot is True
    assert cfg("--no-reshoot").reshoot is False
    assert cfg("--data", "some/folder").reshoot is False
    assert cfg("--data", "some/folder", "--reshoot").reshoot is True
