// The slice of ONNX Runtime's C ABI that a custom-op library needs, declared here so the kernels build
// without ONNX Runtime's headers (the onnxruntime wheel ships none).
//
// OrtApi is a table of function pointers that only ever grows at the end, so a slot index means the same
// function in every later release; we ask for API version 17 (ONNX Runtime 1.17, the first with
// KernelContext_ParallelFor) and run on any newer runtime. OrtCustomOp is the struct a library fills in
// for each op; ORT reads the fields the op's `version` says it has.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qwen_cpu::ort {

struct Status;  // OrtStatus, and the other opaque ORT handles
struct SessionOptions;
struct KernelInfo;
struct KernelContext;
struct Value;
struct TensorTypeAndShapeInfo;
struct CustomOpDomain;
struct ShapeInferContext;

constexpr uint32_t kApiVersion = 17;

enum ElementType : int { kFloat = 1, kUint8 = 2, kInt64 = 7, kFloat16 = 10 };  // ONNXTensorElementDataType
enum ErrorCode : int { kFail = 1, kInvalidArgument = 2 };    // OrtErrorCode
enum Characteristic : int { kRequired = 0, kOptional = 1 };  // OrtCustomOpInputOutputCharacteristic
enum MemType : int { kMemTypeDefault = 0 };                  // OrtMemType

// Slots of OrtApi used here.
enum Slot : size_t {
  kCreateStatus = 0,
  kGetErrorMessage = 2,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelInfoGetAttributeString = 87,
  kKernelContextGetInputCount = 88,
  kKernelContextGetOutputCount = 89,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelContextParallelFor = 274,
  // API 24 (ONNX Runtime 1.24): an input's element type and a pointer to its dims, with nothing allocated
  // (GetTensorTypeAndShape allocates an info object per call, and ReleaseTensorTypeAndShapeInfo frees it)
  kGetTensorElementTypeAndShapeDataReference = 414,
};

using ApiTable = void* const*;  // const OrtApi*

struct ApiBase {  // OrtApiBase
  ApiTable (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

struct CustomOp {  // OrtCustomOp, the 26 fields of ORT >= 1.17 headers
  uint32_t version;
  void* (*CreateKernel)(const CustomOp* op, ApiTable api, const KernelInfo* info);
  const char* (*GetName)(const CustomOp* op);
  const char* (*GetExecutionProviderType)(const CustomOp* op);
  ElementType (*GetInputType)(const CustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const CustomOp* op);
  ElementType (*GetOutputType)(const CustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const CustomOp* op);
  void (*KernelCompute)(void* kernel, KernelContext* context);
  void (*KernelDestroy)(void* kernel);
  Characteristic (*GetInputCharacteristic)(const CustomOp* op, size_t index);
  Characteristic (*GetOutputCharacteristic)(const CustomOp* op, size_t index);
  MemType (*GetInputMemoryType)(const CustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const CustomOp* op);
  int (*GetVariadicInputHomogeneity)(const CustomOp* op);
  int (*GetVariadicOutputMinArity)(const CustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const CustomOp* op);
  Status* (*CreateKernelV2)(const CustomOp* op, ApiTable api, const KernelInfo* info, void** kernel);
  Status* (*KernelComputeV2)(void* kernel, KernelContext* context);
  Status* (*InferOutputShapeFn)(const CustomOp* op, ShapeInferContext* context);
  int (*GetStartVersion)(const CustomOp* op);
  int (*GetEndVersion)(const CustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

// Typed calls into the table.
struct Api {
  ApiTable table = nullptr;
  bool shape_references = false;  // read input shapes through the slot above (register.cpp decides)

  template <typename Fn>
  Fn fn(Slot slot) const {
    return reinterpret_cast<Fn>(table[slot]);
  }
  Status* CreateStatus(ErrorCode code, const char* message) const {
    return fn<Status* (*)(ErrorCode, const char*)>(kCreateStatus)(code, message);
  }
  Status* CreateCustomOpDomain(const char* domain, CustomOpDomain** out) const {
    return fn<Status* (*)(const char*, CustomOpDomain**)>(kCreateCustomOpDomain)(domain, out);
  }
  Status* CustomOpDomainAdd(CustomOpDomain* domain, const CustomOp* op) const {
    return fn<Status* (*)(CustomOpDomain*, const CustomOp*)>(kCustomOpDomainAdd)(domain, op);
  }
  Status* AddCustomOpDomain(SessionOptions* options, CustomOpDomain* domain) const {
    return fn<Status* (*)(SessionOptions*, CustomOpDomain*)>(kAddCustomOpDomain)(options, domain);
  }
  Status* GetTensorMutableData(Value* value, void** out) const {
    return fn<Status* (*)(Value*, void**)>(kGetTensorMutableData)(value, out);
  }
  Status* GetTensorElementType(const TensorTypeAndShapeInfo* info, ElementType* out) const {
    return fn<Status* (*)(const TensorTypeAndShapeInfo*, ElementType*)>(kGetTensorElementType)(info, out);
  }
  Status* GetDimensionsCount(const TensorTypeAndShapeInfo* info, size_t* out) const {
    return fn<Status* (*)(const TensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(info, out);
  }
  Status* GetDimensions(const TensorTypeAndShapeInfo* info, int64_t* dims, size_t count) const {
    return fn<Status* (*)(const TensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(info, dims, count);
  }
  Status* GetTensorElementTypeAndShapeDataReference(const Value* value, ElementType* type, const int64_t** dims,
                                                     size_t* count) const {
    return fn<Status* (*)(const Value*, ElementType*, const int64_t**, size_t*)>(
        kGetTensorElementTypeAndShapeDataReference)(value, type, dims, count);
  }
  Status* GetTensorTypeAndShape(const Value* value, TensorTypeAndShapeInfo** out) const {
    return fn<Status* (*)(const Value*, TensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(value, out);
  }
  Status* KernelInfoGetAttributeInt64(const KernelInfo* info, const char* name, int64_t* out) const {
    return fn<Status* (*)(const KernelInfo*, const char*, int64_t*)>(kKernelInfoGetAttributeInt64)(info, name, out);
  }
  Status* KernelInfoGetAttributeString(const KernelInfo* info, const char* name, char* out, size_t* size) const {
    return fn<Status* (*)(const KernelInfo*, const char*, char*, size_t*)>(kKernelInfoGetAttributeString)(info, name, out,
                                                                                                      size);
  }
  Status* KernelInfoGetAttributeFloat(const KernelInfo* info, const char* name, float* out) const {
    return fn<Status* (*)(const KernelInfo*, const char*, float*)>(kKernelInfoGetAttributeFloat)(info, name, out);
  }
  Status* KernelContextGetInputCount(const KernelContext* context, size_t* out) const {
    return fn<Status* (*)(const KernelContext*, size_t*)>(kKernelContextGetInputCount)(context, out);
  }
  Status* KernelContextGetOutputCount(const KernelContext* context, size_t* out) const {
    return fn<Status* (*)(const KernelContext*, size_t*)>(kKernelContextGetOutputCount)(context, out);
  }
  Status* KernelContextGetInput(const KernelContext* context, size_t index, const Value** out) const {
    return fn<Status* (*)(const KernelContext*, size_t, const Value**)>(kKernelContextGetInput)(context, index, out);
  }
  Status* KernelContextGetOutput(KernelContext* context, size_t index, const int64_t* dims, size_t count,
                                 Value** out) const {
    return fn<Status* (*)(KernelContext*, size_t, const int64_t*, size_t, Value**)>(kKernelContextGetOutput)(
        context, index, dims, count, out);
  }
  void ReleaseStatus(Status* status) const { fn<void (*)(Status*)>(kReleaseStatus)(status); }
  void ReleaseTensorTypeAndShapeInfo(TensorTypeAndShapeInfo* info) const {
    fn<void (*)(TensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(info);
  }
  Status* KernelContextParallelFor(const KernelContext* context, void (*body)(void*, size_t), size_t total,
                                   size_t batches, void* data) const {
    return fn<Status* (*)(const KernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
        kKernelContextParallelFor)(context, body, total, batches, data);
  }
};

}  // namespace qwen_cpu::ort
