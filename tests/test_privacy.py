"""hf_adc.privacy: the attacks recover what they should, the defences compose and are charged, the epsilons are the
library's."""

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_LABELS, tiny_vit_config
from dp_accounting.pld import privacy_loss_distribution
from transformers import ViTForImageClassification

import hf_adc
from hf_adc.bridges import ComposedConfig, config_for_ratio, config_from_dict
from hf_adc.data import partition_indices
from hf_adc.privacy import (
    AlignedInversion,
    LearnedInversion,
    NoPeek,
    Observer,
    PayloadNoiseConfig,
    WhiteBoxInversion,
    cluster_guess,
    direction_guess,
    distance_correlation,
    keep_probability,
    label_accuracy,
    norm_guess,
    norm_scores,
    payload_noise_epsilon,
    payload_noise_guarantee,
    randomize_labels,
    randomized_response_epsilon,
    releases_per_example,
    score_inversion,
    shared_head_guess,
    soft_label_guess,
    split_guarantee,
    strongest_inversion,
    surrogate_views,
)

MEAN, STD = [0.5] * 3, [0.5] * 3  # the normalisation of the digits below


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits at 16 px, grey in 3 channels, normalised to [-1, 1]; classes 0 .. 4 (digit mod 5)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = F.interpolate(torch.tensor(data.images, dtype=torch.float32)[:, None] / 16, size=16, mode="bilinear")
    pixel_values = (images.clamp(0, 1).expand(-1, 3, -1, -1) - 0.5) / 0.5
    return pixel_values.contiguous(), torch.tensor(data.target) % NUM_LABELS


@pytest.fixture(scope="module")
def public_vit() -> ViTForImageClassification:
    """The public checkpoint both the client (fine-tuning) and the server (its surrogate) start from."""
    torch.manual_seed(0)
    return ViTForImageClassification(tiny_vit_config())


def fine_tune(public, compression, pixel_values, labels, steps=6, batch_size=16, learning_rate=1e-4, **split_kwargs):
    """The client's run: a split of a copy of `public`, trained `steps` steps (AdamW) while an Observer records."""
    model = ViTForImageClassification(public.config)
    model.load_state_dict(public.state_dict())
    split = hf_adc.split_vit(model, 2, compression=compression, **split_kwargs).train()
    optimizer = torch.optim.AdamW(split.parameters(), lr=learning_rate)
    with Observer(split, max_steps=steps) as seen:
        for step in range(steps):
            rows = slice(step * batch_size, (step + 1) * batch_size)
            split(pixel_values[rows], labels=labels[rows]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return split, seen.observations


def test_learned_inversion_recovers_an_uncompressed_split_well_above_the_mean_image(digits, public_vit):
    pixel_values, labels = digits
    auxiliary, victims = slice(0, 1200), slice(1200, 1296)  # disjoint
    _, observations = fine_tune(public_vit, None, pixel_values[victims], labels[victims])
    surrogate = hf_adc.split_vit(public_vit, 2).client
    views, images = surrogate_views(surrogate, None, pixel_values[auxiliary], labels[auxiliary], NUM_LABELS, 16)
    attack = LearnedInversion.for_client(surrogate, seed=0)
    attack.fit(views, images, steps=300)
    report = score_inversion(attack, observations, MEAN, STD, pixel_values[auxiliary].mean(0)).summary()
    assert report["images"] == 96
    assert report["ssim_mean"] > report["baseline_ssim_mean"] + 0.2, report
    assert report["psnr_mean"] > report["baseline_psnr_mean"] + 4, report
    # The score comes from the image each row stands for: the same reconstructions against other images score low.
    shuffled = [type(seen)(**{**seen.__dict__, "view": seen.view.roll(1, 0)}) for seen in observations]
    control = score_inversion(attack, shuffled, MEAN, STD, pixel_values[auxiliary].mean(0)).summary()
    assert control["ssim_mean"] < report["ssim_mean"] - 0.2, (control, report)

    # A view in another scale (what BottleNet++'s decoder hands the server half): the plain decoder is lost, the
    # aligned one moves each hidden unit back to the surrogate's mean and spread and recovers the images.
    gain, shift = torch.linspace(0.2, 8.0, views.shape[-1]), torch.linspace(-20.0, 20.0, views.shape[-1]).flip(0)
    moved = [type(seen)(**{**seen.__dict__, "view": seen.view * gain + shift}) for seen in observations]
    lost = score_inversion(attack, moved, MEAN, STD, pixel_values[auxiliary].mean(0)).summary()
    aligned = AlignedInversion(attack, [seen.view for seen in moved])
    found = score_inversion(aligned, moved, MEAN, STD, pixel_values[auxiliary].mean(0)).summary()
    assert lost["ssim_mean"] < report["ssim_mean"] - 0.2, (lost, report)
    assert found["ssim_mean"] > max(report["baseline_ssim_mean"], lost["ssim_mean"]) + 0.2, (found, lost, report)
    with pytest.raises(ValueError, match="has not been fitted"):
        AlignedInversion(LearnedInversion.for_client(surrogate), views)


def test_white_box_inversion_recovers_an_uncompressed_split_and_the_stronger_attack_is_reported(digits, public_vit):
    pixel_values, labels = digits
    auxiliary_mean = pixel_values[:1200].mean(0)
    _, observations = fine_tune(public_vit, None, pixel_values[1200:], labels[1200:], steps=2)
    surrogate = hf_adc.split_vit(public_vit, 2).client
    attack = WhiteBoxInversion(surrogate, auxiliary_mean, (-1.0, 1.0), steps=200)
    report = score_inversion(attack, observations, MEAN, STD, auxiliary_mean).summary()
    assert report["ssim_mean"] > report["baseline_ssim_mean"] + 0.3, report
    assert report["psnr_mean"] > report["baseline_psnr_mean"] + 6, report
    assert all(parameter.requires_grad for parameter in surrogate.parameters())  # the surrogate is left as it was
    # The score comes from the image each row stands for: the same reconstructions against other images score low.
    shuffled = [type(seen)(**{**seen.__dict__, "view": seen.view.roll(1, 0)}) for seen in observations]
    control = score_inversion(attack, shuffled, MEAN, STD, auxiliary_mean).summary()
    assert control["ssim_mean"] < report["ssim_mean"] - 0.3, (control, report)

    views, images = surrogate_views(surrogate, None, pixel_values[:256], labels[:256], NUM_LABELS, 16)
    learned = LearnedInversion.for_client(surrogate, width=32, layers=1)
    learned.fit(views, images, steps=20)  # barely trained: the white box must win
    strongest, reports = strongest_inversion({"learned": learned, "white_box": attack}, observations, MEAN, STD,
                                             auxiliary_mean)  # fmt: skip
    assert strongest == "white_box" and set(reports) == {"learned", "white_box"}
    assert reports["white_box"].summary() == pytest.approx(report)
    assert reports["learned"].summary()["ssim_mean"] < report["ssim_mean"]
    with pytest.raises(ValueError, match="pixel_range=.* is out of range"):
        WhiteBoxInversion(surrogate, auxiliary_mean, (1.0, -1.0))


def test_nopeek_lowers_what_a_learned_inversion_recovers_even_with_the_trained_client_half(digits, public_vit):
    pixel_values, labels = digits
    auxiliary, victims = slice(0, 1200), torch.arange(1200, 1488)  # disjoint

    def attacked(weight):
        """SSIM of a learned inversion that holds the trained client half (a federation's server does) on the
        last two steps of a run of 20 (batch 32, AdamW 5e-4), with NoPeek at `weight` or without (None)."""
        model = ViTForImageClassification(public_vit.config)
        model.load_state_dict(public_vit.state_dict())
        split = hf_adc.split_vit(model, 2).train()
        optimizer = torch.optim.AdamW(split.parameters(), lr=5e-4)
        nopeek = NoPeek(split, weight) if weight else None
        with Observer(split, max_steps=2) as seen, nopeek or contextlib.nullcontext():
            for step in range(20):
                rows = victims[(step * 32) % 288 :][:32]
                split(pixel_values[rows], labels=labels[rows]).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        views, images = surrogate_views(split.client, None, pixel_values[auxiliary], labels[auxiliary], NUM_LABELS, 16)
        attack = LearnedInversion.for_client(split.client, seed=0)
        attack.fit(views, images, steps=300)
        report = score_inversion(attack, seen.observations, MEAN, STD, pixel_values[auxiliary].mean(0)).summary()
        return report, nopeek

    plain, _ = attacked(None)
    defended, nopeek = attacked(10.0)
    assert plain["ssim_mean"] > plain["baseline_ssim_mean"] + 0.15, plain  # the attack works without the defence
    assert defended["ssim_mean"] < plain["ssim_mean"] - 0.1, (defended, plain)
    assert len(nopeek.penalties) == 20 and nopeek.penalties[-1] < nopeek.penalties[0] - 0.05


def test_distance_correlation_is_one_for_a_similarity_small_for_independence_and_nopeek_refuses_bad_weights():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=generator)
    assert distance_correlation(x, 2 * x.flatten(1) + 1).item() == pytest.approx(1.0, abs=1e-4)
    low = torch.randn(256, 4, generator=generator)  # few dimensions, many samples: the estimator's bias is small
    assert distance_correlation(low, torch.randn(256, 4, generator=generator)).item() < 0.3
    with pytest.raises(ValueError, match="weight=0 is out of range"):
        NoPeek(torch.nn.Module(), 0)
    with pytest.raises(ValueError, match="must hold the same number of samples"):
        distance_correlation(x, x[:3])


def _noisy(config):
    return PayloadNoiseConfig(config, clip_norm=20.0, noise_multiplier=0.05)


EVERY_BRIDGE = {
    "adc": lambda: config_for_ratio("adc", 0.25, 17, 32, 16),
    "topk": lambda: config_for_ratio("topk", 0.25, 17, 32, 16),
    "quantize": lambda: config_for_ratio("quantize", 0.25, 17, 32, 16),
    "bottlenet": lambda: config_for_ratio("bottlenet", 0.25, 17, 32, 16),
    "c3sl": lambda: config_for_ratio("c3sl", 0.25, 17, 32, 16),
    "adc+quantize8": lambda: config_for_ratio("adc+quantize8", 0.1, 17, 32, 16),
    "noise(adc)": lambda: _noisy(config_for_ratio("adc", 0.25, 17, 32, 16)),
    "noise(none)": lambda: _noisy(None),
}


@pytest.mark.parametrize("method", list(EVERY_BRIDGE))
def test_learned_inversion_reads_every_bridges_payload_and_scores_merged_rows_per_member(digits, public_vit, method):
    pixel_values, labels = digits
    compression = EVERY_BRIDGE[method]()
    _, observations = fine_tune(public_vit, compression, pixel_values[1200:], labels[1200:], steps=2)
    surrogate = hf_adc.split_vit(public_vit, 2).client
    views, images = surrogate_views(surrogate, compression, pixel_values[:64], labels[:64], NUM_LABELS, 16)
    assert views.shape[1:] == observations[0].view.shape[1:] and views.shape[0] == images.shape[0]
    attack = LearnedInversion.for_client(surrogate, width=32, layers=1)
    attack.fit(views, images, steps=3)
    report = score_inversion(attack, observations, MEAN, STD, pixel_values[:64].mean(0))
    merges = "adc" in method
    assert report.ssim_images.numel() == 32 and (report.ssim_best.numel() < 32) == merges
    assert bool((report.ssim_best.mean() >= report.ssim_images.mean() - 1e-6) and report.psnr_images.isfinite().all())
    if method == "bottlenet":  # a federation's server holds the trained bridge, encoder included: its views match
        split = fine_tune(public_vit, compression, pixel_values[1200:], labels[1200:], steps=2)[0].eval()
        held, _ = surrogate_views(split.client, compression, pixel_values[1200:1232], labels[1200:1232], NUM_LABELS,
                                  16, bridge=split.bridge)  # fmt: skip
        assert not split.bridge.training  # a copy ran in training mode; the split's own bridge is left as it was
        first = 1200 + torch.randperm(32, generator=torch.Generator().manual_seed(0))[:16]  # its first batch
        bridge = copy.deepcopy(split.bridge).train()
        with torch.no_grad():
            sent = bridge.encode(split.client(pixel_values[first]).last_hidden_state, labels[first])
            decoded = bridge.decode(bridge.unpack(*bridge.pack(sent.hidden_states)))
        torch.testing.assert_close(held[:16], decoded.float())  # what the server half received, exactly


def test_adc_soft_labels_and_ushaped_head_gradients_reveal_the_class(digits, public_vit):
    pixel_values, labels = digits
    adc = config_for_ratio("adc", 0.25, 17, 32, 16)
    _, standard = fine_tune(public_vit, adc, pixel_values, labels, steps=8)
    guesses = torch.cat([soft_label_guess(seen.targets, seen.members) for seen in standard])
    truth = torch.cat([seen.labels for seen in standard])
    soft = label_accuracy(guesses, truth)
    assert soft["accuracy"] > soft["majority_baseline"] + 0.2, soft

    _, ushaped = fine_tune(public_vit, None, pixel_values, labels, steps=8, label_privacy=True)
    gradients = torch.cat([seen.head_gradients for seen in ushaped])
    truth = torch.cat([seen.labels for seen in ushaped])
    known = torch.cat([torch.nonzero(truth == label)[:2, 0] for label in range(NUM_LABELS)])  # two known per class
    unknown = torch.ones(len(truth), dtype=torch.bool).index_fill_(0, known, False)
    for guess in (direction_guess, cluster_guess):
        result = label_accuracy(guess(gradients, known, truth[known], NUM_LABELS)[unknown], truth[unknown])
        assert result["accuracy"] > result["majority_baseline"] + 0.3, (guess.__name__, result)


def test_ushaped_gradient_norms_reveal_the_rare_class_of_a_binary_task(digits):
    from sklearn.metrics import roc_auc_score

    pixel_values, digit_classes = digits
    labels = (digit_classes == 0).long()  # digits 0 and 5: about one in five
    torch.manual_seed(0)
    public = ViTForImageClassification(tiny_vit_config(num_labels=2))
    _, seen = fine_tune(public, None, pixel_values, labels, steps=12, batch_size=32, learning_rate=1e-3,
                        label_privacy=True)  # fmt: skip
    seen = seen[4:]  # once the model has learned that one class is rare
    gradients, truth = torch.cat([step.head_gradients for step in seen]), torch.cat([step.labels for step in seen])
    known = torch.cat([torch.nonzero(truth == label)[:3, 0] for label in range(2)])  # three known per class
    unknown = torch.ones(len(truth), dtype=torch.bool).index_fill_(0, known, False)
    result = label_accuracy(norm_guess(gradients, known, truth[known], 2)[unknown], truth[unknown])
    assert result["majority_baseline"] < 0.85 and result["accuracy"] > result["majority_baseline"] + 0.1, result
    assert roc_auc_score(truth.numpy(), norm_scores(gradients).numpy()) > 0.9
    with pytest.raises(ValueError, match="known_labels must lie in 0 .. 1"):
        norm_guess(gradients, known, truth[known] + 1, 2)


def test_shared_head_solves_ushaped_labels_exactly_from_head_gradients(digits, public_vit):
    pixel_values, labels = digits
    # The server's copy of the shared head: the weights of the last synchronisation (here the start), while the
    # client trains its own copy on.
    server_head = hf_adc.split_vit(copy.deepcopy(public_vit), 2, label_privacy=True).head
    _, seen = fine_tune(public_vit, None, pixel_values, labels, steps=6, label_privacy=True)
    truth = torch.cat([step.labels for step in seen])
    guesses = torch.cat([shared_head_guess(server_head, step.head_activations, step.head_gradients) for step in seen])
    result = label_accuracy(guesses, truth)
    assert result["accuracy"] > 0.95 > result["majority_baseline"] + 0.5, result
    torch.manual_seed(1)
    other_head = hf_adc.split_vit(ViTForImageClassification(tiny_vit_config()), 2, label_privacy=True).head
    wrong = torch.cat([shared_head_guess(other_head, step.head_activations, step.head_gradients) for step in seen])
    assert label_accuracy(wrong, truth)["accuracy"] < result["accuracy"] - 0.3  # the weights are what solves it
    with pytest.raises(ValueError, match="must have one shape"):
        shared_head_guess(server_head, seen[0].head_activations, seen[0].head_gradients[:1])


def test_payload_noise_epsilon_is_the_gaussian_mechanism_of_sensitivity_2c_composed_per_example():
    sigma, clip, releases, delta = 1.5, 3.0, 5, 1e-5
    direct = privacy_loss_distribution.from_gaussian_mechanism(standard_deviation=sigma * clip, sensitivity=2 * clip)
    expected = direct.self_compose(releases).get_epsilon_for_delta(delta)
    assert payload_noise_epsilon(sigma, releases, delta) == pytest.approx(expected, rel=1e-2)
    assert payload_noise_epsilon(sigma, releases, delta, accountant="rdp") >= expected * 0.99  # RDP is looser
    assert payload_noise_epsilon(sigma, 2 * releases, delta) > payload_noise_epsilon(sigma, releases, delta)
    with pytest.raises(ValueError, match="delta=0 is out of range"):
        payload_noise_epsilon(sigma, releases, 0)
    with pytest.raises(ValueError, match="releases=0 is out of range"):
        payload_noise_epsilon(sigma, 0, delta)


def test_payload_noise_guarantee_is_claimed_only_for_rows_of_one_example_and_a_frozen_client():
    def holds(config, client_trains=False):
        return payload_noise_guarantee(PayloadNoiseConfig(config), client_trains).holds

    assert holds(None) and holds(hf_adc.TopKConfig(rate=0.1)) and holds(hf_adc.QuantizationConfig(bits=8))
    assert holds(hf_adc.C3SLConfig(R=2)) and holds(config_for_ratio("adc_tokens", 0.25, 17, 32, 16))
    assert not holds(hf_adc.ADCConfig(xi=0.25)) and not holds(config_for_ratio("adc+quantize8", 0.1, 17, 32, 16))
    assert "k-means" in payload_noise_guarantee(PayloadNoiseConfig(hf_adc.ADCConfig(xi=0.25)), False).reason
    assert not holds(None, client_trains=True)
    assert not payload_noise_guarantee(PayloadNoiseConfig(None, noise_multiplier=0.0), False).holds
    seeded = payload_noise_guarantee(PayloadNoiseConfig(None, seed=4), False)  # the server gets the config
    assert not seeded.holds and "seed=4 is in the config" in seeded.reason
    with pytest.raises(TypeError, match="client_trains=None must be True or False"):
        payload_noise_guarantee(PayloadNoiseConfig(None), None)
    # From a split itself: frozen or not, BottleNet++'s encoder (a client module) trained or not; the U-shaped head
    # comes after the server and does not count.
    torch.manual_seed(0)
    public = ViTForImageClassification(tiny_vit_config())
    cases = ((None, False), (hf_adc.TopKConfig(rate=0.1), True), (hf_adc.BottleNetConfig(), False))
    for compression, label_privacy in cases:
        split = hf_adc.split_vit(copy.deepcopy(public), 2, compression=PayloadNoiseConfig(compression),
                                 label_privacy=label_privacy)  # fmt: skip
        assert not split_guarantee(split).holds
        split.client.requires_grad_(False)
        assert split_guarantee(split).holds == (compression is None or label_privacy), compression
        if split.bridge.client_modules:
            split.bridge.requires_grad_(False)
            assert split_guarantee(split).holds
    assert split_guarantee(hf_adc.split_vit(copy.deepcopy(public), 2)).reason == "no payload noise"


def test_payload_noise_adds_sigma_c_to_rows_clipped_to_c_in_float32():
    bridge = hf_adc.bridges.build_bridge(PayloadNoiseConfig(None, clip_norm=3.0, noise_multiplier=0.5), 17, 32,
                                         NUM_LABELS)  # fmt: skip
    rows = torch.randn(64, 17, 32) * 10  # norms near 233: every row clipped to 3
    noisy = bridge.noise(rows)
    clipped = rows * (3.0 / rows.flatten(1).norm(dim=1)).view(-1, 1, 1)
    assert (noisy - clipped).std().item() == pytest.approx(1.5, rel=0.02)  # sigma C
    assert (noisy - clipped).mean().abs().item() < 0.02
    assert not torch.equal(bridge.noise(rows), noisy)  # secret: fresh every batch
    half = bridge.noise(rows.bfloat16())
    assert half.dtype == torch.bfloat16 and (half.float() - clipped).std().item() == pytest.approx(1.5, rel=0.02)
    quiet = hf_adc.bridges.build_bridge(PayloadNoiseConfig(None, clip_norm=3.0, noise_multiplier=0.0), 17, 32,
                                        NUM_LABELS).noise(rows.bfloat16())  # fmt: skip
    assert quiet.float().flatten(1).norm(dim=1).max().item() <= 3.0 * (1 + 2**-7)  # one bf16 rounding at most
    assert releases_per_example(17, 15) == 2 and releases_per_example(15, 15) == 1
    with pytest.raises(ValueError, match="must both be integers >= 1"):
        releases_per_example(2.5, 1)


NOISY_BRIDGES = [
    None,
    hf_adc.ADCConfig(xi=0.25),
    hf_adc.TopKConfig(rate=0.2),
    hf_adc.RandomTopKConfig(rate=0.2),
    hf_adc.BottleNetConfig(ratio=0.25),
    hf_adc.C3SLConfig(R=2),
    hf_adc.QuantizationConfig(bits=8),
    ComposedConfig(hf_adc.ADCConfig(xi=0.4), hf_adc.QuantizationConfig(bits=8)),
    ComposedConfig(hf_adc.TopKConfig(rate=0.2), hf_adc.QuantizationConfig(bits=8)),
]


@pytest.mark.parametrize("inner", NOISY_BRIDGES, ids=lambda config: "none" if config is None else config.method)
def test_payload_noise_composes_with_every_bridge_and_is_charged_as_sent(tiny_vit_path, batch, inner):
    pixel_values, labels = batch

    def one_step(compression):
        torch.manual_seed(0)
        split = hf_adc.split_vit(tiny_vit_path, 2, compression=compression).train()
        with Observer(split) as seen:
            split(pixel_values, labels=labels).loss.backward()
        return split, seen.observations[0].view

    noisy_config = PayloadNoiseConfig(inner, clip_norm=2.0, noise_multiplier=0.5, seed=3)
    plain, clean_view = one_step(inner)
    noisy, noisy_view = one_step(noisy_config)
    assert noisy.ledger.state_dict() == plain.ledger.state_dict()
    planned = noisy.wire_bytes(len(labels))
    assert planned == (noisy.ledger.uplink_bytes, noisy.ledger.downlink_bytes)
    assert noisy_view.shape == clean_view.shape and not torch.allclose(noisy_view, clean_view)
    assert torch.equal(one_step(noisy_config)[1], noisy_view)  # the seed fixes the noise
    assert config_from_dict(noisy_config.to_dict()) == noisy_config
    if inner is None or isinstance(inner, hf_adc.ADCConfig):  # the server sees the clipped rows themselves
        clipped = one_step(PayloadNoiseConfig(inner, clip_norm=2.0, noise_multiplier=0.0))[1]
        assert clipped.flatten(1).norm(dim=1).max() <= 2.0 + 1e-4


def test_payload_noise_saves_loads_and_refuses_bad_settings(tiny_vit_path, tmp_path, batch):
    config = PayloadNoiseConfig(hf_adc.ADCConfig(xi=0.25), clip_norm=2.0, noise_multiplier=0.5)
    split = hf_adc.split_vit(tiny_vit_path, 2, compression=config)
    split.save_pretrained(tmp_path)
    loaded = hf_adc.SplitViTForImageClassification.from_pretrained(tmp_path)
    assert loaded.bridge.config == config and loaded.bridge.inner.config == config.compression
    loaded.eval()
    assert torch.allclose(loaded(batch[0]).logits, split.eval()(batch[0]).logits)  # evaluation is not noised
    with pytest.raises(ValueError, match="clip_norm=0 is out of range"):
        PayloadNoiseConfig(clip_norm=0)
    with pytest.raises(ValueError, match="noise_multiplier=-1 is out of range"):
        PayloadNoiseConfig(noise_multiplier=-1)


def test_randomized_response_flips_at_its_stated_rate_always_the_same_way_for_an_example():
    num_classes, epsilon = 10, 1.0
    labels = torch.arange(40_000) % num_classes
    noisy = randomize_labels(labels, num_classes, epsilon, seed=7)
    keep = math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)
    assert keep_probability(epsilon, num_classes) == pytest.approx(keep)
    assert (noisy == labels).float().mean().item() == pytest.approx(keep, abs=0.01)
    flipped = noisy[noisy != labels] - labels[noisy != labels]
    shares = torch.bincount(flipped % num_classes, minlength=num_classes)[1:].float() / flipped.numel()
    assert torch.allclose(shares, torch.full_like(shares, 1 / (num_classes - 1)), atol=0.01)  # the others, uniformly
    assert torch.equal(randomize_labels(labels, num_classes, epsilon, seed=7), noisy)  # drawn once: same every epoch
    assert not torch.equal(randomize_labels(labels, num_classes, epsilon, seed=8), noisy)
    assert randomized_response_epsilon(epsilon, num_classes) == pytest.approx(epsilon, abs=1e-3)  # dp-accounting
    with pytest.raises(ValueError, match="label 10 is out of range"):
        randomize_labels(torch.tensor([0, 10]), num_classes, epsilon)
    with pytest.raises(ValueError, match="epsilon=0 is out of range"):
        randomize_labels(labels, num_classes, 0)


def test_privacy_benchmark_quick_run_writes_records_and_resumes(tiny_vit_path, digits_dir, tmp_path):
    import sys

    from helpers import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import privacy as benchmark
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    args = ["--preset", "tiny", "--model_name_or_path", tiny_vit_path, "--dataset_name", digits_dir,
            "--output-dir", str(tmp_path), "--freeze_client"]  # fmt: skip
    records = benchmark.main(args)
    assert [(record["method"], record["noise_multiplier"]) for record in records] == [("none", 0.1), ("adc", 0.1)]
    for record in records:
        assert 0 <= record["test_accuracy"] <= 1 and record["bytes"] > 0 and record["images"] == 32
        assert record["ssim_mean"] is not None and record["label_attack_accuracy"] is not None
    plain, adc = records
    releases = math.ceil(plain["steps"] / (96 // 16)) + 1  # every epoch counted whole, and the pictures' batch
    assert plain["epsilon"] == pytest.approx(payload_noise_epsilon(0.1, releases, 1e-5))  # one example's rows, frozen
    assert plain["delta"] == 1e-5
    assert adc["epsilon"] is None and "k-means" in adc["epsilon_reason"]
    assert plain["label_attack_accuracy"] == 1.0  # class ids cross the standard split
    assert adc["bytes"] < plain["bytes"]
    for record in records:  # three attacks on the same steps, the strongest reported
        assert set(record["attacks"]) == {"learned", "learned_aligned", "white_box"}
        assert record["ssim_mean"] == max(attack["ssim_mean"] for attack in record["attacks"].values())
        assert record["ssim_mean"] == record["attacks"][record["attack"]]["ssim_mean"]
    assert benchmark.main(args) == records  # resumed: nothing left to run
    assert len((tmp_path / "privacy.jsonl").read_text().splitlines()) == 2
    # NoPeek and label DP are cells of their own; the label attack is scored against the true labels.
    defended = benchmark.main([*args[:-1], "--methods", "none", "--nopeek_weights", "0.5", "--label_dp_epsilon", "0.5"])
    assert len(defended) == 3 and defended[:2] == records and records[0]["label_attack"] == "soft_label"
    assert defended[2]["nopeek_weight"] == 0.5 and defended[2]["label_dp_epsilon"] == 0.5
    assert defended[2]["label_epsilon"] == pytest.approx(0.5, abs=1e-3)
    assert defended[2]["label_attack_accuracy"] < 1.0  # randomized labels crossed: K = 5, kept with p = 0.29
    with pytest.raises(SystemExit):
        benchmark.main([*args, "--label_privacy", "--label_dp_epsilon", "1"])
    # U-shaped: three attacks on head_gradients, the strongest reported, scored without the known labels.
    # (Its attacks run through the trained client half, as a federation's server could.)
    # (And on data settings of its own: a batch of 8, so the 2 recorded steps hold 16 images.)
    ushaped = benchmark.main([*args[:-1], "--methods", "adc", "--noise_multipliers", "0", "--label_privacy",
                              "--surrogate", "trained", "--batch_size", "8", "--classes", "all"])[-1]  # fmt: skip
    assert ushaped["surrogate"] == "trained" and records[0]["surrogate"] == "public" and ushaped["images"] == 16
    for bad in (["--train_rows", "0"], ["--auxiliary_rows", "4", "--batch_size", "8"]):
        with pytest.raises(SystemExit):
            benchmark.main([*args, *bad])
    assert ushaped["topology"] == "u-shaped" and set(ushaped["label_attacks"]) == {"direction", "cluster", "norm"}
    assert ushaped["label_attack_accuracy"] == ushaped["label_attacks"][ushaped["label_attack"]]
    assert ushaped["label_attack_accuracy"] == max(ushaped["label_attacks"].values())
    records = defended + [ushaped]
    for record in records:  # the first 8 images of one batch, beside what the attack made of them
        shown = np.load(tmp_path / record["reconstructions"])
        assert shown["originals"].dtype == np.uint8 and shown["originals"].shape == shown["reconstructions"].shape
        assert shown["originals"].shape[0] == 8
    pictures = [tmp_path / "privacy_frontier.png", tmp_path / "reconstructions.png", tmp_path / "privacy_table.md"]
    for picture in pictures:
        picture.unlink()
    assert benchmark.main(["--plot-only", "--output-dir", str(tmp_path)]) == records  # redrawn, nothing trained
    assert all(picture.stat().st_size > 0 for picture in pictures)


def test_recipe_flags_wrap_the_compression_in_secret_payload_noise_and_refuse_bad_settings():
    from hf_adc.experiment import SplitArguments

    config = SplitArguments(compression="adc", xi=0.25, payload_noise=0.5, payload_clip_norm=2.0).compression_config(3)
    assert config == PayloadNoiseConfig(hf_adc.ADCConfig(xi=0.25, seed=3), clip_norm=2.0, noise_multiplier=0.5,
                                        seed=None)  # fmt: skip
    plain = SplitArguments(compression="none", payload_noise=0.0, payload_clip_norm=1.0, payload_noise_in_eval=True)
    assert plain.compression_config() == PayloadNoiseConfig(None, 1.0, 0.0, noise_in_eval=True, seed=None)
    assert SplitArguments(compression="topk", rate=0.2).compression_config() == hf_adc.TopKConfig(rate=0.2)
    bad = {
        "payload_noise=-1.0 is out of range": dict(payload_noise=-1.0, payload_clip_norm=1.0),
        "payload_noise=nan is out of range": dict(payload_noise=math.nan, payload_clip_norm=1.0),
        "payload_clip_norm=0.0 is out of range": dict(payload_noise=1.0, payload_clip_norm=0.0),
        "--payload_clip_norm is missing": dict(payload_noise=1.0),
        "--payload_noise is missing": dict(payload_clip_norm=1.0),
        "--payload_noise_in_eval needs": dict(payload_noise_in_eval=True),
    }
    for message, flags in bad.items():
        with pytest.raises(ValueError, match=message):
            SplitArguments(compression="adc", **flags).compression_config()
    # The seed is secret: two batches, or two bridges of one config, never draw the same noise.
    bridge = hf_adc.bridges.build_bridge(config, 17, 32, NUM_LABELS)
    rows = torch.zeros(4, 17, 32)
    assert not torch.equal(bridge.noise(rows), bridge.noise(rows))


def test_a_server_without_payload_noise_refuses_a_client_with_it(tiny_vit_path):
    from helpers import client_hello, model_args

    from hf_adc.distributed.settings import differing_settings

    labels = [str(label) for label in range(NUM_LABELS)]
    plain, _ = client_hello(model_args(tiny_vit_path, "--compression", "adc", "--xi", "0.25"), labels)
    noisy_flags = ["--compression", "adc", "--xi", "0.25", "--payload_noise", "0.5", "--payload_clip_norm", "2"]
    noisy, _ = client_hello(model_args(tiny_vit_path, *noisy_flags), labels)
    assert noisy["compression"]["method"] == "payload_noise" and noisy["compression"]["seed"] is None
    differences = differing_settings(noisy, plain)
    assert len(differences) == 1 and differences[0].startswith("compression: client {'method': 'payload_noise'")
    assert differing_settings(noisy, client_hello(model_args(tiny_vit_path, *noisy_flags), labels)[0]) == []
    louder, _ = client_hello(model_args(tiny_vit_path, *noisy_flags[:-1], "4"), labels)
    assert differing_settings(noisy, louder)  # a different clip norm is refused too


def test_nopeek_flag_is_the_clients_alone_and_checked(tiny_vit_path, tmp_path):
    from helpers import client_hello, model_args

    from hf_adc.distributed.arguments import RemoteArguments
    from hf_adc.distributed.launch import run_server
    from hf_adc.distributed.settings import differing_settings
    from hf_adc.experiment import ModelArguments, SplitArguments

    labels = [str(label) for label in range(NUM_LABELS)]
    plain, _ = client_hello(model_args(tiny_vit_path, "--compression", "adc"), labels)
    defended, _ = client_hello(model_args(tiny_vit_path, "--compression", "adc", "--nopeek_weight", "0.5"), labels)
    assert differing_settings(defended, plain) == []  # nothing of it crosses: any server serves it
    for weight in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=f"nopeek_weight={weight} is out of range"):
            SplitArguments(nopeek_weight=weight)
    training_args = hf_adc.ADCTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="--nopeek_weight 0.5 on the server"):
        run_server(ModelArguments(model_name_or_path=tiny_vit_path), SplitArguments(nopeek_weight=0.5),
                   training_args, RemoteArguments(listen="127.0.0.1:1"))  # fmt: skip


def test_label_dp_flag_randomizes_the_training_labels_once_at_its_rate_and_leaves_the_test_labels(digits_dir,
                                                                                                tmp_path):  # fmt: skip
    from hf_adc.experiment import DataArguments, load_data
    from hf_adc.privacy.label_dp import SECRET_FILE, secret_seed

    # The seed is the client's secret, kept in its output folder: the same on resume, never the run's --seed.
    secret = secret_seed(tmp_path / "run")
    assert secret_seed(tmp_path / "run") == secret and (tmp_path / "run" / SECRET_FILE).exists()
    assert secret_seed(tmp_path / "other") != secret
    private_args = DataArguments(dataset_name=digits_dir, label_dp_epsilon=1.0)
    with pytest.raises(ValueError, match="needs a secret label_dp_seed"):
        load_data(private_args, seed=5)
    plain = load_data(DataArguments(dataset_name=digits_dir), seed=5)
    private = load_data(private_args, seed=5, label_dp_seed=secret)
    train, noisy = torch.tensor(plain["train"]["label"]), torch.tensor(private["train"]["label"])
    assert (noisy == train).float().mean().item() == pytest.approx(keep_probability(1.0, 10), abs=0.04)
    assert private["test"]["label"] == plain["test"]["label"]
    assert private["train"].features["label"] == plain["train"].features["label"]
    again = load_data(private_args, seed=5, label_dp_seed=secret)
    assert again["train"]["label"] == private["train"]["label"]  # the same secret, the same draw (a resumed run)
    other = load_data(private_args, seed=5, label_dp_seed=secret_seed(tmp_path / "other"))
    assert other["train"]["label"] != private["train"]["label"]
    with pytest.raises(ValueError, match="labels never leave the client"):
        DataArguments(label_dp_epsilon=1.0).check_label_dp(label_privacy=True)
    with pytest.raises(ValueError, match="label_dp_epsilon=0.0 is out of range"):
        DataArguments(label_dp_epsilon=0.0).check_label_dp(label_privacy=False)
    DataArguments(label_dp_epsilon=1.0).check_label_dp(label_privacy=False)


def test_recipe_trains_with_payload_noise_and_label_dp_charged_like_the_plain_bridge(tiny_vit_path, digits_dir,
                                                                                    tmp_path):  # fmt: skip
    from helpers import tiny_run_args, train_here

    def run(name, *flags):
        args = tiny_run_args(tiny_vit_path, digits_dir, tmp_path / name, "--compression", "adc", "--xi", "0.25",
                             "--max_steps", "2", "--eval_strategy", "no", *flags)  # fmt: skip
        return train_here(args)

    plain = run("plain")
    private = run("private", "--payload_noise", "0.5", "--payload_clip_norm", "5", "--label_dp_epsilon", "2")
    assert private["compression"]["method"] == "payload_noise" and private["args"]["data"]["label_dp_epsilon"] == 2
    charged = ("uplink_bytes", "downlink_bytes", "total_bytes", "uncompressed_bytes")
    assert [private[name] for name in charged] == [plain[name] for name in charged] and plain["total_bytes"] > 0
    assert private["compression"]["seed"] is None  # the noise is drawn from the OS, never from a shared seed
    assert private["payload_noise_guarantee"]["holds"] is False and "k-means" in private["payload_noise_guarantee"][
        "reason"]  # fmt: skip
    assert "payload_noise_guarantee" not in plain
    with pytest.raises(ValueError, match="labels never leave the client"):
        run("ushaped", "--label_privacy", "--label_dp_epsilon", "2")



def test_the_readme_privacy_example_runs_and_says_what_it_returns(tmp_path, monkeypatch):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from helpers import ROOT

    section = (ROOT / "README.md").read_text().split("## What the server learns", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # secret_seed("out") writes its file there
    torch.manual_seed(0)
    features = Features({"label": ClassLabel(num_classes=10), "index": Value("int64")})
    rows = Dataset.from_dict({"label": [i % 10 for i in range(200)], "index": list(range(200))}, features=features)
    names = {"vit": ViTForImageClassification(tiny_vit_config()), "dataset": DatasetDict(train=rows)}
    exec(compile(code, "README.md", "exec"), names)
    assert names["guarantee"].holds and names["guarantee"].reason.startswith("topk codes each example's row")
    assert names["epsilon"] == pytest.approx(28.4, abs=0.05)
    assert names["model"].bridge.config.seed is None and len(names["train"]) == 200
    assert (tmp_path / "out" / "label_dp_secret.json").exists()
    kept = sum(a == b for a, b in zip(names["train"]["label"], rows["label"], strict=True)) / 200
    assert kept == pytest.approx(keep_probability(2.0, 10), abs=0.12)


def test_federation_clients_under_label_dp_partition_on_the_true_labels(digits_dir, tmp_path):
    from hf_adc.distributed.arguments import FederationArguments
    from hf_adc.distributed.launch import client_shard
    from hf_adc.experiment import DataArguments, load_data
    from hf_adc.privacy.label_dp import secret_seed

    true = load_data(DataArguments(dataset_name=digits_dir), seed=5)["train"]["label"]
    private = DataArguments(dataset_name=digits_dir, label_dp_epsilon=0.5)
    shards = partition_indices(true, 2, "dirichlet", 0.3, 5)
    for client in (0, 1):  # each client its own secret: its randomized labels differ from the other's
        dataset = load_data(private, seed=5, label_dp_seed=secret_seed(tmp_path / f"client-{client}"))
        noisy = dataset["train"]["label"]
        federation = FederationArguments(num_clients=2, client_id=client, partition="dirichlet", alpha=0.3)
        shard, shard_labels = client_shard(dataset, private, federation, seed=5)
        assert shard_labels == [true[index] for index in shards[client]]  # the partition every client agrees on
        assert shard["train"]["label"] == [noisy[index] for index in shards[client]]
        assert shard["train"]["label"] != shard_labels  # trained on its randomized labels
