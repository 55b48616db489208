"""Logging set-up for ``dicom-node serve``: plain text, or one JSON object per line.

``logging.format: json`` writes each record as one JSON object: ``ts`` (UTC, ISO 8601),
``level``, ``logger``, ``message``, and as fields of their own the ``key=value`` pairs the node's
messages carry (``series_uid``, ``job_id``, ``stage``, ``duration_s``, ``state``, ...), so that a
log pipeline can filter on them without parsing text. The node logs UIDs, AE titles, addresses,
states and durations only, never a patient's name or ID (``dicom_node.receive`` and
``dicom_node.index`` read those tags for nothing; pydicom's value warnings are switched off by
``serve``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Fields lifted out of messages like "job finished job_id=3 state=sent ...", with their types.
_FIELDS: dict[str, type] = {
    "series_uid": str,
    "sop_instance_uid": str,
    "job_id": int,
    "stage": str,
    "duration_s": float,
    "ms": float,
    "state": str,
    "outcome": str,
    "calling_ae": str,
    "peer": str,
    "destination": str,
    "dest": str,
    "status": str,
    "factor": int,
    "by": str,
}
_PAIR = re.compile(r"(?:^|\s)([a-z_]+)=([^\s,]+)")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, raw in _PAIR.findall(message):
            kind = _FIELDS.get(key)
            if kind is None or key in out:
                continue
            try:
                out[key] = kind(raw)
            except ValueError:
                out[key] = raw
        if "ms" in out and "duration_s" not in out and isinstance(out["ms"], float):
            out["duration_s"] = round(out.pop("ms") / 1000, 6)  # type: ignore[operator]
        for key, value in vars(record).items():  # extra={...} given by the caller
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: int, fmt: str = "text") -> None:
    """Log to stderr at ``level``, as text or as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings (a library's DeprecationWarning, ...) become records too: with JSON,
    # every line of the log stays one object.
    logging.captureWarnings(True)
