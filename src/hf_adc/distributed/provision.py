"""Making the credentials for mutual TLS between the parties of a split: one CA, and one kit per party.

Whoever provisions runs, once:

    python -m hf_adc.distributed.provision --output_dir kits --server_name split.example.org --num_clients 3

and gets

    kits/ca/ca.pem, kits/ca/ca-key.pem      the CA; kept by whoever provisions, never given to a party
    kits/server/{ca.pem,cert.pem,key.pem}   for the server
    kits/client-0/{ca.pem,cert.pem,key.pem} for each client (or kits/<name>/ with --client_names)

Each party gets its own folder, over a channel the two trust; what a party loads and checks at start, and how the
two sides check each other, is in `hf_adc.distributed.credentials`. The CA's private key stays in `kits/ca/`: it
is what adds a member later (`add_client`, `--add_client NAME`) without re-provisioning the others, and anyone
holding it can mint members, so it never goes into a party's kit.

Private keys are EC P-256, created with mode 0600 (no window in which they are readable by others) in folders of
mode 0700. The serial printed for each kit is what a revocations file names (`credentials.load_revocations`).
`ephemeral_kits(folder, n)` makes kits for the commands that run every party on one machine. `Kit`, `KitError`,
`Revocations`, `load_kit` and `load_revocations` are re-exported from `credentials`.
"""

import argparse
import ipaddress
import os
import re
import secrets
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .credentials import (
    CLIENT_NAME,
    KIT_CA,
    KIT_CERT,
    KIT_KEY,
    Kit,
    KitError,
    Revocations,
    load_kit,
    load_revocations,
    public_bytes,
    read_certificate,
    read_private_key,
    require_file,
)

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
DEFAULT_DAYS = 365
MAX_DAYS = 36500
DEFAULT_CA_DAYS = 3650  # the CA outlives the kits it signs, so members can be added and re-issued for years
CLOCK_SKEW = timedelta(minutes=5)  # certificates start this long before now: the parties' clocks differ a little
EPHEMERAL_SERVER_NAMES = ("localhost", "127.0.0.1")
DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"(?=.{{1,253}}$){DNS_LABEL}(\.{DNS_LABEL})*")


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
    _check_days(days, "days")
    _check_days(ca_days, "ca_days")
    if ca_days < days:
        raise ValueError(f"ca_days={ca_days} is shorter than days={days}: the CA must outlive the kits it signs")
    names = [_server_name(name) for name in dict.fromkeys(server_names)]
    if not names:
        raise ValueError("no server name: give every address clients will dial (e.g. localhost, 127.0.0.1)")
    _check_client_names(client_names)
    folders = {CA_FOLDER: output_dir / CA_FOLDER, SERVER_FOLDER: output_dir / SERVER_FOLDER}
    folders |= {name: output_dir / name for name in client_names}
    _refuse_existing(list(folders.values()))

    output_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = _new_key()
    ca_cert = _sign_ca(ca_key, ca_days)
    _make_folder(folders[CA_FOLDER])
    _write_file(folders[CA_FOLDER] / CA_CERT, _pem(ca_cert), private=False)
    _write_file(folders[CA_FOLDER] / CA_KEY, _key_pem(ca_key), private=True)
    server_key = _new_key()
    server_cert = _sign_leaf(
        ca_cert, ca_key, server_key.public_key(), str(names[0].value), ExtendedKeyUsageOID.SERVER_AUTH, days, names
    )
    _write_kit(folders[SERVER_FOLDER], ca_cert, server_cert, server_key)
    for name in client_names:
        _issue_client(folders[name], ca_cert, ca_key, name, days)
    return {name: folder for name, folder in folders.items() if name != CA_FOLDER}


def add_client(output_dir: str | os.PathLike, name: str, days: int = DEFAULT_DAYS) -> Path:
    """A kit for a new client `name`, signed by the CA in `output_dir/ca/`: a member joins, the others keep theirs.

    To re-issue a client's kit (lost, leaked, expiring), move its old folder away, call this, and revoke the old
    certificate's serial (not the name, which the new certificate shares). Refuses an existing folder, a CA key
    readable by others or not matching the CA, and `days` reaching past the CA's own expiry.
    """
    output_dir = Path(output_dir)
    _check_days(days, "days")
    _check_client_names([name])
    folder = output_dir / name
    _refuse_existing([folder])
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
    _issue_client(folder, ca_cert, ca_key, name, days)
    return folder


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
    return provision(folder, EPHEMERAL_SERVER_NAMES, _default_client_names(num_clients))


def _default_client_names(num_clients: int) -> list[str]:
    """`client-0` ... `client-{num_clients - 1}`."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r}: must be an integer of at least 1")
    return [f"client-{i}" for i in range(num_clients)]


def _check_days(days: int, what: str) -> None:
    """Refuse a validity that is not a positive whole number of days."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ValueError(f"{what}={days!r}: must be an integer from 1 to {MAX_DAYS} (days of validity)")


def _check_client_names(names: Sequence[str]) -> None:
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


def _server_name(name: str) -> x509.GeneralName:
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


def _refuse_existing(folders: list[Path]) -> None:
    """Refuse to write into folders that exist: a kit may already be in a party's hands."""
    taken = [str(folder) for folder in folders if folder.exists()]
    if taken:
        raise FileExistsError(
            f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}: kits are never overwritten; choose "
            "another output_dir, or move the old folder away (and revoke its certificate) to re-issue a client"
        )


def _new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key."""
    return ec.generate_private_key(ec.SECP256R1())


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    """`builder` valid from a little before now (clock skew between the parties) for `days` days."""
    now = datetime.now(timezone.utc)
    return builder.not_valid_before(now - CLOCK_SKEW).not_valid_after(now + timedelta(days=days))


def _sign_ca(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
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
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _validity(builder, days).sign(key, hashes.SHA256())


def _sign_leaf(
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
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return _validity(builder, days).sign(ca_key, hashes.SHA256())


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
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


def _issue_client(
    folder: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str, days: int
) -> None:
    """A client's kit in `folder`: a new key and a clientAuth certificate with common name `name`."""
    key = _new_key()
    cert = _sign_leaf(ca_cert, ca_key, key.public_key(), name, ExtendedKeyUsageOID.CLIENT_AUTH, days)
    _write_kit(folder, ca_cert, cert, key)


def _write_kit(
    folder: Path, ca_cert: x509.Certificate, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    """`ca.pem`, `cert.pem` and `key.pem` in a new private folder."""
    _make_folder(folder)
    _write_file(folder / KIT_CA, _pem(ca_cert), private=False)
    _write_file(folder / KIT_CERT, _pem(cert), private=False)
    _write_file(folder / KIT_KEY, _key_pem(key), private=True)


def _make_folder(folder: Path) -> None:
    """A new folder of mode 0700 (failing if it exists: `_refuse_existing` has named it already, barring a race)."""
    folder.mkdir(mode=0o700)


def _write_file(path: Path, data: bytes, private: bool) -> None:
    """Write a new file, with mode 0600 (private) or 0644 from its creation on; never through an existing file or
    link (O_EXCL), so nothing written here lands where someone else can read it."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _pem(cert: x509.Certificate) -> bytes:
    """A certificate in PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key in unencrypted PKCS#8 PEM (what gRPC reads; the file's mode is what protects it)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
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
    args = _parse_arguments(argv)
    try:
        if args.add_client:
            kits = {name: add_client(args.output_dir, name, args.days) for name in args.add_client}
        else:
            names = args.client_names or _default_client_names(args.num_clients)
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
