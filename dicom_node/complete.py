"""Completion and grouping: when is a series finished, and is it one clean slice stack?

Two questions, answered here and nowhere else:

1. **Is the series quiet?** :func:`due_series` lists series in state ``receiving`` or
   ``changed`` whose last instance arrived at least ``quiet_seconds`` ago (the quiet period of the
   first rule that matches the series' metadata, else ``completion.quiet_seconds``).
2. **Is it a volume we can interpolate?** :func:`plan_slices` (pure) and :func:`plan_series`
   (from the index DB) turn the slices into a typed :class:`SeriesPlan`, or a :class:`Rejection`
   whose ``reason`` a person can read. The checks, in order:

   * LOCALIZER images (ImageType / FrameType value 3) are dropped.
   * Slices are split into stacks by FrameOfReferenceUID, ImageOrientationPatient (within
     ``orientation_tol``), Rows/Columns and PixelSpacing. The largest stack is planned and the
     others are named in ``notes``; two largest stacks of equal size are ambiguous and rejected.
   * ImagesInAcquisition: when every slice of an acquisition states it, an acquisition with fewer
     slices than stated is incomplete and rejected (more is only noted).
   * Slices are sorted along n = row x col. **Duplicate rule:** slices at the same position
     (within ``duplicate_tol_mm``) with different AcquisitionNumber keep the one with the highest
     AcquisitionNumber (a repeated acquisition supersedes the earlier one); otherwise the series
     is rejected, because nothing says which copy is right.
   * Spacing must be uniform within ``max(spacing_abs_tol_mm, spacing_rel_tol * spacing)``, with
     no gaps.
   * Gantry tilt (the slice-to-slice vector leaning away from n) is followed up to
     ``max_tilt_deg``: the plan carries the real slice vector so the writer places derived slices
     along it. A steeper tilt, or slices that do not lie on one line, are rejected.

Enhanced / Legacy Converted Enhanced CT (multi-frame) instances are expanded into one
:class:`SliceRef` per frame from their functional groups. The plan lists slices in the source's
stacking order (ascending InstanceNumber, or frame order), which is the order the writer and the
loader use.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, object_session

from dicom_node import geometry
from dicom_node.config import CompletionSection, NodeConfig
from dicom_node.db import Instance, Series, SeriesState, audit, utcnow
from dicom_node.index import Refusal, refusals_for_series

__all__ = [
    "Rejection",
    "SeriesPlan",
    "SliceRef",
    "Tolerances",
    "due_series",
    "functional_group_item",
    "outstanding_refusals",
    "plan_series",
    "plan_slices",
    "quiet_seconds_for",
    "refused_reason",
    "slice_refs_from_dataset",
    "slice_refs_from_file",
    "slice_refs_from_instance",
]

ENHANCED_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)


@dataclass(frozen=True)
class Tolerances:
    """Geometry tolerances for :func:`plan_slices` (millimetres, degrees, cosines).

    Spacing defaults are a little looser than geometry.py's: positions stored as DS are often
    rounded to 0.1 mm, and a 2 % step error is far below what interpolating thick slices resolves.
    """

    orientation_tol: float = geometry.DEFAULT_ORIENTATION_TOL
    pixel_spacing_tol_mm: float = 1e-4
    duplicate_tol_mm: float = geometry.DEFAULT_DUPLICATE_TOL_MM
    spacing_abs_tol_mm: float = 0.05
    spacing_rel_tol: float = 0.02
    tilt_tol_deg: float = geometry.DEFAULT_TILT_TOL_DEG
    max_tilt_deg: float = 30.0
    min_slices: int = 3


def tolerances_from_config(completion: CompletionSection) -> Tolerances:
    """The tolerances an administrator set in the ``completion`` section of the config."""
    return Tolerances(
        spacing_abs_tol_mm=completion.spacing_abs_tol_mm,
        spacing_rel_tol=completion.spacing_rel_tol,
        max_tilt_deg=completion.max_tilt_deg,
    )


@dataclass(frozen=True)
class SliceRef:
    """One image plane: a single-frame instance, or one frame of a multi-frame instance."""

    sop_instance_uid: str
    file_path: str
    frame: int | None  # 0-based frame index in a multi-frame instance; None for single-frame
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
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
        base = (
            f"#{self.instance_number}"
            if self.instance_number is not None
            else f"…{self.sop_instance_uid[-12:]}"
        )
        return base if self.frame is None else f"{base} frame {self.frame + 1}"

    @property
    def is_localizer(self) -> bool:
        return len(self.image_type) >= 3 and self.image_type[2].strip().upper() == "LOCALIZER"


@dataclass(frozen=True)
class SeriesPlan:
    """A series accepted for interpolation: its slices in stacking order and their geometry.

    ``spacing_mm`` is the distance between planes (along ``normal``); ``slice_vector`` the real
    mean vector from one slice's ImagePositionPatient to the next in plan order (``spacing_mm *
    normal`` up to sign for a straight stack; sheared under gantry tilt, ``tilt_deg`` > 0).
    """

    series_uid: str
    slices: tuple[SliceRef, ...]
    spacing_mm: float
    normal: tuple[float, float, float]
    slice_vector: tuple[float, float, float]
    tilt_deg: float
    tilted: bool
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    frame_of_reference_uid: str | None
    slice_thickness_mm: float | None
    multi_frame: bool
    notes: tuple[str, ...] = ()
    dropped: tuple[str, ...] = field(default=())

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    @property
    def source_sop_uids(self) -> list[str]:
        """Sorted, unique SOP Instance UIDs of the planned slices (the job key hashes these)."""
        return sorted({s.sop_instance_uid for s in self.slices})

    @property
    def step_mm(self) -> float:
        return float(np.linalg.norm(self.slice_vector))

    @property
    def ascending_along_normal(self) -> bool:
        """True when plan order runs along +normal (the order SimpleITK reads a series in, and
        the order ACVTT models are trained and evaluated in); False when the source numbers its
        slices the other way (head-first CT numbered from the head down, for example)."""
        return float(np.dot(self.slice_vector, self.normal)) > 0

    def summary(self) -> dict:
        """JSON-ready description (no patient data) for the job record and the CLI."""
        return {
            "n_slices": self.n_slices,
            "spacing_mm": round(self.spacing_mm, 4),
            "slice_thickness_mm": self.slice_thickness_mm,
            "rows": self.rows,
            "columns": self.columns,
            "normal": [round(v, 6) for v in self.normal],
            "slice_vector": [round(v, 4) for v in self.slice_vector],
            "tilt_deg": round(self.tilt_deg, 3),
            "multi_frame": self.multi_frame,
            "notes": list(self.notes),
            "dropped": list(self.dropped),
        }


@dataclass(frozen=True)
class Rejection:
    """A series that cannot be planned; ``reason`` is one readable sentence (or several, '; ')."""

    series_uid: str
    reason: str
    notes: tuple[str, ...] = ()


PlanResult = SeriesPlan | Rejection


# --- reading slice references -----------------------------------------------------------------


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        seq = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return tuple(seq) if len(seq) == n else None


def _int(value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _float(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _image_type(value: object) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(value.split("\\"))
    return tuple(str(v) for v in value)  # type: ignore[union-attr]


def functional_group_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """Functional group item ``keyword`` for ``frame``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        seq = per_frame[frame].get(keyword)
        if seq:
            return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(keyword)
        if seq:
            return seq[0]
    return None


def slice_refs_from_dataset(ds: Dataset, file_path: str | Path) -> list[SliceRef]:
    """The image planes of one dataset (header only is enough): one per frame."""
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    sop_class = str(ds.get("SOPClassUID", "")) or None
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    common = {
        "sop_instance_uid": sop_uid,
        "file_path": str(file_path),
        "rows": _int(ds.get("Rows")),
        "columns": _int(ds.get("Columns")),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")) or None,
        "sop_class_uid": sop_class,
        "instance_number": _int(ds.get("InstanceNumber")),
    }
    if n_frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [
            SliceRef(
                frame=None,
                position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
                acquisition_number=_int(ds.get("AcquisitionNumber")),
                image_type=_image_type(ds.get("ImageType")),
                slice_thickness=_float(ds.get("SliceThickness")),
                images_in_acquisition=_int(ds.get("ImagesInAcquisition")),
                **common,
            )
        ]
    refs = []
    for i in range(n_frames):
        pos = functional_group_item(ds, i, "PlanePositionSequence")
        ori = functional_group_item(ds, i, "PlaneOrientationSequence")
        meas = functional_group_item(ds, i, "PixelMeasuresSequence")
        content = functional_group_item(ds, i, "FrameContentSequence")
        ftype = functional_group_item(ds, i, "CTImageFrameTypeSequence") or functional_group_item(
            ds, i, "MRImageFrameTypeSequence"
        )
        refs.append(
            SliceRef(
                frame=i,
                position=_floats(pos.get("ImagePositionPatient"), 3) if pos else None,  # type: ignore[arg-type]
                orientation=_floats(ori.get("ImageOrientationPatient"), 6) if ori else None,
                pixel_spacing=_floats(meas.get("PixelSpacing"), 2) if meas else None,  # type: ignore[arg-type]
                acquisition_number=(
                    _int(content.get("FrameAcquisitionNumber")) if content else None
                )
                or _int(ds.get("AcquisitionNumber")),
                image_type=_image_type(ftype.get("FrameType") if ftype else ds.get("ImageType")),
                slice_thickness=_float(meas.get("SliceThickness")) if meas else None,
                images_in_acquisition=None,  # counts instances, not frames
                **common,
            )
        )
    return refs


def slice_refs_from_file(path: str | Path) -> list[SliceRef]:
    """Read one file's header (no pixels) and return its image planes."""
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    return slice_refs_from_dataset(ds, path)


def slice_refs_from_instance(inst: Instance, spool_root: str | Path = ".") -> list[SliceRef]:
    """Image planes of an indexed instance. Single-frame geometry comes from the index row;
    multi-frame instances are expanded from their file's functional groups. The index stores
    paths relative to the spool; ``spool_root`` makes them absolute."""
    path = str(Path(spool_root) / inst.file_path)
    if (inst.number_of_frames or 1) > 1 or inst.sop_class_uid in ENHANCED_SOP_CLASSES:
        return slice_refs_from_file(path)
    return [
        SliceRef(
            sop_instance_uid=inst.sop_instance_uid,
            file_path=path,
            frame=None,
            position=_floats(inst.image_position, 3),  # type: ignore[arg-type]
            orientation=_floats(inst.image_orientation, 6),
            pixel_spacing=_floats(inst.pixel_spacing, 2),  # type: ignore[arg-type]
            rows=inst.rows,
            columns=inst.columns,
            frame_of_reference_uid=inst.frame_of_reference_uid,
            sop_class_uid=inst.sop_class_uid,
            instance_number=inst.instance_number,
            acquisition_number=inst.acquisition_number,
            image_type=tuple(inst.image_type or ()),
            slice_thickness=inst.slice_thickness,
            images_in_acquisition=inst.images_in_acquisition,
        )
    ]


# --- planning ---------------------------------------------------------------------------------


def _split_stacks(refs: Sequence[SliceRef], tol: Tolerances) -> list[list[SliceRef]]:
    """Group slices by FoR, orientation (within tolerance), matrix and pixel spacing."""
    stacks: list[list[SliceRef]] = []
    for r in refs:
        for st in stacks:
            h = st[0]
            if (
                r.frame_of_reference_uid == h.frame_of_reference_uid
                and (r.rows, r.columns) == (h.rows, h.columns)
                and geometry.orientations_equal(
                    r.orientation,  # type: ignore[arg-type]
                    h.orientation,  # type: ignore[arg-type]
                    tol=tol.orientation_tol,
                )
                and max(abs(a - b) for a, b in zip(r.pixel_spacing, h.pixel_spacing, strict=True))  # type: ignore[arg-type]
                <= tol.pixel_spacing_tol_mm
            ):
                st.append(r)
                break
        else:
            stacks.append([r])
    return stacks


def _describe_stack(st: Sequence[SliceRef]) -> str:
    h = st[0]
    ori = ",".join(f"{v:.3g}" for v in h.orientation or ())
    return f"{len(st)} slice(s) {h.rows}x{h.columns} orientation [{ori}]"


def _check_images_in_acquisition(stack: Sequence[SliceRef]) -> tuple[str | None, list[str]]:
    """(rejection reason or None, notes) from ImagesInAcquisition per AcquisitionNumber."""
    by_acq: dict[int | None, list[SliceRef]] = {}
    for r in stack:
        if r.frame is None:
            by_acq.setdefault(r.acquisition_number, []).append(r)
    problems, notes = [], []
    for acq, members in sorted(by_acq.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        stated = {m.images_in_acquisition for m in members}
        if len(stated) != 1 or None in stated:
            continue
        (expected,) = stated
        count = len({m.sop_instance_uid for m in members})
        name = f"acquisition {acq}" if acq is not None else "the acquisition"
        if count < expected:  # type: ignore[operator]
            problems.append(
                f"{name} has {count} of {expected} images (ImagesInAcquisition): incomplete"
            )
        elif count > expected:  # type: ignore[operator]
            notes.append(f"{name} has {count} images, more than ImagesInAcquisition {expected}")
    return ("; ".join(problems) or None), notes


def _resolve_duplicates(
    stack: list[SliceRef], normal: np.ndarray, tol: Tolerances
) -> tuple[list[SliceRef] | None, str, list[str]]:
    """Apply the duplicate rule. Returns (kept slices or None, rejection reason, dropped notes)."""
    srt = geometry.sort_by_position([r.position for r in stack], normal)  # type: ignore[misc]
    clusters: list[list[int]] = []
    for j, idx in enumerate(srt.order):
        if clusters and srt.distances[j] - srt.distances[j - 1] <= tol.duplicate_tol_mm:
            clusters[-1].append(idx)
        else:
            clusters.append([idx])
    kept: list[SliceRef] = []
    dropped: list[str] = []
    for cl in clusters:
        if len(cl) == 1:
            kept.append(stack[cl[0]])
            continue
        members = [stack[i] for i in cl]
        d = float(np.asarray(members[0].position) @ normal)
        acqs = [m.acquisition_number for m in members]
        best = max((a for a in acqs if a is not None), default=None)
        if None in acqs or acqs.count(best) != 1:
            names = ", ".join(m.label for m in members)
            return (
                None,
                f"{len(members)} slices at the same position ({d:.2f} mm along the normal: "
                f"{names}) without a unique highest AcquisitionNumber; cannot tell which to keep",
                [],
            )
        winner = members[acqs.index(best)]
        kept.append(winner)
        dropped.extend(
            f"{m.label}: duplicate position {d:.2f} mm, AcquisitionNumber {m.acquisition_number} "
            f"superseded by {best}"
            for m in members
            if m is not winner
        )
    return kept, "", dropped


def _stacking_order(stack: list[SliceRef], normal: np.ndarray) -> list[SliceRef]:
    """Sort along the normal, then flip if the source numbers its slices the other way."""
    srt = geometry.sort_by_position([r.position for r in stack], normal)  # type: ignore[misc]
    ordered = [stack[i] for i in srt.order]
    keys = [
        (r.instance_number if r.frame is None else r.frame)
        for r in ordered
        if (r.instance_number if r.frame is None else r.frame) is not None
    ]
    if len(keys) == len(ordered) and len(ordered) >= 2:
        # Majority vote of consecutive pairs tolerates odd numbering.
        down = sum(1 for a, b in zip(keys, keys[1:], strict=False) if b < a)
        up = sum(1 for a, b in zip(keys, keys[1:], strict=False) if b > a)
        if down > up:
            ordered.reverse()
    return ordered


def _unusable_slice(refs: Sequence[SliceRef]) -> str | None:
    """Why the series cannot be planned because of one of its slices' values, or None.

    One slice whose geometry is missing or makes no sense rejects the series: splitting it off
    as another stack would hide a sender fault, and a derived series must never inherit such
    values (a PixelSpacing of [0, 0] once reached PACS that way).
    """
    for what, attr in (
        ("ImagePositionPatient", "position"),
        ("ImageOrientationPatient", "orientation"),
        ("PixelSpacing", "pixel_spacing"),
        ("Rows/Columns", "rows"),
    ):
        missing = [r for r in refs if getattr(r, attr) is None]
        if missing:
            return f"{len(missing)} image(s) have no valid {what} (first: {missing[0].label})"
    for r in refs:
        problem = geometry.plane_problem(
            f"slice {r.label}",
            position=r.position,
            orientation=r.orientation,
            pixel_spacing=r.pixel_spacing,
            slice_thickness=r.slice_thickness,
        )
        if problem is None and min(r.rows or 0, r.columns or 0) <= 0:
            problem = f"Rows/Columns {r.rows}x{r.columns} of slice {r.label} is not positive"
        if problem is not None:
            return problem
    return None


def plan_slices(
    series_uid: str, refs: Iterable[SliceRef], tol: Tolerances | None = None
) -> PlanResult:
    """Check the slices of one series and return a :class:`SeriesPlan` or a :class:`Rejection`.

    Pure apart from nothing: no I/O. See the module docstring for the rules applied.
    """
    tol = tol or Tolerances()
    refs = list(refs)
    notes: list[str] = []
    dropped: list[str] = []
    if not refs:
        return Rejection(series_uid, "the series has no instances")

    localizers = [r for r in refs if r.is_localizer]
    if localizers:
        dropped.extend(f"{r.label}: LOCALIZER" for r in localizers)
        refs = [r for r in refs if not r.is_localizer]
        if not refs:
            return Rejection(series_uid, "the series holds only LOCALIZER images")

    problem = _unusable_slice(refs)
    if problem is not None:
        return Rejection(series_uid, problem)

    stacks = sorted(_split_stacks(refs, tol), key=len, reverse=True)
    if len(stacks) > 1:
        if len(stacks[0]) == len(stacks[1]):
            return Rejection(
                series_uid,
                f"the series holds {len(stacks)} stacks (by frame of reference, orientation, "
                f"matrix and pixel spacing) and the two largest are the same size "
                f"({_describe_stack(stacks[0])}; {_describe_stack(stacks[1])}): ambiguous",
            )
        others = "; ".join(_describe_stack(s) for s in stacks[1:])
        notes.append(f"planned the largest of {len(stacks)} stacks; ignored: {others}")
        dropped.extend(f"{r.label}: other stack" for s in stacks[1:] for r in s)
    stack = stacks[0]
    head = stack[0]

    reason, acq_notes = _check_images_in_acquisition(stack)
    notes.extend(acq_notes)
    if reason:
        return Rejection(series_uid, reason, tuple(notes))

    normal = geometry.slice_normal(head.orientation)  # type: ignore[arg-type]
    kept, reason, dup_dropped = _resolve_duplicates(stack, normal, tol)
    if kept is None:
        return Rejection(series_uid, reason, tuple(notes))
    dropped.extend(dup_dropped)
    if len(kept) < tol.min_slices:
        return Rejection(
            series_uid,
            f"only {len(kept)} slice(s) at distinct positions; at least {tol.min_slices} needed",
            tuple(notes),
        )

    ordered = _stacking_order(kept, normal)
    sg = geometry.analyze_stack(
        [r.position for r in ordered],  # type: ignore[misc]
        head.orientation,  # type: ignore[arg-type]
        allow_tilt=True,
        abs_tol_mm=tol.spacing_abs_tol_mm,
        rel_tol=tol.spacing_rel_tol,
        duplicate_tol_mm=tol.duplicate_tol_mm,
        tilt_tol_deg=tol.tilt_tol_deg,
    )
    if not sg.ok:
        return Rejection(series_uid, sg.reason, tuple(notes))
    assert sg.tilt is not None and sg.spacing.spacing is not None
    if sg.tilt.tilted and sg.tilt.angle_deg > tol.max_tilt_deg:
        return Rejection(
            series_uid,
            f"gantry tilt of {sg.tilt.angle_deg:.1f} degrees exceeds the "
            f"{tol.max_tilt_deg:g} degree limit",
            tuple(notes),
        )
    if sg.tilt.tilted:
        notes.append(
            f"gantry tilt {sg.tilt.angle_deg:.2f} degrees: following the real slice vector"
        )
    pos = np.asarray([r.position for r in ordered], dtype=np.float64)
    vec = (pos[-1] - pos[0]) / (len(pos) - 1)
    thicknesses = [r.slice_thickness for r in ordered if r.slice_thickness is not None]
    return SeriesPlan(
        series_uid=series_uid,
        slices=tuple(ordered),
        spacing_mm=float(sg.spacing.spacing),
        normal=tuple(float(v) for v in normal),  # type: ignore[arg-type]
        slice_vector=tuple(float(v) for v in vec),  # type: ignore[arg-type]
        tilt_deg=float(sg.tilt.angle_deg),
        tilted=bool(sg.tilt.tilted),
        orientation=tuple(head.orientation),  # type: ignore[arg-type]
        pixel_spacing=tuple(head.pixel_spacing),  # type: ignore[arg-type]
        rows=int(head.rows),  # type: ignore[arg-type]
        columns=int(head.columns),  # type: ignore[arg-type]
        frame_of_reference_uid=head.frame_of_reference_uid,
        slice_thickness_mm=float(statistics.median(thicknesses)) if thicknesses else None,
        multi_frame=any(r.frame is not None for r in ordered),
        notes=tuple(notes),
        dropped=tuple(dropped),
    )


def plan_series(
    series: Series,
    spool_root: str | Path,
    tol: Tolerances | None = None,
    *,
    only_sop_uids: Iterable[str] | None = None,
) -> PlanResult:
    """Plan an indexed series from its instance rows (multi-frame files are read for frames).

    ``only_sop_uids`` restricts the plan to that instance set (a queued job re-plans exactly the
    instances it was keyed on, even if more arrived since). A series with an outstanding refused
    instance (:func:`outstanding_refusals`) is rejected as a whole, naming the slice.
    """
    session = object_session(series)
    refused = outstanding_refusals(session, series) if session is not None else []
    if refused:
        return Rejection(series.series_uid, refused_reason(refused))
    instances = list(series.instances)
    if only_sop_uids is not None:
        wanted = set(only_sop_uids)
        instances = [i for i in instances if i.sop_instance_uid in wanted]
        missing = wanted - {i.sop_instance_uid for i in instances}
        if missing:
            return Rejection(
                series.series_uid, f"{len(missing)} source instance(s) are no longer indexed"
            )
    refs: list[SliceRef] = []
    for inst in instances:
        try:
            refs.extend(slice_refs_from_instance(inst, spool_root))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            return Rejection(
                series.series_uid,
                f"cannot read instance …{inst.sop_instance_uid[-12:]}: {exc}",
            )
    return plan_slices(series.series_uid, refs, tol)


def outstanding_refusals(session: Session, series: Series) -> list[Refusal]:
    """Instances of ``series`` that the receiver refused and nothing has made up for since.

    A refusal is made up for when an instance with the same SOP Instance UID is indexed in the
    series (the sender fixed it, or the refused copy was a bad resend of a stored one), or when
    an instance with the same InstanceNumber arrived after it (the sender replaced the slice
    under a new UID). Without either, the series lacks a slice its sender meant it to have.
    """
    refusals = refusals_for_series(session, series.series_uid)
    if not refusals:
        return []
    instances = list(series.instances)
    indexed = {i.sop_instance_uid for i in instances}
    return [
        r
        for r in refusals
        if r.sop_instance_uid not in indexed
        and not any(
            r.instance_number is not None
            and i.instance_number == r.instance_number
            and i.received_at >= r.at
            for i in instances
        )
    ]


def refused_reason(refused: Sequence[Refusal]) -> str:
    """One sentence for a series held back by refused instances: the first named, the rest
    counted."""
    first = refused[0]
    code = f"0x{first.status:04X}: " if first.status is not None else ""
    more = f" (and {len(refused) - 1} more refused instance(s))" if len(refused) > 1 else ""
    return (
        f"the whole series is rejected: {first.label} was refused at receive ({code}"
        f"{first.reason}){more}; the series is incomplete until it is sent again, fixed"
    )


# --- completion -------------------------------------------------------------------------------


def quiet_seconds_for(series: Series, config: NodeConfig) -> float:
    """The quiet period of the first rule whose metadata criteria match, else the default."""
    from dicom_node.rules import facts_from_series, metadata_matches, ordered_rules

    facts = facts_from_series(series)
    for rule in ordered_rules(config.rules):
        if rule.action.quiet_seconds is not None and metadata_matches(facts, rule):
            return rule.action.quiet_seconds
    return config.completion.quiet_seconds


def due_series(session: Session, config: NodeConfig, now: datetime | None = None) -> list[Series]:
    """Series in state receiving/changed whose quiet period is over, oldest first."""
    now = now or utcnow()
    min_quiet = min(
        [config.completion.quiet_seconds]
        + [r.action.quiet_seconds for r in config.rules if r.action.quiet_seconds is not None]
    )
    rows = session.scalars(
        select(Series)
        .where(Series.state.in_(_OPEN))
        .where(Series.last_received <= now - timedelta(seconds=min_quiet))
        .where(or_(Series.hold_until.is_(None), Series.hold_until <= now))
        .order_by(Series.last_received)
    ).all()
    return [
        s for s in rows if s.last_received <= now - timedelta(seconds=quiet_seconds_for(s, config))
    ]


_OPEN = (SeriesState.receiving, SeriesState.changed)


def hold_series(session: Session, series_uids: Iterable[str], until: datetime, reason: str) -> int:
    """Keep open series from completing before ``until`` (an association that stored into them
    ended without a release: the rest may follow). Returns how many were held; the caller
    commits."""
    uids = list(series_uids)
    if not uids:
        return 0
    rows = session.scalars(
        select(Series).where(Series.series_uid.in_(uids), Series.state.in_(_OPEN))
    ).all()
    return _hold(session, rows, until, reason)


def hold_unfinished_series(session: Session, until: datetime, reason: str | None) -> int:
    """At start-up: hold every series that was still open when the node stopped. Without a
    ``reason`` (a routine restart) the hold is silent: no reason shown, no audit event."""
    rows = session.scalars(select(Series).where(Series.state.in_(_OPEN))).all()
    return _hold(session, rows, until, reason)


def _hold(session: Session, rows: Sequence[Series], until: datetime, reason: str | None) -> int:
    for ser in rows:
        ser.hold_until = max(until, ser.hold_until or until)
        if reason is None:
            continue
        ser.state_reason = f"waiting until {ser.hold_until:%Y-%m-%d %H:%M:%S} UTC: {reason}"
        audit(
            session,
            "series_held",
            series_uid=ser.series_uid,
            detail={"until": ser.hold_until.isoformat(timespec="seconds"), "reason": reason},
        )
    return len(rows)
