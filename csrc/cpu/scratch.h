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

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

namespace ssl_fast {

inline at::Tensor empty_scratch(at::IntArrayRef shape, const at::TensorOptions& opts,
                                size_t min_bytes = size_t(32) << 20) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  const size_t bytes = (size_t)n * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < min_bytes || bytes < kHuge) return at::empty(shape, opts);
  const size_t len = bytes + kHuge;
  void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return at::empty(shape, opts);
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(raw) + kHuge - 1) & ~(uintptr_t)(kHuge - 1);
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(aligned), bytes & ~(kHuge - 1), MADV_HUGEPAGE);  // advice: may be refused
#endif
  return at::from_blob(reinterpret_cast<void*>(aligned), shape, [raw, len](void*) { munmap(raw, len); }, opts);
}

}  // namespace ssl_fast
