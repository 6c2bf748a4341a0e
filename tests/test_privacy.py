"""hf_adc.privacy: the attacks recover what they should, the defences compose and are charged, the epsilons are the
library's."""

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
from hf_adc.privacy import (
    LearnedInversion,
    Observer,
    PayloadNoiseConfig,
    cluster_guess,
    direction_guess,
    keep_probability,
    label_accuracy,
    payload_noise_epsilon,
    payload_noise_guarantee,
    randomize_labels,
    randomized_response_epsilon,
    score_inversion,
    soft_label_guess,
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


def fine_tune(public, compression, pixel_values, labels, steps=6, batch_size=16, **split_kwargs):
    """The client's run: a split of a copy of `public`, trained `steps` steps (AdamW 1e-4) while an Observer records."""
    model = ViTForImageClassification(tiny_vit_config())
    model.load_state_dict(public.state_dict())
    split = hf_adc.split_vit(model, 2, compression=compression, **split_kwargs).train()
    optimizer = torch.optim.AdamW(split.parameters(), lr=1e-4)
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
    assert plain["epsilon"] > 0 and plain["delta"] == 1e-5  # rows of one example, the client half frozen
    assert adc["epsilon"] is None and "k-means" in adc["epsilon_reason"]
    assert plain["label_attack_accuracy"] == 1.0  # class ids cross the standard split
    assert adc["bytes"] < plain["bytes"]
    assert benchmark.main(args) == records  # resumed: nothing left to run
    assert len((tmp_path / "privacy.jsonl").read_text().splitlines()) == 2
    for record in records:  # the first 8 images of one batch, beside what the attack made of them
        shown = np.load(tmp_path / record["reconstructions"])
        assert shown["originals"].dtype == np.uint8 and shown["originals"].shape == shown["reconstructions"].shape
        assert shown["originals"].shape[0] == 8
    pictures = [tmp_path / "privacy_frontier.png", tmp_path / "reconstructions.png", tmp_path / "privacy_table.md"]
    for picture in pictures:
        picture.unlink()
    assert benchmark.main(["--plot-only", "--output-dir", str(tmp_path)]) == records  # redrawn, nothing trained
    assert all(picture.stat().st_size > 0 for picture in pictures)
