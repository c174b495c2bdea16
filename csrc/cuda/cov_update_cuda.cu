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
  detail::check_cov_update_args(mean_x, mean_y, m_xx, m_yx, m_yy, x_in, y_in, count);
  TORCH_CHECK(x_in.is_cuda(), "nbl::cov_update_ CUDA kernel got a ", x_in.device(), " tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = x_in.size(0);
  if (n == 0) return;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t dx = x.size(1), dy = y.size(1);

  const at::Tensor mu_x = detail::checked_column_sum(x, "x").div_(static_cast<double>(n));
  const at::Tensor mu_y = detail::checked_column_sum(y, "y").div_(static_cast<double>(n));
  const at::Tensor d_x = mu_x - mean_x;
  const at::Tensor d_y = mu_y - mean_y;
  const double total = static_cast<double>(count) + static_cast<double>(n);
  const double coef = static_cast<double>(count) * static_cast<double>(n) / total;

  const at::ScalarType gt = detail::gram_dtype(x, y);
  const int64_t block = std::min<int64_t>(n, kGramRowBlock);
  at::Tensor xc = at::empty({block, dx}, x.options().dtype(gt));
  at::Tensor yc = at::empty({block, dy}, y.options().dtype(gt));
  bool first = true;
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t rows = std::min(block, n - r0);
    at::Tensor xb = xc.narrow(0, 0, rows);
    at::Tensor yb = yc.narrow(0, 0, rows);
    center_into(x, r0, rows, mu_x, xb);
    center_into(y, r0, rows, mu_y, yb);
    // The rank-one merge term is added once, with the first block.
    const double c = first ? coef : 0.0;
    merge_into(m_xx, at::mm(xb.t(), xb), d_x, d_x, c);
    merge_into(m_yx, at::mm(yb.t(), xb), d_y, d_x, c);
    merge_into(m_yy, at::mm(yb.t(), yb), d_y, d_y, c);
    first = false;
  }
  mean_x.add_(d_x, static_cast<double>(n) / total);
  mean_y.add_(d_y, static_cast<double>(n) / total);
}

TORCH_LIBRARY_IMPL(nbl, CUDA, m) { m.impl("cov_update_", &cov_update_cuda); }

}  // namespace nbl
