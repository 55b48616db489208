"""Receiver details that need a look inside the process: socket options, limits, stores that
arrive after the disk ran low, the status file, and the spool's path rules."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from dicom_node import db
from dicom_node.config import parse_config
from dicom_node.node import Node, read_status, status_file_path
from dicom_node.receive import Receiver
from dicom_node.spool import Spool, UnsafePathError
from tests.support.dcmtk import free_port

CT = "1.2.840.10008.5.1.4.1.1.2"
J2K = "1.2.840.10008.1.2.4.90"


def _config(tmp_path: Path, **node):
    return parse_config(
        {
            "node": {"port": free_port(), **node},
            "allowed_callers": [{"ae_title": "PYNETDICOM", "host": "127.0.0.0/8"}],
            "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_bytes": 0},
            "database": {"url": f"sqlite:///{tmp_path}/node.db"},
            "completion": {"quiet_seconds": 100000},
        }
    )


@pytest.fixture
def receiver(tmp_path):
    cfg = _config(tmp_path, max_associations=2)
    db.upgrade(cfg.database.url)
    r = Receiver(cfg, db.make_session_factory(db.make_engine(cfg.database.url)))
    r.start()
    yield r
    r.stop(grace_s=1)


def _associate(port: int):
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CT, J2K)
    return ae.associate("127.0.0.1", port, ae_title="ACVTT")


def test_accepted_sockets_have_tcp_nodelay(receiver):
    assoc = _associate(receiver.port)
    try:
        assert assoc.is_established
        (server_side,) = [a for a in receiver.ae.active_associations if a.is_acceptor]
        sock = server_side.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_max_associations_from_config(receiver):
    first, second = _associate(receiver.port), _associate(receiver.port)
    try:
        assert first.is_established and second.is_established
        third = _associate(receiver.port)
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        first.release()
        second.release()


def test_store_after_disk_ran_low_gets_out_of_resources(receiver, sample_data):
    src = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    assoc = _associate(receiver.port)
    try:
        assert assoc.is_established
        # The disk fills up while the association is open.
        receiver.config.storage.min_free_bytes = 10**18
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert rsp.Status == 0xA700
    assert not list(receiver.spool.root.rglob("*.dcm"))


def test_status_file_lists_open_associations(tmp_path):
    cfg = _config(tmp_path)
    node = Node(cfg)
    node.start()
    try:
        assoc = _associate(node.receiver.port)
        assert assoc.is_established
        deadline = time.monotonic() + 5
        while True:
            status = read_status(cfg)
            if status and status["associations"]:
                break
            assert time.monotonic() < deadline, "status file never showed the association"
            time.sleep(0.05)
        (a,) = status["associations"]
        assert a["calling_ae"] == "PYNETDICOM" and a["peer"] == "127.0.0.1"
        assert status["port"] == node.receiver.port
        assoc.release()
        deadline = time.monotonic() + 5
        while read_status(cfg)["associations"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        node.stop()
    assert not status_file_path(cfg).exists()
    assert read_status(cfg) is None


def test_stale_status_file_means_not_running(tmp_path):
    cfg = _config(tmp_path)
    path = status_file_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 2**22 + 12345, "updated_unix": time.time()}))
    assert read_status(cfg) is None  # no such process: a node killed with -9


@pytest.mark.parametrize(
    "uids",
    [
        ("../x", "1.2", "1.3"),
        ("1.2", "1.2/../../x", "1.3"),
        ("1.2", "1.3", ""),
        ("1.2", "1.3", "1." + "2" * 70),
        ("1.2", "1.3", "1.2.\x00"),
    ],
)
def test_spool_refuses_paths_from_invalid_uids(tmp_path, uids):
    spool = Spool(tmp_path / "spool")
    with pytest.raises(UnsafePathError):
        spool.path_for(*uids)


def test_spool_write_is_atomic_and_replaces(tmp_path):
    spool = Spool(tmp_path / "spool")
    path = spool.path_for("1.2", "1.2.3", "1.2.3.4")
    assert spool.write(path, (b"abc", b"def")) == 6
    assert path.read_bytes() == b"abcdef"
    assert spool.write(path, (b"new",)) == 3
    assert path.read_bytes() == b"new"
    assert not list(spool.incoming.iterdir())
    (spool.incoming / "left-by-crash.part").write_bytes(b"x")
    assert spool.clean_incoming() == 1
