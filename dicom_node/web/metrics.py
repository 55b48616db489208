"""Prometheus metrics: the process's instruments, and the node's state read at scrape time.

Two kinds, on purpose:

* **Instruments** (counters and histograms in :data:`INSTRUMENTS`) count what happens in this
  process: associations, received instances and bytes, store and job-stage durations, sent
  instances, send retries. receive.py, deliver.py and infer.py call the small hook functions
  below; each costs a dictionary look-up and an addition under a lock (a few microseconds). They
  start at zero with the process, as Prometheus counters do (``rate()`` handles restarts).
  The additional receiving processes (``node.receiver_processes``) count into files in a
  directory of their own (prometheus_client's multiprocess mode, :data:`CHILDREN_DIR_ENV`),
  and :func:`instruments` adds their counts to this process's at scrape time.
* **State** (:class:`NodeCollector`) is read when Prometheus scrapes: series, jobs and nodes
  by state and each destination's last success come from the database, so they stay right across
  restarts and whichever process changed them (the CLI's reprocess, another node); free spool
  space, open associations and readiness come from the running node.

Labels have low cardinality: states, stages, outcomes and configured destination names; never a
UID, an AE title of a caller, an address or patient data.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample

from dicom_node.db import JobState, SeriesState
from dicom_node.nodes import nodes_by_state

if TYPE_CHECKING:
    from dicom_node.web.context import NodeView

__all__ = [
    "CHILDREN_DIR_ENV",
    "INSTRUMENTS",
    "NodeCollector",
    "association",
    "instruments",
    "job_stages",
    "send_retry",
    "sent",
    "store",
]

log = logging.getLogger(__name__)

# The *_created series double the output and no alert or dashboard here uses them.
disable_created_metrics()
INSTRUMENTS = CollectorRegistry(auto_describe=True)

# What receive.py's store outcomes are called in the ``status`` label.
STORE_STATUSES = {
    "new": "stored",
    "duplicate": "duplicate",
    "replaced": "replaced",
    "rejected": "rejected",  # the data set is unusable (0xA900, 0xC21x)
    "refused": "refused",  # not taken now: disk below minimum, UID conflict, shutting down
    "failed": "failed",  # disk or index write failed (0xA700)
}
JOB_STAGES = ("queue_wait", "plan", "load", "inference", "write", "preview", "send")

ASSOCIATIONS = Counter(
    "dicom_node_associations",
    "DICOM associations requested, by result (accepted or rejected).",
    ["result"],
    registry=INSTRUMENTS,
)
INSTANCES = Counter(
    "dicom_node_instances_received",
    "C-STORE requests answered, by outcome: stored, duplicate, replaced (all 0x0000), "
    "rejected, refused, failed.",
    ["status"],
    registry=INSTRUMENTS,
)
RECEIVED_BYTES = Counter(
    "dicom_node_received_bytes",
    "Bytes of C-STORE data sets received (as sent, before any check).",
    registry=INSTRUMENTS,
)
STORE_SECONDS = Histogram(
    "dicom_node_store_duration_seconds",
    "Time from a C-STORE request to its answer (header parse, durable write, index commit).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=INSTRUMENTS,
)
STAGE_SECONDS = Histogram(
    "dicom_node_job_stage_duration_seconds",
    "Seconds a job spent in each stage (queue_wait, plan, load, inference, write, preview, "
    "send: one observation per send attempt).",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=INSTRUMENTS,
)
SENT = Counter(
    "dicom_node_send_instances",
    "Derived instances sent, by destination and result (acknowledged or failed).",
    ["destination", "result"],
    registry=INSTRUMENTS,
)
SEND_RETRIES = Counter(
    "dicom_node_send_retries",
    "Send attempts that failed transiently and were scheduled again.",
    registry=INSTRUMENTS,
)

# Every known label value exists from the start at 0, so that rate() and increase() see the
# first event instead of a series that appears with it.
for _r in ("accepted", "rejected"):
    ASSOCIATIONS.labels(_r)
for _s in set(STORE_STATUSES.values()):
    INSTANCES.labels(_s)
for _st in JOB_STAGES:
    STAGE_SECONDS.labels(_st)


# The additional receiving processes are started with this variable naming a directory: there
# prometheus_client keeps their instruments in files (its multiprocess mode, chosen when it is
# imported), which the main process reads when scraped. The main process never has it set.
CHILDREN_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Instruments:
    """This process's instruments with those of the receiving processes that count into
    ``children_dir`` added in: the same metric names and labels, each sample the sum."""

    def __init__(self, children_dir: str | None):
        self.children_dir = children_dir

    def collect(self) -> Iterator[Metric]:
        own = list(INSTRUMENTS.collect())
        if not self.children_dir:
            yield from own
            return
        theirs: dict[tuple, float] = {}
        try:
            for family in MultiProcessCollector(None, self.children_dir).collect():
                for sample in family.samples:
                    key = _sample_key(sample)
                    theirs[key] = theirs.get(key, 0.0) + sample.value
        except (OSError, ValueError) as exc:  # a file being written or removed: this scrape
            log.warning("receiver processes' metrics unreadable this scrape: %s", exc)
        for family in own:
            family.samples = [
                s._replace(value=s.value + theirs.get(_sample_key(s), 0.0)) for s in family.samples
            ]
            yield family


def _sample_key(sample: Sample) -> tuple:
    """A sample's name and labels, whichever order the labels come in."""
    return sample.name, tuple(sorted(sample.labels.items()))


def instruments(children_dir: str | None = None) -> _Instruments:
    """The instruments to expose: :data:`INSTRUMENTS`, plus the counts of the receiving
    processes in ``children_dir`` (:class:`dicom_node.receive_pool.ReceiverPool`'s)."""
    return _Instruments(children_dir)


# -- hooks (called from the pipeline; cheap, never raise) ----------------------------------------


def association(accepted: bool) -> None:
    ASSOCIATIONS.labels("accepted" if accepted else "rejected").inc()


def store(outcome: str, nbytes: int, seconds: float) -> None:
    """One C-STORE answered with ``outcome`` (receive.py's word for it)."""
    INSTANCES.labels(STORE_STATUSES.get(outcome, "failed")).inc()
    if nbytes > 0:
        RECEIVED_BYTES.inc(nbytes)
    STORE_SECONDS.observe(seconds)


def job_stages(seconds: Mapping[str, float], *, job_id: int, series_uid: str) -> None:
    """The stage durations of one job run (infer.py's ``job.stage_seconds`` entries), also
    logged one line per stage (``logging.format: json`` makes them fields)."""
    for stage, value in seconds.items():
        if stage in JOB_STAGES and value is not None and value >= 0:
            STAGE_SECONDS.labels(stage).observe(float(value))
            log.info(
                "job stage job_id=%s series_uid=%s stage=%s duration_s=%.3f",
                job_id,
                series_uid,
                stage,
                value,
            )


def sent(destination: str, acknowledged: int, failed: int) -> None:
    """One send attempt's instances to ``destination`` (a configured name)."""
    if acknowledged:
        SENT.labels(destination, "acknowledged").inc(acknowledged)
    if failed:
        SENT.labels(destination, "failed").inc(failed)


def send_retry() -> None:
    SEND_RETRIES.inc()


# -- state at scrape time -------------------------------------------------------------------------


class NodeCollector:
    """The node's state as gauges, read from the database and the running node per scrape."""

    def __init__(self, view: NodeView):
        self.view = view
        for dest in view.config.destinations:
            for result in ("acknowledged", "failed"):
                SENT.labels(dest.name, result)

    def describe(self) -> list[Metric]:
        return []  # the families depend on the configuration; nothing to check at register

    def collect(self) -> Iterator[Metric]:
        from dicom_node.web import queries

        view = self.view
        up = GaugeMetricFamily(
            "dicom_node_database_up", "1 when the last scrape could read the database."
        )
        try:
            with view.sessions() as s:
                series = queries.count_by_state(s, "series")
                jobs = queries.count_by_state(s, "jobs")
                last_ok = view.last_success.get(s, view.config)
                node_states = nodes_by_state(s)
        except Exception as exc:  # a scrape must still answer: the gauge says why it is thin
            log.warning("metrics: cannot read the database: %s", exc)
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            yield _by_state("dicom_node_series", "Series by state.", series, SeriesState)
            yield _by_state("dicom_node_jobs", "Jobs by state.", jobs, JobState)
            g = GaugeMetricFamily(
                "dicom_node_nodes",
                "Nodes sharing the database, by state (alive, stale: missed three heartbeats "
                "without stopping, stopped).",
                labels=["state"],
            )
            for state, n in node_states.items():
                g.add_metric([state], n)
            yield g
            g = GaugeMetricFamily(
                "dicom_node_destination_last_success_timestamp_seconds",
                "When a destination last acknowledged an instance (Unix time); absent if never.",
                labels=["destination"],
            )
            for name, at in last_ok.items():
                if at is not None:
                    g.add_metric([name], at.timestamp())
            yield g
        yield from self._process_state()

    def _process_state(self) -> Iterator[Metric]:
        view = self.view
        try:
            free = float(shutil.disk_usage(view.config.storage.spool_dir).free)
        except OSError:
            free = float("nan")
        yield GaugeMetricFamily(
            "dicom_node_spool_free_bytes", "Free bytes on the spool's file system.", value=free
        )
        yield GaugeMetricFamily(
            "dicom_node_spool_min_free_bytes",
            "storage.min_free_bytes: below it associations are refused.",
            value=float(view.config.storage.min_free_bytes),
        )
        yield GaugeMetricFamily(
            "dicom_node_associations_active",
            "DICOM associations open now.",
            value=len(view.associations()),
        )
        model = view.model_status()
        info = GaugeMetricFamily(
            "dicom_node_build_info",
            "Always 1; the labels say the node's version and the loaded model's version.",
            labels=["version", "model_version"],
        )
        info.add_metric([view.version, model.version_label], 1)
        yield info
        yield GaugeMetricFamily(
            "dicom_node_start_time_seconds",
            "When this node process started (Unix time).",
            value=view.started.timestamp(),
        )
        t0 = time.perf_counter()
        ready = view.readiness()
        yield GaugeMetricFamily(
            "dicom_node_ready", "1 when /readyz answers 200.", value=1.0 if ready.ok else 0.0
        )
        yield GaugeMetricFamily(
            "dicom_node_readiness_check_seconds",
            "How long the readiness checks took in this scrape.",
            value=time.perf_counter() - t0,
        )


def _by_state(name: str, doc: str, counts: dict[str, int], states) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["state"])
    for state in states:  # every state, also at 0: a state that empties must read 0, not vanish
        g.add_metric([state.value], counts.get(state.value, 0))
    return g
