"""training/continue_default.py, the resumable driver of the default model's training: phases by
training minutes, resuming from the run folder or the committed state, and the tail average of
the weights (``--average-from-phase``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from acvtt_core.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _driver():
    spec = importlib.util.spec_from_file_location(
        "continue_default", REPO / "training" / "continue_default.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _volume(path: Path) -> Path:
    """A smooth synthetic CT-like volume (HU), 1 mm isotropic: enough to draw crops from."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:40, 0:48, 0:48].astype(np.float32)
    vol = 400 * np.sin(x / 5) * np.cos(y / 7) + 300 * np.sin(z / 4) + rng.normal(0, 20, z.shape)
    img = sitk.GetImageFromArray(vol.astype(np.float32))
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(path))
    return path


def _weights(path: Path) -> tuple[dict[str, torch.Tensor], object]:
    model, meta, _ = load_checkpoint(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, meta


def test_phases_resume_and_tail_average(tmp_path):
    drv = _driver()
    src = _volume(tmp_path / "vol.nii.gz")
    run, state = tmp_path / "run", tmp_path / "state"
    common = ["--run", str(run), "--state", str(state), "--source", f"{src}:iz:1",
              "--crop", "32", "--batch-size", "1", "--threads", "1",
              "--average-from-phase", "0", "--average-from-phase", "1"]  # fmt: skip
    # One phase of a moment: exactly one chunk of 250 steps.
    drv.main([*common, "--phase", "0.001:1e-3"])
    first, _ = _weights(run / "last.safetensors")
    avg0, meta0 = _weights(run / "average_from_phase0.safetensors")
    assert meta0.extra["tail_average"] == {"from_phase": 0, "chunks": 1, "through_step": 250}
    assert all(torch.equal(first[k], avg0[k]) for k in first)
    assert not (run / "average_from_phase1.safetensors").exists()  # phase 1 not begun
    # The committed state has the average too, and a fresh machine resumes from it alone.
    assert (state / "average_from_phase0.safetensors").exists()
    fresh = tmp_path / "fresh-run"
    drv.main(
        [*common[:1], str(fresh), *common[2:], "--phase", "0.001:1e-3", "--phase", "0.001:1e-4"]
    )
    progress = [json.loads(ln) for ln in (fresh / "phases.jsonl").read_text().splitlines()]
    assert [(p["step"], p["phase"]) for p in progress] == [(250, 0), (500, 1)]
    second, _ = _weights(fresh / "last.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)  # it did train on
    avg0, meta0 = _weights(fresh / "average_from_phase0.safetensors")
    assert meta0.extra["tail_average"] == {"from_phase": 0, "chunks": 2, "through_step": 500}
    for k in first:
        if first[k].is_floating_point():
            torch.testing.assert_close(avg0[k], (first[k] + second[k]) / 2)
    avg1, meta1 = _weights(fresh / "average_from_phase1.safetensors")
    assert meta1.extra["tail_average"]["chunks"] == 1
    assert all(torch.equal(second[k], avg1[k]) for k in first)
    # A chunk is never counted twice (a run killed between its checkpoint and its progress).
    model, meta, _ = load_checkpoint(fresh / "last.safetensors")
    drv.update_average(fresh, 0, model, meta, 500)
    again, meta_again = _weights(fresh / "average_from_phase0.safetensors")
    assert meta_again.extra["tail_average"]["chunks"] == 2
    assert all(torch.equal(again[k], avg0[k]) for k in again)
