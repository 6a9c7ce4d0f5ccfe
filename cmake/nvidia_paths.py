"""Prints the CMake -D flags of the CMake build: -DPID_FAST_CUDA=ON|OFF and, for a CUDA build of
torch, flags that point torch's CMake config at the CUDA toolkit (the one setup.py would choose,
build_support/cuda_toolkit.py) completed by the nvidia-* wheels in site-packages (headers such
as cusparse.h, searched after the toolkit's own; libnvrtc).

Usage: cmake ... $(python cmake/nvidia_paths.py [--cuda auto|ON|OFF] [CUDA_ROOT])
  --cuda auto (default): the CUDA kernels when a usable toolkit is found; ON: required (exits
  with the missing pieces named); OFF: never. CUDA_ROOT: use this toolkit (as CUDA_HOME would).
"""

import argparse
import glob
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def load_cuda_toolkit_module():
    path = os.path.join(HERE, "..", "build_support", "cuda_toolkit.py")
    spec = importlib.util.spec_from_file_location("pid_fast_build_cuda_toolkit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", default="auto", type=str.upper, choices=["AUTO", "ON", "OFF"])
    parser.add_argument("cuda_root", nargs="?", help="the CUDA toolkit (default: found as setup.py does)")
    args = parser.parse_args()
    cuda_toolkit = load_cuda_toolkit_module()
    env = dict(os.environ, CUDA_HOME=args.cuda_root) if args.cuda_root else os.environ
    mode = {"AUTO": "auto", "ON": "1", "OFF": "auto"}[args.cuda]  # OFF still needs the toolkit for torch's config
    choice = cuda_toolkit.choose(mode, torch.version.cuda, env=env)
    if args.cuda == "ON" and not choice.build_cuda:
        sys.exit(cuda_toolkit.failure_message(choice).replace("PID_FAST_CUDA=1", "--cuda ON"))
    if torch.version.cuda is not None and not choice.build_cuda and args.cuda != "OFF":
        print(cuda_toolkit.summary(choice), file=sys.stderr)
    flags = [f"-DPID_FAST_CUDA={'ON' if choice.build_cuda and args.cuda != 'OFF' else 'OFF'}"]
    if choice.build_cuda:
        cuda_home = choice.toolkit.root
        flags += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCUDAToolkit_ROOT={cuda_home}",
                  f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc"]
        includes = cuda_toolkit.nvidia_wheel_includes()
        if includes:
            flags.append("-DPID_FAST_EXTRA_INCLUDE_DIRS=" + ";".join(includes))
        spec = importlib.util.find_spec("nvidia")
        roots = list(spec.submodule_search_locations) if spec else []
        nvrtc = [p for r in roots for p in sorted(glob.glob(os.path.join(r, "*", "lib", "libnvrtc.so*")))
                 if "builtins" not in p and ".alt." not in p]
        if nvrtc and not os.path.exists(os.path.join(cuda_home, "lib64", "libnvrtc.so")):
            flags.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    print(" ".join(flags))


if __name__ == "__main__":
    main()
