"""The Triton kernels' ahead-of-time build (plugins/aot.py) and our C++ loader
(plugins/common/triton_loader.*), without a GPU: cubins for all six SMs with kernels.json matching the files,
the shared-memory refusal, and the generated C++ compiled with the loader and run against a stand-in driver.
Every plugin kernel for all six SMs is the library build's (tests/test_plugins_build.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from triton_aot_support import FAKE_DRIVER, LOADER_MAIN, cubin_elf, run_in_subprocess

from qwen_export.plugins import aot
from qwen_export.plugins.triton_support import SMS, KernelSpec

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"
CUDA_INCLUDE = Path("/usr/local/cuda/include")
CXX = shutil.which("g++") or shutil.which("c++")
SCALE_ROWS_ARGS = ["x_ptr", "w_ptr", "out_ptr", "n_cols", "eps", "flag"]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """One fresh interpreter (no TRITON_INTERPRET): the small kernel for all SMs, then the big one for sm_80
    (fits) and again for sm_86 and sm_80 (must be refused, leaving the sm_80 build in place)."""
    root = tmp_path_factory.mktemp("aot")
    code = textwrap.dedent(f"""
        import json, sys
        from triton_aot_support import BIG_MATMUL, SCALE_ROWS
        from qwen_export.plugins.aot import SharedMemoryError, compile_kernels
        compile_kernels([SCALE_ROWS], out_dir={str(root / "small")!r})
        compile_kernels([BIG_MATMUL], ["sm_80"], out_dir={str(root / "big")!r})
        try:
            compile_kernels([BIG_MATMUL], ["sm_86", "sm_80"], out_dir={str(root / "big")!r})
        except SharedMemoryError as exc:
            print(json.dumps({{"refused": str(exc)}}))
        else:
            print(json.dumps({{"refused": None}}))
    """)
    run = run_in_subprocess(code)
    assert run.returncode == 0, run.stderr[-4000:]
    return root, json.loads(run.stdout.strip().splitlines()[-1])


def _records(folder: Path) -> list[dict]:
    return json.loads((folder / aot.JSON_NAME).read_text())


def test_limits_cover_every_sm():
    assert set(aot.SHARED_MEMORY_LIMIT) == set(aot.SM_CAPABILITY) == set(SMS)
    assert aot.SHARED_MEMORY_LIMIT["sm_86"] == 99 * 1024 and aot.SHARED_MEMORY_LIMIT["sm_90a"] == 227 * 1024


def test_small_kernel_compiles_for_all_six_sms(builds):
    root, _ = builds
    small = root / "small"
    records = _records(small)
    assert [r["sm"] for r in records] == list(SMS) * 2
    assert [r["variant"] for r in records] == ["fp16"] * 6 + ["bf16"] * 6
    files = sorted(p.name for p in small.iterdir())
    assert files == sorted([r["cubin"] for r in records] + [aot.JSON_NAME, aot.CPP_NAME])
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    umask = os.umask(0)
    os.umask(umask)
    assert small.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only 0700
    for r in records:
        assert list(r) == list(aot.RECORD_FIELDS)
        data = (small / r["cubin"]).read_bytes()
        assert r["cubin"] == f"aot_test.scale_rows.{r['variant']}.{r['sm']}.cubin"
        assert r["sha256"] == hashlib.sha256(data).hexdigest() and r["cubin_bytes"] == len(data)
        assert r["capability"] == aot.SM_CAPABILITY[r["sm"]] and r["ptx_target"] == r["sm"]
        # Read straight from the ELF, not through cuobjdump as the build does.
        elf = cubin_elf(data, r["entry"])
        assert elf["symbol"] and r["entry"] == "scale_rows_kernel"
        assert (r["registers"], r["static_shared"]) == (elf["registers"], elf["static_shared"])
        assert 0 < r["registers"] <= 255
        assert r["spills"] == (r["stack_bytes"] + r["local_bytes"]) // 4 == 0
        assert 0 < r["shared"] + r["static_shared"] <= r["shared_limit"] == aot.SHARED_MEMORY_LIMIT[r["sm"]]
        assert r["num_warps"] == (2 if r["sm"] == "sm_120a" else 4)  # per_sm override
        assert (r["num_stages"], r["num_ctas"], r["global_scratch_size"]) == (1, 1, 0)
        act = r["variant"]
        assert [a["name"] for a in r["args"]] == SCALE_ROWS_ARGS  # BLOCK (constexpr) removed
        assert [a["type"] for a in r["args"]] == [f"*{act}", "*fp32", f"*{act}", "i32", "fp32", "i1"]
        assert [a["bytes"] for a in r["args"]] == [8, 8, 8, 4, 4, 1]
        assert [a["div16"] for a in r["args"]] == [True] + [False] * 5
        assert r["constexprs"] == {"BLOCK": 256}
        assert not r["line_info"] and ".nv_debug_ptx_txt" not in data.decode("latin-1")  # shipped lean


def test_shared_memory_over_the_limit_is_refused(builds):
    root, result = builds
    message = result["refused"]
    assert message is not None, "a 128 KB kernel was accepted for sm_86"
    assert "aot_test.big_matmul" in message and "sm_86" in message
    assert "131072" in message and str(aot.SHARED_MEMORY_LIMIT["sm_86"]) in message
    assert "sm_80" not in message.split("sm_86")[0]  # only sm_86 is named as too small
    records = _records(root / "big")  # the earlier build is untouched
    assert [(r["sm"], r["shared"]) for r in records] == [("sm_80", 131072)]


def test_interpreted_kernels_are_refused(tmp_path):
    from triton.runtime.interpreter import InterpretedFunction

    def kernel(x_ptr):
        pass

    spec = KernelSpec("aot_test.interpreted", InterpretedFunction(kernel), {"x_ptr": "*fp32"})
    with pytest.raises(aot.AotError, match="TRITON_INTERPRET"):
        aot.compile_kernels([spec], ["sm_89"], out_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(
    CXX is None or not (CUDA_INCLUDE / "cuda.h").exists(),
    reason="needs g++ and the CUDA toolkit's headers (cuda.h); runs wherever nvcc is installed, as in CI",
)
def test_generated_cpp_and_loader_compile_and_launch_on_a_stand_in_driver(builds, tmp_path):
    root, _ = builds
    small = root / "small"
    (tmp_path / "fake_driver.cpp").write_text(FAKE_DRIVER)
    (tmp_path / "main.cpp").write_text(LOADER_MAIN)
    flags = ["-std=c++17", "-O1", f"-I{PLUGINS}", f"-I{CUDA_INCLUDE}"]
    strict = ["-Wall", "-Wextra", "-Werror", "-fPIC", "-fvisibility=hidden", "-c"]
    common = PLUGINS / "common"
    for source in (small / aot.CPP_NAME, common / "triton_loader.cpp", common / "cuda_driver.cpp"):
        run = subprocess.run([CXX, *flags, *strict, str(source), "-o", str(tmp_path / (source.stem + ".o"))],
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr[-4000:]
    # The loader finds its driver at run time (dlopen), here the fake one, which the test also links to
    # reach its recorded globals.
    driver = tmp_path / "libfakecuda.so"
    fake = str(tmp_path / "fake_driver.cpp")
    run = subprocess.run(
        [CXX, *flags, "-shared", "-fPIC", fake, "-o", str(driver)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-4000:]
    exe = tmp_path / "loader_test"
    objects = [str(tmp_path / f"{n}.o") for n in ("qwen_triton_cubins", "triton_loader", "cuda_driver")]
    link = [str(driver), f"-Wl,-rpath,{tmp_path}", "-ldl"]
    run = subprocess.run([CXX, *flags, str(tmp_path / "main.cpp"), *objects, *link, "-o", str(exe)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    dumped = tmp_path / "cubins"
    dumped.mkdir()
    run = subprocess.run([str(exe), str(dumped), str(driver)], capture_output=True, text=True, timeout=60)
    lines = run.stdout.splitlines()
    failed = [line for line in lines if line.startswith("check ") and " FAIL" in line]
    assert run.returncode == 0 and not failed, "\n".join(failed) or run.stderr

    # The embedded table is kernels.json, and its bytes are the cubin files.
    table = [json.loads(line) for line in lines if line.startswith("{")]
    records = _records(small)
    keys = ("kernel", "variant", "sm", "capability", "entry", "cubin_bytes", "sha256", "num_warps", "shared",
            "registers")  # fmt: skip
    assert [{k: t[k] for k in keys} for t in table] == [{k: r[k] for k in keys} for r in records]
    assert [t["args"] for t in table] == [
        [[a["name"], a["type"], a["div16"]] for a in r["args"]] for r in records
    ]
    for r in records:
        assert (dumped / r["cubin"]).read_bytes() == (small / r["cubin"]).read_bytes()
    # Same-major devices take the highest older minor; "a" cubins only their own capability.
    selected = dict(line.split()[1:] for line in lines if line.startswith("select "))
    assert selected == {
        "7.5": "none", "8.0": "sm_80", "8.6": "sm_86", "8.7": "sm_86", "8.9": "sm_89", "9.0": "sm_90a",
        "10.0": "sm_100a", "10.3": "none", "12.0": "sm_120a", "12.1": "none",
    }  # fmt: skip


def test_command_line_builds_with_a_progress_bar(tmp_path):
    out = tmp_path / "cli"
    code = textwrap.dedent(f"""
        import sys
        import qwen_export.plugins.aot as aot
        from triton_aot_support import SCALE_ROWS
        aot.all_kernel_specs = lambda notes=None: [SCALE_ROWS]
        sys.exit(aot.main(["--out", {str(out)!r}, "--sm", "sm_90a", "--sm", "sm_89", "--jobs", "2"]))
    """)
    run = run_in_subprocess(code)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "4/4" in run.stderr and "4 cubins for sm_89, sm_90a" in run.stderr
    assert [(r["variant"], r["sm"]) for r in _records(out)] == [
        ("fp16", "sm_89"), ("fp16", "sm_90a"), ("bf16", "sm_89"), ("bf16", "sm_90a"),
    ]  # fmt: skip
