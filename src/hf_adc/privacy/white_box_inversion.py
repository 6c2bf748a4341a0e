"""Optimisation-based (white-box) inversion: the server searches for images whose surrogate client output matches
what it received, under a total-variation prior.

The server holds a surrogate of the client half (the public checkpoint, or a federation's current half). For each
row it saw it starts from the auxiliary mean image and runs Adam on

    distance(surrogate(x), row) + tv_weight * TV(x),    x kept in the model's input range,

where the distance compares what the bridge kept with what the surrogate gives (UnSplit, arXiv 2108.09033, does the
same with a model it also searches for; here the surrogate is given):

- a row of every token (the uncompressed split, quantization's dequantized codes, payload noise around them): the
  mean squared difference over the values that arrived (Top-K's dropped values arrive as zeros and are skipped);
  payload noise clips the surrogate's rows to `clip_norm` first, as the client did;
- a row of fewer tokens (ADC's kept tokens, whose positions are not sent): each received token against its nearest
  surrogate token (a one-sided Chamfer distance), since the server does not know which tokens were kept; under
  payload noise, which clipped the kept tokens as a row of their own, by direction (unit tokens), scale unknown.
  For ADC's merged rows it recovers something like the cluster's mean image, the learned inversion's target too.

Whether it beats the learned inversion depends on how close the surrogate is to the client and on the bridge;
`strongest_inversion` scores both (or any number of attacks) on the same observations and keeps the stronger.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..bridges import BridgeConfig
from .image_metrics import ReconstructionReport
from .observation import Observation
from .payload_noise import PayloadNoiseConfig, clip_rows


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Per image (N, C, H, W): the mean absolute difference of neighbouring pixels, down and across."""
    down = (images[:, :, 1:] - images[:, :, :-1]).abs().flatten(1).mean(dim=1)
    across = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().flatten(1).mean(dim=1)
    return down + across


def _token_distance(output: torch.Tensor, views: torch.Tensor, scale_free: bool = False) -> torch.Tensor:
    """Per row: the distance of the surrogate's tokens `output` (N, n, d) to the received `views` (N, k, d); with
    `scale_free`, of their directions (each token made unit length first)."""
    if scale_free:
        output, views = F.normalize(output, dim=2), F.normalize(views, dim=2)
    if views.shape[1] == output.shape[1]:
        arrived = (views != 0).float()
        return ((output - views) ** 2 * arrived).flatten(1).sum(dim=1) / arrived.flatten(1).sum(dim=1).clamp_min(1)
    nearest = torch.cdist(views, output).min(dim=2).values  # each received token to its nearest surrogate token
    return (nearest**2).mean(dim=1) / views.shape[2]


class WhiteBoxInversion:
    """The attack: `reconstruct` rows the server saw by optimising images through the surrogate `client` (a client
    half, used frozen and left as it was). `compression` is the bridge config of the run (for payload noise's
    clipping); `start` (C, H, W) the image every search starts from (the auxiliary mean image); `pixel_range` the
    model's input range (e.g. (-1, 1) for mean = std = 0.5), kept by clamping after each step."""

    def __init__(self, client: nn.Module, start: torch.Tensor, pixel_range: tuple[float, float],
                 compression: BridgeConfig | None = None, steps: int = 300, learning_rate: float = 0.05,
                 tv_weight: float = 0.05, batch_size: int = 64):  # fmt: skip
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps={steps} and batch_size={batch_size} must both be >= 1.")
        if not (learning_rate > 0 and tv_weight >= 0):
            raise ValueError(
                f"learning_rate={learning_rate} must be > 0 and tv_weight={tv_weight} >= 0: both are out of range."
            )
        low, high = pixel_range
        if not low < high:
            raise ValueError(f"pixel_range={pixel_range} is out of range: it must be (low, high) with low < high.")
        self.client, self.start, self.pixel_range = client, start, (float(low), float(high))
        self.tokens = client.embeddings.patch_embeddings.num_patches + 1
        self.clip_norm = compression.clip_norm if isinstance(compression, PayloadNoiseConfig) else None
        self.steps, self.learning_rate, self.tv_weight, self.batch_size = steps, learning_rate, tv_weight, batch_size

    def _surrogate(self, images: torch.Tensor, tokens: int) -> torch.Tensor:
        output = self.client(images).last_hidden_state.float()
        if self.clip_norm is None or tokens != output.shape[1]:
            return output  # fewer tokens: the client clipped its kept tokens, compared by direction instead
        return clip_rows(output, self.clip_norm)

    @torch.enable_grad()  # a search needs gradients even when its caller turned them off
    def _search(self, views: torch.Tensor) -> torch.Tensor:
        images = self.start.expand(views.shape[0], *self.start.shape).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([images], lr=self.learning_rate)
        # A row of fewer tokens, clipped as a whole on the client, has a scale the surrogate's tokens cannot know.
        scale_free = self.clip_norm is not None and views.shape[1] != self.tokens
        scale = 2 / views.shape[2] if scale_free else views.pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)
        for _ in range(self.steps):
            output = self._surrogate(images, views.shape[1])
            loss = _token_distance(output, views, scale_free) / scale + self.tv_weight * total_variation(images)
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
            with torch.no_grad():
                images.clamp_(*self.pixel_range)
        return images.detach()

    def reconstruct(self, views: torch.Tensor) -> torch.Tensor:
        """Images (in the model's input space) for rows the server saw, `(rows, tokens, hidden)`."""
        frozen = [(parameter, parameter.requires_grad) for parameter in self.client.parameters()]
        was_training = self.client.training
        self.client.eval()
        for parameter, _ in frozen:
            parameter.requires_grad_(False)
        try:
            return torch.cat([self._search(chunk.float()) for chunk in views.split(self.batch_size)])
        finally:
            for parameter, requires_grad in frozen:
                parameter.requires_grad_(requires_grad)
            self.client.train(was_training)


def strongest_inversion(
    attacks: Mapping[str, object],
    observations: list[Observation],
    image_mean: Sequence[float],
    image_std: Sequence[float],
    auxiliary_mean: torch.Tensor,
) -> tuple[str, dict[str, ReconstructionReport]]:
    """Scores every attack (anything with `reconstruct(views)`: `LearnedInversion`, `WhiteBoxInversion`) on the same
    observations (`score_inversion`) and returns the name of the strongest, the one of highest mean SSIM, with every
    report: what a benchmark reports per method is the strongest attack's."""
    from .inversion import score_inversion

    if not attacks:
        raise ValueError("no attack to compare: give at least one, e.g. {'learned': ..., 'white_box': ...}.")
    reports = {
        name: score_inversion(attack, observations, image_mean, image_std, auxiliary_mean)
        for name, attack in attacks.items()
    }
    strongest = max(reports, key=lambda name: float(reports[name].ssim_images.mean()))
    return strongest, reports
