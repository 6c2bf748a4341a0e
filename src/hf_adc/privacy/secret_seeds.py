"""Seeds the server must never know, kept by the client: drawn once from the operating system and written into the
client's output folder (which never crosses), so that a resumed run, and every rank of one client, draws what it
would have, while the server, which knows the run's `--seed`, can redraw nothing.

- label DP: which training labels randomized response flips (`label_dp_secret.json`);
- payload noise: the Gaussian noise added to every sent row (`payload_noise_secret.json`).
"""

import json
import os
import secrets
import tempfile
from pathlib import Path


def secret_file(purpose: str) -> str:
    """The file name of the secret seed for `purpose` (`label_dp`, `payload_noise`)."""
    if not purpose.isidentifier():
        raise ValueError(f"purpose={purpose!r} is out of range: it must be a name such as 'label_dp'.")
    return f"{purpose}_secret.json"


def secret_seed(folder: str | Path, purpose: str = "label_dp") -> int:
    """The client's secret seed for `purpose`, drawn once from the OS and kept in `folder/secret_file(purpose)`.
    Created exclusively: ranks that start together all read the one seed the first of them wrote."""
    path = Path(folder) / secret_file(purpose)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as file:
            json.dump({"seed": secrets.randbits(63)}, file)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(file.name, path)  # fails if another rank's seed is there already: then that one is read
        except FileExistsError:
            pass
        finally:
            os.unlink(file.name)
    return int(json.loads(path.read_text())["seed"])
