"""Build a real Legacy Converted Enhanced CT instance from single-frame CT files (highdicom)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def write_enhanced_ct(sources: Sequence[Path], path: Path) -> pydicom.Dataset:
    """Convert ``sources`` (single-frame CT files) into one multi-frame instance at ``path``;
    returns that instance."""
    import highdicom as hd

    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(p) for p in sources],
        series_instance_uid=generate_uid(),
        series_number=5,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    enhanced.save_as(path)
    return enhanced
