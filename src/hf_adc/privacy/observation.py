"""What the server sees in a real run, recorded beside what it stands for (the originals, for scoring only).

`Observer(split)` hooks a one-process split (standard or U-shaped) for its training steps and keeps, per step:

- `view`: the input of the server half, i.e. the wire payload once the server has unpacked and decoded it (ADC's
  merged rows of kept tokens, Top-K's values scattered back, dequantized codes, BottleNet++'s decoded codes);
- `targets`: the label distributions the server trained on (standard split: class ids one-hot, ADC's soft labels);
  None in a U-shaped split, where no label crosses;
- `head_activations`: what the server returned to the client's head in a U-shaped split (its own output); None in
  a standard split;
- `head_gradients`: what the client's head sends up in a U-shaped split (the gradient of the loss with respect to
  what the server returned); None in a standard split;
- and, for scoring, never shown to an attack: the batch's `pixel_values` and `labels`, and `cluster_ids` (which row
  each sample went into; None when row i is sample i).

Hooks only read; the run trains exactly as without them. The recorder keeps the last `max_steps` steps.
"""

from collections import deque
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Observation:
    """One training step as the server saw it, with the originals it stands for (see the module docstring)."""

    view: torch.Tensor
    pixel_values: torch.Tensor
    labels: torch.Tensor
    cluster_ids: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    head_activations: torch.Tensor | None = None
    head_gradients: torch.Tensor | None = None

    @property
    def members(self) -> torch.Tensor:
        """The row of `view` each sample of the batch went into."""
        return self.cluster_ids if self.cluster_ids is not None else torch.arange(self.labels.shape[0])


class Observer:
    """Records what the server sees in the training steps of `split` while the context is open:

    with Observer(split, max_steps=8) as seen:
        trainer.train()
    seen.observations   # list[Observation]
    """

    def __init__(self, split: nn.Module, max_steps: int = 16):
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r} is out of range: it must be an integer >= 1.")
        self.split, self._kept = split, deque(maxlen=max_steps)
        self._handles: list = []
        self._step: dict | None = None

    @property
    def observations(self) -> list[Observation]:
        return [
            Observation(**{name: step.get(name) for name in Observation.__dataclass_fields__}) for step in self._kept
        ]

    def __enter__(self) -> "Observer":
        split = self.split
        self._handles.append(split.register_forward_pre_hook(self._inputs, with_kwargs=True))
        self._handles.append(split.server.register_forward_pre_hook(self._server_input, with_kwargs=True))
        self._handles.append(split.register_forward_hook(self._outputs))
        head = getattr(split, "head", None)
        if head is not None:
            self._handles.append(head.register_forward_pre_hook(self._head_input, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _inputs(self, module, args, kwargs):
        if not module.training:
            self._step = None
            return
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        labels = kwargs.get("labels", args[1] if len(args) > 1 else None)
        self._step = {"pixel_values": pixel_values.detach().cpu(), "labels": labels.detach().cpu()}

    def _server_input(self, module, args, kwargs):
        if self._step is not None:
            hidden_states = kwargs.get("hidden_states", args[0] if args else None)
            self._step["view"] = hidden_states.detach().float().cpu()

    def _head_input(self, module, args, kwargs):
        if self._step is None:
            return
        step = self._step
        returned = kwargs.get("hidden_states", args[0] if args else None)
        step["head_activations"] = returned.detach().float().cpu()

        def keep(gradient):
            step["head_gradients"] = gradient.detach().float().cpu()

        if returned.requires_grad:
            returned.register_hook(keep)

    def _outputs(self, module, args, output):
        if self._step is None:
            return
        step, self._step = self._step, None
        ushaped = hasattr(module, "head")
        step["targets"] = None if ushaped else output.targets.detach().float().cpu()
        step["cluster_ids"] = None if output.cluster_ids is None else output.cluster_ids.detach().cpu()
        self._kept.append(step)  # backward adds `head_gradients` to this dict later
