"""The errors of the checkpoint readers, in one place so that every io module can raise them."""

from __future__ import annotations

import pickle

__all__ = ["UnsafeCheckpointError", "CheckpointFormatError", "ConfigMismatchError", "UnknownSourceError"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle references something outside the allow-list; nothing was executed."""


class CheckpointFormatError(ValueError):
    """The file is not a (complete, well-formed) EDM pickle or pid_fast checkpoint."""


class ConfigMismatchError(ValueError):
    """Weights and an architecture config (or two networks) do not fit together."""


class UnknownSourceError(ValueError):
    """An EDM snapshot embeds network source code that is not a released EDM version, so its
    weights may belong to a different computation than pid_fast's networks."""
