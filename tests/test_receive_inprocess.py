"""Receiver details that need a look inside the process: socket options, limits, stores that
arrive after the disk ran low, the status file, and the spool's path rules."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from dicom_node import db
from dicom_node.config import parse_config
from dicom_node.node import Node, read_status, status_file_path
from dicom_node.receive import Receiver
from dicom_node.spool import Spool, StoredPathError, UnsafePathError, to_stored
from tests.support.dcmtk import free_port
from tests.support.postgres import both_databases

CT = "1.2.840.10008.5.1.4.1.1.2"
J2K = "1.2.840.10008.1.2.4.90"


def _config(tmp_path: Path, database_url: str | None = None, **node):
    return parse_config(
        {
            "node": {"port": free_port(), **node},
            "allowed_callers": [{"ae_title": "PYNETDICOM", "host": "127.0.0.0/8"}],
            "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_bytes": 0},
            "database": {
                "url": database_url or f"sqlite:///{tmp_path}/node.db",
                "store_busy_timeout_ms": 1000,
            },
            "completion": {"quiet_seconds": 100000},
        }
    )


@pytest.fixture
def receiver(tmp_path, database_url):
    cfg = _config(tmp_path, database_url, max_associations=2)
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


@both_databases
def test_stores_are_indexed_and_a_resend_is_a_duplicate(receiver, sample_data):
    files = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[:3]
    datasets = [pydicom.dcmread(f) for f in files]
    assoc = _associate(receiver.port)
    try:
        assert assoc.is_established
        statuses = [assoc.send_c_store(ds).Status for ds in [*datasets, datasets[0]]]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 4
    with receiver.sessions() as s:
        rows = s.scalars(select(db.Instance)).all()
        assert sorted(r.sop_instance_uid for r in rows) == sorted(
            ds.SOPInstanceUID for ds in datasets
        )
        (series,) = s.scalars(select(db.Series)).all()
        assert series.revision == 3  # the identical resend changed nothing
        kinds = s.scalars(select(db.AuditEvent.kind)).all()
        assert kinds.count("duplicate") == 1


@both_databases
def test_store_while_the_database_is_locked_gets_out_of_resources_promptly(
    receiver, sample_data, tmp_path
):
    """Another client holds the tables a store writes: the store is answered 0xA700 within
    database.store_busy_timeout_ms (1 s here) and a little, and nothing is indexed."""
    ds = pydicom.dcmread(sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[0])
    engine = receiver.sessions.kw["bind"]
    assoc = _associate(receiver.port)
    try:
        assert assoc.is_established
        if engine.dialect.name == "sqlite":
            locker = sqlite3.connect(tmp_path / "node.db", isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
        else:
            locker = engine.connect()
            locker.exec_driver_sql("LOCK TABLE studies, series, instances IN EXCLUSIVE MODE")
        t0 = time.monotonic()
        try:
            status = assoc.send_c_store(ds).Status
        finally:
            locker.rollback()
            locker.close()
        took = time.monotonic() - t0
    finally:
        assoc.release()
    assert status == 0xA700
    assert took < 1.0 + 3.0, took
    with receiver.sessions() as s:
        assert s.scalars(select(db.Instance)).all() == []


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


def test_spool_paths_stay_inside_even_past_the_uid_check(tmp_path, monkeypatch):
    """The lexical check behind the UID validation: with the validation gone, crafted UIDs
    still cannot leave the spool or add levels; a valid path and its stored form are as
    pathlib builds them."""
    spool = Spool(tmp_path / "spool")
    monkeypatch.setattr("dicom_node.spool.is_valid_uid", lambda uid: True)
    for uids in [
        ("..", "1.2", "1.3"),
        ("1.2", "..", "x"),
        ("1.2", "1.3/4", "5"),
        ("1.2", "1.3", "../../../etc/passwd"),
        ("1.2", ".", "1.3"),
    ]:
        with pytest.raises(UnsafePathError, match="escapes the spool"):
            spool.path_for(*uids)
    path = spool.path_for("1.2", "1.3", "1.4")
    assert path == spool.root / "1.2" / "1.3" / "1.4.dcm"
    assert spool.relative(path) == "1.2/1.3/1.4.dcm"
    # Off the fast path, the same form as the database keeps for other spool paths (to_stored):
    # normalised, and a path outside the spool is refused rather than written as "../x".
    assert (
        spool.relative(spool.root / "a" / ".." / "b")
        == "b"
        == to_stored(spool.root / "a" / ".." / "b", spool.root)
    )
    with pytest.raises(StoredPathError):
        spool.relative(spool.root / ".." / "elsewhere.dcm")


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


def test_nodes_sharing_a_spool_keep_their_own_status_files(tmp_path):
    """Two nodes (node.id a and b) on one spool and one database: each publishes and reads its
    own status, and one stopping cleanly leaves the other's file (no false crash at its next
    start, no lost crash record)."""
    configs = [_config(tmp_path, id=name) for name in ("node/a", "node-b")]
    nodes = [Node(cfg) for cfg in configs]
    for node in nodes:
        node.start()
    try:
        paths = [status_file_path(cfg) for cfg in configs]
        assert len(set(paths)) == 2 and all(p.parent == paths[0].parent for p in paths)
        for cfg, node in zip(configs, nodes, strict=True):
            assert read_status(cfg)["port"] == node.receiver.port
        nodes[0].stop()
        assert not paths[0].exists() and paths[1].exists()
        assert read_status(configs[1])["port"] == nodes[1].receiver.port
    finally:
        for node in nodes:
            node.stop()


def test_the_data_set_is_hashed_before_the_header_parse(receiver, sample_data, monkeypatch):
    """The temp file's write and fsync run on a pool thread, which needs the GIL to start. The
    header parse is pure Python and holds it, so the store hashes the data set first: sha256
    lets go of the GIL and the write starts at once (measured: 1.7 ms later otherwise, see
    docs/SCALING.md, "Where receive time goes"). The index keeps the hash of the data set as
    the peer sent it."""
    import hashlib

    import dicom_node.receive as receive

    calls: list[str] = []
    real_read_header = receive.read_dataset_header

    def read_header(*args, **kwargs):
        calls.append("read_header")
        return real_read_header(*args, **kwargs)

    def sha256(data):
        calls.append(f"sha256 {len(data)}")
        return hashlib.sha256(data)

    monkeypatch.setattr(receive, "read_dataset_header", read_header)
    monkeypatch.setattr(receive, "hashlib", type("hashlib", (), {"sha256": staticmethod(sha256)}))
    part10 = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[0].read_bytes()
    # The data set follows the preamble, "DICM" and the file meta group, whose length is the
    # value of its first element, (0002,0000) UL, 12 bytes long itself.
    assert part10[128:136] == b"DICM\x02\x00\x00\x00"
    dataset = part10[144 + int.from_bytes(part10[140:144], "little") :]
    result = receiver.store_part10(part10, "PYNETDICOM", "127.0.0.1")
    assert result.status == 0x0000, result
    assert calls == [f"sha256 {len(dataset)}", "read_header"]
    with receiver.sessions() as s:
        (row,) = s.scalars(select(db.Instance)).all()
    assert row.sha256 == hashlib.sha256(dataset).hexdigest()


def _pydicom_file_meta(sop_class: str, sop_uid: str, ts: str, calling_ae: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pynetdicom.dsutils import encode_file_meta

    from dicom_node.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = calling_ae
    return encode_file_meta(meta)


@pytest.mark.parametrize(
    "values",
    [
        (CT, "1.2.3.4", J2K, "STORESCU"),  # even lengths
        (CT, "1.2.3.45", "1.2.840.10008.1.2", "A"),  # odd lengths: padded
        (CT + ".1", "1." + "9" * 62, "1.2.840.10008.1.2.1", ""),  # 64-character UID, no AE
        (CT, "1.2.3", "1.2.840.10008.1.2.1", " AE B "),  # spaces kept as sent
        (CT, "1.2.3", "1.2.840.10008.1.2.1", "STÖRE"),  # not ASCII: pydicom's own writer
    ],
)
def test_file_meta_is_what_pydicom_writes(values):
    """The receiver encodes the file meta group itself (pydicom's writer cost ~0.3 ms per
    instance); the bytes are the same as pynetdicom's encode_file_meta writes."""
    from dicom_node.receive import _file_meta_bytes

    assert _file_meta_bytes(*values) == _pydicom_file_meta(*values)


def _variants(dataset: bytes, ts: str, rng) -> list[tuple[bytes, str]]:
    """The data set as sent, in other transfer syntaxes than its own, empty, cut short and with
    single bits flipped in its header."""
    out = [(dataset, ts), (b"", ts)]
    out += [
        (dataset, other) for other in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2") if other != ts
    ]
    out += [(dataset[:cut], ts) for cut in rng.sample(range(len(dataset)), 8)]
    for _ in range(12):
        flipped = bytearray(dataset)
        flipped[rng.randrange(min(len(dataset), 3000))] ^= 1 << rng.randrange(8)
        out.append((bytes(flipped), ts))
    return out


def _outcome(fn, *args):
    from dicom_node.header import InvalidInstance

    try:
        return fn(*args)
    except InvalidInstance as exc:
        return (exc.status, exc.reason, exc.header)


def test_the_data_set_header_reads_as_the_part10_header(sample_data, monkeypatch):
    """The receiver parses a C-STORE data set directly (no file meta built and parsed first),
    in one walk over its bytes where the encoding is regular (dicom_node.header._read_wanted),
    else with pydicom's reader. For real CT and MR files (explicit and implicit VR, JPEG 2000
    and native), whole, cut short, bit-flipped and in a wrong transfer syntax, it gives the same
    Header, or the same refusal (status, reason), as the Part 10 reader, which always parses
    with pydicom."""
    import random

    from dicom_node import header
    from dicom_node.header import read_dataset_header, read_header
    from dicom_node.receive import _PREAMBLE, _file_meta_bytes

    one_pass = []
    real_read_wanted = header._read_wanted

    def read_wanted(*args):
        read = real_read_wanted(*args)
        one_pass.append(read is not None)
        return read

    monkeypatch.setattr(header, "_read_wanted", read_wanted)
    rng = random.Random(12)
    files = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[:2]
    files += sorted(sample_data.ct_dicom_repaired.parent.glob("*mr*/*.dcm"))[:2]
    sources = []
    for path in files:
        ds = pydicom.dcmread(path)
        part10 = path.read_bytes()
        dataset = part10[144 + int.from_bytes(part10[140:144], "little") :]
        sources.append((path, ds, dataset, str(ds.file_meta.TransferSyntaxUID)))
        if "mr" in path.parent.name:  # native pixels: also as implicit VR little endian
            sources.append((path, ds, _dataset_bytes(ds, implicit=True), "1.2.840.10008.1.2"))
    stored = refused = 0
    for path, ds, dataset, sent_ts in sources:
        sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        for data, ts in _variants(dataset, sent_ts, rng):
            whole = _PREAMBLE + _file_meta_bytes(sop_class, sop_uid, ts, "X") + data
            old = _outcome(read_header, whole, sop_class, sop_uid, len(whole) - len(data))
            new = _outcome(read_dataset_header, data, ts, sop_class, sop_uid)
            assert new == old, (path.name, ts, len(data))
            stored += not isinstance(new, tuple)
            refused += isinstance(new, tuple)
    assert stored >= len(sources) and refused >= len(sources)  # both kinds were compared
    # Each data set as sent, and most variants, went through the one-pass reader; the
    # irregular ones through pydicom's.
    assert sum(one_pass) >= len(sources) and not all(one_pass)


def _dataset_bytes(ds: pydicom.Dataset, implicit: bool = False) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, True
    write_dataset(buf, ds)
    return buf.getvalue()


@pytest.mark.parametrize(
    "charset, description",
    [
        ("ISO_IR 100", "Thorax Ärzte ß"),  # Latin-1
        ("ISO_IR 192", "Thorax 胸部 Ärzte"),  # UTF-8
        ("ISO_IR 144", "Грудь"),  # Cyrillic
        (None, "plain ASCII"),
    ],
)
@pytest.mark.parametrize("implicit", [False, True])
def test_the_one_pass_reader_decodes_text_in_the_data_sets_character_set(
    sample_data, charset, description, implicit
):
    """Text (here SeriesDescription) reads as pydicom decodes it, in the data set's Specific
    Character Set, and the one-pass reader took the data set."""
    from dicom_node import header

    path = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    if charset is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = charset
    ds.SeriesDescription = description
    ds.BodyPartExamined = "CHEST"
    ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    data = _dataset_bytes(ds, implicit)
    assert header._read_wanted(data, ts) is not None
    fast = header.read_dataset_header(data, ts, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    parsed, uids = header._parse_dataset(data, ts, None)
    full = header._checked_header(parsed, uids, ts, data, None, None)
    assert fast == full
    assert fast.series_description == description
    assert fast.body_part == "CHEST"


_PLAIN_CASES = {
    # VR: (a tag of that VR, encoded values, ones the reader must convert itself)
    "DS": (0x00200032, [
        b"1.5", b"1.5 ", b" 1.5", b"-0.48828125\\0.48828125", b"1e3", b"+.5", b"1.", b".", b"",
        b" ", b"1,5", b"nan", b"inf", b"1.5\\", b"\\1.5", b"1.5\x00", b"1.5\\\x00", b"1.5\t",
        b"12345678901234567", b"1.5\\2.5\\ 3.5 ", b"0x10", b"1_0", b"\xb51", b"-0",
        b"-249.51171875\\-437.51171875\\-772.5",
    ], [b"1.5", b"-0.48828125\\0.48828125", b"-249.51171875\\-437.51171875\\-772.5"]),
    "IS": (0x00200013, [
        b"12", b"12 ", b" 12", b"+7", b"-0", b"007", b"1.0", b"1.5", b"", b"99999999999",
        b"999999999999", b"1\\2", b"1_0", b"12\x00", b" ", b"\xd9\xa1", b"1\\", b"2147483648",
    ], [b"12", b"12 ", b"1\\2"]),
    "CS": (0x00080008, [
        b"CT", b"CT ", b" CT", b"ORIGINAL\\PRIMARY\\AXIAL", b"ORIGINAL\\PRIMARY\\AXIAL\\ ",
        b"A\\\\B", b"CT\x00", b"", b"\xc4", b"\x1b$B", b"\\",
    ], [b"CT", b"ORIGINAL\\PRIMARY\\AXIAL"]),
    "UI": (0x00080018, [
        b"1.2.840.10008.5.1.4.1.1.2\x00", b"1.2.3 ", b" 1.2.3", b"1.2\\3.4", b"", b"1.2.3\x00\x00",
        b"\x00", b"1.2 .3",
    ], [b"1.2.840.10008.5.1.4.1.1.2\x00", b"1.2.3 "]),
    "LO": (0x0008103E, [
        b"Thorax", b"Thorax  ", b"  Thorax", b"A\\B", b"\xc4rzte", b"x\x00", b"", b"a \x00 ",
    ], [b"Thorax", b"Thorax  "]),
    "US": (0x00280010, [b"\x00\x02", b"\x10\x00", b"", b"\x01\x00\x02\x00", b"\x01"],
           [b"\x00\x02"]),
}  # fmt: skip


def _as_the_header_reads_it(v, vr: str) -> tuple:
    """What the header's readers make of ``v``: numbers (DS, IS, US) are read as numbers only,
    text (CS, UI, LO) as text only (dicom_node.slices; pixel_problem names a value as text
    only where it is not a number)."""
    from pydicom.multival import MultiValue

    from dicom_node import slices

    if v is None or v == "":
        v = None

    def outcome(fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            return type(exc).__name__

    if vr in ("DS", "IS", "US"):
        readers = (
            outcome(slices.as_float, v),
            *(outcome(slices.as_floats, v, n) for n in (1, 2, 3)),
            outcome(slices.as_int, v),
        )
    else:
        readers = (
            outcome(slices.as_uid, v),
            outcome(slices.as_text, v),
            outcome(slices.as_strings, v),
        )
    return (v, isinstance(v, list | MultiValue), *readers)


@pytest.mark.parametrize("vr", sorted(_PLAIN_CASES))
def test_plain_values_convert_as_pydicom_converts_them(vr, monkeypatch):
    """The one-pass reader converts the plainly encoded values of the wanted attributes itself
    (dicom_node.header._plain_value, a third of its time before); every value it takes reads as
    pydicom's conversion of the same bytes reads, through each of the header's readers, and a
    single value stays single, several stay a list. The node reads with pydicom's value
    validation off."""
    import pydicom.config
    from pydicom.charset import default_encoding
    from pydicom.dataelem import RawDataElement, convert_raw_data_element
    from pydicom.multival import MultiValue
    from pydicom.tag import BaseTag

    from dicom_node import header

    monkeypatch.setattr(pydicom.config.settings, "_reading_validation_mode", pydicom.config.IGNORE)
    tag, encoded, must_take = _PLAIN_CASES[vr]
    taken = []
    for data in encoded:
        plain = header._plain_value(vr, data)
        if plain is header._NOT_PLAIN:
            continue
        taken.append(data)
        raw = RawDataElement(BaseTag(tag), vr, len(data), data, 0, False, True)
        try:
            converted = convert_raw_data_element(raw, encoding=default_encoding).value
        except Exception as exc:
            raise AssertionError(f"pydicom refuses {data!r}, the one-pass reader took it") from exc
        assert plain == converted, data
        several = isinstance(converted, MultiValue | list)
        assert isinstance(plain, MultiValue | list) == several, data
        if several:
            assert [type(float(x) if vr in ("DS", "IS") else x) for x in plain] == [
                type(float(x) if vr in ("DS", "IS") else x) for x in converted
            ]
        assert _as_the_header_reads_it(plain, vr) == _as_the_header_reads_it(converted, vr), data
    assert set(must_take) <= set(taken)


def test_a_wanted_attribute_in_another_vr_reads_as_pydicom_reads_it(sample_data):
    """An explicit VR other than the dictionary's (here Rows as SS, -1) is converted by
    pydicom, in that VR: the refusal names -1, not 65535."""
    from dicom_node import header

    path = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    explicit = "1.2.840.10008.1.2.1"
    data = bytearray(_dataset_bytes(ds))
    rows = data.index(b"\x28\x00\x10\x00US\x02\x00")
    data[rows + 4 : rows + 10] = b"SS\x02\x00\xff\xff"
    data = bytes(data)
    assert header._read_wanted(data, explicit) is not None
    fast = _outcome(header.read_dataset_header, data, explicit)
    parsed, uids = header._parse_dataset(data, explicit, None)
    full = _outcome(header._checked_header, parsed, uids, explicit, data, None, None)
    assert fast == full
    assert fast[1] == "Rows is -1; must be positive"


def test_irregular_and_enhanced_data_sets_go_to_pydicoms_reader(sample_data):
    """What the one-pass reader leaves to pydicom: an Enhanced instance (its geometry is in the
    functional groups), an unknown explicit VR, an element where a sequence's items belong;
    and the Header of the Enhanced instance still has its first frame's geometry."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from dicom_node import header

    path = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    explicit = "1.2.840.10008.1.2.1"
    assert header._read_wanted(_dataset_bytes(ds), explicit) is not None

    enhanced = pydicom.dcmread(path)
    position = [float(v) for v in enhanced.ImagePositionPatient]
    del enhanced.ImagePositionPatient
    plane = Dataset()
    plane.ImagePositionPatient = position
    frame = Dataset()
    frame.PlanePositionSequence = Sequence([plane])
    enhanced.PerFrameFunctionalGroupsSequence = Sequence([frame])
    data = _dataset_bytes(enhanced)
    assert header._read_wanted(data, explicit) is None
    read = header.read_dataset_header(data, explicit)
    assert read.plane.position == pytest.approx(position)

    data = bytearray(_dataset_bytes(ds))
    at = data.index(b"UI")  # the first UI element's VR
    data[at : at + 2] = b"QQ"
    assert header._read_wanted(bytes(data), explicit) is None

    # An undefined-length sequence whose first content is a plain element, not an item.
    loose = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1140) SQ, undefined length
    loose += b"\x08\x00\x60\x00CS\x00\x00"  # (0008,0060) CS, empty
    loose += b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # sequence delimitation
    assert header._read_wanted(loose + _dataset_bytes(ds), explicit) is None


def test_no_attribute_the_one_pass_reader_hands_over_has_an_ambiguous_vr():
    """pydicom resolves an ambiguous VR (US or SS, OB or OW) from other elements of the data
    set, which the one-pass reader does not keep."""
    from pydicom.datadict import dictionary_VR
    from pydicom.valuerep import AMBIGUOUS_VR

    from dicom_node import header

    assert header._WANTED and not any(dictionary_VR(t) in AMBIGUOUS_VR for t in header._WANTED)
