"""NoPeek (Vepakomma et al. 2020, arXiv 2008.09161): a distance-correlation loss between the client's inputs and
what it sends, added to the training loss, so that the client half learns activations that say less about the image.

    with NoPeek(split, weight=0.5):
        trainer.train()      # every training step's loss is task loss + 0.5 * dCor(pixel_values, client output)

The penalty is computed on the client from its own inputs and its own half's output (before the bridge: what every
bridge then compresses), so its gradient reaches only the client half. It is an empirical defence: no epsilon comes
with it; measure the attack instead. It holds for a split trained in one process and for a client whose server half
lives in another process alike (the recipes' `--nopeek_weight`): the hooks add the penalty to the loss the split
returns, whose remote part back-propagates through the server's gradient as before; nothing more crosses.
"""

import torch
from torch import nn


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The sample distance correlation (Székely et al. 2007) of two batches, each row one sample (the rest
    flattened): 0 for independent samples, 1 for ones related by a similarity; differentiable."""
    if x.shape[0] != z.shape[0] or x.shape[0] < 2:
        raise ValueError(f"x ({x.shape[0]} rows) and z ({z.shape[0]}) must hold the same number of samples, >= 2.")

    def centred(rows: torch.Tensor) -> torch.Tensor:
        flat = rows.float().flatten(1)
        distances = (flat[:, None] - flat[None]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
        distances = distances * (1 - torch.eye(len(flat), device=flat.device))  # no epsilon on the diagonal
        return distances - distances.mean(0, keepdim=True) - distances.mean(1, keepdim=True) + distances.mean()

    a, b = centred(x), centred(z)
    covariance, x_variance, z_variance = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (covariance.clamp_min(0) / (x_variance * z_variance).sqrt().clamp_min(1e-12)).sqrt()


class NoPeek:
    """Adds `weight * distance_correlation(pixel_values, client output)` to the loss of each training forward of
    `split` (a one-process standard or U-shaped split) while the context is open; `penalties` keeps the last values
    seen (detached), for logging."""

    def __init__(self, split: nn.Module, weight: float):
        if isinstance(weight, bool) or not (isinstance(weight, int | float) and 0 < weight < float("inf")):
            raise ValueError(f"weight={weight!r} is out of range: it must be a finite number > 0.")
        self.split, self.weight = split, float(weight)
        self.penalties: list[float] = []
        self._handles: list = []
        self._inputs: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    def __enter__(self) -> "NoPeek":
        client = self.split.client
        self._handles.append(client.register_forward_pre_hook(self._client_input, with_kwargs=True))
        self._handles.append(client.register_forward_hook(self._client_output))
        self._handles.append(self.split.register_forward_hook(self._add_penalty))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _client_input(self, module, args, kwargs):
        self._inputs = kwargs.get("pixel_values", args[0] if args else None) if module.training else None

    def _client_output(self, module, args, output):
        self._output = output.last_hidden_state if self._inputs is not None else None

    def _add_penalty(self, module, args, output):
        if not module.training or self._inputs is None or self._output is None or output.loss is None:
            return None
        penalty = distance_correlation(self._inputs, self._output)
        self._inputs = self._output = None
        self.penalties.append(float(penalty.detach()))
        output.loss = output.loss + self.weight * penalty.to(output.loss.dtype)
        return output
