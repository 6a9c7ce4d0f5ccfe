"""The CUDA toolkit choice of the build (build_support/cuda_toolkit.py) on fake toolkits: temp
folders with a `bin/nvcc` shell script that prints a version, fake headers and libraries. Nothing
is compiled; the setup.py checks that stop a build early run setup.py itself."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_module():
    spec = importlib.util.spec_from_file_location("cuda_toolkit_under_test", REPO / "build_support" / "cuda_toolkit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ct = load_module()

NVCC_SCRIPT = """#!/bin/sh
case "$1" in
  --version) echo "nvcc: NVIDIA (R) Cuda compiler driver"; echo "Cuda compilation tools, release {version}, V{version}.88";;
  --dryrun) echo "#\\$ _HERE_={root}/bin"; echo "#\\$ TOP={root}/bin/..";;
  *) exit 1;;
esac
"""


def fake_toolkit(root: Path, version="13.0", nvcc=True, header=True, cudart="lib64/libcudart.so") -> Path:
    root.mkdir(parents=True)
    if nvcc:
        (root / "bin").mkdir()
        script = root / "bin" / "nvcc"
        script.write_text(NVCC_SCRIPT.format(version=version, root=root))
        script.chmod(0o755)
    if header:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    if cudart:
        (root / cudart).parent.mkdir(parents=True, exist_ok=True)
        (root / cudart).write_text("")
    return root


def wrapper_dir(folder: Path, target_nvcc: Path) -> Path:
    """A folder holding an `nvcc` wrapper script that lives outside any toolkit."""
    folder.mkdir(parents=True)
    wrapper = folder / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {target_nvcc} "$@"\n')
    wrapper.chmod(0o755)
    return folder


def env(**values):
    """An environment with an empty PATH unless given (the machine's real nvcc stays out)."""
    values.setdefault("PATH", "")
    return {k: str(v) for k, v in values.items()}


def choose(tmp_path, mode="auto", torch_cuda="13.0", **env_values):
    return ct.choose(mode, torch_cuda, env=env(**env_values), default_root=str(tmp_path / "no-default"))


def test_cuda_home_is_used(tmp_path):
    kit = fake_toolkit(tmp_path / "cuda")
    choice = choose(tmp_path, CUDA_HOME=kit)
    assert choice.build_cuda and choice.toolkit.root == str(kit)
    assert choice.toolkit.found_by == "CUDA_HOME" and choice.toolkit.version == (13, 0)
    assert choice.reason == "" and choice.notes == []


def test_cuda_path_when_cuda_home_unset_and_cuda_home_first(tmp_path):
    a, b = fake_toolkit(tmp_path / "a"), fake_toolkit(tmp_path / "b")
    assert choose(tmp_path, CUDA_PATH=b).toolkit.root == str(b)
    choice = choose(tmp_path, CUDA_HOME=a, CUDA_PATH=b)
    assert choice.toolkit.root == str(a) and choice.toolkit.found_by == "CUDA_HOME"


def test_explicit_cuda_home_is_never_replaced(tmp_path):
    """CUDA_HOME without cudart: no silent switch to the usable toolkit on PATH; the reason names it."""
    bad = fake_toolkit(tmp_path / "bad", cudart=None)
    good = fake_toolkit(tmp_path / "good")
    choice = choose(tmp_path, CUDA_HOME=bad, PATH=good / "bin")
    assert not choice.build_cuda
    assert str(bad) in choice.reason and "no lib64/libcudart.so to link (-lcudart)" in choice.reason
    assert str(good) not in choice.reason


@pytest.mark.parametrize("missing, problem", [
    ({"nvcc": False}, "no bin/nvcc"),
    ({"header": False}, "no include/cuda_runtime.h"),
    ({"cudart": None}, "no lib64/libcudart.so"),
    ({"cudart": "lib64/libcudart.so.13"}, "no lib64/libcudart.so"),  # the runtime alone does not link
])
def test_each_missing_piece_is_named(tmp_path, missing, problem):
    kit = fake_toolkit(tmp_path / "cuda", **missing)
    choice = choose(tmp_path, CUDA_HOME=kit)
    assert not choice.build_cuda and problem in choice.reason


def test_missing_root_and_broken_nvcc(tmp_path):
    assert "does not exist" in choose(tmp_path, CUDA_HOME=tmp_path / "nope").reason
    kit = fake_toolkit(tmp_path / "cuda")
    (kit / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    reason = choose(tmp_path, CUDA_HOME=kit).reason
    assert "bin/nvcc --version fails or shows no 'release X.Y'" in reason


def test_lib_folder_when_there_is_no_lib64(tmp_path):
    kit = fake_toolkit(tmp_path / "cuda", cudart="lib/libcudart.so")
    assert choose(tmp_path, CUDA_HOME=kit).build_cuda
    kit2 = fake_toolkit(tmp_path / "cuda2", cudart="lib/libcudart.a")
    assert choose(tmp_path, CUDA_HOME=kit2).build_cuda


def test_major_version_must_match_torch(tmp_path):
    kit = fake_toolkit(tmp_path / "cuda", version="12.4")
    choice = choose(tmp_path, torch_cuda="13.0", CUDA_HOME=kit)
    assert not choice.build_cuda
    assert "nvcc 12.4 but torch is built with CUDA 13.0 (needs a 13.x toolkit)" in choice.reason
    assert "CUDA-13.x-toolkit" in ct.summary(choice)


@pytest.mark.parametrize("nvcc_version", ["13.2", "13.0"])
def test_minor_version_difference_is_accepted_and_noted(tmp_path, nvcc_version):
    kit = fake_toolkit(tmp_path / "cuda", version=nvcc_version)
    choice = choose(tmp_path, torch_cuda="13.1", CUDA_HOME=kit)
    assert choice.build_cuda
    assert any(f"nvcc {nvcc_version} and torch's CUDA 13.1 differ in the minor version only" in n for n in choice.notes)
    assert "minor version only" in ct.summary(choice)


def test_wrapper_script_on_path_finds_the_real_toolkit(tmp_path):
    """/usr/local/bin/nvcc-style wrapper: its ../ is no toolkit; nvcc's dry run tells the root."""
    kit = fake_toolkit(tmp_path / "cuda-13.0")
    wrappers = wrapper_dir(tmp_path / "usr-local" / "bin", kit / "bin" / "nvcc")
    choice = choose(tmp_path, PATH=f"{tmp_path / 'empty'}:{wrappers}")
    assert choice.build_cuda and choice.toolkit.root == os.path.realpath(kit)
    assert choice.toolkit.found_by == f"nvcc on PATH ({wrappers / 'nvcc'})"


def test_symlinked_nvcc_on_path_is_resolved(tmp_path):
    kit = fake_toolkit(tmp_path / "cuda-13.0")
    links = tmp_path / "links"
    links.mkdir()
    (links / "nvcc").symlink_to(kit / "bin" / "nvcc")
    (kit / "bin" / "nvcc").write_text(NVCC_SCRIPT.replace("TOP=", "NOT_TOP=").format(version="13.0", root=kit))
    choice = choose(tmp_path, PATH=links)
    assert choice.build_cuda and choice.toolkit.root == os.path.realpath(kit)


def test_nvcc_whose_toolkit_cannot_be_told(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (folder / "nvcc").chmod(0o755)
    choice = choose(tmp_path, PATH=folder)
    assert not choice.build_cuda and f"nvcc on PATH ({folder / 'nvcc'}): cannot tell its toolkit folder" in choice.reason


def test_order_path_then_default_root(tmp_path):
    on_path = fake_toolkit(tmp_path / "on-path")
    default = fake_toolkit(tmp_path / "default")
    choice = ct.choose("auto", "13.0", env=env(PATH=on_path / "bin"), default_root=str(default))
    assert choice.toolkit.root == str(on_path)
    # an unusable toolkit on PATH (wrong major) gives way to the default root
    old = fake_toolkit(tmp_path / "old", version="12.8")
    choice = ct.choose("auto", "13.0", env=env(PATH=old / "bin"), default_root=str(default))
    assert choice.toolkit.root == str(default) and choice.toolkit.found_by == str(default)
    # nothing on PATH: the default root
    choice = ct.choose("auto", "13.0", env=env(), default_root=str(default))
    assert choice.toolkit.root == str(default)


def test_default_root_behind_path_nvcc_is_inspected_once(tmp_path):
    kit = fake_toolkit(tmp_path / "cuda-13.0")
    default = tmp_path / "cuda"
    default.symlink_to(kit)
    roots, notes = ct.candidates(env(PATH=default / "bin"), default_root=str(default))
    assert [r for r, _ in roots] == [os.path.realpath(kit)] and notes == []


def test_nothing_found(tmp_path):
    choice = choose(tmp_path)
    assert not choice.build_cuda
    assert choice.reason.startswith("no CUDA toolkit found (CUDA_HOME and CUDA_PATH unset, no nvcc on PATH")


def test_cpu_torch_and_mode_0_need_no_toolkit(tmp_path):
    kit = fake_toolkit(tmp_path / "cuda")
    cpu_torch = choose(tmp_path, torch_cuda=None, CUDA_HOME=kit)
    assert not cpu_torch.build_cuda and "CPU-only build" in cpu_torch.reason
    assert "install a CUDA build of torch" in ct.summary(cpu_torch)
    off = choose(tmp_path, mode="0", CUDA_HOME=kit)
    assert not off.build_cuda and ct.summary(off) == "pid_fast: PID_FAST_CUDA=0: building the CPU kernels only"


def test_bad_mode():
    with pytest.raises(ValueError, match="PID_FAST_CUDA must be one of auto, 0, 1, got 'yes'"):
        ct.choose("yes", "13.0", env={})


def test_messages(tmp_path):
    kit = fake_toolkit(tmp_path / "cuda")
    line = ct.summary(choose(tmp_path, CUDA_HOME=kit))
    assert line == f"pid_fast: building the CUDA kernels with the toolkit at {kit} (nvcc 13.0, found by CUDA_HOME)"
    missing = choose(tmp_path, CUDA_HOME=fake_toolkit(tmp_path / "bad", header=False))
    warning = ct.summary(missing)
    assert "\n" not in warning and warning.startswith("pid_fast: WARNING: building without the CUDA kernels")
    assert "no include/cuda_runtime.h" in warning and "set CUDA_HOME=" in warning and "PID_FAST_CUDA=0" in warning
    failure = ct.failure_message(missing)
    assert failure.startswith("pid_fast: PID_FAST_CUDA=1 but the CUDA kernels cannot be built")
    assert "no include/cuda_runtime.h" in failure and "set CUDA_HOME=" in failure


def test_wheel_includes_come_after_the_toolkit(tmp_path):
    for name in ("cu13", "cudnn"):
        (tmp_path / "nvidia" / name / "include").mkdir(parents=True)
    (tmp_path / "nvidia" / "no_headers").mkdir()
    dirs = ct.nvidia_wheel_includes([str(tmp_path), str(tmp_path / "elsewhere")])
    assert dirs == [str(tmp_path / "nvidia" / n / "include") for n in ("cu13", "cudnn")]
    flags = ct.include_after_toolkit_flags(dirs)
    assert flags["cxx"] == ["-idirafter", dirs[0], "-idirafter", dirs[1]]
    assert flags["nvcc"] == ["-Xcompiler", f"-idirafter,{dirs[0]}", "-Xcompiler", f"-idirafter,{dirs[1]}"]
    assert not any(f.startswith("-I") for f in flags["cxx"] + flags["nvcc"])


def run_setup(extra_env, *python_flags):
    environ = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "PID_FAST_CUDA")}
    environ.update(extra_env)
    return subprocess.run([sys.executable, *python_flags, "setup.py", "--name"], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=300)


def test_setup_stops_without_torch():
    """An isolated build has no torch: setup.py stops before anything else, naming the command."""
    proc = run_setup({}, "-S")  # -S: no site-packages, so no torch (nor setuptools)
    assert proc.returncode != 0
    assert "torch is not importable in this build environment" in proc.stderr
    assert "pip install --no-build-isolation ." in proc.stderr


def test_setup_pid_fast_cuda_1_fails_before_compiling(tmp_path):
    proc = run_setup({"PID_FAST_CUDA": "1", "CUDA_HOME": str(tmp_path / "missing-toolkit")})
    assert proc.returncode != 0
    assert "PID_FAST_CUDA=1 but the CUDA kernels cannot be built" in proc.stderr
    assert "CPU-only build" in proc.stderr or f"{tmp_path / 'missing-toolkit'} (from CUDA_HOME): does not exist" in proc.stderr


def test_setup_rejects_a_bad_mode():
    proc = run_setup({"PID_FAST_CUDA": "yes"})
    assert proc.returncode != 0 and "PID_FAST_CUDA must be auto, 0 or 1, got 'yes'" in proc.stderr
