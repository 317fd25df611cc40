"""A real `redis-server` on a free loopback port, that tests can kill and restart.

With `tls=TlsFiles(...)` it listens on TLS only (`--port 0 --tls-port`); its
`url` is then `rediss://...?ssl_ca_certs=<the CA>`, which redis-py's `from_url`
turns into a verified TLS connection. `make_tls_files` writes a throwaway CA
and a server certificate for 127.0.0.1 (with the `cryptography` package).
"""

from __future__ import annotations

import datetime
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


class TlsUnsupportedError(RuntimeError):
    """This redis-server was built without TLS (BUILD_TLS=no)."""


def make_tls_files(directory: Path, hostname: str = "127.0.0.1") -> TlsFiles:
    """A throwaway CA and a server certificate it signed, valid for `hostname` (an IP)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("gateway tests CA"))
        .issuer_name(name("gateway tests CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hostname))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(hostname))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "redis.pem", directory / "redis.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    return files


class RedisProcess:
    def __init__(self, binary: str, tls: TlsFiles | None = None) -> None:
        self._binary = binary
        self._tls = tls
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self._tls is not None:
            ca = quote(str(self._tls.ca), safe="/")
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _arguments(self) -> list[str]:
        if self._tls is None:
            return ["--port", str(self.port)]
        return [
            *("--port", "0", "--tls-port", str(self.port)),
            *("--tls-cert-file", str(self._tls.cert), "--tls-key-file", str(self._tls.key)),
            *("--tls-ca-cert-file", str(self._tls.ca), "--tls-auth-clients", "no"),
        ]

    def _ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as raw:
            if self._tls is None:
                raw.sendall(b"PING\r\n")
                return raw.recv(16).startswith(b"+PONG")
            context = ssl.create_default_context(cafile=str(self._tls.ca))
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.settimeout(1)
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

    def start(self) -> None:
        # The output is kept only to explain a failed start (e.g. no TLS support);
        # the server writes on to the unlinked file once it is closed here.
        with tempfile.TemporaryFile() as output:
            self._process = subprocess.Popen(
                [
                    self._binary,
                    *self._arguments(),
                    *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    if self._ping():
                        return
                except (OSError, ssl.SSLError):
                    time.sleep(0.02)
            self.kill()
            output.seek(0)
            log = output.read().decode(errors="replace").strip()
        if self._tls is not None and "TLS" in log and "not" in log.lower():
            raise TlsUnsupportedError(f"{self._binary} has no TLS support: {log}")
        raise RuntimeError(f"redis-server did not start: {log[-2000:]}")

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
