"""Small shared helpers: a file written whole or not at all, and an exception told in one line."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write `data` to a temporary name beside `path`, fsync it, then rename it into place: a reader (or a
    crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def brief_error(e: BaseException, limit: int = 300) -> str:
    """`Type: last line of the message`, at most `limit` characters (a remote traceback's last line names it)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:limit]
