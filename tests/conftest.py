"""Shared fixtures. Component-specific helpers live in tests/support/."""

from __future__ import annotations

import pytest

from dicom_node.devtools.sample_data import SampleData, fetch_sample_data


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
