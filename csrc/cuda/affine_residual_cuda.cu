// CUDA kernel of nbl::affine_residual: out = h + h @ weight^T + bias (see
// nbl_kernels.h for the contract). Dispatch by the number of rows n:
//
//   * n <= kCudaGemvMaxRows (decode): one hand-written GEMV kernel. One warp
//     per output channel j reads row j of weight once with 16-byte vector
//     loads, forms the dot products with all n rows of h in the accumulation
//     type (float32; float64 for float64 inputs), reduces them with warp
//     shuffles, and lane 0 writes out[r, j] = h[r, j] + b[j] + dot (one
//     rounding). Bandwidth-bound: weight (d^2 elements) is read once.
//   * n > kCudaGemvMaxRows (prefill): one cuBLAS GEMM acc = h weight^T with
//     a float32 output for bfloat16/float16 inputs (at::mm's out_dtype;
//     float32 accumulation; float32 inputs follow
//     torch.backends.cuda.matmul.allow_tf32), then one elementwise epilogue
//     out = acc + h + b in float32 (float64 for float64), rounded once. The
//     float32 intermediate costs 4 n d bytes of traffic, small next to the
//     GEMM's 2 n d^2 FLOPs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../nbl_kernels.h"

namespace nbl {
namespace {

constexpr int64_t kCudaGemvMaxRows = 8;  // rows handled by the GEMV kernel
constexpr int kWarp = 32;
constexpr int kGemvWarps = 8;  // output channels (warps) per block
constexpr int kThreads = 256;  // epilogue block size

// kVec elements of T loaded or stored as one 16-byte (or smaller) access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// out[r, j] = h[r, j] + b[j] + sum_k h[r, k] w[j, k] for r < rows, one warp per j.
// h (rows, d), w (d, d), out (rows, d) are contiguous. kVec > 1 needs every
// row start 16-byte aligned (d % kVec == 0 and aligned base pointers).
template <typename T, int kVec>
__global__ void __launch_bounds__(kGemvWarps * kWarp)
    gemv_residual_kernel(const T* __restrict__ h, const T* __restrict__ w, const T* __restrict__ b,
                         T* __restrict__ out, int rows, int64_t d) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, kVec>;
  const int lane = threadIdx.x % kWarp;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarp;
  if (j >= d) return;  // j is uniform across the warp: whole warps leave

  acc_t acc[kCudaGemvMaxRows];
#pragma unroll
  for (int r = 0; r < kCudaGemvMaxRows; ++r) acc[r] = acc_t(0);

  const T* wj = w + j * d;
#pragma unroll 4
  for (int64_t k = static_cast<int64_t>(lane) * kVec; k < d; k += kWarp * kVec) {
    const P wv = *reinterpret_cast<const P*>(wj + k);
#pragma unroll
    for (int r = 0; r < kCudaGemvMaxRows; ++r) {
      if (r < rows) {
        const P hv = *reinterpret_cast<const P*>(h + r * d + k);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          acc[r] += static_cast<acc_t>(wv.v[e]) * static_cast<acc_t>(hv.v[e]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kCudaGemvMaxRows; ++r) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
    }
  }

  if (lane == 0) {
    const acc_t bj = static_cast<acc_t>(b[j]);
#pragma unroll
    for (int r = 0; r < kCudaGemvMaxRows; ++r) {
      if (r < rows) out[r * d + j] = static_cast<T>(acc[r] + static_cast<acc_t>(h[r * d + j]) + bj);
    }
  }
}

// out[i, j] = T(acc[i, j] + h[i, j] + b[j]), acc in the accumulation type.
template <typename T>
__global__ void epilogue_kernel(const at::opmath_type<T>* __restrict__ acc, const T* __restrict__ h,
                                const T* __restrict__ b, T* __restrict__ out, int64_t total, int64_t d) {
  using acc_t = at::opmath_type<T>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[idx] = static_cast<T>(acc[idx] + static_cast<acc_t>(h[idx]) + static_cast<acc_t>(b[idx % d]));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void launch_gemv(const at::Tensor& h2, const at::Tensor& w, const at::Tensor& b, at::Tensor& out2) {
  const int64_t n = h2.size(0), d = h2.size(1);
  const int blocks = static_cast<int>((d + kGemvWarps - 1) / kGemvWarps);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h2.scalar_type(), "nbl_affine_residual_gemv", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* ph = h2.const_data_ptr<scalar_t>();
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* po = out2.mutable_data_ptr<scalar_t>();
    if (d % kVec == 0 && aligned16(ph) && aligned16(pw)) {
      gemv_residual_kernel<scalar_t, kVec>
          <<<blocks, kGemvWarps * kWarp, 0, stream>>>(ph, pw, pb, po, static_cast<int>(n), d);
    } else {
      gemv_residual_kernel<scalar_t, 1>
          <<<blocks, kGemvWarps * kWarp, 0, stream>>>(ph, pw, pb, po, static_cast<int>(n), d);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_gemm_epilogue(const at::Tensor& h2, const at::Tensor& w, const at::Tensor& b, at::Tensor& out2) {
  const int64_t n = h2.size(0), d = h2.size(1);
  const at::ScalarType t = h2.scalar_type();
  // cuBLAS: acc = h W^T in the accumulation type (float32 output for bf16/fp16 inputs).
  const at::Tensor acc = (t == at::kBFloat16 || t == at::kHalf) ? at::mm(h2, w.t(), at::kFloat) : at::mm(h2, w.t());
  const int64_t total = n * d;
  const int64_t want = (total + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::min<int64_t>(want, 65535LL * 8));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h2.scalar_type(), "nbl_affine_residual_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_INTERNAL_ASSERT(acc.is_contiguous());  // const_data_ptr<acc_t> checks the dtype
    epilogue_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        acc.const_data_ptr<acc_t>(), h2.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        out2.mutable_data_ptr<scalar_t>(), total, d);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor affine_residual_cuda(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  detail::check_affine_residual_args(h, weight, bias);
  TORCH_CHECK(h.is_cuda(), "nbl::affine_residual CUDA kernel got a ", h.device(), " tensor");
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor out = at::empty(h.sizes(), h.options());  // contiguous, h's shape and dtype
  if (out.numel() == 0) return out;                    // no rows, or d == 0
  const at::Tensor h2 = (h.dim() == 1 ? h.unsqueeze(0) : h.flatten(0, -2)).contiguous();
  at::Tensor out2 = out.view({h2.size(0), h2.size(1)});
  const at::Tensor b = bias.contiguous();
  if (h2.size(0) <= kCudaGemvMaxRows) {
    launch_gemv(h2, weight.contiguous(), b, out2);
  } else {
    launch_gemm_epilogue(h2, weight, b, out2);
  }
  return out;
}

TORCH_LIBRARY_IMPL(nbl, CUDA, m) { m.impl("affine_residual", &affine_residual_cuda); }

}  // namespace nbl
