"""End-to-end latency of the node on the real 20-slice CT series, split by stage.

Starts Orthanc (Debian) as the PACS and ``dicom-node serve`` on free loopback ports, sends the
real series with dcmtk storescu (``TCP_NODELAY=1``), and measures from the **last instance
received** by the node (``max(instances.received_at)``) to the **last derived instance
acknowledged by Orthanc** (the job turning ``sent``, which happens right after the last
C-STORE-RSP), cross-checked by polling Orthanc's REST API. The split comes from the job's
``stage_seconds``: quiet period, queue wait, load, inference, write, preview, send; "scheduling"
is what is left (polling intervals between stages).

    python benchmarks/e2e.py [--preset P] [--quiet 2] [--target 1.0] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.devtools.sample_data import fetch_sample_data  # noqa: E402
from tests.support.node import NodeProcess, send_with_storescu  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402

STAGES = ("quiet", "queue_wait", "plan", "load", "inference", "write", "preview", "send")


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def run(preset: str | None, quiet: float, target: float, device: str, timeout: float) -> dict:
    sources = sorted(Path(fetch_sample_data().ct_dicom_repaired).glob("*.dcm"))
    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
        tmp = Path(tmp)
        with OrthancServer(tmp / "orthanc", aet="PACS") as pacs:
            model = {"device": device}
            if preset:
                model["preset"] = preset
            overrides = {
                "destinations": [
                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                     "port": pacs.dicom_port}
                ],
                "completion": {"quiet_seconds": quiet, "check_interval_s": 0.25},
                "rules": [{"name": "thick", "match": {"modality": ["CT"]},
                           "action": {"target_spacing_mm": target, "destinations": ["pacs"]}}],
                "model": model,
            }  # fmt: skip
            with NodeProcess(tmp / "node", overrides=overrides) as node:
                # Let the model load before the clock starts (the node preloads it at start-up).
                time.sleep(5)
                sent = send_with_storescu(sources, node.port)
                t_storescu_done = time.time()
                if len(sent.acknowledged) != len(sources):
                    raise SystemExit(f"storescu failed:\n{sent.output[-2000:]}")
                deadline = time.monotonic() + timeout
                while True:
                    rows = node.sqlite(
                        "select state, summary, stage_seconds, updated_at from jobs "
                        "order by id desc limit 1"
                    )
                    if rows and rows[0][0] in ("sent", "failed", "rejected"):
                        break
                    if time.monotonic() > deadline:
                        why = node.sqlite("select state, state_reason from series")
                        raise SystemExit(f"no finished job after {timeout:.0f} s; series: {why}")
                    time.sleep(0.1)
                state, summary, stages, updated = rows[0]
                if state != "sent":
                    raise SystemExit(f"job ended {state}: {node.log_tail()}")
                summary, stages = json.loads(summary), json.loads(stages)
                n_out = summary["n_out"]
                t_orthanc = None
                while t_orthanc is None:
                    if len(pacs.get("/instances")) >= n_out:
                        t_orthanc = time.time()
                    else:
                        time.sleep(0.05)
                con = sqlite3.connect(f"file:{node.db_path}?mode=ro", uri=True)
                (last_rx,) = con.execute("select max(received_at) from instances").fetchone()
                con.close()
    # DB times are naive UTC.
    utc = datetime.now().astimezone().utcoffset().total_seconds()
    t_last_rx = _ts(last_rx) + utc
    t_sent = _ts(updated) + utc
    total = t_sent - t_last_rx
    named = {k: float(stages.get(k, 0.0)) for k in STAGES}
    named["scheduling"] = max(0.0, total - sum(named.values()))
    return {
        "n_in": summary["n_in"],
        "n_out": n_out,
        "spacing": (summary["spacing_in_mm"], summary["spacing_out_mm"]),
        "total_s": total,
        "stages": named,
        "storescu_to_orthanc_complete_s": t_orthanc - t_storescu_done,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="model preset (default: the shipped model)")
    ap.add_argument("--quiet", type=float, default=2.0, help="completion.quiet_seconds")
    ap.add_argument("--target", type=float, default=1.0, help="target spacing in mm")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the job")
    args = ap.parse_args()
    r = run(args.preset or None, args.quiet, args.target, args.device, args.timeout)
    print(f"real CT series: {r['n_in']} -> {r['n_out']} slices, "
          f"{r['spacing'][0]} -> {r['spacing'][1]} mm")  # fmt: skip
    print(f"last instance received -> last derived instance acknowledged: {r['total_s']:.2f} s")
    for k, v in r["stages"].items():
        print(f"  {k:<11} {v:8.2f} s  {100 * v / r['total_s']:5.1f} %")
    print(f"(cross-check: storescu done -> Orthanc holds all: "
          f"{r['storescu_to_orthanc_complete_s']:.2f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
