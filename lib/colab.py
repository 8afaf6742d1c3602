"""The repository's GitHub slug (kept here and nowhere else) and the notebooks' Colab flows.

The flows: MODEST kept once on Google Drive and copied to the runtime's disk (`prepare_modest_on_colab`), data
chosen without surprise downloads (`resolve_notebook_data`), a run folder continued or protected (`plan_run`),
a CPU runtime stopped early (`check_runtime`), and the shipped weights when no run exists (`load_trained`).

Badges and the clone URL in README.md and the notebooks are written out from `REPO`; after changing
`REPO`, run `python -m lib.colab` to rewrite them (tests/test_notebooks.py checks that they agree).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

REPO = "bgfg-depth/modest-masknet"  # GitHub owner/name
BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
DRIVE = Path("/content/drive")
ROOT = Path(__file__).resolve().parent.parent

# Any Colab link to a GitHub notebook, and any GitHub clone URL: what `sync_links` rewrites and the tests read.
COLAB_LINK = re.compile(
    r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/([\w.-]+)/([\w./-]+\.ipynb)"
)
CLONE_LINK = re.compile(r'(git clone |REPO_URL = \\?")https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?(?=[\\"\s]|$)')


def repo_url(repo: str = REPO) -> str:
    """The repository's GitHub address (what the notebooks' setup cell clones)."""
    return f"https://github.com/{repo}"


def colab_url(notebook: str, repo: str = REPO, branch: str = BRANCH) -> str:
    """The Open-in-Colab address of `notebook`, a path relative to the repository root (e.g. notebooks/depthnet.ipynb)."""
    return f"https://colab.research.google.com/github/{repo}/blob/{branch}/{Path(notebook).as_posix()}"


def make_badge(notebook: str, repo: str = REPO, branch: str = BRANCH) -> str:
    """The Markdown Open-in-Colab badge for `notebook` (a path relative to the repository root)."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook, repo, branch)})"


def find_colab_links(text: str) -> list[tuple[str, str, str]]:
    """Every Colab-on-GitHub link in `text`, as (repo, branch, notebook path)."""
    return COLAB_LINK.findall(text)


def find_clone_urls(text: str) -> list[str]:
    """The repositories `text` clones (`git clone URL` lines, the notebooks' `REPO_URL = "..."`), as owner/name."""
    return [m.group(2) for m in CLONE_LINK.finditer(text)]


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def describe_device() -> str:
    """One line on the accelerator training will use, with a hint when there is none."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        count = torch.cuda.device_count()
        return f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB){f' x{count}' if count > 1 else ''}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "GPU: Apple silicon (mps)"
    hint = " (on Colab: Runtime > Change runtime type > GPU)" if in_colab() else ""
    return f"no GPU: training runs on the CPU{hint}"


def mount_drive(wanted: bool = True) -> Path | None:
    """On Colab, mount Google Drive (asks for permission once) and return MyDrive; elsewhere, or if not wanted, None."""
    if not (wanted and in_colab()):
        return None
    from google.colab import drive  # only exists on Colab

    if not (DRIVE / "MyDrive").is_dir():
        drive.mount(str(DRIVE))
    return DRIVE / "MyDrive"


def default_out(name: str, drive: Path | None) -> Path:
    """Where a notebook run is saved: Drive's MyDrive/modest-runs/NAME when mounted (survives a disconnect), else runs/NAME."""
    return drive / "modest-runs" / name if drive is not None else Path("runs") / name


# ---------------------------------------------------------------------------------------------- notebook flows

DRIVE_DATA = "modest-data"  # MyDrive/modest-data/: where the notebooks keep the one Drive copy of the MODEST zip
LOCAL_DATA = Path("data")  # the runtime's local disk (relative to the repository root): what training reads
WEIGHTS = ROOT / "weights"  # shipped weights: weights/masknet.pt, weights/depthnet.pt


def find_modest_on_drive(drive: Path) -> Path | None:
    """The MODEST zip already on Drive: our download, the user's copy in MyDrive, or Drive's 'Copy of ...'; else None."""
    from tools.download import REGISTRY

    name = REGISTRY["modest"]["filename"]
    for path in (drive / DRIVE_DATA / name, drive / name, drive / f"Copy of {name}"):
        if path.is_file():
            return path
    return None


def prepare_modest_on_colab(
    drive: Path,
    *,
    source: str | Path | None = None,
    local: Path | None = None,
    attempts: int = 3,
    progress: bool = True,
) -> Path:
    """MODEST on the runtime's local disk, via one copy on Drive: found there (or `source`), else downloaded there once.

    After a disconnect the local disk is empty again but Drive still holds the zip: it is copied, never downloaded.
    """
    from tools.download import REGISTRY, DownloadFailed, DriveRefused, download_modest, get_modest

    on_drive = Path(source) if source is not None else find_modest_on_drive(drive)
    if on_drive is None:
        for attempt in range(1, attempts + 1):  # gdown 5 (Colab's) does not retry inside one call; resume here
            try:
                on_drive = download_modest(drive / DRIVE_DATA, progress=progress).path
                break
            except DriveRefused as exc:
                entry = REGISTRY["modest"]
                why = str(exc).split(". Workaround:", 1)[0]
                raise DriveRefused(
                    f"{why}. In a browser open https://drive.google.com/file/d/{entry['drive_id']}/view and choose "
                    f"'Make a copy' (it lands in MyDrive as 'Copy of {entry['filename']}'), then run all again: "
                    f"the notebook finds it there (or set DATA to its path in the Parameters cell)"
                ) from None
            except DownloadFailed:
                if attempt == attempts:
                    raise
    return get_modest(LOCAL_DATA if local is None else local, from_path=on_drive, progress=progress).path


def resolve_notebook_data(
    data: str,
    *,
    drive: Path | None,
    download: bool | None = None,
    image_size: int | None = None,
    progress: bool = True,
) -> Path:
    """The data a notebook trains on: 'synthetic', 'modest' (via Drive on Colab) or a path; never a surprise download.

    Off Colab, 'modest' uses data/'s verified zip and downloads 6.6 GB only when `download` is True.
    """
    from tools.download import REGISTRY, read_stamp

    from .errors import UserError
    from .train import resolve_data

    if data == "synthetic":
        return resolve_data("synthetic", progress, image_size)
    if data != "modest":
        path = Path(data).expanduser()
        if drive is not None and path.suffix == ".zip" and DRIVE in path.parents:  # train from local disk, not Drive
            return prepare_modest_on_colab(drive, source=path, progress=progress)
        if not path.exists():
            raise UserError(
                f"{path}: no such file or folder (set DATA to a MODEST folder or zip, 'modest' or 'synthetic')"
            )
        return path
    if drive is not None:
        return prepare_modest_on_colab(drive, progress=progress)
    local = LOCAL_DATA / REGISTRY["modest"]["filename"]
    if read_stamp(local) is not None:
        return local
    if download is None:
        download = in_colab()
    if not download:
        raise UserError(
            f"{local}: MODEST is not here and a 6.6 GB download does not start by itself; set DOWNLOAD = True, "
            f'DATA = the path of your copy, or RECIPE = "demo" in the Parameters cell'
        )
    return resolve_data("modest", progress)


def check_runtime(recipe: str, device) -> None:
    """On a Colab CPU runtime, stop before the original recipe starts (it would take days), saying what to change."""
    from .errors import UserError

    if in_colab() and str(device) == "cpu" and recipe != "demo":
        raise UserError(
            f"RECIPE = {recipe!r} on a CPU runtime would take days: Runtime > Change runtime type > a GPU (e.g. T4), "
            f'then run all again; or set RECIPE = "demo" (five minutes on a CPU)'
        )


def plan_run(out: str | Path, cfg, resume: bool | str = "auto"):
    """(cfg, resume?) for a run folder: 'auto' continues OUT/last.pt when it exists; False refuses to overwrite a run.

    On resume the saved run's config is kept (its recipe, model and data), with this cfg's epochs, out and workers.
    """
    from .errors import UserError
    from .train import Config, load_checkpoint

    out = Path(out)
    last, best = out / "last.pt", out / "best.pt"
    if resume not in ("auto", True, False):
        raise UserError(f'RESUME must be "auto", True or False, not {resume!r}')
    if resume is False:
        if last.is_file() or best.is_file():
            raise UserError(
                f'{out} already holds a run: set RESUME = "auto" to continue it (or see it), '
                f"or OUT = a new folder to start over (it is never overwritten)"
            )
        return cfg, False
    if not last.is_file():
        if resume is True:
            raise UserError(f'{last}: nothing to resume; set RESUME = "auto" to start a new run there')
        return cfg, False
    state = load_checkpoint(last, expect_model=cfg.model)
    saved = Config(**state["config"])
    kept = dataclasses.replace(saved, epochs=cfg.epochs, out=str(out), workers=cfg.workers)
    if saved.scheduler == "onecycle" and kept.epochs != saved.epochs:  # its schedule was planned for that many
        kept = dataclasses.replace(kept, epochs=saved.epochs)
    return kept, True


def start_history(out: str | Path, resume: bool, model, optimizer, scheduler=None, scaler=None):
    """(history, best_val_loss, start_epoch): from OUT/last.pt when resuming, else a fresh start."""
    from .train import resume_run

    if resume:
        return resume_run(out, model, optimizer, scheduler, scaler)
    return [], math.inf, 1


def load_trained(out: str | Path, name: str, device="cpu"):
    """(model, checkpoint) from OUT/best.pt, else the shipped weights/NAME.pt; (None, None) with one line if neither."""
    from .train import load_model

    for path in (Path(out) / "best.pt", WEIGHTS / f"{name}.pt"):
        if path.is_file():
            return load_model(path, device)
    print(f"no trained {name}: neither {Path(out) / 'best.pt'} nor {WEIGHTS / f'{name}.pt'} exists; skipping")
    return None, None


def sync_links(paths: list[Path] | None = None, repo: str = REPO, branch: str = BRANCH) -> list[Path]:
    """Rewrite Colab links and clone URLs in `paths` (default README.md and notebooks/*) to `repo`; return the changed files."""
    if paths is None:
        paths = [
            ROOT / "README.md",
            *sorted((ROOT / "notebooks").glob("*.ipynb")),
            *sorted((ROOT / "notebooks").glob("*.py")),
        ]
    changed = []
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text()
        new = COLAB_LINK.sub(lambda m: colab_url(m.group(3), repo, branch), text)
        new = CLONE_LINK.sub(lambda m: m.group(1) + repo_url(repo), new)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


if __name__ == "__main__":
    for changed in sync_links():
        print(f"rewrote {changed.relative_to(ROOT)}")
