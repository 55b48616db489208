"""Delivery throughput: the node's C-STORE and STOW-RS senders against dcmtk's storescu, to the
same Orthanc, in one run.

    python benchmarks/stow.py [--n 200] [--batch 16] [--repeats 3] [--peer storescp]

Writes a derived series of ``--n`` real-size (512x512) instances from the real CT headers, then
delivers it, each time to a fresh store of one Orthanc (Debian, with its DICOMweb plugin), with
the node's own senders, ``send.send_instances`` (C-STORE over one association) and
``stow.stow_instances`` (STOW-RS, ``--batch`` instances per POST), and with the baseline, dcmtk's
``storescu`` (C-STORE over one association, ``TCP_NODELAY=1``). Prints instances/s for each and
the ratios (medians of ``--repeats`` runs). Orthanc writes to a temporary directory.
``--peer storescp`` delivers instead to a dcmtk storescp that discards what it receives, so
that the figures are the two C-STORE senders' own cost (no STOW-RS then).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from dicom_node.config import parse_config  # noqa: E402
from dicom_node.devtools.sample_data import fetch_sample_data  # noqa: E402
from dicom_node.send import Destination, send_instances  # noqa: E402
from dicom_node.stow import StowTarget, stow_instances  # noqa: E402
from dicom_node.write import SourceImage, write_derived_series  # noqa: E402
from tests.support.dcmtk import storescp  # noqa: E402
from tests.support.orthanc import DICOMWEB_PLUGIN, OrthancServer  # noqa: E402


def _series(n: int, out: Path) -> list[Path]:
    files = sorted(Path(fetch_sample_data().ct_dicom_repaired).glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    headers.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    factor = max(2, -(-(n - 1) // (len(headers) - 1)))
    n_out = (len(headers) - 1) * factor + 1
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 300, size=(n_out, 512, 512)).astype(np.float32)
    write_derived_series(
        [SourceImage(h) for h in headers], vol, factor=factor, model_id="bench",
        model_version="1", out_dir=out,
    )  # fmt: skip
    return sorted(out.glob("*.dcm"))[:n]


def _c_store(how: str, host: str, port: int, files: list[Path]) -> tuple[bool, object]:
    """Send ``files`` to the SCP at host:port with dcmtk's storescu or the node's
    ``send_instances``; (every instance acknowledged, why not)."""
    if how == "storescu":
        cmd = ["/usr/bin/storescu", "-aet", "BENCH", "-aec", "PACS", host, str(port),
               *map(str, files)]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"}
        )
        return proc.returncode == 0, proc.stderr[-500:]
    res = send_instances(Destination("PACS", host, port), files, calling_ae_title="BENCH")
    return res.ok and len(res.sent_now) == len(files), res.failure


def _run_to_storescp(work: Path, files: list[Path], how: str) -> float:
    """Deliver ``files`` to a dcmtk storescp that reads each instance and throws it away
    (``--ignore``): what is left is the sender's own cost."""
    with storescp(work, ae_title="PACS", extra_args=["--ignore", "-q"]) as scp:
        t0 = time.perf_counter()
        ok, why = _c_store(how, scp.host, scp.port, files)
        dt = time.perf_counter() - t0
    if not ok:
        raise SystemExit(f"{how}: delivery incomplete: {why}")
    return len(files) / dt


def _run(work: Path, files: list[Path], batch: int, how: str) -> float:
    with OrthancServer(work, aet="PACS", dicomweb=True) as pacs:
        t0 = time.perf_counter()
        if how in ("storescu", "c-store"):
            ok, why = _c_store(how, pacs.host, pacs.dicom_port, files)
        else:
            dest = parse_config(
                {
                    "destinations": [
                        {
                            "type": "dicomweb",
                            "name": "web",
                            "url": f"{pacs.url}/dicom-web",
                            "batch_size": batch,
                        }
                    ]
                }
            ).destination("web")
            res = stow_instances(StowTarget(dest), files)
            ok, why = res.ok, res.failure
        dt = time.perf_counter() - t0
        if not ok or len(pacs.get("/instances")) != len(files):
            raise SystemExit(f"{how}: delivery incomplete: {why}")
    return len(files) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="instances to deliver")
    ap.add_argument("--batch", type=int, default=16, help="instances per STOW-RS request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--peer",
        choices=("orthanc", "storescp"),
        default="orthanc",
        help="orthanc: the PACS (all three senders); storescp: a dcmtk storescp that discards "
        "what it gets, to measure the C-STORE senders' own cost",
    )
    args = ap.parse_args()
    if args.peer == "storescp":
        return _main_storescp(args)
    if not DICOMWEB_PLUGIN:
        raise SystemExit("needs Debian's orthanc-dicomweb (scripts/setup.sh installs it)")
    med = _measure(
        args.n, args.repeats, ("storescu", "c-store", "stow-rs"),
        lambda work, files, how: _run(work, files, args.batch, how),
        f"to Orthanc, STOW-RS batch {args.batch}",
    )  # fmt: skip
    print(f"  node STOW-RS / storescu: {med['stow-rs'] / med['storescu']:.2f}")
    print(f"  STOW-RS / C-STORE: {med['stow-rs'] / med['c-store']:.2f}")


def _main_storescp(args) -> None:
    _measure(args.n, args.repeats, ("storescu", "c-store"), _run_to_storescp,
             "to storescp --ignore")  # fmt: skip


def _measure(n: int, repeats: int, hows, run_one, title: str) -> dict[str, float]:
    """``repeats`` rounds of ``run_one(work, files, how)`` for each sender, alternated so that
    drift in machine load hits all alike; prints and returns the median instances/s of each."""
    with tempfile.TemporaryDirectory(prefix="stow-bench-") as tmp:
        work = Path(tmp)
        files = _series(n, work / "derived")
        mb = sum(f.stat().st_size for f in files) / 1e6
        rates: dict[str, list[float]] = {how: [] for how in hows}
        for r in range(repeats):
            for how in rates:
                rates[how].append(run_one(work / f"{how}-{r}", files, how))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{len(files)} instances, {mb:.0f} MB, {title}, {repeats} runs")
    for how, rate in med.items():
        runs = ", ".join(f"{x:.0f}" for x in rates[how])
        print(f"  {how:<8} {rate:7.1f} instances/s  (runs: {runs})")
    print(f"  node C-STORE / storescu: {med['c-store'] / med['storescu']:.2f}")
    return med


if __name__ == "__main__":
    main()
