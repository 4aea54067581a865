"""Sparse checkpoints: save a pruned model so that it loads anywhere, and load it back bit-exactly.

Two on-disk formats, both safetensors only (loading never unpickles or executes anything):

* ``"dense"`` (default): the layout the model's own library reads, so the checkpoint loads with
  **plain** timm or transformers, hf_tgprune not installed:

  - timm: ``config.json`` written by timm's own ``save_config_for_hf`` (``architecture``, ``num_classes``,
    ``model_args``, ``pretrained_cfg``) + ``model.safetensors``; load with
    ``timm.create_model("local-dir:<folder>", pretrained=True)`` or, once pushed,
    ``timm.create_model("hf-hub:<repo_id>", pretrained=True)``.
  - transformers: ``save_pretrained`` (``config.json`` + ``model.safetensors``); load with
    ``AutoModelForImageClassification.from_pretrained(<folder or repo_id>)``.
  - any other ``nn.Module``: ``model.safetensors`` (its state dict).

  Pruned weights are written as exact ``+0.0`` wherever the mask is False.

* ``"bitmask"``: one ``model.bitmask.safetensors`` holding, per masked weight, a packed bitmask (the weight
  viewed as ``(out, -1)``, 1 bit per weight, rows padded to whole bytes) and the kept values in row-major
  order; unmasked tensors are stored as they are. A JSON header in the safetensors metadata records every
  tensor's shape, dtype, kind and the SHA-256 of its decoded bytes, so a corrupted or truncated file is a
  :class:`SparseFormatError`, never a silently wrong model. Read it with :func:`load_sparse`. The folder also
  holds the model's ``config.json`` (so the architecture can be rebuilt by the user's own library).

Tensors carry the names the model's library writes on disk (transformers 5 renames some parameters in
``save_pretrained``; the model adapter converts, see :mod:`hf_tgprune.core.adapters`), in both formats and in
``sparsity.json``. With ``data_config`` the folder also describes the preprocessing the model was trained and
evaluated with (timm ``pretrained_cfg``, transformers ``preprocessor_config.json``).

Both formats get a ``sparsity.json`` whose per-layer and total sparsity are measured by re-reading the
written file, plus the mask hash, the method and hyperparameters, teacher, calibration size, dataset,
metrics and library versions passed as ``metadata`` (model and dataset names as Hub ids or plain folder names,
never local paths).

Modules: :mod:`.bitmask` (the codec), :mod:`.weights` (reading weights files), :mod:`.record` (``sparsity.json``),
:mod:`.save` (:func:`save_sparse_model`), :mod:`.publish` (all-or-nothing publishing of a saved folder),
:mod:`.formats` (file names, checksums).
"""

from .bitmask import BITMASK_FORMAT, BITMASK_FORMAT_VERSION, decode_bitmask, encode_bitmask_state_dict
from .formats import (
    BITMASK_WEIGHTS_NAME,
    CONFIG_NAME,
    DENSE_WEIGHTS_NAME,
    PREPROCESSOR_CONFIG_NAME,
    SAVE_FORMATS,
    SPARSITY_FILE_NAME,
    SparseFormatError,
    sha256_file,
)
from .record import read_sparsity_record
from .save import save_sparse_model
from .weights import (
    load_sparse,
    load_sparse_masks,
    read_model_state_dict,
    read_weights,
    resolve_weights_file,
    restore_kernel_masks,
    verify_sparse_folder,
)

__all__ = [
    "BITMASK_FORMAT",
    "BITMASK_FORMAT_VERSION",
    "BITMASK_WEIGHTS_NAME",
    "CONFIG_NAME",
    "DENSE_WEIGHTS_NAME",
    "PREPROCESSOR_CONFIG_NAME",
    "SAVE_FORMATS",
    "SPARSITY_FILE_NAME",
    "SparseFormatError",
    "decode_bitmask",
    "encode_bitmask_state_dict",
    "load_sparse",
    "load_sparse_masks",
    "read_model_state_dict",
    "read_sparsity_record",
    "read_weights",
    "resolve_weights_file",
    "restore_kernel_masks",
    "save_sparse_model",
    "sha256_file",
    "verify_sparse_folder",
]
