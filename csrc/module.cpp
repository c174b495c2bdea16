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
}
