"""Planning (pure): is a series' set of slices one clean stack we can interpolate?

:func:`plan_slices` turns the slices of one series (:class:`~dicom_node.slices.SliceRef`) into a
typed :class:`SeriesPlan`, or a :class:`Rejection` whose ``reason`` a person can read. No I/O:
complete.py feeds it the slices of an indexed series. The checks, in order:

* LOCALIZER images (ImageType / FrameType value 3) are dropped.
* Every remaining slice must have a usable geometry (:meth:`ImagePlane.check
  <dicom_node.slices.ImagePlane.check>`); one that has not rejects the series, naming it.
* Slices are split into stacks by FrameOfReferenceUID, ImageOrientationPatient (within
  ``orientation_tol``), Rows/Columns and PixelSpacing. The largest stack is planned and the
  others are named in ``notes``; two largest stacks of equal size are ambiguous and rejected.
* ImagesInAcquisition: when every slice of an acquisition states it, an acquisition with fewer
  slices than stated is incomplete and rejected (more is only noted).
* Slices are sorted along n = row x col. **Duplicate rule:** slices at the same position (within
  ``duplicate_tol_mm``) with different AcquisitionNumber keep the one with the highest
  AcquisitionNumber (a repeated acquisition supersedes the earlier one); otherwise the series is
  rejected, because nothing says which copy is right.
* Spacing must be uniform within ``max(spacing_abs_tol_mm, spacing_rel_tol * spacing)``, with no
  gaps.
* Gantry tilt (the slice-to-slice vector leaning away from n) is followed up to
  ``max_tilt_deg``: the plan carries the real slice vector so the writer places derived slices
  along it. A steeper tilt, or slices that do not lie on one line, are rejected.

Enhanced / Legacy Converted Enhanced CT (multi-frame) instances come as one slice per frame. The
plan lists slices in the source's stacking order (ascending InstanceNumber, or frame order),
which is the order the writer and the loader use.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dicom_node import geometry
from dicom_node.config import CompletionSection
from dicom_node.slices import ImagePlane, SliceRef

__all__ = [
    "PlanResult",
    "Rejection",
    "SeriesPlan",
    "Tolerances",
    "plan_slices",
    "tolerances_from_config",
]


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
class SeriesPlan:
    """A series accepted for interpolation: its slices in stacking order and their geometry.

    ``spacing_mm`` is the distance between planes (along ``normal``); ``slice_vector`` the real
    mean vector from one slice's ImagePositionPatient to the next in plan order (``spacing_mm *
    normal`` up to sign for a straight stack; sheared under gantry tilt, ``tilt_deg`` > 0).
    """

    series_uid: str
    slices: tuple[ImagePlane, ...]
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


def _split_stacks(planes: Sequence[ImagePlane], tol: Tolerances) -> list[list[ImagePlane]]:
    """Group slices by FoR, orientation (within tolerance), matrix and pixel spacing."""
    stacks: list[list[ImagePlane]] = []
    for r in planes:
        for st in stacks:
            h = st[0]
            if (
                r.frame_of_reference_uid == h.frame_of_reference_uid
                and (r.rows, r.columns) == (h.rows, h.columns)
                and geometry.orientations_equal(
                    r.orientation, h.orientation, tol=tol.orientation_tol
                )
                and max(abs(a - b) for a, b in zip(r.pixel_spacing, h.pixel_spacing, strict=True))
                <= tol.pixel_spacing_tol_mm
            ):
                st.append(r)
                break
        else:
            stacks.append([r])
    return stacks


def _describe_stack(st: Sequence[ImagePlane]) -> str:
    h = st[0]
    ori = ",".join(f"{v:.3g}" for v in h.orientation)
    return f"{len(st)} slice(s) {h.rows}x{h.columns} orientation [{ori}]"


def _check_images_in_acquisition(stack: Sequence[ImagePlane]) -> tuple[str | None, list[str]]:
    """(rejection reason or None, notes) from ImagesInAcquisition per AcquisitionNumber."""
    by_acq: dict[int | None, list[ImagePlane]] = {}
    for r in stack:
        if r.frame is None:
            by_acq.setdefault(r.acquisition_number, []).append(r)
    problems, notes = [], []
    for acq, members in sorted(by_acq.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        stated = {m.images_in_acquisition for m in members}
        (expected,) = stated if len(stated) == 1 else (None,)
        if expected is None:
            continue
        count = len({m.sop_instance_uid for m in members})
        name = f"acquisition {acq}" if acq is not None else "the acquisition"
        if count < expected:
            problems.append(
                f"{name} has {count} of {expected} images (ImagesInAcquisition): incomplete"
            )
        elif count > expected:
            notes.append(f"{name} has {count} images, more than ImagesInAcquisition {expected}")
    return ("; ".join(problems) or None), notes


def _resolve_duplicates(
    stack: list[ImagePlane], normal: tuple[float, float, float], tol: Tolerances
) -> tuple[list[ImagePlane] | None, str, list[str]]:
    """Apply the duplicate rule. Returns (kept slices or None, rejection reason, dropped notes)."""
    srt = geometry.sort_by_position([r.position for r in stack], normal)
    clusters: list[list[int]] = []
    for j, idx in enumerate(srt.order):
        if clusters and srt.distances[j] - srt.distances[j - 1] <= tol.duplicate_tol_mm:
            clusters[-1].append(idx)
        else:
            clusters.append([idx])
    kept: list[ImagePlane] = []
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


def _stacking_order(
    stack: list[ImagePlane], normal: tuple[float, float, float]
) -> list[ImagePlane]:
    """Sort along the normal, then flip if the source numbers its slices the other way."""
    srt = geometry.sort_by_position([r.position for r in stack], normal)
    ordered = [stack[i] for i in srt.order]
    keys = [
        k for r in ordered if (k := r.instance_number if r.frame is None else r.frame) is not None
    ]
    if len(keys) == len(ordered) and len(ordered) >= 2:
        # Majority vote of consecutive pairs tolerates odd numbering.
        down = sum(1 for a, b in zip(keys, keys[1:], strict=False) if b < a)
        up = sum(1 for a, b in zip(keys, keys[1:], strict=False) if b > a)
        if down > up:
            ordered.reverse()
    return ordered


def _checked_planes(refs: Sequence[SliceRef]) -> list[ImagePlane] | str:
    """The slices as checked planes, or why the series cannot be planned because of one of
    their values.

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
    planes = []
    for r in refs:
        plane = ImagePlane.check(r)
        if isinstance(plane, str):
            return plane
        planes.append(plane)
    return planes


def _largest_stack(
    series_uid: str, planes: list[ImagePlane], tol: Tolerances, notes: list[str], dropped: list[str]
) -> list[ImagePlane] | Rejection:
    """The stack to plan: the largest, the others named in ``notes`` and ``dropped``."""
    stacks = sorted(_split_stacks(planes, tol), key=len, reverse=True)
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
    return stacks[0]


def plan_slices(
    series_uid: str, refs: Iterable[SliceRef], tol: Tolerances | None = None
) -> PlanResult:
    """Check the slices of one series and return a :class:`SeriesPlan` or a :class:`Rejection`.

    Pure: no I/O. See the module docstring for the rules applied.
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

    planes = _checked_planes(refs)
    if isinstance(planes, str):
        return Rejection(series_uid, planes)
    stack = _largest_stack(series_uid, planes, tol, notes, dropped)
    if isinstance(stack, Rejection):
        return stack

    reason, acq_notes = _check_images_in_acquisition(stack)
    notes.extend(acq_notes)
    if reason:
        return Rejection(series_uid, reason, tuple(notes))

    normal = _vec3(geometry.slice_normal(stack[0].orientation))
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
    return _plan_stack(series_uid, _stacking_order(kept, normal), normal, tol, notes, dropped)


def _plan_stack(
    series_uid: str,
    ordered: list[ImagePlane],
    normal: tuple[float, float, float],
    tol: Tolerances,
    notes: list[str],
    dropped: list[str],
) -> PlanResult:
    """The plan of one stack in stacking order: its spacing and tilt checked."""
    head = ordered[0]
    sg = geometry.analyze_stack(
        [r.position for r in ordered],
        head.orientation,
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
        normal=normal,
        slice_vector=_vec3(vec),
        tilt_deg=float(sg.tilt.angle_deg),
        tilted=bool(sg.tilt.tilted),
        orientation=tuple(head.orientation),
        pixel_spacing=head.pixel_spacing,
        rows=head.rows,
        columns=head.columns,
        frame_of_reference_uid=head.frame_of_reference_uid,
        slice_thickness_mm=float(statistics.median(thicknesses)) if thicknesses else None,
        multi_frame=any(r.frame is not None for r in ordered),
        notes=tuple(notes),
        dropped=tuple(dropped),
    )


def _vec3(v: np.ndarray) -> tuple[float, float, float]:
    return float(v[0]), float(v[1]), float(v[2])
