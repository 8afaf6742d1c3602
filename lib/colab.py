"""The repository's GitHub slug (kept here and nowhere else) and the Colab helpers built on it.

Badges and the clone URL in README.md and the notebooks are written out from `REPO`; after changing
`REPO`, run `python -m lib.colab` to rewrite them (tests/test_notebooks.py checks that they agree).
"""

from __future__ import annotations

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
