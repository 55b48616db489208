"""What the HTTP side may see of the running node, as one typed object.

:class:`NodeView` is built by :class:`dicom_node.node.Node` (and by the benchmark, without a
receiver or pipeline). The web code reads the node only through it: the configuration, its own
database sessions, and a few callables for what lives in the node's memory (open associations,
whether the receiver listens, the model's state).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.infer import ModelPool
from dicom_node.receive import StoreResult
from dicom_node.web.queries import LastSuccess
from dicom_node.web.readiness import Readiness, check_readiness, probe_engine

__all__ = ["ModelStatus", "NodeView", "package_version"]


def package_version() -> str:
    try:
        return metadata.version("acvtt-node")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "unknown"


@dataclass(frozen=True)
class ModelStatus:
    """Whether the model is loaded, which one, or why it could not be."""

    loaded: bool
    model_id: str | None = None
    model_version: str | None = None
    error: str | None = None

    @property
    def version_label(self) -> str:
        return self.model_version if self.loaded and self.model_version else "not loaded"

    @classmethod
    def of(cls, pool: ModelPool | None) -> ModelStatus:
        if pool is None:
            return cls(False, error="this process runs no jobs")
        ident = pool.loaded
        if ident is None:
            return cls(False, error=pool.last_error)
        return cls(True, ident.model_id, ident.model_version)


def _nothing() -> list[dict]:
    return []


@dataclass
class NodeView:
    """The node as the HTTP side sees it. ``runs_jobs``: readiness requires a loaded model."""

    config: NodeConfig
    sessions: sessionmaker[Session]
    started: datetime
    version: str = field(default_factory=package_version)
    associations: Callable[[], list[dict]] = _nothing
    receiver_listening: Callable[[], bool] = lambda: False
    models: ModelPool | None = None
    runs_jobs: bool = True
    health: Callable[[], dict] = lambda: {"healthy": True, "problems": [], "loops": {}}
    stopping: Callable[[], bool] = lambda: False
    # Receiver.store_part10 where this process receives (STOW-RS stores through it).
    store_part10: Callable[[bytes, str, str], StoreResult] | None = None
    # Where the additional receiving processes count (metrics.CHILDREN_DIR_ENV); None if none.
    receiver_metrics_dir: str | None = None
    last_success: LastSuccess = field(default_factory=LastSuccess, repr=False)
    _probe: Engine = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Its own connections: a pooled one would hide a database that new ones cannot reach.
        self._probe = probe_engine(self.config.database.url)

    def model_status(self) -> ModelStatus:
        return ModelStatus.of(self.models)

    def readiness(self) -> Readiness:
        return check_readiness(self, self._probe)

    def summary(self) -> dict:
        """The node itself: address, start, version, model, disk, associations, loop health."""
        cfg = self.config
        model = self.model_status()
        try:
            usage = shutil.disk_usage(cfg.storage.spool_dir)
            disk = {"total_bytes": usage.total, "used_bytes": usage.used, "free_bytes": usage.free}
        except OSError:
            disk = {"total_bytes": None, "used_bytes": None, "free_bytes": None}
        free = disk["free_bytes"]
        disk["min_free_bytes"] = cfg.storage.min_free_bytes
        disk["below_minimum"] = free is None or free < cfg.storage.min_free_bytes
        return {
            "ae_title": cfg.node.ae_title,
            "address": cfg.node.bind_address,
            "port": cfg.node.port,
            "started": self.started,
            "version": self.version,
            "model": {
                "loaded": model.loaded,
                "model_id": model.model_id,
                "model_version": model.model_version,
                "error": model.error,
            },
            "spool": str(cfg.storage.spool_dir),
            "disk": disk,
            "associations": self.associations(),
            "health": self.health(),
        }

    def close(self) -> None:
        self._probe.dispose()
