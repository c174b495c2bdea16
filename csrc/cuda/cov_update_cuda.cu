// CUDA kernel of nbl::cov_update_ (see nbl_kernels.h for the math).
//
// Per chunk: float64 column sums (ATen reduction) with the non-finite check
// (one host sync), a fused center-and-cast kernel per row block, cuBLAS GEMMs
// in float32 (TF32 follows torch.backends.cuda.matmul.allow_tf32, off by
// default) or float64, and one fused merge kernel per state matrix:
//   M[i, j] += G[i, j] + coef * a[i] * b[j]
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../nbl_kernels.h"

namespace nbl {
namespace {

constexpr int kThreads = 256;

inline int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 8));
}

template <typename T, typename G>
__global__ void center_kernel(const T* __restrict__ in, const double* __restrict__ mean,
                              G* __restrict__ out, int64_t rows, int64_t d) {
  const int64_t total = rows * d;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % d;
    out[idx] = static_cast<G>(static_cast<double>(in[idx]) - mean[j]);
  }
}

template <typename G>
__global__ void merge_kernel(double* __restrict__ m, const G* __restrict__ g,
                             const double* __restrict__ a, const double* __restrict__ b,
                             double coef, int64_t rows, int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / cols, j = idx % cols;
    m[idx] += static_cast<double>(g[idx]) + coef * a[i] * b[j];
  }
}

void center_into(const at::Tensor& src, int64_t row0, int64_t rows, const at::Tensor& mean,
                 at::Tensor& out) {
  const int64_t d = src.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "nbl_center_cuda", [&] {
    const scalar_t* in = src.const_data_ptr<scalar_t>() + row0 * d;
    if (out.scalar_type() == at::kDouble) {
      center_kernel<<<grid_for(rows * d), kThreads, 0, stream>>>(
          in, mean.const_data_ptr<double>(), out.mutable_data_ptr<double>(), rows, d);
    } else {
      center_kernel<<<grid_for(rows * d), kThreads, 0, stream>>>(
          in, mean.const_data_ptr<double>(), out.mutable_data_ptr<float>(), rows, d);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// m += g + coef * a b^T (g in the Gram dtype, everything else float64).
void merge_into(at::Tensor& m, const at::Tensor& g, const at::Tensor& a, const at::Tensor& b,
                double coef) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = m.size(0), cols = m.size(1);
  if (g.scalar_type() == at::kDouble) {
    merge_kernel<<<grid_for(rows * cols), kThreads, 0, stream>>>(
        m.mutable_data_ptr<double>(), g.const_data_ptr<double>(), a.const_data_ptr<double>(),
        b.const_data_ptr<double>(), coef, rows, cols);
  } else {
    merge_kernel<<<grid_for(rows * cols), kThreads, 0, stream>>>(
        m.mutable_data_ptr<double>(), g.const_data_ptr<float>(), a.const_data_ptr<double>(),
        b.const_data_ptr<double>(), coef, rows, cols);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void cov_update_cuda(at::Tensor& mean_x, at::Tensor& mean_y, at::Tensor& m_xx, at::Tensor& m_yx,
                     at::Tensor& m_yy, const at::Tensor& x_in, const at::Tensor& y_in,
                     int64_t count) {
  TORCH_CHECK(x_in.is_cuda(), "nbl::cov_update_ CUDA kernel got a ", x_in.device(), " tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const std::optional<detail::CovChunk> plan =
      detail::plan_cov_chunk(mean_x, mean_y, m_xx, m_yx, m_yy, x_in, y_in, count);
  if (!plan) return;
  const detail::CovChunk& c = *plan;

  at::Tensor xc = at::empty({c.block, c.x.size(1)}, c.x.options().dtype(c.gram));
  at::Tensor yc = at::empty({c.block, c.y.size(1)}, c.y.options().dtype(c.gram));
  bool first = true;
  for (int64_t r0 = 0; r0 < c.n; r0 += c.block) {
    const int64_t rows = std::min(c.block, c.n - r0);
    at::Tensor xb = xc.narrow(0, 0, rows);
    at::Tensor yb = yc.narrow(0, 0, rows);
    center_into(c.x, r0, rows, c.mu_x, xb);
    center_into(c.y, r0, rows, c.mu_y, yb);
    // The rank-one merge term is added once, with the first block.
    const double coef = first ? c.coef : 0.0;
    merge_into(m_xx, at::mm(xb.t(), xb), c.d_x, c.d_x, coef);
    merge_into(m_yx, at::mm(yb.t(), xb), c.d_y, c.d_x, coef);
    merge_into(m_yy, at::mm(yb.t(), yb), c.d_y, c.d_y, coef);
    first = false;
  }
  mean_x.add_(c.d_x, c.mean_step);
  mean_y.add_(c.d_y, c.mean_step);
}

TORCH_LIBRARY_IMPL(nbl, CUDA, m) { m.impl("cov_update_", &cov_update_cuda); }

}  // namespace nbl
