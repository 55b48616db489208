"""MRNLA exactness and model shapes."""

import pytest
import torch

from acvtt_core.attention import MRNLA, mrnla_fused, mrnla_materialised
from acvtt_core.config import PRESETS, ModelConfig
from acvtt_core.model import ACVTT, Stage1, fresh_model, param_count

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _perturb(m: torch.nn.Module, seed: int = 0) -> None:
    # Non-trivial LayerNorm affine and head weights so that nothing is an identity.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("nr", [1, 3])
def test_fused_equals_materialised_function(nr, r):
    torch.manual_seed(0)
    n, lq, lk, d = 3, 10, 13, 8
    q = torch.randn(n, lq, d, dtype=torch.float64) * 0.7
    vk = torch.randn(nr, r, lk, 2 * d, dtype=torch.float64)
    f1, r1 = mrnla_fused(q, vk)
    f2, r2 = mrnla_materialised(q, vk)
    torch.testing.assert_close(f1, f2)
    torch.testing.assert_close(r1, r2)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("b,r", [(1, 3), (2, 2), (4, 3), (2, 1)])
def test_mrnla_module_outputs_and_gradients_fp32(mode, b, r):
    torch.manual_seed(1)
    c, n = 4, 2
    m = MRNLA(c, b)
    _perturb(m)
    getattr(m, mode)()
    x = torch.randn(n, c, 8 * b, 8 * b)
    ref = torch.randn(n * r, c, 8 * b, 16 * b)
    results = []
    for materialised in (False, True):
        xx = x.clone().requires_grad_(True)
        rr = ref.clone().requires_grad_(True)
        m.zero_grad()
        vk = m.reference_vk(rr, r)
        y, rel = m(xx, vk, materialised=materialised)
        (y.square().sum() + (rel * torch.arange(r).view(1, r, 1)).sum()).backward()
        grads = [xx.grad, rr.grad] + [p.grad.clone() for p in m.parameters()]
        results.append((y.detach(), rel.detach(), grads))
    (y1, rel1, g1), (y2, rel2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rel1, rel2, rtol=1e-5, atol=1e-5)
    for a, bb in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, bb, rtol=1e-4, atol=1e-5)


def test_stage1_fused_equals_materialised_all_levels_batch():
    torch.manual_seed(2)
    cfg = ModelConfig(width=4, n_refs=3, mrnla_levels=(0, 1, 2, 3))
    m = Stage1(cfg)
    _perturb(m)
    x = torch.rand(3, 1, 17, 24)  # odd height: padded inside
    refs = torch.rand(3, 3, 24, 16)
    with torch.no_grad():
        a, ra = m(x, refs, return_relevance=True)
        b, rb = m(x, refs, materialised=True, return_relevance=True)
        shared = m(x, refs[:1])  # one reference set shared by the batch (inference path)
        one_by_one = torch.cat([m(x[i : i + 1], refs[:1]) for i in range(3)])
    assert a.shape == x.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k in ra:
        torch.testing.assert_close(ra[k], rb[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared, one_by_one, rtol=1e-5, atol=1e-5)


def test_relevance_sums_to_one_over_references():
    torch.manual_seed(3)
    cfg = ModelConfig(width=4, n_refs=3, mrnla_levels=(0, 1, 2, 3))
    m = Stage1(cfg)
    _perturb(m)
    with torch.no_grad():
        _, rels = m(torch.rand(2, 1, 16, 32), torch.rand(2, 3, 24, 24), return_relevance=True)
    assert set(rels) == {0, 1, 2, 3}
    for rel in rels.values():
        assert rel.shape == (2, 3, 2 * 4)  # (N, R, Lq) with a (16/8)x(32/8) token grid
        assert (rel >= 0).all()
        torch.testing.assert_close(rel.sum(1), torch.ones(2, 8))


def test_paper_preset_size_and_untrained_identity():
    assert abs(param_count(ACVTT(PRESETS["paper"].model).stage1) / 1e6 - 9.3) < 0.1
    m = ACVTT(ModelConfig(width=4, n_refs=1, mrnla_levels=(0,)))
    x = torch.rand(2, 1, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(m.stage1(x, torch.rand(1, 1, 16, 16)), x)
        torch.testing.assert_close(m.fusion(x, 2 * x), 1.5 * x)


def test_factor_conditioning_flag():
    cfg = ModelConfig(width=4, n_refs=1, mrnla_levels=(0,), factor_conditioning=True)
    m = Stage1(cfg)
    _perturb(m)
    x, refs = torch.rand(2, 1, 16, 16), torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(m(x, refs, factor=2), m(x, refs, factor=5))
        m(x, refs, factor=torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match="factor"):
        m(x, refs)


def _reference_stage1(m: Stage1, x, refs, factor):
    """Stage 1 as it was written before `Decoder.forward` existed (issue 14, item 7): the decode
    loop spelled out, MRNLA applied at the configured sites in between."""
    import torch.nn.functional as F

    from acvtt_core.model import pad_to_multiple

    x_p, (h, w) = pad_to_multiple(x)
    cache = m.encode_refs(pad_to_multiple(refs)[0])
    feats = m.encoder(x_p, m._stem_bias(factor, x.shape[0], x.dtype))
    y = feats[3]
    if 0 in m.cfg.mrnla_levels:
        y, _ = m.mrnla["0"](y, cache[0], False)
    for j, block in enumerate(m.decoder.blocks):
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = block(torch.cat([y, feats[2 - j]], dim=1))
        if j + 1 in m.cfg.mrnla_levels:
            y, _ = m.mrnla[str(j + 1)](y, cache[j + 1], False)
    return (m.decoder.head(y) + x_p)[..., :h, :w]


def _reference_unet(net, x):
    import torch.nn.functional as F

    feats = net.encoder(x)
    y = feats[3]
    for j, block in enumerate(net.decoder.blocks):
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = block(torch.cat([y, feats[2 - j]], dim=1))
    return net.decoder.head(y)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(width=4, n_refs=2, mrnla_levels=(0,), factor_conditioning=True),
        ModelConfig(width=4, n_refs=3, mrnla_levels=(0, 1, 2, 3)),
        ModelConfig(width=4, n_refs=1, mrnla_levels=(1, 3), fusion_width=6),
    ],
)
def test_decoder_forward_is_bit_identical_to_the_spelled_out_loop(cfg):
    """One `Decoder.forward` serves stage 1 and the fusion U-Net; on a fixed seed its outputs
    equal the former decode loop bit for bit (torch.equal, fp32), with and without MRNLA sites."""
    torch.manual_seed(0)
    m = ACVTT(cfg).eval()
    _perturb(m)
    x, refs = torch.rand(3, 1, 21, 30), torch.rand(1, cfg.n_refs, 24, 26)
    with torch.no_grad():
        got = m.stage1(x, refs=refs, factor=4.0)
        want = _reference_stage1(m.stage1, x, refs, 4.0)
        assert torch.equal(got, want)
        xf = torch.rand(2, 2, 16, 24)
        assert torch.equal(m.fusion.net(xf), _reference_unet(m.fusion.net, xf))


def test_he_init_keeps_the_signal_that_reaches_the_head_and_the_identity_start():
    """PyTorch's default conv init shrinks activations layer by layer; `he_init` keeps their scale
    (what the recipe relies on), and the zero head still makes the fresh model exactly its input."""
    cfg = ModelConfig(width=8, n_refs=2, mrnla_levels=(0,), factor_conditioning=True)
    x, refs = torch.rand(2, 1, 64, 64), torch.rand(1, 2, 64, 64)
    head_input_std = {}
    for init in ("default", "he"):
        m = fresh_model(cfg, init, seed=0)
        seen = []
        hook = m.stage1.decoder.head.register_forward_hook(
            lambda mod, args, out, seen=seen: seen.append(args[0].std().item())
        )
        with torch.no_grad():
            y = m.stage1(x, refs, factor=4)
        hook.remove()
        torch.testing.assert_close(y, x)
        assert torch.count_nonzero(m.stage1.decoder.head.weight) == 0
        head_input_std[init] = seen[0]
    assert head_input_std["he"] > 5 * head_input_std["default"], head_input_std
