"""Liveness of the node's unattended loops, so that a stall is visible, never silent.

Every loop (completion, dispatch, send, clean-up, each worker) reports to one :class:`Health`:
``ok(name)`` after a pass that worked, ``failed(name, reason)`` after one that did not. The
snapshot says, per loop, when it last worked and since when it has been failing; a loop failing
for longer than ``stall_after_s``, or one that has not completed a pass for that long, makes the
node *unhealthy*. (A worker thread that ended is restarted by the dispatcher, which reports it
here as a failure.) The running node publishes the snapshot in its status file, where
``dicom-node status`` shows it and ``dicom-node health`` turns it into an exit code.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

__all__ = ["Health", "LoopState"]


@dataclass
class LoopState:
    interval_s: float
    last_ok: float | None = None  # wall-clock seconds
    failing_since: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failures: int = 0


class Health:
    """Thread-safe record of each loop's last success and current failure streak."""

    def __init__(self, stall_after_s: float = 60.0, clock=time.time):
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._loops: dict[str, LoopState] = {}
        self._lock = threading.Lock()
        self._started = clock()

    def register(self, name: str, interval_s: float) -> None:
        with self._lock:
            self._loops.setdefault(name, LoopState(interval_s))

    def ok(self, name: str) -> None:
        with self._lock:
            st = self._loops.setdefault(name, LoopState(0.0))
            st.last_ok, st.failing_since, st.failures = self._clock(), None, 0

    def failed(self, name: str, reason: str) -> None:
        now = self._clock()
        with self._lock:
            st = self._loops.setdefault(name, LoopState(0.0))
            st.failing_since = st.failing_since or now
            st.last_error, st.last_error_at = reason[:500], now
            st.failures += 1

    def snapshot(self) -> dict:
        """``{"healthy": bool, "problems": [...], "loops": {...}}`` (JSON-ready)."""
        now = self._clock()
        problems: list[str] = []
        loops: dict[str, dict] = {}
        with self._lock:
            for name, st in sorted(self._loops.items()):
                loops[name] = {
                    "last_ok": st.last_ok,
                    "failing_since": st.failing_since,
                    "failures": st.failures,
                    "last_error": st.last_error,
                    "last_error_at": st.last_error_at,
                }
                if st.failing_since is not None and now - st.failing_since > self.stall_after_s:
                    problems.append(
                        f"{name}: failing for {now - st.failing_since:.0f} s: {st.last_error}"
                    )
                elif st.interval_s > 0:
                    last = st.last_ok or self._started
                    silent = now - last
                    if silent > max(self.stall_after_s, 3 * st.interval_s):
                        problems.append(f"{name}: no pass completed for {silent:.0f} s")
        return {"healthy": not problems, "problems": problems, "loops": loops}
