"""Mutual TLS for every channel, through the stdlib `ssl` module.

Credentials come from one directory with the file names of QEMU's tls-creds-x509 objects, so
QEMU migration certificates work unchanged (`multifd-certs` makes a development set):

    receiver: ca-cert.pem, server-cert.pem, server-key.pem
    sender:   ca-cert.pem, and client-cert.pem + client-key.pem when it has an identity

TLS 1.3 only. The sender checks the receiver's certificate against the CA and the name it
dialled (or --tls-hostname); the receiver always requires a client certificate signed by the
CA and, with --tls-allow-client, one of the listed common names.

Loading is checked file by file, so a missing or unreadable credential is a usage error naming
that file. `explain()` turns OpenSSL's failures into one line that says which side rejected
what; it is pure, like the wire module, and tested on real failures in the TLS matrix.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from .errors import Stage, UsageError

CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"

# The first bytes of a TLS handshake record (type 22, version 3.x).
TLS_RECORD_PREFIX = b"\x16\x03"


@dataclass(frozen=True)
class ClientTls:
    context: ssl.SSLContext
    hostname: str | None  # checked instead of the dialled host (--tls-hostname)
    has_identity: bool


@dataclass(frozen=True)
class ServerTls:
    context: ssl.SSLContext
    allowed_clients: frozenset[str]  # empty: any certificate the CA signed

    def allows(self, common_name: str | None) -> bool:
        return not self.allowed_clients or common_name in self.allowed_clients


def _readable(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise UsageError(f"TLS credentials: {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"TLS credentials: {path}: is a directory") from None
    except OSError as exc:
        raise UsageError(f"TLS credentials: {path}: {exc.strerror or exc}") from None
    return path


def _check_directory(directory: str) -> None:
    if not os.path.isdir(directory):
        what = "no such directory" if not os.path.exists(directory) else "not a directory"
        raise UsageError(f"TLS credentials: {directory}: {what}")


def _context(purpose: int, directory: str, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ca = _readable(directory, CA_CERT)
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise UsageError(f"TLS credentials: {ca}: not a PEM CA certificate "
                         f"({exc.reason or exc})") from None
    if cert is not None and key is not None:
        cert_path, key_path = _readable(directory, cert), _readable(directory, key)

        def no_passphrase():
            # OpenSSL would otherwise prompt on the terminal: an unbounded wait.
            raise UsageError(f"TLS credentials: {key_path}: an encrypted private key "
                             f"(only unencrypted keys are supported)")

        try:
            ctx.load_cert_chain(cert_path, key_path, password=no_passphrase)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise UsageError(f"TLS credentials: {_blame(cert_path, key_path)} "
                             f"({reason})") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _blame(cert_path: str, key_path: str) -> str:
    """Which of a certificate and its key is unusable, for the error line."""
    try:
        with open(cert_path) as f:
            ssl.PEM_cert_to_DER_cert(f.read())
    except (ValueError, UnicodeDecodeError):
        return f"{cert_path}: not a PEM certificate"
    return f"{key_path}: not a PEM private key, or not the key of {os.path.basename(cert_path)}"


def client_tls(directory: str, hostname: str | None = None) -> ClientTls:
    """The sender's TLS settings; raises UsageError naming the file at fault."""
    _check_directory(directory)
    present = [os.path.lexists(os.path.join(directory, n)) for n in (CLIENT_CERT, CLIENT_KEY)]
    if any(present) and not all(present):
        missing = CLIENT_KEY if present[0] else CLIENT_CERT
        raise UsageError(f"TLS credentials: {os.path.join(directory, missing)}: no such file "
                         f"(needed with {CLIENT_CERT if present[0] else CLIENT_KEY})")
    has_identity = all(present)
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, directory,
                   CLIENT_CERT if has_identity else None, CLIENT_KEY if has_identity else None)
    if hostname is not None:
        try:  # the check ssl would make at the first connection, made before any
            ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=hostname)
        except (ValueError, UnicodeError) as exc:
            raise UsageError(f"--tls-hostname {hostname!r}: not a host name or address "
                             f"({exc})") from None
    return ClientTls(ctx, hostname, has_identity)


def server_tls(directory: str, allowed_clients=()) -> ServerTls:
    """The receiver's TLS settings; raises UsageError naming the file at fault."""
    _check_directory(directory)
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, directory, SERVER_CERT, SERVER_KEY)
    # No TLS 1.3 session tickets: a client that never reads (a QEMU source never reads its
    # multifd channels) would close with them unread, and its kernel then resets the
    # connection, which can destroy the last data it sent before we have read it.
    ctx.num_tickets = 0
    return ServerTls(ctx, frozenset(allowed_clients))


def common_name(peer_cert: dict | None) -> str | None:
    """The subject CN of a certificate as returned by SSLSocket.getpeercert(), or None unless
    there is exactly one: with several, which one is "the" identity depends on the reader."""
    names = [value for rdn in (peer_cert or {}).get("subject", ())
             for key, value in rdn if key == "commonName"]
    return names[0] if len(names) == 1 else None


# Alerts the peer sent us, by OpenSSL reason: what the peer refused.
_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "{peer} requires a client certificate{hint}",
    "TLSV1_ALERT_UNKNOWN_CA": "{peer} does not trust our certificate (not signed by its CA)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "{peer} rejected our certificate: expired or not yet "
                                       "valid",
    "SSLV3_ALERT_BAD_CERTIFICATE": "{peer} rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "{peer} rejected our certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "{peer} rejected our certificate (bad signature)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "{peer} does not accept TLS 1.3",
    "UNSUPPORTED_PROTOCOL": "{peer} does not accept TLS 1.3",
    "TLSV1_ALERT_ACCESS_DENIED": "{peer} refused access",
}
# Things we found wrong with the peer's bytes.
_NOT_TLS = {
    "WRONG_VERSION_NUMBER": "{peer} does not speak TLS",
    "HTTP_REQUEST": "{peer} sent an HTTP request, not TLS",
    "PACKET_LENGTH_TOO_LONG": "{peer} does not speak TLS",
    "RECORD_LAYER_FAILURE": "{peer} does not speak TLS",
    "UNEXPECTED_EOF_WHILE_READING": "{peer} closed the connection{during}",
    "NO_SHARED_CIPHER": "{peer} offers no cipher we accept",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "{peer} sent no client certificate, and this receiver "
                                         "requires one",
}
# X509_V_ERR_* codes of the peer certificate check.
_VERIFY = {
    9: "{peer}'s certificate is not valid yet",
    10: "{peer}'s certificate has expired",
    18: "{peer}'s certificate is self-signed, not signed by our CA ({ca})",
    19: "{peer}'s certificate is not signed by our CA ({ca})",
    20: "{peer}'s certificate is not signed by our CA ({ca})",
    21: "{peer}'s certificate is not signed by our CA ({ca})",
    26: "{peer}'s certificate is not meant for this use",
    62: "{peer}'s certificate does not match the name {name!r} "
        "(--tls-hostname checks another name)",
    64: "{peer}'s certificate does not match the address {name!r} "
        "(--tls-hostname checks another name)",
}


# When the peer left, by the stage we were in: in the hello stage the sender waits for the
# reply, the receiver for the hello itself.
_DURING = {Stage.TLS: " during the TLS handshake", Stage.HELLO: " before answering the hello",
           f"{Stage.HELLO}@receiver": " before its hello was complete"}


def explain(exc: BaseException, *, peer: str, name: str | None = None, stage: Stage = Stage.TLS,
            hint: str = "", side: str = "sender") -> str | None:
    """One line for an ssl failure on a connection to `peer` ("the receiver", "the sender")
    at `stage`, seen from `side`; None if `exc` is not an ssl error. `name` is the host name
    the certificate was checked against."""
    if not isinstance(exc, ssl.SSLError):
        return None
    during = _DURING.get(f"{stage}@{side}", _DURING.get(stage))
    fields = dict(peer=peer, name=name, ca=CA_CERT, hint=hint,
                  during=during or " without a TLS close (the stream may be truncated)")
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = _VERIFY.get(exc.verify_code)
        if text is None:
            return f"{peer}'s certificate was rejected: {exc.verify_message}"
        return text.format(**fields)
    reason = exc.reason or ""
    for table in (_ALERTS, _NOT_TLS):
        if reason in table:
            return table[reason].format(**fields)
    if isinstance(exc, ssl.SSLEOFError):
        return _NOT_TLS["UNEXPECTED_EOF_WHILE_READING"].format(**fields)
    return reason.lower().replace("_", " ") if reason else str(exc)
