"""Finds the CUDA toolkit that pid_fast's CUDA kernels are built with (standard library only).

setup.py loads this file by its path and calls ``choose`` BEFORE importing
torch.utils.cpp_extension, then puts the chosen root into os.environ["CUDA_HOME"]: that torch
module fixes its CUDA_HOME at import time, guessing the parent of `which nvcc`, which is wrong
for a wrapper script such as /usr/local/bin/nvcc (it then links -lcudart from /usr/local/lib64
and fails after minutes of compiling). Tested with fake toolkits in tests/build/.

A toolkit root is usable when it has
  bin/nvcc                that answers `nvcc --version` with "release X.Y",
  include/cuda_runtime.h  the runtime headers,
  lib64/libcudart.so      (or libcudart.a; lib/ when there is no lib64/, as torch looks) what
                          the link step's -lcudart needs,
and X is the major version of torch.version.cuda. Another minor version of the same major is
accepted (CUDA minor version compatibility; torch's own check only warns about it) and noted.

Candidates, in order, the first usable one wins:
  1. $CUDA_HOME, else $CUDA_PATH. When set it is the only candidate: an explicit choice is never
     replaced by another toolkit; when it is unusable the reason names it.
  2. The toolkit behind `nvcc` on PATH: the symlink-resolved nvcc's parent folder when that has
     include/cuda_runtime.h, else the TOP folder nvcc itself reports (`nvcc --dryrun`), which
     finds the toolkit behind a wrapper script.
  3. /usr/local/cuda.

Run as a script it prints the choice: python build_support/cuda_toolkit.py [--torch-cuda 13.0]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Mapping, Optional

DEFAULT_ROOT = "/usr/local/cuda"
MODES = ("auto", "0", "1")
TOOL_TIMEOUT_S = 30

Version = tuple  # (major, minor)


def run_tool(args: list) -> Optional[str]:
    """stdout + stderr of a command that exited with 0, else None (missing, failing, hanging)."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout + proc.stderr if proc.returncode == 0 else None


def parse_version(text: Optional[str]) -> Optional[Version]:
    """(major, minor) of "13.0" or of nvcc's "... release 13.0, V13.0.88"; None if absent."""
    match = re.search(r"(?:release )?(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def nvcc_release(nvcc: str) -> Optional[Version]:
    match = re.search(r"release (\d+)\.(\d+)", run_tool([nvcc, "--version"]) or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def format_version(version: Optional[Version]) -> str:
    return "?" if version is None else f"{version[0]}.{version[1]}"


def cudart_dir(root: str) -> str:
    """The library folder torch links -lcudart from: lib64, or lib when only that exists."""
    if not os.path.isdir(os.path.join(root, "lib64")) and os.path.isdir(os.path.join(root, "lib")):
        return "lib"
    return "lib64"


@dataclass
class Toolkit:
    root: str
    found_by: str  # "CUDA_HOME", "nvcc on PATH (/usr/local/bin/nvcc)", "/usr/local/cuda", ...
    version: Optional[Version] = None  # nvcc's release
    problems: list = field(default_factory=list)  # what makes it unusable; empty: usable

    @property
    def usable(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        where = self.root if self.found_by == self.root else f"{self.root} (from {self.found_by})"
        return f"{where}: {', '.join(self.problems)}" if self.problems else where


def inspect_toolkit(root: str, found_by: str, torch_cuda: Optional[Version]) -> Toolkit:
    """Checks one candidate root; every missing piece goes into .problems."""
    kit = Toolkit(root=root, found_by=found_by)
    if not os.path.isdir(root):
        kit.problems.append("does not exist")
        return kit
    nvcc = os.path.join(root, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        kit.problems.append("no bin/nvcc")
    else:
        kit.version = nvcc_release(nvcc)
        if kit.version is None:
            kit.problems.append("bin/nvcc --version fails or shows no 'release X.Y'")
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        kit.problems.append("no include/cuda_runtime.h")
    libdir = cudart_dir(root)
    if not any(os.path.exists(os.path.join(root, libdir, name)) for name in ("libcudart.so", "libcudart.a")):
        kit.problems.append(f"no {libdir}/libcudart.so to link (-lcudart)")
    if kit.version is not None and torch_cuda is not None and kit.version[0] != torch_cuda[0]:
        kit.problems.append(f"nvcc {format_version(kit.version)} but torch is built with CUDA "
                            f"{format_version(torch_cuda)} (needs a {torch_cuda[0]}.x toolkit)")
    return kit


def root_behind_nvcc(nvcc: str) -> Optional[str]:
    """The toolkit root of an nvcc found on PATH: its resolved ../ when that holds the headers,
    else the TOP folder nvcc reports in a dry run (a wrapper script elsewhere)."""
    real = os.path.realpath(nvcc)
    parent = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(parent, "include", "cuda_runtime.h")):
        return parent
    match = re.search(r"^#\$ TOP=(.+?)\s*$", run_tool([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull]) or "",
                      re.MULTILINE)
    return os.path.realpath(match.group(1).strip('"')) if match else None


def candidates(env: Mapping[str, str], default_root: str = DEFAULT_ROOT) -> tuple:
    """([(root, found_by), ...] in order without duplicates, [notes on what was not usable as a
    candidate at all])."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            return [(env[name], name)], []
    found, notes = [], []
    nvcc = shutil.which("nvcc", path=env.get("PATH", ""))
    if nvcc is not None:
        root = root_behind_nvcc(nvcc)
        if root is None:
            notes.append(f"nvcc on PATH ({nvcc}): cannot tell its toolkit folder")
        else:
            found.append((root, f"nvcc on PATH ({nvcc})"))
    if os.path.exists(default_root) and all(os.path.realpath(default_root) != os.path.realpath(r)
                                            for r, _ in found):
        found.append((default_root, default_root))
    return found, notes


@dataclass
class Choice:
    mode: str  # PID_FAST_CUDA: auto, 0 or 1
    torch_cuda: Optional[Version]  # torch.version.cuda; None for a CPU-only torch
    toolkit: Optional[Toolkit] = None  # the toolkit to build with; None: no CUDA kernels
    reason: str = ""  # why there are no CUDA kernels ("" when there are)
    notes: list = field(default_factory=list)

    @property
    def build_cuda(self) -> bool:
        return self.toolkit is not None


def choose(mode: str, torch_cuda: Optional[str], env: Optional[Mapping[str, str]] = None,
           default_root: str = DEFAULT_ROOT) -> Choice:
    """The build decision for PID_FAST_CUDA=mode and torch.version.cuda=torch_cuda."""
    if mode not in MODES:
        raise ValueError(f"PID_FAST_CUDA must be one of {', '.join(MODES)}, got {mode!r}")
    env = os.environ if env is None else env
    choice = Choice(mode=mode, torch_cuda=parse_version(torch_cuda))
    if mode == "0":
        choice.reason = "PID_FAST_CUDA=0"
        return choice
    if choice.torch_cuda is None:
        choice.reason = "torch is a CPU-only build (torch.version.cuda is None)"
        return choice
    roots, notes = candidates(env, default_root)
    kits = [inspect_toolkit(root, found_by, choice.torch_cuda) for root, found_by in roots]
    usable = [kit for kit in kits if kit.usable]
    if usable:
        choice.toolkit = usable[0]
        if choice.toolkit.version[1] != choice.torch_cuda[1]:
            choice.notes.append(f"nvcc {format_version(choice.toolkit.version)} and torch's CUDA "
                                f"{format_version(choice.torch_cuda)} differ in the minor version only: accepted")
        return choice
    if not kits and not notes:
        choice.reason = (f"no CUDA toolkit found (CUDA_HOME and CUDA_PATH unset, no nvcc on PATH, "
                         f"no {default_root})")
    else:
        choice.reason = "no usable CUDA toolkit: " + "; ".join([kit.describe() for kit in kits] + notes)
    return choice


def how_to_get_cuda(choice: Choice) -> str:
    if choice.torch_cuda is None:
        return "install a CUDA build of torch, then rebuild"
    return (f"set CUDA_HOME=/path/to/a/CUDA-{choice.torch_cuda[0]}.x-toolkit (with bin/nvcc, "
            f"include/, lib64/libcudart.so) and rebuild")


def summary(choice: Choice) -> str:
    """One line for the build log: what is built and with which toolkit, or why not."""
    if choice.build_cuda:
        kit = choice.toolkit
        line = (f"pid_fast: building the CUDA kernels with the toolkit at {kit.root} "
                f"(nvcc {format_version(kit.version)}, found by {kit.found_by})")
        return line + "".join(f"; {note}" for note in choice.notes)
    if choice.mode == "0":
        return "pid_fast: PID_FAST_CUDA=0: building the CPU kernels only"
    return (f"pid_fast: WARNING: building without the CUDA kernels (CPU and Triton only): {choice.reason}. "
            f"For the CUDA kernels {how_to_get_cuda(choice)}; PID_FAST_CUDA=0 builds CPU-only without this warning.")


def failure_message(choice: Choice) -> str:
    """The error for PID_FAST_CUDA=1 when no CUDA build is possible."""
    return (f"pid_fast: PID_FAST_CUDA=1 but the CUDA kernels cannot be built: {choice.reason}.\n"
            f"To fix: {how_to_get_cuda(choice)}, or use PID_FAST_CUDA=auto (CUDA when possible) or 0 (CPU only).")


def nvidia_wheel_includes(search_path: Optional[list] = None) -> list:
    """The include folders of the nvidia-* CUDA wheels (nvidia/<name>/include on sys.path):
    cusparse.h, cublas_v2.h, ... that a minimal toolkit lacks and torch's CUDA headers include."""
    dirs = []
    for entry in sys.path if search_path is None else search_path:
        base = os.path.join(entry or ".", "nvidia")
        if os.path.isdir(base):
            dirs += [os.path.join(base, name, "include") for name in sorted(os.listdir(base))
                     if os.path.isdir(os.path.join(base, name, "include"))]
    return list(dict.fromkeys(dirs))


def include_after_toolkit_flags(dirs: list) -> dict:
    """Compiler flags that search ``dirs`` AFTER every -I folder and the toolkit's own include
    folder (gcc's -idirafter; nvcc preprocesses through the host compiler, so -Xcompiler passes
    it on): a wheel's cuda_runtime.h of another CUDA release never shadows the toolkit's."""
    return {"cxx": [flag for d in dirs for flag in ("-idirafter", d)],
            "nvcc": [flag for d in dirs for flag in ("-Xcompiler", f"-idirafter,{d}")]}


def installed_torch_cuda() -> Optional[str]:
    """torch.version.cuda of this interpreter's torch, asked in a child process."""
    try:
        proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda)"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.split()
    return lines[-1] if proc.returncode == 0 and lines and lines[-1] != "None" else None


def main(argv: Optional[list] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Print the CUDA toolkit pid_fast's build would use.")
    parser.add_argument("--torch-cuda", help="torch.version.cuda (default: ask the installed torch)")
    parser.add_argument("--root", action="store_true", help="print only the root (nothing when none)")
    args = parser.parse_args(argv)
    torch_cuda = args.torch_cuda if args.torch_cuda is not None else installed_torch_cuda()
    choice = choose(os.environ.get("PID_FAST_CUDA", "auto").lower(), torch_cuda)
    if args.root:
        if choice.build_cuda:
            print(choice.toolkit.root)
    else:
        print(summary(choice))
    return 0


if __name__ == "__main__":
    sys.exit(main())
