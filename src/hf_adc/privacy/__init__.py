"""What the server learns, and what limits it: attacks and defences for split learning, one module each.

Threat model: the server is honest but curious. It runs the protocol faithfully and keeps what it sees (the payload
as its half receives it, the labels or soft labels, `head_gradients` in the U-shaped split), knows the public
checkpoint the client half started from and the bridge's settings, and holds auxiliary images of the same domain,
disjoint from the client's. Out of scope: an actively malicious server (FSHA), membership inference, and what the
final model itself reveals.

- attacks: `inversion` (a decoder trained on auxiliary data through the surrogate client and bridge, applied to
  what the server half received: `Observer` records it), scored by `image_metrics` (SSIM, PSNR from torchmetrics,
  against the auxiliary mean image); `label_inference` (ADC's soft labels, head-gradient directions);
- defences: `payload_noise` (clipped Gaussian noise on the payload, a stage around any bridge), `label_dp`
  (randomized response drawn once per example); `accounting` (their epsilon with `dp-accounting`, and where it holds).
"""

from .accounting import (
    Guarantee,
    payload_noise_epsilon,
    payload_noise_guarantee,
    randomized_response_epsilon,
    randomized_response_noise_parameter,
    releases_per_example,
)
from .image_metrics import ReconstructionReport, image_scores, score_rows, to_unit_range
from .inversion import LearnedInversion, TokenInverter, score_inversion, simulable, surrogate_views
from .label_dp import keep_probability, randomize_labels, with_randomized_labels
from .label_inference import cluster_guess, direction_guess, label_accuracy, soft_label_guess
from .observation import Observation, Observer
from .payload_noise import PayloadNoiseBridge, PayloadNoiseConfig, clip_rows

__all__ = [
    "Guarantee",
    "LearnedInversion",
    "Observation",
    "Observer",
    "ReconstructionReport",
    "TokenInverter",
    "cluster_guess",
    "direction_guess",
    "image_scores",
    "label_accuracy",
    "score_inversion",
    "score_rows",
    "simulable",
    "soft_label_guess",
    "surrogate_views",
    "to_unit_range",
    "PayloadNoiseBridge",
    "PayloadNoiseConfig",
    "clip_rows",
    "keep_probability",
    "payload_noise_epsilon",
    "payload_noise_guarantee",
    "randomize_labels",
    "randomized_response_epsilon",
    "randomized_response_noise_parameter",
    "releases_per_example",
    "with_randomized_labels",
]
