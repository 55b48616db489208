"""JSON files that other processes read while they are rewritten (the status file, a receiving
process's open associations): written whole to a temp file beside the target, then renamed over
it, so that a reader sees the old content or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def replace_json(path: Path, body: object) -> None:
    """Write ``body`` as JSON to ``path``, replacing it atomically; raises OSError (the temp
    file is removed). The temp name carries the process id: two processes never share one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(body))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
