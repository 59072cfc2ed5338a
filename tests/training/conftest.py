import pytest


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One default-corpus cache for every end-to-end test (built by the first run)."""
    return tmp_path_factory.mktemp("corpus_cache")
