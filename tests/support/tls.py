"""Throwaway TLS certificates for tests, made with the ``openssl`` command line.

Example::

    from tests.support.tls import make_ca, TLSNodeProcess

    ca = make_ca(tmp_path / "ca")
    server = ca.issue(tmp_path / "server", "localhost")  # SAN: localhost and 127.0.0.1
    client = ca.issue(tmp_path / "client", "STORESCU")
    # dcmtk: +tls client.key client.crt +cf ca.cert -pw

:func:`make_ca` makes a self-signed CA; :meth:`CA.issue` an end-entity certificate (P-256 key,
unencrypted PEM) for both server and client authentication, with ``localhost`` and
``127.0.0.1`` as subject alternative names. :class:`TLSNodeProcess` is
:class:`~tests.support.node.NodeProcess` with ``node.tls`` set, that waits for a C-ECHO over TLS.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.node import ECHOSCU, NodeProcess, dcmtk_env

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

_CA_CNF = """\
[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_EXT = """\
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path), cwd=path.parent)  # fmt: skip


@dataclass(frozen=True)
class CertKey:
    """A PEM certificate and its unencrypted PEM private key."""

    cert: Path
    key: Path

    def dcmtk_args(self, ca: CA | Path | None = None) -> list[str]:
        """dcmtk options to use this certificate (``+tls KEY CERT``), trusting ``ca`` if given."""
        args = ["+tls", str(self.key), str(self.cert), "-pw"]
        if ca is not None:
            args += ["+cf", str(ca.cert if isinstance(ca, CA) else ca)]
        return args

    def tls_config(self, ca: CA | Path | None, **extra) -> dict:
        """A ``TLSConfig`` dict (for the YAML config) with this certificate and ``ca``."""
        out: dict = {"cert_file": str(self.cert), "key_file": str(self.key)}
        if ca is not None:
            out["ca_file"] = str(ca.cert if isinstance(ca, CA) else ca)
        return {**out, **extra}


@dataclass(frozen=True)
class CA(CertKey):
    def issue(self, directory: Path, common_name: str) -> CertKey:
        """A certificate signed by this CA, for ``localhost``/``127.0.0.1``, server and client."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        key, csr, cert = directory / "cert.key", directory / "cert.csr", directory / "cert.crt"
        ext = directory / "leaf.ext"
        ext.write_text(_LEAF_EXT)
        _new_key(key)
        _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={common_name}",
                 "-out", str(csr), cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-set_serial", str(time.time_ns()), "-days", "2", "-sha256",
                 "-extfile", str(ext), "-out", str(cert), cwd=directory)  # fmt: skip
        return CertKey(cert, key)


def make_ca(directory: Path, name: str = "Test CA") -> CA:
    """A new self-signed CA certificate and key in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key, cert, cnf = directory / "ca.key", directory / "ca.crt", directory / "ca.cnf"
    cnf.write_text(_CA_CNF)
    _new_key(key)
    _openssl("req", "-x509", "-new", "-key", str(key), "-subj", f"/CN={name}", "-days", "2",
             "-sha256", "-config", str(cnf), "-out", str(cert),
             cwd=directory)  # fmt: skip
    return CA(cert, key)


def echo_tls(
    port: int, client: CertKey, ca: CA, called_ae: str = "ACVTT", timeout: float = 5
) -> subprocess.CompletedProcess:
    """dcmtk echoscu over TLS with ``client``'s certificate, trusting ``ca``."""
    return subprocess.run(
        [ECHOSCU, "-to", str(timeout), "-ta", str(timeout), "-aet", "ECHOSCU", "-aec", called_ae,
         *client.dcmtk_args(ca), "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=timeout + 10,
    )  # fmt: skip


class TLSNodeProcess(NodeProcess):
    """A ``dicom-node serve`` with ``node.tls`` set; it is ready when a TLS C-ECHO is answered.

    ``echo_client`` is the certificate the readiness echo uses (it must be one the node accepts).
    """

    def __init__(
        self, directory: Path, tls: dict, echo_client: CertKey, ca: CA, overrides=None, **kw
    ):
        merged = {**(overrides or {})}
        merged["node"] = {**merged.get("node", {}), "tls": tls}
        super().__init__(directory, overrides=merged, **kw)
        self.echo_client, self.ca = echo_client, ca

    def ready_echo(self, timeout: float) -> subprocess.CompletedProcess:
        return echo_tls(self.port, self.echo_client, self.ca, self.AE_TITLE, timeout)
