// What every qwen.cpu op wrapper shares: the ORT API table, tensor access, attributes, errors as OrtStatus,
// ORT's intra-op thread pool, and the OrtCustomOp table of an op. Header-only but for the table itself.
#pragma once

#include <algorithm>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/ort_abi.h"
#include "common/parallel.h"

namespace qwen_cpu::ort {

extern Api g_api;  // set once by RegisterCustomOps (register.cpp); the table is static for the process


struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void check(Status* status) {
  if (status == nullptr) return;
  std::string message = g_api.fn<const char* (*)(const Status*)>(kGetErrorMessage)(status);
  g_api.ReleaseStatus(status);
  throw Error(message);
}

struct Tensor {
  const Value* value = nullptr;
  ElementType type = kFloat;
  std::vector<int64_t> dims;

  int64_t numel() const {
    int64_t count = 1;
    for (int64_t d : dims) count *= d;
    return count;
  }
  template <typename T>
  const T* data() const {
    void* out = nullptr;
    check(g_api.GetTensorMutableData(const_cast<Value*>(value), &out));
    return static_cast<const T*>(out);
  }
};

// The element type and dims of `t.value`: through the info object API 17 allocates (and frees) per call.
inline void read_shape_info(Tensor& t) {
  TensorTypeAndShapeInfo* info = nullptr;
  check(g_api.GetTensorTypeAndShape(t.value, &info));
  size_t rank = 0;
  Status* status = g_api.GetTensorElementType(info, &t.type);
  if (status == nullptr) status = g_api.GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    t.dims.resize(rank);
    status = g_api.GetDimensions(info, t.dims.data(), rank);
  }
  g_api.ReleaseTensorTypeAndShapeInfo(info);
  check(status);
}

inline Tensor input(KernelContext* context, size_t index, ElementType type, const char* op, const char* name) {
  Tensor t;
  check(g_api.KernelContextGetInput(context, index, &t.value));
  if (t.value == nullptr) throw Error(std::string(op) + ": input " + name + " is missing");
  if (g_api.shape_references) {  // ORT >= 1.24: nothing allocated (on the trained model, 9% of a decode step)
    const int64_t* dims = nullptr;
    size_t rank = 0;
    check(g_api.GetTensorElementTypeAndShapeDataReference(t.value, &t.type, &dims, &rank));
    t.dims.assign(dims, dims + rank);
  } else {
    read_shape_info(t);
  }
  if (t.type != type) throw Error(std::string(op) + ": input " + name + " has the wrong element type");
  return t;
}

// Whether an optional input `index` was given (a node may omit trailing optional inputs or leave one empty).
inline bool input_given(KernelContext* context, size_t index) {
  size_t count = 0;
  check(g_api.KernelContextGetInputCount(context, &count));
  const Value* value = nullptr;
  if (index < count) check(g_api.KernelContextGetInput(context, index, &value));
  return value != nullptr;
}

inline float* output(KernelContext* context, const std::vector<int64_t>& dims, size_t index = 0) {
  Value* value = nullptr;
  check(g_api.KernelContextGetOutput(context, index, dims.data(), dims.size(), &value));
  void* data = nullptr;
  check(g_api.GetTensorMutableData(value, &data));
  return static_cast<float*>(data);
}

inline int64_t attribute(const KernelInfo* info, const char* op, const char* name, const int64_t* fallback = nullptr) {
  int64_t value = 0;
  Status* status = g_api.KernelInfoGetAttributeInt64(info, name, &value);
  if (status == nullptr) return value;
  g_api.ReleaseStatus(status);
  if (fallback != nullptr) return *fallback;
  throw Error(std::string(op) + ": attribute " + name + " is required");
}

inline std::string string_attribute(const KernelInfo* info, const char* op, const char* name) {
  size_t size = 0;
  check(g_api.KernelInfoGetAttributeString(info, name, nullptr, &size));  // the size, with its NUL
  std::string value(size, '\0');
  check(g_api.KernelInfoGetAttributeString(info, name, value.data(), &size));
  value.resize(size > 0 ? size - 1 : 0);
  if (value.empty()) throw Error(std::string(op) + ": attribute " + name + " is required");
  return value;
}

inline float float_attribute(const KernelInfo* info, const char* name, float fallback) {
  float value = 0.f;
  Status* status = g_api.KernelInfoGetAttributeFloat(info, name, &value);
  if (status == nullptr) return value;
  g_api.ReleaseStatus(status);
  return fallback;
}

inline void expect(bool condition, const std::string& message) {
  if (!condition) throw Error(message);
}

// Runs fn(i), i < count, on ORT's intra-op threads (serially for one task: no hand-off cost).
inline void parallel_for(KernelContext* context, int64_t count, const std::function<void(int64_t)>& fn) {
  if (count <= 1) return serial_for(count, fn);
  auto body = [](void* data, size_t index) {
    (*static_cast<const std::function<void(int64_t)>*>(data))(static_cast<int64_t>(index));
  };
  check(g_api.KernelContextParallelFor(context, body, static_cast<size_t>(count), 0,
                                       const_cast<std::function<void(int64_t)>*>(&fn)));
}

// The cores' ParallelFor on this call's ORT thread pool.
inline ParallelFor pool(KernelContext* context) {
  return [context](int64_t count, const std::function<void(int64_t)>& fn) { parallel_for(context, count, fn); };
}

template <typename Kernel>
Status* guarded(const char* op, Kernel&& body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return g_api.CreateStatus(kInvalidArgument, e.what());
  } catch (...) {
    return g_api.CreateStatus(kFail, op);
  }
}

// An op of `Inputs` inputs, the first `RequiredInputs` of them required and the rest optional.
template <size_t Inputs, const ElementType (&InputTypes)[Inputs], size_t Outputs, const char* const& Name,
          Status* (*Create)(const CustomOp*, ApiTable, const KernelInfo*, void**),
          Status* (*Compute)(void*, KernelContext*), typename Kernel, size_t RequiredInputs = Inputs>
CustomOp make_op() {
  CustomOp op{};
  op.version = kApiVersion;
  op.GetName = [](const CustomOp*) { return Name; };
  op.GetExecutionProviderType = [](const CustomOp*) -> const char* { return nullptr; };  // CPU
  op.GetInputType = [](const CustomOp*, size_t i) { return InputTypes[i]; };
  op.GetInputTypeCount = [](const CustomOp*) { return Inputs; };
  op.GetOutputType = [](const CustomOp*, size_t) { return kFloat; };
  op.GetOutputTypeCount = [](const CustomOp*) { return Outputs; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const CustomOp*, size_t i) { return i < RequiredInputs ? kRequired : kOptional; };
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return kRequired; };
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return kMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const CustomOp*) { return 1; };
  op.CreateKernelV2 = Create;
  op.KernelComputeV2 = Compute;
  op.GetStartVersion = [](const CustomOp*) { return 1; };
  op.GetEndVersion = [](const CustomOp*) { return 0x7fffffff; };
  return op;
}

}  // namespace qwen_cpu::ort
