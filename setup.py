"""pip build of pid_fast: the Python package plus the `pid_fast._C` extension.

Build against the torch you already have:  pip install --no-build-isolation .

Environment knobs (all optional):
  PID_FAST_CUDA=auto|0|1   build the CUDA kernels: auto (default) = when torch is a CUDA build
                           and a CUDA toolkit is found (CUDA_HOME / nvcc); 0 = CPU only;
                           1 = required (fail if no toolkit).
  TORCH_CUDA_ARCH_LIST     GPU architectures, e.g. "9.0" (H100/H200) or "8.0;9.0". Without it and
                           without a visible GPU, PID_FAST_DEFAULT_ARCHS is used.
  PID_FAST_DEFAULT_ARCHS   default "8.0;9.0".
  CUDA_HOME                the CUDA toolkit (e.g. /usr/local/cuda).
  MAX_JOBS                 parallel compile jobs (ninja).
The include folders of the nvidia-* CUDA wheels in site-packages (cusparse.h, cublas_v2.h, ...)
are added automatically, so a minimal toolkit with only nvcc is enough.
"""

import glob
import importlib.util
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def nvidia_wheel_includes():
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    return dirs


def want_cuda():
    mode = os.environ.get("PID_FAST_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"PID_FAST_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    import torch

    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not have:
        raise SystemExit(
            "PID_FAST_CUDA=1 but no CUDA build is possible: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}. Set CUDA_HOME to the "
            "CUDA toolkit (e.g. /usr/local/cuda) and use a CUDA build of torch.")
    if not have:
        print("pid_fast: no CUDA toolkit or CPU-only torch: building the CPU kernels only")
    return have


def extension():
    cxx = ["-O3", "-fopenmp"]  # torch picks the C++ standard it needs
    sources = ["csrc/pid_ops.cpp", "csrc/pid_autograd.cpp", "csrc/cpu/pid_cpu.cpp", "csrc/pymodule.cpp"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "pid_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("PID_FAST_DEFAULT_ARCHS", "8.0;9.0")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    defines = ["-DPID_FAST_WITH_CUDA", f'-DPID_FAST_CUDA_ARCHS="{archs}"']
    print(f"pid_fast: building CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}")
    return cpp_extension.CUDAExtension(
        "pid_fast._C",
        sources + ["csrc/cuda/pid_cuda_kernels.cu", "csrc/cuda/pid_cuda.cpp"],
        include_dirs=nvidia_wheel_includes(),
        extra_compile_args={
            "cxx": cxx + defines,
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"] + defines,
        },
        extra_link_args=["-fopenmp"],
    )


setup(
    name="pid_fast",
    version="0.1.0",
    description="Fused Physics Informed Distillation (PID) of diffusion models for PyTorch",
    packages=find_packages(include=["pid_fast", "pid_fast.*"]),
    package_data={"pid_fast": ["assets/*"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "click", "safetensors", "tqdm"],
    extras_require={
        "eval": ["clean-fid", "scikit-learn", "matplotlib", "lpips", "torchvision"],
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["pid-fast = pid_fast.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
