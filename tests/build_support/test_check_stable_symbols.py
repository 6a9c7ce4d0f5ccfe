"""build_support/check_stable_symbols.py: which undefined symbols tie a library to one torch."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "check_stable_symbols", REPO / "build_support" / "check_stable_symbols.py")
checker = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = checker  # dataclasses look their module up while the file executes
spec.loader.exec_module(checker)


@pytest.mark.parametrize("mangled,demangled,unstable", [
    ("_ZN3c105ErrorC1ENS_14SourceLocationENSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE",
     "c10::Error::Error(c10::SourceLocation, std::__cxx11::basic_string<char>)", True),
    ("_ZNK2at10TensorBase4sizeEl", "at::TensorBase::size(long) const", True),
    ("_ZN5torch8autograd12VariableInfoC1Ev", "torch::autograd::VariableInfo::VariableInfo()", True),
    ("_ZNSt6vectorIN2at6TensorESaIS1_EED1Ev", "std::vector<at::Tensor>::~vector()", True),
    ("_ZN3c1010TensorImpl7releaseEv@LIB", "_ZN3c1010TensorImpl7releaseEv@LIB", True),  # not demangled
    ("aoti_torch_get_dim", "aoti_torch_get_dim", False),
    ("torch_call_dispatcher", "torch_call_dispatcher", False),
    ("_ZNSt13runtime_errorD1Ev@GLIBCXX_3.4", "std::runtime_error::~runtime_error()@GLIBCXX_3.4", False),
    ("_ZN4math2atEv", "math::at()", False),  # a function named at, not the at:: namespace
])
def test_is_unstable(mangled, demangled, unstable):
    assert checker.is_unstable(mangled, demangled) is unstable


def compile_library(tmp_path, name, code):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None or shutil.which("nm") is None:
        pytest.skip("needs a C++ compiler and nm")
    src = tmp_path / f"{name}.cpp"
    src.write_text(code)
    lib = tmp_path / f"lib{name}.so"
    subprocess.run([cxx, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return str(lib)


def test_flags_a_library_that_calls_unstable_torch_code(tmp_path, capsys):
    lib = compile_library(tmp_path, "classic", """
        namespace c10 { void warn_once(int); }
        namespace at { struct Tensor { long dim() const; }; }
        extern "C" int aoti_torch_get_dim(void*, long*);
        long f(const at::Tensor& t, void* h) { long d; aoti_torch_get_dim(h, &d); c10::warn_once(1); return t.dim() + d; }
    """)
    assert checker.main([lib]) == 1
    out = capsys.readouterr().out
    assert "2 unstable torch C++ symbols" in out and "1 of them torch's stable C shim" in out
    assert re.search(r"unstable: c10::warn_once\(int\)", out)
    assert re.search(r"unstable: at::Tensor::dim\(\) const", out)


def test_passes_a_library_that_uses_only_the_c_shim(tmp_path, capsys):
    lib = compile_library(tmp_path, "stable", """
        #include <stdexcept>
        extern "C" int aoti_torch_get_dim(void*, long*);
        extern "C" int torch_call_dispatcher(const char*, const char*, void*, unsigned long);
        long f(void* h) { long d; if (aoti_torch_get_dim(h, &d)) throw std::runtime_error("x");
                          torch_call_dispatcher("aten::empty", "", nullptr, 0); return d; }
    """)
    assert checker.main([lib]) == 0
    assert "2 of them torch's stable C shim" in capsys.readouterr().out
