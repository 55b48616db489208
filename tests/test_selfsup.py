"""In-plane self-supervision sampler and thick-slice degradations (fast, synthetic arrays)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acvtt_core.selfsup import (
    MixedSampler,
    Source,
    degrade_rows,
    resample_axis0,
    slab_rows,
    slab_volume,
    slab_weights,
)


def test_slab_weights_box_hand_computed():
    np.testing.assert_allclose(slab_weights(2), [0, 0.25, 0.5, 0.25, 0])
    np.testing.assert_allclose(slab_weights(3), [0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(slab_weights(4), [0, 0, 1 / 8, 1 / 4, 1 / 4, 1 / 4, 1 / 8, 0, 0])
    g = slab_weights(5, "gauss")
    assert g.sum() == pytest.approx(1.0) and np.argmax(g) == 5
    np.testing.assert_allclose(g, g[::-1])
    with pytest.raises(ValueError):
        slab_weights(2, "nope")


def test_slab_rows_hand_computed_with_edge_renormalisation():
    img = np.array([1, 2, 4, 8, 16], np.float32)[:, None] * np.ones((1, 3), np.float32)
    got = slab_rows(img, 2, 0, 3, slab_weights(2))
    # row 0: offset -1 is outside -> (0.5*1 + 0.25*2) / 0.75; row 2: .25*2 + .5*4 + .25*8;
    # row 4: (0.25*8 + 0.5*16) / 0.75
    want = np.array([1.0 / 0.75, 4.5, 10.0 / 0.75], np.float32)
    np.testing.assert_allclose(got, want[:, None] * np.ones((1, 3)), rtol=1e-6)
    img3 = np.array([3, 6, 9, 0, 3, 6, 9], np.float32)[:, None]
    got3 = slab_rows(img3, 3, 1, 2, slab_weights(3))  # thick rows at thin rows 1 and 4
    np.testing.assert_allclose(got3[:, 0], [6.0, 3.0], rtol=1e-6)
    with pytest.raises(IndexError):
        slab_rows(img3, 3, 1, 3, slab_weights(3))


def test_degrade_rows_decimate_and_slab_volume():
    rng = np.random.default_rng(0)
    img = rng.random((13, 5)).astype(np.float32)
    np.testing.assert_array_equal(degrade_rows(img, 4, 0, 4), img[::4])
    np.testing.assert_array_equal(degrade_rows(img, 3, 1, 3), img[1:8:3])
    vol = rng.random((14, 4, 4)).astype(np.float32)  # trimmed to 13 for r=4
    sv = slab_volume(vol, 4)
    assert sv.shape == (4, 4, 4)
    w = slab_weights(4)
    np.testing.assert_allclose(sv[1], np.tensordot(w, vol[0:9], axes=(0, 0)), rtol=1e-5)
    # a constant volume is unchanged by any slab average
    np.testing.assert_allclose(slab_volume(np.full((11, 2, 2), 0.3, np.float32), 5, "gauss"), 0.3)


def test_resample_axis0_geometry():
    ramp = np.arange(11, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)  # 1 mm rows
    same = resample_axis0(ramp, 1.0, 1.0)
    np.testing.assert_array_equal(same, ramp)
    down = resample_axis0(ramp, 1.0, 2.5)  # rows at 0, 2.5, 5, 7.5, 10 mm
    assert down.shape == (5, 4)
    np.testing.assert_allclose(down[1:-1, 0], [2.5, 5.0, 7.5], atol=1e-2)  # a ramp stays a ramp
    assert down[2, 0] == pytest.approx(5.0, abs=1e-4)  # (the low-pass clamps at the ends)
    up = resample_axis0(ramp, 1.0, 0.5)
    assert up.shape == (21, 4)
    np.testing.assert_allclose(up[:, 0], np.arange(21) * 0.5, atol=1e-5)


def _sources():
    rng = np.random.default_rng(1)
    thin = rng.random((40, 48, 56)).astype(np.float32) * 0.5 + 0.25
    thick = rng.random((12, 64, 64)).astype(np.float32) * 0.5 + 0.25
    return [
        Source("thin", thin, (1.5, 1.5, 1.5)),
        Source("thick", thick, (5.0, 0.6, 0.6), synthetic_z=True),
    ]


@pytest.mark.parametrize("p_inplane", [0.0, 1.0])
@pytest.mark.parametrize("p_slab", [0.0, 1.0])
def test_sampler_shapes_alignment(p_inplane, p_slab):
    s = MixedSampler(
        _sources(),
        factors=(2, 3, 4, 5),
        crop=32,
        ref_crop=24,
        n_refs=2,
        p_inplane=p_inplane,
        p_slab=p_slab,
    )
    rng = np.random.default_rng(3)
    for _ in range(8):
        b = s.sample(3, rng)
        r = int(b.factor[0])
        n, c, h, w = b.x.shape
        assert (n, c) == (3, 1) and b.target.shape == b.x.shape
        assert (h - 1) % r == 0 and h >= 2 * r + 1
        assert b.refs.shape[:2] == (3, 2) and b.refs.shape[2] == b.refs.shape[3] <= 24
        assert torch.all(b.factor == r)
        assert torch.isfinite(b.x).all() and torch.isfinite(b.refs).all()
        if p_slab == 0.0:  # decimation: the input's thick rows are exactly the target's rows
            torch.testing.assert_close(b.x[:, :, ::r], b.target[:, :, ::r])
    kinds = {k.split(":")[0] for k in s.counts}
    assert kinds == ({"inplane"} if p_inplane == 1.0 else {"synthz"})
    modes = {k.split(":")[2] for k in s.counts}
    assert modes == ({"slab"} if p_slab == 1.0 else {"decimate"})


def test_inplane_slab_on_constant_image_is_exact():
    vol = np.full((6, 40, 40), 0.4, np.float32)
    s = MixedSampler(
        [Source("c", vol, (5.0, 0.8, 0.8), synthetic_z=False)],
        crop=24,
        ref_crop=16,
        p_inplane=1.0,
        p_slab=1.0,
    )
    b = s.sample(2, np.random.default_rng(0))
    torch.testing.assert_close(b.x, b.target)


def test_sampler_determinism():
    def batches(seed):
        s = MixedSampler(_sources(), crop=32, ref_crop=24)
        rng = np.random.default_rng(seed)
        return [s.sample(2, rng) for _ in range(5)]

    a, b, c = batches(7), batches(7), batches(8)
    for x, y in zip(a, b, strict=False):
        for f in ("x", "target", "refs", "factor"):
            torch.testing.assert_close(getattr(x, f), getattr(y, f), rtol=0, atol=0)
    assert any(
        x.x.shape != y.x.shape or not torch.equal(x.x, y.x) for x, y in zip(a, c, strict=False)
    )


def test_shipped_default_weights_load_with_metadata():
    from acvtt_core.infer import DEFAULT_CHECKPOINT, load_interpolator

    assert DEFAULT_CHECKPOINT.exists()
    assert (
        DEFAULT_CHECKPOINT.stat().st_size + DEFAULT_CHECKPOINT.with_suffix(".json").stat().st_size
        < 25e6
    )
    interp = load_interpolator(device="cpu")
    meta = interp.meta
    assert sorted(meta.factors) == [2, 3, 4, 5] and meta.model.factor_conditioning
    assert {"rows", "summary"} <= set(meta.metrics) and "git" in meta.code_version
    assert meta.training_data["held_out"] and "degradations" in meta.extra
    vol = np.full((4, 24, 24), -1000.0, np.float32)
    vol[:, 6:18, 6:18] = 40.0
    out = interp.interpolate(vol, 3)
    assert out.shape == (10, 24, 24)
    np.testing.assert_array_equal(out[::3], vol)


def test_adapt_smoke(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    from acvtt_core.adapt import adapt
    from acvtt_core.checkpoint import load_checkpoint
    from acvtt_core.infer import DEFAULT_CHECKPOINT

    rng = np.random.default_rng(0)
    vol = (rng.random((6, 48, 48)) * 1200 - 1000).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.7, 5.0))
    (tmp_path / "site").mkdir()
    sitk.WriteImage(img, str(tmp_path / "site" / "thick.nrrd"))
    out = adapt(
        DEFAULT_CHECKPOINT,
        tmp_path / "site",
        tmp_path / "new.safetensors",
        steps=2,
        batch_size=1,
        crop=32,
        log=lambda m: None,
    )
    model, meta, _ = load_checkpoint(out)
    assert meta.extra["adaptation"]["volumes"]["thick"]["shape"] == [6, 48, 48]
    assert meta.extra["adaptation"]["self_supervision"] == "in-plane only"
