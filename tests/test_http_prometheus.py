"""Debian's Prometheus scrapes a real node (issue 11).

The node runs with ``http`` enabled (no rules: only receiving is measured); Prometheus scrapes
it every second. The target must be up; after the real 20-slice series is sent with dcmtk's
storescu, a PromQL query for stored instances must return 20, and the series gauge from the
database must show the series. The alert rules printed in docs/OPERATIONS.md are loaded into the
same Prometheus (after ``promtool check rules``) and must all evaluate without error.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.http import PROMETHEUS, Prometheus, Web, http_overrides
from tests.support.node import REPO_ROOT, NodeProcess, send_with_storescu
from tests.support.polling import wait_until

PROMTOOL = "/usr/bin/promtool"

pytestmark = pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="no Debian prometheus")


def alert_rules_from_docs(out: Path) -> Path:
    """The ```yaml block under "### Alert rules" in docs/OPERATIONS.md, written to ``out``."""
    text = (REPO_ROOT / "docs" / "OPERATIONS.md").read_text()
    section = text[text.index("### Alert rules") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "no yaml block under '### Alert rules' in docs/OPERATIONS.md"
    out.write_text(block.group(1))
    return out


def test_prometheus_scrapes_the_node(tmp_path, sample_data):
    rules = alert_rules_from_docs(tmp_path / "rules.yml")
    check = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    node = NodeProcess(tmp_path / "node", overrides=http_overrides())
    with node:
        web = Web(node)
        target = f"127.0.0.1:{node.config['http']['port']}"
        with Prometheus(tmp_path / "prom", [target], [rules]) as prom:
            wait_until(
                lambda: prom.value('up{job="dicom-node"}') == 1.0,
                60,
                f"the target to be up:\n{prom.log()[-2000:]}",
            )
            assert prom.value('sum(dicom_node_instances_received_total{status="stored"})') == 0

            files = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))
            assert len(files) == 20
            sent = send_with_storescu(files, node.port)
            assert len(sent.acknowledged) == 20, sent.output[-2000:]

            query = 'sum(dicom_node_instances_received_total{status="stored"})'
            assert wait_until(lambda: prom.value(query) == 20.0, 60, f"{query} to be 20")
            # The bytes counter and the store histogram moved with them.
            assert prom.value("dicom_node_store_duration_seconds_count") == 20.0
            assert prom.value("dicom_node_received_bytes_total") > 20 * 100_000
            # Series by state comes from the database: the one series, in some state.
            assert wait_until(lambda: prom.value("sum(dicom_node_series)") == 1.0, 30, "series")
            assert prom.value('dicom_node_associations_total{result="accepted"}') >= 1
            assert prom.value("dicom_node_build_info") == 1.0

            # Every alert rule of the docs evaluates (a typo in a metric name would not
            # error, so the names are checked against what the node exports as well).
            def rules_ok():
                groups = prom.api("rules")["groups"]
                found = [r for g in groups for r in g["rules"]]
                return len(found) == 3 and all(
                    r["health"] == "ok" and r["lastEvaluation"][:4] != "0001" for r in found
                )

            wait_until(rules_ok, 30, f"the alert rules to evaluate: {prom.api('rules')}")
            exported = web.get("/metrics").text
            expr = "\n".join(r["query"] for g in prom.api("rules")["groups"] for r in g["rules"])
            for name in set(re.findall(r"dicom_node_[a-z_]+", expr)):
                assert f"# TYPE {name} " in exported, f"{name} is not a metric of the node"


def test_metrics_count_the_stores_of_every_receiving_process(tmp_path, sample_data):
    """With node.receiver_processes: 2 the stores of the second process are in the main
    process's /metrics too: counters and histogram summed, one series per label set."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.node import make_instances, parse_storescu_output, start_storescu

    overrides = {**http_overrides(), "node": {"receiver_processes": 2}}
    node = NodeProcess(tmp_path / "node", overrides=overrides)
    sources = sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))
    with node:
        wait_until(lambda: "model loaded" in node.log_tail(400), 120, "the model to load")
        batches = [make_instances(sources, 6, tmp_path / f"in{k}", f"m{k}") for k in range(2)]
        senders = [
            start_storescu(b, node.port, tmp_path / f"s{k}.log") for k, b in enumerate(batches)
        ]
        for proc in senders:
            assert proc.wait(120) == 0
        for k in range(2):
            statuses = parse_storescu_output((tmp_path / f"s{k}.log").read_text())
            assert sorted(statuses.values()) == [0x0000] * 6
        served = set(re.findall(r"association established calling_ae=STORESCU .* pid=(\d+)",
                                node.log_tail(20000)))  # fmt: skip
        assert len(served) == 2, f"both processes served: {served}"

        samples = {}
        for family in text_string_to_metric_families(Web(node).get("/metrics").text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        assert samples[("dicom_node_instances_received_total", (("status", "stored"),))] == 12
        assert samples[("dicom_node_store_duration_seconds_count", ())] == 12
        assert samples[("dicom_node_received_bytes_total", ())] > 12 * 100_000
        accepted = samples[("dicom_node_associations_total", (("result", "accepted"),))]
        assert accepted >= 2
