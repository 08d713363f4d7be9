"""The package as a library user meets it: lint and types clean, one version, a complete ``__all__``, metadata that
agrees with the book's configuration, and built artefacts that work outside this checkout.

* fast: ``__all__`` against the package namespace and the API reference, the one version source, the supported
  range (floors = what these tests run on), project URLs = ``_config.yml``'s ``repository.url``, ``ruff check``.
* slow (marked): ``mypy`` under pyproject.toml's configuration (a cold cache parses torch: a minute or more); the
  sdist and the wheel built from it (``python -m build``) from a copy of the working tree, the sdist's contents and
  its tests collected and one test file run from the unpacked sdist; the wheel installed with ``--no-deps`` into a
  fresh venv whose only other packages are torch and its own dependencies (linked from this environment through a
  ``.pth`` file: nothing is downloaded), where it imports, ships ``py.typed`` and type-checks a user's script.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import types
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

import grpo_ref

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _run(cmd, cwd=REPO, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYTEST"))}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------------- fast


def test_all_is_the_public_namespace():
    exported = {
        n for n, v in vars(grpo_ref).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
    }
    assert len(grpo_ref.__all__) == len(set(grpo_ref.__all__)), "duplicates in __all__"
    assert set(grpo_ref.__all__) == exported, (
        f"in the namespace, not in __all__: {sorted(exported - set(grpo_ref.__all__))}; "
        f"in __all__, not importable: {sorted(set(grpo_ref.__all__) - exported)}"
    )
    assert not [n for n in grpo_ref.__all__ if n.startswith("_")]
    ns: dict = {}
    exec("from grpo_ref import *", ns)  # the star import a user would write
    assert set(grpo_ref.__all__) <= set(ns)


def test_all_names_are_documented_in_the_api_reference():
    pages = [REPO / "book" / "api.md", *sorted((REPO / "book" / "api").glob("*.md"))]
    api = "\n".join(p.read_text() for p in pages)
    documented = set(re.findall(r"automodule:: (grpo_ref[\w.]*)\s*\n\s*:members:\s*\n", api))
    assert documented, "no ':members:' automodule in book/api.md or book/api/*.md"
    undocumented = []
    for name in grpo_ref.__all__:
        obj = getattr(grpo_ref, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            home = obj.__module__
        else:  # a constant: the documented module that defines it
            home = next((m for m in documented if name in vars(importlib.import_module(m))), None)
        if home not in documented:
            undocumented.append(f"{name} ({home})")
        elif (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
            undocumented.append(f"{name} (no docstring)")
    assert not undocumented, f"not on an automodule :members: page of the API reference (book/api/): {undocumented}"


def test_one_version_source():
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "grpo_ref.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", grpo_ref.__version__)
    written = [
        str(p.relative_to(REPO))
        for p in (REPO / "grpo_ref").rglob("*.py")
        if re.search(r"^__version__\s*=", p.read_text(), re.M)
    ]
    assert written == ["grpo_ref/__init__.py"], written
    assert md.version("grpo-ref") == grpo_ref.__version__, "installed metadata is stale: pip install -e ."
    assert f"## {grpo_ref.__version__}" in (REPO / "CHANGELOG.md").read_text()


def test_supported_range_is_what_runs_here():
    """The floors are the versions these tests run on; classifiers name that Python."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert PROJECT["requires-python"] == f">={py}"
    torch_req = [d for d in PROJECT["dependencies"] if d.startswith("torch")]
    torch_mm = ".".join(md.version("torch").split("+")[0].split(".")[:2])
    assert torch_req == [f"torch>={torch_mm}"], (torch_req, torch_mm)
    assert f"Programming Language :: Python :: {py}" in PROJECT["classifiers"]
    assert "Typing :: Typed" in PROJECT["classifiers"]
    assert (REPO / "grpo_ref" / "py.typed").is_file()


def test_project_urls_match_the_book_configuration():
    repo_url = yaml.safe_load((REPO / "_config.yml").read_text())["repository"]["url"].rstrip("/")
    urls = PROJECT["urls"]
    assert urls["Repository"] == repo_url and urls["Homepage"] == repo_url
    assert all(u.startswith(repo_url + "/") for k, u in urls.items() if k not in ("Repository", "Homepage")), urls


def test_pypi_description_is_self_contained():
    readme = PROJECT["readme"]
    assert readme["file"] != "README.md" and readme["content-type"] == "text/markdown"
    text = (REPO / readme["file"]).read_text()
    links = re.findall(r"\]\(([^)]+)\)|<img[^>]+src=\"([^\"]+)\"", text)
    relative = [a or b for a, b in links if not (a or b).startswith(("http://", "https://", "#"))]
    assert not relative, f"relative links/images do not resolve on PyPI: {relative}"


def test_ignored_build_outputs():
    ignored = (REPO / ".gitignore").read_text().split()
    assert "build/" in ignored and "dist/" in ignored


def test_ruff_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_mypy_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(REPO / ".mypy_cache")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


_SKIP = {".git", ".venv", "_build", "build", "dist", "runs", "notebooks", "benchmarks", "book", "_static",
         ".mypy_cache", ".ruff_cache", ".hypothesis", ".pytest_cache", "__pycache__", ".ipynb_checkpoints", ".gl"}


# The book's own tests read its pages and workflows, which the sdist does not ship (MANIFEST.in excludes them).
BOOK_TESTS = {"tests/test_algorithms_page.py", "tests/test_monitoring_page.py", "tests/test_book_layout.py",
              "tests/test_workflows.py"}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """``(sdist, wheel)`` built by ``python -m build`` (the wheel from the sdist) from a copy of the tree."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=lambda d, names: [n for n in names if n in _SKIP or n.endswith(".egg-info")])
    out = root / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], cwd=root)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.mark.slow
def test_sdist_ships_its_tests_and_they_run(artefacts, tmp_path):
    sdist, _ = artefacts
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path, filter="data")
    for need in ("tests/conftest.py", "tests/nbval_sanitize.cfg", "grpo_ref/py.typed", "PYPI.md", "CHANGELOG.md",
                 "LICENSE", "pyproject.toml"):
        assert need in names, f"sdist lacks {need}"
    here = {str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")} - BOOK_TESTS
    assert here <= names, f"sdist lacks {sorted(here - names)}"
    assert not BOOK_TESTS & names, f"the book's own tests are shipped: {sorted(BOOK_TESTS & names)}"
    top = tmp_path / sdist.name.removesuffix(".tar.gz")
    env = _clean_env(PYTHONPATH=str(top))
    where = _run([sys.executable, "-c", "import grpo_ref; print(grpo_ref.__file__)"], cwd=top, env=env)
    assert Path(where.stdout.strip()).is_relative_to(top), where.stdout  # the sdist's grpo_ref, not the checkout's
    pytest_cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    collected = _run(pytest_cmd + ["--collect-only", "tests"], cwd=top, env=env)
    assert re.search(r"\d+ tests? collected", collected.stdout), collected.stdout[-2000:]
    ran = _run(pytest_cmd + ["-x", "tests/test_masks.py"], cwd=top, env=env)
    assert re.search(r"\d+ passed", ran.stdout), ran.stdout[-2000:]


def _torch_only_dir(dest: Path) -> Path:
    """A folder of links to torch and its (non-extra) requirements, recursively: a torch-only site."""
    todo, seen = ["torch"], set()
    dest.mkdir()
    while todo:
        dist = md.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            if top not in ("..", "bin", "__pycache__") and (base / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(base / top)
    return dest


USER_SCRIPT = '''
import torch
import grpo_ref as gr

cfg: gr.AlgoConfig = gr.get_preset("grpo", group_size=2)
mask = torch.ones(4, 3)
logp = torch.zeros(4, 3)
adv, returns = gr.compute_advantages(cfg, torch.tensor([1.0, 0.0, 1.0, 1.0]), mask)
loss, metrics = gr.compute_loss(gr.LossInputs(logp, logp, adv, mask, ref_logp=logp), cfg)
value: float = loss.item()
print(gr.__version__, round(value, 6))
'''


@pytest.mark.slow
def test_wheel_in_a_torch_only_venv_imports_and_type_checks(artefacts, tmp_path):
    _, wheel = artefacts
    with zipfile.ZipFile(wheel) as zf:
        assert "grpo_ref/py.typed" in zf.namelist()
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "torch_only.pth").write_text(str(_torch_only_dir(tmp_path / "torch_only")) + "\n")
    env = _clean_env()
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path, env=env)
    check = _run([str(py), "-c", (
        "import sys, importlib.resources as r, importlib.metadata as md, grpo_ref\n"
        "print(grpo_ref.__file__)\n"
        "assert r.files('grpo_ref').joinpath('py.typed').is_file()\n"
        "assert md.version('grpo-ref') == grpo_ref.__version__\n"
        "import grpo_ref.compat, grpo_ref.integrations  # none of the optional frameworks is installed here\n"
    )], cwd=tmp_path, env=env)
    assert Path(check.stdout.strip()).is_relative_to(site), check.stdout
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    out = _run([str(py), str(script)], cwd=tmp_path, env=env).stdout.split()
    assert out[0] == grpo_ref.__version__
    typed = subprocess.run(
        [sys.executable, "-m", "mypy", "--python-executable", str(py), str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert typed.returncode == 0, typed.stdout[-4000:] + typed.stderr[-2000:]
    assert "Success" in typed.stdout
