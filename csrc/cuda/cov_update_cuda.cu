// CUDA kernel of nbl::cov_update_ (see nbl_kernels.h for the math).
//
// Per chunk: float64 column sums (ATen reduction) with the non-finite check
// (one host sync), a fused center-and-cast kernel per row block, three Gram
// GEMMs per row block, and one fused merge kernel per state matrix:
//   M[i, j] += G[i, j] + coef * a[i] * b[j]
// The Gram GEMMs by precision:
//   "float32":  cublasGemmEx, float32 operands and output, CUBLAS_COMPUTE_32F
//               on a handle in CUBLAS_DEFAULT_MATH: no TF32, whatever
//               torch.backends.cuda.matmul.allow_tf32 says (the float32-grade
//               precision the op promises). float64 inputs: at::mm in float64.
//   "bfloat16": centered values rounded to bfloat16 by the center kernel,
//               cublasGemmEx with bfloat16 operands, float32 output and
//               CUBLAS_COMPUTE_32F (tensor cores; float32 accumulation).
//               Spec-sheet dense rates on H100/H200 SXM: ~990 TFLOP/s bf16 vs
//               ~67 TFLOP/s float32 (non-tensor-core).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "../nbl_kernels.h"

namespace nbl {
namespace {

constexpr int kThreads = 256;

inline int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 8));
}

// The centered value in the Gram dtype: float64 stays; otherwise rounded to
// float32 first (then to bfloat16, round to nearest even, for G = BFloat16),
// the same two roundings as the CPU kernel and the reference.
template <typename G>
__device__ __forceinline__ G to_gram(double v) {
  if constexpr (std::is_same_v<G, double>) {
    return v;
  } else {
    return static_cast<G>(static_cast<float>(v));
  }
}

template <typename T, typename G>
__global__ void center_kernel(const T* __restrict__ in, const double* __restrict__ mean,
                              G* __restrict__ out, int64_t rows, int64_t d) {
  const int64_t total = rows * d;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % d;
    out[idx] = to_gram<G>(static_cast<double>(in[idx]) - mean[j]);
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
    } else if (out.scalar_type() == at::kBFloat16) {
      center_kernel<<<grid_for(rows * d), kThreads, 0, stream>>>(
          in, mean.const_data_ptr<double>(), out.mutable_data_ptr<at::BFloat16>(), rows, d);
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

// Restores a cuBLAS handle's math mode on scope exit.
struct MathModeGuard {
  cublasHandle_t handle;
  cublasMath_t saved;
  MathModeGuard(cublasHandle_t h, cublasMath_t mode) : handle(h) {
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle, &saved));
    TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, mode));
  }
  ~MathModeGuard() { cublasSetMathMode(handle, saved); }
  MathModeGuard(const MathModeGuard&) = delete;
  MathModeGuard& operator=(const MathModeGuard&) = delete;
};

// The Gram block product b^T a: a (rows, p), b (rows, q), contiguous, both
// float64, float32 or bfloat16. float64: at::mm. Otherwise a float32 (q, p)
// product from cublasGemmEx with CUBLAS_COMPUTE_32F and the handle in
// CUBLAS_DEFAULT_MATH, so float32 operands never go through TF32.
// Row-major (q, p) G is the column-major (p, q) G^T = a^T b: with a^T the
// column-major (p, rows) view of a (ld p, no transpose) and b the transpose
// of the column-major (q, rows) view of b (ld q).
at::Tensor gram(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kDouble) return at::mm(b.t(), a);
  const int64_t rows = a.size(0), p = a.size(1), q = b.size(1);
  at::Tensor g = at::empty({q, p}, a.options().dtype(at::kFloat));
  if (g.numel() == 0) return g;
  if (rows == 0) return g.zero_();
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(rows <= kMax && p <= kMax && q <= kMax, "nbl::cov_update_: Gram block too large for cuBLAS");
  const cudaDataType_t ab = a.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_32F;
  const float alpha = 1.0f, beta = 0.0f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const MathModeGuard math(handle, CUBLAS_DEFAULT_MATH);
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(p), static_cast<int>(q),
                                    static_cast<int>(rows), &alpha, a.const_data_ptr(), ab, static_cast<int>(p),
                                    b.const_data_ptr(), ab, static_cast<int>(q), &beta, g.mutable_data_ptr(),
                                    CUDA_R_32F, static_cast<int>(p), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return g;
}

}  // namespace

void cov_update_cuda(at::Tensor& mean_x, at::Tensor& mean_y, at::Tensor& m_xx, at::Tensor& m_yx,
                     at::Tensor& m_yy, const at::Tensor& x_in, const at::Tensor& y_in,
                     int64_t count, std::string_view precision) {
  TORCH_CHECK(x_in.is_cuda(), "nbl::cov_update_ CUDA kernel got a ", x_in.device(), " tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const std::optional<detail::CovChunk> plan =
      detail::plan_cov_chunk(mean_x, mean_y, m_xx, m_yx, m_yy, x_in, y_in, count, precision);
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
    merge_into(m_xx, gram(xb, xb), c.d_x, c.d_x, coef);
    merge_into(m_yx, gram(xb, yb), c.d_y, c.d_x, coef);
    merge_into(m_yy, gram(yb, yb), c.d_y, c.d_y, coef);
    first = false;
  }
  mean_x.add_(c.d_x, c.mean_step);
  mean_y.add_(c.d_y, c.mean_step);
}

TORCH_LIBRARY_IMPL(nbl, CUDA, m) { m.impl("cov_update_", &cov_update_cuda); }

}  // namespace nbl
