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

# old module -> new module (or modules, searched in order)
MOVED = {
    "pid_fast.training": "pid_fast.train",
    "pid_fast.edm_checkpoint": "pid_fast.io",
    "pid_fast.io.edm_checkpoint": "pid_fast.io",
    "pid_fast.networks": "pid_fast.models.networks",
    "pid_fast.preconditioning": "pid_fast.models.preconditioning",
    "pid_fast.analytic": ("pid_fast.models.analytic", "pid_fast.demo.analytic_sweep"),
    "pid_fast.reference": "pid_fast.ops.reference",
    "pid_fast.triton_ops": "pid_fast.ops.triton_kernels",
    "pid_fast.testing": "pid_fast.ops.testing",
    "pid_fast.metrics": "pid_fast.eval.metrics",
    "pid_fast.plots": "pid_fast.eval.plots",
    "pid_fast.lpips_norm": "pid_fast.eval.lpips",
    "pid_fast.digits": "pid_fast.demo.digits",
    "pid_fast.demo.data": "pid_fast.data.digits",
    "pid_fast.demo.classifier": "pid_fast.eval.digits",
    "pid_fast.train_cli": "pid_fast.cli.distill",
    "pid_fast.eval_cli": ("pid_fast.cli.evaluate", "pid_fast.cli.demo"),
}


def _targets(name: str) -> tuple[str, ...]:
    target = MOVED[name]
    return (target,) if isinstance(target, str) else tuple(target)


class _Forwarder(types.ModuleType):
    """A module whose attributes are those of its new module(s) (read through, never copied)."""

    def __init__(self, name: str):
        super().__init__(name, f"Moved to {', '.join(_targets(name))}; this name is kept for one release.")

    def _modules(self) -> list[types.ModuleType]:
        return [importlib.import_module(t) for t in _targets(self.__name__)]

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for module in self._modules():
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(_targets(self.__name__))}) "
                             f"has no attribute {attr!r}")

    def __dir__(self):
        return sorted({a for m in self._modules() for a in dir(m)})


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {', '.join(_targets(spec.name))}; the old name will be "
                      f"removed in the next release", DeprecationWarning, stacklevel=3)
        return _Forwarder(spec.name)

    def exec_module(self, module) -> None:
        module._modules()  # import the new modules now: an error shows at the import statement


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader())
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
