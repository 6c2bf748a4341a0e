"""What the server learns, and what limits it: attacks and defences for split learning, one module each.

Threat model: the server is honest but curious. It runs the protocol faithfully and keeps what it sees (the payload
as its half receives it, the labels or soft labels, `head_gradients` in the U-shaped split), knows the public
checkpoint the client half started from and the bridge's settings, and holds auxiliary images of the same domain,
disjoint from the client's. Out of scope: an actively malicious server (FSHA), membership inference, and what the
final model itself reveals.

- attacks: `inversion` (a decoder trained on auxiliary data through the surrogate client and bridge, applied to
  what the server half received: `Observer` records it; `AlignedInversion` first matches each hidden unit's moments
  to the surrogate's), scored by `image_metrics` (SSIM, PSNR from torchmetrics, against the auxiliary mean image);
  `white_box_inversion` (a search for images whose surrogate output matches, with a total-variation prior;
  `strongest_inversion` keeps the strongest attack per method); `label_inference` (ADC's soft labels; head-gradient
  directions and norms, and the exact solve when heads are shared);
- defences: `payload_noise` (clipped Gaussian noise on the payload, a stage around any bridge), `label_dp`
  (randomized response drawn once per example), `nopeek` (a distance-correlation loss on the client, empirical);
  `accounting` (their epsilon with `dp-accounting`, and where it holds: `split_guarantee`).
"""

import importlib

from .payload_noise import PayloadNoiseBridge, PayloadNoiseConfig, clip_rows

# The attacks and the accountant load torchmetrics and dp-accounting: imported when first named, so that
# `import hf_adc` (every client and server process) does not pay for them.
_LAZY = {
    "accounting": ("Guarantee", "payload_noise_epsilon", "payload_noise_guarantee", "randomized_response_epsilon",
                   "randomized_response_noise_parameter", "releases_per_example", "split_guarantee"),
    "image_metrics": ("ReconstructionReport", "image_scores", "score_rows", "to_unit_range"),
    "inversion": ("AlignedInversion", "LearnedInversion", "TokenInverter", "hidden_moments", "score_inversion",
                  "simulable", "surrogate_views"),
    "label_dp": ("keep_probability", "randomize_labels", "with_randomized_labels"),
    "label_inference": ("cluster_guess", "direction_guess", "label_accuracy", "norm_guess", "norm_scores",
                        "shared_head_guess", "soft_label_guess"),
    "nopeek": ("NoPeek", "distance_correlation"),
    "observation": ("Observation", "Observer"),
    "white_box_inversion": ("WhiteBoxInversion", "strongest_inversion", "total_variation"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


__all__ = [
    "AlignedInversion",
    "Guarantee",
    "LearnedInversion",
    "NoPeek",
    "Observation",
    "Observer",
    "ReconstructionReport",
    "TokenInverter",
    "WhiteBoxInversion",
    "cluster_guess",
    "direction_guess",
    "distance_correlation",
    "hidden_moments",
    "image_scores",
    "label_accuracy",
    "norm_guess",
    "norm_scores",
    "shared_head_guess",
    "score_inversion",
    "score_rows",
    "simulable",
    "soft_label_guess",
    "split_guarantee",
    "strongest_inversion",
    "surrogate_views",
    "to_unit_range",
    "total_variation",
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
