"""The web console: server-rendered pages (Jinja2 templates in ``templates/``), no JavaScript.

Pages: the overview (``/``), series (``/series``, ``/series/{uid}``), jobs (``/jobs``,
``/jobs/{id}``) and the audit trail (``/audit``); ``/login`` and ``/logout``. A failed job and
its reason are on the overview itself; one click opens the job.

The Reprocess and Resend buttons are forms that POST to ``/series/{uid}/reprocess`` and
``/jobs/{id}/resend``: they need a logged-in session and carry its CSRF token, then redirect
to the job (POST, redirect, GET), where a one-time notice says what happened.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from jinja2 import Environment
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from dicom_node.db import JobState, SeriesState
from dicom_node.web import queries
from dicom_node.web.base import Principal, Refused, query_int, query_state, read_form

if TYPE_CHECKING:
    from dicom_node.web.app import WebApp

__all__ = ["register_filters", "routes"]

PAGE = 50


def routes(web: WebApp) -> list[Route]:
    def bind(fn):
        return partial(fn, web)

    return [
        Route("/", bind(overview)),
        Route("/series", bind(series_list)),
        Route("/series/{uid}", bind(series_page)),
        Route("/series/{uid}/reprocess", bind(reprocess), methods=["POST"]),
        Route("/jobs", bind(jobs_list)),
        Route("/jobs/{job_id:int}", bind(job_page)),
        Route("/jobs/{job_id:int}/resend", bind(resend), methods=["POST"]),
        Route("/audit", bind(audit_page)),
        Route("/login", bind(login_form)),
        Route("/login", bind(login), methods=["POST"]),
        Route("/logout", bind(logout), methods=["POST"]),
    ]


# -- pages -----------------------------------------------------------------------------------------


def overview(web: WebApp, request: Request) -> Response:
    who = web.reader(request)
    with web.view.sessions() as s:
        data = queries.overview(s, web.view.config, web.view.last_success)
    return web.page(
        request,
        "overview.html",
        who,
        data=data,
        node=web.view.summary(),
        ready=web.view.readiness().as_dict(),
        refresh=web.http.console_refresh_s,
        series_states=[s.value for s in SeriesState],
        job_states=[s.value for s in JobState],
    )


def _list_page(web: WebApp, request: Request, states, rows_of, template: str) -> Response:
    """A paged list of series or jobs, filtered by state."""
    who = web.reader(request)
    state = query_state(request, states)
    offset = query_int(request, "offset", 0, 0, 10**9)
    with web.view.sessions() as s:
        rows, total = rows_of(s, state=state, limit=PAGE, offset=offset)
    return web.page(
        request,
        template,
        who,
        rows=rows,
        total=total,
        state=state,
        offset=offset,
        page=PAGE,
        states=[s.value for s in states],
    )


def series_list(web: WebApp, request: Request) -> Response:
    return _list_page(web, request, SeriesState, queries.series_rows, "series_list.html")


def series_page(web: WebApp, request: Request) -> Response:
    who = web.reader(request)
    data = web.series_with_patient(request, who, request.path_params["uid"])
    return web.page(request, "series_detail.html", who, series=data)


def jobs_list(web: WebApp, request: Request) -> Response:
    return _list_page(web, request, JobState, queries.job_rows, "jobs_list.html")


def job_page(web: WebApp, request: Request) -> Response:
    who = web.reader(request)
    job_id = request.path_params["job_id"]
    with web.view.sessions() as s:
        job = queries.job_detail(s, job_id, web.view.config.storage.spool_root)
    if job is None:
        raise Refused(404, f"no job {job_id}")
    patient = None
    if who is not None:
        patient = web.series_with_patient(request, who, job["source_series_uid"]).get("patient")
    return web.page(request, "job_detail.html", who, job=job, patient=patient)


def audit_page(web: WebApp, request: Request) -> Response:
    who = web.reader(request)
    before = query_int(request, "before", 0, 0, 2**62) or None
    with web.view.sessions() as s:
        rows = queries.audit_rows(s, limit=100, before_id=before)
    return web.page(request, "audit.html", who, rows=rows)


# -- actions -----------------------------------------------------------------------------------


def _notice(who: Principal, text: str) -> None:
    if who.session is not None:
        who.session.flash = text


async def reprocess(web: WebApp, request: Request) -> Response:
    form = await read_form(request)
    who = web.actor(request, form)
    uid = request.path_params["uid"]
    # The console's button means "run it again", also for a series already sent.
    result = await run_in_threadpool(web.reprocess, request, who, uid, True)
    _notice(who, result.message)
    return RedirectResponse(f"/jobs/{result.job_id}", status_code=303)


async def resend(web: WebApp, request: Request) -> Response:
    form = await read_form(request)
    who = web.actor(request, form)
    job_id = request.path_params["job_id"]
    everything = form.get("all") == "1"
    result = await run_in_threadpool(web.resend, request, who, job_id, everything)
    _notice(who, result.message + (" (every instance)" if everything else ""))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


# -- logging in and out ------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a path on this site (no scheme, no host, no ``//``): never an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def login_form(web: WebApp, request: Request) -> Response:
    who = web.identify(request)
    return web.page(
        request, "login.html", who, next=_safe_next(request.query_params.get("next")), error=None
    )


async def login(web: WebApp, request: Request) -> Response:
    form = await read_form(request)
    target = _safe_next(form.get("next"))
    if not web.same_origin(request):
        raise Refused(403, "refused: the request came from another site")
    sess = web.auth.login(form.get("token", "").strip())
    if sess is None:
        await run_in_threadpool(web.audit, "http_login_failed", request, None)
        error = (
            "that token is not valid"
            if web.auth.enabled
            else "logging in needs http.auth_token_file in the node's configuration"
        )
        return web.page(request, "login.html", None, status=401, next=target, error=error)
    await run_in_threadpool(web.audit, "http_login", request, sess.name)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        "dicom_node_session",
        sess.sid,
        max_age=int(web.auth.session_s),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def logout(web: WebApp, request: Request) -> Response:
    form = await read_form(request)
    who = web.actor(request, form)
    if who.session is not None:
        web.auth.logout(who.session.sid)
    await run_in_threadpool(web.audit, "http_logout", request, who.name)
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie("dicom_node_session")
    return response


# -- template filters --------------------------------------------------------------------------


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def fmt_time(value: datetime | None) -> str:
    if value is None:
        return "–"
    return _naive_utc(value).strftime("%Y-%m-%d %H:%M:%S")


def fmt_ago(value: datetime | None) -> str:
    """'42 s ago', '5 min ago', '3.2 h ago', '2.0 d ago'."""
    if value is None:
        return "never"
    seconds = (datetime.now(UTC).replace(tzinfo=None) - _naive_utc(value)).total_seconds()
    if seconds < 0:
        return "in " + fmt_duration(-seconds)
    return fmt_duration(seconds) + " ago"


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def fmt_bytes(value: int | float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def short_uid(uid: str | None, keep: int = 18) -> str:
    if not uid:
        return "–"
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


def register_filters(env: Environment) -> None:
    env.filters.update(
        time=fmt_time,
        ago=fmt_ago,
        duration=fmt_duration,
        bytes=fmt_bytes,
        short=short_uid,
    )
