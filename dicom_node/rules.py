"""Routing rules: which series get interpolated, by how much, and where the result goes.

A rule (``config.rules``) matches on Modality, SOP classes, slice spacing and thickness ranges,
body part, a series-description regex and the calling AE; every criterion left out matches
anything. :func:`explain` evaluates every rule and says, criterion by criterion, why it matched
or not (``dicom-node rules test``). :func:`select_rule` picks the matching rule with the highest
priority (ties: the first in the file). :func:`factor_for` turns a rule's target spacing into an
integer factor ``round(spacing / target)`` (halves round up); below 2 the series is already
thin enough.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dicom_node.config import Rule
from dicom_node.db import Series
from dicom_node.plan import SeriesPlan

__all__ = [
    "FactorDecision",
    "RuleExplanation",
    "SeriesFacts",
    "explain",
    "facts_from_series",
    "factor_for",
    "metadata_matches",
    "ordered_rules",
    "select_rule",
]


@dataclass(frozen=True)
class SeriesFacts:
    """What rules look at. ``spacing_mm``/``thickness_mm`` are None before geometry is known."""

    modality: str | None = None
    sop_classes: frozenset[str] = frozenset()
    spacing_mm: float | None = None
    thickness_mm: float | None = None
    body_part: str | None = None
    series_description: str | None = None
    calling_ae: str | None = None


def facts_from_series(series: Series, plan: SeriesPlan | None = None) -> SeriesFacts:
    """Facts from an indexed series and, optionally, its planned geometry."""
    return SeriesFacts(
        modality=series.modality,
        sop_classes=frozenset(i.sop_class_uid for i in series.instances),
        spacing_mm=plan.spacing_mm if plan is not None else None,
        thickness_mm=plan.slice_thickness_mm if plan is not None else None,
        body_part=series.body_part,
        series_description=series.series_description,
        calling_ae=series.calling_ae,
    )


@dataclass(frozen=True)
class RuleExplanation:
    rule: Rule
    matched: bool
    reasons: list[str] = field(default_factory=list)  # one line per criterion, pass or fail


def _in_range(value: float | None, rng: tuple[float, float] | None, what: str) -> tuple[bool, str]:
    if rng is None:
        return True, f"{what}: any"
    lo, hi = rng
    if value is None:
        return False, f"{what} unknown, rule needs [{lo:g}, {hi:g}] mm"
    ok = lo <= value <= hi
    return ok, f"{what} {value:.3g} mm {'within' if ok else 'outside'} [{lo:g}, {hi:g}] mm"


def _criteria(facts: SeriesFacts, rule: Rule, geometry: bool) -> list[tuple[bool, str]]:
    m = rule.match
    out: list[tuple[bool, str]] = []
    mods = [x.upper() for x in m.modality]
    mod = (facts.modality or "").upper()
    out.append(
        (mod in mods, f"modality {mod or '(none)'} {'in' if mod in mods else 'not in'} {mods}")
    )
    if m.sop_classes is not None:
        extra = sorted(facts.sop_classes - set(m.sop_classes))
        out.append(
            (
                not extra and bool(facts.sop_classes),
                f"SOP classes {sorted(facts.sop_classes)}"
                + (f"; not allowed: {extra}" if extra else " allowed"),
            )
        )
    if m.body_part is not None:
        parts = [x.upper() for x in m.body_part]
        bp = (facts.body_part or "").upper()
        out.append(
            (bp in parts, f"body part {bp or '(none)'} {'in' if bp in parts else 'not in'} {parts}")
        )
    if m.series_description_regex is not None:
        ok = re.search(m.series_description_regex, facts.series_description or "") is not None
        out.append(
            (
                ok,
                f"series description {'matches' if ok else 'does not match'} "
                f"/{m.series_description_regex}/",
            )
        )
    if m.calling_ae is not None:
        ae = (facts.calling_ae or "").strip()
        verb = "in" if ae in m.calling_ae else "not in"
        out.append(
            (
                ae in m.calling_ae,
                f"calling AE {ae or '(none)'} {verb} {m.calling_ae}",
            )
        )
    if geometry:
        out.append(_in_range(facts.spacing_mm, m.spacing_mm, "spacing"))
        out.append(_in_range(facts.thickness_mm, m.thickness_mm, "thickness"))
    return out


def ordered_rules(rules: Sequence[Rule]) -> list[Rule]:
    """Rules in decision order: highest priority first, file order among equals."""
    return sorted(rules, key=lambda r: -r.action.priority)


def explain(
    facts: SeriesFacts, rules: Iterable[Rule], *, geometry: bool = True
) -> list[RuleExplanation]:
    """Every rule in decision order, with whether it matched and one reason per criterion.

    With ``geometry=False`` the spacing/thickness criteria are skipped (used before the series
    geometry is known, for the quiet period).
    """
    result = []
    for rule in ordered_rules(list(rules)):
        crit = _criteria(facts, rule, geometry)
        result.append(
            RuleExplanation(
                rule=rule,
                matched=all(ok for ok, _ in crit),
                reasons=[("ok: " if ok else "no: ") + text for ok, text in crit],
            )
        )
    return result


def metadata_matches(facts: SeriesFacts, rule: Rule) -> bool:
    """True when every non-geometric criterion of ``rule`` matches."""
    return all(ok for ok, _ in _criteria(facts, rule, geometry=False))


def select_rule(facts: SeriesFacts, rules: Sequence[Rule]) -> Rule | None:
    """The matching rule with the highest priority (first in file order among equals)."""
    for ex in explain(facts, rules):
        if ex.matched:
            return ex.rule
    return None


@dataclass(frozen=True)
class FactorDecision:
    """An integer factor (None when the series should not be interpolated) and why."""

    factor: int | None
    target_spacing_mm: float | None
    reason: str


def factor_for(rule: Rule, spacing_mm: float) -> FactorDecision:
    """The interpolation factor a rule gives a series of ``spacing_mm``.

    A fixed ``factor`` is used as is. A ``target_spacing_mm`` gives ``round(spacing / target)``
    (the new spacing is then ``spacing / factor``, close to the target); a result below 2 means
    the series is already at or below the target, and no factor is returned.
    """
    a = rule.action
    if a.factor is not None:
        return FactorDecision(
            a.factor,
            spacing_mm / a.factor,
            f"rule {rule.name!r} fixes factor {a.factor}: {spacing_mm:.3g} mm -> "
            f"{spacing_mm / a.factor:.3g} mm",
        )
    assert a.target_spacing_mm is not None
    raw = spacing_mm / a.target_spacing_mm
    factor = int(math.floor(raw + 0.5))  # half up: 2.5 mm at a 1 mm target gives 3
    if factor < 2:
        return FactorDecision(
            None,
            None,
            f"spacing {spacing_mm:.3g} mm is already near the {a.target_spacing_mm:g} mm target of "
            f"rule {rule.name!r} (factor {raw:.2f} rounds to {factor})",
        )
    return FactorDecision(
        factor,
        spacing_mm / factor,
        f"round({spacing_mm:.3g} / {a.target_spacing_mm:g}) = {factor}: {spacing_mm:.3g} mm -> "
        f"{spacing_mm / factor:.3g} mm",
    )
