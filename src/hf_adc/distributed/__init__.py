"""Split learning across processes, by role.

- `wire.py`: the wire format (a fixed integer header, then the tensors; no pickle) and its errors;
- `connect.py`: the gRPC stream over mutual TLS that carries frames between two ends (`Connection`), the server's
  `Listener`, `connect`;
- `credentials.py`, `provision.py`: each party's kit (CA, certificate, key) loaded and checked; making kits;
- `files.py`: checkpoint files written whole or not at all;
- `settings.py`: what both ends must agree on (`session_settings`) and how settings compare;
- `client.py`: the client's `RemoteLink` and `RemoteSplitViT` (trained by the unchanged `ADCTrainer`);
- `server_half.py`: the `ServerHalf` both servers compose (compute, optimizer and schedule, checkpoint files);
- `server.py`: the single-client `SplitServer` (accept, handshake, a table from message kind to handler);
- `ranks.py`: several processes on each side (a server of N ranks for a client of N processes, rank i to rank i);
- `federation/`: several clients (membership, schedules, FedAvg, the round plan, checkpoints, the server);
- `arguments.py`, `launch.py`: the command-line arguments and the code that starts servers and clients.
"""

from .client import PeerCallback, RemoteLink, RemoteSplitViT, RemoteUSplitViT
from .connect import Connection, Listener, connect, parse_address
from .federation import FederatedLink, FederatedServer, FederationPlan
from .server import SplitServer
from .server_half import ServerHalf
from .settings import session_settings
from .wire import Frame, Kind, PeerLost, Refused, Traffic, WireError

__all__ = [
    "Connection",
    "FederatedLink",
    "FederatedServer",
    "FederationPlan",
    "Frame",
    "Kind",
    "Listener",
    "PeerCallback",
    "PeerLost",
    "Refused",
    "RemoteLink",
    "RemoteSplitViT",
    "RemoteUSplitViT",
    "ServerHalf",
    "SplitServer",
    "Traffic",
    "WireError",
    "connect",
    "parse_address",
    "session_settings",
]
