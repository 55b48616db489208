"""The node's configuration: one typed schema, loaded from YAML and validated by pydantic.

Every other module takes a :class:`NodeConfig` (or a part of it); nothing reads YAML elsewhere.
:func:`load_config` raises :class:`ConfigError` whose ``errors`` list holds one
``(key.path, message)`` pair per problem, so ``dicom-node config check`` can print them all.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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
    dimse_timeout_s: float = Field(60, gt=0)
    network_timeout_s: float = Field(60, gt=0)
    max_pdu: int = Field(0, ge=0, description="0 = unlimited")
    tls: TLSConfig | None = None

    _ae = field_validator("ae_title")(_check_ae)

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
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TLSConfig | None = None

    _ae = field_validator("ae_title")(_check_ae)


class StorageSection(_Strict):
    spool_dir: Path = Path("var/spool")
    min_free_bytes: int = Field(1_000_000_000, ge=0)
    retention_days: float = Field(7, ge=0, description="keep source/derived files this long")
    fsync: bool = Field(True, description="fsync files and directories before acknowledging")


class DatabaseSection(_Strict):
    url: str = "sqlite:///var/node.db"
    busy_timeout_ms: int = Field(30_000, ge=0)


class CompletionSection(_Strict):
    quiet_seconds: float = Field(30, ge=0)
    check_interval_s: float = Field(2, gt=0)
    spacing_rel_tol: float = Field(0.02, ge=0, le=0.5, description="allowed slice step error")
    spacing_abs_tol_mm: float = Field(0.05, ge=0)
    max_tilt_deg: float = Field(30, ge=0, le=60, description="steeper gantry tilt is rejected")


class SendSection(_Strict):
    max_attempts: int = Field(8, ge=1, le=100)
    base_delay_s: float = Field(2, gt=0)
    max_delay_s: float = Field(300, gt=0)


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
            re.compile(v)
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
    name: str
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


class NodeConfig(_Strict):
    node: NodeSection = NodeSection()
    allowed_callers: list[AllowedCaller] = []
    destinations: list[Destination] = []
    storage: StorageSection = StorageSection()
    database: DatabaseSection = DatabaseSection()
    completion: CompletionSection = CompletionSection()
    send: SendSection = SendSection()
    rules: list[Rule] = []
    model: ModelSection = ModelSection()

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

    def destination(self, name: str) -> Destination:
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
        raise ConfigError(str(p), [("", f"invalid YAML: {where}{exc}")]) from None
    # Relative paths in the file are relative to the working directory (systemd units set
    # WorkingDirectory; the demo runs from the repository root).
    return parse_config(data, str(p))
