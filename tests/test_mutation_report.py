"""tests/mutation/report.py and the committed list of equivalent mutants.

The list is checked against the source it describes: every entry names a function of a mutated module that exists,
and the code its change starts from is still in that module, so an entry cannot outlive the code it explains. The
report's matching and counting are checked on hand-made rows.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutation_report", REPO / "tests" / "mutation" / "report.py")
report = importlib.util.module_from_spec(_spec)
sys.modules["mutation_report"] = report
_spec.loader.exec_module(report)

MUTATED = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]


def _defined_names(path: Path) -> set:
    """``x_f`` for module-level functions and ``xǁClassǁmethod`` for methods: mutmut's names."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(f"x_{node.name}")
        elif isinstance(node, ast.ClassDef):
            names |= {f"xǁ{node.name}ǁ{m.name}" for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def _old_sides(change: str, source: str) -> list[str]:
    """The old side of each hunk of ``change`` ("old  ->  new", hunks joined by " | "). Code may hold " | " itself
    (a bitwise or), so between two arrows the hunk boundary is the " | " after which the next old side is source."""
    parts = change.split("  ->  ")
    olds = [parts[0]]
    for middle in parts[1:-1]:
        cuts = [i for i in range(len(middle)) if middle.startswith(" | ", i)]
        nexts = [middle[i + 3:] for i in cuts]
        olds.append(next((o for o in nexts if o in source), nexts[-1] if nexts else middle))
    return olds


def test_old_sides_split_hunks_not_bitwise_ors():
    src = "a = x | y / b = 1"
    assert _old_sides("a = x | y  ->  a = x | z", src) == ["a = x | y"]
    assert _old_sides("a = x | y  ->  a = x | z | b = 1  ->  b = 2", src) == ["a = x | y", "b = 1"]


def test_every_equivalent_mutant_names_live_code_and_gives_a_reason():
    entries = report.read_equivalents()
    assert entries, "the list is empty"
    modules = {Path(p).stem: REPO / p for p in MUTATED}
    for (function, change), reason in entries.items():
        module, name = function.removeprefix("grpo_ref.").split(".", 1)
        assert module in modules, f"{function}: not a mutated module"
        path = modules[module]
        assert name in _defined_names(path), f"{function}: no such function in {path.name}"
        # the hunks' old sides are runs of stripped source lines joined by " / " (report.change)
        source = " / ".join(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        for old in _old_sides(change, source):
            old = old.replace(f"def {name}(", f"def {name.removeprefix('x_')}(")  # mutmut's x_
            assert old in source, f"{function}: {old!r} is no longer in {path.name} (stale entry)"
        assert len(reason.split()) >= 4, f"{function} {change!r}: the reason is too short: {reason!r}"


def test_read_equivalents_refuses_malformed_and_repeated_lines(tmp_path):
    path = tmp_path / "eq.tsv"
    path.write_text("# comment\nf\ta  ->  b\tbecause it is so\n")
    assert report.read_equivalents(path) == {("f", "a  ->  b"): "because it is so"}
    path.write_text("f\ta  ->  b\n")
    with pytest.raises(ValueError, match="eq.tsv:1"):
        report.read_equivalents(path)
    path.write_text("f\ta  ->  b\tr one\nf\ta  ->  b\tr two\n")
    with pytest.raises(ValueError, match="listed twice"):
        report.read_equivalents(path)


def test_change_is_the_one_line_diff_with_the_def_line_unnumbered():
    orig = ["def x_f__mutmut_orig(a, c=1):", "    b = a + c", "    return b"]
    mut = ["def x_f__mutmut_7(a, c=1):", "    b = a - c", "    return b"]
    assert report.change(orig, mut) == "b = a + c  ->  b = a - c"
    assert report.change(orig, orig) == ""
    default = ["def x_f__mutmut_8(a, c=2):", "    b = a + c", "    return b"]
    assert report.change(orig, default) == "def x_f(a, c=1):  ->  def x_f(a, c=2):"


def test_classify_counts_and_flags():
    rows = [("m", "m.x_f", "killed", "k"), ("m", "m.x_f", "survived", "eq"), ("m", "m.x_f", "survived", "gap"),
            ("m", "m.x_g", "no tests", "n"), ("m", "m.x_f", "timeout", "listed-but-killed"),
            ("m", "m.x_f", "not checked", "later")]
    equivalents = {("m.x_f", "eq"): "r", ("m.x_f", "listed-but-killed"): "r"}
    counts, problems, contradictions = report.classify(rows, equivalents)
    assert counts["m"] == {"killed": 1, "equivalent": 1, "survived": 1, "no tests": 1, "timeout": 1, "not checked": 1}
    assert [p[1] for p in problems] == ["gap", "n", "later"]
    assert contradictions == [("m.x_f", "listed-but-killed", "timeout")]
    assert report.score(counts["m"]) == pytest.approx(100 * 2 / 5)  # (killed + timeout) / (6 - 1 equivalent)
