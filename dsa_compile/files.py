"""Writing output files safely: checked before any work, replaced atomically.

    target = destination(path, "save_indexers")   # before the expensive part
    write_atomic(target, data)                     # temp file beside it, then rename

A symlink is followed (its target is written and the link stays); a directory, device
node, FIFO or socket at the path is refused rather than replaced by a regular file, and
a missing or read-only folder is reported before anything is computed.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def destination(path: str | os.PathLike, who: str) -> str:
    """The regular file a write to ``path`` must replace: ``path`` with symlinks resolved.

    Raises ValueError (prefixed with ``who``) when the path exists and is not a regular
    file, or its folder does not exist or is not writable.
    """
    given = os.fspath(path)
    target = os.path.realpath(given)
    shown = given if target == os.path.abspath(given) else f"{given} (-> {target})"
    if os.path.lexists(target):
        try:
            mode = os.stat(target).st_mode
        except OSError as err:  # a symlink loop
            raise ValueError(f"{who}: {shown!r} cannot be resolved ({err})") from err
        if not stat.S_ISREG(mode):
            raise ValueError(f"{who}: {shown!r} is {_kind(mode)}, not a regular file; give "
                             f"the path of a file to write")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise ValueError(f"{who}: the folder {folder!r} of {shown!r} does not exist; create it "
                         f"first (os.makedirs) or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{who}: the folder {folder!r} of {shown!r} is not writable")
    return target


def write_atomic(path: str | os.PathLike, write: Callable[[str], None] | bytes,
                 who: str = "write") -> str:
    """Write a file at ``path`` (checked by :func:`destination`) that is never partial.

    ``write`` is the bytes, or a function writing the file at the temp path it is given.
    The temp file lives beside the target, so the final rename is atomic; an existing
    file keeps its permissions, a new one gets the usual umask ones. Returns the target.
    """
    target = destination(path, who)
    fd, tmp = tempfile.mkstemp(prefix=".dsa-", suffix=".tmp", dir=os.path.dirname(target))
    os.close(fd)
    try:
        if isinstance(write, bytes):
            with open(tmp, "wb") as f:
                f.write(write)
        else:
            write(tmp)
        if os.path.exists(target):
            mode = stat.S_IMODE(os.stat(target).st_mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp makes 0600
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
