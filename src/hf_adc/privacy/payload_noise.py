"""Clipped Gaussian noise on the payload (embedding DP), a stage around any bridge.

    hf_adc.split_vit(vit, 2, compression=PayloadNoiseConfig(ADCConfig(xi=0.1), clip_norm=1.0, noise_multiplier=0.5))

On the client, after the wrapped bridge's `encode` (ADC's merged rows, BottleNet++'s codes, the activations Top-K
and quantization will code) and before its `pack`, each row (everything one sent sample carries: a sample, a merged
cluster, a C3-SL group) is clipped to L2 norm `clip_norm` = C, then N(0, (noise_multiplier * C)^2) is added to each
value. What Top-K keeps and what quantization codes is then chosen from the noisy values (post-processing). The
noise sends no byte of its own: the ledger charges what the wrapped bridge sends, now noisy. In evaluation and split
inference the payload crosses noisy only with `noise_in_eval=True`; otherwise evaluation is unprotected.

The noise must be secret from the server: a server that knows the seed regenerates the noise and subtracts it, and
the config, seed included, is a setting both sides agree on (and `save_pretrained` writes). So `seed=None`, the
default and what the recipes' `--payload_noise` builds, draws each batch's noise from the operating system's entropy,
never written down and fresh in every process: a resumed run that sends a step again draws new noise (a release
more), never the same noise over other values, whose difference would give the server the values noise-free. An
integer seed replays the noise for experiments in one process; no epsilon is claimed for it (`accounting`).

Clipping and noise are computed in float32 and cast back to the payload's dtype after: in bfloat16 a row's norm can
come out above C, and the sum would keep 8 bits of each value (Mironov 2012, on floating-point noise).

Which methods this gives an epsilon for, and under which condition, is `hf_adc.privacy.accounting`'s to say.
"""

import math
import secrets
from dataclasses import dataclass, field

import torch

from ..bridges import Bridge, BridgeConfig, Message, SeededBridge, register_wrapper


@dataclass
class PayloadNoiseConfig(BridgeConfig):
    """Clip each sent row to norm `clip_norm`, add Gaussian noise of std `noise_multiplier * clip_norm`; around the
    bridge of `compression` (None: the uncompressed split)."""

    method = "payload_noise"

    compression: BridgeConfig | None = field(
        default=None, metadata={"help": "The bridge the noise wraps (None: the uncompressed split)."}
    )
    clip_norm: float = field(default=1.0, metadata={"help": "L2 norm C each sent row is clipped to (> 0)."})
    noise_multiplier: float = field(
        default=1.0, metadata={"help": "Noise std over C, sigma >= 0 (0: clipping alone, no guarantee)."}
    )
    noise_in_eval: bool = field(
        default=False, metadata={"help": "Also noise evaluation and split-inference payloads (else unprotected)."}
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "None: secret, from the OS's entropy every batch. An integer replays it (no epsilon then)."},
    )

    def __post_init__(self):
        if isinstance(self.compression, PayloadNoiseConfig):
            raise ValueError("PayloadNoiseConfig around another PayloadNoiseConfig: give one, with the total noise.")
        if self.compression is not None and not isinstance(self.compression, BridgeConfig):
            raise TypeError(f"compression={self.compression!r} is not a bridge config (or None).")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm={self.clip_norm} is out of range: it must be a finite number > 0.")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier={self.noise_multiplier} is out of range: it must be finite and >= 0.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} is out of range: it must be an integer, or None (secret).")

    @property
    def inner_method(self) -> str:
        return "none" if self.compression is None else self.compression.method

    def to_dict(self) -> dict:
        inner = {"method": "none"} if self.compression is None else self.compression.to_dict()
        return {
            "method": self.method,
            "compression": inner,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "noise_in_eval": self.noise_in_eval,
            "seed": self.seed,
        }

    def wrap(self, inner: Bridge) -> "PayloadNoiseBridge":
        return PayloadNoiseBridge(self, inner)


def clip_rows(rows: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """`rows` with each row (dimension 0; the rest flattened) scaled down to L2 norm at most `clip_norm`, in float32
    (the result is float32 for float32 or lower-precision rows)."""
    rows = rows if rows.dtype == torch.float64 else rows.float()
    norms = rows.detach().flatten(1).norm(dim=1)
    scale = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return rows * scale.view(-1, *[1] * (rows.dim() - 1))


class PayloadNoiseBridge(SeededBridge):
    """`inner` with its encoded rows clipped and noised on the client; everything else is `inner`'s."""

    def __init__(self, config: PayloadNoiseConfig, inner: Bridge):
        super().__init__(config)
        self.inner = inner
        self.needs_cls_attention = inner.needs_cls_attention
        self.client_modules = tuple(f"inner.{name}" for name in inner.client_modules)
        self.server_modules = tuple(f"inner.{name}" for name in inner.server_modules)

    def next_generator(self, device: torch.device) -> torch.Generator:
        """The seeded generator of this batch, or, with `seed=None`, one seeded from the OS's entropy."""
        if self.config.seed is not None:
            return super().next_generator(device)
        self.calls += 1
        return torch.Generator(device=device).manual_seed(secrets.randbits(63))

    def noise(self, rows: torch.Tensor) -> torch.Tensor:
        """Clipped rows plus N(0, (sigma C)^2), drawn from this bridge's seeded generator."""
        clipped = clip_rows(rows, self.config.clip_norm)  # float32 (or float64)
        if self.config.noise_multiplier == 0:
            return clipped.to(rows.dtype)
        generator = self.next_generator(rows.device)
        noise = torch.randn(rows.shape, generator=generator, device=rows.device, dtype=torch.float32)
        return (clipped + noise * (self.config.noise_multiplier * self.config.clip_norm)).to(rows.dtype)

    def encode(self, hidden_states, labels, cls_attention=None) -> Message:
        message = self.inner.encode(hidden_states, labels, cls_attention)
        if self.training or self.config.noise_in_eval:
            message.hidden_states = self.noise(message.hidden_states)
        return message

    def decode(self, hidden_states):
        return self.inner.decode(hidden_states)

    def pack(self, activations):
        return self.inner.pack(activations)

    def receiver_context(self, wire, shape, dtype):
        return self.inner.receiver_context(wire, shape, dtype)

    def unpack(self, wire, context):
        return self.inner.unpack(wire, context)

    def pack_gradient(self, gradient, context):
        return self.inner.pack_gradient(gradient, context)

    def unpack_gradient(self, wire, context):
        return self.inner.unpack_gradient(wire, context)

    def wire_bytes(self, batch_size, num_tokens, hidden_size, num_labels, element_size):
        return self.inner.wire_bytes(batch_size, num_tokens, hidden_size, num_labels, element_size)

    def label_bytes(self, batch_size, num_labels, element_size):
        return self.inner.label_bytes(batch_size, num_labels, element_size)

    def server_tokens(self, batch_size, num_tokens):
        return self.inner.server_tokens(batch_size, num_tokens)


register_wrapper(PayloadNoiseConfig)
