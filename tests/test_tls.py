"""Mutual TLS through the real CLIs with real certificates: QEMU's x509 test matrix.

Every failing case is followed by a good migration to the same receiver: a failed handshake is
a stranger at the door, and the receiver's wait for a real migration goes on (the good sender
starts once the receiver has logged the stranger's drop).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid

import pytest
import trio

from conftest import (assert_each_dropped, cli, files_in, run_sender, start_receiver,
                      start_sender, strangers_during_a_migration, tcp_sockets_of,
                      trio_wait_until, wait_until, written_into)
from multifd import wire
from multifd import errors as E
from multifd.digest import DigestSum, block_term, term_bytes
from multifd.send import send_image
from multifd.settings import Timeouts
from multifd import tls as T
from multifd.tls import client_tls, server_tls

# A handshake timeout far above any refusal's time: a refusal that waited for it shows.
QUICK = ("--handshake-timeout", "20", "--idle-timeout", "20")
REFUSAL_BOUND = 10  # seconds for a refused sender, its start-up included


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def refused(pki, image, tmp_path, recv_args, send_args, good_send_args=None):
    """A sender that must fail against a TLS receiver that must go on; returns the failed
    sender's one line and the receiver's stderr."""
    out = str(tmp_path / "out.img")
    recv = start_receiver(out, *QUICK, *recv_args)
    start = time.monotonic()
    bad = run_sender(recv.address, image, *QUICK, *send_args, timeout=30)
    elapsed = time.monotonic() - start
    assert bad.returncode == 1, bad.stderr
    assert elapsed < REFUSAL_BOUND, f"the failure took {elapsed:.1f}s: it waited for a timeout"
    recv.wait_for_stderr(r"dropped .* from 127\.0\.0\.1:")  # done with the stranger
    assert files_in(tmp_path) == []
    good = run_sender(recv.address, image, *QUICK,
                      *(good_send_args if good_send_args is not None
                        else ("--tls", pki.send)), timeout=30)
    assert good.returncode == 0, good.stderr
    rc, _, recv_err = recv.finish(timeout=30)
    assert rc == 0, recv_err
    with open(out, "rb") as got, open(image, "rb") as want:
        assert got.read() == want.read()
    return one_line(bad.stderr), recv_err


# ------------------------------------------------------------------ successes

@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:0"])
def test_default_host_migrates_and_arrives_identical(pki, image, tmp_path, listen):
    out = str(tmp_path / "out.img")
    recv = start_receiver(out, "--tls", pki.recv, "--tls-allow-client", "someone-else",
                          "--tls-allow-client", "multifd-client", *QUICK, listen=listen)
    sent = run_sender(recv.address, image, "--tls", pki.send, "--channels", "3", "--json")
    rc, _, err = recv.finish()
    assert sent.returncode == 0 and rc == 0, (sent.stderr, err)
    with open(out, "rb") as got, open(image, "rb") as want:
        assert got.read() == want.read()
    assert "dropped" not in err


def test_one_directory_serves_both_sides(pki, image, tmp_path):
    """What `make certs` produces: the same directory on both ends."""
    recv = start_receiver("--discard", "--tls", pki.both, *QUICK)
    sent = run_sender(recv.address, image, "--tls", pki.both)
    rc, _, err = recv.finish()
    assert sent.returncode == 0 and rc == 0, (sent.stderr, err)


def test_override_host_checks_the_given_name(pki, image, tmp_path):
    out = str(tmp_path / "out.img")
    recv = start_receiver(out, "--tls", pki.recv_named, *QUICK)
    sent = run_sender(recv.address, image, "--tls", pki.send,
                      "--tls-hostname", "migration.example")
    rc, _, err = recv.finish()
    assert sent.returncode == 0 and rc == 0, (sent.stderr, err)


# ------------------------------------------------------------------ the sender refuses

def test_mismatched_host(pki, image, tmp_path):
    bad, log = refused(pki, image, tmp_path, ("--tls", pki.recv_named), ("--tls", pki.send),
                       good_send_args=("--tls", pki.send, "--tls-hostname",
                                       "migration.example"))
    assert "multifd-send: sender: " in bad and ", tls: " in bad
    assert "the receiver's certificate does not match the address '127.0.0.1'" in bad, bad
    assert "dropped" in log


def test_mismatched_name_with_override(pki, image, tmp_path):
    bad, _ = refused(pki, image, tmp_path, ("--tls", pki.recv),
                     ("--tls", pki.send, "--tls-hostname", "elsewhere.example"))
    assert "does not match the name 'elsewhere.example'" in bad, bad


def test_receiver_certificate_from_an_untrusted_ca(pki, image, tmp_path):
    bad, log = refused(pki, image, tmp_path, ("--tls", pki.recv_other_ca), ("--tls", pki.send),
                       good_send_args=("--tls", pki.send_for_other_ca))
    assert "the receiver's certificate is not signed by our CA (ca-cert.pem)" in bad, bad
    assert "the peer does not trust our certificate" in log, log


@pytest.mark.parametrize("which, expected", [
    ("recv_expired", "the receiver's certificate has expired"),
    ("recv_future", "the receiver's certificate is not valid yet"),
])
def test_receiver_certificate_out_of_its_validity(pki, image, tmp_path, which, expected):
    recv = start_receiver("--discard", "--tls", getattr(pki, which), *QUICK)
    bad = run_sender(recv.address, image, "--tls", pki.send, *QUICK, timeout=30)
    recv.proc.send_signal(signal.SIGTERM)
    rc, _, _ = recv.finish(timeout=20)
    assert bad.returncode == 1 and expected in one_line(bad.stderr), bad.stderr
    assert rc == 143


# ------------------------------------------------------------------ the receiver refuses

@pytest.mark.parametrize("which, sender_says, receiver_says", [
    ("send_no_cert", "the receiver requires a client certificate, and this sender has none "
                     "(client-cert.pem is not in the --tls directory)",
     "the peer sent no client certificate, and this receiver requires one"),
    ("send_other_ca", "the receiver does not trust our certificate",
     "the peer's certificate is not signed by our CA"),
    ("send_expired", "the receiver rejected our certificate: expired or not yet valid",
     "the peer's certificate has expired"),
])
def test_receiver_refuses_the_client_certificate(pki, image, tmp_path, which, sender_says,
                                                 receiver_says):
    bad, log = refused(pki, image, tmp_path, ("--tls", pki.recv),
                       ("--tls", getattr(pki, which)))
    assert sender_says in bad, bad
    assert receiver_says in log, log


def test_client_identity_not_allowed(pki, image, tmp_path):
    bad, log = refused(pki, image, tmp_path,
                       ("--tls", pki.recv, "--tls-allow-client", "multifd-client"),
                       ("--tls", pki.send_mallory))
    assert "receiver rejected the hello: our client certificate's identity is not allowed" \
        in bad, bad
    assert "client identity 'mallory' is not allowed (--tls-allow-client)" in log, log


# ------------------------------------------------------------------ TLS on one side only

def test_plaintext_sender_to_a_tls_receiver(pki, image, tmp_path):
    bad, log = refused(pki, image, tmp_path, ("--tls", pki.recv), ())
    assert "this receiver accepts TLS connections only (use --tls)" in bad, bad
    assert "a plaintext multifd hello (the sender was started without --tls)" in log, log


def test_tls_sender_to_a_plaintext_receiver(pki, image, tmp_path):
    bad, log = refused(pki, image, tmp_path, (), ("--tls", pki.send), good_send_args=())
    assert ", tls: " in bad and "--tls" in bad, bad
    assert "a TLS handshake, and this receiver was started without --tls" in log, log


# ------------------------------------------------------------------ bad credentials

def test_missing_or_bad_credentials_are_usage_errors(pki, image, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    half = tmp_path / "half"
    half.mkdir()
    for name in ("ca-cert.pem", "client-cert.pem"):
        shutil.copy(os.path.join(pki.send, name), half / name)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "ca-cert.pem").write_text("not a certificate\n")
    dir_as_file = tmp_path / "dir-as-file"
    dir_as_file.mkdir()
    (dir_as_file / "ca-cert.pem").mkdir()
    bad_key = tmp_path / "bad-key"
    bad_key.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem"):
        shutil.copy(os.path.join(pki.recv, name), bad_key / name)
    (bad_key / "server-key.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                            "-----END PRIVATE KEY-----\n")
    cases = [
        ("send", empty, f"{empty}/ca-cert.pem: no such file"),
        ("send", half, f"{half}/client-key.pem: no such file (needed with client-cert.pem)"),
        ("send", garbage, f"{garbage}/ca-cert.pem: not a PEM CA certificate"),
        ("send", dir_as_file, f"{dir_as_file}/ca-cert.pem: is a directory"),
        ("send", tmp_path / "nowhere", f"{tmp_path}/nowhere: no such directory"),
        ("recv", empty, f"{empty}/ca-cert.pem: no such file"),
        ("recv", bad_key, f"{bad_key}/server-key.pem: not a PEM private key"),
        ("recv", half, f"{half}/server-cert.pem: no such file"),
    ]
    out = tmp_path / "out.img"
    for side, directory, expected in cases:
        if side == "send":
            res = run_sender("127.0.0.1:9", image, "--tls", str(directory), timeout=30)
        else:
            res = subprocess.run([*cli("recv"), "--listen", "127.0.0.1:0", str(out), "--tls",
                                  str(directory)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 2, (side, directory, res.stderr)
        assert expected in one_line(res.stderr), (side, directory, res.stderr)
        assert not out.exists()


def test_tls_flags_without_tls_are_usage_errors(image):
    res = run_sender("127.0.0.1:9", image, "--tls-hostname", "x")
    assert res.returncode == 2 and "--tls-hostname needs --tls" in one_line(res.stderr)


@pytest.mark.parametrize("name", ["", ".leading-dot"])
def test_a_host_name_ssl_cannot_check_is_refused_before_connecting(pki, image, name):
    res = run_sender("127.0.0.1:9", image, "--tls", pki.send, "--tls-hostname", name)
    assert res.returncode == 2, res.stderr
    assert f"--tls-hostname {name!r}: not a host name or address" in one_line(res.stderr)


def test_an_encrypted_key_is_a_usage_error_not_a_prompt(pki, tmp_path):
    """OpenSSL would ask for the passphrase on the terminal: an unbounded wait."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = tmp_path / "encrypted"
    shutil.copytree(pki.recv, directory)
    key = ec.generate_private_key(ec.SECP256R1())
    (directory / "server-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    res = subprocess.run([*cli("recv"), "--listen", "127.0.0.1:0", "--discard", "--tls",
                          str(directory)], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    assert res.returncode == 2, res.stderr
    assert f"{directory}/server-key.pem: an encrypted private key" in one_line(res.stderr)


@pytest.mark.parametrize("subject, expected", [
    ([[("commonName", "alice")]], "alice"),
    ([[("organizationName", "x")], [("commonName", "alice")]], "alice"),
    ([[("commonName", "alice")], [("commonName", "mallory")]], None),
    ([[("organizationName", "x")]], None),
])
def test_the_client_identity_is_the_one_and_only_common_name(subject, expected):
    from multifd.tls import common_name
    assert common_name({"subject": tuple(tuple(rdn) for rdn in subject)}) == expected


def test_receiver_killed_mid_stream_the_sender_reports_why(pki, make_image, tmp_path):
    """A failed TLS send must not be hidden by the image window it was sending from."""
    image = make_image(48 << 20, "random")
    recv = start_receiver(str(tmp_path / "out.img"), "--tls", pki.recv, *QUICK)
    sender = start_sender(recv.address, image, "--tls", pki.send, "--max-bandwidth", "20MB/s",
                          *QUICK)
    # mid-stream: the receiver has written data (48 MiB at 20 MB/s take over 2 s)
    wait_until(lambda: written_into(recv.proc, tmp_path), 20, "data written")
    recv.proc.send_signal(signal.SIGTERM)
    rc, _, _ = recv.finish(timeout=20)
    _, err = sender.communicate(timeout=20)
    assert rc == 143
    assert sender.returncode == 1
    assert "receiver failed: terminated by SIGTERM" in one_line(err), err
    assert files_in(tmp_path) == [os.path.basename(image)]


# ------------------------------------------------------------------ lifecycle

async def test_a_failed_handshake_ends_setup_while_the_others_still_handshake(clean, pki,
                                                                             image):
    """The seed's race, with TLS: data channel handshakes are in flight (the server never
    answers them) when one fails. The first error ends the setup at once; no thread, task or
    socket of the others is left behind (the `clean` fixture counts them)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    accepted = []

    async def serve() -> None:
        while True:
            stream = await listener.accept()
            accepted.append(stream)
            if len(accepted) == 1:  # the control channel: answered like a receiver would
                control = trio.SSLStream(stream, server_tls(pki.recv).context,
                                         server_side=True)
                accepted[0] = control
                await control.do_handshake()
                hello = b""
                while len(hello) < wire.HELLO.size:
                    hello += await control.receive_some(wire.HELLO.size - len(hello))
                await control.send_all(wire.encode_hello_reply(wire.HelloStatus.OK))

    async def break_one() -> None:
        """Once every data channel is in its handshake (all 8 connected, each ClientHello
        unread: this server answers none), one of them gets an answer that is not TLS."""
        def all_handshaking() -> bool:
            data = {stream.socket.getpeername()[1] for stream in accepted[1:]}
            return len(data) == 8 and len([s for s in tcp_sockets_of(port)
                                           if s.remote_port in data and s.rx_queue]) == 8
        await trio_wait_until(all_handshaking, 10, "8 data channels in their handshakes")
        await accepted[3].send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    start = trio.current_time()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(break_one)
            with pytest.raises(E.TlsError) as info:
                await send_image("127.0.0.1", port, image, channels=8,
                                 timeouts=Timeouts(connect=2, handshake=5, idle=5),
                                 tls=client_tls(pki.send))
            nursery.cancel_scope.cancel()
    for stream in accepted:
        with trio.move_on_after(1):
            await stream.aclose()
    await listener.aclose()
    assert trio.current_time() - start < 3, "waited for the handshake timeout"
    assert info.value.stage == "tls" and "does not speak TLS" in info.value.message, info.value
    assert len(accepted) == 9


def _tls_connect(port: int, directory: str, hello: wire.Hello) -> ssl.SSLSocket:
    ctx = client_tls(directory).context
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20),
                           server_hostname="127.0.0.1")
    sock.sendall(wire.encode_hello(hello))
    reply = b""
    while len(reply) < wire.HELLO_REPLY.size:
        chunk = sock.recv(wire.HELLO_REPLY.size - len(reply))
        assert chunk
        reply += chunk
    assert wire.decode_hello_reply(reply) is wire.HelloStatus.OK
    return sock


def test_a_stream_cut_without_a_tls_close_is_an_error(pki, tmp_path):
    """Everything arrives, END included, but the data channel's TCP connection ends without
    the TLS close: the receiver must not take it for a finished stream."""
    recv = start_receiver(str(tmp_path / "out.img"), "--tls", pki.recv, *QUICK)
    sid = uuid.uuid4().bytes
    control = _tls_connect(recv.port, pki.send, wire.Hello(wire.Role.CONTROL, sid, 0, 1))
    data = _tls_connect(recv.port, pki.send, wire.Hello(wire.Role.DATA, sid, 0, 1))
    try:
        session = wire.Session(256 << 10)
        control.sendall(wire.encode_control(session))
        content = os.urandom(256 << 10)
        term = block_term(content, 0)
        total = DigestSum()
        total.add(term)
        data.sendall(wire.encode_packet(
            wire.PacketKind.PAGES, seq=0, round=0, offset=0,
            runs=((0, 64, wire.RunKind.DATA),), page_size=4096, flags=3,
            digest=term_bytes(term)) + content
            + wire.encode_packet(wire.PacketKind.SYNC, seq=1, round=0)
            + wire.encode_packet(wire.PacketKind.END, seq=2, round=1))
        socket.socket.shutdown(data, socket.SHUT_RDWR)  # TCP ends; no close_notify was sent
        data.close()
        control.sendall(wire.encode_control(wire.Complete(1, 1, 64, 0, total.digest())))
        rc, _, stderr = recv.finish(timeout=20)
    finally:
        control.close()
        data.close()
    assert rc == 1, stderr
    assert "data channel 0" in stderr and "without a TLS close" in stderr, stderr
    assert files_in(tmp_path) == []


# ------------------------------------------------------------------ hostile strangers

def _tls_stranger(address, ca: str, identity: str | None, hello: bytes = b"") -> int:
    """A TLS client that may present a certificate and may send a hello, then reads until
    the receiver closes on it (it must: every one of these is a stranger). Returns its port."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(os.path.join(ca, T.CA_CERT))
    if identity is not None:
        ctx.load_cert_chain(os.path.join(identity, T.CLIENT_CERT),
                            os.path.join(identity, T.CLIENT_KEY))
    with socket.create_connection(address, timeout=10) as raw:
        port = raw.getsockname()[1]
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            try:
                s.sendall(hello)
                while s.recv(4096):
                    pass
            except (ssl.SSLError, ConnectionError):
                pass  # the receiver's alert, or its reset: refused either way
    return port


def test_strangers_are_dropped_and_the_tls_migration_completes(pki, shared_image, tmp_path):
    image = shared_image(8 << 20)
    out = str(tmp_path / "guest.img")
    recv = start_receiver(out, "--tls", pki.recv, "--handshake-timeout", "1")
    sender = start_sender(recv.address, image, "--tls", pki.send, "--max-bandwidth", "4MB/s")
    address = (recv.host, recv.port)
    silent = []

    def strangers():
        met = []
        # Garbage is fixed bytes: random ones may look like the start of a TLS record.
        for payload, says in (
                (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
                 "sent an HTTP request, not TLS"),
                (b"\xde\xad\xbe\xef" * 16, "does not speak TLS"),
                (wire.encode_hello(wire.Hello(wire.Role.DATA, uuid.uuid4().bytes, 0, 4)),
                 "a plaintext multifd hello (the sender was started without --tls)")):
            with socket.create_connection(address, timeout=10) as s:
                met.append((s.getsockname()[1], re.escape(says)))
                s.sendall(payload)
                try:
                    while s.recv(4096):  # until the receiver closes on it
                        pass
                except ConnectionError:
                    pass
        met.append((_tls_stranger(address, pki.send, None),  # no client certificate
                    "sent no client certificate"))
        met.append((_tls_stranger(address, pki.send_other_ca, pki.send_other_ca),  # another CA's
                    "certificate is not signed by our CA"))
        met.append((_tls_stranger(address, pki.send, pki.send,  # ours, but another session
                                  wire.encode_hello(wire.Hello(wire.Role.DATA,
                                                               uuid.uuid4().bytes, 0, 4))),
                    "unknown session"))
        silent.extend(socket.create_connection(address, timeout=10) for _ in range(20))
        # the handshake deadline, or the socket timeout under it: both the handshake timeout
        met.extend((s.getsockname()[1], "(no TLS handshake and complete hello within 1s|"
                                        "tls: peer silent for 1s)") for s in silent)
        return met

    try:
        met = strangers_during_a_migration(recv, sender, tmp_path, strangers)
    finally:
        for s in silent:
            s.close()
    _, err_s = sender.communicate(timeout=60)
    rc, _, stderr = recv.finish(timeout=30)
    assert sender.returncode == 0, err_s
    assert rc == 0, stderr
    assert len(met) == 26
    assert_each_dropped(stderr, met)
    with open(image, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()
