"""What each command needs beyond the core install, checked before it does any work.

``require(extra, *modules)`` stops a command with one line naming the missing packages and the
pip command that installs them, e.g.

    Error: pid-fast demo needs scikit-learn, matplotlib (not installed): pip install 'pid_fast[eval]'

Importability is checked with importlib's ``find_spec`` (nothing is imported).
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Optional

import click

__all__ = ["PIP_NAMES", "CORE_MODULES", "missing_modules", "require"]

# import name -> the name pip installs it under
PIP_NAMES = {"PIL": "Pillow", "sklearn": "scikit-learn", "cleanfid": "clean-fid", "matplotlib": "matplotlib",
             "torchvision": "torchvision", "lpips": "lpips", "safetensors": "safetensors", "tqdm": "tqdm"}
# Modules of the core install (setup.py's install_requires): a missing one is installed by name.
CORE_MODULES = ("PIL", "safetensors", "tqdm")


def _importable(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ValueError:  # in sys.modules without a __spec__: it was imported, so it is there
        return True


def missing_modules(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported."""
    return [m for m in modules if not _importable(m)]


def require(extra: Optional[str], *modules: str, command: Optional[str] = None) -> None:
    """Stop with a click error when one of ``modules`` is not installed. ``extra`` is the
    pid_fast extra that provides the non-core ones (None: core modules only); ``command``
    defaults to the running click command's name."""
    gone = missing_modules(*modules)
    if not gone:
        return
    if command is None:
        ctx = click.get_current_context(silent=True)
        command = ctx.info_name if ctx is not None else "pid_fast"
    names = ", ".join(PIP_NAMES.get(m, m) for m in gone)
    install = [PIP_NAMES.get(m, m) for m in gone if m in CORE_MODULES]
    if any(m not in CORE_MODULES for m in gone):
        install.append(f"'pid_fast[{extra}]'" if extra else " ".join(PIP_NAMES.get(m, m) for m in gone
                                                                      if m not in CORE_MODULES))
    raise click.ClickException(f"pid-fast {command} needs {names} (not installed): pip install {' '.join(install)}")
