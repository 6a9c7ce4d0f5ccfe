import pytest
from edm_fakes import hostile_source, sha256

from pid_fast.io import edm_sources


@pytest.fixture
def marker(tmp_path):
    """A path that only malicious code would create."""
    return tmp_path / "executed.txt"


@pytest.fixture(autouse=True)
def test_source_is_known(marker, monkeypatch):
    """The synthetic snapshots embed `hostile_source(marker)`, which is not EDM's released
    source: register its hash for the test (the table itself is never edited)."""
    monkeypatch.setitem(edm_sources.KNOWN_EDM_SOURCES, sha256(hostile_source(marker)),
                        "tests: the synthetic snapshots' module_src")
