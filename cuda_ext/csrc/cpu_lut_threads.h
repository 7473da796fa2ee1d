// Work sharing for the CPU kernels (included by cpu_lut.cpp only).
#pragma once

#include <ATen/Parallel.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "cpu_lut_decode.h"

namespace squeeze_cpu {

// --- work sharing ---------------------------------------------------------------------------------
//
// Chunks of a call are claimed from a shared counter by the caller and by helper threads, so the
// caller waits only for chunks already claimed, never for a helper that has not started. An OpenMP
// team instead stalls every call until its last thread gets a time slice: on a busy 2-core machine
// that made decode 7x slower than one thread. Helpers spin briefly after each job (kernel calls come
// back to back while decoding, and waking a sleeping thread costs as long as a small call), then
// sleep. A helper that wakes late finds no chunk left and never touches the finished call's data.

struct Job {
  std::atomic<int64_t> next{0}, done{0};
  int64_t chunks = 0;
  std::function<void(int64_t)> body;
  // Runs chunks until none is left.
  void drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      body(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

class Helpers {
 public:
  static Helpers& instance() { return *slot(); }

  // Publish `job` to up to `count` helper threads (started on first need).
  void publish(const std::shared_ptr<Job>& job, int64_t count) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int64_t>(started_) < count) {
      std::thread([this] { loop(); }).detach();
      ++started_;
    }
    job_ = job;
    generation_.fetch_add(1, std::memory_order_release);
    if (sleeping_ > 0) wake_.notify_all();
  }

 private:
  void loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(300);
      for (int i = 0; generation_.load(std::memory_order_acquire) == seen; ++i) {
        if ((i & 63) == 63) {
          if (std::chrono::steady_clock::now() > spin_until) break;
          std::this_thread::yield();  // let other runnable threads (torch's own) have the core
        }
#if SQUEEZE_AVX2
        _mm_pause();
#endif
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleeping_;
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        --sleeping_;
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job) job->drain();
    }
  }

  // Never destroyed (detached threads may outlive main); a forked child, which has none of the
  // threads and maybe a locked mutex, starts over with a fresh instance.
  static Helpers*& slot() {
    static Helpers* helpers = [] {
      pthread_atfork(nullptr, nullptr, [] { slot() = new Helpers(); });
      return new Helpers();
    }();
    return helpers;
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
  size_t started_ = 0;
  int sleeping_ = 0;
};

// body(c) for every chunk c in [0, chunks), shared with up to get_num_threads()-1 helpers.
// body must not throw (errors are flagged and checked by the caller afterwards).
template <typename Body>
void parallel_chunks(int64_t chunks, const Body& body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  auto job = std::make_shared<Job>();
  job->chunks = chunks;
  job->body = [&body](int64_t c) { body(c); };  // a late helper only calls it for a claimed chunk
  Helpers::instance().publish(job, threads - 1);
  job->drain();
  for (int i = 0; job->done.load(std::memory_order_acquire) < chunks; ++i) {
    if ((i & 63) == 63) std::this_thread::yield();  // a helper was preempted inside its chunk
  }
}

}  // namespace squeeze_cpu
