"""Attention-based Double Compression (ADC): merge similar samples, keep the tokens they attend to.

In training, the client clusters the batch on the CLS attention row of its last layer, sends one averaged
activation (and one averaged soft label) per cluster, and keeps only CLS plus the `k - 1` tokens the
cluster's mean CLS row ranks highest. Autograd then hands every member of a cluster `1 / |C|` of the
cluster's gradient on the kept tokens and zero elsewhere, so the gradient comes back compressed too.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .base import BridgeConfig, Message, SeededBridge


@dataclass
class ADCConfig(BridgeConfig):
    """Settings of ADC. Give either `xi`, or both `batch_ratio` and `token_ratio`; nothing means `xi=0.1`."""

    method = "adc"

    xi: float | None = field(
        default=None,
        metadata={
            "help": "Total compression ratio T*k/(B*n) in (0, 1], split by split_exponent (evenly by default); "
            "0.1 when neither xi nor batch_ratio is given."
        },
    )
    batch_ratio: float | None = field(
        default=None, metadata={"help": "Clusters per sample T/B in (0, 1]; needs token_ratio, excludes xi."}
    )
    token_ratio: float | None = field(
        default=None,
        metadata={"help": "Kept tokens per token k/n in (0, 1], CLS included; needs batch_ratio."},
    )
    split_exponent: float = field(
        default=0.5,
        metadata={
            "help": "How xi splits into the two factors: T/B = xi**a and k/n = xi**(1 - a), a in [0, 1]. "
            "0.5 is the paper's balanced split, 0 token selection alone, 1 batch merging alone."
        },
    )
    kmeans_iters: int = field(default=20, metadata={"help": "Most k-means iterations per batch (>= 1)."})
    kmeans_tol: float = field(
        default=1e-4, metadata={"help": "k-means stops once no centroid moves farther than this (>= 0)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the k-means++ initialisation."})

    def __post_init__(self):
        ratios = (self.batch_ratio, self.token_ratio)
        if self.xi is not None and any(r is not None for r in ratios):
            raise ValueError(f"Give either xi (got {self.xi}) or batch_ratio and token_ratio (got {ratios}), not both.")
        if (self.batch_ratio is None) != (self.token_ratio is None):
            raise ValueError(
                f"batch_ratio and token_ratio go together; got batch_ratio={self.batch_ratio}, "
                f"token_ratio={self.token_ratio}."
            )
        if self.xi is None and self.batch_ratio is None:
            self.xi = 0.1
        for name in ("xi", "batch_ratio", "token_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name}={value} is out of range: it must lie in (0, 1].")
        if not 0 <= self.split_exponent <= 1:
            raise ValueError(f"split_exponent={self.split_exponent} is out of range: it must lie in [0, 1].")
        if self.xi is None and self.split_exponent != 0.5:
            raise ValueError(
                f"split_exponent={self.split_exponent} splits xi; with batch_ratio and token_ratio there is no xi "
                "to split: leave split_exponent at 0.5."
            )
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters={self.kmeans_iters} is out of range: it must be >= 1.")
        if self.kmeans_tol < 0:
            raise ValueError(f"kmeans_tol={self.kmeans_tol} is out of range: it must be >= 0.")

    def sizes(self, batch_size: int, num_tokens: int) -> tuple[int, int]:
        """The integer cluster count T (1..B) and kept-token count k (1..n, CLS included) for a batch.

        With `xi`, T is the nearest integer to xi**a * B (a = `split_exponent`), then k the nearest to
        xi*B*n/T, so that the achieved ratio T*k/(B*n) comes as close to xi as the integers allow.
        """
        if self.xi is not None:
            clusters = min(max(round(self.xi**self.split_exponent * batch_size), 1), batch_size)
            tokens = round(self.xi * batch_size * num_tokens / clusters)
        else:
            clusters = min(max(round(self.batch_ratio * batch_size), 1), batch_size)
            tokens = round(self.token_ratio * num_tokens)
        return clusters, min(max(tokens, 1), num_tokens)


def _reads_are_free(tensor: torch.Tensor) -> bool:
    """Whether reading a value of `tensor` on the host costs nothing (no device synchronisation)."""
    return tensor.device.type == "cpu"


def _kmeans_plus_plus(points: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Seeds `num_clusters` centroids by k-means++ (D^2 sampling), without a host synchronisation.

    The squared distances between all points are computed once and every draw takes a uniform number drawn
    up front through the inverse CDF of the D^2 weights, so each of the sequential draws is a handful of small
    kernels. When every remaining point duplicates a chosen one (all weights zero) the draw picks the last
    point, a duplicate: its cluster starts empty and the first Lloyd step fills it. On the CPU the draws run
    in NumPy (`_host_draws`), which picks the same points at a fraction of the dispatch cost.
    """
    num_points = points.shape[0]
    norms = points.pow(2).sum(dim=1)
    distances = torch.addmm(norms + norms.unsqueeze(1), points, points.T, alpha=-2).clamp_(min=0)
    uniforms = torch.rand(num_clusters, 1, generator=generator, device=points.device, dtype=points.dtype)
    host_dtype = distances.dtype == uniforms.dtype and distances.dtype in (torch.float32, torch.float64)
    if _reads_are_free(points) and host_dtype:  # (under autocast the distances may be bfloat16: the tensor loop)
        picks = _host_draws(distances.detach().numpy(), uniforms.view(-1).numpy())
        return points[torch.from_numpy(picks)]
    picks = [(uniforms[0] * num_points).long().clamp_(max=num_points - 1)]
    nearest = distances[picks[0]]
    for draw in uniforms[1:]:
        cumulative = nearest.cumsum(dim=1)
        # Searching the first B - 1 boundaries keeps the pick in range when rounding puts the draw at the total.
        picks.append(torch.searchsorted(cumulative[:, :-1], draw * cumulative[:, -1:], right=True).squeeze(1))
        nearest = torch.minimum(nearest, distances[picks[-1]])
    return points[torch.cat(picks)]


def _host_draws(distances: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The indices `_kmeans_plus_plus`'s tensor loop picks, drawn in NumPy on the host: the same picks bit for bit,
    since the prefix sums accumulate in float64 and round to the points' dtype (as torch's CPU cumsum does) and
    the draw scales the total in that dtype. Each sequential draw costs a few NumPy calls instead of seven
    tensor dispatches, most of the seeding's time at B = 128."""
    num_points = distances.shape[0]
    picks = np.empty(len(uniforms), dtype=np.int64)
    picks[0] = min(int(uniforms[0] * uniforms.dtype.type(num_points)), num_points - 1)
    nearest = distances[picks[0]].copy()
    for index in range(1, len(uniforms)):
        cumulative = nearest.cumsum(dtype=np.float64).astype(nearest.dtype)
        picks[index] = cumulative[:-1].searchsorted(uniforms[index] * cumulative[-1], side="right")
        np.minimum(nearest, distances[picks[index]], out=nearest)
    return picks


def _fill_empty_clusters(points: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Moves points into empty clusters so that none stays empty, without a host sync.

    Each non-empty cluster keeps its member nearest its centroid (its anchor); the m empty clusters, in index
    order, take the m non-anchor points farthest from their centroids. There are always enough:
    B - (T - m) >= m. With no empty cluster the assignment comes back unchanged.
    """
    num_points, num_clusters = points.shape[0], centroids.shape[0]
    empty = torch.bincount(assignment, minlength=num_clusters) == 0
    distance = (points - centroids[assignment]).pow(2).sum(dim=1)
    rank = torch.empty_like(assignment)
    rank[torch.argsort(distance, stable=True)] = torch.arange(num_points, device=points.device)
    anchor_rank = torch.full((num_clusters,), num_points, device=points.device, dtype=rank.dtype)
    anchor_rank = anchor_rank.scatter_reduce(0, assignment, rank, reduce="amin")
    donor_rank = torch.where(rank == anchor_rank[assignment], -1, rank)
    donors = torch.argsort(donor_rank, descending=True, stable=True)[:num_clusters]
    empty_first = torch.argsort((~empty).to(torch.int8), stable=True)
    takes = torch.arange(num_clusters, device=points.device) < empty.sum()
    return assignment.scatter(0, donors, torch.where(takes, empty_first, assignment[donors]))


def kmeans(
    points: torch.Tensor,
    num_clusters: int,
    *,
    generator: torch.Generator,
    max_iter: int = 20,
    tol: float = 1e-4,
) -> torch.Tensor:
    """Assigns each row of `points` to one of `num_clusters` clusters, none of them empty.

    Euclidean k-means with k-means++ seeding from `generator` (so a seed fixes the result), at most
    `max_iter` Lloyd iterations, stopping once no centroid moves farther than `tol`. With as many clusters
    as points the answer is each point alone, in order.

    On the CPU the loop checks for empty clusters and convergence as it goes. On an accelerator it never
    reads a value back (no host synchronisation): it runs all `max_iter` iterations, repairs empty clusters
    unconditionally (a no-op when none is empty) and freezes the centroids once they have converged, which
    gives the same answer.
    """
    return _kmeans_with_means(points, num_clusters, generator=generator, max_iter=max_iter, tol=tol)[0]


def _kmeans_with_means(
    points: torch.Tensor, num_clusters: int, *, generator: torch.Generator, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kmeans`' assignment, with each cluster's size and the mean of its points: the last Lloyd update, which
    averages the points of the assignment returned, so that the encoder need not average them again."""
    num_points = points.shape[0]
    if num_clusters == num_points:
        assignment = torch.arange(num_points, device=points.device)
        counts = torch.ones(num_points, dtype=assignment.dtype, device=points.device)
        return assignment, counts, torch.zeros_like(points).index_add_(0, assignment, points) / counts.unsqueeze(1)
    host = _reads_are_free(points)
    centroids = _kmeans_plus_plus(points, num_clusters, generator)
    converged = torch.zeros((), dtype=torch.bool, device=points.device)
    for _ in range(max_iter):
        # argmin over centroids of |c|^2 - 2 p.c: the squared distance less |p|^2, which no centroid changes
        assignment = torch.addmm(centroids.pow(2).sum(dim=1), points, centroids.T, alpha=-2).argmin(dim=1)
        counts = torch.bincount(assignment, minlength=num_clusters)
        if not host or not counts.all():
            assignment = _fill_empty_clusters(points, assignment, centroids)
            counts = torch.bincount(assignment, minlength=num_clusters)
        means = torch.zeros_like(centroids).index_add_(0, assignment, points) / counts.unsqueeze(1)
        if host:
            moved, centroids = centroids, means
            if (centroids - moved).norm(dim=1).max() <= tol:
                break
        else:
            converged = converged | ((means - centroids).norm(dim=1).max() <= tol)
            centroids = torch.where(converged, centroids, means)
    return assignment, counts, means


def adc_for_ratio(xi: float, num_tokens: int, hidden_size: int, batch_size: int, seed: int = 0) -> ADCConfig:
    """ADC at ratio xi, split evenly (the planner's setting; its ablations are in `hf_adc.bridges.levels`)."""
    return ADCConfig(xi=xi, seed=seed)


class ADCBridge(SeededBridge):
    """The ADC encoder on the client; the server needs no decoder (its layers ignore token positions)."""

    needs_cls_attention = True

    def __init__(self, config: ADCConfig, num_labels: int):
        super().__init__(config)
        self.num_labels = num_labels

    def sent_values(self, batch_size, num_tokens, hidden_size, num_labels, element_size):
        """What one batch sends, for a codec to code: the shape of the merged activations, and the bytes of the
        soft labels and of other side information (none)."""
        clusters, kept = self.config.sizes(batch_size, num_tokens)
        return (clusters, kept, hidden_size), clusters * num_labels * element_size, 0

    def wire_bytes(self, batch_size, num_tokens, hidden_size, num_labels, element_size):
        shape, labels, _ = self.sent_values(batch_size, num_tokens, hidden_size, num_labels, element_size)
        activations = math.prod(shape) * element_size
        return activations + labels, activations

    def label_bytes(self, batch_size, num_labels, element_size):
        """One soft label (a distribution over the classes, in the wire dtype) per cluster; T does not depend on the
        number of tokens."""
        return self.config.sizes(batch_size, 1)[0] * num_labels * element_size

    def server_tokens(self, batch_size, num_tokens):
        return self.config.sizes(batch_size, num_tokens)

    def encode(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor | None,
        cls_attention: torch.Tensor | None = None,
    ) -> Message:
        if not self.training:
            return Message(hidden_states=hidden_states, labels=labels)
        if cls_attention is None or labels is None:
            raise ValueError("ADC compresses in training only, and needs the CLS attention row and the labels.")
        batch_size, num_tokens, hidden_size = hidden_states.shape
        num_clusters, num_kept = self.config.sizes(batch_size, num_tokens)

        cls_attention = cls_attention.float()
        cluster_ids, counts, centroid_rows = _kmeans_with_means(
            cls_attention,
            num_clusters,
            generator=self.next_generator(cls_attention.device),
            max_iter=self.config.kmeans_iters,
            tol=self.config.kmeans_tol,
        )
        sizes = counts.float()

        def cluster_mean(rows: torch.Tensor) -> torch.Tensor:
            total = rows.new_zeros(num_clusters, *rows.shape[1:]).index_add_(0, cluster_ids, rows)
            return total.div_(sizes.view(-1, *[1] * (rows.dim() - 1)))

        top_tokens = centroid_rows[:, 1:].topk(num_kept - 1, dim=1, sorted=False).indices.sort(dim=1).values + 1
        cls_column = torch.zeros(num_clusters, 1, dtype=top_tokens.dtype, device=top_tokens.device)
        token_indices = torch.cat([cls_column, top_tokens], dim=1)

        rows = token_indices[cluster_ids] + num_tokens * torch.arange(batch_size, device=cluster_ids.device)[:, None]
        kept = hidden_states.reshape(batch_size * num_tokens, hidden_size).index_select(0, rows.view(-1))
        merged = cluster_mean(kept.view(batch_size, num_kept, hidden_size).float())
        soft_labels = cluster_mean(F.one_hot(labels, self.num_labels).float())
        return Message(hidden_states=merged, labels=soft_labels, cluster_ids=cluster_ids, token_indices=token_indices)
