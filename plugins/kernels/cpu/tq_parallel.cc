// tq::Parallel: how kernels spread independent work items over threads.
#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "tq_kernels.h"

namespace tq {

void Parallel::for_each(size_t total, Task task, void* task_ctx) const {
  if (run == nullptr || total <= 1) {
    for (size_t i = 0; i < total; ++i) task(task_ctx, i);
    return;
  }
  run(runner, task, total, task_ctx);
}

namespace {

// Work stealing by a shared counter: items may differ a lot in cost (context lengths).
void run_on_std_threads(void* runner, Parallel::Task task, size_t total, void* task_ctx) {
  size_t threads = static_cast<size_t>(reinterpret_cast<intptr_t>(runner));
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  threads = std::min(threads, total);
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) task(task_ctx, i);
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

}  // namespace

Parallel std_thread_parallel(int threads) {
  Parallel p;
  p.run = run_on_std_threads;
  p.runner = reinterpret_cast<void*>(static_cast<intptr_t>(std::max(threads, 0)));
  return p;
}

}  // namespace tq
