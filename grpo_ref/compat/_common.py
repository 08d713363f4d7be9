"""What the framework translators share: the result of a translation and the table of field mappings.

A translator reads a framework's configuration (a dict, or any object with attributes, such as TRL's
``GRPOConfig``), duck-typed: nothing here imports TRL or verl.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ..algorithms import AlgoConfig

STATUSES = ("exact", "mapped", "refused", "ignored")


class UnsupportedSetting(ValueError):
    """A framework setting that changes the loss and has no grpo_ref equivalent; the message names the field."""

    def __init__(self, field_name: str, value: Any, reason: str) -> None:
        self.field_name = field_name
        self.value = value
        super().__init__(f"{field_name}={value!r}: {reason}")


@dataclass(frozen=True)
class FieldMapping:
    """One loss-relevant field of a framework, next to grpo_ref's.

    ``status``: ``"exact"`` (same value, same meaning), ``"mapped"`` (a formula or another name gives the same loss),
    ``"refused"`` (no grpo_ref equivalent: the translator raises :class:`UnsupportedSetting` for a non-default
    value), ``"ignored"`` (does not change the loss or its gradient, e.g. logging)."""

    framework_field: str
    grpo_ref: str
    status: str
    note: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class Translation:
    """A framework configuration in grpo_ref's terms.

    ``algo``: the :class:`~grpo_ref.algorithms.AlgoConfig` whose loss and advantages equal the framework's;
    ``train``: the training-loop settings (keys of :class:`~grpo_ref.trainer.TrainConfig` where one exists, e.g.
    ``group_size``, ``ppo_epochs``, ``minibatches``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``max_new_tokens``, ``ref_sync_every``, ``ref_sync_alpha``, ``lr``); ``notes``: differences that remain
    (documented, not errors)."""

    algo: AlgoConfig
    train: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


_MISSING = object()


def get_setting(config: Any, name: str, default: Any = None) -> Any:
    """``config[name]`` for a mapping, ``getattr(config, name)`` otherwise; dotted names walk nested mappings or
    attributes (``"actor_rollout_ref.actor.clip_ratio"``), and a flat mapping may hold the dotted name as a key."""
    if isinstance(config, Mapping) and name in config:
        return config[name]
    node: Any = config
    for part in name.split("."):
        if isinstance(node, Mapping):
            node = node.get(part, _MISSING)
        else:
            node = getattr(node, part, _MISSING)
        if node is _MISSING or node is None:
            return default
    return node


def check_statuses(rows: List[FieldMapping], framework: str) -> None:
    """Refuse a table with a repeated field (a row per field, once)."""
    seen: Dict[str, int] = {}
    for row in rows:
        seen[row.framework_field] = seen.get(row.framework_field, 0) + 1
    repeated = sorted(k for k, n in seen.items() if n > 1)
    if repeated:
        raise ValueError(f"{framework} FIELDS repeats {repeated}")


def translated(algo: AlgoConfig, train: Optional[Dict[str, Any]] = None, notes: Optional[List[str]] = None) -> Translation:
    return Translation(algo=algo, train=dict(train or {}), notes=list(notes or []))
