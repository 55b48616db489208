"""The paper's evaluation protocol on normalised ([0, 1]) volumes."""

from __future__ import annotations

import numpy as np

EDGE = 5  # thin slices dropped at each z end
MIN_DEPTH = 7  # skimage's default SSIM window: a 3D SSIM needs 7 slices after the crop


def psnr(pred: np.ndarray, gt: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((pred.astype(np.float64) - gt.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(b, a, data_range=1.0))


def ssim2d_mean(pred: np.ndarray, gt: np.ndarray, axis: int) -> float:
    """Mean 2D SSIM over the slices along `axis` (0 axial, 1 coronal, 2 sagittal)."""
    p, g = np.moveaxis(pred, axis, 0), np.moveaxis(gt, axis, 0)
    return float(np.mean([_ssim(p[i], g[i]) for i in range(p.shape[0])]))


def paper_metrics(pred: np.ndarray, gt: np.ndarray, factor: int, edge: int = EDGE) -> dict:
    """PSNR (data range 1) and 3D SSIM (skimage defaults) over the volume without `edge` thin
    slices at each z end; PSNR on the synthesised slices only (rows not on a thick slice); and
    mean 2D SSIM per view. `pred` and `gt` are normalised (D, H, W) with row k*factor on thick
    slice k."""
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch {pred.shape} vs {gt.shape}")
    d = gt.shape[0]
    if d - 2 * edge < MIN_DEPTH:
        raise ValueError(f"volume of depth {d} too thin for the protocol")
    p = np.clip(pred[edge : d - edge], 0.0, 1.0).astype(np.float32)
    g = gt[edge : d - edge].astype(np.float32)
    synth = (np.arange(edge, d - edge) % factor) != 0
    return {
        "psnr": psnr(p, g),
        "ssim": _ssim(p, g),
        "psnr_synth": psnr(p[synth], g[synth]),
        "ssim_axial": ssim2d_mean(p, g, 0),
        "ssim_coronal": ssim2d_mean(p, g, 1),
        "ssim_sagittal": ssim2d_mean(p, g, 2),
    }
