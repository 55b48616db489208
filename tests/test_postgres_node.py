"""A real ``dicom-node serve`` and the admin commands on PostgreSQL (issue 12, item 1).

The node runs with ``database.url: postgresql+psycopg://...`` against the test run's private
cluster (tests/support/postgres.py); dcmtk's ``storescu`` sends, the CLI reads back. A server
that cannot be reached at start-up stops ``serve`` with one line naming ``database.url``.
"""

from __future__ import annotations

import json

import yaml

from tests.support.dcmtk import free_port
from tests.support.node import NodeProcess, make_instances, send_with_storescu
from tests.test_config_errors import base_config
from tests.test_db_trouble import _serve_fails_at_once


def test_serve_receives_indexes_and_the_cli_reads_it_back(tmp_path, sample_data, postgres_cluster):
    url = postgres_cluster.create_database()
    sources = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
    files = make_instances(sources, 4, tmp_path / "in", seed="postgres-node")
    overrides = {"database": {"url": url}, "completion": {"quiet_seconds": 100000}}
    with NodeProcess(tmp_path / "node", overrides=overrides) as node:
        assert send_with_storescu(files, node.port).acknowledged == set(files)
        # an identical resend is acknowledged and changes nothing
        assert send_with_storescu(files[:1], node.port).acknowledged == {files[0]}
        listed = node.cli("series", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        (series,) = json.loads(listed.stdout)
        assert series["n_instances"] == 4, series
        for args in (["jobs", "list", "--json"], ["config", "check"], ["db", "upgrade"]):
            proc = node.cli(*args)
            assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        assert node.running
    assert not (node.dir / "node.db").exists()  # nothing went to a SQLite file by mistake


def test_serve_stops_with_one_line_when_the_database_server_is_unreachable(tmp_path):
    cfg = base_config(tmp_path)
    cfg["database"]["url"] = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nodes"
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(cfg))
    seconds = _serve_fails_at_once(config, "cannot reach the database server")
    print(f"serve refused an unreachable database server in {seconds:.2f} s")
