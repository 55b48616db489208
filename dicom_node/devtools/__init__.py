"""Development tools, not part of the running node: the sample scans that tests, benchmarks and
model training use (:mod:`~dicom_node.devtools.sample_data`), and the end-to-end demo behind
``./scripts/demo.sh`` (:mod:`~dicom_node.devtools.demo`). Nothing in the node imports them."""
