"""Writing a file whole or not at all: a temporary file beside the target, then os.replace."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_atomically(path: str | os.PathLike, parts: Iterable[bytes]) -> int:
    """Write the concatenated parts so that readers never see half a file; returns its size.

    The folder must exist. On any failure (a bad part, a full disk, Ctrl-C) the temporary file is removed.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as f:
            for part in parts:
                f.write(part)
            size = f.tell()
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return size
