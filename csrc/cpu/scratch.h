// Large CPU buffers that a kernel fills completely (outputs and scratch), without 4 KiB page faults.
//
// at::empty takes large blocks from glibc: above its mmap threshold (at most 32 MiB) every call maps fresh
// pages, and below it a block freed at the top of the heap together with others (a step's gradients) is
// returned to the system once the free top exceeds the trim threshold (at most 64 MiB). Either way the next
// call touches fresh 4 KiB pages, one page fault each (measured on a 2-core AMD EPYC: a MoCo step with 65536
// negatives took 16450 faults, the SwAV loss module with 8 crops of 1024 x 3000 about 18000; tens of ms).
// empty_scratch maps such a block itself, 2 MiB aligned, and advises the whole 2 MiB pages inside it for
// transparent huge pages (where the kernel offers them: one fault per 2 MiB; the tail keeps 4 KiB pages, so the
// resident size is the block's size); the mapping is released with the tensor's last reference.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace ssl_fast {

// count tensors of one shape in ONE such mapping (the first at its 2 MiB boundary, each next one 64-byte aligned
// after it), each with its own storage (no tensor aliases another: torch.compile refuses custom-op outputs that
// alias); the mapping is released with the last of them. One mapping instead of count: a single 4 KiB-page tail
// (count blocks of 1024 x 3000 fp32, 11.7 MiB each, had count tails of 1.7 MiB: 3500 faults a SwAV step) and one
// munmap. Below min_bytes in all, count at::empty tensors.
inline std::vector<at::Tensor> empty_scratch_many(int64_t count, at::IntArrayRef shape, const at::TensorOptions& opts,
                                                  size_t min_bytes = size_t(32) << 20) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  const size_t one = (size_t)n * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  const size_t stride = (one + 63) & ~size_t(63);
  const size_t bytes = stride * (size_t)count;
  constexpr size_t kHuge = size_t(2) << 20;
  std::vector<at::Tensor> out;
  void* raw = MAP_FAILED;
  const size_t len = bytes + kHuge;
  if (count > 0 && bytes >= min_bytes && bytes >= kHuge)
    raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    for (int64_t i = 0; i < count; ++i) out.push_back(at::empty(shape, opts));
    return out;
  }
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(raw) + kHuge - 1) & ~(uintptr_t)(kHuge - 1);
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(aligned), bytes & ~(kHuge - 1), MADV_HUGEPAGE);  // advice: may be refused
#endif
  const std::shared_ptr<void> mapping(raw, [len](void* p) { munmap(p, len); });
  for (int64_t i = 0; i < count; ++i)
    out.push_back(at::from_blob(reinterpret_cast<void*>(aligned + (size_t)i * stride), shape,
                                [mapping](void*) {}, opts));  // the deleter holds the mapping
  return out;
}

// one tensor: empty_scratch_many's single case
inline at::Tensor empty_scratch(at::IntArrayRef shape, const at::TensorOptions& opts,
                                size_t min_bytes = size_t(32) << 20) {
  return empty_scratch_many(1, shape, opts, min_bytes)[0];
}

// Per-call scratch of n values of T, uninitialized. From kMappedScratchBytes on it is a private mapping released
// when the call returns, not a glibc heap block: such blocks (below the mmap threshold) stay resident in the
// heap after the call, and a process that trims its heap between steps (or starts fresh) pays their pages again
// on the next call (measured: the SwAV module's forward grew the heap's resident size by about 1 MiB at
// B = 1024, K = 3000, 0.9 MiB above the gradients it returns). Smaller scratch stays on the heap.
constexpr size_t kMappedScratchBytes = size_t(64) << 10;

template <typename T>
class ScratchArray {
 public:
  explicit ScratchArray(size_t n) : bytes_(n * sizeof(T)) {
    if (bytes_ >= kMappedScratchBytes) {
      void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p != MAP_FAILED) {
        data_ = static_cast<T*>(p);
        mapped_ = true;
        return;
      }
    }
    heap_.reset(new T[n > 0 ? n : 1]);
    data_ = heap_.get();
  }
  ~ScratchArray() {
    if (mapped_) munmap(data_, bytes_);
  }
  ScratchArray(const ScratchArray&) = delete;
  ScratchArray& operator=(const ScratchArray&) = delete;
  T* data() { return data_; }
  T& operator[](size_t i) { return data_[i]; }

 private:
  size_t bytes_;
  T* data_ = nullptr;
  bool mapped_ = false;
  std::unique_ptr<T[]> heap_;
};

// Scratch of n values of T for every thread of the parallel regions that follow, as ONE ScratchArray taken before
// them (thread t's slice: local()). A ScratchArray per task maps and unmaps inside the parallel region, where
// every munmap interrupts the other threads (a TLB shootdown) and the region waits for the slowest: measured on
// the 2-core AMD EPYC, the SwAV module (B = 1024, K = 3000, 8 crops) took ~2 ms more a step at 2 threads.
template <typename T>
class ThreadScratch {
 public:
  explicit ThreadScratch(size_t n)
      : stride_((n + kLine - 1) / kLine * kLine),
        threads_(std::max<int>(1, at::get_num_threads())),
        all_(stride_ * (size_t)threads_) {}
  // this thread's slice (at::parallel_for numbers its threads 0 .. get_num_threads() - 1, 0 when it runs inline)
  T* local() {
    const int t = at::get_thread_num();
    TORCH_CHECK(t >= 0 && t < threads_, "ThreadScratch: thread ", t, " outside the ", threads_, " it was made for");
    return all_.data() + stride_ * (size_t)t;
  }

 private:
  static constexpr size_t kLine = 64 / sizeof(T) > 0 ? 64 / sizeof(T) : 1;  // slices a cache line apart
  size_t stride_;
  int threads_;
  ScratchArray<T> all_;
};
}  // namespace ssl_fast
