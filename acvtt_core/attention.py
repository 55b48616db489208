"""Multi-Reference Non-Local Attention (MRNLA).

Tokens are non-overlapping b x b patches, so a feature map (N, C, H, W) becomes (N, L, C*b*b) with
L = (H/b)(W/b). For every reference r the module computes

    S_r = q k_r^T,   A_r = softmax_keys(S_r),   T_r = A_r v_r,
    score_r = sum_keys A_r * S_r,   relevance = softmax_r(score_r),   fused = sum_r relevance_r T_r

with q already scaled by d^-1/2. Because sum_k A_qk S_qk = q . (sum_k A_qk k_k), a single fused
attention call over values [v | k] yields both T_r and the attention-weighted key mean k_bar_r,
and score_r = q . k_bar_r. Nothing of size R x Lq x Lk is ever materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mrnla_fused(q: torch.Tensor, vk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact MRNLA fusion with one scaled_dot_product_attention call.

    q: (N, Lq, d), already layer-normed and scaled by d^-1/2.
    vk: (Nr, R, Lk, 2d), values and keys concatenated on the last axis; Nr is N (one reference
        set per sample) or 1 (one set shared by the whole batch, as at inference).
    Returns fused (N, Lq, d) and relevance (N, R, Lq), which sums to 1 over R.
    """
    n, lq, d = q.shape
    nr, r, lk, d2 = vk.shape
    if d2 != 2 * d:
        raise ValueError(f"vk last dim {d2} must be twice q's {d}")
    k = vk[..., d:]
    if nr == 1 and n > 1:
        # Shared references: every query of every sample attends to the same keys, so stack
        # the batch into the query axis and make one bigger attention call.
        qq = q.reshape(1, 1, n * lq, d).expand(1, r, n * lq, d)
    elif nr == n:
        qq = q.unsqueeze(1).expand(n, r, lq, d)
    else:
        raise ValueError(f"reference batch {nr} must be 1 or equal the query batch {n}")
    if r == 1:
        # One reference: its relevance is 1 whatever its score, so k_bar is not needed and the
        # call can carry v alone (a third fewer FLOPs, same result).
        t = F.scaled_dot_product_attention(qq, k, vk[..., :d], scale=1.0)
        fused = t[:, 0]
        rel = torch.ones(fused.shape[0], 1, fused.shape[1], dtype=q.dtype, device=q.device)
        if nr == 1 and n > 1:
            fused, rel = fused.reshape(n, lq, d), rel.reshape(n, 1, lq)
        return fused, rel
    if q.device.type == "cpu":
        # PyTorch's fused CPU kernel (flash) needs equal q/k and v head dims; with v of width 2d
        # it silently falls back to the math path, which materialises Lq x Lk. Zero-padding q
        # and k to 2d leaves q.k unchanged and keeps the fused kernel (measured 2x faster).
        qq, k = F.pad(qq, (0, d)), F.pad(k, (0, d))
    # q is pre-scaled, so SDPA must not scale again.
    out = F.scaled_dot_product_attention(qq, k, vk, scale=1.0)
    t, kbar = out[..., :d], out[..., d:]
    score = (qq[..., :d] * kbar).sum(-1)  # (Nr, R, Lq')
    rel = torch.softmax(score, dim=1)
    fused = (rel.unsqueeze(-1) * t).sum(1)  # (Nr, Lq', d)
    if nr == 1 and n > 1:
        fused = fused.reshape(n, lq, d)
        rel = rel.reshape(r, n, lq).transpose(0, 1)
    return fused, rel


def mrnla_materialised(q: torch.Tensor, vk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation of `mrnla_fused` that follows the formulas literally (used by
    tests and by the port of the authors' slow loop). Same inputs and outputs."""
    n, lq, d = q.shape
    nr, r, lk, _ = vk.shape
    v, k = vk[..., :d], vk[..., d:]
    if nr == 1 and n > 1:
        v, k = v.expand(n, r, lk, d), k.expand(n, r, lk, d)
    s = torch.einsum("nqd,nrkd->nrqk", q, k)
    a = torch.softmax(s, dim=-1)
    t = torch.einsum("nrqk,nrkd->nrqd", a, v)
    score = (a * s).sum(-1)
    rel = torch.softmax(score, dim=1)
    fused = (rel.unsqueeze(-1) * t).sum(1)
    return fused, rel


class MRNLA(nn.Module):
    """MRNLA block at one decoder level: channels `c`, patch size `b`."""

    def __init__(self, c: int, b: int):
        super().__init__()
        self.c, self.b = c, b
        self.d = c * b * b
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.norm_q = nn.LayerNorm(self.d)
        self.norm_k = nn.LayerNorm(self.d)
        self.out = nn.Conv2d(c, c, 1)
        self.scale = self.d**-0.5

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        # (N, C, H, W) -> (N, L, C*b*b); pixel_unshuffle orders channels like F.unfold.
        t = F.pixel_unshuffle(x, self.b) if self.b > 1 else x
        return t.flatten(2).transpose(1, 2)

    def reference_vk(self, ref_feat: torch.Tensor, n_refs: int) -> torch.Tensor:
        """Project reference features (N*R, C, H, W) to the cached [v | k] tensor (N, R, Lk, 2d)."""
        k = self.norm_k(self._tokens(self.k(ref_feat)))
        v = self._tokens(self.v(ref_feat))
        vk = torch.cat([v, k], dim=-1)
        return vk.reshape(-1, n_refs, *vk.shape[1:])

    def forward(
        self, x: torch.Tensor, vk: torch.Tensor, materialised: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        q = self.norm_q(self._tokens(self.q(x))) * self.scale
        fn = mrnla_materialised if materialised else mrnla_fused
        fused, rel = fn(q, vk)
        fused = fused.transpose(1, 2).reshape(n, self.d, h // self.b, w // self.b)
        if self.b > 1:
            fused = F.pixel_shuffle(fused, self.b)
        return x + self.out(fused), rel
