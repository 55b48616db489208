"""Rule matching with explanations, and factors from target spacing."""

from __future__ import annotations

import pytest

from dicom_node.config import Rule, parse_config
from dicom_node.rules import SeriesFacts, explain, factor_for, metadata_matches, select_rule

CT = "1.2.840.10008.5.1.4.1.1.2"


def _rules(*rules: dict) -> list[Rule]:
    dests = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}]
    return parse_config({"destinations": dests, "rules": list(rules)}).rules


THICK = {
    "name": "thick",
    "match": {"modality": ["CT"], "spacing_mm": [1.5, 10]},
    "action": {"target_spacing_mm": 1.0, "destinations": ["pacs"], "priority": 1},
}
CHEST = {
    "name": "chest-5x",
    "match": {
        "modality": ["CT"],
        "body_part": ["CHEST"],
        "series_description_regex": "(?i)axial",
        "calling_ae": ["SCANNER1"],
        "sop_classes": [CT],
        "thickness_mm": [2, 6],
    },
    "action": {"factor": 5, "destinations": ["pacs"], "priority": 10},
}


def facts(**kw) -> SeriesFacts:
    base = dict(
        modality="CT",
        sop_classes=frozenset({CT}),
        spacing_mm=2.0,
        thickness_mm=3.0,
        body_part="CHEST",
        series_description="Thorax Axial 3mm",
        calling_ae="SCANNER1",
    )
    base.update(kw)
    return SeriesFacts(**base)


def test_highest_priority_match_wins_and_every_rule_is_explained():
    rules = _rules(THICK, CHEST)
    ex = explain(facts(), rules)
    assert [e.rule.name for e in ex] == ["chest-5x", "thick"]  # priority order
    assert all(e.matched for e in ex)
    assert select_rule(facts(), rules).name == "chest-5x"
    assert any(r.startswith("ok: calling AE SCANNER1") for r in ex[0].reasons)


def test_explanations_name_the_failing_criterion():
    rules = _rules(THICK, CHEST)
    f = facts(calling_ae="OTHER", spacing_mm=1.0, body_part="ABDOMEN")
    ex = {e.rule.name: e for e in explain(f, rules)}
    assert not ex["chest-5x"].matched
    assert "no: calling AE OTHER not in ['SCANNER1']" in ex["chest-5x"].reasons
    assert "no: body part ABDOMEN not in ['CHEST']" in ex["chest-5x"].reasons
    assert not ex["thick"].matched
    assert "no: spacing 1 mm outside [1.5, 10] mm" in ex["thick"].reasons
    assert select_rule(f, rules) is None


def test_modality_description_and_sop_class_criteria():
    rules = _rules(CHEST)
    assert select_rule(facts(modality="MR"), rules) is None
    assert select_rule(facts(series_description="Coronal MPR"), rules) is None
    assert select_rule(facts(sop_classes=frozenset({CT, "1.2.3"})), rules) is None
    assert select_rule(facts(thickness_mm=None), rules) is None  # unknown thickness fails


def test_metadata_match_ignores_geometry():
    (rule,) = _rules(THICK)
    assert metadata_matches(facts(spacing_mm=None), rule)
    assert not metadata_matches(facts(modality="MR"), rule)


@pytest.mark.parametrize(
    ("spacing", "target", "factor"),
    [
        (2.0, 1.0, 2),
        (5.0, 1.0, 5),
        (3.0, 1.0, 3),
        (2.5, 1.0, 3),
        (2.4, 1.0, 2),
        (6.0, 2.0, 3),
        (5.0, 2.0, 3),
    ],
)
def test_factor_from_target_spacing(spacing, target, factor):
    (rule,) = _rules({**THICK, "action": {"target_spacing_mm": target}})
    d = factor_for(rule, spacing)
    assert d.factor == factor
    assert d.target_spacing_mm == pytest.approx(spacing / factor)
    assert f"= {factor}" in d.reason


def test_factor_below_two_means_already_thin():
    (rule,) = _rules({**THICK, "action": {"target_spacing_mm": 1.0}})
    d = factor_for(rule, 1.4)
    assert d.factor is None and "already near" in d.reason


def test_fixed_factor():
    (rule,) = _rules(CHEST)
    d = factor_for(rule, 5.0)
    assert d.factor == 5 and d.target_spacing_mm == pytest.approx(1.0)
