"""Whole-volume engine: shapes, alignment, crop, determinism; volume helpers."""

import numpy as np
import pytest
import torch

from acvtt_core.checkpoint import CheckpointMeta
from acvtt_core.config import ModelConfig
from acvtt_core.infer import Interpolator, load_interpolator
from acvtt_core.model import ACVTT
from acvtt_core.volume import (
    body_bbox,
    cubic_upsample_z,
    decimate,
    denormalise_hu,
    linear_upsample_z,
    normalise_hu,
    reference_indices,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _phantom(d=7, h=30, w=37, seed=0):
    rng = np.random.default_rng(seed)
    vol = np.full((d, h, w), -1000.0, np.float32)
    vol[:, 5 : h - 5, 6 : w - 7] = 40 + 200 * rng.random((d, h - 10, w - 13))
    return vol


def _random_interp(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(width=4, n_refs=2, mrnla_levels=(0, 3), fusion_width=4)
    m = ACVTT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make the heads non-zero so the model actually does something
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    meta = CheckpointMeta(preset="test", model=cfg, factors=[3])
    return Interpolator(m, meta, "test", device="cpu", **kw)


def test_linear_upsample_is_corner_aligned():
    v = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
    up = linear_upsample_z(v, 3)
    assert up.shape == (10, 2, 3)
    np.testing.assert_allclose(up[:, 0, 0], np.arange(10) / 3, atol=1e-6)
    np.testing.assert_array_equal(up[::3], v)
    cub = cubic_upsample_z(v**2, 2)
    np.testing.assert_allclose(cub[::2], v**2)
    np.testing.assert_allclose(cub[1, 0, 0], 0.25, atol=1e-5)  # exact for a quadratic


def test_decimate_trims_and_normalise_roundtrip():
    hr = np.zeros((12, 2, 2), np.float32)
    hr2, lr = decimate(hr, 5)
    assert hr2.shape[0] == 11 and lr.shape[0] == 3
    hu = np.array([-3000, -1024, 0, 3071, 5000], np.float32)
    x = normalise_hu(hu)
    np.testing.assert_allclose(x, [0, 0, 1024 / 4095, 1, 1], atol=1e-7)
    np.testing.assert_allclose(denormalise_hu(x)[1:4], hu[1:4], atol=1e-3)


def test_body_bbox_and_reference_indices():
    box = body_bbox(_phantom(), margin=2)
    assert (box.y0, box.y1, box.x0, box.x1) == (3, 27, 4, 32)
    assert reference_indices(9, 3) == [1, 4, 7]
    assert reference_indices(2, 3) == [0, 1, 1]


@pytest.mark.parametrize("factor", [2, 3, 5])
def test_interpolate_shape_alignment_and_outside_box(factor):
    vol = _phantom()
    interp = _random_interp()
    out = interp.interpolate(vol, factor)
    assert out.shape == ((7 - 1) * factor + 1, 30, 37) and out.dtype == np.float32
    np.testing.assert_array_equal(out[::factor], vol)
    # Outside the body box the result is the linear upsampling.
    lin = denormalise_hu(linear_upsample_z(normalise_hu(vol), factor))
    y0, y1, x0, x1 = interp.last_run["bbox"]
    mask = np.ones(vol.shape[1:], bool)
    mask[y0:y1, x0:x1] = False
    np.testing.assert_allclose(out[:, mask], lin[:, mask], atol=1e-3)
    assert np.abs(out[:, ~mask] - lin[:, ~mask]).max() > 0  # the model changed the inside


def test_interpolate_deterministic_chunking_and_progress():
    vol = _phantom(d=4, h=20, w=19)
    a = _random_interp()
    calls = []
    out1 = a.interpolate(vol.astype(np.int16), 3, progress=lambda d, t: calls.append((d, t)))
    out2 = a.interpolate(vol.astype(np.int16), 3)
    np.testing.assert_array_equal(out1, out2)
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1]
    b = _random_interp(max_chunk=1)
    np.testing.assert_allclose(b.interpolate(vol.astype(np.int16), 3), out1, atol=1e-2)


def test_flip_ensemble_is_the_mean_of_four_in_plane_flipped_passes():
    vol = _phantom(d=5, h=24, w=29)
    single = _random_interp()
    ens = _random_interp(flip_ensemble=True)
    assert ens.model_version == "test+flip4" and single.model_version == "test"
    passes = [
        np.flip(single.interpolate(np.ascontiguousarray(np.flip(vol, axes)), 3), axes)
        for axes in ((), (1,), (2,), (1, 2))
    ]
    calls = []
    out = ens.interpolate(vol, 3, progress=lambda d, t: calls.append((d, t)))
    np.testing.assert_allclose(out, np.mean(passes, axis=0), atol=1e-3)
    assert np.abs(out - passes[0]).max() > 0.1  # the passes differ: the model is not symmetric
    np.testing.assert_array_equal(out[::3], vol)
    assert ens.last_run["passes"] == 4 and calls[-1][0] == calls[-1][1]


def test_interpolate_rejects_bad_input():
    interp = _random_interp()
    with pytest.raises(ValueError):
        interp.interpolate(np.zeros((1, 8, 8)), 2)
    with pytest.raises(ValueError):
        interp.interpolate(np.zeros((3, 8, 8)), 1)


def test_load_interpolator_random_init_and_missing(tmp_path):
    interp = load_interpolator(allow_random_init=True, preset="compact", checkpoint=tmp_path / "x")
    assert interp.model_id == "acvtt-compact" and interp.model_version == "untrained"
    assert interp.device == "cpu" or interp.device.startswith("cuda")
    with pytest.raises(FileNotFoundError):
        load_interpolator(checkpoint=tmp_path / "missing.safetensors")
