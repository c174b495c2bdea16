// nbl-ext kernel entry points.
//
// Op schemas live in exactly one place: nbl_ext/ops.py (torchao's layout).
// This header declares the C++ kernels so that the dispatcher registrations
// (TORCH_LIBRARY_IMPL in the .cpp/.cu files) and the C++ tests (csrc/tests)
// call the same functions.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

namespace nbl {

// Streaming centered cross-covariance update (schema: nbl::cov_update_).
//
// State (float64, updated in place): mean_x (dx), mean_y (dy), m_xx (dx, dx),
// m_yx (dy, dx), m_yy (dy, dy): the means and the *centered co-moments*
// (sum over samples of (x - mean_x)(x - mean_x)^T etc.) of the `count`
// samples merged so far.
//
// The chunk x (n, dx), y (n, dy) is centered on its own float64 mean, its Gram
// products are formed in row blocks of kGramRowBlock samples at the chosen
// `precision` (GramPrecision below), accumulated into float64, and merged into
// the state with the pairwise update of Chan, Golub and LeVeque:
//   delta = mean_chunk - mean_state
//   M    += M_chunk + count * n / (count + n) * delta_a delta_b^T
//   mean += delta * n / (count + n)
// Non-finite inputs and an unknown precision raise c10::ValueError *before*
// any state is modified.
//
// precision (the op's `str precision="float32"`):
//   "float32"  (default) float32 Gram products of the float32-rounded centered
//              values (float64 products when an input is float64); on CUDA
//              TF32 is off whatever torch.backends.cuda.matmul.allow_tf32 says.
//   "bfloat16" the centered values (float64 -> float32 -> bfloat16, round to
//              nearest even) in bfloat16, Gram products accumulated in float32
//              (CUDA: bf16 tensor-core GEMM with float32 output; CPU: the same
//              numbers through a float32 GEMM: bf16 x bf16 products are exact
//              in float32). Opt-in speed for a measured accuracy cost
//              (nbl_ext.stats.CovarianceAccumulator's docstring).
enum class GramPrecision { kFloat32, kBFloat16 };
void cov_update_cpu(at::Tensor& mean_x, at::Tensor& mean_y, at::Tensor& m_xx,
                    at::Tensor& m_yx, at::Tensor& m_yy, const at::Tensor& x,
                    const at::Tensor& y, int64_t count, std::string_view precision);

#ifdef NBL_WITH_CUDA
void cov_update_cuda(at::Tensor& mean_x, at::Tensor& mean_y, at::Tensor& m_xx,
                     at::Tensor& m_yx, at::Tensor& m_yy, const at::Tensor& x,
                     const at::Tensor& y, int64_t count, std::string_view precision);
#endif

// Linearized attention branch (schema: nbl::affine_residual):
//   out = h + h @ weight^T + bias
// h is (..., d) with d = h.size(-1); weight (d, d) and bias (d,) have h's
// dtype (float32, bfloat16, float16 or float64) and device. The result is a
// new contiguous tensor of h's shape and dtype. Low-precision inputs are
// accumulated in float32 (float64 inputs in float64) and rounded to h's dtype
// at the end. Invalid arguments raise c10::ValueError (Python ValueError).
at::Tensor affine_residual_cpu(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias);

#ifdef NBL_WITH_CUDA
at::Tensor affine_residual_cuda(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias);

// The CUDA kernel's code paths (csrc/cuda/affine_residual_cuda.cu has the
// details and the roofline floors). kAuto: kGemv for at most 8 rows, else
// kCublasLt (which falls back to kGemmEpilogue when cuBLASLt cannot take the
// problem). The others force a path for tests:
//   kGemv:            hand-written GEMV (at most 8 rows; more raise ValueError).
//   kGemmEpilogue:    at::mm into float32 + one elementwise epilogue kernel.
//   kCublasLt:        one cuBLASLt matmul, epilogue D = hW^T + h + b; falls
//                     back to kGemmEpilogue when it cannot run.
//   kCublasLtStrict:  the same, but raises instead of falling back (tests).
enum class AffineResidualCudaPath { kAuto, kGemv, kGemmEpilogue, kCublasLt, kCublasLtStrict };
at::Tensor affine_residual_cuda_path(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                                     AffineResidualCudaPath path);
#endif

// The CPU kernel's code paths. kAuto picks one by dtype and row count; the
// others force a path (the C++ tests run every path on every shape).
//   kBlas:        float32/float64: out = h + bias, then out += h weight^T (one
//                 BLAS GEMM, beta = 1). bfloat16/float16: h and weight
//                 converted to float32, float32 GEMM, float32 epilogue.
//   kGemvPortable / kGemvAvx2: bfloat16/float16/float32, few rows: weight
//                 read once in its own dtype, float32 dot products (portable
//                 C++, or AVX2+FMA+F16C intrinsics when the CPU has them;
//                 kGemvAvx2 falls back to kGemvPortable on other CPUs).
//   kOneDnn:      float32, and bfloat16/float16 on CPUs with native
//                 instructions for the dtype: oneDNN's fused linear + add
//                 (PyTorch's mkldnn::_linear_pointwise.binary), float32
//                 accumulation, one rounding; falls back to kBlas elsewhere
//                 (float64, other CPUs, PyTorch built without oneDNN).
enum class AffineResidualCpuPath { kAuto, kBlas, kGemvPortable, kGemvAvx2, kOneDnn };
at::Tensor affine_residual_cpu_path(const at::Tensor& h, const at::Tensor& weight,
                                    const at::Tensor& bias, AffineResidualCpuPath path);

// kAuto's thresholds (rows, dtype, oneDNN availability) live in
// csrc/cpu/affine_residual_cpu.cpp, next to the measurements behind them.

// Rows per Gram block: bounds the float32 accumulation length (and so the
// rounding error) of one block product, and the size of the centered copy.
constexpr int64_t kGramRowBlock = 2048;

namespace detail {
// What every backend of nbl::cov_update_ needs before its Gram products: the
// contiguous chunk, its float64 means (computed on the chunk's device, raising
// c10::ValueError before any state change when an input holds NaN or +-inf),
// the mean shifts and the pairwise-merge coefficients.
struct CovChunk {
  at::Tensor x, y;          // contiguous (n, dx), (n, dy)
  at::Tensor mu_x, mu_y;    // float64 chunk means
  at::Tensor d_x, d_y;      // chunk mean - state mean
  double coef;              // count * n / (count + n): weight of the rank-one merge term
  double mean_step;         // n / (count + n): how far the state mean moves
  at::ScalarType gram;      // GEMM input dtype: float64 if an input is float64 (float32
                            // precision), bfloat16 (bfloat16 precision), else float32
  GramPrecision precision;  // parsed `precision` argument
  int64_t n, block;         // samples; rows per Gram block (<= kGramRowBlock)
};
// Validates the arguments and plans the chunk; std::nullopt for an empty chunk.
std::optional<CovChunk> plan_cov_chunk(const at::Tensor& mean_x, const at::Tensor& mean_y,
                                       const at::Tensor& m_xx, const at::Tensor& m_yx,
                                       const at::Tensor& m_yy, const at::Tensor& x,
                                       const at::Tensor& y, int64_t count,
                                       std::string_view precision);
// "float32" / "bfloat16" -> GramPrecision; anything else raises c10::ValueError
// naming the valid choices.
GramPrecision parse_gram_precision(std::string_view precision);
// Shared argument validation of nbl::affine_residual (same messages as the
// Python reference): dtypes, devices and shapes of h, weight and bias.
void check_affine_residual_args(const at::Tensor& h, const at::Tensor& weight,
                                const at::Tensor& bias);
}  // namespace detail

}  // namespace nbl
