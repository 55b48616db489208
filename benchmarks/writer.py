"""Derived-series writer: seconds to build and write the derived files of a long series.

    python benchmarks/writer.py [--slices 1000] [--matrix 512] [--factor 2]

The sources are the first header of the real 20-slice sample series repeated ``--slices`` times
with new SOP Instance UIDs and positions 2 mm apart (headers only: the writer needs no source
pixels). The volume is zeros of the derived shape, so only the writer is timed: building the
datasets, encoding the pixels and writing Explicit VR Little Endian files to a temporary folder.
``--matrix`` below 512 shrinks Rows/Columns, which shows the per-file overhead apart from pixel
bytes. Prints slices in and out, wall and CPU seconds (CPU time is the steadier figure on a
shared machine) and the wall milliseconds per derived file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import pydicom

from dicom_node.devtools.sample_data import fetch_sample_data
from dicom_node.write import write_derived_series


def sources(n: int, matrix: int) -> list[pydicom.Dataset]:
    first = sorted(Path(fetch_sample_data().ct_dicom_repaired).glob("*.dcm"))[0]
    header = pydicom.dcmread(first, stop_before_pixels=True)
    x, y, z = (float(v) for v in header.ImagePositionPatient)
    out = []
    for k in range(n):
        ds = deepcopy(header)
        ds.SOPInstanceUID = f"2.25.{10**30 + k}"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [x, y, z - 2.0 * k]
        ds.SliceLocation = z - 2.0 * k
        ds.Rows = ds.Columns = matrix
        out.append(ds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--factor", type=int, default=2)
    args = parser.parse_args()
    srcs = sources(args.slices, args.matrix)
    n_out = (args.slices - 1) * args.factor + 1
    volume = np.zeros((n_out, args.matrix, args.matrix), np.float32)
    with tempfile.TemporaryDirectory() as out:
        t0, cpu0 = time.perf_counter(), time.process_time()
        derived = write_derived_series(
            srcs, volume, factor=args.factor, model_id="bench", model_version="1", out_dir=out
        )
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n = len(derived.datasets)
    print(
        f"writer: {args.slices} slices in -> {n} out, {args.matrix}x{args.matrix}: "
        f"{seconds:.1f} s wall, {cpu:.1f} s CPU ({1000 * seconds / n:.1f} ms per derived file)"
    )


if __name__ == "__main__":
    main()
