// ssl_fast._C: one pybind module for every compiled kernel (CPU always; CUDA pieces when built).
#include <torch/extension.h>

#include <string>
#include <vector>

namespace ssl_fast {
std::vector<at::Tensor> ntxent_fwd(const at::Tensor& z1, const at::Tensor& z2, double inv_temp, bool normalize,
                                   int64_t d, int64_t block);
std::vector<at::Tensor> ntxent_bwd(double grad, const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& zn,
                                   const at::Tensor& norms, const at::Tensor& lse, double inv_temp,
                                   bool normalize, int64_t d, int64_t block);
std::vector<at::Tensor> info_nce_fwd(const at::Tensor& q, const at::Tensor& k, double inv_temp, bool normalize,
                                     bool symmetric, int64_t d, int64_t block);
std::vector<at::Tensor> info_nce_bwd(double grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& qn,
                                     const at::Tensor& kn, const at::Tensor& qnorm, const at::Tensor& knorm,
                                     const at::Tensor& lse_r, const at::Tensor& lse_c, double inv_temp,
                                     bool normalize, bool symmetric, int64_t d, int64_t block);
std::string set_cpu_gemm(const std::string& which);
std::string cpu_gemm();
}  // namespace ssl_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssl_fast fused CPU kernels";
  m.def("ntxent_fwd", &ssl_fast::ntxent_fwd, "NT-Xent forward -> (loss, lse, zn, norms)");
  m.def("ntxent_bwd", &ssl_fast::ntxent_bwd, "NT-Xent backward -> (dz1, dz2, gz)");
  m.def("info_nce_fwd", &ssl_fast::info_nce_fwd,
        "cross-view InfoNCE forward -> (loss, lse_row, lse_col, qn, kn, qnorm, knorm)");
  m.def("info_nce_bwd", &ssl_fast::info_nce_bwd, "cross-view InfoNCE backward -> (dq, dk, gz)");
  m.def("cpu_gemm", &ssl_fast::cpu_gemm, "tile GEMM of the CPU kernels: 'blas' (torch's sgemm_) or 'aten'");
  m.def("set_cpu_gemm", &ssl_fast::set_cpu_gemm, "force 'blas' or 'aten' tile GEMMs; returns the previous");
#ifdef SSL_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
