// Device facts shared by the CUDA multi-tensor kernels (ema.cu, optim_ema.cu).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>

namespace ssl_fast {

// Streaming multiprocessors of `device`, cached (ATen's CUDAContext.h would pull in cuBLAS / cuSPARSE
// headers that a minimal toolkit lacks; this needs only the runtime). `inline`: one cache across files.
inline int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace ssl_fast
