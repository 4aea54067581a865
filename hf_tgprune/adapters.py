"""Model adapters: one place that knows how timm, transformers and plain torch classifiers differ.

Every other module asks an adapter for logits, the number of labels and the classifier head, so that
students and teachers can be any mix of `timm.create_model(...)` and `AutoModelForImageClassification`.
New model families are supported by registering an adapter (`register_adapter`), not by editing callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel and `torch.compile` wrappers (the parameters are shared with the wrapper)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _last_linear_with_outputs(model: nn.Module, out_features: int | None) -> str | None:
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (out_features is None or module.out_features == out_features):
            name = module_name
    return name


def _module_name(model: nn.Module, target: nn.Module) -> str | None:
    for module_name, module in model.named_modules():
        if module is target:
            return module_name
    return None


@dataclass(frozen=True)
class ModelAdapter:
    """How to drive one family of image classifiers."""

    name: str
    matches: Callable[[nn.Module], bool]
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    num_labels: Callable[[nn.Module], int | None]
    classifier_module_name: Callable[[nn.Module], str | None]


_ADAPTERS: list[ModelAdapter] = []


def register_adapter(adapter: ModelAdapter, *, first: bool = True) -> ModelAdapter:
    """Register an adapter; adapters registered later with `first=True` win over earlier ones."""
    _ADAPTERS.insert(0 if first else len(_ADAPTERS), adapter)
    return adapter


def get_adapter(model: nn.Module) -> ModelAdapter:
    model = unwrap_model(model)
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(f"No model adapter matches {type(model).__name__}; register one with `register_adapter`.")


# --- generic torch module: forward(x) -> logits --------------------------------------------------------------
def _generic_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"Cannot find logits in the output of {type(model).__name__}: {type(out).__name__}")


def _generic_num_labels(model: nn.Module) -> int | None:
    name = _last_linear_with_outputs(model, None)
    return None if name is None else model.get_submodule(name).out_features


register_adapter(
    ModelAdapter(
        name="torch",
        matches=lambda model: True,
        logits=_generic_logits,
        num_labels=_generic_num_labels,
        classifier_module_name=lambda model: _last_linear_with_outputs(model, None),
    )
)


# --- timm ----------------------------------------------------------------------------------------------------
def _is_timm(model: nn.Module) -> bool:
    return hasattr(model, "get_classifier") and hasattr(model, "pretrained_cfg") and hasattr(model, "num_classes")


def _timm_classifier_name(model: nn.Module) -> str | None:
    head = model.get_classifier()
    if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
        return _module_name(model, head)
    return None


register_adapter(
    ModelAdapter(
        name="timm",
        matches=_is_timm,
        logits=lambda model, pixel_values: model(pixel_values),
        num_labels=lambda model: int(model.num_classes),
        classifier_module_name=_timm_classifier_name,
    )
)


# --- transformers --------------------------------------------------------------------------------------------
def _is_transformers(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _transformers_classifier_name(model: nn.Module) -> str | None:
    num_labels = model.config.num_labels
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Module):
        name = _last_linear_with_outputs(classifier, num_labels)
        if name is not None:
            return f"classifier.{name}" if name else "classifier"
    return _last_linear_with_outputs(model, num_labels)


register_adapter(
    ModelAdapter(
        name="transformers",
        matches=_is_transformers,
        logits=lambda model, pixel_values: model(pixel_values=pixel_values).logits,
        num_labels=lambda model: int(model.config.num_labels),
        classifier_module_name=_transformers_classifier_name,
    )
)


def forward_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of any supported classifier (wrapped or not) for a batch of images."""
    return get_adapter(model).logits(model, pixel_values)


def num_labels(model: nn.Module) -> int | None:
    model = unwrap_model(model)
    return get_adapter(model).num_labels(model)


def classifier_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of the classification head (excluded from pruning by default)."""
    model = unwrap_model(model)
    name = get_adapter(model).classifier_module_name(model)
    if name is None:
        return set()
    head = model.get_submodule(name)
    prefix = f"{name}." if name else ""
    return {prefix + param_name for param_name, _ in head.named_parameters()}
