"""A PACS stand-in that records every instance it receives, duplicates included.

Run as a subprocess (``python -m tests.support.recording_scp PORT OUT_FILE [DELAY_S [find]]``): it
accepts CT storage from anyone, waits ``DELAY_S`` per instance (a slow PACS, so that a test can
kill the sender mid-series), appends ``SERIES_UID SOP_UID`` to ``OUT_FILE`` (one line each,
flushed) and answers 0x0000. Counting lines against unique UIDs gives the duplicate deliveries,
which Orthanc cannot show (it stores a re-sent instance over itself). With ``find`` it also
answers C-FIND at IMAGE level (Study Root) from what it has stored, as most PACS do.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)


def read_record(path) -> list[tuple[str, str]]:
    """(series UID, SOP Instance UID) per delivery, in arrival order."""
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((parts[0], parts[1]))
    return out


def main() -> None:
    port, out = int(sys.argv[1]), sys.argv[2]
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    with_find = len(sys.argv) > 4 and sys.argv[4] == "find"
    stored: dict[str, set[str]] = {}
    # What an earlier run stored is still stored (a PACS restarted after an outage keeps it).
    for series, sop in read_record(out) if Path(out).exists() else []:
        stored.setdefault(series, set()).add(sop)
    log = open(out, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    lock = threading.Lock()

    def on_store(event):
        time.sleep(delay)
        ds = event.dataset
        series, sop = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        with lock:
            stored.setdefault(series, set()).add(sop)
            log.write(f"{series} {sop}\n")
        return 0x0000

    def on_find(event):
        query = event.identifier
        series = str(query.get("SeriesInstanceUID", "") or "")
        with lock:
            sops = sorted(stored.get(series, ()))
        for sop in sops:
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.SeriesInstanceUID = series
            match.SOPInstanceUID = sop
            yield 0xFF00, match
        yield 0x0000, None

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(Verification)
    if with_find:
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_C_FIND, on_find)]
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)


if __name__ == "__main__":
    main()
