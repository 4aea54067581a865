"""Model adapters: the one place that knows how timm, transformers and plain torch classifiers differ.

Every other module asks the adapter of a model (:func:`get_adapter`) for what depends on its library: logits, the
number of labels, the classifier heads (never pruned by default), the data config, a public name, the names its
weights have on disk, the ``config.json`` (and preprocessing) its own library reads, and the load snippets of its
model card. Students and teachers can be any mix of ``timm.create_model(...)``, ``AutoModelForImageClassification``
and plain ``nn.Module`` classifiers. A new model family is a subclass of :class:`ModelAdapter` registered with
:func:`register_adapter`; no caller changes.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import weakref
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .preprocessing import DEFAULT_IMAGE_SIZE, PIL_RESAMPLE, DataConfig
from .utils import atomic_path, public_name, write_json_atomic

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

# PIL resampling filters by name (the integers transformers image processors store as `resample`)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / DeepSpeed / FSDP and ``torch.compile`` wrappers, in any nesting
    (``accelerate.utils.extract_model_from_parallel``; the parameters are shared with the wrapper)."""
    from accelerate.utils import extract_model_from_parallel

    # every wrapper holds the model in `.module` (DDP, DataParallel, DeepSpeed, FSDP) or `._orig_mod` (compile):
    # a plain model returns at once, without accelerate's walk over its modules (this runs at every step)
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        inner = extract_model_from_parallel(model, keep_torch_compile=False)
        if inner is model:
            break
        model = inner
    return model


def preprocessing_dict(data_config: Any) -> dict[str, Any]:
    """The preprocessing a model was trained and evaluated with, as a plain dict.

    Args:
        data_config: a ``hf_tgprune.data.DataConfig`` (or any dataclass / mapping) with ``image_size`` (the side of
            the square input), ``mean``, ``std`` and optionally ``interpolation`` (default ``"bilinear"``). Images
            are resized (shorter side) to ``image_size``, center-cropped to ``image_size`` × ``image_size`` and
            normalised with ``mean`` / ``std``.

    Raises:
        ValueError: a field is missing or has the wrong type.
    """
    fields = asdict(data_config) if is_dataclass(data_config) else dict(data_config)
    missing = [key for key in ("image_size", "mean", "std") if fields.get(key) is None]
    if missing:
        raise ValueError(
            f"data_config lacks {missing}; pass the DataConfig used for training and evaluation "
            "(hf_tgprune.data.resolve_data_config), or a dict with image_size, mean, std and interpolation."
        )
    interpolation = str(fields.get("interpolation") or "bilinear")
    if interpolation not in PIL_RESAMPLE:
        raise ValueError(f"data_config interpolation {interpolation!r} is not one of {sorted(PIL_RESAMPLE)}.")
    return {
        "image_size": int(fields["image_size"]),
        "mean": [float(v) for v in fields["mean"]],
        "std": [float(v) for v in fields["std"]],
        "interpolation": interpolation,
    }


def _module_names(model: nn.Module, targets: list[nn.Module]) -> list[str]:
    wanted = {id(module) for module in targets}
    return [name for name, module in model.named_modules() if id(module) in wanted]


def _last_linear(model: nn.Module, out_features: int | None = None) -> str | None:
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (out_features is None or module.out_features == out_features):
            name = module_name
    return name


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


# model -> (the identity of its modules when traced, traced heads); a model whose modules change is traced again
_TRACED_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TRACE_SIZES = (DEFAULT_IMAGE_SIZE, 32, 64)
_HEAD_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _out_channels(output: Any) -> int | None:
    """Channels of a module output: dim 1 of a (B, C, ...) tensor or the last dim of a (B, C) one."""
    if isinstance(output, torch.Tensor) and output.dim() >= 2:
        return int(output.shape[1])
    return None


def _trace_heads(model: nn.Module) -> tuple[list[str], int] | None:
    """The modules that produce the logits of a plain torch classifier, found by running it once.

    A forward pass on one blank image (eval mode, no gradients, the model's training flags restored) records every
    Linear and convolution, in execution order. The head is the last of them whose output has the logits'
    number of channels (a Linear or a 1x1 convolution such as SqueezeNet's, wherever it is registered); Linear and
    Conv modules that never run in eval mode but output that many channels (auxiliary classifiers such as GoogLeNet's
    `aux1.fc2`) are heads too. Returns (head names, number of labels), or None when no input size runs the model.
    """
    parameter = next(iter(model.parameters()), None)
    if parameter is None or parameter.is_meta:
        return None
    ran: list[tuple[str, int | None]] = []
    owners = {name: module for name, module in model.named_modules() if isinstance(module, _HEAD_TYPES)}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: ran.append((name, _out_channels(out))))
        for name, module in owners.items()
    ]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        for size in _TRACE_SIZES:
            ran.clear()
            try:
                with torch.no_grad():
                    output = ModelAdapter.logits(
                        ModelAdapter(),
                        model,
                        torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype),
                    )
            except Exception:  # another input size, or a model that does not take images this way
                continue
            if output.dim() != 2:
                continue
            labels = int(output.shape[-1])
            heads = [name for name, channels in ran if channels == labels][-1:]
            if not heads:
                return None
            executed = {name for name, _ in ran}
            heads += [
                name
                for name, module in owners.items()
                if name not in executed
                and getattr(module, "out_features", getattr(module, "out_channels", None)) == labels
            ]
            return heads, labels
        return None
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training


def traced_heads(model: nn.Module) -> tuple[list[str], int] | None:
    """`_trace_heads` once per model (traced again when its modules change); logs the heads it finds."""
    identity = tuple(id(module) for module in model.modules())
    cached = _TRACED_HEADS.get(model)
    if cached is not None and cached[0] == identity:
        return cached[1]
    found = _trace_heads(model)
    if found is None:
        logger.warning(
            "Could not find the classifier head of %s by running it on a blank image; taking its last nn.Linear. "
            "Pass prune_exclude with the head's name if that is wrong.",
            type(model).__name__,
        )
    else:
        logger.info("Classifier head(s) of %s (never pruned by default): %s", type(model).__name__, found[0])
    _TRACED_HEADS[model] = (identity, found)
    return found


class ModelAdapter:
    """How to drive one family of image classifiers; the base class is the plain-``nn.Module`` family.

    Subclass it, override what differs and register an instance with :func:`register_adapter`. Every method takes
    the unwrapped model.
    """

    name = "torch"
    #: ``library_name`` of the model card (the Hub's "Use this model" button), None for plain torch
    library_name: str | None = None
    #: extra tags of the model card
    card_tags: tuple[str, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter drives `model`."""
        return True

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        out = model(pixel_values)
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)):
            return out[0]
        raise TypeError(f"Cannot find logits in the output of {type(model).__name__}: {type(out).__name__}")

    def num_labels(self, model: nn.Module) -> int | None:
        """Number of classes the model predicts (None when unknown): the width of its logits on a blank image."""
        traced = traced_heads(model)
        if traced is not None:
            return traced[1]
        name = _last_linear(model)
        return None if name is None else model.get_submodule(name).out_features

    def classifier_module_names(self, model: nn.Module) -> list[str]:
        """Names of every classification head of the model (several for distilled models); never pruned by
        default. For a plain torch model: the layers that produce its logits (see `traced_heads`), else its last
        `nn.Linear`."""
        traced = traced_heads(model)
        if traced is not None:
            return traced[0]
        name = _last_linear(model)
        return [] if name is None else [name]

    def data_config(self, model: nn.Module):
        """The ``hf_tgprune.data.DataConfig`` (input size, mean, std, interpolation) the model expects."""
        return DataConfig()

    def image_processor(self, model: nn.Module, name_or_path: str) -> Any | None:
        """The library's image processor saved with the model `name_or_path`, or None when there is none."""
        return None

    def model_name(self, model: nn.Module) -> str:
        """A name for the model in ``sparsity.json`` and the model card (never a local path)."""
        return type(model).__name__

    # --- the saved folder -------------------------------------------------------------------------------------
    def checkpoint_state_dict(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict:
        """`state_dict` (keyed like ``model.state_dict()``) as the model's library writes it to disk: the names
        (and, for fused layouts, the tensors) of its weights file."""
        return dict(state_dict)

    def model_state_dict(self, model: nn.Module, checkpoint: Mapping[str, torch.Tensor]) -> dict:
        """The inverse of :meth:`checkpoint_state_dict`: tensors read from disk keyed like ``model.state_dict()``."""
        return dict(checkpoint)

    def save_config(self, model: nn.Module, output_dir: Path, preprocessing: dict | None = None) -> None:
        """Write the files (besides the weights) that the model's library reads to rebuild it: ``config.json``
        and, when `preprocessing` (:func:`preprocessing_dict`) is given, the preprocessing it was trained with."""

    def save_weights(self, model: nn.Module, output_dir: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Write ``model.safetensors`` (dense) as the model's own library writes it."""
        tensors = {k: v.contiguous() for k, v in self.checkpoint_state_dict(model, state_dict).items()}
        with atomic_path(output_dir / WEIGHTS_NAME) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})

    # --- the model card ---------------------------------------------------------------------------------------
    def card_load_snippets(self, repo_id: str, preprocessing: bool = False) -> list[str]:
        """Markdown paragraphs of the model card that load the dense checkpoint `repo_id` (no hf_tgprune needed).

        Args:
            preprocessing: the folder describes its preprocessing (``hf_tgprune.save_sparse_model(data_config=...)``).
        """
        return [
            "A plain PyTorch state dict (build the architecture yourself):\n\n```python\n"
            "from huggingface_hub import hf_hub_download\nfrom safetensors.torch import load_file\n\n"
            f'model.load_state_dict(load_file(hf_hub_download("{repo_id}", "{WEIGHTS_NAME}")))\n```\n'
        ]

    def card_architecture_snippet(self, repo_id: str) -> tuple[str, str]:
        """(imports, code) of the model card that build the architecture of `repo_id` without its weights."""
        return "", "model = ...  # build the same architecture"


# --- timm ----------------------------------------------------------------------------------------------------
class TimmAdapter(ModelAdapter):
    """``timm.create_model(...)`` classifiers; saved with timm's own ``config.json`` writer (``save_for_hf``)."""

    name = "timm"
    library_name = "timm"
    card_tags = ("timm",)

    def matches(self, model: nn.Module) -> bool:
        return all(hasattr(model, attr) for attr in ("get_classifier", "pretrained_cfg", "num_classes"))

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values)

    def num_labels(self, model: nn.Module) -> int | None:
        return int(model.num_classes)

    def classifier_module_names(self, model: nn.Module) -> list[str]:
        # timm declares its heads twice: `get_classifier()` (a tuple for distilled models) and the
        # `pretrained_cfg["classifier"]` names that timm resets when it changes the number of classes
        heads = model.get_classifier()
        heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
        names = _module_names(model, [h for h in heads if isinstance(h, nn.Module) and _has_weights(h)])
        declared = model.pretrained_cfg.get("classifier") or ()
        for name in [declared] if isinstance(declared, str) else declared:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            if _has_weights(module) and name not in names:
                names.append(name)
        return names

    def data_config(self, model: nn.Module):
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(model)
        return DataConfig(
            image_size=int(config["input_size"][-1]),
            mean=tuple(config["mean"]),
            std=tuple(config["std"]),
            interpolation=str(config.get("interpolation") or "bilinear"),
        )

    def model_name(self, model: nn.Module) -> str:
        return model.pretrained_cfg.get("architecture") or type(model).__name__

    def save_config(self, model: nn.Module, output_dir: Path, preprocessing: dict | None = None) -> None:
        from timm.models._hub import save_config_for_hf

        config_path = output_dir / CONFIG_NAME
        data_config = None
        if preprocessing is not None:
            side = preprocessing["image_size"]
            data_config = {
                "input_size": (int(model.pretrained_cfg.get("input_size", (3,))[0]), side, side),
                "crop_pct": 1.0,
                "crop_mode": "center",
                "mean": tuple(preprocessing["mean"]),
                "std": tuple(preprocessing["std"]),
                "interpolation": preprocessing["interpolation"],
            }
        native = "data_config" in inspect.signature(save_config_for_hf).parameters  # timm >= 1.0.20
        with atomic_path(config_path) as tmp:
            try:
                save_config_for_hf(model, tmp, **({"data_config": data_config} if native else {}))
            except ValueError as err:
                raise ValueError(
                    f"data_config does not fit {type(model).__name__}: {err} Pass the DataConfig the model was "
                    "trained and evaluated with."
                ) from err
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if data_config is not None and not native:
            pretrained_cfg = config.setdefault("pretrained_cfg", {})
            pretrained_cfg.update(data_config)
            for key in ("test_input_size", "test_crop_pct", "test_pool_size"):
                pretrained_cfg.pop(key, None)
        model_args = config.get("model_args") or {}
        if model_args.get("num_classes") == config.get("num_classes"):
            # Redundant with the top-level `num_classes` (which timm reads); transformers' TimmWrapper passes
            # num_classes itself and fails on the duplicate, so drop it: the folder then loads with both.
            del model_args["num_classes"]
        write_json_atomic(config, config_path)

    def card_load_snippets(self, repo_id: str, preprocessing: bool = False) -> list[str]:
        return [
            "With timm (no hf_tgprune needed), with the preprocessing it was trained and evaluated with:\n\n"
            "```python\nimport timm\n\n"
            f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n'
            "data_config = timm.data.resolve_model_data_config(model)\n"
            "transform = timm.data.create_transform(**data_config, is_training=False)\n```\n",
            "With transformers (timm checkpoints load through `TimmWrapper`):\n\n```python\n"
            "from transformers import AutoModelForImageClassification\n\n"
            f'model = AutoModelForImageClassification.from_pretrained("{repo_id}").eval()\n```\n',
        ]

    def card_architecture_snippet(self, repo_id: str) -> tuple[str, str]:
        return "import timm", f'model = timm.create_model("hf-hub:{repo_id}", pretrained=False)  # architecture only'


# --- transformers --------------------------------------------------------------------------------------------
class _ForwardConversions:
    """A model as seen by transformers' ``revert_weight_conversion`` with its conversions reversed, so that the
    function applies the loading direction (checkpoint names -> module names) instead of the saving one."""

    def __init__(self, model: nn.Module, conversions: list):
        self._model = model
        self._weight_conversions = conversions

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class TransformersAdapter(ModelAdapter):
    """``transformers.PreTrainedModel`` classifiers; saved with ``save_pretrained``.

    In transformers 5 the names of a model's parameters can differ from the names ``save_pretrained`` writes (for
    ViT, DeiT, BEiT, Dinov2, Swin, ...: ``vit.layers.0.attention.q_proj`` in memory,
    ``vit.encoder.layer.0.attention.attention.query`` on disk), and fused layouts can be split in memory. The
    mapping between the two is transformers' own weight conversion (``revert_weight_conversion`` when saving), so
    the files, the bitmask format and ``sparsity.json`` use the names on disk, whatever the model.
    """

    name = "transformers"
    library_name = "transformers"

    def matches(self, model: nn.Module) -> bool:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency
            return False
        return isinstance(model, PreTrainedModel)

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).logits

    def num_labels(self, model: nn.Module) -> int | None:
        return int(model.config.num_labels)

    def classifier_module_names(self, model: nn.Module) -> list[str]:
        # A `*ForImageClassification` model is its base model (`base_model_prefix`) plus its task heads: every
        # module outside the base model that holds weights (DeiT/LeViT with teacher and SwiftFormer have two).
        prefix = getattr(model, "base_model_prefix", "")
        base = getattr(model, prefix, None) if prefix else None
        if isinstance(base, nn.Module) and base is not model:
            heads = [name for name, child in model.named_children() if child is not base and _has_weights(child)]
            if heads:
                return heads
            adapter = get_adapter(base)  # e.g. TimmWrapper: the heads are those of the wrapped timm model
            if adapter.name != self.name:
                return [f"{prefix}.{name}" for name in adapter.classifier_module_names(base)]
        name = _last_linear(model, model.config.num_labels)
        return [] if name is None else [name]

    def data_config(self, model: nn.Module):
        size = getattr(model.config, "image_size", None)
        if isinstance(size, (list, tuple)):
            size = size[-1]
        return DataConfig(image_size=int(size or DEFAULT_IMAGE_SIZE))

    def image_processor(self, model: nn.Module, name_or_path: str) -> Any | None:
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError):
            return None

    def model_name(self, model: nn.Module) -> str:
        return public_name(getattr(model.config, "_name_or_path", None) or type(model).__name__)

    @staticmethod
    def _conversions(model: nn.Module) -> list | None:
        """The weight conversions ``revert_weight_conversion`` reverses when `model` is saved (None: names are
        the same in memory and on disk, e.g. transformers 4)."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import PrefixChange
        except ImportError:
            return None
        conversions = getattr(model, "_weight_conversions", None)
        if conversions is None:  # built from a config: the same default as `revert_weight_conversion`
            conversions = get_model_conversion_mapping(model, add_legacy=False)
            conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
        return conversions or None

    def checkpoint_state_dict(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict:
        if self._conversions(model) is None:
            return dict(state_dict)
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(model, dict(state_dict))

    def model_state_dict(self, model: nn.Module, checkpoint: Mapping[str, torch.Tensor]) -> dict:
        conversions = self._conversions(model)
        if conversions is None:
            return dict(checkpoint)
        from transformers.core_model_loading import revert_weight_conversion

        loading = [conversion.reverse_transform() for conversion in conversions][::-1]
        return revert_weight_conversion(_ForwardConversions(model, loading), dict(checkpoint))

    def save_config(self, model: nn.Module, output_dir: Path, preprocessing: dict | None = None) -> None:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(output_dir)
        if preprocessing is not None:
            self.preprocessor(preprocessing).save_pretrained(output_dir)

    @staticmethod
    def preprocessor(preprocessing: dict):
        """A transformers image processor doing exactly `preprocessing`: resize the shorter side, center crop,
        rescale to [0, 1], normalise."""
        from transformers import BitImageProcessor

        side = preprocessing["image_size"]
        return BitImageProcessor(
            do_resize=True,
            size={"shortest_edge": side},
            resample=PIL_RESAMPLE[preprocessing["interpolation"]],
            do_center_crop=True,
            crop_size={"height": side, "width": side},
            do_rescale=True,
            do_normalize=True,
            image_mean=list(preprocessing["mean"]),
            image_std=list(preprocessing["std"]),
            do_convert_rgb=True,
        )

    def save_weights(self, model: nn.Module, output_dir: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
        model.save_pretrained(output_dir, state_dict=dict(state_dict))
        if not (output_dir / WEIGHTS_NAME).is_file():
            raise RuntimeError(
                f"save_pretrained did not write a single {WEIGHTS_NAME} in {output_dir} (sharded?); sparse "
                "checkpoints expect one weights file."
            )

    def card_load_snippets(self, repo_id: str, preprocessing: bool = False) -> list[str]:
        processor = (
            f'processor = AutoImageProcessor.from_pretrained("{repo_id}")  # the preprocessing it was trained with\n'
            if preprocessing
            else ""
        )
        imports = (
            "AutoImageProcessor, AutoModelForImageClassification"
            if preprocessing
            else "AutoModelForImageClassification"
        )
        return [
            "With transformers (no hf_tgprune needed):\n\n```python\n"
            f"from transformers import {imports}\n\n"
            f'model = AutoModelForImageClassification.from_pretrained("{repo_id}").eval()\n{processor}```\n',
            "timm cannot build transformers architectures; use the transformers snippet above, or load the "
            "state dict into your own module:\n\n```python\nfrom huggingface_hub import hf_hub_download\n"
            "from safetensors.torch import load_file\n\n"
            f'state_dict = load_file(hf_hub_download("{repo_id}", "{WEIGHTS_NAME}"))\n```\n',
        ]

    def card_architecture_snippet(self, repo_id: str) -> tuple[str, str]:
        return (
            "from transformers import AutoConfig, AutoModelForImageClassification",
            f'model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained("{repo_id}"))',
        )


# --- registry ------------------------------------------------------------------------------------------------
_ADAPTERS: list[ModelAdapter] = []


def register_adapter(adapter: ModelAdapter, *, first: bool = True) -> ModelAdapter:
    """Register an adapter; an adapter registered with `first=True` is tried before the ones already there.

    Raises:
        ValueError: an adapter with the same ``name`` is registered already.
    """
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"register_adapter takes a ModelAdapter instance, got {type(adapter).__name__}.")
    if any(existing.name == adapter.name for existing in _ADAPTERS):
        raise ValueError(f"A model adapter named {adapter.name!r} is registered already; give yours another name.")
    _ADAPTERS.insert(0 if first else len(_ADAPTERS), adapter)
    return adapter


def get_adapter(model: nn.Module | str) -> ModelAdapter:
    """The adapter of `model` (wrappers are looked through), or the adapter registered under the name `model`.

    Raises:
        KeyError: no adapter is registered under that name.
    """
    if isinstance(model, str):
        for adapter in _ADAPTERS:
            if adapter.name == model:
                return adapter
        raise KeyError(f"No model adapter named {model!r}; registered: {[a.name for a in _ADAPTERS]}.")
    model = unwrap_model(model)
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(f"No model adapter matches {type(model).__name__}; register one with `register_adapter`.")


for _adapter in (TransformersAdapter(), TimmAdapter(), ModelAdapter()):  # most specific first
    register_adapter(_adapter, first=False)


# --- what callers use ----------------------------------------------------------------------------------------
def forward_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of any supported classifier (wrapped or not) for a batch of images."""
    return get_adapter(model).logits(model, pixel_values)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's float32 logits; images are cast to the teacher's own floating dtype first, so a bf16 or
    fp16 teacher distils into an fp32 student (and the other way round)."""
    dtype = next((p.dtype for p in unwrap_model(teacher).parameters() if p.is_floating_point()), pixel_values.dtype)
    return forward_logits(teacher, pixel_values.to(dtype)).float()


def num_labels(model: nn.Module) -> int | None:
    """Number of classes `model` predicts."""
    model = unwrap_model(model)
    return get_adapter(model).num_labels(model)


def check_same_num_labels(student: nn.Module, teacher: nn.Module | None) -> None:
    """Raise a clear error when the teacher predicts another number of classes than the student.

    Raises:
        ValueError: the two models disagree on the number of labels.
    """
    if teacher is None:
        return
    student_labels, teacher_labels = num_labels(student), num_labels(teacher)
    if student_labels != teacher_labels:
        raise ValueError(
            f"Teacher and student disagree on the number of labels ({teacher_labels} vs {student_labels}); "
            "build both with the dataset's number of classes (timm `num_classes`, transformers `num_labels`)."
        )


def classifier_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of every classification head (excluded from pruning by default)."""
    model = unwrap_model(model)
    names = set()
    for module_name in get_adapter(model).classifier_module_names(model):
        prefix = f"{module_name}." if module_name else ""
        names |= {prefix + name for name, _ in model.get_submodule(module_name).named_parameters()}
    return names


def model_name(model: nn.Module | None) -> str | None:
    """A public name for `model` (its Hub id, timm architecture or class name; never a local path)."""
    if model is None:
        return None
    model = unwrap_model(model)
    return public_name(get_adapter(model).model_name(model))


def data_config(model: nn.Module):
    """The ``hf_tgprune.data.DataConfig`` that `model`'s own library declares (input size, mean, std,
    interpolation)."""
    model = unwrap_model(model)
    return get_adapter(model).data_config(model)


def image_processor(model: nn.Module, name_or_path: str | os.PathLike) -> Any | None:
    """The image processor saved with `name_or_path` when `model`'s library has one (transformers), else None."""
    model = unwrap_model(model)
    return get_adapter(model).image_processor(model, os.fspath(name_or_path))
