// Multi-tensor EMA (teacher) update on CUDA: the CUDA kernel of ssl_fast::ema_update_ (schema and the CPU
// kernel in csrc/cpu/ema.cpp; argument checks, layouts and dtype grouping shared in csrc/cpu/ema.h).
//
// Math. For every pair (e, o) = (ema[i], online[i]) and element j, with w = 1 - m:
//     e_j <- m e_j + (1 - m) o_j  =  e_j + w (o_j - e_j)  =  o_j - m (o_j - e_j)
// (torch.lerp's two-sided form: the first when w < 1/2, as in every EMA, the second otherwise; exact when
// o_j == e_j, at m = 1 and at m = 0) in the accumulation type A = fp32 (fp64 when a tensor is fp64): both operands are converted to A, one
// rounding of e + w (o - e) in A, one rounding (round-to-nearest-even) to e's dtype on the store. No
// gradient (an in-place optimizer-like update under no_grad).
//
// Bandwidth bound. Per element: read sizeof(E) + sizeof(O), write sizeof(E) bytes (fp32: 12 B, bf16:
// 6 B, fp32 EMA of bf16 weights: 10 B) for 2 flops, i.e. <= 1/6 flop per byte against a GPU balance point
// of ~50-300 flop per byte: the kernel's only job is to stream memory at the device's copy bandwidth.
// What matters: wide (16-byte) loads and stores, enough bytes in flight per SM (kUnroll independent
// 16-byte loads of each operand per thread before any use), and ONE launch for the whole list instead of
// one or two per tensor (a ResNet-50 has 161 parameter tensors, ~100 of them under 4K elements, for which
// a launch costs more than the memory traffic).
//
// Multi-tensor apply (apex's idea, one launch per dtype group). Each tensor is cut into chunks of kChunk
// elements; chunk_start[t] is the prefix count of chunks before tensor t. The table of pointers, sizes
// and chunk prefixes travels as ONE __grid_constant__ kernel parameter (up to kMaxTensors tensors in
// ~28 KB: CUDA >= 12.1 allows 32764 bytes of parameters on sm_70+): it lives in the constant bank, it is
// delivered with the launch (no host-to-device copy, no allocation, no synchronization), and a CUDA graph
// captures it by value. A group of more than kMaxTensors tensors takes ceil(n / kMaxTensors) launches.
// Blocks walk the chunks with a grid-stride loop (grid = min(chunks, 4 blocks per SM)); a block finds its
// chunk's tensor by binary search over chunk_start (uniform across the block: constant-cache broadcasts).
// Inside a chunk: 16-byte vectors (V = 16 / max(sizeof(E), sizeof(O)) elements: 4 for fp32, 8 for two
// 16-bit dtypes, 4 for fp32 <- bf16 with 8-byte online loads) when both chunk pointers are aligned to
// the vector width (chunks start at multiples of kChunk, so that is the tensor's own alignment), then a
// scalar tail; a misaligned tensor (a view at an odd offset) takes the scalar path.
//
// Momentum: a float (w in the table) or a 0-dim device tensor read by every block (no host sync; the
// same graph replays with a new momentum written into that tensor).

#include "../cpu/ema.h"
#include "device.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace ssl_fast {
namespace {

constexpr int kMaxTensors = 1000;  // tensors per launch (kernel parameter space, see above)
constexpr int kChunk = 16384;      // elements per chunk
constexpr int kThreads = 512;
constexpr int kUnroll = 4;         // independent vector loads in flight per thread and operand
constexpr int kBlocksPerSm = 4;    // 2048 resident threads per SM on sm_80 / sm_90

struct Table {
  void* ema[kMaxTensors];
  const void* online[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_start[kMaxTensors + 1];
  const void* momentum_ptr;  // 0-dim tensor of the accumulation dtype, or nullptr: use w
  double m;                  // momentum when momentum_ptr is null
  double w;                  // 1 - momentum (formed in double: 1 - 0.996 is exact there, not in fp32)
  int32_t n;
};
static_assert(sizeof(Table) <= 32764, "Table exceeds the 32764-byte kernel parameter limit");

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<A>(x);
  } else {
    return static_cast<A>(static_cast<float>(x));
  }
}

template <typename E, typename O, typename A>
__device__ __forceinline__ E lerp(E e, O o, A w, A m) {
  const A a = to_acc<A>(e);
  const A b = to_acc<A>(o);
  return static_cast<E>(w < A(0.5) ? a + w * (b - a) : b - m * (b - a));  // w is uniform: no divergence
}

template <typename E, typename O, typename A, int V>
__global__ void __launch_bounds__(kThreads) ema_multi_tensor_kernel(const __grid_constant__ Table tab) {
  const A m = tab.momentum_ptr != nullptr ? *static_cast<const A*>(tab.momentum_ptr) : static_cast<A>(tab.m);
  const A w = tab.momentum_ptr != nullptr ? A(1) - m : static_cast<A>(tab.w);
  const int total = tab.chunk_start[tab.n];
  for (int c = blockIdx.x; c < total; c += gridDim.x) {
    int lo = 0, hi = tab.n - 1;  // the last t with chunk_start[t] <= c (tensors in the table are non-empty)
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (tab.chunk_start[mid] <= c) lo = mid; else hi = mid - 1;
    }
    const int64_t start = static_cast<int64_t>(c - tab.chunk_start[lo]) * kChunk;
    const int64_t len = min(static_cast<int64_t>(kChunk), tab.numel[lo] - start);
    E* e = static_cast<E*>(tab.ema[lo]) + start;
    const O* o = static_cast<const O*>(tab.online[lo]) + start;
    const bool aligned = reinterpret_cast<uintptr_t>(e) % (sizeof(E) * V) == 0 &&
                         reinterpret_cast<uintptr_t>(o) % (sizeof(O) * V) == 0;
    int64_t done = 0;
    if (aligned) {
      const int64_t nvec = len / V;
      auto* ev = reinterpret_cast<Pack<E, V>*>(e);
      const auto* ov = reinterpret_cast<const Pack<O, V>*>(o);
      for (int64_t base = threadIdx.x; base < nvec; base += kThreads * kUnroll) {
        Pack<E, V> eb[kUnroll];
        Pack<O, V> ob[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + u * kThreads;
          if (i < nvec) {
            eb[u] = ev[i];
            ob[u] = ov[i];
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + u * kThreads;
          if (i < nvec) {
#pragma unroll
            for (int k = 0; k < V; ++k) eb[u].v[k] = lerp<E, O, A>(eb[u].v[k], ob[u].v[k], w, m);
            ev[i] = eb[u];
          }
        }
      }
      done = nvec * V;
    }
    for (int64_t i = done + threadIdx.x; i < len; i += kThreads) e[i] = lerp<E, O, A>(e[i], o[i], w, m);
  }
}

template <typename E, typename O>
void launch_group(const ema::Group& g, double momentum, const c10::optional<at::Tensor>& momentum_tensor) {
  using A = std::conditional_t<std::is_same_v<E, double> || std::is_same_v<O, double>, double, float>;
  constexpr int V = 16 / static_cast<int>(std::max(sizeof(E), sizeof(O)));
  at::Tensor m_acc;
  const void* m_ptr = nullptr;
  if (momentum_tensor.has_value() && momentum_tensor->defined()) {
    const auto acc = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
    m_acc = momentum_tensor->reshape({}).to(acc);  // a no-op for an fp32 tensor; never a host sync
    m_ptr = m_acc.data_ptr();
  }
  const int device = g.pairs.front().ema_work.get_device();
  const int sms = sm_count(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const size_t count = g.pairs.size();
  for (size_t first = 0; first < count; first += kMaxTensors) {
    Table tab;
    tab.n = static_cast<int32_t>(std::min(count - first, static_cast<size_t>(kMaxTensors)));
    tab.momentum_ptr = m_ptr;
    tab.m = momentum;
    tab.w = 1.0 - momentum;
    int64_t chunks = 0;
    for (int t = 0; t < tab.n; ++t) {
      const ema::Pair& p = g.pairs[first + t];
      tab.ema[t] = ema::flat_begin(p.ema_work);
      tab.online[t] = ema::flat_begin(p.online_work);
      tab.numel[t] = p.ema_work.numel();
      tab.chunk_start[t] = static_cast<int32_t>(chunks);
      chunks += (tab.numel[t] + kChunk - 1) / kChunk;
    }
    TORCH_CHECK(chunks < (int64_t{1} << 31), "ema_update_: too many elements in one launch");
    tab.chunk_start[tab.n] = static_cast<int32_t>(chunks);
    const int grid = static_cast<int>(std::min<int64_t>(chunks, static_cast<int64_t>(sms) * kBlocksPerSm));
    ema_multi_tensor_kernel<E, O, A, V><<<grid, kThreads, 0, stream>>>(tab);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename E>
void dispatch_online(const ema::Group& g, double m, const c10::optional<at::Tensor>& mt) {
  switch (g.online_dtype) {
    case at::kFloat: return launch_group<E, float>(g, m, mt);
    case at::kDouble: return launch_group<E, double>(g, m, mt);
    case at::kBFloat16: return launch_group<E, c10::BFloat16>(g, m, mt);
    case at::kHalf: return launch_group<E, c10::Half>(g, m, mt);
    default: TORCH_CHECK_TYPE(false, "online_tensors: unsupported dtype ", g.online_dtype);
  }
}

void ema_update_cuda(at::TensorList ema, at::TensorList online, double momentum,
                     const c10::optional<at::Tensor>& momentum_tensor) {
  ema::check_lists(ema, online, momentum, momentum_tensor);
  if (ema.empty()) return;
  for (size_t i = 0; i < ema.size(); ++i)
    TORCH_CHECK_VALUE(ema[i].is_cuda(), "ema_tensors[", i, "]: the CUDA kernel got a tensor on ", ema[i].device());
  const c10::cuda::CUDAGuard guard(ema[0].device());
  const std::vector<ema::Group> groups = ema::make_groups(ema, online);
  for (const ema::Group& g : groups) {
    switch (g.ema_dtype) {
      case at::kFloat: dispatch_online<float>(g, momentum, momentum_tensor); break;
      case at::kDouble: dispatch_online<double>(g, momentum, momentum_tensor); break;
      case at::kBFloat16: dispatch_online<c10::BFloat16>(g, momentum, momentum_tensor); break;
      case at::kHalf: dispatch_online<c10::Half>(g, momentum, momentum_tensor); break;
      default: TORCH_CHECK_TYPE(false, "ema_tensors: unsupported dtype ", g.ema_dtype);
    }
  }
  ema::copy_back(groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_fast, CUDA, m) { m.impl("ema_update_", &ema_update_cuda); }

}  // namespace ssl_fast
