"""The server's half of a split, as both servers (one client, a federation) hold it: the compute, the optimizer and
schedule, and the files it is saved in. It knows nothing of sessions or of the wire's framing."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments, get_scheduler

from ..split import SERVER_BRIDGE_WEIGHTS_NAME, SplitViTForImageClassification, soft_targets
from ..ushape import USplitViTForImageClassification
from .files import CheckpointError, read_checked, write_atomically
from .ranks import ServerRanks
from .settings import drop_modules
from .wire import WireError

SERVER_WEIGHTS_NAME = "server_state.safetensors"
OPTIMIZER_NAME = "server_optimizer.pt"
SCHEDULER_NAME = "server_scheduler.pt"


def global_norm(client_norms: torch.Tensor, server_norms: torch.Tensor, head_norms: int) -> torch.Tensor:
    """The norm one process clips by: of every per-tensor norm, in its parameter order (the client's bottom, the
    server's bridge and half, then a U-shaped split's `head_norms` last of the client's). Both ends form it from the
    same float32 norms, so they agree to the bit."""
    client_norms = client_norms.float().cpu()
    cut = len(client_norms) - head_norms
    return torch.linalg.vector_norm(torch.cat([client_norms[:cut], server_norms.float().cpu(), client_norms[cut:]]))


def server_side_parameters(split: SplitViTForImageClassification) -> list[nn.Parameter]:
    """The server's parameters in a whole split, in the one-process order: its side of the bridge, then its half.
    Their gradient norms go down with each step's last gradient."""
    bridge = split.bridge
    return [*(p for name in bridge.server_modules for p in bridge.get_submodule(name).parameters()),
            *split.server.parameters()]  # fmt: skip


@dataclass
class PendingBackward:
    """What a FORWARD leaves for its BACKWARD: the activations as received (with their gradient to come), the
    bridge's context for packing that gradient, and what the gradient flows back from: the loss, or in a U-shaped
    split what went down to the client's head."""

    received: torch.Tensor
    context: object
    loss: torch.Tensor


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuses NaN or Inf in any floating-point tensor that came."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WireError(f"the {name} that came hold NaN or Inf.")


def check_labels(labels: torch.Tensor, num_labels: int) -> None:
    """Class ids (int64, one per sample, in range) or soft labels (one row of `num_labels` non-negative weights
    with a positive sum per merged sample)."""
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[1] != num_labels:
            raise WireError(f"soft labels must be (T, {num_labels}); got {tuple(labels.shape)}.")
        if not bool((labels >= 0).all()) or not bool((labels.float().sum(dim=1) > 0).all()):
            raise WireError("soft labels must be non-negative with a positive sum per row.")
        return
    if labels.dtype != torch.int64 or labels.dim() != 1 or labels.numel() == 0:
        raise WireError(f"labels must be a non-empty int64 vector of class ids; got {labels.dtype} {labels.shape}.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_labels:
        raise WireError(f"labels out of range [0, {num_labels}).")


class ServerHalf:
    """The server half and the server's side of the bridge, with their optimizer and learning-rate schedule.

    Made from a whole split: the client half and the bridge's client-side modules are dropped, unless `keep_client`
    (a federation's server averages them and saves them next to its own). `steps` counts the optimizer steps
    taken (a resumed checkpoint's included). On a server of several ranks (`ranks`), each rank's gradients are
    averaged over the ranks once a step, before they are measured (`gradient_norms`), as DDP averages them.
    """

    def __init__(
        self,
        split: SplitViTForImageClassification,
        args: TrainingArguments,
        keep_client: bool = False,
        ranks: ServerRanks | None = None,
    ):
        bridge = split.bridge
        self.ushaped = isinstance(split, USplitViTForImageClassification)
        server_side = {id(p) for p in server_side_parameters(split)}
        client_side = [*split.client.parameters(), *(p for p in bridge.parameters() if id(p) not in server_side)]
        head = list(split.head.parameters()) if self.ushaped else []
        self.num_client_norms = sum(1 for parameter in [*client_side, *head] if parameter.requires_grad)  # STEP's
        self.num_head_norms = sum(1 for parameter in head if parameter.requires_grad)  # the last of them
        self.num_server_norms = sum(1 for parameter in server_side_parameters(split) if parameter.requires_grad)
        self.sent_norms: torch.Tensor | None = None  # the step's server norms, as they went down
        if not keep_client:
            split.client = None
            if self.ushaped:
                split.head = None  # the client's: the server never holds the head
            drop_modules(split.bridge, split.bridge.client_modules)
        self.split = split
        self.args = args
        self.ranks = ranks or ServerRanks()
        self.optimizer = None
        self.scheduler = None
        self.steps = 0

    @property
    def device(self) -> torch.device:
        return self.split.server.device

    def make_optimizer(self, max_steps: int) -> None:
        """The optimizer and schedule the client's `Trainer` would make from the same arguments, for `max_steps`."""
        model = nn.ModuleDict({"server": self.split.server, "bridge": self.split.bridge})
        decay = set(Trainer.get_decay_parameter_names(None, model))
        named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_class(groups, **optimizer_kwargs)
        self.scheduler = get_scheduler(
            self.args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=self.args.get_warmup_steps(max_steps),
            num_training_steps=max_steps,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )

    def forward(self, tensors: dict[str, torch.Tensor], smoothing: float) -> PendingBackward:
        """The loss of the server half on what a FORWARD carried (the bridge's tensors and the labels)."""
        if self.ushaped:
            raise WireError("this split is U-shaped: its FORWARD is answered by forward_head, with no labels.")
        if smoothing != self.args.label_smoothing_factor:
            raise WireError(f"label smoothing {smoothing} is not the agreed {self.args.label_smoothing_factor}.")
        check_finite(tensors)
        if "labels" not in tensors:
            raise WireError("a FORWARD must carry the labels.")
        tensors = dict(tensors)
        labels = tensors.pop("labels").to(self.device)
        check_labels(labels, self.split.num_labels)
        received, context, decoded = self._receive(tensors, labels.shape[0], "labels")
        loss = self.split.server(decoded, labels=soft_targets(labels, self.split.num_labels, smoothing)).loss
        return PendingBackward(received, context, loss)

    def forward_head(self, tensors: dict[str, torch.Tensor], rows: float) -> tuple[PendingBackward, torch.Tensor]:
        """A U-shaped split's FORWARD: the middle on what came (the bridge's tensors, no labels; `rows`: how many
        samples, or merged samples, they hold). Returns what is kept for HEAD_BACKWARD and what goes down to the
        client's head (`head_activations`: the CLS rows, or every token when the head has layers)."""
        if not self.ushaped:
            raise WireError("this split is not U-shaped: a FORWARD must carry the labels.")
        if "labels" in tensors:
            raise WireError("a U-shaped split's FORWARD carries no labels: they stay on the client.")
        check_finite(tensors)
        if not float(rows).is_integer():
            raise WireError(f"a FORWARD's row count {rows} is not a whole number.")
        received, context, decoded = self._receive(tensors, int(rows), "rows")
        features = self.split.server(decoded).last_hidden_state
        returned = self._returned(features)
        return PendingBackward(received, context, returned), self.split.link.cast({"head_activations": returned})

    def _receive(self, tensors: dict[str, torch.Tensor], batch: int, counted: str):
        """The activations a FORWARD carried for `batch` rows (as many as its `counted`), unpacked and decoded,
        each step checked against the agreed batch, tokens and width: (received, context, decoded)."""
        split = self.split
        split.server.train()
        split.bridge.train()
        if not 1 <= batch <= self.args.per_device_train_batch_size:
            raise WireError(f"{batch} samples are out of range: 1 .. the agreed batch of "
                            f"{self.args.per_device_train_batch_size}.")  # fmt: skip
        tensors = {name: tensor.to(self.device) for name, tensor in tensors.items()}
        dtype = split.server.dtype
        config = split.server.config
        shape = (batch, (config.image_size // config.patch_size) ** 2 + 1, config.hidden_size)
        try:
            context = split.bridge.receiver_context(tensors, shape, dtype)
            received = split.bridge.unpack(tensors, context).to(dtype).requires_grad_()
            decoded = split.bridge.decode(received)
        except (KeyError, ValueError, RuntimeError) as error:  # a missing tensor, a shape that does not fit
            raise WireError(f"the activations do not fit the {type(split.bridge).__name__}: {error}") from error
        if decoded.dim() != 3 or decoded.shape[0] != batch or not 1 <= decoded.shape[1] <= shape[1]:
            shape_text = tuple(decoded.shape)
            raise WireError(f"activations of {shape_text} do not fit {batch} {counted} and {shape[1]} tokens.")
        if decoded.shape[2] != config.hidden_size:
            raise WireError(f"activations of width {decoded.shape[2]} do not fit the split's {config.hidden_size}.")
        return received, context, decoded

    def _returned(self, features: torch.Tensor) -> torch.Tensor:
        """What a U-shaped split's middle hands the head: the CLS rows, or every token when the head has layers
        (the middle's config records `head_layers`; the server holds no head)."""
        return features if self.split.server.config.head_layers else features[:, :1]

    def backward(self, pending: PendingBackward, seed: float, micro_batches: int) -> dict[str, torch.Tensor]:
        """Back-propagates the agreed seed (1 / `micro_batches`, times the client's loss scale under fp16) through the
        server half; the gradient of what came, as it goes down."""
        if self.ushaped:
            raise WireError("this split is U-shaped: its backward is HEAD_BACKWARD, with the head's gradient.")
        self._check_seed(seed, micro_batches)
        loss = pending.loss
        loss.backward(torch.tensor(seed, dtype=loss.dtype, device=loss.device))
        return self.split.link.cast(self.split.bridge.pack_gradient(pending.received.grad, pending.context))

    def backward_head(self, pending: PendingBackward, gradient: torch.Tensor) -> dict[str, torch.Tensor]:
        """A U-shaped split's HEAD_BACKWARD: back-propagates the head's gradient of what went down (its shape, a
        float, finite) through the middle; the gradient of what came, as it goes down."""
        if not self.ushaped:
            raise WireError("this split is not U-shaped: its backward comes with FORWARD, from the agreed seed.")
        returned = pending.loss
        if not gradient.is_floating_point() or gradient.shape != returned.shape:
            raise WireError(f"head_gradients must be floats of {tuple(returned.shape)}, as head_activations went; "
                            f"got {gradient.dtype} {tuple(gradient.shape)}.")  # fmt: skip
        check_finite({"head_gradients": gradient})
        returned.backward(gradient.to(returned.device, returned.dtype))
        return self.split.link.cast(self.split.bridge.pack_gradient(pending.received.grad, pending.context))

    @torch.no_grad()
    def logits(self, activations: torch.Tensor) -> dict[str, torch.Tensor]:
        """The server half's logits for eval-mode activations, as they go down (a U-shaped split's: what its head
        needs, `head_activations`)."""
        split = self.split
        config = split.server.config
        tokens = (config.image_size // config.patch_size) ** 2 + 1
        batch = self.args.per_device_eval_batch_size
        if not activations.is_floating_point() or activations.dim() != 3 or not 1 <= activations.shape[0] <= batch:
            raise WireError(f"EVAL activations must be (1 .. {batch}, tokens, width) floats; got {activations.dtype} "
                            f"{tuple(activations.shape)}.")  # fmt: skip
        check_finite({"activations": activations})
        split.server.eval()
        split.bridge.eval()
        try:
            decoded = split.bridge.decode(activations.to(split.server.device, split.server.dtype))
        except (ValueError, RuntimeError) as error:  # BottleNet++'s decoder: a width that does not fit
            raise WireError(f"the EVAL activations do not fit the {type(split.bridge).__name__}: {error}") from error
        if not 1 <= decoded.shape[1] <= tokens or decoded.shape[2] != config.hidden_size:
            shape = tuple(decoded.shape)
            raise WireError(f"EVAL activations of {shape} do not fit {tokens} x {config.hidden_size}.")
        if self.ushaped:
            return split.link.cast({"head_activations": self._returned(split.server(decoded).last_hidden_state)})
        return split.link.cast({"logits": split.server(decoded).logits})

    def _with_gradients(self) -> list[nn.Parameter]:
        """The server's parameters that have a gradient, in the one-process order (the bridge's, then the half's)."""
        return [p for p in [*self.split.bridge.parameters(), *self.split.server.parameters()] if p.grad is not None]

    def gradient_norms(self) -> torch.Tensor:
        """The norm of each server gradient, in the one-process order, as float32 (what goes down with the step's
        last gradient, so that the client forms the global norm without asking); kept for the STEP that follows,
        which clips by the same norms without measuring the gradients again. The step's gradients are complete
        now: on several ranks they are averaged over the ranks first."""
        parameters = self._with_gradients()
        if not parameters:
            raise WireError("no micro-batch of this step has come: there are no gradients to measure.")
        self.ranks.average_gradients(parameters)
        self.sent_norms = torch.stack([torch.nn.utils.get_total_norm([p.grad]) for p in parameters]).float().cpu()
        return self.sent_norms

    def optimizer_step(self, client_norms: torch.Tensor, max_norm: float) -> torch.Tensor:
        """Clips by the global norm and steps; the norm is the norm of every per-tensor norm in the one-process
        parameter order (client, bridge, server, then a U-shaped split's head), as `torch.nn.utils.get_total_norm`
        forms it, and as the client forms it from the server's norms (`global_norm`)."""
        expected = self.args.max_grad_norm if self.args.max_grad_norm else math.inf
        if max_norm != expected:
            raise WireError(f"the clipping norm {max_norm} is not the agreed max_grad_norm {expected}.")
        if client_norms.dtype != torch.float32 or client_norms.shape != (self.num_client_norms,):
            raise WireError(
                f"a STEP must carry {self.num_client_norms} float32 gradient norms; got {client_norms.dtype} "
                f"{tuple(client_norms.shape)}."
            )
        if not bool((client_norms >= 0).all()):  # NaN and Inf pass: a step the client's scaler skips, as in one process
            raise WireError("a gradient norm is negative.")
        parameters = self._with_gradients()
        if not parameters:
            raise WireError("a STEP came before any micro-batch: there are no gradients to step with.")
        server_norms = self.sent_norms if self.sent_norms is not None else self.gradient_norms()
        self.sent_norms = None
        total = global_norm(client_norms, server_norms, self.num_head_norms).to(parameters[0].device)
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        if torch.isfinite(total):
            self.optimizer.step()
            self.scheduler.step()
            self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _check_seed(self, seed: float, micro_batches: int) -> None:
        """The backward seed is 1 / k for the k micro-batches this step announced (at most the agreed accumulation
        steps), times the client's loss scale under fp16: anything else would rescale the server's gradients."""
        if not math.isfinite(seed) or seed <= 0:
            raise WireError(f"the backward seed {seed} is not a positive finite number.")
        if self.args.fp16:
            if seed > 2.0**32 / micro_batches:
                raise WireError(
                    f"the backward seed {seed} is over the largest fp16 loss scale (2**32) / {micro_batches}."
                )
            return
        if abs(seed * micro_batches - 1) > 1e-6:
            raise WireError(f"the backward seed {seed} is not 1 / {micro_batches}, for the {micro_batches} "
                            "micro-batches this step announced.")  # fmt: skip

    def discard_gradients(self) -> None:
        """Forgets the partial gradients of a step that will not be taken (its client was lost)."""
        self.sent_norms = None
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def save_checkpoint(self, folder: Path) -> None:
        """The server half, its side of the bridge, the optimizer and the schedule, into `folder`: each file whole
        or not at all (`write_atomically`), the weights last (their presence marks the checkpoint). A full disk
        raises `CheckpointError`, the previous checkpoint intact."""
        state = {f"server.{k}": v for k, v in self.split.server.state_dict().items()}
        state.update({f"bridge.{k}": v for k, v in self.split.bridge.state_dict().items()})
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        write_atomically(folder / OPTIMIZER_NAME, lambda path: torch.save(self.optimizer.state_dict(), path))
        write_atomically(folder / SCHEDULER_NAME, lambda path: torch.save(self.scheduler.state_dict(), path))
        write_atomically(folder / SERVER_WEIGHTS_NAME, lambda path: save_file(state, path))

    def has_checkpoint(self, folder: Path) -> bool:
        return (folder / SERVER_WEIGHTS_NAME).exists()

    def load_checkpoint(self, folder: Path) -> None:
        """What `save_checkpoint` wrote into `folder` (the optimizer must have been made). Every file is read
        before anything is loaded; one missing or not whole raises `CheckpointError` naming it."""
        state = read_checked(folder / SERVER_WEIGHTS_NAME, load_file)
        optimizer = read_checked(folder / OPTIMIZER_NAME, lambda path: torch.load(path, weights_only=True))
        scheduler = read_checked(folder / SCHEDULER_NAME, lambda path: torch.load(path, weights_only=True))
        try:
            self.split.server.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("server.")})
            self.split.bridge.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("bridge.")})
            self.optimizer.load_state_dict(optimizer)
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"the checkpoint in {folder} does not fit this split: {error}") from error
        self.scheduler.load_state_dict(scheduler)

    def save_final(self, output_dir: Path) -> None:
        """`server/` and the server side of the bridge: next to the client's `client/`, `bridge.safetensors` and
        `split_config.json`, a folder `SplitViTForImageClassification.from_pretrained` loads whole."""
        bridge = self.split.bridge
        self.split.server.save_pretrained(output_dir / "server")
        state = {
            name: tensor.detach().contiguous().cpu()
            for name, tensor in bridge.state_dict().items()
            if any(name.startswith(f"{module}.") for module in bridge.server_modules)
        }
        if state:
            save_file(state, output_dir / SERVER_BRIDGE_WEIGHTS_NAME)
