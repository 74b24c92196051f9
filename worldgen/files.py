"""Files that appear whole: written under a temp name beside their final one, then renamed into place.

Readers never see half a file (a rename within one folder is atomic), and a crash or a kill leaves at most a
`.NAME@HOST:PID.*.tmp` file beside the final name, which a later writer removes. A published file's data is
on the disk before its name is, so a power cut cannot leave an empty file under a final name either. The
temp file is created private (mkstemp's mode 0600); before the rename it gets the mode a plain `open()`
would have given it under the process umask, so the outputs of a batch are as readable as any other file
its user writes (a shared file system, a web server).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def _process_umask() -> int:
    with suppress(OSError):  # Linux says it without changing it
        found = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), re.MULTILINE)
        if found:
            return int(found.group(1), 8)
    mask = os.umask(0)  # elsewhere, the only way to read it is to set it and put it back
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_process_umask()  # read once, at import
_HOST = socket.gethostname()
_WRITER = f"{_HOST}:{os.getpid()}"
_WRITER_IN_NAME = re.compile(r"@(?P<host>[^@/:]+):(?P<pid>\d+)\.[^.]+\.tmp$")


def temp_beside(path: Path) -> Path:
    """A new empty file `.NAME@HOST:PID.XXXXXXXX.tmp` in `path`'s folder (created with its parents): the
    writer's host and process name it, so a later run can tell a killed writer's file from a live one's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}@{_WRITER}."
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    os.close(handle)
    return Path(name)


def temp_glob(name: str) -> str:
    """The pattern of the temp files `temp_beside` makes for a file called `name`."""
    return f".{name}@*.tmp"


def publish(temp: Path, path: Path) -> None:
    """Move the finished `temp` onto `path`, with the umask's file mode, data first on the disk."""
    _sync(temp, os.O_RDONLY)
    with suppress(OSError):  # some network file systems refuse modes: the file is still whole
        os.chmod(temp, _FILE_MODE)
    os.replace(temp, path)
    with suppress(OSError):  # the rename itself; not every file system syncs a folder
        _sync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _sync(path: Path, flags: int) -> None:
    handle = os.open(path, flags)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path beside `path`, published onto it when the block succeeds and removed when it fails."""
    path = Path(path)
    temp = temp_beside(path)
    try:
        yield temp
        publish(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def remove_stale_temps(folder: Path, patterns: Iterable[str], idle_seconds: float = 600) -> None:
    """Remove the temp files matching `patterns` in `folder` that killed writers left: those whose writer
    process on this host is gone, and any that nothing has written for `idle_seconds` (a writer on another
    host, or a name without one). A live writer's file keeps changing (a video grows with every chunk), so
    another process still rendering into the same folder keeps its own."""
    idle_since = time.time() - idle_seconds
    for pattern in patterns:
        for temp in folder.glob(pattern):
            with suppress(OSError):  # gone meanwhile, or a folder this process may not write
                if _writer_is_gone(temp.name) or temp.stat().st_mtime < idle_since:
                    temp.unlink()


def _writer_is_gone(name: str) -> bool:
    found = _WRITER_IN_NAME.search(name)
    if not found or found["host"] != _HOST or int(found["pid"]) == os.getpid():
        return False
    try:
        os.kill(int(found["pid"]), 0)  # signal 0: is there such a process (a reused pid errs on keeping)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False
