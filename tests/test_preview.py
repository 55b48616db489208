"""Preview PNG: layout, physical aspect and shared window."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dicom_node.preview import write_preview_png


def test_preview_layout_aspect_and_window(tmp_path):
    # thick: 10 slices of 5 mm over 64 x 48 pixels of 1 mm -> coronal 50 mm high, 48 mm wide
    thick = np.full((10, 64, 48), -1000.0, np.float32)
    thin = np.full((46, 64, 48), 1000.0, np.float32)  # factor 5 -> 1 mm
    thick[:5] = 40.0  # the lower half (first slices) at the window center
    info = write_preview_png(
        thick, thin, (5.0, 1.0, 1.0), (1.0, 1.0, 1.0), tmp_path / "p" / "job.png", window=(40, 400)
    )
    img = Image.open(info.path)
    assert img.format == "PNG" and img.size == info.size
    a = np.asarray(img)

    left, top, right, bottom = info.panels["coronal thick"]
    assert (right - left, bottom - top) == (48, 50)  # physical: x 48 mm, z 10 * 5 mm
    left, top, right, bottom = info.panels["sagittal thick"]
    assert (right - left, bottom - top) == (64, 50)
    left, top, right, bottom = info.panels["coronal derived"]
    assert (right - left, bottom - top) == (48, 46)

    # Same window everywhere: -1000 HU -> 0, 40 HU (center) -> 128, 1000 HU -> 255.
    left, top, right, bottom = info.panels["coronal thick"]
    assert a[top + 2, left + 10] == 0  # top of the panel = last slices = -1000 HU
    assert a[bottom - 2, left + 10] == 128  # bottom = first slices = window center
    left, top, right, bottom = info.panels["sagittal derived"]
    assert a[(top + bottom) // 2, (left + right) // 2] == 255
    # Derived panels are to the right of thick ones, coronal above sagittal.
    assert info.panels["coronal derived"][0] > info.panels["coronal thick"][2]
    assert info.panels["sagittal thick"][1] > info.panels["coronal thick"][3]


def test_preview_caps_large_volumes(tmp_path):
    thick = np.zeros((20, 512, 512), np.float32)
    thin = np.zeros((39, 512, 512), np.float32)
    info = write_preview_png(
        thick, thin, (2.0, 0.977, 0.977), (1.0, 0.977, 0.977), tmp_path / "big.png"
    )
    for box in info.panels.values():
        assert box[2] - box[0] <= 512 and box[3] - box[1] <= 512
    assert info.path.stat().st_size < 200_000
