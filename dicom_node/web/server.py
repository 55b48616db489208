"""uvicorn in a thread of ``dicom-node serve``.

:meth:`HttpServer.bind` opens the listening socket in the calling thread, before the receiver
starts, so that a port in use stops the start with an error naming ``http.port`` (uvicorn would
only log it in its thread). :meth:`start` then serves on that socket; :meth:`stop` lets
requests in progress finish for a moment and closes it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from dicom_node.web.app import create_app
from dicom_node.web.context import NodeView

__all__ = ["HttpServer"]

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, view: NodeView):
        self.view = view
        self.app = create_app(view)
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock else self.view.config.http.port

    def bind(self) -> None:
        """Open the listening socket; raises :class:`OSError` (address in use, ...)."""
        cfg = self.view.config.http
        family = socket.AF_INET6 if ":" in cfg.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((cfg.bind_address, cfg.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def start(self, timeout_s: float = 10.0) -> None:
        if self._sock is None:
            self.bind()
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the node's logging, not uvicorn's own set-up
            access_log=False,  # paths hold series UIDs; actions are in the audit trail
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=3,
            http="h11",
            ws="none",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                log.warning("HTTP server not started after %.0f s", timeout_s)
                break
            time.sleep(0.02)
        cfg = self.view.config.http
        log.info(
            "http listening address=%s port=%d auth=%s",
            cfg.bind_address,
            self.port,
            "token" if cfg.auth_token_file else "none (read-only)",
        )

    def _serve(self) -> None:
        assert self._server is not None and self._sock is not None
        try:
            self._server.run(sockets=[self._sock])
        except BaseException:  # never silently: the readiness check still answers from here
            log.exception("HTTP server stopped with an error")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.view.close()
