"""Push a saved sparse folder to the Hugging Face Hub (``create_repo`` + ``upload_folder``).

The network path is deliberately thin: everything up to the `huggingface_hub.HfApi` calls (which files are uploaded,
the checks that the folder is a complete sparse checkpoint, the model card) is local. Every failure of the push (no
token, offline mode, 401, 403, 404, 413, 5xx, network, a connection dropped mid-upload) becomes one
:class:`HubPushError` that says what to do; nothing in the local folder is modified by a failed push.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import HfApi

from .serialization import SPARSITY_FILE_NAME, read_sparsity_record, resolve_weights_file
from .serialization.record import describes, verify_record_files

logger = logging.getLogger(__name__)

# Never uploaded: hidden files and folders, Trainer scratch (`_*`), checkpoints (pushed separately), temp files.
DEFAULT_IGNORE_PATTERNS = (".*", "*/.*", "_*", "checkpoint-*", "checkpoint-*/*", "*.tmp", "*/*.tmp")


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message says why and what to do. The local folder is left as it was."""

    def __init__(self, message: str, *, folder: str, repo_id: str, reason: str):
        super().__init__(message)
        self.folder = folder
        self.repo_id = repo_id
        self.reason = reason


def _status_code(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return int(status) if isinstance(status, int) else None


def _hub_error(err: BaseException) -> BaseException:
    """The HTTP or transport error behind `err`: huggingface_hub re-raises a failed LFS upload as
    ``RuntimeError("Error while uploading ...")`` chained to it."""
    from huggingface_hub import errors

    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, errors.HfHubHTTPError) or _status_code(cause) is not None or _is_network_error(cause):
            return cause
        cause = cause.__cause__
    return err


def _explain(err: BaseException) -> tuple[str, str, str]:
    """(reason, what happened, what to do) for an exception raised by huggingface_hub."""
    from huggingface_hub import errors

    err = _hub_error(err)

    if isinstance(err, errors.LocalTokenNotFoundError):
        return "no_token", "no Hugging Face token was found", _TOKEN_FIX
    if isinstance(err, errors.OfflineModeIsEnabled):
        return (
            "offline",
            "huggingface_hub is in offline mode (HF_HUB_OFFLINE=1)",
            "Unset HF_HUB_OFFLINE to push, or push later from a machine with network access.",
        )
    if isinstance(err, errors.HFValidationError):
        return "invalid_repo_id", f"the repo id is not valid ({err})", "Use a repo id of the form 'user-or-org/name'."
    status = _status_code(err)
    if isinstance(err, errors.HfHubHTTPError) or status is not None:
        server = getattr(err, "server_message", None) or str(err).splitlines()[0]
        if status == 401:
            return (
                "unauthorized",
                "the Hub rejected the token (401 Unauthorized)",
                "The token is missing, invalid or expired: log in again with `hf auth login`, set HF_TOKEN, or pass "
                "a valid write token (token=... / hub_token=...).",
            )
        if status == 403:
            return (
                "forbidden",
                "the token may not write to this repo (403 Forbidden)",
                "Use a token with write access to this namespace (fine-grained tokens need the write permission), "
                "or push to a namespace you own.",
            )
        if status == 404 or isinstance(err, errors.RepositoryNotFoundError):
            return (
                "not_found",
                "the repo or its namespace was not found (404)",
                "Check the repo id (hub_model_id, 'user-or-org/name'): the user or organisation must exist and your "
                "token must be able to see it; create the repo first if create_repo=False.",
            )
        if status == 413:
            return (
                "too_large",
                "the Hub refused the upload as too large (413 Payload Too Large)",
                "A file or the commit is over a size limit of the Hub or of a proxy in between (check the proxy's "
                "request-size limit); weights must be safetensors files, which go through LFS/Xet, and very large "
                "checkpoints must be saved in shards. Then retry.",
            )
        return (
            "http_error",
            f"the Hub answered HTTP {status}: {server}",
            "This is usually temporary: retry later; check https://status.huggingface.co.",
        )
    if _is_network_error(err):
        return (
            "network",
            f"the Hub could not be reached or the connection dropped ({type(err).__name__}: {err})",
            "Check the network connection, proxy settings and HF_ENDPOINT, then retry.",
        )
    return "unknown", f"{type(err).__name__}: {err}", "See the chained exception above."


_TOKEN_FIX = (
    "Log in with `hf auth login`, set the HF_TOKEN environment variable, or pass token=... "
    "(hub_token=... in the training arguments); the token needs write access."
)


def _is_network_error(err: BaseException) -> bool:
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    try:  # huggingface_hub >= 1.0 talks HTTP through httpx (httpx2 in 2.x); older versions through requests
        import httpx2

        if isinstance(err, httpx2.TransportError):
            return True
    except ImportError:
        pass
    try:
        import httpx

        if isinstance(err, httpx.TransportError):
            return True
    except ImportError:
        pass
    try:
        import requests

        if isinstance(err, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:
        pass
    return False


def _fail(folder: Path, repo_id: str, reason: str, what: str, fix: str) -> HubPushError:
    return HubPushError(
        f"Could not push {folder} to the Hugging Face Hub repo {repo_id!r}: {what}. {fix} The local output in "
        f"{folder} is intact; push it later with `hf_tgprune.push_sparse_folder({str(folder)!r}, {repo_id!r})` or "
        f"`hf upload {repo_id} {folder}`.",
        folder=str(folder),
        repo_id=repo_id,
        reason=reason,
    )


def sparse_folder_files(
    folder: str | os.PathLike, ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS
) -> list[str]:
    """The files of `folder` that a push uploads (relative POSIX paths, sorted).

    Args:
        folder: the local folder.
        ignore_patterns: ``fnmatch`` patterns of relative paths left out (hidden files are always left out).
    """
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder).as_posix()
        if any(fnmatch(relative, pattern) for pattern in ignore_patterns):
            continue
        if any(part.startswith(".") for part in Path(relative).parts):
            continue
        files.append(relative)
    return files


def check_sparse_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Check that `folder` is a complete sparse checkpoint before it is uploaded; returns its sparsity record.

    Raises:
        FileNotFoundError: no ``sparsity.json`` or no weights file.
        SparseFormatError: ``sparsity.json`` is truncated, has no ``files`` entry for its weights file, or the file's
            size or SHA-256 differ from the recorded ones.
    """
    folder = Path(folder)
    record = read_sparsity_record(folder)
    weights_file = resolve_weights_file(folder)  # the file that is there, never a path the record names
    describes(record, weights_file)  # raises when the record names the other format's file
    verify_record_files(record, weights_file)
    return record


def push_sparse_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    path_in_repo: str | None = None,
    create_repo: bool = True,
    write_model_card: bool = True,
    require_sparse_checkpoint: bool = True,
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
    model_card_kwargs: dict[str, Any] | None = None,
) -> huggingface_hub.CommitInfo:
    """Upload a folder written by ``save_sparse_model`` (or a Trainer checkpoint) to a Hub model repo.

    Args:
        folder: the local folder; only the files listed by :func:`sparse_folder_files` are uploaded (exactly
            those: they are passed as ``allow_patterns``).
        repo_id: ``"user-or-org/name"``.
        token: a write token; defaults to the one huggingface_hub finds (``HF_TOKEN``, ``hf auth login``).
        private: visibility when the repo is created (ignored for existing repos).
        create_repo: call ``create_repo(exist_ok=True)`` first.
        write_model_card: when the folder has a ``sparsity.json`` but no ``README.md``, write the card
            (:func:`hf_tgprune.io.modelcard.create_model_card`) into the folder before uploading.
        require_sparse_checkpoint: refuse to upload a folder without a valid ``sparsity.json`` and weights file
            (set False for Trainer checkpoint folders that hold other state).

    Returns:
        the ``huggingface_hub.CommitInfo`` of the upload.

    Raises:
        HubPushError: for every failure (missing or corrupted local checkpoint, no token, offline mode, 401, 403,
            404, 413, 5xx, network errors, a connection dropped during an upload), naming the fix. The local folder
            is never modified by a failed push.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise _fail(folder, repo_id, "missing_folder", "the folder does not exist", "Save the model first.")
    record = None
    if require_sparse_checkpoint or (folder / SPARSITY_FILE_NAME).is_file():
        try:
            record = check_sparse_folder(folder)
        except (OSError, ValueError, KeyError) as err:
            raise _fail(
                folder,
                repo_id,
                "invalid_checkpoint",
                f"it is not a complete sparse checkpoint ({err})",
                "Re-save it with `hf_tgprune.save_sparse_model` (or `trainer.save_model()`) before pushing.",
            ) from err
    if token is None and huggingface_hub.get_token() is None:
        raise _fail(folder, repo_id, "no_token", "no Hugging Face token was found", _TOKEN_FIX)
    if write_model_card and record is not None and not (folder / "README.md").exists():
        from .modelcard import create_model_card

        create_model_card(record, repo_id=repo_id, **(model_card_kwargs or {})).save(folder / "README.md")

    files = sparse_folder_files(folder, ignore_patterns)
    if not files:
        raise _fail(folder, repo_id, "empty_folder", "there is nothing to upload", "Save the model first.")

    api = HfApi(token=token)
    try:
        if create_repo:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            path_in_repo=path_in_repo,
            commit_message=commit_message or "Upload sparse model with hf_tgprune",
            revision=revision,
            repo_type="model",
            allow_patterns=[glob.escape(name) for name in files],
        )
    except Exception as err:  # every huggingface_hub / transport failure becomes one HubPushError
        reason, what, fix = _explain(err)
        if reason == "unknown" and not isinstance(err, OSError):
            raise
        raise _fail(folder, repo_id, reason, what, fix) from err


def create_hub_repo(
    repo_id: str, *, token: str | None = None, private: bool | None = None, folder: str | os.PathLike = "."
) -> str:
    """``create_repo(exist_ok=True)`` with the same error handling as :func:`push_sparse_folder`; returns the id.

    Args:
        repo_id: ``"user-or-org/name"`` (or a bare name in the token's namespace).
        token: a write token; defaults to the one huggingface_hub finds.
        private: visibility of a new repo.
        folder: the local folder named in error messages.

    Raises:
        HubPushError: no token, offline mode, 401, 403, 404 or network errors, naming the fix.
    """
    folder = Path(folder)
    if token is None and huggingface_hub.get_token() is None:
        raise _fail(folder, repo_id, "no_token", "no Hugging Face token was found", _TOKEN_FIX)
    try:
        return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    except Exception as err:
        reason, what, fix = _explain(err)
        if reason == "unknown" and not isinstance(err, OSError):
            raise
        raise _fail(folder, repo_id, reason, what, fix) from err


__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "HubPushError",
    "check_sparse_folder",
    "create_hub_repo",
    "push_sparse_folder",
    "sparse_folder_files",
]
