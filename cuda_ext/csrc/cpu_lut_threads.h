// Work sharing for the CPU kernels (included by cpu_lut.cpp only).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

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

// body(c) for every chunk c in [0, chunks). body must not throw (errors are flagged and checked
// by the caller afterwards).
template <typename Body>
void parallel_chunks(int64_t chunks, const Body& body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) body(c);
  });
}

}  // namespace squeeze_cpu
