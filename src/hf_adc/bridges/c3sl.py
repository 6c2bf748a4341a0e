"""C3-SL (Hsieh et al. 2022): circular-convolution batch compression.

Each group of R samples is sent as one vector, sum_r key_r (*) z_r (circular convolution over the flattened
n*d activation), and the server recovers each sample by circular correlation with its key. The keys are
fixed random unit-norm vectors drawn from the seed on both sides (never sent). All B labels are sent.
The FFTs run in float32 whatever the model's dtype (half-precision FFTs need power-of-two sizes).
Training only: in eval mode every sample crosses as it is.
"""

import math
from dataclasses import dataclass, field

import torch

from .base import Bridge, BridgeConfig, Message


@dataclass
class C3SLConfig(BridgeConfig):
    """Compress each group of `R` samples into one; the batch size must be a multiple of `R`."""

    method = "c3sl"

    R: int = field(default=2, metadata={"help": "Samples per group (>= 1); the ratio is 1/R."})
    seed: int = field(default=0, metadata={"help": "Seed of the fixed keys."})

    def __post_init__(self):
        if isinstance(self.R, bool) or not isinstance(self.R, int) or self.R < 1:
            raise ValueError(f"R={self.R!r} is out of range: it must be an integer >= 1.")


def c3sl_for_ratio(xi: float, num_tokens: int, hidden_size: int, batch_size: int, seed: int = 0) -> C3SLConfig:
    """R is the divisor of the batch size nearest 1/xi."""
    divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
    return C3SLConfig(R=min(divisors, key=lambda d: abs(math.log(d) - math.log(1 / xi))), seed=seed)


class C3SLBridge(Bridge):
    def __init__(self, config: C3SLConfig, num_tokens: int, hidden_size: int):
        super().__init__(config)
        self.shape = (num_tokens, hidden_size)
        generator = torch.Generator().manual_seed(config.seed)
        keys = torch.randn(config.R, num_tokens * hidden_size, generator=generator)
        self.register_buffer("keys", keys / keys.norm(dim=1, keepdim=True), persistent=False)

    def encode(self, hidden_states, labels, cls_attention=None):
        if not self.training:
            return Message(hidden_states=hidden_states, labels=labels)
        batch_size, groups = hidden_states.shape[0], self.config.R
        if batch_size % groups:
            raise ValueError(
                f"C3-SL groups R={groups} samples, so the batch size must be a multiple of R; got {batch_size}. "
                "Use a batch size divisible by R (and dataloader_drop_last=True when the data does not divide)."
            )
        if tuple(hidden_states.shape[1:]) != self.shape:
            raise ValueError(
                f"C3-SL keys are for activations of shape {self.shape}; got {tuple(hidden_states.shape[1:])}."
            )
        flat = hidden_states.reshape(batch_size // groups, groups, -1).float()
        spectrum = torch.fft.rfft(flat) * torch.fft.rfft(self.keys.float())
        combined = torch.fft.irfft(spectrum.sum(dim=1), n=flat.shape[-1])
        return Message(hidden_states=combined.to(hidden_states.dtype), labels=labels)

    def decode(self, hidden_states):
        if not self.training:
            return hidden_states
        size = hidden_states.shape[-1]
        spectrum = torch.fft.rfft(hidden_states.float()).unsqueeze(1) * torch.fft.rfft(self.keys.float()).conj()
        recovered = torch.fft.irfft(spectrum, n=size).to(hidden_states.dtype)
        return recovered.reshape(-1, *self.shape)

    def wire_bytes(self, batch_size, num_tokens, hidden_size, num_labels, element_size):
        activations = (batch_size // self.config.R) * num_tokens * hidden_size * element_size
        return activations + batch_size * 8, activations
