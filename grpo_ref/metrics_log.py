"""``metrics.jsonl``: one JSON object per line, one line per logged step.

:func:`load_metrics` reads it strictly (a bad line is a :class:`MetricsFileError` naming the file and the line).
:func:`sync_metrics` makes the file hold exactly a trainer's history (the checkpoint's, on resume): the lines
written after the checkpoint by a killed run, and a half-written last line, are dropped with a warning, and the
file is rewritten atomically.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from ._files import atomic_write

logger = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


class MetricsFileError(ValueError):
    """A ``metrics.jsonl`` line that is not a JSON object with a ``step``."""


def metrics_path(path: str) -> str:
    """``path`` itself, or ``path/metrics.jsonl`` if ``path`` is a folder."""
    return os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path


def _parse(path: str) -> Tuple[List[dict], Optional[Tuple[int, str, bool]]]:
    """The records before the first bad line, and ``(line number, reason, is_last_line)`` of that line (or None)."""
    with open(path) as f:
        lines = f.read().split("\n")
    if lines[-1] == "":
        lines.pop()
    records: List[dict] = []
    for i, line in enumerate(lines, start=1):
        last = i == len(lines)
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            return records, (i, f"not valid JSON ({e.msg} at column {e.colno})", last)
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            return records, (i, "not a JSON object with an integer 'step'", last)
        records.append(rec)
    return records, None


def load_metrics(path: str) -> List[Dict[str, float]]:
    """Read a ``metrics.jsonl`` file (or the folder holding one) into a list of dicts.

    Raises ``FileNotFoundError`` if it does not exist and :class:`MetricsFileError` (a ``ValueError``) naming the
    file and line of the first corrupt line, e.g. the half-written last line of a killed run (``train --resume``
    repairs that).
    """
    path = metrics_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics file at {path}")
    records, bad = _parse(path)
    if bad is not None:
        line, reason, last = bad
        hint = " (the half-written last line of a killed run? --resume drops it)" if last else ""
        raise MetricsFileError(f"{path} line {line}: {reason}{hint}")
    return records


def sync_metrics(path: str, history: Sequence[Dict[str, float]]) -> None:
    """Make ``path`` hold exactly ``history`` (one line per record), atomically; warn about what is dropped."""
    if os.path.exists(path):
        records, bad = _parse(path)
        if bad is not None:
            line, reason, _ = bad
            logger.warning("%s line %d: %s; dropped with the lines after it", path, line, reason)
        steps = [r["step"] for r in records]
        last = history[-1]["step"] if history else -1
        extra = [s for s in steps if s > last]
        if extra:
            logger.warning("%s: dropped %d line(s) of steps %d-%d, logged after the checkpoint of step %d",
                           path, len(extra), extra[0], extra[-1], last)
    atomic_write(path, "".join(json.dumps(rec) + "\n" for rec in history))
