"""acvtt_core stays a numpy + torch library: no DICOM, SQL or node imports."""

import subprocess
import sys

MODULES = [
    "adapt",
    "attention",
    "bench",
    "checkpoint",
    "cli",
    "config",
    "device_sampler",
    "evaluate",
    "infer",
    "metrics",
    "model",
    "recipe",
    "selfsup",
    "train",
    "volume",
    "volume_io",
]


def test_no_dicom_sql_or_node_imports():
    code = (
        "import sys\n"
        + "".join(f"import acvtt_core.{m}\n" for m in MODULES)
        + "bad = [m for m in ('pydicom', 'pynetdicom', 'sqlalchemy', 'dicom_node', 'SimpleITK')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
