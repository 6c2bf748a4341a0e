"""Top-K and Random Top-K sparsification: per sample, a fraction of the activation values and their indices.

The gradient comes back on the same entries only (the server knows which it received), so it is masked
the same way. Indices are packed at ceil(log2(n*d)) bits each.
"""

import math
from dataclasses import dataclass, field

import torch

from .base import Bridge, BridgeConfig, SeededBridge
from .packing import pack_bits, packed_size, unpack_bits


def _check_rate(rate: float) -> None:
    if not 0 < rate <= 1:
        raise ValueError(f"rate={rate} is out of range: it must lie in (0, 1].")


@dataclass
class TopKConfig(BridgeConfig):
    """Keep the `rate` fraction of largest-magnitude values of each sample's activations."""

    method = "topk"

    rate: float = field(default=0.1, metadata={"help": "Fraction of each sample's n*d values sent, in (0, 1]."})

    def __post_init__(self):
        _check_rate(self.rate)


@dataclass
class RandomTopKConfig(BridgeConfig):
    """Random Top-K (Zheng et al. 2023): sample K entries, each top-K entry with probability (1 - a) / K and
    each other entry with a / (n*d - K), where a is `random_portion`."""

    method = "randomtopk"

    rate: float = field(default=0.1, metadata={"help": "Fraction of each sample's n*d values sent, in (0, 1]."})
    random_portion: float = field(default=0.1, metadata={"help": "Probability mass a on non-top entries, [0, 1)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})

    def __post_init__(self):
        _check_rate(self.rate)
        if not 0 <= self.random_portion < 1:
            raise ValueError(f"random_portion={self.random_portion} is out of range: it must lie in [0, 1).")


def rate_for_ratio(xi: float, num_tokens: int, hidden_size: int) -> float:
    """The rate whose charged ratio is xi: values and their indices go up, values come down."""
    return min(xi / (1 + math.ceil(math.log2(num_tokens * hidden_size)) / 64), 1.0)


def topk_for_ratio(xi: float, num_tokens: int, hidden_size: int, batch_size: int, seed: int = 0) -> TopKConfig:
    return TopKConfig(rate=rate_for_ratio(xi, num_tokens, hidden_size))


def randomtopk_for_ratio(
    xi: float, num_tokens: int, hidden_size: int, batch_size: int, seed: int = 0
) -> RandomTopKConfig:
    return RandomTopKConfig(rate=rate_for_ratio(xi, num_tokens, hidden_size), seed=seed)


class TopKBridge(Bridge):
    """Sends, per sample, K = round(rate * n * d) values and their packed indices; zeros elsewhere."""

    def kept(self, values_per_sample: int) -> int:
        return min(max(round(self.config.rate * values_per_sample), 1), values_per_sample)

    def select(self, flat: torch.Tensor, kept: int) -> torch.Tensor:
        return flat.abs().topk(kept, dim=1).indices

    def pack(self, activations):
        flat = activations.reshape(activations.shape[0], -1)
        indices = self.select(flat, self.kept(flat.shape[1]))
        bits = max(math.ceil(math.log2(flat.shape[1])), 1)
        wire = {"values": flat.gather(1, indices), "indices": pack_bits(indices, bits)}
        return wire, (activations.shape, indices)

    def receiver_context(self, wire, shape, dtype):
        batch_size, per_sample = shape[0], math.prod(shape[1:])
        kept = self.kept(per_sample)
        bits = max(math.ceil(math.log2(per_sample)), 1)
        return shape, unpack_bits(wire["indices"], bits, batch_size * kept).view(batch_size, kept)

    def unpack(self, wire, context):
        shape, indices = context
        flat = wire["values"].new_zeros(shape[0], math.prod(shape[1:])).scatter(1, indices, wire["values"])
        return flat.view(shape)

    def pack_gradient(self, gradient, context):
        _, indices = context
        return {"gradients": gradient.reshape(gradient.shape[0], -1).gather(1, indices)}

    def unpack_gradient(self, wire, context):
        shape, indices = context
        values = wire["gradients"]
        return values.new_zeros(shape[0], math.prod(shape[1:])).scatter(1, indices, values).view(shape)

    def sent_values(self, batch_size, num_tokens, hidden_size, num_labels, element_size):
        """What one batch sends, for a codec to code: the shape of the kept values, and the bytes of the labels
        and of the packed indices."""
        per_sample = num_tokens * hidden_size
        kept = self.kept(per_sample)
        bits = max(math.ceil(math.log2(per_sample)), 1)
        return (batch_size, kept), batch_size * 8, packed_size(batch_size * kept, bits)

    def wire_bytes(self, batch_size, num_tokens, hidden_size, num_labels, element_size):
        shape, labels, indices = self.sent_values(batch_size, num_tokens, hidden_size, num_labels, element_size)
        values = math.prod(shape) * element_size
        return values + indices + labels, values


class RandomTopKBridge(TopKBridge, SeededBridge):
    """Top-K whose kept entries are sampled, mostly from the top-K, sometimes from the rest."""

    def select(self, flat: torch.Tensor, kept: int) -> torch.Tensor:
        """Samples `kept` entries per row without replacement (Gumbel top-k, the same law as sequential draws)."""
        per_sample = flat.shape[1]
        if kept == per_sample:
            return torch.arange(per_sample, device=flat.device).expand(flat.shape[0], -1)
        portion = self.config.random_portion
        weights = torch.full_like(flat, portion / (per_sample - kept), dtype=torch.float32)
        weights.scatter_(1, flat.abs().topk(kept, dim=1).indices, (1 - portion) / kept)
        uniform = torch.rand(weights.shape, generator=self.next_generator(flat.device), device=flat.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        return (weights.log() + gumbel).topk(kept, dim=1).indices
