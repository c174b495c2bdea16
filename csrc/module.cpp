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

#include <string>

#include "nbl_kernels.h"

namespace py = pybind11;

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
          P p;
          if (path == "auto") {
            p = P::kAuto;
          } else if (path == "blas") {
            p = P::kBlas;
          } else if (path == "gemv_portable") {
            p = P::kGemvPortable;
          } else if (path == "gemv_avx2") {
            p = P::kGemvAvx2;
          } else if (path == "onednn") {
            p = P::kOneDnn;
          } else {
            throw py::value_error("unknown path '" + path + "'; use auto, blas, gemv_portable, gemv_avx2 or onednn");
          }
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
          P p;
          if (path == "auto") {
            p = P::kAuto;
          } else if (path == "gemv") {
            p = P::kGemv;
          } else if (path == "gemm_epilogue") {
            p = P::kGemmEpilogue;
          } else if (path == "cublaslt") {
            p = P::kCublasLtStrict;
          } else {
            throw py::value_error("unknown path '" + path + "'; use auto, gemv, gemm_epilogue or cublaslt");
          }
          return nbl::affine_residual_cuda_path(h, weight, bias, p);
#else
          (void)h, (void)weight, (void)bias, (void)path;
          throw std::runtime_error("nbl_ext._C was built without CUDA kernels");
          return at::Tensor();
#endif
        },
        py::arg("h"), py::arg("weight"), py::arg("bias"), py::arg("path"));
}
