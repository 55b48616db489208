"""Checkpoint round trip and mismatch errors."""

import json

import numpy as np
import pytest
import torch

from acvtt_core.checkpoint import (
    CheckpointMeta,
    CheckpointMismatchError,
    load_checkpoint,
    save_checkpoint,
)
from acvtt_core.config import ModelConfig
from acvtt_core.infer import load_interpolator
from acvtt_core.model import ACVTT

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _model(width=4, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(width=width, n_refs=2, mrnla_levels=(0, 1))
    m = ACVTT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    return m, CheckpointMeta(preset="tiny", model=cfg, factors=[2, 4], metrics={"psnr": 1.0})


def test_round_trip(tmp_path):
    m, meta = _model()
    path = save_checkpoint(tmp_path / "ck.safetensors", m, meta)
    side = json.loads(path.with_suffix(".json").read_text())
    for key in (
        "preset",
        "model",
        "factors",
        "normalisation",
        "training_data",
        "code_version",
        "metrics",
    ):
        assert key in side
    assert side["model"]["width"] == 4 and side["model"]["mrnla_levels"] == [0, 1]
    m2, meta2, version = load_checkpoint(path)
    assert meta2.model == m.cfg and meta2.factors == [2, 4] and len(version) == 12
    for k, v in m.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v)
    interp = load_interpolator(path)
    assert interp.model_id == "acvtt-tiny" and interp.model_version == version
    vol = np.random.default_rng(0).normal(0, 100, (3, 16, 16)).astype(np.float32)
    assert interp.interpolate(vol, 2).shape == (5, 16, 16)


def test_mismatch_gives_one_clear_error(tmp_path):
    m, meta = _model()
    path = save_checkpoint(tmp_path / "ck.safetensors", m, meta)
    # Metadata claims a different width than the stored tensors.
    side = json.loads(path.with_suffix(".json").read_text())
    side["model"]["width"] = 6
    path.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(CheckpointMismatchError, match="does not match model config"):
        load_checkpoint(path)
    # A caller asking for a preset the checkpoint is not.
    path2 = save_checkpoint(tmp_path / "ck2.safetensors", m, meta)
    with pytest.raises(CheckpointMismatchError, match="was requested"):
        load_interpolator(path2, preset="paper")


def test_no_pickle_files_written(tmp_path):
    m, meta = _model()
    save_checkpoint(tmp_path / "ck.safetensors", m, meta)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]


def test_code_version_is_stamped_on_save_not_on_construction(tmp_path):
    """Building metadata runs no git (it is built on every load); saving stamps the version."""
    m, meta = _model()
    assert meta.code_version == ""
    path = save_checkpoint(tmp_path / "ck.safetensors", m, meta)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["code_version"].startswith("acvtt_core ")
    kept = CheckpointMeta(preset="tiny", model=m.cfg, factors=[2], code_version="older")
    path = save_checkpoint(tmp_path / "ck2.safetensors", m, kept)
    assert json.loads(path.with_suffix(".json").read_text())["code_version"] == "older"
