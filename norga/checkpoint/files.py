"""Files for checkpoints: paths checked with messages that name the path and the cause, atomic writes.

A save writes `data` into a temporary file next to the target, `.norga-<pid>-<host>-<token>.safetensors.tmp`,
fsyncs it, renames it over the target and fsyncs the folder, so that the target holds the old content or the
new, never a part. The temporary file is removed on every failure the Python process sees (exceptions,
`KeyboardInterrupt`); one left by a process that was killed is removed by the next save into that folder, once
its process (same host, named in the file name) has ended. The file gets the mode a plain `open()` would give
it: the existing target's mode, else `0o666` less the umask.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import stat
from typing import Union

__all__ = ["PathLike", "check_path", "check_target", "readable_file", "remove_stale_temporaries", "write_atomic"]

PathLike = Union[str, "os.PathLike[str]"]

_TMP_PREFIX = ".norga-"
_TMP_SUFFIX = ".safetensors.tmp"
_TMP = re.compile(r"^\.norga-(?P<pid>\d+)-(?P<host>[A-Za-z0-9_.]*)-[0-9a-f]{16}\.safetensors\.tmp$")


def check_path(path: object) -> str:
    """`path` as a `str` (`os.fspath`).

    Raises:
        TypeError: `path` is not a `str` or `os.PathLike`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    out = os.fspath(path)
    if not isinstance(out, str):
        raise TypeError(f"path must be a str or os.PathLike of str, got a path of {type(out).__name__}")
    return out


def _blocked_ancestor(folder: str) -> str | None:
    """The first folder on the way to `folder` that this process may not enter (search permission)."""
    parts = os.path.abspath(folder).split(os.sep)
    for i in range(1, len(parts) + 1):
        ancestor = os.sep.join(parts[:i]) or os.sep
        if os.path.isdir(ancestor) and not os.access(ancestor, os.X_OK):
            return ancestor
    return None


def _check_folder(folder: str, path: str) -> None:
    """The folder of `path` exists, is a folder, can be entered and written into; else an `OSError` saying why."""
    try:
        st = os.stat(folder)
    except PermissionError:
        blocked = _blocked_ancestor(folder) or folder
        raise PermissionError(
            f"path {path!r}: cannot reach its folder {folder!r}: permission denied on {blocked!r} (no search "
            "permission)"
        ) from None
    except FileNotFoundError:
        raise FileNotFoundError(f"path {path!r}: its folder {folder!r} does not exist; create it first") from None
    except NotADirectoryError:
        raise NotADirectoryError(f"path {path!r}: a component of its folder {folder!r} is a file") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"path {path!r}: {folder!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"path {path!r}: cannot write into its folder {folder!r}: permission denied")


def readable_file(path: object) -> str:
    """`path` checked to be a readable file; returns it as a `str`.

    Raises:
        TypeError: `path` is not a `str` or `os.PathLike`.
        FileNotFoundError: no such file (or its folder does not exist).
        IsADirectoryError: `path` is a folder.
        PermissionError: the file or a folder on the way cannot be read or entered.
    """
    p = check_path(path)
    try:
        st = os.stat(p)
    except PermissionError:
        blocked = _blocked_ancestor(os.path.dirname(os.path.abspath(p))) or p
        raise PermissionError(f"cannot read {p!r}: permission denied on {blocked!r}") from None
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"no such file: {p!r}") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{p!r} is a folder, expected a file")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"cannot read {p!r}: permission denied")
    return p


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporary files that saves killed in `folder` left behind; returns their paths.

    Only files named by [`write_atomic`][norga.checkpoint.files.write_atomic] for this host, whose process has
    ended, are removed: a save under way in another process keeps its file. Off POSIX (no way to ask whether a
    process lives) nothing is removed.
    """
    if os.name != "posix":
        return []
    host, removed = _host(), []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        m = _TMP.match(name)
        if m is None or m["host"] != host or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
        except FileNotFoundError:  # another save removed it first
            pass
    return removed


def _fsync_folder(folder: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target(path: object) -> str:
    """`path` checked to be a file name that can be written (its folder reachable and writable).

    Returns:
        The absolute path.

    Raises:
        TypeError: `path` is not a `str` or `os.PathLike`.
        IsADirectoryError: `path` is a folder.
        FileNotFoundError, NotADirectoryError, PermissionError: its folder is missing, not a folder, or cannot
            be entered or written into (the message names the path and the cause).
    """
    p = check_path(path)
    target = os.path.abspath(p)
    _check_folder(os.path.dirname(target), p)
    if os.path.isdir(target):
        raise IsADirectoryError(f"path {p!r} is a folder, expected a file name")
    return target


def write_atomic(path: object, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (module docstring).

    Raises:
        TypeError: `path` is not a `str` or `os.PathLike`.
        OSError: the folder cannot be reached or written into, `path` is a folder, or the write failed (the
            message names the path; the target is unchanged and no temporary file is left).
    """
    target = check_target(path)
    folder = os.path.dirname(target)
    remove_stale_temporaries(folder)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    tmp = os.path.join(folder, f"{_TMP_PREFIX}{os.getpid()}-{_host()}-{secrets.token_hex(8)}{_TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)  # umask applies
        try:
            if mode is not None:
                os.chmod(tmp, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno is not None:  # name the target, not the temporary file
            raise type(e)(e.errno, f"cannot write {target!r}: {e.strerror}") from e
        raise
    _fsync_folder(folder)
