"""Prints CMake -D flags that point torch's CMake config at a CUDA toolkit completed by the
nvidia-* wheels in site-packages (headers such as cusparse.h, and libnvrtc). Prints nothing
for a CPU-only torch. Usage: cmake ... $(python cmake/nvidia_paths.py /usr/local/cuda)"""

import glob
import importlib.util
import os
import sys

import torch

if torch.version.cuda is None:
    sys.exit(0)
cuda_home = sys.argv[1] if len(sys.argv) > 1 else "/usr/local/cuda"
flags = [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCUDAToolkit_ROOT={cuda_home}",
         f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc"]
spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations) if spec else []
includes = [d for r in roots for d in sorted(glob.glob(os.path.join(r, "*", "include")))]
if includes:
    flags.append("-DPID_FAST_EXTRA_INCLUDE_DIRS=" + ";".join(includes))
nvrtc = [p for r in roots for p in sorted(glob.glob(os.path.join(r, "*", "lib", "libnvrtc.so*")))
         if "builtins" not in p and ".alt." not in p]
if nvrtc and not os.path.exists(os.path.join(cuda_home, "lib64", "libnvrtc.so")):
    flags.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
print(" ".join(flags))
