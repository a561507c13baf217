"""Session-scoped data fixtures: one tokenizer and one tokenised demo corpus for all data tests;
and only tests marked slow may spawn gloo ranks (tests/helpers/distributed.py).

The tokenizer is the committed demo one (data/tokenizer/demo_8k.model); the corpus is built
once into a session temporary cache (about 3 s), so the tests never touch the repo's cache/.
"""

from __future__ import annotations

import pytest

from tests.helpers import distributed
from tests.helpers.data import DATA_SEQ_LENGTH


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before the test's fixtures are set up, so a module fixture that spawns ranks is checked too.
    distributed.SPAWN_ALLOWED = item.get_closest_marker("slow") is not None


@pytest.fixture(scope="session")
def demo_tokenizer():
    from moe_morpheus.config.data import resolve_path
    from moe_morpheus.data.tokenizer import Tokenizer

    return Tokenizer(resolve_path("data/tokenizer/demo_8k.model"))


@pytest.fixture(scope="session")
def demo_data_cfg(tmp_path_factory):
    from moe_morpheus.config.data import DataConfig

    # A pinned data seed: build_data is called without a run to resolve it from.
    return DataConfig(cache_dir=str(tmp_path_factory.mktemp("data_cache")), seed=1234)


@pytest.fixture(scope="session")
def demo_data(demo_data_cfg):
    from moe_morpheus.data.dataset import build_data

    return build_data(demo_data_cfg, DATA_SEQ_LENGTH, progress=False)
