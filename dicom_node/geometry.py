"""Slice-stack geometry: pure functions on ImageOrientationPatient / ImagePositionPatient.

No I/O and no pydicom here: inputs are plain sequences of floats (as read from the DS values), so
the completion/grouping stage, the writer and the tests can all share them.

Conventions (PS3.3 C.7.6.2.1.1):

* ``ImageOrientationPatient`` is six direction cosines: the row direction (along a row, i.e. the
  direction of increasing column index) followed by the column direction.
* The slice normal is ``n = row x col``. A slice's position along the stack is ``d = IPP . n``.
* A stack is "tilted" (gantry tilt, sheared volume) when the slice-to-slice vector between
  consecutive ``ImagePositionPatient`` values is not parallel to ``n``.

All distances are in millimetres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DEFAULT_DUPLICATE_TOL_MM",
    "DEFAULT_ORIENTATION_TOL",
    "DEFAULT_SPACING_ABS_TOL_MM",
    "DEFAULT_SPACING_REL_TOL",
    "DEFAULT_TILT_TOL_DEG",
    "GeometryError",
    "SortedStack",
    "SpacingReport",
    "StackGeometry",
    "TiltReport",
    "analyze_stack",
    "check_spacing",
    "derived_positions",
    "detect_tilt",
    "find_duplicates",
    "format_values",
    "orientation_problem",
    "orientations_equal",
    "plane_problem",
    "project_positions",
    "slice_normal",
    "sort_by_position",
]

# Direction cosines stored as DS are often rounded to 5 or 6 decimals; 1e-4 (about 0.006 degrees)
# absorbs that rounding yet treats any deliberate change of orientation as different.
DEFAULT_ORIENTATION_TOL = 1e-4
# Two slices closer than this along the normal are at "the same position".
DEFAULT_DUPLICATE_TOL_MM = 0.01
# Spacing is uniform when every step is within max(abs, rel * median step) of the median step.
DEFAULT_SPACING_ABS_TOL_MM = 0.01
DEFAULT_SPACING_REL_TOL = 0.01
# Below this angle between the slice-to-slice vector and the normal the stack counts as straight.
DEFAULT_TILT_TOL_DEG = 0.1


class GeometryError(ValueError):
    """The input cannot describe a slice stack (bad orientation, too few slices, ...)."""


def _vec3(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise GeometryError(f"{what} must be 3 finite numbers, got {list(values)!r}")
    return arr


def _row_col(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(iop, dtype=np.float64)
    if arr.shape != (6,) or not np.all(np.isfinite(arr)):
        raise GeometryError(f"ImageOrientationPatient must be 6 finite numbers, got {iop!r}")
    return arr[:3], arr[3:]


def format_values(values: Sequence[float] | float) -> str:
    """DS-like values for a reason a person reads: ``[0, 0]``, ``[-249.5, nan, 1]``, ``-5``."""
    if isinstance(values, int | float):
        return f"{float(values):g}"
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def orientation_problem(
    iop: Sequence[float], *, name: str | None = None, tol: float = 1e-3
) -> str | None:
    """Why an ImageOrientationPatient cannot orient a plane (naming the value, and the plane
    when ``name`` is given), or None.

    Row and column cosines must be finite, each of unit length, and orthogonal, all within
    ``tol`` (stored values are rounded to a few decimals).
    """
    arr = np.asarray(iop, dtype=np.float64)
    shown = f"ImageOrientationPatient {format_values(arr.ravel())}"
    if name:
        shown += f" of {name}"
    if arr.shape != (6,):
        return f"{shown} is not 6 values"
    if not np.all(np.isfinite(arr)):
        return f"{shown} is not finite"
    for name, vec in (("row", arr[:3]), ("column", arr[3:])):
        length = float(np.linalg.norm(vec))
        if abs(length - 1.0) > tol:
            return f"{shown}: the {name} cosines have length {length:.4g}, not 1"
    row, col = arr[:3] / np.linalg.norm(arr[:3]), arr[3:] / np.linalg.norm(arr[3:])
    cos = float(row @ col)
    if abs(cos) > tol:
        angle = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
        return f"{shown}: row and column are not orthogonal ({angle:.2f} degrees apart)"
    return None


def plane_problem(
    name: str,
    *,
    position: Sequence[float] | None = None,
    orientation: Sequence[float] | None = None,
    pixel_spacing: Sequence[float] | None = None,
    slice_thickness: float | None = None,
) -> str | None:
    """Why one image plane's geometry makes no sense, or None. ``name`` names the plane in the
    reason, e.g. "PixelSpacing [0, 0] of slice #3 is not positive". Absent values (None) are
    not judged here: whether they are required is the caller's business.

    Positions must be finite; PixelSpacing finite and positive (a zero or negative spacing
    would be copied into a derived series that no viewer can measure in); SliceThickness, where
    given, finite and not negative; the orientation as :func:`orientation_problem` says.
    """
    if position is not None and not np.all(np.isfinite(np.asarray(position, dtype=np.float64))):
        return f"ImagePositionPatient {format_values(position)} of {name} is not finite"
    if pixel_spacing is not None:
        ps = np.asarray(pixel_spacing, dtype=np.float64)
        if not np.all(np.isfinite(ps)):
            return f"PixelSpacing {format_values(ps)} of {name} is not finite"
        if np.any(ps <= 0):
            return f"PixelSpacing {format_values(ps)} of {name} is not positive"
    if slice_thickness is not None and not math.isfinite(slice_thickness):
        return f"SliceThickness {format_values(slice_thickness)} of {name} is not finite"
    if slice_thickness is not None and slice_thickness < 0:
        return f"SliceThickness {format_values(slice_thickness)} of {name} is negative"
    if orientation is not None:
        return orientation_problem(orientation, name=name)
    return None


def slice_normal(iop: Sequence[float], *, tol: float = 1e-3) -> np.ndarray:
    """Unit slice normal ``n = row x col`` of an ImageOrientationPatient.

    Row and column cosines must each have unit length and be orthogonal within ``tol`` (stored
    values are rounded, so they are normalised before the cross product). Raises
    :class:`GeometryError` otherwise, with :func:`orientation_problem`'s reason.
    """
    problem = orientation_problem(iop, tol=tol)
    if problem is not None:
        raise GeometryError(problem)
    row, col = _row_col(iop)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    n = np.cross(row, col)
    return n / np.linalg.norm(n)


def orientations_equal(
    a: Sequence[float], b: Sequence[float], *, tol: float = DEFAULT_ORIENTATION_TOL
) -> bool:
    """True when two ImageOrientationPatient values agree within ``tol`` per direction cosine.

    The comparison is element-wise (max absolute difference), which for unit vectors bounds the
    angle between the row (and column) directions to about ``tol`` radians.
    """
    ra, ca = _row_col(a)
    rb, cb = _row_col(b)
    return bool(max(np.max(np.abs(ra - rb)), np.max(np.abs(ca - cb))) <= tol)


def project_positions(positions: Sequence[Sequence[float]], normal: Sequence[float]) -> np.ndarray:
    """Distance along ``normal`` of each ImagePositionPatient: ``d_i = IPP_i . n`` (shape (N,))."""
    n = _vec3(normal, "normal")
    pts = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    return pts @ n


@dataclass(frozen=True)
class SortedStack:
    """Slices sorted by ascending distance along the normal.

    ``order[j]`` is the input index of the j-th slice; ``distances[j]`` its distance along the
    normal (already sorted). The sort is stable, so equal positions keep their input order.
    """

    order: list[int]
    distances: np.ndarray


def sort_by_position(positions: Sequence[Sequence[float]], normal: Sequence[float]) -> SortedStack:
    """Sort slices by their projection onto ``normal`` (ascending, stable)."""
    d = project_positions(positions, normal)
    order = np.argsort(d, kind="stable")
    return SortedStack(order=[int(i) for i in order], distances=d[order])


def find_duplicates(
    sorted_distances: Sequence[float], *, tol: float = DEFAULT_DUPLICATE_TOL_MM
) -> list[tuple[int, int]]:
    """Pairs ``(j, j+1)`` of *sorted* slices whose distances differ by at most ``tol``.

    Indices refer to positions in the sorted sequence. Three slices at one position give two pairs.
    """
    d = np.asarray(sorted_distances, dtype=np.float64)
    steps = np.diff(d)
    return [(int(j), int(j) + 1) for j in np.nonzero(np.abs(steps) <= tol)[0]]


@dataclass(frozen=True)
class SpacingReport:
    """Result of :func:`check_spacing` on sorted distances.

    ``spacing`` is the median step between consecutive distinct positions (``None`` with fewer
    than two distinct positions). ``gaps`` lists sorted-index pairs ``(j, j+1)`` whose step is
    clearly larger than ``spacing`` (a missing slice or more); ``irregular`` lists the other steps
    that deviate beyond tolerance. ``uniform`` is true when there are no duplicates, gaps or
    irregular steps. ``reason`` is a human-readable sentence for a rejection, empty when uniform.
    """

    spacing: float | None
    uniform: bool
    max_deviation_mm: float
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    irregular: list[tuple[int, int]] = field(default_factory=list)
    reason: str = ""


def check_spacing(
    sorted_distances: Sequence[float],
    *,
    abs_tol_mm: float = DEFAULT_SPACING_ABS_TOL_MM,
    rel_tol: float = DEFAULT_SPACING_REL_TOL,
    duplicate_tol_mm: float = DEFAULT_DUPLICATE_TOL_MM,
) -> SpacingReport:
    """Check that sorted slice distances are evenly spaced, without gaps or duplicates.

    A step counts as regular when ``|step - spacing| <= max(abs_tol_mm, rel_tol * spacing)``
    where ``spacing`` is the median of the non-duplicate steps. A step of at least 1.5 times the
    spacing is a gap; any other irregular step is reported in ``irregular``.
    """
    d = np.asarray(sorted_distances, dtype=np.float64)
    if d.ndim != 1:
        raise GeometryError("distances must be one-dimensional")
    if np.any(np.diff(d) < -duplicate_tol_mm):
        raise GeometryError("distances must be sorted in ascending order")
    duplicates = find_duplicates(d, tol=duplicate_tol_mm)
    steps = np.diff(d)
    real = np.abs(steps) > duplicate_tol_mm
    if int(np.count_nonzero(real)) == 0:
        reason = (
            "fewer than two distinct slice positions" if len(d) >= 2 else "fewer than two slices"
        )
        return SpacingReport(
            spacing=None,
            uniform=False,
            max_deviation_mm=0.0,
            duplicates=duplicates,
            reason=reason,
        )
    spacing = float(np.median(steps[real]))
    tol = max(abs_tol_mm, rel_tol * spacing)
    gaps: list[tuple[int, int]] = []
    irregular: list[tuple[int, int]] = []
    max_dev = 0.0
    for j, step in enumerate(steps):
        if not real[j]:
            continue
        dev = abs(float(step) - spacing)
        max_dev = max(max_dev, dev)
        if dev <= tol:
            continue
        if step >= 1.5 * spacing:
            gaps.append((j, j + 1))
        else:
            irregular.append((j, j + 1))
    problems = []
    if duplicates:
        problems.append(f"{len(duplicates)} duplicate slice position(s)")
    if gaps:
        j = gaps[0][0]
        problems.append(
            f"{len(gaps)} gap(s), first between sorted slices {j} and {j + 1} "
            f"({float(steps[j]):.3f} mm vs spacing {spacing:.3f} mm)"
        )
    if irregular:
        problems.append(
            f"{len(irregular)} irregular step(s), max deviation {max_dev:.3f} mm "
            f"(tolerance {tol:.3f} mm)"
        )
    return SpacingReport(
        spacing=spacing,
        uniform=not problems,
        max_deviation_mm=max_dev,
        duplicates=duplicates,
        gaps=gaps,
        irregular=irregular,
        reason="; ".join(problems),
    )


@dataclass(frozen=True)
class TiltReport:
    """Slice-to-slice geometry of a sorted stack.

    ``step_vector`` is the mean vector from one slice's IPP to the next,
    ``(IPP_last - IPP_first) / (N - 1)``: for a straight stack it equals ``spacing * n``, for a
    gantry-tilted (sheared) one it leans away from ``n`` by ``angle_deg``. ``tilted`` is true when
    that angle exceeds the tolerance. ``max_offset_mm`` is the largest in-plane (perpendicular to
    ``n``) distance of any slice's IPP from the line ``IPP_first + j * step_vector``; a large value
    means the slices do not lie on one line at all (neither straight nor a constant shear).
    Deviations along ``n`` are the business of :func:`check_spacing`.
    """

    step_vector: np.ndarray
    angle_deg: float
    tilted: bool
    max_offset_mm: float


def detect_tilt(
    sorted_positions: Sequence[Sequence[float]],
    normal: Sequence[float],
    *,
    tol_deg: float = DEFAULT_TILT_TOL_DEG,
) -> TiltReport:
    """Measure gantry tilt (shear) of a stack whose IPPs are given in sorted order.

    Needs at least two slices at distinct positions; raises :class:`GeometryError` otherwise.
    """
    n = _vec3(normal, "normal")
    pts = np.asarray(sorted_positions, dtype=np.float64).reshape(-1, 3)
    if len(pts) < 2:
        raise GeometryError("tilt needs at least two slices")
    step = (pts[-1] - pts[0]) / (len(pts) - 1)
    length = float(np.linalg.norm(step))
    if length == 0.0:
        raise GeometryError("first and last slice are at the same position")
    cos = min(1.0, abs(float(step @ n)) / length)
    angle = math.degrees(math.acos(cos))
    resid = pts - (pts[0] + np.arange(len(pts))[:, None] * step)
    resid -= np.outer(resid @ n, n)
    offset = float(np.max(np.linalg.norm(resid, axis=1)))
    return TiltReport(
        step_vector=step, angle_deg=angle, tilted=angle > tol_deg, max_offset_mm=offset
    )


def derived_positions(
    origin: Sequence[float], direction: Sequence[float], spacing: float, count: int
) -> np.ndarray:
    """Positions ``IPP_k = origin + k * spacing * v`` for ``k = 0..count-1`` (shape (count, 3)).

    ``direction`` is normalised to the unit vector ``v`` first, so pass the slice normal (straight
    stack, in stacking order) or the real slice-to-slice vector (gantry tilt). ``spacing`` is the
    distance between consecutive derived positions *along v* (for a tilted stack that is the step
    length, not the distance between planes).
    """
    o = _vec3(origin, "origin")
    v = _vec3(direction, "direction")
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise GeometryError("direction must be non-zero")
    if count < 0:
        raise GeometryError("count must be >= 0")
    return o + np.arange(count, dtype=np.float64)[:, None] * (spacing * v / norm)


@dataclass(frozen=True)
class StackGeometry:
    """Everything the completion stage needs to accept or reject one stack of slices.

    ``order`` sorts the input slices ascending along ``normal``; ``distances`` are their sorted
    distances along it. ``spacing.spacing`` is the distance between planes; ``tilt.step_vector``
    the real slice-to-slice vector (``tilt`` is ``None`` when it cannot be measured: duplicates or
    fewer than two positions). ``ok`` is false when spacing is not uniform, the slices are off one
    line, or the stack is tilted and tilt is not allowed; ``reason`` then says why.
    """

    normal: np.ndarray
    order: list[int]
    distances: np.ndarray
    spacing: SpacingReport
    tilt: TiltReport | None
    ok: bool
    reason: str


def analyze_stack(
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float],
    *,
    allow_tilt: bool = True,
    abs_tol_mm: float = DEFAULT_SPACING_ABS_TOL_MM,
    rel_tol: float = DEFAULT_SPACING_REL_TOL,
    duplicate_tol_mm: float = DEFAULT_DUPLICATE_TOL_MM,
    tilt_tol_deg: float = DEFAULT_TILT_TOL_DEG,
) -> StackGeometry:
    """Sort a single-orientation stack and check spacing, gaps, duplicates and tilt together.

    ``positions`` are the slices' ImagePositionPatient values (input order); ``orientation`` the
    shared ImageOrientationPatient (check equality beforehand with :func:`orientations_equal`).
    Duplicates are reported, not resolved: the caller applies its own rule and calls again.
    """
    n = slice_normal(orientation)
    st = sort_by_position(positions, n)
    report = check_spacing(
        st.distances, abs_tol_mm=abs_tol_mm, rel_tol=rel_tol, duplicate_tol_mm=duplicate_tol_mm
    )
    tilt: TiltReport | None = None
    reasons: list[str] = []
    if not report.uniform:
        reasons.append(report.reason)
    if report.spacing is not None and not report.duplicates:
        pts = np.asarray(positions, dtype=np.float64).reshape(-1, 3)[st.order]
        tilt = detect_tilt(pts, n, tol_deg=tilt_tol_deg)
        if tilt.max_offset_mm > max(abs_tol_mm, rel_tol * report.spacing):
            reasons.append(
                f"slice positions do not lie on one line (off by up to {tilt.max_offset_mm:.3f} mm)"
            )
        if tilt.tilted and not allow_tilt:
            reasons.append(f"gantry tilt of {tilt.angle_deg:.2f} degrees is not allowed")
    return StackGeometry(
        normal=n,
        order=st.order,
        distances=st.distances,
        spacing=report,
        tilt=tilt,
        ok=not reasons,
        reason="; ".join(reasons),
    )
