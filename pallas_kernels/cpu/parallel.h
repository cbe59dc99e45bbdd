// Work items shared among XLA's CPU threads (the FFI's thread pool): items are handed out by an atomic
// counter, the calling thread works too, helpers that start late find nothing left, and the caller
// waits only for items some thread has claimed, so it cannot deadlock on a pool whose other threads
// are busy with other work.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jlora_cpu {

struct Counter {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Runs fn(i) for every i in [0, n) on the calling thread and up to `helpers` pool threads. fn is
// copied into each helper, so it must capture by value.
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t helpers, Fn fn) {
  auto counter = std::make_shared<Counter>();
  auto run = [counter, n, fn] {
    for (int64_t i; (i = counter->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      fn(i);
      counter->done.fetch_add(1, std::memory_order_release);
    }
  };
  if (n > 1)
    for (int64_t h = 0; h < helpers; ++h) {
      auto task = run;
      pool.Schedule(std::move(task));
    }
  run();
  while (counter->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace jlora_cpu
