"""Collation: a list of `{"pixel_values", "labels"}` examples -> one batch of tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into {"pixel_values": float [B, 3, H, W], "labels": long [B]}."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.as_tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }
