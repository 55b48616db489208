"""One description of a slice (slices.py): the header reader, the index row and the plan agree,
on real CT slices and on an Enhanced CT instance made from them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node import db
from dicom_node.header import read_header
from dicom_node.index import Indexer
from dicom_node.plan import SeriesPlan, plan_slices
from dicom_node.slices import (
    SliceRef,
    as_float,
    as_floats,
    as_int,
    as_strings,
    functional_group_item,
    slice_refs_from_file,
    value,
)
from tests.support.enhanced import write_enhanced_ct
from tests.test_validation_uid_conflict import indexer  # noqa: F401

# The frames' own Pixel Measures in the Enhanced CT below; the converter's shared item says
# 0.488281 mm and 2.5 mm (the real series' values).
OWN_SPACING = (0.5, 0.5)
OWN_THICKNESS = 1.25


def _record(idx: Indexer, path: Path, spool: Path) -> None:
    data = path.read_bytes()
    h = read_header(data)
    sha = hashlib.sha256(data).hexdigest()
    idx.record(h, str(path.relative_to(spool)), len(data), sha, "T")


def _rows(sessions) -> list[db.Instance]:
    with sessions() as s:
        return list(s.scalars(select(db.Instance).order_by(db.Instance.instance_number)).all())


def _enhanced_with_own_measures(sources: list[Path], path: Path) -> Dataset:
    """The real series as one Legacy Converted Enhanced CT instance whose frames carry their
    own Pixel Measures item too, next to the shared one the converter wrote."""
    ds = write_enhanced_ct(sources, path)
    shared = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(shared.SliceThickness) == 2.5  # what the per-frame items must override
    for item in ds.PerFrameFunctionalGroupsSequence:
        own = Dataset()
        own.PixelSpacing = list(OWN_SPACING)
        own.SliceThickness = OWN_THICKNESS
        item.PixelMeasuresSequence = [own]
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_a_frames_own_functional_group_wins_over_the_shared_one(sample_data, tmp_path, indexer):  # noqa: F811
    """PS3.3 C.7.6.16: a functional group is in the shared or the per-frame groups, not both;
    where a file has both, the per-frame item is the frame's own description. The header the
    index keeps (its first frame's geometry) and every planned frame must read that item: the
    index used to read the shared item first, and then disagreed with the plan."""
    idx, sessions = indexer
    path = tmp_path / "enhanced.dcm"
    ds = _enhanced_with_own_measures(sorted(sample_data.pydicom_ct5n.iterdir()), path)

    item = functional_group_item(ds, 0, "PixelMeasuresSequence")
    assert item is not None and float(item.SliceThickness) == OWN_THICKNESS

    header = read_header(path.read_bytes())
    assert header.plane.pixel_spacing == OWN_SPACING
    assert header.plane.slice_thickness == OWN_THICKNESS
    _record(idx, path, tmp_path)
    (row,) = _rows(sessions)
    assert row.number_of_frames == 5
    assert row.pixel_spacing == list(OWN_SPACING) and row.slice_thickness == OWN_THICKNESS

    plan = plan_slices("1.2.3", slice_refs_from_file(path))
    assert isinstance(plan, SeriesPlan), plan
    assert plan.multi_frame and plan.n_slices == 5
    assert {s.pixel_spacing for s in plan.slices} == {OWN_SPACING}
    assert plan.pixel_spacing == OWN_SPACING and plan.slice_thickness_mm == OWN_THICKNESS


def test_header_index_row_and_slice_describe_a_real_slice_alike(sample_data, tmp_path, indexer):  # noqa: F811
    """Each real CT slice read from its bytes (header.py), stored as an index row and read back
    (SliceRef.from_row) is the slice read from its file (SliceRef.from_dataset)."""
    idx, sessions = indexer
    spool = sample_data.pydicom_ct5n
    files = sorted(spool.iterdir())
    for f in files:
        _record(idx, f, spool)
    rows = _rows(sessions)
    assert len(rows) == len(files)
    by_uid = {r.sop_instance_uid: r for r in rows}
    for f in files:
        (from_file,) = slice_refs_from_file(f)
        (from_row,) = SliceRef.from_row(by_uid[from_file.sop_instance_uid], spool)
        assert from_row == from_file
        assert from_row.position is not None and from_row.slice_thickness == 2.5
        assert (
            read_header(f.read_bytes()).plane
            == SliceRef.from_dataset(pydicom.dcmread(f, stop_before_pixels=True), "")[0]
        )


def test_one_coercion_for_empty_absent_and_garbled_values():
    ds = Dataset()
    ds.SliceThickness = ""
    ds.InstanceNumber = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert value(ds, "SliceThickness") is None and value(ds, "Rows") is None
    assert as_float(value(ds, "SliceThickness")) is None
    assert as_int(value(ds, "InstanceNumber")) is None
    for empty in (None, ""):
        assert as_int(empty) is None and as_float(empty) is None
        assert as_floats(empty, 3) is None and as_strings(empty) == ()
    assert as_int("12") == 12 and as_int("x") is None
    assert as_float("2.5") == 2.5 and as_float("2,5") is None
    assert as_floats(["1", "2", "3"], 3) == (1.0, 2.0, 3.0)
    assert as_floats(["1", "2"], 3) is None and as_floats(["1", "", "3"], 3) is None
    assert as_strings(value(ds, "ImageType")) == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert as_strings("ORIGINAL\\PRIMARY") == ("ORIGINAL", "PRIMARY")
