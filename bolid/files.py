"""Atomic file writes shared by every BoLID stage: readers see the whole new file or the old one, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str, fsync: bool = True) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it into place.

    Args:
        path: the file to (re)write; its folder is created.
        data: the content; ``str`` is written as UTF-8.
        fsync: flush to disk before the rename (survives a power cut, not only a killed process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
