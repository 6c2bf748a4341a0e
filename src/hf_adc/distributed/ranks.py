"""Several processes on each side of one split: the server's ranks, and where each rank meets its peer.

A client of N processes (`accelerate launch --num_processes N recipes/train.py --server HOST:PORT`) trains one split
against a server of N processes (`accelerate launch --num_processes N recipes/serve.py --listen HOST:PORT`): client
rank i talks to server rank i, on its own stream, at PORT + i. Each side is data-parallel on its own
torch.distributed group (NCCL on GPUs, gloo on CPU), as accelerate starts it:

- the client's DDP averages the client half's gradients, as in one process;
- the server's ranks average the server half's gradients (`ServerRanks.average_gradients`) once a step, after its
  last micro-batch and before its norms go down, as DDP does: each gradient divided by N, then summed. Both sides
  then hold the gradients of the one-process DDP split, form the same global norm, clip and step alike.

Nothing crosses between the two groups but the split's frames: NCCL and gloo hang or fail with a peer, so they stay
inside one party. The server's ranks agree at BEGIN that their sessions are one client's (one certificate identity,
one step to start from); rank 0 writes the checkpoints and the final half, once every rank's step is in.
"""

import logging
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from .connect import parse_address

logger = logging.getLogger(__name__)


def rank_address(address: str, rank: int) -> str:
    """The address rank `rank` listens at (a server) or joins (a client): `address`'s port plus the rank."""
    host, port = parse_address(address)
    if port + rank > 65535:
        raise ValueError(f"address {address!r} with rank {rank}: port {port + rank} is over 65535; pick a lower port.")
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + rank}"


def check_ranks(claimed: object, count: object, rank: int, size: int) -> None:
    """Refuses a session whose client claims rank `claimed` of `count` processes when this server rank is `rank`
    of `size` (`RanksDisagree`, naming both)."""
    if not isinstance(count, int) or isinstance(count, bool) or count != size:
        raise RanksDisagree(
            f"the client runs {count} process(es) and this server {size}: start both sides with the same "
            "--num_processes (client rank i joins server rank i, at the server's port + i)."
        )
    if not isinstance(claimed, int) or isinstance(claimed, bool) or not 0 <= claimed < size:
        raise RanksDisagree(f"the client claims rank {claimed!r}, outside 0 .. {size - 1}.")
    if claimed != rank:
        raise RanksDisagree(f"client rank {claimed} reached server rank {rank}: client rank i joins the server's "
                            "port + i.")  # fmt: skip


class RanksDisagree(ValueError):
    """A client's ranks do not fit this server's."""


class RankGroupError(RuntimeError):
    """A collective among the server's ranks failed: another rank died, or did not come within the timeout."""


class ServerRanks:
    """This server process's place among the server's ranks (`rank` of `size`), and the collectives they run over
    the default torch.distributed group (accelerate's, or torchrun's). One process: rank 0 of 1, no collectives.

    Every collective that fails (a rank died, a rank did not come within the group's timeout) raises
    `RankGroupError`, so that the session on this rank ends as the server's fault, never as its client's."""

    servings = 0  # this process's servings so far: each tells its end under a key of its own

    def __init__(self, rank: int = 0, size: int = 1):
        if size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"server rank {rank} of {size}: torch.distributed is not initialized (start the server "
                               "with accelerate launch or torchrun).")  # fmt: skip
        self.rank, self.size = rank, size
        ServerRanks.servings += 1
        self.ended_key = f"hf_adc/server_ended/{ServerRanks.servings}"  # the same on every rank, serving by serving

    @classmethod
    def of(cls, training_args) -> "ServerRanks":
        """The ranks accelerate (or torchrun) started this process among: `TrainingArguments`' view."""
        if training_args.world_size > 1:
            training_args.device  # noqa: B018 - initialises accelerate's process group, as the Trainer does
        return cls(training_args.process_index, training_args.world_size)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _collective(self, what: str, run):
        try:
            return run()
        except (RuntimeError, ValueError) as error:  # gloo/NCCL: a peer closed, a timeout
            raise RankGroupError(f"server rank {self.rank} of {self.size}: {what} failed ({error}); another server "
                                 "rank is gone or late.") from error  # fmt: skip

    @torch.no_grad()
    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Averages the gradients of `parameters` over the ranks, as DDP averages a bucket: divided by the size, then
        summed, in one flat all-reduce. Every rank must hold a gradient for the same parameters."""
        if self.size == 1:
            return
        grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
        flat = torch.cat([grad.reshape(-1) for grad in grads]).div_(self.size)
        self._collective("averaging the gradients", lambda: dist.all_reduce(flat))
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def gather(self, value) -> list:
        """Every rank's `value` (picklable, small), in rank order."""
        if self.size == 1:
            return [value]
        gathered = [None] * self.size
        self._collective("gathering", lambda: dist.all_gather_object(gathered, value))
        return gathered

    def agree(self, what: str, value) -> None:
        """Raises `RanksDisagree` on every rank unless every rank has the same `value`."""
        values = self.gather(value)
        if any(other != values[0] for other in values):
            described = ", ".join(f"rank {rank}: {other!r}" for rank, other in enumerate(values))
            raise RanksDisagree(f"the client's ranks differ in {what} ({described}): all of one client's ranks must "
                                "be one party.")  # fmt: skip

    def all_ok(self, ok: bool) -> bool:
        """Whether `ok` holds on every rank (so that all go on, or all stop, together)."""
        return all(self.gather(bool(ok)))

    def end(self, status: str) -> None:
        """Tells the other ranks that this rank's serving has ended (with `status`), so that a rank still waiting
        for its client stops too: one server, never a part of one left behind. Through the process group's store,
        no collective."""
        if self.size == 1:
            return
        try:
            dist.distributed_c10d._get_default_store().set(self.ended_key, f"rank {self.rank}: {status}")
        except (RuntimeError, ValueError) as error:  # the store's rank is gone already: the others see that too
            logger.warning("Server rank %d could not tell the others it ended: %s", self.rank, error)

    def ended(self) -> str | None:
        """Why another rank ended its serving, if one did (a rank whose store is gone counts as ended)."""
        if self.size == 1:
            return None
        try:
            store = dist.distributed_c10d._get_default_store()
            return store.get(self.ended_key).decode() if store.check([self.ended_key]) else None
        except (RuntimeError, ValueError) as error:
            return f"the server ranks' store is gone ({error})"



def from_rank_zero(make: Callable[[], tuple[object, object]], rank: int, size: int) -> tuple[object, object]:
    """`make()` on rank 0 only, which returns (shared, private): `shared` (picklable) reaches every rank, `private`
    stays on rank 0 (None elsewhere). If rank 0's `make` raises, every rank raises (`RankFailed` on the others)."""
    if size == 1:
        return make()
    made, error = (None, None), None
    if rank == 0:
        try:
            made = make()
        except Exception as caught:  # noqa: BLE001 - told to every rank, then raised here
            error = caught
    shared = [made[0], None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise RankFailed(f"client rank 0 failed: {shared[1]}")
    return shared[0], made[1]


def join_in_rank_order(join: Callable[[], object], rank: int, size: int):
    """A client's ranks join their server ranks: rank 0 first, so that a server of another size refuses it (naming
    both) before any other rank waits on a port where nothing listens; then the others. Every rank raises if any
    rank could not join (`RankFailed`, naming it), so that no rank trains alone. Returns this rank's `join()`."""
    if size == 1:
        return join()
    _, result = from_rank_zero(lambda: (None, join()), rank, size)
    error = None
    if rank != 0:
        try:
            result = join()
        except Exception as caught:  # noqa: BLE001 - told to every rank, then raised here
            error = caught
    errors = [None] * size
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(other, text) for other, text in enumerate(errors) if text is not None]
    if failed:
        raise RankFailed("; ".join(f"client rank {other} could not join its server rank: {text}"
                                   for other, text in failed))  # fmt: skip
    return result


class RankFailed(RuntimeError):
    """Another rank of this client could not join its server rank."""

