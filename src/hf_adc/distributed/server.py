"""The server for one client: accepts sessions, checks the handshake, and answers each message kind from a table.

`SplitServer.serve` waits for a client; a session refused at the handshake (a bad header, a wrong token, another
split) leaves it waiting for the next. A session that trains to the end (END) ends the serving; a client lost
mid-training ends it too, keeping the last checkpoint. The compute is the `ServerHalf`'s.
"""

import hmac
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainingArguments

from ..split import SplitViTForImageClassification
from .connect import Connection
from .files import CheckpointError
from .ranks import RankGroupError, RanksDisagree, ServerRanks, check_ranks
from .server_half import PendingBackward, ServerHalf
from .settings import MAX_LABELS, differing_settings, session_settings
from .wire import Frame, Kind, PeerLost, Refused, WireError, tensor_json

logger = logging.getLogger(__name__)


def read_hello(connection: Connection, join_token: str | None) -> dict:
    """The client's settings from its HELLO, once its join token checks out."""
    hello = connection.recv(Kind.HELLO).tensors
    if "settings" not in hello:
        raise WireError("a HELLO must carry the settings.")
    settings = tensor_json(hello["settings"])
    token = settings.get("token")
    if join_token is not None and not hmac.compare_digest(str(token).encode(), join_token.encode()):
        raise Refused("wrong join token.")
    if not isinstance(settings.get("labels"), list):
        raise Refused("the client's settings name no labels.")
    return settings


def check_split_settings(
    settings: dict, args: TrainingArguments, build: Callable, half: ServerHalf | None
) -> SplitViTForImageClassification:
    """The split a client's settings describe, refused with every difference from this server's (`args` and the
    adopted half's split, or for the first client a new one built for the class names the client announces)."""
    labels = settings.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(name, str) for name in labels):
        raise Refused(f"the client's labels {str(labels)[:200]} are not a list of class names.")
    if len(labels) > MAX_LABELS:
        raise Refused(f"the client names {len(labels)} classes; at most {MAX_LABELS}.")
    split = half.split if half is not None else build(labels)
    differences = differing_settings(settings, session_settings(split, args))
    if differences:
        raise Refused("the split settings differ: " + "; ".join(differences))
    return split


# What may come next in a session, by phase: BEGIN first; then an optimizer step is k FORWARDs (the standard split's
# each answered with its gradient; a U-shaped split's each followed by its HEAD_BACKWARD), then STEP; between steps,
# evaluation, checkpoints, the end, and a federation's sync messages.
NEXT_KINDS = {
    "joined": (Kind.BEGIN,),
    "idle": (Kind.FORWARD, Kind.EVAL, Kind.SAVE, Kind.END, Kind.SYNC, Kind.TURN, Kind.HANDOFF),
    "forwarded": (Kind.HEAD_BACKWARD,),  # a U-shaped split's micro-batch, between its two round trips
    "accumulating": (Kind.FORWARD,),  # micro-batches of the step are still to come
    "stepping": (Kind.STEP,),  # the step's last micro-batch is done
}
MAX_STEPS = 2**31  # a schedule's length BEGIN may announce


def _unexpected(session: "Session", error: Exception) -> WireError:
    """A session's message that broke something the checks did not foresee: logged in full, the session ended."""
    logger.error("Session %d: unexpected %s", session.number, type(error).__name__, exc_info=error)
    return WireError(f"the server could not handle this session's message ({type(error).__name__}).")


class ServerFault(RuntimeError):
    """The server cannot go on with the session on its side (a checkpoint it cannot write): the session ends, the
    client told why."""


class Session:
    """One client's session: its connection, its phase (what may come next), the FORWARD whose HEAD_BACKWARD is still
    to come (a U-shaped split's), and the micro-batches of the optimizer step under way."""

    def __init__(self, number: int, connection: Connection, micro_batches: int = 1):
        self.number = number
        self.connection = connection
        self.micro_batches = micro_batches  # the most micro-batches an optimizer step may have (accumulation steps)
        self.ushaped = False  # a U-shaped split's session: each micro-batch is FORWARD, then HEAD_BACKWARD
        self.phase = "joined"
        self.forwards = 0  # micro-batches of this step so far
        self.step_micro_batches = 0  # how many this step has, as its first FORWARD announced
        self.pending: PendingBackward | None = None
        self.member = None  # a federation's: the member this session was admitted as

    @property
    def last_micro_batch(self) -> bool:
        """Whether the micro-batch under way is the step's last (its gradient brings the server's norms)."""
        return self.forwards == self.step_micro_batches

    def advance(self, frame: Frame) -> None:
        """Refuses a message out of place (`WireError`, naming what was expected): out of order, a micro-batch
        count beyond the agreed accumulation steps or changing within a step; moves to the next phase."""
        kind, allowed = frame.kind, NEXT_KINDS[self.phase]
        if kind not in allowed:
            raise WireError(
                f"a {kind.name} message is out of place here: expected {' or '.join(k.name for k in allowed)}."
            )
        if kind == Kind.FORWARD:
            if self.forwards == 0:
                if not 1 <= frame.step <= self.micro_batches:
                    raise WireError(f"a step of {frame.step} micro-batches is out of range: 1 .. {self.micro_batches} "
                                    "(the agreed accumulation steps).")  # fmt: skip
                self.step_micro_batches = frame.step
            elif frame.step != self.step_micro_batches:
                raise WireError(f"a FORWARD announces a step of {frame.step} micro-batches; this step's first "
                                f"announced {self.step_micro_batches}.")  # fmt: skip
            self.forwards += 1
        if kind == Kind.STEP:
            self.forwards = 0
        if kind == Kind.FORWARD and self.ushaped:
            self.phase = "forwarded"
        elif kind in (Kind.FORWARD, Kind.HEAD_BACKWARD):
            self.phase = "stepping" if self.last_micro_batch else "accumulating"
        elif kind in (Kind.BEGIN, Kind.STEP):
            self.phase = "idle"

    def reply(self, kind: Kind, tensors: dict | None = None, value: float = 0.0) -> None:
        self.connection.send(kind, tensors, value=value)


def required(frame: Frame, name: str):
    """The tensor `name` of `frame`, or a `WireError` saying the message lacks it."""
    if name not in frame.tensors:
        raise WireError(f"a {frame.kind.name} message must carry {name!r}.")
    return frame.tensors[name]


def begin_scalars(frame: Frame) -> tuple[int, int]:
    """BEGIN's (max_steps, global_step): two int64 scalars, 1 <= max_steps, 0 <= global_step <= max_steps."""
    scalars = required(frame, "scalars")
    if scalars.dtype != torch.int64 or scalars.shape != (2,):
        raise WireError(f"a BEGIN must carry 2 int64 scalars; got {scalars.dtype} {tuple(scalars.shape)}.")
    max_steps, global_step = scalars.tolist()
    if not 1 <= max_steps <= MAX_STEPS or not 0 <= global_step <= max_steps:
        raise WireError(f"BEGIN's max_steps={max_steps}, global_step={global_step} are out of range.")
    return max_steps, global_step


def answer_forward(half: ServerHalf, session: Session, frame: Frame) -> None:
    """FORWARD: the server half's loss on what came, back-propagated at once from the agreed seed; the loss and the
    gradient of what came go back in one message (GRADIENT), with the server's gradient norms after the step's last
    micro-batch. A U-shaped split's: what the client's head needs (HEAD), computed from the activations alone (no
    labels came); the rest is kept for HEAD_BACKWARD."""
    if half.ushaped:
        session.pending, returned = half.forward_head(frame.tensors, frame.value)
        session.reply(Kind.HEAD, returned)
        return
    seed = required(frame, "seed")
    if seed.dtype != torch.float64 or seed.shape != ():
        raise WireError(f"a FORWARD's seed must be one float64; got {seed.dtype} {tuple(seed.shape)}.")
    pending = half.forward(frame.tensors, frame.value)
    gradient = half.backward(pending, float(seed), session.step_micro_batches)
    session.reply(Kind.GRADIENT, _with_norms(half, session, gradient), value=float(pending.loss.detach()))


def answer_head_backward(half: ServerHalf, session: Session, frame: Frame) -> None:
    """HEAD_BACKWARD (a U-shaped split): back-propagates the head's gradient; the gradient of what came (GRADIENT),
    with the server's gradient norms after the step's last micro-batch."""
    if session.pending is None:
        raise WireError("a HEAD_BACKWARD message came before any FORWARD.")
    gradient = half.backward_head(session.pending, required(frame, "head_gradients"))
    session.pending = None
    session.reply(Kind.GRADIENT, _with_norms(half, session, gradient))


def _with_norms(half: ServerHalf, session: Session, gradient: dict) -> dict:
    """`gradient`, and after the step's last micro-batch the server's gradient norms (`norm`): the client forms the
    global norm from them and its own, and clips, without asking."""
    return {**gradient, "norm": half.gradient_norms()} if session.last_micro_batch else gradient


def answer_step(half: ServerHalf, session: Session, frame: Frame) -> None:
    """STEP: clips by the global norm (the client's norms with the server's), steps; no answer: the client formed
    the same norm from the server's norms, and the server reads the next FORWARD only after this step."""
    half.optimizer_step(required(frame, "norm"), frame.value)


def answer_eval(half: ServerHalf, session: Session, frame: Frame) -> None:
    """EVAL: the logits for eval-mode activations (LOGITS); a U-shaped split's head's input (HEAD)."""
    session.reply(Kind.HEAD if half.ushaped else Kind.LOGITS, half.logits(required(frame, "activations")))


class SplitServer:
    """The server's side for one client at a time, over a `Listener`.

    `build(labels)` makes the split for the class names a client announces (the server keeps the server half and
    the server's part of the bridge in a `ServerHalf`); the session goes on only if `session_settings` of that
    split and `args` equal the client's, and the join token matches.

    A client that resumes from its `checkpoint-N` makes the server load its own `checkpoint-N` from `output_dir`,
    or from `resume_from` when given (whose step must then be the client's).

    On a server of several ranks (`ranks`, see `hf_adc.distributed.ranks`) each rank runs a `SplitServer` for its
    client rank: the handshake checks the client's rank and count against this rank's, BEGIN that all ranks serve
    one client from one step; rank 0 writes the checkpoints and the final half once every rank's step is in, and
    a rank whose serving ends tells the others, so that they end too.
    """

    def __init__(
        self,
        build: Callable[[list[str]], SplitViTForImageClassification],
        args: TrainingArguments,
        output_dir: str | Path,
        join_token: str | None = None,
        resume_from: str | Path | None = None,
        ranks: ServerRanks | None = None,
    ):
        self.build = build
        self.ranks = ranks or ServerRanks()
        self.args = args
        self.output_dir = Path(output_dir)
        self.join_token = join_token
        self.resume_from = None if resume_from is None else Path(resume_from)
        if self.resume_from is not None and not self.resume_from.is_dir():
            raise ValueError(f"resume_from_checkpoint={str(resume_from)!r} is not a folder.")
        self.server_half: ServerHalf | None = None
        self.max_steps = 0  # BEGIN's
        self.hello_lock = threading.Lock()  # `training` and `closed`, as the handshake threads read them
        self.training = False  # a session is past its handshake: the others are turned away as busy
        self.closed = False  # the serving has ended
        self.handlers = {
            Kind.BEGIN: self._begin,
            Kind.FORWARD: lambda session, frame: answer_forward(self.server_half, session, frame),
            Kind.HEAD_BACKWARD: lambda session, frame: answer_head_backward(self.server_half, session, frame),
            Kind.STEP: lambda session, frame: answer_step(self.server_half, session, frame),
            Kind.EVAL: lambda session, frame: answer_eval(self.server_half, session, frame),
            Kind.SAVE: self._save,
            Kind.END: self._end,
        }

    @property
    def split(self) -> SplitViTForImageClassification | None:
        """The split whose server side this server holds (None before the first client joined)."""
        return None if self.server_half is None else self.server_half.split

    @property
    def steps(self) -> int:
        return 0 if self.server_half is None else self.server_half.steps

    def serve(self, listener, accept_seconds: float | None = None) -> dict:
        """Serves clients from `listener` until one finishes training or is lost mid-training (or the server cannot
        write its checkpoint). A session that breaks the protocol ends alone, and the server waits for the next
        (with a fresh half). `accept_seconds` bounds the wait for each next client (None: wait for ever).

        Handshakes run at once, each in a thread of its own (`_read_hello`): a peer that joins and says nothing
        holds up only itself, for the handshake timeout. The first client whose HELLO checks out trains; while it
        does, the others are told the server is busy."""
        hellos: queue.Queue = queue.Queue()
        doorman = threading.Thread(target=self._let_in, args=(listener, hellos), name="doorman", daemon=True)
        doorman.start()
        results = {"status": "failed", "steps": self.steps}
        try:
            results = self._serve_hellos(hellos, accept_seconds)
            return results
        finally:
            with self.hello_lock:
                self.closed = True
            self._turn_away(hellos, "the server has ended its serving.")
            self.ranks.end(results["status"])

    def _let_in(self, listener, hellos: queue.Queue) -> None:
        """Reads each new session's HELLO in a thread of its own, until the serving ends."""
        while not self.closed:
            accepted = listener.accept(deadline=time.monotonic() + 1.0)
            if accepted is not None:
                session = Session(*accepted, micro_batches=self.args.gradient_accumulation_steps)
                threading.Thread(
                    target=self._read_hello, args=(session, hellos), name=f"hello-{session.number}", daemon=True
                ).start()

    def _read_hello(self, session: Session, hellos: queue.Queue) -> None:
        """A session's HELLO, checked (the join token, the settings' form) and queued for the serving; a session
        that breaks the handshake, or comes while another trains, is refused with the reason."""
        try:
            settings = read_hello(session.connection, self.join_token)
        except Exception as error:  # noqa: BLE001 - a handshake that breaks anything ends that session only
            error = error if isinstance(error, (WireError, Refused, PeerLost)) else _unexpected(session, error)
            logger.warning("Session %d refused: %s", session.number, error)
            session.connection.refuse(str(error))
            return
        with self.hello_lock:
            if not (self.training or self.closed):
                hellos.put((session, settings))
                return
        session.connection.refuse("the server is busy with another client's session; try again once it has ended.")

    def _turn_away(self, hellos: queue.Queue, reason: str) -> None:
        """Refuses every session whose HELLO is queued."""
        while True:
            try:
                session, _ = hellos.get_nowait()
            except queue.Empty:
                return
            session.connection.refuse(reason)

    def _next_hello(self, hellos: queue.Queue, accept_seconds: float | None):
        """The next checked HELLO, or None once `accept_seconds` have passed, or another server rank has ended."""
        deadline = None if accept_seconds is None else time.monotonic() + accept_seconds
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                return None
            try:
                return hellos.get(timeout=wait)
            except queue.Empty:
                ended = self.ranks.ended()
                if ended is not None:
                    raise RankGroupError(f"another server rank has ended its serving ({ended}).") from None

    def _serve_hellos(self, hellos: queue.Queue, accept_seconds: float | None) -> dict:
        while True:
            try:
                hello = self._next_hello(hellos, accept_seconds)
            except RankGroupError as error:
                logger.error("%s", error)
                return {"status": "failed", "error": str(error), "steps": self.steps}
            if hello is None:
                return {"status": "no client", "steps": self.steps}
            session, settings = hello
            try:
                self._handshake(session, settings)
            except Exception as error:  # noqa: BLE001 - a handshake that breaks anything ends that session only
                error = error if isinstance(error, (WireError, Refused, PeerLost)) else _unexpected(session, error)
                logger.warning("Session %d refused: %s", session.number, error)
                session.connection.refuse(str(error))
                continue
            logger.info("Session %d joined.", session.number)
            with self.hello_lock:
                self.training = True
            self._turn_away(hellos, "the server is busy with another client's session; try again once it has ended.")
            try:
                results = self._train(session)
                session.connection.close()
                return results
            except (PeerLost, ServerFault, RankGroupError) as error:
                logger.error(
                    "Session %d lost: %s. The last checkpoint in %s is kept.", session.number, error, self.output_dir
                )
                session.connection.refuse(str(error))
                traffic = vars(session.connection.traffic)
                status = "client lost" if isinstance(error, PeerLost) else "failed"
                return {"status": status, "error": str(error), "steps": self.steps, "traffic": traffic}
            except Exception as error:  # noqa: BLE001 - a message out of place or out of shape: that session ends
                error = error if isinstance(error, (WireError, Refused)) else _unexpected(session, error)
                logger.warning("Session %d refused: %s. Waiting for the next client.", session.number, error)
                self.server_half = None  # the next session starts from a fresh half, or from a checkpoint
                with self.hello_lock:  # before the refusal: the next HELLO may come as soon as it is read
                    self.training = False
                session.connection.refuse(str(error))

    def _handshake(self, session: Session, settings: dict) -> None:
        connection = session.connection
        if settings.get("federation"):
            raise Refused("the client expects a federation; this server serves one client (see --num_clients).")
        try:
            check_ranks(settings.get("rank", 0), settings.get("ranks", 1), self.ranks.rank, self.ranks.size)
        except RanksDisagree as error:
            raise Refused(str(error)) from error
        split = check_split_settings(settings, self.args, self.build, self.server_half)
        if self.server_half is None:
            self.server_half = ServerHalf(split, self.args, ranks=self.ranks)
        session.ushaped = self.server_half.ushaped
        connection.open_up()  # before WELCOME: the client's next frame may be of the agreed split's size
        connection.send(Kind.WELCOME)

    def _train(self, session: Session) -> dict:
        while True:
            frame = session.connection.recv(*self.handlers)
            session.advance(frame)
            if self.handlers[frame.kind](session, frame):
                return {"status": "finished", "steps": self.steps, **self._traffic(session)}

    def _traffic(self, session: Session) -> dict:
        """What crossed this session, and on several ranks what crossed all of them (`traffic`, summed) and each
        (`rank_traffic`): a collective, at the end."""
        traffic = vars(session.connection.traffic)
        if self.ranks.size == 1:
            return {"traffic": traffic}
        each = self.ranks.gather(traffic)
        return {"traffic": {name: sum(rank[name] for rank in each) for name in traffic}, "rank_traffic": each}

    def _checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / f"checkpoint-{step}"

    def _resume_folder(self, step: int) -> Path:
        """The server checkpoint to resume from for a client resuming at `step` (0: starting afresh)."""
        if self.resume_from is not None:
            saved = re.fullmatch(r"checkpoint-(\d+)", self.resume_from.name)
            if saved is None or int(saved.group(1)) != step:
                raise Refused(
                    f"the client resumes from step {step}, the server from {self.resume_from}: resume both sides from "
                    "the same step's checkpoint-N."
                )
            return self.resume_from
        return self._checkpoint_dir(step)

    def _begin(self, session: Session, frame: Frame) -> None:
        """BEGIN: the schedule's length and the step the client starts from (a resumed checkpoint's)."""
        max_steps, global_step = begin_scalars(frame)
        if self.args.max_steps > 0 and max_steps > self.args.max_steps:
            raise WireError(f"BEGIN's max_steps={max_steps} is over the server's max_steps={self.args.max_steps}.")
        try:  # every rank's session is one client's: one certificate identity, one schedule, one step to start from
            self.ranks.agree("certificate identity, max_steps and starting step",
                             (session.connection.peer_name, max_steps, global_step))  # fmt: skip
        except RanksDisagree as error:
            raise Refused(str(error)) from error
        self.max_steps = max_steps
        self.server_half.make_optimizer(max_steps)
        if global_step or self.resume_from is not None:
            folder = self._resume_folder(global_step)
            if not self.server_half.has_checkpoint(folder):
                raise Refused(f"the server has no checkpoint in {folder}: resume both sides from a step both saved.")
            try:
                self.server_half.load_checkpoint(folder)
            except CheckpointError as error:
                raise Refused(f"the server cannot resume: {error}") from error
        self.server_half.steps = global_step
        session.reply(Kind.DONE)

    def _save(self, session: Session, frame: Frame) -> None:
        """SAVE: the server's checkpoint of the client's step; one it cannot write ends the session with the reason
        (the previous checkpoint intact), so that the client stops too instead of training on unsaved."""
        if not 1 <= frame.step <= self.max_steps:
            raise WireError(f"SAVE of step {frame.step} is out of range: 1 .. {self.max_steps} (BEGIN's max_steps).")
        try:
            self.ranks.agree("the step they save", frame.step)
        except RanksDisagree as error:
            raise ServerFault(str(error)) from error
        error = None
        if self.ranks.main:  # the ranks hold the same half: rank 0 writes it
            try:
                self.server_half.save_checkpoint(self._checkpoint_dir(frame.step))
            except CheckpointError as caught:
                logger.error("%s", caught)
                error = caught
        if not self.ranks.all_ok(error is None):  # no rank answers before the checkpoint is whole on disk
            raise ServerFault(str(error or f"server rank 0 could not write checkpoint-{frame.step}."))
        session.reply(Kind.DONE)

    def _end(self, session: Session, frame: Frame) -> bool:
        """END: the final half saved (by rank 0); the session (and the serving) ends."""
        if self.ranks.main:
            self.server_half.save_final(self.output_dir)
        session.reply(Kind.DONE)
        return True
