"""The client half as it crosses when clients synchronise (one float32 vector), its checks, and the rules that
average such vectors: FedAvg, and two that no single member can own (coordinate-wise median, trimmed mean)."""

import torch

from ..wire import WireError


def client_side_tensors(split, with_head: bool = False) -> list[torch.Tensor]:
    """The client's trainable side in a fixed order: the client half's floating-point state, then (`with_head`, a
    U-shaped split whose heads are shared) the head's (its last layers, final layernorm and classifier), then the
    client-side modules of the bridge (BottleNet++'s encoder). The same order on the client and on the server."""
    head = getattr(split, "head", None)
    parts = [split.client, *([head] if with_head and head is not None else [])]
    tensors = [t for part in parts for t in part.state_dict(keep_vars=True).values() if t.is_floating_point()]
    prefixes = tuple(f"{module}." for module in split.bridge.client_modules)
    bridge = split.bridge.state_dict(keep_vars=True)
    names = [name for name in sorted(bridge) if name.startswith(prefixes) and bridge[name].is_floating_point()]
    return tensors + [bridge[name] for name in names]


def half_vector(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors as one float32 vector (what crosses when halves are synchronised)."""
    return torch.cat([tensor.detach().float().reshape(-1).cpu() for tensor in tensors])


def half_size(tensors: list[torch.Tensor]) -> int:
    """Values in the half vector of `tensors`."""
    return sum(tensor.numel() for tensor in tensors)


@torch.no_grad()
def load_half_vector(tensors: list[torch.Tensor], vector: torch.Tensor) -> None:
    """Copies `vector` into the tensors in place (the optimizer keeps its references)."""
    total = half_size(tensors)
    if vector.shape != (total,):
        raise WireError(f"a client half of {tuple(vector.shape)} values came; this split's has {total}.")
    offset = 0
    for tensor in tensors:
        tensor.copy_(vector[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def fedavg(halves: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """FedAvg: the mean of the half vectors weighted by `weights` (the clients' shard sizes)."""
    if not halves or len(halves) != len(weights):
        raise ValueError(f"fedavg needs one weight per half; got {len(halves)} halves and {len(weights)} weights.")
    weights = torch.tensor([float(weight) for weight in weights])
    if not bool((weights >= 0).all()) or not weights.sum() > 0:
        raise ValueError(f"fedavg weights {weights.tolist()} must be >= 0 with a positive sum.")
    return (weights / weights.sum()) @ torch.stack([half.float() for half in halves])


def check_half(vector: torch.Tensor, size: int, client_id: int) -> torch.Tensor:
    """A client half that came: one float32 vector of this split's `size`, all finite (else `WireError`)."""
    if vector.dtype != torch.float32 or vector.shape != (size,):
        raise WireError(
            f"client {client_id} sent a half of {vector.dtype} {tuple(vector.shape)}; this split's is float32 ({size},)"
        )
    if not bool(torch.isfinite(vector).all()):
        raise WireError(f"client {client_id} sent a half holding NaN or Inf.")
    return vector


def coordinate_median(halves: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The coordinate-wise median (the lower middle value for an even count); shard sizes are ignored, so that no
    client can weigh itself in. One bad half among three moves no coordinate beyond the honest ones' range."""
    return torch.stack([half.float() for half in halves]).median(dim=0).values


def trimmed_mean(halves: list[torch.Tensor], weights: list[float], trim: int | None = None) -> torch.Tensor:
    """The coordinate-wise mean of what is left once the `trim` largest and `trim` smallest values are dropped
    (default: one each side when there are at least three halves). Shard sizes are ignored, as for the median."""
    count = len(halves)
    trim = (1 if count >= 3 else 0) if trim is None else trim
    if not 0 <= 2 * trim < count:
        raise ValueError(f"trim={trim} is out of range for {count} halves: 0 .. {(count - 1) // 2}.")
    ordered = torch.stack([half.float() for half in halves]).sort(dim=0).values
    return ordered[trim : count - trim].mean(dim=0)


# The rules a federation may average with (`--aggregation`), each `rule(halves, shard_sizes) -> half`.
AGGREGATIONS = {"fedavg": fedavg, "median": coordinate_median, "trimmed_mean": trimmed_mean}
