"""ADC semantics on a real tiny ViT: clusters, merge, soft labels, token selection, gradient, sizes."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_LABELS

import hf_adc
from hf_adc.bridges import ADCBridge


def _client_outputs(tiny_vit, pixel_values, split_layer=2):
    split = hf_adc.split_vit(tiny_vit, split_layer=split_layer).train()
    output = split.client(pixel_values, output_cls_attention=True)
    hidden = output.last_hidden_state.detach().requires_grad_()
    return hidden, output.cls_attention


def test_merge_select_soft_labels_and_gradient_follow_the_method(tiny_vit, batch, device):
    pixel_values, labels = (tensor.to(device) for tensor in batch)
    hidden, cls_attention = _client_outputs(tiny_vit.to(device), pixel_values)
    config = hf_adc.ADCConfig(batch_ratio=0.34, token_ratio=0.3)
    bridge = ADCBridge(config, num_labels=NUM_LABELS).to(device).train()
    message = bridge.encode(hidden, labels, cls_attention)
    num_clusters, num_kept = 4, 5  # round(0.34 * 12), round(0.3 * 17)
    assert message.hidden_states.shape == (num_clusters, num_kept, hidden.shape[-1])
    assert message.token_indices.shape == (num_clusters, num_kept)

    upstream = torch.randn_like(message.hidden_states)
    (message.hidden_states * upstream).sum().backward()

    for cluster in range(num_clusters):
        members = torch.nonzero(message.cluster_ids == cluster).squeeze(1)
        assert members.numel() > 0
        kept = message.token_indices[cluster]
        centroid = cls_attention[members].mean(dim=0)
        top = centroid[1:].topk(num_kept - 1).indices + 1
        assert kept[0] == 0
        assert set(kept[1:].tolist()) == set(top.tolist())
        torch.testing.assert_close(message.hidden_states[cluster], hidden[members][:, kept].mean(dim=0))
        torch.testing.assert_close(message.labels[cluster], F.one_hot(labels[members], NUM_LABELS).float().mean(dim=0))
        dropped = torch.ones(hidden.shape[1], dtype=torch.bool, device=device)
        dropped[kept] = False
        for member in members:
            torch.testing.assert_close(hidden.grad[member][kept], upstream[cluster] / members.numel())
            assert torch.count_nonzero(hidden.grad[member][dropped]) == 0


def test_eval_mode_encode_sends_everything(tiny_vit, batch):
    pixel_values, labels = batch
    hidden, cls_attention = _client_outputs(tiny_vit, pixel_values)
    bridge = ADCBridge(hf_adc.ADCConfig(xi=0.1), num_labels=NUM_LABELS).eval()
    message = bridge.encode(hidden, labels, cls_attention)
    assert message.hidden_states is hidden and message.labels is labels


def test_same_seed_gives_same_clusters(tiny_vit, batch):
    pixel_values, labels = batch
    runs = []
    for _ in range(2):
        split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(xi=0.2, seed=7)).train()
        runs.append([split(pixel_values, labels=labels).cluster_ids for _ in range(3)])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_no_empty_cluster_when_the_batch_holds_duplicates(tiny_vit):
    image = torch.randn(1, 3, 16, 16)
    pixel_values = torch.cat([image.expand(6, -1, -1, -1), torch.randn(2, 3, 16, 16)])
    labels = torch.arange(8) % NUM_LABELS
    split = hf_adc.split_vit(tiny_vit, 2, compression=hf_adc.ADCConfig(batch_ratio=0.75, token_ratio=0.5)).train()
    output = split(pixel_values, labels=labels)
    counts = torch.bincount(output.cluster_ids, minlength=6)
    assert counts.shape == (6,) and (counts > 0).all()
    assert torch.isfinite(output.loss) and torch.isfinite(output.targets).all()


@pytest.mark.parametrize("num_clusters", [1, 3, 8])
def test_kmeans_on_identical_points_fills_every_cluster(num_clusters):
    points = torch.ones(8, 5)
    assignment = hf_adc.kmeans(points, num_clusters, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(assignment, minlength=num_clusters).min() >= 1


def test_kmeans_separates_well_separated_groups():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres.repeat_interleave(5, dim=0) + 0.1 * torch.randn(15, 2, generator=generator)
    assignment = hf_adc.kmeans(points, 3, generator=generator)
    groups = assignment.view(3, 5)
    assert all(len(set(group.tolist())) == 1 for group in groups)
    assert len({group[0].item() for group in groups}) == 3


@pytest.mark.parametrize(
    ("xi", "batch_size", "num_tokens", "expected"),
    [(0.1, 32, 197, (10, 63)), (1.0, 12, 17, (12, 17)), (0.001, 4, 10, (1, 1)), (0.25, 12, 17, (6, 8))],
)
def test_sizes_come_as_close_to_xi_as_integers_allow(xi, batch_size, num_tokens, expected):
    config = hf_adc.ADCConfig(xi=xi)
    assert config.sizes(batch_size, num_tokens) == expected
    clusters, kept = expected
    best = min(
        abs(t * k / (batch_size * num_tokens) - xi)
        for t in [round(math.sqrt(xi) * batch_size) or 1]
        for k in range(1, num_tokens + 1)
    )
    assert abs(clusters * kept / (batch_size * num_tokens) - xi) == pytest.approx(best)


def test_default_config_is_xi_one_tenth():
    assert hf_adc.ADCConfig().xi == 0.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"xi": 0.0}, r"xi=0.0 is out of range.*\(0, 1\]"),
        ({"xi": 1.5}, r"xi=1.5 is out of range.*\(0, 1\]"),
        ({"batch_ratio": 0.5, "token_ratio": -0.1}, r"token_ratio=-0.1 is out of range.*\(0, 1\]"),
        ({"batch_ratio": 2.0, "token_ratio": 0.5}, r"batch_ratio=2.0 is out of range.*\(0, 1\]"),
        ({"xi": 0.1, "batch_ratio": 0.5, "token_ratio": 0.5}, r"either xi \(got 0.1\)"),
        ({"batch_ratio": 0.5}, r"go together.*token_ratio=None"),
        ({"kmeans_iters": 0}, r"kmeans_iters=0 is out of range.*>= 1"),
    ],
)
def test_bad_adc_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_adc.ADCConfig(**kwargs)


@pytest.mark.parametrize(
    ("exponent", "expected"), [(0.0, (32, 20)), (0.5, (10, 63)), (1.0, (3, 197)), (0.25, (18, 35))]
)
def test_split_exponent_divides_xi_between_samples_and_tokens(exponent, expected):
    config = hf_adc.ADCConfig(xi=0.1, split_exponent=exponent)
    assert config.sizes(32, 197) == expected
    clusters, kept = expected
    assert clusters == max(round(0.1**exponent * 32), 1)
    assert clusters * kept / (32 * 197) == pytest.approx(0.1, rel=0.08)


def test_split_exponent_needs_xi_and_a_range():
    with pytest.raises(ValueError, match=r"split_exponent=1.5 is out of range: it must lie in \[0, 1\]"):
        hf_adc.ADCConfig(xi=0.1, split_exponent=1.5)
    with pytest.raises(ValueError, match="with batch_ratio and token_ratio there is no xi"):
        hf_adc.ADCConfig(batch_ratio=0.5, token_ratio=0.5, split_exponent=0.25)


def _cls_rows(tiny_vit) -> torch.Tensor:
    """CLS attention rows of the tiny ViT's client half on 24 images, 8 of them copies of two (duplicates)."""
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(16, 3, 16, 16, generator=generator)
    images = torch.cat([images, images[:2].repeat(4, 1, 1, 1)])
    with torch.no_grad():
        return _client_outputs(tiny_vit, images)[1].float()


@pytest.mark.parametrize(
    ("num_clusters", "max_iter", "tol"), [(6, 20, 1e-4), (10, 20, 1e-4), (6, 20, 2e-3), (10, 3, 0)]
)
def test_kmeans_without_host_reads_gives_the_host_answer(tiny_vit, monkeypatch, num_clusters, max_iter, tol):
    """The accelerator branch (no value read back: every iteration runs, empty clusters are always repaired, and the
    centroids freeze once converged) clusters exactly as the CPU branch (which checks and stops as it goes); run here
    on the CPU by telling k-means that host reads are not free. The same assignments make the same centroids."""
    from hf_adc.bridges import adc

    points = _cls_rows(tiny_vit)
    seeds = range(6)
    host = [adc.kmeans(points, num_clusters, generator=torch.Generator().manual_seed(s), max_iter=max_iter, tol=tol)
            for s in seeds]  # fmt: skip
    monkeypatch.setattr(adc, "_reads_are_free", lambda tensor: False)
    for seed, expected in zip(seeds, host, strict=True):
        generator = torch.Generator().manual_seed(seed)
        assignment = adc.kmeans(points, num_clusters, generator=generator, max_iter=max_iter, tol=tol)
        assert torch.equal(assignment, expected), seed
        assert torch.bincount(assignment, minlength=num_clusters).min() >= 1, seed
