"""`dworkers dev-certs DIR`: a local CA and certificates signed by it, for
demos and tests (production certificates come from your own CA or
cert-manager).

    ca.pem                      the CA every process trusts (--tls-ca)
    server.pem, server-key.pem  masters and frontends (--tls-cert, --tls-key);
                                also a client certificate for mutual TLS
    NAME.pem, NAME-key.pem      a client certificate per --client NAME (its
                                common name is NAME: an identity for roles)

ECDSA P-256 keys, written readable by the owner only; valid for --days."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dworkers.common.errors import ConfigError

SERVER_NAMES = ("localhost", "127.0.0.1", "::1", "dworkers-master", "dworkers-frontend")
DEFAULT_CLIENTS = ("worker", "frontend", "admin")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def add_parser(sub) -> None:
    p = sub.add_parser("dev-certs", help="make a local CA and TLS certificates (demos and tests)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="directory to write them to (created if missing)")
    p.add_argument("--host", action="append", default=[],
                   help=f"another name or IP the server certificate is valid for (always: {', '.join(SERVER_NAMES)})")
    p.add_argument("--client", action="append", default=None,
                   help=f"a client certificate with this common name (default: {', '.join(DEFAULT_CLIENTS)})")
    p.add_argument("--days", type=int, default=365, help="validity in days")
    p.set_defaults(func=main, log_format="text", log_level="WARNING")


def main(args) -> None:
    clients = args.client or list(DEFAULT_CLIENTS)
    for name in clients:
        if not NAME.match(name) or name in ("ca", "server"):
            raise ConfigError(f"client name {name!r}: letters, digits, '.', '_' or '-', not 'ca' or 'server'")
    if not 1 <= args.days <= 3650:
        raise ConfigError("--days must be between 1 and 3650")
    written = make(Path(args.dir), hosts=args.host, clients=clients, days=args.days)
    print(f"wrote {', '.join(p.name for p in written)} to {args.dir}")


def make(directory: Path, hosts: Sequence[str] = (), clients: Sequence[str] = DEFAULT_CLIENTS,
         days: int = 365) -> list[Path]:
    """A new CA in `directory`, a server certificate and client certificates."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dworkers development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    written = [_write(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
               _write_key(directory / "ca-key.pem", ca_key)]
    written += _issue(directory, "server", "dworkers", [*SERVER_NAMES, *hosts], ca, ca_key, days, server=True)
    for name in clients:
        written += _issue(directory, name, name, [], ca, ca_key, days, server=False)
    return written


def make_server(directory: Path, ca_pem: Path, ca_key_pem: Path, hosts: Sequence[str] = (),
                days: int = 365) -> list[Path]:
    """A new server certificate and key from an existing CA (a renewal)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_pem.read_bytes(), password=None)
    return _issue(directory, "server", "dworkers", [*SERVER_NAMES, *hosts], ca, ca_key, days, server=True)


def _issue(directory: Path, stem: str, common_name: str, names: list[str], ca: x509.Certificate, ca_key,
           days: int, server: bool) -> list[Path]:
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in dict.fromkeys(names)]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    # The key first: a process reloading in between sees a new key with the
    # old certificate, a mismatch it ignores until the certificate arrives.
    return [_write_key(directory / f"{stem}-key.pem", key),
            _write(directory / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))]


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def _write_key(path: Path, key) -> Path:
    return _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), mode=0o600)
