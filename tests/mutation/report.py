"""The mutation-testing report of the math layer: score per module, and every surviving mutant killed or explained.

    .venv/bin/mutmut run --max-children 2          # writes mutants/ (configuration: [tool.mutmut] in pyproject.toml)
    .venv/bin/python tests/mutation/report.py      # reads mutants/, prints the report, writes tests/mutation/report.txt

A surviving mutant is *explained* when ``tests/mutation/equivalent_mutants.tsv`` lists it: one line per mutant,
``function<TAB>change<TAB>reason``, where ``function`` is mutmut's name without its ``__mutmut_N`` suffix and
``change`` the mutant's one-line diff as printed here (``old  ->  new``, lines stripped, several hunks joined by
`` | ``). Mutants are matched by (function, change), not by number, so the list survives edits elsewhere in a module.

Exit status 1 if any mutant survives unexplained, is reached by no test, was not checked, or is listed as equivalent
although a test kills it (then it was not equivalent: the line must go); 0 otherwise.
"""
from __future__ import annotations

import argparse
import ast
import collections
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EQUIVALENTS = HERE / "equivalent_mutants.tsv"
REPORT = HERE / "report.txt"

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 37: "killed", None: "not checked"}


def function_sources(path: Path) -> Dict[str, List[str]]:
    """``{name: source lines}`` of every mutmut-generated function (``x_f__mutmut_orig``, ``x_f__mutmut_3``, ...)."""
    src = path.read_text(encoding="utf-8")
    lines = src.splitlines()
    return {node.name: lines[node.lineno - 1: node.end_lineno] for node in ast.walk(ast.parse(src))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name}


def _strip_name(line: str) -> str:
    return re.sub(r"__mutmut_\w+\(", "(", line, count=1)


def change(orig: List[str], mutant: List[str]) -> str:
    """The one-line diff of two versions of a function; in the ``def`` line (a default value may be mutated there)
    mutmut's ``__mutmut_N`` suffix is dropped from the name."""
    a = [_strip_name(line.strip()) if i == 0 else line.strip() for i, line in enumerate(orig)]
    b = [_strip_name(line.strip()) if i == 0 else line.strip() for i, line in enumerate(mutant)]
    hunks = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op != "equal":
            hunks.append(" / ".join(a[i1:i2]) + "  ->  " + " / ".join(b[j1:j2]))
    return " | ".join(hunks)


def mutants(root: Path) -> Iterable[Tuple[str, str, str, str]]:
    """``(module, function, status, change)`` for every mutant mutmut generated under ``root`` (its mutants/)."""
    for meta in sorted(root.glob("grpo_ref/**/*.py.meta")):
        py = meta.with_suffix("")
        module = ".".join(py.relative_to(root).with_suffix("").parts)
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        sources = function_sources(py)
        for key, code in sorted(codes.items()):
            name = key.rsplit(".", 1)[-1]
            base = name.rsplit("__mutmut_", 1)[0]
            orig, mut = sources.get(base + "__mutmut_orig"), sources.get(name)
            diff = change(orig, mut) if orig and mut else "?"
            yield module, key.rsplit("__mutmut_", 1)[0], STATUS.get(code, f"exit code {code}"), diff


def read_equivalents(path: Path = EQUIVALENTS) -> Dict[Tuple[str, str], str]:
    """``{(function, change): reason}``; a malformed or repeated line raises ``ValueError`` naming it."""
    out: Dict[Tuple[str, str], str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise ValueError(f"{path.name}:{n}: expected 'function<TAB>change<TAB>reason', got {line!r}")
        key = (parts[0], parts[1])
        if key in out:
            raise ValueError(f"{path.name}:{n}: {parts[0]} {parts[1]!r} is listed twice")
        out[key] = parts[2]
    return out


def classify(rows, equivalents) -> Tuple[Dict[str, collections.Counter], List[tuple], List[tuple]]:
    """Counts per module (killed, timeout, equivalent, survived, no tests, not checked, ...), the problems
    (survived unexplained / no tests / not checked) and the contradictions (listed as equivalent but killed)."""
    counts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    problems, contradictions = [], []
    for module, function, status, diff in rows:
        listed = (function, diff) in equivalents
        if status == "survived" and listed:
            status = "equivalent"
        elif listed and status in ("killed", "timeout"):
            contradictions.append((function, diff, status))
        counts[module][status] += 1
        if status in ("survived", "no tests", "not checked"):
            problems.append((function, diff, status))
    return counts, problems, contradictions


def score(c: collections.Counter) -> float:
    """Killed (timeouts included, as mutmut counts them) over the mutants that can be killed (all but equivalent
    and skipped ones)."""
    killable = sum(c.values()) - c["equivalent"] - c["skipped"]
    return 100.0 * (c["killed"] + c["timeout"]) / killable if killable else 100.0


def render(counts, problems, contradictions) -> str:
    cols = ("killed", "timeout", "equivalent", "survived", "no tests", "not checked")
    head = f"{'module':28} {'mutants':>7} " + " ".join(f"{c:>11}" for c in cols) + f" {'score':>7}"
    lines = [head, "-" * len(head)]
    total: collections.Counter = collections.Counter()
    for module in sorted(counts):
        c = counts[module]
        total.update(c)
        lines.append(f"{module:28} {sum(c.values()):7d} " + " ".join(f"{c[k]:11d}" for k in cols) + f" {score(c):6.1f}%")
    lines.append(f"{'all':28} {sum(total.values()):7d} " + " ".join(f"{total[k]:11d}" for k in cols)
                 + f" {score(total):6.1f}%")
    lines.append("")
    lines.append("score = (killed + timeout) / (mutants - equivalent); timeout: the mutant made a test run 15x "
                 "longer than normal (mutmut counts it as killed).")
    listed = [p for p in problems if p[2] != "not checked"]
    unchecked = len(problems) - len(listed)
    if listed:
        lines.append(f"\n{len(listed)} unexplained (survived with no entry in equivalent_mutants.tsv, or no tests):")
        lines += [f"  {status:11} {function}\t{diff}" for function, diff, status in listed]
    if unchecked:
        lines.append(f"\n{unchecked} mutants not checked yet (the table gives them per module): run mutmut to the end.")
    if contradictions:
        lines.append(f"\n{len(contradictions)} listed as equivalent but {', '.join(sorted({s for *_, s in contradictions}))}"
                     " (remove their lines):")
        lines += [f"  {function}\t{diff}" for function, diff, _ in contradictions]
    if not problems and not contradictions:
        lines.append("Every mutant is killed or listed as equivalent with its reason; every mutated function is "
                     "reached by a test.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", default=str(REPO / "mutants"), help="mutmut's output folder (default: mutants/)")
    ap.add_argument("--out", default=str(REPORT), help="where to write the report (default: tests/mutation/report.txt)")
    ap.add_argument("--list", choices=("survived", "killed", "timeout", "no tests", "all"),
                    help="only print the mutants with this status, one per line (function, status, change)")
    args = ap.parse_args(argv)
    rows = list(mutants(Path(args.mutants)))
    if not rows:
        print(f"no mutmut results under {args.mutants}: run `mutmut run` first", file=sys.stderr)
        return 1
    if args.list:
        for module, function, status, diff in rows:
            if args.list in ("all", status):
                print(f"{function}\t{status}\t{diff}")
        return 0
    counts, problems, contradictions = classify(rows, read_equivalents())
    text = render(counts, problems, contradictions)
    print(text, end="")
    Path(args.out).write_text(text, encoding="utf-8")
    return 1 if problems or contradictions else 0


if __name__ == "__main__":
    raise SystemExit(main())
