"""What a party of a split loads and checks at start: its mutual-TLS kit and, on the server, the revocations.

A kit is a folder of three files made by `hf_adc.distributed.provision`: `ca.pem`, `cert.pem` and `key.pem`.
`ca.pem` is how each side checks the other: the server accepts only client certificates this CA signed, and reads
the client's identity from the certificate's common name (gRPC's `context.auth_context()["x509_common_name"]`), so
a client cannot claim another's name; a client accepts only a server whose certificate this CA signed for the
address it dialled.

`load_kit` checks a kit before any connection is tried and names the file and the fix when it is broken; it
refuses a key that group or others can read or write, as ssh does. Revoking a member (a leaked kit, a member that
leaves) is by its certificate's serial or its name, in a text file read by `load_revocations` and checked after
the handshake (`Revocations.refuses`); the server finds the peer's certificate in `auth_context()["x509_pem_cert"]`.

What the transport calls: `load_kit(folder)` on each side (a `Kit` with the three PEM blobs gRPC takes, the
party's name, serial and expiry), and `load_revocations(path)` on the server.
"""

import os
import re
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Kit", "KitError", "Revocations", "load_kit", "load_revocations"]

KIT_CA, KIT_CERT, KIT_KEY = "ca.pem", "cert.pem", "key.pem"
KIT_FILES = (KIT_CA, KIT_CERT, KIT_KEY)
# A client name starts with a letter, so that a revocation line is a name or a serial (starting with a digit),
# never both; it is also a folder name and fits a certificate's common name (64 characters at most).
CLIENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


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
    if not _is_ca(ca):
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
    kit_role, name = _identity(cert, cert_path)
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


# Reading a kit's files and comparing keys; provision uses these too, to read the CA back in add_client.


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


def _is_ca(cert: x509.Certificate) -> bool:
    """Whether `cert` says it is a CA (basicConstraints CA=true)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _identity(cert: x509.Certificate, path: Path) -> tuple[str, str]:
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
