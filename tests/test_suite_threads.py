"""The suite's own set-up (tests/conftest.py): torch in each pytest-xdist worker runs on the worker's share of
the cores, set through OMP_NUM_THREADS before anything imports torch (on the 2-core CI machine, two workers
with pools as wide as the machine made the suite much slower). It fails where the setting does not reach the
workers, or where torch was imported before conftest.py set it: either would quietly bring the
oversubscription back."""

from __future__ import annotations

import os

import pytest


def test_torch_runs_on_the_workers_share_of_the_cores():
    if "PYTEST_XDIST_WORKER" not in os.environ:
        pytest.skip("checks pytest-xdist workers' threads: runs under scripts/test.sh (two workers), in CI")
    import torch

    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    assert os.environ["OMP_NUM_THREADS"] == str(share)
    assert torch.get_num_threads() == share, "torch was imported before tests/conftest.py set its threads"
