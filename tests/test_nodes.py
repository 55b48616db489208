"""The nodes table and the installation-wide ``dicom-node status`` (issue 12, item 4).

* States on both engines: a registered node is alive, stale once three of its heartbeats are
  missed, alive again when it beats, stopped after a clean stop; a restart reuses the row.
* A node that cannot reach its database only logs warnings (:class:`Presence`).
* Each destination's last success and last failure (with its reason), recorded by real send
  attempts (``deliver_job`` to a pynetdicom SCP and to a closed port), in ``status --json``.
* Real ``dicom-node serve`` processes on one private PostgreSQL: a receiver and a worker both
  alive with their roles (the worker with its model), the worker killed with SIGKILL turns
  stale, the receiver stopped with SIGTERM turns stopped.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage

from dicom_node import db, nodes
from dicom_node.config import load_config, parse_config
from dicom_node.db import JobState, Series, Study
from dicom_node.deliver import RetryPolicy, deliver_job
from dicom_node.jobs import queue_job, transition
from dicom_node.node import status_file_path
from tests.support.dcmtk import free_port
from tests.support.node import REPO_ROOT, NodeProcess, dicom_node_command
from tests.support.polling import wait_until
from tests.support.postgres import both_databases

T0 = datetime(2026, 12, 2, 5, 0, 0)
HEARTBEAT_S = 2.0


def _facts(node_id: str, role: str, pid: int = 100) -> nodes.NodeFacts:
    return nodes.NodeFacts(
        id=node_id,
        host="host-a",
        role=role,
        version="0.1.0",
        pid=pid,
        ae_title="ACVTT",
        port=None if role == "worker" else 11112,
        heartbeat_s=HEARTBEAT_S,
    )


class _Model:
    model_id, model_version = "acvtt-test", "v7"


@pytest.fixture
def sessions(database_url):
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    yield db.make_session_factory(engine)
    engine.dispose()


def _states(sessions, at: datetime) -> dict[str, str]:
    with sessions() as s:
        return {n["id"]: n["state"] for n in nodes.list_nodes(s, now=at)}


@both_databases
def test_alive_stale_stopped_and_a_restart(sessions):
    with sessions() as s:
        nodes.register(s, _facts("recv-1", "receiver"), now=T0)
        nodes.register(s, _facts("work-1", "worker"), now=T0)
        s.commit()
    # Within three heartbeats: alive; one second later without a beat: stale.
    limit = timedelta(seconds=3 * HEARTBEAT_S)
    assert _states(sessions, T0 + limit) == {"recv-1": "alive", "work-1": "alive"}
    late = T0 + limit + timedelta(seconds=1)
    assert _states(sessions, late) == {"recv-1": "stale", "work-1": "stale"}
    with sessions() as s:
        assert nodes.heartbeat(s, "work-1", _Model(), "cpu", now=late)
        nodes.mark_stopped(s, "recv-1", now=late)
        s.commit()
    assert _states(sessions, late) == {"recv-1": "stopped", "work-1": "alive"}
    with sessions() as s:
        (worker,) = [n for n in nodes.list_nodes(s, now=late) if n["id"] == "work-1"]
        assert (worker["model_id"], worker["model_version"], worker["devices"]) == (
            "acvtt-test",
            "v7",
            "cpu",
        )
        assert worker["role"] == "worker" and worker["port"] is None
        assert nodes.nodes_by_state(s, now=late) == {"alive": 1, "stale": 0, "stopped": 1}
        # A stopped node's late beat does not bring it back; its restart does.
        assert not nodes.heartbeat(s, "recv-1", now=late)
        s.commit()
    assert _states(sessions, late)["recv-1"] == "stopped"
    restart = late + timedelta(seconds=30)
    with sessions() as s:
        nodes.register(s, _facts("work-1", "worker", pid=200), now=restart)
        s.commit()
        again = {n["id"]: n for n in nodes.list_nodes(s, now=restart)}
    assert again["work-1"]["state"] == "alive" and again["work-1"]["pid"] == 200
    assert again["work-1"]["model_id"] is None  # until this run loads its model
    assert again["recv-1"]["state"] == "stopped"


def test_a_node_without_its_database_only_logs_warnings(tmp_path, caplog):
    config = parse_config(
        {
            "node": {"id": "lonely"},
            "storage": {"spool_dir": str(tmp_path / "spool")},
            "database": {"url": f"sqlite:///{tmp_path / 'missing-dir' / 'node.db'}"},
        }
    )
    engine = db.make_engine(config.database.url, busy_timeout_ms=100)
    presence = nodes.Presence(config, db.make_session_factory(engine), port=None)
    with caplog.at_level(logging.WARNING, logger="dicom_node.nodes"):
        presence.register()
        presence.beat()
        presence.stop()  # waits for the beat's thread
    engine.dispose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(" node ")[0] for w in warnings] == [
        "cannot register",
        "cannot renew",
        "cannot mark stopped",
    ], warnings


# -- destinations: last success and last failure, from real send attempts ------------------------


class _StoreSCP:
    """A pynetdicom C-STORE SCP that accepts CT in any transfer syntax and answers 0x0000."""

    def __init__(self) -> None:
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
        )

    def stop(self) -> None:
        self.server.shutdown()


def _written_job(sessions, files: list[Path], destinations: list[str]) -> int:
    with sessions() as s:
        study = Study(study_uid="1.2.826.0.1.1")
        s.add(study)
        s.flush()
        series = Series(series_uid="1.2.826.0.1.1.2", study_id=study.id)
        s.add(series)
        s.flush()
        job, _ = queue_job(
            s,
            series=series,
            sop_uids=["1.2.826.0.1.1.2.3"],
            model_id="m",
            model_version="1",
            factor=2,
            destinations=destinations,
        )
        transition(s, job, JobState.running)
        transition(
            s,
            job,
            JobState.written,
            derived_dir=str(files[0].parent),
            derived_files=[f.name for f in files],
        )
        s.commit()
        return job.id


@both_databases
def test_status_shows_each_destinations_last_success_and_failure(
    tmp_path, sample_data, database_url, sessions
):
    derived = tmp_path / "derived"
    derived.mkdir()
    files = [
        Path(shutil.copy(f, derived))
        for f in sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[:2]
    ]
    scp = _StoreSCP()
    cfg = {
        "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_bytes": 0},
        "database": {"url": database_url},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": scp.port},
            {"name": "down", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()},
            {"name": "unused", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        ],
        "node": {"acse_timeout_s": 5, "network_timeout_s": 5, "dimse_timeout_s": 5},
    }
    (tmp_path / "spool").mkdir()
    config_path = tmp_path / "node.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    try:
        job_id = _written_job(sessions, files, ["pacs", "down"])
        state = deliver_job(load_config(config_path), sessions, job_id, policy=RetryPolicy())
    finally:
        scp.stop()
    assert state is JobState.written  # "down" failed transiently: a retry is scheduled
    proc = subprocess.run(
        [*dicom_node_command(), "status", "--json", "--config", str(config_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    dests = {d["name"]: d for d in report["destinations"]}
    assert set(dests) == {"pacs", "down", "unused"}
    assert dests["pacs"]["last_success"] is not None and dests["pacs"]["last_failure"] is None
    assert dests["down"]["last_success"] is None and dests["down"]["last_failure"] is not None
    assert dests["down"]["last_failure_reason"], dests["down"]
    assert dests["unused"] == {
        "name": "unused",
        "address": "PACS@127.0.0.1:104",
        "last_success": None,
        "last_failure": None,
        "last_failure_reason": None,
    }
    assert report["jobs_by_state"] == {"written": 1}
    assert report["nodes"] == []  # no node has run on this database


# -- real processes on PostgreSQL ------------------------------------------------------------------


class WorkerProcess(NodeProcess):
    """A ``serve --role worker`` process: it opens no DICOM port, so it counts as started once
    it has written its status file."""

    def ready_echo(self, timeout: float) -> subprocess.CompletedProcess:
        written = status_file_path(load_config(self.config_path)).exists()
        return subprocess.CompletedProcess([], 0 if written else 1, "", "")


def _nodes(node: NodeProcess) -> dict[str, dict]:
    """The nodes as ``dicom-node status --json`` lists them."""
    proc = node.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    return {n["id"]: n for n in json.loads(proc.stdout)["nodes"]}


def test_two_real_nodes_alive_then_killed_stale_and_stopped(tmp_path, postgres_cluster):
    url = postgres_cluster.create_database()
    engine = db.make_engine(url)
    sessions = db.make_session_factory(engine)

    def overrides(node_id: str, role: str) -> dict:
        return {
            "node": {"id": node_id, "role": role, "heartbeat_s": 0.5},
            "database": {"url": url},
            "model": {"device": "cpu"},
        }

    def in_database() -> dict[str, dict]:  # cheaper to poll than the CLI
        with sessions() as s:
            return {n["id"]: n for n in nodes.list_nodes(s)}

    receiver = NodeProcess(tmp_path / "recv", overrides=overrides("recv-1", "receiver"))
    worker = WorkerProcess(tmp_path / "work", overrides=overrides("work-1", "worker"))
    # The worker first: it loads its model while the receiver starts.
    with worker, receiver:
        wait_until(
            lambda: in_database().get("work-1", {}).get("model_id"),
            90,
            "the worker to report its loaded model",
            interval=0.2,
        )
        listed = _nodes(receiver)
        assert {n: x["state"] for n, x in listed.items()} == {"recv-1": "alive", "work-1": "alive"}
        assert listed["recv-1"]["role"] == "receiver" and listed["work-1"]["role"] == "worker"
        assert listed["recv-1"]["port"] == receiver.port and listed["work-1"]["port"] is None
        assert listed["recv-1"]["pid"] == receiver.proc.pid
        assert re.fullmatch(r"cpu \(\d+ threads?\)", listed["work-1"]["devices"]), listed
        assert listed["recv-1"]["model_id"] is None
        worker.kill()  # SIGKILL: no clean-up, its row never says stopped
        wait_until(
            lambda: in_database()["work-1"]["state"] == "stale",
            30,
            "the killed worker to turn stale",
            interval=0.2,
        )
        assert receiver.stop() == 0
        final = _nodes(receiver)
        assert final["recv-1"]["state"] == "stopped" and final["recv-1"]["stopped_at"]
        assert final["work-1"]["state"] == "stale" and final["work-1"]["stopped_at"] is None
        text = receiver.cli("status")
        assert text.returncode == 0 and "stale" in text.stdout and "stopped" in text.stdout
    engine.dispose()


def test_nodes_in_the_json_api_and_in_metrics(tmp_path):
    import requests

    from tests.test_http_units import _serve

    server, base = _serve(tmp_path)  # its database: tmp_path / node.db
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        with db.make_session_factory(engine)() as s:
            nodes.register(s, _facts("recv-1", "receiver"))
            nodes.register(s, _facts("work-1", "worker"))
            nodes.register(s, _facts("old-1", "worker"), now=T0)  # never stopped: stale
            nodes.mark_stopped(s, "recv-1")
            s.commit()
        listed = requests.get(base + "/api/nodes", timeout=10).json()["nodes"]
        assert {n["id"]: n["state"] for n in listed} == {
            "old-1": "stale",
            "recv-1": "stopped",
            "work-1": "alive",
        }
        scrape = requests.get(base + "/metrics", timeout=10).text
        for state, n in (("alive", 1), ("stale", 1), ("stopped", 1)):
            assert f'dicom_node_nodes{{state="{state}"}} {n}.0' in scrape, scrape
    finally:
        server.stop()
        engine.dispose()
