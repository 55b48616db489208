"""What the web modules share: the requester, refusals, JSON answers, request parsing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse

from dicom_node.operations import json_default
from dicom_node.web.auth import BrowserSession

__all__ = ["JSON", "Principal", "Refused", "query_int", "query_state", "read_form", "read_json"]

MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Principal:
    """An authenticated requester: the token's name, and the browser session if by cookie."""

    name: str
    session: BrowserSession | None = None


class Refused(Exception):
    """Answer ``status`` with ``message`` (JSON for the API, a page for the console)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class JSON(JSONResponse):
    """JSON with times as ISO 8601 (UTC, as stored)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=json_default, ensure_ascii=False).encode("utf-8")


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as a dict (first value of each key)."""
    body = await request.body()
    if len(body) > MAX_BODY:
        raise Refused(413, "request body too large")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


async def read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    if len(body) > MAX_BODY:
        raise Refused(413, "request body too large")
    try:
        data = json.loads(body)
    except ValueError:
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise Refused(400, "the body must be a JSON object")
    return data


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Refused(400, f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise Refused(400, f"{name} must be between {low} and {high}")
    return value


def query_state(request: Request, states: type[Enum]) -> str | None:
    raw = request.query_params.get("state") or None
    if raw is not None and raw not in {s.value for s in states}:
        raise Refused(400, f"unknown state {raw!r}; one of {', '.join(s.value for s in states)}")
    return raw
