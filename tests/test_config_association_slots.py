"""``node.association_request_timeout_s``: connections that never finish their A-ASSOCIATE-RQ
cannot hold the association slots for long (issue 10, weak point "association slots").

Each open connection takes one of ``node.max_associations`` slots from the moment it is
accepted. Measured with pynetdicom 3.0 before this setting: a connection that sends nothing held
its slot for ``acse_timeout_s``; one that sent part of a PDU header held it for ever (the read
blocks on a socket without a timeout). Now both are closed after
``association_request_timeout_s``, and a real sender (dcmtk echoscu) gets in.
"""

from __future__ import annotations

import socket
import time

from tests.support.node import NodeProcess, echo

REQUEST_TIMEOUT_S = 3.0
ACSE_TIMEOUT_S = 120.0  # far longer: passing within the bound shows the new setting acts
SLACK_S = 6.0  # echoscu start-up and polling on a loaded 2-core machine


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the node closes (or resets) the connection within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_and_half_open_connections_free_their_slots(tmp_path):
    overrides = {
        "node": {
            "max_associations": 2,
            "acse_timeout_s": ACSE_TIMEOUT_S,
            "association_request_timeout_s": REQUEST_TIMEOUT_S,
        },
        "completion": {"quiet_seconds": 100000},
    }
    with NodeProcess(tmp_path / "node", overrides=overrides) as node:
        silent = socket.create_connection(("127.0.0.1", node.port))
        half_open = socket.create_connection(("127.0.0.1", node.port))
        half_open.sendall(b"\x01\x00\x00")  # the first 3 bytes of an A-ASSOCIATE-RQ header
        t0 = time.monotonic()
        try:
            # Both slots are taken: a real sender is turned away now (the test can fail).
            blocked = echo(node.port, timeout=5)
            assert blocked.returncode != 0
            assert "Association Rejected" in blocked.stdout + blocked.stderr

            bound = REQUEST_TIMEOUT_S + SLACK_S
            while True:
                answer = echo(node.port, timeout=5)
                waited = time.monotonic() - t0
                if answer.returncode == 0:
                    break
                assert waited < bound, f"echoscu still refused after {waited:.1f} s"
                time.sleep(0.2)
            print(f"echoscu got in {waited:.2f} s after the slots were taken")
            assert waited < bound
            assert _closed_by_peer(silent, 1.0)
            assert _closed_by_peer(half_open, 1.0)
        finally:
            silent.close()
            half_open.close()
        assert node.running
