"""Pruning methods, one file each, selected by `pruning_method` (see `base.py` for the protocol)."""

from . import dg2pf, epsd, gradual, imp, movement, one_shot  # noqa: F401  (register the built-in methods)
from .base import (
    METHODS,
    MethodConfig,
    PruningMethod,
    ScheduledPruningMethod,
    build_method,
    get_method,
    register_method,
)

__all__ = [
    "METHODS",
    "MethodConfig",
    "PruningMethod",
    "ScheduledPruningMethod",
    "build_method",
    "get_method",
    "register_method",
]
