"""Client certificates for registers, issued from the operator's register CA.

A register with a client certificate logs in with SASL EXTERNAL: the broker
(``rabbitmq_auth_mechanism_ssl``, ``ssl_cert_login_from = common_name``) takes its user
from the certificate's common name, which is the register's broker user ``reg-<id>``. The
broker then enforces that user's permissions exactly as for a password login.

Certificates are made with the ``openssl`` command (on every Debian host with the broker)
so central needs no crypto library; the key is generated on central, goes into the
register's bundle, and is not kept. A fresh P-256 key and a random serial every time:
re-enrolling a register gives it a new certificate (revoking deletes its broker user, so
an old certificate no longer logs in).
"""

from __future__ import annotations

import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tillsync_protocol import ConfigError

__all__ = ["ClientCertificate", "issue_client_certificate"]

OPENSSL_TIMEOUT_S = 30.0

_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class ClientCertificate:
    """A register's certificate and private key, PEM (the key is a secret)."""

    common_name: str
    cert_pem: str
    key_pem: str

    def __repr__(self) -> str:
        return f"ClientCertificate(common_name={self.common_name!r}, key_pem='***')"


def issue_client_certificate(
    ca_cert_file: Path, ca_key_file: Path, common_name: str, *, days: int = 825
) -> ClientCertificate:
    """A client certificate for ``common_name`` signed by the CA; raises ``ConfigError``
    (field ``register_client_ca_cert_file``) if the CA cannot sign."""
    with tempfile.TemporaryDirectory(prefix="tillsync-cert-") as tmp:
        work = Path(tmp)  # mode 0700: the key is never readable by others
        (work / "ext.cnf").write_text(_EXTENSIONS, encoding="ascii")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(work / "key.pem"), "-out", str(work / "req.csr"),
            "-subj", f"/O=tillsync/OU=registers/CN={common_name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(work / "req.csr"),
            "-CA", str(ca_cert_file), "-CAkey", str(ca_key_file),
            "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(days), "-sha256",
            "-extfile", str(work / "ext.cnf"), "-out", str(work / "cert.pem"),
        )  # fmt: skip
        return ClientCertificate(
            common_name=common_name,
            cert_pem=(work / "cert.pem").read_text(encoding="ascii"),
            key_pem=(work / "key.pem").read_text(encoding="ascii"),
        )


def _openssl(*args: str) -> None:
    try:
        result = subprocess.run(
            ["openssl", *args],
            capture_output=True,
            text=True,
            timeout=OPENSSL_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise ConfigError(
            "the openssl command is needed to issue register certificates",
            field="register_client_ca_cert_file",
        ) from None
    if result.returncode != 0:
        # openssl's stderr names the file and the problem; it never prints key material.
        detail = " ".join(result.stderr.split())[:500]
        raise ConfigError(
            f"openssl {args[0]} failed: {detail}", field="register_client_ca_cert_file"
        )
