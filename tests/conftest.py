"""Shared fixtures. Component-specific helpers live in tests/support/."""

from __future__ import annotations

import locale
import os

import pytest

from dicom_node.devtools.sample_data import SampleData, fetch_sample_data


@pytest.fixture(autouse=True)
def keep_the_process_locale():
    """Restore the C locale after each test. GDCM (under SimpleITK's DICOM writer) sets
    LC_CTYPE to "C" and leaves it so: every later ``subprocess.run(text=True)`` in this process
    would then decode UTF-8 output (rich's tables) as ASCII and fail."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture
def torch_one_thread():
    """Run torch single-threaded: tiny tensors gain nothing from a second thread, and on a shared
    2-core machine OpenMP barriers between many tiny ops can slow a test down more than 10x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sample_data() -> SampleData:
    """The real sample scans, fetched once and cached under var/sample-data."""
    return fetch_sample_data()


# -- databases ---------------------------------------------------------------------------------
# Tests that touch the database directly take ``database_url``: SQLite (the embedded default)
# unless the test (``@both_databases``) or its module (a ``db_kind`` fixture with both params)
# asks for PostgreSQL too, the shared engine of several nodes. PostgreSQL runs as one private
# cluster per test run (tests/support/postgres.py), a new database per test.


@pytest.fixture(scope="session")
def postgres_cluster():
    from tests.support.postgres import PostgresCluster, pg_bin_dir

    if pg_bin_dir() is None:
        message = "PostgreSQL is not installed (scripts/setup.sh installs Debian's postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def db_kind(request) -> str:
    """``sqlite`` unless parametrised (``tests.support.postgres.both_databases``)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def database_url(db_kind, request, tmp_path) -> str:
    """A new, empty database of kind ``db_kind`` (the schema is not created)."""
    if db_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return request.getfixturevalue("postgres_cluster").create_database()
