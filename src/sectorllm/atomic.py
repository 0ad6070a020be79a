"""Writing a file whole or not at all: a temporary file beside the target, then os.replace; the rules for targets."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputError


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The file to write for a user's path, refused (OutputError, one line) when writing it would be wrong.

    Every command follows the same rules: the folder must exist (nothing is created on the user's behalf); an
    existing target must be a regular file (never a device, a FIFO or a folder) and none of the command's inputs
    (the same file under any name); a symbolic link is written through, as a shell's `>` does.
    """
    given = Path(path)
    target = given.resolve() if given.is_symlink() else given
    if not target.parent.is_dir():
        raise OutputError(f"cannot write {given}: the folder {target.parent} does not exist, create it first")
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    except OSError as e:
        raise OutputError(f"cannot write {given}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise OutputError(f"cannot write {given}: it is {kind}; pass the path of a file")
    for source in inputs:
        try:
            same = os.path.samefile(target, source)
        except OSError:
            continue
        if same:
            raise OutputError(f"cannot write {given}: it is one of this command's inputs ({source}); "
                              f"choose another output path")
    return target


def write_atomically(path: str | os.PathLike, parts: Iterable[bytes],
                     inputs: Iterable[str | os.PathLike] = ()) -> int:
    """Write the concatenated parts so that readers never see half a file; returns its size.

    The target follows check_output's rules. The file gets the mode a plain open() would give it: the existing
    file's when it replaces one, else 0666 less the umask. On any failure (a bad part, a full disk, Ctrl-C) the
    temporary file is removed, and an error names the user's path, not the temporary file.
    """
    target = check_output(path, inputs)
    try:
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(handle, "wb") as f:
            for part in parts:
                f.write(part)
            size = f.tell()
            os.fchmod(f.fileno(), _mode_for(target))
        os.replace(temporary, target)
    except BaseException as e:
        os.unlink(temporary)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return size


def _mode_for(target: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # the only way to read it is to set it: put it back at once
        os.umask(umask)
        return 0o666 & ~umask
