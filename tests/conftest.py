"""Shared fixtures. Component-specific helpers live in tests/support/."""

from __future__ import annotations

import pytest

from dicom_node.sample_data import SampleData, fetch_sample_data


@pytest.fixture(scope="session")
def sample_data() -> SampleData:
    """The real sample scans, fetched once and cached under var/sample-data."""
    return fetch_sample_data()
