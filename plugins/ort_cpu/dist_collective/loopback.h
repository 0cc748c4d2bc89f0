// The loopback collective: N rank graphs running as N ONNX Runtime sessions in one process meet here, in
// memory, at each DistCollective node (the contract: qwen_export/collectives.py). Header-free: no ORT types.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace qwen_cpu {

enum class Collective { kAllReduce, kAllGather };

// Parses "all_reduce" / "all_gather"; an empty string for anything else fills `error`.
bool parse_collective(const std::string& name, Collective* out, std::string* error);

// The output shape of `op` on an input of `dims` over `nb_rank` ranks.
std::vector<int64_t> collective_output_dims(Collective op, const std::vector<int64_t>& dims, int64_t nb_rank);

// Rank `rank` of `nb_rank` contributes `input` (shape `dims`) to the collective `tag` of `group`, and gets
// the result in `output` (collective_output_dims). Returns when every rank has read what it needs, so the
// caller may free `input` afterwards. all_reduce sums in rank order 0..N-1: every rank gets the same bits.
// Throws std::runtime_error when the other ranks do not arrive within `timeout_s`, or when the ranks'
// shapes or rank counts disagree (every arrived rank fails the same way: none is left waiting).
void loopback_collective(int64_t group, int64_t tag, int64_t rank, int64_t nb_rank, Collective op,
                         const float* input, const std::vector<int64_t>& dims, float* output, double timeout_s);

// QWEN_CPU_COLLECTIVE_TIMEOUT_S, default 120 s.
double collective_timeout_s();

}  // namespace qwen_cpu
