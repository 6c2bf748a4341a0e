"""Dense bit packing: integer codes of any width from 1 to 32 bits in a uint8 stream, as they would be sent.

Codes are laid end to end, least significant bit first: code i occupies stream bits `i*bits .. i*bits+bits-1`,
and stream bit p is bit `p % 8` of byte `p // 8`. Eight codes fill exactly `bits` bytes, so the stream is
built eight codes at a time: each output byte takes the slices of the (at most a few) codes that overlap it.
The work is a few dozen whole-tensor shifts of `count / 8` elements; no temporary holds a value per bit.
"""

import torch


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take once packed."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 32:
        raise ValueError(f"bits={bits} is out of range: codes are packed at 1 .. 32 bits.")


def _overlaps(bits: int):
    """For each output byte j of a group of 8 codes, the (code, shift within the code, shift within the byte,
    width) of every code slice that lands in it."""
    for byte in range(bits):
        low, high = 8 * byte, 8 * byte + 8
        for code in range(low // bits, min((high - 1) // bits, 7) + 1):
            start, stop = max(low, code * bits), min(high, code * bits + bits)
            yield byte, code, start - code * bits, start - low, stop - start


def _code_dtype(bits: int) -> torch.dtype:
    return torch.int64 if bits > 30 else torch.int32


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs non-negative integer `codes` (each < 2**bits) into `packed_size(codes.numel(), bits)` bytes."""
    _check_bits(bits)
    count = codes.numel()
    flat = codes.reshape(-1).to(_code_dtype(bits))
    if bits == 8:
        return flat.to(torch.uint8)
    groups = flat.new_zeros((count + 7) // 8 * 8)
    groups[:count] = flat
    groups = groups.view(-1, 8)
    packed = groups.new_zeros(groups.shape[0], bits)
    for byte, code, code_shift, byte_shift, width in _overlaps(bits):
        packed[:, byte] |= ((groups[:, code] >> code_shift) & ((1 << width) - 1)) << byte_shift
    return packed.to(torch.uint8).reshape(-1)[: packed_size(count, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The `count` codes of `bits` bits that `pack_bits` packed, as int64."""
    _check_bits(bits)
    if bits == 8:
        return packed[:count].to(torch.int64)
    num_groups = (count + 7) // 8
    stream = packed.new_zeros(num_groups * bits)
    stream[: packed.numel()] = packed
    stream = stream.view(num_groups, bits).to(_code_dtype(bits))
    codes = stream.new_zeros(num_groups, 8)
    for byte, code, code_shift, byte_shift, width in _overlaps(bits):
        codes[:, code] |= ((stream[:, byte] >> byte_shift) & ((1 << width) - 1)) << code_shift
    return codes.reshape(-1)[:count].to(torch.int64)
