"""Model cards for pruned checkpoints (`huggingface_hub.ModelCard`).

The card is built from the folder's ``sparsity.json`` (written by :func:`hf_tgprune.save_sparse_model`), so the
numbers in it are the ones measured from the saved weights; every field can be overridden by an argument.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..core.adapters import ModelAdapter, get_adapter
from ..core.utils import is_hub_id, public_name
from .serialization import BITMASK_WEIGHTS_NAME, SPARSITY_FILE_NAME

CARD_TAGS = ("pruning", "sparse", "knowledge-distillation", "hf_tgprune")
SPEED_NOTE = (
    "Unstructured sparsity does not speed up dense kernels: the pruned weights are stored as zeros and are "
    "multiplied like any other weight, so in PyTorch, timm and transformers this model runs at the same speed and "
    "with the same memory as the dense one. The gain is in size once compressed (for example with the `bitmask` "
    "format of hf_tgprune) or with runtimes that have sparse kernels."
)
_PLACEHOLDER_REPO = "<user>/<model>"
INFERENCE_EXPORT = "hf_tgprune.export_sparse_inference"


@dataclass
class InferenceLatency:
    """End-to-end latency at one batch size: the pruned model run dense vs its sparse inference export.

    Args:
        batch_size: images per forward pass.
        dense_ms: median milliseconds per forward pass of the pruned model as saved (dense kernels).
        sparse_ms: the same for the exported model (`export_sparse_inference`, decided at this batch size).
        layers_converted: layers the export ran with a sparse kernel.
        layers_candidate: Linear / Conv2d layers the export considered (depthwise and grouped convolutions included;
            they always stay dense).
        max_abs_error: largest absolute difference between the exported and dense outputs (export verification).
    """

    batch_size: int
    dense_ms: float
    sparse_ms: float
    layers_converted: int
    layers_candidate: int
    max_abs_error: float | None = None

    @property
    def speedup(self) -> float:
        """dense_ms / sparse_ms (above 1: the export is faster)."""
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else float("nan")


@dataclass
class InferenceSpeed:
    """Measured inference speed of a pruned model, dense vs sparse export, on one machine.

    Recorded in ``sparsity.json`` (as ``inference``) through ``SparseModelInfo.inference`` and shown in the model
    card's "Inference speed" section; the recipe's ``--export_sparse_inference`` fills it in.

    Args:
        device: the machine it was measured on, e.g. ``"CPU: AMD EPYC 7B13"``.
        threads: torch threads (``torch.get_num_threads()``) during the measurement.
        latencies: one entry per batch size.
        input_shape: one image's shape, e.g. ``[3, 32, 32]``.
        repeats: timed rounds (dense and sparse interleaved; the median is reported).
        torch_version: PyTorch version.
        export: what produced the sparse model.
    """

    device: str
    threads: int
    latencies: list[InferenceLatency]
    input_shape: list[int] = field(default_factory=list)
    repeats: int | None = None
    torch_version: str | None = None
    export: str = INFERENCE_EXPORT

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict (each latency with its ``speedup``), as ``sparsity.json`` and ``results.json`` hold it."""
        out = asdict(self)
        for row, latency in zip(out["latencies"], self.latencies):
            row["speedup"] = latency.speedup
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InferenceSpeed:
        """The inverse of :meth:`as_dict` (a derived ``speedup`` is ignored).

        Raises:
            ValueError: a required field is missing, or there is no latency.
        """
        try:
            latencies = [
                InferenceLatency(**{k: v for k, v in row.items() if k != "speedup"}) for row in data["latencies"]
            ]
            fields = {k: v for k, v in data.items() if k != "latencies"}
            speed = cls(latencies=latencies, **fields)
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"inference figures need device, threads and latencies (batch_size, dense_ms, sparse_ms, "
                f"layers_converted, layers_candidate) as InferenceSpeed.as_dict() writes them; got {dict(data)!r} "
                f"({err})"
            ) from err
        if not speed.latencies:
            raise ValueError("inference figures hold no latency (one per batch size is needed).")
        return speed


def inference_record(value: InferenceSpeed | Mapping[str, Any]) -> dict[str, Any]:
    """`value` as the ``inference`` field of ``sparsity.json`` (a mapping is checked through `InferenceSpeed`).

    Raises:
        TypeError: `value` is neither an `InferenceSpeed` nor a mapping.
        ValueError: a mapping that is not an `InferenceSpeed.as_dict()`.
    """
    if isinstance(value, InferenceSpeed):
        return value.as_dict()
    if isinstance(value, Mapping):
        return InferenceSpeed.from_dict(value).as_dict()
    raise TypeError(
        f"SparseModelInfo.inference takes a hf_tgprune.io.modelcard.InferenceSpeed (or its as_dict()), got "
        f"{type(value).__name__}."
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    return "—" if value is None else str(value).replace("|", "\\|")


def _pruning_kind(record: Mapping, hyperparameters: Mapping) -> str:
    """How the weights were pruned, from the record: one-shot (records without `one_shot` predate methods that prune
    during training) or during training, unstructured or N:M."""
    pattern = hyperparameters.get("sparsity_pattern") or "unstructured"
    kind = "unstructured" if pattern == "unstructured" else f"{pattern} semi-structured"
    if record.get("one_shot", True):
        return f"one-shot {kind} pruning"
    return f"{kind} pruning during training"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _adapter_named(family: str):
    """The adapter that wrote the folder; the plain-torch one for a family this process does not know."""
    try:
        return get_adapter(family)
    except KeyError:
        return get_adapter("torch")


def _load_snippets(adapter: ModelAdapter, save_format: str, repo_id: str, preprocessing: bool) -> str:
    if save_format == "bitmask":
        imports, build = adapter.card_architecture_snippet(repo_id)
        return (
            "The weights are in hf_tgprune's compact `bitmask` format (a packed mask plus the kept values, "
            "safetensors only). Read them with `hf_tgprune.load_sparse`, which restores the dense weights "
            "bit-exactly and checks their checksums:\n\n"
            "```python\n"
            f"{imports}\nfrom huggingface_hub import hf_hub_download\nfrom hf_tgprune import load_sparse\n\n"
            f"{build}\n"
            f'load_sparse(hf_hub_download("{repo_id}", "{BITMASK_WEIGHTS_NAME}"), model=model)\n'
            "```\n"
        )
    return "\n".join(adapter.card_load_snippets(repo_id, preprocessing=preprocessing))


def _preprocessing_text(preprocessing: Mapping[str, Any] | None) -> str | None:
    if not preprocessing:
        return None
    side = preprocessing.get("image_size")
    return (
        f"{side}×{side} px ({preprocessing.get('interpolation')} resize of the shorter side, center crop), "
        f"mean {_fmt(preprocessing.get('mean'))}, std {_fmt(preprocessing.get('std'))}"
    )


def _metrics_table(dense: Mapping[str, Any] | None, pruned: Mapping[str, Any] | None) -> str:
    dense, pruned = dict(dense or {}), dict(pruned or {})
    names = list(dict.fromkeys([*dense, *pruned]))
    if not names:
        return "_No evaluation metrics were recorded._\n"
    rows = ["| metric | dense | pruned | change |", "|---|---|---|---|"]
    for name in names:
        d, p = dense.get(name), pruned.get(name)
        change = f"{p - d:+.4f}" if isinstance(d, (int, float)) and isinstance(p, (int, float)) else "—"
        rows.append(f"| {_fmt(name)} | {_fmt(d)} | {_fmt(p)} | {change} |")
    return "\n".join(rows) + "\n"


# metric names of top-1 / top-5 accuracy as `compute_metrics` and the Trainer's prefixes write them
_TOP1_NAMES = ("eval_accuracy", "accuracy", "test_accuracy", "eval_top1_accuracy", "top1_accuracy")
_TOP5_NAMES = ("eval_top5_accuracy", "top5_accuracy", "test_top5_accuracy")


def _eval_results(
    dataset: str | None, dense: Mapping[str, Any] | None, pruned: Mapping[str, Any] | None
) -> list[EvalResult] | None:
    """The card's ``model-index`` (the Hub's evaluation results widget): top-1 (and top-5) accuracy of the pruned
    model and of the dense model before pruning, on `dataset`; None without a dataset or without those metrics."""
    if not dataset:
        return None
    results = []
    for label, metrics in (("pruned", pruned), ("dense, before pruning", dense)):
        for k, names in ((1, _TOP1_NAMES), (5, _TOP5_NAMES)):
            value = next((metrics[n] for n in names if isinstance((metrics or {}).get(n), (int, float))), None)
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Image Classification",
                    dataset_type=dataset,
                    dataset_name=dataset,
                    metric_type="accuracy" if k == 1 else "top-5-accuracy",
                    metric_name=f"Top-{k} accuracy ({label})",
                    metric_value=float(value),
                )
            )
    return results or None


def _layer_table(layers: Mapping[str, Mapping[str, Any]], max_layers: int) -> str:
    if not layers:
        return "_No per-layer record._\n"
    rows = ["| layer | weights | zeros | sparsity |", "|---|---:|---:|---:|"]
    items = list(layers.items())
    for name, counts in items[:max_layers]:
        rows.append(
            f"| `{name}` | {counts.get('numel', 0):,} | {counts.get('zeros', 0):,} | {_pct(counts.get('sparsity'))} |"
        )
    text = "\n".join(rows) + "\n"
    if len(items) > max_layers:
        text += f"\n_{len(items) - max_layers} more layers are listed in `{SPARSITY_FILE_NAME}`._\n"
    return text


def _speedups_text(speed: InferenceSpeed) -> str:
    return ", ".join(f"{latency.speedup:.2f}× at batch size {latency.batch_size}" for latency in speed.latencies)


def _inference_summary(speed: InferenceSpeed | None) -> str:
    if speed is None:
        return ""
    return (
        f"\n\nMeasured with hf_tgprune's sparse inference export (sparse CPU kernels where they are faster): it ran "
        f"**{_speedups_text(speed)}** as fast as the dense model on {_fmt(speed.device)} ({speed.threads} "
        "thread(s)); see [Inference speed](#inference-speed)."
    )


def _inference_section(speed: InferenceSpeed | None) -> str:
    """The card's "Inference speed" section ("" without figures)."""
    if speed is None:
        return ""
    rows = ["| batch size | dense ms | sparse ms | speed-up | layers made sparse |", "|---:|---:|---:|---:|---:|"]
    for latency in speed.latencies:
        rows.append(
            f"| {latency.batch_size} | {latency.dense_ms:.4g} | {latency.sparse_ms:.4g} | {latency.speedup:.2f}× | "
            f"{latency.layers_converted} of {latency.layers_candidate} |"
        )
    errors = [latency.max_abs_error for latency in speed.latencies if latency.max_abs_error is not None]
    details = ", ".join(
        [f"{speed.threads} torch thread(s)"]
        + ([f"PyTorch {speed.torch_version}"] if speed.torch_version else [])
        + ([f"input {'×'.join(str(s) for s in speed.input_shape)}"] if speed.input_shape else [])
    )
    timing = f"median of {speed.repeats} interleaved runs" if speed.repeats else "interleaved runs"
    if errors:
        timing += f"; the exported outputs matched the dense ones (max abs error {max(errors):.2g})"
    example = ", ".join(str(s) for s in [1, *(speed.input_shape or [3, 224, 224])])
    table = "\n".join(rows)
    return f"""## Inference speed

Measured end to end on **{_fmt(speed.device)}** ({details}): the pruned model as saved (dense kernels) against its
export with `{_fmt(speed.export)}`, which folds BatchNorm into the preceding convolutions and runs a Linear or
convolution layer with a sparse (`torch.sparse_csr`) kernel where that was measured faster on this machine at that
batch size; every other layer (depthwise and grouped convolutions included) stays dense. Times per forward pass,
{timing}.

{table}

The speed-up holds for this machine, thread count and batch size only: other CPUs, more threads and bigger batches
gain less or nothing, and the weights loaded with timm or transformers run dense. Export on the machine you serve
with (the per-layer choice is measured there):

```python
import torch
from hf_tgprune import export_sparse_inference

fast, report = export_sparse_inference(model.eval(), example_inputs=torch.randn({example}))
print(report.format_table())  # per layer: density, dense µs, sparse µs, chosen
```

"""


def _read_record(sparsity: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    if sparsity is None:
        return {}
    if isinstance(sparsity, Mapping):
        return dict(sparsity)
    path = Path(sparsity)
    if path.is_dir():
        path = path / SPARSITY_FILE_NAME
    return json.loads(path.read_text(encoding="utf-8"))


def create_model_card(
    sparsity: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    teacher: str | None = None,
    dataset: str | None = None,
    method: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    dense_metrics: Mapping[str, Any] | None = None,
    pruned_metrics: Mapping[str, Any] | None = None,
    model_family: str | None = None,
    save_format: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    max_layers: int = 200,
    inference: InferenceSpeed | Mapping[str, Any] | None = None,
) -> ModelCard:
    """Build the model card of a pruned checkpoint.

    Args:
        sparsity: the saved folder, its ``sparsity.json`` path, or the record returned by ``save_sparse_model``.
            Fields not passed explicitly (base model, teacher, dataset, method, hyperparameters, metrics as
            ``{"dense": {...}, "pruned": {...}}``, model family, format) are read from it.
        repo_id: the Hub repo the card describes (used in the load snippets).
        model_name: the card's title; default: the repo name.
        base_model: Hub id of the model that was pruned; written to the card's ``base_model`` metadata only when it
            is a Hub id, since the Hub rejects anything else. Local paths (here and for ``teacher`` / ``dataset``)
            are shown as their folder name.
        teacher: overrides the record's teacher.
        dataset: overrides the record's dataset.
        method: overrides the record's pruning method.
        hyperparameters: override the record's hyperparameters.
        dense_metrics: override the record's dense metrics.
        pruned_metrics: override the record's pruned metrics.
        save_format: overrides the record's format (`"dense"` or `"bitmask"`).
        model_family: the adapter name (``"timm"``, ``"transformers"``, ``"torch"``) whose load snippets the card
            shows; default: the record's ``model_family``.
        license: the card's license metadata.
        tags: the card's tags (added to the library's own).
        max_layers: rows of the per-layer sparsity table (the full table is in ``sparsity.json``).
        inference: measured latency of the model dense vs exported with ``export_sparse_inference``
            (:class:`InferenceSpeed`); default: the record's ``inference``. With figures the card gets an
            "Inference speed" section stating the speed-up and the machine it was measured on; without, none.

    Returns:
        a ``huggingface_hub.ModelCard``; ``card.save(folder / "README.md")`` or ``card.push_to_hub(repo_id)``.
    """
    record = _read_record(sparsity)
    metrics = record.get("metrics") or {}
    if metrics and not ({"dense", "pruned"} & set(metrics)):
        metrics = {"pruned": metrics}
    # names as Hub ids or plain folder names: a card never shows a path of the machine that wrote it
    base_model = public_name(base_model if base_model is not None else record.get("base_model"))
    teacher = public_name(teacher if teacher is not None else record.get("teacher"))
    dataset = public_name(dataset if dataset is not None else record.get("dataset"))
    method = method if method is not None else record.get("method")
    hyperparameters = dict(hyperparameters if hyperparameters is not None else record.get("hyperparameters") or {})
    dense_metrics = dense_metrics if dense_metrics is not None else metrics.get("dense")
    pruned_metrics = pruned_metrics if pruned_metrics is not None else metrics.get("pruned")
    adapter = _adapter_named(model_family or record.get("model_family") or "torch")
    save_format = save_format or record.get("format") or "dense"
    report = record.get("sparsity") or {}
    prunable, total = report.get("prunable") or {}, report.get("total") or {}
    calibration = record.get("calibration_size")
    inference = inference if inference is not None else record.get("inference")
    speed = None
    if inference is not None:
        speed = inference if isinstance(inference, InferenceSpeed) else InferenceSpeed.from_dict(inference)
    repo = repo_id or _PLACEHOLDER_REPO
    name = model_name or (repo_id.split("/")[-1] if repo_id else "Pruned model")

    card_tags = list(dict.fromkeys([*CARD_TAGS, *(tags or []), *adapter.card_tags]))
    data = ModelCardData(
        base_model=base_model if is_hub_id(base_model, namespaced=True) else None,
        datasets=[dataset] if is_hub_id(dataset) else None,
        eval_results=_eval_results(dataset, dense_metrics, pruned_metrics),
        library_name=adapter.library_name,
        license=license,
        model_name=name,
        pipeline_tag="image-classification",
        tags=card_tags,
    )

    described = base_model or "A vision model"
    summary = (
        f"{described} with **{_pct(prunable.get('sparsity'))}** of its prunable weights set to zero "
        f"({_pct(total.get('sparsity'))} of all parameters) by {_pruning_kind(record, hyperparameters)}"
        + (f" with `{method}`" if method else "")
        + (f", guided by the teacher `{teacher}`" if teacher else "")
        + ". Made with `hf_tgprune`."
    )
    pruning_rows = [
        ("Base model", base_model),
        ("Teacher", teacher),
        ("Method", method),
        ("Target sparsity", record.get("target_sparsity", hyperparameters.get("sparsity"))),
        ("Calibration samples", calibration),
        ("Dataset", dataset),
        ("Preprocessing", _preprocessing_text(record.get("preprocessing"))),
        ("Weights format", f"`{save_format}` (`{record.get('weights_file', 'model.safetensors')}`)"),
        ("Mask SHA-256", f"`{(record.get('mask') or {}).get('sha256')}`"),
        ("Library", ", ".join(f"{k} {v}" for k, v in (record.get("library") or {}).items()) or None),
    ]
    pruning_table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in pruning_rows if v is not None)
    hyper_table = (
        "| hyperparameter | value |\n|---|---|\n"
        + "\n".join(f"| `{k}` | {_fmt(v)} |" for k, v in sorted(hyperparameters.items()))
        + "\n"
        if hyperparameters
        else "_No hyperparameters recorded._\n"
    )
    sparsity_counts = (
        f"Prunable weights: {prunable.get('zeros', 0):,} of {prunable.get('numel', 0):,} are zero "
        f"({_pct(prunable.get('sparsity'))}); all parameters: {total.get('zeros', 0):,} of "
        f"{total.get('numel', 0):,} ({_pct(total.get('sparsity'))}). Measured from the saved weights.\n"
    )
    body = f"""
# {name}

{summary}

{SPEED_NOTE}{_inference_summary(speed)}

## How to load

{_load_snippets(adapter, save_format, repo, bool(record.get("preprocessing")))}
## Pruning

{pruning_table}

### Hyperparameters

{hyper_table}
## Results

{_metrics_table(dense_metrics, pruned_metrics)}
{_inference_section(speed)}## Sparsity per layer

{sparsity_counts}
{_layer_table(report.get("layers") or {}, max_layers)}
The full record (per-layer counts, mask hash, file checksums, versions) is in `{SPARSITY_FILE_NAME}`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
