"""Accounting of the two mechanisms, with Google's `dp-accounting`: pure functions of the mechanism's parameters and
of how often each example was released, so that they test in isolation.

Payload noise (`PayloadNoiseConfig`). Under replace-one adjacency on the **images** (one training example's image
replaced by another; what else of the example crosses is not covered, see below), a clipped row moves by at most 2C
in L2, so one release is the Gaussian mechanism with sensitivity 2C and noise std sigma C, i.e. noise multiplier
sigma / 2 against sensitivity 1. An example is released once per step it is in;
the releases are composed per example (no amplification by subsampling is claimed: every epoch shows the server every
example, and the batches are neither Poisson-sampled nor secret). The epsilon holds only when:

- **each sent row is a function of one example, or of a group fixed without looking at the data**: the uncompressed
  split, Top-K and Random Top-K, quantization, BottleNet++ and their compositions (Top-K then quantization), C3-SL
  (a group's members are fixed by their place in the batch, so replacing one example moves one row), and ADC with
  one cluster per sample (token selection alone: its "clustering" is the identity). **Not for ADC's batch merging**:
  its clusters are chosen by k-means over the whole batch, so one example can move other rows; no bound is claimed;
- **the client computation before the noise does not train on the private data** (a frozen client half and a bridge
  without trained client modules). A client half fine-tuned with clean gradients of its data makes every later row
  depend on every example seen before, which the per-row argument does not cover; no epsilon is claimed then;
- **the noise is secret from the server**: a seed the server knows lets it regenerate the noise and subtract it. The
  compression settings, a `PayloadNoiseConfig`'s seed included, are exchanged when client and server meet, so only
  `seed=None` (the default, and the recipes' `--payload_noise`: each batch drawn from the operating system) gets an
  epsilon; an integer seed is for experiments in one process and gets none.

The epsilon covers the activations only, each release counted: in the standard split the labels cross in the clear
(use `label_dp` for them: with both, basic composition gives the example eps_payload + eps_label); in the U-shaped
split `head_gradients` and the head's gradient norms cross and are not covered; evaluation payloads are covered only
with `noise_in_eval=True` (and then each evaluated example is one release more), and a step sent again after a
resume is one release more for its examples.

Label DP (`label_dp`). K-ary randomized response keeps the true label with probability e^eps / (e^eps + K - 1),
else draws one of the K - 1 others uniformly. Drawn once per example and cached, every later use is post-processing,
so eps holds for any number of epochs. In `dp-accounting`'s terms this is `RandomizedResponseDpEvent` with noise
parameter q = K / (e^eps + K - 1) (the label is replaced by a uniform draw over all K with probability q).
"""

import math
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

from ..bridges import (
    ADCConfig,
    BottleNetConfig,
    BridgeConfig,
    C3SLConfig,
    ComposedConfig,
    QuantizationConfig,
    RandomTopKConfig,
    TopKConfig,
)
from .payload_noise import PayloadNoiseConfig

ACCOUNTANTS = ("pld", "rdp")


@dataclass(frozen=True)
class Guarantee:
    """Whether a payload-noise epsilon holds for a run, and why (or why not)."""

    holds: bool
    reason: str


def _rows_of_one_example(config: BridgeConfig | None) -> tuple[bool, str]:
    if config is None:
        return True, "each row is one example's activations"
    if isinstance(config, ComposedConfig):
        holds, reason = _rows_of_one_example(config.reducer)
        return holds, reason if not holds else f"{reason}, then coded value by value or token by token"
    if isinstance(config, ADCConfig):
        one_per_sample = config.batch_ratio == 1 if config.xi is None else config.split_exponent == 0
        if one_per_sample:
            return True, "ADC with one cluster per sample (token selection alone) sends one row per example"
        return False, (
            "ADC merges each batch into clusters chosen by k-means over every sample, so replacing one example can "
            "move other rows; no sensitivity bound is proven"
        )
    if isinstance(config, (TopKConfig, RandomTopKConfig, QuantizationConfig, BottleNetConfig)):
        return True, f"{config.method} codes each example's row on its own"
    if isinstance(config, C3SLConfig):
        return True, "C3-SL's groups are fixed by place in the batch, so replacing one example moves one row"
    return False, f"no argument is made for {config.method}"


def payload_noise_guarantee(config: PayloadNoiseConfig, client_trains: bool) -> Guarantee:
    """Whether `payload_noise_epsilon` may be claimed for a run with `config`; `client_trains` says whether the client
    half (or a trained client module of the bridge, BottleNet++'s encoder) is updated on the private data: give
    `split_guarantee(split)` the split instead, and it reads that from the split itself."""
    if not isinstance(config, PayloadNoiseConfig):
        raise TypeError(f"config={config!r} is not a PayloadNoiseConfig: without payload noise there is no epsilon.")
    if not isinstance(client_trains, bool):
        raise TypeError(f"client_trains={client_trains!r} must be True or False.")
    if config.noise_multiplier == 0:
        return Guarantee(False, "noise_multiplier=0: clipping alone gives no differential privacy")
    if config.seed is not None:
        return Guarantee(False, (
            f"seed={config.seed} is in the config, which the server receives: it can regenerate the noise; "
            "seed=None draws it from the OS"
        ))  # fmt: skip
    holds, reason = _rows_of_one_example(config.compression)
    if not holds:
        return Guarantee(False, reason)
    if client_trains:
        return Guarantee(False, (
            f"{reason}, but the client computation before the noise trains on the private data, so later rows of "
            "other examples depend on each example; freeze the client half for a guarantee"
        ))  # fmt: skip
    return Guarantee(True, (
        f"{reason}; replace-one on the image, sensitivity 2C, Gaussian noise std sigma*C, composed per example "
        "(labels, head gradients and evaluation payloads not covered)"
    ))  # fmt: skip


def split_guarantee(split) -> Guarantee:
    """`payload_noise_guarantee` for a one-process split (standard or U-shaped) as it stands: its bridge's config,
    and whether anything on the client before the noise trains (a client-half parameter, or one of the bridge's
    client modules, with `requires_grad`). A U-shaped split's head comes after the server and does not count here;
    what it sends (`head_gradients`, its norms) is not covered either way."""
    config = split.bridge.config
    if not isinstance(config, PayloadNoiseConfig):
        return Guarantee(False, "no payload noise")
    client_modules = [split.bridge.get_submodule(name) for name in split.bridge.client_modules]
    parameters = [*split.client.parameters(), *(p for module in client_modules for p in module.parameters())]
    return payload_noise_guarantee(config, any(parameter.requires_grad for parameter in parameters))


def gaussian_event(noise_multiplier: float, releases: int) -> dp_accounting.DpEvent:
    """The `dp-accounting` event of `releases` payload-noise releases of one example (sensitivity 2C, std sigma C)."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier={noise_multiplier} is out of range: it must be finite and > 0.")
    if isinstance(releases, bool) or not isinstance(releases, int) or releases < 1:
        raise ValueError(f"releases={releases!r} is out of range: it must be an integer >= 1.")
    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier / 2), releases)


def payload_noise_epsilon(noise_multiplier: float, releases: int, delta: float, accountant: str = "pld") -> float:
    """Epsilon at `delta` of `releases` releases of one example under payload noise of `noise_multiplier`, composed
    by `dp-accounting`'s PLD (tight) or RDP accountant. Check `payload_noise_guarantee` before claiming it."""
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} is out of range: it must lie in (0, 1).")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is unknown: choose one of {', '.join(ACCOUNTANTS)}.")
    event = gaussian_event(noise_multiplier, releases)
    rough = rdp.RdpAccountant().compose(event).get_epsilon(delta)
    if accountant == "rdp":
        return float(rough)
    # The PLD's grid scaled to the epsilon (RDP's bound, quick to get): a fixed 1e-4 takes minutes at sigma = 0.1,
    # and the pessimistic PLD stays an upper bound on any grid.
    tracker = pld.PLDAccountant(value_discretization_interval=max(1e-4, 1e-4 * rough))
    return float(tracker.compose(event).get_epsilon(delta))


def releases_per_example(steps: int, steps_per_epoch: int) -> int:
    """How often an example crossed in `steps` optimizer steps of `steps_per_epoch` each (every example once an epoch,
    the last epoch counted whole: an upper bound)."""
    counts = (steps, steps_per_epoch)
    if any(isinstance(count, bool) or not isinstance(count, int) or count < 1 for count in counts):
        raise ValueError(f"steps={steps!r} and steps_per_epoch={steps_per_epoch!r} must both be integers >= 1.")
    return math.ceil(steps / steps_per_epoch)


def randomized_response_noise_parameter(epsilon: float, num_classes: int) -> float:
    """`dp-accounting`'s noise parameter q (probability of replacing the label by a uniform draw over all K classes)
    of K-ary randomized response at `epsilon`: q = K / (e^eps + K - 1)."""
    if not (math.isfinite(epsilon) and 0 < epsilon <= 700):
        raise ValueError(f"epsilon={epsilon} is out of range: it must lie in (0, 700] (e^700 is a float's limit).")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} is out of range: it must be an integer >= 2.")
    return num_classes / (math.exp(epsilon) + num_classes - 1)


def randomized_response_epsilon(epsilon: float, num_classes: int) -> float:
    """The epsilon `dp-accounting`'s PLD accountant gives (delta = 0, replace-one) for labels drawn once by K-ary
    randomized response at `epsilon`: a check of the formula by the library."""
    tracker = pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    noise = randomized_response_noise_parameter(epsilon, num_classes)
    tracker.compose(dp_accounting.RandomizedResponseDpEvent(noise_parameter=noise, num_buckets=num_classes))
    return float(tracker.get_epsilon(0.0))
