"""DICOM TLS with the handshake moved out of pynetdicom's hands (receiver and sender alike).

pynetdicom does the TLS handshake inside ``wrap_socket``: on the server in its single accept loop
(one caller that connects and says nothing holds up every other caller), on the client inside its
connect, where a failure is only logged (an untrusted certificate would look like "cannot
connect"). :class:`DeferredHandshake` makes its sockets skip that handshake; the association's own
thread then calls :func:`handshake` from its EVT_CONN_OPEN handler, with a timeout, and keeps the
error.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

__all__ = ["DeferredHandshake", "handshake"]


class DeferredHandshake:
    """An :class:`ssl.SSLContext` as pynetdicom uses it (``wrap_socket`` only), whose sockets
    do not handshake when wrapped. Pass it where pynetdicom takes a context."""

    def __init__(self, context: ssl.SSLContext):
        self.context = context

    def wrap_socket(self, sock: socket.socket, **kwargs) -> ssl.SSLSocket:
        return self.context.wrap_socket(sock, **{**kwargs, "do_handshake_on_connect": False})


def handshake(sock: ssl.SSLSocket, timeout: float | None) -> Exception | None:
    """Do the handshake a :class:`DeferredHandshake` left, waiting at most ``timeout`` seconds.

    Returns None when it succeeded (the socket keeps its previous timeout), else the error; the
    socket is then shut and closed, so that nothing goes over it, and never as plain text.
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.do_handshake()
    except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        return exc
    sock.settimeout(previous)
    return None
