"""Training on the device (issue 16, part 1), exercised on the CPU at a tiny scale: the device
sampler against the numpy references, the one training loop with time budgets, per-interval
checkpoints, resume after a kill, bf16 autocast and channels_last, and scripts/gpu_train.sh
refusing to run without a GPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d

from acvtt_core.checkpoint import CheckpointMeta, load_checkpoint
from acvtt_core.config import ModelConfig
from acvtt_core.device_sampler import (
    DeviceMixedSampler,
    crop_starts,
    gaussian_kernel,
    resample_rows,
    slab_rows,
)
from acvtt_core.model import ACVTT
from acvtt_core.selfsup import BODY_LEVEL, Source, resample_axis0, slab_weights
from acvtt_core.selfsup import slab_rows as np_slab_rows
from acvtt_core.train import TrainConfig, train
from tests.support.polling import wait_until

pytestmark = pytest.mark.usefixtures("torch_one_thread")
REPO = Path(__file__).resolve().parents[1]


def _sources():
    rng = np.random.default_rng(1)
    thin = rng.random((40, 48, 56)).astype(np.float32) * 0.5 + 0.25
    thick = rng.random((12, 96, 96)).astype(np.float32) * 0.5 + 0.25
    return [Source("thin", thin, (1.5, 1.5, 1.5)), Source("thick", thick, (5.0, 0.6, 0.6))]


# -- the torch primitives against the numpy ones they stand for ---------------------------------
def test_gaussian_kernel_is_scipys():
    impulse = np.zeros(41)
    impulse[20] = 1.0
    for sigma in (0.3, 1.0, 2.6):
        k = gaussian_kernel(sigma)
        ref = gaussian_filter1d(impulse, sigma, truncate=3.0)
        r = (len(k) - 1) // 2
        np.testing.assert_allclose(k, ref[20 - r : 21 + r], rtol=1e-12)


@pytest.mark.parametrize("src,dst", [(1.0, 2.5), (0.6, 4.3), (1.0, 0.5), (0.8, 0.8)])
def test_resample_rows_matches_numpy(src, dst):
    img = np.random.default_rng(0).random((3, 50, 7)).astype(np.float32)
    got = resample_rows(torch.from_numpy(img), src, dst).numpy()
    want = np.stack([resample_axis0(i, src, dst) for i in img])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("r", [2, 3, 4, 5])
def test_slab_rows_matches_numpy_and_decimation_is_exact(r):
    img = np.random.default_rng(r).random((3, 6 * r, 5)).astype(np.float32)
    starts = torch.tensor([0, r, 2 * r])  # the first window is truncated at the top
    w = np.stack([slab_weights(r), slab_weights(r, "gauss", 1.1 * r), np.eye(2 * r + 1)[r]])
    got = slab_rows(torch.from_numpy(img), r, starts, 4, torch.tensor(w, dtype=torch.float32))
    for i in range(3):
        want = np_slab_rows(img[i], r, int(starts[i]), 4, w[i])
        np.testing.assert_allclose(got[i].numpy(), want, atol=1e-6)
    np.testing.assert_array_equal(got[2].numpy(), img[2, 2 * r : 2 * r + 3 * r + 1 : r])


def test_crops_prefer_the_body():
    """Crops land on the body (a bright block in one corner of air) far more often than
    chance, like selfsup's: the window mass weights the start positions."""
    img = torch.full((200, 64, 64), 0.0)
    img[:, 40:, 40:] = BODY_LEVEL + 0.2
    gen = torch.Generator().manual_seed(0)
    y0, x0 = crop_starts(img, 16, 16, gen)
    on_body = ((y0 >= 25) & (x0 >= 25)).float().mean()
    assert on_body > 0.8  # about a tenth of the start positions overlap the block


# -- the sampler --------------------------------------------------------------------------------
@pytest.mark.parametrize("p_inplane", [0.0, 1.0])
@pytest.mark.parametrize("p_slab", [0.0, 1.0])
def test_device_sampler_shapes_alignment(p_inplane, p_slab):
    s = DeviceMixedSampler(
        _sources(), crop=32, ref_crop=24, n_refs=2, p_inplane=p_inplane, p_slab=p_slab
    )
    assert all(v.device.type == "cpu" for v in s._vols.values())  # moved once, at construction
    rng = np.random.default_rng(3)
    for _ in range(8):
        b = s.sample(3, rng)
        r = int(b.factor[0])
        n, c, h, w = b.x.shape
        assert (n, c) == (3, 1) and b.target.shape == b.x.shape and w == 32
        assert (h - 1) % r == 0 and h >= 2 * r + 1
        assert b.refs.shape == (3, 2, 24, 24) and torch.all(b.factor == r)
        assert torch.isfinite(b.x).all() and torch.isfinite(b.refs).all()
        if p_slab == 0.0:  # decimation: the input's thick rows are exactly the target's rows
            torch.testing.assert_close(b.x[:, :, ::r], b.target[:, :, ::r], rtol=0, atol=0)
        else:  # a slab average of the target's rows differs from the rows themselves
            assert not torch.equal(b.x[:, :, ::r], b.target[:, :, ::r])
    kinds = {k.split(":")[0] for k in s.counts}
    assert kinds == ({"inplane"} if p_inplane == 1.0 else {"synthz"})
    assert {k.split(":")[2] for k in s.counts} == ({"slab"} if p_slab == 1.0 else {"decimate"})


def test_device_sampler_inplane_slab_on_constant_image_is_exact():
    vol = np.full((6, 40, 40), 0.4, np.float32)
    src = Source("c", vol, (5.0, 0.8, 0.8), synthetic_z=False)
    s = DeviceMixedSampler([src], crop=24, ref_crop=16, p_inplane=1.0, p_slab=1.0)
    b = s.sample(2, np.random.default_rng(0))
    torch.testing.assert_close(b.x, b.target)


def test_device_sampler_determinism():
    def batches(seed):
        s = DeviceMixedSampler(_sources(), crop=32, ref_crop=24)
        rng = np.random.default_rng(seed)
        return [s.sample(2, rng) for _ in range(5)]

    a, b, c = batches(7), batches(7), batches(8)
    for x, y in zip(a, b, strict=True):
        for f in ("x", "target", "refs", "factor"):
            assert torch.equal(getattr(x, f), getattr(y, f))
    assert any(
        x.x.shape != y.x.shape or not torch.equal(x.x, y.x) for x, y in zip(a, c, strict=True)
    )


# -- the loop -----------------------------------------------------------------------------------
CFG = ModelConfig(width=4, n_refs=2, mrnla_levels=(0,), fusion_width=4, factor_conditioning=True)


def _run(out: Path, steps: int, resume: bool, **kw) -> tuple[ACVTT, list[float]]:
    torch.manual_seed(0)
    model = ACVTT(CFG)
    sampler = DeviceMixedSampler(_sources(), crop=24, ref_crop=24, n_refs=2)
    meta = CheckpointMeta(preset="tiny", model=CFG, factors=[2, 3, 4, 5])
    cfg = TrainConfig(
        steps=steps, batch_size=2, lr=1e-3, loss="mse", ckpt_every=3, log_every=1, **kw
    )
    return model, train(model, sampler, cfg, meta, out, resume=resume)


def test_device_sampler_training_resumes_where_it_stopped(tmp_path):
    """6 steps in one go equal 3 steps, a stop, and 3 resumed steps (same samples, same Adam
    state), with the library's lr drop in the last quarter."""
    full, l_full = _run(tmp_path / "a", 6, False, lr_drop_at=0.75)
    _run(tmp_path / "b", 3, False, lr_drop_at=0.75)
    resumed, l_rest = _run(tmp_path / "b", 6, True, lr_drop_at=0.75)
    assert len(l_full) == 6 and len(l_rest) == 3
    np.testing.assert_allclose(l_rest, l_full[3:], rtol=1e-5)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-7)
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    # steps 5 and 6 run with step indices 4 and 5; the drop starts at 0.75 * 6 = 4.5
    assert [r["lr"] for r in log if r["step"] in (5, 6)] == [1e-3, 1e-3 / 4]


def test_bf16_autocast_and_channels_last_train(tmp_path):
    """The CUDA settings (bf16 autocast, channels_last) on the CPU: loss and weights finite and
    close to fp32's after a few steps."""
    _, l32 = _run(tmp_path / "fp32", 4, False)
    model, l16 = _run(tmp_path / "bf16", 4, False, bf16=True, channels_last=True)
    assert all(np.isfinite(l16)) and len(l16) == 4
    np.testing.assert_allclose(l16, l32, rtol=0.05)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_time_budget_stops_and_checkpoints(tmp_path):
    _, losses = _run(tmp_path, 10**6, False, minutes=0.04, ckpt_seconds=0.5)
    state = json.loads((tmp_path / "train_state.json").read_text())
    assert 0 < state["step"] == len(losses) < 10**6
    assert load_checkpoint(tmp_path / "last.safetensors")[1].extra["training"]["stage1"]["steps"]


def _train_cli(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "acvtt_core.cli", "train", "--data", f"{data}:iz:1",
        "--out", str(out), "--sampler", "selfsup-torch", "--device", "cpu",
        "--width", "4", "--levels", "0", "--crop", "24", "--batch-size", "2",
        "--log-every", "1", "--ckpt-every", "100000", "--threads", "1", *extra,
    ]  # fmt: skip


def test_cli_checkpoints_each_interval_and_resumes_after_a_kill(tmp_path):
    """`acvtt train --sampler selfsup-torch` with a one-second checkpoint interval (a minute by
    default), killed with SIGKILL, resumed by the same command: it continues from the last
    interval checkpoint and stops at --steps."""
    sitk = pytest.importorskip("SimpleITK")
    vol = np.random.default_rng(0).normal(-300, 300, (14, 100, 100)).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.7, 3.0))
    data = tmp_path / "site.nii.gz"
    sitk.WriteImage(img, str(data))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(
        _train_cli(run, data, "--minutes", "5", "--ckpt-seconds", "1"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        phases = run / "phases.jsonl"
        wait_until(
            lambda: phases.exists() and len(phases.read_text().splitlines()) >= 2,
            timeout=240,
            what="two interval checkpoints",
        )
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    saved = json.loads((run / "train_state.json").read_text())["step"]
    logged = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert saved >= 2 and max(logged) >= saved
    res = subprocess.run(
        _train_cli(run, data, "--steps", str(saved + 3)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert f"resuming at step {saved}" in res.stderr.replace("\n", " ")
    after = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert after[len(logged) :] == [saved + 1, saved + 2, saved + 3]
    assert json.loads((run / "train_state.json").read_text())["step"] == saved + 3
    _, meta, _ = load_checkpoint(run / "model.safetensors")
    assert meta.training_data["volumes"] == ["site"]
    assert meta.training_data["stage1"]["sampler"].endswith("DeviceMixedSampler")


def test_gpu_train_script_refuses_without_a_gpu(tmp_path):
    """scripts/gpu_train.sh on this CPU-only machine: one clear error line, non-zero exit,
    before any work."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_train.sh"), str(tmp_path / "out"), "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("gpu_train: error: ") and "GPU" in lines[0]
    assert not (tmp_path / "out" / "run").exists()
