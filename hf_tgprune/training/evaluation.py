"""Metrics for image classification through `evaluate`, working offline.

`load_metric("accuracy")` and `load_metric("top_k_accuracy")` load the metric scripts shipped in
`hf_tgprune/training/metrics/` (pure numpy, no network, no scikit-learn); any other name goes to `evaluate.load`
unchanged, so the same code uses Hub metrics when online. `make_compute_metrics()` builds the
`compute_metrics` function for a `transformers.Trainer` that reports top-1 and top-5 accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def packaged_metrics() -> list[str]:
    """Names of the metrics shipped with hf_tgprune (loadable without network)."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def packaged_metric_path(name: str) -> str | None:
    """Local folder of a shipped metric, or None if hf_tgprune does not ship `name`."""
    folder = METRICS_DIR / name
    return str(folder) if (folder / f"{name}.py").is_file() else None


def load_metric(name: str, **kwargs: Any):
    """`evaluate.load` that prefers the metrics shipped with hf_tgprune.

    Args:
        name: one of `packaged_metrics()` (loaded from the local script, offline), or anything that
            `evaluate.load` accepts (a Hub metric id or a local path).
        **kwargs: passed to `evaluate.load`; `keep_in_memory` defaults to True so that several processes
            (DDP ranks) never contend for the same cache file.
    """
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(packaged_metric_path(name) or name, **kwargs)


def _as_scores(predictions: Any) -> np.ndarray:
    """Logits from whatever the Trainer gathered (an array, or a tuple whose first item is the logits)."""
    while isinstance(predictions, tuple):  # model outputs beyond the logits (hidden states, ...)
        predictions = predictions[0]
    scores = np.asarray(predictions)
    if scores.ndim != 2:
        raise ValueError(f"Expected logits of shape [n_samples, n_classes]; got shape {scores.shape}.")
    return scores


def classification_metrics(scores: Any, labels: Any, top_k: Sequence[int] = (5,), metrics=None) -> dict[str, float]:
    """{"accuracy": top-1, "top{k}_accuracy": ...} from logits/scores and integer labels.

    Args:
        scores: logits or scores, shape [n_samples, n_classes] (or a tuple whose first item they are).
        labels: integer class labels, shape [n_samples].
        top_k: the k of the top-k accuracies reported. When k is at least the number of classes, top-k accuracy
            is 1.0 by definition (every class is in the top k); the key is still reported so that result files
            keep the same shape for every dataset.
        metrics: the (accuracy, top_k_accuracy) metrics to use; loaded with `load_metric` when None.
    """
    scores = _as_scores(scores)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    accuracy, top_k_accuracy = metrics or (load_metric("accuracy"), load_metric("top_k_accuracy"))
    results = accuracy.compute(predictions=scores.argmax(axis=-1), references=labels)
    ks = [int(k) for k in top_k]
    if ks:
        topk = top_k_accuracy.compute(
            predictions=scores.astype(np.float32), references=labels, k=[min(k, scores.shape[1]) for k in ks]
        )
        for k in ks:
            results[f"top{k}_accuracy"] = topk[f"top_{min(k, scores.shape[1])}_accuracy"]
    return {name: float(value) for name, value in results.items()}


def make_compute_metrics(top_k: Sequence[int] = (5,)) -> Callable[[Any], dict[str, float]]:
    """`compute_metrics` for `transformers.Trainer`: {"accuracy": top-1, "top5_accuracy": top-5}.

    Args:
        top_k: the k of the top-k accuracies reported.

    Returns:
        a function of an `EvalPrediction` (or a `(predictions, label_ids)` pair); the metrics are loaded once,
        here.
    """
    metrics = (load_metric("accuracy"), load_metric("top_k_accuracy"))

    def compute_metrics(eval_prediction) -> dict[str, float]:
        if isinstance(eval_prediction, tuple):
            predictions, labels = eval_prediction[0], eval_prediction[1]
        else:
            predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(labels, tuple):
            labels = labels[0]
        return classification_metrics(predictions, labels, top_k=top_k, metrics=metrics)

    return compute_metrics
