"""The node's configuration: one typed schema, loaded from YAML and validated by pydantic.

Every other module takes a :class:`NodeConfig` (or a part of it); nothing reads YAML elsewhere.
:func:`load_config` raises :class:`ConfigError` whose ``errors`` list holds one
``(key.path, message)`` pair per problem, so ``dicom-node config check`` can print them all.
:func:`check_environment` checks what the values name on this machine (directories, files,
certificates); ``config check`` and ``serve`` run both and exit 2 on any problem.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from dicom_node.web.auth import TokenFileError, read_token_file

DEFAULT_CONFIG_PATH = Path("config/node.yaml")
CONFIG_ENV = "DICOM_NODE_CONFIG"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default charset, no backslash


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value) or len(value) > 16:
        raise ValueError("must be 1-16 printable ASCII characters, no backslash")
    return stripped


AETitle = Annotated[str, Field(description="DICOM application entity title")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Strict):
    """TLS for an association: our certificate/key and the CA that peers must chain to."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = True


class NodeSection(_Strict):
    ae_title: AETitle = "ACVTT"
    bind_address: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(32, ge=1, le=1024)
    acse_timeout_s: float = Field(30, gt=0)
    # A new connection holds an association slot until its A-ASSOCIATE-RQ (and TLS handshake)
    # is in: this bounds how long idle or half-open sockets can keep real senders out.
    association_request_timeout_s: float = Field(10, gt=0, le=600)
    dimse_timeout_s: float = Field(60, gt=0)
    network_timeout_s: float = Field(60, gt=0)
    max_pdu: int = Field(0, ge=0, description="0 = unlimited")
    tls: TLSConfig | None = None
    # A loop (completion, dispatch, send, a worker) failing or silent for this long makes the
    # node unhealthy in `dicom-node status` and `dicom-node health`.
    health_stall_after_s: float = Field(60, gt=0)
    # This node's name in the shared database: the jobs it claims carry it. It must be unique
    # among the nodes sharing a database and stable across restarts (a node restarting after a
    # crash takes back its own interrupted jobs at once). Default: host name and AE title.
    id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^\S+$")
    # A claimed job stays this node's while its heartbeat renews the lease (every lease_s / 3);
    # a node that stops renewing (killed, cut off from the database) loses its jobs to the
    # other nodes this long after its last renewal.
    lease_s: float = Field(60, ge=3, le=3600)
    # What this process does: a receiver receives, indexes and checks completion (queues jobs);
    # a worker claims jobs and runs them (inference, write, preview, send); all does both.
    # Several processes on one PostgreSQL split the roles among them.
    role: Literal["all", "receiver", "worker"] = "all"
    # Receiving processes on this host (roles all and receiver): more than 1 runs that many
    # processes accepting on one listening socket (the main process's, inherited), so that
    # receiving is not bound to one Python interpreter; a free process takes the next connection.
    receiver_processes: int = Field(1, ge=1, le=16)
    # How often the node refreshes its status file and its row in the nodes table; missing
    # three in a row makes it stale (a crash, a hang, cut off) in `dicom-node status`.
    heartbeat_s: float = Field(5, ge=0.2, le=60)
    # How the receiver's association threads wait: "event" blocks until data or a message
    # arrives (dicom_node/association_reactor.py); "polling" is pynetdicom's own reactor, which
    # checks every millisecond (a fallback, should the event-driven one ever misbehave).
    association_reactor: Literal["event", "polling"] = "event"

    _ae = field_validator("ae_title")(_check_ae)

    @property
    def node_id(self) -> str:
        """``id``, or ``<host name>/<AE title>`` when not set."""
        return self.id or f"{socket.gethostname()}/{self.ae_title}"[:128]

    @field_validator("tls")
    @classmethod
    def _tls(cls, v: TLSConfig | None) -> TLSConfig | None:
        if v is not None and v.require_client_cert and v.ca_file is None:
            # Client certificates are checked against ca_file only: without it none would pass.
            raise ValueError(
                "require_client_cert needs ca_file (the CA client certificates chain to)"
            )
        return v

    @field_validator("bind_address")
    @classmethod
    def _bind(cls, v: str) -> str:
        ipaddress.ip_address(v)  # raises ValueError with a clear message
        return v


class AllowedCaller(_Strict):
    ae_title: AETitle
    host: str = Field(description="IP address or CIDR block the caller connects from")

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        ipaddress.ip_network(v, strict=False)
        return v

    def matches(self, ae_title: str, address: str) -> bool:
        """True when a caller with this AE title and IP address is this entry."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return ae_title.strip() == self.ae_title and ip in ipaddress.ip_network(
            self.host, strict=False
        )


class Destination(_Strict):
    """A DIMSE peer: derived series go out by C-STORE."""

    type: Literal["dimse"] = "dimse"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TLSConfig | None = None

    _ae = field_validator("ae_title")(_check_ae)


class DicomWebAuth(_Strict):
    """How the node authenticates to a DICOMweb server; secrets live in files, never here."""

    type: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> DicomWebAuth:
        if self.type == "basic" and (not self.username or self.password_file is None):
            raise ValueError("basic authentication needs username and password_file")
        if self.type == "bearer" and self.token_file is None:
            raise ValueError("bearer authentication needs token_file")
        for f in (self.password_file, self.token_file):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"{f} is not a readable file")
        return self


class DicomWebDestination(_Strict):
    """A DICOMweb server: derived series go out by STOW-RS (``{url}/studies/{study}``)."""

    type: Literal["dicomweb"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str = Field(pattern=r"^https?://", description="base URL, e.g. https://pacs/dicom-web")
    auth: DicomWebAuth = DicomWebAuth()
    ca_file: Path | None = Field(None, description="CA bundle to verify the server's TLS")
    timeout_s: float = Field(60, gt=0)
    batch_size: int = Field(16, ge=1, le=1000, description="instances per STOW-RS request")


def _destination_type(value: object) -> str:
    kind = value.get("type", "dimse") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("dimse", "dicomweb") else "dimse"


AnyDestination = Annotated[
    Annotated[Destination, Tag("dimse")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(_destination_type),
]


class StorageSection(_Strict):
    spool_dir: Path = Path("var/spool")
    min_free_bytes: int = Field(1_000_000_000, ge=0)
    retention_days: float = Field(7, ge=0, description="keep source/derived files this long")
    fsync: bool = Field(True, description="fsync files and directories before acknowledging")

    @property
    def spool_root(self) -> Path:
        """The spool directory as an absolute path (index rows hold paths relative to it)."""
        return self.spool_dir.resolve()


class DatabaseSection(_Strict):
    url: str = "sqlite:///var/node.db"
    busy_timeout_ms: int = Field(30_000, ge=0)
    # A sender waits for each C-STORE answer, and gives up after its own timeout (often 30 s):
    # while another process holds the database, a store is answered 0xA700 after this long.
    store_busy_timeout_ms: int = Field(5_000, ge=0, le=60_000)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        # Parsed here, not at the first connection, so that a typo is a config error with its
        # key path instead of a failure deep inside start-up.
        try:
            make_url(v).get_dialect()
        except NoSuchModuleError as exc:  # a subclass of ArgumentError: first
            raise ValueError(f"unknown database kind in {v!r}: {exc}") from None
        except ArgumentError:
            raise ValueError(f"cannot parse {v!r} as a database URL (sqlite:///PATH)") from None
        return v


class CompletionSection(_Strict):
    quiet_seconds: float = Field(30, ge=0)
    # A series whose association ended without a release (sender killed, network cut), or that
    # was still arriving when the node stopped, waits this long for the rest before it counts
    # as complete.
    interrupted_hold_s: float = Field(600, ge=0)
    check_interval_s: float = Field(2, gt=0)
    spacing_rel_tol: float = Field(0.02, ge=0, le=0.5, description="allowed slice step error")
    spacing_abs_tol_mm: float = Field(0.05, ge=0)
    max_tilt_deg: float = Field(30, ge=0, le=60, description="steeper gantry tilt is rejected")


class SendSection(_Strict):
    # Transient failures are retried for a window of time, not a number of attempts: a PACS
    # down for hours of maintenance must not turn jobs into dead letters.
    retry_window_s: float = Field(
        8 * 3600, gt=0, description="give up after transient failures lasting this long"
    )
    max_attempts: int | None = Field(None, ge=1, description="optional cap on attempts too")
    base_delay_s: float = Field(2, gt=0)
    max_delay_s: float = Field(300, gt=0)
    # Acknowledgements are committed in batches while the association runs: after a crash at
    # most this many (or this many seconds' worth) are sent again.
    ack_batch: int = Field(32, ge=1, le=10_000)
    ack_flush_s: float = Field(1.0, gt=0, le=60)


class RuleMatch(_Strict):
    modality: list[str] = ["CT"]
    sop_classes: list[str] | None = None
    spacing_mm: tuple[float, float] | None = Field(
        None, description="inclusive [min, max] slice spacing"
    )
    thickness_mm: tuple[float, float] | None = None
    body_part: list[str] | None = None
    series_description_regex: str | None = None
    calling_ae: list[str] | None = None

    @field_validator("series_description_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:  # not a ValueError: pydantic would let it escape
                raise ValueError(f"invalid regular expression: {exc}") from None
        return v

    @field_validator("spacing_mm", "thickness_mm")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None:
            low, high = v
            if low < 0:
                raise ValueError(f"[min, max] in mm: min {low:g} is negative")
            if low > high:
                raise ValueError(f"[min, max] in mm: min {low:g} is greater than max {high:g}")
        return v


class RuleAction(_Strict):
    target_spacing_mm: float | None = Field(None, gt=0)
    factor: int | None = Field(None, ge=2, le=16)
    destinations: list[str] = []
    priority: int = 0
    quiet_seconds: float | None = Field(None, ge=0)
    series_number_offset: int = 1000
    series_description: str = "{source_description} ACVTT {spacing:g}mm"

    @model_validator(mode="after")
    def _one_target(self) -> RuleAction:
        if (self.target_spacing_mm is None) == (self.factor is None):
            raise ValueError("give exactly one of target_spacing_mm or factor")
        return self


class Rule(_Strict):
    name: str = Field(min_length=1, max_length=128)  # jobs.rule_name holds 128
    match: RuleMatch = RuleMatch()
    action: RuleAction


class ModelSection(_Strict):
    checkpoint: Path | None = Field(None, description="safetensors file; None = shipped default")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    preset: str | None = None
    concurrency: int | None = Field(
        None, ge=1, le=16, description="jobs at once; None = one per CUDA GPU (1 on CPU)"
    )
    flip_ensemble: bool = Field(
        False,
        description="average 4 passes over in-plane flips: about +0.1 dB, 4x the inference time",
    )
    # On a CPU host, one single-threaded worker per core gave the most jobs per hour
    # (docs/SCALING.md); torch's default takes every core for each worker process.
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="torch's CPU threads in this process; None = its default"
    )


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


class HttpSection(_Strict):
    """The HTTP side (docs/OPERATIONS.md, "Monitoring"): /healthz, /readyz, /metrics, the JSON
    API and the web console, served by ``dicom-node serve`` itself."""

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # One token per line (``NAME:TOKEN``, or a bare ``TOKEN`` for the name ``admin``); without
    # it nobody can authenticate: the console is read-only and shows no patient data.
    auth_token_file: Path | None = None
    # Whether the console, the JSON API and /metrics answer without authentication (never
    # with patient names or IDs). /healthz and /readyz always do.
    anonymous_read: bool = True
    console_refresh_s: int = Field(10, ge=0, le=3600, description="0 = no auto-refresh")
    session_hours: float = Field(8, gt=0, le=24 * 30)
    # STOW-RS (POST /dicomweb/studies): a body larger than this is refused with 413, and only
    # these token names may store (empty: any token in auth_token_file).
    stow_max_bytes: int = Field(1 << 30, ge=1 << 20)
    stow_callers: list[str] = []

    @field_validator("bind_address")
    @classmethod
    def _bind(cls, v: str) -> str:
        ipaddress.ip_address(v)
        return v

    @model_validator(mode="after")
    def _authenticated_off_loopback(self) -> HttpSection:
        # Anyone on the network could otherwise read the console and the API; actions need a
        # token anyway, but the series, jobs and audit trail would be open to all.
        if self.enabled and not _is_loopback(self.bind_address) and self.auth_token_file is None:
            raise ValueError(
                f"bind_address {self.bind_address} is not a loopback address: set "
                "auth_token_file (a node reachable from the network needs authentication)"
            )
        if self.enabled and not self.anonymous_read and self.auth_token_file is None:
            raise ValueError("anonymous_read: false needs auth_token_file (nobody could log in)")
        return self


class LoggingSection(_Strict):
    # json: one JSON object per line (series_uid, job_id, stage, duration_s as fields).
    format: Literal["text", "json"] = "text"


class NodeConfig(_Strict):
    node: NodeSection = NodeSection()
    allowed_callers: list[AllowedCaller] = []
    destinations: list[AnyDestination] = []
    storage: StorageSection = StorageSection()
    database: DatabaseSection = DatabaseSection()
    completion: CompletionSection = CompletionSection()
    send: SendSection = SendSection()
    rules: list[Rule] = []
    model: ModelSection = ModelSection()
    http: HttpSection = HttpSection()
    logging: LoggingSection = LoggingSection()

    @field_validator("allowed_callers")
    @classmethod
    def _unique_callers(cls, v: list[AllowedCaller]) -> list[AllowedCaller]:
        # A repeated entry is harmless to matching but means an edit went wrong (a copy that
        # was meant to name another AE title or host).
        seen: dict[tuple[str, object], int] = {}
        for i, c in enumerate(v):
            key = (c.ae_title, ipaddress.ip_network(c.host, strict=False))
            if key in seen:
                raise ValueError(
                    f"entries {seen[key]} and {i} are the same caller "
                    f"(ae_title {c.ae_title}, host {c.host})"
                )
            seen[key] = i
        return v

    @model_validator(mode="after")
    def _references(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"destination names must be unique: {sorted(dupes)}")
        for rule in self.rules:
            for dest in rule.action.destinations:
                if dest not in names:
                    raise ValueError(f"rule {rule.name!r} names unknown destination {dest!r}")
        return self

    def destination(self, name: str) -> Destination | DicomWebDestination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(f"no destination named {name!r}")


class ConfigError(Exception):
    """The configuration could not be read or is invalid; ``errors`` lists (path, message)."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(f"{p or '<root>'}: {m}" for p, m in errors))


def resolve_config_path(path: Path | str | None) -> Path:
    """--config, else $DICOM_NODE_CONFIG, else config/node.yaml."""
    if path:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def parse_config(data: object, source: str = "<config>") -> NodeConfig:
    if data is None:
        data = {}
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            errors.append((loc, msg))
        raise ConfigError(source, errors) from None


def load_config(path: Path | str | None = None) -> NodeConfig:
    """Read and validate the YAML file at ``path`` (resolved as :func:`resolve_config_path`)."""
    p = resolve_config_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read file: {exc.strerror or exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
        raise ConfigError(str(p), [("", f"invalid YAML: {where}{problem}")]) from None
    if data is None or data == {}:
        # The defaults alone accept no caller and process nothing: an empty file is a mistake
        # (a truncated copy, the wrong path), not a configuration.
        raise ConfigError(
            str(p), [("", "the file has no settings: start from config/node.example.yaml")]
        )
    # Relative paths in the file are relative to the working directory (systemd units set
    # WorkingDirectory; the demo runs from the repository root).
    return parse_config(data, str(p))


# -- what the config names must exist and be usable ---------------------------------------------
#
# The schema above checks values; these check the machine. They run in `config check` and at
# the start of `serve`, so that a missing directory or certificate is reported with its key
# path, not as whatever the first system call that trips on it happens to say.
#
# Directories: the node creates the spool directory and the SQLite file when they are missing,
# but never a missing parent directory. A typo in a path (or a relative path run from the wrong
# working directory) is then an error, not a new directory tree somewhere, created as root.


def check_environment(config: NodeConfig, create: bool = False) -> list[tuple[str, str]]:
    """Problems with the directories, files and callers ``config`` names, as (key, message).

    ``create``: make the spool directory when only it is missing (``serve`` does; ``config
    check`` changes nothing).
    """
    problems = _check_spool(Path(config.storage.spool_dir), create)
    problems += check_database_path(config.database.url)
    problems += _check_tls("node.tls", config.node.tls, server=True)
    for i, dest in enumerate(config.destinations):
        if isinstance(dest, Destination):
            problems += _check_tls(f"destinations.{i}.tls", dest.tls, server=False)
    if config.http.enabled and config.http.auth_token_file is not None:
        problems += _check_token_file(config.http.auth_token_file)
    if not config.allowed_callers:
        problems.append(("allowed_callers", "empty: every association would be rejected"))
    return problems


def config_warnings(config: NodeConfig) -> list[str]:
    """Settings that work but are probably not what was meant."""
    if not config.rules:
        return ["rules: none: received series are kept but never processed"]
    return []


def _check_spool(spool: Path, create: bool) -> list[tuple[str, str]]:
    key = "storage.spool_dir"
    if not spool.exists():
        parent = spool.absolute().parent
        if not parent.is_dir():
            return [(key, f"{spool}: its parent directory {parent} does not exist")]
        if not create:
            if not os.access(parent, os.W_OK | os.X_OK):
                return [(key, f"{spool} does not exist and {parent} is not writable")]
            return []  # serve creates it
        try:
            spool.mkdir()
        except OSError as exc:
            return [(key, f"cannot create {spool}: {exc.strerror or exc}")]
    if not spool.is_dir():
        return [(key, f"{spool} is not a directory")]
    # A real write, not os.access: that ignores read-only mounts for root (and systemd's
    # ProtectSystem), and says yes to root whatever the permissions.
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=spool)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return [(key, f"cannot write in {spool}: {exc.strerror or exc}")]
    return []


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for another database or an in-memory one."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    if u.query.get("uri") in ("true", "1") or u.database.startswith("file:"):
        return None  # a URI filename: sqlite reads it, we do not
    return Path(u.database)


def check_database_path(url: str) -> list[tuple[str, str]]:
    """For SQLite: the file's directory exists and both are writable. (Whether the database
    itself takes a write is tried at start-up, see :mod:`dicom_node.node`.)"""
    key = "database.url"
    path = sqlite_path(url)
    if path is None:
        return []
    directory = path.absolute().parent
    if not directory.is_dir():
        return [(key, f"directory {directory} of the SQLite file does not exist")]
    # SQLite in WAL mode creates <db>-wal and <db>-shm next to the file at every start.
    if not os.access(directory, os.W_OK | os.X_OK):
        return [(key, f"directory {directory} of the SQLite file is not writable")]
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return [(key, f"SQLite file {path} is not writable")]
    return []


def _check_token_file(path: Path) -> list[tuple[str, str]]:
    try:
        read_token_file(path)
    except TokenFileError as exc:
        return [("http.auth_token_file", str(exc))]
    return []


def _check_tls(key: str, tls: TLSConfig | None, server: bool) -> list[tuple[str, str]]:
    if tls is None:
        return []
    problems = []
    for name in ("cert_file", "key_file", "ca_file"):
        path = getattr(tls, name)
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            problems.append((f"{key}.{name}", f"{path}: {exc.strerror or exc}"))
    if problems:
        return problems
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        return [(f"{key}.cert_file", f"cannot load with key_file {tls.key_file}: {exc}")]
    if tls.ca_file is not None:
        try:
            ctx.load_verify_locations(str(tls.ca_file))
        except (ssl.SSLError, OSError) as exc:
            return [(f"{key}.ca_file", f"cannot load {tls.ca_file}: {exc}")]
    return []
