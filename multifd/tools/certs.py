"""multifd-certs DIR --server-name NAME [--server-name NAME ...] [--client-name CN] [--days N]
[--force]

A private CA and the certificates for mutual TLS between multifd-send and multifd-recv. The
files carry the names of QEMU's tls-creds-x509 objects, so a directory made for QEMU migration
works here unchanged, and the reverse:

    ca-cert.pem       the CA both sides trust (0644)
    ca-key.pem        the CA's private key (0600): only needed to issue more certificates;
                      it does not belong on the machines that migrate
    server-cert.pem   the receiver's certificate; its subjectAltName lists the names and IP
    server-key.pem    addresses the sender may connect to (key 0600)
    client-cert.pem   the sender's certificate; its common name is the client identity the
    client-key.pem    receiver's --tls-allow-client checks (key 0600)

Keys are EC P-256, signatures SHA-256, and keys are written as unencrypted PKCS#8 PEM.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shlex
import sys
from collections.abc import Sequence
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import args as cliargs
from ..errors import UsageError

PROG = "multifd-certs"
# Backdated so that a peer whose clock is a little behind accepts a certificate made just now.
CLOCK_SKEW = datetime.timedelta(minutes=5)


class Issued(NamedTuple):
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _common_name(text: str) -> x509.Name:
    # X.509 caps a common name at 64 characters (RFC 5280 ub-common-name).
    if not 1 <= len(text) <= 64 or not text.isprintable():
        raise UsageError(f"common name {text!r} must be 1..64 printable characters")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _san_entry(name: str) -> x509.GeneralName:
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        if getattr(address, "scope_id", None):
            raise UsageError(f"server name {name!r}: a scoped IPv6 address cannot be certified")
        return x509.IPAddress(address)
    if not name or not name.isascii() or any(c.isspace() or not c.isprintable() for c in name):
        raise UsageError(f"server name {name!r} is not a host name or IP address "
                         "(non-empty ASCII, no whitespace)")
    return x509.DNSName(name)


def _issue(subject: x509.Name, issuer: Issued | None, key: ec.EllipticCurvePrivateKey,
           extensions: list[tuple[x509.ExtensionType, bool]],
           not_before: datetime.datetime | None, days: int) -> x509.Certificate:
    if days < 1:
        raise UsageError(f"validity of {days} days: must be at least 1")
    if not_before is None:
        not_before = datetime.datetime.now(datetime.timezone.utc) - CLOCK_SKEW
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(subject if issuer is None else issuer.cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_before + datetime.timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    if issuer is not None:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key if issuer is None else issuer.key, hashes.SHA256())


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment",
                           "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                           "encipher_only", "decipher_only"), False)
    return x509.KeyUsage(**{**flags, **allowed})


def new_ca(common_name: str = "multifd CA", *, not_before: datetime.datetime | None = None,
           days: int = 3650) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(_common_name(common_name), None, key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_key_usage(key_cert_sign=True, crl_sign=True), True),
    ], not_before, days)
    return Issued(cert, key)


def _new_leaf(ca: Issued, common_name: str, purpose: x509.ObjectIdentifier,
              extra: list[tuple[x509.ExtensionType, bool]],
              not_before: datetime.datetime | None, days: int) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(_common_name(common_name), ca, key, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        # keyEncipherment as well, although an EC key enciphers nothing: QEMU's own checks
        # (in releases before late 2025) refuse a server or client certificate without it.
        (_key_usage(digital_signature=True, key_encipherment=True), True),
        (x509.ExtendedKeyUsage([purpose]), False),
        *extra,
    ], not_before, days)
    return Issued(cert, key)


def new_server(ca: Issued, names: Sequence[str], *, common_name: str | None = None,
               not_before: datetime.datetime | None = None, days: int = 825) -> Issued:
    if isinstance(names, str):  # one name passed bare would become one name per character
        names = [names]
    if not names:
        raise UsageError("a server certificate needs at least one --server-name")
    san = x509.SubjectAlternativeName([_san_entry(n) for n in dict.fromkeys(names)])
    if common_name is None:
        # Clients check the subjectAltName; the common name is only a label, so a long DNS
        # name does not have to fit in it.
        common_name = names[0] if len(names[0]) <= 64 else "multifd server"
    return _new_leaf(ca, common_name, ExtendedKeyUsageOID.SERVER_AUTH, [(san, False)],
                     not_before, days)


def new_client(ca: Issued, common_name: str = "multifd-client", *,
               not_before: datetime.datetime | None = None, days: int = 825) -> Issued:
    return _new_leaf(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [], not_before, days)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# QEMU's file names, in the order write_set writes them.
_FILES = {"ca-cert.pem": ("CA certificate", 0o644), "ca-key.pem": ("CA private key", 0o600),
          "server-cert.pem": ("server certificate", 0o644),
          "server-key.pem": ("server private key", 0o600),
          "client-cert.pem": ("client certificate", 0o644),
          "client-key.pem": ("client private key", 0o600)}


def describe(path: str) -> str:
    """'certs/server-key.pem' -> 'server private key (0600)'."""
    what, mode = _FILES[os.path.basename(path)]
    return f"{what} ({mode:04o})"


def _stage(directory: str, name: str, mode: int, data: bytes) -> str:
    """Write data to a temporary name beside `name`; return that name."""
    tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}")
    # A key exists only with mode 0600, from its creation on; fchmod on the still empty file
    # only makes the mode exact under any umask (a 0400 key or 0600 certificate would surprise).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, mode)
            f.write(data)
            f.flush()
            os.fsync(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_set(directory: str, *, ca: Issued | None = None, ca_key: bool = True,
              server: Issued | None = None, client: Issued | None = None,
              force: bool = False) -> list[str]:
    owners = [ca, ca if ca_key else None, server, server, client, client]
    plan = []
    for (name, (_, mode)), owner in zip(_FILES.items(), owners):
        if owner is not None:
            data = (owner.cert.public_bytes(serialization.Encoding.PEM)
                    if name.endswith("-cert.pem") else _pem_key(owner.key))
            plan.append((name, mode, data))
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise UsageError(f"{directory} is not a directory")
    if not force:
        for name, _, _ in plan:
            if os.path.lexists(os.path.join(directory, name)):
                raise UsageError(f"{os.path.join(directory, name)} already exists "
                                 "(pass --force to replace it)")
    if not os.path.isdir(directory):
        try:
            # Parents too, as mkdir -p makes them (the ones made here get the umask's mode).
            os.makedirs(directory, 0o700)
        except OSError as exc:
            raise UsageError(f"cannot create {directory}: {exc.strerror or exc}") from None
    # Every file is written in full before the first rename: a full disk or a read-only
    # directory leaves no half set behind that the next run would refuse to overwrite.
    staged: list[tuple[str, str]] = []
    try:
        try:
            for name, mode, data in plan:
                staged.append((_stage(directory, name, mode, data), os.path.join(directory, name)))
            for tmp, path in staged:
                os.replace(tmp, path)
        finally:
            for tmp, _ in staged:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # so that the renames, too, survive a crash
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise UsageError(f"cannot write to {directory}: {exc.strerror or exc}") from None
    return [path for _, path in staged]


def generate(directory: str, server_names: Sequence[str], *, client_name: str = "multifd-client",
             days: int = 825, force: bool = False) -> list[str]:
    # The CA outlives what it signs: a leaf is rejected once its CA has expired.
    ca = new_ca(days=max(3650, days))
    server = new_server(ca, server_names, days=days)
    client = new_client(ca, client_name, days=days)
    return write_set(directory, ca=ca, server=server, client=client, force=force)


def _days(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 36500:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days in 1..36500")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = cliargs.Parser(prog=PROG, description="Write a CA, a server and a client certificate "
                   "for mutual TLS, with QEMU's tls-creds-x509 file names.")
    p.add_argument("directory", metavar="DIR", help="created (mode 0700) if missing")
    p.add_argument("--server-name", action="append", required=True, metavar="NAME",
                   help="a host name or IP address the sender connects to (repeatable)")
    p.add_argument("--client-name", default="multifd-client", metavar="CN",
                   help="the client's identity, for --tls-allow-client (default multifd-client)")
    p.add_argument("--days", type=_days, default=825, metavar="N",
                   help="validity of the server and client certificates (default 825)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    args = p.parse_args(argv)
    try:
        written = generate(args.directory, args.server_name, client_name=args.client_name,
                           days=args.days, force=args.force)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 2
    width = max(len(path) for path in written)
    for path in written:
        print(f"{path:<{width}}  {describe(path)}")
    d = shlex.quote(args.directory)
    print(f"use: multifd-recv --tls {d} ...  /  multifd-send --tls {d} ...  "
          "(ca-key.pem is not needed there)", flush=True)
    return 0


def entry() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    entry()
