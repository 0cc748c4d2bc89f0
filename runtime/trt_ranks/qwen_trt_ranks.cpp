// qwen_trt_ranks: one process per rank of a sharded build (docs/ranks.md). Each process joins an NCCL
// communicator, deserialises its rank's engine, hands the communicator to the execution context (the
// engine's DistCollective layers run over it) and runs one forward pass. All ranks enqueue together.
//
//   qwen_trt_ranks --engine OUT/ranks/<r>/model.engine --rank r --world N --nccl-id /shared/path/nccl.id
//                  --inputs DIR --outputs DIR
//
// Rank 0 writes the NCCL unique id to --nccl-id (written aside, then renamed); the others wait for it.
// Tensors are files DIR/<name>.raw (the bytes) and DIR/<name>.dims (the dims, space separated); every
// engine input must have both; every output is written the same way.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Options {
  std::string engine, nccl_id, inputs, outputs;
  int rank = -1, world = 0;
};

[[noreturn]] void fail(const std::string& message) { throw std::runtime_error(message); }

void cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(status));
}

void nccl(ncclResult_t status, const char* what) {
  if (status != ncclSuccess) fail(std::string(what) + ": " + ncclGetErrorString(status));
}

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, const char* message) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << message << "\n";
  }
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--engine") o.engine = value;
    else if (key == "--rank") o.rank = std::stoi(value);
    else if (key == "--world") o.world = std::stoi(value);
    else if (key == "--nccl-id") o.nccl_id = value;
    else if (key == "--inputs") o.inputs = value;
    else if (key == "--outputs") o.outputs = value;
    else fail("unknown option " + key);
  }
  if (o.engine.empty() || o.nccl_id.empty() || o.inputs.empty() || o.outputs.empty() || o.world < 1 ||
      o.rank < 0 || o.rank >= o.world) {
    fail("usage: qwen_trt_ranks --engine FILE --rank R --world N --nccl-id FILE --inputs DIR --outputs DIR");
  }
  return o;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

ncclUniqueId shared_id(const Options& o) {
  ncclUniqueId id;
  if (o.rank == 0) {
    nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    const std::string aside = o.nccl_id + ".tmp";
    std::ofstream(aside, std::ios::binary).write(id.internal, sizeof(id.internal));
    if (std::rename(aside.c_str(), o.nccl_id.c_str()) != 0) fail("cannot write " + o.nccl_id);
    return id;
  }
  for (int waited = 0; waited < 1200; ++waited) {  // up to 120 s for rank 0
    std::ifstream in(o.nccl_id, std::ios::binary);
    if (in && in.read(id.internal, sizeof(id.internal))) return id;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  fail("rank 0 did not write the NCCL id to " + o.nccl_id + " within 120 s");
}

size_t element_size(nvinfer1::DataType type) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF: case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    case nvinfer1::DataType::kINT8: case nvinfer1::DataType::kUINT8: case nvinfer1::DataType::kBOOL:
    case nvinfer1::DataType::kFP8: return 1;
    default: fail("an I/O tensor of a sub-byte type");
  }
}

nvinfer1::Dims read_dims(const std::string& path) {
  const std::vector<char> bytes = read_file(path);
  std::istringstream text(std::string(bytes.begin(), bytes.end()));
  nvinfer1::Dims dims{};
  int64_t d = 0;
  while (text >> d) {
    if (dims.nbDims == nvinfer1::Dims::MAX_DIMS) fail(path + ": too many dims");
    dims.d[dims.nbDims++] = d;
  }
  return dims;
}

int64_t volume(const nvinfer1::Dims& dims) {
  int64_t n = 1;
  for (int i = 0; i < dims.nbDims; ++i) n *= dims.d[i];
  return n;
}

int run(const Options& o) {
  int devices = 0;
  cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
  if (devices < 1) fail("no CUDA device");
  cuda(cudaSetDevice(o.rank % devices), "cudaSetDevice");

  ncclComm_t comm = nullptr;
  nccl(ncclCommInitRank(&comm, o.world, shared_id(o), o.rank), "ncclCommInitRank");

  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  const std::vector<char> blob = read_file(o.engine);
  std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (!engine) fail("cannot deserialise " + o.engine);
  std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
  if (!context || !context->setCommunicator(comm)) fail("the execution context did not take the communicator");

  cudaStream_t stream = nullptr;
  cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
  std::map<std::string, void*> buffers;
  std::vector<std::string> outputs;
  for (int i = 0; i < engine->getNbIOTensors(); ++i) {  // inputs first: their shapes set the outputs'
    const char* name = engine->getIOTensorName(i);
    if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT) {
      outputs.emplace_back(name);
      continue;
    }
    const nvinfer1::Dims dims = read_dims(o.inputs + "/" + name + ".dims");
    const std::vector<char> data = read_file(o.inputs + "/" + name + ".raw");
    const size_t bytes = static_cast<size_t>(volume(dims)) * element_size(engine->getTensorDataType(name));
    if (data.size() != bytes) fail(std::string(name) + ".raw does not hold its dims' bytes");
    if (!context->setInputShape(name, dims)) fail(std::string("input shape refused for ") + name);
    cuda(cudaMalloc(&buffers[name], bytes ? bytes : 1), "cudaMalloc");
    cuda(cudaMemcpyAsync(buffers[name], data.data(), bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    context->setTensorAddress(name, buffers[name]);
  }
  for (const std::string& name : outputs) {
    const nvinfer1::Dims dims = context->getTensorShape(name.c_str());
    const size_t bytes = static_cast<size_t>(volume(dims)) * element_size(engine->getTensorDataType(name.c_str()));
    cuda(cudaMalloc(&buffers[name], bytes ? bytes : 1), "cudaMalloc");
    context->setTensorAddress(name.c_str(), buffers[name]);
  }
  if (!context->enqueueV3(stream)) fail("enqueueV3 failed");
  cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  for (const std::string& name : outputs) {
    const nvinfer1::Dims dims = context->getTensorShape(name.c_str());
    std::vector<char> host(static_cast<size_t>(volume(dims)) * element_size(engine->getTensorDataType(name.c_str())));
    cuda(cudaMemcpy(host.data(), buffers[name], host.size(), cudaMemcpyDeviceToHost), "cudaMemcpy");
    std::ofstream(o.outputs + "/" + name + ".raw", std::ios::binary).write(host.data(), host.size());
    std::ofstream text(o.outputs + "/" + name + ".dims");
    for (int i = 0; i < dims.nbDims; ++i) text << (i ? " " : "") << dims.d[i];
  }
  for (auto& [name, pointer] : buffers) cudaFree(pointer);
  cudaStreamDestroy(stream);
  context.reset();  // the communicator must outlive the contexts attached to it
  engine.reset();
  ncclCommDestroy(comm);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::cerr << "qwen_trt_ranks: " << e.what() << "\n";
    return 1;
  }
}
