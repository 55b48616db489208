"""db.DriverStatement: the index's per-instance statements run on the driver's own cursor.

What it must keep from SQLAlchemy's own execution: the stored values (each through its column
type's bind processor: JSON, dates, enums), the transaction (a row written by it is committed by
``conn.commit()`` and rolled back by ``conn.rollback()``), SQLAlchemy's exception classes, and
the invalidation of a connection whose server went away. Each is compared with SQLAlchemy's
execution of the same statement, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from dicom_node import db
from dicom_node.db import DriverStatement, Instance, Series, SeriesState, Study
from dicom_node.index import _TOUCH_SERIES
from tests.support.postgres import both_databases


@pytest.fixture
def engine(database_url):
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    yield engine
    engine.dispose()


def _series(conn, uid: str, state: SeriesState, revision: int = 3) -> int:
    study = conn.execute(
        insert(Study).values(study_uid=f"{uid}.0", first_received=datetime(2026, 1, 1))
    )
    return conn.execute(
        insert(Series).values(
            series_uid=uid,
            study_id=study.inserted_primary_key[0],
            state=state,
            revision=revision,
            first_received=datetime(2026, 1, 1),
            last_received=datetime(2026, 1, 1),
            hold_until=datetime(2026, 1, 2),
        )
    ).inserted_primary_key[0]


def _instance_values(series_id: int, uid: str, variant: int) -> dict:
    full = variant == 0
    return {
        "series_id": series_id,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "sop_instance_uid": uid,
        "instance_number": 7 if full else None,
        "acquisition_number": None,
        "image_position": [-249.51171875, -437.5, -772.5] if full else None,
        "image_orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0] if full else None,
        "pixel_spacing": [0.48828125, 0.48828125] if full else None,
        "slice_thickness": 5.0 if full else None,
        "rows": 512,
        "columns": 512,
        "frame_of_reference_uid": "1.2.3.4" if full else None,
        "image_type": ["ORIGINAL", "PRIMARY", "AXIAL", "Ä\\b"] if full else None,
        "number_of_frames": None,
        "images_in_acquisition": 40 if full else None,
        "transfer_syntax_uid": "1.2.840.10008.1.2.4.90",
        "file_path": "1.2/3.4/5.6.dcm",
        "file_size": 2**33 + 5,
        "sha256": "ab" * 32,
        "calling_ae": "SCANNER" if full else None,
        "received_at": datetime(2026, 12, 2, 15, 41, 10, 943772),
    }


def _stored(conn, table: str, key: str, value) -> dict:
    """A row as the database holds it (the text the driver stored, not SQLAlchemy's types)."""
    row = conn.execute(text(f"SELECT * FROM {table} WHERE {key} = :v"), {"v": value}).mappings()
    return dict(row.one())


@both_databases
def test_rows_are_stored_as_sqlalchemy_stores_them(engine):
    insert_row = insert(Instance)
    driver = DriverStatement(engine, insert_row)
    with engine.connect() as conn:
        series_id = _series(conn, "1.9", SeriesState.receiving)
        conn.commit()
        for variant in (0, 1):
            conn.execute(insert_row, _instance_values(series_id, f"1.9.{variant}.sa", variant))
            count, row = driver.execute(
                conn, _instance_values(series_id, f"1.9.{variant}.dr", variant)
            )
            assert count == 1  # (PostgreSQL's compiled INSERT returns the new id)
        conn.commit()
    with engine.connect() as conn:
        for variant in (0, 1):
            by_sqlalchemy = _stored(conn, "instances", "sop_instance_uid", f"1.9.{variant}.sa")
            by_driver = _stored(conn, "instances", "sop_instance_uid", f"1.9.{variant}.dr")
            for stored in (by_sqlalchemy, by_driver):
                del stored["id"], stored["sop_instance_uid"]
            assert by_driver == by_sqlalchemy
        # JSON None is stored as SQLAlchemy's JSON type stores it, and reads back the same.
        rows = conn.execute(
            select(Instance.sop_instance_uid, Instance.image_type, Instance.received_at)
        ).all()
        assert {r.image_type is None for r in rows if ".1." in r.sop_instance_uid} == {True}
        assert {r.received_at for r in rows} == {datetime(2026, 12, 2, 15, 41, 10, 943772)}


@both_databases
@pytest.mark.parametrize(
    "state", [SeriesState.receiving, SeriesState.changed, SeriesState.complete]
)
def test_series_update_as_sqlalchemy_runs_it(engine, state):
    driver = DriverStatement(engine, _TOUCH_SERIES)
    now = datetime(2026, 12, 2, 16, 0, 0, 123456)
    with engine.connect() as conn:
        by_sqlalchemy, by_driver = _series(conn, "2.1", state), _series(conn, "2.2", state)
        assert conn.execute(_TOUCH_SERIES, {"series_id": by_sqlalchemy, "now": now}).rowcount == 1
        assert driver.execute(conn, {"series_id": by_driver, "now": now}) == (1, None)
        assert driver.execute(conn, {"series_id": 10**9, "now": now})[0] == 0  # no such row
        conn.commit()
        a = _stored(conn, "series", "series_uid", "2.1")
        b = _stored(conn, "series", "series_uid", "2.2")
    for stored in (a, b):
        del stored["id"], stored["series_uid"], stored["study_id"]
    assert b == a
    assert a["revision"] == 4 and a["hold_until"] is None
    expected = state if state != SeriesState.complete else SeriesState.changed
    assert a["state"] == expected.value


@both_databases
def test_commit_and_rollback_take_its_rows(engine):
    driver = DriverStatement(engine, insert(Instance))
    with engine.connect() as conn:
        series_id = _series(conn, "3.1", SeriesState.receiving)
        conn.commit()
    # First statement of a connection: the transaction must be SQLAlchemy's, or commit() would
    # do nothing and the pool's reset would roll the row back.
    with engine.connect() as conn:
        driver.execute(conn, _instance_values(series_id, "3.1.kept", 0))
        conn.commit()
    with engine.connect() as conn:
        driver.execute(conn, _instance_values(series_id, "3.1.dropped", 0))
        conn.rollback()
    with engine.connect() as conn:
        uids = conn.execute(select(Instance.sop_instance_uid)).scalars().all()
    assert uids == ["3.1.kept"]


@both_databases
def test_driver_errors_are_sqlalchemy_errors(engine):
    driver = DriverStatement(engine, insert(Instance))
    with engine.connect() as conn:
        series_id = _series(conn, "4.1", SeriesState.receiving)
        driver.execute(conn, _instance_values(series_id, "4.1.1", 0))
        with pytest.raises(IntegrityError) as raised:
            driver.execute(conn, _instance_values(series_id, "4.1.1", 1))
        assert raised.value.statement.startswith("INSERT INTO instances")
        conn.rollback()
    with engine.connect() as conn:
        assert conn.execute(select(Instance.id)).all() == []  # the rollback took the first row


@both_databases
def test_statement_with_a_list_parameter_is_refused(engine):
    listed = select(Series.id).where(Series.state.in_(["receiving", "changed"]))
    with engine.connect() as conn, pytest.raises(ValueError, match="expanded"):
        DriverStatement(engine, listed).execute(conn, {})


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_lost_server_connection_is_invalidated(engine):
    driver = DriverStatement(engine, _TOUCH_SERIES)
    with engine.connect() as conn:
        series_id = _series(conn, "5.1", SeriesState.receiving)
        conn.commit()
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        conn.commit()
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(OperationalError) as raised:
            driver.execute(conn, {"series_id": series_id, "now": datetime(2026, 1, 1)})
        assert raised.value.connection_invalidated
        assert conn.invalidated
    with engine.connect() as conn:  # the pool hands out a working connection again
        assert driver.execute(conn, {"series_id": series_id, "now": datetime(2026, 1, 1)})[0] == 1
        conn.commit()
