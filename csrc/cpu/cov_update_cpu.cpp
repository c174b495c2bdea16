// CPU kernel of nbl::cov_update_ (see nbl_kernels.h for the math).
//
// Cost per chunk of n samples: 2 n (dx^2 + dy dx + dy^2) FLOPs in three
// BLAS GEMMs (float32 unless an input is float64) plus O(n (dx + dy)) for the
// float64 column sums and the centering pass, and O(dx^2 + dy^2 + dx dy) for
// the float64 merge. Extra memory: one centered row block per input
// (kGramRowBlock x d in the Gram dtype) and one Gram block product, independent of n.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../nbl_kernels.h"

namespace nbl {
namespace {

// out[i, j] = (G)(double(in[i, j]) - mean[j]) for rows [row0, row0 + rows).
template <typename T, typename G>
void center_block(const T* in, const double* mean, G* out, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, /*grain_size=*/std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t i = begin; i < end; ++i) {
                       const T* src = in + i * d;
                       G* dst = out + i * d;
                       for (int64_t j = 0; j < d; ++j) {
                         dst[j] = static_cast<G>(static_cast<double>(src[j]) - mean[j]);
                       }
                     }
                   });
}

void center_into(const at::Tensor& src, int64_t row0, int64_t rows, const at::Tensor& mean,
                 at::Tensor& out) {
  const int64_t d = src.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "nbl_center", [&] {
    const scalar_t* in = src.const_data_ptr<scalar_t>() + row0 * d;
    if (out.scalar_type() == at::kDouble) {
      center_block(in, mean.const_data_ptr<double>(), out.mutable_data_ptr<double>(), rows, d);
    } else {
      center_block(in, mean.const_data_ptr<double>(), out.mutable_data_ptr<float>(), rows, d);
    }
  });
}

}  // namespace

void cov_update_cpu(at::Tensor& mean_x, at::Tensor& mean_y, at::Tensor& m_xx, at::Tensor& m_yx,
                    at::Tensor& m_yy, const at::Tensor& x_in, const at::Tensor& y_in,
                    int64_t count) {
  detail::check_cov_update_args(mean_x, mean_y, m_xx, m_yx, m_yy, x_in, y_in, count);
  TORCH_CHECK(x_in.device().is_cpu(), "nbl::cov_update_ CPU kernel got a ", x_in.device(), " tensor");
  const int64_t n = x_in.size(0);
  if (n == 0) return;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t dx = x.size(1), dy = y.size(1);

  // 1. Chunk means in float64 (raises before touching the state).
  const at::Tensor mu_x = detail::checked_column_sum(x, "x").div_(static_cast<double>(n));
  const at::Tensor mu_y = detail::checked_column_sum(y, "y").div_(static_cast<double>(n));

  const at::Tensor d_x = mu_x - mean_x;
  const at::Tensor d_y = mu_y - mean_y;

  // 2. Centered Gram products, row block by row block, summed in float64
  //    straight into the state.
  const at::ScalarType gt = detail::gram_dtype(x, y);
  const int64_t block = std::min<int64_t>(n, kGramRowBlock);
  at::Tensor xc = at::empty({block, dx}, x.options().dtype(gt));
  at::Tensor yc = at::empty({block, dy}, y.options().dtype(gt));
  for (int64_t r0 = 0; r0 < n; r0 += block) {
    const int64_t rows = std::min(block, n - r0);
    at::Tensor xb = xc.narrow(0, 0, rows);
    at::Tensor yb = yc.narrow(0, 0, rows);
    center_into(x, r0, rows, mu_x, xb);
    center_into(y, r0, rows, mu_y, yb);
    m_xx.add_(at::mm(xb.t(), xb));
    m_yx.add_(at::mm(yb.t(), xb));
    m_yy.add_(at::mm(yb.t(), yb));
  }

  // 3. Pairwise (Chan et al.) merge: the rank-one term between the chunk
  //    mean and the state mean, then the means.
  const double total = static_cast<double>(count) + static_cast<double>(n);
  const double coef = static_cast<double>(count) * static_cast<double>(n) / total;
  m_xx.addr_(d_x, d_x, /*beta=*/1.0, /*alpha=*/coef);
  m_yx.addr_(d_y, d_x, 1.0, coef);
  m_yy.addr_(d_y, d_y, 1.0, coef);
  mean_x.add_(d_x, static_cast<double>(n) / total);
  mean_y.add_(d_y, static_cast<double>(n) / total);
}

TORCH_LIBRARY_IMPL(nbl, CPU, m) { m.impl("cov_update_", &cov_update_cpu); }

}  // namespace nbl
