"""``python -m dicom_node.sample_data``: the sample-data command as README.md, the docs and the
training scripts have long given it, kept working (scripts and notes outside this repository use
it, and a GPU machine's checkout may run an older script). The code is
:mod:`dicom_node.devtools.sample_data`; import from there."""

from __future__ import annotations

from dicom_node.devtools.sample_data import main

if __name__ == "__main__":
    main()
