"""Waiting for a condition in tests that drive real processes."""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    """Call ``predicate`` until it returns something truthy and return that; fail the test with
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
