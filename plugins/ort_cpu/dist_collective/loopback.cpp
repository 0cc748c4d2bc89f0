#include "dist_collective/loopback.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>

namespace qwen_cpu {
namespace {

// One (group, tag) meeting point. A round: every rank deposits its input, waits for all, computes its own
// output from all inputs, and leaves only when all have finished reading (so no input is freed early).
// The next round on the same tag can therefore only start after the previous one has fully ended.
struct Slot {
  std::mutex mutex;
  std::condition_variable changed;
  int64_t nb_rank = 0;
  int64_t arrived = 0;
  int64_t finished = 0;
  uint64_t round = 0;  // completed rounds
  std::vector<const float*> inputs;
  std::vector<std::vector<int64_t>> dims;
};

std::mutex g_registry_mutex;
std::map<std::pair<int64_t, int64_t>, std::unique_ptr<Slot>> g_slots;

Slot& slot_for(int64_t group, int64_t tag) {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  auto& slot = g_slots[{group, tag}];
  if (!slot) slot = std::make_unique<Slot>();
  return *slot;
}

std::string where(int64_t group, int64_t tag, int64_t rank, int64_t nb_rank) {
  return "DistCollective loopback (group " + std::to_string(group) + ", tag " + std::to_string(tag) + ", rank " +
         std::to_string(rank) + " of " + std::to_string(nb_rank) + ")";
}

std::string shape_text(const std::vector<int64_t>& dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}

}  // namespace

bool parse_collective(const std::string& name, Collective* out, std::string* error) {
  if (name == "all_reduce") {
    *out = Collective::kAllReduce;
  } else if (name == "all_gather") {
    *out = Collective::kAllGather;
  } else {
    *error = "collective_operation '" + name + "' is not all_reduce or all_gather";
    return false;
  }
  return true;
}

std::vector<int64_t> collective_output_dims(Collective op, const std::vector<int64_t>& dims, int64_t nb_rank) {
  std::vector<int64_t> out = dims;
  if (op == Collective::kAllGather) {
    if (out.empty()) throw std::runtime_error("DistCollective all_gather needs an input of rank 1 or more");
    out[0] *= nb_rank;
  }
  return out;
}

double collective_timeout_s() {
  const char* text = std::getenv("QWEN_CPU_COLLECTIVE_TIMEOUT_S");
  if (text == nullptr || *text == '\0') return 120.0;
  const double value = std::atof(text);
  return value > 0 ? value : 120.0;
}

void loopback_collective(int64_t group, int64_t tag, int64_t rank, int64_t nb_rank, Collective op,
                         const float* input, const std::vector<int64_t>& dims, float* output, double timeout_s) {
  if (nb_rank < 1 || rank < 0 || rank >= nb_rank) throw std::runtime_error(where(group, tag, rank, nb_rank) + ": bad rank");
  Slot& slot = slot_for(group, tag);
  std::unique_lock<std::mutex> lock(slot.mutex);
  if (slot.arrived == 0) {  // the first rank of a round sets it up
    slot.nb_rank = nb_rank;
    slot.inputs.assign(nb_rank, nullptr);
    slot.dims.assign(nb_rank, {});
  }
  if (slot.nb_rank != nb_rank) {
    throw std::runtime_error(where(group, tag, rank, nb_rank) + ": another rank says nb_rank " +
                             std::to_string(slot.nb_rank));
  }
  if (slot.inputs[rank] != nullptr) {
    throw std::runtime_error(where(group, tag, rank, nb_rank) + ": this rank arrived twice in one round");
  }
  slot.inputs[rank] = input;
  slot.dims[rank] = dims;
  const uint64_t round = slot.round;
  if (++slot.arrived == nb_rank) slot.changed.notify_all();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  if (!slot.changed.wait_until(lock, deadline, [&] { return slot.arrived == nb_rank || slot.round != round; })) {
    // Withdraw, so a later run of this group and tag starts clean.
    slot.inputs[rank] = nullptr;
    --slot.arrived;
    throw std::runtime_error(where(group, tag, rank, nb_rank) + ": waited " + std::to_string(timeout_s) + " s, " +
                             std::to_string(slot.arrived + 1) + " of " + std::to_string(nb_rank) +
                             " ranks arrived (another rank failed or was not run)");
  }
  std::string mismatch;
  for (int64_t r = 0; r < nb_rank; ++r) {
    if (slot.dims[r] != dims) {
      mismatch = where(group, tag, rank, nb_rank) + ": rank " + std::to_string(r) + " has shape " +
                 shape_text(slot.dims[r]) + ", this rank " + shape_text(dims);
    }
  }
  lock.unlock();
  if (mismatch.empty()) {  // reading the others' inputs needs no lock: they stay until the round ends
    int64_t count = 1;
    for (int64_t d : dims) count *= d;
    if (op == Collective::kAllReduce) {
      for (int64_t i = 0; i < count; ++i) {
        float sum = slot.inputs[0][i];
        for (int64_t r = 1; r < nb_rank; ++r) sum += slot.inputs[r][i];
        output[i] = sum;
      }
    } else {
      for (int64_t r = 0; r < nb_rank; ++r) {
        const float* src = slot.inputs[r];
        std::copy(src, src + count, output + r * count);
      }
    }
  }
  lock.lock();
  if (++slot.finished == nb_rank) {  // the last reader ends the round
    slot.arrived = 0;
    slot.finished = 0;
    slot.inputs.assign(nb_rank, nullptr);
    ++slot.round;
    slot.changed.notify_all();
  } else {
    slot.changed.wait(lock, [&] { return slot.round != round; });
  }
  if (!mismatch.empty()) throw std::runtime_error(mismatch);
}

}  // namespace qwen_cpu
