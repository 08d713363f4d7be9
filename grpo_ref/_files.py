"""Atomic file writes for the loop layer (checkpoints, the metrics log)."""
from __future__ import annotations

import os
from typing import Union


def atomic_write(path: str, content: Union[bytes, str]) -> None:
    """Write ``content`` to ``path`` so that a crash or a full disk leaves either the old file or the new one: a
    temporary file in the same folder, flushed and fsynced, then ``os.replace``d over ``path``; on any failure the
    temporary file is removed and the error re-raised."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
