"""CUDA checks; skipped cleanly without a GPU."""

import numpy as np
import pytest
import torch

from acvtt_core.attention import mrnla_fused, mrnla_materialised
from acvtt_core.infer import load_interpolator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_fused_mrnla_on_cuda_matches_materialised():
    torch.manual_seed(0)
    q = torch.randn(2, 64, 32, device="cuda") * 32**-0.5
    vk = torch.randn(1, 3, 80, 64, device="cuda")
    a, ra = mrnla_fused(q, vk)
    b, rb = mrnla_materialised(q, vk)
    torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ra, rb, rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
@cuda
def test_interpolator_cuda_bf16_close_to_cpu(tmp_path):
    vol = np.random.default_rng(0).normal(0, 200, (4, 40, 48)).astype(np.float32)
    gpu = load_interpolator(tmp_path / "none", device="cuda", allow_random_init=True)
    cpu = load_interpolator(tmp_path / "none", device="cpu", allow_random_init=True)
    assert gpu.device == "cuda" and gpu.autocast_bf16
    a, b = gpu.interpolate(vol, 3), cpu.interpolate(vol, 3)
    assert a.shape == b.shape == (10, 40, 48)
    np.testing.assert_allclose(a, b, atol=5.0)


def test_auto_device_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    interp = load_interpolator(device="auto", allow_random_init=True, checkpoint="/nonexistent")
    assert interp.device == "cpu" and not interp.autocast_bf16
    with pytest.raises(RuntimeError, match="CUDA"):
        load_interpolator(device="cuda", allow_random_init=True, checkpoint="/nonexistent")


def _tiny_sources():
    from acvtt_core.selfsup import Source

    rng = np.random.default_rng(1)
    thin = rng.random((40, 48, 56)).astype(np.float32) * 0.5 + 0.25
    thick = rng.random((12, 96, 96)).astype(np.float32) * 0.5 + 0.25
    return [Source("thin", thin, (1.5, 1.5, 1.5)), Source("thick", thick, (5.0, 0.6, 0.6))]


@pytest.mark.cuda
@cuda
def test_device_sampler_on_cuda():
    from acvtt_core.device_sampler import DeviceMixedSampler

    s = DeviceMixedSampler(_tiny_sources(), crop=32, ref_crop=24, p_slab=0.0, device="cuda")
    rng = np.random.default_rng(0)
    for _ in range(6):
        b = s.sample(4, rng)
        r = int(b.factor[0])
        assert b.x.is_cuda and b.refs.is_cuda and b.refs.shape == (4, 2, 24, 24)
        assert torch.equal(b.x[:, :, ::r], b.target[:, :, ::r])


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("compile_model", [False, True])
def test_paper_preset_trains_on_cuda_and_loads_on_cpu(tmp_path, compile_model):
    """A few bf16-autocast, channels_last steps of the paper preset with samples made on the
    GPU; the checkpoint loads on the CPU and gives the GPU's result there. torch.compile only
    when ACVTT_TEST_COMPILE=1 (scripts/gpu_train.sh sets it with COMPILE=1): it takes a while."""
    import os

    from acvtt_core.checkpoint import CheckpointMeta, load_checkpoint
    from acvtt_core.config import PRESETS
    from acvtt_core.device_sampler import DeviceMixedSampler
    from acvtt_core.model import ACVTT
    from acvtt_core.train import TrainConfig, train

    if compile_model and os.environ.get("ACVTT_TEST_COMPILE") != "1":
        pytest.skip("torch.compile checked only with ACVTT_TEST_COMPILE=1")
    cfg = PRESETS["paper"].model
    torch.manual_seed(0)
    model = ACVTT(cfg)
    s = DeviceMixedSampler(_tiny_sources(), crop=32, ref_crop=32, n_refs=3, device="cuda")
    meta = CheckpointMeta(preset="paper", model=cfg, factors=[2, 3, 4, 5])
    tc = TrainConfig(
        steps=4, batch_size=4, lr=1e-4, loss="mse", device="cuda", compile=compile_model
    )
    losses = train(model, s, tc, meta, tmp_path)
    assert len(losses) == 4 and all(np.isfinite(losses))
    cpu_model, _, _ = load_checkpoint(tmp_path / "last.safetensors")
    b = s.sample(2, np.random.default_rng(5))
    with torch.no_grad():
        want = model.stage1(b.x, refs=b.refs, factor=b.factor).float().cpu()
        got = cpu_model.stage1(b.x.cpu(), refs=b.refs.cpu(), factor=b.factor.cpu())
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
