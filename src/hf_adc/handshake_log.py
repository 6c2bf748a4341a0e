"""The server's log of the TLS handshakes it refused: each with the peer's address and the reason, rate-limited.

A stranger (a kit from another CA, an expired certificate, a certificate without the client purpose) never reaches
the server's Python code: gRPC refuses it inside its TLS handshake, and grpcio has no hook for that. gRPC core does
trace each failed handshake, with the peer's address (`endpoint_peer_address=ipv4:...`) and OpenSSL's reason, when
its `handshaker` tracer is on. `log_refused_handshakes()` turns that tracer on and reads gRPC core's output (its file
descriptor 2) through a pipe: the handshake records become one warning each through Python's `logging` (at most one
per host and reason every `every` seconds, with the count of those held back), and every other line goes on to the
real standard error unchanged.

It must run before gRPC is first imported (the tracer is read once, at gRPC's start), which is why it lives here,
outside `hf_adc.distributed` (whose import loads gRPC): `recipes/serve.py` calls it first thing. It parses gRPC
core's trace text (pinned by grpcio's version in constraints.txt, and tested with a stranger's kit).
"""

import logging
import os
import re
import sys
import threading
import time

logger = logging.getLogger("hf_adc.distributed.handshakes")

_RECORD = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (?P<source>[\w.]+):\d+\] (?P<message>.*)$")
_FAILED = "CallNextHandshakerLocked: error="
_PEER = re.compile(r"endpoint_peer_address=([^,}\s]+)")
_TRACE_SOURCES = ("handshaker.cc", "channel_trace.h", "trace.cc")  # the tracer's own lines, dropped once read


class RateLimited:
    """At most one message per key every `every` seconds; `allow(key)` says whether this one goes out, and how
    many were held back since the last that did."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}
        self.lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, int]:
        now = time.monotonic()
        with self.lock:
            if now - self.last.get(key, -self.every) < self.every:
                self.held[key] = self.held.get(key, 0) + 1
                return False, 0
            self.last[key] = now
            return True, self.held.pop(key, 0)


def _reason(error: str) -> str:
    """OpenSSL's reason in gRPC's error text, in words a person provisioning kits can act on."""
    error = re.sub(r": OK$", "", error.strip())
    known = {
        "unable to get local issuer certificate": "its certificate is not signed by this server's CA (a kit from "
        "another CA)",
        "certificate has expired": "its certificate has expired",
        "certificate is not yet valid": "its certificate is not valid yet",
        "unsupported certificate purpose": "its certificate is not a client certificate (no clientAuth usage)",
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "it sent no certificate",
        "WRONG_VERSION_NUMBER": "it does not speak TLS (plaintext, or another protocol)",
        "Socket closed": "it closed the handshake (it may have refused this server's certificate, or only probed "
        "the port)",
    }
    for marker, words in known.items():
        if marker in error:
            return f"{words} [{error}]"
    return error


class _Pump:
    """Reads gRPC core's output line by line: handshake failure records are logged, the rest passed through."""

    def __init__(self, source: int, sink, limiter: RateLimited):
        self.source, self.sink, self.limiter = source, sink, limiter
        self.failure: str | None = None  # the error of a failure record whose peer line is still to come
        self.in_record = False  # inside a record of the tracer (dropped)

    def run(self) -> None:
        with os.fdopen(self.source, "r", errors="replace") as lines:
            for line in lines:
                try:
                    self.line(line)
                except Exception:  # noqa: BLE001 - the pump must never stop: gRPC would block on a full pipe
                    self.sink.write(line)

    def line(self, line: str) -> None:
        record = _RECORD.match(line.rstrip("\n"))
        if record is not None:
            self.failure, self.in_record = None, record["source"] in _TRACE_SOURCES
            message = record["message"]
            if self.in_record and message.startswith(_FAILED) and not message.startswith(_FAILED + "OK"):
                self.failure = message[len(_FAILED) :]
            if not self.in_record and "Handshake failed with error" not in message:
                self.sink.write(line)
            return
        if not self.in_record:
            self.sink.write(line)
            return
        peer = _PEER.search(line)
        if self.failure is not None and peer is not None:
            address, reason = peer.group(1), _reason(self.failure)
            allowed, held = self.limiter.allow(f"{address.rsplit(':', 1)[0]} {reason}")  # per host and reason
            if allowed:
                more = f" ({held} more from this host held back)" if held else ""
                logger.warning("Refused a TLS handshake from %s: %s%s", address, reason, more)
            self.failure = None


_installed = False


def log_refused_handshakes(every: float = 10.0) -> None:
    """Logs each TLS handshake gRPC refuses in this process (see the module docstring); call it before gRPC is
    imported. Raises if gRPC is imported already, since its tracer could no longer be turned on."""
    global _installed
    if _installed:
        return
    if "grpc" in sys.modules:
        raise RuntimeError("log_refused_handshakes() must run before grpc is imported.")
    os.environ["GRPC_TRACE"] = ",".join(filter(None, [os.environ.get("GRPC_TRACE"), "handshaker"]))
    if os.environ.get("GRPC_VERBOSITY", "").upper() not in ("", "DEBUG", "INFO"):
        os.environ["GRPC_VERBOSITY"] = "INFO"  # the tracer writes at INFO: a quieter level would hide it
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    real = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    sink = os.fdopen(real, "w", buffering=1)
    sys.stderr = sink  # Python's own errors and logs go straight to the real standard error
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
            handler.setStream(sink)
    pump = _Pump(read_end, sink, RateLimited(every))
    threading.Thread(target=pump.run, name="grpc-handshake-log", daemon=True).start()
    _installed = True
