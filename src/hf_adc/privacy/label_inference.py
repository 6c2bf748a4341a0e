"""What the server learns about each sample's class.

- **Standard split**: the labels cross. Class ids are read as they are; ADC's soft labels are their cluster's mean
  one-hot, so the server's best guess for each member is the cluster's most frequent class (`soft_label_guess`).
- **U-shaped split**: no label crosses, but `head_gradients` are computed from them. With a few samples whose label
  it knows (as in the literature: arXiv 2102.08504; SDAR), the server scores each gradient by direction:
  `direction_guess` gives each row the class whose known gradients it is most aligned with (cosine with the mean
  unit gradient of the class); `cluster_guess` clusters the unit gradients into as many groups as classes (k-means)
  and names each group by the known labels in it. `norm_guess` scores each gradient by its norm alone (the norm
  attack of arXiv 2102.08504, SecretFlow's `norm_torch.py`): a class the model already predicts well sends back small
  gradients, so in an imbalanced task the rare class stands out; `norm_scores` gives the raw score, for an AUC.
- **U-shaped split with shared heads** (`--share_head`): the server holds the heads' averaged weights, the rows it
  returned (`head_activations`, its own output) and `head_gradients`. The gradient of cross-entropy with respect to
  the logits is softmax - one-hot (over the batch size): one negative entry, at the true class. `shared_head_guess`
  maps each row's `head_gradients` back through the head's Jacobian (a least-squares solve, exact while the head has
  more inputs than classes) and reads the class off that negative entry; it needs no known label.

Accuracy is reported against the majority-class baseline (`label_accuracy`).
"""

import torch
from torch import nn

from ..bridges import kmeans


def soft_label_guess(targets: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Each sample's guessed class: the largest entry of the label distribution of its row (`members[i]`)."""
    return targets.argmax(dim=1)[members]


def _unit_rows(gradients: torch.Tensor) -> torch.Tensor:
    flat = gradients.float().flatten(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _check_known(rows: int, known_rows: torch.Tensor, known_labels: torch.Tensor, num_classes: int) -> None:
    if known_rows.shape != known_labels.shape or known_rows.dim() != 1 or known_rows.numel() == 0:
        raise ValueError(f"known_rows {tuple(known_rows.shape)} and known_labels {tuple(known_labels.shape)} must be "
                         "two 1-d tensors of one (nonzero) length.")  # fmt: skip
    if int(known_rows.min()) < 0 or int(known_rows.max()) >= rows:
        raise ValueError(f"known_rows must lie in 0 .. {rows - 1}; got {known_rows.tolist()}.")
    if int(known_labels.min()) < 0 or int(known_labels.max()) >= num_classes:
        raise ValueError(f"known_labels must lie in 0 .. {num_classes - 1}; got {known_labels.tolist()}.")


def direction_guess(
    gradients: torch.Tensor, known_rows: torch.Tensor, known_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Each row's guessed class: the class whose known rows' mean unit gradient has the highest cosine with it
    (a class with no known row is never guessed)."""
    _check_known(gradients.shape[0], known_rows, known_labels, num_classes)
    unit = _unit_rows(gradients)
    prototypes = torch.zeros(num_classes, unit.shape[1]).index_add_(0, known_labels, unit[known_rows])
    counts = torch.bincount(known_labels, minlength=num_classes)
    scores = _unit_rows(prototypes) @ unit.T
    scores[counts == 0] = -torch.inf
    return scores.argmax(dim=0)


def cluster_guess(
    gradients: torch.Tensor, known_rows: torch.Tensor, known_labels: torch.Tensor, num_classes: int, seed: int = 0
) -> torch.Tensor:
    """Each row's guessed class: k-means (`num_classes` clusters, seeded) of the unit gradients, each cluster named by
    the most frequent known label in it, or, with none, by `direction_guess` of its centroid."""
    _check_known(gradients.shape[0], known_rows, known_labels, num_classes)
    unit = _unit_rows(gradients)
    clusters = min(num_classes, unit.shape[0])
    assignment = kmeans(unit, clusters, generator=torch.Generator().manual_seed(seed))
    votes = torch.zeros(clusters, num_classes).index_put_(
        (assignment[known_rows], known_labels), torch.ones(len(known_rows)), accumulate=True
    )
    centroids = torch.zeros(clusters, unit.shape[1]).index_add_(0, assignment, unit)
    fallback = direction_guess(torch.cat([unit, centroids]), known_rows, known_labels, num_classes)[len(unit) :]
    names = torch.where(votes.sum(dim=1) > 0, votes.argmax(dim=1), fallback)
    return names[assignment]


def norm_scores(gradients: torch.Tensor) -> torch.Tensor:
    """Each row's gradient L2 norm: the norm attack's score (larger: less well predicted, in an imbalanced binary task
    the rare class)."""
    return gradients.float().flatten(1).norm(dim=1)


def norm_guess(
    gradients: torch.Tensor, known_rows: torch.Tensor, known_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Each row's guessed class: the class whose known rows' median log gradient norm is nearest its own (in a binary
    task, a threshold halfway between the two classes' typical norms; a class with no known row is never guessed)."""
    _check_known(gradients.shape[0], known_rows, known_labels, num_classes)
    scores = norm_scores(gradients).clamp_min(1e-30).log()
    centres = torch.full((num_classes,), torch.inf)
    for label in known_labels.unique():
        centres[label] = scores[known_rows[known_labels == label]].median()
    return (scores[:, None] - centres[None, :]).abs().argmin(dim=1)


def shared_head_guess(head: nn.Module, head_activations: torch.Tensor, head_gradients: torch.Tensor) -> torch.Tensor:
    """Each returned row's class, solved from a head whose weights the server holds (`--share_head`):
    `head_activations` `(rows, tokens, hidden)` are what the server returned, `head_gradients` their gradients. Per
    row, the gradient with respect to the logits is solved from `head_gradients` = J^T dL/dlogits (J: the Jacobian of
    the head's logits in its input, least squares) and the class is its most negative entry (softmax - one-hot is
    negative only there). `head` is used in evaluation mode and left as it was."""
    if head_activations.shape != head_gradients.shape or head_activations.dim() != 3:
        raise ValueError(f"head_activations {tuple(head_activations.shape)} and head_gradients "
                         f"{tuple(head_gradients.shape)} must have one shape (rows, tokens, hidden).")  # fmt: skip
    was_training = head.training
    head.eval()
    try:
        guesses = []
        for row, gradient in zip(head_activations.float(), head_gradients.float(), strict=True):
            jacobian = torch.autograd.functional.jacobian(lambda x: head(x[None]).logits[0].float(), row)
            jacobian = jacobian.reshape(jacobian.shape[0], -1).double()  # (classes, tokens x hidden)
            logit_gradient = torch.linalg.lstsq(jacobian.T, gradient.reshape(-1, 1).double()).solution[:, 0]
            guesses.append(logit_gradient.argmin())
    finally:
        head.train(was_training)
    return torch.stack(guesses)


def label_accuracy(guesses: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The attack's accuracy and the majority-class baseline (always guessing the most frequent true class)."""
    if guesses.shape != labels.shape or labels.numel() == 0:
        raise ValueError(f"guesses {tuple(guesses.shape)} and labels {tuple(labels.shape)} must match, nonempty.")
    majority = torch.bincount(labels).max().item() / labels.numel()
    return {"accuracy": (guesses == labels).float().mean().item(), "majority_baseline": majority}
