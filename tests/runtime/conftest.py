import pytest


@pytest.fixture(scope="session")
def corpus_cache_dir(tmp_path_factory):
    """A default-corpus cache for the CPU training run (built by the run itself)."""
    return tmp_path_factory.mktemp("corpus_cache")
