"""Collation: a list of examples -> one batch of tensors ``{"pixel_values", "labels"}``.

Examples may be mappings (``{"pixel_values", "labels"}``, or ``"label"``, as ``datasets`` splits give them) or
``(pixel_values, label)`` tuples (as torchvision datasets give them). A batch is labelled throughout or not at all:
partly labelled data is an error that says so, never a silently shorter batch or a crash in the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

LABEL_KEYS = ("labels", "label")


def _example_parts(example: Any, index: int) -> tuple[Any, Any]:
    """(pixel values, label or None) of one example."""
    if isinstance(example, Mapping):
        if "pixel_values" not in example:
            raise ValueError(
                f"Example {index} of the batch has no `pixel_values` (keys: {sorted(example)}); examples need "
                "`pixel_values` (a float tensor [3, H, W]) and `labels`. Set transforms that produce them "
                "(hf_tgprune.data.set_transforms)."
            )
        label = next((example[key] for key in LABEL_KEYS if key in example), None)
        return example["pixel_values"], label
    if isinstance(example, (tuple, list)) and len(example) in (1, 2):
        return example[0], example[1] if len(example) == 2 else None
    raise TypeError(
        f"Example {index} of the batch is a {type(example).__name__}; examples must be dicts with `pixel_values` and "
        "`labels`, or (pixel_values, label) tuples."
    )


def _as_tensor(pixel_values: Any, index: int) -> torch.Tensor:
    if isinstance(pixel_values, torch.Tensor):
        return pixel_values
    try:
        tensor = torch.as_tensor(pixel_values)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"The pixel values of example {index} are a {type(pixel_values).__name__}, not a tensor ({err}); apply a "
            "transform that returns tensors (hf_tgprune.data.build_transforms and set_transforms, or torchvision's "
            "ToTensor)."
        ) from err
    if not tensor.is_floating_point():
        raise TypeError(
            f"The pixel values of example {index} are {tensor.dtype}; the model expects normalised float tensors. "
            "Apply a transform that returns them (hf_tgprune.data.build_transforms)."
        )
    return tensor


def _as_label(label: Any, index: int) -> int:
    if isinstance(label, torch.Tensor):
        if label.numel() != 1:
            raise ValueError(f"The label of example {index} has {label.numel()} values; one class index is expected.")
        label = label.item()
    try:
        integral = not isinstance(label, (bool, str)) and float(label).is_integer()
    except (TypeError, ValueError):
        integral = False
    if not integral:
        raise ValueError(f"The label of example {index} is {label!r}; labels are class indices (int).")
    return int(label)


def collate_fn(examples: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Stack examples into ``{"pixel_values": float [B, 3, H, W], "labels": long [B]}``.

    Args:
        examples: dicts with ``pixel_values`` and ``labels`` (or ``label``), or ``(pixel_values, label)`` tuples;
            examples without labels (no key, ``None``, or a 1-tuple) give a batch without ``labels``.

    Raises:
        ValueError: some examples of the batch have labels and others do not (partly labelled data), or a
            malformed example (the message names it).
        TypeError: pixel values that are not tensors (e.g. PIL images without a transform).
    """
    if len(examples) == 0:
        raise ValueError("collate_fn got an empty batch.")
    parts = [_example_parts(example, index) for index, example in enumerate(examples)]
    unlabelled = [index for index, (_, label) in enumerate(parts) if label is None]
    if unlabelled and len(unlabelled) < len(parts):
        raise ValueError(
            f"Partly labelled data: examples {unlabelled[:5]} of this batch have no label, the others have one. "
            "Training and the scoring pass need a label for every example: drop the unlabelled examples (or label "
            "them) before passing the dataset."
        )
    batch = {"pixel_values": torch.stack([_as_tensor(pixels, index) for index, (pixels, _) in enumerate(parts)])}
    if not unlabelled:
        batch["labels"] = torch.tensor([_as_label(label, i) for i, (_, label) in enumerate(parts)], dtype=torch.long)
    return batch


def check_labelled(dataset: Any, argument: str = "calibration_dataset") -> None:
    """Refuse partly labelled data before any work, where that is cheap to see: a ``datasets.Dataset`` whose label
    column holds nulls, or an in-memory list of examples. (Other datasets are checked batch by batch by
    :func:`collate_fn`.)

    Raises:
        ValueError: naming the argument and how many examples have no label.
    """
    missing = total = None
    column_names = getattr(dataset, "column_names", None)
    table = getattr(dataset, "data", None)
    if isinstance(column_names, list) and hasattr(table, "column"):
        key = next((key for key in LABEL_KEYS if key in column_names), None)
        if key is None:
            return
        column = table.column(key)
        indices = getattr(dataset, "_indices", None)
        if indices is None:
            missing, total = int(column.null_count), len(column)
        else:
            taken = column.take(indices.column(0))
            missing, total = int(taken.null_count), len(taken)
    elif isinstance(dataset, (list, tuple)):
        missing = sum(_example_parts(example, index)[1] is None for index, example in enumerate(dataset))
        total = len(dataset)
    if missing:
        raise ValueError(
            f"`{argument}` is partly labelled: {missing} of its {total} examples have no label. Scoring and "
            "training need a label for every example: drop the unlabelled ones (e.g. dataset.filter(lambda e: "
            "e['label'] is not None)) or label them."
        )


def single_example_last_batch(num_examples: int, batch_size: int, num_processes: int = 1) -> bool:
    """Whether an epoch over `num_examples` in batches of `batch_size` ends with a batch of one example.

    Under several processes Accelerate completes the last batches with examples from the start of the epoch (its
    default ``even_batches``), so only a single process sees such a batch.
    """
    return num_processes == 1 and batch_size > 1 and num_examples % batch_size == 1


def batchnorm_needs_drop_last(model: torch.nn.Module, dataset: Any, batch_size: int, num_processes: int = 1) -> bool:
    """Whether training `model` on `dataset` would feed a BatchNorm layer a batch of one image at the end of every
    epoch (BatchNorm cannot normalise over one value per channel: it raises, or trains on a degenerate batch)."""
    try:
        num_examples = len(dataset)
    except TypeError:  # iterable datasets: unknown length
        return False
    has_batchnorm = any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())
    return has_batchnorm and single_example_last_batch(num_examples, batch_size, num_processes)
