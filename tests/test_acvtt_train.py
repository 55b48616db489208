"""Training: tiny overfit whose loss falls, resumable state, fusion stage, samplers."""

import json

import numpy as np
import pytest
import torch

from acvtt_core.checkpoint import CheckpointMeta, load_checkpoint
from acvtt_core.config import ModelConfig
from acvtt_core.model import ACVTT
from acvtt_core.train import (
    FusionSampler,
    SyntheticZSampler,
    TrainConfig,
    stage1_predictions,
    train,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _volume(d=21, h=24, w=24, seed=0):
    # Smooth curvature along z that linear interpolation gets systematically wrong.
    rng = np.random.default_rng(seed)
    z = np.arange(d)[:, None, None]
    y = np.arange(h)[None, :, None]
    x = np.arange(w)[None, None, :]
    v = 0.5 + 0.3 * np.sin(z * 0.35 + y * 0.2) * np.cos(x * 0.3) + 0.001 * rng.random((d, h, w))
    return v.astype(np.float32)


def test_sampler_alignment():
    vol = _volume()
    s = SyntheticZSampler([vol], factors=(4,), crop=16, n_refs=2)
    b = s.sample(3, np.random.default_rng(0))
    assert b.x.shape == (3, 1, 13, 16) and b.target.shape == b.x.shape  # 13 = 3*4+1
    assert b.refs.shape == (3, 2, 16, 16)
    # Rows on thick slices are copied exactly; the rest is interpolated.
    torch.testing.assert_close(b.x[:, :, ::4], b.target[:, :, ::4])
    assert torch.all(b.factor == 4)


class _FixedBatch:
    """Overfit one batch: a sampler that always returns it."""

    def __init__(self, batch):
        self.batch = batch

    def sample(self, batch_size, rng):
        return self.batch

    def describe(self):
        return {"sampler": "fixed"}


def test_tiny_overfit_loss_falls(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(width=4, n_refs=2, mrnla_levels=(0, 3))
    model = ACVTT(cfg)
    s = SyntheticZSampler([_volume()], factors=(4,), crop=16, n_refs=2)
    fixed = _FixedBatch(s.sample(4, np.random.default_rng(0)))
    meta = CheckpointMeta(preset="tiny", model=cfg, factors=[4])
    tc = TrainConfig(steps=50, batch_size=4, lr=3e-3, log_every=10, ckpt_every=1000)
    losses = train(model, fixed, tc, meta, tmp_path, resume=False)
    assert len(losses) == 50
    assert np.mean(losses[-5:]) < 0.85 * losses[0]
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 50
    saved = load_checkpoint(tmp_path / "last.safetensors")[1]
    assert saved.extra["training"]["stage1"]["steps"] == 50


def test_resume_continues_where_it_stopped(tmp_path):
    cfg = ModelConfig(width=4, n_refs=1, mrnla_levels=(0,))
    s = SyntheticZSampler([_volume()], factors=(2,), crop=16, n_refs=1)

    def run(steps, out, resume):
        torch.manual_seed(0)
        m = ACVTT(cfg)
        meta = CheckpointMeta(preset="tiny", model=cfg, factors=[2])
        tc = TrainConfig(steps=steps, batch_size=2, lr=1e-3, ckpt_every=3, log_every=1)
        losses = train(m, s, tc, meta, out, resume=resume)
        return m, losses

    full, l_full = run(6, tmp_path / "a", False)
    run(3, tmp_path / "b", False)
    resumed, l_rest = run(6, tmp_path / "b", True)
    assert len(l_rest) == 3
    np.testing.assert_allclose(l_rest, l_full[3:], rtol=1e-4)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-4, atol=1e-6)


def test_fusion_stage_trains_only_fusion(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(width=4, n_refs=1, mrnla_levels=(0,))
    predictor = ACVTT(cfg)
    cor, sag, hr = stage1_predictions(predictor, _volume(), 4)
    assert cor.shape == hr.shape == sag.shape
    model = ACVTT(cfg)
    before = {k: v.clone() for k, v in model.stage1.state_dict().items()}
    s = FusionSampler([(cor, sag, hr, 4)], crop=16)
    meta = CheckpointMeta(preset="tiny", model=cfg, factors=[4])
    losses = train(model, s, TrainConfig(stage=2, steps=5, batch_size=2, lr=1e-3), meta, tmp_path)
    assert len(losses) == 5
    for k, v in model.stage1.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_sampler_rejects_tiny_volume():
    with pytest.raises(ValueError):
        SyntheticZSampler([np.zeros((3, 8, 8), np.float32)], factors=(4,))
