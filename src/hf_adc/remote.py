"""Moved to `hf_adc.distributed` (client: `distributed.client`, servers: `distributed.server`, the server half:
`distributed.server_half`, settings: `distributed.settings`). This module re-exports the old names for one
release."""

import warnings

from .distributed.client import RemoteLink, RemoteSplitViT
from .distributed.server import SplitServer
from .distributed.server_half import SERVER_WEIGHTS_NAME, ServerHalf
from .distributed.settings import (
    TRAINING_SETTINGS,
    checkpoint_every,
    differing_settings,
    drop_modules,
    plain,
    session_settings,
)

warnings.warn("hf_adc.remote moved to hf_adc.distributed; this alias goes in the next release.", DeprecationWarning,
              stacklevel=2)  # fmt: skip

__all__ = [
    "SERVER_WEIGHTS_NAME",
    "TRAINING_SETTINGS",
    "RemoteLink",
    "RemoteSplitViT",
    "ServerHalf",
    "SplitServer",
    "checkpoint_every",
    "differing_settings",
    "drop_modules",
    "plain",
    "session_settings",
]
