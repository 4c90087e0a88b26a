// Shared by csrc/cpu/ema.cpp and csrc/cuda/ema.cu: argument checks, layout handling and grouping of the
// multi-tensor EMA update ssl_fast::ema_update_ (the math is derived in csrc/cpu/ema.cpp).
//
// Contract of ssl_fast::ema_update_(Tensor(a!)[] ema, Tensor[] online, float momentum,
//                                   Tensor? momentum_tensor) -> ()
//   for every i: ema[i] = m * ema[i] + (1 - m) * online[i], in place, with m = momentum_tensor (0-dim, on
//   the tensors' device, read by the kernel: no host sync) when given, else the float `momentum`.
//   All tensors of one call live on one device (the Python layer splits a list by device).
// Every check runs before anything is written: a call that fails modifies nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

namespace ssl_fast {
namespace ema {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// One pair to update. `ema_work` is written in place; when the caller's ema tensor cannot be walked as one
// flat run of memory (a strided view with gaps), `ema_work` is a contiguous copy and `copy_back` is set:
// the kernel updates the copy and the result is copied into the caller's tensor afterwards.
struct Pair {
  at::Tensor ema_work;
  at::Tensor online_work;
  at::Tensor ema_user;
  bool copy_back = false;
};

// The pairs of one (ema dtype, online dtype) group.
struct Group {
  at::ScalarType ema_dtype;
  at::ScalarType online_dtype;
  std::vector<Pair> pairs;
};

// A tensor whose elements fill one span of memory (contiguous, channels-last, any permutation of a dense
// block): an elementwise update may walk it as a flat array, in storage order.
inline bool is_flat(const at::Tensor& t) { return t.is_non_overlapping_and_dense(); }

inline void check_lists(at::TensorList ema, at::TensorList online,
                        double momentum, const c10::optional<at::Tensor>& momentum_tensor) {
  TORCH_CHECK_VALUE(ema.size() == online.size(), "ema_tensors and online_tensors must have the same length, got ",
                    ema.size(), " and ", online.size());
  if (momentum_tensor.has_value() && momentum_tensor->defined()) {
    const at::Tensor& m = *momentum_tensor;
    TORCH_CHECK_VALUE(m.numel() == 1, "momentum must be a float or a 0-dim tensor, got a tensor of shape ",
                      m.sizes());
    TORCH_CHECK_TYPE(m.is_floating_point(), "momentum must be a floating-point tensor, got ", m.scalar_type());
  } else {
    TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, "momentum must be in [0, 1], got ", momentum);
  }
  const at::Device dev = ema.empty() ? at::Device(at::kCPU) : ema[0].device();
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& o = online[i];
    TORCH_CHECK_VALUE(e.defined(), "ema_tensors[", i, "] is an undefined tensor");
    TORCH_CHECK_VALUE(o.defined(), "online_tensors[", i, "] is an undefined tensor");
    TORCH_CHECK_TYPE(is_float_dtype(e.scalar_type()), "ema_tensors[", i,
                     "] must be float32, bfloat16, float16 or float64, got ", e.scalar_type());
    TORCH_CHECK_TYPE(is_float_dtype(o.scalar_type()), "online_tensors[", i,
                     "] must be float32, bfloat16, float16 or float64, got ", o.scalar_type());
    TORCH_CHECK_VALUE(e.sizes() == o.sizes(), "ema_tensors[", i, "] and online_tensors[", i,
                      "] must have the same shape, got ", e.sizes(), " and ", o.sizes());
    TORCH_CHECK_VALUE(e.device() == o.device(), "ema_tensors[", i, "] and online_tensors[", i,
                      "] must be on the same device, got ", e.device(), " and ", o.device());
    TORCH_CHECK_VALUE(e.device() == dev, "ema_tensors[", i, "] is on ", e.device(), " but ema_tensors[0] is on ",
                      dev, " (one device per call)");
  }
  if (momentum_tensor.has_value() && momentum_tensor->defined() && !ema.empty()) {
    TORCH_CHECK_VALUE(momentum_tensor->device() == dev, "momentum is on ", momentum_tensor->device(),
                      " but the tensors are on ", dev);
  }
}

// Pairs grouped by (ema dtype, online dtype), empty tensors dropped, layouts made walkable.
// Layouts: a flat ema tensor is updated in place; the online tensor is then used as is when it has the
// same strides, else copied into ema's layout (an elementwise update only needs both walked in the same
// order). A non-flat ema tensor (e.g. w[:, ::2]) is updated through a contiguous copy, copied back after.
inline std::vector<Group> make_groups(at::TensorList ema, at::TensorList online) {
  std::map<std::pair<int, int>, size_t> index;
  std::vector<Group> groups;
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& o = online[i];
    if (e.numel() == 0) continue;
    Pair p;
    p.ema_user = e;
    if (is_flat(e)) {
      p.ema_work = e;
    } else {
      p.ema_work = e.contiguous();
      p.copy_back = true;
    }
    const bool both_contiguous = o.is_contiguous() && p.ema_work.is_contiguous();
    if (both_contiguous || (o.strides() == p.ema_work.strides() && is_flat(o))) {
      p.online_work = o;
    } else {
      p.online_work = at::empty_strided(p.ema_work.sizes(), p.ema_work.strides(), o.options());
      p.online_work.copy_(o);
    }
    const auto key = std::make_pair(static_cast<int>(e.scalar_type()), static_cast<int>(o.scalar_type()));
    auto it = index.find(key);
    if (it == index.end()) {
      index.emplace(key, groups.size());
      groups.push_back(Group{e.scalar_type(), o.scalar_type(), {}});
      it = index.find(key);
    }
    groups[it->second].pairs.push_back(std::move(p));
  }
  return groups;
}

inline void copy_back(const std::vector<Group>& groups) {
  for (const Group& g : groups)
    for (const Pair& p : g.pairs)
      if (p.copy_back) p.ema_user.copy_(p.ema_work);
}

// The first element of a flat tensor in memory (its lowest address: strides of a flat tensor are >= 0).
inline void* flat_begin(const at::Tensor& t) { return t.data_ptr(); }

}  // namespace ema
}  // namespace ssl_fast
