#!/usr/bin/env bash
# The main job end to end on a built-in tiny model: export -> passes -> lowering (with a numeric check after
# every pass) -> validate against the golden reference -> accuracy and latency reports -> speculative decoding.
# Usage: bash scripts/quickstart.sh [PRESET] [OUT]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
preset="${1:-tiny-qwen3.5-moe}"
out="${2:-$root/out/$preset}"
qwen-export build --preset "$preset" --target ort -o "$out/ort" --check
qwen-export validate "$out/ort" --golden "$root/golden/$preset"
qwen-export diff "$out/ort" --per-layer --report "$out/diff.json"
qwen-export profile "$out/ort" --report "$out/profile.json" --chart "$out/profile.png"
# Speculative decoding with the checkpoint's MTP layer (mtp.onnx): the plain greedy tokens, k drafts a step.
qwen-export run "$out/ort" --ids 1,2,3,4 --max-new-tokens 32 --speculative 2 --json > "$out/speculative.json"
echo "artifact: $out/ort (manifest.json, passes.json); reports: $out/diff.json, $out/profile.json, $out/profile.png, $out/speculative.json"
