#!/usr/bin/env bash
# Install what the tests need (into .venv) and run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
ruff check .
ruff format --check .  # the style ruff writes (`ruff format .` fixes a failure)
# Two workers (QWEN_TEST_WORKERS; 0: none), each test module on one of them, so its module-scoped fixtures
# are made once. (The modules that drive the plugin library all on one worker, so that the other never waits
# for its first build, took 1091 s against 997 s: that worker became the long pole.)
python -m pytest -n "${QWEN_TEST_WORKERS:-2}" --dist loadfile "$@"
