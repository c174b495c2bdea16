// Backend-independent parts of nbl::cov_update_: argument checks, the
// float64 chunk means with the non-finite check, the merge coefficients and
// the Gram dtype rule (plan_cov_chunk), the precision argument.
#include "nbl_kernels.h"

#include <c10/util/Exception.h>

#include <string>

namespace nbl {
namespace detail {

namespace {

void check_cov_update_args(const at::Tensor& mean_x, const at::Tensor& mean_y,
                           const at::Tensor& m_xx, const at::Tensor& m_yx,
                           const at::Tensor& m_yy, const at::Tensor& x,
                           const at::Tensor& y, int64_t count) {
  TORCH_CHECK_VALUE(x.dim() == 2 && y.dim() == 2,
                    "nbl::cov_update_: x and y must be 2-D (samples, features); got ",
                    x.dim(), "-D and ", y.dim(), "-D");
  TORCH_CHECK_VALUE(x.size(0) == y.size(0),
                    "nbl::cov_update_: x and y must hold the same number of samples; got ",
                    x.size(0), " and ", y.size(0));
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()) && at::isFloatingType(y.scalar_type()),
                    "nbl::cov_update_: x and y must be floating point; got ",
                    x.scalar_type(), " and ", y.scalar_type());
  const int64_t dx = x.size(1), dy = y.size(1);
  for (const at::Tensor* t : {&mean_x, &mean_y, &m_xx, &m_yx, &m_yy}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kDouble,
                      "nbl::cov_update_: the accumulator state must be float64");
    TORCH_CHECK_VALUE(t->is_contiguous(), "nbl::cov_update_: the accumulator state must be contiguous");
    TORCH_CHECK_VALUE(t->device() == x.device() && y.device() == x.device(),
                      "nbl::cov_update_: x (", x.device(), "), y (", y.device(),
                      ") and the accumulator state (", t->device(), ") must be on one device");
  }
  TORCH_CHECK_VALUE(mean_x.sizes() == at::IntArrayRef({dx}) && mean_y.sizes() == at::IntArrayRef({dy}) &&
                        m_xx.sizes() == at::IntArrayRef({dx, dx}) &&
                        m_yx.sizes() == at::IntArrayRef({dy, dx}) &&
                        m_yy.sizes() == at::IntArrayRef({dy, dy}),
                    "nbl::cov_update_: state shapes do not match x (", x.sizes(), ") and y (",
                    y.sizes(), ")");
  TORCH_CHECK_VALUE(count >= 0, "nbl::cov_update_: count must be >= 0, got ", count);
}

// Float64 column sums of x, raising c10::ValueError naming `name` when any
// element of x is NaN or +-inf (the state is untouched at that point).
at::Tensor checked_column_sum(const at::Tensor& x, const char* name) {
  at::Tensor s = at::sum(x, {0}, /*keepdim=*/false, at::kDouble);
  // A float64 sum of (at most float32-range) finite values cannot overflow,
  // so a non-finite column sum means a non-finite input element.
  if (!at::isfinite(s).all().item<bool>()) {
    const int64_t bad = at::logical_not(at::isfinite(x)).sum().item<int64_t>();
    TORCH_CHECK_VALUE(false, "nbl::cov_update_: ", name, " contains ", bad,
                      " non-finite value(s) (NaN or inf) in a chunk of ", x.size(0),
                      " samples x ", x.size(1), " features; the accumulator was not updated");
  }
  return s;
}

at::ScalarType gram_dtype(const at::Tensor& x, const at::Tensor& y, GramPrecision precision) {
  if (precision == GramPrecision::kBFloat16) return at::kBFloat16;
  return (x.scalar_type() == at::kDouble || y.scalar_type() == at::kDouble) ? at::kDouble
                                                                            : at::kFloat;
}

}  // namespace

GramPrecision parse_gram_precision(std::string_view precision) {
  if (precision == "float32") return GramPrecision::kFloat32;
  if (precision == "bfloat16") return GramPrecision::kBFloat16;
  TORCH_CHECK_VALUE(false, "nbl::cov_update_: precision must be one of 'float32', 'bfloat16'; got '",
                    std::string(precision),
                    "'. Use 'float32' (the default, float32-grade Gram products) or 'bfloat16' "
                    "(faster on tensor cores, less accurate); the accumulator was not updated");
  return GramPrecision::kFloat32;  // unreachable
}

std::optional<CovChunk> plan_cov_chunk(const at::Tensor& mean_x, const at::Tensor& mean_y,
                                       const at::Tensor& m_xx, const at::Tensor& m_yx,
                                       const at::Tensor& m_yy, const at::Tensor& x_in,
                                       const at::Tensor& y_in, int64_t count,
                                       std::string_view precision) {
  const GramPrecision prec = parse_gram_precision(precision);  // before anything else
  check_cov_update_args(mean_x, mean_y, m_xx, m_yx, m_yy, x_in, y_in, count);
  const int64_t n = x_in.size(0);
  if (n == 0) return std::nullopt;
  CovChunk c;
  c.x = x_in.contiguous();
  c.y = y_in.contiguous();
  c.mu_x = checked_column_sum(c.x, "x").div_(static_cast<double>(n));
  c.mu_y = checked_column_sum(c.y, "y").div_(static_cast<double>(n));
  c.d_x = c.mu_x - mean_x;
  c.d_y = c.mu_y - mean_y;
  const double total = static_cast<double>(count) + static_cast<double>(n);
  c.coef = static_cast<double>(count) * static_cast<double>(n) / total;
  c.mean_step = static_cast<double>(n) / total;
  c.precision = prec;
  c.gram = gram_dtype(c.x, c.y, prec);
  c.n = n;
  c.block = std::min<int64_t>(n, kGramRowBlock);
  return c;
}

}  // namespace detail
}  // namespace nbl
