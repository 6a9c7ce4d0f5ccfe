"""The oldest supported torch has one home (pid_fast/ops/extension.py's MIN_TORCH): setup.py
refuses an older torch before compiling, and CMake targets the same stable ABI version."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_extension_loader():
    spec = importlib.util.spec_from_file_location("pid_fast_ext_loader_test",
                                                  REPO / "pid_fast" / "ops" / "extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cmake_targets_the_same_torch_as_setup_py():
    cmake = (REPO / "CMakeLists.txt").read_text()
    target = re.search(r'set\(PID_FAST_TORCH_TARGET_VERSION "(0x[0-9a-f]+)"', cmake).group(1)
    assert target == load_extension_loader().torch_target_version()


def test_setup_refuses_a_torch_older_than_the_stable_abi_target(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "2.9.1+cpu"\n\nclass version:\n    cuda = None\n')
    environ = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    environ.update(PYTHONPATH=str(tmp_path), PID_FAST_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "torch 2.9.1+cpu is too old" in proc.stderr
    assert "torch >= 2.10" in proc.stderr and "pip install 'torch>=2.10'" in proc.stderr
