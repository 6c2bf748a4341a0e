"""Why a client could not reach the server, said plainly: which side refused whom, and why.

`connect` probes the server before it opens a session: a call to a method the server does not have, which is
answered (UNIMPLEMENTED) once the TLS handshake has gone through, and otherwise fails at once (UNAVAILABLE) with
gRPC's reason. Measured with grpcio 1.85 on 127.0.0.1, each failure has its own words:

- nothing listens yet: `Failed to connect to remote host: Connection refused` (nobody refused: try again);
- the server's certificate is from another CA: `CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate`
  (this client refused the server);
- the server's certificate expired: `CERTIFICATE_VERIFY_FAILED: certificate has expired` (this client refused it);
- the server's certificate names another host: `Hostname Verification Check failed` (this client refused it);
- the server refused this client's certificate: `Socket closed` (under TLS 1.3 the client is told no reason).

In the last case only the server knows the reason (its log says it: `hf_adc.handshake_log`), but this client's kit
was checked when it was loaded (signed by its CA, valid, for client use), so what is left is said.
"""

import re

from cryptography import x509

TRANSIENT = ("Connection refused", "DNS resolution failed", "Network is unreachable", "No route to host",
             "Connection reset", "Deadline Exceeded")  # fmt: skip


def is_transient(details: str) -> bool:
    """Whether a failed probe may go through later (the server not up yet, a network that comes back)."""
    return any(marker in details for marker in TRANSIENT)


def _issuer(pem: bytes) -> str:
    return x509.load_pem_x509_certificate(pem).subject.rfc4514_string()


def explain(details: str, address: str, host: str, kit) -> str:
    """The cause of a failed connection to the server at `address` (dialled as `host`), from gRPC's `details` and
    this client's `kit` (None: plaintext)."""
    reason = re.sub(r"^failed to connect to all addresses; last error: ", "", details or "").strip()
    if is_transient(reason):
        return f"nothing answers at {address} (the server is down, not started yet, or unreachable): {reason}"
    if kit is None:
        return f"cannot reach the server at {address} over plaintext: {reason}"
    ca = _issuer(kit.ca_pem)
    if "unable to get local issuer certificate" in reason or "self-signed certificate" in reason:
        return (
            f"this client refused the server's certificate at {address}: it is not signed by this kit's CA ({ca}). "
            "The server's kit comes from another CA than this client's: provision both from one CA "
            f"(python -m hf_adc.distributed.provision). [{reason}]"
        )
    if "certificate has expired" in reason:
        return (f"this client refused the server's certificate at {address}: it has expired; the server needs a new "
                f"kit. [{reason}]")  # fmt: skip
    if "certificate is not yet valid" in reason:
        return (f"this client refused the server's certificate at {address}: it is not valid yet (check the server's "
                f"clock). [{reason}]")  # fmt: skip
    if "Hostname Verification" in reason or "Peer name" in reason:
        return (
            f"this client refused the server's certificate at {address}: it does not name {host}, the host this "
            f"client dialled. Dial a name the server's certificate holds, or provision the server's kit for {host}. "
            f"[{reason}]"
        )
    if "Socket closed" in reason:
        return (
            f"the server at {address} refused this client's certificate ({kit.name}) in the TLS handshake. This kit is "
            f"signed by its CA ({ca}), valid until {kit.not_valid_after:%Y-%m-%d} and for client use, and that CA "
            "signed the server's certificate too: so the server trusts another CA for its clients, or something "
            f"between closed the connection. The server's log names its reason. [{reason}]"
        )
    return f"the TLS handshake with the server at {address} failed: {reason}"
