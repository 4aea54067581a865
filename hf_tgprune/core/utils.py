"""Small helpers shared across the package: JSON-able values, atomic file writes, local paths vs Hub ids."""

from __future__ import annotations

import enum
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "match_patterns",
    "atomic_path",
    "is_hub_id",
    "is_local_path",
    "jsonable",
    "public_name",
    "write_json_atomic",
    "write_text_atomic",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def jsonable(value: Any) -> Any:
    """`value` made JSON-serialisable: mappings, sequences and sets recursively, enums by value, tensors and numpy
    values as numbers or lists, paths as strings, non-finite floats as strings; anything else falls back to
    ``str()``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "numel") and value.numel() == 1:  # one-element tensors as numbers
        return jsonable(value.item())
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    return str(value)


def _publish(tmp: str, path: Path) -> None:
    """Give a finished temporary file the usual permissions (mkstemp makes it 0600) and move it in place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Write a file atomically: yields a temporary path next to `path`, renamed onto `path` only if the block
    succeeds, so a crash or an error never leaves a half-written file (a reader sees the old file or the new one).

    Example:
        >>> with atomic_path("model.safetensors") as tmp:
        ...     safetensors.torch.save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json_atomic(data: Any, path: str | os.PathLike, *, indent: int = 2) -> None:
    """Write `data` (made JSON-able with :func:`jsonable`) as indented JSON to `path` atomically."""
    write_text_atomic(json.dumps(jsonable(data), indent=indent) + "\n", path)


def is_local_path(name: str | os.PathLike) -> bool:
    """Whether `name` names a local file or folder rather than a Hub id or a registered model name: an absolute
    path, one starting with ``.`` or ``~``, or one that exists."""
    name = os.fspath(name)
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(os.path.expanduser(name))


def is_hub_id(value: Any, *, namespaced: bool = False) -> bool:
    """Whether `value` is shaped like a Hugging Face Hub id (``name`` or ``owner/name``) and is not a local path.

    Args:
        namespaced: require the ``owner/name`` form (the Hub's ``base_model`` metadata wants it).
    """
    return (
        isinstance(value, str)
        and bool(_HUB_ID.match(value))
        and ".." not in value
        and (not namespaced or "/" in value)
        and not is_local_path(value)
    )


def public_name(value: Any) -> Any:
    """A name that is safe to publish: Hub ids and plain names as they are, a local path as its folder name
    (``/home/me/runs/teacher`` -> ``teacher``, ``../data/cifar10`` -> ``cifar10``). Non-strings are returned
    unchanged."""
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = os.fspath(value)
    if is_hub_id(text) or not is_local_path(text):
        return text
    return Path(os.path.abspath(os.path.expanduser(text))).name or text


def match_patterns(names, patterns, argument: str, what: str = "parameter") -> set[str]:
    """The names any of the regular expressions `patterns` matches (`re.search`); a pattern that matches nothing is
    an error naming `argument`, the pattern and examples of the names it was tried on.

    Args:
        names: the names to select from.
        patterns: regular expressions, or None for none.
        argument: the argument the patterns came from, for the message (e.g. "prune_include").
        what: what the names are, for the message (e.g. "prunable parameter").
    """
    names = list(names)
    matched: set[str] = set()
    for pattern in patterns or []:
        hits = {name for name in names if re.search(pattern, name)}
        if not hits:
            raise ValueError(
                f"`{argument}` pattern {pattern!r} matches no {what}; patterns are regular expressions matched with "
                f"re.search against names such as {names[:3]}. Fix or remove the pattern."
            )
        matched |= hits
    return matched


def replace_submodule(model, name: str, new) -> None:
    """Put the module `new` in place of `model`'s submodule `name` (a dotted name, as `named_modules` gives)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
