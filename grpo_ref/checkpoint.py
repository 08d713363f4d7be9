"""Checkpoint files: verified on read, atomic on write.

A checkpoint file is ``torch.save({"format": 2, "sha256": HEX, "payload": uint8 tensor})`` where ``payload`` is the
``torch.save`` serialization of the trainer's state and ``HEX`` its SHA-256. Reading checks the digest before
unpickling the payload, so a flipped bit or a truncated file is refused with a :class:`CheckpointError` naming the
file; both levels are read with ``torch.load(..., weights_only=True)`` (tensors and plain containers only, no code).
Writing goes to a temporary file in the same folder, is flushed to disk, then renamed over the target
(``os.replace``): a crash or a full disk leaves either the old file or the new one, never a mix.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Any, Dict

import torch

from ._files import atomic_write

FORMAT = 2
logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, truncated, of an unknown format, or not a checkpoint."""


def write_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Serialize ``state`` with its SHA-256 to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    wrapped = io.BytesIO()
    torch.save({"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, wrapped)
    atomic_write(path, wrapped.getvalue())


def read_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """The state written by :func:`write_checkpoint`, after checking its SHA-256.

    Raises ``FileNotFoundError`` if there is no file, :class:`CheckpointError` if it is not a valid checkpoint.
    Files of format 1 (before checksums) are read with a warning.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the zip container or the pickle is damaged
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {_first_line(e)}") from None
    if not isinstance(outer, dict):
        raise CheckpointError(f"{path} is not a grpo_ref checkpoint (holds a {type(outer).__name__})")
    if outer.get("format") == 1:
        logger.warning("%s has no checksum (format 1): it cannot be verified", path)
        return torch.load(path, map_location=map_location, weights_only=True)
    if outer.get("format") != FORMAT or not isinstance(outer.get("payload"), torch.Tensor):
        raise CheckpointError(f"{path}: unknown checkpoint format {outer.get('format')!r}")
    payload = outer["payload"].numpy().tobytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != outer.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its SHA-256 is {digest[:16]}..., the file records "
                              f"{str(outer.get('sha256'))[:16]}...")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # pragma: no cover - a payload with a valid digest was written by write_checkpoint
        raise CheckpointError(f"{path}: the payload does not load: {_first_line(e)}") from None
    if not isinstance(state, dict):  # pragma: no cover
        raise CheckpointError(f"{path}: the payload is not a state dict")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
