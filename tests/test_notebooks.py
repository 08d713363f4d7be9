"""Notebook CI: every ``notebooks/*.ipynb`` is checked in two ways.

1. **papermill smoke run**: the notebook is executed top to bottom with small parameters (``SMOKE_PARAMETERS``)
   into a temporary folder, with ``notebooks/`` as working directory. Every claim in a notebook is an ``assert``,
   so a successful run means the claims hold. It runs on CPU, and again on CUDA when a GPU is present.
2. **nbval**: the notebook is re-executed with its own default parameters and every stored output is compared with
   the fresh one, after the substitutions in ``tests/nbval_sanitize.cfg`` (addresses, timings, float jitter).
   This is the same as running ``pytest --nbval notebooks/ --nbval-sanitize-with tests/nbval_sanitize.cfg``;
   doing it in a subprocess keeps plain ``pytest`` (which only collects ``tests/``) covering it. The stored
   outputs come from a CPU run, so the subprocess hides any GPU (``CUDA_VISIBLE_DEVICES=""``): with
   ``device="auto"`` a notebook would otherwise pick CUDA, whose random streams differ from the CPU's.

Notebooks are discovered when the tests are collected, so a new notebook is picked up without editing this file;
one without an entry in ``SMOKE_PARAMETERS`` is run with ``{"device": "cpu"}`` only.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
SANITIZE_CFG = REPO / "tests" / "nbval_sanitize.cfg"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"

# Small "smoke" parameters per notebook (by file stem). Tolerances inside the notebooks are derived from the
# actual sample sizes, so these runs check the same claims with less work.
SMOKE_PARAMETERS: dict[str, dict] = {
    "01_token_level_kl": {"n_samples": 20_000},
    "02_grpo_loss": {"n_points": 41, "batch": 16},
    "03_training_loop": {"steps": 3, "prompts_per_step": 8, "eval_every": 2, "warm_max_steps": 30},
}


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of grpo_ref
        return False
    return torch.cuda.is_available()


def smoke_parameters(notebook: Path, device: str) -> dict:
    params = dict(SMOKE_PARAMETERS.get(notebook.stem, {}))
    params["device"] = device
    return params


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_available(), reason="CUDA is not available")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_smoke_run(notebook: Path, device: str, tmp_path: Path) -> None:
    papermill = pytest.importorskip("papermill")
    params = smoke_parameters(notebook, device)
    try:
        papermill.execute_notebook(
            str(notebook),
            str(tmp_path / notebook.name),
            parameters=params,
            kernel_name=KERNEL,
            cwd=str(NOTEBOOK_DIR),
            progress_bar=False,
            request_save_on_cell_execute=False,
        )
    except papermill.PapermillExecutionError as err:
        pytest.fail(f"{notebook.name} failed with parameters {params}:\n{err}", pytrace=False)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_stored_outputs(notebook: Path) -> None:
    pytest.importorskip("nbval")
    cmd = [
        sys.executable, "-m", "pytest", "--nbval", str(notebook.relative_to(REPO)),
        "--nbval-sanitize-with", str(SANITIZE_CFG.relative_to(REPO)),
        "--nbval-current-env", "--nbval-cell-timeout", "600",
        "-p", "no:cacheprovider", "-q",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the stored outputs are from a CPU run
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"nbval found differences in {notebook.name} (re-execute the notebook and commit its outputs, or fix "
        f"the nondeterminism):\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    )
