"""Bad input to the real commands: a non-zero exit, one `error:` line naming the file (and line) or argument, no traceback.

Every case runs a real command as a subprocess: `python -m lib.train` or `python -m lib.evaluate` on a 12-sample,
32 px dataset, or `python tools/quality.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from conftest import write_tiny_modest, zip_folder

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    "-m",
    "lib.train",
    "--epochs",
    "1",
    "--image-size",
    "32",
    "--workers",
    "0",
    "--batch-size",
    "3",
    "--quiet",
    "--model",
    "masknet",
    "--optimizer",
    "adamw",
    "--lr",
    "0.001",
]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "LIB_DEVICE": "cpu"}
    env.pop("LIB_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _train(data: Path | str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run([*TRAIN, "--data", str(data), "--out", str(out), *extra])


def _assert_error(done: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit code 2, no traceback, and an `error:` line matching `pattern`; return that line."""
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2 bg x 1 fg x 6 placements = 12 samples at 32 px; copied before any test damages it."""
    return write_tiny_modest(tmp_path_factory.mktemp("cli") / "modest", n_bg=2, n_fg=1, n_place=3, size=32)


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    """A private copy of the dataset to damage."""
    return Path(shutil.copytree(dataset, tmp_path / "data"))


@pytest.fixture(scope="module")
def masknet_run(dataset, tmp_path_factory) -> Path:
    """A finished 1-epoch MaskNet run folder (trained in process: quicker than a subprocess)."""
    from lib.train import Config, fit

    out = tmp_path_factory.mktemp("run") / "masknet"
    fit(
        Config(
            model="masknet", epochs=1, batch_size=4, image_size=32, workers=0, optimizer="adamw", lr=1e-3, out=str(out)
        ),
        dataset,
        progress=False,
    )
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ---------------------------------------------------------------------------------------------- the dataset path


def test_dataset_path_that_does_not_exist(tmp_path):
    _assert_error(
        _train(tmp_path / "nowhere", tmp_path / "run"), rf"{re.escape(str(tmp_path / 'nowhere'))}: dataset not found"
    )


def test_dataset_folder_that_is_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_error(_train(tmp_path / "empty", tmp_path / "run"), r"empty: the folder is empty")


def test_dataset_that_is_neither_a_folder_nor_a_zip(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    _assert_error(_train(tmp_path / "data.txt", tmp_path / "run"), r"data\.txt: neither a folder nor a zip file")


def test_file_map_missing(copy, tmp_path):
    (copy / "file_map.txt").unlink()
    _assert_error(_train(copy, tmp_path / "run"), rf"{re.escape(str(copy))}: no file_map\.txt found")


def test_file_map_line_with_the_wrong_field_count(copy, tmp_path):
    lines = _lines(copy / "file_map.txt")
    lines[4] = "\t".join(lines[4].split("\t")[:3])
    (copy / "file_map.txt").write_text("\n".join(lines) + "\n")
    _assert_error(_train(copy, tmp_path / "run"), r"file_map\.txt line 5: expected 4 names .*found 3")


def test_file_map_name_of_a_missing_file(copy, tmp_path):
    lines = _lines(copy / "file_map.txt")
    lines[6] = lines[6].replace("bg002_fg001_01\t", "bg002_fg001_99\t")
    (copy / "file_map.txt").write_text("\n".join(lines) + "\n")
    _assert_error(
        _train(copy, tmp_path / "run"), r"file_map\.txt line 7: bg_fg file bg_fg/bg002_fg001_99\.jpeg not found"
    )


def test_truncated_zip(dataset, tmp_path):
    whole = zip_folder(dataset, tmp_path / "whole.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[: len(whole) * 2 // 3])
    _assert_error(_train(tmp_path / "cut.zip", tmp_path / "run"), r"cut\.zip: .*(truncated|not a zip)")


def test_corrupt_zip(dataset, tmp_path):
    data = bytearray(zip_folder(dataset, tmp_path / "whole.zip").read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end - 400 : end] = os.urandom(400)  # the tail of the central directory
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    _assert_error(_train(tmp_path / "bad.zip", tmp_path / "run"), r"bad\.zip: .*(corrupt|damaged|truncated|not found)")


def test_zip_without_file_map(copy, tmp_path):
    (copy / "file_map.txt").unlink()
    zipped = zip_folder(copy, tmp_path / "nomap.zip", top="modest")
    _assert_error(_train(zipped, tmp_path / "run"), r"nomap\.zip: no file_map\.txt found")


# ---------------------------------------------------------------------------------------------- images met in training


def test_corrupt_jpeg_met_in_training_names_the_file(copy, tmp_path):
    path = copy / "bg_fg" / "bg001_fg001_02.jpeg"
    path.write_bytes(path.read_bytes()[:200])  # a truncated JPEG
    _assert_error(
        _train(copy, tmp_path / "run"), r"bg_fg/bg001_fg001_02\.jpeg: not a readable image.*--skip-bad-samples"
    )


def test_non_image_with_a_jpeg_name_names_the_file(copy, tmp_path):
    (copy / "bg_fg_depth_map" / "bg002_fg001_03_depth_map.jpeg").write_text("<html>quota exceeded</html>")
    _assert_error(
        _train(copy, tmp_path / "run"), r"bg_fg_depth_map/bg002_fg001_03_depth_map\.jpeg: not a readable image"
    )


@pytest.mark.slow
def test_skip_bad_samples_finishes_and_lists_them(copy, tmp_path):
    (copy / "bg_fg_mask" / "bg001_fg001_04_mask.jpeg").write_bytes(b"\xff\xd8\xff garbage")
    done = _train(copy, tmp_path / "run", "--skip-bad-samples", "--epochs", "2")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    said = [ln for ln in done.stdout.splitlines() if "skipped 1 bad sample" in ln]
    assert len(said) == 2 and "bg_fg_mask/bg001_fg001_04_mask.jpeg" in said[0]  # once per epoch, naming the file
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["skipped"] for r in history] == [["bg001_fg001_04"], ["bg001_fg001_04"]]


def test_images_of_a_sample_with_mismatched_sizes(copy, tmp_path):
    rng = np.random.default_rng(0)
    (copy / "bg_fg" / "bg002_fg001_05.jpeg").write_bytes(
        simplejpeg.encode_jpeg(rng.integers(0, 255, (40, 32, 3), dtype=np.uint8))
    )
    _assert_error(
        _train(copy, tmp_path / "run"),
        r"bg_fg/bg002_fg001_05\.jpeg: size 32x40 does not match its background's 32x32 .*bg/bg002\.jpeg",
    )


@pytest.mark.slow
def test_grayscale_background_is_not_an_error(copy, tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(40, 200, (32, 32, 1), dtype=np.uint8)
    (copy / "bg" / "bg001.jpeg").write_bytes(simplejpeg.encode_jpeg(gray, colorspace="GRAY"))
    done = _train(copy, tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "last.pt").is_file()


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--epochs", "-1"], r"--epochs must be at least 1, not -1"),
        (
            ["--model", "depthnet", "--image-size", "48"],
            r"--image-size 48 does not work for depthnet: use a multiple of 32",
        ),
        (["--batch-size", "0"], r"--batch-size must be at least 1, not 0"),
        (["--loss", "bce_rmse"], r"--loss 'bce_rmse' does not fit masknet"),
        (["--lr", "-0.1"], r"--lr must be a positive number"),
        (["--workers", "-2"], r"--workers must be 0 or more"),
        (["--ahead", "-1"], r"--ahead must be 0 or more, not -1"),
    ],
    ids=[
        "negative_epochs",
        "depthnet_size",
        "batch_size_0",
        "depth_loss_for_masknet",
        "negative_lr",
        "workers",
        "ahead",
    ],
)
def test_nonsense_arguments_are_named(dataset, tmp_path, args, pattern):
    _assert_error(_train(dataset, tmp_path / "run", *args), pattern)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
        (["--model", "unet"], "argument --model: invalid choice: 'unet'"),
        (["--loss", "hinge"], "argument --loss: invalid choice: 'hinge'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ],
    ids=["wrong_type", "unknown_model", "unknown_loss", "unknown_device"],
)
def test_argument_argparse_refuses_is_named(dataset, tmp_path, args, message):
    done = _train(dataset, tmp_path / "run", *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "command", [["-m", "lib.train"], ["-m", "lib.evaluate"], ["-m", "lib.predict"], ["data_download.py", "synthetic"]]
)
def test_help_shows_real_defaults_choices_and_debug(command):
    done = _run([*command, "--help"])
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines
    assert "--debug" in text and "(default: None)" not in text
    if command == ["-m", "lib.train"]:
        for choices in ("{original,demo}", "{masknet,depthnet}", "{sgd,adamw}", "{none,onecycle,cosine}"):
            assert choices in text
        assert "{auto,threads,processes}" in text and "{auto,cpu,gpu}" in text and "{auto,cpu,cuda,mps}" in text
        assert "original 12; demo 5" in text  # the recipes' epochs, in words


def test_synthetic_download_asks_before_writing_gigabytes(tmp_path):
    """The default sizes (400,000 samples) are refused without --yes, saying the count and size; nothing written."""
    import data_download
    from lib.errors import UserError

    with pytest.raises(UserError, match=r"make 400,000 samples .*about 8\.\d GB.*add --yes"):
        data_download.main(["synthetic", "--out", str(tmp_path / "big"), "--quiet"])
    assert not (tmp_path / "big").exists()
    done = _run(
        [
            "data_download.py",
            "synthetic",
            "--out",
            str(tmp_path / "small"),
            "--size",
            "32",
            "--backgrounds",
            "1",
            "--foregrounds",
            "1",
            "--placements",
            "1",
            "--quiet",
        ]
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("writing 2 samples (1 backgrounds x 1 foregrounds x 2 placements")
    assert done.stdout.splitlines()[-1].startswith("wrote 2 samples")


# ---------------------------------------------------------------------------------------------- checkpoints


def test_resume_with_the_other_model(masknet_run, dataset, tmp_path):
    out = Path(shutil.copytree(masknet_run, tmp_path / "run"))
    line = _assert_error(
        _train(dataset, out, "--model", "depthnet", "--resume", "--epochs", "2"),
        r"last\.pt: holds a masknet checkpoint, but --model is depthnet",
    )
    assert str(out) in line


def test_resume_with_no_checkpoint(dataset, tmp_path):
    _assert_error(_train(dataset, tmp_path / "run", "--resume"), r"run/last\.pt: checkpoint not found")


def test_resume_from_a_file_that_is_not_a_checkpoint(dataset, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(os.urandom(1000))
    _assert_error(
        _train(dataset, tmp_path / "run", "--resume", "--epochs", "2"), r"run/last\.pt: not a readable checkpoint"
    )


def test_evaluate_with_a_garbage_checkpoint(dataset, tmp_path):
    (tmp_path / "model.pt").write_text("definitely not torch")
    _assert_error(
        _run(["-m", "lib.evaluate", "--checkpoint", str(tmp_path / "model.pt"), "--data", str(dataset)]),
        r"model\.pt: not a readable checkpoint",
    )


def test_evaluate_with_a_foreign_torch_file(dataset, tmp_path):
    import torch

    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    _assert_error(
        _run(["-m", "lib.evaluate", "--checkpoint", str(tmp_path / "foreign.pt"), "--data", str(dataset)]),
        r"foreign\.pt: not a checkpoint written by lib\.train",
    )


def test_evaluate_on_a_missing_dataset(masknet_run, tmp_path):
    _assert_error(
        _run(["-m", "lib.evaluate", "--checkpoint", str(masknet_run / "last.pt"), "--data", str(tmp_path / "gone")]),
        r"gone: dataset not found",
    )


def test_evaluate_meets_a_corrupt_image(masknet_run, copy):
    (copy / "bg" / "bg002.jpeg").write_bytes(b"GIF89a not even a jpeg")
    _assert_error(
        _run(
            ["-m", "lib.evaluate", "--checkpoint", str(masknet_run / "last.pt"), "--data", str(copy), "--workers", "0"]
        ),
        r"bg/bg002\.jpeg: not a readable image",
    )


def test_evaluate_with_nonsense_arguments(masknet_run, dataset):
    _assert_error(
        _run(
            [
                "-m",
                "lib.evaluate",
                "--checkpoint",
                str(masknet_run / "last.pt"),
                "--data",
                str(dataset),
                "--batch-size",
                "0",
            ]
        ),
        r"--batch-size must be at least 1, not 0",
    )


def test_starting_over_a_run_folder_is_refused_and_leaves_its_checkpoints(dataset, masknet_run, tmp_path):
    """A new run (no --resume) over a folder that holds best.pt/last.pt stops before touching them."""
    out = Path(shutil.copytree(masknet_run, tmp_path / "run"))
    before = {name: (out / name).read_bytes() for name in ("best.pt", "last.pt")}
    line = _assert_error(_train(dataset, out), r"holds a run; continue it with --resume")
    assert str(out / "best.pt") in line
    assert {name: (out / name).read_bytes() for name in before} == before


def test_quality_score_names_a_missing_set_then_a_missing_checkpoint(tmp_path):
    missing = tmp_path / "nowhere.pt"
    score = ["tools/quality.py", "score", str(missing), "--root", str(tmp_path), "--out", str(tmp_path / "q.jsonl")]
    _assert_error(_run(score), re.escape(str(tmp_path / "test-synthetic-s101")) + ": evaluation set not found")
    (tmp_path / "tune-synthetic-s7").mkdir()  # the tuning set's folder: now the checkpoint is what is missing
    _assert_error(_run([*score, "--role", "tune"]), re.escape(str(missing)) + ": checkpoint not found")
    assert not (tmp_path / "q.jsonl").exists()
