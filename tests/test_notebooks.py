"""Notebook CI: every ``notebooks/*.ipynb`` is checked in two ways.

1. **papermill smoke run**: the notebook is executed top to bottom with small parameters (``SMOKE_PARAMETERS``)
   into a temporary folder, with ``notebooks/`` as working directory. Every claim in a notebook is an ``assert``,
   so a successful run means the claims hold. It runs on CPU, and again on CUDA when a GPU is present.
2. **nbval**: the notebook is re-executed with its own default parameters and every stored output is compared with
   the fresh one, after the substitutions in ``tests/nbval_sanitize.cfg`` (addresses, timings, float jitter). Cells
   whose output comes out of a model or a training run carry the tag ``nbval-ignore-output``: their numbers depend on
   the CPU's floating-point rounding (a training run is chaotic), so they are asserted with tolerances inside the
   notebook instead. Everything else must be the same on every machine, and this test makes sure of it on the
   machine that runs it: it executes the notebook on a *different floating-point path* than the one that wrote the
   stored outputs (``SIMULATED_OTHER_CPU``: ATen's baseline kernels, on x86-64 without the AVX2/AVX-512 ones, and MKL's
   compatibility code path), so a compared output that encodes one CPU's rounding fails here, not on a reader's
   machine. The GPU is hidden (``CUDA_VISIBLE_DEVICES=""``): the stored outputs are from a CPU run. The cell
   timeout is generous (a busy machine may be several times slower); the test asserts no timing.

   By hand: ``ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE pytest --nbval notebooks/ --nbval-current-env
   --nbval-sanitize-with tests/nbval_sanitize.cfg``.

Notebooks are discovered when the tests are collected, so a new notebook is picked up without editing this file;
one without an entry in ``SMOKE_PARAMETERS`` is run with ``{"device": "cpu"}`` only. Both tests are marked ``slow``
(``pytest -m "not slow"`` is the fast unit-test subset).
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
# Environment of the nbval run: another floating-point path than the default one on this CPU (see the docstring).
SIMULATED_OTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "CUDA_VISIBLE_DEVICES": ""}
CELL_TIMEOUT_S = 3600  # a guard against a hang, not a speed test: chapter 3's longest cell takes ~30 s on one core

# Small "smoke" parameters per notebook (by file stem). Tolerances inside the notebooks are derived from the
# actual sample sizes, so these runs check the same claims with less work.
SMOKE_PARAMETERS: dict[str, dict] = {
    "01_token_level_kl": {"n_samples": 20_000},
    "02_grpo_loss": {"n_points": 41, "batch": 16},
    "03_training_loop": {"steps": 3, "prompts_per_step": 8, "eval_every": 2, "warm_max_steps": 30, "warm_start_file": ""},
    "04_ppo": {"tree_prompts": 2, "mc_samples": 64, "prompts_per_step": 4, "extra_steps": 10},
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_stored_outputs(notebook: Path) -> None:
    pytest.importorskip("nbval")
    cmd = [
        sys.executable, "-m", "pytest", "--nbval", str(notebook.relative_to(REPO)),
        "--nbval-sanitize-with", str(SANITIZE_CFG.relative_to(REPO)),
        "--nbval-current-env", "--nbval-cell-timeout", str(CELL_TIMEOUT_S),
        "-p", "no:cacheprovider", "-q",
    ]
    env = {**os.environ, **SIMULATED_OTHER_CPU}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"nbval found differences in {notebook.name}, run on another floating-point path than the stored outputs "
        f"({SIMULATED_OTHER_CPU}). A compared output that depends on rounding (anything a model or a training run "
        "computes) must be tagged nbval-ignore-output and its claim asserted with a tolerance; otherwise "
        f"re-execute the notebook and commit its outputs:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    )
