// C++ test of the CPU kernel of nbl::affine_residual against a naive float64
// loop, run by ctest. Every code path (auto, BLAS, portable GEMV, AVX2 GEMV, oneDNN)
// on every shape, for float32, bfloat16 and float16 inputs.
//
// Bound per element: the kernels accumulate in float32 (error at most
// ~1e-5 of S = |h| + sum_k |h_k W_jk| + |b| for these lengths) and round
// once to the dtype (at most u |exact|, u = 2^-8 for bfloat16, 2^-11 for
// float16, 0 for float32).
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "expect.h"
#include "nbl_kernels.h"

namespace {

using Path = nbl::AffineResidualCpuPath;

const char* path_name(Path p) {
  switch (p) {
    case Path::kAuto: return "auto";
    case Path::kBlas: return "blas";
    case Path::kGemvPortable: return "gemv_portable";
    case Path::kGemvAvx2: return "gemv_avx2";
    case Path::kOneDnn: return "onednn";
  }
  return "?";
}

double unit_roundoff(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return std::ldexp(1.0, -8);
    case at::kHalf: return std::ldexp(1.0, -11);
    default: return 0.0;
  }
}

// Naive float64 out[i, j] = h[i, j] + sum_k h[i, k] w[j, k] + b[j] and the
// magnitude S[i, j] = |h[i, j]| + sum_k |h[i, k] w[j, k]| + |b[j]|.
void naive(const at::Tensor& h2, const at::Tensor& w, const at::Tensor& b, std::vector<double>& out,
           std::vector<double>& mag) {
  const at::Tensor hd = h2.to(at::kDouble).contiguous(), wd = w.to(at::kDouble).contiguous(),
                   bd = b.to(at::kDouble).contiguous();
  const int64_t n = hd.size(0), d = hd.size(1);
  const double* ph = hd.const_data_ptr<double>();
  const double* pw = wd.const_data_ptr<double>();
  const double* pb = bd.const_data_ptr<double>();
  out.assign(n * d, 0.0);
  mag.assign(n * d, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      double s = ph[i * d + j] + pb[j], m = std::fabs(ph[i * d + j]) + std::fabs(pb[j]);
      for (int64_t k = 0; k < d; ++k) {
        s += ph[i * d + k] * pw[j * d + k];
        m += std::fabs(ph[i * d + k] * pw[j * d + k]);
      }
      out[i * d + j] = s;
      mag[i * d + j] = m;
    }
  }
}

// h of shape `shape` (last dim d), transposed-view variant when `strided`.
void check_case(at::ScalarType dtype, std::vector<int64_t> shape, bool strided, Path path) {
  const int64_t d = shape.back();
  at::Tensor h;
  if (strided) {
    // A (d, n) tensor transposed: h is (n, d) with strides (1, n).
    h = (at::randn({d, shape.front()}, at::kDouble) * 2.0 + 0.5).to(dtype).t();
  } else {
    h = (at::randn(shape, at::kDouble) * 2.0 + 0.5).to(dtype);
  }
  const at::Tensor w = (at::randn({d, d}, at::kDouble) / std::sqrt(static_cast<double>(d))).to(dtype);
  const at::Tensor b = (at::randn({d}, at::kDouble) + 0.25).to(dtype);

  const at::Tensor out = nbl::affine_residual_cpu_path(h, w, b, path);
  const std::string tag = std::string(c10::toString(dtype)) + " shape=" + c10::str(h.sizes()) +
                          (strided ? " (strided)" : "") + " path=" + path_name(path);
  EXPECT(out.sizes() == h.sizes() && out.scalar_type() == dtype && out.is_contiguous(),
         "%s: got shape %s dtype %s", tag.c_str(), c10::str(out.sizes()).c_str(),
         c10::toString(out.scalar_type()));
  if (h.numel() == 0) return;

  const at::Tensor h2 = h.reshape({-1, d});
  std::vector<double> want, mag;
  naive(h2, w, b, want, mag);
  const at::Tensor got = out.reshape({-1, d}).to(at::kDouble).contiguous();
  const double* pg = got.const_data_ptr<double>();
  const double u = unit_roundoff(dtype);
  double worst = 0.0;  // error / bound, must stay <= 1
  for (size_t i = 0; i < want.size(); ++i) {
    const double bound = u * std::fabs(want[i]) * 1.001 + 1e-5 * mag[i] + 1e-30;
    worst = std::max(worst, std::fabs(pg[i] - want[i]) / bound);
  }
  EXPECT(worst <= 1.0, "%s: error %.3g x the bound", tag.c_str(), worst);
}

void check_errors() {
  const at::Tensor h = at::randn({3, 8});
  const at::Tensor w = at::randn({8, 8});
  const at::Tensor b = at::randn({8});
  struct Bad {
    at::Tensor h, w, b;
    const char* needle;
  } cases[] = {
      {h, w.to(at::kBFloat16), b, "must have one dtype"},
      {h, w, b.to(at::kDouble), "must have one dtype"},
      {h.to(at::kInt), w, b, "must be float32, bfloat16, float16 or float64"},
      {h, at::randn({8, 7}), b, "weight must be square (d, d) with d = h.shape[-1] = 8"},
      {h, at::randn({7, 7}), b, "weight must be square"},
      {h, at::randn({64}), b, "weight must be square"},
      {h, w, at::randn({7}), "bias must have shape [d] = [8]; got [7]"},
      {h, w, at::randn({1, 8}), "bias must have shape"},
      {at::randn({}), w, b, "at least 1 dimension"},
  };
  for (const Bad& c : cases) {
    std::string msg;
    try {
      nbl::affine_residual_cpu(c.h, c.w, c.b);
    } catch (const c10::ValueError& err) {
      msg = err.what();
    } catch (const std::exception& err) {
      msg = std::string("(not a ValueError) ") + err.what();
    }
    EXPECT(msg.find(c.needle) != std::string::npos && msg.find("(not a ValueError)") == std::string::npos,
           "expected a ValueError containing '%s', got '%s'", c.needle, msg.substr(0, 200).c_str());
  }
}

}  // namespace

int main() {
  at::manual_seed(20250101);
  const std::vector<std::vector<int64_t>> shapes = {
      {1, 8},  {1, 13}, {8},     {3, 7},  {4, 64}, {5, 33},  {16, 100}, {17, 100},
      {40, 24}, {2, 3, 13}, {2, 9, 1}, {0, 16}, {3, 0},
  };
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (Path path : {Path::kAuto, Path::kBlas, Path::kGemvPortable, Path::kGemvAvx2, Path::kOneDnn}) {
      for (const auto& shape : shapes) check_case(dtype, shape, /*strided=*/false, path);
      check_case(dtype, {5, 24}, /*strided=*/true, path);
      check_case(dtype, {1, 19}, /*strided=*/true, path);
    }
  }
  for (const auto& shape : shapes) check_case(at::kDouble, shape, false, Path::kAuto);
  check_errors();
  return nbl_test::report("test_affine_residual_cpu");
}
