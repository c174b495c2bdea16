// CPU kernel of nbl::affine_residual: out = h + h @ weight^T + bias (see
// nbl_kernels.h for the contract).
//
// Paths (AffineResidualCpuPath; kAuto picks by dtype and row count n, with
// the thresholds below):
//   * float64, and float32 with few rows: out = h + bias (one pass), then one
//     BLAS GEMM out += h weight^T with beta = 1: the bias and the residual
//     ride in BLAS's C matrix, no temporary.
//   * float32 with more rows: oneDNN's fused linear + add (below), which on
//     the AMD EPYC build machines ran up to 2.8x faster than MKL's SGEMM (the
//     reference's addmm) on large calls and slower on small ones (threshold below).
//   * bfloat16 / float16 above the GEMV thresholds (prefill), on a CPU with native
//     instructions for the dtype (AVX512-BF16 / AMX-BF16; AVX512-FP16 /
//     AMX-FP16): oneDNN, the library PyTorch bundles, through the op that
//     inductor's CPU backend uses for a fused linear + add,
//     mkldnn::_linear_pointwise.binary(h, h, weight, bias, "add"): the GEMM
//     accumulates in float32, bias and residual are post-ops on the float32
//     accumulator, one rounding. PyTorch's own bf16 addmm uses the same
//     oneDNN GEMM, so this path runs at the reference's speed with one
//     rounding instead of two. (MKL's bf16 GEMM, the other library option,
//     runs at float32 speed on AMD CPUs.)
//   * bfloat16 / float16, n > kCpuGemvMaxRows, other CPUs (and the forced
//     kBlas path): h and weight are converted to float32, one float32 BLAS
//     GEMM, then one row-parallel epilogue out = round(acc + h + bias) (a
//     single rounding). The float32 copy of weight costs O(d^2) per call,
//     small next to the 2 n d^2 FLOPs.
//   * bfloat16 / float16, few rows (decode; thresholds below): a GEMV that reads
//     weight once in its own dtype (no float32 copy), converts on the fly and
//     accumulates float32 dot products for up to 4 rows at a time, with the
//     residual and bias in its epilogue; parallel over output channels. AVX2
//     + FMA + F16C intrinsics when the CPU has them (chosen at run time; the
//     build targets baseline x86-64), portable C++ otherwise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define NBL_HAVE_X86_SIMD 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#include "../nbl_kernels.h"

namespace nbl {
namespace {

// kAuto's choice for n rows of width d (measured on the 2-core AMD EPYC
// (Zen 4, AVX512-BF16) build machine at d = 576 and 2048, load ~7, against the
// reference; bench/test_bench_affine.py keeps checking "not slower"):
//   * bfloat16/float16 where oneDNN serves the dtype natively: the GEMV (reads
//     weight once in its own dtype, no float32 copy) while n <= 2 or
//     n d <= 4608, oneDNN above. bf16, d = 576: GEMV 22/40/74 us at n =
//     1/4/8 vs oneDNN 75/75/129 and reference 109/104/193; d = 2048: GEMV
//     240/356/909 us at n = 1/2/4 vs oneDNN 409/383/556 and reference
//     414/406/675 (the AVX512-BF16 GEMM does 2-4x the float32 GEMV's FLOPs).
//   * bfloat16/float16 elsewhere: the GEMV for n <= 16, kBlas above;
//   * float32: oneDNN when n d >= 16384, else kBlas (MKL). oneDNN reorders
//     the weight on every call (d^2 floats), which small calls do not repay when
//     other work runs between them: in bench/test_bench_affine.py at d = 576
//     oneDNN took 0.80x the reference's speed at 4 rows and 0.94-1.03x at 16,
//     1.14-1.23x from 128 rows. Back to back on the quiet machine, d = 2048, n =
//     4/16/128: oneDNN 0.66/1.09/5.6 ms, MKL 1.85/1.82/7.0 ms, reference
//     2.04/2.38/8.0 ms (MKL's SGEMM is slow on this AMD CPU at d = 2048).
//     float64: kBlas.
constexpr int64_t kCpuGemvMaxRows = 16;
constexpr int64_t kCpuGemvMaxRowsOneDnn = 2;
constexpr int64_t kCpuGemvMaxElemsOneDnn = 4608;
constexpr int64_t kCpuOneDnnMinElemsFloat32 = 16384;

// h as a contiguous (rows, d) matrix (a view when h is contiguous).
at::Tensor as_rows(const at::Tensor& h) {
  return (h.dim() == 1 ? h.unsqueeze(0) : h.flatten(0, -2)).contiguous();
}

// Row-parallel grain: about 32K elements per task.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

// out[i, j] = h[i, j] + b[j] (float32 / float64: the GEMM's C matrix).
template <typename T>
void residual_plus_bias(const T* h, const T* b, T* out, int64_t n, int64_t d) {
  at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < d; ++j) out[i * d + j] = h[i * d + j] + b[j];
    }
  });
}

// out[i, j] = T(acc[i, j] + x[i, j] + b[j]), all float32 inputs: one rounding.
template <typename T>
void epilogue(const float* acc, const float* x, const float* b, T* out, int64_t n, int64_t d) {
  at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < d; ++j) {
        out[i * d + j] = static_cast<T>(acc[i * d + j] + x[i * d + j] + b[j]);
      }
    }
  });
}

// ---- GEMV dot products: res[r] = sum_k w[k] * x[r * d + k], r < NR --------

template <typename T, int NR>
void dot_rows_portable(const T* w, const float* x, int64_t d, float* res) {
  constexpr int kU = 8;  // independent partial sums per row (vectorizable)
  float acc[NR][kU] = {};
  int64_t k = 0;
  for (; k + kU <= d; k += kU) {
    float wv[kU];
    for (int u = 0; u < kU; ++u) wv[u] = static_cast<float>(w[k + u]);
    for (int r = 0; r < NR; ++r) {
      for (int u = 0; u < kU; ++u) acc[r][u] += wv[u] * x[r * d + k + u];
    }
  }
  for (int r = 0; r < NR; ++r) {
    float s = 0.f;
    for (int u = 0; u < kU; ++u) s += acc[r][u];
    for (int64_t t = k; t < d; ++t) s += static_cast<float>(w[t]) * x[r * d + t];
    res[r] = s;
  }
}

#ifdef NBL_HAVE_X86_SIMD
#define NBL_AVX2 __attribute__((target("avx2,fma,f16c")))

bool cpu_has_avx2_fma_f16c() {
  static const bool ok = [] {
    __builtin_cpu_init();
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  }();
  return ok;
}

NBL_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
NBL_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  // bfloat16 is the high half of a float32: widen to 32 bits and shift.
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
NBL_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
NBL_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename T, int NR>
NBL_AVX2 void dot_rows_avx2(const T* w, const float* x, int64_t d, float* res) {
  constexpr int kU = NR == 1 ? 4 : 2;  // 8-float accumulators per row (hide FMA latency)
  __m256 acc[NR][kU];
  for (int r = 0; r < NR; ++r) {
    for (int u = 0; u < kU; ++u) acc[r][u] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 * kU <= d; k += 8 * kU) {
    __m256 wv[kU];
    for (int u = 0; u < kU; ++u) wv[u] = load8(w + k + 8 * u);
    for (int r = 0; r < NR; ++r) {
      for (int u = 0; u < kU; ++u) {
        acc[r][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + r * d + k + 8 * u), acc[r][u]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    __m256 a = acc[r][0];
    for (int u = 1; u < kU; ++u) a = _mm256_add_ps(a, acc[r][u]);
    float s = hsum(a);
    for (int64_t t = k; t < d; ++t) s += static_cast<float>(w[t]) * x[r * d + t];
    res[r] = s;
  }
}
#else
bool cpu_has_avx2_fma_f16c() { return false; }
#endif

// res[r] = w . x[r, :] for r < nr (1..4).
template <typename T>
void dot_rows(bool avx2, int nr, const T* w, const float* x, int64_t d, float* res) {
#ifdef NBL_HAVE_X86_SIMD
  if (avx2) {
    switch (nr) {
      case 1: return dot_rows_avx2<T, 1>(w, x, d, res);
      case 2: return dot_rows_avx2<T, 2>(w, x, d, res);
      case 3: return dot_rows_avx2<T, 3>(w, x, d, res);
      default: return dot_rows_avx2<T, 4>(w, x, d, res);
    }
  }
#endif
  (void)avx2;
  switch (nr) {
    case 1: return dot_rows_portable<T, 1>(w, x, d, res);
    case 2: return dot_rows_portable<T, 2>(w, x, d, res);
    case 3: return dot_rows_portable<T, 3>(w, x, d, res);
    default: return dot_rows_portable<T, 4>(w, x, d, res);
  }
}

// out[r, j] = T(sum_k x[r, k] w[j, k] + x[r, j] + b[j]): x is h in float32
// (exact), w is weight in its own dtype (row-major), parallel over j.
template <typename T>
void gemv_residual(bool avx2, const float* x, const T* w, const float* b, T* out, int64_t n, int64_t d) {
  constexpr int kRowGroup = 4;
  // About 64K multiply-adds per task.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(n * d, 1));
  at::parallel_for(0, d, grain, [&](int64_t begin, int64_t end) {
    float res[kRowGroup];
    for (int64_t j = begin; j < end; ++j) {
      const T* wj = w + j * d;  // read from memory once, from L1 for the next row groups
      for (int64_t r0 = 0; r0 < n; r0 += kRowGroup) {
        const int nr = static_cast<int>(std::min<int64_t>(kRowGroup, n - r0));
        dot_rows(avx2, nr, wj, x + r0 * d, d, res);
        for (int r = 0; r < nr; ++r) {
          const int64_t i = (r0 + r) * d + j;
          out[i] = static_cast<T>(res[r] + x[i] + b[j]);
        }
      }
    }
  });
}

// ---- oneDNN: mkldnn::_linear_pointwise.binary --------------------------------

// Native low-precision GEMM instructions, where oneDNN beats a float32 GEMM:
// CPUID.(7,0):EDX[22] AMX-BF16, EDX[23] AVX512-FP16; CPUID.(7,1):EAX[5]
// AVX512-BF16, EAX[21] AMX-FP16.
struct NativeLowPrecision {
  bool bf16 = false, fp16 = false;
};

NativeLowPrecision native_low_precision() {
  static const NativeLowPrecision f = [] {
    NativeLowPrecision r;
#ifdef NBL_HAVE_X86_SIMD
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) >= 7) {
      __cpuid_count(7, 0, a, b, c, d);
      const bool amx_bf16 = d & (1u << 22), avx512_fp16 = d & (1u << 23);
      const unsigned max_sub = a;
      bool avx512_bf16 = false, amx_fp16 = false;
      if (max_sub >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        avx512_bf16 = a & (1u << 5);
        amx_fp16 = a & (1u << 21);
      }
      r.bf16 = avx512_bf16 || amx_bf16;
      r.fp16 = avx512_fp16 || amx_fp16;
    }
#endif
    return r;
  }();
  return f;
}

using LinearAddFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, c10::string_view);

// The op, when this PyTorch build registers it for CPU (built with oneDNN).
const c10::TypedOperatorHandle<LinearAddFn>* onednn_linear_add() {
  static const std::optional<c10::TypedOperatorHandle<LinearAddFn>> op =
      []() -> std::optional<c10::TypedOperatorHandle<LinearAddFn>> {
    const auto handle = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", "binary"});
    if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    return handle->typed<LinearAddFn>();
  }();
  return op ? &*op : nullptr;
}

// Whether oneDNN serves this dtype here: float32, and bfloat16 / float16 with
// native instructions (on other CPUs the op refuses float16 and emulates
// bfloat16).
bool onednn_serves(at::ScalarType t) {
  if (onednn_linear_add() == nullptr) return false;
  const NativeLowPrecision f = native_low_precision();
  return t == at::kFloat || (t == at::kBFloat16 && f.bf16) || (t == at::kHalf && f.fp16);
}

// out = h + h weight^T + bias by oneDNN (float32 accumulation, one rounding).
at::Tensor run_onednn(const at::Tensor& h2, const at::Tensor& weight, const at::Tensor& bias) {
  return onednn_linear_add()->call(h2, h2, weight.contiguous(), bias.contiguous(), "add");
}

void run_blas(const at::Tensor& h2, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out2) {
  const int64_t n = h2.size(0), d = h2.size(1);
  const at::ScalarType t = h2.scalar_type();
  if (t == at::kFloat || t == at::kDouble) {
    const at::Tensor b = bias.contiguous();
    AT_DISPATCH_FLOATING_TYPES(t, "nbl_affine_residual_cpu", [&] {
      residual_plus_bias(h2.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                         out2.mutable_data_ptr<scalar_t>(), n, d);
    });
    out2.addmm_(h2, weight.t());  // out = (h + b) + h W^T: C matrix, beta = 1
    return;
  }
  const at::Tensor x = h2.to(at::kFloat);
  const at::Tensor acc = at::mm(x, weight.to(at::kFloat).t());
  const at::Tensor b = bias.to(at::kFloat).contiguous();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(t, "nbl_affine_residual_cpu", [&] {
    epilogue(acc.const_data_ptr<float>(), x.const_data_ptr<float>(), b.const_data_ptr<float>(),
             out2.mutable_data_ptr<scalar_t>(), n, d);
  });
}

void run_gemv(bool avx2, const at::Tensor& h2, const at::Tensor& weight, const at::Tensor& bias,
              at::Tensor& out2) {
  const int64_t n = h2.size(0), d = h2.size(1);
  const at::Tensor x = h2.to(at::kFloat).contiguous();  // h2 itself for float32
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h2.scalar_type(), "nbl_affine_residual_gemv", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "nbl::affine_residual: the CPU GEMV path takes float32, bfloat16 or float16");
    } else {
      gemv_residual(avx2, x.const_data_ptr<float>(), w.const_data_ptr<scalar_t>(), b.const_data_ptr<float>(),
                    out2.mutable_data_ptr<scalar_t>(), n, d);
    }
  });
}

}  // namespace

at::Tensor affine_residual_cpu_path(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                                    AffineResidualCpuPath path) {
  detail::check_affine_residual_args(h, weight, bias);
  TORCH_CHECK(h.device().is_cpu(), "nbl::affine_residual CPU kernel got a ", h.device(), " tensor");
  if (h.numel() == 0) return at::empty(h.sizes(), h.options());  // no rows, or d == 0
  const at::Tensor h2 = as_rows(h);
  const at::ScalarType t = h.scalar_type();
  const bool reduced = t == at::kBFloat16 || t == at::kHalf;
  if (path == AffineResidualCpuPath::kAuto) {
    const int64_t n = h2.size(0);
    const bool onednn = onednn_serves(t);
    if (reduced) {
      const bool gemv = onednn ? (n <= kCpuGemvMaxRowsOneDnn || n * h2.size(1) <= kCpuGemvMaxElemsOneDnn)
                               : n <= kCpuGemvMaxRows;
      path = gemv     ? AffineResidualCpuPath::kGemvAvx2
             : onednn ? AffineResidualCpuPath::kOneDnn
                      : AffineResidualCpuPath::kBlas;
    } else {
      path = (t == at::kFloat && onednn && n * h2.size(1) >= kCpuOneDnnMinElemsFloat32) ? AffineResidualCpuPath::kOneDnn
                                                                         : AffineResidualCpuPath::kBlas;
    }
  }
  if (path == AffineResidualCpuPath::kOneDnn) {
    if (onednn_serves(t)) return run_onednn(h2, weight, bias).reshape(h.sizes());  // new, contiguous
    path = AffineResidualCpuPath::kBlas;  // documented fallback
  }
  at::Tensor out = at::empty(h.sizes(), h.options());  // contiguous, h's shape and dtype
  at::Tensor out2 = out.view({h2.size(0), h2.size(1)});
  switch (path) {
    case AffineResidualCpuPath::kGemvAvx2:
      run_gemv(cpu_has_avx2_fma_f16c(), h2, weight, bias, out2);
      break;
    case AffineResidualCpuPath::kGemvPortable:
      run_gemv(false, h2, weight, bias, out2);
      break;
    default:
      run_blas(h2, weight, bias, out2);
  }
  return out;
}

at::Tensor affine_residual_cpu(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  return affine_residual_cpu_path(h, weight, bias, AffineResidualCpuPath::kAuto);
}

TORCH_LIBRARY_IMPL(nbl, CPU, m) { m.impl("affine_residual", &affine_residual_cpu); }

}  // namespace nbl
