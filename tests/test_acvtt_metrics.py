"""The paper protocol's metrics on hand-computed cases, and the evaluation's thin-volume skip."""

import numpy as np
import pytest

from acvtt_core.evaluate import evaluate, gains_over_best_baseline, summarise, thick_volume
from acvtt_core.metrics import EDGE, paper_metrics, psnr


def test_psnr_hand_computed():
    gt = np.zeros((4, 8, 8), np.float32)
    assert psnr(gt + 0.1, gt) == pytest.approx(20.0)  # mse 0.01, range 1
    assert psnr(gt, gt) == float("inf")


def test_edges_dropped_and_synthesised_rows_only():
    rng = np.random.default_rng(0)
    gt = (rng.random((21, 16, 16)) * 0.8).astype(np.float32)  # +0.1 stays inside [0, 1]
    pred = gt.copy()
    pred[:EDGE] += 0.5  # errors only inside the dropped ends...
    pred[-EDGE:] -= 0.5
    m = paper_metrics(pred, gt, factor=2)
    assert m["psnr"] == float("inf") and m["ssim"] == pytest.approx(1.0)

    pred = gt.copy()
    pred[EDGE + 2] += 0.1  # ...and one synthesised row (odd index 7, factor 2) in the scored part
    m = paper_metrics(pred, gt, factor=2)
    scored, synth_rows = 21 - 2 * EDGE, 6  # rows 5..15 -> 11; synthesised 5, 7, ..., 15 -> 6
    assert m["psnr"] == pytest.approx(10 * np.log10(scored / 0.01), rel=1e-4)
    assert m["psnr_synth"] == pytest.approx(10 * np.log10(synth_rows / 0.01), rel=1e-4)
    assert 0 < m["ssim_axial"] < 1 and m["ssim_coronal"] < 1 and m["ssim_sagittal"] < 1


def test_too_thin_volume_is_skipped_with_reason_not_a_crash():
    rng = np.random.default_rng(1)
    vol = (rng.random((20, 24, 24)) * 1000 - 500).astype(np.float32)  # 20 slices, like the DICOM
    result = evaluate({"thin": vol}, factors=[2, 5])
    assert {r["factor"] for r in result["rows"]} == {2}  # x5 keeps 16 slices, 6 after the crop
    assert result["skipped"] == [
        {"case": "thin", "factor": 5, "reason": result["skipped"][0]["reason"]}
    ]
    assert "fewer than 7" in result["skipped"][0]["reason"]


def test_slab_degradation_averages_thin_slices_and_keeps_the_grid():
    hu = np.zeros((9, 4, 4), np.float32)
    hu[4:6] = 300.0  # thin rows 4 and 5 bright; the thick grid of factor 2 is rows 0, 2, 4, ...
    hr, lr = thick_volume(hu, 2, "decimate")
    assert lr[:, 0, 0].tolist() == [0, 0, 300, 0, 0]
    hr, lr = thick_volume(hu, 2, "slab")
    assert hr.shape == (9, 4, 4) and lr.shape == (5, 4, 4)
    # Box profile 2 thin slices thick centred on thin row 2k: weights 1/4, 1/2, 1/4.
    assert lr[:, 0, 0] == pytest.approx([0, 0, 225, 75, 0])
    with pytest.raises(ValueError, match="unknown degradation"):
        thick_volume(hu, 2, "blur")


def test_evaluate_slab_differs_from_decimate_and_says_which():
    rng = np.random.default_rng(2)
    vol = (rng.random((25, 24, 24)) * 1000 - 500).astype(np.float32)
    dec = evaluate({"v": vol}, factors=[2])
    slab = evaluate({"v": vol}, factors=[2], degradation="slab")
    assert dec["degradation"] == "decimate" and slab["degradation"] == "slab"
    lin = {r["method"]: r["psnr"] for r in dec["rows"]}["linear"]
    lin_slab = {r["method"]: r["psnr"] for r in slab["rows"]}["linear"]
    assert lin != pytest.approx(lin_slab)


def test_gain_is_over_the_better_baseline_per_case_and_factor():
    def row(case, factor, method, psnr):
        return {"case": case, "factor": factor, "method": method, "psnr": psnr, "ssim": 0.9}

    rows = [
        row("a", 4, "linear", 30.0),
        row("a", 4, "cubic", 31.0),  # cubic is the better baseline here
        row("a", 4, "acvtt", 32.5),
        row("b", 4, "linear", 40.0),
        row("b", 4, "cubic", 39.0),
        row("b", 4, "acvtt", 39.5),  # a loss against linear
        row("b", 2, "linear", 45.0),  # no model row: no gain for (b, 2)
        row("b", 2, "cubic", 44.0),
    ]
    assert gains_over_best_baseline(rows) == {("a", 4): 1.5, ("b", 4): -0.5}
    for r in rows:
        r.update(psnr_synth=r["psnr"], ssim_axial=0.9, ssim_coronal=0.9, ssim_sagittal=0.9)
    summary = summarise(rows)
    assert summary["x4"]["acvtt_gain_db_vs_best_baseline"] == {"mean": 0.5, "min": -0.5, "n": 2}
    assert "acvtt_gain_db_vs_best_baseline" not in summary["x2"]
