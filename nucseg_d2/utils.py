"""Small helpers shared by data, evaluation and prediction code (no model imports)."""
import contextlib
import hashlib
import logging
import os
import re
import sys
import uuid
from typing import Dict, Iterable, Iterator, Sequence

__all__ = ["atomic_path", "first_few", "files_by_stem", "leave_distributed_worker", "remove_stale_temp_files",
           "scratch_path"]


# atomic_path's temp file beside PATH: ".<name of PATH>.<12 hex digits>.tmp", the name replaced by
# "~" and its hash where that would pass the 255 bytes a file name may have.
_TEMP_TOKEN_LENGTH = 12
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{%d}\.tmp" % _TEMP_TOKEN_LENGTH)
_NAME_MAX = 255


def _temp_name(target: str, token: str) -> str:
    return f".{target}.{token}.tmp"


def _temp_target(name: str) -> str:
    if len(_temp_name(name, "0" * _TEMP_TOKEN_LENGTH).encode()) <= _NAME_MAX:
        return name
    return "~" + hashlib.sha256(name.encode()).hexdigest()[:32]


def _temp_path_beside(path: str):
    """(folder of ``path``, a new temp path in it named after ``path``)."""
    directory = os.path.dirname(os.path.abspath(path))
    token = uuid.uuid4().hex[:_TEMP_TOKEN_LENGTH]
    return directory, os.path.join(directory, _temp_name(_temp_target(os.path.basename(path)), token))


@contextlib.contextmanager
def scratch_path(path) -> Iterator[str]:
    """Yield a temp path beside ``path`` for a working file, removed on exit whatever happens.

    It is named as :func:`atomic_path`'s temp files, so ``remove_stale_temp_files(path)`` removes
    one that a process killed outright left behind. Nothing is created: the caller writes it.
    """
    _, temp_path = _temp_path_beside(os.fspath(path))
    try:
        yield temp_path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``.

    On any error the temp file is removed and ``path`` is left as it was. OSErrors are re-raised
    naming ``path`` (the temp name would mean nothing to the user). A process killed outright
    (SIGKILL, out of memory) leaves its temp file: see :func:`remove_stale_temp_files`.
    """
    path = os.fspath(path)
    directory, temp_path = _temp_path_beside(path)
    try:
        os.makedirs(directory, exist_ok=True)
        # Reserve the name with mode "x" (not mkstemp: that creates 0600 files; this one follows
        # the umask like any other output).
        open(temp_path, "xb").close()
        yield temp_path
        fd = os.open(temp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp_path, path)
        with contextlib.suppress(OSError):  # the rename itself survives a power cut (POSIX; not on Windows)
            directory_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(directory_fd)
            finally:
                os.close(directory_fd)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        # The temp path holds a bare file name: only a message naming the path itself will do.
        if isinstance(err, OSError) and path not in str(err).replace(temp_path, ""):
            raise OSError(f"cannot write {path}: {err}") from err
        raise


def remove_stale_temp_files(paths) -> Dict[str, int]:
    """Remove the temp files :func:`atomic_path` or :func:`scratch_path` left beside each of
    ``paths`` (one path, or several) when a process writing it was killed outright (a slide's label map can leave
    gigabytes); call it only where no other process writes them. Each folder is listed once, however
    many of its files are asked about. Returns {path: temp files removed} for the paths that had any."""
    paths = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
    targets_by_folder: Dict[str, Dict[str, str]] = {}
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        targets_by_folder.setdefault(folder, {})[_temp_target(os.path.basename(path))] = path
    removed: Dict[str, int] = {}
    for directory, targets in targets_by_folder.items():
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            match = _TEMP_NAME.fullmatch(name)
            path = targets.get(match["target"]) if match else None
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
                    removed[path] = removed.get(path, 0) + 1
    return removed


def first_few(items: Sequence[str], limit: int) -> str:
    """``"a, b, c and 7 more"``: enough of a long list of names for an error message."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def files_by_stem(folder: str, suffixes: Iterable[str], strip_suffix: str = "",
                  what: str = "files") -> Dict[str, str]:
    """{stem: path} of the files in ``folder`` (not recursive) whose extension is in ``suffixes``.

    With ``strip_suffix``, only stems ending with it count and it is removed from the key
    ("img1_pred.png" with "_pred" -> "img1"). Two files with one key (img1.png and img1.tif) are
    ambiguous: ValueError naming both. The caller checks that ``folder`` exists.
    """
    suffixes = (suffixes,) if isinstance(suffixes, str) else suffixes
    suffixes = tuple(s.lower() for s in suffixes)
    by_stem: Dict[str, str] = {}
    for file_name in sorted(os.listdir(folder)):
        stem, extension = os.path.splitext(file_name)
        path = os.path.join(folder, file_name)
        if extension.lower() not in suffixes or not os.path.isfile(path):
            continue
        if strip_suffix:
            if not stem.endswith(strip_suffix) or stem == strip_suffix:
                continue
            stem = stem[: -len(strip_suffix)]
        if stem in by_stem:
            raise ValueError(f"{folder}: two {what} for image {stem!r} "
                             f"({os.path.basename(by_stem[stem])} and {file_name}); keep one")
        by_stem[stem] = path
    return by_stem


def leave_distributed_worker() -> None:
    """End a worker process that Detectron2's ``launch`` spawned, once its work is written.

    The ranks meet, the process group is destroyed, logs and standard streams are flushed, and the
    process exits with status 0 at once, skipping interpreter teardown. There, torch's gloo objects
    that are still referenced (Detectron2 caches its gloo group) are destroyed while the interpreter
    is shutting down, which now and then aborts a rank ("terminate called without an active
    exception"), and ``launch`` then fails in the parent although every rank had finished.
    Only for ``world_size > 1``: with one process, ``launch`` runs the function in its caller.
    """
    import torch.distributed as dist
    from detectron2.utils import comm

    if not dist.is_available() or not dist.is_initialized() or comm.get_world_size() < 2:
        raise RuntimeError("leave_distributed_worker ends a process launched with world_size > 1; "
                           "this one is not (it would end the calling program)")
    comm.synchronize()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
