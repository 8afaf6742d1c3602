"""CUDA paths (AMP, channels_last, the GPU data path, a fit on the GPU). Skipped without a GPU; CI has none.

Run on a GPU machine with: python -m pytest -q tests/test_cuda.py
"""

from __future__ import annotations

import pytest
import torch

from lib.losses import make_loss
from lib.models import make_model
from lib.train import Config, autocast_dtype, fit, load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["masknet", "depthnet"])
def test_amp_channels_last_forward_backward(name):
    device = torch.device("cuda")
    model = make_model(name).to(device, memory_format=torch.channels_last)
    bg = torch.randn(4, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    bg_fg = torch.randn(4, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    batch = {
        "mask": (torch.rand(4, 1, 64, 64, device=device) > 0.5).float(),
        "depth": torch.rand(4, 1, 64, 64, device=device),
    }
    dtype = autocast_dtype(device, True)
    assert dtype in (torch.bfloat16, torch.float16)
    with torch.autocast("cuda", dtype=dtype):
        outputs = model(bg, bg_fg)
    assert outputs["mask"].dtype == dtype
    loss, _ = make_loss("bce" if name == "masknet" else "bce_rmse", name)(outputs, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():  # AMP output close to fp32 output
        ref = model.float()(bg.float(), bg_fg.float())["mask"]
        with torch.autocast("cuda", dtype=dtype):
            low = model(bg, bg_fg)["mask"].float()
    assert (ref - low).abs().mean() < 0.05 * ref.abs().mean() + 1e-2


def test_fit_on_cuda_writes_a_resumable_run(tiny_modest, tmp_path):
    cfg = Config(
        model="depthnet",
        epochs=2,
        batch_size=8,
        image_size=64,
        lr=1e-3,
        optimizer="adamw",
        workers=2,
        out=str(tmp_path),
    )
    history = fit(cfg, tiny_modest, progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["val_loss"])) for r in history)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 2
    assert all(v.device.type == "cpu" for v in state["model"].values())  # loadable on a CPU-only machine


def test_batches_prepared_ahead_on_a_side_stream_equal_the_inline_ones(tiny_modest):
    """GPU mode on CUDA (nvJPEG decode where the card has it, flip + jitter on the device), prepared by the
    background thread on its own stream: the same numbers as preparing each batch between steps."""
    from lib.data import ModestDataset, make_loader

    train = ModestDataset(tiny_modest, image_size=64).subset("all", augment=True)

    def run(ahead: int) -> list[dict]:
        torch.manual_seed(5)
        loader = make_loader(train, batch_size=4, shuffle=True, num_workers=2, device="cuda", ahead=ahead)
        assert loader.data_mode == "gpu" and loader.ahead == ahead
        out = []
        for batch in loader:
            torch.cuda._sleep(1_000_000)  # keep the consumer's stream busy while the thread prepares the next batch
            out.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return out

    inline, ahead = run(0), run(2)
    assert [b["name"] for b in ahead] == [b["name"] for b in inline]
    for a, b in zip(ahead, inline):
        for key in ("bg", "bg_fg", "mask", "depth"):
            assert a[key].is_cuda and torch.equal(a[key], b[key]), key
    assert make_loader(train, batch_size=4, shuffle=False, num_workers=2, device="cuda").ahead == 2  # the CUDA default
