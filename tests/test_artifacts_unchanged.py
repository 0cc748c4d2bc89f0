"""The refactors that made one source of truth per concept changed no byte of what users get: every tiny
preset's export, its build for every ONNX target, the graph each engine target hands its builder and the
engine manifest match the fingerprints recorded from the code before them (tests/artifact_fingerprints.py
says what is compared and what is left out). A deliberate change of an artifact re-records them with
`python tests/artifact_fingerprints.py --write` and says why in its commit."""

from __future__ import annotations

import json

import pytest
from artifact_fingerprints import RECORD, compare, fingerprints, machine

RECORDED = json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def now() -> dict[str, dict[str, str]]:
    return fingerprints(jobs=2)


def test_exports_builds_and_engine_graphs_are_byte_identical_to_the_record(now):
    artifacts = {case: files for case, files in now.items() if not case.endswith("/golden")}
    assert len(artifacts) == 39
    assert compare(RECORDED["artifacts"], artifacts) == []


def test_goldens_are_byte_identical_to_the_record(now):
    if RECORDED["machine"] != machine():
        pytest.skip(
            f"goldens were recorded on a {RECORDED['machine']['isa']} CPU and this one is "
            f"{machine()['isa']}: the reference's float sums differ in the last bits between ISAs; "
            "this runs on a machine of the recording ISA (the CI machine of this project)"
        )
    goldens = {case: files for case, files in now.items() if case.endswith("/golden")}
    assert len(goldens) == 3
    assert compare(RECORDED["artifacts"], goldens) == []
