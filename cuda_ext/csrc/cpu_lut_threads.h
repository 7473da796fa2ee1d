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
// the caller times that wait; after kStallsToSolo stalls with fewer than kCalmCalls calls between
// them the calls run on the caller alone for a while (kSoloCalls, about ten tokens of the demo
// model) before trying the team again. A single stall is not enough: on an idle virtual machine
// one comes every few tokens (the host's own scheduling), and going solo after each of them made
// decoding 10-25% slower on average (4-bit demo model: median step 44 -> 38 ms without it).
constexpr int64_t kStallNs = 500 * 1000;
constexpr int64_t kStallsToSolo = 3;
constexpr int64_t kCalmCalls = 256;
constexpr int64_t kSoloCalls = 2048;

inline std::atomic<int64_t>& solo_calls_left() {
  static std::atomic<int64_t> left{0};
  return left;
}

// Recent stalls, and team calls since the last one (relaxed counters: an approximate policy).
inline std::atomic<int64_t>& recent_stalls() {
  static std::atomic<int64_t> stalls{0};
  return stalls;
}

inline std::atomic<int64_t>& calls_since_stall() {
  static std::atomic<int64_t> calls{0};
  return calls;
}

// After a team call: count a stall (going solo after kStallsToSolo close ones) or a calm call.
inline void note_team_call(bool stalled) {
  if (!stalled) {
    if (calls_since_stall().fetch_add(1, std::memory_order_relaxed) + 1 >= kCalmCalls)
      recent_stalls().store(0, std::memory_order_relaxed);
    return;
  }
  calls_since_stall().store(0, std::memory_order_relaxed);
  if (recent_stalls().fetch_add(1, std::memory_order_relaxed) + 1 >= kStallsToSolo) {
    recent_stalls().store(0, std::memory_order_relaxed);
    solo_calls_left().store(kSoloCalls, std::memory_order_relaxed);
  }
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
  note_team_call(done != 0 && now_ns() - done > kStallNs);
}

}  // namespace squeeze_cpu
