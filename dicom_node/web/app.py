"""The Starlette application: who is asking, what they may do, and the routes.

Routes (details in docs/OPERATIONS.md, "Monitoring and the web console"):

* always open: ``GET /healthz``, ``GET /readyz``, ``/login``, ``/static/...``;
* reading (open when ``http.anonymous_read``, else authenticated): ``GET /metrics``, the JSON
  API's GETs (:mod:`dicom_node.web.api`) and the console's pages
  (:mod:`dicom_node.web.console`);
* acting (always authenticated): ``POST /api/series/{uid}/reprocess``,
  ``POST /api/jobs/{id}/resend`` and the console's forms for the same;
* storing (a bearer token): ``POST /dicomweb/studies[/{study}]``, STOW-RS
  (:mod:`dicom_node.web.stow`).

A request is authenticated by an ``Authorization: Bearer TOKEN`` header or by a browser session
cookie (:mod:`dicom_node.web.auth`). A form POST from a session must carry the session's CSRF
token and, when the browser says where it comes from (``Origin``/``Referer``), come from this
site. Every action, log-in and view of patient data is audited with who, from where and when.
Patient names and IDs are shown to authenticated requests only.

Handlers that touch the database are plain functions: Starlette runs them in its thread pool, so
the event loop never waits on SQLite.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest as prometheus_text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicom_node import operations
from dicom_node.db import audit
from dicom_node.infer import ModelUnavailable
from dicom_node.operations import ActionResult
from dicom_node.web import api, console, metrics, queries, stow
from dicom_node.web.auth import Authenticator
from dicom_node.web.base import JSON, MAX_BODY, Principal, Refused
from dicom_node.web.context import NodeView

__all__ = ["WebApp", "create_app"]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "dicom_node_session"


class SecurityHeaders:
    """Headers on every answer: no framing (the buttons cannot be clickjacked), no inline script
    or style, no caching of pages that may hold patient data, no MIME sniffing."""

    HEADERS = [
        (
            b"content-security-policy",
            b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
            b"frame-ancestors 'none'; base-uri 'none'",
        ),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
    ]

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + self.HEADERS
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


class BodyLimit:
    """Request bodies are small (forms, JSON), except STOW-RS uploads under ``/dicomweb/``,
    whose handler enforces ``http.stow_max_bytes`` itself (by Content-Length at once, and while
    it reads the stream) so that it can say so in a STOW-RS answer."""

    def __init__(self, app: ASGIApp, default: int):
        self.app = app
        self.small = RequestBodyLimitMiddleware(app, max_body_size=default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upload = scope["type"] == "http" and scope.get("path", "").startswith("/dicomweb/")
        await (self.app if upload else self.small)(scope, receive, send)


@contextlib.contextmanager
def _as_refusals():
    """An operation's "no such thing" as 404, its "not possible now" as 409, with the reason."""
    try:
        yield
    except operations.NotFound as exc:
        raise Refused(404, str(exc)) from None
    except operations.NotPossible as exc:
        raise Refused(409, str(exc)) from None


class WebApp:
    """The application's state: the node view, authentication, templates and metrics."""

    def __init__(self, view: NodeView):
        self.view = view
        self.http = view.config.http
        self.auth = Authenticator(self.http.auth_token_file, self.http.session_hours)
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        console.register_filters(self.templates)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(metrics.NodeCollector(view))
        ProcessCollector(registry=self.registry)

    # -- who is asking -------------------------------------------------------------------------
    def identify(self, request: Request) -> Principal | None:
        """The authenticated requester, None for an anonymous one. A bearer token that is
        wrong is refused outright (a misconfigured client should hear so)."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            name = self.auth.check_token(token.strip()) if scheme.lower() == "bearer" else None
            if name is None:
                raise Refused(401, "the bearer token is not valid")
            return Principal(name)
        sess = self.auth.session(request.cookies.get(SESSION_COOKIE))
        return Principal(sess.name, sess) if sess is not None else None

    def reader(self, request: Request) -> Principal | None:
        """The requester of a read; refused without authentication unless reads are open."""
        who = self.identify(request)
        if who is None and not self.http.anonymous_read:
            raise Refused(401, "authentication required")
        return who

    def actor(self, request: Request, form: dict[str, str] | None) -> Principal:
        """The authenticated requester of an action, with the CSRF checks for a session."""
        who = self.identify(request)
        if who is None:
            if not self.auth.enabled:
                raise Refused(
                    401, "actions need authentication, and http.auth_token_file is not set"
                )
            raise Refused(401, "authentication required: log in first")
        if who.session is not None:
            if not self.same_origin(request):
                raise Refused(403, "refused: the request came from another site")
            presented = (form or {}).get("csrf") or request.headers.get("x-csrf-token")
            if not self.auth.csrf_ok(who.session, presented):
                raise Refused(403, "refused: missing or wrong CSRF token (reload the page)")
        return who

    @staticmethod
    def same_origin(request: Request) -> bool:
        source = request.headers.get("origin") or request.headers.get("referer")
        if not source or source == "null":
            return source is None  # "null" comes from sandboxed or privacy-stripped contexts
        parts = urlsplit(source)
        return parts.netloc == request.headers.get("host", "")

    @staticmethod
    def peer(request: Request) -> str | None:
        return request.client.host if request.client else None

    def audit(self, kind: str, request: Request, who: str | None, **fields: Any) -> None:
        """One audit event for something a person did over HTTP (its own transaction)."""
        detail = {"by": who, "via": "http", **fields.pop("detail", {})}
        with self.view.sessions() as s:
            audit(s, kind, peer=self.peer(request), detail=detail, **fields)
            s.commit()

    # -- shared by the API and the console ---------------------------------------------------
    def series_with_patient(self, request: Request, who: Principal | None, uid: str) -> dict:
        """The series' detail; with its patient's name and ID for an authenticated requester
        (audited as a view of patient data)."""
        with self.view.sessions() as s:
            data = queries.series_detail(s, uid)
            if data is None:
                raise Refused(404, f"no series {uid}")
            if who is not None:
                data["patient"] = queries.patient_of(s, uid, self.view.config.storage.spool_root)
        if data.get("patient"):
            self.audit("patient_data_viewed", request, who.name if who else None, series_uid=uid)
        return data

    def reprocess(self, request: Request, who: Principal, uid: str, force: bool) -> ActionResult:
        models = self.view.models
        if models is None:
            raise Refused(503, "this process runs no jobs")
        try:
            with _as_refusals(), self.view.sessions() as s:
                result = operations.reprocess(
                    s, self.view.config, uid, models, force=force, by=who.name, via="http",
                    peer=self.peer(request),
                )  # fmt: skip
        except ModelUnavailable as exc:
            raise Refused(503, f"the model cannot be loaded: {exc}") from None
        log.info("reprocess by=%s series_uid=%s job_id=%s", who.name, uid, result.job_id)
        return result

    def resend(
        self, request: Request, who: Principal, job_id: int, everything: bool
    ) -> ActionResult:
        with _as_refusals(), self.view.sessions() as s:
            result = operations.resend(
                s, self.view.config, job_id, all_instances=everything, by=who.name, via="http",
                peer=self.peer(request),
            )  # fmt: skip
        log.info("resend by=%s job_id=%s all=%s", who.name, job_id, everything)
        return result

    # -- answers ---------------------------------------------------------------------------------
    def page(
        self,
        request: Request,
        name: str,
        who: Principal | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        flash = None
        if who is not None and who.session is not None and who.session.flash:
            flash, who.session.flash = who.session.flash, None
        html = self.templates.get_template(name).render(
            request=request,
            who=who,
            csrf=who.session.csrf if who and who.session else "",
            auth_enabled=self.auth.enabled,
            view=self.view,
            flash=flash,
            now=datetime.now(UTC).replace(tzinfo=None),
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def refused(self, request: Request, exc: Refused) -> Response:
        path = request.url.path
        if request.method == "POST" and exc.status in (401, 403):
            # Someone tried to act without the right to: worth knowing who and from where.
            self.audit(
                "http_action_refused",
                request,
                None,
                detail={"path": path[:200], "why": exc.message},
            )
        headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
        if path.startswith(("/api/", "/dicomweb/")) or path == "/metrics":
            return JSON({"error": exc.message}, status_code=exc.status, headers=headers)
        who = None
        with contextlib.suppress(Refused):  # a wrong token: show the page as to anyone
            who = self.identify(request)
        # After logging in, go back to the page the refused form was on, not to its POST URL.
        back = path.rsplit("/", 1)[0] if request.method == "POST" else path
        return self.page(
            request, "message.html", who, status=exc.status, message=exc.message,
            login=exc.status == 401 and self.auth.enabled, back=back or "/",
        )  # fmt: skip


def create_app(view: NodeView) -> Starlette:
    web = WebApp(view)

    def healthz(request: Request) -> Response:
        return JSON({"status": "alive", "pid": os.getpid(), "version": view.version})

    def readyz(request: Request) -> Response:
        ready = view.readiness()
        return JSON(ready.as_dict(), status_code=200 if ready.ok else 503)

    def metrics_text(request: Request) -> Response:
        web.reader(request)
        own = metrics.instruments(view.receiver_metrics_dir)
        body = prometheus_text(own) + prometheus_text(web.registry)  # type: ignore[arg-type]
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def css(request: Request) -> Response:
        return FileResponse(HERE / "static" / "console.css", media_type="text/css")

    async def on_refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return web.refused(request, exc)

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_text),
        Route("/static/console.css", css),
        *api.routes(web),
        *console.routes(web),
        *stow.routes(web),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(BodyLimit, default=MAX_BODY),
        ],
        exception_handlers={Refused: on_refused},
    )
    app.state.web = web
    return app
