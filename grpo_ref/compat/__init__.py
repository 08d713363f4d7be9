"""Translate TRL and verl configurations to grpo_ref's and back (duck-typed: imports neither framework).

* :func:`from_trl` / :func:`to_trl`: TRL 1.16.0's ``GRPOConfig`` (a dict or the config object).
* :func:`from_verl` / :func:`to_verl`: verl 0.9.1's PPO trainer config (nested dict, dotted keys or an OmegaConf node).

Every loss-relevant field is mapped or refused with :class:`UnsupportedSetting` naming it; ``TRL_FIELDS`` and
``VERL_FIELDS`` list each field next to grpo_ref's, as the book's page "Check your TRL or verl configuration" shows.
"""
from ._common import FieldMapping, Translation, UnsupportedSetting
from .trl import FIELDS as TRL_FIELDS
from .trl import from_trl, to_trl
from .verl import FIELDS as VERL_FIELDS
from .verl import from_verl, to_verl

__all__ = ["FieldMapping", "Translation", "UnsupportedSetting", "TRL_FIELDS", "VERL_FIELDS", "from_trl", "to_trl",
           "from_verl", "to_verl"]
