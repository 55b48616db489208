"""Analytic FLOP counts against PyTorch's FLOP counter, and the paper-preset figure."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from acvtt_core.bench import mrnla_flops, unet_conv_flops, volume_flops
from acvtt_core.config import PRESETS, ModelConfig
from acvtt_core.model import Stage1, UNet

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_unet_conv_flops_match_counter():
    net = UNet(2, 4)
    x = torch.rand(1, 2, 16, 24)
    assert _count(lambda: net(x)) == unet_conv_flops(2, 4, 16, 24)


def test_stage1_flops_match_counter_materialised():
    # The materialised path does exactly S = qk^T and A v, the paper count (plus A*S, which
    # FlopCounterMode ignores as elementwise). References are encoded separately.
    cfg = ModelConfig(width=4, n_refs=2, mrnla_levels=(0, 1, 2, 3))
    m = Stage1(cfg)
    x, refs = torch.rand(1, 1, 16, 24), torch.rand(1, 2, 16, 16)
    with torch.no_grad():
        cache = m.encode_refs(refs)
        got = _count(lambda: m(x, cache=cache, materialised=True))
    want = unet_conv_flops(1, 4, 16, 24) + mrnla_flops(cfg, 16, 24, 16, 16)["paper"]
    assert got == want


def test_paper_preset_flops_match_issue_figure():
    f = volume_flops(PRESETS["paper"].model, 60, 512, 512, 5)
    assert 1.1e15 < f["total_paper"] < 1.3e15  # "about 1.2 PFLOP"
