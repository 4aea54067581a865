"""Helpers shared by the benchmark scripts: counting forward/backward images, JSON-lines result files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class PassCounter:
    """Images through forward passes of the hooked networks, and those that also go through a backward pass."""

    def __init__(self):
        self.forward = 0
        self.backward = 0
        self.enabled = True

    def __deepcopy__(self, memo):  # hooks copied with a network (DG2PF's dense copy) keep counting here
        return self

    def hook(self, module, inputs, output):
        if not self.enabled:
            return
        n = inputs[0].shape[0]
        self.forward += n
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            self.backward += n

    def attach(self, model: nn.Module):
        return model.register_forward_hook(self.hook)


def load_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (one finished run per line); none when it does not exist."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: Path, record: dict) -> None:
    """Add one finished run to a JSON-lines file, so that a killed stage resumes after the last run it finished."""
    with path.open("a") as file:
        file.write(json.dumps(record) + "\n")
