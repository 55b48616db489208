"""DICOM over TLS with real peers: the node (``node.tls``) receiving from dcmtk ``storescu +tls``
and :func:`send_instances` (with the context the scheduler builds from a destination's ``tls``)
sending to dcmtk ``storescp +tls``. Certificates come from a throwaway CA made with ``openssl``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import ConfigError, TLSConfig, parse_config
from dicom_node.config import Destination as DestinationConfig
from dicom_node.send import Destination, FailureKind, destination_from_config, send_instances
from tests.support.dcmtk import storescp
from tests.support.node import make_instances, send_with_storescu
from tests.support.tls import CA, CertKey, TLSNodeProcess, make_ca

QUIET = {"completion": {"quiet_seconds": 100000}}  # keep the pipeline away from these series
CALLING = "ACVTT_NODE"


class PKI:
    """One trusted CA with a server and a client certificate, and an unrelated CA with a client."""

    def __init__(self, root: Path):
        self.ca: CA = make_ca(root / "ca", "Test CA")
        self.server: CertKey = self.ca.issue(root / "server", "localhost")
        self.client: CertKey = self.ca.issue(root / "client", "STORESCU")
        self.other_ca: CA = make_ca(root / "other-ca", "Other CA")
        self.other_client: CertKey = self.other_ca.issue(root / "other-client", "STORESCU")
        self.other_server: CertKey = self.other_ca.issue(root / "other-server", "localhost")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_node(pki, tmp_path_factory):
    """A node that requires TLS with a client certificate from ``pki.ca``."""
    with TLSNodeProcess(
        tmp_path_factory.mktemp("tls-node"),
        tls=pki.server.tls_config(pki.ca),
        echo_client=pki.client,
        ca=pki.ca,
        overrides=QUIET,
    ) as n:
        yield n


@pytest.fixture(scope="module")
def sources(sample_data) -> list[Path]:
    return sorted(Path(sample_data.ct_dicom_repaired).glob("*.dcm"))[:3]


def _series(sources, tmp_path: Path, seed: str) -> list[Path]:
    """Three real CT instances with new UIDs (a series of their own)."""
    return make_instances(sources, 3, tmp_path / seed, seed=seed)


def _sop_uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _stored(node, files) -> int:
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    rows = node.sqlite(
        "select count(*) from instances i join series s on s.id = i.series_id"
        " where s.series_uid = ?",
        series,
    )
    return rows[0][0]


def _spooled(node, files) -> set[str]:
    """SOP Instance UIDs of the spool's files that belong to ``files``."""
    wanted = _sop_uids(files)
    return {u for u in _sop_uids(node.spool.rglob("*.dcm")) if u in wanted}


def _handshake_failures(node, more_than: int = -1, wait_s: float = 5) -> list[str]:
    """The node's "TLS handshake failed" log lines, once there are more than ``more_than``.

    (The TLS alert can reach the client just before the node writes its log line.)
    """
    deadline = time.monotonic() + wait_s
    while True:
        text = node.log_path.read_text()
        lines = [line for line in text.splitlines() if "TLS handshake failed" in line]
        if len(lines) > more_than or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# -- receiving ---------------------------------------------------------------------------------


def test_storescu_over_tls_is_stored_and_indexed(tls_node, pki, sources, tmp_path):
    files = _series(sources, tmp_path, "tls-ok")
    result = send_with_storescu(files, tls_node.port, extra_args=pki.client.dcmtk_args(pki.ca))
    assert result.returncode == 0, result.output[-2000:]
    assert result.acknowledged == set(files)
    assert _spooled(tls_node, files) == _sop_uids(files)
    assert _stored(tls_node, files) == 3
    assert tls_node.sqlite("select count(*) from instances")[0][0] >= 3


def test_plain_storescu_to_tls_node_fails_and_node_stays_up(tls_node, pki, sources, tmp_path):
    files = _series(sources, tmp_path, "plain")
    logged = len(_handshake_failures(tls_node))
    result = send_with_storescu(files, tls_node.port)
    assert result.returncode != 0
    assert result.statuses == {}
    assert _stored(tls_node, files) == 0
    assert _spooled(tls_node, files) == set()
    assert len(_handshake_failures(tls_node, logged)) == logged + 1

    # Still listening, and TLS still works.
    again = send_with_storescu(files, tls_node.port, extra_args=pki.client.dcmtk_args(pki.ca))
    assert again.returncode == 0, again.output[-2000:] + tls_node.log_tail()
    assert again.acknowledged == set(files)
    assert _stored(tls_node, files) == 3


def test_silent_tcp_connection_does_not_block_tls_callers(tls_node, pki, sources, tmp_path):
    """A client that connects but never starts TLS (a port check, a stuck peer) must not hold up
    everyone else: the handshake may not run in the server's accept loop."""
    files = _series(sources, tmp_path, "silent")
    logged = len(_handshake_failures(tls_node))
    with socket.create_connection(("127.0.0.1", tls_node.port)):
        time.sleep(0.2)  # let the server accept it
        t0 = time.monotonic()
        result = send_with_storescu(
            files, tls_node.port, extra_args=pki.client.dcmtk_args(pki.ca), timeout=20
        )
        elapsed = time.monotonic() - t0
    assert result.returncode == 0, result.output[-2000:]
    assert result.acknowledged == set(files)
    assert elapsed < 10
    # Closing it ends its handshake (and its thread) with a logged failure.
    assert "EOF" in _handshake_failures(tls_node, logged)[logged:][0]


@pytest.mark.parametrize("who", ["other-ca", "no-cert"])
def test_client_without_a_trusted_certificate_is_refused(tls_node, pki, sources, tmp_path, who):
    files = _series(sources, tmp_path, f"refused-{who}")
    if who == "other-ca":
        args = pki.other_client.dcmtk_args(pki.ca)  # trusts the node, but the node not it
        why = "certificate verify failed"
    else:
        args = ["+tla", "+cf", str(pki.ca.cert)]  # TLS without a client certificate
        why = "peer did not return a certificate"
    logged = len(_handshake_failures(tls_node))
    result = send_with_storescu(files, tls_node.port, extra_args=args)
    assert result.returncode != 0
    assert result.statuses == {}
    assert _stored(tls_node, files) == 0
    assert _spooled(tls_node, files) == set()
    new = _handshake_failures(tls_node, logged)[logged:]
    assert len(new) == 1 and why in new[0], new

    ok = send_with_storescu(files, tls_node.port, extra_args=pki.client.dcmtk_args(pki.ca))
    assert ok.acknowledged == set(files), ok.output[-2000:]


def test_client_certificate_optional_when_not_required(pki, sources, tmp_path):
    tls = pki.server.tls_config(pki.ca, require_client_cert=False)
    files = _series(sources, tmp_path, "optional")
    with TLSNodeProcess(
        tmp_path / "node", tls=tls, echo_client=pki.client, ca=pki.ca, overrides=QUIET
    ) as node:
        result = send_with_storescu(files, node.port, extra_args=["+tla", "+cf", str(pki.ca.cert)])
        assert result.returncode == 0, result.output[-2000:] + node.log_tail()
        assert result.acknowledged == set(files)
        assert _stored(node, files) == 3


def test_required_client_cert_without_ca_file_is_a_config_error(pki):
    tls = pki.server.tls_config(None)
    with pytest.raises(ConfigError, match="require_client_cert needs ca_file"):
        parse_config({"node": {"tls": tls}})
    assert parse_config({"node": {"tls": {**tls, "require_client_cert": False}}}).node.tls


# -- sending -----------------------------------------------------------------------------------


def _tls_destination(scp, client: CertKey, ca: CA, **kw) -> Destination:
    """A Destination built the way the scheduler builds it from a configured destination."""
    dcfg = DestinationConfig(
        name="tls-scp",
        ae_title=scp.ae_title,
        host=scp.host,
        port=scp.port,
        tls=TLSConfig(cert_file=client.cert, key_file=client.key, ca_file=ca.cert),
    )
    dest = destination_from_config(dcfg)
    return Destination(dest.ae_title, dest.host, dest.port, tls=dest.tls, **kw)


def _tls_storescp(tmp_path: Path, server: CertKey, trusted: CA):
    """storescp over TLS that requires a client certificate from ``trusted``."""
    return storescp(tmp_path, extra_args=server.dcmtk_args(trusted))


def test_send_instances_over_tls_to_storescp(pki, sources, tmp_path):
    files = _series(sources, tmp_path, "send-ok")
    with _tls_storescp(tmp_path / "scp", pki.server, pki.ca) as scp:
        dest = _tls_destination(scp, pki.client, pki.ca)
        assert "(TLS)" in str(dest)
        res = send_instances(dest, files, calling_ae_title=CALLING)
        assert res.ok and res.failure is None, res.failure
        assert [o.status for o in res.outcomes] == [0x0000] * 3
        assert _sop_uids(scp.received_files()) == _sop_uids(files)


def test_untrusted_server_certificate_fails_permanently(pki, sources, tmp_path):
    files = _series(sources, tmp_path, "send-bad-ca")
    with _tls_storescp(tmp_path / "scp", pki.other_server, pki.ca) as scp:
        res = send_instances(
            _tls_destination(scp, pki.client, pki.ca), files, calling_ae_title=CALLING
        )
        assert res.failure is not None
        assert res.failure.kind is FailureKind.PERMANENT, res.failure
        assert "certificate" in res.failure.reason, res.failure.reason
        assert not res.retryable and res.acknowledged == set()
        assert scp.received_files() == []


def test_server_hostname_is_checked(pki, sources, tmp_path):
    files = _series(sources, tmp_path, "send-hostname")
    with _tls_storescp(tmp_path / "scp", pki.server, pki.ca) as scp:
        dest = _tls_destination(scp, pki.client, pki.ca, tls_server_hostname="pacs.example.org")
        res = send_instances(dest, files, calling_ae_title=CALLING)
        assert res.failure is not None and res.failure.kind is FailureKind.PERMANENT
        assert "pacs.example.org" in res.failure.reason, res.failure.reason
        assert scp.received_files() == []


def test_peer_refusing_our_client_certificate_fails(pki, sources, tmp_path):
    files = _series(sources, tmp_path, "send-refused")
    with _tls_storescp(tmp_path / "scp", pki.server, pki.ca) as scp:
        res = send_instances(
            _tls_destination(scp, pki.other_client, pki.ca), files, calling_ae_title=CALLING
        )
        # TLS 1.3: the refusal comes after our side of the handshake, as an abort.
        assert res.failure is not None, res
        assert "certificate" in res.failure.reason, res.failure.reason
        assert res.acknowledged == set()
        assert scp.received_files() == []


def test_echo_cli_checks_the_certificate_like_sending(pki, tmp_path):
    """``dicom-node echo`` goes through the send path's TLS: ok with a trusted server, a clear
    permanent failure (exit 4) with an untrusted one."""
    import subprocess

    import yaml

    from tests.support.node import REPO_ROOT, dicom_node_command

    with (
        _tls_storescp(tmp_path / "good", pki.server, pki.ca) as good,
        _tls_storescp(tmp_path / "bad", pki.other_server, pki.ca) as bad,
    ):
        tls = {"cert_file": str(pki.client.cert), "key_file": str(pki.client.key)}
        tls["ca_file"] = str(pki.ca.cert)
        config = {
            "node": {"ae_title": CALLING},
            "destinations": [
                {"name": n, "ae_title": s.ae_title, "host": s.host, "port": s.port, "tls": tls}
                for n, s in (("good", good), ("bad", bad))
            ],
        }
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(config))

        def echo(name: str) -> subprocess.CompletedProcess:
            cmd = [*dicom_node_command(), "echo", name, "--config", str(path), "--timeout", "5"]
            return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

        ok = echo("good")
        assert ok.returncode == 0, ok.stderr
        assert "C-ECHO ok" in ok.stdout and "(TLS)" in ok.stdout
        refused = echo("bad")
        assert refused.returncode == 4, refused.stdout + refused.stderr
        assert "certificate" in refused.stderr and "(permanent)" in refused.stderr
