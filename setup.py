"""The one compiled extension of nbl-ext, ``nbl_ext._C`` (the package metadata is in pyproject.toml).

CPU kernels are always built. CUDA kernels are built when the installed torch
is a CUDA build (``torch.version.cuda``) *and* a CUDA toolkit is found
(``CUDA_HOME``/``nvcc``): a GPU is not needed, build machines have none.

Environment overrides:
  NBL_FORCE_CUDA=1        build the CUDA kernels or fail (CI's compile-only check)
  NBL_SKIP_CUDA=1         CPU kernels only, even with a CUDA torch and toolkit
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0")
  NBL_NO_EXTENSION=1      pure-Python install (the package then runs on its
                          pure-PyTorch reference kernels)

Build against the installed torch: ``pip install --no-build-isolation .`` (or ``-e .``).
scripts/setup_env.sh builds in place instead (``setup.py build_ext --inplace`` with a kept
build directory, so that a rebuild compiles only what changed).
"""
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _pip_cuda_include_dirs(cuda_home: str) -> list[str]:
    """Header dirs of pip-installed CUDA libraries (nvidia-* wheels), when the
    toolkit at cuda_home lacks the library headers ATen includes (cusparse.h,
    cublas_v2.h): a bare nvcc toolkit plus a CUDA torch wheel."""
    if (Path(cuda_home) / "include" / "cusparse.h").exists():
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(Path(base).glob("*/include")):
            if any((inc / h).exists() for h in ("cusparse.h", "cublas_v2.h", "cusolverDn.h")):
                found.append(str(inc))
    return found


def _cublas_link_args(cuda_home: str) -> tuple[list[str], list[str]]:
    """(library_dirs, extra_link_args) that link cuBLAS and cuBLASLt (the CUDA
    kernels call cublasGemmEx and cublasLtMatmul directly). The toolkit's
    lib64 when it has them; otherwise the nvidia-* wheels that the CUDA torch
    wheel depends on, linked by their versioned file names (they ship no
    unversioned .so). At run time torch has already loaded these libraries
    (same sonames), so no rpath is needed."""
    lib64 = Path(cuda_home) / "lib64"
    if (lib64 / "libcublasLt.so").exists() and (lib64 / "libcublas.so").exists():
        return [str(lib64)], ["-lcublasLt", "-lcublas"]
    try:
        import nvidia
    except ImportError:
        return [], ["-lcublasLt", "-lcublas"]
    dirs, args = [], []
    for name in ("libcublasLt.so", "libcublas.so"):
        found = sorted(p for base in getattr(nvidia, "__path__", []) for p in Path(base).glob(f"*/lib/{name}.*"))
        if not found:
            return [], ["-lcublasLt", "-lcublas"]
        lib = found[0]
        dirs.append(str(lib.parent))
        args.append(f"-l:{lib.name}")
    return sorted(set(dirs)), args


def _extensions():
    if _flag("NBL_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(
            "nbl-ext builds against the installed torch. Install torch first, then build "
            "without isolation:\n  pip install torch==2.13.0\n  pip install --no-build-isolation ."
        )

    force, skip = _flag("NBL_FORCE_CUDA"), _flag("NBL_SKIP_CUDA")
    if force and skip:
        sys.exit("NBL_FORCE_CUDA and NBL_SKIP_CUDA are both set; set one of them.")
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None) and not skip
    if force:
        if torch.version.cuda is None:
            sys.exit(f"NBL_FORCE_CUDA=1 but the installed torch {torch.__version__} is a CPU build.")
        if CUDA_HOME is None:
            sys.exit("NBL_FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME.")
        with_cuda = True
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cpp"))]
    sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden"]
    kwargs = dict(include_dirs=[str(ROOT / "csrc")])
    if with_cuda:
        kwargs["include_dirs"] += _pip_cuda_include_dirs(CUDA_HOME)
        kwargs["library_dirs"], link_args = _cublas_link_args(CUDA_HOME)
        sources += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]
        ext = CUDAExtension(
            "nbl_ext._C",
            sources,
            define_macros=[("NBL_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=link_args,
            **kwargs,
        )
    else:
        ext = CppExtension("nbl_ext._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"nbl-ext: building nbl_ext._C with CUDA kernels: {with_cuda} (torch {torch.__version__})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# The package metadata (name, version, dependencies, the `nbl` command) is in pyproject.toml.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
