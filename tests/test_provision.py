"""Provisioning mutual-TLS kits: what the certificates say, what `load_kit` refuses, the CLI, revocation files, and
real gRPC handshakes on 127.0.0.1 with the kits (a good client is named to the server; the wrong CA, no
certificate, and a server not named for the address dialled all fail)."""

import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_adc.distributed.provision import (
    KitError,
    Revocations,
    add_client,
    ephemeral_kits,
    load_kit,
    load_revocations,
    main,
    provision,
)

SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 5  # seconds: every wait on a channel or a call


@pytest.fixture
def kits(tmp_path) -> dict[str, Path]:
    """A server for localhost and 127.0.0.1, and two clients."""
    return provision(tmp_path / "kits", ["localhost", "127.0.0.1"], ["client-0", "client-1"])


def certificate(folder: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())


def load_ca(root: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((root / "ca" / "ca.pem").read_bytes())


def extension(cert: x509.Certificate, kind):
    return cert.extensions.get_extension_for_class(kind).value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_makes_one_kit_per_party_that_loads(kits):
    root = kits["server"].parent
    assert set(kits) == {"server", "client-0", "client-1"}
    assert sorted(p.name for p in root.iterdir()) == ["ca", "client-0", "client-1", "server"]
    ca_pem = (root / "ca" / "ca.pem").read_bytes()
    for party, folder in kits.items():
        assert sorted(p.name for p in folder.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]  # no CA key in a kit
        kit = load_kit(folder)
        assert kit.ca_pem == ca_pem
        assert (kit.name, kit.role) == (("localhost", "server") if party == "server" else (party, "client"))
        assert kit.serial == certificate(folder).serial_number
        assert kit.not_valid_after - datetime.now(timezone.utc) > timedelta(days=364)
        assert "PRIVATE" not in repr(kit)  # logging a kit leaks no key
    assert (root / "ca" / "ca-key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_kit(kits["server"], role="server").role == "server"
    with pytest.raises(KitError, match="is a client kit .*the server needs a server kit"):
        load_kit(kits["client-0"], role="server")


def test_keys_are_0600_and_folders_0700(kits):
    root = kits["server"].parent
    assert mode(root / "ca") == 0o700 and mode(root / "ca" / "ca-key.pem") == 0o600
    for folder in kits.values():
        assert mode(folder) == 0o700
        assert mode(folder / "key.pem") == 0o600


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o602])
def test_a_key_others_can_read_or_write_is_refused_naming_the_file(kits, loose):
    key = kits["client-0"] / "key.pem"
    key.chmod(loose)
    with pytest.raises(KitError, match=f"{key} has mode {loose:04o}.*chmod 600 {key}"):
        load_kit(kits["client-0"])
    key.chmod(0o600)
    load_kit(kits["client-0"])


def test_a_missing_file_is_refused_naming_it(kits):
    (kits["client-1"] / "ca.pem").unlink()
    with pytest.raises(KitError, match=f"{kits['client-1'] / 'ca.pem'} is missing"):
        load_kit(kits["client-1"])


def test_a_certificate_from_another_ca_is_refused(kits, tmp_path):
    other = provision(tmp_path / "other", ["localhost"], ["client-0"])
    mixed = shutil.copytree(kits["client-0"], tmp_path / "mixed")
    shutil.copy(other["client-0"] / "ca.pem", mixed / "ca.pem")
    with pytest.raises(KitError, match=f"{mixed / 'cert.pem'} is not signed by the CA in {mixed / 'ca.pem'}"):
        load_kit(mixed)


def test_a_key_that_is_not_the_certificates_is_refused(kits, tmp_path):
    mixed = shutil.copytree(kits["client-0"], tmp_path / "mixed")
    (mixed / "key.pem").unlink()
    shutil.copy(kits["client-1"] / "key.pem", mixed / "key.pem")
    with pytest.raises(KitError, match=f"{mixed / 'key.pem'} is not the key of {mixed / 'cert.pem'}"):
        load_kit(mixed)


def test_an_expired_certificate_is_refused(kits):
    """The certificate is right in every way (same CA, same key, same name) except that it has expired."""
    root, folder = kits["server"].parent, kits["client-0"]
    ca_key = serialization.load_pem_private_key((root / "ca" / "ca-key.pem").read_bytes(), password=None)
    current = certificate(folder)
    now = datetime.now(timezone.utc)
    expired = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(current.issuer)
        .public_key(current.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=2))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(KitError, match=f"{folder / 'cert.pem'} expired on"):
        load_kit(folder)


def test_server_certificate_names_every_server_name_for_server_auth(tmp_path):
    kits = provision(tmp_path / "kits", ["split.example.org", "10.0.0.7", "::1", "localhost"], ["a"])
    cert = certificate(kits["server"])
    names = extension(cert, x509.SubjectAlternativeName)
    assert names.get_values_for_type(x509.DNSName) == ["split.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "::1"]
    assert list(extension(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert extension(cert, x509.BasicConstraints).ca is False
    assert load_kit(kits["server"]).name == "split.example.org"


def test_client_certificates_carry_their_name_for_client_auth_with_distinct_serials(tmp_path):
    names = [f"hospital-{i}" for i in range(6)]
    kits = provision(tmp_path / "kits", ["localhost"], names)
    certs = {name: certificate(kits[name]) for name in names}
    for name, cert in certs.items():
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert list(extension(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert extension(cert, x509.KeyUsage).digital_signature and not extension(cert, x509.KeyUsage).key_cert_sign
    serials = [cert.serial_number for cert in certs.values()] + [certificate(kits["server"]).serial_number]
    assert len(set(serials)) == len(serials)


def test_the_ca_signs_certificates_and_nothing_else(kits):
    ca = load_ca(kits["server"].parent)
    assert extension(ca, x509.BasicConstraints).ca is True
    usage = extension(ca, x509.KeyUsage)
    assert usage.key_cert_sign and not usage.digital_signature
    for folder in kits.values():
        certificate(folder).verify_directly_issued_by(ca)


def test_add_client_is_signed_by_the_same_ca_and_refuses_an_existing_kit(kits):
    root = kits["server"].parent
    before = {name: (folder / "cert.pem").read_bytes() for name, folder in kits.items()}
    folder = add_client(root, "newcomer")
    assert folder == root / "newcomer" and mode(folder) == 0o700 and mode(folder / "key.pem") == 0o600
    kit = load_kit(folder)
    assert kit.name == "newcomer" and kit.ca_pem == (root / "ca" / "ca.pem").read_bytes()
    certificate(folder).verify_directly_issued_by(x509.load_pem_x509_certificate(kit.ca_pem))
    assert before == {name: (folder / "cert.pem").read_bytes() for name, folder in kits.items()}
    with pytest.raises(FileExistsError, match=f"{root / 'client-0'} already exists"):
        add_client(root, "client-0")
    with pytest.raises(ValueError, match="days=4000 reaches past the CA's expiry"):
        add_client(root, "longlived", days=4000)
    (root / "ca" / "ca-key.pem").chmod(0o640)
    with pytest.raises(KitError, match=f"chmod 600 {root / 'ca' / 'ca-key.pem'}"):
        add_client(root, "careless")
    assert not (root / "careless").exists() and not (root / "longlived").exists()


def test_provision_refuses_to_overwrite_and_writes_nothing(kits):
    root = kits["server"].parent
    with pytest.raises(FileExistsError, match=f"{root / 'ca'}, {root / 'server'}, {root / 'client-0'} already exist"):
        provision(root, ["localhost"], ["client-0", "client-9"])
    assert not (root / "client-9").exists()


@pytest.mark.parametrize(
    "server_names, client_names, days, message",
    [
        (["localhost"], ["a"], 0, "days=0: must be an integer from 1 to 36500"),
        ([], ["a"], 1, "no server name"),
        (["bad_name!"], ["a"], 1, "server name 'bad_name!': must be an IP address or a DNS name"),
        (["localhost"], [], 1, "no clients"),
        (["localhost"], ["7up"], 1, "client name '7up': must be a letter"),
        (["localhost"], ["a/b"], 1, "client name 'a/b'"),
        (["localhost"], ["server"], 1, "client name 'server'.*taken"),
        (["localhost"], ["a", "b", "a"], 1, r"client names \['a'\] are given more than once"),
    ],
)
def test_provision_refuses_bad_arguments_naming_them(tmp_path, server_names, client_names, days, message):
    with pytest.raises(ValueError, match=message):
        provision(tmp_path / "kits", server_names, client_names, days=days)
    assert not (tmp_path / "kits").exists()


def test_ephemeral_kits_are_for_this_machine_in_a_private_folder(tmp_path):
    folder = tmp_path / "run"
    kits = ephemeral_kits(folder, 2)
    assert set(kits) == {"server", "client-0", "client-1"} and mode(folder) == 0o700
    names = extension(certificate(kits["server"]), x509.SubjectAlternativeName)
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    with pytest.raises(FileExistsError, match=f"{folder} is not empty"):
        ephemeral_kits(folder, 1)


def test_cli_run_as_a_module_makes_kits_and_prints_serials(tmp_path):
    """The one test that starts `python -m ...` (it imports the whole package: most of this file's time)."""
    fresh = tmp_path / "fresh"
    command = [sys.executable, "-m", "hf_adc.distributed.provision", "--output_dir", str(fresh),
               "--server_name", "localhost", "--server_name", "127.0.0.1", "--client_names", "alice", "bob",
               "--days", "30"]  # fmt: skip
    made = subprocess.run(
        command, env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True, timeout=120
    )
    assert made.returncode == 0, made.stderr
    for name in ("alice", "bob"):
        kit = load_kit(fresh / name)
        assert f"{name}: {fresh / name} (serial {kit.serial:#x}" in made.stdout
        assert timedelta(days=29) < kit.not_valid_after - datetime.now(timezone.utc) <= timedelta(days=30)
    assert str(fresh / "ca" / "ca-key.pem") in made.stdout
    assert load_kit(fresh / "server").name == "localhost"


def test_cli_refuses_to_overwrite_kits_and_writes_nothing(kits, capsys):
    root = kits["server"].parent
    with pytest.raises(SystemExit) as exit_:
        main(["--output_dir", str(root), "--server_name", "localhost", "--client_names", "client-1", "zoe"])
    assert exit_.value.code == f"error: {root / 'ca'}, {root / 'server'}, {root / 'client-1'} already exist" + (
        ": kits are never overwritten; choose another output_dir, or move the old folder away (and revoke its "
        "certificate) to re-issue a client"
    )
    assert not (root / "zoe").exists()


def test_cli_adds_a_client_to_an_existing_ca(kits, capsys):
    root = kits["server"].parent
    main(["--output_dir", str(root), "--add_client", "carol", "dave"])
    out = capsys.readouterr().out
    for name in ("carol", "dave"):
        assert f"{name}: {root / name} (serial {load_kit(root / name).serial:#x}" in out
        certificate(root / name).verify_directly_issued_by(load_ca(root))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output_dir", "k", "--num_clients", "2"], "--server_name is required"),
        (["--output_dir", "k", "--add_client", "x", "--server_name", "localhost"], "--server_name and --ca_days"),
        (["--output_dir", "k", "--num_clients", "1", "--client_names", "a"], "not allowed with argument"),
    ],
)
def test_cli_refuses_arguments_that_do_not_go_together(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_help_says_who_keeps_the_ca_key(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "OUTPUT_DIR/ca/ca-key.pem: keep it with whoever provisions" in " ".join(capsys.readouterr().out.split())


def test_revocations_name_clients_and_serials_in_decimal_or_hex(tmp_path):
    path = tmp_path / "revoked.txt"
    path.write_text("# left the consortium\nhospital-3\n\n  12345  # leaked laptop\n0xDEADbeef\nclient-0.b_x\n")
    revocations = load_revocations(path)
    assert revocations == Revocations(frozenset({"hospital-3", "client-0.b_x"}), frozenset({12345, 0xDEADBEEF}))
    assert revocations.refuses("hospital-3", 1) and revocations.refuses("anyone", 0xDEADBEEF)
    assert not revocations.refuses("hospital-2", 12346)


@pytest.mark.parametrize("line", ["0xZZ", "two words", "12ab", "-5", "héllo"])
def test_a_bad_revocation_line_is_refused_with_its_number(tmp_path, line):
    path = tmp_path / "revoked.txt"
    path.write_text(f"# header\nclient-0\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}, line 3: .* is neither a certificate serial"):
        load_revocations(path)


@settings(deadline=None, max_examples=50)  # file writes on a shared machine: no per-example deadline
@given(serial=st.integers(min_value=1, max_value=2**159), hexadecimal=st.booleans())
def test_a_printed_serial_reads_back_as_itself(tmp_path_factory, serial, hexadecimal):
    path = tmp_path_factory.mktemp("revocations") / "revoked.txt"
    path.write_text(f"{serial:#x}\n" if hexadecimal else f"{serial}\n")
    assert load_revocations(path).serials == {serial}


def test_openssl_agrees_the_kits_verify_for_their_purpose(kits):
    """An independent TLS stack accepts each certificate for its own purpose only."""
    ca = kits["server"].parent / "ca" / "ca.pem"

    def verifies(folder: Path, purpose: str) -> bool:
        command = ["openssl", "verify", "-CAfile", str(ca), "-purpose", purpose, str(folder / "cert.pem")]
        return subprocess.run(command, capture_output=True, timeout=TIMEOUT).returncode == 0

    assert verifies(kits["server"], "sslserver") and not verifies(kits["server"], "sslclient")
    assert verifies(kits["client-0"], "sslclient") and not verifies(kits["client-0"], "sslserver")


@contextmanager
def echo_server(folder: Path):
    """A mutual-TLS gRPC server on 127.0.0.1 with the server kit in `folder`; yields its port and, for each call,
    the client's certificate as gRPC's auth context gave it (common name, PEM)."""
    kit = load_kit(folder, role="server")
    peers: list[tuple[bytes, bytes]] = []

    def echo(requests, context):
        auth = context.auth_context()
        name = auth["x509_common_name"][0]
        peers.append((name, auth["x509_pem_cert"][0]))
        for request in requests:
            yield name + b":" + request

    handler = grpc.method_handlers_generic_handler("hfadc.Test", {"Echo": grpc.stream_stream_rpc_method_handler(echo)})
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(kit.key_pem, kit.cert_pem)], root_certificates=kit.ca_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port, peers
    finally:
        server.stop(grace=None)


def client_credentials(folder: Path) -> grpc.ChannelCredentials:
    kit = load_kit(folder, role="client")
    return grpc.ssl_channel_credentials(kit.ca_pem, kit.key_pem, kit.cert_pem)


def echo(port: int, credentials: grpc.ChannelCredentials, target_name: str | None = None) -> list[bytes]:
    """Two messages over one stream; raises `grpc.RpcError` if the handshake fails."""
    options = [("grpc.ssl_target_name_override", target_name)] if target_name else []
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        call = channel.stream_stream("/hfadc.Test/Echo")
        return list(call(iter([b"one", b"two"]), timeout=TIMEOUT))


def assert_handshake_fails(port: int, credentials: grpc.ChannelCredentials, target_name: str | None = None) -> str:
    """The handshake fails (the call never reaches the handler); the details of the failure the client saw."""
    with pytest.raises(grpc.RpcError) as failure:
        echo(port, credentials, target_name)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    return failure.value.details()


def test_mutual_tls_gives_the_server_the_clients_name_and_serial(kits):
    with echo_server(kits["server"]) as (port, peers):
        with grpc.secure_channel(f"127.0.0.1:{port}", client_credentials(kits["client-1"])) as channel:
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        assert echo(port, client_credentials(kits["client-1"])) == [b"client-1:one", b"client-1:two"]
        assert echo(port, client_credentials(kits["client-0"]), target_name="localhost") == [
            b"client-0:one",
            b"client-0:two",
        ]  # the certificate's DNS name serves too
    (first, pem), (second, _) = peers
    assert (first, second) == (b"client-1", b"client-0")
    assert x509.load_pem_x509_certificate(pem).serial_number == load_kit(kits["client-1"]).serial


def test_a_client_from_another_ca_fails_the_handshake(kits, tmp_path):
    stranger = provision(tmp_path / "other", ["localhost", "127.0.0.1"], ["client-0"])
    impostor = grpc.ssl_channel_credentials(
        (kits["client-0"] / "ca.pem").read_bytes(),  # trusts our server, but its certificate is from another CA
        (stranger["client-0"] / "key.pem").read_bytes(),
        (stranger["client-0"] / "cert.pem").read_bytes(),
    )
    with echo_server(kits["server"]) as (port, peers):
        assert_handshake_fails(port, impostor)
    assert peers == []


def test_a_client_without_a_certificate_fails_the_handshake(kits):
    anonymous = grpc.ssl_channel_credentials((kits["client-0"] / "ca.pem").read_bytes())
    with echo_server(kits["server"]) as (port, peers):
        assert_handshake_fails(port, anonymous)
    assert peers == []


def test_a_server_kit_does_not_pass_as_a_client(kits):
    """The server's certificate is signed by the same CA but is for serverAuth only."""
    server = load_kit(kits["server"])
    with echo_server(kits["server"]) as (port, peers):
        assert_handshake_fails(port, grpc.ssl_channel_credentials(server.ca_pem, server.key_pem, server.cert_pem))
    assert peers == []


def test_the_client_refuses_a_server_not_named_for_the_address_it_dialled(kits, tmp_path):
    """The client's own hostname check refuses (the server, which never sees a call, does not)."""
    elsewhere = provision(tmp_path / "elsewhere", ["split.example.org"], ["client-0"])
    with echo_server(elsewhere["server"]) as (port, peers):  # a genuine server of its CA, but not for 127.0.0.1
        assert "Hostname Verification" in assert_handshake_fails(port, client_credentials(elsewhere["client-0"]))
    assert peers == []
    with echo_server(kits["server"]) as (port, peers):  # our server, dialled under a name it does not carry
        details = assert_handshake_fails(port, client_credentials(kits["client-0"]), target_name="split.example.org")
        assert "Hostname Verification" in details
    assert peers == []
