"""Who may act: bearer tokens read from a file, browser sessions, CSRF tokens.

**Token file** (``http.auth_token_file``): one token per line, ``NAME:TOKEN`` or a bare
``TOKEN`` (named ``admin``); blank lines and ``#`` comments are ignored. A token has at least
:data:`MIN_TOKEN_CHARS` characters (``python -c 'import secrets; print(secrets.token_urlsafe(32))'``
makes a good one). The name is what the audit trail records as *who*. The file is read again
when it changes, so a token can be added or revoked without a restart; a file that cannot be
read any more lets nobody in (fail closed).

**Comparison** is in constant time: the SHA-256 of the presented token is compared with
:func:`hmac.compare_digest` against the digest of *every* known token (no early exit), so the
time taken says nothing about how much of a token matched, nor which name it belongs to.

**Browser sessions**: ``POST /login`` with a valid token gives a random session id in an
``HttpOnly; SameSite=Strict`` cookie, kept in memory only (a restart logs everyone out) and
ended when it expires or when the token that opened it leaves the file. Each session has its own
random CSRF token that every form POST must carry; requests with an ``Authorization: Bearer``
header need none (a browser never adds that header to a cross-site request by itself).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MIN_TOKEN_CHARS",
    "Authenticator",
    "BrowserSession",
    "TokenFileError",
    "read_token_file",
]

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 20
DEFAULT_NAME = "admin"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class TokenFileError(ValueError):
    """The token file cannot be used; the message says why (never quoting a token)."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def read_token_file(path: Path) -> dict[str, bytes]:
    """``{name: sha256(token)}`` from the token file; :class:`TokenFileError` when it cannot be
    read or holds no usable token."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(
            f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    tokens: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = DEFAULT_NAME, line
        name, token = name.strip(), token.strip()
        if not _NAME_RE.match(name):
            raise TokenFileError(f"{path}: line {number}: name must be 1-64 of A-Z a-z 0-9 _.@-")
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenFileError(
                f"{path}: line {number}: token is shorter than {MIN_TOKEN_CHARS} characters"
            )
        if name in tokens:
            raise TokenFileError(f"{path}: line {number}: name {name!r} appears twice")
        tokens[name] = _digest(token)
    if not tokens:
        raise TokenFileError(f"{path}: holds no token")
    return tokens


@dataclass
class BrowserSession:
    """A logged-in browser: who, until when, and the CSRF token its forms carry."""

    sid: str
    name: str
    token_digest: bytes
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    flash: str | None = None  # a one-time notice for the next page (after a form POST)


class Authenticator:
    """Checks bearer tokens and keeps browser sessions. Thread-safe. With ``path`` None nobody
    can authenticate (:attr:`enabled` is False)."""

    def __init__(self, path: Path | None, session_hours: float = 8.0, clock=time.time):
        self.path = Path(path) if path is not None else None
        self.session_s = session_hours * 3600.0
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, bytes] = {}
        self._mtime: tuple[int, int] | None = None
        self._sessions: dict[str, BrowserSession] = {}
        if self.path is not None:
            self._tokens = read_token_file(self.path)  # a bad file stops the start
            self._mtime = self._stat()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()  # type: ignore[union-attr]
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _current_tokens(self) -> dict[str, bytes]:
        """The token set, read again when the file changed (one stat per check)."""
        if self.path is None:
            return {}
        stamp = self._stat()
        with self._lock:
            if stamp == self._mtime:
                return self._tokens
            try:
                self._tokens = read_token_file(self.path)
            except TokenFileError as exc:
                log.error("auth token file unusable, nobody can authenticate: %s", exc)
                self._tokens = {}
            self._mtime = stamp
            return self._tokens

    def check_token(self, token: str | None) -> str | None:
        """The name of ``token``, or None. Constant time over every known token."""
        if not token:
            return None
        presented = _digest(token)
        found: str | None = None
        for name, digest in self._current_tokens().items():
            if hmac.compare_digest(presented, digest) and found is None:
                found = name
        return found

    def login(self, token: str | None) -> BrowserSession | None:
        """A new browser session for a valid token, else None."""
        name = self.check_token(token)
        if name is None:
            return None
        sid = secrets.token_urlsafe(32)
        sess = BrowserSession(sid, name, _digest(token or ""), self._clock() + self.session_s)
        with self._lock:
            now = self._clock()
            for old in [k for k, v in self._sessions.items() if v.expires <= now]:
                del self._sessions[old]
            self._sessions[sid] = sess
        return sess

    def session(self, sid: str | None) -> BrowserSession | None:
        """The live session with this id: not expired, and its token still in the file."""
        if not sid:
            return None
        with self._lock:
            sess = self._sessions.get(sid)
        if sess is None:
            return None
        tokens = self._current_tokens()
        if sess.expires <= self._clock() or not hmac.compare_digest(
            tokens.get(sess.name, b""), sess.token_digest
        ):
            self.logout(sid)
            return None
        return sess

    def logout(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(sid, None)

    @staticmethod
    def csrf_ok(sess: BrowserSession, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(sess.csrf.encode(), presented.encode())
