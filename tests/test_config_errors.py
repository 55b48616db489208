"""Configuration mistakes, as an administrator makes them, through the real CLI.

Each one must give exactly one line ``error: FILE: key.path: reason`` and exit 2, from
``dicom-node config check`` and from ``dicom-node serve`` alike (issue 10, defect 8): never a
traceback, never a misleading "cannot listen", never a node that starts and fails later.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.support.dcmtk import free_port
from tests.support.node import REPO_ROOT, dicom_node_command
from tests.support.tls import make_ca

SETPRIV = "/usr/bin/setpriv"
NOBODY = 65534


def base_config(directory: Path) -> dict:
    """A config that passes every check: the cases below break one thing each."""
    return {
        "node": {"ae_title": "ACVTT", "bind_address": "127.0.0.1", "port": free_port()},
        "allowed_callers": [{"ae_title": "STORESCU", "host": "127.0.0.1"}],
        "storage": {"spool_dir": str(directory / "spool"), "min_free_bytes": 0},
        "database": {"url": f"sqlite:///{directory / 'node.db'}"},
    }


def run_cli(*args: str, prefix: list[str] | None = None, timeout: float = 60):
    """``dicom-node ARGS``; a ``serve`` that starts instead of refusing times out (a failure)."""
    return subprocess.run(
        [*(prefix or []), *dicom_node_command(), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_error_line(proc, config: Path, key: str, reason: str) -> None:
    """Exit 2 and exactly ``error: <config>: <key>: <reason...>`` on stderr, nothing else."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    shape = rf"error: {re.escape(str(config))}: {re.escape(key)}: \S.*"
    assert re.fullmatch(shape, lines[0]), lines[0]
    assert reason in lines[0], lines[0]
    assert "cannot listen" not in out


def check_both_commands(config: Path, key: str, reason: str, prefix: list[str] | None = None):
    for command in (["config", "check"], ["serve"]):
        proc = run_cli(*command, "--config", str(config), prefix=prefix, timeout=45)
        assert_one_error_line(proc, config, key, reason)


def write(directory: Path, config: dict | str) -> Path:
    path = directory / "node.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


# -- one mistake each ----------------------------------------------------------------------------


def _bad_regex(d: Path) -> dict:
    cfg = base_config(d)
    cfg["rules"] = [
        {"name": "r", "match": {"series_description_regex": "(ax"}, "action": {"factor": 2}}
    ]
    return cfg


def _reversed_spacing(d: Path) -> dict:
    cfg = base_config(d)
    cfg["rules"] = [{"name": "r", "match": {"spacing_mm": [10, 1.5]}, "action": {"factor": 2}}]
    return cfg


def _duplicate_callers(d: Path) -> dict:
    cfg = base_config(d)
    cfg["allowed_callers"] = [
        {"ae_title": "STORESCU", "host": "127.0.0.1"},
        {"ae_title": "PACS", "host": "10.0.0.0/8"},
        {"ae_title": "STORESCU", "host": "127.0.0.1/32"},  # the same network, written otherwise
    ]
    return cfg


def _unparsable_db_url(d: Path) -> dict:
    cfg = base_config(d)
    cfg["database"]["url"] = f"sqlite//{d / 'node.db'}"  # a slash short
    return cfg


def _unknown_db_kind(d: Path) -> dict:
    cfg = base_config(d)
    cfg["database"]["url"] = "postgress://node@localhost/node"
    return cfg


def _spool_is_a_file(d: Path) -> dict:
    (d / "spool-file").write_text("not a directory")
    cfg = base_config(d)
    cfg["storage"]["spool_dir"] = str(d / "spool-file")
    return cfg


def _spool_parent_missing(d: Path) -> dict:
    cfg = base_config(d)
    cfg["storage"]["spool_dir"] = str(d / "no-such-dir" / "spool")
    return cfg


def _no_callers(d: Path) -> dict:
    cfg = base_config(d)
    cfg["allowed_callers"] = []
    return cfg


def _tls_cert_missing(d: Path) -> dict:
    ca = make_ca(d / "ca")
    leaf = ca.issue(d / "leaf", "localhost")
    cfg = base_config(d)
    cfg["node"]["tls"] = leaf.tls_config(ca) | {"cert_file": str(d / "missing.crt")}
    return cfg


def _tls_key_garbage(d: Path) -> dict:
    ca = make_ca(d / "ca")
    leaf = ca.issue(d / "leaf", "localhost")
    (d / "garbage.key").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    cfg = base_config(d)
    cfg["node"]["tls"] = leaf.tls_config(ca) | {"key_file": str(d / "garbage.key")}
    return cfg


def _destination_ca_missing(d: Path) -> dict:
    ca = make_ca(d / "ca")
    leaf = ca.issue(d / "leaf", "ACVTT")
    cfg = base_config(d)
    tls = leaf.tls_config(ca) | {"ca_file": str(d / "missing-ca.crt")}
    cfg["destinations"] = [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "tls": tls}
    ]
    return cfg


CASES: dict[str, tuple[Callable[[Path], dict | str], str, str]] = {
    # name: (config builder, key path, a part of the reason)
    "bad regex": (_bad_regex, "rules.0.match.series_description_regex", "invalid regular expr"),
    "reversed spacing": (_reversed_spacing, "rules.0.match.spacing_mm", "greater than max"),
    "duplicate callers": (_duplicate_callers, "allowed_callers", "entries 0 and 2 are the same"),
    "unparsable db url": (_unparsable_db_url, "database.url", "cannot parse"),
    "unknown db kind": (_unknown_db_kind, "database.url", "unknown database kind"),
    "spool is a file": (_spool_is_a_file, "storage.spool_dir", "is not a directory"),
    "spool parent missing": (_spool_parent_missing, "storage.spool_dir", "does not exist"),
    "no callers": (_no_callers, "allowed_callers", "every association would be rejected"),
    "empty file": (lambda d: "# only a comment\n", "<file>", "the file has no settings"),
    "tls cert missing": (_tls_cert_missing, "node.tls.cert_file", "No such file or directory"),
    "tls key garbage": (_tls_key_garbage, "node.tls.cert_file", "cannot load"),
    "destination ca missing": (
        _destination_ca_missing,
        "destinations.0.tls.ca_file",
        "No such file or directory",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_mistake_is_one_line_and_exit_2(tmp_path, case):
    build, key, reason = CASES[case]
    config = write(tmp_path, build(tmp_path))
    check_both_commands(config, key, reason)
    assert not (tmp_path / "node.db").exists()  # serve stopped before it touched anything


def test_good_config_passes(tmp_path):
    """The base of every case above is fine: each case fails for its own mistake only."""
    config = write(tmp_path, base_config(tmp_path))
    proc = run_cli("config", "check", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert f"{config}: ok" in proc.stdout
    assert not (tmp_path / "spool").exists()  # config check creates nothing


# -- nothing created outside what the config names ------------------------------------------------


def test_no_directory_is_created_for_the_database_or_the_spool_parent(tmp_path):
    """As root, a missing directory under / was created by serve. Now neither serve nor
    db upgrade creates a missing parent directory; both name the key and exit 2."""
    stray = Path("/") / f"dicom-node-test-{uuid.uuid4().hex[:12]}"
    try:
        cfg = base_config(tmp_path)
        cfg["database"]["url"] = f"sqlite:///{stray / 'node.db'}"
        config = write(tmp_path, cfg)
        check_both_commands(config, "database.url", f"directory {stray} of the SQLite file")
        assert_one_error_line(
            run_cli("db", "upgrade", "--config", str(config)), config, "database.url", str(stray)
        )
        assert not stray.exists()

        cfg = base_config(tmp_path)
        cfg["storage"]["spool_dir"] = str(stray / "spool")
        config = write(tmp_path, cfg)
        check_both_commands(config, "storage.spool_dir", f"parent directory {stray}")
        assert not stray.exists()
    finally:
        if stray.exists():  # only the old behaviour leaves it; do not leave it for the next run
            shutil.rmtree(stray)


def test_missing_spool_is_created_when_its_parent_exists(tmp_path):
    """The one directory the node does create: the spool itself, inside an existing one."""
    from tests.support.node import NodeProcess

    with NodeProcess(tmp_path / "n") as node:
        assert node.spool.is_dir()


# -- a spool the node's user cannot write ---------------------------------------------------------


def _unprivileged() -> list[str]:
    """Run as an unprivileged user: root writes through any permission bits."""
    if os.geteuid() != 0:
        return []
    if not Path(SETPRIV).exists():
        pytest.skip("running as root without setpriv: cannot drop privileges")
    return [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


@pytest.fixture
def shared_dir():
    """A directory the unprivileged user can reach (pytest's tmp_path is root-only, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="dicom-node-cfg-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unwritable_spool(shared_dir):
    prefix = _unprivileged()
    spool = shared_dir / "spool"
    spool.mkdir(mode=0o555)
    spool.chmod(0o555)  # mkdir's mode is masked by the umask
    db_dir = shared_dir / "db"
    db_dir.mkdir()
    db_dir.chmod(0o777)  # only the spool is wrong
    cfg = base_config(shared_dir)
    cfg["database"]["url"] = f"sqlite:///{db_dir / 'node.db'}"
    config = write(shared_dir, cfg)
    config.chmod(0o644)
    # The test means something only if the user really cannot write there.
    probe = subprocess.run([*prefix, "/usr/bin/touch", str(spool / "probe")], capture_output=True)
    assert probe.returncode != 0, "the spool is writable for the test user: the test is void"

    check_both_commands(config, "storage.spool_dir", "Permission denied", prefix=prefix)
    assert not (db_dir / "node.db").exists()
