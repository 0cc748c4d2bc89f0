"""The suite's own set-up (tests/conftest.py): torch in each pytest-xdist worker runs on the worker's share of
the cores, set through OMP_NUM_THREADS before anything imports torch (on the 2-core CI machine, two workers
with pools as wide as the machine made the suite 887 s instead of 703 s). It fails where torch was imported
before conftest.py set it, which would quietly bring the oversubscription back."""

from __future__ import annotations

import os


def test_torch_runs_on_the_workers_share_of_the_cores():
    import torch

    # at most: torch caps it at the cores it finds
    assert torch.get_num_threads() <= int(os.environ["OMP_NUM_THREADS"]), (
        "torch did not take OMP_NUM_THREADS: something imported it before tests/conftest.py set it"
    )
