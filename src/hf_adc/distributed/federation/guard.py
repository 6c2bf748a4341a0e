"""What stands between the members' halves and a SplitFed average: no member may own it without lying.

Members of a consortium do not trust each other, and a half is just numbers: a finite half of 1e30 everywhere, sent
with an honest shard size, would own FedAvg (the average at 5e29, every honest member's next activations infinite).
So, before aggregation:

- **Each update is bounded.** A member's update is its half's distance from the current half. Each is clipped to
  `clip_factor` times the round's median distance (the lower middle one for an even count), so that one member moves
  the average no further than `clip_factor` honest updates would, whatever it sends. With two members the median is
  the smaller update: an honest member is never clipped by a larger hostile one; a member that sends its half
  unchanged stalls the other's progress (its own update is zero) but moves nothing.
- **A half that breaks the client half is charged to its sender.** The server holds the client half, so it runs
  each bounded half, and then the average, on a probe batch (fixed random pixels): a half whose activations are NaN or
  Inf is left out of the average and its member is dropped (`charged`), never the member who would have received it.
  An average that still breaks (which bounded, finite halves should not) is not sent: the round keeps the current
  half.
"""

import logging
from dataclasses import dataclass, field

import torch

from .halves import load_half_vector

logger = logging.getLogger(__name__)

DEFAULT_CLIP_FACTOR = 2.0
PROBE_ROWS = 2


def bound_updates(halves: list[torch.Tensor], current: torch.Tensor, clip_factor: float) -> list[float]:
    """The factor (at most 1) by which each half's update `half - current` is scaled so that its norm is at most
    `clip_factor` times the lower median of the updates' norms (computed in float64: no finite float32 half
    overflows it). `clip_factor` 0 bounds nothing."""
    if clip_factor == 0:
        return [1.0] * len(halves)
    distances = torch.stack([torch.linalg.vector_norm(half.double() - current.double()) for half in halves])
    bound = clip_factor * float(distances.median())
    return [min(1.0, bound / float(distance)) if float(distance) > 0 else 1.0 for distance in distances]


@dataclass
class GuardedAverage:
    """A round's average and what the guard did: the members charged with a half that breaks the client half, and
    each member's update scale (below 1: clipped)."""

    half: torch.Tensor
    charged: list[int] = field(default_factory=list)
    scales: dict[int, float] = field(default_factory=dict)


class AverageGuard:
    """Bounds the members' updates and charges broken halves (see the module docstring), around the federation's
    aggregation rule. `client` is the server's copy of the client half (`client_tensors` its trainable side, in the
    half vector's order)."""

    def __init__(self, client, client_tensors: list[torch.Tensor], clip_factor: float = DEFAULT_CLIP_FACTOR):
        if not clip_factor >= 0:
            raise ValueError(f"clip_updates={clip_factor} is out of range: it must be >= 0 (0: no bound).")
        self.client, self.client_tensors, self.clip_factor = client, client_tensors, clip_factor
        config = client.config
        generator = torch.Generator().manual_seed(0)
        shape = (PROBE_ROWS, config.num_channels, config.image_size, config.image_size)
        self.probe = torch.randn(shape, generator=generator)

    @torch.no_grad()
    def breaks(self, half: torch.Tensor) -> bool:
        """Whether the client half, holding `half`, makes non-finite activations of the probe batch (it is left
        holding `half`)."""
        load_half_vector(self.client_tensors, half)
        was_training = self.client.training
        self.client.eval()
        try:
            activations = self.client(self.probe.to(self.client.device)).last_hidden_state
        finally:
            self.client.train(was_training)
        return not bool(torch.isfinite(activations).all())

    def average(self, current: torch.Tensor, halves: dict[int, torch.Tensor], shard_sizes: dict[int, int],
                aggregate) -> GuardedAverage:  # fmt: skip
        """`aggregate` of the members' bounded halves (`halves` and `shard_sizes` by client id), the broken ones
        left out; the current half if nothing sound is left."""
        ids = list(halves)
        scales = bound_updates([halves[i] for i in ids], current, self.clip_factor)
        bounded, result = {}, GuardedAverage(current)
        for client_id, scale in zip(ids, scales, strict=True):
            result.scales[client_id] = scale
            if scale < 1.0:
                logger.warning("Client %d's update was clipped to %.3g of its size (%.3g x the round's median).",
                               client_id, scale, self.clip_factor)  # fmt: skip
            half = current + scale * (halves[client_id] - current) if scale < 1.0 else halves[client_id]
            if self.breaks(half):
                logger.warning("Client %d's half makes the client half's activations NaN or Inf: charged to it.",
                               client_id)  # fmt: skip
                result.charged.append(client_id)
                continue
            bounded[client_id] = half
        if bounded:
            average = aggregate(list(bounded.values()), [shard_sizes[i] for i in bounded])
            if not self.breaks(average):
                result.half = average
            else:
                logger.error("The round's average makes the client half's activations NaN or Inf: it keeps the "
                             "current half.")  # fmt: skip
        load_half_vector(self.client_tensors, result.half)
        return result
