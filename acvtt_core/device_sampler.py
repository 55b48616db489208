"""`selfsup.MixedSampler`'s samples made on the training device (sampler `selfsup-torch`).

The same mixture and parameters as `MixedSampler` (in-plane self-supervision and synthetic z,
decimation and slab averaging, factors, thin spacings, body-biased crops, references), but the
volumes are moved to the device once and every per-sample operation is a torch op on the whole
batch there: picking slices, in-plane resampling with anti-aliasing, crops, decimation, slab
averaging, linear upsampling of the thick rows. On a GPU the CPU cores then only make a few dozen
small random choices per batch and never starve it.

Randomness: the structural choices (factor, kind, source, thin spacing, slices, orientations,
degradations, reference slices) come from the numpy generator that `train` saves and restores,
through the same `MixedSampler` helpers; the data-dependent ones (body-biased crop positions) come
from a torch generator on the device that is reseeded from the numpy generator for every batch. So
a resumed run draws the same batches as an uninterrupted one on the same device. The draws differ
from `MixedSampler`'s (other generator), the distributions are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from acvtt_core.selfsup import BODY_LEVEL, MixedSampler, Source, slab_weights
from acvtt_core.train import Batch
from acvtt_core.volume import linear_upsample_z


# -- torch counterparts of the selfsup helpers (batched over axis 0) ---------------------------
def gaussian_kernel(sigma: float, truncate: float = 3.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d's kernel (radius int(truncate * sigma + 0.5))."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def resample_rows(img: torch.Tensor, src_spacing: float, dst_spacing: float) -> torch.Tensor:
    """Batched `selfsup.resample_axis0`: rows (axis 1) of (n, rows, cols) images from
    `src_spacing` to `dst_spacing` mm, low-passed first when downsampling (Gaussian, edges
    replicated as scipy's mode="nearest"), linear, row 0 kept in place."""
    if abs(dst_spacing - src_spacing) < 1e-6 * src_spacing:
        return img
    n_rows = img.shape[1]
    m = max(2, int(np.floor((n_rows - 1) * src_spacing / dst_spacing)) + 1)
    a = img
    if dst_spacing > src_spacing:
        sigma = 0.5 * np.sqrt((dst_spacing / src_spacing) ** 2 - 1.0)
        if sigma > 0.2:
            k = torch.as_tensor(gaussian_kernel(sigma), dtype=img.dtype, device=img.device)
            rad = (len(k) - 1) // 2
            a4 = F.pad(img[:, None], (0, 0, rad, rad), mode="replicate")
            a = F.conv2d(a4, k.reshape(1, 1, -1, 1))[:, 0]
    pos = np.clip(np.arange(m, dtype=np.float64) * dst_spacing / src_spacing, 0, n_rows - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_rows - 1)
    f = torch.as_tensor((pos - i0).astype(np.float32), device=img.device)[None, :, None]
    i0_t = torch.as_tensor(i0, device=img.device)
    i1_t = torch.as_tensor(i1, device=img.device)
    return (1 - f) * a[:, i0_t] + f * a[:, i1_t]


def slab_rows(img: torch.Tensor, r: int, start: torch.Tensor, count: int, weights: torch.Tensor):
    """Batched `selfsup.slab_rows`: thick rows of each (rows, cols) image of `img` (n, rows,
    cols) at thin rows start[i] + k*r, k < count, each the weights[i]-weighted mean of the thin
    rows at offsets -r..r, truncated and renormalised at the image's ends. A one-hot weight
    vector is decimation (an exact copy of the rows)."""
    n, n_rows, _ = img.shape
    dev = img.device
    offs = torch.arange(-r, r + 1, device=dev)
    rows = start[:, None, None] + (torch.arange(count, device=dev) * r)[None, :, None] + offs
    valid = (rows >= 0) & (rows < n_rows)  # (n, count, 2r+1)
    w = weights[:, None, :] * valid
    w = w / w.sum(-1, keepdim=True)
    picked = torch.gather(
        img, 1, rows.clamp(0, n_rows - 1).reshape(n, -1, 1).expand(-1, -1, img.shape[2])
    ).reshape(n, count, 2 * r + 1, -1)
    return (picked * w[..., None]).sum(2)


def _window_start(profile: torch.Tensor, size: int, align: int, gen: torch.Generator):
    """Batched `selfsup._crop_start`: a random start (multiple of `align`) per row of
    `profile` (n, length), weighted by the body mass in the window plus 5 % of the best one."""
    n_pos = profile.shape[1]
    starts = torch.arange(0, n_pos - size + 1, align, device=profile.device)
    if len(starts) == 0:
        raise ValueError("window larger than the image")
    cs = F.pad(torch.cumsum(profile.double(), 1), (1, 0))
    mass = cs[:, starts + size] - cs[:, starts]
    p = mass + 0.05 * (mass.amax(1, keepdim=True) + 1e-6)
    return starts[torch.multinomial(p, 1, generator=gen)[:, 0]]


def crop_starts(img: torch.Tensor, h: int, w: int, gen: torch.Generator, align: int = 1):
    """Batched `selfsup._crop2d`: body-biased (y0, x0) per image of (n, rows, cols); y0 from the
    row profile of the body mask, x0 from the column profile of the chosen rows."""
    body = (img > BODY_LEVEL).float()
    y0 = _window_start(body.mean(2), h, align, gen)
    band = torch.gather(body, 1, _span(y0, h)[:, :, None].expand(-1, -1, body.shape[2]))
    x0 = _window_start(band.mean(1), w, 1, gen)
    return y0, x0


def _span(start: torch.Tensor, size: int) -> torch.Tensor:
    return start[:, None] + torch.arange(size, device=start.device)


def take(img: torch.Tensor, y0: torch.Tensor | None, h: int, x0: torch.Tensor, w: int):
    """Per-image crops of (n, rows, cols): rows y0..y0+h (all rows when y0 is None), columns
    x0..x0+w."""
    cols = torch.gather(img, 2, _span(x0, w)[:, None, :].expand(-1, img.shape[1], -1))
    if y0 is None:
        return cols
    return torch.gather(cols, 1, _span(y0, h)[:, :, None].expand(-1, -1, w))


# -- the sampler -------------------------------------------------------------------------------
@dataclass
class DeviceMixedSampler(MixedSampler):
    """`MixedSampler` on `device` (see the module docstring). Same parameters, plus `device`."""

    device: str = "cpu"

    def __post_init__(self) -> None:
        super().__post_init__()
        # Every volume goes to the device once; samples are made there from then on.
        self._vols = {id(s): torch.from_numpy(s.vol).to(self.device) for s in self.sources}
        self._gen = torch.Generator(device=self.device)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "sampler": "acvtt_core.device_sampler.DeviceMixedSampler",
            "device": str(self.device),
        }

    def _weights(self, modes: list[tuple[str, str, float | None]], r: int) -> torch.Tensor:
        """(n, 2r+1) slab weights per sample; one-hot for decimation."""
        rows = []
        for mode, prof, fwhm in modes:
            if mode == "slab":
                rows.append(slab_weights(r, prof or "box", fwhm))
            else:
                rows.append(np.eye(2 * r + 1)[r])
        return torch.as_tensor(np.stack(rows), dtype=torch.float32, device=self.device)

    def _count(self, kind: str, src: Source, modes) -> None:
        for mode, _, _ in modes:
            key = f"{kind}:{src.name}:{mode}"
            self.counts[key] = self.counts.get(key, 0) + 1

    def _ref_crops(self, slices: torch.Tensor, rc: int) -> torch.Tensor:
        y0, x0 = crop_starts(slices, rc, rc, self._gen)
        return take(slices, y0, rc, x0, rc)

    def _inplane(self, n: int, r: int, rng: np.random.Generator):
        src = self._pick(self._ip, rng)
        vol = self._vols[id(src)]
        d = src.vol.shape[0]
        _, sy, sx = src.spacing
        s_t, h, w, rc = self._inplane_plan(src, r, rng)
        zs = rng.integers(d, size=n)
        transposed = rng.random(n) < 0.5  # degrade columns (x) instead of rows (y)
        modes = [self._degradation(rng, r) for _ in range(n)]
        k = (h - 1) // r + 1
        xs, ts, order = [], [], []
        for flag in (False, True):
            idx = np.flatnonzero(transposed == flag)
            if len(idx) == 0:
                continue
            sl = vol[torch.as_tensor(zs[idx], device=self.device)]
            if flag:
                sl = sl.transpose(1, 2)
            img = resample_rows(sl, sx if flag else sy, s_t)
            y0, x0 = crop_starts(img, h, w, self._gen)
            cols = take(img, None, h, x0, w)
            thick = slab_rows(cols, r, y0, k, self._weights([modes[i] for i in idx], r))
            xs.append(linear_upsample_z(thick.transpose(0, 1), r).transpose(0, 1))
            ts.append(take(img, y0, h, x0, w))
            order.extend(idx)
        ridx = np.stack([self._far_slices(int(z), d, rng) for z in zs])
        refs = self._ref_crops(vol[torch.as_tensor(ridx.ravel(), device=self.device)], rc)
        self._count("inplane", src, modes)
        perm = torch.as_tensor(np.argsort(order), device=self.device)
        return torch.cat(xs)[perm], torch.cat(ts)[perm], refs.reshape(n, self.n_refs, rc, rc)

    def _synthz(self, n: int, r: int, rng: np.random.Generator):
        src = self._pick(self._sz, rng)
        d0 = src.vol.shape[0]
        vol = self._vols[id(src)][: (d0 - 1) // r * r + 1]
        d, hh, ww = vol.shape
        h = (min(self.crop + 1, d) - 1) // r * r + 1
        w, rc = min(self.crop, hh, ww), min(self.ref_crop, hh, ww)
        nthick, k = (d - 1) // r + 1, (h - 1) // r + 1
        modes = [self._degradation(rng, r) for _ in range(n)]
        coronal = rng.random(n) < 0.5  # coronal: fix y; sagittal: fix x
        where = np.where(coronal, rng.integers(hh, size=n), rng.integers(ww, size=n))
        weights = self._weights(modes, r)
        xs, ts, order = [], [], []
        for flag in (True, False):
            idx = np.flatnonzero(coronal == flag)
            if len(idx) == 0:
                continue
            at = torch.as_tensor(where[idx], device=self.device)
            img = vol[:, at, :].permute(1, 0, 2) if flag else vol[:, :, at].permute(2, 0, 1)
            z0, x0 = crop_starts(img, h, w, self._gen, align=r)
            cols = take(img, None, h, x0, w)
            thick = slab_rows(cols, r, z0, k, weights[torch.as_tensor(idx, device=self.device)])
            xs.append(linear_upsample_z(thick.transpose(0, 1), r).transpose(0, 1))
            ts.append(take(img, z0, h, x0, w))
            order.extend(idx)
        # References: axial slices of the thick volume made with each sample's degradation.
        kk = rng.integers(nthick, size=(n, self.n_refs))
        refs = self._thick_axial(vol, torch.as_tensor(kk * r, device=self.device), weights, r)
        self._count("synthz", src, modes)
        perm = torch.as_tensor(np.argsort(order), device=self.device)
        refs = self._ref_crops(refs.reshape(n * self.n_refs, hh, ww), rc)
        return torch.cat(xs)[perm], torch.cat(ts)[perm], refs.reshape(n, self.n_refs, rc, rc)

    @staticmethod
    def _thick_axial(vol: torch.Tensor, centre: torch.Tensor, weights: torch.Tensor, r: int):
        """(n, R, H, W) thick axial slices at thin slices `centre` (n, R): slab averages with
        each sample's weights (n, 2r+1), truncated and renormalised at the volume's ends."""
        d = vol.shape[0]
        acc = torch.zeros((*centre.shape, *vol.shape[1:]), device=vol.device)
        total = torch.zeros(centre.shape, device=vol.device)
        for j in range(-r, r + 1):
            z = centre + j
            wj = weights[:, j + r, None] * ((z >= 0) & (z < d))  # (n, R)
            acc += wj[..., None, None] * vol[z.clamp(0, d - 1)]
            total += wj
        return acc / total[..., None, None]

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        r = int(self.factors[int(rng.integers(len(self.factors)))])
        use_ip = bool(self._ip) and (not self._sz or rng.random() < self.p_inplane)
        self._gen.manual_seed(int(rng.integers(2**62)))
        x, t, refs = (self._inplane if use_ip else self._synthz)(batch_size, r, rng)
        return Batch(
            x=x[:, None].contiguous(),
            target=t[:, None].contiguous(),
            factor=torch.full((batch_size,), float(r), device=self.device),
            refs=refs.contiguous(),
        )
