"""Small helpers shared by data, evaluation and prediction code (no model imports)."""
import contextlib
import os
import uuid
from typing import Iterator

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``.

    On any error the temp file is removed and ``path`` is left as it was. OSErrors are re-raised
    naming ``path`` (the temp name would mean nothing to the user).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    temp_path = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
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
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        if isinstance(err, OSError) and path not in str(err):
            raise OSError(f"cannot write {path}: {err}") from err
        raise
