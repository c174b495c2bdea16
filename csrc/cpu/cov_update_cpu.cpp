// CPU kernel of nbl::cov_update_ (see nbl_kernels.h for the math).
//
// Cost per chunk of n samples: 2 n (dx^2 + dy dx + dy^2) FLOPs in three
// BLAS GEMMs (float32 unless an input is float64; precision "bfloat16" rounds
// the centered values to bfloat16 and keeps the float32 GEMM, so its numbers
// are those of a bf16 tensor-core GEMM with float32 accumulation, only the
// summation order differs) plus O(n (dx + dy)) for the
// float64 column sums and the centering pass, and O(dx^2 + dy^2 + dx dy) for
// the float64 merge. Extra memory: one centered row block per input
// (kGramRowBlock x d in the Gram dtype) and one Gram block product, independent of n.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <type_traits>

#include "../nbl_kernels.h"

namespace nbl {
namespace {

// The centered value in the Gram dtype: float64 stays, otherwise rounded to
// float32, and then to bfloat16 (round to nearest even) when kBf16.
template <typename G, bool kBf16>
inline G to_gram(double v) {
  if constexpr (std::is_same_v<G, double>) {
    return v;
  } else if constexpr (kBf16) {
    return static_cast<G>(static_cast<float>(c10::BFloat16(static_cast<float>(v))));
  } else {
    return static_cast<G>(v);
  }
}

// out[i, j] = to_gram(double(in[i, j]) - mean[j]) for rows [row0, row0 + rows).
template <typename T, typename G, bool kBf16>
void center_block(const T* in, const double* mean, G* out, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, /*grain_size=*/std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t i = begin; i < end; ++i) {
                       const T* src = in + i * d;
                       G* dst = out + i * d;
                       for (int64_t j = 0; j < d; ++j) {
                         dst[j] = to_gram<G, kBf16>(static_cast<double>(src[j]) - mean[j]);
                       }
                     }
                   });
}

// Centers rows [row0, row0 + rows) of src into out (float64, or float32 holding
// float32- or bfloat16-rounded values when round_bf16).
void center_into(const at::Tensor& src, int64_t row0, int64_t rows, const at::Tensor& mean,
                 at::Tensor& out, bool round_bf16) {
  const int64_t d = src.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "nbl_center", [&] {
    const scalar_t* in = src.const_data_ptr<scalar_t>() + row0 * d;
    const double* mu = mean.const_data_ptr<double>();
    if (out.scalar_type() == at::kDouble) {
      center_block<scalar_t, double, false>(in, mu, out.mutable_data_ptr<double>(), rows, d);
    } else if (round_bf16) {
      center_block<scalar_t, float, true>(in, mu, out.mutable_data_ptr<float>(), rows, d);
    } else {
      center_block<scalar_t, float, false>(in, mu, out.mutable_data_ptr<float>(), rows, d);
    }
  });
}

}  // namespace

void cov_update_cpu(at::Tensor& mean_x, at::Tensor& mean_y, at::Tensor& m_xx, at::Tensor& m_yx,
                    at::Tensor& m_yy, const at::Tensor& x_in, const at::Tensor& y_in,
                    int64_t count, std::string_view precision) {
  TORCH_CHECK(x_in.device().is_cpu(), "nbl::cov_update_ CPU kernel got a ", x_in.device(), " tensor");
  // 1. Checks, float64 chunk means (raising before touching the state), merge coefficients.
  const std::optional<detail::CovChunk> plan =
      detail::plan_cov_chunk(mean_x, mean_y, m_xx, m_yx, m_yy, x_in, y_in, count, precision);
  if (!plan) return;
  const detail::CovChunk& c = *plan;

  // 2. Centered Gram products, row block by row block, summed in float64
  //    straight into the state. bfloat16 precision: bf16-rounded values held
  //    in float32 (exact), float32 GEMM.
  const bool bf16 = c.precision == GramPrecision::kBFloat16;
  const at::ScalarType buf = bf16 ? at::kFloat : c.gram;
  at::Tensor xc = at::empty({c.block, c.x.size(1)}, c.x.options().dtype(buf));
  at::Tensor yc = at::empty({c.block, c.y.size(1)}, c.y.options().dtype(buf));
  for (int64_t r0 = 0; r0 < c.n; r0 += c.block) {
    const int64_t rows = std::min(c.block, c.n - r0);
    at::Tensor xb = xc.narrow(0, 0, rows);
    at::Tensor yb = yc.narrow(0, 0, rows);
    center_into(c.x, r0, rows, c.mu_x, xb, bf16);
    center_into(c.y, r0, rows, c.mu_y, yb, bf16);
    m_xx.add_(at::mm(xb.t(), xb));
    m_yx.add_(at::mm(yb.t(), xb));
    m_yy.add_(at::mm(yb.t(), yb));
  }

  // 3. Pairwise (Chan et al.) merge: the rank-one term between the chunk
  //    mean and the state mean, then the means.
  m_xx.addr_(c.d_x, c.d_x, /*beta=*/1.0, /*alpha=*/c.coef);
  m_yx.addr_(c.d_y, c.d_x, 1.0, c.coef);
  m_yy.addr_(c.d_y, c.d_y, 1.0, c.coef);
  mean_x.add_(c.d_x, c.mean_step);
  mean_y.add_(c.d_y, c.mean_step);
}

TORCH_LIBRARY_IMPL(nbl, CPU, m) { m.impl("cov_update_", &cov_update_cpu); }

}  // namespace nbl
