"""``model.torch_threads``: torch's CPU threads in a node's process (docs/SCALING.md: on a CPU
host, one single-threaded worker per core gave the most jobs per hour).

The setting is checked by the config schema, and a real ``dicom-node serve`` that loads the
shipped model on the CPU reports the threads torch uses in the nodes table (``devices``, shown
by ``dicom-node status``) and in its "model loaded" log line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from dicom_node.config import ConfigError, parse_config
from tests.support.node import NodeProcess
from tests.support.polling import wait_until
from tests.test_config_errors import base_config, run_cli


@pytest.mark.parametrize("bad", [0, -1, "two"])
def test_torch_threads_must_be_a_positive_count(tmp_path, bad):
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"torch_threads": bad}})
    assert [key for key, _ in info.value.errors] == ["model.torch_threads"]
    # The operator's command says so too, and exits 2 (configuration error).
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({**base_config(tmp_path), "model": {"torch_threads": bad}}))
    checked = run_cli("config", "check", "--config", str(path))
    assert checked.returncode == 2 and "model.torch_threads" in checked.stdout + checked.stderr


def test_torch_threads_default_is_torchs_own():
    assert parse_config({}).model.torch_threads is None
    assert parse_config({"model": {"torch_threads": 3}}).model.torch_threads == 3


def _torch_default_threads() -> int:
    """What torch picks by itself in a fresh process with this environment (a node's)."""
    code = "import torch; print(torch.get_num_threads())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_a_real_node_runs_torch_with_the_configured_threads(tmp_path):
    # A value torch would not pick by itself here, so that the test shows the setting acts.
    threads = 1 if _torch_default_threads() != 1 else 2
    overrides = {
        "node": {"id": "cpu-worker", "heartbeat_s": 0.5},
        "model": {"device": "cpu", "torch_threads": threads},
    }
    expected = f"cpu ({threads} thread{'' if threads == 1 else 's'})"
    with NodeProcess(tmp_path / "node", overrides=overrides) as node:

        def devices() -> str | None:
            rows = node.sqlite("select devices from nodes where id = ?", "cpu-worker")
            return rows[0][0] if rows else None

        shown = wait_until(devices, 120, "the node to report its loaded model", interval=0.3)
        assert shown == expected, node.log_tail()
        status = node.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        (row,) = json.loads(status.stdout)["nodes"]
        assert row["devices"] == expected
        log = node.log_path.read_text(errors="replace")
        assert f"torch_threads={threads}" in log, node.log_tail()
