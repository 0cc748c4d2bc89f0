"""Kernels and helpers of tests/test_triton_aot.py.

The kernels here are the AOT build's own test subjects (not the plugins'): imported without
TRITON_INTERPRET they compile; `run_in_subprocess` runs a snippet in a fresh interpreter without it.
`cubin_elf` reads a cubin's ELF independently of cuobjdump, to cross-check kernels.json.
`FAKE_DRIVER` is a stand-in libcuda (a few driver entry points recording what they were asked) so the
loader's choices and launch ABI can be checked on a machine without a GPU.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec

TESTS = Path(__file__).resolve().parent


@triton.jit
def scale_rows_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, flag, BLOCK: tl.constexpr):
    """out[r] = x[r] * w * rsqrt(mean(x[r]^2) + eps) (flag: 1 adds 1 to w): one row per program."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if flag:
        w = w + 1.0
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(out_ptr + row * n_cols + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tiled_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """c = a @ b, all row-major; pipelined tiles whose shared memory grows with BM, BN, BK and stages."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(
            a_ptr + rm[:, None] * K + (k + rk)[None, :], mask=(rm[:, None] < M) & ((k + rk)[None, :] < K)
        )
        b = tl.load(
            b_ptr + (k + rk)[:, None] * N + rn[None, :], mask=((k + rk)[:, None] < K) & (rn[None, :] < N)
        )
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))  # fmt: skip


SCALE_ROWS = KernelSpec(
    name="aot_test.scale_rows",
    kernel=scale_rows_kernel,
    signature={
        "x_ptr": "*{act}:16",
        "w_ptr": "*fp32",
        "out_ptr": "*{act}",
        "n_cols": "i32",
        "eps": "fp32",
        "flag": "i1",
        "BLOCK": "constexpr",
    },  # fmt: skip
    constexprs={"BLOCK": 256},
    num_warps=4,
    num_stages=1,
    per_sm={"sm_120a": {"num_warps": 2}},
)

# 128x128x64 fp16 tiles, 5 stages (triton keeps 4 in flight on sm_80/86): 128 KB of shared memory, more than
# sm_86 allows a block (99 KB), less than sm_80's 163 KB.
BIG_MATMUL = KernelSpec(
    name="aot_test.big_matmul",
    kernel=tiled_matmul_kernel,
    signature={
        "a_ptr": "*fp16:16",
        "b_ptr": "*fp16:16",
        "c_ptr": "*fp16:16",
        "M": "i32",
        "N": "i32:16",
        "K": "i32:16",
        "BM": "constexpr",
        "BN": "constexpr",
        "BK": "constexpr",
    },
    constexprs={"BM": 128, "BN": 128, "BK": 64},
    num_warps=8,
    num_stages=5,
    variants={"fp16": {}},
)


def clean_env() -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET (kernels imported under it would not compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_in_subprocess(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter without TRITON_INTERPRET (tests/ on its path)."""
    return subprocess.run(
        [sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def cubin_elf(data: bytes, entry: str) -> dict[str, int | bool]:
    """From a cubin's ELF64 sections: the registers of `entry` (EIATTR_REGCOUNT, attribute 0x2f of the
    .nv.info section: symbol index and count), its static shared memory (the .nv.shared.<entry> size), and
    whether the symbol table names it."""
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    # (name, type, offset, size, link) of each section
    sections = [struct.unpack_from("<IIQQQQI", data, shoff + i * shentsize) for i in range(shnum)]
    sections = [(s[0], s[1], s[4], s[5], s[6]) for s in sections]

    def name_of(table, index: int) -> str:
        start = table[2] + index
        return data[start : data.index(b"\0", start)].decode()

    by_name = {name_of(sections[shstrndx], s[0]): s for s in sections}
    symtab = next(s for s in sections if s[1] == 2)  # SHT_SYMTAB
    symbols = [
        name_of(sections[symtab[4]], struct.unpack_from("<I", data, symtab[2] + i)[0])
        for i in range(0, symtab[3], 24)
    ]
    registers = {}
    info = by_name[".nv.info"]
    at = info[2]
    while at < info[2] + info[3]:
        fmt, attr, size = data[at], data[at + 1], struct.unpack_from("<H", data, at + 2)[0]
        if fmt == 4 and attr == 0x2F:  # EIFMT_SVAL, EIATTR_REGCOUNT
            symbol, count = struct.unpack_from("<II", data, at + 4)
            registers[symbols[symbol]] = count
        at += 4 + (size if fmt == 4 else 0)
    shared = by_name.get(f".nv.shared.{entry}")
    return {
        "registers": registers.get(entry, -1),
        "static_shared": shared[3] if shared else 0,
        "symbol": entry in symbols,
    }


# A stand-in for libcuda: a context whose id and device capability the test sets, module loads counted,
# and the last launch's configuration and first parameters recorded.
FAKE_DRIVER = r"""
#include <cuda.h>
#include <cstdint>
#include <cstring>

extern "C" {
int g_major = 8, g_minor = 9, g_optin = 101376, g_have_context = 1, g_loads = 0, g_fail_load = 0;
unsigned long long g_ctx_id = 1;
const void* g_loaded_image = nullptr;
char g_function_name[256];
int g_attr_shared = -1, g_static_shared = 0;
unsigned g_grid[3], g_block[3], g_shared;
int g_num_params = 0;
unsigned long long g_params[16];
}

static int fake_module, fake_function;

CUresult CUDAAPI cuInit(unsigned int) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuGetErrorName(CUresult r, const char** s) {
  *s = r == CUDA_ERROR_INVALID_IMAGE ? "CUDA_ERROR_INVALID_IMAGE" : "CUDA_ERROR_UNKNOWN";
  return CUDA_SUCCESS; }
CUresult CUDAAPI cuGetErrorString(CUresult, const char** s) { *s = "fake driver"; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetCurrent(CUcontext* c) {
  *c = g_have_context ? reinterpret_cast<CUcontext>(0x1000 + g_ctx_id) : nullptr; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetId(CUcontext, unsigned long long* id) { *id = g_ctx_id; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetDevice(CUdevice* d) { *d = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice) {
  *v = a == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR ? g_major
     : a == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR ? g_minor : g_optin;
  return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleLoadData(CUmodule* m, const void* image) {
  if (g_fail_load) return CUDA_ERROR_INVALID_IMAGE;
  ++g_loads; g_loaded_image = image; *m = reinterpret_cast<CUmodule>(&fake_module); return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
  std::strncpy(g_function_name, name, sizeof g_function_name - 1);
  *f = reinterpret_cast<CUfunction>(&fake_function); return CUDA_SUCCESS; }
CUresult CUDAAPI cuFuncGetAttribute(int* v, CUfunction_attribute a, CUfunction) {
  *v = a == CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES ? g_static_shared : 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuFuncSetAttribute(CUfunction, CUfunction_attribute a, int v) {
  if (a == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) g_attr_shared = v;
  return CUDA_SUCCESS; }
CUresult CUDAAPI cuLaunchKernel(CUfunction, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                unsigned bz, unsigned shared, CUstream, void** params, void**) {
  g_grid[0] = gx; g_grid[1] = gy; g_grid[2] = gz; g_block[0] = bx; g_block[1] = by; g_block[2] = bz;
  g_shared = shared;
  for (int i = 0; i < g_num_params && i < 16; ++i) std::memcpy(&g_params[i], params[i], 8);
  return CUDA_SUCCESS; }
CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig*, CUfunction, void**, void**) {
  return CUDA_ERROR_NOT_SUPPORTED; }
CUresult CUDAAPI cuMemcpy2DAsync(const CUDA_MEMCPY2D*, CUstream) { return CUDA_ERROR_NOT_SUPPORTED; }
CUresult CUDAAPI cuMemsetD8Async(CUdeviceptr, unsigned char, size_t, CUstream) {
  return CUDA_ERROR_NOT_SUPPORTED; }
"""

# Drives the loader over the generated table and the fake driver; prints the table (one JSON object per
# image), `select M.m <sm or none>` lines, and `check <name> ok|FAIL <detail>` lines; exits with the number
# of failed checks. argv[1]: a folder to write each embedded cubin to, as <kernel>.<variant>.<sm>.cubin.
LOADER_MAIN = r"""
#include "common/cuda_driver.h"
#include "common/triton_loader.h"
#include <cstdio>
#include <cstring>
#include <string>

extern "C" {
extern int g_major, g_minor, g_optin, g_have_context, g_loads, g_fail_load, g_attr_shared, g_static_shared;
extern unsigned long long g_ctx_id;
extern const void* g_loaded_image;
extern char g_function_name[256];
extern unsigned g_grid[3], g_block[3], g_shared;
extern int g_num_params;
extern unsigned long long g_params[16];
}

using namespace qwen::triton;
static int failures = 0;
static void check(const char* name, bool ok, const std::string& detail = "") {
  std::printf("check %s %s %s\n", name, ok ? "ok" : "FAIL", detail.c_str());
  if (!ok) ++failures;
}
static bool has(const Status& s, const char* text) { return s.message.find(text) != std::string::npos; }
static void* at(unsigned long long address) { return reinterpret_cast<void*>(address); }
static const char* kRows = "aot_test.scale_rows";

static void printImage(const KernelImage& k) {
  std::printf("{\"kernel\": \"%s\", \"variant\": \"%s\", \"sm\": \"%s\", \"capability\": %d, ", k.kernel,
              k.variant, k.sm, k.capability);
  std::printf("\"entry\": \"%s\", \"cubin_bytes\": %zu, \"sha256\": \"%s\", \"num_warps\": %d, ", k.entry,
              k.cubinSize, k.sha256, k.numWarps);
  std::printf("\"shared\": %d, \"registers\": %d, \"args\": [", k.sharedBytes, k.registers);
  for (int a = 0; a < k.numArgs; ++a) {
    const ArgSpec& arg = k.args[a];
    std::printf("%s[\"%s\", \"%s\", %s]", a ? ", " : "", arg.name, arg.type, arg.div16 ? "true" : "false");
  }
  std::printf("]}\n");
}

int main(int argc, char** argv) {
  // argv[2]: the fake driver library, which the loader resolves at run time as it would libcuda.so.1.
  std::string why;
  if (argc > 2 && !qwen::cuda::setDriverLibrary(argv[2], &why)) {
    std::printf("check set_driver FAIL %s\n", why.c_str());
    return 1;
  }
  const KernelTable table = embeddedKernels();
  for (size_t i = 0; i < table.count; ++i) {
    const KernelImage& k = table.images[i];
    printImage(k);
    if (argc > 1) {
      std::string path = std::string(argv[1]) + "/" + k.kernel + "." + k.variant + "." + k.sm + ".cubin";
      FILE* f = std::fopen(path.c_str(), "wb");
      std::fwrite(k.cubin, 1, k.cubinSize, f);
      std::fclose(f);
    }
  }
  const int caps[][2] = {{7, 5}, {8, 0}, {8, 6}, {8, 7}, {8, 9}, {9, 0}, {10, 0}, {10, 3}, {12, 0}, {12, 1}};
  for (const auto& c : caps) {
    const KernelImage* im = selectImage(table, kRows, "fp16", c[0], c[1]);
    std::printf("select %d.%d %s\n", c[0], c[1], im ? im->sm : "none");
  }

  Loader& loader = Loader::instance();
  const KernelImage* sm89 = selectImage(table, kRows, "fp16", 8, 9);
  const Arg args[] = {Arg::ptr(at(0x7000)), Arg::ptr(at(0x8004)), Arg::ptr(at(0x9000)),
                      Arg::i32(256),        Arg::fp32(1e-6f),     Arg::i1(true)};
  g_num_params = 8;
  Status s = loader.launch(kRows, "fp16", Grid{3, 1, 1}, args, 6, nullptr);
  check("launch", s.ok(), s.message);
  check("loaded_sm89_cubin", sm89 && g_loaded_image == sm89->cubin);
  check("entry", std::strcmp(g_function_name, "scale_rows_kernel") == 0, g_function_name);
  check("grid_block_shared", g_grid[0] == 3 && g_grid[1] == 1 && g_block[0] == 32u * sm89->numWarps &&
                                 g_shared == static_cast<unsigned>(sm89->sharedBytes));
  float eps = 0;
  std::memcpy(&eps, &g_params[4], 4);
  check("params", g_params[0] == 0x7000 && g_params[1] == 0x8004 && g_params[2] == 0x9000 &&
                      (g_params[3] & 0xffffffffu) == 256 && eps == 1e-6f && (g_params[5] & 0xff) == 1);
  check("trailing_scratch_pointers_null", g_params[6] == 0 && g_params[7] == 0);
  s = loader.launch(kRows, "fp16", Grid{5, 1, 1}, args, 6, nullptr);
  check("module_loaded_once_per_context", s.ok() && g_loads == 1, std::to_string(g_loads));
  g_ctx_id = 2;
  s = loader.launch(kRows, "fp16", Grid{5, 1, 1}, args, 6, nullptr);
  check("new_context_loads_again", s.ok() && g_loads == 2, std::to_string(g_loads));

  s = loader.launch(kRows, "fp16", Grid{1, 1, 1}, args, 5, nullptr);
  check("arg_count", s.code == Code::kBadArguments, s.message);
  const Arg wrong[] = {args[0], args[1], args[2], Arg::i64(256), args[4], args[5]};
  s = loader.launch(kRows, "fp16", Grid{1, 1, 1}, wrong, 6, nullptr);
  check("arg_type", s.code == Code::kBadArguments && has(s, "n_cols"), s.message);
  const Arg misaligned[] = {Arg::ptr(at(0x7008)), args[1], args[2], args[3], args[4], args[5]};
  s = loader.launch(kRows, "fp16", Grid{1, 1, 1}, misaligned, 6, nullptr);
  check("div16", s.code == Code::kBadArguments && has(s, "multiple of 16"), s.message);
  s = loader.launch("aot_test.nope", "fp16", Grid{1, 1, 1}, args, 6, nullptr);
  check("unknown_kernel", s.code == Code::kUnknownKernel, s.message);

  g_ctx_id = 3, g_major = 7, g_minor = 5;
  s = loader.launch(kRows, "fp16", Grid{1, 1, 1}, args, 6, nullptr);
  check("no_image_for_sm75", s.code == Code::kNoImageForDevice && has(s, "sm_120a"), s.message);
  g_ctx_id = 4, g_major = 12, g_minor = 0;
  s = loader.launch(kRows, "bf16", Grid{2, 1, 1}, args, 6, nullptr);
  const KernelImage* sm120 = selectImage(table, kRows, "bf16", 12, 0);
  check("sm120_per_sm_warps", s.ok() && g_loaded_image == sm120->cubin && g_block[0] == 32u * sm120->numWarps,
        std::to_string(g_block[0]));
  g_ctx_id = 5, g_major = 9, g_minor = 0, g_optin = 64, g_static_shared = 1024;
  s = loader.launch(kRows, "fp16", Grid{1, 1, 1}, args, 6, nullptr);
  check("shared_memory_limit", s.code == Code::kSharedMemory, s.message);
  g_ctx_id = 6, g_optin = 232448, g_fail_load = 1;
  s = loader.launch(kRows, "fp16", Grid{1, 1, 1}, args, 6, nullptr);
  check("load_failure_is_a_status", s.code == Code::kCuda && has(s, "CUDA_ERROR_INVALID_IMAGE"), s.message);
  g_fail_load = 0, g_have_context = 0;
  s = loader.launch(kRows, "fp16", Grid{1, 1, 1}, args, 6, nullptr);
  check("no_context", s.code == Code::kNoContext, s.message);
  g_have_context = 1;

  // A kernel with global scratch and more than 48 KB of dynamic shared memory (a made-up image).
  static const unsigned char fakeCubin[8] = {0x7f, 'E', 'L', 'F'};
  static const ArgSpec fakeArgs[] = {{"x_ptr", "*fp32", ArgType::kPtr, false}};
  static const KernelImage fake[] = {{"aot_test.scratchy", "fp16", "sm_90a", 90, true, "scratchy",
                                      fakeCubin, 8, "", 4, 1, 2, 65536, 0, 64, 128, false, false, 32, 0,
                                      fakeArgs, 1, ""}};
  const KernelTable fakeTable{fake, 1};
  Loader scratchy(fakeTable);
  check("scratch_bytes", maxScratchBytes(fakeTable, "aot_test.scratchy", "fp16", Grid{4, 2, 1}) == 512);
  const Arg one[] = {Arg::ptr(at(0x1000))};
  g_ctx_id = 7, g_static_shared = 0, g_num_params = 3;
  const Grid grid{4, 2, 1};
  s = scratchy.launch("aot_test.scratchy", "fp16", grid, one, 1, nullptr);
  check("scratch_missing", s.code == Code::kScratch, s.message);
  s = scratchy.launch("aot_test.scratchy", "fp16", grid, one, 1, nullptr, at(0x10040), 512);
  check("scratch_misaligned", s.code == Code::kScratch, s.message);
  s = scratchy.launch("aot_test.scratchy", "fp16", grid, one, 1, nullptr, at(0x10080), 512);
  check("scratch_passed", s.ok() && g_params[1] == 0x10080 && g_params[2] == 0 && g_attr_shared == 65536,
        s.message);
  s = scratchy.launch("aot_test.scratchy", "fp16", Grid{0, 1, 1}, one, 1, nullptr);
  check("empty_grid_is_a_no_op", s.ok(), s.message);
  return failures;
}
"""
