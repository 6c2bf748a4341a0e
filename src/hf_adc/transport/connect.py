"""Moved to `hf_adc.distributed.connect`. Re-exported for one release."""

from ..distributed.connect import *  # noqa: F403
