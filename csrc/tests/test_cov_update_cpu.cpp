// C++ test of the CPU kernel of nbl::cov_update_ against a naive float64
// loop over samples (two-pass mean, then co-moments), run by ctest.
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "expect.h"
#include "nbl_kernels.h"

namespace {

struct Naive {
  std::vector<double> mx, my, mxx, myx, myy;
};

// Naive two-pass float64 statistics of the rows of x (n, dx) and y (n, dy).
Naive naive(const at::Tensor& xt, const at::Tensor& yt) {
  const at::Tensor x = xt.to(at::kDouble).contiguous(), y = yt.to(at::kDouble).contiguous();
  const int64_t n = x.size(0), dx = x.size(1), dy = y.size(1);
  const double* px = x.const_data_ptr<double>();
  const double* py = y.const_data_ptr<double>();
  Naive r{std::vector<double>(dx), std::vector<double>(dy), std::vector<double>(dx * dx),
          std::vector<double>(dy * dx), std::vector<double>(dy * dy)};
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t i = 0; i < dx; ++i) r.mx[i] += px[s * dx + i] / n;
    for (int64_t i = 0; i < dy; ++i) r.my[i] += py[s * dy + i] / n;
  }
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t i = 0; i < dx; ++i)
      for (int64_t j = 0; j < dx; ++j)
        r.mxx[i * dx + j] += (px[s * dx + i] - r.mx[i]) * (px[s * dx + j] - r.mx[j]);
    for (int64_t i = 0; i < dy; ++i)
      for (int64_t j = 0; j < dx; ++j)
        r.myx[i * dx + j] += (py[s * dy + i] - r.my[i]) * (px[s * dx + j] - r.mx[j]);
    for (int64_t i = 0; i < dy; ++i)
      for (int64_t j = 0; j < dy; ++j)
        r.myy[i * dy + j] += (py[s * dy + i] - r.my[i]) * (py[s * dy + j] - r.my[j]);
  }
  return r;
}

double max_rel_err(const at::Tensor& got, const std::vector<double>& want) {
  const at::Tensor g = got.contiguous();
  const double* p = g.const_data_ptr<double>();
  double scale = 0.0, err = 0.0;
  for (size_t i = 0; i < want.size(); ++i) scale = std::max(scale, std::fabs(want[i]));
  for (size_t i = 0; i < want.size(); ++i) err = std::max(err, std::fabs(p[i] - want[i]));
  return err / std::max(scale, 1e-300);
}

struct State {
  at::Tensor mx, my, mxx, myx, myy;
  int64_t count = 0;
  State(int64_t dx, int64_t dy) {
    auto o = at::TensorOptions().dtype(at::kDouble);
    mx = at::zeros({dx}, o);
    my = at::zeros({dy}, o);
    mxx = at::zeros({dx, dx}, o);
    myx = at::zeros({dy, dx}, o);
    myy = at::zeros({dy, dy}, o);
  }
  void update(const at::Tensor& x, const at::Tensor& y, std::string_view precision) {
    nbl::cov_update_cpu(mx, my, mxx, myx, myy, x, y, count, precision);
    count += x.size(0);
  }
};

void check_against_naive(at::ScalarType dtype, double tol, double offset,
                         std::string_view precision = "float32") {
  at::manual_seed(1234);
  const int64_t n = 2 * nbl::kGramRowBlock + 123, dx = 37, dy = 23;  // several Gram blocks
  // Non-zero means ("massive activations" when offset is large), unit-scale spread.
  at::Tensor x = (at::randn({n, dx}, at::kDouble) + offset * at::rand({dx}, at::kDouble)).to(dtype);
  at::Tensor y = (at::randn({n, dy}, at::kDouble) * 0.5 + 0.1 * x.narrow(1, 0, dy).to(at::kDouble) -
                  offset * 0.3).to(dtype);
  State st(dx, dy);
  // Uneven chunks, including a single sample and an empty one.
  const int64_t cuts[] = {0, 1, 1, 700, 3000, n};
  for (size_t c = 0; c + 1 < sizeof(cuts) / sizeof(cuts[0]); ++c) {
    st.update(x.narrow(0, cuts[c], cuts[c + 1] - cuts[c]), y.narrow(0, cuts[c], cuts[c + 1] - cuts[c]),
              precision);
  }
  const Naive r = naive(x, y);
  const double e[] = {max_rel_err(st.mx, r.mx), max_rel_err(st.my, r.my), max_rel_err(st.mxx, r.mxx),
                      max_rel_err(st.myx, r.myx), max_rel_err(st.myy, r.myy)};
  const char* names[] = {"mean_x", "mean_y", "m_xx", "m_yx", "m_yy"};
  for (int k = 0; k < 5; ++k) {
    EXPECT(e[k] < tol, "%s dtype=%s offset=%g precision=%s: relative error %.3g >= %.3g", names[k],
           c10::toString(dtype), offset, std::string(precision).c_str(), e[k], tol);
  }
  EXPECT(st.count == n, "count %lld != %lld", static_cast<long long>(st.count), static_cast<long long>(n));
}

void check_nonfinite_rejected() {
  State st(4, 3);
  at::Tensor x = at::randn({10, 4});
  at::Tensor y = at::randn({10, 3});
  st.update(x, y, "float32");
  const at::Tensor before = st.mxx.clone();
  at::Tensor bad = x.clone();
  bad.index_put_({3, 1}, std::nan(""));
  bool threw = false;
  try {
    nbl::cov_update_cpu(st.mx, st.my, st.mxx, st.myx, st.myy, bad, y, st.count, "float32");
  } catch (const c10::ValueError& err) {
    threw = std::string(err.what()).find("x contains 1 non-finite") != std::string::npos;
  }
  EXPECT(threw, "NaN in x did not raise the expected ValueError");
  EXPECT(at::equal(before, st.mxx), "state changed after a rejected chunk");
}

void check_unknown_precision_rejected() {
  State st(4, 3);
  at::Tensor x = at::randn({10, 4});
  at::Tensor y = at::randn({10, 3});
  st.update(x, y, "float32");
  const at::Tensor before[] = {st.mx.clone(), st.my.clone(), st.mxx.clone(), st.myx.clone(), st.myy.clone()};
  bool threw = false;
  try {
    nbl::cov_update_cpu(st.mx, st.my, st.mxx, st.myx, st.myy, x, y, st.count, "fp8");
  } catch (const c10::ValueError& err) {
    const std::string msg = err.what();
    threw = msg.find("precision must be one of 'float32', 'bfloat16'; got 'fp8'") != std::string::npos;
  }
  EXPECT(threw, "an unknown precision did not raise the expected ValueError");
  EXPECT(at::equal(before[0], st.mx) && at::equal(before[1], st.my) && at::equal(before[2], st.mxx) &&
             at::equal(before[3], st.myx) && at::equal(before[4], st.myy),
         "state changed after an unknown precision");
}

}  // namespace

int main() {
  // Data in float64: agreement to float64 round-off.
  check_against_naive(at::kDouble, 1e-12, 1.0);
  check_against_naive(at::kDouble, 1e-12, 1e4);
  // float32 data, float32 Gram blocks of centered values: float32-grade.
  check_against_naive(at::kFloat, 2e-5, 1.0);
  check_against_naive(at::kFloat, 2e-5, 1e4);
  // bf16 / fp16 inputs: exact after upcast, so the same float32-grade bound.
  check_against_naive(at::kBFloat16, 2e-5, 1.0);
  check_against_naive(at::kHalf, 2e-5, 1.0);
  // precision "bfloat16": centered values rounded to bf16 (2^-9 relative),
  // float32 accumulation: at most 2^-8 of the largest entry in any case
  // (nbl_ext.stats.BF16_REL_ERR_BOUND = 4e-3); ~1e-4 typical at this n.
  check_against_naive(at::kFloat, 4e-3, 1.0, "bfloat16");
  check_against_naive(at::kFloat, 4e-3, 1e4, "bfloat16");
  check_against_naive(at::kDouble, 4e-3, 1.0, "bfloat16");
  check_nonfinite_rejected();
  check_unknown_precision_rejected();
  return nbl_test::report("test_cov_update_cpu");
}
