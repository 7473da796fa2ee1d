// Work sharing for the CPU kernels (included by the cpu_lut*.cpp sources).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>

#include "cpu_lut_decode.h"

namespace squeeze_cpu {

// --- work sharing ---------------------------------------------------------------------------------
//
// Chunks of a call are claimed from a shared counter by the threads of torch's own OpenMP team
// (at::parallel_for), so uneven chunks (a tail, a preempted thread) balance out. Measured on the
// demo model at 2 threads: the OpenMP team decodes a token 12% faster than dedicated helper
// threads, which competed for the second core with the team's spinning threads between calls.
// The cost is OpenMP's: on a machine busy with other processes every parallel region (torch's
// included) may wait for a thread that does not get a time slice.

// On a busy machine a thread of the team may not get a time slice for milliseconds, and the
// parallel region's closing barrier waits for it even when the caller has claimed every chunk
// (measured: 6-9 ms per call instead of 60 us at load 7 on 2 cores, i.e. seconds per token). So
// the caller times that wait; after a stall the calls run on the caller alone for a while
// (kSoloCalls, about ten tokens of the demo model) before trying the team again.
constexpr int64_t kStallNs = 500 * 1000;
constexpr int64_t kSoloCalls = 2048;

inline std::atomic<int64_t>& solo_calls_left() {
  static std::atomic<int64_t> left{0};
  return left;
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// body(c) for every chunk c in [0, chunks). body must not throw (errors are flagged and checked
// by the caller afterwards).
template <typename Body>
void parallel_chunks(int64_t chunks, const Body& body) {
  int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads > 1 && solo_calls_left().load(std::memory_order_relaxed) > 0) {
    solo_calls_left().fetch_sub(1, std::memory_order_relaxed);
    threads = 1;
  }
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> caller_done{0};
  const int caller = at::get_thread_num();
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) body(c);
    if (at::get_thread_num() == caller) caller_done.store(now_ns(), std::memory_order_relaxed);
  });
  const int64_t done = caller_done.load(std::memory_order_relaxed);
  if (done != 0 && now_ns() - done > kStallNs) solo_calls_left().store(kSoloCalls, std::memory_order_relaxed);
}

}  // namespace squeeze_cpu
