"""A small derived series for delivery tests, written by the node's own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from dicom_node.write import SourceImage, write_derived_series


def small_derived_series(ct_folder: Path, out_dir: Path) -> list[Path]:
    """9 uncompressed 32x32 derived instances (factor 2) from the headers of the first 5 slices
    of the real CT series in ``ct_folder``."""
    files = sorted(Path(ct_folder).glob("*.dcm"))[:5]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    headers.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    for h in headers:
        h.Rows, h.Columns = 32, 32
    vol = np.linspace(-1000, 1000, 9 * 32 * 32, dtype=np.float32).reshape(9, 32, 32)
    write_derived_series(
        [SourceImage(h) for h in headers], vol, factor=2, model_id="t", model_version="1",
        out_dir=out_dir,
    )  # fmt: skip
    return sorted(Path(out_dir).glob("*.dcm"))
