"""One description of a slice: :class:`SliceRef`, read from a dataset or from an index row.

A slice is one image plane: a single-frame instance, or one frame of an Enhanced / Legacy
Converted Enhanced CT or MR instance. Everything that reads a slice's values goes through this
module, so that the header reader (header.py), the index (index.py, one ``Instance`` row a file)
and planning (plan.py) agree on what a value is:

* one coercion (:func:`value`, :func:`as_int`, :func:`as_float`, :func:`as_floats`,
  :func:`as_text`, :func:`as_uid`, :func:`as_strings`): an absent, empty or undecodable value is
  None, and so is one that does not convert;
* one functional-group lookup (:func:`functional_group_item`): the frame's own item in the
  Per-Frame Functional Groups Sequence, else the shared one. PS3.3 C.7.6.16 allows a functional
  group in one of the two sequences, never both; a file that has both still describes the frame
  by its per-frame item, and a reader that looked at the shared item first would give every
  frame the same value;
* one mapping between :class:`SliceRef` fields and ``Instance`` columns
  (:meth:`SliceRef.row_values`, :meth:`SliceRef.from_row`).

:class:`ImagePlane` is a slice whose geometry has been checked (:meth:`ImagePlane.check`): its
position, orientation, pixel spacing and matrix are never None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicom_node import geometry
from dicom_node.db import Instance

__all__ = [
    "ENHANCED_SOP_CLASSES",
    "ImagePlane",
    "SliceRef",
    "as_float",
    "as_floats",
    "as_int",
    "as_strings",
    "as_text",
    "as_uid",
    "functional_group_item",
    "instance_label",
    "instance_plane",
    "slice_refs_from_file",
    "value",
]

ENHANCED_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)


# --- coercion -----------------------------------------------------------------------------------


def value(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword``, or None when absent, empty or not decodable."""
    try:
        found = ds.get(keyword)
    except Exception:  # a malformed value must not fail the whole instance
        return None
    if found is None or found == "":
        return None
    return found


def _number(v: Any, kind: type[int] | type[float]) -> Any:
    if v is None or v == "":
        return None
    try:
        return kind(v)
    except (TypeError, ValueError):
        return None


def as_int(v: Any) -> int | None:
    return _number(v, int)


def as_float(v: Any) -> float | None:
    return _number(v, float)


def as_floats(v: Any, n: int) -> tuple[float, ...] | None:
    """``n`` floats, or None when ``v`` is absent, empty, not numbers or another count."""
    if v is None or v == "":
        return None
    try:
        seq = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return seq if len(seq) == n else None


def as_text(v: Any, limit: int = 64) -> str | None:
    """Stripped text, cut at ``limit`` characters; None when empty."""
    if v is None:
        return None
    return str(v).strip()[:limit] or None


def as_uid(v: Any) -> str:
    """A UID without its padding; "" when absent."""
    return "" if v is None else str(v).strip("\0 ")


def as_strings(v: Any) -> tuple[str, ...]:
    """A multi-valued string (ImageType, FrameType) as a tuple; () when absent or empty."""
    if v is None or v == "":
        return ()
    if isinstance(v, str):
        return tuple(v.split("\\"))
    return tuple(str(x) for x in v)


# --- functional groups --------------------------------------------------------------------------


def functional_group_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """Functional group item ``keyword`` for ``frame`` (0-based): the frame's own item in the
    Per-Frame Functional Groups Sequence, else the Shared Functional Groups Sequence's."""
    for seq_keyword, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = value(ds, seq_keyword)
        if groups is None or index >= len(groups):
            continue
        seq = value(groups[index], keyword)
        if seq:
            return seq[0]
    return None


def _from_group(ds: Dataset, frame: int, group: str, keyword: str) -> Any:
    item = functional_group_item(ds, frame, group)
    return None if item is None else value(item, keyword)


# --- slices -------------------------------------------------------------------------------------


def instance_label(instance_number: int | None, sop_instance_uid: str) -> str:
    """How reasons name an instance without patient data: ``#`` and its InstanceNumber, else the
    tail of its SOP Instance UID."""
    return f"#{instance_number}" if instance_number is not None else f"…{sop_instance_uid[-12:]}"


@dataclass(frozen=True)
class SliceRef:
    """One image plane: a single-frame instance, or one frame of a multi-frame instance.

    ``file_path`` is empty for a plane read before its file was stored (header.py)."""

    sop_instance_uid: str
    file_path: str
    frame: int | None  # 0-based frame index in a multi-frame instance; None for single-frame
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    rows: int | None
    columns: int | None
    frame_of_reference_uid: str | None = None
    sop_class_uid: str | None = None
    instance_number: int | None = None
    acquisition_number: int | None = None
    image_type: tuple[str, ...] = ()
    slice_thickness: float | None = None
    images_in_acquisition: int | None = None

    @property
    def label(self) -> str:
        """Short human-readable name for reasons: instance number or UID tail, plus frame."""
        base = instance_label(self.instance_number, self.sop_instance_uid)
        return base if self.frame is None else f"{base} frame {self.frame + 1}"

    @property
    def is_localizer(self) -> bool:
        return len(self.image_type) >= 3 and self.image_type[2].strip().upper() == "LOCALIZER"

    def row_values(self) -> dict[str, Any]:
        """The ``Instance`` columns this plane fills (the index keeps an instance's first)."""
        values = {column: getattr(self, name) for name, column in _ROW_COLUMNS.items()}
        for column in ("image_position", "image_orientation", "pixel_spacing", "image_type"):
            if values[column] is not None:  # JSON columns: stored and read back as lists
                values[column] = list(values[column])
        values["image_type"] = values["image_type"] or None
        return values

    @classmethod
    def from_dataset(cls, ds: Dataset, file_path: str | Path) -> list[SliceRef]:
        """The image planes of one dataset (header only is enough): one per frame."""
        n_frames = as_int(value(ds, "NumberOfFrames")) or 1
        if n_frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
            return [instance_plane(ds, file_path)]
        common = _instance_fields(ds, file_path)
        return [
            cls(
                frame=i,
                position=as_floats(
                    _from_group(ds, i, "PlanePositionSequence", "ImagePositionPatient"), 3
                ),
                orientation=as_floats(
                    _from_group(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
                ),
                pixel_spacing=as_floats(
                    _from_group(ds, i, "PixelMeasuresSequence", "PixelSpacing"), 2
                ),
                acquisition_number=as_int(
                    _from_group(ds, i, "FrameContentSequence", "FrameAcquisitionNumber")
                )
                or as_int(value(ds, "AcquisitionNumber")),
                image_type=as_strings(_frame_type(ds, i)),
                slice_thickness=as_float(
                    _from_group(ds, i, "PixelMeasuresSequence", "SliceThickness")
                ),
                images_in_acquisition=None,  # counts instances, not frames
                **common,
            )
            for i in range(n_frames)
        ]

    @classmethod
    def from_row(cls, inst: Instance, spool_root: str | Path = ".") -> list[SliceRef]:
        """Image planes of an indexed instance. Single-frame geometry comes from the index row;
        multi-frame instances are expanded from their file's functional groups. The index stores
        paths relative to the spool; ``spool_root`` makes them absolute."""
        path = str(Path(spool_root) / inst.file_path)
        if (inst.number_of_frames or 1) > 1 or inst.sop_class_uid in ENHANCED_SOP_CLASSES:
            return slice_refs_from_file(path)
        row = {name: getattr(inst, column) for name, column in _ROW_COLUMNS.items()}
        return [
            cls(
                sop_instance_uid=inst.sop_instance_uid,
                file_path=path,
                frame=None,
                **{
                    **row,
                    "position": as_floats(row["position"], 3),
                    "orientation": as_floats(row["orientation"], 6),
                    "pixel_spacing": as_floats(row["pixel_spacing"], 2),
                    "image_type": tuple(row["image_type"] or ()),
                },
            )
        ]


# SliceRef field -> Instance column, for the fields the index keeps.
_ROW_COLUMNS = {
    "sop_class_uid": "sop_class_uid",
    "instance_number": "instance_number",
    "acquisition_number": "acquisition_number",
    "position": "image_position",
    "orientation": "image_orientation",
    "pixel_spacing": "pixel_spacing",
    "slice_thickness": "slice_thickness",
    "rows": "rows",
    "columns": "columns",
    "frame_of_reference_uid": "frame_of_reference_uid",
    "image_type": "image_type",
    "images_in_acquisition": "images_in_acquisition",
}


def _instance_fields(ds: Dataset, file_path: str | Path) -> dict[str, Any]:
    """What every plane of an instance shares."""
    return {
        "sop_instance_uid": as_uid(value(ds, "SOPInstanceUID")),
        "file_path": str(file_path),
        "rows": as_int(value(ds, "Rows")),
        "columns": as_int(value(ds, "Columns")),
        "frame_of_reference_uid": as_uid(value(ds, "FrameOfReferenceUID"))[:64] or None,
        "sop_class_uid": as_uid(value(ds, "SOPClassUID")) or None,
        "instance_number": as_int(value(ds, "InstanceNumber")),
    }


def _frame_type(ds: Dataset, frame: int) -> Any:
    for group in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence"):
        item = functional_group_item(ds, frame, group)
        if item:  # an empty item says nothing: look further
            return value(item, "FrameType")
    return value(ds, "ImageType")


def instance_plane(ds: Dataset, file_path: str | Path = "") -> SliceRef:
    """The instance as one plane (``frame`` None): its own attributes, and for an Enhanced
    (multi-frame) instance the geometry of its first frame where the instance has none. This is
    what the index keeps of an instance; for a single-frame instance it is its only plane."""

    def geometry_value(keyword: str, group: str) -> Any:
        found = value(ds, keyword)
        return found if found is not None else _from_group(ds, 0, group, keyword)

    return SliceRef(
        frame=None,
        position=as_floats(geometry_value("ImagePositionPatient", "PlanePositionSequence"), 3),
        orientation=as_floats(
            geometry_value("ImageOrientationPatient", "PlaneOrientationSequence"), 6
        ),
        pixel_spacing=as_floats(geometry_value("PixelSpacing", "PixelMeasuresSequence"), 2),
        acquisition_number=as_int(value(ds, "AcquisitionNumber")),
        image_type=as_strings(value(ds, "ImageType")),
        slice_thickness=as_float(geometry_value("SliceThickness", "PixelMeasuresSequence")),
        images_in_acquisition=as_int(value(ds, "ImagesInAcquisition")),
        **_instance_fields(ds, file_path),
    )


def slice_refs_from_file(path: str | Path) -> list[SliceRef]:
    """Read one file's header (no pixels) and return its image planes."""
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    return SliceRef.from_dataset(ds, path)


# --- checked planes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePlane(SliceRef):
    """A slice whose geometry :meth:`check` found usable: nothing the plan needs is None."""

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    @classmethod
    def check(cls, ref: SliceRef) -> ImagePlane | str:
        """``ref`` as a checked plane, or why its geometry is missing or makes no sense (a
        reason that names the value and the slice)."""
        for what, attr in (
            ("ImagePositionPatient", "position"),
            ("ImageOrientationPatient", "orientation"),
            ("PixelSpacing", "pixel_spacing"),
        ):
            if getattr(ref, attr) is None:
                return f"slice {ref.label} has no valid {what}"
        problem = geometry.plane_problem(
            f"slice {ref.label}",
            position=ref.position,
            orientation=ref.orientation,
            pixel_spacing=ref.pixel_spacing,
            slice_thickness=ref.slice_thickness,
        )
        if problem is None and min(ref.rows or 0, ref.columns or 0) <= 0:
            problem = f"Rows/Columns {ref.rows}x{ref.columns} of slice {ref.label} is not positive"
        if problem is not None:
            return problem
        return cls(**{f.name: getattr(ref, f.name) for f in dataclasses.fields(ref)})
