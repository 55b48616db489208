"""Several receiving processes on one port (``node.receiver_processes``, issue 12 item 6).

Real ``dicom-node serve`` processes, real dcmtk ``storescu`` senders at once, the node's own
database read back: every instance answered 0x0000 is indexed and its file is in the spool,
whichever process took it; more than one process served associations; a child killed with
SIGKILL is started again and stores carry on; a clean stop leaves no child; a child does not
outlive a node killed with SIGKILL; a second node on the same port fails to start instead of
silently sharing the port. SQLite (several writer processes) and PostgreSQL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.node import (
    NodeProcess,
    StoreResult,
    dicom_node_command,
    make_instances,
    parse_storescu_output,
    start_storescu,
)
from tests.support.polling import wait_until

_ESTABLISHED = re.compile(r"association established calling_ae=STORESCU .* pid=(\d+)")
_STARTED = re.compile(r"receiver process (\d+) started pid=(\d+)")
_LISTENING = re.compile(r"receiver process (\d+) listening pid=(\d+)")


def _log(node: NodeProcess) -> str:
    return node.log_path.read_text(errors="replace")


def _children(parent_pid: int) -> set[int]:
    """Live receiving processes started by ``parent_pid`` (from /proc, not from the log)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dicom_node.receive_pool" in argv and str(parent_pid).encode() in argv:
            stat = (entry / "stat").read_text()
            if " Z " not in stat[stat.rfind(")") :]:  # a zombie is dead already
                found.add(int(entry.name))
    return found


def _listening_children(node: NodeProcess, n: int, dead: int | None = None) -> dict[int, int]:
    """Wait until the latest start of each of the ``n`` children (none of them pid ``dead``)
    logged that it listens; returns index -> pid."""

    def ready() -> dict[int, int] | None:
        text = _log(node)
        latest = {int(i): int(p) for i, p in _STARTED.findall(text)}
        listening = {(int(i), int(p)) for i, p in _LISTENING.findall(text)}
        if len(latest) != n or dead in latest.values():
            return None
        return latest if all((i, p) in listening for i, p in latest.items()) else None

    return wait_until(ready, 60, f"{n} receiver processes listening")


def _send_at_once(batches: list[list[Path]], node: NodeProcess, log_dir: Path) -> set[Path]:
    """Send each batch over its own storescu association, all at once; the files answered
    0x0000 (every one of them must be)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = [
        start_storescu(files, node.port, log_dir / f"sender{i}.log")
        for i, files in enumerate(batches)
    ]
    acknowledged: set[Path] = set()
    for i, (files, proc) in enumerate(zip(batches, procs, strict=True)):
        proc.wait(120)
        output = (log_dir / f"sender{i}.log").read_text(errors="replace")
        result = StoreResult(proc.returncode, parse_storescu_output(output), output)
        ok = {p for p, s in result.statuses.items() if s == 0x0000}
        assert result.returncode == 0 and ok == set(files), output[-2000:]
        acknowledged |= ok
    return acknowledged


def _sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _indexed(node: NodeProcess, url: str) -> dict[str, str]:
    """SOP Instance UID -> file path (relative to the spool), from the node's database."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select sop_instance_uid, file_path from instances"))
            return {uid: path for uid, path in rows}
    finally:
        engine.dispose()


def _assert_all_indexed(node: NodeProcess, url: str, acknowledged: set[Path]) -> None:
    indexed = _indexed(node, url)
    for path in acknowledged:
        uid = _sop_uid(path)
        assert uid in indexed, f"{path.name} was answered 0x0000 but is not indexed"
        assert (node.spool / indexed[uid]).is_file(), f"{path.name}: indexed, file missing"


def _series(sources: list[Path], tmp: Path, tag: str, senders: int, n: int) -> list[list[Path]]:
    return [
        make_instances(sources, n, tmp / f"{tag}-{s}", seed=f"{tag}-{s}") for s in range(senders)
    ]


@pytest.fixture
def sources(sample_data) -> list[Path]:
    return sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))


def _node(tmp_path: Path, processes: int, url: str | None = None, **kw) -> NodeProcess:
    overrides: dict = {
        "node": {"receiver_processes": processes},
        "completion": {"quiet_seconds": 100000},  # receiving only: no pipeline work
    }
    if url is not None:
        overrides["database"] = {"url": url}
    return NodeProcess(tmp_path, overrides=overrides, **kw)


def _spread_and_indexed(node: NodeProcess, url: str, sources: list[Path], tmp: Path) -> None:
    """Several rounds of six senders at once until more than one process served (whichever
    process accepts first takes a connection, so "one process took them all" is possible in
    one round, vanishingly unlikely in four); every 0x0000 is indexed."""
    pids = {
        node.proc.pid,
        *_listening_children(node, node.config["node"]["receiver_processes"] - 1).values(),
    }
    assert pids - {node.proc.pid} == _children(node.proc.pid)
    acknowledged: set[Path] = set()
    for r in range(4):
        batches = _series(sources, tmp / "in", f"round{r}", senders=6, n=8)
        acknowledged |= _send_at_once(batches, node, tmp / f"logs{r}")
        served = {int(p) for p in _ESTABLISHED.findall(_log(node))}
        if len(served) > 1:
            break
    assert served <= pids
    assert len(served) > 1, f"only pid {served} served associations"
    _assert_all_indexed(node, url, acknowledged)
    assert len(_indexed(node, url)) == len(acknowledged)


def test_receiving_processes_share_the_port_and_are_supervised(tmp_path, sources):
    """SQLite: several writer processes; a child killed with SIGKILL is started again and
    stores carry on; a second node cannot join the port; a clean stop leaves no child."""
    node = _node(tmp_path / "node", 3)
    url = f"sqlite:///{node.db_path}"
    with node:
        _spread_and_indexed(node, url, sources, tmp_path)

        old = _listening_children(node, 2)[1]
        os.kill(old, signal.SIGKILL)
        wait_until(
            lambda: re.search(
                rf"receiver process 1 pid={old} ended \(signal SIGKILL\)", _log(node)
            ),
            30,
            "the node to notice that its child died",
        )
        new = _listening_children(node, 2, dead=old)[1]
        assert new != old and new in _children(node.proc.pid)
        batches = _series(sources, tmp_path / "in", "after-kill", senders=4, n=8)
        _assert_all_indexed(node, url, _send_at_once(batches, node, tmp_path / "logs-after"))

        # Same user, same port: a second node must not join in.
        # (Not NodeProcess.start: its C-ECHO would be answered by the first node.)
        other = _node(tmp_path / "other", 2, port=node.port)
        try:
            second = subprocess.run(
                [*dicom_node_command(), "serve", "--config", str(other.config_path)],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("a second node started on the port of a running one")
        assert second.returncode != 0 and "cannot listen" in second.stderr, second.stderr

        parent = node.proc.pid
        assert node.stop() == 0
    assert _children(parent) == set()


def test_on_postgresql_and_children_end_with_a_killed_node(tmp_path, sources, postgres_cluster):
    url = postgres_cluster.create_database()
    with _node(tmp_path / "node", 2, url=url) as node:
        _spread_and_indexed(node, url, sources, tmp_path)
        parent = node.proc.pid
        node.kill()
        wait_until(lambda: not _children(parent), 20, "the children to end with their node")


def _status_pids(node: NodeProcess) -> list[int]:
    """The process of each open association that ``dicom-node status --json`` lists."""
    import json

    proc = node.cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    return sorted(a["pid"] for a in json.loads(proc.stdout)["associations"])


def test_a_new_association_goes_to_the_least_busy_process(tmp_path):
    """Two processes, four associations held open, opened one after the other (even rounds)
    or all at once (odd rounds): each process serves two, in every round, and ``dicom-node
    status`` lists the four with the process serving each. (Both processes
    wake for a connection on the shared socket; one that serves associations, or has just
    accepted a connection, waits before it accepts, so the other takes it. Left to the race,
    2 + 2 came out in about 3 of 8 rounds.)"""
    import threading

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = _node(tmp_path / "node", 2)
    with node:
        _listening_children(node, 1)
        # The main process loads its model in the background at start (torch holds the
        # interpreter for stretches): wait, as a node that has been running would be.
        wait_until(lambda: "model loaded" in _log(node), 120, "the node to load its model")
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(Verification)
        for r in range(6):
            before = len(_ESTABLISHED.findall(_log(node)))
            assocs: list = []

            def associate(assocs=assocs):
                assocs.append(ae.associate("127.0.0.1", node.port, ae_title=NodeProcess.AE_TITLE))

            try:
                if r % 2:  # all at once
                    threads = [threading.Thread(target=associate) for _ in range(4)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join(30)
                else:  # one after the other, each established first
                    for k in range(4):
                        associate()
                        wait_until(
                            lambda n=before + k + 1: len(_ESTABLISHED.findall(_log(node))) >= n,
                            10,
                            "the node to log the association",
                        )
                assert len(assocs) == 4 and all(a.is_established for a in assocs)
                wait_until(
                    lambda n=before + 4: len(_ESTABLISHED.findall(_log(node))) >= n,
                    10,
                    "the node to log the associations",
                )
                if r == 0:  # the operator's view lists all four, with the serving process
                    served = sorted(map(int, _ESTABLISHED.findall(_log(node))[before:]))
                    wait_until(
                        lambda served=served: _status_pids(node) == served,
                        15,
                        "dicom-node status to list every open association",
                    )
            finally:
                for assoc in assocs:
                    assoc.release()
            pids = _ESTABLISHED.findall(_log(node))[before:]
            assert sorted(pids.count(p) for p in set(pids)) == [2, 2], f"round {r}: {pids}"
            wait_until(
                lambda n=before + 4: _log(node).count("released calling_ae=STORESCU") >= n,
                10,
                "the associations to be released",
            )
