"""Moved to `hf_adc.distributed.federation`. This module re-exports the old names for one release (`SCHEDULES` is
the tuple of schedule names, as it was)."""

import warnings

from .distributed.federation import (
    CLIENT_HALF_NAME,
    FEDERATION_ARGS,
    FEDERATION_STATE_NAME,
    PLAN_BYTES,
    RESULT_FIELDS,
    FederatedLink,
    FederatedServer,
    FederationCallback,
    FederationPlan,
    client_side_tensors,
    half_vector,
    load_half_vector,
    result_scalars,
)
from .distributed.federation import SCHEDULE_NAMES as SCHEDULES

warnings.warn("hf_adc.federation moved to hf_adc.distributed.federation; this alias goes in the next release.",
              DeprecationWarning, stacklevel=2)  # fmt: skip

__all__ = [
    "CLIENT_HALF_NAME",
    "FEDERATION_ARGS",
    "FEDERATION_STATE_NAME",
    "PLAN_BYTES",
    "RESULT_FIELDS",
    "SCHEDULES",
    "FederatedLink",
    "FederatedServer",
    "FederationCallback",
    "FederationPlan",
    "client_side_tensors",
    "half_vector",
    "load_half_vector",
    "result_scalars",
]
