"""The AVX2 int4 tile alone: GMAC/s of `tile_avx2` at 1 to 4 activation rows and blocks of 32, 64 and 128,
this tree's int4_gemm_avx2.cpp against a baseline commit's, one thread, K = 1024 and 16 weight groups
(128 KiB, hot in cache: the prefill case, where each group is read once per 4 rows). Both sides are compiled
with the library's own flags into one small driver each and run in alternating rounds (this machine is
shared: only ratios measured side by side mean much). Needs g++ and an AVX2 CPU. Writes
benchmarks/int4_tile_<isa>_machine.{json,md}.

    python scripts/bench_int4_tile.py [--baseline REV] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import REPO, produced_by, provenance, write_results

from qwen_export.cpu_kernels import COMMON_FLAGS, SOURCE_DIR, SOURCES

TILE = "int4_linear/int4_gemm_avx2.cpp"
BASELINE = "0075552"  # the two-pass tile for 2-4 rows
ROWS = (1, 2, 3, 4)
BLOCKS = (32, 64, 128)
K, GROUPS = 1024, 16
# Random codes and activations (the tile's speed does not depend on them); prints one GMAC/s per line.
DRIVER = r"""
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "int4_linear/int4_gemm.h"
using namespace qwen_cpu;
int main(int, char** argv) {
  const int rows = atoi(argv[1]), groups = atoi(argv[2]);
  const int64_t k = atoi(argv[3]), block = atoi(argv[4]);
  std::vector<int8_t> q(rows * k);
  for (auto& v : q) v = static_cast<int8_t>(rand() % 255 - 127);
  std::vector<float> scale(rows * k / block, 0.01f);
  std::vector<int32_t> zero_fix(rows * k / block, 5);
  std::vector<uint8_t> packed(groups * packed_group_bytes(k));
  for (auto& v : packed) v = static_cast<uint8_t>(rand());
  std::vector<Half> scales(groups * group_scales(k, block), 0x3c00);
  std::vector<float> y(rows * kGroupRows * groups);
  const QuantizedRows x{q.data(), scale.data(), zero_fix.data()};
  const double macs = 1.0 * rows * kGroupRows * k * groups;
  const long iters = static_cast<long>(2e10 / macs) + 1;
  for (int pass = 0; pass < 2; ++pass) {  // the first warms up
    const auto start = std::chrono::steady_clock::now();
    for (long i = 0; i < iters; ++i)
      for (int g = 0; g < groups; ++g)
        detail::tile_avx2(x, rows, k, block, packed.data() + g * packed_group_bytes(k),
                          scales.data() + g * group_scales(k, block), y.data() + g * kGroupRows,
                          kGroupRows * groups, kGroupRows);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (pass) printf("%.2f\n", iters * macs / s / 1e9);
  }
}
"""


def build(folder: Path, tile_source: str) -> Path:
    (folder / "tile.cpp").write_text(tile_source)
    (folder / "driver.cpp").write_text(DRIVER)
    exe = folder / "bench"
    flags = [*COMMON_FLAGS, *SOURCES[TILE], f"-I{SOURCE_DIR}"]
    subprocess.run(["g++", *flags, folder / "driver.cpp", folder / "tile.cpp", "-o", exe], check=True)
    return exe


def gmacs(exe: Path, rows: int, block: int) -> float:
    out = subprocess.run([exe, str(rows), str(GROUPS), str(K), str(block)], check=True, capture_output=True)
    return float(out.stdout.decode().split()[-1])


def render(r: dict) -> str:
    lines = [
        "# The AVX2 int4 tile alone (GMAC/s, one thread)",
        "",
        f"{produced_by(r)}",
        "",
        f"`tile_avx2` with K = {K}, {GROUPS} weight groups hot in cache; before: {r['baseline']}'s "
        "int4_gemm_avx2.cpp, after: this tree's, compiled with the library's flags; the median of "
        f"{r['rounds']} alternating rounds.",
        "",
        "| block | rows | before | after | after / before |",
        "|---:|---:|---:|---:|---:|",
    ]
    for c in r["cases"]:
        ratio = c["after"] / c["before"]
        lines.append(f"| {c['block']} | {c['rows']} | {c['before']:.1f} | {c['after']:.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()
    result = provenance()
    if result["machine"]["vector_isa"].startswith("none"):
        sys.exit("bench_int4_tile: needs an x86 CPU with AVX2")
    show = ["git", "show", f"{args.baseline}:plugins/ort_cpu/{TILE}"]
    old = subprocess.run(show, check=True, capture_output=True, text=True, cwd=REPO).stdout
    with tempfile.TemporaryDirectory() as tmp:
        sides = {}
        for name, source in (("before", old), ("after", (SOURCE_DIR / TILE).read_text())):
            (Path(tmp) / name).mkdir()
            sides[name] = build(Path(tmp) / name, source)
        cases = []
        for block in BLOCKS:
            for rows in ROWS:
                runs = {name: [] for name in sides}
                for _ in range(args.rounds):
                    for name, exe in sides.items():
                        runs[name].append(gmacs(exe, rows, block))
                medians = {name: statistics.median(v) for name, v in runs.items()}
                cases.append({"block": block, "rows": rows, **medians})
    write_results(
        args.out,
        f"int4_tile_{result['machine']['vector_isa']}_machine",
        {**result, "baseline": args.baseline, "rounds": args.rounds, "cases": cases},
        render,
    )


if __name__ == "__main__":
    main()
