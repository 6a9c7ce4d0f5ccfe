import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "io"))
from edm_fakes import hostile_source, sha256  # noqa: E402

from pid_fast.io import edm_sources  # noqa: E402


@pytest.fixture
def marker(tmp_path):
    """A path that only code run from a snapshot's embedded source would create."""
    return tmp_path / "executed.txt"


@pytest.fixture(autouse=True)
def test_source_is_known(marker, monkeypatch):
    """The stand-in snapshots embed `hostile_source(marker)`: register its hash for the test."""
    monkeypatch.setitem(edm_sources.KNOWN_EDM_SOURCES, sha256(hostile_source(marker)),
                        "tests: the stand-in snapshots' module_src")
