"""TLS for the simulator: the certificate given on the command line, or a self-signed one made here.

XOA ships with a self-signed certificate, so that is what a mount most often meets: `xofs sim --tls` makes
one (with the `openssl` command, Debian's `openssl` package) valid for `localhost` and `127.0.0.1` (and,
with `--host` other than those, for this machine's name and that address), which a client can trust with
`--ca-file <the certificate>`.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
from pathlib import Path

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"


class TlsSetupError(Exception):
    """No certificate could be made; the message says why in one line."""


def self_signed(directory: Path, *, days: int = 30, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate and its key in `directory` (made once, then reused): (cert, key), valid for
    localhost and, served on all addresses (`--host 0.0.0.0`), for this machine's name too."""
    cert, key = directory / CERT_NAME, directory / KEY_NAME
    if cert.exists() and key.exists():
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsSetupError("--tls needs the openssl command (apt-get install openssl), "
                            "or pass --tls-cert and --tls-key")
    directory.mkdir(parents=True, exist_ok=True)
    names = ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    if host not in ("127.0.0.1", "localhost", "::1"):
        names += [f"DNS:{socket.gethostname()}", f"DNS:{socket.getfqdn()}"]
        names += [f"IP:{host}"] if host not in ("0.0.0.0", "::", "") and _is_address(host) else []
        names += [] if _is_address(host) or not host else [f"DNS:{host}"]
    proc = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", str(days), "-subj", "/CN=xofs simulator", "-addext",
         "subjectAltName=" + ",".join(dict.fromkeys(names)), "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True)
    if proc.returncode:
        raise TlsSetupError(f"openssl could not make a certificate: {proc.stderr.strip()[-300:]}")
    key.chmod(0o600)
    return cert, key


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
