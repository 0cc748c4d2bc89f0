#!/usr/bin/env bash
# The main job end to end on the built-in tiny model: export -> validate against the golden reference.
# Usage: bash scripts/quickstart.sh [PRESET] [OUT]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
preset="${1:-tiny-qwen3.5-moe}"
out="${2:-$root/out/$preset}"
qwen-export export --preset "$preset" -o "$out/export"
qwen-export validate "$out/export" --golden "$root/golden/$preset"
