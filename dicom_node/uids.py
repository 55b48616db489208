"""DICOM UID validation and the node's own identifiers.

A UID from the network becomes a file name in the spool, so it is validated before any path is
built from it: at most 64 characters, dot-separated components of digits without leading zeros.
That alphabet alone guarantees a UID can never contain a path separator or ``..``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from pydicom.uid import generate_uid

# UUID-derived root (2.25.<uuid as integer>) fixed for this product; all UIDs we mint start here.
UID_ROOT = "2.25.21765842036420364914163981937045131."
IMPLEMENTATION_CLASS_UID = UID_ROOT + "1"
IMPLEMENTATION_VERSION_NAME = "ACVTT_NODE_01"

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def deterministic_uid(*parts: str) -> str:
    """A UID under our root that depends only on ``parts`` (same parts, same UID)."""
    return generate_uid(prefix=UID_ROOT, entropy_srcs=list(parts))


def instances_hash(sop_instance_uids: Iterable[str]) -> str:
    """sha256 (hex) of the sorted, unique SOP Instance UIDs joined by newlines: the identity of
    an instance set (a job's key, and part of the UIDs derived from it)."""
    return hashlib.sha256("\n".join(sorted(set(sop_instance_uids))).encode("ascii")).hexdigest()
