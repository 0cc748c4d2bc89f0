#!/usr/bin/env bash
# Install what the tests need (into .venv) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
ruff check .
# One worker per core (QWEN_TEST_WORKERS, 0: none), each test module on one worker, the modules that drive
# the plugin library together on one (tests/conftest.py): the other worker is not left waiting for its build.
python -m pytest -n "${QWEN_TEST_WORKERS:-2}" --dist loadgroup "$@"
