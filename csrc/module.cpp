// The nbl_ext._C Python module. Kernels register themselves with the
// dispatcher (TORCH_LIBRARY_IMPL) when this shared object is loaded; the op
// schemas are defined in nbl_ext/ops.py. The module itself only reports how
// it was built.
#include <Python.h>
#include <torch/extension.h>
#include <torch/headeronly/version.h>

#ifdef NBL_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#include <initializer_list>
#include <string>
#include <utility>

#include "nbl_kernels.h"

namespace py = pybind11;

namespace {

// The test hooks' path names: the enum value named `path`, else a ValueError
// listing the names ("unknown path 'x'; use a, b or c").
template <typename P>
P parse_path(const std::string& path, std::initializer_list<std::pair<const char*, P>> choices) {
  std::string names;
  size_t i = 0;
  for (const auto& [name, value] : choices) {
    if (path == name) return value;
    if (i > 0) names += i + 1 == choices.size() ? " or " : ", ";
    names += name;
    ++i;
  }
  throw py::value_error("unknown path '" + path + "'; use " + names);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nbl-ext compiled kernels (CPU always, CUDA when built with it)";
  m.def("build_info", []() {
    py::dict info;
#ifdef NBL_WITH_CUDA
    info["cuda"] = true;
    info["cuda_runtime_version"] = CUDART_VERSION;
#else
    info["cuda"] = false;
    info["cuda_runtime_version"] = py::none();
#endif
    info["torch_version_built"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                                 std::to_string(TORCH_VERSION_MINOR) + "." +
                                 std::to_string(TORCH_VERSION_PATCH);
    return info;
  });
  // Test hook: run one code path of the CPU kernel of nbl::affine_residual
  // ("auto", "blas", "gemv_portable", "gemv_avx2", "onednn"); see nbl_kernels.h.
  m.def("_affine_residual_cpu_path",
        [](const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias, const std::string& path) {
          using P = nbl::AffineResidualCpuPath;
          const P p = parse_path<P>(path, {{"auto", P::kAuto}, {"blas", P::kBlas}, {"gemv_portable", P::kGemvPortable},
                                           {"gemv_avx2", P::kGemvAvx2}, {"onednn", P::kOneDnn}});
          return nbl::affine_residual_cpu_path(h, weight, bias, p);
        },
        py::arg("h"), py::arg("weight"), py::arg("bias"), py::arg("path"));
  // Test hook: run one code path of the CUDA kernel of nbl::affine_residual
  // ("auto", "gemv", "gemm_epilogue", "cublaslt"); see nbl_kernels.h.
  // "cublaslt" raises RuntimeError (saying why) instead of falling back when
  // cuBLASLt cannot take the problem.
  m.def("_affine_residual_cuda_path",
        [](const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias, const std::string& path) {
#ifdef NBL_WITH_CUDA
          using P = nbl::AffineResidualCudaPath;
          const P p = parse_path<P>(path, {{"auto", P::kAuto}, {"gemv", P::kGemv},
                                           {"gemm_epilogue", P::kGemmEpilogue}, {"cublaslt", P::kCublasLtStrict}});
          return nbl::affine_residual_cuda_path(h, weight, bias, p);
#else
          (void)h, (void)weight, (void)bias, (void)path;
          throw std::runtime_error("nbl_ext._C was built without CUDA kernels");
          return at::Tensor();
#endif
        },
        py::arg("h"), py::arg("weight"), py::arg("bias"), py::arg("path"));
}
