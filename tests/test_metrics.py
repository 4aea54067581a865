"""The metrics shipped in hf_tgprune/training/metrics load offline through `evaluate.load` and agree with hand counts."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hf_tgprune.training.evaluation import (
    classification_metrics,
    load_metric,
    make_compute_metrics,
    packaged_metric_path,
    packaged_metrics,
)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}


def hand_top_k(scores, labels, k):
    """Independent reference: sort by (-score, class index) and look for the label among the first k."""
    hits = 0
    for row, label in zip(scores, labels):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))
        hits += label in order[:k]
    return hits / len(labels)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)


def test_packaged_metrics_are_listed():
    assert {"accuracy", "top_k_accuracy"} <= set(packaged_metrics())
    assert packaged_metric_path("accuracy").endswith(os.path.join("metrics", "accuracy"))
    assert packaged_metric_path("not_a_metric") is None


def test_accuracy_matches_hand_count():
    metric = load_metric("accuracy")
    assert metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0]) == {"accuracy": 0.5}
    assert metric.compute(references=[0, 1, 2], predictions=[0, 1, 1], normalize=False) == {"accuracy": 2}
    weighted = metric.compute(references=[0, 1, 2], predictions=[0, 1, 1], sample_weight=[1.0, 1.0, 2.0])
    assert weighted["accuracy"] == pytest.approx(0.5)


def test_accuracy_add_batch_accumulates():
    metric = load_metric("accuracy")
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.add_batch(predictions=[2, 2], references=[2, 2])
    assert metric.compute()["accuracy"] == pytest.approx(0.75)


def test_top_k_accuracy_matches_hand_count():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(64, 7)).astype(np.float32)
    scores[:8, :] = 0.0  # rows of ties: broken by class index
    labels = rng.integers(0, 7, size=64)
    metric = load_metric("top_k_accuracy")
    for k in (1, 2, 5, 7, 10):
        got = metric.compute(predictions=scores, references=labels, k=k)["top_k_accuracy"]
        assert got == pytest.approx(hand_top_k(scores.tolist(), labels.tolist(), k)), k
    both = metric.compute(predictions=scores, references=labels, k=[1, 5])
    assert set(both) == {"top_1_accuracy", "top_5_accuracy"}
    assert both["top_1_accuracy"] == pytest.approx(float(np.mean(scores.argmax(1) == labels)))


def test_top_k_accuracy_rejects_bad_input():
    metric = load_metric("top_k_accuracy")
    with pytest.raises(ValueError, match="positive integer"):
        metric.compute(predictions=[[0.1, 0.9]], references=[1], k=0)
    with pytest.raises(ValueError, match="class indices"):
        metric.compute(predictions=[[0.1, 0.9]], references=[2], k=1)


def test_make_compute_metrics_top1_top5():
    from transformers import EvalPrediction

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 10))
    labels = rng.integers(0, 10, size=50)
    compute_metrics = make_compute_metrics()
    # Trainer passes a tuple when the model returns more than the logits
    result = compute_metrics(EvalPrediction(predictions=(logits, np.zeros((50, 3))), label_ids=labels))
    assert set(result) == {"accuracy", "top5_accuracy"}
    assert result["accuracy"] == pytest.approx(hand_top_k(logits.tolist(), labels.tolist(), 1))
    assert result["top5_accuracy"] == pytest.approx(hand_top_k(logits.tolist(), labels.tolist(), 5))
    assert compute_metrics((logits, labels)) == result


def test_fewer_than_five_labels():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 2.0, 0.0]])
    result = classification_metrics(logits, [0, 0, 1], top_k=(2, 5))
    assert result == {"accuracy": pytest.approx(2 / 3), "top2_accuracy": pytest.approx(2 / 3), "top5_accuracy": 1.0}


def test_unknown_name_goes_to_evaluate_load(monkeypatch):
    import evaluate

    calls = []
    monkeypatch.setattr(evaluate, "load", lambda path, **kwargs: calls.append(path) or "loaded")
    assert load_metric("someone/custom_metric") == "loaded"
    assert load_metric("accuracy") == "loaded"
    assert calls == ["someone/custom_metric", packaged_metric_path("accuracy")]


def test_evaluate_load_local_path_in_fresh_offline_process(tmp_path):
    """A clean interpreter, offline, empty caches: `evaluate.load(<folder>)` still works."""
    code = textwrap.dedent(
        f"""
        import evaluate
        metric = evaluate.load({packaged_metric_path("top_k_accuracy")!r})
        print(metric.compute(predictions=[[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]], references=[2, 1], k=2))
        """
    )
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "{'top_k_accuracy': 1.0}" in out.stdout
