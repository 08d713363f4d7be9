"""Shared fixtures and helpers for the grpo_ref tests.

* ``device``: every test that takes it runs on "cpu" and on "cuda"; the cuda case is skipped with a reason
  when no GPU is visible (a test module may define its own ``device`` fixture; the local one wins).
* ``random_mask`` / ``prompt_response_mask``: seeded random response masks with random lengths, right-padded,
  some rows empty, so masked code is tested on ragged batches and not only on full ones.
* a hypothesis profile for every test: no per-example deadline and no "too slow" health check (a busy or slow
  machine must not fail a property that holds), no example database (nothing written beside the tests), and the
  reproduction blob printed with a failure.
* under pytest-xdist (``-n 2``), two things that only change how long the suite takes, never what it checks:
  each worker gets its share of the CPU's threads (torch's and, through ``OMP_NUM_THREADS``, those of the notebook
  kernels and scripts it starts), so two workers do not each spin two threads on two cores; and the longest tests
  are collected first (``LONGEST_FIRST``), which with ``--maxschedchunk=2`` (pyproject.toml) hands them out
  longest-first, one or two at a time, to whichever worker is free, instead of leaving one to run last.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "grpo-book", deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None, print_blob=True
)
settings.load_profile("grpo-book")

_CUDA = torch.cuda.is_available()

# Node-id prefixes of the longest tests, longest first (minutes each on a 2-core CPU: the learning run, the notebooks
# under nbval and papermill, the book's layout check, the packaging builds). Only the order of collection depends
# on it: a stale entry costs time, never a check.
LONGEST_FIRST = (
    "tests/test_training.py::test_grpo_raises_eval_accuracy",
    "tests/test_book_layout.py::test_built_pages_cut_nothing",
    "tests/test_notebooks.py::test_notebook_stored_outputs[03",
    "tests/test_notebooks.py::test_notebook_stored_outputs",
    "tests/test_packaging.py",
    "tests/test_notebooks.py::test_notebook_smoke_run",
    "tests/test_benchmarks.py",
    "tests/test_integration_trl.py",
    "tests/test_cli.py",
)


def _cpu_share(workers: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def pytest_configure(config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and os.environ.get("PYTEST_XDIST_WORKER"):
        share = _cpu_share(int(workers))
        torch.set_num_threads(share)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(share))


def _rank(item) -> tuple:
    for i, prefix in enumerate(LONGEST_FIRST):
        if item.nodeid.startswith(prefix):
            return (0, i)
    return (1, 0) if item.get_closest_marker("slow") else (2, 0)


def pytest_collection_modifyitems(config, items) -> None:
    items.sort(key=_rank)  # stable: within a rank, pytest's own order (module by module) is kept


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not _CUDA, reason="CUDA is not available on this machine")),
    ]
)
def device(request) -> torch.device:
    return torch.device(request.param)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator: tensors are drawn on the CPU and moved, so a seed gives the same data on every device."""
    return torch.Generator().manual_seed(seed)


def random_lengths(batch: int, max_len: int, seed: int, n_empty: Optional[int] = None) -> torch.Tensor:
    """``[batch]`` int64 lengths in ``[0, max_len]``; at least ``n_empty`` of them (default: one in four,
    at least one when ``batch >= 2``) are exactly 0, and at least one is ``max_len`` when ``batch >= 3``."""
    g = make_generator(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    if n_empty is None:
        n_empty = max(1, batch // 4) if batch >= 2 else 0
    perm = torch.randperm(batch, generator=g)
    lengths[perm[:n_empty]] = 0
    if batch >= 3:
        lengths[perm[n_empty]] = max_len
    return lengths


def random_mask(
    batch: int, seq_len: int, seed: int, n_empty: Optional[int] = None, dtype=torch.float32, device="cpu"
) -> torch.Tensor:
    """Right-padded ``[batch, seq_len]`` 0/1 mask: row ``i`` is 1 on its first ``L_i`` positions (random ``L_i``,
    some rows empty, one row full)."""
    lengths = random_lengths(batch, seq_len, seed, n_empty)
    pos = torch.arange(seq_len)[None, :]
    return (pos < lengths[:, None]).to(dtype).to(device)


def prompt_response_mask(
    batch: int, seq_len: int, seed: int, max_prompt: Optional[int] = None, dtype=torch.float32, device="cpu"
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A mask with a prompt offset and right padding: row ``i`` is 1 on ``[P_i, P_i + L_i)``.

    Returns ``(mask, prompt_lengths, response_lengths)``; some rows have ``L_i = 0``, and ``P_i + L_i <= seq_len``.
    """
    g = make_generator(seed)
    if max_prompt is None:
        max_prompt = seq_len // 2
    prompts = torch.randint(0, max_prompt + 1, (batch,), generator=g)
    room = seq_len - prompts
    frac = torch.rand(batch, generator=g)
    resp = torch.floor(frac * (room + 1).to(torch.float64)).long().clamp(max=room)
    if batch >= 2:
        resp[torch.randint(0, batch, (1,), generator=g)] = 0
    pos = torch.arange(seq_len)[None, :]
    mask = ((pos >= prompts[:, None]) & (pos < (prompts + resp)[:, None])).to(dtype).to(device)
    return mask, prompts, resp


def holey_mask(batch: int, seq_len: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A multi-turn style mask: after a prompt, response spans alternate with masked-out spans (tool output,
    user turns) and end in right padding; one row is empty. Masked-out positions inside the response must be
    skipped, not treated as steps."""
    g = make_generator(seed)
    mask = torch.zeros(batch, seq_len)
    for i in range(1, batch):
        t = int(torch.randint(0, 3, (1,), generator=g))  # prompt
        on = True
        while t < seq_len:
            span = int(torch.randint(1, 4, (1,), generator=g))
            if on:
                mask[i, t : t + span] = 1.0
            t += span
            on = not on
        mask[i, seq_len - int(torch.randint(0, 3, (1,), generator=g)) :] = 0.0  # right padding
    return mask.to(dtype).to(device)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): tiny models run many times faster on one thread than on
    two on a shared 2-core CPU. Modules with tiny trainers use it with ``pytestmark = pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
