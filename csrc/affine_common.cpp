// Backend-independent part of nbl::affine_residual: argument checks, with
// the same messages as the Python reference (nbl_ext/reference.py).
#include "nbl_kernels.h"

#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace nbl {
namespace detail {
namespace {

// The dtype as Python prints it (torch.float32, ...), so that messages read
// the same from every backend.
std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string py_shape(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << sizes;  // [a, b], like list(t.shape) in Python
  return s.str();
}

}  // namespace

void check_affine_residual_args(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK_VALUE(h.dim() >= 1,
                    "nbl::affine_residual: h must be (..., d) with at least 1 dimension; got a 0-D tensor");
  const at::ScalarType t = h.scalar_type();
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble,
                    "nbl::affine_residual: h must be float32, bfloat16, float16 or float64; got ",
                    py_dtype(t), ". Cast h to the model's floating-point dtype");
  TORCH_CHECK_VALUE(weight.scalar_type() == t && bias.scalar_type() == t,
                    "nbl::affine_residual: h, weight and bias must have one dtype; got h ", py_dtype(t),
                    ", weight ", py_dtype(weight.scalar_type()), ", bias ", py_dtype(bias.scalar_type()),
                    ". Cast the weight and bias to h's dtype: weight.to(h.dtype), bias.to(h.dtype)");
  TORCH_CHECK_VALUE(weight.device() == h.device() && bias.device() == h.device(),
                    "nbl::affine_residual: h, weight and bias must be on one device; got h on ", h.device(),
                    ", weight on ", weight.device(), ", bias on ", bias.device(),
                    ". Move the weight and bias to h's device: weight.to(h.device), bias.to(h.device)");
  const int64_t d = h.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == d && weight.size(1) == d,
                    "nbl::affine_residual: weight must be square (d, d) with d = h.shape[-1] = ", d,
                    "; got weight of shape ", py_shape(weight.sizes()),
                    ". The affine map is out = h + h @ weight.T + bias");
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == d, "nbl::affine_residual: bias must have shape [d] = [",
                    d, "]; got ", py_shape(bias.sizes()));
}

}  // namespace detail
}  // namespace nbl
