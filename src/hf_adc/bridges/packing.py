"""Dense bit packing: integer codes of any width from 1 to 32 bits in a uint8 stream, as they would be sent."""

import torch


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take once packed."""
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs non-negative integer `codes` (each < 2**bits) into `packed_size(codes.numel(), bits)` bytes."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits={bits} is out of range: codes are packed at 1 .. 32 bits.")
    flat = codes.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.uint8)
    return (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The `count` codes of `bits` bits that `pack_bits` packed, as int64."""
    if bits == 8:
        return packed[:count].to(torch.int64)
    stream = (packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: count * bits].view(count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(dim=1)
