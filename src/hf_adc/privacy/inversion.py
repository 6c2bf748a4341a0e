"""Learned inversion: the server trains a decoder from what its half receives back to the images.

The server holds the public checkpoint the client half was fine-tuned from (its surrogate of the client), the
bridge's settings, and auxiliary images of the same domain. It passes the auxiliary images through the surrogate and
through a copy of the bridge, exactly as a client would send them, decodes them as its half would, and trains a
decoder from that view to the images; then it applies the decoder to what it received in the real run
(`Observer`). For a merged row (ADC) the training target is the mean image of its members.

- Every bridge's payload is handled in the space the server half sees (`(rows, tokens, hidden)` after `unpack` and
  `decode`): ADC's merged rows of k kept tokens (positions not sent: the decoder takes a set of tokens), Top-K's
  values scattered back, dequantized codes, C3-SL's recovered rows, payload noise (simulated with its settings).
- A bridge with client modules the server never sees (BottleNet++'s encoder) cannot be simulated: the server trains
  on the surrogate's activations before it and applies the decoder to its own decoder's output. That output was
  trained with the task, not to give the activations back, so its scale can be far from theirs: `AlignedInversion`
  first moves each hidden unit of what the server saw to the mean and spread the decoder was trained on (the server
  has both), which also meets a client half that drifted from the checkpoint part of the way.

The decoder: one learned query per patch attends to the received tokens (a small transformer decoder), then a linear
map gives the patch's pixels; so it takes any number of tokens in any order.
"""

import copy
import math

import torch
from torch import nn

from ..bridges import BottleNetConfig, BridgeConfig, ComposedConfig, build_bridge
from .image_metrics import ReconstructionReport, score_rows, to_unit_range
from .observation import Observation
from .payload_noise import PayloadNoiseConfig


class TokenInverter(nn.Module):
    """A set of tokens `(N, k, hidden)` to images `(N, channels, image_size, image_size)` in the model's input space."""

    def __init__(self, hidden_size: int, image_size: int, patch_size: int, num_channels: int = 3, width: int = 64,
                 layers: int = 2, heads: int = 4):  # fmt: skip
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}.")
        self.grid, self.patch_size, self.num_channels = image_size // patch_size, patch_size, num_channels
        self.project = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width))
        self.queries = nn.Parameter(torch.randn(self.grid**2, width) * 0.02)
        layer = nn.TransformerDecoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, layers)
        self.pixels = nn.Linear(width, num_channels * patch_size**2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.project(tokens)
        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        patches = self.pixels(self.blocks(queries, memory))  # (N, grid^2, C p^2)
        n, g, p, c = tokens.shape[0], self.grid, self.patch_size, self.num_channels
        return patches.view(n, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, g * p, g * p)


def simulable(config: BridgeConfig | None) -> BridgeConfig | None:
    """The part of a bridge config the server can run itself: the config without its learned codec (BottleNet++, whose
    client encoder it never sees) and without noise in a space it cannot reach (noise on BottleNet++'s codes)."""
    if isinstance(config, BottleNetConfig):
        return None
    if isinstance(config, ComposedConfig) and isinstance(config.codec, BottleNetConfig):
        return config.reducer
    if isinstance(config, PayloadNoiseConfig):
        inner = simulable(config.compression)
        if inner is not config.compression:
            return inner
        seed = 1 if config.seed is None else config.seed + 1  # the server's own draws, never the client's
        return PayloadNoiseConfig(inner, config.clip_norm, config.noise_multiplier, seed=seed)
    return config


@torch.no_grad()
def surrogate_views(
    client: nn.Module,
    compression: BridgeConfig | None,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    batch_size: int,
    passes: int = 1,
    seed: int = 0,
    bridge: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's training pairs: the auxiliary images through the surrogate client half and a copy of the bridge
    (`simulable(compression)`, in training mode, batches of `batch_size` in `passes` seeded shuffles), decoded as
    the server half receives them, each row with the mean image of its members. Returns (views, images), one row
    each; views are `(rows, tokens, hidden)` (batches of one size give one token count; `pad_tokens` evens out
    any other). `bridge`: a bridge the server holds whole instead (a federation's, its client modules included),
    used as it is in training mode (a copy; the one given is left as it was)."""
    if batch_size < 1 or passes < 1:
        raise ValueError(f"batch_size={batch_size} and passes={passes} must both be >= 1.")
    if len(labels) < batch_size:
        raise ValueError(f"batch_size={batch_size} is out of range: only {len(labels)} auxiliary rows were given.")
    hidden = client.config.hidden_size
    num_tokens = client.embeddings.patch_embeddings.num_patches + 1
    if bridge is None:
        bridge = build_bridge(simulable(compression), num_tokens, hidden, num_labels)
    else:
        bridge = copy.deepcopy(bridge)
    bridge.train()
    generator = torch.Generator().manual_seed(seed)
    views, images = [], []
    was_training = client.training
    client.eval()
    try:
        for _ in range(passes):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                batch = order[start : start + batch_size]
                output = client(pixel_values[batch], output_cls_attention=bridge.needs_cls_attention)
                message = bridge.encode(output.last_hidden_state, labels[batch], output.cls_attention)
                wire, context = bridge.pack(message.hidden_states)
                view = bridge.decode(bridge.unpack(wire, context)).float()
                members = message.cluster_ids if message.cluster_ids is not None else torch.arange(len(batch))
                target = torch.zeros(view.shape[0], *pixel_values.shape[1:]).index_add_(0, members, pixel_values[batch])
                target /= torch.bincount(members, minlength=view.shape[0]).clamp_min(1).view(-1, 1, 1, 1)
                views.append(view)
                images.append(target)
    finally:
        client.train(was_training)
    return pad_tokens(views), torch.cat(images)


def pad_tokens(views: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several batches, with token counts made equal by repeating each row's tokens cyclically."""
    most = max(view.shape[1] for view in views)
    padded = [view[:, torch.arange(most) % view.shape[1]] for view in views]
    return torch.cat(padded)


class LearnedInversion:
    """The attack: `fit` on the surrogate's (view, image) pairs, `reconstruct` rows the server saw."""

    def __init__(self, hidden_size: int, image_size: int, patch_size: int, num_channels: int = 3, width: int = 64,
                 layers: int = 2, seed: int = 0):  # fmt: skip
        self.seed = seed
        torch.manual_seed(seed)
        self.decoder = TokenInverter(hidden_size, image_size, patch_size, num_channels, width, layers)
        self.moments: tuple[torch.Tensor, torch.Tensor] | None = None  # per hidden unit, of the views it fitted

    @classmethod
    def for_client(cls, client: nn.Module, **kwargs) -> "LearnedInversion":
        """An inversion sized for the images and hidden width of `client` (a client half)."""
        config = client.config
        return cls(config.hidden_size, config.image_size, config.patch_size, config.num_channels, **kwargs)

    def fit(self, views: torch.Tensor, images: torch.Tensor, steps: int = 500, batch_size: int = 64,
            learning_rate: float = 2e-3) -> list[float]:  # fmt: skip
        """Trains the decoder (AdamW, cosine schedule, MSE in the model's input space); returns the losses."""
        if views.shape[0] != images.shape[0] or views.shape[0] == 0:
            raise ValueError(
                f"views ({views.shape[0]} rows) and images ({images.shape[0]}) must pair up, at least one."
            )
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps={steps} and batch_size={batch_size} must both be >= 1.")
        self.moments = hidden_moments(views)
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.AdamW(self.decoder.parameters(), lr=learning_rate, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
        )
        self.decoder.train()
        losses = []
        for _ in range(steps):
            batch = torch.randint(0, views.shape[0], (min(batch_size, views.shape[0]),), generator=generator)
            loss = nn.functional.mse_loss(self.decoder(views[batch]), images[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        return losses

    @torch.no_grad()
    def reconstruct(self, views: torch.Tensor) -> torch.Tensor:
        """Images (in the model's input space) for rows the server saw, `(rows, tokens, hidden)`."""
        self.decoder.eval()
        return torch.cat([self.decoder(chunk.float()) for chunk in views.split(256)])


def hidden_moments(views: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation of each hidden unit over every token of `views` (`(rows, tokens, hidden)`, or
    a list of such with one hidden width)."""
    tokens = torch.cat([view.float().flatten(0, -2) for view in ([views] if torch.is_tensor(views) else views)])
    return tokens.mean(dim=0), tokens.std(dim=0).clamp_min(1e-6)


class AlignedInversion:
    """A fitted `LearnedInversion` applied after an affine map per hidden unit that gives what the server saw
    (`observed`: every view it recorded, the moments taken over all of them) the mean and spread of the views the
    decoder fitted. The server knows both, so this is an attack it can run; `strongest_inversion` keeps it where it
    beats the plain decoder (BottleNet++'s decoded codes, a client half that moved)."""

    def __init__(self, attack: LearnedInversion, observed: torch.Tensor | list[torch.Tensor]):
        if attack.moments is None:
            raise ValueError("the inversion has not been fitted: call fit before aligning it.")
        self.attack = attack
        self.observed = hidden_moments(observed)

    def reconstruct(self, views: torch.Tensor) -> torch.Tensor:
        (source_mean, source_std), (seen_mean, seen_std) = self.attack.moments, self.observed
        return self.attack.reconstruct((views.float() - seen_mean) / seen_std * source_std + source_mean)


def score_inversion(
    attack: "LearnedInversion | AlignedInversion",
    observations: list[Observation],
    image_mean: list[float],
    image_std: list[float],
    auxiliary_mean: torch.Tensor,
) -> ReconstructionReport:
    """The attack applied to every recorded step, scored per image against the originals in [0, 1] (the processor's
    `image_mean` / `image_std` undone) and per row against its best member; `auxiliary_mean` (C, H, W, normalised
    like the inputs) is the baseline."""
    if not observations:
        raise ValueError("no observations to attack: record training steps with Observer first.")
    reconstructions, originals, members, offset = [], [], [], 0
    for seen in observations:
        reconstructions.append(to_unit_range(attack.reconstruct(seen.view), image_mean, image_std))
        originals.append(to_unit_range(seen.pixel_values, image_mean, image_std))
        members.append(seen.members + offset)
        offset += seen.view.shape[0]
    mean_image = to_unit_range(auxiliary_mean.unsqueeze(0), image_mean, image_std)[0]
    return score_rows(torch.cat(reconstructions), torch.cat(originals), torch.cat(members), mean_image)
