"""Label DP for the standard split: K-ary randomized response, drawn once per training example and cached.

The server of a standard split reads the labels (or ADC's soft labels, their cluster means). Randomized response
on the client replaces each training label once, before training: the label kept with probability
e^eps / (e^eps + K - 1), else one of the K - 1 others drawn uniformly. The noisy labels are drawn from the seed and
the example's index alone and kept for every epoch, so every later use is post-processing and eps holds for any number
of epochs (a mechanism that redraws every batch composes its epsilon over the epochs).
"""

import json
import math
import os
import secrets
import tempfile
from pathlib import Path

import torch

from .accounting import randomized_response_noise_parameter


def keep_probability(epsilon: float, num_classes: int) -> float:
    """The probability that randomized response at `epsilon` over `num_classes` classes keeps a label."""
    randomized_response_noise_parameter(epsilon, num_classes)  # checks the arguments
    return math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)


def randomize_labels(labels: torch.Tensor, num_classes: int, epsilon: float, seed: int | None = None) -> torch.Tensor:
    """The cached noisy labels of a training set: one draw per example (row of `labels`, integer class ids in
    0 .. num_classes - 1), the same for the same seed, each kept with `keep_probability(epsilon, num_classes)`.

    The seed must be secret from the server (anyone who knows it redraws every flip and undoes it): give
    `secret_seed(output_dir)` to draw the same labels again on resume; None draws a fresh secret from the OS."""
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(
            f"labels must be a 1-d tensor of class ids; got dtype {labels.dtype}, shape {tuple(labels.shape)}."
        )
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(f"label {bad} is out of range: labels must lie in [0, {num_classes}).")
    keep = keep_probability(epsilon, num_classes)
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    kept = torch.rand(labels.shape, generator=generator) < keep
    # One of the K - 1 other classes, uniformly: the label plus 1 .. K - 1, modulo K.
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    other = (labels.cpu() + shift) % num_classes
    return torch.where(kept, labels.cpu(), other).to(labels.device)


def with_randomized_labels(dataset, num_classes: int, epsilon: float, seed: int | None = None, column: str = "label"):
    """A `datasets.Dataset` whose `column` holds its labels randomized once (`randomize_labels`), for training."""
    noisy = randomize_labels(torch.as_tensor(dataset[column]), num_classes, epsilon, seed)
    return dataset.remove_columns(column).add_column(column, noisy.tolist(), feature=dataset.features[column])


SECRET_FILE = "label_dp_secret.json"


def secret_seed(folder: str | Path) -> int:
    """The seed of this client's randomized response: secret (never the run's `--seed`, which the server knows: with
    it the server would redraw every flip and undo it), drawn once from the OS and kept in `folder/SECRET_FILE` (the
    client's output folder, which never crosses), so that a resumed run, and every rank of a client, draws the same
    labels. Created exclusively: ranks that start together all read the one seed the first of them wrote."""
    path = Path(folder) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as file:
            json.dump({"seed": secrets.randbits(63)}, file)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(file.name, path)  # fails if another rank's seed is there already: then that one is read
        except FileExistsError:
            pass
        finally:
            os.unlink(file.name)
    return int(json.loads(path.read_text())["seed"])
