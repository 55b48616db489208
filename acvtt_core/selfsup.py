"""In-plane self-supervision and realistic thick-slice degradations for ACVTT training.

Every CT volume, even a 5 mm one, has high-resolution axial slices. In-plane self-supervision turns
one axial slice into a stage-1 training sample:

1. resample one in-plane axis ("rows") from the native pixel spacing to the thin spacing being
   taught (`s_t` mm), keeping the other axis native, so that the sample has the same pixel geometry
   as a real through-plane image at inference (rows s_z/R apart, columns at native spacing);
2. degrade the rows by the factor r, by decimation (rows 0, r, 2r, ...) or by a slab average with a
   slice profile (a thick slice is a weighted mean of the r thin rows around it);
3. the input is the corner-aligned linear upsampling of those thick rows, the target is the
   resampled slice itself, and the references are *other* axial slices of the same volume.

`MixedSampler` mixes these with the regular synthetic-z samples (through-plane images of a volume,
degraded along z by decimation HR[::r] or by slab averaging), over factors x2..x5, and plugs into
`acvtt_core.train.train` (it implements the `Sampler` protocol).

All images are normalised intensities (see `acvtt_core.volume.normalise_hu`). Degradations keep the
corner alignment of the rest of acvtt_core: thick row k lies exactly at thin row k*r.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from acvtt_core.train import Batch
from acvtt_core.volume import linear_upsample_z, trim_for_factor

PROFILES = ("box", "gauss")
# Normalised intensity of -500 HU: "body" for crop selection.
BODY_LEVEL = (-500.0 + 1024.0) / 4095.0


# -- slice profiles and degradations -----------------------------------------------------------
def slab_weights(r: int, profile: str = "box", fwhm: float | None = None) -> np.ndarray:
    """Weights over thin-row offsets -r..r (length 2r+1, sums to 1) of one thick slice of a
    slab average at factor r.

    box: a slab exactly r thin rows thick centred on the thick slice: offsets with |j| < r/2 weigh
    1, offsets with |j| == r/2 (even r) weigh 1/2. r=2 -> [1/4, 1/2, 1/4]; r=3 -> [1/3]*3;
    r=4 -> [1, 2, 2, 2, 1]/8.
    gauss: a Gaussian slice profile with the given FWHM in thin rows (default r).
    """
    if r < 1:
        raise ValueError("r must be >= 1")
    j = np.arange(-r, r + 1, dtype=np.float64)
    if profile == "box":
        w = np.where(np.abs(j) < r / 2, 1.0, 0.0) + np.where(np.abs(j) == r / 2, 0.5, 0.0)
    elif profile == "gauss":
        sigma = (fwhm if fwhm is not None else float(r)) / 2.3548200450309493
        w = np.exp(-0.5 * (j / sigma) ** 2)
    else:
        raise ValueError(f"unknown slice profile {profile!r}; choose one of {PROFILES}")
    return (w / w.sum()).astype(np.float64)


def slab_rows(img: np.ndarray, r: int, start: int, count: int, weights: np.ndarray) -> np.ndarray:
    """Thick rows of `img` (axis 0 = the degraded axis) at thin rows start + k*r, k < count.

    Each is sum_j weights[j] * img[row + j] over offsets j = -r..r; offsets that fall outside
    the image are dropped and the remaining weights renormalised (the slab is truncated at the
    edge of the scanned range). Works for 2D (rows, w) and 3D (rows, h, w) arrays.
    """
    img = np.asarray(img, dtype=np.float32)
    n = img.shape[0]
    if len(weights) != 2 * r + 1:
        raise ValueError("weights must have length 2r+1")
    out = np.empty((count, *img.shape[1:]), dtype=np.float32)
    for k in range(count):
        c = start + k * r
        if not 0 <= c < n:
            raise IndexError(f"thick row {k} at thin row {c} is outside 0..{n - 1}")
        lo, hi = max(0, c - r), min(n, c + r + 1)
        w = np.asarray(weights[lo - (c - r) : hi - (c - r)], dtype=np.float64)
        w = w / w.sum()
        out[k] = np.tensordot(w, img[lo:hi].astype(np.float64), axes=(0, 0)).astype(np.float32)
    return out


def degrade_rows(
    img: np.ndarray,
    r: int,
    start: int,
    count: int,
    mode: str = "decimate",
    profile: str = "box",
    fwhm: float | None = None,
) -> np.ndarray:
    """Thick rows at thin rows start + k*r: point samples ("decimate") or slab averages
    ("slab", with a slice profile)."""
    if mode == "decimate":
        return np.asarray(img[start : start + (count - 1) * r + 1 : r], dtype=np.float32)
    if mode == "slab":
        return slab_rows(img, r, start, count, slab_weights(r, profile, fwhm))
    raise ValueError(f"unknown degradation {mode!r}")


def slab_volume(
    hr: np.ndarray, r: int, profile: str = "box", fwhm: float | None = None
) -> np.ndarray:
    """Synthetic thick volume by slab averaging along z: thick slice k at thin slice k*r of the
    trimmed volume (the slab counterpart of `acvtt_core.volume.decimate`)."""
    hr = trim_for_factor(hr, r)
    count = (hr.shape[0] - 1) // r + 1
    return slab_rows(hr, r, 0, count, slab_weights(r, profile, fwhm))


def resample_axis0(img: np.ndarray, src_spacing: float, dst_spacing: float) -> np.ndarray:
    """Resample axis 0 of a 2D image from `src_spacing` to `dst_spacing` mm (linear, with
    anti-aliasing when downsampling; axis 1 untouched). Pixel centres stay aligned at row 0."""
    img = np.asarray(img, dtype=np.float32)
    if abs(dst_spacing - src_spacing) < 1e-6 * src_spacing:
        return img
    n = img.shape[0]
    m = max(2, int(np.floor((n - 1) * src_spacing / dst_spacing)) + 1)
    a = img
    if dst_spacing > src_spacing:  # downsample: low-pass first (anti-aliasing)
        sigma = 0.5 * np.sqrt((dst_spacing / src_spacing) ** 2 - 1.0)
        if sigma > 0.2:
            from scipy.ndimage import gaussian_filter1d

            a = gaussian_filter1d(img, sigma, axis=0, mode="nearest", truncate=3.0)
    # sample at positions i * dst/src (in source rows), linear
    pos = np.arange(m, dtype=np.float64) * dst_spacing / src_spacing
    pos = np.clip(pos, 0, n - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    f = (pos - i0).astype(np.float32)[:, None]
    return ((1 - f) * a[i0] + f * a[i1]).astype(np.float32)


# -- sources and the sampler -------------------------------------------------------------------
@dataclass
class Source:
    """One training volume. vol: normalised (D, H, W), axial slices on axis 0; spacing (z, y, x)
    in mm. `inplane`: use its axial slices for in-plane self-supervision. `synthetic_z`: use its
    through-plane images degraded along z. `weight`: relative sampling weight."""

    name: str
    vol: np.ndarray
    spacing: tuple[float, float, float]
    inplane: bool = True
    synthetic_z: bool = True
    weight: float = 1.0

    def __post_init__(self) -> None:
        self.vol = np.ascontiguousarray(self.vol, dtype=np.float32)
        if self.vol.ndim != 3:
            raise ValueError(f"{self.name}: volume must be 3D, got {self.vol.shape}")

    def describe(self) -> dict:
        """How it was used, for a checkpoint's ``training_data["train_volumes"]``."""
        return {
            "spacing_mm_zyx": list(self.spacing),
            "shape": list(self.vol.shape),
            "inplane": self.inplane,
            "synthetic_z": self.synthetic_z,
            "weight": self.weight,
        }


def _crop_start(profile: np.ndarray, size: int, rng: np.random.Generator, align: int = 1) -> int:
    """Random start of a window of `size` along a 1D body profile (fraction of body pixels),
    preferring windows that hold body; starts are multiples of `align`."""
    n = len(profile)
    starts = np.arange(0, n - size + 1, align)
    if len(starts) == 0:
        raise ValueError("window larger than the image")
    cs = np.concatenate([[0.0], np.cumsum(profile)])
    mass = cs[starts + size] - cs[starts]
    p = mass + 0.05 * (mass.max() + 1e-6)  # mostly body, sometimes anything
    return int(rng.choice(starts, p=p / p.sum()))


def _crop2d(img: np.ndarray, h: int, w: int, rng: np.random.Generator, align: int = 1):
    body = img > BODY_LEVEL
    y0 = _crop_start(body.mean(1), h, rng, align)
    x0 = _crop_start(body[y0 : y0 + h].mean(0), w, rng)
    return y0, x0


@dataclass
class MixedSampler:
    """Stage-1 samples mixing in-plane self-supervision and synthetic-z degradation.

    factors: the factors to teach (one per batch, uniformly).
    p_inplane: probability that a batch is in-plane self-supervised (else synthetic z).
    p_slab: probability that a sample's thick rows are slab averages (else decimation).
    thin_mm: (lo, hi) range of the thin spacing taught by in-plane samples (log-uniform,
        never finer than the slice's native pixel spacing).
    crop: target crop size; heights are the largest k*r+1 <= crop + 1 that fit.
    ref_crop: size of each reference crop (<= the slice size).
    ref_exclude: in-plane references are at least this many slices from the source slice.
    """

    sources: Sequence[Source]
    factors: Sequence[int] = (2, 3, 4, 5)
    n_refs: int = 2
    crop: int = 128
    ref_crop: int = 128
    p_inplane: float = 0.6
    p_slab: float = 0.5
    thin_mm: tuple[float, float] = (0.8, 5.0)
    profiles: Sequence[str] = PROFILES
    ref_exclude: int = 2
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("no training sources")
        self._ip = [s for s in self.sources if s.inplane]
        self._sz = [s for s in self.sources if s.synthetic_z and s.vol.shape[0] > max(self.factors)]
        if not self._ip and not self._sz:
            raise ValueError("no source usable for in-plane or synthetic-z samples")

    def describe(self) -> dict[str, Any]:
        return {
            "sampler": "acvtt_core.selfsup.MixedSampler",
            "inplane_sources": [s.name for s in self._ip],
            "synthetic_z_sources": [s.name for s in self._sz],
            "source_spacing_mm_zyx": {s.name: list(map(float, s.spacing)) for s in self.sources},
            "factors": list(self.factors),
            "p_inplane": self.p_inplane,
            "p_slab": self.p_slab,
            "slab_profiles": list(self.profiles),
            "thin_mm": list(self.thin_mm),
            "crop": self.crop,
            "ref_crop": self.ref_crop,
            "n_refs": self.n_refs,
        }

    # --- pieces -----------------------------------------------------------------------------
    def _pick(self, pool: Sequence[Source], rng: np.random.Generator) -> Source:
        w = np.array([s.weight for s in pool], dtype=np.float64)
        return pool[int(rng.choice(len(pool), p=w / w.sum()))]

    def _degradation(self, rng: np.random.Generator, r: int) -> tuple[str, str, float | None]:
        if rng.random() < self.p_slab:
            prof = str(self.profiles[int(rng.integers(len(self.profiles)))])
            fwhm = float(r * rng.uniform(0.8, 1.2)) if prof == "gauss" else None
            return "slab", prof, fwhm
        return "decimate", "", None

    def _ref_crops(self, slices: list[np.ndarray], rng: np.random.Generator, rc: int) -> np.ndarray:
        out = []
        for a in slices:
            y0, x0 = _crop2d(a, rc, rc, rng)
            out.append(a[y0 : y0 + rc, x0 : x0 + rc])
        return np.stack(out)

    def _inplane_plan(self, src: Source, r: int, rng: np.random.Generator):
        """(thin spacing taught s_t, crop rows h, crop columns w, reference crop rc) of an
        in-plane batch of `src` at factor r; s_t is log-uniform in thin_mm, never finer than
        the slice's pixels."""
        _, hh, ww = src.vol.shape
        _, sy, sx = src.spacing
        native = min(sy, sx)
        lo = max(self.thin_mm[0], native)
        hi = max(lo, self.thin_mm[1])
        s_t = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        # rows of the resampled degraded axis, columns native: find the crop that fits all axes
        h_rows = int(np.floor((min(hh, ww) - 1) * native / s_t)) + 1
        h = min(self.crop + 1, h_rows)
        h = (h - 1) // r * r + 1
        w = min(self.crop, min(hh, ww))
        rc = min(self.ref_crop, hh, ww)
        if h < 2 * r + 1:
            raise ValueError(f"{src.name}: slices too small for factor {r} at {s_t:.2f} mm")
        return s_t, h, w, rc

    def _far_slices(self, z: int, d: int, rng: np.random.Generator) -> list[int]:
        """n_refs reference slice indices at least ref_exclude slices away from slice z."""
        far = (
            [i for i in range(d) if abs(i - z) >= self.ref_exclude]
            or [i for i in range(d) if i != z]
            or [z]
        )
        return [far[int(rng.integers(len(far)))] for _ in range(self.n_refs)]

    def _inplane_batch(self, n: int, r: int, rng: np.random.Generator):
        src = self._pick(self._ip, rng)
        d = src.vol.shape[0]
        _, sy, sx = src.spacing
        s_t, h, w, rc = self._inplane_plan(src, r, rng)
        xs, ts, refs = [], [], []
        for _ in range(n):
            z = int(rng.integers(d))
            img = src.vol[z]
            # degraded axis: rows (y) or columns (x), 50/50
            if rng.random() < 0.5:
                img, sp = img.T, sx
            else:
                sp = sy
            img = resample_axis0(img, sp, s_t)
            mode, prof, fwhm = self._degradation(rng, r)
            y0, x0 = _crop2d(img, h, w, rng)
            k = (h - 1) // r + 1
            thick = degrade_rows(img[:, x0 : x0 + w], r, y0, k, mode, prof or "box", fwhm)
            xs.append(linear_upsample_z(thick, r))
            ts.append(img[y0 : y0 + h, x0 : x0 + w])
            ridx = self._far_slices(z, d, rng)
            refs.append(self._ref_crops([src.vol[i] for i in ridx], rng, rc))
            self.counts[f"inplane:{src.name}:{mode}"] = (
                self.counts.get(f"inplane:{src.name}:{mode}", 0) + 1
            )
        return xs, ts, refs

    def _synthz_batch(self, n: int, r: int, rng: np.random.Generator):
        src = self._pick(self._sz, rng)
        vol = trim_for_factor(src.vol, r)
        d, hh, ww = vol.shape
        h = min(self.crop + 1, d)
        h = (h - 1) // r * r + 1
        w = min(self.crop, hh, ww)
        rc = min(self.ref_crop, hh, ww)
        nthick = (d - 1) // r + 1
        xs, ts, refs = [], [], []
        for _ in range(n):
            mode, prof, fwhm = self._degradation(rng, r)
            if rng.random() < 0.5:  # coronal: fix y
                img = vol[:, int(rng.integers(hh)), :]
            else:  # sagittal: fix x
                img = vol[:, :, int(rng.integers(ww))]
            z0, x0 = _crop2d(img, h, w, rng, align=r)
            k = (h - 1) // r + 1
            thick = degrade_rows(img[:, x0 : x0 + w], r, z0, k, mode, prof or "box", fwhm)
            xs.append(linear_upsample_z(thick, r))
            ts.append(img[z0 : z0 + h, x0 : x0 + w])
            # references: axial slices of the thick volume made with the same degradation
            ks = [int(rng.integers(nthick)) for _ in range(self.n_refs)]
            slices = [degrade_rows(vol, r, kk * r, 1, mode, prof or "box", fwhm)[0] for kk in ks]
            refs.append(self._ref_crops(slices, rng, rc))
            self.counts[f"synthz:{src.name}:{mode}"] = (
                self.counts.get(f"synthz:{src.name}:{mode}", 0) + 1
            )
        return xs, ts, refs

    # --- Sampler protocol ---------------------------------------------------------------------
    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        r = int(self.factors[int(rng.integers(len(self.factors)))])
        use_ip = bool(self._ip) and (not self._sz or rng.random() < self.p_inplane)
        xs, ts, refs = (self._inplane_batch if use_ip else self._synthz_batch)(batch_size, r, rng)
        return Batch(
            x=torch.from_numpy(np.stack(xs)[:, None].astype(np.float32)),
            target=torch.from_numpy(np.stack(ts)[:, None].astype(np.float32)),
            factor=torch.full((batch_size,), float(r)),
            refs=torch.from_numpy(np.stack(refs).astype(np.float32)),
        )


__all__ = [
    "MixedSampler",
    "Source",
    "degrade_rows",
    "resample_axis0",
    "slab_rows",
    "slab_volume",
    "slab_weights",
]
