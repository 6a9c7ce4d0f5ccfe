"""Checks that a built pid_fast library imports no unstable torch C++ symbol (standard library
only; needs binutils' nm).

The library must reach torch only through the LibTorch Stable ABI: the C shim functions
(aoti_torch_*, torch_*), which keep their names and meaning across torch releases. Any undefined
C++ symbol of the at::, c10::, torch:: or caffe2:: namespaces (mangled _ZN2at..., _ZN3c10...,
_ZN5torch..., _ZN6caffe2...) ties the binary to the torch it was built against.

Usage: python build_support/check_stable_symbols.py LIBRARY.so [...]
Prints a summary per library and every unstable symbol found; exit status 1 if any library has
one, 2 if nm is missing or fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

# Mangled prefixes of the unstable namespaces: _ZN<len><name>, also after K (const) / N (nested).
UNSTABLE = re.compile(r"^_Z.*?(2at|3c10|5torch|6caffe2)(?=[A-Z0-9_])")
DEMANGLED = re.compile(r"(^|[^:\w])(at|c10|torch|caffe2)::")
SHIM = re.compile(r"^(aoti_torch_|torch_)")


@dataclass
class Report:
    path: str
    undefined: list = field(default_factory=list)  # (mangled, demangled)
    shim: list = field(default_factory=list)
    unstable: list = field(default_factory=list)


def _nm(path: str, *flags: str) -> list:
    nm = shutil.which("nm")
    if nm is None:
        raise FileNotFoundError("nm (binutils) is not on PATH")
    out = subprocess.run([nm, "-D", "--undefined-only", *flags, path], capture_output=True,
                         text=True, check=True).stdout
    # Undefined symbols have no value: each line is "<type> <name>" once stripped.
    return [line.split(None, 1)[1] for line in out.splitlines() if len(line.split(None, 1)) == 2]


def undefined_symbols(path: str) -> list:
    """(mangled, demangled) undefined dynamic symbols of a shared library, via nm."""
    names, pretty = _nm(path), _nm(path, "--demangle")
    return list(zip(names, pretty)) if len(names) == len(pretty) else [(n, n) for n in names]


def is_unstable(mangled: str, demangled: str) -> bool:
    """Names an at::/c10::/torch::/caffe2:: entity (the mangled test only when nm could not
    demangle the name)."""
    mangled, demangled = mangled.split("@")[0], demangled.split("@")[0]
    if demangled != mangled:
        return bool(DEMANGLED.search(demangled))
    return bool(UNSTABLE.match(mangled))


def check(path: str) -> Report:
    report = Report(path, undefined_symbols(path))
    for mangled, demangled in report.undefined:
        if SHIM.match(mangled):
            report.shim.append(mangled)
        elif is_unstable(mangled, demangled):
            report.unstable.append(demangled)
    return report


def main(argv: list) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    status = 0
    for path in argv:
        try:
            report = check(path)
        except (FileNotFoundError, subprocess.CalledProcessError) as e:
            print(f"{path}: cannot list its symbols: {e}", file=sys.stderr)
            return 2
        print(f"{path}: {len(report.undefined)} undefined symbols, {len(report.shim)} of them "
              f"torch's stable C shim (aoti_torch_*/torch_*), {len(report.unstable)} unstable "
              "torch C++ symbols")
        for name in report.unstable:
            print(f"  unstable: {name}")
        status = max(status, 1 if report.unstable else 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
