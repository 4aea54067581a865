"""Load image classifiers by name or path, whatever library they come from.

`load_image_classifier("resnet18", num_labels=10)` and friends accept:

- timm model names (`resnet18`, `vit_tiny_patch16_224`), timm Hub ids (`hf-hub:timm/resnet18.a1_in1k`,
  `timm/resnet18.a1_in1k`) and folders written by timm or by `hf_tgprune.save_sparse_model` for a timm model
  (a `config.json` with an `architecture` key);
- transformers model ids and folders (`AutoModelForImageClassification`: a `config.json` with `model_type`).

Sources (`MODEL_SOURCES`) are tried in order; the first whose `matches` accepts the name loads it. Once
loaded, everything that depends on the model's library goes through its adapter (`hf_tgprune.core.adapters`).
Loading never guesses silently: a path that does not exist, an unknown name and a failed download
(offline) are `ModelLoadError`s that say what to pass instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..core.adapters import num_labels as model_num_labels
from ..core.utils import is_local_path

logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model name or path that cannot be loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class LoadRequest:
    """What the caller wants: `num_labels` classes (None: keep the checkpoint's), weights or not."""

    name_or_path: str
    num_labels: int | None = None
    pretrained: bool = False
    id2label: Mapping[int, str] | None = None
    label2id: Mapping[str, int] | None = None


@dataclass(frozen=True)
class ModelSource:
    """One way of loading a model by name: `matches(name)` says whether it applies, `load(request)` loads."""

    name: str
    matches: Callable[[str], bool]
    load: Callable[[LoadRequest], nn.Module]
    always_has_weights: bool = False  # local folders: their weights are the point


def _read_config(path: str) -> dict:
    """A local folder's ``config.json`` (empty when there is none). A file that is not a JSON object, or one that asks
    for code of its own (``auto_map``: transformers would import and run the folder's Python files), is refused."""
    config = Path(os.path.expanduser(path)) / "config.json"
    if not config.is_file():
        return {}
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ModelLoadError(
            f"{config} is not valid JSON ({type(err).__name__}: {str(err)[:80]}); it is truncated or corrupted. "
            "Restore the folder from its source or save the model again."
        ) from None
    if not isinstance(parsed, dict):
        raise ModelLoadError(f"{config} holds a JSON {type(parsed).__name__}, not a model config.")
    if "auto_map" in parsed:
        raise ModelLoadError(
            f"{config} has an `auto_map`: loading it would run the folder's own Python code, which hf_tgprune never "
            "does. Load the model yourself (e.g. with trust_remote_code=True after reading that code) and pass it in."
        )
    return parsed


def _hub_failure(name: str, error: Exception, what: str = "") -> ModelLoadError:
    detail = str(error).strip().rstrip(".")
    return ModelLoadError(
        f"Could not load {name!r}{what}: {type(error).__name__}: {detail}. If you are offline, pass a local folder "
        "(one written by this recipe, `save_sparse_model`, timm `save_for_hf` or transformers `save_pretrained`), "
        "or a timm architecture name without --pretrained to start from random weights."
    )


# --- timm ------------------------------------------------------------------------------------------------------
def _is_timm_name(name: str) -> bool:
    if name.startswith(("hf-hub:", "timm/")):
        return True
    if is_local_path(name):
        return False
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return timm.is_model(name)


def _timm_name(name: str) -> str:
    return f"hf-hub:{name}" if name.startswith("timm/") else name


def _create_timm(model_name: str, request: LoadRequest, pretrained: bool) -> nn.Module:
    import timm

    kwargs = {} if request.num_labels is None else {"num_classes": request.num_labels}
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        if "Unknown model" in str(error):
            raise ModelLoadError(f"{request.name_or_path!r} is not a timm model name.") from error
        raise _hub_failure(request.name_or_path, error) from error


def _load_timm(request: LoadRequest) -> nn.Module:
    name = _timm_name(request.name_or_path)
    return _create_timm(name, request, pretrained=request.pretrained or name.startswith("hf-hub:"))


def _is_timm_folder(name: str) -> bool:
    return is_local_path(name) and "architecture" in _read_config(name)


def _weights_numel(folder: Path) -> int | None:
    """How many values the folder's weights file holds, from its header alone (None without a weights file)."""
    from safetensors import safe_open

    from .serialization import BITMASK_WEIGHTS_NAME, DENSE_WEIGHTS_NAME
    from .serialization.bitmask import read_bitmask_header

    for name in (DENSE_WEIGHTS_NAME, BITMASK_WEIGHTS_NAME):
        if (folder / name).is_file():
            with safe_open(str(folder / name), framework="pt") as handle:
                header = read_bitmask_header(handle)
                if header is not None:
                    return sum(math.prod(entry["shape"]) for entry in header["tensors"].values())
                return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return None


def _refuse_what_the_weights_cannot_fill(name_or_path: str, build: Callable[[], nn.Module]) -> None:
    """Build the model that `config.json` describes on the meta device (no memory) and refuse it when it is far
    larger than the weights file beside it: an edited or foreign config must not allocate gigabytes."""
    folder = Path(os.path.expanduser(name_or_path))
    on_disk = _weights_numel(folder)
    if on_disk is None:
        return
    with torch.device("meta"):
        needed = sum(tensor.numel() for tensor in build().state_dict().values())
    if needed > 2 * on_disk + 10_000_000:  # room for a resized head, never for another model
        raise ModelLoadError(
            f"{folder / 'config.json'} describes a model of {needed:,} values, but its weights file holds {on_disk:,}: "
            "the config does not belong with the weights (edited, or from another model). Nothing was built; "
            "restore the folder from its source."
        )


def _timm_folder_on_meta(request: LoadRequest) -> nn.Module:
    import timm

    return timm.create_model(f"local-dir:{os.path.abspath(os.path.expanduser(request.name_or_path))}")


def _load_timm_folder(request: LoadRequest) -> nn.Module:
    _refuse_what_the_weights_cannot_fill(request.name_or_path, lambda: _timm_folder_on_meta(request))
    path = os.path.abspath(os.path.expanduser(request.name_or_path))
    return _create_timm(f"local-dir:{path}", request, pretrained=True)


# --- transformers ----------------------------------------------------------------------------------------------
def _is_transformers_folder(name: str) -> bool:
    return is_local_path(name) and "model_type" in _read_config(name)


def _label_kwargs(request: LoadRequest) -> dict:
    kwargs = {}
    if request.num_labels is not None:
        kwargs["num_labels"] = request.num_labels
    if request.id2label is not None:
        kwargs["id2label"] = {int(k): v for k, v in request.id2label.items()}
        kwargs["label2id"] = dict(request.label2id or {v: int(k) for k, v in request.id2label.items()})
    return kwargs


def _load_transformers(request: LoadRequest, *, pretrained: bool | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    pretrained = request.pretrained if pretrained is None else pretrained
    name = os.path.expanduser(request.name_or_path)
    try:
        if pretrained:
            return AutoModelForImageClassification.from_pretrained(
                name,
                ignore_mismatched_sizes=request.num_labels is not None,
                trust_remote_code=False,  # never run code that came with a model
                **_label_kwargs(request),
            )
        config = AutoConfig.from_pretrained(name, trust_remote_code=False, **_label_kwargs(request))
        return AutoModelForImageClassification.from_config(config)
    except (OSError, ValueError) as error:
        what = "" if is_local_path(name) else " as a transformers model id (it is not a timm model name)"
        raise _hub_failure(request.name_or_path, error, what) from error


def _transformers_folder_on_meta(request: LoadRequest) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(os.path.expanduser(request.name_or_path), trust_remote_code=False)
    return AutoModelForImageClassification.from_config(config)


def _load_transformers_folder(request: LoadRequest) -> nn.Module:
    _refuse_what_the_weights_cannot_fill(request.name_or_path, lambda: _transformers_folder_on_meta(request))
    return _load_transformers(request, pretrained=True)


# --- folders in hf_tgprune's compact bitmask format --------------------------------------------------------------
def _is_bitmask_folder(name: str) -> bool:
    from .serialization import BITMASK_WEIGHTS_NAME

    path = Path(os.path.expanduser(name))
    return is_local_path(name) and (path / BITMASK_WEIGHTS_NAME).is_file() and bool(_read_config(name))


def _load_bitmask_folder(request: LoadRequest) -> nn.Module:
    """The architecture from the folder's ``config.json`` (timm or transformers), then the weights decoded from
    ``model.bitmask.safetensors`` (verified). A head of another size than `num_labels` is left as built."""
    from .serialization import BITMASK_WEIGHTS_NAME, read_model_state_dict

    config = _read_config(request.name_or_path)
    if "architecture" in config:
        _refuse_what_the_weights_cannot_fill(request.name_or_path, lambda: _timm_folder_on_meta(request))
        path = os.path.abspath(os.path.expanduser(request.name_or_path))
        model = _create_timm(f"local-dir:{path}", request, pretrained=False)
    elif "model_type" in config:
        _refuse_what_the_weights_cannot_fill(request.name_or_path, lambda: _transformers_folder_on_meta(request))
        model = _load_transformers(request, pretrained=False)
    else:
        raise ModelLoadError(
            f"{request.name_or_path!r} holds {BITMASK_WEIGHTS_NAME} but its config.json was written by neither timm "
            "(`architecture`) nor transformers (`model_type`); build the model yourself and load the weights with "
            "hf_tgprune.load_sparse(folder, model)."
        )
    state = read_model_state_dict(request.name_or_path, model)
    own = model.state_dict()
    resized = sorted(k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    if resized and request.num_labels is None:
        raise ModelLoadError(f"{request.name_or_path!r}: {resized[:3]} do not fit the architecture in config.json.")
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in resized}, strict=False)
    if unexpected or set(missing) - set(resized):
        raise ModelLoadError(
            f"{request.name_or_path!r}: the weights do not fit the architecture in config.json (missing "
            f"{sorted(set(missing) - set(resized))[:3]}, unexpected {sorted(unexpected)[:3]})."
        )
    if resized:
        logger.warning(
            "%s: new, randomly initialised %s for %d labels", request.name_or_path, resized, request.num_labels
        )
    return model


# The lookup order: most specific first.
MODEL_SOURCES: tuple[ModelSource, ...] = (
    ModelSource("bitmask-folder", _is_bitmask_folder, _load_bitmask_folder, always_has_weights=True),
    ModelSource("timm-folder", _is_timm_folder, _load_timm_folder, always_has_weights=True),
    ModelSource("transformers-folder", _is_transformers_folder, _load_transformers_folder, always_has_weights=True),
    ModelSource("timm", _is_timm_name, _load_timm),
    ModelSource("transformers", lambda name: not is_local_path(name), _load_transformers),
)


def model_source(name_or_path: str) -> ModelSource:
    """The source that loads `name_or_path`.

    Raises:
        ModelLoadError: a path that does not exist, or a folder that neither timm nor transformers wrote.
    """
    if is_local_path(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise ModelLoadError(f"{name_or_path!r}: no such file or folder ({os.path.abspath(name_or_path)}).")
    for source in MODEL_SOURCES:
        if source.matches(name_or_path):
            return source
    raise ModelLoadError(
        f"Cannot load {name_or_path!r}: a folder needs a config.json written by timm (with `architecture`) or "
        "transformers (with `model_type`); otherwise pass a timm model name or a transformers model id."
    )


def _verify_folder(name_or_path: str) -> None:
    """A folder written by hf_tgprune (it has a ``sparsity.json``) is verified before it is loaded: the weights
    file's size and SHA-256, and the record's per-layer counts and mask hash (see ``read_weights``)."""
    from .serialization import SPARSITY_FILE_NAME, SparseFormatError, verify_sparse_folder

    folder = Path(os.path.expanduser(name_or_path))
    if not (folder / SPARSITY_FILE_NAME).is_file():
        return
    try:
        verify_sparse_folder(folder)
    except (SparseFormatError, FileNotFoundError) as error:
        raise ModelLoadError(f"Cannot load {name_or_path!r}: {error}") from error


def has_trained_weights(name_or_path: str, pretrained: bool) -> bool:
    """Whether loading `name_or_path` gives trained weights (a saved folder, a Hub checkpoint, or --pretrained)."""
    source = model_source(name_or_path)
    return source.always_has_weights or pretrained or name_or_path.startswith(("hf-hub:", "timm/"))


def load_image_classifier(
    name_or_path: str,
    num_labels: int | None = None,
    *,
    pretrained: bool = False,
    id2label: Mapping[int, str] | None = None,
    label2id: Mapping[str, int] | None = None,
    strict_num_labels: bool = False,
) -> nn.Module:
    """Build or load an image classifier with `num_labels` outputs.

    Saved folders and Hub checkpoints load their weights; plain architecture names (timm) and transformers ids
    load weights only with `pretrained=True`.

    Args:
        name_or_path: a timm name or Hub id, a transformers model id, or a folder saved by timm, transformers or
            `hf_tgprune.save_sparse_model`.
        num_labels: the number of classes; None keeps the checkpoint's. A checkpoint with another number gets a
            new, randomly initialised head, unless `strict_num_labels`.
        pretrained: load trained weights for architecture names and model ids.
        id2label: class names by index, for transformers configs.
        label2id: class indices by name, for transformers configs.
        strict_num_labels: raise instead of replacing the head (a trained teacher must match the dataset).

    Folders written by hf_tgprune (with a ``sparsity.json``) are verified first: a weights file whose size or
    SHA-256 differs from the recorded one, or a ``sparsity.json`` that does not match its weights, is refused.
    Folders in the compact bitmask format are loaded too (the architecture from ``config.json``, then the decoded
    weights).

    Raises:
        ModelLoadError: the name cannot be loaded (missing path, unknown name, offline), a saved folder is
            truncated, corrupted or inconsistent (the message names the file), or `strict_num_labels` and the model
            predicts another number of classes.
    """
    source = model_source(name_or_path)
    request = LoadRequest(name_or_path, None if strict_num_labels else num_labels, pretrained, id2label, label2id)
    if source.always_has_weights:
        _verify_folder(name_or_path)
    try:
        model = source.load(request)
    except SafetensorError as error:  # e.g. a folder without sparsity.json whose weights file is truncated
        weights = Path(os.path.expanduser(name_or_path)) / "model.safetensors"
        what = str(weights) if weights.is_file() else f"a safetensors file of {name_or_path}"
        raise ModelLoadError(
            f"Cannot load {name_or_path!r}: {what} is not a readable safetensors file ({error}); it is truncated or "
            "corrupted. Re-download or re-save the model."
        ) from error
    if source.always_has_weights:  # trained with masked standardised kernels: compute what was trained
        from .serialization import SPARSITY_FILE_NAME, SparseFormatError, restore_kernel_masks

        folder = Path(os.path.expanduser(name_or_path))
        if (folder / SPARSITY_FILE_NAME).is_file():
            try:
                restore_kernel_masks(folder, model, verify=False)
            except (SparseFormatError, FileNotFoundError) as error:
                raise ModelLoadError(f"Cannot load {name_or_path!r}: {error}") from error
    found = model_num_labels(model)
    if strict_num_labels and num_labels is not None and found != num_labels:
        raise ModelLoadError(
            f"{name_or_path!r} predicts {found} classes but the dataset has {num_labels}. Pass a model trained on "
            "this dataset, or leave it out to have the recipe train one."
        )
    logger.info("Loaded %s from %s (%s, %s classes)", type(model).__name__, name_or_path, source.name, found)
    return model
