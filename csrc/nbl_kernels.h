// nbl-ext kernel entry points.
//
// Op schemas live in exactly one place: nbl_ext/ops.py (torchao's layout).
// This header declares the C++ kernels so that the dispatcher registrations
// (TORCH_LIBRARY_IMPL in the .cpp/.cu files) and the C++ tests (csrc/tests)
// call the same functions.
#pragma once

#include <ATen/ATen.h>

namespace nbl {

// Streaming centered cross-covariance update (schema: nbl::cov_update_).
//
// State (float64, updated in place): mean_x (dx), mean_y (dy), m_xx (dx, dx),
// m_yx (dy, dx), m_yy (dy, dy): the means and the *centered co-moments*
// (sum over samples of (x - mean_x)(x - mean_x)^T etc.) of the `count`
// samples merged so far.
//
// The chunk x (n, dx), y (n, dy) is centered on its own float64 mean, its Gram
// products are formed in float32 (float64 if either input is float64) in row
// blocks of kGramRowBlock samples, accumulated into float64, and merged into
// the state with the pairwise update of Chan, Golub and LeVeque:
//   delta = mean_chunk - mean_state
//   M    += M_chunk + count * n / (count + n) * delta_a delta_b^T
//   mean += delta * n / (count + n)
// Non-finite inputs raise c10::ValueError *before* any state is modified.
void cov_update_cpu(at::Tensor& mean_x, at::Tensor& mean_y, at::Tensor& m_xx,
                    at::Tensor& m_yx, at::Tensor& m_yy, const at::Tensor& x,
                    const at::Tensor& y, int64_t count);

#ifdef NBL_WITH_CUDA
void cov_update_cuda(at::Tensor& mean_x, at::Tensor& mean_y, at::Tensor& m_xx,
                     at::Tensor& m_yx, at::Tensor& m_yy, const at::Tensor& x,
                     const at::Tensor& y, int64_t count);
#endif

// Rows per Gram block: bounds the float32 accumulation length (and so the
// rounding error) of one block product, and the size of the centered copy.
constexpr int64_t kGramRowBlock = 2048;

namespace detail {
// Shared argument validation for every backend (device-independent checks).
void check_cov_update_args(const at::Tensor& mean_x, const at::Tensor& mean_y,
                           const at::Tensor& m_xx, const at::Tensor& m_yx,
                           const at::Tensor& m_yy, const at::Tensor& x,
                           const at::Tensor& y, int64_t count);
// Float64 column sums of x, raising c10::ValueError naming `name` when any
// element of x is NaN or +-inf (the state is untouched at that point).
at::Tensor checked_column_sum(const at::Tensor& x, const char* name);
// Gram dtype: float64 if either input is float64, float32 otherwise.
at::ScalarType gram_dtype(const at::Tensor& x, const at::Tensor& y);
}  // namespace detail

}  // namespace nbl
