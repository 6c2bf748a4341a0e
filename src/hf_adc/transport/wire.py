"""Moved to `hf_adc.distributed.wire` (and the `Channel` to `hf_adc.distributed.connect.Connection`). Re-exported
for one release."""

from ..distributed.connect import Connection as Channel  # noqa: F401
from ..distributed.wire import *  # noqa: F403
from ..distributed.wire import Frame as Message  # noqa: F401
