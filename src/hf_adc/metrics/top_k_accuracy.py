"""Top-k accuracy from logits, as an `evaluate` metric that loads offline by path.

`evaluate.load("accuracy")` fetches its script from the Hub; this module ships inside hf_adc and is loaded
with `evaluate.load(<path of this file>)` (see `hf_adc.metrics.load_accuracy`). It may only import `datasets`,
`evaluate` and `numpy`: `evaluate` copies it into its module cache and imports it from there.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Top-1 accuracy, and top-k accuracy (is the label among the k highest logits?) for each k in
`top_k` below the number of classes, from logits of shape (samples, classes) and integer labels."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: logits, one row of `classes` scores per sample.
    references: the class id of each sample.
    top_k: the k of each top-k accuracy to report beside top-1 (default (5,)); a k not below the number of
        classes is left out, since it would be 1 by construction.
Returns:
    accuracy: the fraction of samples whose highest logit is their label.
    top{k}_accuracy: the fraction whose label is among their k highest logits, for each k kept.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, top_k=(5,)) -> dict[str, float]:
        logits, labels = np.asarray(predictions, dtype=np.float32), np.asarray(references)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"predictions must be logits of shape (samples, classes) matching {labels.shape[0]} references; "
                f"got shape {logits.shape}."
            )
        metrics = {"accuracy": float((logits.argmax(axis=-1) == labels).mean())}
        for k in top_k:
            if not 1 <= k:
                raise ValueError(f"top_k entry {k} is out of range: it must be >= 1.")
            if k < logits.shape[1]:
                top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
                metrics[f"top{k}_accuracy"] = float((top == labels[:, None]).any(axis=-1).mean())
        return metrics
