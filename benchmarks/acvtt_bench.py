"""ACVTT benchmark; a thin wrapper around `acvtt bench` (see docs/ACVTT.md).

python benchmarks/acvtt_bench.py --preset compact --shape 24,256,256 --factor 5
python benchmarks/acvtt_bench.py --preset paper --input lung1_image.nrrd --factor 5
"""

import sys

from acvtt_core.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])  # main(): failures end in one "error:" line, no traceback
