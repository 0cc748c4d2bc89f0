// The CUDA driver API, resolved at run time from libcuda.so.1 (dlopen), the way Triton's own launcher and
// the CUDA runtime find it: the plugin library links no libcuda, so it builds on machines without a GPU
// driver (CI) and loads wherever TensorRT does.
//
// `driver()` resolves the table once per process; every entry point the loader and the launchers call is a
// member. `setDriverLibrary(path)` points the process at another library implementing the same symbols
// before first use (the CPU replay tests use plugins/tests/recording_driver.c this way).
#pragma once

#include <cuda.h>

#include <string>

namespace qwen {
namespace cuda {

// The symbol each member resolves is the one cuda.h maps its name to (cuMemcpy2DAsync -> _v2, ...).
struct Driver {
  CUresult (*cuInit)(unsigned int);
  CUresult (*cuGetErrorName)(CUresult, const char**);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxGetId)(CUcontext, unsigned long long*);
  CUresult (*cuCtxGetDevice)(CUdevice*);
  CUresult (*cuDeviceGetAttribute)(int*, CUdevice_attribute, CUdevice);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleUnload)(CUmodule);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuFuncGetAttribute)(int*, CUfunction_attribute, CUfunction);
  CUresult (*cuFuncSetAttribute)(CUfunction, CUfunction_attribute, int);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void**, void**);
  CUresult (*cuLaunchKernelEx)(const CUlaunchConfig*, CUfunction, void**, void**);
  CUresult (*cuMemcpy2DAsync)(const CUDA_MEMCPY2D*, CUstream);
  CUresult (*cuMemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
};

// The resolved table, or null with `*error` saying why (no libcuda.so.1, a missing symbol).
const Driver* driver(std::string* error);

// Use `path` instead of libcuda.so.1. Fails (false, `*error`) once the driver has been resolved.
bool setDriverLibrary(const char* path, std::string* error);

}  // namespace cuda
}  // namespace qwen
