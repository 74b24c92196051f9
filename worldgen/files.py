"""Files that appear whole: written under a temp name beside their final one, then renamed into place.

Readers never see half a file (a rename within one folder is atomic), and a crash or a kill leaves at most a
`.NAME.*.tmp` file beside the final name. The temp file is created private (mkstemp's mode 0600); before the
rename it gets the mode a plain `open()` would have given it under the process umask, so the outputs of a
batch are as readable as any other file its user writes (a shared file system, a web server).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _process_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_process_umask()  # read once, at import, before any worker thread starts


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new empty file `.NAME.XXXXXXXX<suffix>` in `path`'s folder (created with its parents)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    return Path(name)


def publish(temp: Path, path: Path) -> None:
    """Move the finished `temp` onto `path`, with the umask's file mode."""
    os.chmod(temp, _FILE_MODE)
    os.replace(temp, path)


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


def remove_stale_temps(folder: Path, names: tuple[str, ...]) -> None:
    """Remove the temp files that killed writers of `names` left in `folder` (call it once those files are
    final: a live writer of the same file would lose its temp)."""
    for name in names:
        for temp in folder.glob(f".{name}.*.tmp"):
            temp.unlink(missing_ok=True)
