"""Top-k accuracy from per-class scores or logits (pure numpy, loadable offline).

Loads with `evaluate.load("<path to this folder>")`; `hf_tgprune.training.evaluation.load_metric("top_k_accuracy")`
does that for you. A sample counts as correct when its reference class is among the `k` classes with the
highest scores. Ties are broken deterministically by class index (lower index first), so `k=1` agrees with
`argmax`. When `k` is at least the number of classes every sample is correct.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the proportion of samples whose reference label is among the k highest-scoring classes.
Predictions are per-class scores (logits or probabilities, shape [n_samples, n_classes]).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): Per-class scores (logits or probabilities), one row per sample.
    references (`list` of `int`): Ground truth labels.
    k (`int` or `list` of `int`, defaults to 5): How many top-scoring classes count as a hit. A list returns one
        value per k.
    normalize (`bool`, defaults to `True`): If `False`, return the number of hits instead of the fraction.
Returns:
    top_k_accuracy (`float`): for an int `k`.
    top_{k}_accuracy (`float`) for every k: for a list of `k`, e.g. `top_1_accuracy`, `top_5_accuracy`.
Examples:
    >>> metric = evaluate.load("hf_tgprune/training/metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]], references=[2, 1], k=2)
    {'top_k_accuracy': 1.0}
"""

_CITATION = ""


def _ranks(scores: np.ndarray, references: np.ndarray) -> np.ndarray:
    """0-based rank of each reference class: classes scoring higher, plus tied classes with a lower index."""
    true_scores = scores[np.arange(scores.shape[0]), references][:, None]
    class_index = np.arange(scores.shape[1])[None, :]
    higher = scores > true_scores
    tied_before = (scores == true_scores) & (class_index < references[:, None])
    return np.sum(higher | tied_before, axis=1)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=5, normalize=True):
        scores = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references, dtype=np.int64).reshape(-1)
        if scores.ndim != 2:
            raise ValueError(f"`predictions` must be per-class scores of shape [n, n_classes]; got {scores.shape}.")
        if scores.shape[0] != references.shape[0]:
            raise ValueError(f"Got {scores.shape[0]} predictions but {references.shape[0]} references.")
        if references.size and (references.min() < 0 or references.max() >= scores.shape[1]):
            raise ValueError(f"References must be class indices in [0, {scores.shape[1]}).")
        ks = [k] if np.isscalar(k) else list(k)
        for value in ks:
            if int(value) != value or value < 1:
                raise ValueError(f"`k` must be a positive integer; got {value!r}.")
        ranks = _ranks(scores, references)

        def score(value):
            hits = ranks < int(value)
            if not normalize:
                return int(hits.sum())
            return float(hits.mean()) if hits.size else float("nan")

        if np.isscalar(k):
            return {"top_k_accuracy": score(k)}
        return {f"top_{int(value)}_accuracy": score(value) for value in ks}
