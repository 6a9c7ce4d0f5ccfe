"""Old module paths (pid_fast 0.1's flat layout) kept importable for one release.

``import pid_fast.training`` still works: the import system finds the old name here and hands
out a thin module that forwards every attribute to its new home (a DeprecationWarning says
which). The new layout is in README.md's Layout section.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module -> new module
MOVED = {
    "pid_fast.training": "pid_fast.train",
    "pid_fast.edm_checkpoint": "pid_fast.io",
    "pid_fast.io.edm_checkpoint": "pid_fast.io",
    "pid_fast.networks": "pid_fast.models.networks",
    "pid_fast.preconditioning": "pid_fast.models.preconditioning",
    "pid_fast.analytic": "pid_fast.models.analytic",
    "pid_fast.reference": "pid_fast.ops.reference",
    "pid_fast.triton_ops": "pid_fast.ops.triton_kernels",
    "pid_fast.testing": "pid_fast.ops.testing",
    "pid_fast.metrics": "pid_fast.eval.metrics",
    "pid_fast.plots": "pid_fast.eval.plots",
    "pid_fast.lpips_norm": "pid_fast.eval.lpips",
    "pid_fast.digits": "pid_fast.demo.digits",
    "pid_fast.train_cli": "pid_fast.cli.distill",
    "pid_fast.eval_cli": "pid_fast.cli.evaluate",
}


class _Forwarder(types.ModuleType):
    """A module whose attributes are those of ``target`` (read through, never copied)."""

    def __init__(self, name: str, target: str):
        super().__init__(name, f"Moved to {target}; this name is kept for one release.")
        self.__dict__["_target"] = target

    def _module(self) -> types.ModuleType:
        return importlib.import_module(self.__dict__["_target"])

    def __getattr__(self, attr: str):
        return getattr(self._module(), attr)

    def __dir__(self):
        return dir(self._module())


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        target = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {target}; the old name will be removed in the next "
                      f"release", DeprecationWarning, stacklevel=3)
        return _Forwarder(spec.name, target)

    def exec_module(self, module) -> None:
        module._module()  # import the new module now: an error shows at the import statement


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader())
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
