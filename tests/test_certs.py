"""multifd-certs: the certificates' contents, the files' modes, refusals, and real mutual-TLS
1.3 handshakes with the stdlib ssl module over loopback TCP."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import certs
from multifd.errors import UsageError

ALL = ["ca-cert.pem", "ca-key.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
       "client-key.pem"]
NAMES = ["localhost", "127.0.0.1", "::1", "migrate.example"]
SCRIPT = os.path.join(os.path.dirname(sys.executable), "multifd-certs")
NOW = datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def ca():
    return certs.new_ca()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def snapshot(directory) -> dict[str, tuple[bytes, int]]:
    return {name: ((directory / name).read_bytes(), mode(directory / name))
            for name in sorted(os.listdir(directory))}


def ext(cert: x509.Certificate, kind):
    return cert.extensions.get_extension_for_class(kind)


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


# --- the certificates ---------------------------------------------------------------------


def test_ca_is_a_self_signed_ca_that_signs_only_leaves(ca):
    cert = ca.cert
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "multifd CA"
    cert.verify_directly_issued_by(cert)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest == \
        x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key()).digest
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert cert.signature_hash_algorithm.name == "sha256"


def test_server_san_eku_and_constraints(ca):
    server = certs.new_server(ca, NAMES)
    cert = server.cert
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "migrate.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    # keyEncipherment too: QEMU releases before late 2025 refuse a certificate without it.
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == \
        ext(ca.cert, x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.SubjectKeyIdentifier).value.digest == \
        x509.SubjectKeyIdentifier.from_public_key(server.key.public_key()).digest
    assert certs.new_server(ca, ["10.0.0.1"], common_name="recv-1").cert.subject.rfc4514_string() \
        == "CN=recv-1"


def test_client_identity_and_eku(ca):
    client = certs.new_client(ca, "sender-7")
    cert = client.cert
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.rfc4514_string() == "CN=sender-7"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not ext(cert, x509.BasicConstraints).value.ca
    ku = ext(cert, x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    assert certs.new_client(ca).cert.subject.rfc4514_string() == "CN=multifd-client"


def test_validity_serials_and_backdating(ca):
    a, b = certs.new_client(ca), certs.new_client(ca)
    assert a.cert.serial_number != b.cert.serial_number and a.cert.serial_number > 0
    start = a.cert.not_valid_before_utc
    assert NOW - datetime.timedelta(minutes=6) < start < NOW
    assert a.cert.not_valid_after_utc - start == datetime.timedelta(days=825)
    assert ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc == \
        datetime.timedelta(days=3650)
    old = certs.new_server(ca, ["localhost"], not_before=NOW - datetime.timedelta(days=10), days=1)
    assert old.cert.not_valid_after_utc < NOW
    future = certs.new_client(ca, not_before=NOW + datetime.timedelta(days=1))
    assert future.cert.not_valid_before_utc > NOW


@pytest.mark.parametrize("names", [[], [""], ["two words"], ["tab\there"], ["héllo.example"],
                                   ["line\nbreak"], ["fe80::1%eth0"], ["ok.example", " "]])
def test_bad_server_names_are_usage_errors(ca, names):
    with pytest.raises(UsageError) as info:
        certs.new_server(ca, names)
    assert "\n" not in str(info.value) and info.value.exit_code == 2


@pytest.mark.parametrize("cn", ["", "x" * 65, "a\nb"])
def test_bad_client_names_are_usage_errors(ca, cn):
    with pytest.raises(UsageError):
        certs.new_client(ca, cn)


# --- the files ----------------------------------------------------------------------------


def test_generate_writes_the_qemu_set_with_modes(tmp_path):
    directory = tmp_path / "certs"
    written = certs.generate(str(directory), ["localhost", "127.0.0.1"], client_name="me")
    assert written == [str(directory / name) for name in ALL]
    assert sorted(os.listdir(directory)) == sorted(ALL)  # and no temporary file left
    assert mode(directory) == 0o700
    for name in ALL:
        assert mode(directory / name) == (0o600 if name.endswith("-key.pem") else 0o644), name
    ca = x509.load_pem_x509_certificate((directory / "ca-cert.pem").read_bytes())
    for role in ("server", "client"):
        cert = x509.load_pem_x509_certificate((directory / f"{role}-cert.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        text = (directory / f"{role}-key.pem").read_text()
        assert text.startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
        key = serialization.load_pem_private_key(text.encode(), password=None)
        assert key.public_key() == cert.public_key()
    client = x509.load_pem_x509_certificate((directory / "client-cert.pem").read_bytes())
    assert client.subject.rfc4514_string() == "CN=me"


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_modes_do_not_depend_on_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        certs.generate(str(tmp_path / "c"), ["localhost"])
    finally:
        os.umask(old)
    assert {name: mode(tmp_path / "c" / name) for name in ALL} == {
        name: 0o600 if name.endswith("-key.pem") else 0o644 for name in ALL}


def test_keys_are_created_0600_never_widened(tmp_path, monkeypatch):
    opened = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        opened.append((os.path.basename(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    certs.generate(str(tmp_path / "c"), ["localhost"])
    monkeypatch.undo()
    keys = [(name, flags, m) for name, flags, m in opened if "-key.pem" in name]
    assert len(keys) == 3
    for name, flags, m in keys:
        assert name.startswith(".") and m == 0o600 and flags & os.O_EXCL, (name, flags, m)


def test_write_set_writes_only_the_parts_given(tmp_path, ca):
    client = certs.new_client(ca)
    assert certs.write_set(str(tmp_path / "a"), ca=ca, ca_key=False) == [
        str(tmp_path / "a" / "ca-cert.pem")]
    assert certs.write_set(str(tmp_path / "b"), client=client) == [
        str(tmp_path / "b" / "client-cert.pem"), str(tmp_path / "b" / "client-key.pem")]
    assert sorted(os.listdir(tmp_path / "b")) == ["client-cert.pem", "client-key.pem"]
    assert certs.write_set(str(tmp_path / "c"), ca=ca, client=client) == [
        str(tmp_path / "c" / n) for n in ("ca-cert.pem", "ca-key.pem", "client-cert.pem",
                                          "client-key.pem")]


def test_refuses_to_overwrite_before_writing_anything(tmp_path, capsys):
    directory = tmp_path / "certs"
    directory.mkdir()
    (directory / "server-cert.pem").write_bytes(b"precious")
    before = snapshot(directory)
    assert certs.main([str(directory), "--server-name", "localhost"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err) == (f"multifd-certs: {directory}/server-cert.pem already exists "
                             "(pass --force to replace it)\n")
    assert snapshot(directory) == before  # ca-cert.pem, which comes first, was not written


def test_refuses_a_complete_set_then_force_replaces_it(tmp_path, capsys):
    directory = tmp_path / "certs"
    assert certs.main([str(directory), "--server-name", "localhost"]) == 0
    before = snapshot(directory)
    capsys.readouterr()
    assert certs.main([str(directory), "--server-name", "other"]) == 2
    assert "ca-cert.pem already exists" in one_line(capsys.readouterr().err)
    assert snapshot(directory) == before
    # A key someone widened is replaced by a new file, not rewritten in place.
    os.chmod(directory / "server-key.pem", 0o644)
    assert certs.main([str(directory), "--server-name", "other", "--force"]) == 0
    after = snapshot(directory)
    assert sorted(after) == sorted(ALL)
    for name in ALL:
        assert after[name][0] != before[name][0], name
        assert after[name][1] == (0o600 if name.endswith("-key.pem") else 0o644), name
    server = x509.load_pem_x509_certificate((directory / "server-cert.pem").read_bytes())
    assert ext(server, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["other"]


def test_a_missing_directory_is_made_with_its_parents(tmp_path):
    missing = tmp_path / "no" / "such" / "certs"
    assert certs.main([str(missing), "--server-name", "localhost"]) == 0
    assert sorted(p.name for p in missing.iterdir()) == sorted(ALL)
    assert stat.S_IMODE(missing.stat().st_mode) == 0o700


def test_directory_problems_are_one_line(tmp_path, capsys):

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert certs.main([str(a_file), "--server-name", "localhost"]) == 2
    assert one_line(capsys.readouterr().err) == f"multifd-certs: {a_file} is not a directory\n"


def test_write_failure_is_one_line_naming_the_directory(tmp_path, capsys, monkeypatch):
    """What a read-only directory or a full disk looks like, also when the tests run as root."""
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if os.path.basename(path).startswith(".server-cert.pem"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    directory = tmp_path / "c"
    assert certs.main([str(directory), "--server-name", "localhost"]) == 2
    monkeypatch.undo()
    assert one_line(capsys.readouterr().err) == \
        f"multifd-certs: cannot write to {directory}: Permission denied\n"
    # All files are written before any is renamed into place: no half set, no temporary file.
    assert os.listdir(directory) == []


# --- the command line ---------------------------------------------------------------------


def test_cli_lists_what_it_wrote(tmp_path, capsys):
    directory = tmp_path / "certs"
    assert certs.main([str(directory), "--server-name", "localhost", "--server-name", "::1",
                       "--client-name", "sender-1", "--days", "30"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == len(ALL) + 1
    for line, name in zip(lines, ALL):
        path, what = line.split(None, 1)
        assert path == str(directory / name)
        assert what.endswith("(0600)" if name.endswith("-key.pem") else "(0644)")
    assert lines[3].endswith("server private key (0600)")
    assert f"multifd-recv --tls {directory}" in lines[-1]
    assert f"multifd-send --tls {directory}" in lines[-1]
    client = x509.load_pem_x509_certificate((directory / "client-cert.pem").read_bytes())
    assert client.subject.rfc4514_string() == "CN=sender-1"
    assert client.not_valid_after_utc - client.not_valid_before_utc == datetime.timedelta(days=30)


@pytest.mark.parametrize("argv", [
    ["DIR"],                                                   # --server-name is required
    ["DIR", "--server-name", "localhost", "--days", "0"],
    ["DIR", "--server-name", "localhost", "--days", "36501"],
    ["DIR", "--server-name", "localhost", "--days", "soon"],
    ["DIR", "--server-name", "localhost", "--bogus"],
])
def test_cli_argument_errors_exit_2_with_one_line(tmp_path, capsys, argv):
    argv = [str(tmp_path / "c") if a == "DIR" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        certs.main(argv)
    assert info.value.code == 2
    assert one_line(capsys.readouterr().err).startswith("multifd-certs: error: ")
    assert not (tmp_path / "c").exists()


def test_cli_bad_server_name_exits_2_and_writes_nothing(tmp_path, capsys):
    directory = tmp_path / "c"
    assert certs.main([str(directory), "--server-name", "bad name"]) == 2
    assert one_line(capsys.readouterr().err).startswith("multifd-certs: server name 'bad name'")
    assert not directory.exists()


def test_installed_script(tmp_path):
    directory = tmp_path / "certs"
    run = [SCRIPT, str(directory), "--server-name", "localhost", "--server-name", "127.0.0.1"]
    ok = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == "" and len(ok.stdout.splitlines()) == len(ALL) + 1
    assert sorted(os.listdir(directory)) == sorted(ALL)
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stdout == ""
    assert one_line(again.stderr) == (f"multifd-certs: {directory}/ca-cert.pem already exists "
                                      "(pass --force to replace it)\n")
    bad = subprocess.run([SCRIPT, str(tmp_path / "x"), "--server-name", ""],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and one_line(bad.stderr).startswith("multifd-certs: ")
    usage = subprocess.run([SCRIPT, str(tmp_path / "x")], capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2 and "--server-name" in one_line(usage.stderr)


# --- real handshakes ----------------------------------------------------------------------

TIMEOUT = 10


def server_context(directory, cert="server") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(directory / "ca-cert.pem")
    ctx.load_cert_chain(directory / f"{cert}-cert.pem", directory / f"{cert}-key.pem")
    return ctx


def client_context(directory, with_cert=True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(directory / "ca-cert.pem")
    if with_cert:
        ctx.load_cert_chain(directory / "client-cert.pem", directory / "client-key.pem")
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str):
    """One TLS connection over loopback TCP. Returns (server outcome, client outcome): the
    client's CN as the server saw it, or the exception; the TLS version and the line the
    server sent, or the exception."""
    outcome: dict[str, object] = {}

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve():
            try:
                conn, _ = listener.accept()
                conn.settimeout(TIMEOUT)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    subject = dict(rdn[0] for rdn in tls.getpeercert()["subject"])
                    outcome["server"] = subject["commonName"]
                    tls.sendall(f"hello {subject['commonName']}\n".encode())
            except Exception as exc:  # reported to the test, not lost in the thread
                outcome["server"] = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                # In TLS 1.3 the server checks the client's certificate after the client's
                # handshake returned: the reply proves both sides accepted.
                data = b""
                while not data.endswith(b"\n"):
                    chunk = tls.recv(100)
                    if not chunk:
                        break
                    data += chunk
                outcome["client"] = (tls.version(), data.decode())
        except Exception as exc:
            outcome["client"] = exc
        thread.join(TIMEOUT * 2)
        assert not thread.is_alive()
    return outcome["server"], outcome["client"]


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls") / "certs"
    assert certs.main([str(directory), "--server-name", "localhost", "--server-name",
                       "127.0.0.1", "--server-name", "::1", "--client-name", "sender-1"]) == 0
    return directory


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
def test_mutual_tls13_handshake(tls_dir, hostname):
    server, client = handshake(server_context(tls_dir), client_context(tls_dir), hostname)
    assert server == "sender-1"
    assert client == ("TLSv1.3", "hello sender-1\n")


def test_hostname_not_in_san_is_rejected(tls_dir):
    server, client = handshake(server_context(tls_dir), client_context(tls_dir), "other.example")
    assert isinstance(client, ssl.SSLCertVerificationError), client
    assert "other.example" in str(client)
    assert isinstance(server, (ssl.SSLError, OSError))


def test_server_from_another_ca_is_rejected(tls_dir, tmp_path):
    certs.generate(str(tmp_path / "other"), ["localhost"])
    server, client = handshake(server_context(tmp_path / "other"), client_context(tls_dir),
                               "localhost")
    assert isinstance(client, ssl.SSLCertVerificationError), client
    # 19 when the server also sends its CA (OpenSSL completes the chain from its store), 20
    # when it sends only its own certificate: either way, no chain to our CA.
    assert client.verify_code in (19, 20), client
    assert isinstance(server, (ssl.SSLError, OSError))


def test_client_without_certificate_is_rejected(tls_dir):
    server, client = handshake(server_context(tls_dir), client_context(tls_dir, with_cert=False),
                               "localhost")
    assert isinstance(server, ssl.SSLError), server
    assert "certificate" in str(server).lower()
    assert isinstance(client, (ssl.SSLError, OSError)), client


@pytest.mark.parametrize("when, reason", [
    (dict(not_before=NOW - datetime.timedelta(days=10), days=1), "certificate has expired"),
    (dict(not_before=NOW + datetime.timedelta(days=1)), "certificate is not yet valid"),
])
def test_server_certificate_outside_its_validity_is_rejected(tmp_path, when, reason):
    ca = certs.new_ca()
    certs.write_set(str(tmp_path), ca=ca, server=certs.new_server(ca, ["localhost"], **when),
                    client=certs.new_client(ca))
    server, client = handshake(server_context(tmp_path), client_context(tmp_path), "localhost")
    assert isinstance(client, ssl.SSLCertVerificationError), client
    assert reason in str(client)
