"""A C-STORE SCP that records every instance it receives, duplicates included.

Run as a subprocess (``python -m tests.support.recording_scp PORT OUT_FILE [DELAY_S]``): it
accepts CT storage from anyone, waits ``DELAY_S`` per instance (a slow PACS, so that a test can
kill the sender mid-series), appends the SOP Instance UID to ``OUT_FILE`` (one line each,
flushed) and answers 0x0000. Counting lines against unique UIDs gives the duplicate deliveries,
which Orthanc cannot show (it stores a re-sent instance over itself).
"""

from __future__ import annotations

import sys
import time

from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification


def main() -> None:
    port, out = int(sys.argv[1]), sys.argv[2]
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    log = open(out, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def on_store(event):
        time.sleep(delay)
        log.write(f"{event.request.AffectedSOPInstanceUID}\n")
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
