// The memory ceiling of a fused multi-tensor step, measured: ssl_fast::stream_probe_ moves exactly the bytes of
// one fused pass (every written stream read once and written once, every read-only stream read once) with
// almost no arithmetic, in the optimizer + EMA kernels' layout (one parallel region over the concatenated
// tensors, blocks of `span` elements, at most 3 streams live per loop). Its time is what any kernel that must
// move those bytes needs on this machine: bench/ uses it as the `stream_ceiling` provider of the optimizer +
// EMA rows, so "x % of the ceiling" and "at most y x faster than torch" are measured, not asserted.
//
// Contract of ssl_fast::stream_probe_(Tensor(a!)[] written, Tensor[] read, int n, int span) -> ()
//   written: W * n tensors (W >= 0), stream-major (written[j * n + t] is stream j of item t); read: R * n
//   (R >= 1). Every tensor of item t has the numel of read[t]; each is contiguous, fp32 or bf16 (any mix).
//   For every item and element i, with a = r_1[i] + ... + r_{R-1}[i] (fp32, left to right; none when R = 1):
//     w_0[i] <- 0.5 * w_0[i] + r_0[i] + a,   w_j[i] <- 0.5 * w_j[i] + r_0[i] for j = 1 .. W-1,
//   in fp32 (the compiler may contract a product and a sum into one FMA: values to fp32 rounding, not
//   bitwise). A bf16 stream is widened exactly and stored truncated (its low 16 bits dropped: no rounding
//   work; a bandwidth probe, not math anyone should use). W = 0 reads the R streams only (a norm pass).
#include "ema.h"
#include "optim_ema.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace ssl_fast {
namespace {

constexpr int64_t kGrain = 1 << 15;  // as the optimizer + EMA kernels

inline float wide(float x) { return x; }
inline float wide(uint16_t b) { return optim_ema::u2f(static_cast<uint32_t>(b) << 16); }
inline void put(float& d, float v) { d = v; }
inline void put(uint16_t& d, float v) { d = static_cast<uint16_t>(optim_ema::f2u(v) >> 16); }

// dst[i] <- 0.5 dst[i] + src[i] (+ acc[i] when ACC: the sum of the other read streams, fp32, from L1).
template <typename D, typename S, bool ACC>
inline void axpy_block(D* __restrict dst, const S* __restrict src, const float* __restrict acc, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float v = 0.5f * wide(dst[i]) + wide(src[i]);
    if constexpr (ACC) v = v + acc[i];
    put(dst[i], v);
  }
}

template <typename S>
inline void acc_block(float* __restrict acc, const S* __restrict src, int64_t n, bool first) {
  if (first) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] = wide(src[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + wide(src[i]);
  }
}

// A tensor's data pointer and dtype, read once before the parallel region (data_ptr() per block would cost
// ~10% of a 256-element block's time).
struct Stream {
  void* ptr;
  bool f32;
};

template <typename D, typename S>
void axpy(Stream d, Stream s, int64_t off, const float* acc, int64_t n) {
  D* dp = static_cast<D*>(d.ptr) + off;
  const S* sp = static_cast<const S*>(s.ptr) + off;
  if (acc != nullptr) axpy_block<D, S, true>(dp, sp, acc, n);
  else axpy_block<D, S, false>(dp, sp, nullptr, n);
}

void axpy_any(Stream d, Stream s, int64_t off, const float* acc, int64_t n) {
  if (d.f32 && s.f32) axpy<float, float>(d, s, off, acc, n);
  else if (d.f32) axpy<float, uint16_t>(d, s, off, acc, n);
  else if (s.f32) axpy<uint16_t, float>(d, s, off, acc, n);
  else axpy<uint16_t, uint16_t>(d, s, off, acc, n);
}

void acc_any(float* acc, Stream s, int64_t off, int64_t n, bool first) {
  if (s.f32) acc_block(acc, static_cast<const float*>(s.ptr) + off, n, first);
  else acc_block(acc, static_cast<const uint16_t*>(s.ptr) + off, n, first);
}

void stream_probe_cpu(at::TensorList written, at::TensorList read, int64_t n, int64_t span) {
  TORCH_CHECK_VALUE(n >= 1, "n must be >= 1, got ", n);
  TORCH_CHECK_VALUE(span >= 16 && span <= 8192, "span must be in [16, 8192], got ", span);
  const int64_t nw = static_cast<int64_t>(written.size()), nr = static_cast<int64_t>(read.size());
  TORCH_CHECK_VALUE(nw % n == 0, "written must hold W * n tensors, got ", nw, " for n = ", n);
  TORCH_CHECK_VALUE(nr >= n && nr % n == 0, "read must hold R * n tensors (R >= 1), got ", nr, " for n = ", n);
  const int64_t W = nw / n, R = nr / n;
  auto check = [&](const at::Tensor& t, const char* name, int64_t k, int64_t numel) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, "[", k, "]: the CPU kernel got a tensor on ", t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, "[", k,
                     "] must be float32 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.is_contiguous(), name, "[", k, "] must be contiguous");
    TORCH_CHECK_VALUE(t.numel() == numel, name, "[", k, "] has ", t.numel(), " elements, item ", k % n,
                      " has ", numel);
  };
  std::vector<int64_t> offs(n + 1, 0);
  for (int64_t k = 0; k < nr; ++k) check(read[k], "read", k, read[k % n].numel());
  for (int64_t k = 0; k < nw; ++k) check(written[k], "written", k, read[k % n].numel());
  for (int64_t t = 0; t < n; ++t) offs[t + 1] = offs[t] + read[t].numel();
  auto streams = [](at::TensorList ts) {
    std::vector<Stream> out;
    for (const at::Tensor& t : ts) out.push_back({t.data_ptr(), t.scalar_type() == at::kFloat});
    return out;
  };
  const std::vector<Stream> ws = streams(written), rs = streams(read);

  at::parallel_for(0, offs[n], kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(span));
    int64_t t = std::upper_bound(offs.begin(), offs.end(), begin) - offs.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offs[t + 1]);
      for (int64_t s = begin - offs[t]; s < stop - offs[t]; s += span) {
        const int64_t len = std::min(span, stop - offs[t] - s);
        if (W == 0) {
          for (int64_t k = 0; k < R; ++k) acc_any(acc.data(), rs[k * n + t], s, len, k == 0);
          asm volatile("" : : "r"(acc.data()) : "memory");  // the sums are observed: the reads stay
          continue;
        }
        for (int64_t k = 1; k < R; ++k) acc_any(acc.data(), rs[k * n + t], s, len, k == 1);
        for (int64_t j = 0; j < W; ++j)
          axpy_any(ws[j * n + t], rs[t], s, (j == 0 && R > 1) ? acc.data() : nullptr, len);
      }
      begin = stop;
      ++t;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_fast, m) {
  m.def("stream_probe_(Tensor(a!)[] written, Tensor[] read, int n, int span) -> ()");
}

TORCH_LIBRARY_IMPL(ssl_fast, CPU, m) { m.impl("stream_probe_", &stream_probe_cpu); }

}  // namespace ssl_fast
