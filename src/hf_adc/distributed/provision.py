"""Credentials for mutual TLS between the parties of a split: one CA, one kit per party, and the checks on loading.

Whoever provisions runs, once:

    python -m hf_adc.distributed.provision --output_dir kits --server_name split.example.org --num_clients 3

and gets

    kits/ca/ca.pem, kits/ca/ca-key.pem      the CA; kept by whoever provisions, never given to a party
    kits/server/{ca.pem,cert.pem,key.pem}   for the server
    kits/client-0/{ca.pem,cert.pem,key.pem} for each client (or kits/<name>/ with --client_names)

Each party gets its own folder, over a channel the two trust. `ca.pem` is how each side checks the other: the
server accepts only client certificates this CA signed, and reads the client's identity from the certificate's
common name (gRPC's `context.auth_context()["x509_common_name"]`), so a client cannot claim another's name; a
client accepts only a server whose certificate this CA signed for the address it dialled. The CA's private key
stays in `kits/ca/`: it is what adds a member later (`add_client`, `--add_client NAME`) without re-provisioning
the others, and anyone holding it can mint members, so it never goes into a party's kit.

Private keys are EC P-256, created with mode 0600 (no window in which they are readable by others) in folders of
mode 0700; `load_kit` refuses a key that group or others can read or write, as ssh does. Revoking a member (a
leaked kit, a member that leaves) is by its certificate's serial or its name, in a text file read by
`load_revocations` and checked after the handshake (`Revocations.refuses`); the serials are printed when a kit
is made, and the server finds the peer's in `auth_context()["x509_pem_cert"]`.

What the transport calls: `load_kit(folder)` on each side (a `Kit` with the three PEM blobs gRPC takes, the
party's name, serial and expiry), `ephemeral_kits(folder, n)` for the commands that run every party on one
machine, and `load_revocations(path)` on the server.
"""

import argparse
import ipaddress
import os
import re
import secrets
import stat
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_FOLDER",
    "SERVER_FOLDER",
    "Kit",
    "KitError",
    "Revocations",
    "add_client",
    "ephemeral_kits",
    "load_kit",
    "load_revocations",
    "provision",
]

CA_FOLDER = "ca"
SERVER_FOLDER = "server"
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
KIT_CA, KIT_CERT, KIT_KEY = "ca.pem", "cert.pem", "key.pem"
KIT_FILES = (KIT_CA, KIT_CERT, KIT_KEY)
DEFAULT_DAYS = 365
MAX_DAYS = 36500
DEFAULT_CA_DAYS = 3650  # the CA outlives the kits it signs, so members can be added and re-issued for years
CLOCK_SKEW = timedelta(minutes=5)  # certificates start this long before now: the parties' clocks differ a little
EPHEMERAL_SERVER_NAMES = ("localhost", "127.0.0.1")
# A client name starts with a letter, so that a revocation line is a name or a serial (starting with a digit),
# never both; it is also a folder name and fits a certificate's common name (64 characters at most).
CLIENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"(?=.{{1,253}}$){DNS_LABEL}(\.{DNS_LABEL})*")


class KitError(ValueError):
    """A kit (or the CA) that cannot be used as it is; the message names the file and what to do about it."""


@dataclass(frozen=True)
class Kit:
    """One party's credentials, checked: what `grpc.ssl_server_credentials` / `grpc.ssl_channel_credentials` take.

    `name` is the client's name (its certificate's common name) or, for the server, the first name its
    certificate is valid for. The PEM blobs are left out of the repr, so that logging a kit leaks no key.
    """

    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    name: str
    role: str  # "server" or "client"
    serial: int
    not_valid_after: datetime


@dataclass(frozen=True)
class Revocations:
    """Members the server no longer accepts, by certificate serial or by client name."""

    names: frozenset[str] = frozenset()
    serials: frozenset[int] = frozenset()

    def refuses(self, name: str, serial: int) -> bool:
        """Whether the peer whose certificate has this common name and serial is revoked."""
        return name in self.names or serial in self.serials


def provision(
    output_dir: str | os.PathLike,
    server_names: Sequence[str],
    client_names: Sequence[str],
    days: int = DEFAULT_DAYS,
    ca_days: int = DEFAULT_CA_DAYS,
) -> dict[str, Path]:
    """Make a new CA in `output_dir/ca/` and sign one kit per party; the kits by party name ("server", clients).

    The server's certificate is valid for every name in `server_names` (IP addresses as IP names, the rest as DNS
    names: list every address clients will dial), the clients' certificates carry their names as common names;
    all last `days` days, the CA `ca_days`. Nothing is written if any of the folders exists already (a kit is
    never overwritten: a party may hold it). Keep `output_dir/ca/` to add or re-issue clients with `add_client`.
    """
    output_dir = Path(output_dir)
    check_days(days, "days")
    check_days(ca_days, "ca_days")
    if ca_days < days:
        raise ValueError(f"ca_days={ca_days} is shorter than days={days}: the CA must outlive the kits it signs")
    names = [server_name(name) for name in dict.fromkeys(server_names)]
    if not names:
        raise ValueError("no server name: give every address clients will dial (e.g. localhost, 127.0.0.1)")
    check_client_names(client_names)
    folders = {CA_FOLDER: output_dir / CA_FOLDER, SERVER_FOLDER: output_dir / SERVER_FOLDER}
    folders |= {name: output_dir / name for name in client_names}
    refuse_existing(list(folders.values()))

    output_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = new_key()
    ca_cert = sign_ca(ca_key, ca_days)
    make_folder(folders[CA_FOLDER])
    write_file(folders[CA_FOLDER] / CA_CERT, pem(ca_cert), private=False)
    write_file(folders[CA_FOLDER] / CA_KEY, key_pem(ca_key), private=True)
    server_key = new_key()
    server_cert = sign_leaf(
        ca_cert, ca_key, server_key.public_key(), str(names[0].value), ExtendedKeyUsageOID.SERVER_AUTH, days, names
    )
    write_kit(folders[SERVER_FOLDER], ca_cert, server_cert, server_key)
    for name in client_names:
        issue_client(folders[name], ca_cert, ca_key, name, days)
    return {name: folder for name, folder in folders.items() if name != CA_FOLDER}


def add_client(output_dir: str | os.PathLike, name: str, days: int = DEFAULT_DAYS) -> Path:
    """A kit for a new client `name`, signed by the CA in `output_dir/ca/`: a member joins, the others keep theirs.

    To re-issue a client's kit (lost, leaked, expiring), move its old folder away, call this, and revoke the old
    certificate's serial (not the name, which the new certificate shares). Refuses an existing folder, a CA key
    readable by others or not matching the CA, and `days` reaching past the CA's own expiry.
    """
    output_dir = Path(output_dir)
    check_days(days, "days")
    check_client_names([name])
    folder = output_dir / name
    refuse_existing([folder])
    ca_folder = output_dir / CA_FOLDER
    ca_cert, _ = read_certificate(
        require_file(ca_folder / CA_CERT, f"the CA's certificate, made by provision in {ca_folder}")
    )
    ca_key, _ = read_private_key(
        require_file(ca_folder / CA_KEY, f"the CA's private key, made by provision in {ca_folder}")
    )
    if public_bytes(ca_key.public_key()) != public_bytes(ca_cert.public_key()):
        raise KitError(
            f"{ca_folder / CA_KEY} does not belong to {ca_folder / CA_CERT}: put back the two files provision wrote"
        )
    now, ca_end = datetime.now(timezone.utc), ca_cert.not_valid_after_utc
    if ca_end - now < timedelta(days=1):
        raise KitError(f"{ca_folder / CA_CERT} expires on {ca_end:%Y-%m-%d %H:%M} UTC: provision a new CA and kits")
    if now + timedelta(days=days) > ca_end:
        left = (ca_end - now).days
        raise ValueError(
            f"days={days} reaches past the CA's expiry ({ca_end:%Y-%m-%d}): at most {left} days "
            "with this CA, or provision a new one"
        )
    issue_client(folder, ca_cert, ca_key, name, days)
    return folder


def load_kit(folder: str | os.PathLike, role: str | None = None) -> Kit:
    """The kit in `folder`, checked before any connection is tried, so that a broken kit is named, not a handshake.

    Refuses (`KitError`, naming the file and the fix): a missing file; a key that group or others can read or
    write; a certificate not signed by the kit's `ca.pem`; a certificate (or CA) expired or not valid yet; a key
    that is not the certificate's; and, where `role` ("server" or "client") is given, a kit of the other role.
    """
    folder = Path(folder)
    if role not in (None, "server", "client"):
        raise ValueError(f"role={role!r}: must be 'server', 'client' or None")
    ca_path, cert_path, key_path = (require_file(folder / n, "part of a kit made by provision") for n in KIT_FILES)
    key, key_pem = read_private_key(key_path)
    (ca, ca_pem), (cert, cert_pem) = read_certificate(ca_path), read_certificate(cert_path)
    if not is_ca(ca):
        raise KitError(f"{ca_path} is not a CA certificate: copy the kit's ca.pem from the provisioning's ca/ca.pem")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as error:
        raise KitError(
            f"{cert_path} is not signed by the CA in {ca_path} ({error or 'bad signature'}): the two come from "
            "different provisionings; use the ca.pem and cert.pem of one kit"
        ) from error
    now = datetime.now(timezone.utc)
    for path, certificate in ((ca_path, ca), (cert_path, cert)):
        if now > certificate.not_valid_after_utc:
            raise KitError(
                f"{path} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: ask whoever provisions for "
                "a new kit (add_client, or provision for the CA)"
            )
        if now < certificate.not_valid_before_utc:
            raise KitError(
                f"{path} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this "
                "machine's clock"
            )
    if public_bytes(key.public_key()) != public_bytes(cert.public_key()):
        raise KitError(f"{key_path} is not the key of {cert_path}: use the key.pem and cert.pem of one kit")
    kit_role, name = identity(cert, cert_path)
    if role is not None and kit_role != role:
        raise KitError(f"{folder} is a {kit_role} kit (for {name}), but the {role} needs a {role} kit")
    return Kit(
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        name=name,
        role=kit_role,
        serial=cert.serial_number,
        not_valid_after=cert.not_valid_after_utc,
    )


def ephemeral_kits(folder: str | os.PathLike, num_clients: int) -> dict[str, Path]:
    """Kits for a run with every party on this machine: `provision` into `folder` for `localhost` and `127.0.0.1`.

    `folder` must be new or empty (e.g. a `tempfile.TemporaryDirectory()`); it is made private (0700), and is
    the caller's to delete when the run ends. Clients are `client-0` ... `client-{num_clients - 1}`.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty: ephemeral kits go into a new or empty folder")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    return provision(folder, EPHEMERAL_SERVER_NAMES, default_client_names(num_clients))


def load_revocations(path: str | os.PathLike) -> Revocations:
    """The revocations in a text file: one entry per line, a certificate serial (decimal or `0x` hex) or a client
    name; `#` starts a comment. A line that is neither is an error naming its number."""
    path = Path(path)
    names, serials = set(), set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", entry):
            serials.add(int(entry, 16))
        elif re.fullmatch(r"[0-9]+", entry):
            serials.add(int(entry))
        elif CLIENT_NAME.fullmatch(entry):
            names.add(entry)
        else:
            raise ValueError(
                f"{path}, line {number}: {entry!r} is neither a certificate serial (decimal, or hex after 0x) nor a "
                "client name (a letter, then up to 63 letters, digits, '.', '_' or '-')"
            )
    return Revocations(frozenset(names), frozenset(serials))


def default_client_names(num_clients: int) -> list[str]:
    """`client-0` ... `client-{num_clients - 1}`."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r}: must be an integer of at least 1")
    return [f"client-{i}" for i in range(num_clients)]


def check_days(days: int, what: str) -> None:
    """Refuse a validity that is not a positive whole number of days."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ValueError(f"{what}={days!r}: must be an integer from 1 to {MAX_DAYS} (days of validity)")


def check_client_names(names: Sequence[str]) -> None:
    """Refuse no clients, repeated names, the folder names of the CA and server, and names that are not
    `CLIENT_NAME` (they become folder names, common names and revocation entries)."""
    if not names:
        raise ValueError("no clients: give at least one client name (or num_clients >= 1)")
    for name in names:
        if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
            raise ValueError(f"client name {name!r}: must be a letter, then up to 63 letters, digits, '.', '_' or '-'")
        if name in (CA_FOLDER, SERVER_FOLDER):
            raise ValueError(f"client name {name!r}: {CA_FOLDER!r} and {SERVER_FOLDER!r} are taken by their folders")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"client names {repeated} are given more than once: each client needs its own name")


def server_name(name: str) -> x509.GeneralName:
    """A name the server's certificate is valid for: an IP address or a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        if not DNS_NAME.fullmatch(name):
            raise ValueError(
                f"server name {name!r}: must be an IP address or a DNS name (labels of letters, digits and '-', "
                "joined by '.')"
            ) from None
        return x509.DNSName(name)


def refuse_existing(folders: list[Path]) -> None:
    """Refuse to write into folders that exist: a kit may already be in a party's hands."""
    taken = [str(folder) for folder in folders if folder.exists()]
    if taken:
        raise FileExistsError(
            f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}: kits are never overwritten; choose "
            "another output_dir, or move the old folder away (and revoke its certificate) to re-issue a client"
        )


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key."""
    return ec.generate_private_key(ec.SECP256R1())


def validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    """`builder` valid from a little before now (clock skew between the parties) for `days` days."""
    now = datetime.now(timezone.utc)
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(now + timedelta(days=days))


def sign_ca(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    """A self-signed CA that signs only end-entity certificates (path length 0), under a name of its own."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hf_adc"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"hf_adc CA {secrets.token_hex(4)}"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return validity(builder, days).sign(key, hashes.SHA256())


def sign_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    days: int,
    alt_names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """An end-entity certificate for `public_key`, signed by the CA, for one use (serverAuth or clientAuth), with a
    random serial (so that serials identify certificates for revocation)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return validity(builder, days).sign(ca_key, hashes.SHA256())


def key_usage(cert_sign: bool) -> x509.KeyUsage:
    """Signing certificates (and CRLs) for the CA; signatures in the TLS handshake (ECDHE-ECDSA) for the parties."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def issue_client(
    folder: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str, days: int
) -> None:
    """A client's kit in `folder`: a new key and a clientAuth certificate with common name `name`."""
    key = new_key()
    cert = sign_leaf(ca_cert, ca_key, key.public_key(), name, ExtendedKeyUsageOID.CLIENT_AUTH, days)
    write_kit(folder, ca_cert, cert, key)


def write_kit(folder: Path, ca_cert: x509.Certificate, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """`ca.pem`, `cert.pem` and `key.pem` in a new private folder."""
    make_folder(folder)
    write_file(folder / KIT_CA, pem(ca_cert), private=False)
    write_file(folder / KIT_CERT, pem(cert), private=False)
    write_file(folder / KIT_KEY, key_pem(key), private=True)


def make_folder(folder: Path) -> None:
    """A new folder of mode 0700 (failing if it exists: `refuse_existing` has named it already, barring a race)."""
    folder.mkdir(mode=0o700)


def write_file(path: Path, data: bytes, private: bool) -> None:
    """Write a new file, with mode 0600 (private) or 0644 from its creation on; never through an existing file or
    link (O_EXCL), so nothing written here lands where someone else can read it."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def pem(cert: x509.Certificate) -> bytes:
    """A certificate in PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key in unencrypted PKCS#8 PEM (what gRPC reads; the file's mode is what protects it)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    """A public key in DER, to compare two keys."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def require_file(path: Path, what: str) -> Path:
    """`path`, or a `KitError` saying what the missing file is."""
    if not path.is_file():
        raise KitError(f"{path} is missing ({what}): copy the whole folder provision wrote")
    return path


def read_certificate(path: Path) -> tuple[x509.Certificate, bytes]:
    """The PEM certificate in `path`, and the bytes it was read from (read once: what is checked is what is used)."""
    data = path.read_bytes()
    try:
        return x509.load_pem_x509_certificate(data), data
    except ValueError as error:
        raise KitError(
            f"{path} is not a PEM certificate ({error}): copy it again from the kit provision wrote"
        ) from None


def read_private_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """The unencrypted PEM private key in `path` and its bytes, refused (as ssh does) if group or others can read or
    write the file; the mode is that of the file opened, so the key cannot be swapped between check and read."""
    with open(path, "rb") as file:
        mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
        if mode & 0o077:
            raise KitError(
                f"{path} has mode {mode:04o}: a private key must be readable by its owner only; run "
                f"`chmod 600 {path}` (and ask whoever provisions for a new kit if others may have read it)"
            )
        data = file.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise KitError(f"{path} is not an unencrypted PEM private key ({error}): copy it again from the kit") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KitError(f"{path} holds a {type(key).__name__}, not an EC key: use the key.pem provision wrote")
    return key, data


def is_ca(cert: x509.Certificate) -> bool:
    """Whether `cert` says it is a CA (basicConstraints CA=true)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def identity(cert: x509.Certificate, path: Path) -> tuple[str, str]:
    """The role ("server" or "client", from the extended key usage) and the name of a party's certificate."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = []
    if ExtendedKeyUsageOID.SERVER_AUTH in usages:
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise KitError(f"{path} is a server certificate for no address: provision a server kit") from None
        return "server", str(next(iter(names)).value)
    if ExtendedKeyUsageOID.CLIENT_AUTH in usages:
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if common_names:
            return "client", str(common_names[0].value)
    raise KitError(f"{path} is neither a server nor a client certificate made by provision: use a kit it wrote")


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see `main`)."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_adc.distributed.provision",
        description=(
            "Make a CA and one mutual-TLS kit per party (ca.pem, cert.pem, key.pem): OUTPUT_DIR/server/ and "
            "OUTPUT_DIR/client-0/ ... (or OUTPUT_DIR/<name>/). The CA's private key goes to OUTPUT_DIR/ca/ca-key.pem: "
            "keep it with whoever provisions (it is needed to add or re-issue a client later, with --add_client) "
            "and never give it to a party."
        ),
        epilog=(
            "Give each party only its own folder. Revoke a client by the serial printed here, or by its name, in a "
            "revocations file (one per line, # comments). To re-issue a client: move its folder away, run "
            "--add_client NAME, and revoke the old serial."
        ),
    )
    parser.add_argument("--output_dir", type=Path, required=True, help="Where the CA and the kits go.")
    parser.add_argument(
        "--server_name",
        action="append",
        help="An address clients dial to reach the server (IP address or DNS name); repeat for each, e.g. "
        "--server_name localhost --server_name 127.0.0.1. Not with --add_client.",
    )
    clients = parser.add_mutually_exclusive_group(required=True)
    clients.add_argument("--num_clients", type=int, help="Make client-0 ... client-(N-1).")
    clients.add_argument("--client_names", nargs="+", metavar="NAME", help="Make one client per name.")
    clients.add_argument(
        "--add_client",
        nargs="+",
        metavar="NAME",
        help="Add client kits signed by the existing CA in OUTPUT_DIR/ca/ (the other kits stay valid).",
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="Validity of the kits, in days.")
    parser.add_argument(
        "--ca_days", type=int, help=f"Validity of a new CA, in days (default {DEFAULT_CA_DAYS}). Not with --add_client."
    )
    args = parser.parse_args(argv)
    if args.add_client and (args.server_name or args.ca_days is not None):
        parser.error("--add_client uses the existing CA and server kit: --server_name and --ca_days do not apply")
    if not args.add_client and not args.server_name:
        parser.error("--server_name is required: give every address clients will dial")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Provision (or add clients) from the command line, and print where everything went and the serials."""
    args = parse_arguments(argv)
    try:
        if args.add_client:
            kits = {name: add_client(args.output_dir, name, args.days) for name in args.add_client}
        else:
            names = args.client_names or default_client_names(args.num_clients)
            ca_days = DEFAULT_CA_DAYS if args.ca_days is None else args.ca_days
            kits = provision(args.output_dir, args.server_name, names, args.days, ca_days)
            ca = args.output_dir / CA_FOLDER
            print(f"CA: {ca / CA_CERT} (certificate) and {ca / CA_KEY} (private key: keep it with whoever provisions,")
            print("    to add or re-issue clients; never give it to a party)")
    except (ValueError, FileExistsError) as error:
        sys.exit(f"error: {error}")
    for name, folder in kits.items():
        kit = load_kit(folder)
        until = f"valid until {kit.not_valid_after:%Y-%m-%d}"
        if kit.role == "server":
            print(f"server: {folder} (for {', '.join(dict.fromkeys(args.server_name))}; {until})")
        else:
            print(f"{name}: {folder} (serial {kit.serial:#x}; {until})")
    print("Give each party only its own folder; revoke a client by its serial or name.")


if __name__ == "__main__":
    main()
