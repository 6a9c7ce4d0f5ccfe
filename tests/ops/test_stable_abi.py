"""The compiled library is built on the LibTorch Stable ABI only: it imports no unstable torch
C++ symbol, reports the oldest torch it loads in, and an older torch is refused by name."""

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import pid_fast  # noqa: F401  (loads the library)
from pid_fast.ops import extension

CHECKER = Path(__file__).resolve().parents[2] / "build_support" / "check_stable_symbols.py"


def loaded_library() -> str:
    return os.environ.get("PID_FAST_LIBRARY") or importlib.util.find_spec("pid_fast._C").origin


def load_checker():
    spec = importlib.util.spec_from_file_location("check_stable_symbols", CHECKER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
@pytest.mark.skipif(not CHECKER.is_file(), reason="tests run outside the source tree (no "
                    "build_support/check_stable_symbols.py): the wheel check runs it directly")
def test_library_imports_no_unstable_torch_symbol():
    report = load_checker().check(loaded_library())
    assert report.unstable == []
    assert len(report.shim) > 0  # it does reach torch, through the C shim


def test_build_info_names_the_oldest_supported_torch():
    assert extension.compiled_info()["min_torch"] == ".".join(map(str, extension.MIN_TORCH))
    assert extension.torch_version(torch.__version__) >= extension.MIN_TORCH


@pytest.mark.parametrize("version", ["2.10.0", "2.14.1+cu130", "2.15.0", "2.11.0a0+git1234", "3.0.0"])
def test_supported_torch_versions_pass(version):
    extension.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.9.1", "2.4.0+cpu", "1.13.1", "2.1.0a0"])
def test_older_torch_is_refused_naming_the_range(version):
    with pytest.raises(ImportError, match=rf"need torch >= 2\.10 .*torch {re.escape(version)} is installed"):
        extension.check_torch_version(version)


def test_target_version_encoding():
    assert extension.torch_target_version((2, 10)) == "0x020a000000000000"
    assert extension.torch_target_version((2, 14)) == "0x020e000000000000"
