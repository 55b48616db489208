"""The writer copies only valid values: bad headers of the real 20-slice CT still give a derived
series with 0 dciodvfy errors, and each repair is a note without patient data.

Every source here is the real sample series with rewritten headers, saved and read back with
pydicom as the node reads what it received (so a VR sent as UL really arrives as UL).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.write import write_derived_series
from dicom_node.write_attributes import UNPAIRED_BODY_PARTS
from tests.test_write import MODEL, dcentvfy_errors, dciodvfy_errors, linear_thin

LONG_NAME = "Verylongfamilyname" * 3400  # 61,200 characters: the 64 KB name of the report
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on bad values


@pytest.fixture(scope="module")
def real_headers(sample_data) -> tuple[list[Dataset], np.ndarray]:
    """Headers of the real series in stacking order (as the file numbers them) and a thin volume;
    the volume's values do not matter here, only its shape."""
    files = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    headers.sort(key=lambda d: int(d.InstanceNumber))
    thick = np.full((len(headers), int(headers[0].Rows), int(headers[0].Columns)), -500.0)
    return headers, linear_thin(thick.astype(np.float32), 2)


def _rewritten(
    headers: list[Dataset], tmp_path: Path, change: Callable[[Dataset], None]
) -> list[Dataset]:
    """Apply ``change`` to a copy of each header, save it and read it back."""
    out = []
    for i, h in enumerate(headers):
        ds = deepcopy(h)
        change(ds)
        path = tmp_path / f"src{i:03d}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path, enforce_file_format=True)
        out.append(pydicom.dcmread(path))
    return out


def _write_and_verify(sources: list[Dataset], thin: np.ndarray, out_dir: Path):
    """Write the derived series, and check every file with dciodvfy and the lot with dcentvfy."""
    derived = write_derived_series(sources, thin, factor=2, out_dir=out_dir, **MODEL)
    paths = [Path(ds.filename) for ds in derived.datasets]
    assert len(paths) == 39
    for path in paths:
        assert dciodvfy_errors(path) == [], path
    assert dcentvfy_errors(paths) == []
    return derived, [pydicom.dcmread(p) for p in paths]


def _chest_long_name_rows_ul(ds: Dataset) -> None:
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = LONG_NAME
    ds["Rows"].VR = "UL"
    ds["Columns"].VR = "UL"


def test_chest_long_name_and_rows_as_ul(real_headers, tmp_path):
    headers, thin = real_headers
    sources = _rewritten(headers, tmp_path, _chest_long_name_rows_ul)
    assert sources[0]["Rows"].VR == "UL" and len(str(sources[0].PatientName)) == len(LONG_NAME)
    derived, files = _write_and_verify(sources, thin, tmp_path / "out")
    for ds in files:
        assert "Laterality" not in ds  # CHEST is not a paired structure
        assert ds["Rows"].VR == "US" and ds.Rows == 512 and ds["Columns"].VR == "US"
        assert str(ds.PatientName) == LONG_NAME[:64]
    assert any(n.startswith("PatientName:") for n in derived.notes)
    assert any(n.startswith("Rows: sent with VR UL") for n in derived.notes)
    assert not any("Verylong" in n for n in derived.notes)  # notes never carry values


def _many_bad_text_values(ds: Dataset) -> None:
    ds.BodyPartExamined = "knee"  # lower case: invalid CS
    ds.StudyDescription = "Study " * 60  # LO, 360 characters
    ds.AccessionNumber = "A" * 40  # SH, 40 characters
    ds.InstitutionAddress = "Street\r\n" * 200  # ST, 1600 characters
    ds.StudyDate = "2022-12-08"  # DA in the wrong format: cannot be repaired
    ds.PatientAge = "45"  # AS without its unit
    ds.ProtocolName = "FDG\x01TK"  # control character in single-line text
    ds.add_new(0x00180060, "DS", "120.000000000000001")  # KVP, 19 characters
    ds.add_new(0x00200012, "IS", "14.0")  # AcquisitionNumber, not an integer string
    item = ds.ProcedureCodeSequence[0]
    item.CodeMeaning = "PET/CT " * 20  # LO inside a sequence
    item.add_new(0x00091001, "LO", "private inside a sequence")


def test_text_too_long_bad_dates_and_numbers(real_headers, tmp_path):
    headers, thin = real_headers
    sources = _rewritten(headers, tmp_path, _many_bad_text_values)
    derived, files = _write_and_verify(sources, thin, tmp_path / "out")
    ds = files[0]
    assert ds.BodyPartExamined == "KNEE"
    assert ds.Laterality == ""  # a paired structure without a known side: present, empty
    assert ds.StudyDescription == ("Study " * 60)[:64].rstrip()
    assert ds.AccessionNumber == "A" * 16
    assert len(ds.InstitutionAddress) <= 1024 and ds.InstitutionAddress.startswith("Street")
    assert ds.StudyDate == ""  # Type 2: present, empty
    assert "PatientAge" not in ds  # Type 3: left out
    assert ds.ProtocolName == "FDGTK"
    assert ds["KVP"].value == 120 and len(str(ds["KVP"].value)) <= 16
    assert int(ds.AcquisitionNumber) == 14
    code = ds.ProcedureCodeSequence[0]
    assert len(code.CodeMeaning) <= 64 and not any(e.tag.is_private for e in code)
    noted = {n.split(":")[0] for n in derived.notes}
    for kw in ("StudyDescription", "AccessionNumber", "StudyDate", "PatientAge", "KVP"):
        assert kw in noted
    assert "ProcedureCodeSequence > CodeMeaning" in noted


@pytest.mark.parametrize(
    ("body_part", "source_laterality", "expected"),
    [
        ("CHEST", "R", None),  # forbidden for an unpaired part, even when the source has it
        ("ABDOMEN", None, None),
        ("HEAD", "", None),
        ("KNEE", "L", "L"),
        ("BREAST", None, ""),
        (None, None, ""),  # unknown body part: dciodvfy wants Laterality present
    ],
)
def test_laterality_only_where_the_body_part_is_paired(
    real_headers, tmp_path, body_part, source_laterality, expected
):
    headers, thin = real_headers

    def change(ds: Dataset) -> None:
        if body_part is None:
            del ds.BodyPartExamined
        else:
            ds.BodyPartExamined = body_part
        if source_laterality is not None:
            ds.Laterality = source_laterality

    sources = _rewritten(headers[:3], tmp_path, change)
    derived = write_derived_series(sources, thin[:5], factor=2, out_dir=tmp_path / "o", **MODEL)
    for ds in derived.datasets:
        assert dciodvfy_errors(Path(ds.filename)) == []
        if expected is None:
            assert "Laterality" not in ds
        else:
            assert (ds.Laterality or "") == expected  # empty is None in memory, "" on disk
    assert body_part is None or (body_part in UNPAIRED_BODY_PARTS) == (expected is None)
