"""Translate TRL and verl configurations to grpo_ref's and back (duck-typed: imports neither framework).

* :func:`from_trl` / :func:`to_trl`: TRL 1.16.0's ``GRPOConfig`` (a dict or the config object).
* :func:`from_verl` / :func:`to_verl`: verl 0.9.1's PPO trainer config (nested dict, dotted keys or an OmegaConf node).

Every loss-relevant field is mapped or refused with :class:`UnsupportedSetting` naming it; ``TRL_FIELDS`` and
``VERL_FIELDS`` list each field next to grpo_ref's, as the book's page "Check your TRL or verl configuration" shows.
"""
from ._common import FieldMapping, Translation, UnsupportedSetting

__all__ = ["FieldMapping", "Translation", "UnsupportedSetting"]

try:  # the two translators are written in parallel; each joins __all__ once its module exists
    from .trl import FIELDS as TRL_FIELDS, from_trl, to_trl  # noqa: F401

    __all__ += ["TRL_FIELDS", "from_trl", "to_trl"]
except ImportError:  # pragma: no cover - removed once both modules land
    pass
try:
    from .verl import FIELDS as VERL_FIELDS, from_verl, to_verl  # noqa: F401

    __all__ += ["VERL_FIELDS", "from_verl", "to_verl"]
except ImportError:  # pragma: no cover
    pass
