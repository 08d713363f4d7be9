"""Assertions on refusals shared by the contract tests (tests/test_contract_*.py): a ``ValueError`` must name the
caller's argument as a whole, case-sensitive word, and a NaN/inf refusal must carry it as ``.name``."""
from __future__ import annotations

import re

import pytest

from grpo_ref._checks import NonFiniteInputError


def names(msg: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", msg) is not None


def refused(call, *args: str) -> str:
    """``call()`` raises a ``ValueError`` whose message names every one of ``args``; returns the message."""
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    for arg in args:
        assert names(msg, arg), f"{arg!r} not named in {msg!r}"
    return msg


def refused_nonfinite(call, arg: str) -> str:
    """A NaN/inf refusal: a ``NonFiniteInputError`` (a ``ValueError``) whose ``.name`` is the argument and whose
    message names it (its list of offending values contains the word "values" whatever the argument)."""
    with pytest.raises(NonFiniteInputError) as info:
        call()
    assert info.value.name == arg, (info.value.name, arg)
    assert str(info.value).startswith(f"{arg} "), str(info.value)
    return str(info.value)
