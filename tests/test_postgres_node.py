"""Real ``dicom-node serve`` processes and the admin commands on PostgreSQL (issue 12).

The nodes run with ``database.url: postgresql+psycopg://...`` against the test run's private
cluster (tests/support/postgres.py); dcmtk's ``storescu`` sends, the CLI reads back. A server
that cannot be reached at start-up stops ``serve`` with one line naming ``database.url``. Two
nodes sharing the database and the spool: the one running a job is killed with SIGKILL, the
other finishes the job once the lease has expired, and the PACS (Orthanc) gets one series.
"""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa
import yaml

from dicom_node import db
from dicom_node.web.readiness import PROBE_TIMEOUT_S, check_database, probe_engine
from tests.support.dcmtk import free_port
from tests.support.node import NodeProcess, make_instances, send_with_storescu
from tests.support.orthanc import OrthancServer
from tests.support.polling import wait_until
from tests.support.postgres import PostgresCluster
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


def _job_row(engine) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                "select id, state, claimed_by, attempts, derived_series_uid from jobs"
                " order by id desc limit 1"
            )
        ).first()
    return dict(row._mapping) if row else None


@pytest.mark.slow
def test_worker_killed_mid_job_its_lease_expires_and_the_other_node_finishes(
    tmp_path, sample_data, postgres_cluster
):
    """Two ``serve`` processes on one PostgreSQL and one spool; the node that claimed the job
    is killed with SIGKILL while it runs it. The other node takes the job over once the lease
    (3 s) has expired, and Orthanc ends up with exactly one derived series, complete."""
    url = postgres_cluster.create_database()
    sources = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
    n_out = (len(sources) - 1) * 2 + 1
    engine = db.make_engine(url)
    with OrthancServer(tmp_path / "orthanc", aet="PACS") as pacs:

        def overrides(node_id: str) -> dict:
            return {
                "node": {"id": node_id, "lease_s": 3},
                "storage": {"spool_dir": str(tmp_path / "shared-spool")},
                "database": {"url": url},
                "destinations": [
                    {
                        "name": "pacs",
                        "ae_title": "PACS",
                        "host": "127.0.0.1",
                        "port": pacs.dicom_port,
                    },
                ],  # fmt: skip
                "completion": {"quiet_seconds": 1, "check_interval_s": 0.5},
                "rules": [
                    {
                        "name": "thick-ct",
                        "match": {"modality": ["CT"], "spacing_mm": [1.5, 10]},
                        "action": {"target_spacing_mm": 1.0, "destinations": ["pacs"]},
                    }
                ],
                "model": {"device": "cpu"},
            }

        nodes = {n: NodeProcess(tmp_path / n, overrides=overrides(n)) for n in ("node-a", "node-b")}
        try:
            for node in nodes.values():
                node.start()
            sent = send_with_storescu(sources, nodes["node-a"].port)
            assert len(sent.acknowledged) == len(sources), sent.output[-2000:]
            job = wait_until(
                lambda: (j := _job_row(engine)) and j["state"] == "running" and j,
                120,
                "a node to claim the job",
                interval=0.2,
            )
            holder = job["claimed_by"]
            nodes[holder].kill()
            killed_while_running = _job_row(engine)["state"] == "running"
            other = next(n for n in nodes if n != holder)
            done = wait_until(
                lambda: (j := _job_row(engine)) and j["state"] in ("sent", "failed") and j,
                300,
                "the other node to finish the job",
                interval=1,
            )
            assert killed_while_running, "the job finished before the kill: the test is void"
            assert done["state"] == "sent", nodes[other].log_tail()
            assert done["claimed_by"] == other and done["attempts"] == 2, done
            series = [pacs.get(f"/series/{sid}") for sid in pacs.get("/series")]
            assert len(series) == 1
            assert series[0]["MainDicomTags"]["SeriesInstanceUID"] == done["derived_series_uid"]
            assert len(series[0]["Instances"]) == n_out
            with engine.connect() as conn:
                claims = conn.execute(
                    sa.text("select count(*) from audit_events where kind = 'job_claimed'")
                ).scalar()
            assert claims == 2
        finally:
            for node in nodes.values():
                node.kill()
            engine.dispose()


def test_readiness_probe_on_postgresql_fails_fast_on_a_held_lock_and_a_dead_server(
    postgres_cluster,
):
    url = postgres_cluster.create_database()
    db.upgrade(url)
    assert check_database(probe_engine(url)).ok
    engine = db.make_engine(url)
    try:
        with engine.connect() as holder:
            holder.exec_driver_sql("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
            t0 = time.monotonic()
            check = check_database(probe_engine(url))
            took = time.monotonic() - t0
            holder.rollback()
    finally:
        engine.dispose()
    assert not check.ok and "lock timeout" in check.detail, check
    assert took < PROBE_TIMEOUT_S + 2, took
    assert check_database(probe_engine(url)).ok
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nodes"
    check = check_database(probe_engine(dead))
    assert not check.ok and "cannot use the database" in check.detail


def test_database_outage_gets_0xa700_and_the_node_recovers_by_itself(tmp_path, sample_data):
    """The PostgreSQL server goes away while the node runs (its own cluster here, stopped with
    ``pg_ctl stop``): stores are answered 0xA700 (senders retry) and nothing unindexed is
    acknowledged; when the server is back on the same port, the node takes stores again without
    a restart."""
    sources = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
    files = make_instances(sources, 3, tmp_path / "in", seed="postgres-outage")
    with PostgresCluster() as cluster:
        url = cluster.create_database()
        overrides = {
            "database": {"url": url, "store_busy_timeout_ms": 2000},
            "completion": {"quiet_seconds": 100000},
        }
        with NodeProcess(tmp_path / "node", overrides=overrides) as node:
            assert send_with_storescu(files[:1], node.port).acknowledged == {files[0]}
            cluster.stop_server()
            t0 = time.monotonic()
            during = send_with_storescu(files[1:2], node.port)
            took = time.monotonic() - t0
            assert during.statuses == {files[1]: 0xA700}, during.output[-2000:]
            assert took < 2 + 10, took  # the store budget and a little, not a sender timeout
            assert node.running
            cluster.start_server()
            after = send_with_storescu(files[1:], node.port)
            assert after.acknowledged == set(files[1:]), after.output[-2000:]
            listed = node.cli("series", "list", "--json")
            assert listed.returncode == 0, listed.stderr
            assert json.loads(listed.stdout)[0]["n_instances"] == 3
            # the refused store left no file behind that the index does not know
            assert len(list(node.spool.rglob("*.dcm"))) == 3
