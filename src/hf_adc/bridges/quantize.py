"""Uniform min-max quantization of activations (up) and gradients (down) at `bits` bits per value.

Per sample, values are mapped to integer codes 0 .. 2**bits - 1 between that sample's minimum and maximum;
the codes travel packed at their bit width, with the minimum and the step size of each sample (in the wire
dtype).
The client's backward uses the dequantized gradient (straight-through on the way up).
"""

import math
from dataclasses import dataclass, field

import torch

from .base import Bridge, BridgeConfig
from .packing import pack_bits, packed_size, unpack_bits


@dataclass
class QuantizationConfig(BridgeConfig):
    method = "quantize"

    bits: int = field(default=8, metadata={"help": "Bits per value, 1 .. 32 (above 16, computed in float64)."})

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 32:
            raise ValueError(f"bits={self.bits!r} is out of range: it must be an integer in 1 .. 32.")


def quantize_for_ratio(
    xi: float, num_tokens: int, hidden_size: int, batch_size: int, seed: int = 0
) -> QuantizationConfig:
    """round(32 * xi) bits, 1 .. 16."""
    return QuantizationConfig(bits=min(max(round(32 * xi), 1), 16))


class QuantizeBridge(Bridge):
    @property
    def _compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.config.bits > 16 else torch.float32

    def _quantize(self, tensor: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        flat = tensor.reshape(tensor.shape[0], -1).to(self._compute_dtype)
        minimum = flat.min(dim=1).values
        step = (flat.max(dim=1).values - minimum) / (2**self.config.bits - 1)
        codes = torch.round((flat - minimum[:, None]) / step.clamp_min(torch.finfo(flat.dtype).tiny)[:, None])
        return {
            f"{prefix}codes": pack_bits(codes, self.config.bits),
            f"{prefix}minimum": minimum.float(),
            f"{prefix}step": step.float(),
        }

    def _dequantize(self, wire: dict[str, torch.Tensor], prefix: str, shape: torch.Size, dtype) -> torch.Tensor:
        minimum, step = wire[f"{prefix}minimum"], wire[f"{prefix}step"]
        codes = unpack_bits(wire[f"{prefix}codes"], self.config.bits, shape.numel())
        compute = self._compute_dtype
        flat = codes.view(shape[0], -1).to(compute) * step[:, None].to(compute) + minimum[:, None].to(compute)
        return flat.view(shape).to(dtype)

    def pack(self, activations):
        return self._quantize(activations, ""), (activations.shape, activations.dtype)

    def receiver_context(self, wire, shape, dtype):
        return torch.Size(shape), dtype

    def unpack(self, wire, context):
        return self._dequantize(wire, "", *context)

    def pack_gradient(self, gradient, context):
        return self._quantize(gradient, "gradient_")

    def unpack_gradient(self, wire, context):
        return self._dequantize(wire, "gradient_", *context)

    def coded_bytes(self, shape: tuple[int, ...], element_size: int) -> tuple[int, int]:
        """(up, down) bytes of values of `shape` (one minimum and step per row) once coded, and their gradient."""
        one_way = packed_size(math.prod(shape), self.config.bits) + 2 * shape[0] * element_size
        return one_way, one_way

    def wire_bytes(self, batch_size, num_tokens, hidden_size, num_labels, element_size):
        up, down = self.coded_bytes((batch_size, num_tokens, hidden_size), element_size)
        return up + batch_size * 8, down
