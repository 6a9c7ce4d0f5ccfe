"""pip build of pid_fast: the Python package plus the `pid_fast._C` extension.

Build against the torch you already have (install torch first):

    pip install --no-build-isolation .          # or -e . for development
    pip wheel --no-build-isolation --no-deps . -w dist/   # one abi3 wheel (cp310-abi3)

The extension uses only the LibTorch Stable ABI (torch/csrc/stable, torch/headeronly) of torch 2.10
(MIN_TORCH below, passed as -DTORCH_TARGET_VERSION) and Python's limited API (py_limited_api, an
abi3 wheel): one build loads in every torch >= 2.10 and every CPython the building torch supports
and newer, whichever torch it was built against. Building against an older torch stops at once
naming the supported range (there is no classic-ABI fallback).

Plain `pip install .` (build isolation) stops at once with that advice: an isolated build would
compile against another torch than the one pid_fast runs with.

With no environment variables the CUDA kernels are built when torch is a CUDA build and a usable
CUDA toolkit is found (build_support/cuda_toolkit.py: $CUDA_HOME / $CUDA_PATH, else the toolkit
behind `nvcc` on PATH, else /usr/local/cuda; nvcc of torch's CUDA major version, cudart to link,
the runtime headers); otherwise the build is CPU (+Triton) with one warning line naming what is
missing (`pip install -v` shows it). Environment knobs (all optional):
  PID_FAST_CUDA=auto|0|1   the CUDA kernels: when possible (default); never; required (fails in
                           seconds, before compiling, naming what is missing).
  CUDA_HOME / CUDA_PATH    the CUDA toolkit to use (the only candidate when set).
  TORCH_CUDA_ARCH_LIST     GPU architectures, e.g. "9.0" (H100/H200) or "8.0;9.0". Without it and
                           without a visible GPU, PID_FAST_DEFAULT_ARCHS is used.
  PID_FAST_DEFAULT_ARCHS   default "8.0;9.0".
  MAX_JOBS                 parallel compile jobs (ninja).
The include folders of the nvidia-* CUDA wheels in site-packages (cusparse.h, cublas_v2.h, ...)
are searched after the toolkit's own (-idirafter), so a minimal toolkit with nvcc, the runtime
headers and cudart is enough, and a wheel's headers of another CUDA release never shadow it.
"""

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NO_TORCH_MESSAGE = """\
pid_fast: torch is not importable in this build environment.
pid_fast's C++/CUDA extension must be compiled against the torch it will run with, so it is built
without build isolation, in an environment that already has torch:

    pip install torch                        # if not installed yet
    pip install --no-build-isolation .       # (-e . for development)
"""


def cuda_mode(cuda_toolkit):
    mode = os.environ.get("PID_FAST_CUDA", "auto").strip().lower()
    if mode not in cuda_toolkit.MODES:
        sys.exit(f"pid_fast: PID_FAST_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


TOO_OLD_MESSAGE = """\
pid_fast: torch {found} is too old. pid_fast's compiled kernels use the LibTorch Stable ABI of
torch {min}, so they build and load with torch >= {min} (one build serves every newer torch).
Upgrade torch (pip install 'torch>={min}'), then build again with --no-build-isolation.
"""


def load_module_by_path(name, relpath):
    """A helper file by its path (build_support/ is not part of the installed package; the
    extension loader is read before pid_fast, which needs the built library, is importable)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, relpath))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


# Checked first, in seconds: an isolated build (plain `pip install .`) has no torch here.
if importlib.util.find_spec("torch") is None:
    sys.exit(NO_TORCH_MESSAGE)

cuda_toolkit = load_module_by_path("pid_fast_build_cuda_toolkit", "build_support/cuda_toolkit.py")
MODE = cuda_mode(cuda_toolkit)

import torch  # noqa: E402  (torch.utils.cpp_extension is imported only after CUDA_HOME is set)

# The oldest torch whose stable ABI the kernels use: one home, pid_fast/ops/extension.py.
ext_loader = load_module_by_path("pid_fast_build_extension_loader", "pid_fast/ops/extension.py")
MIN_TORCH = ext_loader.MIN_TORCH
TORCH_TARGET_VERSION = ext_loader.torch_target_version()  # -DTORCH_TARGET_VERSION
if ext_loader.torch_version(torch.__version__) < MIN_TORCH:
    sys.exit(TOO_OLD_MESSAGE.format(found=torch.__version__, min=".".join(map(str, MIN_TORCH))))

CHOICE = cuda_toolkit.choose(MODE, torch.version.cuda)
if CHOICE.build_cuda:
    os.environ["CUDA_HOME"] = CHOICE.toolkit.root  # read by torch.utils.cpp_extension at import
elif MODE == "1":
    sys.exit(cuda_toolkit.failure_message(CHOICE))
print(cuda_toolkit.summary(CHOICE), file=sys.stderr if MODE == "auto" and not CHOICE.build_cuda else sys.stdout)

from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

if CHOICE.build_cuda and os.path.realpath(cpp_extension.CUDA_HOME or "") != os.path.realpath(CHOICE.toolkit.root):
    sys.exit(f"pid_fast: torch.utils.cpp_extension was imported before setup.py chose the CUDA toolkit "
             f"(its CUDA_HOME is {cpp_extension.CUDA_HOME!r}, not {CHOICE.toolkit.root!r})")


def extension():
    # torch picks the C++ standard it needs and adds -DPy_LIMITED_API for py_limited_api. No
    # -fopenmp: the CPU kernels run on torch's own OpenMP pool (torch::stable::parallel_for),
    # so the library needs no system libgomp.
    stable = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
    cxx = ["-O3", "-fvisibility=hidden"] + stable  # torch::stable's types are hidden too
    sources = ["csrc/pid_ops.cpp", "csrc/cpu/pid_cpu.cpp", "csrc/pymodule.cpp"]
    if not CHOICE.build_cuda:
        return cpp_extension.CppExtension(
            "pid_fast._C", sources, extra_compile_args={"cxx": cxx}, py_limited_api=True)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("PID_FAST_DEFAULT_ARCHS", "8.0;9.0")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    defines = ["-DPID_FAST_WITH_CUDA", f'-DPID_FAST_CUDA_ARCHS="{archs}"']
    wheel_includes = cuda_toolkit.include_after_toolkit_flags(cuda_toolkit.nvidia_wheel_includes())
    print(f"pid_fast: CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}")
    return cpp_extension.CUDAExtension(
        "pid_fast._C",
        sources + ["csrc/cuda/pid_cuda_kernels.cu", "csrc/cuda/pid_cuda.cpp"],
        extra_compile_args={
            "cxx": cxx + defines + wheel_includes["cxx"],
            # USE_CUDA declares aoti_torch_get_current_cuda_stream in torch's C shim.
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-DUSE_CUDA",
                     "-Xcompiler=-fvisibility=hidden"] + stable + defines + wheel_includes["nvcc"],
        },
        py_limited_api=True,
    )


def limited_api_tag() -> str:
    """The abi3 wheel's tag, "cp310" for torch's -DPy_LIMITED_API=0x030A0000 (the oldest CPython
    the building torch supports; the wheel then serves that CPython and every newer one)."""
    version = int(getattr(cpp_extension, "min_supported_cpython", "0x03090000"), 16)
    return f"cp{version >> 24}{(version >> 16) & 0xff}"


EVAL = ["clean-fid", "scikit-learn", "matplotlib", "torchvision"]
LPIPS = ["lpips"]  # brings torchvision; its vgg.pth is the default LPIPS heads file
DIFFUSERS = ["diffusers>=0.30"]  # teachers/students saved with diffusers' save_pretrained
ACCELERATE = ["accelerate"]  # the drop-in loss inside an accelerate loop (examples/, tests)
LIGHTNING = ["pytorch-lightning"]  # the drop-in loss inside a LightningModule (examples/, tests)
TEXT = DIFFUSERS + ["transformers"]  # text-to-image teachers: CLIP text encoders and tokenizers
TENSORBOARD = ["tensorboard"]  # log.tensorboard: torch.utils.tensorboard's writer
WANDB = ["wandb"]  # log.wandb (tests run it with WANDB_MODE=offline)
TEST = (["pytest", "hypothesis", "pytest-benchmark", "piq==0.8.0", "lpips"] + DIFFUSERS + ACCELERATE + LIGHTNING + TEXT
        + TENSORBOARD + WANDB)

setup(
    name="pid_fast",
    version="0.1.0",
    description="Fused Physics Informed Distillation (PID) of diffusion models for PyTorch",
    packages=find_packages(include=["pid_fast", "pid_fast.*"]),
    package_data={"pid_fast": ["assets/*"]},
    python_requires=">=3.10",  # torch >= 2.10 needs it; the abi3 wheel is cp310-abi3
    install_requires=[f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}", "numpy", "click", "safetensors", "tqdm", "Pillow"],
    extras_require={
        "eval": EVAL,  # pid-fast fid, demo, train-teacher, train-features
        "lpips": LPIPS,  # loss.norm = "lpips" (with local weight files)
        "diffusers": DIFFUSERS,  # teacher.kind = "diffusers", VAE decoding of latent teachers
        "text": TEXT,  # text-conditioned diffusers pipelines (prompts, CLIP score)
        "tensorboard": TENSORBOARD,
        "wandb": WANDB,
        "test": TEST,
        "all": sorted(set(EVAL + LPIPS + DIFFUSERS + TEXT + TENSORBOARD + WANDB + TEST)),
    },
    entry_points={"console_scripts": ["pid-fast = pid_fast.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": limited_api_tag()}},  # one wheel for every CPython
    zip_safe=False,
)
