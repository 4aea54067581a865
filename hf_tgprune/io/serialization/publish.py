"""All-or-nothing publishing of a saved folder: write a complete sibling folder, then swap it in.

:func:`staged_folder` yields an empty staging folder next to the target (``.<name>.tgp-new-*``). The writers fill
it; only when they all succeed is it published: every entry of the existing folder that the new save does not write
(a model card, the user's own files, ``checkpoint-*`` folders, logs) is carried over by hard links (copied where
the file system has none), then the two folders are exchanged with one atomic ``renameat2(RENAME_EXCHANGE)``
(Linux), so that at every instant the path holds either the complete old folder or the complete new one. The old
folder, now in the sibling, is deleted. Where the exchange is not available, the old folder is renamed aside
(``.<name>.tgp-old-*``) and the new one renamed in; a kill between the two renames is repaired by the next save
(the complete new folder is renamed in).

A failure (or a kill) before the swap leaves the old folder untouched; the staging folder and any other leftover
(sibling folders, ``.tmp`` files of interrupted atomic writes) are removed by the next save into the same path.

Where the folder cannot be swapped — it is itself a mount point (a Docker volume, a Kubernetes PVC), it holds a
mount point or another file system (a ``-v`` volume inside it, which copying and deleting the old folder would
empty), or its parent is not writable — the save goes file by file instead: the files are written into a staging
folder inside `output_dir`, then ``sparsity.json`` is removed, each file is renamed into place (atomic per file),
and the new ``sparsity.json`` comes last, so a reader sees either a complete record that matches the files or none
(and a folder without its record is not verified as a sparse checkpoint). Nothing else in the folder is touched.

Writers of one folder on one machine take turns: each save holds a lock (a file in the system's temporary folder named
by the folder's path, released by the operating system if the writer dies) from its clean-up of leftovers to its swap, so that a save never removes the
staging folder of another live one; a save that cannot get the lock within `LOCK_TIMEOUT` seconds is refused with
an error naming the folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

NEW_TAG = "tgp-new"
OLD_TAG = "tgp-old"
# written into a staging folder once it is complete (removed when it is published)
COMPLETE_MARKER = ".tgp-complete"
# the temporary files of hf_tgprune.core.utils.atomic_path: ".<name>.<random>.tmp"
_ATOMIC_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
LOCK_TIMEOUT = 600.0  # seconds a save waits for another writer of the same folder


class FolderBusyError(RuntimeError):
    """Another writer held the folder for longer than `LOCK_TIMEOUT`."""


@contextmanager
def writer_lock(target: Path) -> Iterator[None]:
    """Hold the lock of `target`'s writers on this machine: a file lock in the system's temporary folder, named by the
    folder's real path (nothing is written beside or inside the folder; the OS releases it if this process dies)."""
    import hashlib

    from filelock import FileLock, Timeout

    locks = Path(tempfile.gettempdir()) / "hf_tgprune-save-locks"
    if not locks.is_dir():
        locks.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):  # shared by every user of the machine, like /tmp itself
            os.chmod(locks, 0o1777)
    key = hashlib.sha256(os.fsencode(os.path.realpath(target))).hexdigest()[:32]
    lock = FileLock(str(locks / f"{key}.lock"))
    try:
        lock.acquire(timeout=LOCK_TIMEOUT)
    except Timeout:
        raise FolderBusyError(
            f"Another process has been saving into {target} for over {LOCK_TIMEOUT:.0f} s; nothing was written. "
            "Save into another folder, or wait until that writer is done."
        ) from None
    try:
        yield
    finally:
        lock.release()


def _sibling_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(target.name)}\.({NEW_TAG}|{OLD_TAG})-[A-Za-z0-9_]+$")


def leftovers(target: Path) -> list[Path]:
    """Sibling folders that interrupted publishes of `target` left behind (staging or set-aside folders)."""
    parent = target.parent
    if not parent.is_dir():
        return []
    pattern = _sibling_pattern(target)
    return sorted(parent / name for name in os.listdir(parent) if pattern.match(name))


def is_atomic_write_leftover(name: str) -> bool:
    """Whether `name` is a temporary file of an interrupted atomic write (``hf_tgprune.core.utils.atomic_path``)."""
    return bool(_ATOMIC_TMP.match(name))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(target: Path) -> None:
    """Repair what an interrupted publish of `target` left: a missing `target` whose complete new (or old) folder
    waits in a sibling is renamed back in place; every other leftover is removed."""
    found = leftovers(target)
    if not target.exists():
        complete = [p for p in found if NEW_TAG in p.name and (p / COMPLETE_MARKER).is_file()]
        aside = [p for p in found if OLD_TAG in p.name]
        restore = complete[-1:] or aside[-1:]
        if restore:
            logger.warning("Restoring %s from %s (a save into it was interrupted).", target, restore[0])
            os.rename(restore[0], target)
            (target / COMPLETE_MARKER).unlink(missing_ok=True)
            found.remove(restore[0])
    for path in found:
        logger.info("Removing %s, left by an interrupted save into %s", path, target)
        _remove(path)
    if target.is_dir():
        for name in os.listdir(target):
            if is_atomic_write_leftover(name) or name == COMPLETE_MARKER or name.startswith(f".{IN_PLACE_TAG}-"):
                logger.info("Removing %s, left by an interrupted write", target / name)
                _remove(target / name)


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _carry(source: Path, destination: Path) -> None:
    """Recreate `source` at `destination`: folders entry by entry, files as hard links, symlinks as symlinks."""
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        destination.mkdir()
        for name in os.listdir(source):
            _carry(source / name, destination / name)
        shutil.copystat(source, destination, follow_symlinks=False)
    else:
        _link_or_copy(source, destination)


def carry_over(old: Path, new: Path, skip: Iterable[str] = ()) -> list[str]:
    """Carry every entry of `old` that `new` does not hold (and that is not in `skip` or an atomic-write leftover)
    into `new`; returns the names carried."""
    skip = set(skip)
    carried = []
    for name in sorted(os.listdir(old)):
        if name in skip or name == COMPLETE_MARKER or is_atomic_write_leftover(name) or os.path.lexists(new / name):
            continue
        _carry(old / name, new / name)
        carried.append(name)
    return carried


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); OSError where it is not available."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _rename(source: Path, destination: Path) -> None:
    os.rename(source, destination)


def _discard(folder: Path) -> None:
    """Delete the replaced old folder (entries carried over to the new folder are hard links: only names go)."""
    shutil.rmtree(folder, ignore_errors=True)


def _swap_by_two_renames(staging: Path, target: Path) -> None:
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.{OLD_TAG}-", dir=target.parent))
    os.rmdir(aside)
    _rename(target, aside)
    try:
        _rename(staging, target)
    except Exception:
        _rename(aside, target)
        raise
    (target / COMPLETE_MARKER).unlink(missing_ok=True)
    _discard(aside)


def publish(staging: Path, target: Path) -> None:
    """Make the complete folder `staging` the folder `target` in one step (see the module docstring)."""
    cwd = None
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        pass
    if not target.exists():
        (staging / COMPLETE_MARKER).unlink(missing_ok=True)
        _rename(staging, target)
        return
    try:
        _exchange(staging, target)
    except OSError as err:
        logger.debug("Atomic exchange unavailable (%s); renaming the old folder aside first.", err)
        _swap_by_two_renames(staging, target)
    else:
        (target / COMPLETE_MARKER).unlink(missing_ok=True)
        _discard(staging)  # now the old folder
    # a process whose working directory was inside the old folder follows it to the new one
    if cwd is not None and (cwd == str(target) or cwd.startswith(str(target) + os.sep)) and os.path.isdir(cwd):
        os.chdir(cwd)


def _folder_mode(target: Path) -> int:
    if target.is_dir():
        return stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


IN_PLACE_TAG = "tgp-inplace"
_RECORD_NAME = "sparsity.json"


def _holds_another_file_system(folder: Path) -> bool:
    """Whether `folder` holds a mount point or an entry of another device anywhere below it (not descending into
    other file systems or through symlinks)."""
    device = folder.stat().st_dev
    pending = [folder]
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                    continue
                path = Path(entry.path)
                if entry.stat(follow_symlinks=False).st_dev != device or os.path.ismount(path):
                    return True
                pending.append(path)
    return False


def needs_in_place(target: Path) -> str | None:
    """Why `target` cannot be replaced by a swap (None: it can)."""
    if not target.exists():
        return None if os.access(target.parent, os.W_OK) else "its parent folder is not writable"
    if os.path.ismount(target):
        return "it is a mount point"
    if _holds_another_file_system(target):
        return "it holds a mount point or another file system"
    if not os.access(target.parent, os.W_OK):
        return "its parent folder is not writable"
    return None


def _move_in(staging: Path, target: Path, drop: Iterable[str]) -> None:
    """Rename every file of `staging` into `target` (atomic per file), the record removed first and written last."""
    (target / _RECORD_NAME).unlink(missing_ok=True)
    for name in drop:
        (target / name).unlink(missing_ok=True)
    names = sorted(os.listdir(staging), key=lambda name: name == _RECORD_NAME)
    for name in names:
        source, destination = staging / name, target / name
        if source.is_dir() and not source.is_symlink():
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(source, destination)
        else:
            os.replace(source, destination)
        _fsync_dir(target)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def staged_folder(output_dir: str | os.PathLike, *, drop: Iterable[str] = ()) -> Iterator[Path]:
    """Write a folder all-or-nothing: yields an empty staging folder next to `output_dir`; when the block succeeds,
    the entries of the existing `output_dir` that the block did not write (except those named in `drop`) are
    carried over and the staging folder replaces `output_dir` in one atomic step. When the block fails,
    `output_dir` is untouched and the staging folder is removed.

    Raises:
        NotADirectoryError: `output_dir` exists and is not a folder.
    """
    target = Path(os.path.realpath(os.path.expanduser(os.fspath(output_dir))))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{output_dir} exists and is not a folder; pass a folder to save into.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(target):
        recover(target)
        reason = needs_in_place(target)
        if reason is not None:
            logger.info("Saving into %s file by file (%s).", target, reason)
            target.mkdir(exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{IN_PLACE_TAG}-", dir=target))
            try:
                yield staging
                _move_in(staging, target, drop)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{NEW_TAG}-", dir=target.parent))
        try:
            yield staging
            if target.is_dir():
                carry_over(target, staging, skip=drop)
            os.chmod(staging, _folder_mode(target))
            (staging / COMPLETE_MARKER).touch()
            publish(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


@contextmanager
def folder_in_place(output_dir: str | os.PathLike, *, drop: Iterable[str] = ()) -> Iterator[Path]:
    """Write into `output_dir` itself (each file atomically, no swap), for folders that other processes write into
    at the same time (a Trainer checkpoint: the other ranks' RNG states, DeepSpeed shards). The files named in
    `drop` are removed first."""
    target = Path(os.path.expanduser(os.fspath(output_dir)))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{output_dir} exists and is not a folder; pass a folder to save into.")
    target.mkdir(parents=True, exist_ok=True)
    for name in drop:
        (target / name).unlink(missing_ok=True)
    yield target
