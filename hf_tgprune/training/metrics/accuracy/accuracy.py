"""Accuracy: the fraction of predictions equal to the references (pure numpy, loadable offline).

Loads with `evaluate.load("<path to this folder>")`; `hf_tgprune.training.evaluation.load_metric("accuracy")` does
that for you. Same inputs and output as the Hub's `accuracy` metric, without the scikit-learn dependency.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the total number of cases processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    normalize (`bool`, defaults to `True`): If `False`, return the number of correctly classified samples.
    sample_weight (`list` of `float`, *optional*): Sample weights.
Returns:
    accuracy (`float` or `int`): Accuracy score in [0, 1] (or the count of correct predictions when
        `normalize=False`).
Examples:
    >>> accuracy_metric = evaluate.load("hf_tgprune/training/metrics/accuracy")
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
        references = np.asarray(references, dtype=np.int64).reshape(-1)
        if predictions.shape != references.shape:
            raise ValueError(f"Got {predictions.size} predictions but {references.size} references.")
        correct = (predictions == references).astype(np.float64)
        if sample_weight is not None:
            weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
            if weights.shape != correct.shape:
                raise ValueError(f"Got {weights.size} sample weights for {correct.size} samples.")
        else:
            weights = np.ones_like(correct)
        if not normalize:
            total = float(np.sum(correct * weights))
            return {"accuracy": int(total) if sample_weight is None else total}
        if correct.size == 0 or np.sum(weights) == 0:
            return {"accuracy": float("nan")}
        return {"accuracy": float(np.sum(correct * weights) / np.sum(weights))}
