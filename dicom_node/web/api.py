"""The JSON API: ``/api/...``. Reads answer what the console shows; the two POSTs are the
CLI's ``reprocess`` and ``resend`` (:mod:`dicom_node.operations`).

Errors are ``{"error": "..."}`` with 400 (a bad parameter), 401 (authentication needed or a
wrong token), 403 (CSRF or cross-site), 404, 409 (the action is not possible now, with the
reason) or 503 (the model cannot be loaded).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from dicom_node import jobs, nodes
from dicom_node.db import Job, JobState, SeriesState
from dicom_node.operations import ActionResult
from dicom_node.spool import StoredPathError
from dicom_node.web import queries
from dicom_node.web.base import JSON, Refused, query_int, query_state, read_json

if TYPE_CHECKING:
    from dicom_node.web.app import WebApp

__all__ = ["routes"]


def routes(web: WebApp) -> list[Route]:
    def bind(fn):
        return partial(fn, web)

    return [
        Route("/api/overview", bind(overview)),
        Route("/api/series", bind(series_list)),
        Route("/api/series/{uid}", bind(series_one)),
        Route("/api/series/{uid}/reprocess", bind(reprocess), methods=["POST"]),
        Route("/api/jobs", bind(jobs_list)),
        Route("/api/jobs/{job_id:int}", bind(job_one)),
        Route("/api/jobs/{job_id:int}/preview.png", bind(preview)),
        Route("/api/jobs/{job_id:int}/resend", bind(resend), methods=["POST"]),
        Route("/api/destinations", bind(destinations)),
        Route("/api/nodes", bind(nodes_list)),
        Route("/api/audit", bind(audit_list)),
    ]


def overview(web: WebApp, request: Request) -> Response:
    web.reader(request)
    with web.view.sessions() as s:
        data = queries.overview(s, web.view.config, web.view.last_success)
    data["node"] = web.view.summary()
    data["readiness"] = web.view.readiness().as_dict()
    return JSON(data)


def _list(web: WebApp, request: Request, states, rows_of, key: str) -> Response:
    """A paged JSON list of series or jobs, filtered by state."""
    web.reader(request)
    state = query_state(request, states)
    limit = query_int(request, "limit", 50, 1, 1000)
    offset = query_int(request, "offset", 0, 0, 10**9)
    with web.view.sessions() as s:
        rows, total = rows_of(s, state=state, limit=limit, offset=offset)
    return JSON({"total": total, "limit": limit, "offset": offset, key: rows})


def series_list(web: WebApp, request: Request) -> Response:
    return _list(web, request, SeriesState, queries.series_rows, "series")


def series_one(web: WebApp, request: Request) -> Response:
    who = web.reader(request)
    uid = request.path_params["uid"]
    data = web.series_with_patient(request, who, uid)
    return JSON(data)


def jobs_list(web: WebApp, request: Request) -> Response:
    return _list(web, request, JobState, queries.job_rows, "jobs")


def job_one(web: WebApp, request: Request) -> Response:
    web.reader(request)
    job_id = request.path_params["job_id"]
    with web.view.sessions() as s:
        data = queries.job_detail(s, job_id, web.view.config.storage.spool_root)
    if data is None:
        raise Refused(404, f"no job {job_id}")
    return JSON(data)


def preview(web: WebApp, request: Request) -> Response:
    web.reader(request)
    job_id = request.path_params["job_id"]
    spool_root = web.view.config.storage.spool_root
    with web.view.sessions() as s:
        job = s.get(Job, job_id)
        try:
            stored = jobs.preview_file(job, spool_root) if job is not None else None
        except StoredPathError:
            stored = None
    if not stored:
        raise Refused(404, f"job {job_id} has no preview")
    path = stored.resolve()
    # Only files the node wrote under its spool, whatever the database says (an absolute path
    # from before paths were kept relative, or a link inside the spool, may point elsewhere).
    if not path.is_relative_to(spool_root) or not path.is_file():
        raise Refused(404, f"the preview of job {job_id} is gone (retention?)")
    return FileResponse(path, media_type="image/png")


def destinations(web: WebApp, request: Request) -> Response:
    web.reader(request)
    with web.view.sessions() as s:
        data = queries.destination_status(s, web.view.config, web.view.last_success)
    return JSON({"destinations": data})


def nodes_list(web: WebApp, request: Request) -> Response:
    """Every node sharing the database, with its state (dicom_node/nodes.py)."""
    web.reader(request)
    with web.view.sessions() as s:
        data = nodes.list_nodes(s)
    return JSON({"nodes": data})


def audit_list(web: WebApp, request: Request) -> Response:
    web.reader(request)
    limit = query_int(request, "limit", 50, 1, 1000)
    before = query_int(request, "before", 0, 0, 2**62) or None
    job_id = query_int(request, "job_id", 0, 0, 2**62) or None
    q = request.query_params
    with web.view.sessions() as s:
        rows = queries.audit_rows(
            s,
            limit=limit,
            before_id=before,
            series_uid=q.get("series_uid") or None,
            job_id=job_id,
            kind=q.get("kind") or None,
        )
    return JSON({"events": rows})


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise Refused(400, f"{name} must be true or false")
    return value


def _answer(result: ActionResult) -> Response:
    return JSON(
        {
            "action": result.action,
            "job_id": result.job_id,
            "state": result.job_state.value,
            "message": result.message,
        }
    )


async def reprocess(web: WebApp, request: Request) -> Response:
    body = await read_json(request)
    who = web.actor(request, None)
    force = _flag(body, "force")
    uid = request.path_params["uid"]
    result = await run_in_threadpool(web.reprocess, request, who, uid, force)
    return _answer(result)


async def resend(web: WebApp, request: Request) -> Response:
    body = await read_json(request)
    who = web.actor(request, None)
    everything = _flag(body, "all")
    result = await run_in_threadpool(
        web.resend, request, who, request.path_params["job_id"], everything
    )
    return _answer(result)
