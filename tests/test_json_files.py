"""replace_json: the status file and a receiving process's association file are rewritten
while other processes read them."""

from __future__ import annotations

import json
import threading

import pytest

from dicom_node.json_files import replace_json


def test_a_reader_sees_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "status.json"
    replace_json(path, {"n": -1})
    stop = threading.Event()
    seen, broken = [], []

    def read():
        while not stop.is_set():
            text = path.read_text()
            try:
                seen.append(json.loads(text)["n"])
            except ValueError:
                broken.append(len(text))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(300):
            replace_json(path, {"n": n, "pad": "x" * 200_000})
    finally:
        stop.set()
        reader.join()
    assert broken == [] and seen
    assert json.loads(path.read_text())["n"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp file left


def test_a_failed_replace_raises_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "status.json"
    target.mkdir()  # a directory where the file should go: the rename fails
    with pytest.raises(OSError):
        replace_json(target, {"n": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    with pytest.raises(OSError):
        replace_json(tmp_path / "missing" / "status.json", {"n": 1})
