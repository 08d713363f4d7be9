"""book/algorithms.md cannot drift from grpo_ref.algorithms.PRESETS.

Each preset has one box (a MyST ``admonition`` titled ``... PRESETS["name"]``) whose ``**Settings:**`` line lists
``field=value`` items. The tests parse those lines and check that

* every preset of ``PRESETS`` has exactly one box and every box names a preset;
* every stated value equals the preset's field (compared as Python literals);
* every field that differs from ``AlgoConfig``'s defaults, and every field that defines the algorithm's equations
  (``KEY_FIELDS`` and the estimator-specific ones), is stated;
* the numbers the box's equations use (``eps``, ``kl_coef``, ``vf_coef``, ...) appear in its equations.

The committed SVG of the training step must also be what ``book/figures/training_step.py`` draws.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from grpo_ref.algorithms import PRESETS, AlgoConfig

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "book" / "algorithms.md"

# Fields every box states: they fix the advantage, ratio, clip, aggregation and KL of the key equations.
KEY_FIELDS = ("loss_fn", "adv_estimator", "ratio_level", "eps_low", "eps_high", "loss_agg_mode", "kl_coef", "kl_placement")


def required_fields(cfg: AlgoConfig) -> set:
    """The fields a box must state for ``cfg``: the key ones, those its estimator and KL use, and every
    field that differs from the ``AlgoConfig`` defaults (except ``name``)."""
    default = AlgoConfig()
    need = set(KEY_FIELDS)
    if cfg.adv_estimator == "grpo":
        need.add("adv_scale")
        if cfg.adv_scale != "none":
            need.add("adv_eps")
    if cfg.kl_coef > 0:
        need.add("kl_estimator")
    if cfg.adv_estimator in ("reinforce_pp", "gae"):
        need.add("gamma")
    if cfg.adv_estimator == "gae":
        need.update(("lam", "whiten_advantages"))
    if cfg.loss_fn == "ppo":
        need.update(("vf_coef", "value_clip"))
    if cfg.loss_agg_mode == "seq-mean-token-sum-norm":
        need.add("norm_length")
    need.update(f.name for f in fields(AlgoConfig) if f.name != "name" and getattr(cfg, f.name) != getattr(default, f.name))
    return need


def boxes(text: str) -> dict:
    """``{preset name: box text}`` for every ``:::{admonition}`` titled with ``PRESETS["..."]``."""
    found: dict = {}
    for m in re.finditer(r"^:::\{admonition\} (.+?)\n(.*?)^:::$", text, re.S | re.M):
        title, body = m.group(1), m.group(2)
        name = re.search(r'PRESETS\["([a-z_0-9]+)"\]', title)
        assert name, f"an admonition without a PRESETS[...] title: {title!r}"
        assert name.group(1) not in found, f"two boxes for {name.group(1)!r}"
        found[name.group(1)] = body
    return found


def settings(body: str) -> dict:
    """The ``field=value`` items of the box's ``**Settings:**`` paragraph, values as Python literals."""
    m = re.search(r"\*\*Settings:\*\*(.*?)(?:\n\n|\Z)", body, re.S)
    assert m, "a box without a **Settings:** line"
    items = re.findall(r"`([a-z_]+)=([^`]+)`", m.group(1))
    out = {}
    for field, value in items:
        assert field not in out, f"{field} stated twice"
        out[field] = ast.literal_eval(value)
    return out


PAGE_TEXT = PAGE.read_text(encoding="utf-8")
BOXES = boxes(PAGE_TEXT)


def test_every_preset_has_a_box_and_every_box_a_preset():
    assert set(BOXES) == set(PRESETS), (sorted(set(PRESETS) - set(BOXES)), sorted(set(BOXES) - set(PRESETS)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_stated_settings_match_the_preset(name):
    stated = settings(BOXES[name])
    cfg = PRESETS[name]
    known = {f.name for f in fields(AlgoConfig)}
    assert set(stated) <= known, f"unknown fields {sorted(set(stated) - known)}"
    wrong = {k: (v, getattr(cfg, k)) for k, v in stated.items() if getattr(cfg, k) != v or type(getattr(cfg, k)) is bool and v is not getattr(cfg, k)}
    assert not wrong, f"{name}: stated value != PRESETS value: {wrong}"
    missing = required_fields(cfg) - set(stated)
    assert not missing, f"{name}: the box does not state {sorted(missing)}"


def _numbers_in_math(body: str) -> set:
    math = " ".join(re.findall(r"\$\$(.*?)\$\$", body, re.S) + re.findall(r"(?<!\$)\$([^$\n]+)\$(?!\$)", body))
    return {float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?", math.replace("10^{-6}", "1e-6").replace("10^{-8}", "1e-8"))}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_equations_use_the_presets_numbers(name):
    """The coefficients written into a box's equations are the preset's: a changed kl_coef or clip range in
    PRESETS must show up in the equations, not only in the Settings line."""
    cfg = PRESETS[name]
    nums = _numbers_in_math(BOXES[name])
    if cfg.kl_coef > 0:
        assert cfg.kl_coef in nums, f"{name}: kl_coef {cfg.kl_coef} not in the equations {sorted(nums)}"
    if cfg.adv_estimator == "grpo" and cfg.adv_scale == "group":
        assert cfg.adv_eps in nums, f"{name}: adv_eps {cfg.adv_eps} not in the equations"
    if cfg.ratio_level == "sequence" or cfg.eps_high != cfg.eps_low:
        # the clip range is written out where it is not the common 0.2 / 0.2
        lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
        assert (lo in nums or cfg.eps_low in nums) and (hi in nums or cfg.eps_high in nums), (name, sorted(nums))
    if cfg.loss_fn == "ppo":
        assert cfg.vf_coef in nums and cfg.value_clip in nums, (name, sorted(nums))


def test_settings_parser_catches_a_wrong_value():
    """The check above can fail: a box that states GRPO's kl_coef as 0.05 is caught."""
    body = BOXES["grpo"].replace("`kl_coef=0.04`", "`kl_coef=0.05`")
    stated = settings(body)
    assert stated["kl_coef"] != PRESETS["grpo"].kl_coef


def test_training_step_svg_is_what_the_script_draws():
    script = REPO / "book" / "figures" / "training_step.py"
    assert "figures/training_step.svg" in PAGE_TEXT
    rc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120).returncode
    assert rc == 0, "book/figures/training_step.svg is stale: run python book/figures/training_step.py"
