"""Group commit of index rows (dicom_node/index.py, ``Indexer._grouped``): rows that several
associations store at once share one transaction and one commit; every store learns its own
outcome only after that commit, and one row's failure fails only its own store."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path

import pytest
from sqlalchemy import event, select

from dicom_node import db
from dicom_node.header import Header, read_header
from dicom_node.index import Indexer, UidConflict
from tests.support.node import make_instances
from tests.support.polling import wait_until
from tests.support.postgres import both_databases


@pytest.fixture
def indexer(database_url):
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    commits: list[int] = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    yield Indexer(db.make_session_factory(engine), time_budget_s=10.0), commits
    engine.dispose()


def _headers(sample_data, tmp_path: Path, n: int, seed: str) -> list[tuple[Header, str]]:
    sources = sorted(sample_data.ct_dicom_repaired.glob("*.dcm"))
    out = []
    for path in make_instances(sources, n, tmp_path / seed, seed):
        data = path.read_bytes()
        out.append((read_header(data), hashlib.sha256(data).hexdigest()))
    return out


def _store_at_once(idx: Indexer, rows: list[tuple[Header, str]]) -> list[str | Exception]:
    """Record ``rows`` from one thread each, all queued before any may commit (the test holds
    the committer lock meanwhile); returns each row's outcome."""
    outcomes: list[str | Exception] = [RuntimeError("no outcome")] * len(rows)

    def store(i: int, h: Header, sha: str) -> None:
        try:
            outcomes[i] = idx.record(h, f"{h.series_uid}/{h.sop_instance_uid}.dcm", 1, sha, "T")
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=store, args=(i, *r)) for i, r in enumerate(rows)]
    with idx._committer:
        for t in threads:
            t.start()
        wait_until(lambda: len(idx._queued) == len(rows), 10, "rows queued", interval=0.01)
    for t in threads:
        t.join(30)
    return outcomes


@both_databases
def test_rows_stored_at_once_share_one_commit(indexer, sample_data, tmp_path):
    idx, commits = indexer
    rows = _headers(sample_data, tmp_path, 4, "group")
    assert _store_at_once(idx, rows) == ["new"] * 4
    assert len(commits) == 1  # one transaction for the four rows
    with db.make_session_factory(idx.engine)() as s:
        indexed = set(s.scalars(select(db.Instance.sop_instance_uid)))
        (series,) = s.scalars(select(db.Series)).all()
    assert indexed == {h.sop_instance_uid for h, _ in rows}
    assert series.revision == 4


@both_databases
def test_a_conflicting_row_fails_alone_and_the_others_are_committed(indexer, sample_data, tmp_path):
    """The fourth row reuses a SOP Instance UID already indexed in another series: the group's
    transaction is rolled back and each row runs again alone. The conflict is refused, the
    other rows and duplicates are indexed exactly as if they had come one by one."""
    idx, commits = indexer
    first, *rest = _headers(sample_data, tmp_path, 4, "kept")
    assert idx.record(first[0], "kept/first.dcm", 1, first[1], "T") == "new"
    (other, other_sha), *_ = _headers(sample_data, tmp_path, 1, "other")
    copy = dataclasses.replace(
        other, sop_instance_uid=first[0].sop_instance_uid, plane=first[0].plane
    )
    outcomes = _store_at_once(idx, [*rest, first, (copy, other_sha)])
    assert outcomes[:4] == ["new", "new", "new", "duplicate"]
    assert isinstance(outcomes[4], UidConflict)
    assert outcomes[4].other_series_uid == first[0].series_uid
    with db.make_session_factory(idx.engine)() as s:
        rows = s.execute(
            select(db.Instance.sop_instance_uid, db.Series.series_uid).join(db.Series)
        ).all()
        series_uids = set(s.scalars(select(db.Series.series_uid)))
    assert {uid for uid, _ in rows} == {h.sop_instance_uid for h, _ in [first, *rest]}
    assert {series for _, series in rows} == {first[0].series_uid}
    assert series_uids == {first[0].series_uid}  # the refused copy's series was not created
    # first row alone, then the retried rows one by one (the conflict's rolled back)
    assert len(commits) == 1 + 4


@both_databases
def test_a_row_still_queued_when_its_time_runs_out_gets_a_prompt_failure(
    indexer, sample_data, tmp_path
):
    """A store whose row could not even start its transaction within the time budget fails
    (the receiver answers 0xA700) and its row is never committed later."""
    idx, commits = indexer
    idx.time_budget_s = 0.3
    ((h, sha),) = _headers(sample_data, tmp_path, 1, "late")
    with idx._committer:
        with pytest.raises(Exception, match="index writes queued"):
            idx.record(h, "late.dcm", 1, sha, "T")
        assert idx._queued == []
    assert commits == []
