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
